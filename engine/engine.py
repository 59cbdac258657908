"""The engine's public API: load a model once, then `complete(CompletionRequest)` many times.

Per-document state (KV prefix, lookahead n-gram pool, last suggestion) lives in its session,
so callers only send text and cursor context. A request ends where its stop rules say, is
cancellable before prefill, between prefill chunks and between decoding steps, and streams
the text no rule can take back any more. The engine has one KV cache and must be driven from
one thread (`worker.EngineWorker`); a second thread gets `EngineBusy`, never mixed-up output.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from . import recycling_prior
from .collector import collections_held
from .decoding import DecodeState, decode_ar
from .device_tree import decode_device_tree
from .errors import AheadError, BadRequest, Cancelled, DoesNotFit, EngineBusy, OutOfMemory
from .healing import Healing, heal
from .loading import Log, build_model, load_checkpoint, release_weights, resolve_device, resolve_dtype, stderr_log
from .lookahead import LookaheadConfig, decode_lookahead
from .model import WHOLE
from .parallel import TensorParallel
from .prompt import PromptBudget, build_prompt, suffix_window
from .request import ALL_ON, CompletionRequest, Switches
from .runner import Runner
from .sessions import SessionStore
from .sizing import configure_threads, default_budget
from .stops import Cut, Stopper, finish
from .tokens import Codec
from .tree_decoding import DEVICE_SOURCES, TreeConfig, compile_host_loop, decode_tree, first_step
from .tuning_store import lookup_tuned

OnText = Callable[[str], None]  # the completion's text so far that no stop rule can take back
Poll = Callable[[], bool]  # True once the request is cancelled

BUILTIN_LOOKAHEAD = {"cuda": LookaheadConfig(8, 4, 8), "cpu": LookaheadConfig(4, 3, 4)}
# cuda: 64 rows with drafts up to 24 tokens. Since a tree step's projections run in Triton (issue 12's ninth
# round) a 64-row step costs what a 48-row one does (1.85 against 1.82 ms of GPU time, H200), and on two
# H200s over the 40 dev cases it ran 1,311 and 1,324 tok/s against 1,184-1,274 for 48 rows (4.07 tokens/step).
# CUDA drafts on the device (`engine/device_tree.py`): the 1.5B on an H200 over the 40 dev cases, 2.41-2.49x AR end
# to end (1.98-2.09x with stop rules) against 2.25x (1.90x) for the same tree drafted by the host.
BUILTIN_TREE = {"cuda": TreeConfig(64, 0, 2, 24, DEVICE_SOURCES, on_device=True), "cpu": TreeConfig(16, 0, 2)}
# What "lookahead" without an explicit W,N,G runs: tree decoding, where it measured better than v1. CPU,
# SmolLM2-135M: more tokens per step and less time per token. CUDA, the 1.5B on an H200 over the 40 dev
# cases: 2.10x AR end to end against v1's 1.81x (1.69x against 1.56x with stop rules).
TREE_BY_DEFAULT = {"cpu": True, "cuda": True}
ANONYMOUS = "<anonymous>"
WARMUP_DOCUMENT = "<warm-up>"  # the start-up completion's document, closed when it is done
WARMUP_TEXT = "def add(a, b):\n    return a +"  # ends mid-token: healing runs too


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
    stop_reason: str  # "stop" (the model's stop token), "length", a stop rule, or "type-through"
    decoding: str
    lookahead: str | None
    pool_hits: int
    type_through: bool = False
    by_source: dict[str, int] = field(default_factory=dict)  # tree: drafted tokens accepted, per source

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
    budget: PromptBudget | None = None  # None: sized for the device (sizing.default_budget)
    threads: int | None = None  # CPU threads; None: OMP_NUM_THREADS, else physical cores - 1 (at most 8)
    tp: int = 1  # tensor parallelism: processes (one per GPU) the model is split over (engine/parallel.py)
    # Seed Token Recycling's table from the model (engine/recycling_prior.py); None: on a GPU without tensor
    # parallelism (a CPU takes minutes for it the first time).
    recycling_prior: bool | None = None


class Engine:
    def __init__(self, options: EngineOptions | None = None, log: Log = stderr_log, checkpoint=None):
        options = options or EngineOptions()
        self.log = log
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        if options.max_seq_len % 256:
            raise AheadError("--max-seq-len must be a multiple of 256")
        configure_threads(self.device, options.threads)
        if options.budget is None:
            options = replace(options, budget=default_budget(self.device))
        self.options = options
        started = time.perf_counter()
        self.checkpoint = checkpoint or load_checkpoint(options.model, log, dtype=self.dtype, device=self.device)
        self.tp = None if options.tp == 1 else TensorParallel.for_checkpoint(
            options.tp, self.checkpoint, self.device, self.dtype, options.max_seq_len, options.use_graphs, log)
        shard = self.tp.shard if self.tp else WHOLE
        self.model = build_model(self.checkpoint, self.device, self.dtype, options.max_seq_len, shard)
        if checkpoint is None:  # a caller's own checkpoint (tests, random weights) keeps its weights
            release_weights(self.checkpoint)
        self.runner = self.tp.connect(self.model) if self.tp else Runner(self.model, use_graphs=options.use_graphs)
        eos = self.checkpoint.config.eos_token_id
        self.codec = Codec(self.checkpoint.tokenizer, eos if isinstance(eos, list) else [eos])
        self.sessions = SessionStore(self.runner, options.kv_budget_mb << 20)
        seed = options.recycling_prior
        if seed or (seed is None and self.device.type == "cuda" and self.tp is None):
            try:
                self.sessions.recycling_seed = recycling_prior.load_or_compute(self.runner,
                                                                               self.model.args.vocab_size, log)
                self.sessions.forget_learned()
            except (RuntimeError, ValueError) as exc:  # out of memory among them: the table only speeds drafting
                log(f"ahead: could not seed Token Recycling's table ({str(exc).splitlines()[0]}); it starts empty")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        self._lookahead: LookaheadConfig | None = None
        self._tree: TreeConfig | None = None
        self._owner = threading.Lock()
        self.load_seconds = time.perf_counter() - started
        self.model_name = self.checkpoint.source
        log(f"ahead: {self.describe()} ready in {self.load_seconds:.1f} s")

    def warmup(self) -> int:
        """Capture every CUDA graph requests will use before serving (decode, the default lookahead
        step, prefill chunks at every cache length), then pay what else a first request would: the
        tokenizer's byte tables (healing, stop rules; ~0.6 s each for Qwen's vocabulary), the vocabulary
        fingerprint that clients are greeted with, kernels loaded on their first call, the tree loop's compiled
        parts (`compile_host_loop`). One short completion does the rest; its document and whatever the
        drafters learned from it are dropped.
        With graphs alone, the first completion on an H200 took ~1 s instead of ~60 ms."""
        from .warmup import warm_up

        shapes = [self.default_lookahead().shape()]
        tree = self.default_tree() if TREE_BY_DEFAULT[self.device.type] else None
        if tree is not None and not tree.on_device:
            shapes.append(tree.shape())
        captured = warm_up(self.runner, shapes, self.log)
        if tree is not None and tree.on_device and self.runner.use_graphs:  # its own graphs, not a shape's
            started = time.perf_counter()
            drafted = self.sessions.device_tree(tree).capture(self.runner.visible_ends(tree.budget))
            self.log(f"ahead: captured {drafted} CUDA graphs of the device-drafted tree {tree} "
                     f"in {time.perf_counter() - started:.1f} s")
            captured += drafted
        started = time.perf_counter()
        compile_host_loop()
        if (took := time.perf_counter() - started) > 1.0:  # a first start compiled it; later ones load numba's cache
            self.log(f"ahead: compiled the tree loop's host parts in {took:.1f} s (cached for later starts)")
        _ = self.codec.fingerprint  # a cached property: computed here, once
        self.complete(CompletionRequest(WARMUP_TEXT, max_tokens=4, document=WARMUP_DOCUMENT))
        self.close_document(WARMUP_DOCUMENT)
        self.sessions.forget_learned()
        self.sessions.invalidate_working_cache()
        return captured

    def describe(self) -> str:
        a = self.model.args
        where = self.device_name() + (f" x{self.tp.world} (tensor parallel)" if self.tp else "")
        return f"{a.arch} {a.n_layers}L/{a.dim}d on {where} ({str(self.dtype).removeprefix('torch.')})"

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def default_lookahead(self) -> LookaheadConfig:
        """The tuned (W,N,G) for this model and device, else the built-in one; read from disk once."""
        if self._lookahead is None:
            tuned = lookup_tuned(self)
            self._lookahead = tuned or BUILTIN_LOOKAHEAD["cuda" if self.device.type == "cuda" else "cpu"]
        return self._lookahead

    def default_decoding(self) -> str:
        """What a request for plain lookahead (no W,N,G) runs here, with its config: for status lines."""
        if TREE_BY_DEFAULT[self.device.type]:
            return f"tree {self.default_tree()}"
        return f"lookahead {self.default_lookahead()}"

    def default_tree(self) -> TreeConfig:
        """The tuned tree budget and sources for this model and device, else the built-in ones."""
        if self._tree is None:
            tuned = lookup_tuned(self, "tree")
            self._tree = tuned or BUILTIN_TREE["cuda" if self.device.type == "cuda" else "cpu"]
            if self._tree.on_device and self.tp is not None:  # the followers replay the runner's steps, not these
                self._tree = TreeConfig(self._tree.budget, self._tree.window, self._tree.levels, self._tree.depth)
        return self._tree

    # -- requests -------------------------------------------------------------------------------
    def complete(
        self,
        request: CompletionRequest,
        *,
        switches: Switches = ALL_ON,
        on_text: OnText | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Complete at the cursor between `request.prefix` and `request.suffix`.

        Raises BadRequest, DoesNotFit, or Cancelled (with the text committed so far) once `cancel`
        is set; EngineBusy if another thread is inside the engine.
        """
        request.validate()
        if not self._owner.acquire(blocking=False):
            raise EngineBusy("the engine is running another thread's request; drive it from one thread (EngineWorker)")
        try:
            with collections_held():
                return self._complete(request, switches, on_text, cancel.is_set if cancel is not None else None)
        except torch.OutOfMemoryError:
            dropped = self.sessions.trim()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(
                f"out of {self.device.type} memory for this request ({len(request.prefix) + len(request.suffix)} "
                f"characters of text); dropped {dropped} parked session(s), try again or lower --max-seq-len"
            ) from None
        finally:
            self._owner.release()

    def _complete(
        self, request: CompletionRequest, switches: Switches, on_text: OnText | None, cancelled: Poll | None
    ) -> Completion:
        started = time.perf_counter()
        prefix, suffix = request.prefix, request.suffix
        session = self.sessions.activate(request.document or ANONYMOUS)
        decoding = request.decoding
        if decoding == "lookahead" and request.lookahead is None and TREE_BY_DEFAULT[self.device.type]:
            decoding = "tree"
        cfg = (request.lookahead or self.default_lookahead()) if decoding == "lookahead" else None
        tree = (request.tree or self.default_tree()) if decoding == "tree" else None
        if tree is not None and tree.on_device and self.tp is not None:
            raise BadRequest(f"a tree drafted on the device ('{tree}') does not run split over GPUs (--tp); "
                             "leave out '@device'")
        if switches.type_through:
            rest = session.type_through(prefix, suffix)
            if rest is not None:
                return self._typed_through(rest, started, decoding, cfg or tree)
        if cancelled is not None and cancelled():
            raise Cancelled()

        step = (cfg or tree).step_tokens if cfg or tree else 1
        headroom = step + request.max_tokens + 1

        def make_prompt(heal: bool):
            return build_prompt(self.codec, prefix, suffix, self.options.budget, fim=switches.fim, heal=heal,
                                context=request.context, path=request.path, room=self.runner.capacity - headroom)

        prompt = make_prompt(request.heal)
        bos = self.checkpoint.config.bos_token_id
        if not prompt.ids and bos is None and prompt.healed:
            prompt = make_prompt(False)  # healing took the only token, and nothing can stand in for it
        ids = list(prompt.ids)
        if not ids:
            if bos is None:
                raise BadRequest("nothing to complete: the text before the cursor is empty and the model has no "
                                 "BOS token to start from")
            ids = [bos]
        if len(ids) + headroom > self.runner.capacity:
            raise DoesNotFit(
                f"prompt ({len(ids)} tokens) + {request.max_tokens} new tokens do not fit the KV cache "
                f"({self.runner.capacity} slots); raise --max-seq-len or lower the prompt budget"
            )

        reused = session.reuse(ids[:-1], switches.reuse_kv)
        written = self.runner.prefill(ids[reused:-1], reused, cancelled)
        self.sessions.learn_completed()  # while the GPU prefills, and before anything drafts
        session.written(ids[: reused + written])
        if reused + written < len(ids) - 1:
            raise Cancelled()
        # What decoding needs before its first step is made while the GPU prefills: the stop rules, and a tree's
        # sources and first step, which read the prompt alone.
        stopper = Stopper(request.stop, prefix, suffix) if request.stop.any else None
        watch = CompletionText(self.codec, prompt.healed, stopper, on_text)
        if tree is not None and not tree.on_device:
            healing = Healing(self.codec, prompt.healed)
            # Without fill-in-the-middle the prompt lacks the code after the cursor, which completions often copy.
            extra = [] if prompt.fim else suffix_window(self.codec, suffix, self.options.budget)
            drafters = self.sessions.drafters(session, ids, tree, extra, switches.persistent_pool)
            first = first_step(self.runner, ids, tree, drafters, healing)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prefill_ms = (time.perf_counter() - started) * 1e3

        state = DecodeState(list(ids), request.max_tokens, self.codec.stop_ids, on_commit=watch.on_commit,
                            cancelled=cancelled)
        if tree is None or tree.on_device:
            heal(self.runner, self.codec, state, prompt.healed)
        if cfg is not None:
            decode_lookahead(self.runner, state, cfg, session.pool_for(ids, cfg, switches.persistent_pool))
        elif tree is not None and tree.on_device:
            decode_device_tree(self.runner, state, self.sessions.device_tree(tree))
        elif tree is not None:
            decode_tree(self.runner, state, tree, drafters, healing=healing, first=first)
            self.sessions.completed(session, ids, state.new, switches.persistent_pool)
        else:
            decode_ar(self.runner, state)
        self.runner.flush_moves()  # the last step's accepted K/V in place: the cache is whole between requests
        session.written(state.seq[:-1])
        text, reason = watch.final(state.new, state.stop_reason or "length")
        if reason == "cancelled":
            session.remember(prefix, suffix, None)
            raise Cancelled(text, len(state.new))
        session.remember(prefix, suffix, text)
        return Completion(
            text=text,
            tokens=list(state.new),
            steps=state.steps,
            accepted_per_step=state.accepted,
            prefill_tokens=len(ids) - 1 - reused,
            reused_tokens=reused,
            prompt_tokens=len(ids),
            time_ms=(time.perf_counter() - started) * 1e3,
            prefill_ms=prefill_ms,
            ttft_ms=prefill_ms + (state.step_ms[0] if state.step_ms else 0.0),
            step_ms=state.step_ms,
            stop_reason=reason,
            decoding=decoding,
            lookahead=str(cfg or tree) if cfg or tree else None,
            pool_hits=state.pool_hits,
            by_source=dict(state.by_source),
        )

    def _typed_through(self, rest: str, started: float, decoding: str, cfg: LookaheadConfig | TreeConfig | None
                       ) -> Completion:
        """The user typed the start of the last suggestion: serve the rest without a forward pass."""
        elapsed = (time.perf_counter() - started) * 1e3
        return Completion(
            text=rest, tokens=[], steps=0, accepted_per_step=[], prefill_tokens=0, reused_tokens=0,
            prompt_tokens=0, time_ms=elapsed, prefill_ms=0.0, ttft_ms=elapsed, step_ms=[], stop_reason="type-through",
            decoding=decoding, lookahead=str(cfg) if cfg else None, pool_hits=0, type_through=True,
        )

    def close_document(self, document: str) -> None:
        self.sessions.drop(document)


class CompletionText:
    """Committed tokens -> the completion's text, with the request's stop rules applied as it grows."""

    def __init__(self, codec: Codec, healed: bytes, stopper: Stopper | None, on_text: OnText | None):
        self.codec = codec
        self.healed = healed
        self.stopper = stopper
        self.on_text = on_text
        self.cut: Cut | None = None
        self.streamed = ""
        self._bytes = b""  # of the first `_decoded` committed tokens: each step converts only its own
        self._decoded = 0

    def text(self, tokens: list[int]) -> str:
        """The text after the cursor: healing's re-generated bytes left out, a torn UTF-8 tail too. `tokens` are
        the request's committed tokens, which only ever grow."""
        out = self._bytes = self._bytes + self.codec.to_bytes(tokens[self._decoded :])
        self._decoded = len(tokens)
        if not out.startswith(self.healed):
            return ""  # still healing (or healing failed: then nothing is shown)
        return out[len(self.healed) :].decode("utf-8", errors="ignore")

    def on_commit(self, tokens: list[int]) -> str | None:
        if self.stopper is None and self.on_text is None:
            return None  # nobody reads the text before the end: don't decode it after every step
        text = self.text(tokens)
        if self.stopper is not None:
            self.cut = self.stopper.check(text)
            if self.cut is not None:
                return self.cut.reason
        if self.on_text is not None:
            stable = self.stopper.stable(text) if self.stopper is not None else text.rstrip()
            if len(stable) > len(self.streamed):
                self.streamed = stable
                self.on_text(stable)
        return None

    def final(self, tokens: list[int], reason: str) -> tuple[str, str]:
        """(text, stop reason) once decoding has ended for `reason`."""
        text = self.text(tokens)
        if self.cut is None and self.stopper is not None and reason != "cancelled":
            self.cut = self.stopper.check(text, final=True)
        if self.cut is not None:
            text, reason = text[: self.cut.end], self.cut.reason
        return finish(text), reason
