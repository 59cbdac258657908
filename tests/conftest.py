"""Shared fixtures: the real SmolLM2 GGUF, and tiny random Qwen2/Llama models built in-process.

Tiny models keep most tests fast and offline; the real weights (marked `slow`) catch what
random weights cannot, such as GGUF dequantization and Llama's Q/K permutation.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast, Qwen2Config

from engine.default_model import default_model_path
from engine.loading import Checkpoint

GET_MODEL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "get-model"

# Small enough to run in milliseconds, big enough for GQA (4 query heads over 2 or 1 KV heads).
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
ARCHS = {
    "qwen2": lambda kw: Qwen2Config(**{**TINY, "num_key_value_heads": 2, "rope_theta": 1e6, **kw}),
    "llama": lambda kw: LlamaConfig(**{**TINY, "num_key_value_heads": 1, "tie_word_embeddings": False, **kw}),
}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tests run torch on one CPU thread. On a shared 2-core machine a second intra-op thread waits for a
    core someone else holds: a SmolLM2 decode step took 431 ms with two threads beside one busy process,
    66 ms with one; tiny models only ever pay for the hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF: from the shared fixtures script when present, else ahead's own default fetch."""
    if GET_MODEL.is_file():
        done = subprocess.run(["bash", str(GET_MODEL), "smollm2-135m"], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"{GET_MODEL} smollm2-135m failed: {done.stderr.strip()}")
        return Path(done.stdout.strip().splitlines()[-1])
    return default_model_path()


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., PretrainedConfig]:
    """Factory: tiny_config("qwen2" | "llama", **overrides) -> a small HF config."""

    def make(arch: str, **overrides) -> PretrainedConfig:
        return ARCHS[arch](overrides)

    return make


@pytest.fixture(scope="session")
def tiny_model() -> Callable[[PretrainedConfig], tuple[torch.nn.Module, Checkpoint]]:
    """Factory: a seeded random HF model for a config (the reference) and its weights as a Checkpoint.

    Every parameter gets noise, norms and biases included: HF initialises those to ones and
    zeros, so a forward that ignored them would otherwise still match.
    """

    def make(config: PretrainedConfig) -> tuple[torch.nn.Module, Checkpoint]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        return model, Checkpoint(model.config, tokenizer=None, state_dict=model.state_dict(), source="tiny")

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (the kind Qwen2 and Llama 3 use) trained in milliseconds on a code snippet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], initial_alphabet=alphabet, show_progress=False)
    corpus = ["def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n"]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# -- shared engines for the decoding, session, healing and CLI tests ------------------------------
BENCH_CASES = Path(__file__).resolve().parents[2] / "shared" / "bench" / "cases.jsonl"


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_gguf: Path):
    """One real SmolLM2 engine (fp32 CPU, small prompt budget) per session: loading takes seconds.

    Tests that share it use their own document ids, so their sessions never interfere.
    """
    from engine.engine import Engine, EngineOptions
    from engine.prompt import PromptBudget

    budget = PromptBudget(prefix_tokens=384, suffix_tokens=64)
    options = EngineOptions(model=str(smollm2_gguf), device="cpu", dtype="fp32", max_seq_len=2048, budget=budget)
    return Engine(options, log=lambda _: None)


@pytest.fixture(scope="session")
def bench_cases() -> list[dict]:
    """The benchmark's completion cases: real code with a cursor (id, prefix, suffix, reference)."""
    import json

    return [json.loads(line) for line in BENCH_CASES.read_text().splitlines() if line.strip()]


@pytest.fixture
def tiny_engine(tiny_config, tiny_model, tiny_tokenizer):
    """Factory: tiny_engine("qwen2" | "llama", config={...}, **engine_options) -> an Engine on a tiny random model.

    The model has more ids than the tokenizer (512 vs ~290), like Qwen2.5's padded vocabulary.
    """
    import dataclasses

    from engine.engine import Engine, EngineOptions

    def make(arch: str, config: dict | None = None, **options):
        _, ckpt = tiny_model(tiny_config(arch, **(config or {})))
        ckpt = dataclasses.replace(ckpt, tokenizer=tiny_tokenizer)
        opts = EngineOptions(**{"device": "cpu", "dtype": "fp32", "max_seq_len": 512, **options})
        return Engine(opts, log=lambda _: None, checkpoint=ckpt)

    return make


def complete(engine, prefix: str, suffix: str = "", *, reuse_kv: bool = True, persistent_pool: bool = True,
             type_through: bool = True, fim: bool = True, stop=None, **request):
    """engine.complete with raw output by default: decoding tests compare tokens, not stop rules."""
    from engine.request import CompletionRequest, Switches
    from engine.stops import StopRules

    switches = Switches(fim=fim, reuse_kv=reuse_kv, persistent_pool=persistent_pool, type_through=type_through)
    req = CompletionRequest(prefix, suffix, stop=stop or StopRules.raw(), **request)
    return engine.complete(req, switches=switches)
