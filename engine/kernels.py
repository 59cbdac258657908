"""Triton kernels for the CUDA decode path: fewer, fused launches per layer.

A 1.5B decode step is ~1 ms of weight traffic but ran ~3 ms as ~650 small kernels; most of
the excess was RoPE + KV-cache writes (6 kernels) and masked attention (4 kernels whose
softmax alone took 10 us). Here: one kernel rotates q/k, writes k/v into the cache slots and
lays q out for grouped-query attention; a split-K flash kernel does masked attention and
writes heads straight into the [T, H*D] layout the output projection reads; SiLU-gate is one
kernel, and so is each residual add with the RMSNorm after it. The CPU path (and the parity
tests) keep the plain torch code in model.py. Outside the model: the top-k successors and their
probabilities of each row of a step's logits (Token Recycling), in two launches.
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
        q, kv, bias, m_out, l_out, acc_out, R, T, L, S, chunk, nsplit, scale,
        HKV: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr, IEEE: tl.constexpr,
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
        part = (g * nsplit + sp) * R + rows
        tl.store(m_out + part, m_i, mask=row_ok)
        tl.store(l_out + part, l_i, mask=row_ok)
        tl.store(acc_out + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _attn_combine_kernel(
        m_in, l_in, acc_in, out, R, T, nsplit,
        HKV: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
    ):
        # SPLITS: nsplit rounded up to a power of two (a block's size), the padding masked off
        g = tl.program_id(0)
        row = tl.program_id(1)
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
        HKV=hkv, D=D, BR=BR, BL=BL, IEEE=q.dtype == torch.float32,
    )
    out = torch.empty(T, n_heads * D, dtype=q.dtype, device=q.device)
    _attn_combine_kernel[(hkv, R)](m, lse, acc, out, R, T, nsplit, HKV=hkv, REP=n_heads // hkv, D=D,
                                   SPLITS=triton.next_power_of_2(nsplit))
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
