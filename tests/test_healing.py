"""Token healing: a cursor inside what would be one token must not derail the completion.

Without healing, a prompt ending in "self.fibon" makes the model start a new token after
"on" (SmolLM2 then writes "_next_value"); healing backs off the last token and constrains
the first generated ones to re-cover its bytes, so "fibonacci" is completed.
"""

from __future__ import annotations

import pytest
from conftest import complete

from engine.tokens import Codec

HALF_TYPED = '''class Series:
    def fibonacci(self, n: int) -> int:
        """The n-th Fibonacci number."""
        if n < 2:
            return n
        return self.fibonacci(n - 1) + self.fibonacci(n - 2)

    def next_value(self, n: int) -> int:
        return self.fibon'''

INDENTED = '''def mean(values: list[float]) -> float:
    """Arithmetic mean of a non-empty list."""
    total = sum(values)
    count = len(values)
    '''


def indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


@pytest.mark.slow
def test_half_typed_identifier_is_continued(smollm2_engine) -> None:
    """The completion continues "fibon" into "fibonacci" and never repeats what was typed."""
    kw = dict(document="healing-identifier", max_tokens=8, decoding="ar", reuse_kv=False, type_through=False)
    healed = complete(smollm2_engine, HALF_TYPED, heal=True, **kw)
    plain = complete(smollm2_engine, HALF_TYPED, heal=False, **kw)
    assert healed.text.startswith("acci"), healed.text
    assert not healed.text.startswith(("fib", "on", "self")), healed.text
    codec = smollm2_engine.codec
    generated = codec.to_bytes(healed.tokens)
    assert generated.startswith(codec.token_bytes[codec.encode(HALF_TYPED)[-1]])  # the backed-off token's bytes
    assert generated.endswith(healed.text.encode())
    # Healing backs exactly one token off the prompt.
    assert plain.prompt_tokens == healed.prompt_tokens + 1
    assert plain.prefill_tokens == healed.prefill_tokens + 1
    assert not plain.text.startswith("acci")  # what healing fixes: the model cannot see "fibon" as a name


@pytest.mark.slow
def test_trailing_indentation_is_not_doubled(smollm2_engine) -> None:
    """After "\\n    " the completion carries on at that indentation, without extra spaces or an empty line."""
    result = complete(smollm2_engine, INDENTED, document="healing-indent", max_tokens=8, decoding="ar", heal=True,
                      type_through=False)
    assert result.text and not result.text[0].isspace(), repr(result.text)
    last_line = INDENTED.rsplit("\n", 1)[1]
    line_above = INDENTED.rstrip(" ").rsplit("\n", 2)[1]
    completed_line = (last_line + result.text).split("\n", 1)[0]
    assert indentation(completed_line) == indentation(line_above) == "    "
    assert completed_line.strip().startswith("return"), completed_line


@pytest.mark.slow
def test_healing_candidates_agree_with_removed_bytes(smollm2_engine) -> None:
    """Exactly the tokens that start with the removed bytes or are a prefix of them (no stop tokens)."""
    codec: Codec = smollm2_engine.codec
    table = codec.token_bytes
    for text in (b"fib", b" ", b"    ", b"\n", "é".encode(), b"\xc3", b"a\xff", b"\xff"):  # bisection edge cases too
        expected = sorted(
            i for i, b in enumerate(table)
            if b and i not in codec.stop_ids and (b.startswith(text) or text.startswith(b))
        )
        assert codec.healing_candidates(text) == expected, text
    removed = b"fib"
    candidates = codec.healing_candidates(removed)
    assert {codec.token_id("f"), codec.token_id("fib")} <= set(candidates)
    assert any(len(table[i]) > len(removed) for i in candidates)  # e.g. "fiber": longer tokens count too
    assert codec.token_id("fi") in codec.healing_candidates(b"fib")
    assert codec.token_id("ib") not in candidates


@pytest.mark.slow
def test_picks_take_each_rows_best_candidate_lowest_id_on_ties(smollm2_engine) -> None:
    """One masked argmax picks for every constrained row: each row's most likely token among those agreeing with its
    own bytes, the lowest id on a tie. Catches a row judged under another row's bytes, a candidate left out, a
    non-candidate let in, and a tie resolved to another id than a scan of the sorted candidates gives."""
    import torch

    from engine.healing import picks

    codec: Codec = smollm2_engine.codec
    torch.manual_seed(0)
    logits = torch.randn(6, len(codec.token_bytes))
    rows = [(4, b"fib"), (1, b"    "), (5, b"fib"), (0, b"\n")]
    spaces = codec.healing_candidates(b"    ")
    logits[1, spaces[-1]] = logits[1, spaces[0]] = logits[1].max() + 1  # a tie: the lower id wins
    logits[4, codec.token_id("ib")] = logits[4].max() + 1  # the row's best token overall, but not a candidate
    got = picks(codec, rows, logits).tolist()
    for (row, rest), token in zip(rows, got, strict=True):
        candidates = codec.healing_candidates(rest)
        best = max(candidates, key=lambda i: (logits[row, i].item(), -i))
        assert token == best, (row, rest)
    assert got[1] == spaces[0] and got[0] != codec.token_id("ib")


@pytest.mark.slow
def test_tree_decoding_heals_within_its_steps_exactly_as_ar(smollm2_engine, bench_cases) -> None:
    """Tree decoding re-types the healed bytes inside its own steps, with AR's tokens. Catches rows judged by the
    plain greedy choice where healing's constrained one applies (other tokens than AR's healing picks), a
    constraint left on after the bytes are re-typed, and healing run as one-row steps before the tree's (a step
    each, for nothing the tree could not have checked)."""
    from engine.runner import DECODE
    from engine.tree_decoding import TreeConfig

    runner = smollm2_engine.runner
    shapes: list[str] = []
    step = runner.step

    def counted(shape, *args, **kwargs):
        shapes.append(shape.name)
        return step(shape, *args, **kwargs)

    prompts = [HALF_TYPED, INDENTED, *(case["prefix"] for case in bench_cases[:4])]
    kw = dict(max_tokens=24, reuse_kv=False, type_through=False, heal=True)
    fused = 0
    for k, prompt in enumerate(prompts):
        ar = complete(smollm2_engine, prompt, decoding="ar", document=f"heal-ar-{k}", **kw)
        runner.step = counted
        try:
            shapes.clear()
            tree = complete(smollm2_engine, prompt, decoding="tree", tree=TreeConfig(32), document=f"heal-tree-{k}",
                            **kw)
        finally:
            del runner.step
        assert tree.tokens == ar.tokens and tree.text == ar.text, k
        assert DECODE.name not in shapes and shapes.count("tree32") == tree.steps, k  # (prefill's steps besides)
        codec = smollm2_engine.codec
        removed = codec.token_bytes[codec.encode(prompt)[-1]]
        healing = next(n for n in range(1, len(ar.tokens) + 1) if len(codec.to_bytes(ar.tokens[:n])) >= len(removed))
        fused += healing > 1 and tree.accepted_per_step[0] >= healing  # a multi-token healing in one step
    assert fused >= 1
