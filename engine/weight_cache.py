"""Converted GGUF weights kept on disk, so that only the first start pays for dequantizing.

Dequantizing a 1.5B Q4_K_M GGUF took 46 s of a 54 s start (H200 host); memory-mapping the converted
tensors takes well under a second. A cache file holds the HF-named tensors already in the target dtype,
keyed by the GGUF's identity (size and sha256 of its head and tail: copies of a file hit, a re-download
of a different file misses), a format version and the dtype. It is written atomically (temp file +
rename) and rebuilt whenever safetensors cannot read it; failing to write it only costs time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .atomic import replace_atomically
from .default_model import cache_dir

# Bump when the conversion changes (names, Q/K un-permutation, ...): old files then simply miss.
FORMAT_VERSION = 1
HASHED_BYTES = 4 << 20  # read from each end of the source: enough to tell files apart, cheap for 10 GB ones
REQUIRED = "model.embed_tokens.weight"  # every supported checkpoint has it


def source_identity(path: Path) -> str:
    """Size and a hash of the file's head and tail; not its mtime, so copies of one file share a cache."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(HASHED_BYTES))
        f.seek(max(0, size - HASHED_BYTES))
        digest.update(f.read(HASHED_BYTES))
    return f"{size}-{digest.hexdigest()[:16]}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cache_path(source: Path, dtype: torch.dtype) -> Path:
    name = f"{source.stem}-{source_identity(source)}-v{FORMAT_VERSION}-{dtype_name(dtype)}.safetensors"
    return cache_dir() / "weights" / name


def read(path: Path, dtype: torch.dtype, log: Callable[[str], None]) -> dict[str, Tensor] | None:
    """The cached tensors (memory-mapped), or None when absent or unusable, in which case the caller
    converts again and the rewrite replaces the bad file."""
    if not path.is_file():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
    except Exception as exc:  # truncated or garbled: safetensors checks the header against the size
        log(f"ahead: cached weights {path} are unreadable ({str(exc).splitlines()[0]}); rebuilding them")
        return None
    if meta.get("format") != f"ahead-weights-v{FORMAT_VERSION}" or REQUIRED not in state:
        log(f"ahead: cached weights {path} are incomplete or stale; rebuilding them")
        return None
    if any(t.dtype != dtype for t in state.values()):
        log(f"ahead: cached weights {path} are not all {dtype_name(dtype)}; rebuilding them")
        return None
    return state


def write(path: Path, state: dict[str, Tensor], source: Path, log: Callable[[str], None]) -> bool:
    """Store `state` at `path` atomically. A read-only or full disk logs one line and returns False."""
    from safetensors.torch import save_file

    meta = {"format": f"ahead-weights-v{FORMAT_VERSION}", "source": source.name}
    try:
        replace_atomically(path, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, tmp,
                                                       metadata=meta))
        return True
    except Exception as exc:  # OSError (read-only, ENOSPC) or safetensors' own error for a short write
        log(f"ahead: could not cache converted weights at {path} ({str(exc).splitlines()[0]}); "
            "the next start converts again")
        return False
