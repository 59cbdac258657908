"""Code-completion prompts: fill-in-the-middle from token ids, stable windows, token healing.

Qwen2.5-Coder's FIM layout is `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`;
models without FIM tokens get the prefix alone. The prefix window starts on a line that is
a multiple of `window_lines`, so typing does not move the start (and destroy KV reuse) on
every keystroke: it jumps forward in coarse steps only when the budget overflows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokens import Codec, split_pieces


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


def prefix_window(codec: Codec, prefix: str, budget: PromptBudget) -> tuple[int, list[int]]:
    """(start offset, token ids) of the stable window of `prefix` that fits the budget.

    Works on line pieces (tokens.split_pieces) whose encodings the codec caches, so a keystroke
    costs one line's tokenization. The start is the first piece at or after a line that is a
    multiple of `window_lines`, the earliest such that the rest fits.
    """
    pieces = split_pieces(prefix)
    encoded = codec.encode_pieces(pieces)
    total = sum(len(e) for e in encoded)
    if total <= budget.prefix_tokens:
        return 0, [i for e in encoded for i in e]
    remaining, offset, line, mark = total, 0, 0, 0
    for index, (piece, ids) in enumerate(zip(pieces, encoded, strict=True)):
        if line >= mark:  # the first piece at or after the next grid line: a candidate start
            if remaining <= budget.prefix_tokens:
                return offset, [i for e in encoded[index:] for i in e]
            mark = (line // budget.window_lines + 1) * budget.window_lines
        remaining -= len(ids)
        offset += len(piece)
        line += piece.count("\n")
    # The cursor's own block of lines is over budget (very long lines): cut by tokens.
    tail = [i for e in encoded for i in e][-budget.prefix_tokens :]
    return len(prefix) - len(codec.decode(tail)), tail


def suffix_window(codec: Codec, suffix: str, budget: PromptBudget) -> list[int]:
    """Whole lines of the suffix, as many as fit the budget."""
    if budget.suffix_tokens <= 0 or not suffix:
        return []
    ids: list[int] = []
    for piece in codec.encode_pieces(split_pieces(suffix)):
        if len(ids) + len(piece) > budget.suffix_tokens:
            return ids or piece[: budget.suffix_tokens]
        ids.extend(piece)
    return ids


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
