"""How close a completion is to the code that was really at the cursor (a case's `reference`).

Speed alone rewards decoding to the token cap; ghost text is judged by how much of it the
user keeps. Edit similarity (1 - Levenshtein distance / the longer length) gives credit for a
near miss; exact match does not. Trailing whitespace is ignored in both: the engine trims it
and an editor does not show it. The oracle is the raw output cut at the reference's length,
the best any rule that only decides *where to stop* could do knowing that length, so stop
rules that reach its similarity stop about where the reference does.
"""

from __future__ import annotations

import statistics
from collections import Counter


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character each).

    Common ends are trimmed first (completions often share a start with the reference); then one
    row of the O(len(a) * len(b)) table is kept, over the shorter string.
    """
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end = 0
    while end < len(a) - start and end < len(b) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    a, b = a[start : len(a) - end], b[start : len(b) - end]
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def edit_similarity(text: str, reference: str) -> float:
    """1 - distance / the longer length, on texts with trailing whitespace stripped; two empty texts are equal."""
    a, b = text.rstrip(), reference.rstrip()
    longest = max(len(a), len(b))
    return 1.0 - edit_distance(a, b) / longest if longest else 1.0


def exact_match(text: str, reference: str) -> bool:
    return text.rstrip() == reference.rstrip()


def oracle(raw: str, reference: str) -> str:
    """The raw completion cut at the reference's length in characters (trailing whitespace not counted)."""
    return raw[: len(reference.rstrip())]


def scores(texts: list[str], references: list[str]) -> dict:
    """Exact-match share and edit similarity (median, mean) of completions against their references."""
    sims = [edit_similarity(t, r) for t, r in zip(texts, references, strict=True)]
    return {
        "exact": sum(exact_match(t, r) for t, r in zip(texts, references, strict=True)) / len(texts),
        "edit_sim_median": statistics.median(sims),
        "edit_sim_mean": statistics.fmean(sims),
    }


def shares(labels: list[str]) -> dict[str, float]:
    """Share of each label, most common first (stop reasons)."""
    return {k: n / len(labels) for k, n in Counter(labels).most_common()}


def method_quality(raw: list[str], rules: list[str], references: list[str], raw_tokens: list[int],
                   rules_tokens: list[int], raw_reasons: list[str], rules_reasons: list[str]) -> dict:
    """One method's completions, without and with stop rules, against the references.

    The goals of the stop rules: at most half the tokens generated (median), and edit similarity
    (median) no worse than the oracle's.
    """
    result = {
        "cases": len(references),
        "raw": scores(raw, references),
        "rules": scores(rules, references),
        "oracle": scores([oracle(t, r) for t, r in zip(raw, references, strict=True)], references),
        "tokens": {
            "raw_median": statistics.median(raw_tokens), "raw_total": sum(raw_tokens),
            "rules_median": statistics.median(rules_tokens), "rules_total": sum(rules_tokens),
        },
        "stop_reasons": {"raw": shares(raw_reasons), "rules": shares(rules_reasons)},
    }
    result["goals"] = {
        "tokens_halved": result["tokens"]["rules_median"] * 2 <= result["tokens"]["raw_median"],
        "rules_at_least_oracle": result["rules"]["edit_sim_median"] >= result["oracle"]["edit_sim_median"],
    }
    return result
