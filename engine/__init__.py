"""ahead's resident completion engine: model loading, a static-KV forward, greedy and lookahead decoding."""

from .engine import Completion, Engine, EngineOptions
from .errors import AheadError
from .lookahead import LookaheadConfig

__all__ = ["AheadError", "Completion", "Engine", "EngineOptions", "LookaheadConfig"]
