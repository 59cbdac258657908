"""Run fixed-shape steps of the model over its static KV cache, as CUDA graphs where possible.

A step is described by a `StepShape`: how many query tokens it has, each one's position
relative to the step's base slot, and which of the step's own tokens each may see. Every
step writes its tokens' K/V at slots base..base+T-1 and sees all slots below base. The
mask, positions and slots are computed on the device from the base slot, so one captured
graph per (shape, visible-length bucket) serves every step of that shape. A step's inputs
reach the device in one copy, which the step makes itself (`staging.StepInputs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from . import kernels
from .model import Transformer
from .staging import ReadBack, Staging, StepInputs

Out = TypeVar("Out")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): before reading a clock or a timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(eq=False)
class StepShape:
    name: str
    rel_pos: Tensor  # [T] long: position of each query token relative to the base slot
    local: Tensor  # [T, T] bool: which of the step's own tokens each query token may see
    logits: bool = True  # prefill only needs the K/V it writes
    moves: bool = False  # the step first makes the slot moves queued since the last one (lookahead, trees)
    causal: bool = False  # plain causal block: where it spans the whole visible cache, attention skips the mask

    @property
    def size(self) -> int:
        return int(self.rel_pos.shape[0])


@cache
def causal_shape(size: int, name: str | None = None, logits: bool = False) -> StepShape:
    """Plain causal block: prefill chunks (and, with size 1 and logits, the AR decode step)."""
    # The name keys captured graphs, so a shape with logits must not share one without.
    name = name or f"causal{size}" + ("-logits" if logits else "")
    return StepShape(name, torch.arange(size), torch.ones(size, size, dtype=torch.bool).tril(), logits, causal=True)


DECODE = causal_shape(1, "decode", logits=True)


MAX_MOVES = 32  # slot moves a step carries (drafts up to 32 tokens); more are made on their own first


def move_kv(kv: Tensor, src: Tensor, dst: Tensor) -> None:
    """Copy K/V of slots `src` to slots `dst` in every layer: gather, then scatter, so a slot both read and
    written keeps its old value for the read."""
    kv.index_copy_(3, dst, kv.index_select(3, src))


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    argmax: Tensor
    logits: Tensor | None


@dataclass
class Runner:
    model: Transformer
    use_graphs: bool = True
    kv_bucket: int = 256  # visible cache length is rounded up to this: attention cost follows it
    # A cold 2,500-token prompt of the 1.5B on an H200 prefilled in 26.6 ms in 512-token chunks, 20.6 ms
    # in 1,024 and 24.3 ms in 2,048: a 512-row chunk's attention projections fill a third of the SMs.
    prefill_chunk: int = 1024
    # Prefill chunks run as graphs padded to one of these sizes: eager, a chunk's ~400 kernel
    # launches cost more than a 512-token chunk's compute on a 1.5B model. Few sizes, since each is
    # captured at every cache length before the engine is ready; padding 8 tokens to 32 or 256 to
    # 512 costs ~1 ms where steps are launch-bound anyway.
    graph_prefill_sizes: tuple[int, ...] = (32, 128, 512, 1024)
    # A prompt prefilled from slot 0 that is longer than a chunk runs as one step, padded to one of these
    # sizes and captured at the one cache length it reaches. A cold 2,500-token prompt of the 1.5B on an
    # H200: 17.5 ms in 1,024-token chunks, 15.5 ms in one 2,560-token step, 13.5 ms with the causal
    # attention a step over the whole visible cache gets (`StepShape.causal`).
    whole_prompt_sizes: tuple[int, ...] = tuple(range(1280, 4097, 256))
    graphs: dict[tuple[str, int], Captured] = field(default_factory=dict)
    _pool: object = None
    _inputs: dict[str, StepInputs] = field(default_factory=dict)  # per shape; its graphs read them by reference
    _moves: Staging | None = None  # slot-move indices for moves made on their own, grown as needed
    _pending: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) slot moves not made yet
    _warmed: set[str] = field(default_factory=set)  # shapes whose eager pre-capture runs are done
    _read_backs: dict[str, ReadBack] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = self.model.output.weight.device
        self.use_graphs = self.use_graphs and self.device.type == "cuda"
        self.capacity = self.model.max_seq_len
        self._arange = torch.arange(self.capacity, device=self.device)

    # -- shapes -----------------------------------------------------------------------------
    def visible_len(self, end: int) -> int:
        return min(self.capacity, -(-end // self.kv_bucket) * self.kv_bucket)

    def visible_ends(self, rows: int, first: int = 0, last: int | None = None) -> set[int]:
        """The visible lengths (graph buckets) that a `rows`-row step based at a slot in first..last (default: any
        slot where it fits) sees."""
        last = self.capacity - rows if last is None else min(last, self.capacity - rows)
        return {self.visible_len(b + rows) for b in range(max(0, first), last + 1)}

    def inputs(self, shape: StepShape) -> StepInputs:
        """`shape`'s input buffers, made on its first step with the shape's own layout."""
        inputs = self._inputs.get(shape.name)
        if inputs is None:
            inputs = self._inputs[shape.name] = StepInputs(shape.rel_pos, shape.local, self.device,
                                                           MAX_MOVES if shape.moves else 0)
        return inputs

    def set_layout(self, shape: StepShape, rel_pos: Tensor | np.ndarray, local: Tensor | np.ndarray) -> None:
        """New positions and mask for `shape`'s next steps (a token tree changes them every step); they
        go to the device with the next step's tokens."""
        self.inputs(shape).set_layout(rel_pos, local)

    def _forward(self, shape: StepShape, visible: int) -> tuple[Tensor, Tensor | None]:
        """The whole step from the shape's device inputs only, so that it can be captured."""
        inputs = self.inputs(shape)
        inputs.receive()
        positions, slots, bias = self.step_layout(inputs.base, inputs.rel_pos, inputs.local, visible)
        if shape.moves:
            move_kv(self.model.kv, inputs.moves[0], inputs.moves[1])
        # A causal block that spans the whole visible cache can only be based at slot 0 (a prompt's first
        # chunk): its mask is plain causal.
        causal = shape.causal and shape.size == visible
        out = self.model(inputs.tokens, positions, slots, bias, logits=shape.logits, causal=causal)
        if not shape.logits:
            return out[:0, 0].long(), None
        return (kernels.argmax(out) if kernels.usable(out) else out.argmax(-1)), out

    def step_layout(self, base: Tensor, rel_pos: Tensor, local: Tensor, visible: int) -> tuple[Tensor, Tensor, Tensor]:
        """(positions [T], slots [T], additive mask [T, visible]) of a step at slot `base` (a one-element tensor)
        whose rows sit at `rel_pos` after it and see the step's own rows where `local` [T, T] says, from device
        tensors only: one kernel on CUDA (`kernels.step_layout`), torch ops elsewhere."""
        dtype = self.model.output.weight.dtype
        if kernels.usable(base):
            return kernels.step_layout(base, rel_pos, local, visible, dtype)
        T = rel_pos.shape[0]
        s = self._arange[:visible]
        offset = s - base  # [L]: where each visible slot falls inside this step's block
        in_block = (offset >= 0) & (offset < T)
        sees = (s < base) | (local[:, offset.clamp(0, T - 1)] & in_block)
        bias = torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill_(~sees, float("-inf"))
        return base + rel_pos, base + self._arange[:T], bias

    # -- running ------------------------------------------------------------------------------
    def step(
        self, shape: StepShape, tokens: list[int] | Tensor | np.ndarray, base: int, graph: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Run one step with its first token at slot `base`; returns (argmax [T], logits [T, V]).

        The returned tensors belong to the runner and are overwritten by the next step.
        `graph=False` runs eagerly: for one-off shapes, where a capture would cost more than it saves.
        """
        T = shape.size
        if base + T > self.capacity:
            raise ValueError(f"step of {T} tokens at slot {base} exceeds the cache ({self.capacity} slots)")
        if len(tokens) != T:
            raise ValueError(f"a {shape.name} step takes {T} tokens (got {len(tokens)})")
        visible = self.visible_len(base + T)
        graphed = self.use_graphs and graph
        key = (shape.name, visible)
        cap = self.graphs.get(key) if graphed else None
        # The queued moves ride with the step, unless a capture's eager warm-up runs would make them twice.
        carried = shape.moves and len(self._pending) <= MAX_MOVES and (cap is not None or not graphed)
        if not carried:
            self.flush_moves()
        inputs = self.inputs(shape)
        inputs.send(tokens, base, self._pending)
        self._pending.clear()
        if not graphed:
            with torch.no_grad():
                out = self._forward(shape, visible)
        else:
            if cap is None:
                cap = self.graphs[key] = self._capture(shape, visible)
            cap.graph.replay()
            out = cap.argmax, cap.logits
        inputs.step_queued()  # after the launch: the GPU is busy with the step meanwhile
        return out

    def read_back(self, name: str) -> ReadBack:
        """The host twins of one kind of result that decode loops read after every step: made once, so
        neither a step nor a request allocates pinned memory."""
        back = self._read_backs.get(name)
        if back is None:
            back = self._read_backs[name] = ReadBack(self.device)
        return back

    @torch.no_grad()
    def _capture(self, shape: StepShape, visible: int) -> Captured:
        # Eager runs first, once per shape (library handles, kernel compiles); other cache lengths of the
        # shape reuse them (warm-up of 111 graphs for the 1.5B on an H200: 8.6 s -> 5.4 s). They write the
        # same K/V the real step is about to write.
        graph, (argmax, logits) = self.capture_graph(lambda: self._forward(shape, visible),
                                                     eager=0 if shape.name in self._warmed else 2)
        self._warmed.add(shape.name)
        return Captured(graph, argmax, logits)

    def capture_graph(self, run: Callable[[], Out], eager: int) -> tuple[torch.cuda.CUDAGraph, Out]:
        """`run` captured into a CUDA graph in the runner's memory pool (every graph shares it: only one runs
        at a time), after `eager` runs on a side stream, as capture requires; and what the captured run
        returned, the tensors a replay rewrites."""
        if eager:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(eager):
                    run()
            torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = run()
        return graph, out

    def prefill(self, tokens: list[int], start: int, cancelled: Callable[[], bool] | None = None) -> int:
        """Write K/V for `tokens` at slots start.. (no logits: the decode loop makes the first).

        `cancelled` is polled between chunks; returns how many tokens were written.
        """
        whole = self.whole_prompt_size(len(tokens), start)
        if whole is not None:
            if cancelled is not None and cancelled():
                return 0
            self.step(causal_shape(whole), tokens + [0] * (whole - len(tokens)), 0)  # padding as below
            return len(tokens)
        pos = 0
        while pos < len(tokens):
            if cancelled is not None and cancelled():
                return pos
            n = min(self.prefill_chunk, len(tokens) - pos)
            bucket = next((b for b in self.graph_prefill_sizes if b >= n), None) if self.use_graphs else None
            if bucket is not None and start + pos + bucket <= self.capacity:
                # Pad to a captured size: the padding rows write slots past the prompt, which
                # nothing sees and the next step overwrites.
                chunk = tokens[pos : pos + n] + [0] * (bucket - n)
                self.step(causal_shape(bucket), chunk, start + pos)
            else:  # past the end of the cache, or no graphs (CPU)
                self.step(causal_shape(n), tokens[pos : pos + n], start + pos, graph=False)
            pos += n
        return pos

    def whole_prompt_size(self, n: int, start: int) -> int | None:
        """The one-step size a prefill of `n` tokens from `start` pads to, or None where it runs in chunks."""
        if start or not self.use_graphs or n <= self.prefill_chunk:
            return None
        return next((b for b in self.whole_prompt_sizes if b >= n and b <= self.capacity), None)

    # -- cache bookkeeping --------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        kv = self.model.kv
        return kv[:, :, :, :1].numel() * kv.element_size()

    def move_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy K/V between slots (all layers): accepted lookahead tokens into their final place. The copy is
        made by the next lookahead or tree step, inside its graph (on an H100 two launches of their own took
        ~130 us of host time per step), or before anything else that reads the cache."""
        self._pending.extend(zip(src, dst, strict=True))

    def flush_moves(self) -> None:
        """Make the queued slot moves now."""
        n = len(self._pending)
        if not n:
            return
        src, dst = zip(*self._pending, strict=True)
        self._pending.clear()
        if self._moves is None or self._moves.host.numel() < 16 * n:
            self._moves = Staging(16 * max(n, 32), self.device)
        self._moves.writable()[: 16 * n].view(np.int64)[:] = [*src, *dst]
        self._moves.send(16 * n)
        src_dst = self._moves.device[: 16 * n].view(torch.int64).view(2, n)
        with torch.no_grad():
            move_kv(self.model.kv, src_dst[0], src_dst[1])

    def save(self, n: int) -> Tensor:
        """A copy of the first n slots' K/V (a parked document session)."""
        self.flush_moves()
        return self.model.kv[:, :, :, :n].clone()

    def restore(self, saved: Tensor) -> None:
        self.flush_moves()
        self.model.kv[:, :, :, : saved.shape[3]].copy_(saved)

