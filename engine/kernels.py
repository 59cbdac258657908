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
1.5B's attention projections reached 730-1,170 GB/s on an H200, these 1,400-1,650. And on Hopper every
kernel here is launched with programmatic dependent launch (PDL): the next kernel is scheduled while the
one before it drains, and waits (`_await_inputs`) only where it reads what that one wrote. A 1.5B-shaped
one-token step's 28 layers took 1.11 ms so, against 1.51 ms with cuBLAS and no PDL.
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
    def _rope_cache_kernel(
        qkv, cos, sin, slots, kv, q_out, T, S,
        H: tl.constexpr, HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
        PDL: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        _await_inputs(PDL)
        half = HALF
        offs = tl.arange(0, HALF)
        row = qkv + t * (H + 2 * HKV) * D + h * D
        x1 = tl.load(row + offs).to(tl.float32)
        x2 = tl.load(row + half + offs).to(tl.float32)
        slot = tl.load(slots + t)
        if h < H + HKV:
            c = tl.load(cos + t * half + offs)
            s = tl.load(sin + t * half + offs)
            o1 = x1 * c - x2 * s
            o2 = x2 * c + x1 * s
            if h < H:
                g = h // REP
                r = h % REP
                dst = q_out + (g * REP * T + r * T + t) * D
            else:
                dst = kv + ((h - H) * S + slot) * D
            tl.store(dst + offs, o1.to(q_out.dtype.element_ty))
            tl.store(dst + half + offs, o2.to(q_out.dtype.element_ty))
        else:
            dst = kv + HKV * S * D + ((h - H - HKV) * S + slot) * D
            tl.store(dst + offs, x1.to(q_out.dtype.element_ty))
            tl.store(dst + half + offs, x2.to(q_out.dtype.element_ty))

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
        HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
    ):
        # SPLITS: nsplit rounded up to a power of two (a block's size), the padding masked off
        g = tl.program_id(0)
        row = tl.program_id(1)
        _await_inputs(PDL)
        splits = tl.arange(0, SPLITS)
        used = splits < nsplit
        dims = tl.arange(0, D)
        part = (g * nsplit + splits) * R + row
        m = tl.load(m_in + part, mask=used, other=float("-inf"))
        lsum = tl.load(l_in + part, mask=used, other=0.0)
        big = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - big))
        acc = tl.load(acc_in + part[:, None] * D + dims[None, :], mask=used[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
        r = row // T
        t = row % T
        h = g * REP + r
        tl.store(out + (t * HKV * REP + h) * D + dims, o.to(out.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(x, out, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
        t = tl.program_id(0)
        _await_inputs(PDL)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < inter
        gate = tl.load(x + t * 2 * inter + offs, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x + t * 2 * inter + inter + offs, mask=ok, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out + t * inter + offs, y.to(out.dtype.element_ty), mask=ok)

    @triton.jit
    def _add_rms_norm_kernel(x, delta, weight, normed, dim, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
        t = tl.program_id(0)
        _await_inputs(PDL)
        offs = tl.arange(0, BLOCK)
        ok = offs < dim
        y = tl.load(x + t * dim + offs, mask=ok, other=0.0).to(tl.float32)
        y += tl.load(delta + t * dim + offs, mask=ok, other=0.0).to(tl.float32)
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
    def _skinny_kernel(x, w, b, y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
        # y[M, N] = x[M, K] @ w[N, K]^T (+ b) for a few rows (M <= BM): each program owns BN outputs of every row.
        outs = tl.program_id(0) * BN + tl.arange(0, BN)
        outs_in = tl.minimum(outs, N - 1)
        rows = tl.arange(0, BM)
        ks = tl.arange(0, BK)
        _await_inputs(PDL)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, K, BK):
            c = k0 + ks
            xt = tl.load(x + rows[:, None] * K + c[None, :], mask=(rows < M)[:, None] & (c < K)[None, :], other=0.0)
            wt = tl.load(w + outs_in[:, None] * K + c[None, :], mask=(c < K)[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(wt), acc)
        if HAS_BIAS:
            acc += tl.load(b + outs_in).to(tl.float32)[None, :]
        tl.store(y + rows[:, None] * N + outs[None, :], acc.to(y.dtype.element_ty),
                 mask=(rows < M)[:, None] & (outs < N)[None, :])

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
SKINNY_MAX_ROWS = 64  # a step of up to this many rows may run `_skinny_kernel`; longer (prefill) chunks use cuBLAS
SKINNY_MAX_WEIGHTS = 8 << 20  # ... on a weight of at most this many elements: past it cuBLAS kept up or won


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(rows a program, columns a step, warps) for one-row products, from a sweep on an H200 (1.5B shapes,
    28 weights cycled): wide outputs (gate/up, the LM head) want many small programs; the attention and
    down projections want few rows and whole 2,048-column tiles."""
    if n >= 8192:
        return 8, 256, 4
    return (4 if n >= 2048 else 2), min(2048, triton.next_power_of_2(k)), 8


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias) for x [T, K]; the same as F.linear up to the order of its sums.

    One row (an AR step): `_gemv_kernel`. A few rows on a small weight (a tree step's attention projections
    on the 1.5B): `_skinny_kernel`, 16 outputs a program. The rest is cuBLAS's: on an H200 at 48 rows it
    matched these kernels on the 1.5B's gate/up and down projections and beat them on the 7B's."""
    T, K = x.shape
    N = weight.shape[0]
    if T > 1 and (T > SKINNY_MAX_ROWS or N * K > SKINNY_MAX_WEIGHTS):
        return torch.nn.functional.linear(x, weight, bias)
    x = x.contiguous()
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else weight  # not read without HAS_BIAS
    if T == 1:
        bn, bk, warps = gemv_config(N, K)
        _gemv_kernel[(triton.cdiv(N, bn),)](x, weight, b, y, N, K, BN=bn, BK=bk, HAS_BIAS=bias is not None,
                                           num_warps=warps, **_launch_options(x.device))
        return y
    bm, bn, bk = max(16, triton.next_power_of_2(T)), 16, 256
    stages = max(1, min(4, SHARED_MEMORY_BUDGET // ((bm + bn) * bk * x.element_size())))  # fp32 tiles: fewer
    _skinny_kernel[(triton.cdiv(N, bn),)](x, weight, b, y, T, N, K, BM=bm, BN=bn, BK=bk, HAS_BIAS=bias is not None,
                                         IEEE=x.dtype == torch.float32, num_warps=4, num_stages=stages,
                                         **_launch_options(x.device))
    return y


def rope_and_cache(qkv: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, kv: Tensor, n_heads: int) -> Tensor:
    """Rotate q/k, write k/v at `slots` of this layer's cache [2, H_kv, S, D]; q as [H_kv, rep*T, D]."""
    T = qkv.shape[0]
    _, hkv, S, D = kv.shape
    rep = n_heads // hkv
    q = torch.empty(hkv, rep * T, D, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(T, n_heads + 2 * hkv)](
        qkv, cos, sin, slots, kv, q, T, S, H=n_heads, HKV=hkv, REP=rep, D=D, HALF=D // 2,
        **_launch_options(q.device),
    )
    return q


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def attention(q: Tensor, kv: Tensor, bias: Tensor, n_heads: int) -> Tensor:
    """Masked attention of folded queries q [H_kv, rep*T, D] over cache slots [0, L); bias: [T, L].

    Returns [T, H*D]. Split over the key axis so a one-token decode still fills the GPU.
    """
    hkv, R, D = q.shape
    T, L = bias.shape
    S = kv.shape[2]
    BR = 16 if R <= 16 else 64
    BL = 64
    row_blocks = triton.cdiv(R, BR)
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
    _attn_combine_kernel[(hkv, R)](m, lse, acc, out, R, T, nsplit, HKV=hkv, REP=n_heads // hkv, D=D,
                                   SPLITS=triton.next_power_of_2(nsplit), **_launch_options(q.device))
    return out


def silu_mul(x: Tensor) -> Tensor:
    """silu(gate) * up for x = [gate | up] of shape [T, 2I]."""
    T, two_i = x.shape
    inter = two_i // 2
    out = torch.empty(T, inter, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(T, triton.cdiv(inter, block))](x, out, inter, BLOCK=block, **_launch_options(x.device))
    return out


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x += delta (in place: the residual stream), then RMSNorm(x) * weight, in one launch instead of two."""
    T, dim = x.shape
    normed = torch.empty_like(x)
    block = triton.next_power_of_2(dim)
    _add_rms_norm_kernel[(T,)](x, delta, weight, normed, dim, eps, BLOCK=block, num_warps=8 if block >= 4096 else 4,
                               **_launch_options(x.device))
    return normed


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
