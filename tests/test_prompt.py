"""Prompts built from token ids: FIM layout, file text that looks like control tokens, stable windows.

A tiny byte-level BPE with Qwen2.5-Coder's control tokens stands in for the real tokenizer, so
these tests need no weights.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.errors import AheadError
from engine.prompt import PromptBudget, build_prompt, prefix_window, suffix_window
from engine.request import CompletionRequest
from engine.stops import StopRules
from engine.tokens import Codec

CONTROL = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>"]
# Qwen2's pre-tokenizer regex (from its tokenizer.json): newlines are their own pre-tokens.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


@pytest.fixture(scope="module")
def fim_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen2's pre-tokenizer; control tokens are added special tokens, as in Qwen2.5-Coder."""
    tok = Tokenizer(models.BPE())
    split = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=CONTROL,
        show_progress=False,
    )
    tok.train_from_iterator([CODE * 4], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def fim_codec(fim_tokenizer: PreTrainedTokenizerFast) -> Codec:
    return Codec(fim_tokenizer)


def control_ids(codec: Codec) -> set[int]:
    ids = {codec.token_id(name) for name in CONTROL}
    assert None not in ids
    return ids  # type: ignore[return-value]


def test_fim_layout_uses_vocab_ids(fim_codec: Codec) -> None:
    """[fim_prefix] P [fim_suffix] S [fim_middle], each marker by its vocabulary id."""
    pre, suf, mid = (fim_codec.token_id(n) for n in CONTROL[1:4])
    assert fim_codec.fim_ids == (pre, suf, mid)
    prefix, suffix = CODE[:40], CODE[40:]
    prompt = build_prompt(fim_codec, prefix, suffix, PromptBudget(), heal=False)
    assert prompt.fim and prompt.healed == b""
    assert prompt.ids == [pre, *fim_codec.encode(prefix), suf, *fim_codec.encode(suffix), mid]


def test_fim_layout_with_healing(fim_codec: Codec) -> None:
    """Healing backs the prefix's last token off (before fim_suffix) and remembers its bytes."""
    prefix, suffix = "    return fibon", "\n"
    plain = build_prompt(fim_codec, prefix, suffix, heal=False)
    healed = build_prompt(fim_codec, prefix, suffix, heal=True)
    p_ids = fim_codec.encode(prefix)
    assert healed.ids == [plain.ids[0], *p_ids[:-1], *plain.ids[len(p_ids) + 1 :]]
    assert healed.healed == fim_codec.token_bytes[p_ids[-1]] and prefix.encode().endswith(healed.healed)


def test_control_token_text_in_files_is_plain_text(fim_tokenizer: PreTrainedTokenizerFast, fim_codec: Codec) -> None:
    """A file that contains "<|endoftext|>" or "<|fim_middle|>" must not inject control tokens."""
    prefix = 'STOP = "<|endoftext|>"\nFIM = "<|fim_prefix|>"\n'
    suffix = 'MIDDLE = "<|fim_middle|><|fim_suffix|>"\n'
    # The stock tokenizer would parse them: that is exactly what the codec must not do.
    assert fim_codec.token_id("<|endoftext|>") in fim_tokenizer.encode(prefix, add_special_tokens=False)
    controls = control_ids(fim_codec)
    prompt = build_prompt(fim_codec, prefix, suffix, heal=True)
    pre, suf, mid = fim_codec.fim_ids
    assert prompt.ids[0] == pre and prompt.ids[-1] == mid
    cut = prompt.ids.index(suf)
    p_ids, s_ids = prompt.ids[1:cut], prompt.ids[cut + 1 : -1]
    assert not controls & (set(p_ids) | set(s_ids))
    assert fim_codec.to_bytes(p_ids) + prompt.healed == prefix.encode()
    assert fim_codec.to_bytes(s_ids) == suffix.encode()


def test_stop_ids(fim_codec: Codec) -> None:
    """End of text stops generation; ordinary code tokens never do."""
    eot = fim_codec.token_id("<|endoftext|>")
    assert eot in fim_codec.stop_ids
    assert not fim_codec.stop_ids & set(fim_codec.encode(CODE))


def test_prefix_only_without_fim_tokens(tiny_tokenizer: PreTrainedTokenizerFast, fim_codec: Codec) -> None:
    """No FIM tokens (or fim=False): the prompt is the prefix alone and the suffix is ignored."""
    codec = Codec(tiny_tokenizer)
    assert codec.fim_ids is None
    prefix = "def fibonacci(n): return fibonacci(n - 1) + fibonacci(n - 2)"
    for c, fim in ((codec, True), (fim_codec, False)):
        prompt = build_prompt(c, prefix, "suffix text\n", fim=fim, heal=True)
        assert not prompt.fim
        assert prompt.ids == c.encode(prefix)[:-1]
        assert c.to_bytes(prompt.ids) + prompt.healed == prefix.encode()
        assert build_prompt(c, prefix, "suffix text\n", fim=fim, heal=False).ids == c.encode(prefix)


def test_multiline_prompt_is_the_canonical_encoding_for_gpt2_style_tokenizers(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    """SmolLM2 (the default model) uses GPT-2's pre-tokenizer regex, where a newline is not a
    pre-token boundary ("\n   " + " return"): the prompt must still be the tokenization the model
    was trained on, not a concatenation of per-line encodings."""
    codec = Codec(tiny_tokenizer)
    assert codec.encode("x\n    return") != codec.encode("x\n") + codec.encode("    return")  # the hazard exists
    prefix = CODE + "\n    if n == 0:\n        return 0\n    return fibonacci(n - 1)"
    assert build_prompt(codec, prefix, heal=False).ids == codec.encode(prefix)
    start, window = prefix_window(codec, prefix, PromptBudget(prefix_tokens=30, window_lines=2))
    assert start > 0 and window == codec.encode(prefix[start:])


def long_source(lines: int) -> str:
    return "".join(f"    value_{i} = compute({i}, scale={i % 7})  # step {i}\n" for i in range(lines))


def test_prefix_window_is_stable_while_typing(fim_codec: Codec) -> None:
    """Typing at the end keeps the window start fixed; it moves in jumps of whole line blocks."""
    budget = PromptBudget(prefix_tokens=200, window_lines=4)
    base = long_source(60)
    typed = "".join(f"result_{i} = combine(value_{i}, value_{i + 1})\n" for i in range(16))
    last_start, moves = -1, 0
    for k in range(len(typed) + 1):
        prefix = base + typed[:k]
        start, ids = prefix_window(fim_codec, prefix, budget)
        assert len(ids) <= budget.prefix_tokens
        assert start == 0 or prefix[start - 1] == "\n"
        assert ids == fim_codec.encode(prefix[start:])
        line = prefix.count("\n", 0, start)
        assert line % budget.window_lines == 0
        # The earliest aligned start that fits: one block earlier would overflow the budget.
        assert line > 0, "the base text alone overflows the budget"
        earlier = sum(len(x) + 1 for x in prefix.split("\n")[: line - budget.window_lines])
        assert len(fim_codec.encode(prefix[earlier:])) > budget.prefix_tokens
        if start != last_start:
            assert start > last_start
            moves += 1
            last_start = start
    assert len(typed) > 600
    assert 2 <= moves <= len(typed) // 50, f"the window moved {moves} times in {len(typed)} keystrokes"


def test_a_cold_prefix_window_is_sized_in_a_few_tokenizer_calls(fim_tokenizer: PreTrainedTokenizerFast) -> None:
    """A document's first request sizes its window from hundreds of lines: batches of lines per
    tokenizer call, not a call per line (a line at a time cost a cold 3,000-token window of
    Qwen2.5-Coder ~6 ms)."""
    codec = Codec(fim_tokenizer)
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(backend, name)

        def encode_batch(self, texts, **kwargs):
            calls.append(len(texts))
            return backend.encode_batch(texts, **kwargs)

    backend, codec.backend = codec.backend, Counting()
    prefix = long_source(400)
    start, ids = prefix_window(codec, prefix, PromptBudget(prefix_tokens=12000, window_lines=32))
    assert ids == fim_tokenizer.backend_tokenizer.encode(prefix[start:], add_special_tokens=False).ids
    assert prefix.count("\n", 0, start) > 0 and len(ids) <= 12000
    assert sum(calls) > 200 and len(calls) <= 6, calls


def test_prefix_window_fits_when_everything_fits(fim_codec: Codec) -> None:
    prefix = long_source(3)
    assert prefix_window(fim_codec, prefix, PromptBudget(prefix_tokens=500)) == (0, fim_codec.encode(prefix))


def test_prefix_window_cuts_an_overlong_line_by_tokens(fim_codec: Codec) -> None:
    """A cursor line longer than the whole budget still gives a window within the budget."""
    budget = PromptBudget(prefix_tokens=50, window_lines=4)
    prefix = long_source(8) + "x = [" + ", ".join(str(i) for i in range(200))
    start, ids = prefix_window(fim_codec, prefix, budget)
    assert 0 < len(ids) <= budget.prefix_tokens
    assert prefix.endswith(fim_codec.decode(ids))
    assert start > prefix.rindex("\n")


def test_suffix_window_cuts_at_a_line_boundary(fim_codec: Codec) -> None:
    """Whole lines only, as many as fit the budget."""
    suffix = long_source(20)
    budget = PromptBudget(suffix_tokens=60)
    ids = suffix_window(fim_codec, suffix, budget)
    text = fim_codec.decode(ids)
    assert 0 < len(ids) <= budget.suffix_tokens
    assert suffix.startswith(text) and text.endswith("\n")
    next_line = suffix.index("\n", len(text)) + 1
    assert len(fim_codec.encode(suffix[:next_line])) > budget.suffix_tokens
    assert ids == fim_codec.encode(text)


def test_suffix_window_small_or_disabled(fim_codec: Codec) -> None:
    assert suffix_window(fim_codec, "return n", PromptBudget(suffix_tokens=60)) == fim_codec.encode("return n")
    assert suffix_window(fim_codec, CODE, PromptBudget(suffix_tokens=0)) == []
    assert suffix_window(fim_codec, "", PromptBudget()) == []


def test_pieces_cut_at_line_starts_and_encode_like_the_whole(fim_codec: Codec) -> None:
    for text in ("", "x", CODE, "\n\n" + CODE + "\n\n\n", long_source(5) + "tail"):
        pieces = fim_codec.split_pieces(text)
        assert "".join(pieces) == text and all(pieces)
        assert all(p.endswith("\n") for p in pieces[:-1])  # Qwen2's regex: every line start is safe
        assert [i for ids in fim_codec.encode_pieces(pieces) for i in ids] == fim_codec.encode(text)
    assert len(fim_codec.split_pieces(CODE)) == CODE.count("\n")


# -- the engine's empty-prompt fallback ------------------------------------------------------------


def tiny_llama_engine(tiny_config, tiny_model, tokenizer, **config):
    """An engine on a tiny Llama (no FIM tokens: an empty prefix gives an empty prompt), and its HF reference."""
    from engine.engine import Engine, EngineOptions

    hf, ckpt = tiny_model(tiny_config("llama", eos_token_id=None, **config))
    ckpt = dataclasses.replace(ckpt, tokenizer=tokenizer)
    return Engine(EngineOptions(device="cpu", dtype="fp32", max_seq_len=256), log=lambda _: None, checkpoint=ckpt), hf


def test_empty_document_completes_from_bos(tiny_config, tiny_model, tiny_tokenizer) -> None:
    """Nothing before or after the cursor: the prompt is [bos] and the completion is the model's greedy
    continuation of it (checked against transformers, token by token)."""
    engine, hf = tiny_llama_engine(tiny_config, tiny_model, tiny_tokenizer, bos_token_id=7)
    assert build_prompt(engine.codec, "", "", heal=True).ids == []
    ids = [7]
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    for decoding in ("ar", "lookahead"):
        out = engine.complete(CompletionRequest("", "", max_tokens=8, decoding=decoding, stop=StopRules.raw()))
        assert out.prompt_tokens == 1 and out.tokens == ids[1:], decoding


def test_empty_prompt_without_bos_is_a_clear_error(tiny_config, tiny_model, tiny_tokenizer) -> None:
    engine, _ = tiny_llama_engine(tiny_config, tiny_model, tiny_tokenizer, bos_token_id=None)
    with pytest.raises(AheadError, match="empty"):
        engine.complete(CompletionRequest("", ""))
    assert engine.complete(CompletionRequest("def f", max_tokens=4, stop=StopRules.raw())).tokens  # still serving


def test_repo_context_layout_budget_and_room(fim_codec: Codec) -> None:
    """Other files come first as `<|file_sep|>path\ntext\n`, the current file's path last before the FIM
    markers; the least relevant (first) file is dropped past the context budget; and `room` (what the KV cache
    leaves) shrinks the context, never the document's own windows; a file that does not fit whole is cut to
    its first tokens. Catches a context that pushes a prompt
    past the cache (it did: 1024 context + 3072 + 256 tokens did not fit 4096 slots with 128 new tokens)."""
    sep = fim_codec.token_id("<|file_sep|>")
    pre, suf, mid = fim_codec.fim_ids
    context = (("old.py", "def old():\n    pass"), ("near.py", "def near():\n    return 1"))
    own = [pre, *fim_codec.encode("x = "), suf, mid]
    full = build_prompt(fim_codec, "x = ", "", PromptBudget(), heal=False, context=context, path="cur.py")
    files = [sep, *fim_codec.encode("old.py\ndef old():\n    pass\n"),
             sep, *fim_codec.encode("near.py\ndef near():\n    return 1\n"), sep, *fim_codec.encode("cur.py\n")]
    assert full.ids == files + own
    tight = PromptBudget(context_tokens=len(files) - 1)
    dropped = build_prompt(fim_codec, "x = ", "", tight, heal=False, context=context, path="cur.py")
    head = dropped.ids[: dropped.ids.index(pre)]
    near = files[files.index(sep, 1):]  # near.py and the current path, whole
    assert len(head) == len(files) - 1 and head[-len(near):] == near and head[0] == sep  # old.py cut short
    assert dropped.ids[-len(own):] == own
    roomy = build_prompt(fim_codec, "x = ", "", PromptBudget(), heal=False, context=context, path="cur.py",
                         room=len(own) + 5)
    assert len(roomy.ids) <= len(own) + 5 and roomy.ids[-len(own):] == own
