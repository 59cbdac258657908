"""Token Recycling's table seeded with what the model predicts after each token alone.

The table (`sources/recycling.py`) learns a token's successors the first time that token is the input of a
step's row; until then it drafts nothing after it. A fresh engine starts with it empty, and so does every
benchmark pass (`forget_learned`). On SmolLM2 (8 cases, 64 rows, AR's continuations as the oracle) a third of
the steps whose drafts all missed the next token had met an empty row: ' isinstance' before '(', ' must'
before ' be', ' Example' before ' usage'.

Here every row is filled once, from the model: each token as a one-token sequence, many to a step. Every row
of such a step sees only itself, at position 0, so it computes exactly that token's next-token distribution,
and its top-k go into the row. A 1.5B model's 151,936 tokens take a few seconds of GPU time; the result is
kept on disk, keyed by the weights, so later starts only read ~10 MB.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import torch

from .atomic import replace_atomically
from .default_model import cache_dir
from .runner import Runner, StepShape
from .sources.recycling import TOP_K, empty_rows, top_successors

FORMAT_VERSION = 1
ROWS = {"cuda": 1024, "cpu": 256}  # tokens a step
PROGRESS_SECONDS = 10.0  # a line at most this often while computing


@cache
def alone_shape(rows: int) -> StepShape:
    """`rows` independent one-token sequences: every row at position 0, seeing only itself."""
    return StepShape(f"alone{rows}", torch.zeros(rows, dtype=torch.long), torch.eye(rows, dtype=torch.bool))


def compute(runner: Runner, vocab: int, top_k: int = TOP_K, rows: int | None = None,
            progress: Callable[[int], None] | None = None) -> np.ndarray:
    """[vocab, 2, top_k] rows as `Recycling.table` holds them: token t's most probable successors with nothing
    before it, and their probabilities. Overwrites the first `rows` cache slots."""
    rows = min(rows or ROWS[runner.device.type], runner.capacity, vocab)
    shape = alone_shape(rows)
    table = empty_rows(vocab, top_k)
    for start in range(0, vocab, rows):
        n = min(rows, vocab - start)
        tokens = np.arange(start, start + rows) % vocab  # the last step's spare rows repeat early tokens
        _, logits = runner.step(shape, tokens, 0, graph=False)
        ids, probs = top_successors(logits, n, top_k)
        table[start : start + n, 0] = ids.cpu().numpy()
        table[start : start + n, 1] = probs.float().cpu().numpy()
        if progress is not None:
            progress(start + n)
    return table


def weights_key(runner: Runner, top_k: int) -> str:
    """The model's identity for the disk cache: its shape, dtype and a hash of its embedding and output rows
    (a different checkpoint of the same shape differs there)."""
    model = runner.model
    a = model.args
    digest = hashlib.sha256(f"v{FORMAT_VERSION}-{a.arch}-{a.vocab_size}-{a.dim}-{a.n_layers}-{top_k}".encode())
    for weight in (model.tok_embeddings.weight, model.output.weight):
        digest.update(weight[:64].detach().float().cpu().numpy().tobytes())
        digest.update(weight[-64:].detach().float().cpu().numpy().tobytes())
    return f"{a.arch}-{a.vocab_size}-{digest.hexdigest()[:20]}-{str(model.output.weight.dtype).removeprefix('torch.')}"


def cache_path(runner: Runner, top_k: int = TOP_K) -> Path:
    return cache_dir() / "recycling" / f"{weights_key(runner, top_k)}.npy"


def load_or_compute(runner: Runner, vocab: int, log: Callable[[str], None], top_k: int = TOP_K) -> np.ndarray:
    """The seeded table from the disk cache, else computed (and stored, atomically; a write that fails only costs
    the next start the time again)."""
    path = cache_path(runner, top_k)
    want = (vocab, 2, top_k)
    if path.is_file():
        try:
            table = np.load(path, allow_pickle=False)
            if table.shape == want and table.dtype == np.float32:
                return table
            log(f"ahead: cached recycling table {path} has shape {table.shape}; computing it again")
        except (OSError, ValueError) as exc:
            log(f"ahead: cached recycling table {path} is unreadable ({exc}); computing it again")
    log(f"ahead: seeding Token Recycling's table from the model: {vocab:,} tokens (once; cached at {path})")
    started = last = time.monotonic()

    def progress(done: int) -> None:
        nonlocal last
        if time.monotonic() - last >= PROGRESS_SECONDS and done < vocab:
            last = time.monotonic()
            log(f"ahead: ... {done:,} of {vocab:,} tokens in {last - started:.0f} s")

    table = compute(runner, vocab, top_k, progress=progress)
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file, not a name: np.save would add ".npy" to the temporary one
            np.save(f, table, allow_pickle=False)

    try:
        replace_atomically(path, write)
    except OSError as exc:
        log(f"ahead: could not cache the recycling table at {path} ({exc}); the next start computes it again")
    return table
