"""`ahead bench keystrokes`: replay typing at a cursor and measure what each keystroke costs.

The typed text is what really follows the cursor in the file: it is cut out, then typed back
one character at a time, each keystroke a completion request on the same document. That is
the editor's steady state, where KV reuse should make prefill a few tokens instead of the
whole prompt. Every warm completion is checked against a cold one of the same text, since
reused K/V must not change the tokens. The replay runs twice, with the document's n-gram
pool kept across keystrokes and rebuilt each time, to show what keeping it buys.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from .. import flags
from ..cli import read_source
from ..engine import Completion, Engine
from ..errors import AheadError
from ..lookahead import LookaheadConfig, step_shape
from ..prompt import build_prompt
from ..request import CompletionRequest, Switches
from ..runner import DECODE, causal_shape
from ..stops import StopRules
from .harness import capture_shapes, cases_path, engine_facts, format_table, load_cases, mean, percentile, progress

SYNTH_TOKENS = 4000


@dataclass(frozen=True)
class Position:
    line: int  # 0-based
    col: int  # 0-based, in characters
    offset: int  # into the text
    typed: str  # the characters that follow the cursor, typed back one by one


@dataclass
class Keystroke:
    prefix: str
    suffix: str
    completion: Completion


def synthesize_file(cases: list[dict], count_tokens, target_tokens: int = SYNTH_TOKENS) -> str:
    """A long Python file: whole case prefixes (file starts, so they parse as code), shortest first."""
    parts, tokens = [], 0
    for case in sorted(cases, key=lambda c: len(c["prefix"])):
        parts.append(case["prefix"].rstrip() + "\n\n")
        tokens += count_tokens(parts[-1])
        if tokens >= target_tokens:
            break
    return "".join(parts)


def line_starts(text: str) -> list[int]:
    starts = [0]
    starts += [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    return starts


def position_at(text: str, line: int, col: int | None, chars: int) -> Position:
    starts = line_starts(text)
    if not 0 <= line < len(starts):
        raise AheadError(f"--line {line} is outside the file (0..{len(starts) - 1})")
    end = text.find("\n", starts[line])
    length = (end if end != -1 else len(text)) - starts[line]
    col = max(0, length - chars) if col is None else col
    if not 0 <= col <= length:
        raise AheadError(f"--col {col} is outside line {line} (0..{length})")
    offset = starts[line] + col
    typed = text[offset : offset + chars]
    if len(typed) < chars:
        raise AheadError(f"only {len(typed)} characters follow the cursor; lower --chars")
    return Position(line, col, offset, typed)


def spread_positions(text: str, count: int, chars: int, lo: float = 0.0, hi: float = 1.0) -> list[Position]:
    """`count` cursors spread over a span of the file, each `chars` before the end of a long line."""
    lines = text.split("\n")
    usable = [i for i, s in enumerate(lines) if len(s.rstrip()) >= chars + 4 and s.strip()]
    if not usable:
        raise AheadError(f"no line is longer than {chars + 4} characters; lower --chars")
    picked: list[int] = []
    for k in range(count):
        target = int(len(lines) * (lo + (hi - lo) * (k + 0.5) / count))
        line = next((i for i in usable if i >= target and i not in picked), None)
        line = line if line is not None else next((i for i in reversed(usable) if i not in picked), None)
        if line is not None:
            picked.append(line)
    return [position_at(text, i, len(lines[i].rstrip()) - chars, chars) for i in sorted(picked)]


# -- measurement ----------------------------------------------------------------------------------
def request(engine: Engine, args, cfg: LookaheadConfig | None, prefix: str, suffix: str, document: str,
            reuse_kv: bool, persistent_pool: bool) -> Completion:
    request = CompletionRequest(prefix, suffix, document=document, max_tokens=args.max_tokens,
                                decoding=args.decoding, lookahead=cfg, stop=StopRules.raw())
    switches = Switches(reuse_kv=reuse_kv, persistent_pool=persistent_pool, type_through=False)
    return engine.complete(request, switches=switches)


def replay(engine: Engine, args, cfg, text: str, pos: Position, document: str, persistent_pool: bool,
           chars: int | None = None) -> tuple[Completion, list[Keystroke]]:
    """A cold request on the text without the typed characters, then one warm request per keystroke."""
    suffix = text[pos.offset + len(pos.typed) :]
    cold = request(engine, args, cfg, text[: pos.offset], suffix, document, False, persistent_pool)
    strokes = []
    for j in range(1, (chars or len(pos.typed)) + 1):
        prefix = text[: pos.offset + j]
        strokes.append(Keystroke(prefix, suffix, request(engine, args, cfg, prefix, suffix, document, True,
                                                         persistent_pool)))
    engine.close_document(document)
    return cold, strokes


def prompt_length(engine: Engine, prefix: str, suffix: str) -> int:
    """Prompt tokens of a request before it is made (to know which cache lengths it will reach)."""
    return max(1, len(build_prompt(engine.codec, prefix, suffix, engine.options.budget).ids))


def tokens_per_step(strokes: list[Keystroke]) -> float | None:
    steps = sum(s.completion.steps for s in strokes)
    return sum(len(s.completion.tokens) for s in strokes) / steps if steps else None


def positions_in(text: str, args: argparse.Namespace, span: tuple[float, float]) -> list[Position]:
    if args.line is not None:
        return [position_at(text, args.line, args.col, args.chars)]
    return spread_positions(text, args.positions, args.chars, *span)


@dataclass
class Source:
    """What to type into, settled before the model loads; a file synthesized from the cases needs
    the tokenizer, so its text and positions come after (`place`)."""

    name: str
    text: str | None
    cases: list[dict]
    positions: list[Position]


def check_args(args: argparse.Namespace) -> tuple[Source, LookaheadConfig | None]:
    """Everything the flags say that can be wrong, found before the model loads."""
    if args.col is not None and args.line is None:
        raise AheadError("--col needs --line")
    lookahead = args.decoding == "lookahead"
    cfg = flags.parse_lookahead(args.lookahead) if args.lookahead and lookahead else None
    flags.check_fits(args, args.max_tokens, flags.step_tokens(args.decoding, cfg))
    if args.file:
        text = read_source(args.file)
        source = Source(args.file, text, [], positions_in(text, args, (0.0, 1.0)))
    else:
        cases = load_cases(cases_path(getattr(args, "cases", None)))
        source = Source(f"synthesized from {len(cases)} bench cases", None, cases, [])
    return source, cfg


def place(engine: Engine, source: Source, args: argparse.Namespace) -> tuple[str, list[Position]]:
    """(text, cursor positions): a synthesized file's start is boilerplate, so its cursors go in the last third."""
    if source.text is not None:
        return source.text, source.positions
    text = synthesize_file(source.cases, lambda s: len(engine.codec.encode(s)))
    return text, positions_in(text, args, (2 / 3, 1.0))


def per_token_costs(colds: list[Completion], warm: list[Completion]) -> dict:
    """Prefill cost per token, cold and warm, and the fixed cost of a request that prefilled nothing.

    A ratio of cold to warm prefill time means nothing when a warm request prefills ~0 tokens
    (it divides by the fixed cost), so each side is reported on its own terms.
    """
    prefilling = [c for c in warm if c.prefill_tokens > 0]
    free = [c for c in warm if c.prefill_tokens == 0]
    cold_tokens = sum(c.prompt_tokens for c in colds)
    warm_tokens = sum(c.prefill_tokens for c in prefilling)
    return {
        "cold_prefill_ms_per_token": sum(c.prefill_ms for c in colds) / cold_tokens if cold_tokens else None,
        "warm_prefill_ms_per_token": sum(c.prefill_ms for c in prefilling) / warm_tokens if warm_tokens else None,
        "warm_requests_prefilling": len(prefilling),
        "warm_prefill_tokens_mean": warm_tokens / len(prefilling) if prefilling else None,
        "fixed_prefill_ms_p50": percentile([c.prefill_ms for c in free], 50),
        "warm_requests_prefill_free": len(free),
    }


def run_keystrokes(engine: Engine, args: argparse.Namespace, source: Source, cfg: LookaheadConfig | None) -> dict:
    """Replay typing at each position; a plain dict, ready for JSON."""
    if args.decoding == "lookahead":
        cfg = cfg or engine.default_lookahead()
    text, positions = place(engine, source, args)
    name = source.name

    shapes = [DECODE, *(causal_shape(n) for n in engine.runner.graph_prefill_sizes)]
    spans = [(n - 2, n + args.chars + args.max_tokens)
             for n in (prompt_length(engine, text[: p.offset], text[p.offset + len(p.typed) :]) for p in positions)]
    capture_shapes(engine, shapes + ([step_shape(cfg)] if cfg else []), spans)
    for pos in positions:  # the cold prefill's chunk sizes, and anything else a first request pays
        replay(engine, args, cfg, text, pos, "keystrokes-warmup", True, chars=1)

    pooled: list[tuple[Completion, list[Keystroke]]] = []
    fresh: list[tuple[Completion, list[Keystroke]]] = []
    for i, pos in enumerate(progress(positions, "typing", "position")):
        pooled.append(replay(engine, args, cfg, text, pos, f"keystrokes-{i}-pool", True))
        if cfg is not None:
            fresh.append(replay(engine, args, cfg, text, pos, f"keystrokes-{i}-fresh", False))

    warm = [s for _, strokes in pooled for s in strokes]
    same: list[bool] = []
    if args.check:
        fresh_strokes = [s for _, strokes in fresh for s in strokes]
        for k, stroke in enumerate(progress(warm, "identity check", "request")):
            cold = request(engine, args, cfg, stroke.prefix, stroke.suffix, "keystrokes-check", False, False)
            same.append(cold.tokens == stroke.completion.tokens)
            if fresh_strokes:
                same[-1] = same[-1] and cold.tokens == fresh_strokes[k].completion.tokens
        engine.close_document("keystrokes-check")

    per_request = []
    for i, (_, strokes) in enumerate(pooled):
        for j, s in enumerate(strokes):
            c = s.completion
            per_request.append({
                "position": i, "typed": j + 1, "prompt_tokens": c.prompt_tokens, "prefill_tokens": c.prefill_tokens,
                "reused_tokens": c.reused_tokens, "prefill_ms": c.prefill_ms, "ttft_ms": c.ttft_ms,
                "time_ms": c.time_ms, "tokens": len(c.tokens), "steps": c.steps,
                "tokens_per_step": c.tokens_per_step,
                "identical": same[len(per_request)] if same else None,
            })
    colds = [cold for cold, _ in pooled]
    cold_tokens = [c.prompt_tokens for c in colds]
    return {
        **engine_facts(engine),
        "file": name,
        "decoding": args.decoding,
        "lookahead": str(cfg) if cfg else None,
        "max_tokens": args.max_tokens,
        "positions": [
            {"line": p.line, "col": p.col, "typed": p.typed, "cold_prompt_tokens": n, "cold_prefill_ms": c.prefill_ms}
            for p, c, n in zip(positions, colds, cold_tokens, strict=True)
        ],
        "cold_prompt_tokens": percentile(cold_tokens, 50),
        "cold_prefill_ms": percentile([c.prefill_ms for c in colds], 50),
        "warm_prefill_ms_p50": percentile([r["prefill_ms"] for r in per_request], 50),
        "prefill_tokens_p50": percentile([r["prefill_tokens"] for r in per_request], 50),
        **per_token_costs(colds, [s.completion for s in warm]),
        "ttft_ms_p50": percentile([r["ttft_ms"] for r in per_request], 50),
        "latency_ms_p50": percentile([r["time_ms"] for r in per_request], 50),
        "latency_ms_p95": percentile([r["time_ms"] for r in per_request], 95),
        "identical": all(same) if same else None,
        "identical_share": sum(same) / len(same) if same else None,
        "tokens_per_step_persistent_pool": tokens_per_step(warm),
        "tokens_per_step_fresh_pool": tokens_per_step([s for _, st in fresh for s in st]) if fresh else None,
        "step_ms_mean": mean([ms for s in warm for ms in s.completion.step_ms]),
        "requests": len(per_request),
        "per_request": per_request,
    }


# -- printing -------------------------------------------------------------------------------------
def report(result: dict) -> str:
    rows = [[k, result[k]] for k in (
        "cold_prompt_tokens", "cold_prefill_ms", "cold_prefill_ms_per_token", "prefill_tokens_p50",
        "warm_prefill_ms_p50", "warm_requests_prefilling", "warm_prefill_tokens_mean", "warm_prefill_ms_per_token",
        "warm_requests_prefill_free", "fixed_prefill_ms_p50", "ttft_ms_p50", "latency_ms_p50", "latency_ms_p95",
        "step_ms_mean", "tokens_per_step_persistent_pool", "tokens_per_step_fresh_pool", "identical_share", "requests",
    )]
    cursors = "; ".join(f"{p['line']}:{p['col']} types {p['typed']!r}" for p in result["positions"])
    head = (f"{result['engine']}: {result['file']}, {result['decoding']}"
            + (f" {result['lookahead']}" if result["lookahead"] else "") + f", {result['max_tokens']} tokens max\n"
            + f"cursors {cursors}")
    return head + "\n" + format_table(["metric", "value"], rows)


def main(args: argparse.Namespace) -> int:
    source, cfg = check_args(args)
    engine = flags.engine_from_args(args)
    result = run_keystrokes(engine, args, source, cfg)
    out = sys.stderr if args.json else sys.stdout
    if args.json:
        print(json.dumps(result))
    else:
        print(report(result))
    if result["identical"] is False:
        bad = [f"{r['position']}/{r['typed']}" for r in result["per_request"] if r["identical"] is False]
        print(f"MISMATCH warm vs cold completion at position/keystroke {', '.join(bad)}", file=out)
    return 0
