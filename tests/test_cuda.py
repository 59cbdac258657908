"""CUDA-only checks: graph replay equals eager execution, lookahead equals AR under graphs.

Skipped where there is no GPU (CI); run on the GPU machine with `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from engine.decoding import DecodeState, decode_ar
from engine.loading import Checkpoint, build_model
from engine.lookahead import LookaheadConfig, NGramPool, decode_lookahead
from engine.runner import DECODE, Runner, causal_shape

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_model(dtype: torch.dtype, max_seq_len: int = 2048):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False,
    )
    hf = Qwen2ForCausalLM(config).eval()
    return build_model(Checkpoint(config, None, hf.state_dict(), "tiny"), torch.device("cuda"), dtype, max_seq_len)


def test_graph_replay_matches_eager():
    model = tiny_model(torch.float32)
    eager, graphed = Runner(model, use_graphs=False), Runner(model, use_graphs=True)
    ids = torch.randint(0, 512, (300,)).tolist()
    outs = []
    for runner in (eager, graphed):
        runner.prefill(ids[:-1], 0)
        seq = []
        for i in range(len(ids) - 40, len(ids)):
            _, logits = runner.step(DECODE, [ids[i]], i)
            seq.append(logits[0].clone())
        outs.append(torch.stack(seq))
    assert torch.allclose(outs[0], outs[1], atol=1e-4), (outs[0] - outs[1]).abs().max()
    # A padded graph prefill writes the same K/V as an exact eager one.
    graphed.prefill(ids[:37], 0)
    _, a = graphed.step(causal_shape(1, "decode", True), [ids[37]], 37)
    a = a.clone()
    eager.prefill(ids[:37], 0)
    _, b = eager.step(DECODE, [ids[37]], 37)
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("cfg", ["8,4,8", "1,2,1", "4,6,0", "15,5,15", "3,3,3"])
def test_lookahead_equals_ar_with_graphs(cfg):
    model = tiny_model(torch.float32)
    runner = Runner(model, use_graphs=True)
    torch.manual_seed(1)
    base = torch.randint(0, 512, (40,)).tolist()
    prompt = (base * 8)[:300]  # repetitive, so the pool gets hits
    runs = []
    for la in (False, True):
        runner.prefill(prompt[:-1], 0)
        state = DecodeState(list(prompt), 100, frozenset({511}))
        if la:
            c = LookaheadConfig.parse(cfg)
            pool = NGramPool(c.ngram)
            pool.add_text(prompt)
            decode_lookahead(runner, state, c, pool)
        else:
            decode_ar(runner, state)
        runs.append(state)
    assert runs[0].new == runs[1].new
    if cfg != "4,6,0":
        assert runs[1].steps < runs[0].steps


def test_bf16_runs():
    model = tiny_model(torch.bfloat16)
    runner = Runner(model, use_graphs=True)
    prompt = list(range(1, 200))
    runner.prefill(prompt[:-1], 0)
    state = DecodeState(list(prompt), 32, frozenset())
    decode_lookahead(runner, state, LookaheadConfig(8, 4, 8), NGramPool(4))
    assert len(state.new) == 32


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_triton_kernels_match_torch_path(monkeypatch, dtype, tol):
    """The fused CUDA kernels compute what model.py's plain torch code computes."""
    from engine import kernels
    from engine.lookahead import step_shape

    model = tiny_model(dtype)
    runner = Runner(model, use_graphs=False)
    ids = torch.randint(0, 512, (400,)).tolist()
    # 37 tokens: the Triton attention kernel; 300 and 80: model.block_attention (SDPA).
    shapes = [(causal_shape(37, logits=True), ids[:37], 0), (causal_shape(300, logits=True), ids[:300], 0),
              (causal_shape(80, logits=True), ids[200:280], 200), (DECODE, [ids[300]], 300),
              (step_shape(LookaheadConfig(8, 4, 8)), ids[:49], 301)]
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        runner.prefill(ids[:300], 0)
        outs = [runner.step(shape, toks, base)[1].float().clone() for shape, toks, base in shapes]
        results.append((outs, model.kv[:, :, :, :360].float().clone()))
    for fused, plain in zip(results[0][0], results[1][0], strict=True):
        assert (fused - plain).abs().max() < tol
    assert (results[0][1] - results[1][1]).abs().max() < tol
