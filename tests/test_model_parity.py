"""Our compact forward against transformers' (the reference), fp32 on CPU.

Prefill (one causal step with logits), step-by-step decode over the KV cache and a tree
step with two branches must all give the reference's logits: max |diff| < 1e-3 and the
same argmax at every position.
"""

from __future__ import annotations

import pytest
import torch

from engine.loading import build_model, load_checkpoint
from engine.runner import DECODE, Runner, StepShape, causal_shape

TOL = 1e-3
MAX_SEQ = 64


def runner_for(ckpt, max_seq_len: int = MAX_SEQ) -> Runner:
    return Runner(build_model(ckpt, torch.device("cpu"), torch.float32, max_seq_len), use_graphs=False)


@torch.no_grad()
def reference_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < TOL, f"max |logit diff| {diff:.2e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), "argmax differs"


def prefill_logits(runner: Runner, ids: list[int]) -> torch.Tensor:
    _, logits = runner.step(causal_shape(len(ids), logits=True), ids, 0)
    return logits.clone()


def decode_logits(runner: Runner, ids: list[int], k: int) -> torch.Tensor:
    """Prefill ids[:k] without logits, then feed the rest one token at a time."""
    runner.prefill(ids[:k], 0)
    rows = []
    for pos in range(k, len(ids)):
        argmax, logits = runner.step(DECODE, [ids[pos]], pos)
        assert argmax.item() == logits[0].argmax().item()
        rows.append(logits[0].clone())
    return torch.stack(rows)


def check_parity(hf, ckpt, ids: list[int], k: int) -> None:
    ref = reference_logits(hf, ids)
    runner = runner_for(ckpt, max(MAX_SEQ, len(ids)))
    assert_close(prefill_logits(runner, ids), ref)
    assert_close(decode_logits(runner, ids, k), ref[k:])


TINY_CASES = {
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    "llama-gqa": ("llama", {}),
    "llama-head-dim": ("llama", {"head_dim": 32, "num_key_value_heads": 2}),  # heads * head_dim != hidden
}


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_parity(case, tiny_config, tiny_model):
    arch, overrides = TINY_CASES[case]
    hf, ckpt = tiny_model(tiny_config(arch, **overrides))
    ids = torch.randint(0, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    check_parity(hf, ckpt, ids, k=7)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_parity_long_prefill(arch, tiny_config, tiny_model):
    """Steps of >= 64 tokens take model.block_attention (torch SDPA), shorter ones the plain path."""
    from engine.model import BLOCK_ATTENTION_MIN_TOKENS

    hf, ckpt = tiny_model(tiny_config(arch))
    ids = torch.randint(0, hf.config.vocab_size, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    assert len(ids) >= BLOCK_ATTENTION_MIN_TOKENS
    check_parity(hf, ckpt, ids, k=150)


def test_a_prompts_first_chunk_over_the_whole_cache_attends_causally(monkeypatch, tiny_config, tiny_model):
    """A prefill chunk that spans the whole visible cache (based at slot 0) skips reading its mask (SDPA's
    causal kernel); the chunk after it, over more slots than it has queries, keeps the mask. Both give the
    reference's logits. Catches the causal kernel used for a later chunk (it would see only the first T slots,
    and block_attention refuses it), or never used for the first."""
    from engine import model as engine_model

    hf, ckpt = tiny_model(tiny_config("qwen2"))
    ids = torch.randint(0, hf.config.vocab_size, (370,), generator=torch.Generator().manual_seed(3)).tolist()
    runner = runner_for(ckpt, 512)
    runner.prefill_chunk = 256
    calls = []
    block_attention = engine_model.block_attention

    def spy(q, kv, bias, n_heads, causal=False):
        calls.append((*bias.shape, causal))
        return block_attention(q, kv, bias, n_heads, causal)

    monkeypatch.setattr(engine_model, "block_attention", spy)
    assert_close(decode_logits(runner, ids, 356), reference_logits(hf, ids)[356:])  # chunks of 256 and 100
    layers = hf.config.num_hidden_layers
    assert calls == [(256, 256, True)] * layers + [(100, 512, False)] * layers


def test_a_tree_step_over_the_whole_cache_keeps_its_mask(tiny_config, tiny_model):
    """Only a causal shape may skip its mask: a tree step of as many tokens as the visible cache, based at slot
    0, still gives each branch the logits of its own causal run."""
    _, ckpt = tiny_model(tiny_config("llama"))
    n = 64
    local = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    local[:n, :n] = local[n:, n:] = torch.ones(n, n, dtype=torch.bool).tril()
    tree = StepShape("two-roots", torch.cat([torch.arange(n), torch.arange(n)]), local)
    ids = torch.randint(0, 500, (2 * n,), generator=torch.Generator().manual_seed(4)).tolist()
    runner = runner_for(ckpt, 2 * n)
    assert runner.visible_len(2 * n) == 2 * n  # the step spans the whole visible cache
    _, logits = runner.step(tree, ids, 0)
    tree_logits = logits.clone()
    assert_close(tree_logits[:n], prefill_logits(runner_for(ckpt), ids[:n]))
    assert_close(tree_logits[n:], prefill_logits(runner_for(ckpt), ids[n:]))


def test_qkv_bias_is_applied(tiny_config, tiny_model):
    """Qwen2 always has Q/K/V biases; dropping them must change the logits, and we must keep them."""
    hf, ckpt = tiny_model(tiny_config("qwen2"))
    ids = list(range(3, 23))
    assert all(hf.state_dict()[f"model.layers.0.self_attn.{x}_proj.bias"].abs().sum() > 0 for x in "qkv")
    check_parity(hf, ckpt, ids, k=5)
    no_bias = {k: torch.zeros_like(v) if k.endswith("_proj.bias") else v for k, v in ckpt.state_dict.items()}
    ckpt.state_dict = no_bias
    assert (prefill_logits(runner_for(ckpt), ids) - reference_logits(hf, ids)).abs().max() > 10 * TOL


def test_tree_step_matches_separate_causal_runs(tiny_config, tiny_model):
    """Two branches after a shared prefix in one step: each branch sees the prefix and itself only."""
    _, ckpt = tiny_model(tiny_config("llama"))
    prefix, branch_a, branch_b = [5, 17, 99, 3, 250], [11, 12, 13, 14], [400, 401, 402]
    n, m = len(branch_a), len(branch_b)
    local = torch.zeros(n + m, n + m, dtype=torch.bool)
    local[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    local[n:, n:] = torch.ones(m, m, dtype=torch.bool).tril()
    tree = StepShape("two-branches", torch.cat([torch.arange(n), torch.arange(m)]), local)

    runner = runner_for(ckpt)
    runner.prefill(prefix, 0)
    _, logits = runner.step(tree, branch_a + branch_b, len(prefix))
    tree_logits = logits.clone()

    separate = runner_for(ckpt)
    assert_close(tree_logits[:n], prefill_logits(separate, prefix + branch_a)[len(prefix) :])
    assert_close(tree_logits[n:], prefill_logits(separate, prefix + branch_b)[len(prefix) :])


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """Our checkpoint and the transformers reference, both from the same GGUF file."""
    from transformers import AutoModelForCausalLM

    ckpt = load_checkpoint(str(smollm2_gguf), log=lambda _: None)
    hf = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    return hf, ckpt


@pytest.mark.slow
def test_smollm2_parity(smollm2):
    hf, ckpt = smollm2
    ids = ckpt.tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n    return")["input_ids"]
    assert len(ids) > 10
    check_parity(hf, ckpt, ids, k=len(ids) // 2)
