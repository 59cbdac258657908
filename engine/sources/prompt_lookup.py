"""Prompt lookup: the text before the cursor (and what was committed since) often repeats itself.

The longest earlier match of the committed sequence's suffix proposes the tokens that followed
it, as far as they go (variable length, not a fixed n-gram). Distinct continuations become
drafts, longest match first, then most recent; the trie merges their shared prefixes.

The text is a numpy array searched afresh at every step (a few vectorized compares over a few
thousand tokens) rather than a pair index built per request: building that index in Python took
~8 ms for a 3,000-token prompt, before the first step of every completion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import Draft, match_bucket

MAX_MATCH = 32  # a longer match says nothing more about the continuation
BACK = np.arange(2, MAX_MATCH)  # how far before its last pair each further token of a match lies


class PromptLookup:
    name = "prompt"

    def __init__(self, seq: list[int], extra: Sequence[int] = ()):
        """`extra`: text the prompt may lack but the continuation may copy (the code after the cursor
        when the model has no fill-in-the-middle); it is searched before `seq`."""
        # The text sits after MAX_MATCH sentinels (-1, no token), so a match growing backwards past the
        # text's start stops there without a bounds check.
        self.buffer = np.full(MAX_MATCH + 2 * (len(extra) + len(seq)) + 256, -1, dtype=np.int64)  # grown by doubling
        self.size = 0
        self.append([*extra, *seq])

    @property
    def text(self) -> np.ndarray:
        return self.buffer[MAX_MATCH : MAX_MATCH + self.size]

    def append(self, tokens: Sequence[int]) -> None:
        start, end = MAX_MATCH + self.size, MAX_MATCH + self.size + len(tokens)
        if end > len(self.buffer):
            self.buffer = np.concatenate([self.buffer[:start], np.empty(end, dtype=np.int64)])
        self.buffer[start:end] = tokens
        self.size += len(tokens)

    def observe(self, seq: list[int], new: int) -> None:
        self.append(seq[len(seq) - new :])

    def matches(self) -> list[tuple[int, int]]:
        """(match length, index after the match) of earlier occurrences of the text's suffix, longest first,
        most recent first among equals."""
        text, end = self.text, self.size - 1
        if end < 1:
            return []
        # i: where an earlier copy of the last two tokens ends (i < end); the match then grows backwards.
        at = np.flatnonzero((text[: end - 1] == text[end - 1]) & (text[1:end] == text[end])) + 1
        if not len(at):
            return []
        padded = self.buffer  # text[i] is padded[i + MAX_MATCH]; before the text come the sentinels
        same = padded[(at + MAX_MATCH)[:, None] - BACK] == padded[end + MAX_MATCH - BACK]  # [hits, MAX_MATCH - 2]
        length = 2 + np.cumprod(same, axis=1).sum(axis=1)  # the pair, then the unbroken run before it
        order = np.argsort(-(length * (end + 1) + at))  # longest first, then most recent
        return list(zip(length[order].tolist(), (at[order] + 1).tolist(), strict=True))

    def propose(self, seq: list[int], depth: int, limit: int) -> list[Draft]:
        drafts: list[Draft] = []
        seen: set[tuple[int, ...]] = set()
        text = self.text
        for length, after in self.matches():
            cont = tuple(text[after : after + depth].tolist())
            if not cont or cont in seen:
                continue
            seen.add(cont)
            drafts.append(Draft(self.name, cont, match_bucket(length)))
            if len(drafts) >= limit:
                break
        return drafts
