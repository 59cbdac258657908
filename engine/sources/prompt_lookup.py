"""Prompt lookup: the text before the cursor (and what was committed since) often repeats itself.

The committed sequence is indexed by token pair; the longest earlier match of its suffix
proposes the tokens that followed it, as far as they go (variable length, not a fixed n-gram).
Distinct continuations become drafts, longest match first, then most recent; the trie merges
their shared prefixes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from . import Draft, match_bucket

MAX_MATCH = 32  # a longer match says nothing more about the continuation


class PromptLookup:
    name = "prompt"

    def __init__(self, seq: list[int], extra: Sequence[int] = ()):
        """`extra`: text the prompt may lack but the continuation may copy (the code after the cursor
        when the model has no fill-in-the-middle); it is indexed before `seq`."""
        self.text: list[int] = []
        self.at: defaultdict[tuple[int, int], list[int]] = defaultdict(list)  # pair -> index of its 2nd token
        self.append(list(extra) + list(seq))

    def append(self, tokens: list[int]) -> None:
        start = len(self.text)
        self.text.extend(tokens)
        for i in range(max(1, start), len(self.text)):
            self.at[self.text[i - 1], self.text[i]].append(i)

    def observe(self, seq: list[int], new: int) -> None:
        self.append(seq[len(seq) - new :])

    def matches(self) -> list[tuple[int, int]]:
        """(match length, index after the match) of earlier occurrences of the text's suffix, longest first,
        most recent first among equals."""
        text = self.text
        end = len(text) - 1
        if end < 1:
            return []
        found = []
        for i in reversed(self.at.get((text[-2], text[-1]), ())):
            if i == end:
                continue
            m = 2
            while m < MAX_MATCH and i - m >= 0 and text[i - m] == text[end - m]:
                m += 1
            found.append((m, i + 1))
        found.sort(key=lambda f: -f[0])  # stable: recency kept among equal lengths
        return found

    def propose(self, seq: list[int], depth: int, limit: int) -> list[Draft]:
        drafts: list[Draft] = []
        seen: set[tuple[int, ...]] = set()
        for length, after in self.matches():
            cont = tuple(self.text[after : after + depth])
            if not cont or cont in seen:
                continue
            seen.add(cont)
            drafts.append(Draft(self.name, cont, match_bucket(length)))
            if len(drafts) >= limit:
                break
        return drafts
