"""Triton kernels for the CUDA decode path: fewer, fused launches per layer.

A 1.5B decode step is ~1 ms of weight traffic but ran ~3 ms as ~650 small kernels; most of
the excess was RoPE + KV-cache writes (6 kernels) and masked attention (4 kernels whose
softmax alone took 10 us). Here: one kernel rotates q/k, writes k/v into the cache slots and
lays q out for grouped-query attention; a split-K flash kernel does masked attention and
writes heads straight into the [T, H*D] layout the output projection reads; SiLU-gate is one
kernel, and so is each residual add with the RMSNorm after it. The CPU path (and the parity
tests) keep the plain torch code in model.py. Outside the model: the top-k successors and their
probabilities of each row of a step's logits (Token Recycling), in two launches.

The projections of decoding steps are Triton kernels too (`linear`): cuBLAS's one-row products of the
1.5B's attention projections reached 740-1,250 GB/s on an H200, these 2,000-2,400. And on Hopper every
kernel here is launched with programmatic dependent launch (PDL): the next kernel is scheduled while the
one before it drains, and waits (`_await_inputs`) before it reads what that one wrote. A 1.5B-shaped
one-token step's 28 layers took 1.09 ms so, against 1.51-1.63 ms with cuBLAS and no PDL. Projections start on
their weights before that wait: the GEMV loads its first tile, the skinny kernel asks L2 for its first lines
(a 64-row tree step of the 1.5B's shape on an H100: 2,125-2,135 -> 2,089-2,102 µs of GPU time).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:  # triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
try:  # host-side TMA descriptors (Triton 3.4 on)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - CPU-only installs, older Triton
    TensorDescriptor = None

ENABLED = triton is not None and os.environ.get("AHEAD_NO_TRITON", "") != "1"


def usable(x: Tensor) -> bool:
    return ENABLED and x.is_cuda


if triton is not None:

    @triton.jit
    def _await_inputs(PDL: tl.constexpr):
        # Under PDL this kernel may start before the previous one has finished: wait for its results, then let
        # the next kernel be scheduled in turn (it waits the same way before reading anything).
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _prefetch_l2(ptrs):
        # Ask L2 for the lines at `ptrs` without waiting for them or holding them in registers.
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _rope_cache_kernel(
        qkv, cos, sin, slots, kv, q_out, T, S,
        H: tl.constexpr, HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
        PARTS: tl.constexpr, BT: tl.constexpr, PDL: tl.constexpr,
    ):
        # qkv: [T, (H + 2 HKV) D], or PARTS partial sums of it (`linear(..., parts=True)`) added up here.
        # One head of BT tokens a program.
        t = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]  # [BT, 1]
        h = tl.program_id(1)
        _await_inputs(PDL)
        half = HALF
        offs = tl.arange(0, HALF)[None, :]
        ok = (t < T) & (offs < HALF)
        x1 = tl.zeros([BT, HALF], tl.float32)
        x2 = tl.zeros([BT, HALF], tl.float32)
        for part in tl.static_range(PARTS):
            row = qkv + (part * T + t) * (H + 2 * HKV) * D + h * D
            x1 += tl.load(row + offs, mask=ok, other=0.0).to(tl.float32)
            x2 += tl.load(row + half + offs, mask=ok, other=0.0).to(tl.float32)
        x1 = x1.to(q_out.dtype.element_ty).to(tl.float32)  # rounded where one whole product would be
        x2 = x2.to(q_out.dtype.element_ty).to(tl.float32)
        slot = tl.load(slots + t, mask=t < T, other=0)
        if h < H + HKV:
            c = tl.load(cos + t * half + offs, mask=ok, other=0.0)
            s = tl.load(sin + t * half + offs, mask=ok, other=0.0)
            o1 = x1 * c - x2 * s
            o2 = x2 * c + x1 * s
            if h < H:
                g = h // REP
                r = h % REP
                dst = q_out + (g * REP * T + r * T + t) * D
            else:
                dst = kv + ((h - H) * S + slot) * D
            tl.store(dst + offs, o1.to(q_out.dtype.element_ty), mask=ok)
            tl.store(dst + half + offs, o2.to(q_out.dtype.element_ty), mask=ok)
        else:
            dst = kv + HKV * S * D + ((h - H - HKV) * S + slot) * D
            tl.store(dst + offs, x1.to(q_out.dtype.element_ty), mask=ok)
            tl.store(dst + half + offs, x2.to(q_out.dtype.element_ty), mask=ok)

    @triton.jit
    def _attn_partial_kernel(
        q, kv, bias, m_out, l_out, acc_out, R, T, L, S, chunk, nsplit, scale,
        HKV: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr, IEEE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        g = tl.program_id(0)
        rb = tl.program_id(1)
        sp = tl.program_id(2)
        _await_inputs(PDL)
        rows = rb * BR + tl.arange(0, BR)
        dims = tl.arange(0, D)
        row_ok = rows < R
        qt = tl.load(q + (g * R + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None], other=0.0)
        t_of_row = rows % T
        m_i = tl.full([BR], float("-inf"), tl.float32)
        l_i = tl.zeros([BR], tl.float32)
        acc = tl.zeros([BR, D], tl.float32)
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, L)
        keys = kv + g * S * D
        values = kv + (HKV + g) * S * D
        for start in range(lo, hi, BL):
            cols = start + tl.arange(0, BL)
            col_ok = cols < hi
            k = tl.load(keys + cols[:, None] * D + dims[None, :], mask=col_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(qt, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(qt, tl.trans(k)) * scale
            b = tl.load(bias + t_of_row[:, None] * L + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=float("-inf")).to(tl.float32)
            s = s + b
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(values + cols[:, None] * D + dims[None, :], mask=col_ok[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        part = (g * nsplit + sp) * R + rows
        tl.store(m_out + part, m_i, mask=row_ok)
        tl.store(l_out + part, l_i, mask=row_ok)
        tl.store(acc_out + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _attn_combine_kernel(
        m_in, l_in, acc_in, out, R, T, nsplit,
        HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, RB: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # RB folded rows of KV head g a program; SPLITS: nsplit rounded up to a power of two, the padding masked off
        g = tl.program_id(0)
        rows = tl.program_id(1) * RB + tl.arange(0, RB)
        _await_inputs(PDL)
        row_ok = rows < R
        splits = tl.arange(0, SPLITS)
        dims = tl.arange(0, D)
        part = (g * nsplit + splits[None, :]) * R + rows[:, None]  # [RB, SPLITS]
        used = row_ok[:, None] & (splits < nsplit)[None, :]
        m = tl.load(m_in + part, mask=used, other=float("-inf"))
        lsum = tl.load(l_in + part, mask=used, other=0.0)
        big = tl.max(m, 1)
        big = tl.where(big == float("-inf"), 0.0, big)  # a padding row (its store is masked off)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - big[:, None]))
        acc = tl.load(acc_in + part[:, :, None] * D + dims[None, None, :], mask=used[:, :, None], other=0.0)
        o = tl.sum(acc * w[:, :, None], 1) / tl.sum(lsum * w, 1)[:, None]
        heads = g * REP + rows // T  # folded row r is query head g*REP + r // T of the step's row r % T
        dst = out + ((rows % T) * HKV * REP + heads)[:, None] * D + dims[None, :]
        tl.store(dst, o.to(out.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _silu_mul_kernel(x, out, T, inter, PARTS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # x: [T, 2I], or PARTS partial sums of it added up here
        t = tl.program_id(0)
        _await_inputs(PDL)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < inter
        gate = tl.zeros([BLOCK], tl.float32)
        up = tl.zeros([BLOCK], tl.float32)
        for part in tl.static_range(PARTS):
            row = x + (part * T + t) * 2 * inter
            gate += tl.load(row + offs, mask=ok, other=0.0).to(tl.float32)
            up += tl.load(row + inter + offs, mask=ok, other=0.0).to(tl.float32)
        gate = gate.to(out.dtype.element_ty).to(tl.float32)
        up = up.to(out.dtype.element_ty).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out + t * inter + offs, y.to(out.dtype.element_ty), mask=ok)

    @triton.jit
    def _add_rms_norm_kernel(x, delta, weight, normed, T, dim, eps, PARTS: tl.constexpr, BLOCK: tl.constexpr,
                             PDL: tl.constexpr):
        # delta: [T, dim], or PARTS partial sums of it added up here
        t = tl.program_id(0)
        _await_inputs(PDL)
        offs = tl.arange(0, BLOCK)
        ok = offs < dim
        d = tl.zeros([BLOCK], tl.float32)
        for part in tl.static_range(PARTS):
            d += tl.load(delta + (part * T + t) * dim + offs, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(x + t * dim + offs, mask=ok, other=0.0).to(tl.float32)
        y += d.to(x.dtype.element_ty).to(tl.float32)
        y = y.to(x.dtype.element_ty)  # the residual stream keeps the weights' dtype, as `x + delta` would
        tl.store(x + t * dim + offs, y, mask=ok)
        y = y.to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(y * y, axis=0) / dim + eps)
        w = tl.load(weight + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(normed + t * dim + offs, (y * scale * w).to(normed.dtype.element_ty), mask=ok)

    @triton.jit
    def _gemv_kernel(x, w, b, y, N, K, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PDL: tl.constexpr):
        # y[N] = w[N, K] @ x[K] (+ b): BN weight rows a program, BK columns at a time.
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        rows_in = tl.minimum(rows, N - 1)  # the last program's spare rows reread row N-1, never stored
        cols = tl.arange(0, BK)
        # Weights never come from an earlier kernel: the first tile is on its way while that kernel drains.
        wt = tl.load(w + rows_in[:, None] * K + cols[None, :], mask=(cols < K)[None, :], other=0.0)
        _await_inputs(PDL)
        acc = wt.to(tl.float32) * tl.load(x + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
        for k0 in range(BK, K, BK):
            c = k0 + cols
            wt = tl.load(w + rows_in[:, None] * K + c[None, :], mask=(c < K)[None, :], other=0.0)
            acc += wt.to(tl.float32) * tl.load(x + c, mask=c < K, other=0.0).to(tl.float32)[None, :]
        out = tl.sum(acc, 1)
        if HAS_BIAS:
            out += tl.load(b + rows_in).to(tl.float32)
        tl.store(y + rows, out.to(y.dtype.element_ty), mask=rows < N)

    @triton.jit
    def _skinny_kernel(x, w, b, y, M, N, K, chunk, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
        # y = x[M, K] @ w[N, K]^T (+ b) for a few rows (M <= BM): a program owns BN outputs of every row over
        # `chunk` columns (program_id 1 picks which); with several chunks y holds their partial sums [chunks, M, N].
        outs = tl.program_id(0) * BN + tl.arange(0, BN)
        outs_in = tl.minimum(outs, N - 1)
        part = tl.program_id(1)
        rows = tl.arange(0, BM)
        ks = tl.arange(0, BK)
        # Weights never come from an earlier kernel: their first tiles are fetched into L2 while that kernel
        # drains. (Loaded into registers here instead, the first tile cost the loop its pipelining.)
        lines = part * chunk + tl.arange(0, PREFETCH) * (1024 // w.dtype.element_ty.primitive_bitwidth)  # a line apart
        _prefetch_l2(w + outs_in[:, None] * K + tl.minimum(lines, K - 1)[None, :])
        _await_inputs(PDL)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(part * chunk, tl.minimum(part * chunk + chunk, K), BK):
            c = k0 + ks
            xt = tl.load(x + rows[:, None] * K + c[None, :], mask=(rows < M)[:, None] & (c < K)[None, :], other=0.0)
            wt = tl.load(w + outs_in[:, None] * K + c[None, :], mask=(c < K)[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(wt), acc)
        if HAS_BIAS:
            acc += tl.where(part == 0, tl.load(b + outs_in).to(tl.float32), 0.0)[None, :]
        tl.store(y + (part * M + rows[:, None]) * N + outs[None, :], acc.to(y.dtype.element_ty),
                 mask=(rows < M)[:, None] & (outs < N)[None, :])

    @triton.jit
    def _wide_kernel(x_desc, w_desc, w, y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     STAGES: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
        # y[M, N] = x[M, K] @ w[N, K]^T for a few rows and wide outputs: the skinny kernel's product with both
        # operands' tiles moved by the TMA unit (descriptors), which zero-fills rows past M and columns past K.
        n0 = tl.program_id(0) * BN
        outs = n0 + tl.arange(0, BN)
        lines = tl.arange(0, PREFETCH) * (1024 // w.dtype.element_ty.primitive_bitwidth)  # a line apart
        _prefetch_l2(w + tl.minimum(outs, N - 1)[:, None] * K + tl.minimum(lines, K - 1)[None, :])
        _await_inputs(PDL)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in tl.range(0, K, BK, num_stages=STAGES):
            acc = tl.dot(x_desc.load([0, k0]), w_desc.load([n0, k0]).T, acc)
        rows = tl.arange(0, BM)
        tl.store(y + rows[:, None] * N + outs[None, :], acc.to(y.dtype.element_ty),
                 mask=(rows < M)[:, None] & (outs < N)[None, :])

    @triton.jit
    def _step_layout_kernel(base_at, rel_pos, local, positions, slots, bias, T, L, BLOCK: tl.constexpr,
                            PDL: tl.constexpr):
        # Row t of a step at slot `base`: its position and slot, and its additive mask over slots [0, L): it sees
        # every slot below the base, and the step's own slot base + j where local[t, j].
        t = tl.program_id(0)
        c = tl.program_id(1)
        _await_inputs(PDL)
        base = tl.load(base_at)
        if c == 0:
            tl.store(positions + t, base + tl.load(rel_pos + t))
            tl.store(slots + t, base + t)
        s = c * BLOCK + tl.arange(0, BLOCK)
        j = s - base
        own = (j >= 0) & (j < T)
        sees = (s < base) | (own & (tl.load(local + t * T + j, mask=own, other=0) != 0))
        tl.store(bias + t * L + s, tl.where(sees, 0.0, float("-inf")).to(bias.dtype.element_ty), mask=s < L)

    @triton.jit
    def _argmax_chunk_kernel(logits, vals, ids, V, stride, C, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # One chunk of one row: its largest value and where it first occurs.
        r = tl.program_id(0)
        c = tl.program_id(1)
        _await_inputs(PDL)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits + r * stride + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        tl.store(vals + r * C + c, tl.max(x, axis=0))
        tl.store(ids + r * C + c, c * BLOCK + tl.argmax(x, axis=0))

    @triton.jit
    def _argmax_merge_kernel(vals, ids, out, C, CB: tl.constexpr, PDL: tl.constexpr):
        # One row: the first chunk holding the row's largest value, hence the value's first occurrence.
        r = tl.program_id(0)
        _await_inputs(PDL)
        o = tl.arange(0, CB)
        v = tl.load(vals + r * C + o, mask=o < C, other=float("-inf"))
        tl.store(out + r, tl.load(ids + r * C + tl.argmax(v, axis=0)).to(tl.int64))

    @triton.jit
    def _top_k_chunk_kernel(logits, vals, ids, maxes, sums, V, stride, C, K: tl.constexpr, BLOCK: tl.constexpr,
                            PDL: tl.constexpr):
        # One chunk of one row: its max, its sum of exp(x - max), and its K largest values with their ids.
        r = tl.program_id(0)
        c = tl.program_id(1)
        _await_inputs(PDL)
        lane = tl.arange(0, BLOCK)
        offs = c * BLOCK + lane
        x = tl.load(logits + r * stride + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        out = r * C + c
        tl.store(maxes + out, m)
        tl.store(sums + out, tl.sum(tl.exp(x - m), axis=0))
        for j in tl.static_range(K):
            best = tl.max(x, axis=0)
            i = tl.argmax(x, axis=0)
            tl.store(vals + out * K + j, best)
            tl.store(ids + out * K + j, c * BLOCK + i)
            x = tl.where(lane == i, float("-inf"), x)

    @triton.jit
    def _top_k_merge_kernel(vals, ids, maxes, sums, out_ids, out_probs, C,
                            K: tl.constexpr, CB: tl.constexpr, CKB: tl.constexpr, PDL: tl.constexpr):
        # One row: the K best of its chunks' candidates, as probabilities under the whole row's softmax.
        r = tl.program_id(0)
        _await_inputs(PDL)
        oc = tl.arange(0, CB)
        m_c = tl.load(maxes + r * C + oc, mask=oc < C, other=float("-inf"))
        s_c = tl.load(sums + r * C + oc, mask=oc < C, other=0.0)
        top = tl.max(m_c, axis=0)
        lse = top + tl.log(tl.sum(s_c * tl.exp(m_c - top), axis=0))
        o = tl.arange(0, CKB)
        v = tl.load(vals + r * C * K + o, mask=o < C * K, other=float("-inf"))
        for j in tl.static_range(K):
            best = tl.max(v, axis=0)
            i = tl.argmax(v, axis=0)
            tl.store(out_probs + r * K + j, tl.exp(best - lse))
            tl.store(out_ids + r * K + j, tl.load(ids + r * C * K + i).to(tl.int64))
            v = tl.where(o == i, float("-inf"), v)


@functools.cache
def _launch_options(device: torch.device) -> dict:
    """PDL where the GPU has it (Hopper on) and Triton can launch with it; AHEAD_NO_PDL=1 turns it off."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    able = (torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")
            and os.environ.get("AHEAD_NO_PDL", "") != "1")
    return {"PDL": True, "launch_pdl": True} if able else {"PDL": False}


SHARED_MEMORY_BUDGET = 160 * 1024  # bytes of pipelined tiles a program may hold (Hopper has 227 KB a block)
PREFETCH_LINES = 4  # 128-byte lines of each weight row a skinny program asks L2 for before its PDL wait
SKINNY_MAX_ROWS = 64  # a step of up to this many rows runs `_skinny_kernel`; longer (prefill) chunks use cuBLAS
ROPE_TOKENS = 16  # tokens a `_rope_cache_kernel` program rotates in prefill chunks
TREE_ROPE_TOKENS = 4  # ... in tree steps of 33-64 rows (`rope_and_cache`); smaller decoding steps: one


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(rows a program, columns a step, warps) for one-row products, from a sweep on an H200 (1.5B shapes,
    28 weights cycled): wide outputs (gate/up, the LM head) want many small programs; the attention and
    down projections want few rows and whole 2,048-column tiles."""
    if n >= 8192:
        return 8, 256, 4
    return (4 if n >= 2048 else 2), min(2048, triton.next_power_of_2(k)), 8


def skinny_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int, int] | None:
    """(row block, outputs a program, columns a step, warps, stages, column chunks) for a step of 2..64 rows, or
    None where cuBLAS does better. From a sweep at 48 rows on an H200 over the 1.5B's and the 7B's shapes (µs,
    cuBLAS -> this): 1.5B q/k/v 5.2 -> 3.8, output 5.4 -> 3.6, gate/up 18.5 -> 17.5, down 12.4 -> 9.5, LM head
    121 -> 118; 7B output 12.2 -> 8.8, down 42.3 -> 38.2; the 7B's q/k/v (10.9 against 12.3) stays with cuBLAS,
    its gate/up and LM head go to `_wide_kernel` (`wide_config`).
    Narrow outputs are split into column chunks (partial sums) so that a few hundred programs share the weight.
    Wide ones below the LM head (the 1.5B's gate/up) take 64 outputs a program: 280 programs, up to three on an
    SM, where 128 left 140 for 132 SMs. Measured in the whole step, which a sweep of the product alone misses: a
    1.5B-shaped tree step's GPU time on an H200 at 16/32/48/64 rows, 1,615/1,740/1,663/1,726 -> 1,578/1,673/
    1,633/1,698 µs (`.device/s20/gpu_ab.sh`)."""
    bm = max(16, triton.next_power_of_2(m))
    if k > 2048 and (n > k or n >= 8192):  # long rows into wider outputs (the 7B's q/k/v: cuBLAS 14.1 against
        return None  # 18.3 µs on an H100, 15.2 at best; its gate/up and LM head)
    if n >= 8192:
        return (bm, 128, 64, 4, 3, 1) if n >= 65536 else (bm, 64, 64, 4, 4, 1)
    bn = 32 if n <= 2048 else 64
    # Short rows, and long ones (K >= 16,384: the 7B's down, 51.0 against 51.7 µs in four chunks, and half the
    # partial sums for the next kernel to add; about 55 µs off a 64-row 7B tree step on an H100): two chunks.
    if k < 4096 or k >= 16384:
        return bm, bn, 128, 4, 4, 2
    chunks = 1 << (triton.cdiv(384, triton.cdiv(n, bn)).bit_length() - 1)  # ~384 programs, a power of two
    return bm, bn, 128, 4, 3, max(1, min(16, chunks))


def wide_config(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[int, int, int, int, int] | None:
    """(row block, outputs a program, columns a step, warps, stages) where `_wide_kernel` takes a step's product
    from cuBLAS: wide outputs over long rows (the 7B's gate/up and LM head), in 16-bit, on a GPU with a TMA unit
    (Hopper on), with the 16-byte alignment its descriptors need. On an H100, 64 rows, µs a call (28 weights
    cycled in a graph, `.device/s16/sweep.py`): 7B gate/up cuBLAS 102.2 -> 99.2 (one row: 89.8), 7B LM head 396.0
    -> 374.9 (one row: 351.5). The 7B's 64-row step: 6,346-6,423 -> 6,094-6,127 µs, its AR step 5,184-5,279
    (`.device/s16/stepab.py`, builds alternating). The 1.5B's shapes keep the skinny kernel: a persistent TMA
    kernel won alone there (24.1 against 27.8 µs) but lost in the step (2,124-2,141 against 2,070-2,077 µs)."""
    T, K = x.shape
    N = weight.shape[0]
    if (TensorDescriptor is None or not 1 < T <= SKINNY_MAX_ROWS or bias is not None or N < 8192 or K <= 2048
            or x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype or K % 8
            or x.data_ptr() % 16 or weight.data_ptr() % 16 or not weight.is_contiguous()
            or torch.cuda.get_device_capability(x.device)[0] < 9):
        return None
    return max(16, triton.next_power_of_2(T)), 128, 128, 4, 4


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, parts: bool = False) -> Tensor:
    """x @ weight.T (+ bias) for x [T, K]; the same as F.linear up to the order of its sums.

    One row (an AR step): `_gemv_kernel`. Up to SKINNY_MAX_ROWS rows (a tree step): `_skinny_kernel` where
    `skinny_config` has one, `_wide_kernel` where `wide_config` has one. Else (prefill chunks) cuBLAS. With
    `parts` the result is [chunks, T, N]: partial sums over chunks of the columns (fp32 if more than one) for
    the next kernel to add (`rope_and_cache`, `silu_mul`, `add_rms_norm`).
    """
    T, K = x.shape
    N = weight.shape[0]
    config = skinny_config(T, N, K) if 1 < T <= SKINNY_MAX_ROWS else None
    x = x.contiguous()
    wide = wide_config(x, weight, bias) if T > 1 and config is None else None
    if wide is not None:
        bm, bn, bk, warps, stages = wide
        y = torch.empty(T, N, dtype=x.dtype, device=x.device)
        _wide_kernel[(triton.cdiv(N, bn),)](TensorDescriptor(x, [T, K], [K, 1], [bm, bk]),
                                            TensorDescriptor(weight, [N, K], [K, 1], [bn, bk]), weight, y, T, N, K,
                                            BM=bm, BN=bn, BK=bk, STAGES=stages, PREFETCH=PREFETCH_LINES,
                                            num_warps=warps, **_launch_options(x.device))
        return y[None] if parts else y
    if T > 1 and config is None:
        out = torch.nn.functional.linear(x, weight, bias)
        return out[None] if parts else out
    b = bias if bias is not None else weight  # not read without HAS_BIAS
    if T == 1:
        y = torch.empty(T, N, dtype=x.dtype, device=x.device)
        bn, bk, warps = gemv_config(N, K)
        _gemv_kernel[(triton.cdiv(N, bn),)](x, weight, b, y, N, K, BN=bn, BK=bk, HAS_BIAS=bias is not None,
                                           num_warps=warps, **_launch_options(x.device))
        return y[None] if parts else y
    bm, bn, bk, warps, stages, chunks = config
    stages = max(1, min(stages, SHARED_MEMORY_BUDGET // ((bm + bn) * bk * x.element_size())))  # fp32 tiles: fewer
    chunk = triton.cdiv(triton.cdiv(K, chunks if parts else 1), bk) * bk
    chunks = triton.cdiv(K, chunk)
    if chunks > 1:
        y = torch.empty(chunks, T, N, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((1, T, N) if parts else (T, N), dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(N, bn), chunks)](x, weight, b, y, T, N, K, chunk, BM=bm, BN=bn, BK=bk,
                                                HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                                                PREFETCH=PREFETCH_LINES, num_warps=warps, num_stages=stages,
                                                **_launch_options(x.device))
    return y


def _parts(x: Tensor) -> tuple[int, int]:
    """(partial sums, rows) of a [T, N] tensor or of [parts, T, N] partial sums."""
    return (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])


def rope_and_cache(qkv: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, kv: Tensor, n_heads: int) -> Tensor:
    """Rotate q/k, write k/v at `slots` of this layer's cache [2, H_kv, S, D]; q as [H_kv, rep*T, D].
    qkv: [T, (H + 2 H_kv) D], or partial sums of it [parts, T, ...].

    A head of one token a program, four in steps of 33-64 rows: GPU time of a 64-row tree step on an H200
    (`.device/s21/knobs.py`), 1.5B 1,602 -> 1,593 µs, 7B 4,754 -> 4,692-4,707; no gain at 16 or 32 rows."""
    parts, T = _parts(qkv)
    _, hkv, S, D = kv.shape
    rep = n_heads // hkv
    q = torch.empty(hkv, rep * T, D, dtype=kv.dtype, device=qkv.device)
    bt = ROPE_TOKENS if T > SKINNY_MAX_ROWS else (TREE_ROPE_TOKENS if T > 32 else 1)
    _rope_cache_kernel[(triton.cdiv(T, bt), n_heads + 2 * hkv)](
        qkv, cos, sin, slots, kv, q, T, S, H=n_heads, HKV=hkv, REP=rep, D=D, HALF=D // 2, PARTS=parts, BT=bt,
        **_launch_options(q.device),
    )
    return q


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _row_blocks(rows: int) -> tuple[int, int]:
    """(folded query rows a program, row blocks) of `attention` over `rows` folded rows of a KV head."""
    per_block = 16 if rows <= 16 else 64
    return per_block, triton.cdiv(rows, per_block)


def splits_keys(q: Tensor) -> bool:
    """Whether `attention` spreads folded queries q [H_kv, rep*T, D] over the SMs by splitting the keys: its row
    blocks fill at most one wave. Then it beats SDPA for prefill chunks over a long cache, whose kernels give a
    program a block of one head's rows and all the keys (a few dozen programs for the 1.5B's 128-row chunk). GPU
    time of a prefill step, SDPA -> this, H200, random weights (`.device/s22/prefill.py`), ms: 1.5B 128 rows at
    slot 3,300 4.31-4.46 -> 2.15-2.19, 256 rows 4.74 -> 2.89, 512 rows 5.80 -> 4.79; 7B 128 rows 7.07-7.29 -> 5.50.
    Past one wave SDPA wins: 1.5B 1,024 rows 6.49 against 6.93 (slot 1,000), 7B 512 rows 13.5 against 14.4.
    Typing (`ahead bench keystrokes`, the real 1.5B): a keystroke's prefill, p50, 4.91-5.05 -> 2.91-2.96 ms."""
    return q.shape[0] * _row_blocks(q.shape[1])[1] <= multiprocessors(q.device)


def attention(q: Tensor, kv: Tensor, bias: Tensor, n_heads: int) -> Tensor:
    """Masked attention of folded queries q [H_kv, rep*T, D] over cache slots [0, L); bias: [T, L].

    Returns [T, H*D]. Split over the key axis so a one-token decode still fills the GPU.
    """
    hkv, R, D = q.shape
    T, L = bias.shape
    S = kv.shape[2]
    BR, row_blocks = _row_blocks(R)
    BL = 64
    tiles = triton.cdiv(L, BL)
    # Split the keys over as many programs as one wave of the SMs runs at once, and no more: a second wave
    # (allowed before) left a 48-row tree step's attention at 18.0 us a layer against 12.9 at 3,584 slots on an
    # H200, and splits rounded down to a power of two (14.5 us) left a third of the SMs idle.
    fit = max(1, min(tiles, multiprocessors(q.device) // (hkv * row_blocks)))
    per_split = triton.cdiv(tiles, fit)  # key tiles each program walks
    nsplit, chunk = triton.cdiv(tiles, per_split), per_split * BL
    m = torch.empty(hkv, nsplit, R, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty(hkv, nsplit, R, D, dtype=torch.float32, device=q.device)
    _attn_partial_kernel[(hkv, row_blocks, nsplit)](
        q, kv, bias, m, lse, acc, R, T, L, S, chunk, nsplit, D**-0.5,
        HKV=hkv, D=D, BR=BR, BL=BL, IEEE=q.dtype == torch.float32, **_launch_options(q.device),
    )
    out = torch.empty(T, n_heads * D, dtype=q.dtype, device=q.device)
    # The merge is a few loads a row: one warp a program, two rows each for a tree's hundreds of folded rows. On
    # an H100 (partial + merge, 2,560 slots) against a row a program on 4 warps: 64-row trees 20.3 -> 15.8 µs (7B
    # shape), 13.1 -> 9.7 (1.5B); decoding 6.9 -> 6.5 (7B), 6.2 -> 5.6 (1.5B). `.device/s13/combine_sweep.py`.
    rb = 1 if R <= 16 else 2
    _attn_combine_kernel[(hkv, triton.cdiv(R, rb))](m, lse, acc, out, R, T, nsplit, HKV=hkv, REP=n_heads // hkv,
                                                    D=D, SPLITS=triton.next_power_of_2(nsplit), RB=rb, num_warps=1,
                                                    **_launch_options(q.device))
    return out


def step_layout(base: Tensor, rel_pos: Tensor, local: Tensor, visible: int, dtype: torch.dtype
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(positions [T], slots [T], additive mask [T, visible]) of a step at slot `base` (a one-element tensor) whose
    rows sit at `rel_pos` after it and see the step's own rows where `local` [T, T] says: one launch, where
    torch's ops took 14 (~30 µs of a 1.5B step on an H200)."""
    T = rel_pos.shape[0]
    positions = torch.empty(T, dtype=torch.long, device=base.device)
    slots = torch.empty_like(positions)
    bias = torch.empty(T, visible, dtype=dtype, device=base.device)
    block = min(1024, triton.next_power_of_2(visible))
    _step_layout_kernel[(T, triton.cdiv(visible, block))](base, rel_pos, local, positions, slots, bias, T, visible,
                                                          BLOCK=block, **_launch_options(base.device))
    return positions, slots, bias


def silu_mul(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """silu(gate) * up for x = [gate | up] of shape [T, 2I], or partial sums of it [parts, T, 2I]; the result
    in `dtype` (default x's).

    On 8 warps (4 before): GPU time of the 1.5B's tree step on an H200 (`.device/s21/knobs.py`), 32 rows 1,607 ->
    1,574 µs, 16 rows 1,502 -> 1,490; unchanged at 64 rows, for AR and on the 7B."""
    parts, T = _parts(x)
    inter = x.shape[-1] // 2
    out = torch.empty(T, inter, dtype=dtype or x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(T, triton.cdiv(inter, block))](x, out, T, inter, PARTS=parts, BLOCK=block, num_warps=8,
                                                     **_launch_options(x.device))
    return out


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x += delta (in place: the residual stream), then RMSNorm(x) * weight, in one launch instead of two.
    delta: [T, dim], or partial sums of it [parts, T, dim].

    A row a program, on 16 warps from 2,048 columns on: each thread then holds a few of them, and a row's partial
    sums load in parallel. GPU time of whole steps on an H200 (`.device/s20/knobs.py`), 4 or 8 warps -> 16: the
    1.5B's AR step 1,209 -> 1,193 µs, its 64-row tree step 1,691 -> 1,595; the 7B's 3,781 -> 3,755 and 4,700 ->
    4,677."""
    T, dim = x.shape
    normed = torch.empty_like(x)
    block = triton.next_power_of_2(dim)
    _add_rms_norm_kernel[(T,)](x, delta, weight, normed, T, dim, eps, PARTS=_parts(delta)[0], BLOCK=block,
                               num_warps=16 if block >= 2048 else 4, **_launch_options(x.device))
    return normed


def argmax(logits: Tensor) -> Tensor:
    """Each row's argmax of [R, V] logits, the first one on ties as torch's: every 4096-wide chunk of a row is
    its own program, then one merges per row (torch's reduction took 22 µs for 64 rows of a 152k vocabulary
    on an H200, one block a row)."""
    R, V = logits.shape
    block = 4096
    chunks = triton.cdiv(V, block)
    vals = torch.empty(R, chunks, dtype=torch.float32, device=logits.device)
    ids = torch.empty(R, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(R, dtype=torch.long, device=logits.device)
    _argmax_chunk_kernel[(R, chunks)](logits, vals, ids, V, logits.stride(0), chunks, BLOCK=block, num_warps=8,
                                      **_launch_options(logits.device))
    _argmax_merge_kernel[(R,)](vals, ids, out, chunks, CB=triton.next_power_of_2(chunks),
                               **_launch_options(logits.device))
    return out


def top_k_probs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's k most likely ids (most likely first) and their softmax probabilities, for [R, V]
    logits. torch's topk + logsumexp take ~0.3 ms for 64 rows of a 152k vocabulary on an H200 (one
    block per row); here every 4096-wide chunk of a row is its own program, then one merges per row."""
    R, V = logits.shape
    block = 4096
    chunks = triton.cdiv(V, block)
    f32 = dict(dtype=torch.float32, device=logits.device)
    vals = torch.empty(R, chunks, k, **f32)
    ids = torch.empty(R, chunks, k, dtype=torch.int32, device=logits.device)
    maxes = torch.empty(R, chunks, **f32)
    sums = torch.empty(R, chunks, **f32)
    _top_k_chunk_kernel[(R, chunks)](logits, vals, ids, maxes, sums, V, logits.stride(0), chunks,
                                     K=k, BLOCK=block, num_warps=8, **_launch_options(logits.device))
    out_ids = torch.empty(R, k, dtype=torch.long, device=logits.device)
    out_probs = torch.empty(R, k, **f32)
    _top_k_merge_kernel[(R,)](vals, ids, maxes, sums, out_ids, out_probs, chunks,
                              K=k, CB=triton.next_power_of_2(chunks), CKB=triton.next_power_of_2(chunks * k),
                              **_launch_options(logits.device))
    return out_ids, out_probs


if triton is not None:

    @triton.jit
    def _draft_device_tree_kernel(seq, n_ptr, table, tokens, parent, rank, depth, chain, T, D, CAP,
                                  K: tl.constexpr, MATCH: tl.constexpr, BLOCK: tl.constexpr, TB: tl.constexpr):
        # One program: the latest longest match of the text's suffix, then the rows' tokens level by level
        # (a barrier between levels: each reads its parents' tokens, written by other threads).
        last = tl.load(n_ptr) - 1
        best = tl.full([], -1, tl.int64)
        for start in range(0, last, BLOCK):
            at = start + tl.arange(0, BLOCK).to(tl.int64)
            run = at < last
            length = tl.zeros([BLOCK], tl.int64)
            for k in tl.static_range(MATCH):
                ours = tl.load(seq + last - k, mask=last >= k, other=-2)
                run = run & (at >= k) & (tl.load(seq + at - k, mask=run & (at >= k), other=-1) == ours)
                length += run.to(tl.int64)
            best = tl.maximum(best, tl.max(tl.where(length > 0, length * CAP + at, -1), axis=0))
        after = tl.where(best >= 0, best % CAP, CAP - 2)  # no match: rows past the text, never right but harmless
        r = tl.arange(0, TB)
        in_chain = (r >= 1) & (r <= chain)
        copied = tl.load(seq + tl.minimum(after + r, CAP - 1), mask=in_chain, other=0)
        tl.store(tokens + r, tl.where(r == 0, tl.load(seq + last), copied), mask=(r == 0) | in_chain)
        tl.debug_barrier()
        rk = tl.load(rank + r, mask=r < T, other=-1)
        dp = tl.load(depth + r, mask=r < T, other=0)
        up = tl.load(parent + r, mask=r < T, other=0)
        for d in range(1, D + 1):
            level = (rk >= 0) & (dp == d)
            above = tl.load(tokens + up, mask=level, other=0)
            tl.store(tokens + r, tl.load(table + above * K + rk, mask=level, other=0), mask=level)
            tl.debug_barrier()

    @triton.jit
    def _verify_device_tree_kernel(tokens, greedy, parent, anc, depth, seq, n_ptr, commit, count, moves, T, D,
                                   TB: tl.constexpr, DB: tl.constexpr):
        # One program: a row is accepted where each row on its path is the greedy token after its parent; the
        # deepest accepted row's path and the greedy token after it are committed.
        r = tl.arange(0, TB)
        j = tl.arange(0, DB)
        a = tl.load(anc + r[:, None] * (D + 1) + j[None, :], mask=(r[:, None] < T) & (j[None, :] <= D), other=0)
        right = (tl.load(tokens + a) == tl.load(greedy + tl.load(parent + a))) | (a == 0)
        ok = (tl.min(right.to(tl.int32), axis=1) == 1) & (r < T)
        best = tl.max(tl.where(ok, tl.load(depth + r, mask=r < T, other=0) * T + (T - 1 - r), -1), axis=0)
        row, d = T - 1 - best % T, best // T
        on_path = tl.load(anc + row * (D + 1) + j + 1, mask=j < D, other=0)  # the path's row at depth j + 1
        out = tl.where(j < d, tl.load(tokens + on_path), tl.load(greedy + row))
        n = tl.load(n_ptr)
        tl.store(seq + n + j, out, mask=j <= D)
        tl.store(commit + j, out, mask=j <= D)
        moved = j < d
        tl.store(moves + j, tl.where(moved, n - 1 + on_path, 0), mask=j < D)
        tl.store(moves + D + j, tl.where(moved, n + j, 0), mask=j < D)
        tl.store(count, d + 1)
        tl.store(count + 1, row)
        tl.debug_barrier()  # every thread has read n
        tl.store(n_ptr, n + d + 1)


def draft_device_tree(seq: Tensor, n: Tensor, table: Tensor, tokens: Tensor, parent: Tensor, rank: Tensor,
                      depth: Tensor, chain: int, max_depth: int, match: int) -> None:
    """A device-drafted step's row tokens from the text `seq[:n]` and the recycling `table` (see
    `engine/device_tree.py`, whose torch `_draft` is the reference): one launch, where the reference is dozens."""
    T = tokens.shape[0]
    _draft_device_tree_kernel[(1,)](seq, n, table, tokens, parent, rank, depth, chain, T, max_depth,
                                    seq.shape[0] - max_depth - 2, K=table.shape[1], MATCH=match, BLOCK=1024,
                                    TB=triton.next_power_of_2(T), num_warps=4)


def verify_device_tree(tokens: Tensor, greedy: Tensor, parent: Tensor, anc: Tensor, depth: Tensor, seq: Tensor,
                       n: Tensor, commit: Tensor, count: Tensor, moves: Tensor) -> None:
    """Commit a device-drafted step's accepted path (torch reference: `DeviceTree._verify`): one launch."""
    T, D = tokens.shape[0], anc.shape[1] - 1
    _verify_device_tree_kernel[(1,)](tokens, greedy, parent, anc, depth, seq, n, commit, count, moves, T, D,
                                     TB=triton.next_power_of_2(T), DB=triton.next_power_of_2(D + 1), num_warps=4)
