"""Resolve a model spec to a config, a tokenizer and weights, and build the engine's model.

A spec is: nothing (the embedded default), a `.gguf` file, a local directory with
config.json + *.safetensors, or a Hugging Face repo id resolved through the local HF cache.
Weights arrive with Hugging Face parameter names, so the same tensors can feed the
reference implementation in tests and benchmarks; `build_model` fuses them for our forward.
A GGUF is dequantized once: the converted tensors are cached on disk (engine/weight_cache.py).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import weight_cache
from .default_model import NAME, cache_dir, choose_default_model, default_model_path, hf_hub_cache, hub_offline
from .errors import AheadError
from .model import WHOLE, ModelArgs, Shard, Transformer

SUPPORTED = ("qwen2", "llama")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Checkpoint:
    config: object  # transformers PretrainedConfig
    tokenizer: object  # transformers tokenizer (fast)
    state_dict: dict[str, Tensor]  # Hugging Face parameter names
    source: str


def load_checkpoint(
    spec: str | None = None,
    log: Log = stderr_log,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Checkpoint:
    """Config, tokenizer and HF-named weights for `spec`, the weights in `dtype` (None: as stored,
    fp32 for a GGUF). With no spec and a `device`, the default model is chosen to fit that device."""
    if spec in (None, "") and device is not None:
        return load_default(device, dtype, log)
    if spec in (None, "", "default"):
        return load_gguf(default_model_path(log), log, dtype)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise AheadError(f"{path} is not a .gguf file; pass a .gguf, a model directory or a Hugging Face id")
        return load_gguf(path, log, dtype)
    if path.is_dir():
        return load_directory(path, log, dtype)
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        raise AheadError(f"model path {spec} does not exist")
    return load_directory(resolve_hub_id(spec, log), log, dtype)


def load_default(device: torch.device, dtype: torch.dtype | None, log: Log) -> Checkpoint:
    """The Qwen2.5-Coder base that fits the GPU, else (or when it cannot be had) the embedded default."""
    repo = choose_default_model(device, log, dtype or torch.bfloat16)
    if repo is not None:
        try:
            return load_directory(resolve_hub_id(repo, log), log, dtype)
        except AheadError as exc:
            log(f"ahead: {repo} is unusable ({exc}); falling back to the embedded default {NAME}")
    return load_gguf(default_model_path(log), log, dtype)


def reload_weights(source: str, dtype: torch.dtype | None = None, log: Log = stderr_log) -> dict[str, Tensor]:
    """HF-named weights of a checkpoint whose host copy was released (`Checkpoint.source`), e.g. for a
    reference model in a benchmark: a GGUF's come memory-mapped from the converted-weights cache."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        target = dtype or torch.float32
        state = weight_cache.read(weight_cache.cache_path(path, target), target, log)
        if state is not None:
            return state
    return load_checkpoint(source, log, dtype).state_dict


def release_weights(ckpt: Checkpoint) -> None:
    """Drop the checkpoint's host copy of the weights once the model is built: the model holds its own
    (on the GPU, or fused), and a 7B model's copy would otherwise pin 15 GB of RAM for the engine's life."""
    ckpt.state_dict.clear()
    gc.collect()
    try:  # hand freed heap pages back to the OS (glibc only); big tensors are unmapped anyway
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve_hub_id(repo_id: str, log: Log) -> Path:
    """Find a repo in the local HF cache; download it only when the hub is allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
    offline = hub_offline()
    cache = hf_hub_cache()  # read now, not at huggingface_hub's import: HF_HOME may have changed since
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, cache_dir=cache))
    except LocalEntryNotFoundError:
        if offline:
            raise AheadError(
                f"model '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                "download it first or pass a local path"
            ) from None
    except Exception as exc:  # malformed ids and the like
        raise AheadError(f"'{repo_id}' is neither a local path nor a usable Hugging Face id ({exc})") from None
    log(f"ahead: downloading {repo_id} from the Hugging Face hub ...")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache))
    except Exception as exc:
        raise AheadError(f"could not download '{repo_id}': {exc}".splitlines()[0]) from None


def check_architecture(config) -> None:
    if config.model_type not in SUPPORTED:
        raise AheadError(
            f"architecture '{config.model_type}' is not supported (supported: {', '.join(SUPPORTED)})"
        )


def load_directory(path: Path, log: Log, dtype: torch.dtype | None = None) -> Checkpoint:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    ggufs = sorted(path.glob("*.gguf"))
    shards = sorted(path.glob("*.safetensors"))
    if not shards and len(ggufs) == 1:
        return load_gguf(ggufs[0], log, dtype)
    if not (path / "config.json").is_file():
        raise AheadError(f"{path} has no config.json; a model directory needs config.json and *.safetensors")
    if not shards:
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise AheadError(
                f"{path} holds only pickle weights, which ahead refuses to load; convert them to safetensors"
            )
        raise AheadError(f"{path} has no *.safetensors weights")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise AheadError(f"{path / 'config.json'} is unreadable: {exc}") from None
    if model_type not in SUPPORTED:
        raise AheadError(f"architecture '{model_type}' is not supported (supported: {', '.join(SUPPORTED)})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers would quietly build an empty tokenizer here, and every completion be blank.
        raise AheadError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        check_architecture(config)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except AheadError:
        raise
    except Exception as exc:
        raise AheadError(f"{path} holds an unreadable config or tokenizer ({str(exc).splitlines()[0]})") from None
    log(f"ahead: loading {len(shards)} safetensors shard(s) from {path}")
    state: dict[str, Tensor] = {}
    for shard in shards:
        try:
            state.update(load_file(shard))
        except Exception as exc:
            raise AheadError(f"{shard} is corrupt or truncated ({exc}); download it again") from None
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return Checkpoint(config, tokenizer, state, str(path))


GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}
GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in GGUF_NAMES:
        return GGUF_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute_rope(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's Q/K row permutation for Llama (interleaved -> rotate-half layout).

    llama.cpp's convert does reshape(n_heads, 2, half, ...).swapaxes(1, 2); the inverse reads
    the rows as (n_heads, half, 2) and swaps back.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tokenizer_and_config(path: Path, log: Log):
    """Config and tokenizer from transformers' GGUF readers, cached: converting Qwen's takes ~30 s."""
    from transformers import AutoConfig, AutoTokenizer

    with open(path, "rb") as f:  # identify the file by size and head, not by mtime: copies hit too
        head = hashlib.sha256(f.read(1 << 22)).hexdigest()[:16]
    key = f"{path.stem}-{path.stat().st_size}-{head}"
    cached = cache_dir() / "gguf-meta" / key
    if (cached / "config.json").is_file():
        try:
            return AutoConfig.from_pretrained(cached), AutoTokenizer.from_pretrained(cached)
        except Exception:
            pass  # stale or written by another transformers version: rebuild below
    log(f"ahead: reading tokenizer and config from {path.name} (once; cached afterwards)")
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        check_architecture(config)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except AheadError:
        raise
    except Exception as exc:
        raise AheadError(f"{path} is not a readable GGUF model ({str(exc).splitlines()[0]})") from None
    try:
        cached.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(cached)
        tokenizer.save_pretrained(cached)
    except OSError:
        pass  # a read-only cache only costs time
    return config, tokenizer


def load_gguf(path: Path, log: Log, dtype: torch.dtype | None = None) -> Checkpoint:
    """A GGUF's weights in `dtype` (None: fp32), dequantized once and memory-mapped from the cache after."""
    config, tokenizer = gguf_tokenizer_and_config(path, log)
    target = dtype or torch.float32
    cached = weight_cache.cache_path(path, target)
    state = weight_cache.read(cached, target, log)
    if state is not None:
        log(f"ahead: loading cached weights {cached}")
    else:
        log(f"ahead: dequantizing {path.name} to {weight_cache.dtype_name(target)} (once; cached at {cached})")
        state = dequantize_gguf(path, config, target)
        weight_cache.write(cached, state, path, log)
    return Checkpoint(config, tokenizer, state, str(path))


def dequantize_gguf(path: Path, config, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every tensor of the GGUF as a plain `dtype` tensor with its Hugging Face name (the slow part)."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise AheadError("reading .gguf files needs the 'gguf' package: pip install gguf") from None
    try:
        reader = GGUFReader(path)
    except Exception as exc:
        raise AheadError(f"{path} is not a readable GGUF file ({exc})") from None

    def convert(t):
        name = hf_name(t.name)
        if name is None:
            return None
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rope(w, config.num_attention_heads)
        elif config.model_type == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rope(w, config.num_key_value_heads)
        return name, w.to(dtype).contiguous()  # converted per tensor: peak memory stays one model's worth

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(item for item in pool.map(convert, reader.tensors) if item is not None)


def fused_state_dict(hf: Mapping[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Rename HF weights to ours, fusing Q/K/V and gate/up so each is one matmul."""
    out: dict[str, Tensor] = {
        "tok_embeddings.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
    }
    tied = args.tie_embeddings or "lm_head.weight" not in hf
    out["output.weight"] = out["tok_embeddings.weight"] if tied else hf["lm_head.weight"]  # tied: one tensor
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        out[f"layers.{i}.attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat([hf[attn + f"{x}_proj.weight"] for x in "qkv"])
        if args.qkv_bias:
            out[f"layers.{i}.attention.wqkv.bias"] = torch.cat([hf[attn + f"{x}_proj.bias"] for x in "qkv"])
        out[f"layers.{i}.attention.wo.weight"] = hf[attn + "o_proj.weight"]
        gate_up = [hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]]
        out[f"layers.{i}.feed_forward.w13.weight"] = torch.cat(gate_up)
        out[f"layers.{i}.feed_forward.w2.weight"] = hf[mlp + "down_proj.weight"]
    return out


def weight_bytes(args: ModelArgs, dtype: torch.dtype, world: int = 1) -> int:
    """Bytes of weights one process holds when the model is split over `world` (embeddings replicated)."""
    per_layer = (
        args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        + args.n_heads * args.head_dim * args.dim
        + 3 * args.dim * args.intermediate_size
    ) // world
    embed = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    return (args.n_layers * per_layer + embed) * torch.finfo(dtype).bits // 8


def kv_bytes(args: ModelArgs, max_seq_len: int, dtype: torch.dtype, world: int = 1) -> int:
    heads = args.n_kv_heads // world
    return 2 * args.n_layers * heads * args.head_dim * max_seq_len * torch.finfo(dtype).bits // 8


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AheadError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise AheadError(f"unknown device '{device}' (use cpu or cuda)")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise AheadError(f"unknown dtype '{dtype}' (use fp32 or bf16)")
    return table[dtype]


class OnDevice(Mapping):
    """A read-only view of HF weights that hands each one out on `device` in `dtype`."""

    def __init__(self, weights: dict[str, Tensor], device: torch.device, dtype: torch.dtype):
        self.weights, self.device, self.dtype = weights, device, dtype

    def __getitem__(self, name: str) -> Tensor:
        return self.weights[name].to(device=self.device, dtype=self.dtype)

    def __iter__(self):
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


# Megatron splits of the HF projections: column-parallel ones by output rows, row-parallel ones by inputs.
SPLIT_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


class ShardOf(Mapping):
    """A read-only view of HF weights that hands out only `shard`'s part of each split projection.

    Sliced before `OnDevice` moves them, so each GPU receives its share, never the whole weight.
    Heads stay whole: q/k/v rows split evenly are whole heads, and rank r's query heads are the
    ones that share its KV heads.
    """

    def __init__(self, weights: Mapping[str, Tensor], shard: Shard):
        self.weights, self.shard = weights, shard

    def __getitem__(self, name: str) -> Tensor:
        w = self.weights[name]
        parts = name.split(".")
        dim = SPLIT_DIM.get(parts[-2]) if len(parts) >= 2 else None
        if dim is None or self.shard.world == 1:
            return w
        return w.chunk(self.shard.world, dim)[self.shard.rank].contiguous()

    def __iter__(self):
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def build_model(
    ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, max_seq_len: int, shard: Shard = WHOLE
) -> Transformer:
    """Our Transformer (or `shard`'s part of it) with the checkpoint's weights and a KV cache on `device`."""
    try:
        args = ModelArgs.from_hf_config(ckpt.config)
    except ValueError as exc:
        raise AheadError(f"{ckpt.source}: {exc}") from None
    if shard.world > 1 and (why := args.shard_error(shard.world)):
        raise AheadError(f"{ckpt.source} cannot be split over {shard.world} processes: {why}")
    if device.type == "cuda":
        need = weight_bytes(args, dtype, shard.world) + kv_bytes(args, max_seq_len, dtype, shard.world)
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise AheadError(
                f"not enough GPU memory: weights + KV cache need {need / 2**30:.1f} GiB, "
                f"{free / 2**30:.1f} GiB free; lower --max-seq-len or use a smaller model"
            )
    with torch.device("meta"):
        model = Transformer(args, max_seq_len, shard)
    try:
        # Each weight goes to the device as it is fused: a GPU concatenates Q/K/V and gate/up in
        # milliseconds (a CPU took ~1.5 s for the 1.5B), and only one layer's parts are extra at a time.
        state = fused_state_dict(OnDevice(ShardOf(ckpt.state_dict, shard), device, dtype), args)
        model.load_state_dict(state, assign=True, strict=True)
    except KeyError as exc:
        raise AheadError(
            f"the checkpoint lacks the weight {exc}; it is incomplete or not a {args.arch} model"
        ) from None
    except RuntimeError as exc:
        raise AheadError(f"weights do not match the config ({str(exc).splitlines()[0]})") from None
    model.setup_cache()
    return model.eval()
