"""The `ahead` command line: user errors exit 2 with one line before any model loads, --help and
--version need no torch, an engine is built from real flags, and `complete` prints what it says.

Runs `engine.cli.main` in-process, except where a fresh interpreter is the point (imports).
One SmolLM2 engine is built from flags for this module; the other real runs reuse the
session's shared SmolLM2 engine instead of loading it again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import complete

from engine import cli, flags
from engine.engine import Engine
from engine.stops import StopRules

CASES = Path(__file__).resolve().parents[2] / "shared" / "bench" / "cases.jsonl"
SOURCE = '''def fibonacci(n: int) -> int:
    """The n-th Fibonacci number."""
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


def main() -> None:
    for i in range(10):
        print(
'''
JSON_KEYS = {"text": str, "tokens": int, "steps": int, "prefill_tokens": int, "time_ms": float,
             "accepted_per_step": list, "stop_reason": str, "model": str, "engine": str, "range": dict,
             "served_by": str}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "fib.py"
    path.write_text(SOURCE)
    return path


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Error paths must be reported before the (slow) model load: building any engine fails the test."""

    def fail(self, *args, **kwargs):
        raise AssertionError("an engine was built before the arguments were checked")

    monkeypatch.setattr(Engine, "__init__", fail)


def run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ahead: error: ")
    return lines[0]


# -- errors, all before the model loads -----------------------------------------------------------
@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    "args,expected",
    [
        (["--line", "11", "--col", "0"], ["line 11"]),
        (["--line", "-1", "--col", "0"], ["line -1"]),
        (["--line", "2", "--col", "30"], ["column 30"]),
        (["--line", "10", "--col", "1"], ["column 1"]),  # the file's last line is empty
        (["--line", "x", "--col", "0"], ["--line", "'x'"]),
        (["--line", "3", "--col", "0", "--lookahead", "abc"], ["--lookahead", "W,N,G", "'abc'"]),
        (["--line", "3", "--col", "0", "--lookahead", "1,2"], ["W,N,G", "'1,2'"]),
        (["--line", "3", "--col", "0", "--lookahead", "0,3,4"], ["W,N,G"]),
        (["--line", "3", "--col", "0", "--max-tokens", "-1"], ["--max-tokens", ">= 0"]),
        (["--line", "3", "--col", "0", "--max-tokens", "many"], ["--max-tokens", "'many'"]),
        (["--line", "3", "--col", "0", "--max-tokens", "5000"], ["--max-tokens 5000", "--max-seq-len 4096"]),
        (["--line", "3", "--col", "0", "--max-tokens", "600", "--max-seq-len", "1024", "--prefix-tokens", "512"],
         ["does not fit", "--max-seq-len 1024"]),
        (["--line", "3", "--col", "0", "--max-seq-len", "1000"], ["--max-seq-len", "multiple of 256"]),
        (["--line", "3", "--col", "0", "--max-lines", "-2"], ["--max-lines"]),
        (["--line", "3", "--col", "0", "--device", "tpu"], ["--device", "'tpu'"]),
        (["--line", "3", "--col", "0", "--prefix-tokens", "-5"], ["--prefix-tokens"]),
    ],
)
def test_complete_user_errors(source: Path, args: list[str], expected: list[str], capsys) -> None:
    line = run_error(["complete", str(source), *args], capsys)
    for part in expected:
        assert part in line, line


@pytest.mark.usefixtures("no_model")
def test_missing_file_and_directory(tmp_path: Path, capsys) -> None:
    line = run_error(["complete", str(tmp_path / "missing.py"), "--line", "0", "--col", "0"], capsys)
    assert "no such file" in line and "missing.py" in line
    line = run_error(["complete", str(tmp_path), "--line", "0", "--col", "0"], capsys)
    assert "is a directory" in line and "no such file" not in line


@pytest.mark.usefixtures("no_model")
def test_binary_and_non_utf8_files(tmp_path: Path, capsys) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    assert "binary" in run_error(["complete", str(binary), "--line", "0", "--col", "0"], capsys)
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    assert "UTF-8" in run_error(["complete", str(latin1), "--line", "0", "--col", "0"], capsys)


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    "argv,expected",
    [
        ([], ["required"]),
        (["serve"], ["'serve'"]),
        (["bench", "--cases", "{missing}"], ["--cases", "does not exist"]),
        (["bench", "--cases", "{dir}"], ["--cases", "is a directory"]),
        (["bench", "--cases", "{bad}"], ["bad.jsonl:2", "not a case"]),
        (["bench", "--cases", "{cases}", "--lookahead", "abc"], ["--lookahead", "W,N,G"]),
        (["bench", "--cases", "{cases}", "--methods", "ar,beam"], ["unknown method", "beam"]),
        (["bench", "--cases", "{cases}", "--max-tokens", "5000"], ["--max-tokens 5000", "does not fit"]),
        (["bench", "--cases", "{cases}", "--limit", "0"], ["--limit", ">= 1"]),
        (["bench", "--cases", "{cases}", "--out", "{bad}"], ["--out", "is a file"]),
        (["bench", "--cases", "{cases}", "keystrokes", "--lookahead", "4;3;2"], ["--lookahead", "W,N,G"]),
        (["bench", "keystrokes", "--file", "{dir}"], ["is a directory"]),
        (["bench", "keystrokes", "--file", "{cases}", "--col", "3"], ["--col needs --line"]),
        (["bench", "keystrokes", "--file", "{cases}", "--line", "99999"], ["--line 99999", "outside"]),
        (["bench", "keystrokes", "--chars", "0"], ["--chars", ">= 1"]),
        (["tune", "--cases", "{cases}", "--grid", "4,3,4;1,2"], ["--grid", "W,N,G", "'1,2'"]),
        (["tune", "--cases", "{cases}", "--windows", "4,x"], ["--windows", "'4,x'"]),
        (["tune", "--cases", "{missing}"], ["does not exist"]),
        (["tune", "--cases", "{cases}", "--store", "--no-store"], ["not allowed with"]),
        (["tune", "--shape", "qwen9-huge"], ["unknown --shape", "qwen9-huge"]),
        (["tune", "--shape", "qwen2.5-coder-7b", "--context", "4090"], ["--context 4090", "does not fit"]),
        (["tune", "--shape", "qwen2.5-coder-7b", "--tokens-per-step-from", "{bad}"], ["--tokens-per-step-from"]),
    ],
)
def test_command_user_errors(argv: list[str], expected: list[str], tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prefix": "x = 1"}\nnot json\n')
    paths = {"{missing}": str(tmp_path / "missing.jsonl"), "{dir}": str(tmp_path), "{bad}": str(bad),
             "{cases}": str(CASES)}
    line = run_error([paths.get(a, a) for a in argv], capsys)
    for part in expected:
        assert part in line, line


def test_version(capsys) -> None:
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"ahead {metadata.version('ahead')}"


def test_help_imports_neither_torch_nor_transformers() -> None:
    """A fresh interpreter: --help of every command, then no torch or transformers in sys.modules."""
    script = (
        "import sys, contextlib, io\n"
        "from engine import cli\n"
        "for argv in (['--help'], ['complete', '--help'], ['bench', '--help'], ['bench', 'keystrokes', '--help'],"
        " ['tune', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        assert cli.main(argv) == 0 and 'usage: ahead' in out.getvalue(), argv\n"
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- real runs ------------------------------------------------------------------------------------
ENGINE_FLAGS = ["--device", "cpu", "--dtype", "fp32", "--max-seq-len", "1024", "--prefix-tokens", "96",
                "--suffix-tokens", "16"]


@pytest.fixture(scope="module")
def flag_engine(smollm2_gguf: Path):
    """SmolLM2 built by the one code path every command uses, from flags as a user types them."""
    args = cli.build_parser().parse_args(["complete", "f.py", "--line", "0", "--col", "0", "--model",
                                          str(smollm2_gguf), *ENGINE_FLAGS])
    return flags.engine_from_args(args)


@pytest.mark.slow
def test_engine_from_flags(flag_engine, smollm2_gguf: Path) -> None:
    engine = flag_engine
    assert engine.model_name == str(smollm2_gguf)
    assert engine.device.type == "cpu" and str(engine.dtype) == "torch.float32"
    assert engine.runner.capacity == 1024
    budget = engine.options.budget
    assert (budget.prefix_tokens, budget.suffix_tokens) == (96, 16)
    long_prefix = "".join(f"value_{i} = compute({i}, {i + 1})\n" for i in range(200))
    done = complete(engine, long_prefix, "print(value_3)\n" * 50, max_tokens=4, decoding="ar", reuse_kv=False)
    assert done.prompt_tokens <= 96 + 16 + 3  # the flags' budget, not the default 3072 + 256, shaped the prompt


@pytest.mark.slow
def test_complete_from_real_flags(flag_engine, smollm2_gguf: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """`ahead complete --json` end to end: the flags reach the engine, and the JSON says what ran where."""
    built: list[argparse.Namespace] = []

    def build(args: argparse.Namespace):  # the real builder ran in `flag_engine` from the same flags
        built.append(args)
        assert flags.engine_options(args) == flag_engine.options
        return flag_engine

    monkeypatch.setattr(flags, "engine_from_args", build)
    path = tmp_path / "long.py"
    path.write_text("".join(f"value_{i} = compute({i}, {i + 1})\n" for i in range(200)) + "\n")
    assert cli.main(["complete", str(path), "--line", "200", "--col", "0", "--model", str(smollm2_gguf),
                     "--max-tokens", "6", "--json", *ENGINE_FLAGS]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert len(built) == 1 and "completion" not in result
    assert result["model"] == str(smollm2_gguf) and "cpu (float32)" in result["engine"]
    assert result["prompt_tokens"] <= 96 + 16 + 3
    assert result["range"] == {"start": {"line": 200, "character": 0}, "end": {"line": 200, "character": 0}}


@pytest.mark.slow
def test_complete_json(smollm2_engine, source: Path, monkeypatch, capsys) -> None:
    """One JSON object with the completion and its stats; AR and lookahead print the same completion."""
    monkeypatch.setattr(flags, "engine_from_args", lambda args: smollm2_engine)
    line = SOURCE.count("\n") - 1
    base = ["complete", str(source), "--line", str(line), "--col", "14", "--device", "cpu", "--max-tokens", "8",
            "--no-stop-rules", "--json"]
    results = {}
    for decoding in ("ar", "lookahead"):
        assert cli.main([*base, "--decoding", decoding, "--lookahead", "4,3,4"]) == 0
        out, err = capsys.readouterr()
        assert "error" not in err
        lines = out.strip().splitlines()
        assert len(lines) == 1, out
        result = json.loads(lines[0])
        for key, kind in JSON_KEYS.items():
            assert isinstance(result[key], kind), key
        assert result["tokens"] == 8 and result["served_by"] == "in-process"
        assert sum(result["accepted_per_step"]) == 8 and result["steps"] == len(result["accepted_per_step"])
        assert result["decoding"] == decoding and result["stop_reason"] == "length"
        assert result["range"]["start"] == result["range"]["end"] == {"line": line, "character": 14}
        results[decoding] = result
    assert results["ar"]["text"] == results["lookahead"]["text"]
    assert results["ar"]["text"].strip()  # SmolLM2 has something to say after "print("
    assert results["lookahead"]["prefill_tokens"] == 0  # same file, same cursor: its session is reused


@pytest.mark.slow
@pytest.mark.parametrize("extra,stop", [
    ([], StopRules()),  # stop rules by default
    (["--no-stop-rules"], StopRules.raw()),
    (["--max-lines", "1"], StopRules(max_lines=1)),
])
def test_complete_plain_text(smollm2_engine, source: Path, monkeypatch, capsys, extra, stop) -> None:
    """Without --json: the completion on stdout, a one-line summary with the stop reason on stderr."""
    monkeypatch.setattr(flags, "engine_from_args", lambda args: smollm2_engine)
    line = SOURCE.count("\n") - 1
    args = ["complete", str(source), "--line", str(line), "--col", "14", "--max-tokens", "24", "--decoding", "ar"]
    assert cli.main([*args, *extra]) == 0
    out, err = capsys.readouterr()
    expected = complete(smollm2_engine, SOURCE[:-1], "\n", max_tokens=24, decoding="ar", reuse_kv=False,
                        type_through=False, stop=stop)
    assert out == (expected.text + "\n" if expected.text else "")
    summary = err.strip().splitlines()[-1]
    assert f"{len(expected.tokens)} tokens" in summary and f"stop: {expected.stop_reason}" in summary
    if stop.max_lines:
        assert "\n" not in out.rstrip("\n")


@pytest.mark.slow
def test_no_completion_is_said_on_stderr(smollm2_engine, source: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(flags, "engine_from_args", lambda args: smollm2_engine)
    assert cli.main(["complete", str(source), "--line", "3", "--col", "0", "--max-tokens", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[0] == "(no completion: length)" and "stop: length" in err


def test_the_fit_check_counts_the_tree_a_plain_lookahead_may_run(monkeypatch) -> None:
    """`--decoding lookahead` without W,N,G runs the default tree where that is the device's default, so the
    check before loading must leave room for a built-in tree step bigger than any lookahead step."""
    from engine import engine, flags
    from engine.lookahead import LookaheadConfig
    from engine.tree_decoding import TreeConfig

    monkeypatch.setitem(engine.BUILTIN_TREE, "cuda", TreeConfig(160))
    assert flags.step_tokens("lookahead", None) == 160 == flags.step_tokens("tree", None)
    assert flags.step_tokens("lookahead", LookaheadConfig(2, 3, 2)) == LookaheadConfig(2, 3, 2).step_tokens
    assert flags.step_tokens("ar", None) == 1
