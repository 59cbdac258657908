"""ahead's resident completion engine: model loading, a static-KV forward, greedy and lookahead decoding.

The names below load on first use (PEP 562), so that `ahead --help` and other torch-free
paths (engine.cli, engine.flags) do not pay seconds for torch.
"""

from importlib import import_module

__version__ = "0.1.0"  # for a checkout run without installing; installed, `ahead --version` reads the metadata
__all__ = ["AheadError", "Completion", "Engine", "EngineOptions", "LookaheadConfig"]
_HOME = {"AheadError": "errors", "Completion": "engine", "Engine": "engine", "EngineOptions": "engine",
         "LookaheadConfig": "lookahead"}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'engine' has no attribute '{name}'")
    return getattr(import_module(f".{_HOME[name]}", __name__), name)
