"""Token Recycling's table seeded from the model (engine/recycling_prior.py): each row is what the model guesses
after that token alone, a fresh table starts from it, and it is computed once per model."""

import numpy as np
import pytest
import torch
from conftest import complete

from engine import recycling_prior


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_each_row_is_the_models_guess_after_that_token_alone(arch, tiny_engine, tiny_model, tiny_config):
    """Rows of many tokens at once, each seeing only itself, against the HF model run on each token as its own
    one-token sequence. 96 rows a step over 512 tokens: five full steps and a ragged last one whose spare rows
    repeat early tokens. Catches rows that see each other, a chunk stored at the wrong offset, the spare rows'
    guesses stored over real ones, and logits stored as probabilities."""
    engine = tiny_engine(arch)
    reference, _ = tiny_model(tiny_config(arch))
    table = recycling_prior.compute(engine.runner, 512, top_k=4, rows=96)
    assert table.shape == (512, 2, 4) and table.dtype == np.float32
    for token in (0, 1, 95, 96, 300, 479, 480, 511):
        with torch.no_grad():
            logits = reference(torch.tensor([[token]])).logits[0, -1]
        probs, ids = logits.softmax(-1).topk(4)
        assert table[token, 0].astype(int).tolist() == ids.tolist(), token
        np.testing.assert_allclose(table[token, 1], probs.numpy(), rtol=1e-4, atol=1e-6)


def test_a_fresh_table_starts_from_the_seed_and_decoding_stays_exact(tiny_engine, tmp_path, monkeypatch):
    """With the prior on, every token has successors before any request; what a request teaches the table is
    forgotten back to the seed (not to an empty table), and the seed itself is never written. Tree decoding
    with it commits AR's tokens."""
    monkeypatch.setenv("AHEAD_HOME", str(tmp_path))
    engine = tiny_engine("qwen2", recycling_prior=True)
    seed = engine.sessions.recycling_seed
    assert seed is not None and bool((seed[:, 0, 0] >= 0).all())
    kept = seed.copy()
    assert np.array_equal(engine.sessions.recycling.table, seed)
    ar = complete(engine, "def fibonacci(n):\n    if n", max_tokens=24, decoding="ar", document="a")
    tree = complete(engine, "def fibonacci(n):\n    if n", max_tokens=24, decoding="tree", document="t")
    assert tree.tokens == ar.tokens and tree.steps < len(ar.tokens)
    assert not np.array_equal(engine.sessions.recycling.table, seed)  # the request's rows were learned
    assert np.array_equal(seed, kept)
    engine.sessions.forget_learned()
    assert np.array_equal(engine.sessions.recycling.table, seed)


def test_the_table_is_computed_once_per_model_and_read_back(tiny_engine, tmp_path, monkeypatch):
    """A second engine on the same weights reads the table from disk; another model computes its own; a garbled
    file is computed again, with a line saying so."""
    monkeypatch.setenv("AHEAD_HOME", str(tmp_path))
    computed = []
    compute = recycling_prior.compute

    def counting(runner, vocab, *args, **kwargs):
        computed.append(runner.model.args.arch)
        return compute(runner, vocab, *args, **kwargs)

    monkeypatch.setattr(recycling_prior, "compute", counting)
    engine = tiny_engine("qwen2", recycling_prior=True)
    first = engine.sessions.recycling_seed
    second = tiny_engine("qwen2", recycling_prior=True).sessions.recycling_seed
    assert computed == ["qwen2"] and np.array_equal(first, second)
    tiny_engine("llama", recycling_prior=True)
    assert computed == ["qwen2", "llama"]
    files = sorted((tmp_path / "recycling").glob("*.npy"))
    assert len(files) == 2
    next(f for f in files if f.name.startswith("qwen2")).write_bytes(b"not a table")
    lines = []
    table = recycling_prior.load_or_compute(engine.runner, 512, lines.append)
    assert computed == ["qwen2", "llama", "qwen2"] and np.array_equal(table, first)
    assert any("unreadable" in line for line in lines)
    assert np.array_equal(recycling_prior.load_or_compute(engine.runner, 512, lines.append), first)
    assert computed == ["qwen2", "llama", "qwen2"]  # the rewritten file is read back


def test_off_by_default_on_a_cpu(tiny_engine):
    """A CPU takes minutes for a real vocabulary: the prior is for GPUs unless asked for."""
    assert tiny_engine("qwen2").sessions.recycling_seed is None


def test_a_failed_seeding_leaves_a_working_engine_with_an_empty_table(tiny_engine, tmp_path, monkeypatch):
    """Seeding is an optimization: running out of memory for it (or any other failure of the computation)
    logs one line and the engine starts with an empty table, as it did before the prior existed."""
    monkeypatch.setenv("AHEAD_HOME", str(tmp_path))

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 311.00 MiB")

    monkeypatch.setattr(recycling_prior, "compute", fail)
    engine = tiny_engine("qwen2", recycling_prior=True)
    assert engine.sessions.recycling_seed is None
    assert not (engine.sessions.recycling.table[:, 0, 0] >= 0).any()
    assert complete(engine, "def f(x):\n    return", max_tokens=8, decoding="tree").tokens
