"""What the measurement commands share: cases, one cold completion, graph warm-up, statistics,
tables, progress bars and chart files.

Graph capture and other one-off costs are paid before any clock starts, because a resident
engine pays them once per shape, not per request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from ..engine import Completion, Engine
from ..errors import AheadError
from ..lookahead import LookaheadConfig
from ..prompt import build_prompt
from ..request import CompletionRequest, Switches
from ..runner import DECODE, StepShape, sync
from ..stops import StopRules
from ..tree_decoding import TreeConfig
from .commands import DEFAULT_CASES


# -- cases ----------------------------------------------------------------------------------------
def cases_path(given: str | None) -> Path:
    if given:
        path = Path(given)
        if path.is_dir():
            raise AheadError(f"--cases {path} is a directory; pass a JSON-lines file")
        if not path.is_file():
            raise AheadError(f"--cases {path} does not exist")
        return path
    if Path(DEFAULT_CASES).is_file():
        return Path(DEFAULT_CASES)
    raise AheadError(f"--cases is required ({DEFAULT_CASES} is not here)")


def load_cases(path: str | Path, limit: int | None = None) -> list[dict]:
    """JSON lines with at least `prefix`; `suffix` defaults to "", `id` to the line number, and other
    keys (`reference`: the code really at the cursor) are carried along."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise AheadError(f"cannot read cases from {path}: {exc}") from None
    cases = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
            if not isinstance(case["prefix"], str) or not isinstance(case.setdefault("suffix", ""), str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise AheadError(f"{path}:{n} is not a case (a JSON object with at least 'prefix')") from None
        case.setdefault("id", f"case-{n}")
        cases.append(case)
    if not cases:
        raise AheadError(f"{path} holds no cases")
    return cases[:limit] if limit else cases


# -- one cold completion --------------------------------------------------------------------------
def complete_case(
    engine: Engine, case: dict, decoding: str, cfg: LookaheadConfig | TreeConfig | None, max_tokens: int,
    document: str | None = None, stop: StopRules | None = None,
) -> tuple[Completion, float]:
    """One cold completion of a case (no healing, raw stop unless `stop` says otherwise) and its wall time
    in seconds. No healing: every method then decodes from the same prompt ids, so tokens compare.
    The workspace history and recycling table stay (a case may profit from other cases' completions):
    callers `forget_learned()` before a pass over the cases, so that no case sees its own earlier output."""
    document = document or f"bench-{case['id']}"
    sync(engine.device)
    started = time.perf_counter()
    request = CompletionRequest(case["prefix"], case["suffix"], document=document, max_tokens=max_tokens,
                                decoding=decoding, heal=False, stop=stop or StopRules.raw(),
                                **({cfg.kind: cfg} if cfg else {}))  # the `lookahead` or `tree` field
    completion = engine.complete(request, switches=Switches(reuse_kv=False, type_through=False))
    seconds = time.perf_counter() - started
    engine.close_document(document)  # the next run starts with a fresh n-gram pool, nothing parked
    return completion, seconds


def prompt_ids(engine: Engine, case: dict) -> list[int]:
    """The ids `complete_case` decodes from, for the reference model."""
    ids = build_prompt(engine.codec, case["prefix"], case["suffix"], engine.options.budget, heal=False).ids
    return ids or [engine.checkpoint.config.bos_token_id]


# -- graph warm-up --------------------------------------------------------------------------------
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
        for end in sorted(set().union(*(runner.visible_ends(T, lo, hi) for lo, hi in spans))):
            runner.step(shape, [0] * T, end - T)  # the step's visible length is `end`
    sync(engine.device)
    engine.sessions.invalidate_working_cache()


def capture_config(engine: Engine, cfg: LookaheadConfig | TreeConfig, spans: list[tuple[int, int]]) -> None:
    """Capture a decoding config's graphs for steps based in `spans`, outside any timing: its step shape's, or a
    tree drafted on the device's own (which writes junk K/V too)."""
    if isinstance(cfg, TreeConfig) and cfg.on_device:
        if engine.runner.use_graphs:
            engine.sessions.device_tree(cfg).capture(
                set().union(*(engine.runner.visible_ends(cfg.budget, lo, hi) for lo, hi in spans)))
            engine.sessions.invalidate_working_cache()
        return
    capture_shapes(engine, [cfg.shape()], spans)


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


# -- statistics and printing ----------------------------------------------------------------------
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
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def progress(items, desc: str, unit: str):
    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def engine_facts(engine: Engine) -> dict:
    """What every report starts with: which model ran where."""
    return {
        "model": engine.model_name,
        "engine": engine.describe(),
        "device": engine.device_name(),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "recycling_prior": engine.sessions.recycling_seed is not None,  # tree decoding drafts more with it
    }


# -- charts ---------------------------------------------------------------------------------------
def check_out_dir(args: argparse.Namespace) -> None:
    """Fail before the model loads when the chart directory cannot be one."""
    out = Path(args.out)
    if not args.no_chart and out.exists() and not out.is_dir():
        raise AheadError(f"--out {out} is a file; pass a directory for the charts")


def write_chart(args: argparse.Namespace, name: str, draw: Callable[[Path], Path]) -> str | None:
    """`draw(path)` into --out (created as needed); its path, or None with a one-line note when
    --no-chart was given or matplotlib (the optional `charts` extra) is not installed."""
    if args.no_chart:
        return None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = draw(out / name)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("matplotlib"):
            raise
        print("ahead: matplotlib is not installed, so no chart (pip install 'ahead[charts]')", file=sys.stderr)
        return None
    except OSError as exc:
        raise AheadError(f"cannot write the chart into {out}: {exc}") from None
    print(f"ahead: chart written to {path}", file=sys.stderr)
    return str(path)
