"""Triton kernels for the CUDA decode path: fewer, fused launches per layer.

A 1.5B decode step is ~1 ms of weight traffic but ran ~3 ms as ~650 small kernels; most of
the excess was RoPE + KV-cache writes (6 kernels) and masked attention (4 kernels whose
softmax alone took 10 us). Here: one kernel rotates q/k, writes k/v into the cache slots and
lays q out for grouped-query attention; a split-K flash kernel does masked attention and
writes heads straight into the [T, H*D] layout the output projection reads; SiLU-gate is one
kernel, and so is each residual add with the RMSNorm after it. The CPU path (and the parity
tests) keep the plain torch code in model.py. Outside the model: the top-k successors and their
probabilities of each row of a step's logits (Token Recycling), in two launches. `gemv`: the one-token
step's x @ W.T + b as one weight-streaming kernel (cuBLAS reaches ~50% of HBM bandwidth on these small shapes).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from torch import Tensor

try:  # triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

ENABLED = triton is not None and os.environ.get("AHEAD_NO_TRITON", "") != "1"
GEMV = ENABLED and os.environ.get("AHEAD_GEMV", "0") == "1"  # one-token projections through `gemv`


def usable(x: Tensor) -> bool:
    return ENABLED and x.is_cuda


if triton is not None:

    @triton.jit
    def _rope_cache_kernel(
        qkv, cos, sin, slots, kv, q_out, T, S,
        H: tl.constexpr, HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
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
        q, kv, bias, m_out, l_out, acc_out, R, T, L, S, chunk, scale,
        HKV: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr, NSPLIT: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        g = tl.program_id(0)
        rb = tl.program_id(1)
        sp = tl.program_id(2)
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
        part = (g * NSPLIT + sp) * R + rows
        tl.store(m_out + part, m_i, mask=row_ok)
        tl.store(l_out + part, l_i, mask=row_ok)
        tl.store(acc_out + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _attn_combine_kernel(
        m_in, l_in, acc_in, out, R, T,
        HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr,
    ):
        g = tl.program_id(0)
        row = tl.program_id(1)
        splits = tl.arange(0, NSPLIT)
        dims = tl.arange(0, D)
        part = (g * NSPLIT + splits) * R + row
        m = tl.load(m_in + part)
        lsum = tl.load(l_in + part)
        big = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - big))
        acc = tl.load(acc_in + part[:, None] * D + dims[None, :])
        o = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
        r = row // T
        t = row % T
        h = g * REP + r
        tl.store(out + (t * HKV * REP + h) * D + dims, o.to(out.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(x, out, inter, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < inter
        gate = tl.load(x + t * 2 * inter + offs, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x + t * 2 * inter + inter + offs, mask=ok, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out + t * inter + offs, y.to(out.dtype.element_ty), mask=ok)

    @triton.jit
    def _add_rms_norm_kernel(x, delta, weight, normed, dim, eps, BLOCK: tl.constexpr):
        t = tl.program_id(0)
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
    def _top_k_chunk_kernel(logits, vals, ids, maxes, sums, V, stride, C, K: tl.constexpr, BLOCK: tl.constexpr):
        # One chunk of one row: its max, its sum of exp(x - max), and its K largest values with their ids.
        r = tl.program_id(0)
        c = tl.program_id(1)
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
                            K: tl.constexpr, CB: tl.constexpr, CKB: tl.constexpr):
        # One row: the K best of its chunks' candidates, as probabilities under the whole row's softmax.
        r = tl.program_id(0)
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


def rope_and_cache(qkv: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, kv: Tensor, n_heads: int) -> Tensor:
    """Rotate q/k, write k/v at `slots` of this layer's cache [2, H_kv, S, D]; q as [H_kv, rep*T, D]."""
    T = qkv.shape[0]
    _, hkv, S, D = kv.shape
    rep = n_heads // hkv
    q = torch.empty(hkv, rep * T, D, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(T, n_heads + 2 * hkv)](
        qkv, cos, sin, slots, kv, q, T, S, H=n_heads, HKV=hkv, REP=rep, D=D, HALF=D // 2
    )
    return q


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
    nsplit = 1
    while nsplit * 2 <= tiles and hkv * row_blocks * nsplit * 2 <= 264:  # ~2 waves on 132 SMs
        nsplit *= 2
    chunk = triton.cdiv(tiles, nsplit) * BL
    m = torch.empty(hkv, nsplit, R, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty(hkv, nsplit, R, D, dtype=torch.float32, device=q.device)
    _attn_partial_kernel[(hkv, row_blocks, nsplit)](
        q, kv, bias, m, lse, acc, R, T, L, S, chunk, D**-0.5,
        HKV=hkv, D=D, BR=BR, BL=BL, NSPLIT=nsplit, IEEE=q.dtype == torch.float32,
    )
    out = torch.empty(T, n_heads * D, dtype=q.dtype, device=q.device)
    _attn_combine_kernel[(hkv, R)](m, lse, acc, out, R, T, HKV=hkv, REP=n_heads // hkv, D=D, NSPLIT=nsplit)
    return out


def silu_mul(x: Tensor) -> Tensor:
    """silu(gate) * up for x = [gate | up] of shape [T, 2I]."""
    T, two_i = x.shape
    inter = two_i // 2
    out = torch.empty(T, inter, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(T, triton.cdiv(inter, block))](x, out, inter, BLOCK=block)
    return out


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x += delta (in place: the residual stream), then RMSNorm(x) * weight, in one launch instead of two."""
    T, dim = x.shape
    normed = torch.empty_like(x)
    block = triton.next_power_of_2(dim)
    _add_rms_norm_kernel[(T,)](x, delta, weight, normed, dim, eps, BLOCK=block, num_warps=8 if block >= 4096 else 4)
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
                                     K=k, BLOCK=block, num_warps=8)
    out_ids = torch.empty(R, k, dtype=torch.long, device=logits.device)
    out_probs = torch.empty(R, k, **f32)
    _top_k_merge_kernel[(R,)](vals, ids, maxes, sums, out_ids, out_probs, chunks,
                              K=k, CB=triton.next_power_of_2(chunks), CKB=triton.next_power_of_2(chunks * k))
    return out_ids, out_probs


# --- GEMV for the one-token decode step -----------------------------------------------------------------------

_GEMV_SMS = 132  # H100 / H200 SXM; the launch config is a pure function of the shape, so graphs capture it


class GemvConfig(NamedTuple):
    """Launch config of `gemv`: each program reduces block_n rows over block_k-wide chunks of K.

    split_k > 1 (a power of two) gives each program 1/split_k of K; a second launch then sums the
    fp32 partials in a fixed order (no atomics, so results are deterministic). num_stages None is Triton's default.
    """

    block_n: int
    block_k: int
    num_warps: int
    split_k: int = 1
    num_stages: int | None = None


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=256)
def gemv_config(n: int, k: int, elem_size: int) -> GemvConfig:
    """A fixed heuristic, not an autotuner: graphs need one launch config per shape, chosen without timing.

    A decode GEMV is latency-bound on a few MiB: by Little's law (~3.3 TB/s x ~1 us) the GPU must hold ~3 MB
    of loads in flight to reach HBM bandwidth. So each program loads a 16 KiB tile per step (32 values per
    thread), whole rows at once where K allows; rows per program shrink until there are >= 2 programs per
    SM; only when rows are still too few is K split.
    """
    tile = 16384 // elem_size
    block_k = min(_pow2_at_least(k), tile // 4)
    block_n = max(1, tile // block_k)
    while block_n > 1 and -(-n // block_n) < 2 * _GEMV_SMS:
        block_n //= 2
    split = 1
    steps = -(-k // block_k)
    while -(-n // block_n) * split < _GEMV_SMS and steps >= 4 * split and split < 8:
        split *= 2
    return GemvConfig(block_n, block_k, max(1, min(8, block_n * block_k // 1024)), split)


if triton is not None:

    @triton.jit
    def _gemv_kernel(x, w, bias, out, N, K, stride_w, k_chunk,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
        # Rows [pid_n*BLOCK_N, +BLOCK_N) over K range [pid_k*k_chunk, +k_chunk) ∩ [0, K): products accumulate
        # elementwise in fp32 and are reduced across K once, after the loop.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        w_rows = w + rows[:, None].to(tl.int64) * stride_w
        lo = pid_k * k_chunk
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, k_chunk, BLOCK_K):  # k_chunk: whole blocks; EVEN_K: no chunk runs past K
            ks = lo + k0 + cols
            if EVEN_K:
                xk = tl.load(x + ks).to(tl.float32)
                wk = tl.load(w_rows + ks[None, :], mask=row_ok[:, None], other=0.0)
            else:
                k_ok = ks < K
                xk = tl.load(x + ks, mask=k_ok, other=0.0).to(tl.float32)
                wk = tl.load(w_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc += wk.to(tl.float32) * xk[None, :]
        y = tl.sum(acc, axis=1)
        if SPLIT == 1:
            if HAS_BIAS:
                y += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(out + rows, y.to(out.dtype.element_ty), mask=row_ok)
        else:
            tl.store(out + pid_k * N + rows, y, mask=row_ok)

    @triton.jit
    def _gemv_split_sum_kernel(part, bias, out, N, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                               BLOCK: tl.constexpr):
        # Split-K's second launch: each output is its SPLIT fp32 partials summed in one fixed order.
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        p = tl.load(part + tl.arange(0, SPLIT)[:, None] * N + rows[None, :], mask=ok[None, :], other=0.0)
        y = tl.sum(p, axis=0)
        if HAS_BIAS:
            y += tl.load(bias + rows, mask=ok, other=0.0).to(tl.float32)
        tl.store(out + rows, y.to(out.dtype.element_ty), mask=ok)


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None, config: GemvConfig | None = None) -> Tensor:
    """x @ weight.T + bias for one row x [1, K] and an nn.Linear weight [N, K]; [1, N] in x's dtype.

    cuBLAS reaches ~50% of HBM bandwidth on a decode step's projections; this streams the weight once with
    fp32 accumulation. `config` overrides the heuristic (gemv_config), for tuning.
    """
    n, k = weight.shape
    assert x.numel() == k and x.shape[-1] == k, (x.shape, weight.shape)
    assert weight.stride(1) == 1, "weight rows must be contiguous along K"
    x = x.contiguous()
    cfg = config or gemv_config(n, k, weight.element_size())
    split = cfg.split_k
    assert split & (split - 1) == 0, "split_k must be a power of two"
    k_chunk = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k  # whole blocks per split
    even_k = k_chunk * split == k  # every split's chunk lies inside K: no masks along K
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    has_bias = bias is not None
    b = bias if has_bias else weight  # any pointer: never read
    stages = {} if cfg.num_stages is None else {"num_stages": cfg.num_stages}
    grid = (triton.cdiv(n, cfg.block_n), split)
    if split == 1:
        _gemv_kernel[grid](x, weight, b, out, n, k, weight.stride(0), k_chunk, BLOCK_N=cfg.block_n,
                           BLOCK_K=cfg.block_k, EVEN_K=even_k, HAS_BIAS=has_bias, SPLIT=1,
                           num_warps=cfg.num_warps, **stages)
        return out
    part = torch.empty(split, n, dtype=torch.float32, device=x.device)
    _gemv_kernel[grid](x, weight, b, part, n, k, weight.stride(0), k_chunk, BLOCK_N=cfg.block_n,
                       BLOCK_K=cfg.block_k, EVEN_K=even_k, HAS_BIAS=False, SPLIT=split,
                       num_warps=cfg.num_warps, **stages)
    block = 1024
    _gemv_split_sum_kernel[(triton.cdiv(n, block),)](part, b, out, n, HAS_BIAS=has_bias, SPLIT=split, BLOCK=block,
                                                     num_warps=4)
    return out
