"""History: completions this engine already produced, per document and for the whole workspace.

A completion often repeats an earlier one (the same call pattern, a renamed variable's next use,
a re-request after an edit). Each history is a suffix automaton over "context tail + completion"
records (SuffixDecoding, arXiv 2411.04975, uses a suffix tree the same way): the longest suffix of
the current text that occurred in the history is found in O(1) per committed token, and every token
that followed it there is a branch of the draft tree.
"""

from __future__ import annotations

from . import Draft, match_bucket

CONTEXT_TAIL = 24  # prompt tokens stored before each completion, so a new request can match into it
MIN_MATCH = 2  # a single shared token is no evidence of a repeat


class SuffixAutomaton:
    """Online suffix automaton over token ids; records are separated by unique negative sentinels."""

    def __init__(self, max_tokens: int = 1 << 16):
        self.max_tokens = max_tokens
        self.clear()

    def clear(self) -> None:
        self.next: list[dict[int, int]] = [{}]
        self.link = [-1]
        self.length = [0]
        self.end = [-1]  # index in `text` of the last token of one occurrence of the state's strings
        self.text: list[int] = []
        self.last = 0
        self.records: list[list[int]] = []

    def add(self, record: list[int]) -> None:
        """Append a record; when full, keep the newer half of the records and rebuild."""
        if not record:
            return
        self.records.append(list(record))
        if len(self.text) + len(record) + 1 > self.max_tokens:
            keep, total = [], 0
            for r in reversed(self.records):
                total += len(r) + 1
                if total > self.max_tokens // 2:
                    break
                keep.append(r)
            self.clear()
            for r in reversed(keep):
                self.add(r)
            return
        for token in record:
            self._extend(token)
        self._extend(-len(self.text) - 1)  # a sentinel no record contains: matches never cross records

    def _extend(self, c: int) -> None:
        pos = len(self.text)
        self.text.append(c)
        cur = len(self.length)
        self.next.append({})
        self.length.append(self.length[self.last] + 1)
        self.link.append(0)
        self.end.append(pos)
        p = self.last
        while p != -1 and c not in self.next[p]:
            self.next[p][c] = cur
            p = self.link[p]
        if p != -1:
            q = self.next[p][c]
            if self.length[p] + 1 == self.length[q]:
                self.link[cur] = q
            else:
                clone = len(self.length)
                self.next.append(dict(self.next[q]))
                self.length.append(self.length[p] + 1)
                self.link.append(self.link[q])
                self.end.append(self.end[q])
                while p != -1 and self.next[p].get(c) == q:
                    self.next[p][c] = clone
                    p = self.link[p]
                self.link[q] = self.link[cur] = clone
        self.last = cur

    def step(self, state: int, matched: int, c: int) -> tuple[int, int]:
        """Extend a match (state, its length) by token c: the longest suffix of text+c that occurs."""
        while state and c not in self.next[state]:
            state = self.link[state]
            matched = self.length[state]
        if c in self.next[state]:
            return self.next[state][c], matched + 1
        return 0, 0

    def continuations(self, state: int, depth: int, limit: int) -> list[tuple[int, ...]]:
        """Up to `limit` continuations after the strings of `state`, one per next token, most recent first."""
        targets = sorted(((t, s) for t, s in self.next[state].items() if t >= 0), key=lambda ts: -self.end[ts[1]])
        out = []
        for _, s in targets[:limit]:
            e = self.end[s]
            cont = []
            while e < len(self.text) and self.text[e] >= 0 and len(cont) < depth:
                cont.append(self.text[e])
                e += 1
            out.append(tuple(cont))
        return out


class HistoryLookup:
    """The history source for one request: matches the committed text against each scope's automaton."""

    name = "history"

    def __init__(self, scopes: dict[str, SuffixAutomaton], seq: list[int]):
        self.scopes = scopes
        self.match = {name: (0, 0) for name in scopes}
        self.observe(seq, min(len(seq), 64))

    def observe(self, seq: list[int], new: int) -> None:
        for name, sam in self.scopes.items():
            state, matched = self.match[name]
            for c in seq[len(seq) - new :]:
                state, matched = sam.step(state, matched, c)
            self.match[name] = (state, matched)

    def propose(self, seq: list[int], depth: int, limit: int) -> list[Draft]:
        drafts: list[Draft] = []
        seen: set[tuple[int, ...]] = set()
        for name, sam in self.scopes.items():
            state, matched = self.match[name]
            if matched < MIN_MATCH:
                continue
            for cont in sam.continuations(state, depth, limit):
                if cont and cont not in seen:
                    seen.add(cont)
                    drafts.append(Draft(self.name, cont, f"{name}-{match_bucket(matched)}"))
        return drafts[:limit]


def remember(scopes: dict[str, SuffixAutomaton], prompt: list[int], completion: list[int]) -> None:
    """Add a finished completion (with the prompt tail it followed) to every scope's history."""
    if completion:
        record = prompt[-CONTEXT_TAIL:] + completion
        for sam in scopes.values():
            sam.add(record)
