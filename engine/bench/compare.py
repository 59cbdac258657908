"""`ahead bench`: our AR, lookahead and tree decoding against transformers' `generate` on real cases, for
speed, and ahead's completions against each case's reference, for quality.

Speed: every method decodes greedily from the same prompt ids (no token healing) to the
model's stop token or the cap, so tokens compare and the benchmark also checks exactness:
lookahead and prompt lookup must give the AR tokens, not approximate them.
Quality: our methods run again with the default stop rules, which is what a user sees (and timed:
speed with stop rules is what a user gets); each completion is scored raw, with stop rules, and as
the oracle cut (quality.py). Tree decoding's learned memory (workspace history, recycling table,
calibration) is cleared before every pass over the cases, so no case sees its own earlier output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import flags
from ..engine import Completion, Engine
from ..errors import AheadError
from ..lookahead import LookaheadConfig
from ..runner import sync
from ..stops import StopRules
from ..tree_decoding import TreeConfig
from .commands import METHODS
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
    percentile,
    progress,
    prompt_ids,
    warm_engine,
    write_chart,
)
from .quality import edit_similarity, method_quality, oracle

REFERENCE_METHODS = ("generate", "prompt_lookup")  # run by transformers, not by our engine
OUR_METHODS = ("ar", "lookahead", "tree")
PROMPT_LOOKUP_TOKENS = 10


# -- the reference: transformers on the same weights ----------------------------------------------
class Reference:
    """transformers' own model built from the engine's checkpoint, for `generate` baselines."""

    def __init__(self, engine: Engine):
        from transformers import AutoModelForCausalLM

        ckpt = engine.checkpoint
        state = ckpt.state_dict
        if not state:  # the engine released its host copy once the model was built
            from ..loading import reload_weights

            state = reload_weights(ckpt.source, engine.dtype)
        with torch.device(engine.device):
            model = AutoModelForCausalLM.from_config(ckpt.config, dtype=engine.dtype)
        result = model.load_state_dict(state, strict=False)
        missing = set(result.missing_keys)
        if getattr(ckpt.config, "tie_word_embeddings", False) or "lm_head.weight" not in state:
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
    text: str | None = None  # our methods' completion text (None for transformers)
    stop_reason: str | None = None
    by_source: dict[str, int] = field(default_factory=dict)  # tree: drafted tokens accepted, per source
    prefill_ms: float | None = None  # prompt building and prefill (our methods)

    @property
    def tok_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def of(cls, completion: Completion, seconds: float) -> Run:
        return cls(completion.tokens, seconds, completion.steps, completion.step_ms, completion.text,
                   completion.stop_reason, completion.by_source, completion.prefill_ms)


def run_case(
    engine: Engine, reference: Reference | None, method: str, case: dict, cfg: LookaheadConfig | TreeConfig | None,
    max_tokens: int, repeat: int, stop: StopRules | None = None,
) -> Run:
    """`cfg`: the method's own config (lookahead's or tree's), None for the others."""
    times, first = [], None
    for _ in range(max(1, repeat)):
        if method in REFERENCE_METHODS:
            lookup = PROMPT_LOOKUP_TOKENS if method == "prompt_lookup" else None
            tokens, seconds = reference.timed(prompt_ids(engine, case), max_tokens, lookup)
            run = Run(tokens, seconds)
        else:
            completion, seconds = complete_case(engine, case, method, cfg, max_tokens, stop=stop)
            run = Run.of(completion, seconds)
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
        # Whatever decoding sets up once the prefill is done lands in the first step.
        "first_step_ms_mean": mean(firsts) if stepped and (firsts := [r.step_ms[0] for r in runs if r.step_ms])
        else None,
        # What a request pays before its first step (prompt and prefill): all of it on a cold document.
        "prefill_ms_mean": mean(ms) if (ms := [r.prefill_ms for r in runs if r.prefill_ms is not None]) else None,
        # Decoding alone, prefill left out: what lookahead changes, and how generation rates are usually quoted.
        "decode_tok_s": tokens / decode_s if (decode_s := sum(sum(r.step_ms) for r in runs) / 1e3) else None,
        # Tree: drafted tokens accepted per source (a token several sources drafted counts for each), per step.
        "by_source_per_step": {s: n / steps for s, n in sorted(by_source.items())}
        if (by_source := _by_source(runs)) and steps else None,
    }


def _by_source(runs: list[Run]) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in runs:
        for source, n in r.by_source.items():
            total[source] = total.get(source, 0) + n
    return total


def differing(runs: list[Run], base: list[Run], key=lambda r: r.tokens) -> list[int]:
    """Indices of the cases where `runs` and `base` disagree (on tokens unless `key` says otherwise)."""
    return [i for i, (a, b) in enumerate(zip(runs, base, strict=True)) if key(a) != key(b)]


def tokens_per_step_where_same(runs: list[Run], base: list[Run]) -> dict[str, float | None]:
    """Tokens per step over the cases whose output is `base`'s. In bf16 a step's numbers may flip a near-tie,
    and the text after it is other text with other repeats: tokens per step over all cases then moves with
    what was generated, not only with how well the drafts guess. Over these cases two runs decode one text."""
    differ = set(differing(runs, base))
    same = [r for i, r in enumerate(runs) if i not in differ]
    steps, tokens = sum(r.steps for r in same), sum(len(r.tokens) for r in same)
    return {"cases": len(same), "tokens_per_step": tokens / steps if steps else None}


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise AheadError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    return methods


def quality(runs: dict[str, list[Run]], rules: dict[str, list[Run]], cases: list[dict]) -> dict:
    """Per method: its raw and stop-rule completions against the references of the cases that have one."""
    scored = [i for i, case in enumerate(cases) if isinstance(case.get("reference"), str)]
    references = [cases[i]["reference"] for i in scored]
    out = {}
    for m, with_rules in rules.items():
        raw = [runs[m][i] for i in scored]
        ruled = [with_rules[i] for i in scored]
        out[m] = method_quality(
            [r.text for r in raw], [r.text for r in ruled], references, [len(r.tokens) for r in raw],
            [len(r.tokens) for r in ruled], [r.stop_reason for r in raw], [r.stop_reason for r in ruled],
        )
        out[m]["rules_latency_ms_p50"] = percentile([r.seconds * 1e3 for r in with_rules], 50)
    return out


def run_bench(engine: Engine, args: argparse.Namespace, cases: list[dict], cfg: LookaheadConfig | None,
              tree: TreeConfig | None = None) -> dict:
    """Measure every requested method on the cases; a plain dict, ready for JSON."""
    methods = parse_methods(args.methods)
    cfg = cfg or engine.default_lookahead()
    tree = tree or engine.default_tree()
    configs = {"lookahead": cfg, "tree": tree}
    reference = Reference(engine) if any(m in REFERENCE_METHODS for m in methods) else None

    if any(m in OUR_METHODS for m in methods):
        warm_engine(engine, cases, [], args.max_tokens)
        spans = decode_spans(engine, cases, args.max_tokens)
        for method, c in configs.items():
            if method in methods:
                capture_config(engine, c, spans)
    runs: dict[str, list[Run]] = {}
    for method in methods:
        run_case(engine, reference, method, cases[0], configs.get(method), args.max_tokens, 1)  # warm-up
        engine.sessions.forget_learned()
        runs[method] = [run_case(engine, reference, method, case, configs.get(method), args.max_tokens, args.repeat)
                        for case in progress(cases, method, "case")]
    rules: dict[str, list[Run]] = {}
    if not args.no_quality and any("reference" in c for c in cases):
        for method in (m for m in methods if m in OUR_METHODS):
            engine.sessions.forget_learned()
            rules[method] = [run_case(engine, None, method, case, configs.get(method), args.max_tokens, 1,
                                      stop=StopRules()) for case in progress(cases, f"{method}+rules", "case")]

    summary = {m: summarize(r) for m, r in runs.items()}
    summary_rules = {m: summarize(r) for m, r in rules.items()}
    speedup_rules = {m: {"vs_ar": s["tok_s_aggregate"] / summary_rules["ar"]["tok_s_aggregate"]
                         if summary_rules["ar"]["tok_s_aggregate"] else None,
                         "decode_vs_ar": s["decode_tok_s"] / summary_rules["ar"]["decode_tok_s"]
                         if s["decode_tok_s"] and summary_rules["ar"]["decode_tok_s"] else None}
                     for m, s in summary_rules.items()} if "ar" in summary_rules else {}
    speedup: dict[str, dict[str, float | None]] = {}
    identical: dict[str, dict[str, float]] = {}
    mismatch: dict[str, list[str]] = {}
    for base in ("ar", "generate"):
        if base not in runs:
            continue
        for m in methods:
            base_rate = summary[base]["tok_s_aggregate"]
            speedup.setdefault(m, {})[f"vs_{base}"] = summary[m]["tok_s_aggregate"] / base_rate if base_rate else None
            base_decode, decode = summary[base]["decode_tok_s"], summary[m]["decode_tok_s"]
            speedup[m][f"decode_vs_{base}"] = decode / base_decode if decode and base_decode else None
            differ = differing(runs[m], runs[base])
            identical.setdefault(m, {})[f"vs_{base}"] = 1 - len(differ) / len(cases)
            if differ and m != base and f"{base} vs {m}" not in mismatch:
                mismatch[f"{m} vs {base}"] = [cases[i]["id"] for i in differ]
    same_ar = {m: tokens_per_step_where_same(runs[m], runs["ar"]) for m in methods
               if "ar" in runs and m != "ar" and summary[m]["tokens_per_step"] is not None}
    for m in ("lookahead", "tree"):  # stop rules cut text, so each method's cut must be AR's
        if "ar" in rules and m in rules:
            differ = differing(rules[m], rules["ar"], key=lambda r: r.text)
            identical.setdefault(m, {})["vs_ar_rules"] = 1 - len(differ) / len(cases)
            if differ:
                mismatch[f"{m} vs ar (stop rules)"] = [cases[i]["id"] for i in differ]

    per_case = []
    for i, case in enumerate(cases):
        entry = {"id": case["id"], "prompt_tokens": len(prompt_ids(engine, case)), "methods": {}}
        for m in methods:
            r = runs[m][i]
            entry["methods"][m] = {"tokens": len(r.tokens), "ms": r.seconds * 1e3, "tok_s": r.tok_s, "steps": r.steps}
            if m in rules:
                ruled, ref = rules[m][i], case.get("reference")
                entry["methods"][m] |= {
                    "tokens_rules": len(ruled.tokens), "stop_reason_rules": ruled.stop_reason,
                    "ms_rules": ruled.seconds * 1e3,
                    "edit_sim_raw": edit_similarity(r.text, ref) if isinstance(ref, str) else None,
                    "edit_sim_rules": edit_similarity(ruled.text, ref) if isinstance(ref, str) else None,
                    "edit_sim_oracle": edit_similarity(oracle(r.text, ref), ref) if isinstance(ref, str) else None,
                }
        entry["text_ar"] = runs["ar"][i].text if "ar" in runs else None
        entry["text_ar_rules"] = rules["ar"][i].text if "ar" in rules else None
        per_case.append(entry)

    return {
        **engine_facts(engine),
        "lookahead": str(cfg),
        "tree": str(tree),
        "cases": len(cases),
        "max_tokens": args.max_tokens,
        "repeat": args.repeat,
        "methods": summary,
        "methods_rules": summary_rules,
        "speedup": speedup,
        "speedup_rules": speedup_rules,
        "identical": identical,
        "same_ar_tokens_per_step": same_ar,
        "mismatch": mismatch,
        "quality": quality(runs, rules, cases) if rules else None,
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
            s["decode_tok_s"], s["tokens_per_step"], s["step_ms_mean"], s["prefill_ms_mean"], same.get("vs_ar"),
            same.get("vs_generate"),
        ])
    headers = ["method", "p50 ms", "p50 tok/s", "agg tok/s", "x ar", "x generate", "decode tok/s", "tok/step",
               "step ms", "prefill ms", "same ar", "same gen"]
    head = (f"{result['engine']}: {result['cases']} cases, {result['max_tokens']} new tokens max, "
            f"lookahead {result['lookahead']}, tree {result['tree']}, median of {result['repeat']} run(s); raw stop, "
            "same prompt ids")
    text = head + "\n" + format_table(headers, rows)
    if result["methods_rules"]:
        rows = [[name, s["latency_ms_p50"], s["tok_s_aggregate"], result["speedup_rules"].get(name, {}).get("vs_ar"),
                 s["decode_tok_s"], result["speedup_rules"].get(name, {}).get("decode_vs_ar"), s["tokens_per_step"],
                 s["step_ms_mean"], result["identical"].get(name, {}).get("vs_ar_rules")]
                for name, s in result["methods_rules"].items()]
        text += "\n\nwith stop rules (as users run it)\n" + format_table(
            ["method", "p50 ms", "agg tok/s", "x ar", "decode tok/s", "decode x ar", "tok/step", "step ms", "same ar"],
            rows)
    for name, same in result["same_ar_tokens_per_step"].items():
        if same["tokens_per_step"] is not None:
            text += (f"\n{name}: {same['tokens_per_step']:.2f} tokens/step on the {same['cases']} cases whose raw"
                     " output is AR's")
    for label, summaries in (("raw", result["methods"]), ("rules", result["methods_rules"])):
        for name, s in summaries.items():
            if s.get("by_source_per_step"):
                parts = ", ".join(f"{k} {v:.2f}" for k, v in s["by_source_per_step"].items())
                text += f"\n{name} ({label}): drafted tokens accepted per step by source: {parts}"
    if result["quality"]:
        text += "\n\n" + quality_report(result["quality"])
    return text


def quality_report(q: dict) -> str:
    rows = []
    for m, s in q.items():
        tok = s["tokens"]
        rows.append([m, s["raw"]["edit_sim_median"], s["rules"]["edit_sim_median"], s["oracle"]["edit_sim_median"],
                     s["raw"]["exact"], s["rules"]["exact"], s["oracle"]["exact"], tok["raw_median"],
                     tok["rules_median"], tok["raw_total"], tok["rules_total"], s["rules_latency_ms_p50"]])
    headers = ["method", "sim raw", "sim rules", "sim oracle", "exact raw", "exact rules", "exact oracle",
               "tok p50 raw", "tok p50 rules", "tok raw", "tok rules", "rules p50 ms"]
    n = next(iter(q.values()))["cases"]
    lines = [f"quality against the reference ({n} cases): edit similarity medians, exact-match shares, tokens "
             "generated; oracle = raw output cut at the reference's length", format_table(headers, rows)]
    for m, s in q.items():
        reasons = ", ".join(f"{k} {v:.0%}" for k, v in s["stop_reasons"]["rules"].items())
        halved, reached = ("yes" if s["goals"][k] else "NO" for k in ("tokens_halved", "rules_at_least_oracle"))
        lines.append(f"{m}: stop reasons with rules: {reasons}; tokens halved: {halved}, rules >= oracle: {reached}")
    return "\n".join(lines)


def mismatch_lines(result: dict) -> list[str]:
    return [f"MISMATCH {pair}: {', '.join(ids)}" for pair, ids in result["mismatch"].items()]


def check_args(args: argparse.Namespace) -> tuple[list[dict], LookaheadConfig | None]:
    """Everything the flags say that can be wrong, found before the model loads: (cases, lookahead)."""
    methods = parse_methods(args.methods)
    cfg = flags.parse_lookahead(args.lookahead) if args.lookahead else None
    cases = load_cases(cases_path(args.cases), args.limit)
    flags.check_fits(args, args.max_tokens, flags.step_tokens("lookahead" if "lookahead" in methods else "ar", cfg))
    check_out_dir(args)
    return cases, cfg


def tree_config(args: argparse.Namespace) -> TreeConfig | None:
    """--tree, checked before the model loads (with the cache room a tree step needs)."""
    if not getattr(args, "tree", None):
        return None
    try:
        tree = TreeConfig.parse(args.tree)
    except ValueError as exc:
        raise AheadError(f"--tree: {exc}") from None
    flags.check_fits(args, args.max_tokens, tree.step_tokens)
    return tree


def main(args: argparse.Namespace) -> int:
    cases, cfg = check_args(args)
    tree = tree_config(args)
    engine = flags.engine_from_args(args)
    result = run_bench(engine, args, cases, cfg, tree)

    def draw(path: Path) -> Path:
        from .charts import bar_chart

        rates = {m: s["tok_s_aggregate"] for m, s in result["methods"].items()}
        title = (f"{Path(result['model']).name} on {result['device']} ({result['dtype']}), "
                 f"lookahead {result['lookahead']}")
        return bar_chart(path, rates, title, "tokens/s (aggregate)")

    result["chart"] = write_chart(args, "bench.png", draw)
    print(json.dumps(result) if args.json else report(result))
    for line in mismatch_lines(result):
        print(line, file=sys.stderr if args.json else sys.stdout)
    return 0
