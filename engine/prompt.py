"""Code-completion prompts: fill-in-the-middle from token ids, stable windows, token healing.

Qwen2.5-Coder's FIM layout is `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`;
models without FIM tokens get the prefix alone. The prefix window starts on a line that is
a multiple of `window_lines`, so typing does not move the start (and destroy KV reuse) on
every keystroke: it jumps forward in coarse steps only when the budget overflows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .tokens import FILE_SEP, Codec


@dataclass(frozen=True)
class PromptBudget:
    prefix_tokens: int = 3072  # most context sits before the cursor
    suffix_tokens: int = 256  # recomputed after every edit, so kept modest
    window_lines: int = 32  # the prefix window's start moves in jumps of this many lines
    context_tokens: int = 1024  # other files of the repository, before the document


LINE_BATCH = 64  # lines of the prefix encoded per tokenizer call while sizing its window


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    healed: bytes  # text taken off the prefix's end; the completion must start with it
    prefix_start: int  # character offset in the prefix where the window begins
    fim: bool


def prefix_window(codec: Codec, prefix: str, budget: PromptBudget) -> tuple[int, list[int]]:
    """(start offset, token ids) of the stable window of `prefix` that fits the budget.

    The start is the earliest line that is a multiple of `window_lines` such that the rest fits,
    sized from per-line encodings that the codec caches. Lines are read backwards from the cursor
    and only until the budget is spent, so a keystroke's cost does not grow with the file. The
    window is then encoded as one text, through the codec's safe pieces, so its ids are exactly the
    tokenizer's for that text whatever the tokenizer does at line breaks.
    """
    starts: list[int] = []  # line starts from the cursor's line backwards, while the rest fits
    total = 0
    for start, ids in lines_backwards(codec, prefix):
        total += len(ids)
        if total > budget.prefix_tokens:
            break
        starts.append(start)
    else:
        return 0, encode(codec, prefix)
    if starts:
        line = prefix.count("\n", 0, starts[-1])  # the earliest fitting start's line number
        for k, start in enumerate(reversed(starts)):
            if (line + k) % budget.window_lines == 0:
                return start, encode(codec, prefix[start:])
    # The cursor's own block of lines is over budget (very long lines): cut by tokens.
    tail = encode(codec, prefix)[-budget.prefix_tokens :] if budget.prefix_tokens > 0 else []
    return len(prefix) - len(codec.decode(tail)), tail


def lines_backwards(codec: Codec, text: str) -> Iterator[tuple[int, list[int]]]:
    """(start, token ids) of each line of `text`, from the last line back to the first. A batch of
    LINE_BATCH lines per tokenizer call: a line at a time, a cold 3,000-token window cost ~6 ms."""
    end = len(text)
    while end > 0:
        spans: list[tuple[int, int]] = []
        while end > 0 and len(spans) < LINE_BATCH:
            start = text.rfind("\n", 0, end - 1) + 1
            spans.append((start, end))
            end = start
        yield from zip([a for a, _ in spans], codec.encode_pieces([text[a:b] for a, b in spans]), strict=True)


def encode(codec: Codec, text: str) -> list[int]:
    return [i for ids in codec.encode_pieces(codec.split_pieces(text)) for i in ids]


def suffix_window(codec: Codec, suffix: str, budget: PromptBudget) -> list[int]:
    """Whole lines of the suffix, as many as fit the budget."""
    if budget.suffix_tokens <= 0 or not suffix:
        return []
    ids: list[int] = []
    for piece in map(codec.piece_ids, codec.iter_pieces(suffix)):
        if len(ids) + len(piece) > budget.suffix_tokens:
            return ids or piece[: budget.suffix_tokens]
        ids.extend(piece)
    return ids


def context_ids(codec: Codec, context: tuple[tuple[str, str], ...], path: str | None, budget: int) -> list[int]:
    """Qwen2.5-Coder's repository layout: `<|file_sep|>path\ntext` per file, the current file last.

    Files are taken from the most relevant (last) backwards while they fit the budget; one that
    does not fit is cut to its first tokens. Empty when the model has no file separator token.
    """
    sep = codec.token_id(FILE_SEP)
    if not context or sep is None or budget <= 0:
        return []
    own = [sep, *codec.encode(f"{path or 'current'}\n")]
    left = budget - len(own)
    if left <= 1:
        return []  # no room for any other file: no repository layout at all
    files: list[list[int]] = []
    for other, text in reversed(context):
        ids = [sep, *codec.encode(f"{other}\n{text}\n")]
        if left <= 1:
            break
        files.append(ids[:left])
        left -= len(files[-1])
    return [i for ids in reversed(files) for i in ids] + own


def build_prompt(
    codec: Codec,
    prefix: str,
    suffix: str = "",
    budget: PromptBudget | None = None,
    fim: bool = True,
    heal: bool = True,
    context: tuple[tuple[str, str], ...] = (),
    path: str | None = None,
    room: int | None = None,
) -> Prompt:
    """The prompt's ids; `room` caps their number: repository context only takes what the document's
    own windows leave (the KV cache must still hold the completion)."""
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
    own = [pre, *prefix_ids, suf, *suffix_window(codec, suffix, budget), mid]
    context_budget = budget.context_tokens if room is None else min(budget.context_tokens, room - len(own))
    return Prompt([*context_ids(codec, context, path, context_budget), *own], healed, start, True)
