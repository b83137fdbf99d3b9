"""`finemed serve`'s routes for tools, in-process on the embedded GGUF: `/v1/completions` with echo and
logprobs equal to llama.cpp's own log-probabilities (and parsed by lm-eval as it parses them), a 400 naming
any field the server does not implement, `/metrics` counting, `/tokenize` round trips, `/v1/embeddings`."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("fastapi")

TEXT = "<|im_start|>user\nWhat does the thyroid gland make?<|im_end|>\n<|im_start|>assistant\nThyroid hormones"


@pytest.fixture(scope="module")
def reference(engine):
    """llama.cpp's own next-token log-probabilities of TEXT, on a context opened as the scoring one is."""
    from finemed_cli.generate.llamacpp import LlamaCpp

    with LlamaCpp(engine.path, n_ctx=512, exact=True, logits_all=True) as llama:
        ids = llama.tokenize(TEXT)
        return ids, llama.logprobs(ids)


def _tokens(client, text: str) -> list[int]:
    r = client.post("/tokenize", json={"content": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_are_llama_cpps_own(client, reference, max_tokens) -> None:
    ids, logp = reference
    other = ids[:-2] + _tokens(client, " and calcitonin")  # shares a prefix: the scoring context keeps its cache
    assert client.post("/v1/completions", json={"prompt": other, "echo": True, "logprobs": 1,
                                                "max_tokens": 1}).status_code == 200
    r = client.post("/v1/completions", json={"model": "m", "prompt": ids, "echo": True, "logprobs": 3,
                                             "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + max_tokens and lp["token_logprobs"][0] is None
    want = [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]
    np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], want, atol=1e-4, rtol=0)
    for j in range(1, len(ids)):  # the top 3, most likely first, are llama.cpp's
        top = lp["top_logprobs"][j]
        assert len(top) == 3 and list(top.values()) == sorted(top.values(), reverse=True)
        assert abs(max(top.values()) - float(logp[j - 1].max())) < 1e-4
    assert choice["text"].startswith(TEXT) and lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_lm_eval_parses_the_answer_as_the_continuations_loglikelihood(client, reference) -> None:
    lm_eval = pytest.importorskip("lm_eval.models.openai_completions")
    ids, logp = reference
    ctxlen = len(ids) - 3  # "Thyroid hormones" and what precedes it: the continuation is the last 3 tokens
    body = {"model": "m", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}  # exactly lm-eval's loglikelihood payload (batched token ids)
    out = client.post("/v1/completions", json=body).json()
    [(total, greedy)] = lm_eval.LocalCompletionsAPI.parse_logprobs(out, [ids], [ctxlen])
    assert total == pytest.approx(sum(float(logp[j - 1, ids[j]]) for j in range(ctxlen, len(ids))), abs=1e-4)
    assert greedy == all(int(logp[j - 1].argmax()) == ids[j] for j in range(ctxlen, len(ids)))


def test_plain_completion_text_prompts_and_stop(client) -> None:
    body = {"prompt": ["The thyroid gland makes", "The heart pumps"], "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1] and r["choices"][0]["logprobs"] is None
    text = r["choices"][0]["text"]
    assert r["usage"]["completion_tokens"] > 0 and r["object"] == "text_completion"
    word = text.split()[2]
    cut = client.post("/v1/completions", json={**body, "prompt": body["prompt"][0], "stop": [" " + word],
                                                "logprobs": 0}).json()["choices"][0]
    assert cut["text"] == text[: text.index(" " + word)] and cut["finish_reason"] == "stop"
    assert "".join(cut["logprobs"]["tokens"]).startswith(cut["text"])


UNIMPLEMENTED = [
    ("/v1/chat/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"presence_penalty": 1}, "presence_penalty"),
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"mirostat": 2}, "mirostat"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"stream": True}, "stream"),
    ("/v1/completions", {"typical_p": 0.5}, "typical_p"),
    ("/v1/embeddings", {"dimensions": 64}, "dimensions"),
    ("/tokenize", {"lowercase": True}, "lowercase"),
]


@pytest.mark.parametrize(("route", "extra", "param"), UNIMPLEMENTED, ids=[p for _, _, p in UNIMPLEMENTED])
def test_a_field_the_server_does_not_implement_is_a_400_naming_it(client, route, extra, param) -> None:
    base = {"/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            "/v1/completions": {"model": "m", "prompt": "hi"}, "/v1/embeddings": {"input": "hi"},
            "/tokenize": {"content": "hi"}}[route]
    r = client.post(route, json={**base, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"


def test_neutral_values_and_null_message_fields_are_accepted(client) -> None:
    messages = [{"role": "user", "content": "hi", "name": None, "tool_calls": None}]
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 2,
                                                  "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
                                                  "user": "u1"})
    assert r.status_code == 200, r.text


def _count(text: str, route: str, status: int) -> int:
    m = re.search(rf'^finemed_requests_total{{route="{re.escape(route)}",status="{status}"}} (\d+)$', text, re.M)
    return int(m.group(1)) if m else 0


def test_metrics_count_requests_and_tokens(client) -> None:
    before = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    r = client.post("/v1/completions", json={"prompt": "The liver", "max_tokens": 3, "temperature": 0}).json()
    client.post("/v1/completions", json={"prompt": "x", "nope": 1})
    after = client.get("/metrics").text
    assert _count(after, "/v1/completions", 200) == _count(before, "/v1/completions", 200) + 1
    assert _count(after, "/v1/completions", 400) == _count(before, "/v1/completions", 400) + 1
    tokens = {k: int(v) for k, v in re.findall(r'^finemed_tokens_total{kind="(\w+)"} (\d+)$', after, re.M)}
    old = {k: int(v) for k, v in re.findall(r'^finemed_tokens_total{kind="(\w+)"} (\d+)$', before, re.M)}
    assert tokens["completion"] - old["completion"] == r["usage"]["completion_tokens"]
    assert re.search(r"^finemed_requests_waiting 0$", after, re.M)
    assert re.search(r"^finemed_requests_in_flight \d+$", after, re.M)


def test_tokenize_round_trips(client, engine) -> None:
    ids = _tokens(client, TEXT)
    assert ids == engine.llama.tokenize(TEXT) and ids[0] == engine.llama.tokenize("<|im_start|>")[0]
    assert client.post("/detokenize", json={"tokens": ids}).json()["content"] == TEXT
    vllm = client.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False}).json()["tokens"]
    assert vllm == ids and client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == TEXT
    pieces = client.post("/tokenize", json={"content": "thyroid", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "thyroid" and [p["id"] for p in pieces] == _tokens(client, "thyroid")
    assert client.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["model_max_length"] == 512


def test_embeddings_are_the_embedders_vectors(client, engine) -> None:
    r = client.post("/v1/embeddings", json={"input": ["thyroid hormone", "cardiac output"]})
    assert r.status_code == 200, r.text
    body = r.json()
    embedder = engine.embedder()
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert vectors.shape == (2, embedder.dimension) == (2, 384) and body["model"] == embedder.name
    np.testing.assert_allclose(vectors, embedder.encode(["thyroid hormone", "cardiac output"]), atol=1e-5)
    packed = client.post("/v1/embeddings", json={"input": "thyroid hormone", "encoding_format": "base64",
                                                 "model": "all-MiniLM-L6-v2"}).json()["data"][0]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(packed), "<f4"), vectors[0].astype(np.float32))
    assert client.post("/v1/embeddings", json={"input": "x", "model": "other"}).status_code == 404
