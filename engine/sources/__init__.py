"""Candidate sources for tree decoding: each guesses continuations of the committed tokens.

One verifier (`engine/tree.py`) checks every source's guesses in a single forward, so a source
only has to say what it believes comes next and how it would like its confidence judged:
`Draft.key` names its calibration bucket (e.g. the length of the match it came from). Token
Recycling knows each token's probability instead (`prob_bucket`) and grows a whole tree into the trie.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Draft:
    source: str  # the source's name, for calibration and accounting
    tokens: tuple[int, ...]  # guessed continuation after the last committed token
    key: str = ""  # calibration bucket within the source (e.g. "m4": a 4-token match)


class Source(Protocol):
    """Text-only sources: they see committed tokens and propose continuations of them."""

    name: str

    def propose(self, seq: list[int], depth: int, limit: int) -> list[Draft]:
        """At most `limit` drafts of at most `depth` tokens continuing `seq`, best first."""
        ...

    def observe(self, seq: list[int], new: int) -> None:
        """The last `new` tokens of `seq` were just committed."""
        ...


def match_bucket(length: int) -> str:
    """Calibration bucket of a match length: longer matches predict longer continuations."""
    for limit in (1, 2, 4, 8):
        if length <= limit:
            return f"m{limit}"
    return "m9+"


PROB_BOUNDS = (0.0, 0.03, 0.1, 0.3, 0.6, 0.9)  # ascending: bisect finds a probability's bucket
PROB_KEYS = tuple(f"p{bound}" for bound in PROB_BOUNDS)


def prob_bucket(p: float) -> str:
    """Calibration bucket of a token its source gave probability p: the highest bound it reaches."""
    return PROB_KEYS[max(bisect_right(PROB_BOUNDS, p) - 1, 0)]
