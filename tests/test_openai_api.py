"""`ahead engine --openai`: the OpenAI-compatible endpoint, driven by the official `openai` client.

Catches: FIM suffix ignored, streamed deltas that do not add up to the answer, `stop` not
applied, errors that are not OpenAI-shaped, a token check that lets anyone in off loopback.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from daemon_helpers import CODE, local_engine, local_text, save_tiny_model, serve_openai, stop


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config, tiny_model, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_config, tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def endpoint(model_dir: Path, tmp_path_factory):
    proc, url = serve_openai(model_dir, tmp_path_factory.mktemp("openai"), "127.0.0.1")
    yield url + "/v1"
    stop(proc)


@pytest.fixture(scope="module")
def local(model_dir: Path):
    return local_engine(model_dir)


def post(url: str, body: bytes, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(url + "/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_completion_with_suffix_equals_the_engine(endpoint: str, local) -> None:
    client = openai.OpenAI(base_url=endpoint, api_key="unused-on-loopback")
    got = client.completions.create(model="ahead", prompt=CODE[:60], suffix=CODE[60:], max_tokens=10)
    assert got.choices[0].text == local_text(local, CODE[:60], CODE[60:], max_tokens=10)
    assert got.choices[0].finish_reason in ("length", "stop")
    assert got.usage.completion_tokens > 0 and got.usage.prompt_tokens > 0


def test_streamed_deltas_add_up_to_the_answer(endpoint: str, local) -> None:
    client = openai.OpenAI(base_url=endpoint, api_key="x")
    chunks = list(client.completions.create(model="ahead", prompt=CODE, max_tokens=24, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == local_text(local, CODE, max_tokens=24)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_stop_strings_cut_the_text(endpoint: str, local) -> None:
    client = openai.OpenAI(base_url=endpoint, api_key="x")
    full = local_text(local, CODE, max_tokens=24)
    marker = full.strip()[3:6]
    assert marker, "the tiny model's output is too short for this test"
    got = client.completions.create(model="ahead", prompt=CODE, max_tokens=24, stop=[marker])
    assert got.choices[0].text == full[: full.index(marker)].rstrip()
    assert got.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors(endpoint: str) -> None:
    for body in [b"{not json", b"[1, 2]", json.dumps({"prompt": 5}).encode(), json.dumps({"prompt": "x", "n": 3})
                 .encode(), json.dumps({"prompt": "x", "max_tokens": 100000}).encode()]:
        status, reply = post(endpoint, body)
        assert status == 400, body
        assert reply["error"]["message"]
    status, reply = post(endpoint, json.dumps({"prompt": "def f():", "max_tokens": 2}).encode())
    assert status == 200 and reply["object"] == "text_completion"


def test_off_loopback_needs_the_token(model_dir: Path, tmp_path: Path) -> None:
    """Bound to all interfaces (reached here over loopback only): no token or a wrong one is 401."""
    token = tmp_path / "token"
    token.write_text("the-token\n")
    token.chmod(0o600)
    proc, url = serve_openai(model_dir, tmp_path, "0.0.0.0", "--token-file", str(token))
    url += "/v1"
    try:
        body = json.dumps({"prompt": "def f():", "max_tokens": 2}).encode()
        assert post(url, body)[0] == 401
        assert post(url, body, token="the-tokeN")[0] == 401
        status, reply = post(url, body, token="the-token")
        assert status == 200 and reply["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        stop(proc)
