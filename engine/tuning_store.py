"""Where `ahead tune` keeps the best lookahead (W,N,G), and the best tree config, per model and GPU,
for the engine to pick up."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import replace_atomically
from .default_model import cache_dir
from .errors import AheadError
from .lookahead import LookaheadConfig


def store_path() -> Path:
    return cache_dir() / "tuned.json"


def tuning_key(engine) -> str:
    a = engine.model.args
    name = Path(engine.model_name).name
    return f"{name}|{a.arch}-{a.n_layers}x{a.dim}|{engine.device_name()}|{str(engine.dtype).removeprefix('torch.')}"


def load_store() -> dict:
    try:
        data = json.loads(store_path().read_text())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return {}
    return data if isinstance(data, dict) else {}


def lookup_tuned(engine, kind: str = "lookahead"):
    """The stored LookaheadConfig (kind "lookahead") or TreeConfig (kind "tree"), or None."""
    from .tree_decoding import TreeConfig

    key = tuning_key(engine) + ("" if kind == "lookahead" else f"|{kind}")
    entry = load_store().get(key)
    if not entry:
        return None
    try:
        return {c.kind: c for c in (LookaheadConfig, TreeConfig)}[kind].parse(entry["config"])
    except (KeyError, ValueError):
        return None


def store_tuned(engine, cfg, summary: dict, kind: str = "lookahead") -> Path:
    data = load_store()
    data[tuning_key(engine) + ("" if kind == "lookahead" else f"|{kind}")] = {"config": str(cfg), **summary}
    path = store_path()
    write_atomically(path, json.dumps(data, indent=2))
    return path


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` whole or not at all: a full disk must not truncate the configs tuned
    before (a plain write_text empties the file first). The failure is one line the user can act on."""
    try:
        replace_atomically(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as exc:
        raise AheadError(f"could not store the tuned config in {path} ({exc.strerror or exc}); "
                         "the engine keeps its previous choice") from None
