"""Code-completion prompts: fill-in-the-middle from token ids, stable windows, token healing.

Qwen2.5-Coder's FIM layout is `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`;
models without FIM tokens get the prefix alone. The prefix window starts on a line that is
a multiple of `window_lines`, so typing does not move the start (and destroy KV reuse) on
every keystroke: it jumps forward in coarse steps only when the budget overflows.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .tokens import Codec


@dataclass(frozen=True)
class PromptBudget:
    prefix_tokens: int = 3072  # most context sits before the cursor
    suffix_tokens: int = 256  # recomputed after every edit, so kept modest
    window_lines: int = 32  # the prefix window's start moves in jumps of this many lines


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    healed: bytes  # text taken off the prefix's end; the completion must start with it
    prefix_start: int  # character offset in the prefix where the window begins
    fim: bool


def line_starts(text: str) -> list[int]:
    starts = [0]
    pos = text.find("\n")
    while pos != -1:
        starts.append(pos + 1)
        pos = text.find("\n", pos + 1)
    return starts


def prefix_window(codec: Codec, prefix: str, budget: PromptBudget) -> tuple[int, list[int]]:
    """(start offset, token ids) of the stable window of `prefix` that fits the budget."""
    ids, offsets = codec.encode_with_offsets(prefix)
    if len(ids) <= budget.prefix_tokens:
        return 0, ids
    token_starts = [o[0] for o in offsets]
    starts = line_starts(prefix)
    for line in range(0, len(starts), budget.window_lines):
        start = starts[line]
        if len(ids) - bisect.bisect_left(token_starts, start) <= budget.prefix_tokens:
            window = codec.encode(prefix[start:])
            if len(window) <= budget.prefix_tokens:
                return start, window
    # The cursor's own block of lines is over budget (very long lines): cut by tokens.
    first = len(ids) - budget.prefix_tokens
    start = token_starts[first]
    return start, codec.encode(prefix[start:])[-budget.prefix_tokens :]


def suffix_window(codec: Codec, suffix: str, budget: PromptBudget) -> list[int]:
    """Whole lines of the suffix, as many as fit the budget."""
    if budget.suffix_tokens <= 0 or not suffix:
        return []
    ids, offsets = codec.encode_with_offsets(suffix)
    if len(ids) <= budget.suffix_tokens:
        return ids
    limit = offsets[budget.suffix_tokens][0]
    cut = suffix.rfind("\n", 0, limit) + 1
    return codec.encode(suffix[:cut]) if cut > 0 else ids[: budget.suffix_tokens]


def build_prompt(
    codec: Codec, prefix: str, suffix: str = "", budget: PromptBudget | None = None, fim: bool = True, heal: bool = True
) -> Prompt:
    budget = budget or PromptBudget()
    start, prefix_ids = prefix_window(codec, prefix, budget)
    healed = b""
    if heal and prefix_ids:
        # Token healing: the cursor may sit inside what would be one token (a half-typed name,
        # trailing indentation). Back off the last token; decoding must reproduce its bytes.
        healed = codec.token_bytes[prefix_ids[-1]]
        prefix_ids = prefix_ids[:-1]
    fim_ids = codec.fim_ids if fim else None
    if fim_ids is None:
        return Prompt(prefix_ids, healed, start, False)
    pre, suf, mid = fim_ids
    ids = [pre, *prefix_ids, suf, *suffix_window(codec, suffix, budget), mid]
    return Prompt(ids, healed, start, True)
