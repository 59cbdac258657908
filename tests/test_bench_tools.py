"""The benchmark commands on a tiny random Qwen2 with SmolLM2's real tokenizer, on CPU.

The measuring functions are called directly (no subprocess, no real weights), so these
check what the numbers mean, not how fast anything is: every method agrees with AR,
tuning stores a default the engine then uses, keystrokes reuse the KV of the document.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from engine import bench, keystrokes, tune
from engine.charts import bar_chart
from engine.engine import Engine, EngineOptions
from engine.errors import AheadError
from engine.loading import Checkpoint, gguf_tokenizer_and_config
from engine.lookahead import LookaheadConfig
from engine.prompt import PromptBudget

CASES = Path(__file__).resolve().parents[2] / "shared" / "bench" / "cases.jsonl"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
PNG = b"\x89PNG"


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_gguf):
    """SmolLM2's config and tokenizer (metadata only: the random model needs no real weights)."""
    return gguf_tokenizer_and_config(Path(smollm2_gguf), quiet)


@pytest.fixture(scope="module")
def engine(smollm2_meta) -> Engine:
    like, tokenizer = smollm2_meta
    config = Qwen2Config(**TINY, vocab_size=like.vocab_size, rope_theta=1e6, tie_word_embeddings=True,
                         bos_token_id=like.bos_token_id, eos_token_id=like.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # noise everywhere, so that greedy picks are far from ties
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = Checkpoint(config, tokenizer, model.state_dict(), "tiny")
    options = EngineOptions(device="cpu", max_seq_len=1024, budget=PromptBudget(prefix_tokens=256, suffix_tokens=32))
    return Engine(options, log=quiet, checkpoint=ckpt)


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_methods_give_the_ar_tokens(engine):
    args = parse(bench, ["--cases", str(CASES), "--limit", "2", "--max-tokens", "12", "--lookahead", "3,3,2",
                         "--methods", "ar,lookahead,generate,prompt_lookup", "--chart", ""])
    result = bench.run_bench(engine, args)

    assert {"model", "device", "dtype", "lookahead", "cases", "methods", "speedup", "identical", "per_case"} <= set(
        result)
    assert result["cases"] == 2 and result["lookahead"] == "3,3,2"
    for name in ("ar", "lookahead", "generate", "prompt_lookup"):
        summary = result["methods"][name]
        assert {"latency_ms_p50", "tok_s_p50", "tok_s_aggregate", "tokens_per_step", "step_ms_mean"} <= set(summary)
        assert summary["tokens"] > 0
        assert result["identical"][name] == {"vs_ar": 1.0, "vs_generate": 1.0}
    assert result["mismatch"] == {} and bench.mismatch_lines(result) == []
    assert result["methods"]["ar"]["tokens_per_step"] == 1.0
    assert result["methods"]["lookahead"]["tokens_per_step"] >= 1.0
    assert result["methods"]["generate"]["tokens_per_step"] is None
    assert result["speedup"]["ar"]["vs_ar"] == 1.0
    assert [c["id"] for c in result["per_case"]] == [json.loads(x)["id"] for x in CASES.read_text().splitlines()[:2]]
    json.dumps(result)
    assert "lookahead" in bench.report(result)


def test_tune_stores_the_best_config_as_the_default(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("AHEAD_HOME", str(tmp_path))
    args = parse(tune, ["--cases", str(CASES), "--limit", "2", "--max-tokens", "8", "--grid", "2,2,1;3,3,2"])
    result = tune.run_tune(engine, args)

    assert [r["config"] for r in sorted(result["results"], key=lambda r: r["config"])] == ["2,2,1", "3,3,2"]
    assert result["results"][0]["tok_s"] >= result["results"][1]["tok_s"]
    assert all(r["identical"] == 1.0 and r["tokens_per_step"] >= 1.0 for r in result["results"])
    path = tune.store_best(engine, result)
    assert path.parent == tmp_path and path.is_file()
    assert engine.default_lookahead() == LookaheadConfig.parse(result["best"]["config"])
    assert tune.chart(str(tmp_path / "tune.png"), result).read_bytes().startswith(PNG)


def test_tune_shape_projects_from_step_times(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setitem(tune.SHAPES, "tiny", dict(TINY, vocab_size=49152, tie_word_embeddings=True))
    previous = tmp_path / "real.json"
    previous.write_text(json.dumps({"results": [{"config": "2,3,1", "tokens_per_step": 2.0}]}))
    args = parse(tune, ["--shape", "tiny", "--model", str(smollm2_gguf), "--device", "cpu", "--max-seq-len", "256",
                        "--context", "64", "--replays", "3", "--grid", "2,3,1;2,2,0",
                        "--tokens-per-step-from", str(previous)])
    result = tune.run_shape(tune.shape_engine(args), args)

    assert result["ar_step_ms"] > 0 and result["floor_ms"] > 0 and result["weight_bytes"] > 0
    first, second = result["results"]
    assert first["config"] == "2,3,1" and first["step_tokens"] == 7
    assert first["projected_speedup"] == pytest.approx(2.0 * result["ar_step_ms"] / first["step_ms"])
    assert second["projected_speedup"] is None
    assert "2,3,1" in tune.report(result)


def test_keystrokes_reuse_the_document_kv(engine, tmp_path):
    body = "".join(f"def f{i}(x, y):\n    total = x * {i} + y\n    return total - {i}\n\n" for i in range(30))
    source = tmp_path / "typing.py"
    source.write_text(body)
    line = body.count("\n") - 3  # a `total = ...` line near the end
    args = parse(keystrokes, ["--file", str(source), "--line", str(line), "--chars", "3", "--max-tokens", "8",
                              "--lookahead", "3,3,2"])
    result = keystrokes.run_keystrokes(engine, args)

    assert result["identical"] is True and result["identical_share"] == 1.0
    assert result["requests"] == 3 and len(result["per_request"]) == 3
    assert result["positions"][0]["typed"] == body.splitlines()[line][-3:]
    cold = result["cold_prompt_tokens"]
    assert cold > 100  # the prompt window starts on a 32-line boundary, so not the whole file
    assert all(r["prefill_tokens"] <= cold / 20 and r["reused_tokens"] > 0 for r in result["per_request"])
    for key in ("cold_prefill_ms", "warm_prefill_ms_p50", "prefill_tokens_p50", "ttft_ms_p50", "latency_ms_p50",
                "latency_ms_p95", "cold_warm_prefill_ratio", "tokens_per_step_persistent_pool",
                "tokens_per_step_fresh_pool"):
        assert result[key] is not None, key
    json.dumps(result)


def test_cursor_positions():
    text = "short\n" + "x = compute(a, b)\n" * 9 + "end"
    pos = keystrokes.position_at(text, 1, None, 4)
    assert (pos.line, pos.col, pos.offset, pos.typed) == (1, 13, 19, ", b)")
    spread = keystrokes.spread_positions(text, 3, 4)
    assert len({p.line for p in spread}) == 3 and all(p.typed == ", b)" for p in spread)
    with pytest.raises(AheadError):
        keystrokes.position_at(text, 10, 0, 8)  # "end" has 3 characters after the cursor


def test_bench_keystrokes_is_a_sub_subcommand():
    top = argparse.ArgumentParser()
    sub = top.add_subparsers(dest="command")
    bench.add_parser(sub)
    tune.add_parser(sub)

    plain = top.parse_args(["bench", "--cases", "c.jsonl", "--limit", "3"])
    assert plain.func is bench.main and (plain.cases, plain.limit, plain.max_tokens) == ("c.jsonl", 3, 128)
    typing = top.parse_args(["bench", "--model", "m.gguf", "--cases", "c.jsonl", "keystrokes", "--chars", "5"])
    assert typing.func is keystrokes.main
    assert (typing.model, typing.cases, typing.chars, typing.max_tokens) == ("m.gguf", "c.jsonl", 5, 64)
    after = top.parse_args(["bench", "keystrokes", "--model", "n.gguf", "--json"])
    assert (after.model, after.json, after.max_seq_len) == ("n.gguf", True, 4096)
    tuning = top.parse_args(["tune", "--grid", "4,3,4;8,4,8"])
    assert tuning.func is tune.main and [str(c) for c in tune.grid_configs(tuning)] == ["4,3,4", "8,4,8"]


def test_bar_chart_writes_a_png(tmp_path):
    path = bar_chart(tmp_path / "b.png", {"ar": 10.0, "lookahead": 25.0}, "t", "tok/s")
    assert path.read_bytes().startswith(PNG)
