"""Token healing inside tree steps: the tokens that re-type the healed text are verified with the drafts.

Healing backs the prompt off its last token (the cursor may sit inside one) and decoding must re-type
those bytes: each such token is the most likely of the tokens that agree with the bytes still to come
(`heal` in decoding.py). Run alone, that is a one-row step per token, and the cursor after indentation,
the commonest place to complete code, takes two: Qwen's tokenizer writes 8 spaces before a word as 7
spaces and " word", so healing 8 removed spaces picks "       " and then the word.

Here the tree step does it: the rows whose path has not yet re-typed the removed bytes are judged by that
constrained choice, every other row by the plain greedy one, so the committed tokens are exactly
healing's and then greedy decoding's. The drafts guess the healing tokens (the removed token itself, the
longest token that is a strict prefix of it) and grow the recycling tree under each guess; drafts that
disagree with the removed bytes get no rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from .calibration import Calibration
from .decoding import healing_tensor
from .sources.recycling import Recycling
from .tokens import Codec
from .tree import TokenTrie, TreeStep

SOURCE = "heal"


class Healing:
    """The removed bytes not yet re-typed by committed tokens, and the constrained rows of one step."""

    def __init__(self, codec: Codec, removed: bytes):
        self.codec = codec
        self.rest = removed
        self.left: list[bytes | None] = []  # per node of this step's trie: see `prune`
        self.rows: list[tuple[int, bytes]] = []  # this step's constrained rows: (row, the bytes still to come)

    def __bool__(self) -> bool:
        return bool(self.rest)

    def advance(self, tokens: Sequence[int]) -> None:
        """Committed tokens re-type the start of the rest (one longer than the rest ends healing too)."""
        table = self.codec.token_bytes
        for token in tokens:
            if not self.rest:
                return
            got = table[token] if token < len(table) else b""
            self.rest = self.rest[len(got) :] if got and self.rest.startswith(got) else b""

    def guesses(self) -> list[tuple[int, str]]:
        """(token, calibration key) of the healing tokens to draft first: the rest as one token, and the
        longest token that is a strict prefix of it (the model's usual first pick after indentation)."""
        whole = self.codec.exact_token(self.rest)
        out = [] if whole is None else [(whole, "exact")]
        shorter = (self.codec.exact_token(self.rest[:k]) for k in range(len(self.rest) - 1, 0, -1))
        short = next((t for t in shorter if t is not None), None)
        return out if short is None else [*out, (short, "short")]

    def draft(self, trie: TokenTrie, seq: list[int], depth: int, limit: int, calibration: Calibration,
              recycling: Recycling | None) -> None:
        """Insert the guesses under the root, each with the recycling tree grown from it."""
        guesses = self.guesses()
        for token, key in guesses:
            k = calibration.key(SOURCE, key)
            trie.insert((token,), k, calibration.column[k])
            if recycling is not None and depth > 1:
                node = trie.child(0, token)
                recycling.grow(trie, [seq[-1], token], depth - 1, max(1, limit // len(guesses)), calibration,
                               under=node)

    def prune(self, trie: TokenTrie) -> list[bytes | None]:
        """Per trie node, the removed bytes still to come after its path (b"": all re-typed; None: its path
        disagrees with them), kept for `plan`. A node that disagrees cannot be accepted: its reach becomes 0,
        so it gets a row only where nothing else wants one. Call after `trie.score`."""
        tokens, parents = trie.token[: trie.size].tolist(), trie.parent[: trie.size].tolist()
        table = self.codec.token_bytes
        rest: list[bytes | None] = [self.rest]
        for i in range(1, trie.size):
            above = rest[parents[i]]
            if not above:  # re-typed already (b""), or a dead branch (None): the same below
                rest.append(above)
                if above is None:
                    trie.reach[i] = 0.0
                continue
            got = table[tokens[i]] if tokens[i] < len(table) else b""  # ids past the tokenizer's have no text
            if got and above.startswith(got) and len(got) < len(above):
                rest.append(above[len(got) :])
            else:
                rest.append(b"" if got and got.startswith(above) else None)  # no text: never a healing choice
            if rest[i] is None:
                trie.reach[i] = 0.0
        self.left = rest
        return rest

    def plan(self, step: TreeStep, chosen: np.ndarray) -> None:
        """This step's constrained rows: the root's and each chosen node's whose path is still healing."""
        self.rows = [(0, self.rest)]
        self.rows += [(int(step.row_of[n]), self.left[n]) for n in chosen.tolist() if self.left[n]]

    def constrain(self, pred: np.ndarray, logits: Tensor) -> np.ndarray:
        """The step's greedy predictions with each constrained row's replaced by healing's choice there."""
        pred = pred.copy()
        for row, rest in self.rows:
            candidates = healing_tensor(self.codec, rest, logits.device)
            pred[row] = int(candidates[logits[row, candidates].argmax()])
        return pred
