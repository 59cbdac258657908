"""The engine's own decoder forward: Qwen2 and Llama in one compact module.

One entry point, `Transformer.forward(tokens, positions, slots, bias)`, serves prefill,
one-token decode and lookahead's 2D/tree steps alike: the caller says where each query
token sits (RoPE position), which KV-cache slot it writes, and which cache slots it may
see. Shapes depend only on the number of query tokens and the visible cache length, so a
step with fixed sizes can be captured once as a CUDA graph and replayed.

Tensor parallelism (Megatron-style): with a `Shard` of world size > 1 each process holds its
share of the query and KV heads (wqkv split by rows) and of the MLP (w13's gate and up halves
split by rows), and the row-split wo and w2 produce partial sums that one all-reduce per
projection completes. Embeddings, norms and the LM head are replicated; each process's KV cache
holds only its own KV heads. engine/parallel.py starts the processes and keeps them in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels


@dataclass(frozen=True)
class ModelArgs:
    arch: str  # "qwen2" or "llama": the only difference we model is the QKV bias
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_embeddings: bool

    @classmethod
    def from_hf_config(cls, config) -> ModelArgs:
        arch = config.model_type
        # transformers 5 keeps RoPE settings in rope_parameters; 4.x in rope_scaling (+ rope_theta).
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        theta = theta or getattr(config, "rope_theta", None) or 10000.0
        scaling = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if scaling not in ("default", None):
            raise ValueError(f"rope scaling '{scaling}' is not supported")
        # Refuse what the forward does not model rather than silently computing something else.
        if getattr(config, "mlp_bias", False) or (arch == "llama" and getattr(config, "attention_bias", False)):
            raise ValueError("biases on the attention output or MLP projections are not supported")
        if getattr(config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            arch=arch,
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            norm_eps=config.rms_norm_eps,
            rope_theta=float(theta),
            qkv_bias=arch == "qwen2",
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def shard_error(self, world: int) -> str | None:
        """Why this model cannot be split over `world` processes by heads and MLP columns, or None."""
        if self.n_kv_heads % world:
            return f"its {self.n_kv_heads} KV heads do not divide by --tp {world}"
        if self.intermediate_size % world:
            return f"its MLP width {self.intermediate_size} does not divide by --tp {world}"
        return None


@dataclass(frozen=True)
class Shard:
    """Which part of a tensor-parallel model this process holds: `rank` of `world`, whose partial
    outputs are summed over `group` (a torch.distributed process group; None: the default one)."""

    rank: int = 0
    world: int = 1
    group: object = None

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum a row-split projection's partial outputs across processes (in place); a no-op alone."""
        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x


WHOLE = Shard()  # the unsplit model of a single process


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused kernel on CUDA (it accumulates in fp32); a decode step runs 57 of these.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def rope_factors(cos: Tensor, sin: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[T, D/2] angles -> [T, 1, D] factors so that rope(x) = x*c + roll(x, D/2)*s.

    Built once per step and shared by all layers: rotate-half costs 3 kernels a layer, not 9.
    """
    c = torch.cat((cos, cos), dim=-1).to(dtype)
    s = torch.cat((-sin, sin), dim=-1).to(dtype)
    return c[:, None, :], s[:, None, :]


def apply_rope(x: Tensor, c: Tensor, s: Tensor) -> Tensor:
    # x: [T, H, D]. roll by D/2 gives cat(x2, x1); with s = cat(-sin, sin) that is rotate_half(x)*sin.
    return torch.addcmul(x * c, x.roll(x.shape[-1] // 2, dims=-1), s)


def rope_and_cache(qkv: Tensor, c: Tensor, s: Tensor, slots: Tensor, kv: Tensor, n_heads: int) -> Tensor:
    """Rotate q/k, write k/v at `slots` of this layer's cache [2, H_kv, S, D]; q as [H_kv, rep*T, D].

    Grouped-query attention without copying K/V: the query heads that share a KV head are folded
    into the query-length axis. `kernels.rope_and_cache` is the same in one CUDA kernel.
    """
    T = qkv.shape[0]
    _, hkv, _, D = kv.shape
    qk = apply_rope(qkv[:, : (n_heads + hkv) * D].view(T, n_heads + hkv, D), c, s)  # q and k rotated together
    q, k = qk[:, :n_heads], qk[:, n_heads:]
    v = qkv[:, (n_heads + hkv) * D :].view(T, hkv, D)
    kv[0].index_copy_(1, slots, k.transpose(0, 1))
    kv[1].index_copy_(1, slots, v.transpose(0, 1))
    rep = n_heads // hkv
    return q.reshape(T, hkv, rep, D).permute(1, 2, 0, 3).reshape(hkv, rep * T, D)


def folded_attention(q: Tensor, kv: Tensor, bias: Tensor, n_heads: int) -> Tensor:
    """Masked attention of folded queries q [H_kv, rep*T, D] over slots [0, L); returns [T, H*D]."""
    hkv, _, D = q.shape
    T, L = bias.shape
    rep = n_heads // hkv
    scores = torch.baddbmm(bias.repeat(rep, 1), q, kv[0, :, :L].transpose(1, 2), alpha=D**-0.5)
    out = torch.bmm(torch.softmax(scores, dim=-1), kv[1, :, :L])  # [H_kv, rep*T, D]
    return out.view(hkv, rep, T, D).permute(2, 0, 1, 3).reshape(T, n_heads * D)


BLOCK_ATTENTION_MIN_TOKENS = 64  # from here on torch's fused attention kernels win for prefill chunks on the CPU,
# and on CUDA for those too big for the Triton kernel to split their keys (`kernels.splits_keys`). Decoding steps
# of any size (a 64- or 128-row tree) keep the Triton kernel: with their arbitrary masks SDPA took a 64-row tree
# step from 2.1 to 4.1 ms on an H200


def block_attention(q: Tensor, kv: Tensor, bias: Tensor, n_heads: int, causal: bool = False) -> Tensor:
    """Attention for many query tokens through torch's fused SDPA kernels (prefill chunks).

    q: [H_kv, rep*T, D] as `kernels.rope_and_cache` folds it; kv: [2, H_kv, S, D]; bias: [T, L].
    Returns [T, H*D]. Each KV head serves its query heads in place where a kernel can (`grouped`);
    SDPA's other masked kernels want equal heads, so K/V are expanded for them. `causal` says the bias is
    the plain causal mask over T == L slots: SDPA then skips the masked half without reading a mask (a
    2,560-token prompt on an H200: 64 us a layer, against 133 us through the mask).
    """
    hkv, _, D = q.shape
    T, L = bias.shape
    rep = n_heads // hkv
    q = q.view(1, n_heads, T, D)  # folded rows (kv head, r, t) are query head kv*rep + r
    k, v, mask = kv[0:1, :, :L], kv[1:2, :, :L], bias.view(1, 1, T, L)
    if causal:
        if T != L:
            raise ValueError(f"causal attention of {T} queries over {L} slots: it needs the whole visible cache")
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)
    elif rep == 1 or grouped(q, k, v, mask):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=rep > 1)
    else:
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
                                             attn_mask=mask)
    return out[0].transpose(0, 1).reshape(T, n_heads * D)


def grouped(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> bool:
    """Whether SDPA runs grouped-query attention with a mask without falling back to its slow math kernel:
    on the CPU always; on CUDA where cuDNN's kernel takes it (an H200 prefill chunk of 1,024 tokens over
    3,072 slots: 78 us a layer against 107 us with K/V expanded; without cuDNN only math would run it)."""
    if not q.is_cuda:
        return True
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

    return can_use_cudnn_attention(SDPAParams(q, k, v, mask, 0.0, False, True))


def project(layer: nn.Linear, x: Tensor, parts: bool = False) -> Tensor:
    """A projection: on CUDA `kernels.linear` (Triton kernels for a decoding step's few rows), else nn.Linear.
    With `parts`, on CUDA the result may be partial sums [parts, T, N] that the next fused kernel adds up."""
    return kernels.linear(x, layer.weight, layer.bias, parts) if kernels.usable(x) else layer(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, shard: Shard = WHOLE):
        super().__init__()
        self.shard = shard
        # This process's heads: wqkv holds [q heads | k heads | v heads] of its share, wo its columns.
        self.n_heads, self.n_kv_heads = args.n_heads // shard.world, args.n_kv_heads // shard.world
        self.head_dim = args.head_dim
        q, kv = self.n_heads * args.head_dim, self.n_kv_heads * args.head_dim
        self.wqkv = nn.Linear(args.dim, q + 2 * kv, bias=args.qkv_bias)  # one matmul, not three
        self.wo = nn.Linear(q, args.dim, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], slots: Tensor, bias: Tensor, kv: Tensor,
                decoding: bool = False, causal: bool = False) -> Tensor:
        # x: [T, dim]; kv: this layer's cache [2, H_kv, S, D]; bias: [T, L] additive mask over slots [0, L),
        # plain causal over T == L slots where `causal`. Returns [T, dim]; on CUDA in one process, partial
        # sums of it [parts, T, dim] (see Block.fused).
        fused = kernels.usable(x)
        q = (kernels.rope_and_cache if fused else rope_and_cache)(project(self.wqkv, x, parts=True), *rope, slots, kv,
                                                                 self.n_heads)
        # A whole prompt's plain causal mask stays with SDPA, which skips its masked half.
        split = fused and (decoding or (not causal and kernels.splits_keys(q)))
        if x.shape[0] >= BLOCK_ATTENTION_MIN_TOKENS and not split:
            out = block_attention(q, kv, bias, self.n_heads, causal)
        elif fused:
            out = kernels.attention(q, kv, bias, self.n_heads)
        else:
            out = folded_attention(q, kv, bias, self.n_heads)
        # One process hands partial sums on to the fused add + norm (Block.fused); shards all-reduce whole ones.
        return self.shard.all_reduce(project(self.wo, out, parts=self.shard.world == 1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, shard: Shard = WHOLE):
        super().__init__()
        self.shard = shard
        self.intermediate_size = args.intermediate_size // shard.world  # this process's columns
        self.w13 = nn.Linear(args.dim, 2 * self.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(self.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # Returns [T, dim]; on CUDA in one process, partial sums of it [parts, T, dim] (see Block.fused).
        gate_up = project(self.w13, x, parts=True)
        if kernels.usable(x):
            return self.shard.all_reduce(project(self.w2, kernels.silu_mul(gate_up, x.dtype),
                                                 parts=self.shard.world == 1))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.shard.all_reduce(self.w2(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, shard: Shard = WHOLE):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, shard)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args, shard)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], slots: Tensor, bias: Tensor, kv: Tensor,
                causal: bool = False) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope, slots, bias, kv, causal=causal)
        return x + self.feed_forward(self.ffn_norm(x))

    def fused(self, x: Tensor, h: Tensor, next_norm: RMSNorm, rope: tuple[Tensor, Tensor], slots: Tensor,
              bias: Tensor, kv: Tensor, decoding: bool, causal: bool = False) -> Tensor:
        """The same on CUDA, with each residual add fused into the norm after it: `h` is this block's
        normed input, `x` the residual stream (updated in place); returns `next_norm` of the output. The
        attention and feed-forward outputs may come as partial sums, which the norm kernels add up."""
        h = self.attention(h, rope, slots, bias, kv, decoding, causal)
        h = kernels.add_rms_norm(x, h, self.ffn_norm.weight, self.ffn_norm.eps)
        return kernels.add_rms_norm(x, self.feed_forward(h), next_norm.weight, next_norm.eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, max_seq_len: int, shard: Shard = WHOLE):
        super().__init__()
        if shard.world > 1 and (why := args.shard_error(shard.world)):
            raise ValueError(f"the model cannot be split: {why}")
        self.args = args  # the whole model's shape, whatever this process holds of it
        self.shard = shard
        self.max_seq_len = max_seq_len
        # An explicit (empty) weight skips the init, which is ~1 s for Qwen's vocabulary even on
        # the meta device; real weights are assigned by loading.build_model anyway.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(Block(args, shard) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.kv: Tensor | None = None  # [n_layers, 2, H_kv / world, S, D], allocated by setup_cache
        self.rope_cos: Tensor | None = None  # [S, D/2] fp32, kept fp32 whatever the weights' dtype
        self.rope_sin: Tensor | None = None

    def setup_cache(self, dtype: torch.dtype | None = None) -> None:
        """Allocate the static KV cache once; every step writes into it by slot index."""
        a = self.args
        device = self.output.weight.device
        dtype = dtype or self.output.weight.dtype
        heads = a.n_kv_heads // self.shard.world
        self.kv = torch.zeros(a.n_layers, 2, heads, self.max_seq_len, a.head_dim, dtype=dtype, device=device)
        cos, sin = rope_tables(a.head_dim, self.max_seq_len, a.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, tokens: Tensor, positions: Tensor, slots: Tensor, bias: Tensor, logits: bool = True,
                causal: bool = False) -> Tensor:
        """tokens/positions/slots: [T]; bias: [T, L] additive mask in the model's dtype, 0 where a query may
        see a slot, -inf elsewhere; `causal`: the bias is plain causal over T == L slots (a prompt's first
        chunk), which attention may then skip reading.

        Returns logits [T, vocab] (or the final hidden states when `logits` is False, which
        prefill uses: it only needs the KV it writes).
        """
        assert self.kv is not None, "call setup_cache() first"
        x = self.tok_embeddings(tokens)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        rope = (cos, sin) if kernels.usable(x) else rope_factors(cos, sin, x.dtype)
        if kernels.usable(x):  # 57 norms and 56 adds become 57 launches for 28 layers
            h = self.layers[0].attention_norm(x)
            for i, layer in enumerate(self.layers):
                after = self.layers[i + 1].attention_norm if i + 1 < len(self.layers) else self.norm
                h = layer.fused(x, h, after, rope, slots, bias, self.kv[i], decoding=logits, causal=causal)
            return project(self.output, h) if logits else x
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, slots, bias, self.kv[i], causal)
        if not logits:
            return x
        return self.output(self.norm(x))
