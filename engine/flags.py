"""The engine flags every command shares, the one place an Engine is built from them, and the checks
that turn bad values into one-line errors before a model is loaded.

Kept free of torch and transformers: `ahead --help` only parses flags, and a mistyped flag
should cost milliseconds, not a model load.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from .errors import AheadError

if TYPE_CHECKING:
    from .engine import Engine, EngineOptions
    from .loading import Checkpoint
    from .lookahead import LookaheadConfig
    from .prompt import PromptBudget

MAX_SEQ_LEN = 4096  # KV cache slots by default: a 3k-token prompt window plus a completion
KV_BLOCK = 256  # the engine sizes its cache in multiples of this
FIM_TOKENS = 3  # <|fim_prefix|>, <|fim_suffix|> and <|fim_middle|> around the two windows
LOOKAHEAD_HELP = "W,N,G: window, n-gram size, candidates verified per step (default: tuned for this model and GPU)"


class Parser(argparse.ArgumentParser):
    """Bad flags end like every other user error: one line `ahead: error: ...`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ahead: error: {message} (see `{self.prog} --help`)\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def cache_slots(text: str) -> int:
    value = int_at_least(KV_BLOCK)(text)
    if value % KV_BLOCK:
        raise argparse.ArgumentTypeError(f"must be a multiple of {KV_BLOCK}, got {value}")
    return value


def add_engine_flags(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Which engine to build. With `suppress`, flags left out leave the namespace alone, so that
    `ahead bench --model X keystrokes` keeps the X given before the sub-subcommand."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=default(None),
                       help="a .gguf file, a model directory or a Hugging Face id (default: a Qwen2.5-Coder base sized "
                       "for the GPU when one is in the HF cache or can be downloaded, else the embedded SmolLM2)")
    group.add_argument("--device", choices=("cpu", "cuda"), default=default(None),
                       help="default: cuda when available")
    group.add_argument("--dtype", choices=("fp32", "bf16"), default=default(None),
                       help="default: bf16 on cuda, fp32 on cpu")
    group.add_argument("--max-seq-len", type=cache_slots, default=default(MAX_SEQ_LEN),
                       help=f"KV cache slots, a multiple of {KV_BLOCK} (default {MAX_SEQ_LEN})")
    group.add_argument("--prefix-tokens", type=int_at_least(0), default=default(None),
                       help="prompt budget before the cursor (default 3072 on a GPU, 768 on CPU)")
    group.add_argument("--suffix-tokens", type=int_at_least(0), default=default(None),
                       help="prompt budget after the cursor (default 256 on a GPU, 96 on CPU)")
    group.add_argument("--threads", type=int_at_least(1), default=default(None),
                       help="CPU threads (default: OMP_NUM_THREADS, else physical cores - 1, at most 8)")
    group.add_argument("--tp", type=int_at_least(1), default=default(1), metavar="N",
                       help="tensor parallelism: split the model over N GPUs, one process each (NCCL); with "
                       "--device cpu, N processes (gloo). The KV heads must divide by N (default 1)")
    group.add_argument("--recycling-prior", choices=("auto", "on", "off"), default=default("auto"),
                       help="start Token Recycling's table from the model's own next-token guesses for every token, "
                       "computed once and kept on disk (auto: on a GPU, without --tp)")


def prompt_budget(args: argparse.Namespace) -> PromptBudget:
    """The device's default budget (smaller on CPU), with the flags' overrides."""
    from dataclasses import replace

    from .loading import resolve_device
    from .sizing import default_budget

    budget = default_budget(resolve_device(args.device))
    if args.prefix_tokens is not None:
        budget = replace(budget, prefix_tokens=args.prefix_tokens)
    if args.suffix_tokens is not None:
        budget = replace(budget, suffix_tokens=args.suffix_tokens)
    return budget


def engine_options(args: argparse.Namespace) -> EngineOptions:
    from .engine import EngineOptions

    return EngineOptions(model=args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                         budget=prompt_budget(args), threads=getattr(args, "threads", None), tp=getattr(args, "tp", 1),
                         recycling_prior={"on": True, "off": False}.get(getattr(args, "recycling_prior", "auto")))


def engine_from_args(args: argparse.Namespace, checkpoint: Checkpoint | None = None) -> Engine:
    """The engine the flags describe (`checkpoint`: weights already in hand, e.g. random ones of a shape)."""
    from .engine import Engine

    return Engine(engine_options(args), checkpoint=checkpoint)


def parse_lookahead(text: str, flag: str = "--lookahead") -> LookaheadConfig:
    from .lookahead import LookaheadConfig

    try:
        return LookaheadConfig.parse(text)
    except (ValueError, TypeError):
        raise AheadError(f"{flag} takes W,N,G: three integers with W >= 1, N >= 1, G >= 0, "
                         f"e.g. 8,4,8 (got '{text}')") from None


def step_tokens(decoding: str, cfg: LookaheadConfig | None) -> int:
    """Cache slots one decoding step takes beyond the committed tokens; the biggest built-in step
    when the config is only known once the engine has loaded (tuned or built-in). "lookahead"
    without W,N,G runs tree decoding where that is the device's default."""
    from .engine import BUILTIN_LOOKAHEAD, BUILTIN_TREE

    tree = max(c.budget for c in BUILTIN_TREE.values())
    if decoding == "tree":
        return tree
    if decoding != "lookahead":
        return 1
    if cfg is not None:
        return cfg.step_tokens
    return max(tree, *(c.step_tokens for c in BUILTIN_LOOKAHEAD.values()))


def check_fits(args: argparse.Namespace, max_tokens: int, step: int) -> None:
    """A full prompt window, `max_tokens` new tokens and a decoding step must fit the KV cache: said
    now, not after the model has loaded (the engine checks each real prompt again)."""
    budget = prompt_budget(args)
    prompt = budget.prefix_tokens + budget.suffix_tokens + FIM_TOKENS
    need = prompt + max_tokens + step + 1
    if need > args.max_seq_len:
        raise AheadError(
            f"--max-tokens {max_tokens} does not fit --max-seq-len {args.max_seq_len}: a full prompt ({prompt} tokens) "
            f"+ {max_tokens} new + a {step}-token step need {need} KV slots; raise --max-seq-len or lower --max-tokens "
            f"or --prefix-tokens"
        )


def version() -> str:
    """The installed distribution's version; the package's own when run from a checkout."""
    from importlib import metadata

    try:
        return metadata.version("ahead")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__
