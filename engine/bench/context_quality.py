"""Does repository context make completions better? Edit similarity and exact match with and without it.

The benchmark cases come from different files of one code base (the standard library), so the
other cases' files stand in for the rest of the repository: each one's text is the longest prefix
any case has of it (the start of the real file), cut to `file_chars`. Files are ordered like the
language server orders them, most related last (same package, then same folder), within
`budget_chars`; the engine trims them further to its context token budget. Each case runs twice,
on separate documents so no KV or suggestion is shared, through any `complete(params) -> result`
(the daemon's client, or `in_process` for an Engine). Context only reaches the model when it has
Qwen2.5-Coder's `<|file_sep|>` token; on other models both runs are the same prompt.

    python -m engine.bench.context_quality --model Qwen/Qwen2.5-Coder-1.5B --limit 40 [--json]
    python -m engine.bench.context_quality --socket PATH   # a running `ahead engine`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import PurePosixPath

from .quality import edit_similarity, scores

Complete = Callable[[dict], dict]


def stand_in_files(cases: list[dict], file_chars: int = 6000) -> dict[str, str]:
    """file -> the start of its text: the longest prefix of it among the cases, cut at a line end."""
    longest: dict[str, str] = {}
    for case in cases:
        name = case.get("file")
        if isinstance(name, str) and len(case["prefix"]) > len(longest.get(name, "")):
            longest[name] = case["prefix"]
    out = {}
    for name, text in longest.items():
        if len(text) > file_chars:
            text = text[: text.rfind("\n", 0, file_chars) + 1 or file_chars]
        out[name] = text
    return out


def context_for(case: dict, files: dict[str, str], budget_chars: int) -> list[dict]:
    """Other files as the protocol's `context` (most related last), the least related dropped past the budget."""
    own = PurePosixPath(case.get("file") or "")

    def related(name: str) -> tuple:
        path = PurePosixPath(name)
        same_package = len(path.parts) > 1 and path.parts[0] == own.parts[0] if own.parts else False
        return same_package, path.parent == own.parent, name

    chosen, left = [], budget_chars
    for name in sorted((n for n in files if n != str(own)), key=related, reverse=True):
        cost = len(name) + len(files[name]) + 2
        if cost > left:
            break
        chosen.append({"path": name, "text": files[name]})
        left -= cost
    return chosen[::-1]


def measure(cases: list[dict], complete: Complete, max_tokens: int = 128, budget_chars: int = 16000,
            stop: dict | str | None = None, file_chars: int = 6000,
            progress: Callable[[str], None] | None = None) -> dict:
    """Scores of the completions without and with context against each case's `reference`."""
    files = stand_in_files(cases, file_chars)
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for n, case in enumerate(cases, 1):
        for mode, context in (("without", []), ("with", context_for(case, files, budget_chars))):
            params = {"prefix": case["prefix"], "suffix": case.get("suffix", ""), "max_tokens": max_tokens,
                      "document": f"context-quality/{mode}/{case['id']}", "path": case.get("file"),
                      "context": context}
            if stop is not None:
                params["stop"] = stop
            runs[mode].append({**complete(params), "context_files": len(context)})
        if progress is not None:
            progress(f"{n}/{len(cases)} {case['id']}")
    references = [case["reference"] for case in cases]
    sims = {mode: [edit_similarity(r["text"], ref) for r, ref in zip(runs[mode], references, strict=True)]
            for mode in runs}

    def median(mode: str, key: str) -> float | None:
        values = [r[key] for r in runs[mode] if isinstance(r.get(key), int | float)]
        return statistics.median(values) if values else None

    return {
        "cases": len(cases),
        "without": scores([r["text"] for r in runs["without"]], references),
        "with": scores([r["text"] for r in runs["with"]], references),
        "changed": sum(a["text"] != b["text"] for a, b in zip(runs["without"], runs["with"], strict=True)),
        "better": sum(w > wo for wo, w in zip(sims["without"], sims["with"], strict=True)),
        "worse": sum(w < wo for wo, w in zip(sims["without"], sims["with"], strict=True)),
        "context_files_median": statistics.median(r["context_files"] for r in runs["with"]),
        "prompt_tokens_median": {mode: median(mode, "prompt_tokens") for mode in runs},
        "time_ms_median": {mode: median(mode, "time_ms") for mode in runs},
        "per_case": [{"id": case["id"], "edit_sim_without": a, "edit_sim_with": b}
                     for case, a, b in zip(cases, sims["without"], sims["with"], strict=True)],
    }


def in_process(engine) -> Complete:
    """`complete` on an Engine in this process, with the daemon's params and result."""
    from ..protocol import completion_request
    from ..server import completion_result

    def complete(params: dict) -> dict:
        started = time.perf_counter()
        done = engine.complete(completion_request(params))
        return completion_result(done, (time.perf_counter() - started) * 1e3)

    return complete


def report(result: dict) -> str:
    lines = [f"{result['cases']} cases, {result['context_files_median']} context files (median); "
             f"{result['changed']} completions changed: {result['better']} better, {result['worse']} worse"]
    for mode in ("without", "with"):
        s = result[mode]
        tokens, ms = result["prompt_tokens_median"][mode], result["time_ms_median"][mode]
        lines.append(f"  {mode:>7} context: edit similarity median {s['edit_sim_median']:.3f} "
                     f"mean {s['edit_sim_mean']:.3f}, exact {s['exact']:.0%}; medians: prompt "
                     f"{'-' if tokens is None else f'{tokens:.0f}'} tokens, {'-' if ms is None else f'{ms:.0f}'} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.context_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", help="JSON lines with prefix, suffix, reference, file")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--budget-chars", type=int, default=16000, help="context offered per case (the engine "
                        "trims it to its own token budget)")
    parser.add_argument("--file-chars", type=int, default=6000, help="characters of each stand-in file")
    parser.add_argument("--raw", action="store_true", help="no stop rules")
    parser.add_argument("--socket", help="use the `ahead engine` on this socket instead of loading a model")
    parser.add_argument("--model")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from .harness import cases_path, load_cases

    cases = [c for c in load_cases(cases_path(args.cases)) if "reference" in c][: args.limit]
    if args.socket:
        from ..client import EngineClient

        client = EngineClient(args.socket, name="context-quality")
        complete: Complete = lambda params: client.complete(**params)  # noqa: E731
    else:
        from ..engine import Engine, EngineOptions

        complete = in_process(Engine(EngineOptions(model=args.model, device=args.device, dtype=args.dtype)))
    result = measure(cases, complete, args.max_tokens, args.budget_chars, "raw" if args.raw else None,
                     args.file_chars, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
