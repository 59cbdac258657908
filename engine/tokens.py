"""Text <-> token ids with control tokens handled by id only.

File text is always encoded with special-token parsing off: a source file that contains
`<|endoftext|>` or `<|fim_middle|>` is text, never a control token. Control tokens (FIM
markers, stop tokens) are looked up in the vocabulary and inserted by id, which also keeps
prompts right on tokenizer builds that do not parse them (transformers 5.17's GGUF path).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterator
from functools import cached_property

import numpy as np
from tokenizers import Tokenizer

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
FILE_SEP = "<|file_sep|>"
STOP_NAMES = ("<|endoftext|>", "<|im_end|>", "<|fim_pad|>", FILE_SEP, "<|repo_name|>",
              FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, "</s>", "<|end_of_text|>", "<|eot_id|>")


# Where a file may be cut into pieces that encode separately to the same ids as the whole: a
# pre-token boundary of the tokenizer's regex. Qwen2's regex ends a pre-token at every newline
# run; GPT-2's (SmolLM2) lets whitespace runs span newlines, so only a single newline between
# two non-space characters is safe there. The first pattern that passes the probes is used.
PIECE_BOUNDARIES = (re.compile(r"(?<=\n)(?=[^\r\n])"), re.compile(r"(?<=\S\n)(?=\S)"))
PIECE_PROBES = ("a\nb", "a\n\nb", "a \nb", "a\n b", "a\n\tb", "a:\n    b", "a\r\nb", "a\n\n  b", "a)\n\n\nb",
                "# c\n\n\ndef f():\n    return 1\n", "x = 1  \n\n\n    y\n", "}\n}\n\n// x\n")
PIECE_CACHE_LIMIT = 200_000


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class Codec:
    def __init__(self, tokenizer, eos_ids: list[int] | None = None):
        # Our own copy of the Rust tokenizer, so switching special parsing off touches nobody else.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.encode_special_tokens = True
        self.vocab: dict[str, int] = self.backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self.vocab.values()) + 1
        # "</s>" can be a plain BPE token (it is in Qwen's vocabulary): only control tokens stop.
        added = set(self.backend.get_added_tokens_decoder())
        stops = {
            self.vocab[n] for n in STOP_NAMES if n in self.vocab and (self.vocab[n] in added or n.startswith("<|"))
        }
        stops.update(i for i in (eos_ids or []) if i is not None)
        self.stop_ids = frozenset(stops)
        self._pieces: dict[str, list[int]] = {}

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the vocabulary, so a client can tell it talks to an engine with its tokenizer."""
        import hashlib

        return hashlib.sha256(json.dumps(sorted(self.vocab.items())).encode()).hexdigest()[:16]

    def token_id(self, text: str) -> int | None:
        return self.vocab.get(text)

    @property
    def fim_ids(self) -> tuple[int, int, int] | None:
        ids = tuple(self.vocab.get(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
        return ids if None not in ids else None  # type: ignore[return-value]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids if text else []

    @cached_property
    def piece_boundary(self) -> re.Pattern | None:
        def exact(boundary: re.Pattern, text: str) -> bool:
            return [i for piece in boundary.split(text) for i in self.encode(piece)] == self.encode(text)

        return next((b for b in PIECE_BOUNDARIES if all(exact(b, probe) for probe in PIECE_PROBES)), None)

    def split_pieces(self, text: str) -> list[str]:
        return list(self.iter_pieces(text))

    def iter_pieces(self, text: str) -> Iterator[str]:
        """Text cut at safe pre-token boundaries (mostly line starts), lazily: a suffix needs its
        first few lines, not the rest of the file cut up. One piece if no boundary is safe."""
        start = 0
        if self.piece_boundary is not None:
            for match in self.piece_boundary.finditer(text):
                if match.start() > start:
                    yield text[start : match.start()]
                    start = match.start()
        if start < len(text):
            yield text[start:]

    def piece_ids(self, piece: str) -> list[int]:
        """One piece's ids through the cache."""
        ids = self._pieces.get(piece)
        return ids if ids is not None else self.encode_pieces([piece])[0]

    def encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        """Token ids per piece (see split_pieces), cached: a keystroke re-encodes one line, not the file."""
        cache = self._pieces
        found = list(map(cache.get, pieces))
        if None not in found:  # all known (most keystrokes): no missing list, no tokenizer call
            return found
        missing = list(dict.fromkeys(p for p, ids in zip(pieces, found, strict=True) if ids is None))
        if len(cache) + len(missing) > PIECE_CACHE_LIMIT:
            cache.clear()
        for piece, enc in zip(missing, self.backend.encode_batch(missing, add_special_tokens=False), strict=True):
            cache[piece] = enc.ids
        return [ids if ids is not None else cache[p] for p, ids in zip(pieces, found, strict=True)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not text:
            return [], []
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The exact bytes each token stands for (control tokens: their literal text)."""
        table: list[bytes] = [b""] * self.vocab_size
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
        if "ByteLevel" in kinds:
            byte_of = {c: b for b, c in bytes_to_unicode().items()}
            for tok, i in self.vocab.items():
                if all(c in byte_of for c in tok):
                    table[i] = bytes(byte_of[c] for c in tok)
                else:
                    table[i] = tok.encode()
        else:
            for i in range(self.vocab_size):
                table[i] = self.backend.decode([i], skip_special_tokens=False).encode()
        return table

    @cached_property
    def _tokens_by_bytes(self) -> tuple[list[bytes], np.ndarray, dict[bytes, list[int]]]:
        """Token bytes sorted, with their ids, and a bytes -> ids map: a prefix query is a slice."""
        pairs = sorted((b, i) for i, b in enumerate(self.token_bytes) if b and i not in self.stop_ids)
        exact: dict[bytes, list[int]] = {}
        for b, i in pairs:
            exact.setdefault(b, []).append(i)
        return [b for b, _ in pairs], np.array([i for _, i in pairs], dtype=np.int64), exact

    def exact_token(self, text: bytes) -> int | None:
        """A token whose bytes are exactly `text` (the lowest id), or None."""
        ids = self._tokens_by_bytes[2].get(text)
        return ids[0] if ids else None

    def to_bytes(self, ids: list[int]) -> bytes:
        # Ids past the tokenizer's vocabulary (padded embedding rows, as in Qwen2.5) have no text.
        table = self.token_bytes
        return b"".join(table[i] if i < len(table) else b"" for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.to_bytes(ids).decode("utf-8", errors="replace")

    def healing_candidates(self, removed: bytes) -> list[int]:
        """Tokens that agree with `removed`: they start with it, or are a prefix of it; sorted.

        A bisection, not a vocabulary scan: healing a space must not cost 60k string compares
        on every keystroke.
        """
        keys, ids, exact = self._tokens_by_bytes
        lo = bisect.bisect_left(keys, removed)
        upper = removed.rstrip(b"\xff")
        hi = bisect.bisect_left(keys, upper[:-1] + bytes([upper[-1] + 1])) if upper else len(keys)
        shorter = [i for k in range(1, len(removed)) for i in exact.get(removed[:k], ())]
        return sorted(ids[lo:hi].tolist() + shorter)
