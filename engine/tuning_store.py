"""Where `ahead tune` keeps the best lookahead (W,N,G) per model and GPU, for the engine to pick up."""

from __future__ import annotations

import json
from pathlib import Path

from .default_model import cache_dir
from .lookahead import LookaheadConfig


def store_path() -> Path:
    return cache_dir() / "tuned.json"


def tuning_key(engine) -> str:
    a = engine.model.args
    name = Path(engine.model_name).name
    return f"{name}|{a.arch}-{a.n_layers}x{a.dim}|{engine.device_name()}|{str(engine.dtype).removeprefix('torch.')}"


def load_store() -> dict:
    try:
        return json.loads(store_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def lookup_tuned(engine) -> LookaheadConfig | None:
    entry = load_store().get(tuning_key(engine))
    if not entry:
        return None
    try:
        return LookaheadConfig.parse(entry["config"])
    except (KeyError, ValueError):
        return None


def store_tuned(engine, cfg: LookaheadConfig, summary: dict) -> Path:
    data = load_store()
    data[tuning_key(engine)] = {"config": str(cfg), **summary}
    path = store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path
