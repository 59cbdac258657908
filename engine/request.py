"""What a caller asks the engine for, kept apart from the switches only benchmarks flip."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BadRequest
from .lookahead import LookaheadConfig
from .stops import StopRules
from .tree_decoding import TreeConfig

DECODINGS = ("ar", "lookahead", "tree")


@dataclass(frozen=True)
class CompletionRequest:
    prefix: str  # the document's text before the cursor
    suffix: str = ""  # and after it
    document: str | None = None  # key of the document's KV session (a path or URI); None: anonymous
    max_tokens: int = 128
    stop: StopRules = field(default_factory=StopRules)  # StopRules.raw() for the model's own stop only
    decoding: str = "lookahead"  # or "ar", or "tree" (several draft sources, one verifier)
    lookahead: LookaheadConfig | None = None  # None: the engine's tuned or built-in (W,N,G)
    tree: TreeConfig | None = None  # None: the engine's tuned or built-in tree budget and sources
    heal: bool = True  # token healing at the cursor
    # Other files shown to the model before this one, as (path, text), most relevant last; kept
    # stable between keystrokes by the caller, since they sit before the document in the KV cache.
    context: tuple[tuple[str, str], ...] = ()
    path: str | None = None  # the document's path, named in a prompt with context

    def validate(self) -> None:
        if not isinstance(self.prefix, str) or not isinstance(self.suffix, str):
            raise BadRequest("prefix and suffix must be text")
        if self.decoding not in DECODINGS:
            raise BadRequest(f"unknown decoding '{self.decoding}' (use {', '.join(DECODINGS)})")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise BadRequest(f"max tokens must be an integer >= 0 (got {self.max_tokens!r})")
        if self.stop.max_lines < 0:
            raise BadRequest(f"max lines must be >= 0 (got {self.stop.max_lines})")


@dataclass(frozen=True)
class Switches:
    """Engine features a benchmark turns off to measure what each one buys; users leave them on."""

    fim: bool = True  # fill-in-the-middle prompt (the suffix is seen) where the model has FIM tokens
    reuse_kv: bool = True  # reuse the document's K/V prefix from its last request
    persistent_pool: bool = True  # keep the document's lookahead n-gram pool across requests
    type_through: bool = True  # serve the rest of the last suggestion while the user types it


ALL_ON = Switches()
