"""The measurement commands on a tiny random Qwen2 with SmolLM2's real tokenizer, on CPU, and the
quality metrics on hand-made texts.

The measuring functions run in-process on flags parsed by the real `ahead` parser, so these
check what the numbers mean, not how fast anything is: every method agrees with AR, stop rules
only cut the raw output, tuning stores a default only after a real comparison, keystrokes
reuse the KV of the document.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from engine import cli, flags
from engine.bench import commands, compare, harness, keystrokes, quality, tune
from engine.bench.charts import bar_chart
from engine.engine import Engine, EngineOptions
from engine.errors import AheadError
from engine.loading import Checkpoint, gguf_tokenizer_and_config
from engine.prompt import PromptBudget
from engine.tuning_store import lookup_tuned

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


def parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


# -- ahead bench ----------------------------------------------------------------------------------
def test_bench_methods_give_the_ar_tokens_and_stop_rules_only_cut(engine, tmp_path, monkeypatch, capsys):
    # A real case, and one with the cursor mid-line before code: there the line-end rule must end the
    # completion (at the end of the output, since a random model's text has no line break).
    midline = {"id": "midline", "prefix": "total = compute(", "suffix": "a, b)\nprint(total)\n", "reference": "a, b"}
    cases_file = tmp_path / "cases.jsonl"
    cases_file.write_text(CASES.read_text().splitlines()[0] + "\n" + json.dumps(midline) + "\n")
    monkeypatch.setattr(flags, "engine_from_args", lambda args: engine)
    assert cli.main(["bench", "--cases", str(cases_file), "--max-tokens", "12", "--lookahead", "3,3,2",
                     "--methods", "ar,lookahead,generate,prompt_lookup", "--prefix-tokens", "256", "--suffix-tokens",
                     "32", "--max-seq-len", "1024", "--out", str(tmp_path / "out"), "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)

    assert result["cases"] == 2 and result["lookahead"] == "3,3,2"
    # Four implementations of greedy decoding (two of them transformers') agree token for token...
    for name in ("lookahead", "generate", "prompt_lookup"):
        assert result["identical"][name]["vs_ar"] == 1.0, name
        assert result["methods"][name]["tokens"] == result["methods"]["ar"]["tokens"] > 0
    # ... and with stop rules, lookahead's multi-token steps are cut where AR's single steps are.
    assert result["identical"]["lookahead"]["vs_ar_rules"] == 1.0
    assert result["mismatch"] == {} and compare.mismatch_lines(result) == []
    assert result["methods"]["ar"]["tokens_per_step"] == 1.0
    assert result["methods"]["lookahead"]["tokens_per_step"] >= 1.0
    assert result["methods"]["generate"]["tokens_per_step"] is None
    # Every case's output is AR's, so the tokens per step over those cases are the method's own.
    assert result["same_ar_tokens_per_step"]["lookahead"] == {
        "cases": 2, "tokens_per_step": result["methods"]["lookahead"]["tokens_per_step"]}
    assert "generate" not in result["same_ar_tokens_per_step"]
    assert [c["id"] for c in result["per_case"]] == [json.loads(CASES.read_text().splitlines()[0])["id"], "midline"]

    for case in result["per_case"]:  # the stop rules cut the same greedy text, never extend or change it
        assert case["text_ar"].startswith(case["text_ar_rules"])
        assert case["methods"]["ar"]["tokens_rules"] <= case["methods"]["ar"]["tokens"]
    assert result["per_case"][1]["methods"]["ar"]["stop_reason_rules"] == "line-end"
    assert result["per_case"][1]["methods"]["lookahead"]["stop_reason_rules"] == "line-end"
    q = result["quality"]
    assert set(q) == {"ar", "lookahead"} and q["ar"]["cases"] == 2
    assert set(q["ar"]["stop_reasons"]["raw"]) <= {"stop", "length"}  # raw: only the model or the cap ends it
    assert "line-end" in q["ar"]["stop_reasons"]["rules"]
    assert q["ar"]["tokens"]["raw_total"] == result["methods"]["ar"]["tokens"]
    chart = tmp_path / "out" / "bench.png"  # --out is created as needed
    assert result["chart"] == str(chart) and chart.read_bytes().startswith(PNG) and f"written to {chart}" in err
    text = compare.report(result)
    assert "quality against the reference" in text and "line-end" in text


def test_bench_without_quality_runs_no_stop_rules(engine, tmp_path):
    args = parse(["bench", "--cases", str(CASES), "--limit", "1", "--max-tokens", "4", "--methods", "ar",
                  "--no-quality", "--prefix-tokens", "256", "--suffix-tokens", "32", "--max-seq-len", "1024"])
    cases, cfg = compare.check_args(args)
    result = compare.run_bench(engine, args, cases, cfg)
    assert result["quality"] is None and "tokens_rules" not in result["per_case"][0]["methods"]["ar"]
    assert result["recycling_prior"] is False  # said with every figure: tree decoding drafts more with it (a GPU's)


def test_tokens_per_step_where_the_output_is_ars() -> None:
    """Only the cases with AR's tokens count: catches a filter that keeps every case (the diverged one here
    took 10 tokens in 2 steps) or one that compares the wrong runs."""
    ar = [compare.Run([1, 2, 3, 4], 1.0, 4), compare.Run([5] * 10, 1.0, 10), compare.Run([7, 8], 1.0, 2)]
    tree = [compare.Run([1, 2, 3, 4], 1.0, 2), compare.Run([5] * 9 + [6], 1.0, 2), compare.Run([7, 8], 1.0, 2)]
    assert compare.tokens_per_step_where_same(tree, ar) == {"cases": 2, "tokens_per_step": 1.5}
    assert compare.tokens_per_step_where_same(tree[1:2], ar[1:2]) == {"cases": 0, "tokens_per_step": None}


# -- quality metrics ------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b,distance", [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("intention", "execution", 5), ("", "abc", 3), ("abc", "", 3),
    ("same", "same", 0), ("ab", "ba", 2), ("x = 1", "x = 2", 1), ("prefix-middle-suffix", "prefix-suffix", 7),
])
def test_edit_distance_on_known_pairs(a, b, distance):
    assert quality.edit_distance(a, b) == distance


@cache
def naive_distance(a: str, b: str) -> int:
    """The textbook recursion: an independent Levenshtein to compare the fast one against."""
    if not a or not b:
        return len(a) + len(b)
    return min(naive_distance(a[1:], b) + 1, naive_distance(a, b[1:]) + 1,
               naive_distance(a[1:], b[1:]) + (a[0] != b[0]))


def test_edit_distance_matches_the_textbook_recursion():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 9)))
        assert quality.edit_distance(a, b) == naive_distance(a, b), (a, b)


def test_edit_similarity_and_exact_match():
    assert quality.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert quality.edit_similarity("return x\n\n  ", "return x") == 1.0  # trailing whitespace is not shown
    assert quality.edit_similarity("", "") == 1.0 and quality.edit_similarity("abc", "") == 0.0
    assert quality.edit_similarity("  x", "x") == pytest.approx(1 - 2 / 3)  # leading whitespace counts
    assert quality.exact_match("pass\n", "pass") and not quality.exact_match("pass", "  pass")
    assert quality.oracle("return a + b\n\ndef g():", "return a + b\n") == "return a + b"
    assert quality.oracle("ab", "abcdef") == "ab"  # shorter raw output stays whole


def test_method_quality_on_hand_made_completions():
    references = ["return x", "pass", "y = 2"]
    raw = ["return x\n\ndef g():\n    pass", "pass\n", "y = 3\nz = 4"]
    rules = ["return x", "pass", "y = 3"]
    got = quality.method_quality(raw, rules, references, [20, 4, 12], [3, 2, 4], ["length", "stop", "length"],
                                 ["block-end", "stop", "block-end"])
    assert got["raw"]["exact"] == pytest.approx(1 / 3)  # only "pass\n" equals its reference once trimmed
    assert got["rules"]["exact"] == pytest.approx(2 / 3)
    assert got["oracle"]["exact"] == pytest.approx(2 / 3)  # cut at the reference's length: "return x", "pass", "y = 3"
    assert got["rules"]["edit_sim_median"] == 1.0 and got["rules"]["edit_sim_mean"] == pytest.approx((1 + 1 + 0.8) / 3)
    assert got["tokens"] == {"raw_median": 12, "raw_total": 36, "rules_median": 3, "rules_total": 9}
    assert got["stop_reasons"]["rules"] == {"block-end": pytest.approx(2 / 3), "stop": pytest.approx(1 / 3)}
    assert got["goals"] == {"tokens_halved": True, "rules_at_least_oracle": True}

    worse = quality.method_quality(raw, ["return", "pass", "y"], references, [4, 4, 4], [3, 3, 3], ["stop"] * 3,
                                   ["max-lines"] * 3)
    assert worse["goals"] == {"tokens_halved": False, "rules_at_least_oracle": False}


# -- ahead tune -----------------------------------------------------------------------------------
def run_tune(engine, monkeypatch, capsys, *argv: str) -> tuple[dict, str]:
    monkeypatch.setattr(flags, "engine_from_args", lambda args: engine)
    code = cli.main(["tune", "--cases", str(CASES), "--limit", "1", "--max-tokens", "6", "--prefix-tokens", "256",
                     "--suffix-tokens", "32", "--max-seq-len", "1024", "--json", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out), err


def test_tune_stores_a_default_only_after_a_comparison(engine, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AHEAD_HOME", str(tmp_path / "home"))
    out = tmp_path / "charts" / "new"
    result, err = run_tune(engine, monkeypatch, capsys, "--grid", "2,2,1", "--out", str(out))
    assert result["stored"]["stored"] is False and "stored no default" in err and "--store" in err
    assert lookup_tuned(engine) is None
    assert result["chart"] == str(out / "tune.png") and (out / "tune.png").read_bytes().startswith(PNG)

    result, err = run_tune(engine, monkeypatch, capsys, "--grid", "2,2,1;3,3,2", "--no-chart")
    assert result["chart"] is None and all(r["identical"] == 1.0 for r in result["results"])
    assert result["stored"]["stored"] is True and f"stored lookahead {result['best']['config']}" in err
    assert str(lookup_tuned(engine)) == result["best"]["config"] in ("2,2,1", "3,3,2")

    result, err = run_tune(engine, monkeypatch, capsys, "--grid", "4,2,1", "--store", "--no-chart")
    assert result["stored"]["stored"] is True and str(lookup_tuned(engine)) == "4,2,1"
    result, err = run_tune(engine, monkeypatch, capsys, "--grid", "2,2,1;3,3,2", "--no-store", "--no-chart")
    assert result["stored"] == {"stored": False, "why": "--no-store"} and str(lookup_tuned(engine)) == "4,2,1"


def test_tune_shape_projects_from_real_tokens_per_step(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setitem(tune.SHAPES, "tiny", dict(TINY, vocab_size=49152, tie_word_embeddings=True))
    previous = tmp_path / "real.json"
    previous.write_text(json.dumps({"results": [{"config": "2,3,1", "tokens_per_step": 2.0}]}))
    args = parse(["tune", "--shape", "tiny", "--model", str(smollm2_gguf), "--device", "cpu", "--max-seq-len", "256",
                  "--context", "64", "--replays", "3", "--grid", "2,2,0;2,3,1", "--tokens-per-step-from",
                  str(previous), "--recycling-prior", "on"])
    configs, _, real_tps = tune.check_args(args)
    engine = tune.shape_engine(args)
    assert engine.sessions.recycling_seed is None  # random weights time steps only: no seeding, asked or not
    result = tune.run_shape(engine, args, configs, real_tps)

    assert result["engine"].startswith("qwen2 2L/64d") and result["ar_step_ms"] > 0 and result["floor_ms"] > 0
    projected, plain = result["results"]  # the config measured on the real model comes first, though listed second
    assert (projected["config"], projected["tokens_per_step"], plain["config"]) == ("2,3,1", 2.0, "2,2,0")
    assert projected["projected_speedup"] > 0 and plain["projected_speedup"] is None
    assert "2,3,1" in tune.report(result)


def test_shape_names_in_the_flags_match_the_shapes():
    assert set(commands.SHAPE_NAMES) == set(tune.SHAPES)


# -- ahead bench keystrokes -----------------------------------------------------------------------
def test_keystrokes_reuse_the_document_kv(engine, tmp_path):
    body = "".join(f"def f{i}(x, y):\n    total = x * {i} + y\n    return total - {i}\n\n" for i in range(30))
    source = tmp_path / "typing.py"
    source.write_text(body)
    line = body.count("\n") - 3  # a `total = ...` line near the end
    args = parse(["bench", "keystrokes", "--file", str(source), "--line", str(line), "--chars", "3", "--max-tokens",
                  "8", "--lookahead", "3,3,2", "--prefix-tokens", "256", "--suffix-tokens", "32", "--max-seq-len",
                  "1024"])
    result = keystrokes.run_keystrokes(engine, args, *keystrokes.check_args(args))

    assert result["identical"] is True and result["identical_share"] == 1.0
    assert result["requests"] == 3 and len(result["per_request"]) == 3
    assert result["positions"][0]["typed"] == body.splitlines()[line][-3:]
    cold = result["cold_prompt_tokens"]
    assert cold > 100  # the prompt window starts on a 32-line boundary, so not the whole file
    assert all(r["prefill_tokens"] <= cold / 20 and r["reused_tokens"] > 0 for r in result["per_request"])
    assert "cold_warm_prefill_ratio" not in result
    assert result["cold_prefill_ms_per_token"] > 0
    # each warm request either prefilled some tokens (costed per token) or none (a fixed cost)
    prefilling = sum(r["prefill_tokens"] > 0 for r in result["per_request"])
    assert result["warm_requests_prefilling"] == prefilling and result["warm_requests_prefill_free"] == 3 - prefilling
    assert (result["warm_prefill_ms_per_token"] is None) == (prefilling == 0)
    assert (result["fixed_prefill_ms_p50"] is None) == (prefilling == 3)
    assert result["tokens_per_step_fresh_pool"] is not None
    json.dumps(result)
    assert "fixed_prefill_ms_p50" in keystrokes.report(result)


def test_cursor_positions():
    text = "short\n" + "x = compute(a, b)\n" * 9 + "end"
    pos = keystrokes.position_at(text, 1, None, 4)
    assert (pos.line, pos.col, pos.offset, pos.typed) == (1, 13, 19, ", b)")
    spread = keystrokes.spread_positions(text, 3, 4)
    assert len({p.line for p in spread}) == 3 and all(p.typed == ", b)" for p in spread)
    with pytest.raises(AheadError):
        keystrokes.position_at(text, 10, 0, 8)  # "end" has 3 characters after the cursor


def test_bench_keystrokes_is_a_sub_subcommand():
    plain = parse(["bench", "--cases", "c.jsonl", "--limit", "3"])
    assert plain.func is commands.run_bench and (plain.cases, plain.limit, plain.max_tokens) == ("c.jsonl", 3, 128)
    typing = parse(["bench", "--model", "m.gguf", "--cases", "c.jsonl", "--json", "keystrokes", "--chars", "5"])
    assert typing.func is commands.run_keystrokes
    assert (typing.model, typing.cases, typing.json, typing.chars, typing.max_tokens) == ("m.gguf", "c.jsonl", True, 5,
                                                                                           64)
    after = parse(["bench", "keystrokes", "--model", "n.gguf", "--json", "--prefix-tokens", "64"])
    assert (after.model, after.json, after.max_seq_len, after.prefix_tokens) == ("n.gguf", True, 4096, 64)
    tuning = parse(["tune", "--grid", "4,3,4;8,4,8"])
    assert tuning.func is commands.run_tune and [str(c) for c in tune.grid_configs(tuning)] == ["4,3,4", "8,4,8"]


# -- charts ---------------------------------------------------------------------------------------
def test_bar_chart_writes_a_png(tmp_path):
    path = bar_chart(tmp_path / "b.png", {"ar": 10.0, "lookahead": 25.0}, "t", "tok/s")
    assert path.read_bytes().startswith(PNG)


def test_missing_matplotlib_skips_the_chart_with_a_note(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails as if not installed
    args = parse(["bench", "--out", str(tmp_path / "out")])
    draw = lambda path: bar_chart(path, {"ar": 1.0}, "t", "tok/s")  # noqa: E731
    assert harness.write_chart(args, "bench.png", draw) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib is not installed" in err[0] and "ahead[charts]" in err[0]
    assert not (tmp_path / "out" / "bench.png").exists()
