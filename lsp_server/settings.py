"""The language server's settings: one typed object, merged in one place.

Order: defaults < initializationOptions < workspace/didChangeConfiguration (section "ahead").
Editors spell keys their own way (VS Code camelCase, Neovim whatever the user typed), so
`maxTokens` and `max_tokens` both work. A key that is unknown or has the wrong type is
reported back (one warning per key) and its value stays what it was: a typo in a settings
file must not stop completions.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from engine.listen import default_socket

LOOKAHEAD = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")
HOST_PORT = re.compile(r"^\[?([^\]]+)\]?:(\d{1,5})$")


def check_lookahead(value: str) -> str | None:
    """`auto` or W,N,G with W >= 1, N >= 1, G >= 0 (engine/lookahead.py's rule, without importing torch)."""
    if value == "auto":
        return None
    found = LOOKAHEAD.match(value)
    if found is None or int(found[1]) < 1 or int(found[2]) < 1:
        return "expected 'auto' or W,N,G (three integers, W >= 1, N >= 1, G >= 0), e.g. 8,4,8"
    return None


def check_host_port(value: str) -> str | None:
    found = HOST_PORT.match(value)
    return None if found and int(found[2]) <= 65535 else "expected HOST:PORT"


@dataclass(frozen=True)
class StopSettings:
    """The engine's stop rules (engine/stops.py): where ghost text ends."""

    block_end: bool = True
    suffix_overlap: bool = True
    line_end: bool = True


@dataclass(frozen=True)
class EngineSettings:
    """Where the engine listens. A Unix socket's engine is started here when none answers;
    a TCP one (another machine) never is."""

    socket: Path = field(default_factory=default_socket)
    tcp: str | None = field(default=None, metadata={"check": check_host_port})
    token_file: Path | None = None  # the TCP engine's token; default: engine.listen.default_token_file()


@dataclass(frozen=True)
class RemoteSettings:
    """An OpenAI-compatible completions server used instead of the engine when `url` is set."""

    url: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never logged
    model: str | None = None
    timeout_s: int = field(default=30, metadata={"minimum": 1})  # a request that takes longer is an error
    qwen_layout: bool = True  # the remote model is Qwen2.5-Coder: send its FIM prompt (and repo context) as text


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # None: the engine's own choice (a Qwen2.5-Coder that fits the GPU, else SmolLM2)
    device: str | None = field(default=None, metadata={"choices": (None, "cpu", "cuda")})
    dtype: str | None = field(default=None, metadata={"choices": (None, "fp32", "bf16")})
    decoding: str = field(default="lookahead", metadata={"choices": ("lookahead", "ar")})
    lookahead: str = field(default="auto", metadata={"check": check_lookahead})  # auto: the engine's tuned W,N,G
    max_tokens: int = field(default=128, metadata={"minimum": 1})
    max_lines: int = field(default=0, metadata={"minimum": 0})  # 0: no cap
    # 30 ms folds the bursts one user action sends (an auto-closed pair, the edits of an accepted completion,
    # a paste, key repeat) into one request, and is small next to the ~80-120 ms between a fast typist's keys
    # and the engine's ~57 ms p50 answer on a GPU (README); a request that starts and is then superseded
    # costs the engine about one decoding step (cancel ~3 ms), so waiting longer buys little. Only requests
    # that follow the document's previous one within this time wait; type-through answers never do.
    debounce_ms: int = field(default=30, metadata={"minimum": 0})
    stop: StopSettings = field(default_factory=StopSettings)
    prefetch: bool = True  # compute the completion after an accept while the suggestion is shown (prefetch.py)
    repo_context: bool = True  # other files of the workspace in the prompt (context.py): +0.03 edit similarity, H200
    context_tokens: int = field(default=1024, metadata={"minimum": 0})
    engine: EngineSettings = field(default_factory=EngineSettings)
    remote: RemoteSettings = field(default_factory=RemoteSettings)

    @property
    def launch(self) -> tuple[str | None, str | None, str | None]:
        """What the engine process is started with: a change restarts it."""
        return self.model, self.device, self.dtype


def snake(key: str) -> str:
    """maxTokens -> max_tokens (snake_case passes unchanged)."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", str: "a string", Path: "a path (string)"}
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return names.get(options[0], "an object")


def convert(hint: Any, value: Any) -> tuple[Any, bool]:
    """`value` as the field's type, and whether it had that type."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = options[0]
    if kind is bool:
        return value, isinstance(value, bool)
    if kind is int:
        return value, isinstance(value, int) and not isinstance(value, bool)
    if kind is str:
        return value, isinstance(value, str)
    if kind is Path:
        return (Path(value).expanduser() if isinstance(value, str) and value else value), isinstance(value, str)
    return value, False


def merge(base: Any, raw: Any, where: str = "ahead") -> tuple[Any, list[str]]:
    """`base` (a settings dataclass) with the valid keys of `raw` applied, and a warning per invalid key.

    A JSON null resets a key to its default."""
    if raw is None:
        return base, []
    if not isinstance(raw, dict):
        return base, [f"{where}: expected an object of settings, got {type(raw).__name__}; ignored"]
    hints = typing.get_type_hints(type(base))
    known = {f.name: f for f in fields(base)}
    changes: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in raw.items():
        name = snake(str(key))
        spot = f"{where}.{key}"
        if name not in known:
            warnings.append(f"{spot}: unknown setting; ignored")
            continue
        spec = known[name]
        current = getattr(base, name)
        if is_dataclass(current):
            changes[name], more = merge(type(current)(), {}) if value is None else merge(current, value, spot)
            warnings += more
            continue
        if value is None:
            changes[name] = spec.default_factory() if callable(spec.default_factory) else spec.default
            continue
        converted, ok = convert(hints[name], value)
        problem = None if ok else f"expected {type_name(hints[name])}"
        if ok and "choices" in spec.metadata and converted not in spec.metadata["choices"]:
            problem = "expected one of " + ", ".join(repr(c) for c in spec.metadata["choices"] if c is not None)
        if ok and "minimum" in spec.metadata and converted < spec.metadata["minimum"]:
            problem = f"expected an integer >= {spec.metadata['minimum']}"
        if ok and problem is None and "check" in spec.metadata:
            problem = spec.metadata["check"](converted)
        if problem:
            shown = str(current) if isinstance(current, Path) else repr(current)
            warnings.append(f"{spot}: {problem}, got {value!r}; keeping {shown}")
            continue
        changes[name] = converted
    return replace(base, **changes), warnings


def section(raw: Any) -> Any:
    """The "ahead" section of a settings object when it has one, else the object itself."""
    if isinstance(raw, dict) and isinstance(raw.get("ahead"), dict):
        return raw["ahead"]
    return raw


def resolve(initialization_options: Any, configuration: Any) -> tuple[Settings, list[str]]:
    """The one place settings are merged: defaults < initializationOptions < didChangeConfiguration."""
    settings, warnings = merge(Settings(), section(initialization_options), "initializationOptions")
    settings, more = merge(settings, section(configuration), "ahead")
    return settings, warnings + more


def summary(settings: Settings) -> dict:
    """What `ahead/status` shows: the settings that shape completions (no secrets)."""
    return {
        "model": settings.model, "device": settings.device, "dtype": settings.dtype, "decoding": settings.decoding,
        "lookahead": settings.lookahead, "max_tokens": settings.max_tokens, "max_lines": settings.max_lines,
        "debounce_ms": settings.debounce_ms, "prefetch": settings.prefetch, "repo_context": settings.repo_context,
        "backend": "remote" if settings.remote.url else "engine",
    }
