"""Stop rules: where a code completion should end, decided on committed text after every step.

Greedy decoding runs on past the end of what the user wants: to the end of the function and
into the next `def`. Ghost text is only useful up to the end of the current block, so each
request carries rules, and the decode loop asks `Stopper.check` after every step whether one
fired. Lookahead commits several tokens per step, so a rule returns a cut inside the text,
not a token count. Lines are "virtual": the cursor's line is the text before the cursor
followed by the completion's first line, so indentation is judged as the user will see it.

Rules (each names itself in `stop_reason`):
- block-end: a non-empty line indented less than the cursor's block (a closing brace line is
  kept, unless the code after the cursor already has it); a completion that opened a block
  (`def f():`, `if (x) {`) ends before the next line back at its own indentation after a blank line;
- suffix-overlap: a line that repeats the first non-blank line after the cursor, or a first
  line ending in the text that already follows the cursor on its line;
- line-end: the cursor is mid-line with code after it: only the rest of that line;
- max-lines: a cap on lines (tokens are capped by the request's max_tokens);
- stop-sequence: one of the caller's own stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass

OPENERS = (":", "{", "(", "[")
CLOSERS = frozenset(")]}")


@dataclass(frozen=True)
class StopRules:
    block_end: bool = True
    suffix_overlap: bool = True
    line_end: bool = True
    max_lines: int = 0  # 0: no cap on lines
    sequences: tuple[str, ...] = ()  # the caller's own stop strings (OpenAI's `stop`), cut before

    @classmethod
    def raw(cls, sequences: tuple[str, ...] = ()) -> StopRules:
        """No rule: the model's own stop token, the token cap or the caller's stop strings end it."""
        return cls(block_end=False, suffix_overlap=False, line_end=False, max_lines=0, sequences=sequences)

    @property
    def any(self) -> bool:
        return self.block_end or self.suffix_overlap or self.line_end or self.max_lines > 0 or bool(self.sequences)


@dataclass(frozen=True)
class Cut:
    end: int  # characters of the completion to keep (before trimming trailing whitespace)
    reason: str


def indent_of(line: str) -> int:
    expanded = line.expandtabs(4)
    return len(expanded) - len(expanded.lstrip(" "))


def is_closer(stripped: str) -> bool:
    """`}`, `});`, `),` ...: a line that only closes brackets."""
    return bool(stripped) and stripped[0] in CLOSERS and all(c in CLOSERS or c in ";," for c in stripped)


def finish(text: str) -> str:
    """Trailing whitespace trimmed; a whitespace-only completion is no completion."""
    text = text.rstrip()
    return text if text.strip() else ""


class Stopper:
    """The stop rules of one request, bound to its cursor context."""

    def __init__(self, rules: StopRules, prefix: str, suffix: str):
        self.rules = rules
        self.lead = prefix[prefix.rfind("\n") + 1 :]  # the cursor line's text before the cursor
        rest, _, after = suffix.partition("\n")
        self.rest = rest.strip()
        self.midline = bool(self.lead.strip()) and bool(self.rest)
        following: list[str] = []
        for line in after.split("\n", 64)[:64]:
            if line.strip():
                following.append(line.strip())
                if len(following) == 2:
                    break
        self.following = following
        self.floor = self._floor(prefix)

    def _floor(self, prefix: str) -> int:
        """Lines indented less than this end the cursor's block."""
        code = self.lead.rstrip()
        if code.strip():
            base = indent_of(self.lead)
            return base + 1 if code.endswith(OPENERS) else base
        floor = indent_of(self.lead)
        end = len(prefix) - len(self.lead)
        for _ in range(64):  # the previous non-blank line, if it opens a block the body is deeper
            if end <= 0:
                break
            start = prefix.rfind("\n", 0, end - 1) + 1
            line = prefix[start : end - 1]
            if line.strip():
                if line.rstrip().endswith(OPENERS):
                    floor = max(floor, indent_of(line) + 1)
                break
            end = start
        return floor

    def stable(self, text: str) -> str:
        """The part of `text` no rule can take back any more: its complete lines, trimmed, and
        nothing from where a stop string may be starting."""
        if self.midline or "\n" not in text:
            return ""
        end = text.rfind("\n") + 1
        start = text.rfind("\n", 0, end - 1) + 1  # of the last complete line, if it is not the cursor's
        if start and self._overlap_pending(text[start : end - 1]):
            end = start  # a short line like `];` is cut later if the next line repeats the suffix too
        for seq in self.rules.sequences:
            for i in range(max(0, len(text) - len(seq) + 1), len(text)):
                if seq.startswith(text[i:]):
                    end = min(end, i)
                    break
        return text[:end].rstrip()

    def _overlap_pending(self, line: str) -> bool:
        """A line too short to trust that repeats the suffix's first line: the next line decides its cut."""
        following = self.following
        short = len(following) >= 2 and len(following[0]) < 3
        return self.rules.suffix_overlap and short and line.strip() == following[0]

    def check(self, text: str, final: bool = False) -> Cut | None:
        """The cut a rule makes in the completion `text` so far, or None to go on.

        With `final` the text is all there will be, so the last line counts as complete.
        """
        found = [i for i in (text.find(seq) for seq in self.rules.sequences if seq) if i >= 0]
        cut = self._rule_cut(text[: min(found)] if found else text, final or bool(found))
        if found and (cut is None or cut.end >= min(found)):
            return Cut(min(found), "stop-sequence")
        return cut

    def _rule_cut(self, text: str, final: bool) -> Cut | None:
        rules = self.rules
        lines = (self.lead + text).split("\n")
        first = lines[0]
        if self.midline and rules.line_end and (len(lines) > 1 or final):
            line = first.rstrip()
            overlap = len(line) - len(self.rest) - len(self.lead)  # the typed line's end repeats the rest
            if rules.suffix_overlap and line.endswith(self.rest) and overlap >= 0:
                return Cut(overlap, "suffix-overlap")
            return Cut(len(first) - len(self.lead), "line-end")
        opened = first.rstrip().endswith(OPENERS) if first.strip() else None
        top = indent_of(first) if first.strip() else None
        deeper = blank = False
        start = len(first) - len(self.lead) + 1  # where line 1 starts in `text`
        for i in range(1, len(lines)):
            line = lines[i]
            complete = i < len(lines) - 1 or final
            stripped = line.strip()
            if rules.max_lines and i >= rules.max_lines:
                return Cut(start - 1, "max-lines")
            if not stripped:
                blank = blank or (complete and deeper)
                start += len(line) + 1
                continue
            width = indent_of(line)
            if rules.block_end and width < self.floor:
                if is_closer(stripped):
                    if not complete:
                        return None  # wait for the whole line to know whether to keep it
                    if not self.following or stripped != self.following[0]:
                        return Cut(start + len(line), "block-end")
                return Cut(start - 1, "block-end")
            if top is None:
                opened, top = stripped.endswith(OPENERS), width
            elif rules.block_end and opened and deeper and blank and width <= top:
                return Cut(start - 1, "block-end")
            deeper = deeper or (top is not None and width > top)
            if rules.suffix_overlap and self.following and complete and stripped == self.following[0]:
                if len(stripped) >= 3 or len(self.following) < 2:
                    return Cut(start - 1, "suffix-overlap")
                if i + 1 < len(lines):
                    nxt = lines[i + 1]
                    if i + 1 < len(lines) - 1 or final:
                        if nxt.strip() == self.following[1]:
                            return Cut(start - 1, "suffix-overlap")
                    elif self.following[1].startswith(nxt.strip()):
                        return None  # the next line may still turn out to repeat the suffix
            start += len(line) + 1
        return None
