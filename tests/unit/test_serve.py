"""`finemed serve`'s HTTP layer in-process (FastAPI's test client) on the embedded GGUF, without TTT: the wire
format, stop strings, and that every malformed request gets OpenAI's JSON error with a 4xx, never a 500."""

from __future__ import annotations

import pytest

from finemed_cli.config.serve import ServeConfig
from finemed_cli.errors import ConfigError
from finemed_cli.serve.protocol import StopScanner

pytest.importorskip("llama_cpp")
pytest.importorskip("fastapi")

QUESTION = [{"role": "user", "content": "What does the thyroid gland make?"}]


def _chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "m", "messages": QUESTION, **body})


def _sse(text: str) -> list:
    import json

    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_and_the_embedded_caution(client) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["m"]
    assert "not a medical source" in r.headers["x-finemed-caution"]


def test_streamed_text_is_the_whole_text_and_usage_counts(client) -> None:
    whole = _chat(client, max_tokens=16).json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 16 and whole["usage"]["prompt_tokens"] > 10
    r = _chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"] == whole["usage"]
    assert len({e["id"] for e in events}) == 1


def test_stop_strings_cut_the_text_streamed_or_not(client) -> None:
    text = _chat(client, max_tokens=24).json()["choices"][0]["message"]["content"]
    words = text.split()
    stop = " " + words[3]  # a later word: the text before it comes back, finish_reason stop
    want = text[: text.index(stop)]
    whole = _chat(client, max_tokens=24, stop=[stop, "zzzz-never"]).json()["choices"][0]
    assert whole["message"]["content"] == want and whole["finish_reason"] == "stop"
    events = _sse(_chat(client, max_tokens=24, stop=stop, stream=True).text)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == want


def test_stop_scanner_holds_back_a_possible_start() -> None:
    s = StopScanner(["</answer>"])
    assert s.feed("the answer is B</ans") == "the answer is B"
    assert s.feed("wer> more") == "" and s.stopped
    s = StopScanner(["</answer>"])
    assert s.feed("a </a") == "a " and s.feed("b") == "</ab" and not s.stopped
    plain = StopScanner(None)
    assert plain.feed("abc") == "abc" and plain.flush() == ""


BAD = [
    ({"messages": QUESTION, "model": "other"}, 404, "model"),
    ({"model": "m", "messages": [{"role": "bot", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "m", "messages": []}, 400, "messages"),
    ({"model": "m"}, 400, "messages"),
    ({"model": "m", "messages": QUESTION, "max_tokens": 100000}, 400, "messages"),
    ({"model": "m", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "m", "messages": QUESTION, "temperature": 7}, 400, "temperature"),
    ({"model": "m", "messages": QUESTION, "n": 3}, 400, "n"),
    ({"model": "m", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "m", "messages": QUESTION, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "m", "messages": QUESTION, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": "m", "messages": QUESTION, "ttt": True}, 400, "ttt"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ({"model": "m", "messages": "hello"}, 400, "messages"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD, ids=[p for _, _, p in BAD])
def test_bad_requests_get_openai_errors(client, body, status, param) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"].endswith("_error")


@pytest.mark.parametrize(("method", "path", "content", "status"), [
    ("post", "/v1/chat/completions", b"{not json", 400),
    ("post", "/v1/chat/completions", b"", 400),
    ("get", "/v1/chat/completions", None, 405),
    ("get", "/v1/nothing", None, 404),
])
def test_broken_http_gets_json_errors(client, method, path, content, status) -> None:
    r = client.request(method.upper(), path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status and r.json()["error"]["message"]


def test_developer_role_and_text_parts_are_accepted(client) -> None:
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "What does the thyroid gland make?"}]}]
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_config_refuses_what_cannot_work(tmp_path) -> None:
    lora = tmp_path / "a.gguf"
    with pytest.raises(ConfigError, match="merge that LoRA"):
        ServeConfig("m.gguf", index=tmp_path, lora=lora).validate()
    with pytest.raises(ConfigError, match="needs --index"):
        ServeConfig("m.gguf", ttt_model="x").validate()
    with pytest.raises(ConfigError, match="max tokens"):
        ServeConfig("m.gguf", n_ctx=64, max_tokens=64).validate()
    for seed in (-1, 2**63):
        with pytest.raises(ConfigError, match=f"seed must be from 0 to 2\\*\\*63 - 1, got {seed}"):
            ServeConfig("m.gguf", seed=seed).validate()
    ServeConfig("m.gguf", seed=2**63 - 1).validate()
    with pytest.raises(ConfigError, match="shutdown grace"):
        ServeConfig("m.gguf", shutdown_grace=-1).validate()


@pytest.mark.parametrize("seed", [-1, 2**63])
def test_a_request_seed_out_of_range_is_a_400(client, seed) -> None:
    r = _chat(client, seed=seed, max_tokens=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_a_whole_response_cancelled_by_a_stopping_server_is_a_503(engine) -> None:
    """What a client waiting for a whole response gets when the server stops under it: OpenAI's error with
    a 503 once its decode is cancelled, and no request taken after that."""
    import threading
    import time

    from fastapi.testclient import TestClient

    from finemed_cli.serve.app import create_app

    counting = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Write the numbers from 1 to 3000, separated by commas."}]
    app = create_app(engine)
    jobs, result = app.state.jobs, {}
    with TestClient(app) as c:
        def ask() -> None:  # greedy counting: runs to its 400-token budget unless cancelled
            result["r"] = c.post("/v1/chat/completions", json={"model": "m", "messages": counting,
                                                               "max_tokens": 400})

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 60
        while not jobs.running:
            assert time.monotonic() < deadline and asker.is_alive(), result
            time.sleep(0.01)
        assert jobs.cancel_all() == 1
        asker.join(timeout=60)
        late = _chat(c, max_tokens=2)
    r = result["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
    assert "cancelled after" in r.json()["error"]["message"] and late.status_code == 503

