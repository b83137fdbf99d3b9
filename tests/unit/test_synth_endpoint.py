"""synth on an OpenAI-compatible server, against a fake one on a thread (http.server): retries on 429 and 503
with Retry-After, the timeout, one-line errors (401, no server, a model it does not list, no JSON-schema
support), the response cache, the json_object fallback, the config shape, and records kept in input order
when several are in flight."""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from finemed_cli.config.endpoint import EndpointConfig
from finemed_cli.config.synth import load_synth_config
from finemed_cli.errors import ConfigError, ModelError
from finemed_cli.synth.endpoint import EndpointClient, EndpointModel, ResponseCache
from finemed_cli.synth.llm import ContextOverflow, ask_json
from finemed_cli.synth.stage import Reject, outcomes

SCHEMA = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}


class Fake:
    """A scripted server: `script` is a list of (status, headers, body, delay) answers to chat requests, the
    last one repeated (or `answer(body)` gives each); /v1/models lists `models`."""

    def __init__(self, script, models=("m",), models_status=200, answer=None):
        self.script, self.models, self.models_status, self.bodies, self.times = list(script), models, models_status, [], []
        self.answer = answer
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, headers, body, delay=0.0):
                time.sleep(delay)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                self._reply(fake.models_status, {}, {"data": [{"id": m} for m in fake.models]})

            def do_POST(self):
                fake.bodies.append(body := json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                fake.times.append(time.monotonic())
                if fake.answer:
                    self._reply(*fake.answer(body))
                else:
                    self._reply(*(fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads, self.server.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def ok(content):
    return 200, {}, {"choices": [{"message": {"role": "assistant", "content": content}}]}


@pytest.fixture
def client_for(tmp_path):
    made = []

    def make(fake, **settings):
        cfg = EndpointConfig(url=fake.url, model="m", **({"backoff": 0.0} | settings))
        made.append((EndpointClient(cfg, ResponseCache(tmp_path / "cache.jsonl")), fake))
        return made[-1][0]

    yield make
    for client, fake in made:
        client.close()
        fake.close()


def test_429_and_503_are_retried_after_the_servers_retry_after(client_for) -> None:
    fake = Fake([(429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}),
                 (503, {"Retry-After": "0"}, {"error": "busy"}), ok('{"score": 7}')])
    model = EndpointModel(client_for(fake), 4096)
    assert ask_json(model, [{"role": "user", "content": "rate"}], SCHEMA) == ({"score": 7}, 1)
    assert len(fake.bodies) == 3 and fake.times[1] - fake.times[0] >= 0.95  # Retry-After: 1 honoured
    assert fake.bodies[0]["response_format"]["json_schema"]["schema"] == SCHEMA
    assert fake.bodies[0]["temperature"] == 0.0 and fake.bodies[0]["model"] == "m"


def test_retries_are_bounded_and_end_in_one_line(client_for) -> None:
    fake = Fake([(500, {}, {"error": {"message": "boom"}})])
    with pytest.raises(ModelError) as e:
        EndpointModel(client_for(fake, max_retries=2), 4096).generate([{"role": "user", "content": "hi"}], seed=0,
                                                                      max_tokens=8)
    assert len(fake.bodies) == 3 and "HTTP 500 boom (3 tries)" in str(e.value) and "\n" not in str(e.value)


def test_a_reply_slower_than_the_timeout_is_retried_then_reported(client_for) -> None:
    fake = Fake([(*ok("late")[:2], ok("late")[2], 1.5)])
    with pytest.raises(ModelError, match=r"no reply within 0.3 s \(timeout: in the config\) \(2 tries\)"):
        EndpointModel(client_for(fake, timeout=0.3, max_retries=1), 4096).generate(
            [{"role": "user", "content": "hi"}], seed=0, max_tokens=8)


def test_one_line_errors_401_no_server_unknown_model(client_for, monkeypatch) -> None:
    monkeypatch.setenv("FINEMED_TEST_KEY", "wrong")
    fake = Fake([ok("x")], models_status=401)
    with pytest.raises(ModelError, match=r"HTTP 401 .*the key in \$FINEMED_TEST_KEY is refused"):
        client_for(fake, api_key_env="FINEMED_TEST_KEY").chat({"messages": []})
    fake = Fake([ok("x")], models=("qwen", "llama"))
    with pytest.raises(ModelError, match=r"does not serve model 'm'; it lists qwen, llama"):
        client_for(fake).chat({"messages": []})
    fake.close()
    with pytest.raises(ModelError, match="cannot reach the server") as e:
        client_for(fake).chat({"messages": []})  # closed: nothing listens at its port
    assert "\n" not in str(e.value) and len(fake.bodies) == 0


def test_a_server_without_json_schema_support_is_one_line(client_for) -> None:
    fake = Fake([(400, {}, {"error": {"message": "only response_format {\"type\": \"text\"} is supported"}})])
    with pytest.raises(ModelError, match="does not accept a JSON schema for replies") as e:
        EndpointModel(client_for(fake), 4096).complete([{"role": "user", "content": "x"}], SCHEMA, seed=0,
                                                       max_tokens=8)
    assert "\n" not in str(e.value) and [b["response_format"]["type"] for b in fake.bodies] == ["json_schema",
                                                                                                  "json_object"]


def test_json_object_with_a_schema_when_json_schema_is_refused(client_for) -> None:
    # llama-cpp-python's server: "response_format.type: Input should be 'text' or 'json_object'", as a 500
    fake = Fake([(500, {}, {"error": {"message": "('body', 'response_format', 'type') literal_error"}}),
                 ok('{"score": 3}')])
    model = EndpointModel(client_for(fake), 4096)
    assert model.complete([{"role": "user", "content": "x"}], SCHEMA, seed=0, max_tokens=8) == '{"score": 3}'
    assert model.complete([{"role": "user", "content": "y"}], SCHEMA, seed=0, max_tokens=8) == '{"score": 3}'
    assert [b["response_format"]["type"] for b in fake.bodies] == ["json_schema", "json_object", "json_object"]
    assert fake.bodies[1]["response_format"]["schema"] == SCHEMA


def test_a_prompt_the_server_finds_too_long_rejects_the_record(client_for) -> None:
    fake = Fake([(400, {}, {"error": {"message": "This model's maximum context length is 4096 tokens"}})])
    with pytest.raises(ContextOverflow):
        EndpointModel(client_for(fake), 4096).generate([{"role": "user", "content": "x"}], seed=0, max_tokens=8)


def test_the_cache_answers_a_repeated_request_even_in_a_new_run(client_for, tmp_path) -> None:
    fake = Fake([ok("first"), ok("second")])
    client = client_for(fake)
    ask = {"messages": [{"role": "user", "content": "q"}], "max_tokens": 8}
    assert client.chat(ask) == client.chat(ask) == "first" and client.requests == 2  # GET /models, one POST
    assert client.chat(ask | {"max_tokens": 9}) == "second"  # any field of the request is part of the key
    client.close()
    again = EndpointClient(client.cfg, ResponseCache(tmp_path / "cache.jsonl"))
    assert again.chat(ask) == "first" and again.requests == 0 and again.cache.hits == 1
    assert len(fake.bodies) == 2


def test_the_prefix_is_sent_as_the_assistants_reply_to_continue(client_for) -> None:
    fake = Fake([ok("more")])
    model = EndpointModel(client_for(fake), 4096)
    assert model.generate([{"role": "user", "content": "q"}], seed=1, max_tokens=8, prefix="## Thought\n",
                          stop=["## Summarization"]) == "more"
    body = fake.bodies[0]
    assert body["messages"][-1] == {"role": "assistant", "content": "## Thought\n"}
    assert body["continue_final_message"] and body["stop"] == ["## Summarization"] and "response_format" not in body


def test_records_in_flight_come_back_in_input_order() -> None:
    def fn(rec):
        time.sleep(random.Random(rec["id"]).random() / 50)
        if rec["n"] % 5 == 0:
            raise Reject("fifth")
        return {"id": rec["id"]}

    todo = [{"id": f"r{i}", "n": i} for i in range(40)]
    got = list(outcomes(fn, todo, workers=8))
    assert [r["id"] for r, _ in got] == [r["id"] for r in todo]
    assert [isinstance(out, Reject) for _, out in got] == [i % 5 == 0 for i in range(40)]


def test_a_role_on_a_server_in_a_config(tmp_path, monkeypatch) -> None:
    path = tmp_path / "synth.yaml"
    path.write_text("raw: raw.jsonl\njudge: {url: 'http://gpu:8000/v1', model: qwen, api_key_env: FM_KEY,"
                    " concurrency: 8}\nreasoner: qwq.gguf\n")
    monkeypatch.setenv("FM_KEY", "secret")
    cfg = load_synth_config(path)
    assert cfg.judge == EndpointConfig(url="http://gpu:8000/v1", model="qwen", api_key_env="FM_KEY", concurrency=8)
    assert cfg.reasoner == str(tmp_path / "qwq.gguf")
    monkeypatch.delenv("FM_KEY")
    path.write_text("raw: raw.jsonl\njudge: {url: 'http://gpu:8000/v1', model: qwen, api_key_env: FM_KEY}\n"
                    "reasoner: http://gpu:8001/v1\nbase: {url: gpu, api_key: sk-1}\n")
    with pytest.raises(ConfigError) as e:
        load_synth_config(path)
    text = str(e.value)
    assert "judge.api_key_env: the environment variable FM_KEY is not set" in text
    assert "reasoner: a server is given as a mapping" in text and "base.url: an http://" in text
    assert "base.api_key: unknown key; did you mean 'api_key_env'?" in text and "sk-1" not in text


def test_the_cache_skips_a_torn_last_line_and_keeps_the_rest(tmp_path) -> None:
    cache = ResponseCache(tmp_path / "c.jsonl")
    cache.put("a" * 64, "first\nreply")
    cache.close()
    with (tmp_path / "c.jsonl").open("ab") as f:
        f.write(b'{"id":"' + b"b" * 64 + b'","rep')  # a killed writer
    again = ResponseCache(tmp_path / "c.jsonl")
    assert again.get("a" * 64) == "first\nreply" and again.get("b" * 64) is None
    again.put("c" * 64, "third")
    assert again.get("c" * 64) == "third" and again.get("b" * 64) is None and again.hits == 2


def test_respond_with_every_role_on_a_server_writes_both_tiers_in_order_and_reruns_from_the_cache(tmp_path) -> None:
    from finemed_cli.config.synth import SynthConfig
    from finemed_cli.synth.stages import Models, StageFiles, run_named_stage

    fake = Fake([], answer=lambda body: ok('{"score": 6}' if "response_format" in body else "A reply."))
    src = tmp_path / "classified.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "question": f"Question {i}?", "text": "A source text.",
                                       "tier": "complex" if i % 2 else "common"}) + "\n" for i in range(8)))
    role = EndpointConfig(url=fake.url, model="m", concurrency=4, backoff=0.0)
    cfg = SynthConfig(judge=role, common_max_tokens=16, complex_max_tokens=32)
    out = tmp_path / "out" / "corpus.jsonl"
    try:
        for attempt in range(2):
            models = Models()
            summary = run_named_stage("respond", StageFiles(src, out), cfg, models, progress=False)
            sent = models.clients[role].requests
            models.close()
            assert (summary.written, summary.rejected) == (8, 0)
            if attempt == 0:
                first = (out.read_text(), (tmp_path / "out" / "corpus.common.jsonl").read_text(), len(fake.bodies))
                for p in out.parent.glob("corpus*.jsonl"):
                    p.unlink()
        assert sent == 0 and len(fake.bodies) == first[2]  # the rerun sent nothing
        assert (out.read_text(), (tmp_path / "out" / "corpus.common.jsonl").read_text()) == first[:2]
        assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["r1", "r3", "r5", "r7"]
        common = [json.loads(x) for x in (tmp_path / "out" / "corpus.common.jsonl").read_text().splitlines()]
        assert [r["id"] for r in common] == ["r0", "r2", "r4", "r6"] and common[0]["reward"]["scores"] == [6, 6]
    finally:
        fake.close()


def test_a_url_that_is_no_openai_server_and_a_retry_after_date_are_handled(client_for) -> None:
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    fake = Fake([ok("x")])
    fake.server.RequestHandlerClass.do_GET = lambda self: self._reply(200, {}, ["<html>"])
    with pytest.raises(ModelError, match="not an OpenAI-compatible model list.*ends in /v1"):
        client_for(fake).chat({"messages": []})
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=1), usegmt=True)
    fake = Fake([(503, {"Retry-After": soon}, {}), (503, {"Retry-After": "not a date"}, {}), ok("done")])
    assert client_for(fake).chat({"messages": []}) == "done" and len(fake.bodies) == 3
