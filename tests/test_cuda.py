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


def test_a_whole_prompt_in_one_graph_writes_what_chunks_write():
    """A long prompt from slot 0 runs as one padded step with causal attention (`Runner.whole_prompt_size`);
    the next token's logits are those of an eager prefill in chunks with masks. Catches padding rows or the
    causal kernel leaking into the prompt's K/V, or the whole-prompt path not taken."""
    model = tiny_model(torch.float32)
    eager, graphed = Runner(model, use_graphs=False), Runner(model, use_graphs=True)
    ids = torch.randint(0, 512, (1301,)).tolist()
    assert graphed.whole_prompt_size(1300, 0) == 1536 and graphed.whole_prompt_size(1300, 5) is None
    logits = []
    for runner in (graphed, eager):
        runner.prefill(ids[:1300], 0)
        logits.append(runner.step(DECODE, [ids[1300]], 1300)[1].clone())
    assert ("causal1536", 1536) in graphed.graphs
    assert torch.allclose(logits[0], logits[1], atol=1e-4), (logits[0] - logits[1]).abs().max()


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
    """bf16, what CUDA serves, computes fp32's logits to within bf16's precision on the served path (graphed
    prefill, decode and lookahead steps across a cache bucket boundary), and greedy picks what fp32 picks
    nearly everywhere (near-ties may flip). Both run teacher-forced along fp32's greedy continuation, so
    one early near-tie flip cannot make the rest of the comparison meaningless."""
    from engine.lookahead import step_shape

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False,
    )
    hf = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF's 0.02-scale init makes attention uniform: positions and values would not matter
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = Checkpoint(config, None, hf.state_dict(), "tiny")

    def runner(dtype: torch.dtype) -> Runner:
        return Runner(build_model(ckpt, torch.device("cuda"), dtype, 2048), use_graphs=True)

    prompt = torch.randint(0, 512, (240,)).tolist()
    ref = runner(torch.float32)
    ref.prefill(prompt[:-1], 0)
    state = DecodeState(list(prompt), 40, frozenset())
    decode_ar(ref, state)
    seq = state.seq  # 280 tokens: decoding crosses the 256-slot bucket, so two graphs per shape run
    la = step_shape(LookaheadConfig(8, 4, 8))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        r = runner(dtype)
        r.prefill(seq[: len(prompt) - 1], 0)
        rows = []
        for pos in range(len(prompt) - 1, len(seq) - 1):
            _, out = r.step(DECODE, [seq[pos]], pos)
            rows.append(out[0].float().clone())
        _, out = r.step(la, seq[-la.size :], len(seq) - la.size)  # a lookahead-shaped step over known tokens
        logits[dtype] = (torch.stack(rows), out.float().clone())
    (fp32, fp32_la), (bf16, bf16_la) = logits[torch.float32], logits[torch.bfloat16]
    assert torch.equal(fp32.argmax(-1), torch.tensor(seq[len(prompt) :], device=fp32.device))  # teacher = fp32 greedy
    # bf16 keeps 8 significant bits: its roundings left errors up to 0.1 of the logits' spread here (H200,
    # 2026-11, 4 seeds); RoPE angles rounded to bf16, for one, err by 1.3 to 2 spreads on the same model.
    tol = 0.25 * fp32.std().item()
    assert (bf16 - fp32).abs().max().item() < tol
    assert (bf16_la - fp32_la).abs().max().item() < tol
    # Greedy: the same token nearly everywhere (measured 95-98%); only near-ties may flip.
    agree = (bf16.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"bf16 picks fp32's token at {agree:.0%} of positions"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_triton_kernels_match_torch_path(monkeypatch, dtype, tol):
    """The fused CUDA kernels compute what model.py's plain torch code computes."""
    from engine import kernels
    from engine.lookahead import step_shape

    model = tiny_model(dtype)
    runner = Runner(model, use_graphs=False)
    ids = torch.randint(0, 512, (400,)).tolist()
    # Every attention here runs the Triton kernel: steps with logits at any size (37, 300 and 80 rows, the
    # lookahead step), and the 300-row prefills, whose 20 row blocks fit one wave (`kernels.splits_keys`).
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


def test_prefill_attention_serves_each_query_head_from_its_own_kv_head():
    """Prefill chunks' SDPA attention, grouped (cuDNN) where it can be, against the plain masked softmax:
    catches query heads paired with the wrong KV head (grouped and expanded heads ordered differently)
    and a mask lost on the grouped path. Qwen2.5-Coder-1.5B's heads: 12 query heads over 2 KV heads."""
    from engine import model as model_module

    torch.manual_seed(0)
    hkv, rep, T, L, D = 2, 6, 128, 512, 128
    q = torch.randn(hkv, rep * T, D, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, hkv, 1024, D, device="cuda", dtype=torch.bfloat16)
    visible = torch.rand(T, L, device="cuda") < 0.7
    visible[:, 0] = True
    bias = torch.zeros(T, L, device="cuda", dtype=torch.bfloat16).masked_fill_(~visible, float("-inf"))
    want = model_module.folded_attention(q.float(), kv.float(), bias.float(), hkv * rep)
    got = model_module.block_attention(q, kv, bias, hkv * rep).float()
    assert (got - want).abs().max().item() < 2e-2


@pytest.mark.parametrize("dim", [576, 1536, 3584])  # 4 warps a row; 16 (the 1.5B; the 7B)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_add_rms_norm_adds_in_place_and_normalizes(dtype, tol, dim):
    """Catches: the residual not updated in place (the next layer would read the old stream), a wrong
    mean (over the padded block instead of `dim`), or the weight not applied, under each warp count."""
    from engine import kernels

    x = torch.randn(5, dim, device="cuda", dtype=dtype)
    delta = torch.randn_like(x)
    weight = torch.rand(dim, device="cuda", dtype=dtype) + 0.5
    want_x = x + delta
    want = torch.nn.functional.rms_norm(want_x.float(), (dim,), weight.float(), 1e-6)
    got = kernels.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(x, want_x)
    assert (got.float() - want).abs().max().item() < tol * want.abs().max().item()


@pytest.mark.parametrize("rows", [1, 2, 5, 48, 64, 65])
@pytest.mark.parametrize("n,k,bias", [(2048, 1536, True), (1536, 8960, False), (17920, 1536, False),
                                      (3584, 18944, False), (1000, 1500, True)])
def test_linear_is_torchs_linear(rows, n, k, bias):
    """The decoding steps' projection kernels against F.linear in fp32, on the 1.5B's shapes, the 7B's down
    projection (long rows: two column chunks) and a ragged one (N and K not multiples of any tile). Catches a
    dropped bias, the last program's spare rows stored over the next row's output, columns past K read as
    weights, the first (preloaded) tile counted twice or skipped, and rows of a step past the first left out."""
    from engine import kernels

    torch.manual_seed(rows)
    x = torch.randn(rows, k, device="cuda")
    w = torch.randn(n, k, device="cuda") * k**-0.5
    b = torch.randn(n, device="cuda") if bias else None
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    got = kernels.linear(x, w, b)
    assert got.shape == (rows, n)
    assert (got.double() - want).abs().max().item() < 1e-4
    parts = kernels.linear(x, w, b, parts=True)  # chunks of the columns: their partial sums add up to it, bias once
    assert parts.dim() == 3 and parts.shape[1:] == (rows, n)
    assert (parts.double().sum(0) - want).abs().max().item() < 1e-4
    got = kernels.linear(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16())
    assert (got.double() - want).abs().max().item() < 0.05 * want.abs().max().item()


@pytest.mark.parametrize("rows", [2, 5, 33, 64])
@pytest.mark.parametrize("n,k", [(8200, 2312), (37888, 3584)])
def test_wide_kernel_is_torchs_linear(rows, n, k):
    """The TMA kernel of a step's wide outputs over long rows (the 7B's gate/up; a ragged shape whose last tiles
    run past N and past K) against F.linear on the same bf16 operands. Catches the descriptors' zero fill lost
    (rows past the step or columns past K read as data), a tile of outputs or of columns skipped, and the last
    program's spare outputs stored past N, over the next row's first ones."""
    from engine import kernels

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernel needs Hopper or later")
    torch.manual_seed(rows)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * k**-0.5).bfloat16()
    assert kernels.wide_config(x, w, None) is not None  # this shape does take the kernel
    want = torch.nn.functional.linear(x.double(), w.double())
    out = kernels.linear(x, w)
    assert out.shape == (rows, n)
    assert (out.double() - want).abs().max().item() < 1e-2 * want.abs().max().item()
    parts = kernels.linear(x, w, parts=True)
    assert parts.shape == (1, rows, n) and torch.equal(parts[0], out)


@pytest.mark.parametrize("T,base,visible", [(1, 2559, 2560), (64, 2560, 2816), (5, 0, 256), (48, 1000, 2048)])
def test_step_layout_is_the_runners_mask(T, base, visible):
    """`kernels.step_layout` against the runner's torch construction (its CPU path): positions, slots, and the
    additive mask. Catches the step's own block placed off by one (a row seeing the slot before the base as its
    own, or not seeing slot base + j), a row reading another row of `local`, slots past the step or the visible
    length seen, and a block of slots past the first left unwritten."""
    from engine import kernels

    torch.manual_seed(T)
    rel_pos = torch.randint(0, 30, (T,), device="cuda")
    local = torch.rand(T, T, device="cuda") < 0.4
    local[torch.arange(T), torch.arange(T)] = True
    at = torch.tensor(base, device="cuda")
    positions, slots, bias = kernels.step_layout(at, rel_pos, local, visible, torch.bfloat16)
    s = torch.arange(visible, device="cuda")
    offset = s - base
    own = (offset >= 0) & (offset < T)
    mask = (s < base) | (local[:, offset.clamp(0, T - 1)] & own)
    assert positions.tolist() == (base + rel_pos).tolist() and slots.tolist() == list(range(base, base + T))
    assert bias.dtype == torch.bfloat16 and torch.equal(bias == 0, mask) and bool((bias[~mask] == float("-inf")).all())


@pytest.mark.parametrize("rows,vocab", [(1, 151936), (64, 151936), (3, 5000)])
def test_argmax_is_torchs_argmax_ties_included(rows, vocab):
    """`kernels.argmax` against torch's on bf16 logits drawn from 8 values, so every row's largest value occurs
    many times, in several chunks: greedy decoding must pick the same (first) token. Catches the last
    occurrence or the last chunk's picked, a chunk's offset left out of its ids, and the ragged last chunk's
    padding (beyond the vocabulary) chosen."""
    from engine import kernels

    torch.manual_seed(rows)
    logits = torch.randint(0, 8, (rows, vocab), device="cuda").to(torch.bfloat16) - 20.0
    assert torch.equal(kernels.argmax(logits), logits.argmax(-1))
    logits[:, -1] = 10.0  # the largest value only in the ragged last chunk
    assert torch.equal(kernels.argmax(logits), torch.full((rows,), vocab - 1, device="cuda"))


def test_back_to_back_steps_each_read_their_own_tokens():
    """`Runner.step` queues a step that copies its inputs only when the GPU reaches it; the next step's `send`
    must wait for that copy. Two steps of one shape queued back to back behind ~0.2 s of GPU work, nothing read in
    between: the first must still compute from its own tokens. Catches `Runner.step` not marking the step queued
    (`StepInputs.step_queued`), after which the second step's tokens overwrite the first's before they are read."""
    model = tiny_model(torch.float32)
    runner = Runner(model, use_graphs=False)
    ids = torch.randint(0, 512, (40,)).tolist()
    runner.prefill(ids[:32], 0)
    shape = causal_shape(8, logits=True)
    want = runner.step(shape, ids[32:40], 32)[1].clone()
    torch.cuda._sleep(200_000_000)  # keep the stream busy: both steps' copies run after this
    first = runner.step(shape, ids[32:40], 32)[1]
    runner.step(shape, ids[24:32], 32)  # other tokens at the same slots
    torch.cuda.synchronize()
    assert torch.equal(first, want)


def _write_late(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy src into dst from a kernel that lets the next (dependent) kernel start at once and writes only after
    ~0.5 ms of spinning: a kernel launched next that reads dst before waiting for this one reads the old dst."""
    import triton
    import triton.language as tl

    @triton.jit
    def late_copy(src, dst, n, spins, BLOCK: tl.constexpr):
        tl.extra.cuda.gdc_launch_dependents()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        v = tl.load(src + offs, mask=ok, other=0.0)
        t = tl.zeros([BLOCK], tl.float32)
        for _ in range(spins):
            t = t * 0.5 + 1.0
        tl.store(dst + offs, v, mask=ok & (t > -1.0))

    n = src.numel()
    late_copy[(triton.cdiv(n, 1024),)](src, dst, n, 300_000, BLOCK=1024, launch_pdl=True)


@pytest.mark.parametrize("hkv,rep,T,L", [(2, 6, 1, 2560), (4, 7, 64, 2560), (2, 6, 64, 300), (2, 6, 48, 64),
                                         (1, 3, 7, 300), (2, 6, 256, 1024)])
def test_attention_merges_every_key_chunk_once(hkv, rep, T, L):
    """The attention kernel splits the keys over programs and a second kernel merges their partial softmaxes.
    Against torch's attention, called over and over and from a replayed graph: catches a merge that misses or
    repeats a chunk, or reads a chunk's stale partials. The shapes: one-token decode (40 chunks), the 7B's and
    the 1.5B's tree steps (4 and 11 chunks), a single chunk, an odd count of folded rows above 16 (the
    merge's last program of two rows holds a padding row, whose store must stay masked off), and a 256-token
    prefill chunk of the 1.5B (1,536 folded rows a KV head, 2 chunks on 132 SMs)."""
    from engine import kernels
    from engine.model import folded_attention

    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q, kv = torch.randn(hkv, rep * T, 128, **bf), torch.randn(2, hkv, L + 64, 128, **bf)
    mask = torch.ones(T, L, dtype=torch.bool, device="cuda")
    mask[:, L - T :] = torch.rand(T, T, device="cuda") < 0.3
    mask[torch.arange(T), L - T + torch.arange(T)] = True
    bias = torch.zeros(T, L, **bf).masked_fill_(~mask, float("-inf"))
    want = folded_attention(q.float(), kv.float(), bias.float(), hkv * rep)
    tol = 2e-2 * want.abs().max().item()
    for _ in range(20):
        assert (kernels.attention(q, kv, bias, hkv * rep).float() - want).abs().max().item() < tol
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=side):
        out = kernels.attention(q, kv, bias, hkv * rep)
    for _ in range(20):
        out.zero_()
        graph.replay()
        assert (out.float() - want).abs().max().item() < tol


def test_prefill_chunks_split_their_keys_while_their_row_blocks_fill_one_wave(monkeypatch):
    """A keystroke's prefill chunk over a long cache takes the Triton split-key attention (SDPA gives a program
    a block of one head's rows and every key: the 1.5B's 128-row chunk took twice the step's time on an H200);
    one with more row blocks than the GPU has SMs, and a whole prompt's plain causal step (SDPA skips its masked
    half), keep SDPA. Catches either path taken for the other's chunks."""
    from engine import kernels
    from engine import model as model_module

    taken = []
    split, block = kernels.attention, model_module.block_attention
    monkeypatch.setattr(kernels, "attention", lambda *args: taken.append("split") or split(*args))
    monkeypatch.setattr(model_module, "block_attention", lambda *args: taken.append("sdpa") or block(*args))
    runner = Runner(tiny_model(torch.bfloat16), use_graphs=False)
    ids = torch.randint(0, 512, (1536,)).tolist()
    runner.step(causal_shape(1280), ids[:1280], 0)  # a whole prompt: 1,280 rows seeing exactly 1,280 slots
    assert taken == ["sdpa", "sdpa"]  # one per layer
    taken.clear()
    runner.prefill(ids[1280:1408], 1280)  # 128 tokens over 1,536 slots: 8 row blocks
    assert taken == ["split", "split"]
    taken.clear()
    monkeypatch.setattr(kernels, "multiprocessors", lambda device: 4)
    runner.prefill(ids[1408:1536], 1408)
    assert taken == ["sdpa", "sdpa"]


def test_each_kernel_waits_for_the_one_before_it():
    """Under programmatic dependent launch a kernel may start while the one before it still runs: each must
    wait before reading that one's output. Each kernel here follows one that writes its input late; it must
    compute from the late values, not from the zeros the buffer held. Catches a kernel whose reads were moved
    before its `_await_inputs`, or that lost it, the second kernel of attention and of top-k included: a random
    input's run in between leaves other values where their intermediates will be. (A graph-replayed tiny model
    with PDL on and off, the check this replaces, gave identical logits even with the GEMV's wait removed.)"""
    from engine import kernels

    if not kernels._launch_options(torch.device("cuda"))["PDL"]:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)

    def check(inputs: torch.Tensor, run) -> None:
        late = torch.zeros_like(inputs)
        want = run(inputs.clone()).float()
        other = torch.randn_like(inputs) if inputs.is_floating_point() else torch.randint_like(inputs, 1, 1000)
        run(other)  # leaves other values in the blocks the late run's intermediates will reuse
        torch.cuda.synchronize()
        _write_late(inputs, late)
        got = run(late).float()
        torch.cuda.synchronize()
        assert (got - want).abs().max().item() <= 1e-2 * want.abs().max().item()

    w = torch.randn(2048, 1536, **bf) * 1536**-0.5
    check(torch.randn(1, 1536, **bf), lambda x: kernels.linear(x, w))  # the one-row GEMV
    check(torch.randn(48, 1536, **bf), lambda x: kernels.linear(x, w, parts=True))  # a tree step's product
    wide = torch.randn(8200, 2312, **bf) * 2312**-0.5
    if kernels.wide_config(torch.empty(48, 2312, **bf), wide, None) is not None:
        check(torch.randn(48, 2312, **bf), lambda x: kernels.linear(x, wide))  # wide outputs over long rows (TMA)
    weight = torch.rand(1536, **bf) + 0.5
    streams = [torch.ones(48, 1536, **bf) for _ in range(3)]  # made before: a fill kernel would wait in between
    check(torch.randn(48, 1536, **bf), lambda d: kernels.add_rms_norm(streams.pop(), d, weight, 1e-6))
    check(torch.randn(48, 2 * 8960, **bf), kernels.silu_mul)
    T, H, HKV, D = 48, 12, 2, 128
    cos, sin = torch.rand(T, D // 2, device="cuda"), torch.rand(T, D // 2, device="cuda")
    slots = torch.arange(T, device="cuda")
    kv = torch.randn(2, HKV, 256, D, **bf)
    check(torch.randn(T, (H + 2 * HKV) * D, **bf), lambda qkv: kernels.rope_and_cache(qkv, cos, sin, slots, kv, H))
    bias = torch.zeros(T, 200, **bf)
    check(torch.randn(HKV, 6 * T, D, **bf), lambda q: kernels.attention(q, kv, bias, H))
    check(torch.randn(48, 151936, **bf), lambda logits: kernels.top_k_probs(logits, 8)[1])
    check(torch.randn(48, 151936, **bf), lambda logits: kernels.argmax(logits).float())
    at, local = torch.tensor(100, device="cuda"), torch.eye(48, dtype=torch.bool, device="cuda")
    check(torch.randint(1, 30, (48,), device="cuda"),
          lambda rel: kernels.step_layout(at, rel, local, 256, torch.bfloat16)[0].float())


def test_fused_kernels_add_up_partial_sums():
    """rope_and_cache, silu_mul and add_rms_norm take a projection as partial sums [parts, T, N] and compute what
    they compute from the whole sum. Catches a part skipped or read at the wrong row, or counted twice."""
    from engine import kernels

    torch.manual_seed(0)
    T, H, HKV, D, S = 5, 4, 2, 64, 32
    qkv = torch.randn(3, T, (H + 2 * HKV) * D, device="cuda")
    cos, sin = torch.rand(T, D // 2, device="cuda"), torch.rand(T, D // 2, device="cuda")
    slots = torch.tensor([3, 9, 1, 30, 17], device="cuda")
    kv_parts, kv_whole = torch.zeros(2, HKV, S, D, device="cuda"), torch.zeros(2, HKV, S, D, device="cuda")
    q_parts = kernels.rope_and_cache(qkv, cos, sin, slots, kv_parts, H)
    q_whole = kernels.rope_and_cache(qkv.sum(0), cos, sin, slots, kv_whole, H)
    assert (q_parts - q_whole).abs().max().item() < 1e-5 and (kv_parts - kv_whole).abs().max().item() < 1e-5
    gate_up = torch.randn(4, T, 2 * 300, device="cuda")
    assert (kernels.silu_mul(gate_up) - kernels.silu_mul(gate_up.sum(0))).abs().max().item() < 1e-5
    x, delta = torch.randn(T, 1536, device="cuda"), torch.randn(2, T, 1536, device="cuda")
    weight = torch.rand(1536, device="cuda") + 0.5
    x2 = x.clone()
    normed = kernels.add_rms_norm(x, delta, weight, 1e-6)
    assert (x - (x2 + delta.sum(0))).abs().max().item() < 1e-5
    assert (normed - kernels.add_rms_norm(x2, delta.sum(0), weight, 1e-6)).abs().max().item() < 1e-5


@pytest.mark.parametrize("rows,vocab", [(64, 151936), (3, 1000), (2, 4097)])
def test_top_k_probs_are_torchs_topk_and_softmax(rows, vocab):
    """The recycling table's top-k kernel: torch's ids (most likely first) and softmax probabilities. Catches
    a chunk's ids left local to the chunk, a row's log-sum-exp over one chunk only, or a partial last chunk."""
    from engine import kernels

    logits = torch.randn(rows, vocab, device="cuda") * 4
    ids, probs = kernels.top_k_probs(logits, 8)
    values, want = logits.topk(8, dim=-1)
    assert torch.equal(ids, want)
    want_probs = (values - logits.logsumexp(-1, keepdim=True)).exp()
    assert (probs - want_probs).abs().max().item() < 1e-5
    bf16 = logits.bfloat16()  # the engine's logits: ties may reorder ids, never change the values chosen
    ids, probs = kernels.top_k_probs(bf16, 8)
    assert torch.equal(bf16.gather(-1, ids), bf16.topk(8, dim=-1).values)


def test_after_warm_up_decoding_captures_no_graph():
    """warm_up captures every graph requests replay: prefill chunks, AR and lookahead at any cache length."""
    from engine.lookahead import step_shape
    from engine.warmup import warm_up

    model = tiny_model(torch.float32, max_seq_len=1024)
    runner = Runner(model, use_graphs=True)
    cfg = LookaheadConfig(8, 4, 8)
    captured = warm_up(runner, [step_shape(cfg)], log=lambda _: None)
    assert captured == len(runner.graphs) > 0
    torch.manual_seed(2)
    ids = torch.randint(0, 512, (1024,)).tolist()
    for n in (5, 37, 300, 700, 1024 - 60 - 49 - 10):  # the last one decodes to the cache's end
        for la in (False, True):
            runner.prefill(ids[: n - 1], 0)
            state = DecodeState(ids[:n], 60, frozenset())
            if la:
                decode_lookahead(runner, state, cfg, NGramPool(cfg.ngram))
            else:
                decode_ar(runner, state)
    runner.prefill(ids[100:400], 333)  # a reused prefix: chunks start mid-bucket
    assert len(runner.graphs) == captured
    eager = Runner(model, use_graphs=False)
    for r in (runner, eager):
        r.prefill(ids[:299], 0)
    _, a = runner.step(DECODE, [ids[299]], 299)
    a = a.clone()
    _, b = eager.step(DECODE, [ids[299]], 299)
    assert torch.allclose(a, b, atol=1e-4)


def test_read_back_waits_for_itself_not_for_work_queued_after_it():
    """A tree step's argmax is read while the top-k kernels queued after it still run: `ReadBack.values` must
    hold the copied values and return without waiting for later work. Catches a read that synchronizes the
    whole device (the step would then wait for the top-k) or one that does not wait for its own copy, and a
    reused buffer that a second, larger queue does not fit."""
    import time

    runner = Runner(tiny_model(torch.float32, max_seq_len=64), use_graphs=False)
    back = runner.read_back("test")
    for n in (6, 100, 5):  # the second outgrows the first buffer; the third reuses it
        x = torch.arange(n, device="cuda") * 3
        back.queue(x, x.float())
        torch.cuda._sleep(2_000_000_000)  # ~1 s of work queued behind the copy
        started = time.perf_counter()
        ints, floats = back.values()
        assert ints.tolist() == list(range(0, 3 * n, 3)) and floats.tolist() == [float(v) for v in range(0, 3 * n, 3)]
        assert time.perf_counter() - started < 0.3
        torch.cuda.synchronize()
    assert runner.read_back("test") is back  # made once: no pinned allocation per request
