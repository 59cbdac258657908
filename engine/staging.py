"""Step inputs that reach the GPU in one copy: a pinned host buffer and its device twin.

Between two tree steps the host sets the step's tokens, base slot, positions and mask. As
separate pageable tensors that was four copies and a fill per step, each a driver call (and a
pageable copy may wait for the stream). Here they are fields of one byte buffer, written in
place through numpy views. The step itself copies them (`StepInputs.receive`, the first node of
its CUDA graph), so sending a step costs the host no driver call: on an H200's host a queued
copy and its event took 60-90 µs of host time per step, all of it before the GPU could start.
An event recorded once the step is launched guards the host bytes until the step has copied them.
On the CPU the two buffers are one.

The way back is `ReadBack`: pinned twins of a step's results, reused every step, each read waiting
for its own copy only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

STEP_COPIES_LAYOUT = 256 * 256  # bytes of mask up to which each step copies its layout too (256-row steps)


class Staging:
    """A pinned host buffer of `nbytes`, its device twin, and a guard: the host side is not rewritten
    while a queued copy may still read it (two back-to-back steps of one shape would race otherwise)."""

    def __init__(self, nbytes: int, device: torch.device):
        if device.type == "cuda":
            self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
            self.device = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            self._copied: torch.cuda.Event | None = torch.cuda.Event()
        else:
            self.host = self.device = torch.zeros(nbytes, dtype=torch.uint8)
            self._copied = None
        self._queued = False  # a copy out of the host bytes is queued (`send`'s, or a step's own: `copy_queued`)
        self.view = self.host.numpy()  # the host bytes, zero-copy

    def writable(self) -> np.ndarray:
        """The host bytes, once the copies queued out of them have run: a wait for their event, which decode loops
        have passed already by reading the step's result (1.2 µs on an H100's host, where a wait for the whole
        stream took 8 µs with nothing left to run)."""
        if self._queued:
            self._copied.synchronize()
            self._queued = False
        return self.view

    def send(self, nbytes: int | None = None) -> None:
        """Queue the copy of the first `nbytes` (all by default) to the device."""
        if self._copied is None:
            return
        n = self.host.numel() if nbytes is None else nbytes
        self.device[:n].copy_(self.host[:n], non_blocking=True)
        self.copy_queued()

    def copy_queued(self) -> None:
        """A copy out of the host bytes (`send`'s, or a queued step's `copy_in`) was just queued: guard them
        until it has run."""
        if self._copied is not None:
            self._copied.record()
            self._queued = True

    def copy_in(self, nbytes: int) -> None:
        """Queue the copy of the first `nbytes` to the device: inside a step, so that a captured graph replays it."""
        if self._copied is not None:
            self.device[:nbytes].copy_(self.host[:nbytes], non_blocking=True)


class StepInputs:
    """One step shape's inputs in one `Staging`: int64 tokens [T], base slot [1], `moves` slot moves (sources
    then destinations, [2, M]) and positions relative to the base [T], then the mask over the step's own
    tokens, bool [T, T]. Each step copies them all where that is a few KB (a tree's layout changes every step);
    a long prefill chunk's step copies its tokens, base and moves, and its layout is sent when it changes."""

    def __init__(self, rel_pos: Tensor, local: Tensor, device: torch.device, moves: int = 0):
        T = self.size = int(rel_pos.shape[0])
        self.max_moves = moves
        self.per_step = 8 * (T + 1 + 2 * moves)  # bytes that change with every step
        self.ints = self.per_step + 8 * T
        self.staging = Staging(self.ints + T * T, device)
        self.step_copies = self.staging.host.numel() if T * T <= STEP_COPIES_LAYOUT else self.per_step
        on_device = self.staging.device
        ints = on_device[: self.ints].view(torch.int64)
        self.tokens, self.base = ints[:T], ints[T]
        self.moves = ints[T + 1 : T + 1 + 2 * moves].view(2, moves)
        self.rel_pos = ints[T + 1 + 2 * moves :]
        self.local = on_device[self.ints :].view(torch.bool).view(T, T)
        self.set_layout(rel_pos, local)

    def set_layout(self, rel_pos: Tensor | np.ndarray, local: Tensor | np.ndarray) -> None:
        host, T = self.staging.writable(), self.size
        host[self.per_step : self.ints].view(np.int64)[:] = np.asarray(rel_pos)
        host[self.ints :].view(np.bool_).reshape(T, T)[:] = np.asarray(local)
        if self.step_copies < self.staging.host.numel():
            self.staging.send()

    def send(self, tokens: list[int] | Tensor | np.ndarray, base: int, moves: list[tuple[int, int]] = ()) -> None:
        """Set the step's tokens, base slot and slot moves, for the step queued next to copy (`receive`).
        Unused move entries copy slot 0 onto itself (decoding never moves a token there)."""
        host, T, M = self.staging.writable(), self.size, self.max_moves
        ints = host[: self.per_step].view(np.int64)
        ints[:T] = np.asarray(tokens)
        ints[T] = base
        if M:
            if len(moves) > M:
                raise ValueError(f"{len(moves)} slot moves for a step that carries {M}")
            pairs = ints[T + 1 :].reshape(2, M)
            pairs[:] = 0
            if moves:
                pairs[:, : len(moves)] = np.array(moves).T

    def receive(self) -> None:
        """The step's first work: copy what `send` set to the device views the step reads."""
        self.staging.copy_in(self.step_copies)

    def step_queued(self) -> None:
        """The step that receives what `send` set is queued: the next `send` or `set_layout` waits for it."""
        self.staging.copy_queued()


class ReadBack:
    """Pinned host twins of device tensors that a loop reads after every step, grown as needed and reused
    rather than allocated per step. `queue` copies behind the work that makes the tensors; `values` waits
    for that copy alone (its own event), not for work queued after it: a tree step's argmax is read while
    the recycling top-k queued behind it still runs. On the CPU the tensors are already there."""

    def __init__(self, device: torch.device):
        self.buffers: list[Tensor] = []
        self.done = torch.cuda.Event() if device.type == "cuda" else None
        self.tensors: tuple[Tensor, ...] = ()
        self._unread = False

    def queue(self, *tensors: Tensor) -> None:
        if self.done is None:
            self.tensors = tensors
            return
        if self._unread:  # the last copy may still be writing the buffers about to be reused
            self.done.synchronize()
        out = []
        for i, t in enumerate(tensors):
            if i == len(self.buffers) or self.buffers[i].dtype != t.dtype or self.buffers[i].numel() < t.numel():
                buffer = torch.empty(max(t.numel(), 64), dtype=t.dtype, pin_memory=True)
                self.buffers[i : i + 1] = [buffer]
            host = self.buffers[i][: t.numel()].view(t.shape)
            host.copy_(t, non_blocking=True)
            out.append(host)
        self.done.record()
        self.tensors = tuple(out)
        self._unread = True

    def values(self) -> tuple[Tensor, ...]:
        """The queued tensors' host copies, valid until the next `queue`."""
        if self._unread:
            self.done.synchronize()
            self._unread = False
        return self.tensors
