"""The engine's public API: load a model once, then `complete(prefix, suffix)` many times.

Everything per document (KV prefix, lookahead n-gram pool, last completion) lives here, so
the language server only sends text and cursor context. Requests are cancellable between
decoding steps through the `cancelled` callback.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .decoding import Cancelled, DecodeState, OnStep, decode_ar, heal
from .errors import AheadError
from .loading import Log, build_model, load_checkpoint, resolve_device, resolve_dtype, stderr_log
from .lookahead import LookaheadConfig, NGramPool, decode_lookahead, step_shape
from .prompt import PromptBudget, build_prompt
from .runner import Runner
from .sessions import SessionStore, common_prefix
from .tokens import Codec
from .tuning_store import lookup_tuned

BUILTIN_LOOKAHEAD = {"cuda": LookaheadConfig(8, 4, 8), "cpu": LookaheadConfig(4, 3, 4)}
ANONYMOUS = "<anonymous>"


@dataclass
class Completion:
    text: str
    tokens: list[int]
    steps: int
    accepted_per_step: list[int]
    prefill_tokens: int  # prompt tokens whose K/V this request computed
    reused_tokens: int  # prompt tokens whose K/V came from the document's session
    prompt_tokens: int
    time_ms: float
    prefill_ms: float
    ttft_ms: float  # request start to the first committed token
    step_ms: list[float]
    stop_reason: str
    decoding: str
    lookahead: str | None
    pool_hits: int
    type_through: bool = False

    @property
    def tokens_per_step(self) -> float:
        return len(self.tokens) / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tokens_per_step"] = self.tokens_per_step
        return out


@dataclass
class EngineOptions:
    model: str | None = None  # spec: None (embedded default), .gguf, directory, or HF id
    device: str | None = None  # "cpu", "cuda", or None for the best available
    dtype: str | None = None  # "fp32", "bf16", or None: bf16 on CUDA, fp32 on CPU
    max_seq_len: int = 4096  # KV cache slots: prompt + completion + one lookahead step
    use_graphs: bool = True
    kv_budget_mb: int = 1024  # parked KV of inactive documents
    budget: PromptBudget = field(default_factory=PromptBudget)


class Engine:
    def __init__(self, options: EngineOptions | None = None, log: Log = stderr_log, checkpoint=None):
        self.options = options = options or EngineOptions()
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        if options.max_seq_len % 256:
            raise AheadError("--max-seq-len must be a multiple of 256")
        started = time.perf_counter()
        self.checkpoint = checkpoint or load_checkpoint(options.model, log)
        self.model = build_model(self.checkpoint, self.device, self.dtype, options.max_seq_len)
        self.runner = Runner(self.model, use_graphs=options.use_graphs)
        eos = self.checkpoint.config.eos_token_id
        self.codec = Codec(self.checkpoint.tokenizer, eos if isinstance(eos, list) else [eos])
        self.sessions = SessionStore(self.runner, options.kv_budget_mb << 20)
        self.load_seconds = time.perf_counter() - started
        self.model_name = self.checkpoint.source
        log(f"ahead: {self.describe()} ready in {self.load_seconds:.1f} s")

    def describe(self) -> str:
        a = self.model.args
        return f"{a.arch} {a.n_layers}L/{a.dim}d on {self.device_name()} ({str(self.dtype).removeprefix('torch.')})"

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def default_lookahead(self) -> LookaheadConfig:
        tuned = lookup_tuned(self)
        return tuned or BUILTIN_LOOKAHEAD["cuda" if self.device.type == "cuda" else "cpu"]

    # -- requests -------------------------------------------------------------------------------
    def complete(
        self,
        prefix: str,
        suffix: str = "",
        *,
        document: str | None = None,
        max_tokens: int = 128,
        decoding: str = "lookahead",
        lookahead: LookaheadConfig | None = None,
        heal_tokens: bool = True,
        fim: bool = True,
        reuse_kv: bool = True,
        persistent_pool: bool = True,
        type_through: bool = True,
        on_step: OnStep | None = None,
        cancelled: Cancelled | None = None,
    ) -> Completion:
        if decoding not in ("ar", "lookahead"):
            raise AheadError(f"unknown decoding '{decoding}' (use ar or lookahead)")
        if max_tokens < 0:
            raise AheadError("max tokens must be >= 0")
        started = time.perf_counter()
        session = self.sessions.activate(document or ANONYMOUS)
        cfg = (lookahead or self.default_lookahead()) if decoding == "lookahead" else None

        if type_through and session.last is not None:
            hit = self._type_through(session.last, prefix, suffix, started, decoding, cfg)
            if hit is not None:
                return hit

        prompt = build_prompt(self.codec, prefix, suffix, self.options.budget, fim=fim, heal=heal_tokens)
        ids = list(prompt.ids)
        if not ids:
            bos = self.checkpoint.config.bos_token_id
            if bos is None:
                raise AheadError("nothing to complete: the prompt is empty and the model has no BOS token")
            ids = [bos]
        headroom = (step_shape(cfg).size if cfg else 1) + max_tokens + 1
        if len(ids) + headroom > self.runner.capacity:
            raise AheadError(
                f"prompt ({len(ids)} tokens) + {max_tokens} new tokens do not fit the KV cache "
                f"({self.runner.capacity} slots); raise --max-seq-len or lower the prompt budget"
            )

        reused = common_prefix(session.tokens, ids[:-1]) if reuse_kv else 0
        session.tokens = session.tokens[:reused]
        self.runner.prefill(ids[reused:-1], reused)
        session.tokens = ids[:-1]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prefill_ms = (time.perf_counter() - started) * 1e3

        state = DecodeState(list(ids), max_tokens, self.codec.stop_ids, on_step=on_step, cancelled=cancelled)
        heal(self.runner, self.codec, state, prompt.healed)
        if cfg is not None:
            pool = self._pool(session, ids, cfg, persistent_pool)
            decode_lookahead(self.runner, state, cfg, pool)
        else:
            decode_ar(self.runner, state)
        session.tokens = state.seq[:-1]

        out = self.codec.to_bytes(state.new)
        text = out[len(prompt.healed) :].decode("utf-8", errors="ignore") if out.startswith(prompt.healed) else ""
        elapsed = (time.perf_counter() - started) * 1e3
        completion = Completion(
            text=text,
            tokens=list(state.new),
            steps=state.steps,
            accepted_per_step=state.accepted,
            prefill_tokens=len(ids) - 1 - reused,
            reused_tokens=reused,
            prompt_tokens=len(ids),
            time_ms=elapsed,
            prefill_ms=prefill_ms,
            ttft_ms=prefill_ms + (state.step_ms[0] if state.step_ms else 0.0),
            step_ms=state.step_ms,
            stop_reason=state.stop_reason or "length",
            decoding=decoding,
            lookahead=str(cfg) if cfg else None,
            pool_hits=state.pool_hits,
        )
        session.last = (prefix, suffix, text) if completion.stop_reason != "cancelled" else None
        return completion

    def _pool(self, session, ids: list[int], cfg: LookaheadConfig, persistent: bool) -> NGramPool:
        """The document's n-gram pool, seeded with the n-grams of the prompt it has not seen yet."""
        if not persistent or session.pool is None or session.pool.n != cfg.ngram:
            pool = NGramPool(cfg.ngram)
            pool.add_text(ids)
            if persistent:
                session.pool, session.seeded = pool, list(ids)
            return pool
        same = common_prefix(session.seeded, ids)
        session.pool.add_text(ids[max(0, same - cfg.ngram + 1) :])
        session.seeded = list(ids)
        return session.pool

    def _type_through(self, last, prefix, suffix, started, decoding, cfg) -> Completion | None:
        """The user typed the start of the last suggestion: serve the rest without a forward pass."""
        old_prefix, old_suffix, text = last
        if suffix != old_suffix or not prefix.startswith(old_prefix):
            return None
        typed = prefix[len(old_prefix) :]
        if not typed or not text.startswith(typed) or len(typed) >= len(text):
            return None
        rest = text[len(typed) :]
        elapsed = (time.perf_counter() - started) * 1e3
        return Completion(
            text=rest, tokens=[], steps=0, accepted_per_step=[], prefill_tokens=0, reused_tokens=0,
            prompt_tokens=0, time_ms=elapsed, prefill_ms=0.0, ttft_ms=elapsed, step_ms=[], stop_reason="type-through",
            decoding=decoding, lookahead=str(cfg) if cfg else None, pool_hits=0, type_through=True,
        )

    def close_document(self, document: str) -> None:
        self.sessions.drop(document)
