"""Stop rules: where a completion ends, on hand-written code whose right cut a programmer knows.

The decode loop checks the rules after every step, and lookahead commits several tokens per
step, so the cut must not depend on how the text arrived: chunk by chunk it must equal the cut
made on the whole text, and the text streamed on the way (`stable`) must never be taken back.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.stops import Stopper, StopRules, finish, indent_of

C_FUNCTION = "int add(int a, int b) {\n    "


def cut(prefix: str, suffix: str, text: str, rules: StopRules | None = None) -> tuple[str, str | None]:
    """(completion shown, stop reason) for the whole `text` as the engine ends it: a final check, then trimmed."""
    found = Stopper(rules or StopRules(), prefix, suffix).check(text, final=True)
    return (finish(text[: found.end]), found.reason) if found else (finish(text), None)


def fed(stopper: Stopper, text: str, ends: list[int]) -> tuple[str, str | None, list[str]]:
    """Like the decode loop: check after each commit ending at `ends`, stream `stable`, a final check at the end."""
    streamed = []
    for end in ends:
        found = stopper.check(text[:end])
        if found is not None:
            return finish(text[: found.end]), found.reason, streamed
        streamed.append(stopper.stable(text[:end]))
    found = stopper.check(text, final=True)
    return (finish(text[: found.end]), found.reason, streamed) if found else (finish(text), None, streamed)


# -- block-end ------------------------------------------------------------------------------------


def test_python_body_ends_before_the_next_def() -> None:
    prefix = "def total(values):\n    s = 0\n    "
    text = "for v in values:\n        s += v\n    return s\n\n\ndef main():\n    print(total([1]))\n"
    assert cut(prefix, "\n", text) == ("for v in values:\n        s += v\n    return s", "block-end")


def test_body_of_a_nested_block_ends_at_its_dedent() -> None:
    """The cursor is in the `if` body: the function's own next line is not part of it."""
    prefix = "def f(n):\n    if n < 2:\n        "
    assert cut(prefix, "\n", "return n\n    return f(n - 1) + f(n - 2)\n") == ("return n", "block-end")


def test_opener_on_the_cursor_line_sets_the_block() -> None:
    """`def g(self):|` then a newline: the body is the block, the next method at the def's indentation is not."""
    prefix = "class A:\n    def g(self):"
    assert cut(prefix, "\n", "\n        return 1\n\n    def h(self):\n        pass\n") == (
        "\n        return 1",
        "block-end",
    )


def test_cursor_on_a_fresh_line_after_an_opener() -> None:
    """Cursor at column 0 right after `def f():`: a line back at column 0 ends the (still unindented) body."""
    assert cut("def f():\n", "", "    return 1\nprint(f())\n") == ("    return 1", "block-end")


def test_brace_closer_is_kept_unless_the_suffix_has_it() -> None:
    text = "return a + b;\n}\n\nint sub(int a, int b) {\n    return a - b;\n}\n"
    assert cut(C_FUNCTION, "", text) == ("return a + b;\n}", "block-end")  # end of file: nothing closes it
    assert cut(C_FUNCTION, "\n}\n", text) == ("return a + b;", "block-end")  # the `}` is already there


def test_javascript_closer_with_punctuation() -> None:
    prefix = "describe('add', () => {\n  it('adds', () => {\n    "
    text = "expect(add(1, 2)).toBe(3);\n  });\n\n  it('subtracts', () => {\n"
    assert cut(prefix, "", text) == ("expect(add(1, 2)).toBe(3);\n  });", "block-end")
    assert cut(prefix, "\n  });\n});\n", text) == ("expect(add(1, 2)).toBe(3);", "block-end")


def test_a_closer_line_is_judged_only_once_complete() -> None:
    """`}` may turn into `} else {`: keep going until the line is whole."""
    stopper = Stopper(StopRules(), C_FUNCTION, "")
    assert stopper.check("return a + b;\n}") is None
    assert cut(C_FUNCTION, "", "return a + b;\n} else {\n") == ("return a + b;", "block-end")
    assert cut(C_FUNCTION, "", "return a + b;\n}") == ("return a + b;\n}", "block-end")


def test_opened_block_ends_at_its_own_indentation_after_a_blank_line() -> None:
    prefix = "class Point:\n    def __init__(self, x):\n        self.x = x\n\n    "
    method = "def norm(self):\n        return abs(self.x)\n"
    after = "    def scale(self, k):\n        return Point(self.x * k)\n"
    assert cut(prefix, "\n", method + "\n" + after) == (method.rstrip(), "block-end")
    # No blank line: the next method is part of one run of code (nothing ends the block there).
    assert cut(prefix, "\n", method + after) == ((method + after).rstrip(), None)
    # A completion that did not open a block is not cut at a blank line.
    assert cut(prefix, "\n", "y = 1\n\n    z = 2\n") == ("y = 1\n\n    z = 2", None)


def test_braced_block_ends_after_a_blank_line() -> None:
    prefix = "int main(void) {\n    "
    text = "if (ready) {\n        go();\n    }\n\n    cleanup();\n    return 0;\n"
    assert cut(prefix, "", text) == ("if (ready) {\n        go();\n    }", "block-end")


def test_block_end_off_keeps_dedented_lines() -> None:
    rules = StopRules(block_end=False)
    assert cut("def f(n):\n    if n:\n        ", "\n", "return n\n    return 0\n", rules) == (
        "return n\n    return 0",
        None,
    )


# -- suffix-overlap -------------------------------------------------------------------------------


def test_line_repeating_the_code_after_the_cursor() -> None:
    prefix = "def total(values):\n    s = 0\n    "
    text = "for v in values:\n        s += v\n    return s\n"
    assert cut(prefix, "\n    return s\n", text) == ("for v in values:\n        s += v", "suffix-overlap")
    assert cut(prefix, "\n    return s\n", text, StopRules(suffix_overlap=False)) == (text.rstrip(), None)
    # A line that starts like the suffix's but goes on is new code, also while it is still being written.
    longer = "s += 1\n    return s + 1\n"
    stopper = Stopper(StopRules(), prefix, "\n    return s\n")
    assert fed(stopper, longer, list(range(1, len(longer) + 1)))[:2] == (longer.rstrip(), None)


def test_short_line_overlaps_only_together_with_the_next_one() -> None:
    """`];` alone is too common to trust; `];` then the suffix's next line is the suffix repeated."""
    prefix, suffix = "const a = [\n  1,\n", "\n];\nexport default a;\n"
    text = "  2,\n];\nexport default a;\n"
    assert cut(prefix, suffix, text) == ("  2,", "suffix-overlap")
    # Fed piece by piece, with a line cap that `];` would fit under: still not shown twice.
    stopper = Stopper(StopRules(max_lines=2), prefix, suffix)
    assert fed(stopper, text, list(range(1, len(text) + 1)))[:2] == ("  2,", "suffix-overlap")


def test_first_line_ending_in_the_rest_of_the_cursor_line() -> None:
    assert cut("total = compute(", ")\nprint(total)\n", "values, scale)\nprint(total)\n") == (
        "values, scale",
        "suffix-overlap",
    )


# -- line-end -------------------------------------------------------------------------------------


def test_mid_line_cursor_completes_only_its_line() -> None:
    prefix, suffix = "if (count > ", ") {\n    go();\n}\n"
    assert cut(prefix, suffix, "limit && ready\n    stop();\n") == ("limit && ready", "line-end")
    assert cut(prefix, suffix, "limit) {\n    go();\n") == ("limit", "suffix-overlap")
    stopper = Stopper(StopRules(), prefix, suffix)
    assert stopper.check("limit && re") is None  # the line may still grow
    assert cut(prefix, suffix, "limit && ready") == ("limit && ready", "line-end")  # ...unless that was all


def test_cursor_at_the_end_of_a_line_is_not_mid_line() -> None:
    prefix = "def f(n):\n    return n"
    assert cut(prefix, "\n", " + 1\n\n\ndef g():\n") == (" + 1", "block-end")
    assert cut(prefix, "  \n", " + 1\n    \n") == (" + 1", None)  # trailing blanks after the cursor are no code


# -- max-lines, whitespace ------------------------------------------------------------------------


def test_max_lines() -> None:
    prefix, text = "def f():\n    ", "a = 1\n    b = 2\n    c = 3\n"
    assert cut(prefix, "", text, StopRules(max_lines=2)) == ("a = 1\n    b = 2", "max-lines")
    assert cut(prefix, "", text, StopRules(max_lines=1)) == ("a = 1", "max-lines")
    assert cut(prefix, "", text.rstrip(), StopRules(max_lines=3)) == (text.rstrip(), None)  # three lines fit


def test_whitespace_only_is_no_completion() -> None:
    prefix = "def f():\n    x = 1\n    "
    assert cut(prefix, "", "\n\ndef g():\n    pass\n") == ("", "block-end")
    assert cut(prefix, "", "  \n\t\n", StopRules.raw()) == ("", None)


def test_trailing_whitespace_is_trimmed() -> None:
    assert cut("def f(x):\n    ", "", "return x   \n\n  ") == ("return x", None)


def test_raw_rules_fire_nothing() -> None:
    assert not StopRules.raw().any and StopRules().any and StopRules(False, False, False, max_lines=3).any
    text = "return n\n}\n\ndef g():\n"
    assert cut("def f(n):\n    if n:\n        ", "\n", text, StopRules.raw()) == (text.rstrip(), None)


# -- stable: what may be streamed -----------------------------------------------------------------


def test_stable_is_complete_lines_only() -> None:
    stopper = Stopper(StopRules(), "def f(values):\n    ", "\n")
    assert stopper.stable("total = 0") == ""
    assert stopper.stable("total = 0\n    for v in values:\n        tot") == "total = 0\n    for v in values:"
    assert Stopper(StopRules(), "print(", ")\n").stable("x)\nmore\n") == ""  # mid-line: nothing until it ends


def test_stable_holds_back_a_short_line_that_may_repeat_the_suffix() -> None:
    """Regression: `];` was streamed, then cut when the next line turned out to repeat the suffix."""
    prefix, suffix = "const a = [\n  1,\n", "\n];\nexport default a;\n"
    stopper = Stopper(StopRules(), prefix, suffix)
    text = "  2,\n];\nexport default a;\n"
    shown, reason, streamed = fed(stopper, text, list(range(1, len(text) + 1)))
    assert (shown, reason) == ("  2,", "suffix-overlap")
    assert all(shown.startswith(s) for s in streamed), streamed
    # When the next line is something else, `];` is kept and streamed after all.
    other = "  2,\n];\nconsole.log(a);\n"
    shown, _, streamed = fed(stopper, other, list(range(1, len(other) + 1)))
    assert streamed[-1] == shown == other.rstrip()


# -- chunking never changes the cut ---------------------------------------------------------------

CONTEXTS = [
    ("def total(values):\n    s = 0\n    ", "\n    return s\n\n\ndef main():\n    pass\n"),
    ("class Point:\n    def norm(self):\n", "\n"),
    ("const a = [\n  1,\n", "\n];\nexport default a;\n"),
    ("int add(int a, int b) {\n    ", "\n}\n"),
    ("if (ready) {", "\n}\n"),
    ("total = compute(", ")\nprint(total)\n"),
    ("", ""),
    ("def f():\n\t", ""),
    ("x = {\n", "\n}\n}\nrest()\n"),
]
RULES = [StopRules(), StopRules(max_lines=2), StopRules(block_end=False), StopRules(suffix_overlap=False),
         StopRules(line_end=False), StopRules(block_end=False, max_lines=1)]
INDENTS = ["", "", "  ", "    ", "        ", "\t"]
CODE = ["", "x = 1", "return s", "def main():", "if x:", "pass", "}", ")", "];", "});", "} else {", "export default a;",
        "print(total)", "a, b)", "values)", "foo(", "rest()", "# note", "x = 1  ", "\r",
        "return s + 1", "export default a; // b", "print(total) or 0"]  # longer than a suffix line they start like
LINE = st.builds(lambda indent, code: indent + code, st.sampled_from(INDENTS), st.sampled_from(CODE))


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, str, str]:
    """(prefix, suffix, completion): completion lines drawn from common code and, as often, from the suffix's
    own lines verbatim, so that the overlap rules (two-line ones too) get exercised."""
    prefix, suffix = draw(st.sampled_from(CONTEXTS))
    repeats = [line for line in suffix.split("\n")[:4] if line.strip()]
    own = st.sampled_from(repeats) if repeats else LINE
    lines = draw(st.lists(st.one_of(LINE, own), min_size=1, max_size=8))
    return prefix, suffix, "\n".join(lines) + draw(st.sampled_from(["", "\n", "\n\n"]))


@settings(max_examples=1500, deadline=None, database=None)
@given(cases(), st.sampled_from(RULES), st.lists(st.integers(1, 12), max_size=40))
def test_any_chunking_gives_the_whole_text_cut(case: tuple[str, str, str], rules: StopRules, sizes: list[int]) -> None:
    """Prefix by prefix (as lookahead commits runs of tokens) the cut is the one on the whole text, and
    every streamed text is a prefix of the final one and of every later stream."""
    prefix, suffix, text = case
    stopper = Stopper(rules, prefix, suffix)
    ends, end = [], 0
    for size in sizes:
        end = min(len(text), end + size)
        ends.append(end)
    ends.append(len(text))
    shown, reason, streamed = fed(stopper, text, ends)
    assert (shown, reason) == cut(prefix, suffix, text, rules)
    for earlier, later in zip(streamed, streamed[1:], strict=False):
        assert later.startswith(earlier)
    assert all(shown.startswith(s) for s in streamed), (shown, streamed)


# -- the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_stops_at_the_end_of_the_body(smollm2_engine, bench_cases: list[dict]) -> None:
    """Cursor at the start of a function body; raw greedy output runs on into the next `def`. With the default
    rules the completion is the start of the raw one (same greedy tokens) and ends before any line that leaves
    the body, so decoding stops early."""
    from conftest import complete

    cases = [c for c in bench_cases if c["id"] in ("inspect-519", "zipfile-1482", "cookies-360")]
    assert len(cases) == 3
    fired, tokens, raw_tokens = 0, 0, 0
    for case in cases:
        body = len(case["prefix"]) - len(case["prefix"].rstrip(" "))  # the cursor line's indentation
        assert case["prefix"].endswith("\n" + " " * body) and body > 0
        kw = dict(document=f"stops-{case['id']}", max_tokens=48, type_through=False)
        raw = complete(smollm2_engine, case["prefix"], case["suffix"], **kw)
        stopped = complete(smollm2_engine, case["prefix"], case["suffix"], stop=StopRules(), **kw)
        assert raw.text.startswith(stopped.text) and stopped.text.strip(), (raw.text, stopped.text)
        assert stopped.tokens == raw.tokens[: len(stopped.tokens)]
        outside = [line for line in stopped.text.split("\n")[1:] if line.strip() and indent_of(line) < body]
        assert not outside, stopped.text
        if stopped.stop_reason in ("block-end", "suffix-overlap", "line-end", "max-lines"):
            fired += 1
        tokens, raw_tokens = tokens + len(stopped.tokens), raw_tokens + len(raw.tokens)
    assert fired >= 2, "most bodies should end by a rule within 48 tokens"
    assert tokens < raw_tokens
