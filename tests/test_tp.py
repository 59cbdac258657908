"""Tensor parallelism on the CPU: `ahead engine --tp 2 --device cpu` (gloo, two processes) with a tiny model.

The daemon is a real subprocess and its follower a real `python -m engine.parallel`; the reference
is the same model in-process at TP=1. fp32 keeps the split forward's rounding far from flipping a
greedy token, so the outputs must be identical, not just close.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch
from daemon_helpers import CODE, local_engine, save_tiny_model, start_engine, stop

from engine.client import EngineClient
from engine.decoding import DecodeState
from engine.loading import build_model
from engine.lookahead import LookaheadConfig, NGramPool, decode_lookahead, step_shape
from engine.parallel import Follower, LeaderRunner
from engine.runner import Runner, StepShape

LOOKAHEAD = "4,3,4"
PROMPTS = [CODE, CODE[:40], CODE[:-10], CODE + "def main():\n"]
# AHEAD_TP_DEVICE=cuda runs the daemon tests on two GPUs (fp32; the reference is TP=1 on the same device).
DEVICE = os.environ.get("AHEAD_TP_DEVICE", "cpu")
OTHER = "import os\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n"  # shares no prefix with CODE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config, tiny_model, tiny_tokenizer) -> Path:
    """Qwen2 with 4 query heads over 2 KV heads: one KV head (and two query heads) per rank."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_config, tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def tp2_engine(model_dir: Path, tmp_path_factory):
    """`ahead engine --tp 2 --device cpu`: (its process, its socket)."""
    sock = tmp_path_factory.mktemp("run") / "tp.sock"
    proc = start_engine(model_dir, sock, "--tp", "2", "--device", DEVICE, "--dtype", "fp32")
    yield proc, sock
    stop(proc)


@pytest.fixture
def tp2(tp2_engine) -> Path:
    proc, sock = tp2_engine
    assert proc.poll() is None, "the engine has stopped"
    return sock


@pytest.fixture(scope="module")
def local(model_dir: Path):
    return local_engine(model_dir, DEVICE)


def reference(local, prefix: str, decoding: str, max_tokens: int = 24):
    from conftest import complete

    cfg = LookaheadConfig.parse(LOOKAHEAD) if decoding == "lookahead" else None
    # A fresh n-gram pool, as a document's first request on the daemon has.
    return complete(local, prefix, "\n", max_tokens=max_tokens, decoding=decoding, lookahead=cfg, reuse_kv=False,
                    type_through=False, persistent_pool=False)


def served(client: EngineClient, prefix: str, decoding: str, document: str, max_tokens: int = 24) -> dict:
    return client.complete(prefix=prefix, suffix="\n", document=document, max_tokens=max_tokens, stop="raw",
                           decoding=decoding, lookahead=LOOKAHEAD if decoding == "lookahead" else None)


def followers(pid: int) -> list[int]:
    """Processes whose parent is `pid` and that run engine.parallel."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"engine.parallel" in cmdline:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Wire:
    """Rank 0's messages handed to an in-process Follower as they are sent, through msgpack as on the pipe."""

    def __init__(self, follower: Follower):
        self.follower = follower
        self.unpacker = msgpack.Unpacker()

    def send(self, data: bytes) -> None:
        self.unpacker.feed(data)
        for message in self.unpacker:
            self.follower.handle(message)


def test_every_model_call_of_rank_0_reaches_the_follower(tiny_config, tiny_model) -> None:
    """Catches a Runner call that rank 0 makes but does not send (a step, moved slots, parked or restored K/V,
    a step layout rewritten in place as the token tree does): the follower's KV cache would differ. Also
    catches parked K/V that the follower keeps after rank 0 let go of them. One process, one whole model
    each (no all-reduce), so the caches must be equal bit for bit."""
    _, ckpt = tiny_model(tiny_config("qwen2"))
    cpu = torch.device("cpu")
    follower = Follower(Runner(build_model(ckpt, cpu, torch.float32, 256)))
    leader = LeaderRunner(build_model(ckpt, cpu, torch.float32, 256), tp=Wire(follower))

    def same_cache() -> bool:
        return torch.equal(leader.model.kv, follower.runner.model.kv)

    whole = torch.randint(512, (256,), generator=torch.Generator().manual_seed(2)).tolist()
    leader.prefill(whole, 0)  # one causal chunk over the whole cache: attention skips its mask on both ranks
    assert same_cache() and follower.shapes["causal256"].causal
    prompt = torch.randint(512, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    leader.prefill(prompt[:-1], 0)
    state = DecodeState(list(prompt), 12, frozenset())
    pool = NGramPool(3)
    pool.add_text(prompt * 2)  # the prompt repeated: its own continuations are accepted, so slots move
    decode_lookahead(leader, state, LookaheadConfig(4, 3, 4), pool)
    parked = leader.save(60)  # also makes the last step's queued slot moves, on both ranks
    assert state.pool_hits and same_cache()

    leader.step(step_shape(LookaheadConfig(2, 2, 1)), prompt[:4], 20)  # overwrites parked slots
    tree = StepShape("tree-like", torch.arange(3), torch.ones(3, 3, dtype=torch.bool).tril())
    leader.step(tree, prompt[:3], 30)
    leader.set_layout(tree, torch.ones(3, dtype=torch.long), torch.eye(3, dtype=torch.bool))  # as engine/tree.py does
    leader.step(tree, prompt[3:6], 33)
    assert same_cache()
    leader.restore(parked)
    assert same_cache() and len(follower.parked) == 1
    del parked
    leader.move_slots([1], [2])
    moved = leader.save(3)  # makes the queued move on both ranks
    assert same_cache() and torch.equal(moved[:, :, :, 2], moved[:, :, :, 1]) and len(follower.parked) == 1


@pytest.mark.parametrize("decoding", ["ar", "lookahead"])
def test_tp2_daemon_gives_the_tokens_of_tp1(tp2: Path, local, decoding: str) -> None:
    """Catches a wrong split (heads, gate/up halves, row-parallel inputs), a missing all-reduce, or a follower
    that runs other steps than rank 0 (lookahead's step shapes and moved K/V slots): any changes the tokens."""
    wants = [reference(local, prefix, decoding) for prefix in PROMPTS]
    with EngineClient(tp2) as client:
        assert "x2 (tensor parallel)" in client.info["engine"]
        for k, (prefix, want) in enumerate(zip(PROMPTS, wants, strict=True)):
            got = served(client, prefix, decoding, document=f"{decoding}-{k}")
            assert (got["text"], got["tokens"], got["steps"]) == (want.text, len(want.tokens), want.steps)
            assert got["tokens"] == 24
    if decoding == "lookahead":  # guesses were accepted, so K/V slots were moved (on both ranks)
        assert any(len(want.tokens) > want.steps for want in wants)


def test_tree_decoding_through_tp2_gives_the_greedy_tokens(tp2: Path, local) -> None:
    """Catches a tree step whose layout (positions and mask, rewritten in place every step) or moved K/V
    reaches rank 0 only: the split model would then verify other rows and commit other tokens. The trees
    themselves depend on what each engine learned before, so the reference is greedy AR, not the step count."""
    wants = [reference(local, prefix, "ar") for prefix in PROMPTS]
    with EngineClient(tp2) as client:
        results = [served(client, prefix, "tree", document=f"tree-{k}") for k, prefix in enumerate(PROMPTS)]
    for got, want in zip(results, wants, strict=True):
        assert (got["text"], got["tokens"]) == (want.text, len(want.tokens))
    assert sum(r["tokens"] for r in results) > sum(r["steps"] for r in results)  # drafts were accepted


def test_kv_reuse_and_parked_documents_stay_exact(tp2: Path, local) -> None:
    """Catches parking (save), restoring or dropping K/V on rank 0 only: document A's second request reuses K/V
    that rank 1 must have parked and restored across document B's request, or its answer changes."""
    first, longer = CODE[:60], CODE[:60] + "    return n\n"
    with EngineClient(tp2) as client:
        served(client, first, "ar", document="reuse-a")
        served(client, OTHER, "lookahead", document="reuse-b")  # parks A's K/V, then overwrites the cache
        got = served(client, longer, "ar", document="reuse-a")
        again = served(client, longer, "lookahead", document="reuse-a")
    assert got["reused_tokens"] > 10 and again["reused_tokens"] > 10
    assert got["text"] == reference(local, longer, "ar").text
    assert again["text"] == reference(local, longer, "lookahead").text


def test_complete_command_through_the_tp2_engine(tp2: Path, local, tmp_path: Path) -> None:
    """`ahead complete --socket` against `ahead engine --tp 2`: catches the CLI path not reaching the split engine."""
    source = tmp_path / "fib.py"
    source.write_text(CODE + "def main():\n")
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "complete", str(source), "--line", "6", "--col", "0", "--json",
         "--max-tokens", "16", "--no-stop-rules", "--decoding", "lookahead", "--lookahead", LOOKAHEAD,
         "--socket", str(tp2)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    from conftest import complete

    want = complete(local, CODE + "def main():\n", "", max_tokens=16, decoding="lookahead",
                    lookahead=LookaheadConfig.parse(LOOKAHEAD), reuse_kv=False, type_through=False,
                    persistent_pool=False)
    assert out["served_by"] == "engine" and "tensor parallel" in out["engine"]
    assert (out["text"], out["tokens"]) == (want.text, len(want.tokens))


def test_kv_heads_that_do_not_divide_are_a_clear_error(tmp_path: Path, tiny_config, tiny_model,
                                                       tiny_tokenizer) -> None:
    """Catches a model split unevenly (or a traceback, or a hang) when --tp does not divide its KV heads."""
    model, _ = tiny_model(tiny_config("llama"))  # one KV head
    model.save_pretrained(tmp_path / "llama", safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path / "llama")
    proc = start_engine(tmp_path / "llama", tmp_path / "e.sock", "--tp", "2", wait=False)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2, err
    assert "ahead: error: --tp 2: the model cannot be split by heads: its 1 KV heads do not divide by --tp 2" in err
    assert "Traceback" not in err and "tensor parallel over" not in err  # said before any follower started


def test_a_dead_follower_ends_the_engine_with_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    """Catches an engine that hangs, or keeps answering with half a model, once a follower has died."""
    proc = start_engine(model_dir, tmp_path / "d.sock", "--tp", "2")
    try:
        (follower,) = followers(proc.pid)
        os.kill(follower, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "tensor-parallel rank 1 exited (code -9)" in err


def test_gpu_benchmark_runs_on_a_tiny_shape(capsys) -> None:
    """Catches engine/bench/tp.py crashing (or printing no JSON) before anyone spends GPU time on it."""
    from engine.bench import tp

    assert tp.main(["--tiny", "--lookahead", LOOKAHEAD, "--trees", "8", "--tokens-per-step", f"{LOOKAHEAD}=1.5",
                    "--tokens-per-step", "tree8=2.5", "--replays", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    step = result["tp2"]["lookahead4x3x4"]
    assert 0 < step["all_reduce_ms"] and step["all_reduce_share"] == step["all_reduce_ms"] / step["step_ms"]
    assert result["floor_tp2"]["bytes_per_gpu"] < result["floor_tp1"]["bytes_per_gpu"]
    projected = result["projected"][LOOKAHEAD]
    assert projected["speedup_vs_tp2_ar"] == 1.5 * result["tp2"]["decode"]["step_ms"] / step["step_ms"]
    assert isinstance(result["tp1"], dict) and "speedup_vs_tp1_ar" in projected
    tree = result["projected"]["tree8"]
    assert tree["speedup_vs_tp2_ar"] == 2.5 * result["tp2"]["decode"]["step_ms"] / result["tp2"]["tree8"]["step_ms"]


def test_stopping_the_engine_stops_its_follower(tp2_engine) -> None:
    """Catches followers left running (holding a GPU) after the engine shuts down. Stops the module's engine,
    so it comes last."""
    proc, _ = tp2_engine
    (follower,) = followers(proc.pid)
    assert stop(proc) == 0
    deadline = time.monotonic() + 15
    while alive(follower) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(follower)
