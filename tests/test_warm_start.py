"""Ready to serve: converted GGUF weights cached once, graph capture before the first request, CPU
threads and prompt budget sized for the machine, and a default model that fits it.

GGUF tests write a tiny Llama GGUF (Q8_0 matrices, a byte-level BPE) with the gguf package, so the
cache is exercised end to end through transformers' GGUF readers in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import complete
from gguf.quants import quantize

from engine import calibration, default_model, loading, sizing, tree
from engine.errors import AheadError
from engine.loading import build_model, load_checkpoint, release_weights, reload_weights
from engine.lookahead import LookaheadConfig, step_shape
from engine.prompt import PromptBudget
from engine.runner import Captured, Runner
from engine.sources import recycling
from engine.warmup import capture_plan, warm_up

CPU = torch.device("cpu")
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
              "model.norm.weight": "output_norm.weight"}
GGUF_BLOCK = {v: k for k, v in loading.GGUF_BLOCK_NAMES.items()}


@pytest.fixture(autouse=True)
def ahead_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "ahead-home"
    monkeypatch.setenv("AHEAD_HOME", str(home))
    return home


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py Q/K row permutation (what the loader undoes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture
def tiny_gguf(tmp_path, tiny_config, tiny_model, tiny_tokenizer) -> tuple[dict[str, torch.Tensor], Path]:
    """A tiny Llama written as llama.cpp would: (its HF weights, the .gguf path)."""
    config = tiny_config("llama")
    _, ckpt = tiny_model(config)
    path = tmp_path / "tiny-llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(config.vocab_size)
    bpe = json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [f"<unused{i}>" for i in range(config.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for name, t in ckpt.state_dict.items():
        parts = name.split(".")
        gname = GGUF_NAMES.get(name) or f"blk.{parts[2]}.{GGUF_BLOCK['.'.join(parts[3:-1])]}.{parts[-1]}"
        a = t.numpy()
        if "q_proj" in name or "k_proj" in name:
            a = permute_rope(a, config.num_attention_heads if "q_proj" in name else config.num_key_value_heads)
        if a.ndim == 2:
            q = quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dict(ckpt.state_dict), path


def load(path: Path, dtype: torch.dtype | None = None) -> tuple[loading.Checkpoint, list[str]]:
    lines: list[str] = []
    return load_checkpoint(str(path), lines.append, dtype), lines


def no_dequantizing(monkeypatch) -> None:
    def refuse(*_):
        raise AssertionError("dequantized although the converted weights were cached")

    monkeypatch.setattr(loading, "dequantize_gguf", refuse)


def cache_files(home: Path) -> list[Path]:
    return sorted((home / "weights").glob("*.safetensors"))


# -- 1. converted weights cached once ------------------------------------------------------------
def test_second_gguf_load_is_served_from_the_cache(tiny_gguf, ahead_home, monkeypatch):
    hf, path = tiny_gguf
    first, lines = load(path)
    assert any("dequantizing" in line and "cached at" in line for line in lines)
    # The conversion itself is right (names, Llama Q/K un-permutation): equal to the HF weights up to Q8_0.
    assert first.state_dict.keys() == hf.keys()
    assert max((first.state_dict[k] - v).abs().max() for k, v in hf.items()) < 0.01
    [cached] = cache_files(ahead_home)

    no_dequantizing(monkeypatch)
    second, lines = load(path)
    assert any("loading cached weights" in line and str(cached) in line for line in lines)
    assert second.state_dict.keys() == first.state_dict.keys()
    assert all(torch.equal(second.state_dict[k], v) for k, v in first.state_dict.items())


def test_cache_is_kept_per_dtype(tiny_gguf, ahead_home, monkeypatch):
    _, path = tiny_gguf
    fp32, _ = load(path, torch.float32)
    bf16, _ = load(path, torch.bfloat16)
    assert {t.dtype for t in bf16.state_dict.values()} == {torch.bfloat16}
    assert len(cache_files(ahead_home)) == 2
    no_dequantizing(monkeypatch)
    again, _ = load(path, torch.bfloat16)
    assert all(torch.equal(again.state_dict[k], v) for k, v in bf16.state_dict.items())
    assert all(torch.equal(v.to(torch.bfloat16), bf16.state_dict[k]) for k, v in fp32.state_dict.items())


def test_a_copy_of_the_gguf_hits_the_same_cache(tiny_gguf, ahead_home, monkeypatch, tmp_path):
    _, path = tiny_gguf
    load(path)
    copy = tmp_path / "elsewhere" / path.name
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    no_dequantizing(monkeypatch)
    assert load(copy)[0].state_dict


def test_truncated_cache_file_is_rebuilt(tiny_gguf, ahead_home):
    _, path = tiny_gguf
    first, _ = load(path)
    [cached] = cache_files(ahead_home)
    size = cached.stat().st_size
    cached.write_bytes(cached.read_bytes()[: size // 2])
    again, lines = load(path)
    assert any("unreadable" in line for line in lines) and any("dequantizing" in line for line in lines)
    assert all(torch.equal(again.state_dict[k], v) for k, v in first.state_dict.items())
    assert cached.stat().st_size == size and not list(cached.parent.glob("*.tmp"))


def test_unwritable_cache_only_costs_a_log_line(tiny_gguf, tmp_path, monkeypatch):
    _, path = tiny_gguf
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("AHEAD_HOME", str(blocker / "home"))  # nothing can be created under a file (even as root)
    ckpt, lines = load(path)
    assert ckpt.state_dict and sum("could not cache" in line for line in lines) == 1


def test_full_disk_leaves_no_partial_file(tiny_gguf, ahead_home, monkeypatch):
    import safetensors.torch

    def disk_full(state, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    ckpt, lines = load(tiny_gguf[1])
    assert ckpt.state_dict and any("No space left" in line for line in lines)
    assert not list((ahead_home / "weights").iterdir())


def test_released_weights_come_back_from_the_cache(tiny_gguf, monkeypatch):
    _, path = tiny_gguf
    ckpt, _ = load(path)
    kept = {k: v.clone() for k, v in ckpt.state_dict.items()}
    model = build_model(ckpt, CPU, torch.float32, 32)
    release_weights(ckpt)
    assert ckpt.state_dict == {}
    no_dequantizing(monkeypatch)
    back = reload_weights(ckpt.source, torch.float32, log=lambda _: None)
    assert back.keys() == kept.keys() and all(torch.equal(back[k], v) for k, v in kept.items())
    # The model owns its weights: releasing the checkpoint's did not touch them.
    assert torch.equal(model.tok_embeddings.weight, kept["model.embed_tokens.weight"])


def test_engine_completes_the_same_after_releasing_host_weights(tiny_engine):
    engine = tiny_engine("qwen2")
    before = complete(engine, "def fibonacci(n):\n    ", max_tokens=12, reuse_kv=False, type_through=False)
    release_weights(engine.checkpoint)
    after = complete(engine, "def fibonacci(n):\n    ", max_tokens=12, reuse_kv=False, type_through=False)
    assert after.tokens == before.tokens and len(before.tokens) == 12


def test_directory_weights_are_converted_to_the_asked_dtype(tmp_path, tiny_config, tiny_model, tiny_tokenizer):
    hf, _ = tiny_model(tiny_config("qwen2"))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path)
    ckpt = load_checkpoint(str(tmp_path), lambda _: None, torch.bfloat16)
    assert {t.dtype for t in ckpt.state_dict.values()} == {torch.bfloat16}


# -- 2. warm-up: every graph a request uses, captured before ready -------------------------------
class EagerGraph:
    """A CUDA graph's stand-in on the CPU: replay runs the captured step eagerly into the same buffers."""

    def __init__(self, runner: Runner, shape, visible, argmax, logits):
        self.args = runner, shape, visible
        self.argmax, self.logits = argmax, logits

    def replay(self) -> None:
        runner, shape, visible = self.args
        with torch.no_grad():
            argmax, logits = runner._forward(shape, visible)
        self.argmax.copy_(argmax)
        if logits is not None:
            self.logits.copy_(logits)


def graphs_on_cpu(runner: Runner, monkeypatch) -> None:
    """Let a CPU runner take its graph path, with each 'capture' recorded in runner.graphs."""

    def capture(shape, visible):
        with torch.no_grad():
            argmax, logits = runner._forward(shape, visible)
        graph = EagerGraph(runner, shape, visible, argmax.clone(), None if logits is None else logits.clone())
        return Captured(graph, graph.argmax, graph.logits)

    runner.use_graphs = True
    monkeypatch.setattr(runner, "_capture", capture)


UNIT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n"  # 23 tiny-BPE tokens


def test_after_warm_up_no_request_captures_a_graph(tiny_engine, monkeypatch):
    """Requests of many prompt lengths, cold and reusing KV, AR and lookahead, up to the cache's end."""
    engine = tiny_engine("qwen2")
    runner = engine.runner
    runner.kv_bucket = 32  # many cache-length buckets in a small (512-slot) cache
    graphs_on_cpu(runner, monkeypatch)
    cfg = LookaheadConfig(4, 3, 4)
    captured = warm_up(runner, [step_shape(cfg)], log=lambda _: None)
    assert captured == len(runner.graphs) > 0
    engine.sessions.invalidate_working_cache()
    reached = 0
    for units in (1, 4, 9, 14, 18):
        for cut in (len(UNIT) * units, len(UNIT) * units - 9):  # the second cuts 'fibonacci' mid-word: healing
            for decoding in ("ar", "lookahead"):
                out = complete(engine, (UNIT * units)[:cut], document=f"d{units}",
                               max_tokens=64, decoding=decoding, lookahead=cfg)
                reached = max(reached, out.prompt_tokens + len(out.tokens))
    assert reached > runner.capacity - 100  # the requests used the whole cache
    assert len(runner.graphs) == captured, sorted(set(runner.graphs))


def test_capture_plan_counts_each_graph_once(tiny_engine):
    runner = tiny_engine("qwen2").runner
    plan = capture_plan(runner, [step_shape(LookaheadConfig(4, 3, 4))] * 2)
    keys = [(shape.name, end) for shape, end in plan]
    assert len(keys) == len(set(keys))
    assert all(shape.size <= end <= runner.capacity for shape, end in plan)
    limited = capture_plan(runner, [step_shape(LookaheadConfig(4, 3, 4))], limit=256)
    assert limited and max(end for _, end in limited) == 256 < runner.capacity
    # Whole prompts start at slot 0: each size that fits the cache is captured at its own length only.
    runner.whole_prompt_sizes = (256, 384, 768)  # 768 > the cache
    plan = capture_plan(runner, [])
    whole = [(shape.name, end) for shape, end in plan if shape.size in (256, 384, 768)]
    assert whole == [("causal384", 512), ("causal256", 256)]  # at the cache length a step from slot 0 sees
    runner.whole_prompt_sizes = (512,)  # also a chunk size: captured once
    assert len(capture_plan(runner, [])) == len(plan) - 2


def test_warm_up_leaves_completions_unchanged_on_cpu(tiny_engine):
    engine = tiny_engine("qwen2")
    before = complete(engine, UNIT * 3, max_tokens=16, reuse_kv=False, type_through=False)
    assert warm_up(engine.runner, [step_shape(engine.default_lookahead())], log=lambda _: None) == 0
    engine.sessions.invalidate_working_cache()
    after = complete(engine, UNIT * 3, max_tokens=16, reuse_kv=False, type_through=False)
    assert after.tokens == before.tokens and not engine.runner.graphs


def test_engine_warm_up_pays_first_request_costs_and_forgets_its_completion(tiny_engine):
    """The start-up completion builds the tokenizer's lazy tables (~0.6 s each for Qwen's vocabulary: the
    first real completion paid them), then leaves nothing behind: no open document, nothing learned by the
    drafters (its text must not turn up in users' drafts), and a cold first completion the same as without it."""
    engine, plain = tiny_engine("qwen2"), tiny_engine("qwen2")
    engine.warmup()
    assert {"token_bytes", "_tokens_by_bytes", "fingerprint"} <= set(vars(engine.codec))
    assert list(engine.sessions.sessions) == [] and engine.sessions.active is None
    assert not len(engine.sessions.recycling.pairs) and not engine.sessions.workspace.text
    assert not engine.sessions.calibration.counts
    kwargs = dict(max_tokens=16, reuse_kv=False, type_through=False, decoding="tree")
    assert complete(engine, UNIT * 3, **kwargs).tokens == complete(plain, UNIT * 3, **kwargs).tokens


# The tree loop's calls from Python into compiled code.
COMPILED_ENTRIES = [(tree, "add_path"), (tree, "graft_nodes"), (tree, "score_nodes"), (tree, "most_likely"),
                    (tree, "lay_out"), (tree, "walk_accepted"), (calibration, "count_guesses"),
                    (recycling, "best_first"), (recycling, "store_rows")]


def test_warm_up_compiles_every_part_of_the_tree_loop_for_the_types_requests_pass(tiny_engine, monkeypatch):
    """numba compiles a function for each new set of argument types on its first call (~8 s for the loop on this
    CPU with nothing cached), so warm-up must call every compiled part with exactly the types a request's tree loop
    passes. Catches a part left out of `compile_host_loop`, one called there with other types (a list for an
    array, int32 for int64), and a warm-up that no longer calls it."""
    from numba import typeof

    from engine import engine as engine_module
    from engine.tree_decoding import TreeConfig, compile_host_loop

    seen: dict[str, set] = {"warm-up": set(), "request": set()}
    phase = ["warm-up"]
    for module, name in COMPILED_ENTRIES:
        def recorder(*args, _compiled=getattr(module, name), _name=name):
            seen[phase[0]].add((_name, tuple(typeof(a) for a in args)))
            return _compiled(*args)
        monkeypatch.setattr(module, name, recorder)
    compile_host_loop()
    phase[0] = "request"
    engine = tiny_engine("qwen2")
    complete(engine, UNIT * 3, max_tokens=24, decoding="tree", tree=TreeConfig(16))
    names = {name for _, name in COMPILED_ENTRIES}
    assert {name for name, _ in seen["request"]} == names == {name for name, _ in seen["warm-up"]}
    assert seen["request"] <= seen["warm-up"]
    called = []
    monkeypatch.setattr(engine_module, "compile_host_loop", lambda: called.append(True))
    engine.warmup()
    assert called == [True]


# -- 3. CPU threads and prompt budget -------------------------------------------------------------
def test_omp_num_threads_is_respected():
    assert sizing.cpu_threads(env={"OMP_NUM_THREADS": "3"}, cores=64) == 3


def test_explicit_thread_count_wins_over_the_environment():
    assert sizing.cpu_threads(2, env={"OMP_NUM_THREADS": "5"}, cores=64) == 2


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (4, 3), (64, 8)])
def test_thread_rule_leaves_a_core_free_and_caps(cores, threads):
    assert sizing.cpu_threads(env={}, cores=cores) == threads


def test_malformed_omp_num_threads_falls_back_to_the_rule():
    assert sizing.cpu_threads(env={"OMP_NUM_THREADS": "many"}, cores=4) == 3


def test_smt_siblings_count_as_one_core(tmp_path):
    for cpu, core in enumerate([0, 1, 0, 1]):  # cpu2 and cpu3 are the hyperthreads of cores 0 and 1
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    assert sizing.physical_cores({0, 1, 2, 3}, sysfs=tmp_path) == 2
    assert sizing.physical_cores({0, 2}, sysfs=tmp_path) == 1  # the affinity mask allows one core


def test_configure_threads_sets_torch_on_cpu_only(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        assert sizing.configure_threads(torch.device("cuda")) == 2
        assert sizing.configure_threads(CPU) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)


def test_cpu_prompt_budget_is_smaller_than_the_gpu_one():
    cpu, gpu = sizing.default_budget(CPU), sizing.default_budget(torch.device("cuda"))
    assert gpu == PromptBudget()
    assert cpu.prefix_tokens < gpu.prefix_tokens and cpu.suffix_tokens < gpu.suffix_tokens
    assert cpu.context_tokens < gpu.context_tokens


# -- 4. the default model fits the machine --------------------------------------------------------
GB = 10**9
CUDA = torch.device("cuda")  # only a name here: the GPU memory query is faked


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def put_in_cache(cache: Path, repo_id: str, weights: bool = True) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    if weights:
        (snapshot / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")


def choose(monkeypatch, free_gb: float, device: torch.device = CUDA) -> tuple[str | None, list[str]]:
    monkeypatch.setattr(default_model, "gpu_memory", lambda _: (int(free_gb * GB), 80 * GB))
    lines: list[str] = []
    choice = default_model.choose_default_model(device, lines.append)
    assert len(lines) == 1 and lines[0].startswith("ahead: model ")
    return choice, lines


def test_cached_qwen_is_preferred_to_a_bigger_download(hf_cache, monkeypatch):
    put_in_cache(hf_cache, "Qwen/Qwen2.5-Coder-7B")
    choice, lines = choose(monkeypatch, free_gb=79)  # a 14B would fit, but is not cached
    assert choice == "Qwen/Qwen2.5-Coder-7B" and "in the HF cache" in lines[0]


def test_cached_model_too_big_for_the_gpu_is_passed_over(hf_cache, monkeypatch):
    put_in_cache(hf_cache, "Qwen/Qwen2.5-Coder-7B")
    put_in_cache(hf_cache, "Qwen/Qwen2.5-Coder-1.5B")
    assert choose(monkeypatch, free_gb=16)[0] == "Qwen/Qwen2.5-Coder-1.5B"  # 7B's 15 GB is not half of 16


def test_incomplete_cache_entry_does_not_count(hf_cache, monkeypatch):
    put_in_cache(hf_cache, "Qwen/Qwen2.5-Coder-7B", weights=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert choose(monkeypatch, free_gb=79)[0] is None


def test_with_the_hub_allowed_the_largest_fitting_download_is_chosen(hf_cache, monkeypatch):
    assert choose(monkeypatch, free_gb=79)[0] == "Qwen/Qwen2.5-Coder-7B"  # 14B fits but is not downloaded unasked
    assert choose(monkeypatch, free_gb=20)[0] == "Qwen/Qwen2.5-Coder-3B"


def test_cpu_gets_the_embedded_default(hf_cache, monkeypatch):
    put_in_cache(hf_cache, "Qwen/Qwen2.5-Coder-1.5B")
    choice, lines = choose(monkeypatch, free_gb=79, device=CPU)
    assert choice is None and "no CUDA GPU" in lines[0]


def test_offline_without_a_cached_qwen_gets_the_embedded_default(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choice, lines = choose(monkeypatch, free_gb=79)
    assert choice is None and "HF_HUB_OFFLINE" in lines[0]


def test_tiny_gpu_gets_the_embedded_default(hf_cache, monkeypatch):
    put_in_cache(hf_cache, "Qwen/Qwen2.5-Coder-0.5B")
    assert choose(monkeypatch, free_gb=1.5)[0] is None


def test_unusable_hub_choice_falls_back_to_the_embedded_default(tiny_gguf, hf_cache, monkeypatch):
    _, embedded = tiny_gguf
    put_in_cache(hf_cache, "Qwen/Qwen2.5-Coder-1.5B")  # cached, but its 'weights' are an empty file
    monkeypatch.setattr(default_model, "gpu_memory", lambda _: (79 * GB, 80 * GB))
    monkeypatch.setattr(loading, "default_model_path", lambda log: embedded)
    lines: list[str] = []
    ckpt = load_checkpoint(None, lines.append, device=CUDA)
    assert ckpt.source == str(embedded)
    assert any("Qwen/Qwen2.5-Coder-1.5B is unusable" in line and "falling back" in line for line in lines)


def test_explicit_spec_is_never_second_guessed(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "choose_default_model", lambda *_: pytest.fail("chose for an explicit spec"))
    with pytest.raises(AheadError, match="HF_HUB_OFFLINE"):
        load_checkpoint("ahead-tests/no-such-model", lambda _: None, device=CUDA)
