"""`ahead bench`: our AR and lookahead decoding against transformers' `generate` on real cases.

Every method decodes greedily from the same prompt ids (no token healing), so the benchmark
also checks exactness: lookahead and prompt lookup must give the AR tokens, not approximate
them. Graph capture and other one-off costs are paid before the clock starts, because a
resident engine pays them once per shape, not per request.

Also home to what the other benchmark commands share: engine flags, cases, tables, warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .engine import Completion, Engine, EngineOptions
from .errors import AheadError
from .lookahead import LookaheadConfig, step_shape
from .prompt import PromptBudget, build_prompt
from .request import CompletionRequest, Switches
from .runner import DECODE, StepShape
from .stops import StopRules

DEFAULT_CASES = Path("../shared/bench/cases.jsonl")
METHODS = ("generate", "prompt_lookup", "ar", "lookahead")
REFERENCE_METHODS = ("generate", "prompt_lookup")  # run by transformers, not by our engine
PROMPT_LOOKUP_TOKENS = 10


# -- shared by bench, tune and keystrokes ---------------------------------------------------------
def add_engine_flags(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The flags that say which engine to build. With `suppress`, unset flags leave the namespace
    alone, so `ahead bench --model X keystrokes` keeps the X given before the sub-subcommand."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--model", default=default(None), help="model spec: .gguf, directory or HF id")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default(None))
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=default(None))
    parser.add_argument("--max-seq-len", type=int, default=default(4096), help="KV cache slots")
    parser.add_argument("--prefix-tokens", type=int, default=default(None), help="prompt budget before the cursor")
    parser.add_argument("--suffix-tokens", type=int, default=default(None), help="prompt budget after the cursor")
    parser.add_argument("--json", action="store_true", default=default(False), help="one JSON object on stdout")


def engine_from_args(args: argparse.Namespace) -> Engine:
    budget = PromptBudget()
    if args.prefix_tokens is not None:
        budget = replace(budget, prefix_tokens=args.prefix_tokens)
    if args.suffix_tokens is not None:
        budget = replace(budget, suffix_tokens=args.suffix_tokens)
    options = EngineOptions(
        model=args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len, budget=budget
    )
    return Engine(options)


def lookahead_config(text: str | None, engine: Engine) -> LookaheadConfig:
    if not text:
        return engine.default_lookahead()
    try:
        return LookaheadConfig.parse(text)
    except ValueError as exc:
        raise AheadError(str(exc)) from None


def cases_path(given: str | None) -> Path:
    if given:
        path = Path(given)
        if not path.is_file():
            raise AheadError(f"cases file {path} does not exist")
        return path
    if DEFAULT_CASES.is_file():
        return DEFAULT_CASES
    raise AheadError(f"--cases is required ({DEFAULT_CASES} is not here)")


def load_cases(path: str | Path, limit: int | None = None) -> list[dict]:
    """JSON lines with id, prefix and suffix (other keys are carried along)."""
    cases = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
            case["prefix"], case.setdefault("suffix", "")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise AheadError(f"{path}:{n} is not a case (a JSON object with at least 'prefix')") from None
        case.setdefault("id", f"case-{n}")
        cases.append(case)
    if not cases:
        raise AheadError(f"{path} holds no cases")
    return cases[:limit] if limit else cases


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def format_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(items, desc: str, unit: str):
    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def capture_shapes(engine: Engine, shapes: list[StepShape], spans: list[tuple[int, int]]) -> None:
    """Capture each shape's CUDA graphs, outside any timing, for every visible-length bucket that a
    step based at a slot in one of `spans` (first, last base slot) will use.

    The steps write junk K/V, so the working cache is marked invalid afterwards.
    """
    runner = engine.runner
    if not runner.use_graphs:
        return
    for shape in shapes:
        T = shape.size
        last = runner.capacity - T
        ends = {runner.visible_len(b + T) for lo, hi in spans for b in range(max(0, lo), min(hi, last) + 1)}
        for end in sorted(ends):
            runner.step(shape, [0] * T, end - T)  # the step's visible length is `end`
    sync(engine.device)
    engine.sessions.invalidate_working_cache()


def decode_spans(engine: Engine, cases: list[dict], max_tokens: int) -> list[tuple[int, int]]:
    """(first, last) base slot of the decode steps of each case."""
    return [(len(ids) - 1, len(ids) + max_tokens) for ids in (prompt_ids(engine, c) for c in cases)]


def warm_engine(engine: Engine, cases: list[dict], shapes: list[StepShape], max_tokens: int) -> None:
    """Pay graph captures up front: each case's prefill chunk sizes, then `shapes` and the AR step
    at every cache length the cases' decoding will reach."""
    if not engine.runner.use_graphs:
        return
    for case in progress(cases, "warm-up", "case"):
        complete_case(engine, case, "ar", None, max_tokens=1, document="bench-warmup")
    capture_shapes(engine, [DECODE, *shapes], decode_spans(engine, cases, max_tokens))


def complete_case(
    engine: Engine, case: dict, decoding: str, cfg: LookaheadConfig | None, max_tokens: int, document: str | None = None
) -> tuple[Completion, float]:
    """One cold, plain-greedy completion of a case and its wall time in seconds."""
    document = document or f"bench-{case['id']}"
    sync(engine.device)
    started = time.perf_counter()
    request = CompletionRequest(case["prefix"], case["suffix"], document=document, max_tokens=max_tokens,
                                decoding=decoding, lookahead=cfg, heal=False, stop=StopRules.raw())
    completion = engine.complete(request, switches=Switches(reuse_kv=False, type_through=False))
    seconds = time.perf_counter() - started
    engine.close_document(document)  # the next run starts with a fresh n-gram pool, nothing parked
    return completion, seconds


def prompt_ids(engine: Engine, case: dict) -> list[int]:
    """The ids engine.complete(heal_tokens=False) decodes from, for the reference model."""
    ids = build_prompt(engine.codec, case["prefix"], case["suffix"], engine.options.budget, heal=False).ids
    return ids or [engine.checkpoint.config.bos_token_id]


# -- the reference: transformers on the same weights ----------------------------------------------
class Reference:
    """transformers' own model built from the engine's checkpoint, for `generate` baselines."""

    def __init__(self, engine: Engine):
        from transformers import AutoModelForCausalLM

        ckpt = engine.checkpoint
        with torch.device(engine.device):
            model = AutoModelForCausalLM.from_config(ckpt.config, dtype=engine.dtype)
        result = model.load_state_dict(ckpt.state_dict, strict=False)
        missing = set(result.missing_keys)
        if getattr(ckpt.config, "tie_word_embeddings", False) or "lm_head.weight" not in ckpt.state_dict:
            model.tie_weights()
            missing.discard("lm_head.weight")
        if missing:
            raise AheadError(f"the reference model lacks weights: {', '.join(sorted(missing)[:4])}")
        self.model = model.to(engine.device).eval()
        self.device = engine.device
        self.stop_ids = frozenset(engine.codec.stop_ids)
        pad = getattr(ckpt.config, "pad_token_id", None)
        self.pad_id = pad if pad is not None else min(self.stop_ids, default=0)

    @torch.inference_mode()
    def generate(self, ids: list[int], max_new: int, lookup: int | None = None) -> list[int]:
        from transformers import GenerationConfig

        # A FIM prompt ends in <|fim_middle|>, one of our stop ids. transformers 5.17's assisted
        # decoding (prompt lookup) checks the stop criteria on the prompt's last token and returns
        # at once, so leave that id out here and cut at the first stop id afterwards instead.
        eos = sorted(self.stop_ids - {ids[-1]}) or None
        config = GenerationConfig(
            max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=self.pad_id,
            prompt_lookup_num_tokens=lookup,
        )
        x = torch.tensor([ids], device=self.device)
        out = self.model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
        new = out[0, len(ids) :].tolist()
        stop = next((i for i, t in enumerate(new) if t in self.stop_ids), len(new))
        return new[:stop]

    def timed(self, ids: list[int], max_new: int, lookup: int | None) -> tuple[list[int], float]:
        sync(self.device)
        started = time.perf_counter()
        tokens = self.generate(ids, max_new, lookup)
        sync(self.device)
        return tokens, time.perf_counter() - started


# -- measurement ----------------------------------------------------------------------------------
@dataclass
class Run:
    tokens: list[int]
    seconds: float  # wall time; the median when the case was repeated
    steps: int | None = None  # None where the method does not report steps (transformers)
    step_ms: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def run_case(
    engine: Engine, reference: Reference | None, method: str, case: dict, cfg: LookaheadConfig, max_tokens: int,
    repeat: int,
) -> Run:
    times, first = [], None
    for _ in range(max(1, repeat)):
        if method in REFERENCE_METHODS:
            lookup = PROMPT_LOOKUP_TOKENS if method == "prompt_lookup" else None
            tokens, seconds = reference.timed(prompt_ids(engine, case), max_tokens, lookup)
            run = Run(tokens, seconds)
        else:
            completion, seconds = complete_case(engine, case, method, cfg if method == "lookahead" else None,
                                                max_tokens)
            run = Run(completion.tokens, seconds, completion.steps, completion.step_ms)
        first = first or run
        times.append(seconds)
    first.seconds = statistics.median(times)
    return first


def summarize(runs: list[Run]) -> dict:
    tokens = sum(len(r.tokens) for r in runs)
    seconds = sum(r.seconds for r in runs)
    stepped = all(r.steps is not None for r in runs)
    steps = sum(r.steps for r in runs) if stepped else 0
    return {
        "latency_ms_p50": percentile([r.seconds * 1e3 for r in runs], 50),
        "tok_s_p50": percentile([r.tok_s for r in runs], 50),
        "tok_s_aggregate": tokens / seconds if seconds > 0 else 0.0,
        "tokens": tokens,
        "tokens_per_step": tokens / steps if stepped and steps else None,
        "step_ms_mean": mean([ms for r in runs for ms in r.step_ms]) if stepped else None,
        # Decoding alone, prefill left out: what lookahead changes, and how generation rates are usually quoted.
        "decode_tok_s": tokens / decode_s if (decode_s := sum(sum(r.step_ms) for r in runs) / 1e3) else None,
    }


def same_share(runs: list[Run], base: list[Run]) -> tuple[float, list[int]]:
    """Share of cases whose tokens equal the base method's, and the indices that differ."""
    differ = [i for i, (a, b) in enumerate(zip(runs, base, strict=True)) if a.tokens != b.tokens]
    return 1 - len(differ) / len(runs), differ


def run_bench(engine: Engine, args: argparse.Namespace) -> dict:
    """Measure every requested method on the cases; a plain dict, ready for JSON."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise AheadError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    cfg = lookahead_config(args.lookahead, engine)
    cases = load_cases(cases_path(args.cases), args.limit)
    reference = Reference(engine) if any(m in REFERENCE_METHODS for m in methods) else None

    if any(m not in REFERENCE_METHODS for m in methods):
        warm_engine(engine, cases, [step_shape(cfg)] if "lookahead" in methods else [], args.max_tokens)
    runs: dict[str, list[Run]] = {}
    for method in methods:
        run_case(engine, reference, method, cases[0], cfg, args.max_tokens, 1)  # warm-up
        runs[method] = [run_case(engine, reference, method, case, cfg, args.max_tokens, args.repeat)
                        for case in progress(cases, method, "case")]

    summary = {m: summarize(r) for m, r in runs.items()}
    speedup: dict[str, dict[str, float]] = {}
    identical: dict[str, dict[str, float]] = {}
    mismatch: dict[str, list[str]] = {}
    for base in ("ar", "generate"):
        if base not in runs:
            continue
        for m in methods:
            base_rate = summary[base]["tok_s_aggregate"]
            speedup.setdefault(m, {})[f"vs_{base}"] = summary[m]["tok_s_aggregate"] / base_rate if base_rate else None
            share, differ = same_share(runs[m], runs[base])
            identical.setdefault(m, {})[f"vs_{base}"] = share
            if differ and m != base and f"{base} vs {m}" not in mismatch:
                mismatch[f"{m} vs {base}"] = [cases[i]["id"] for i in differ]

    per_case = []
    for i, case in enumerate(cases):
        entry = {"id": case["id"], "prompt_tokens": len(prompt_ids(engine, case)), "methods": {}}
        for m in methods:
            r = runs[m][i]
            entry["methods"][m] = {"tokens": len(r.tokens), "ms": r.seconds * 1e3, "tok_s": r.tok_s, "steps": r.steps}
        entry["text_ar"] = engine.codec.decode(runs["ar"][i].tokens) if "ar" in runs else None
        per_case.append(entry)

    return {
        "model": engine.model_name,
        "engine": engine.describe(),
        "device": engine.device_name(),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "lookahead": str(cfg),
        "cases": len(cases),
        "max_tokens": args.max_tokens,
        "repeat": args.repeat,
        "methods": summary,
        "speedup": speedup,
        "identical": identical,
        "mismatch": mismatch,
        "per_case": per_case,
    }


# -- printing -------------------------------------------------------------------------------------
def report(result: dict) -> str:
    rows = []
    for name, s in result["methods"].items():
        up = result["speedup"].get(name, {})
        same = result["identical"].get(name, {})
        rows.append([
            name, s["latency_ms_p50"], s["tok_s_p50"], s["tok_s_aggregate"], up.get("vs_ar"), up.get("vs_generate"),
            s["decode_tok_s"], s["tokens_per_step"], s["step_ms_mean"], same.get("vs_ar"), same.get("vs_generate"),
        ])
    headers = ["method", "p50 ms", "p50 tok/s", "agg tok/s", "x ar", "x generate", "decode tok/s", "tok/step",
               "step ms", "same ar", "same gen"]
    head = (f"{result['engine']}: {result['cases']} cases, {result['max_tokens']} new tokens max, "
            f"lookahead {result['lookahead']}, median of {result['repeat']} run(s)")
    return head + "\n" + format_table(headers, rows)


def mismatch_lines(result: dict) -> list[str]:
    return [f"MISMATCH {pair}: {', '.join(ids)}" for pair, ids in result["mismatch"].items()]


def main(args: argparse.Namespace) -> int:
    engine = engine_from_args(args)
    result = run_bench(engine, args)
    if args.chart:
        from .charts import bar_chart

        rates = {m: s["tok_s_aggregate"] for m, s in result["methods"].items()}
        title = f"{Path(result['model']).name} on {result['device']} ({result['dtype']}), " \
                f"lookahead {result['lookahead']}"
        result["chart"] = str(bar_chart(args.chart, rates, title, "tokens/s (aggregate)"))
        print(f"ahead: chart written to {result['chart']}", file=sys.stderr)
    out = sys.stderr if args.json else sys.stdout
    if args.json:
        print(json.dumps(result))
    else:
        print(report(result))
    for line in mismatch_lines(result):
        print(line, file=out)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_flags(parser)
    parser.add_argument("--cases", help=f"JSON lines of cases (default: {DEFAULT_CASES} when present)")
    parser.add_argument("--limit", type=int, default=16, help="first N cases")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--lookahead", help="W,N,G (default: the tuned or built-in config)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--repeat", type=int, default=1, help="time each case R times, report the median")
    parser.add_argument("--chart", default="bench.png", help="PNG bar chart of tok/s ('' for none)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`ahead bench [--cases ...]`, with `ahead bench keystrokes ...` beneath it."""
    from . import keystrokes  # here, not at the top: keystrokes imports this module's helpers

    parser = subparsers.add_parser(
        "bench", help="benchmark decoding methods on completion cases",
        description="Benchmark transformers generate / prompt lookup against ahead's AR and lookahead decoding.",
    )
    add_arguments(parser)
    parser.set_defaults(func=main)
    modes = parser.add_subparsers(dest="bench_mode", metavar="{keystrokes}")
    keystrokes.add_parser(modes)
    return parser
