"""`ahead tune`: find the lookahead (W, N, G), or with `--trees` the tree config (rows per step, Jacobi
window, draft depth, sources), that decodes fastest for this model on this machine.

Each config is a trade: a wider window and more candidates accept more tokens per step, but
make every step bigger, and past the point where a step stops being bandwidth-bound they cost
more than they gain. Only measuring on real cases settles it; the winner is stored for the
engine to use as its default when more than one config was compared (or `--store` says so):
one measured config is no finding. `--shape` times single steps of a model whose weights are not
here (random weights of its shape), so that a speedup can be projected for it from the
tokens per step measured on a smaller model of the same family.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import flags
from ..default_model import default_model_path
from ..engine import Engine
from ..errors import AheadError
from ..loading import (
    Checkpoint,
    gguf_tokenizer_and_config,
    kv_bytes,
    load_checkpoint,
    resolve_device,
    resolve_dtype,
    stderr_log,
    weight_bytes,
)
from ..lookahead import LookaheadConfig
from ..runner import DECODE, Runner, StepShape, sync
from ..tree_decoding import TreeConfig
from ..tuning_store import store_tuned, tuning_key
from .harness import (
    capture_config,
    cases_path,
    check_out_dir,
    complete_case,
    decode_spans,
    engine_facts,
    format_table,
    load_cases,
    mean,
    progress,
    warm_engine,
    write_chart,
)

QWEN2_COMMON = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, use_sliding_window=False)
SHAPES: dict[str, dict] = {
    "qwen2.5-coder-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-coder-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AheadError(f"{flag} takes a comma list of integers (got '{text}')") from None


Config = LookaheadConfig | TreeConfig


def grid_configs(args: argparse.Namespace) -> list[Config]:
    """--trees "B,W,L,D;..." (tree configs) when given, else --grid "W,N,G;W,N,G", else the product of
    --windows, --ngrams and --verify."""
    if getattr(args, "trees", None):
        try:
            trees = [TreeConfig.parse(part) for part in args.trees.split(";") if part.strip()]
        except ValueError as exc:
            raise AheadError(f"--trees: {exc}") from None
        if not trees:
            raise AheadError("the grid is empty")
        return list(dict.fromkeys(trees))
    if args.grid:
        configs = [flags.parse_lookahead(part, "--grid") for part in args.grid.split(";") if part.strip()]
    else:
        product = itertools.product(int_list(args.windows, "--windows"), int_list(args.ngrams, "--ngrams"),
                                    int_list(args.verify, "--verify"))
        configs = [flags.parse_lookahead(f"{w},{n},{g}", "--windows/--ngrams/--verify") for w, n, g in product]
    if not configs:
        raise AheadError("the grid is empty")
    return list(dict.fromkeys(configs))  # keep order, drop repeats


# -- tuning on the real model ---------------------------------------------------------------------
def decode_cases(engine: Engine, cases: list[dict], cfg: Config | None, max_tokens: int) -> dict:
    """All cases decoded cold with AR (cfg None), lookahead or tree decoding, after one warm-up completion
    (whose learned memory is then forgotten: no case may see its own output)."""
    decoding = cfg.kind if cfg else "ar"
    complete_case(engine, cases[0], decoding, cfg, max_tokens)
    engine.sessions.forget_learned()
    tokens, steps, seconds, step_ms, outputs = 0, 0, 0.0, [], []
    for case in cases:
        completion, elapsed = complete_case(engine, case, decoding, cfg, max_tokens)
        tokens += len(completion.tokens)
        steps += completion.steps
        seconds += elapsed
        step_ms += completion.step_ms
        outputs.append(completion.tokens)
    return {
        "tok_s": tokens / seconds if seconds else 0.0,
        "tokens_per_step": tokens / steps if steps else None,
        "step_ms_mean": mean(step_ms),
        "tokens": tokens,
        "seconds": seconds,
        "outputs": outputs,
    }


def run_tune(engine: Engine, args: argparse.Namespace, cases: list[dict], configs: list[Config]) -> dict:
    """Sweep the grid on the cases; results sorted fastest first. Stores nothing (see `store_best`)."""
    warm_engine(engine, cases, [], args.max_tokens)
    ar = decode_cases(engine, cases, None, args.max_tokens)
    spans = decode_spans(engine, cases, args.max_tokens)
    results = []
    for cfg in progress(configs, "tune", "config"):
        capture_config(engine, cfg, spans)
        got = decode_cases(engine, cases, cfg, args.max_tokens)
        same = sum(a == b for a, b in zip(got["outputs"], ar["outputs"], strict=True)) / len(cases)
        results.append({
            "config": str(cfg), "kind": cfg.kind, **cfg.knobs(), "step_tokens": cfg.step_tokens,
            "tok_s": got["tok_s"],
            "speedup_vs_ar": got["tok_s"] / ar["tok_s"] if ar["tok_s"] else None,
            "tokens_per_step": got["tokens_per_step"], "step_ms_mean": got["step_ms_mean"], "identical": same,
        })
    results.sort(key=lambda r: -r["tok_s"])
    return {
        **engine_facts(engine),
        "cases": len(cases),
        "max_tokens": args.max_tokens,
        "ar": {k: ar[k] for k in ("tok_s", "step_ms_mean", "tokens")},
        "results": results,
        "best": results[0],
    }


def store_best(engine: Engine, result: dict, store: bool | None) -> dict:
    """Make the fastest config the engine's default when more than one was compared, or `store` is
    True (--store); `store` False (--no-store) never. What happened, for the report."""
    best = result["best"]
    compared = len(result["results"])
    if store is False:
        return {"stored": False, "why": "--no-store"}
    if store is None and compared < 2:
        return {"stored": False, "why": "only one config was measured; pass --store to make it the default anyway"}
    summary = {k: best[k] for k in ("tok_s", "speedup_vs_ar", "tokens_per_step")}
    kind = best.get("kind", "lookahead")
    parse = LookaheadConfig.parse if kind == "lookahead" else TreeConfig.parse
    path = store_tuned(engine, parse(best["config"]), summary, kind)
    return {"stored": True, "kind": kind, "config": best["config"], "path": str(path), "key": tuning_key(engine),
            "compared": compared}


# -- projecting a model size from random weights --------------------------------------------------
def shape_config(shape: str, like) -> object:
    """A Qwen2 config of a named size, with the token ids of the real model `like`."""
    from transformers import Qwen2Config

    if shape not in SHAPES:
        raise AheadError(f"unknown shape '{shape}' (choose from {', '.join(SHAPES)})")
    ids = {k: getattr(like, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return Qwen2Config(**QWEN2_COMMON, **SHAPES[shape], **ids)


def random_state_dict(config, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named Qwen2 weights, N(0, 0.02) and norms of ones, made on the device: 7B in fp32 on
    the host would take minutes and 30 GB."""

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    D, V, inner = config.hidden_size, config.vocab_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or D // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    state = {"model.embed_tokens.weight": normal(V, D), "model.norm.weight": ones(D)}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = normal(V, D)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": ones(D),
            p + "post_attention_layernorm.weight": ones(D),
            p + "self_attn.q_proj.weight": normal(q, D), p + "self_attn.q_proj.bias": normal(q),
            p + "self_attn.k_proj.weight": normal(kv, D), p + "self_attn.k_proj.bias": normal(kv),
            p + "self_attn.v_proj.weight": normal(kv, D), p + "self_attn.v_proj.bias": normal(kv),
            p + "self_attn.o_proj.weight": normal(D, q),
            p + "mlp.gate_proj.weight": normal(inner, D),
            p + "mlp.up_proj.weight": normal(inner, D),
            p + "mlp.down_proj.weight": normal(D, inner),
        }
    return state


def real_tokenizer(spec: str | None):
    """(config, tokenizer) of the real model: from a GGUF's metadata alone when possible (no weights)."""
    path = Path(spec).expanduser() if spec not in (None, "", "default") else default_model_path()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_tokenizer_and_config(path, stderr_log)
    if (path / "tokenizer.json").is_file() and (path / "config.json").is_file() and not any(path.glob("*.safetensors")):
        from transformers import AutoConfig, AutoTokenizer  # a tokenizer-only directory is enough here

        return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    ckpt = load_checkpoint(spec)
    return ckpt.config, ckpt.tokenizer


def shape_engine(args: argparse.Namespace) -> Engine:
    like, tokenizer = real_tokenizer(args.model)
    config = shape_config(args.shape, like)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    ckpt = Checkpoint(config, tokenizer, random_state_dict(config, device, dtype), f"random-{args.shape}")
    # Random weights time steps only: seeding their recycling table would cost a 7B seconds and a disk file.
    engine = Engine(replace(flags.engine_options(args), recycling_prior=False), checkpoint=ckpt)
    ckpt.state_dict.clear()  # the model holds what it uses; the unfused Q/K/V and gate/up copies can go
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return engine


def time_step(runner: Runner, shape: StepShape, base: int, replays: int) -> float:
    """Median ms of one step at `base` including reading its argmax back, as the decode loops do."""
    tokens = torch.randint(runner.model.args.vocab_size, (shape.size,)).tolist()
    for _ in range(3):  # capture and settle
        runner.step(shape, tokens, base)[0].tolist()
    times = []
    for _ in range(replays):
        sync(runner.device)
        started = time.perf_counter()
        runner.step(shape, tokens, base)[0].tolist()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def tokens_per_step_from(path: str | None) -> dict[str, float]:
    """{config: tokens per step} of an earlier `ahead tune --json` run on a real model."""
    if not path:
        return {}
    try:
        previous = json.loads(Path(path).read_text())
        return {r["config"]: r["tokens_per_step"] for r in previous["results"] if r.get("tokens_per_step")}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise AheadError(f"--tokens-per-step-from {path} is not an `ahead tune --json` output ({exc})") from None


def run_shape(engine: Engine, args: argparse.Namespace, configs: list[Config],
              real_tps: dict[str, float]) -> dict:
    """Step times of every config against the AR step at `--context` tokens, and the bandwidth floor."""
    context = args.context
    g = torch.Generator().manual_seed(0)
    engine.runner.prefill(torch.randint(engine.model.args.vocab_size, (context,), generator=g).tolist(), 0)
    ar_ms = time_step(engine.runner, DECODE, context, args.replays)
    results = []
    for cfg in progress(configs, "steps", "config"):
        ms = time_step(engine.runner, cfg.shape(), context, args.replays)
        tps = real_tps.get(str(cfg))
        results.append({
            "config": str(cfg), "kind": cfg.kind, **cfg.knobs(), "step_tokens": cfg.step_tokens,
            "step_ms": ms, "ar_over_step": ar_ms / ms,
            "tokens_per_step": tps, "projected_speedup": tps * ar_ms / ms if tps else None,
        })
    engine.sessions.invalidate_working_cache()
    if real_tps:
        results.sort(key=lambda r: -(r["projected_speedup"] or 0.0))

    a, dtype = engine.model.args, engine.dtype
    weights, kv = weight_bytes(a, dtype), kv_bytes(a, context, dtype)
    floor_ms = (weights + kv) / args.bandwidth * 1e3
    return {
        "shape": args.shape,
        "engine": engine.describe(),
        "device": engine.device_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "context": context,
        "replays": args.replays,
        "ar_step_ms": ar_ms,
        "weight_bytes": weights,
        "kv_bytes": kv,
        "bandwidth": args.bandwidth,
        "floor_ms": floor_ms,
        "ar_step_over_floor": ar_ms / floor_ms,
        "tokens_per_step_from": args.tokens_per_step_from,
        "results": results,
    }


# -- printing -------------------------------------------------------------------------------------
def report(result: dict) -> str:
    if "shape" in result:
        head = (f"{result['engine']} (random weights, {result['shape']}): AR step {result['ar_step_ms']:.3f} ms at "
                f"{result['context']} tokens of context; bandwidth floor {result['floor_ms']:.3f} ms "
                f"({result['bandwidth'] / 1e12:.2f} TB/s), step/floor {result['ar_step_over_floor']:.2f}")
        rows = [[r["config"], r["step_tokens"], r["step_ms"], r["ar_over_step"], r["tokens_per_step"],
                 r["projected_speedup"]] for r in result["results"]]
        return head + "\n" + format_table([config_header(result), "T", "step ms", "ar/step", "tok/step",
                                            "proj. speedup"], rows)
    ar = result["ar"]
    head = (f"{result['engine']}: {result['cases']} cases, {result['max_tokens']} new tokens max; "
            f"AR {ar['tok_s']:.1f} tok/s, {ar['step_ms_mean']:.3g} ms/step")
    rows = [[r["config"], r["step_tokens"], r["tok_s"], r["speedup_vs_ar"], r["tokens_per_step"], r["step_ms_mean"],
             r["identical"]] for r in result["results"]]
    return head + "\n" + format_table([config_header(result), "T", "tok/s", "x ar", "tok/step", "step ms", "same ar"],
                                       rows)


def config_header(result: dict) -> str:
    return "W,N,G" if all(r.get("kind", "lookahead") == "lookahead" for r in result["results"]) else "config"


def chart(path: Path, result: dict) -> Path:
    """One W x N heatmap per G (trees: one budget x window heatmap per source set), of tok/s (or, with
    --shape, the projected speedup or ar/step ratio)."""
    from .charts import heatmaps

    rows = result["results"]
    tree = any(r.get("kind") == "tree" for r in rows)
    row_key, col_key, panel_key = ("budget", "window", "sources") if tree else ("window", "ngram", "verify")
    rows = [r for r in rows if r.get("kind", "lookahead") == ("tree" if tree else "lookahead")]
    if "shape" in result:
        key = "projected_speedup" if any(r["projected_speedup"] for r in rows) else "ar_over_step"
        title = f"random {result['shape']} on {result['device']}"
    else:
        key, title = "tok_s", f"{Path(result['model']).name} on {result['device']} ({result['dtype']})"
    windows = sorted({r[row_key] for r in rows})
    ngrams = sorted({r[col_key] for r in rows})
    panels = {}
    for g in sorted({r[panel_key] for r in rows}):
        value = {(r[row_key], r[col_key]): r[key] for r in rows if r[panel_key] == g}
        grid = [[math.nan if value.get((w, n)) is None else value[w, n] for n in ngrams] for w in windows]
        panels[f"{panel_key} = {g}" if tree else f"G = {g}"] = ([str(w) for w in windows], [str(n) for n in ngrams],
                                                                grid)
    label = {"tok_s": "tokens/s", "projected_speedup": "projected speedup over AR",
             "ar_over_step": "AR step time / lookahead step time"}[key]
    names = ("B (rows per step)", "W (Jacobi window)") if tree else ("W (window)", "N (n-gram)")
    return heatmaps(path, panels, title, label, row_name=names[0], col_name=names[1])


def check_args(args: argparse.Namespace) -> tuple[list[Config], list[dict], dict[str, float]]:
    """Everything the flags say that can be wrong, found before the model loads: (configs, cases, and
    with --shape the tokens per step of an earlier run)."""
    configs = grid_configs(args)
    step = max(c.step_tokens for c in configs)
    check_out_dir(args)
    if args.shape:
        if args.shape not in SHAPES:
            raise AheadError(f"unknown --shape '{args.shape}' (choose from {', '.join(SHAPES)})")
        if args.context + step > args.max_seq_len:
            raise AheadError(f"--context {args.context} plus a {step}-token step does not fit --max-seq-len "
                             f"{args.max_seq_len}")
        return configs, [], tokens_per_step_from(args.tokens_per_step_from)
    cases = load_cases(cases_path(args.cases), args.limit)
    flags.check_fits(args, args.max_tokens, step)
    return configs, cases, {}


def main(args: argparse.Namespace) -> int:
    configs, cases, real_tps = check_args(args)
    if args.shape:
        result = run_shape(shape_engine(args), args, configs, real_tps)
    else:
        engine = flags.engine_from_args(args)
        result = run_tune(engine, args, cases, configs)
        result["stored"] = store_best(engine, result, args.store)
        stored = result["stored"]
        if stored["stored"]:
            print(f"ahead: stored {stored['kind']} {stored['config']} (fastest of {stored['compared']}) as the default "
                  f"for {stored['key']} in {stored['path']}", file=sys.stderr)
        else:
            print(f"ahead: stored no default ({stored['why']})", file=sys.stderr)
    name = "tune-shape.png" if args.shape else "tune.png"
    result["chart"] = write_chart(args, name, lambda path: chart(path, result))
    print(json.dumps(result) if args.json else report(result))
    return 0
