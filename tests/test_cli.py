"""`ahead complete`: user errors exit 2 with one line, and --json prints one complete object.

Runs `engine.cli.main` in-process. Error paths must fail before any model is loaded; the
real runs reuse the session's SmolLM2 engine instead of loading it again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import complete

from engine import cli

SOURCE = '''def fibonacci(n: int) -> int:
    """The n-th Fibonacci number."""
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


def main() -> None:
    for i in range(10):
        print(
'''
JSON_KEYS = {"completion": str, "tokens": list, "steps": int, "prefill_tokens": int, "time_ms": float,
             "accepted_per_step": list}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "fib.py"
    path.write_text(SOURCE)
    return path


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Error paths must be reported before the (slow) model load."""

    def fail(args: argparse.Namespace):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "engine_from_args", fail)


def run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ahead: error: ")
    return lines[0]


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    "args,expected",
    [
        (["--line", "0", "--col", "0"], None),
        (["--line", "11", "--col", "0"], "line 11"),
        (["--line", "-1", "--col", "0"], "line -1"),
        (["--line", "2", "--col", "30"], "column 30"),
        (["--line", "10", "--col", "1"], "column 1"),  # the file's last line is empty
        (["--line", "3", "--col", "0", "--lookahead", "1,2"], "W,N,G"),
        (["--line", "3", "--col", "0", "--lookahead", "0,3,4"], "W,N,G"),
        (["--line", "3", "--col", "0", "--max-tokens", "-1"], "max-tokens"),
    ],
)
def test_user_errors(source: Path, args: list[str], expected: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    if expected is None:  # a file that does not exist
        line = run_error(["complete", str(source.with_name("missing.py")), *args], capsys)
        assert "no such file" in line and "missing.py" in line
    else:
        assert expected in run_error(["complete", str(source), *args], capsys)


@pytest.mark.usefixtures("no_model")
def test_binary_and_non_utf8_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    assert "binary" in run_error(["complete", str(binary), "--line", "0", "--col", "0"], capsys)
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    assert "UTF-8" in run_error(["complete", str(latin1), "--line", "0", "--col", "0"], capsys)


@pytest.mark.slow
def test_complete_json(smollm2_engine, smollm2_gguf: Path, source: Path, monkeypatch, capsys) -> None:
    """One JSON object with the completion and its stats; AR and lookahead print the same completion."""
    seen: list[argparse.Namespace] = []

    def shared_engine(args: argparse.Namespace):
        seen.append(args)
        return smollm2_engine

    monkeypatch.setattr(cli, "engine_from_args", shared_engine)
    line = SOURCE.count("\n") - 1
    base = ["complete", str(source), "--line", str(line), "--col", "14", "--model", str(smollm2_gguf),
            "--device", "cpu", "--max-tokens", "8", "--json"]
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
        assert len(result["tokens"]) == 8 and all(isinstance(t, int) for t in result["tokens"])
        assert sum(result["accepted_per_step"]) == 8 and result["steps"] == len(result["accepted_per_step"])
        assert result["decoding"] == decoding
        results[decoding] = result
    assert results["ar"]["completion"] == results["lookahead"]["completion"]
    assert results["ar"]["completion"].strip()  # SmolLM2 has something to say after "print("
    assert results["ar"]["tokens"] == results["lookahead"]["tokens"]
    assert results["lookahead"]["prefill_tokens"] == 0  # same file, same cursor: its session is reused
    assert [a.model for a in seen] == [str(smollm2_gguf)] * 2 and seen[0].device == "cpu"


@pytest.mark.slow
def test_complete_plain_text(smollm2_engine, source: Path, monkeypatch, capsys) -> None:
    """Without --json: the completion on stdout, a one-line summary on stderr."""
    monkeypatch.setattr(cli, "engine_from_args", lambda args: smollm2_engine)
    line = SOURCE.count("\n") - 1
    args = ["complete", str(source), "--line", str(line), "--col", "14", "--max-tokens", "8", "--decoding", "ar"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    kw = dict(max_tokens=8, decoding="ar", reuse_kv=False, type_through=False)
    expected = complete(smollm2_engine, SOURCE[:-1], "\n", **kw)
    assert out == expected.text + ("" if expected.text.endswith("\n") else "\n")
    assert "8 tokens" in err and len(err.strip().splitlines()) == 1
