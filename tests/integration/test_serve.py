"""`finemed serve` as a user runs it: the real CLI on 127.0.0.1 with per-request TTT, driven by the `openai`
client, streaming and not; TTT requests do not hold plain ones up; a client that goes away frees the server;
Ctrl-C stops it cleanly; a busy port is a one-line error."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")
FINEMED = [sys.executable, "-m", "finemed_cli"]
QUESTION = [{"role": "user", "content": "A 45-year-old woman has weight loss, tremor and a low TSH. What is the "
                                        "most likely diagnosis?"}]


class Server:
    def __init__(self, *args: str, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([*FINEMED, "serve", *args], stdout=subprocess.DEVNULL,
                                     stderr=log.open("w"), text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            m = re.search(r"at (http://[\d.]+:\d+/v1)", log.read_text())
            if m:
                self.url = m.group(1)
                return
            assert self.proc.poll() is None, log.read_text()
            time.sleep(0.2)
        raise AssertionError(f"the server never said where it listens:\n{log.read_text()}")

    def client(self):
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=300)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    subprocess.run([*FINEMED, "index", "build", EXAMPLES / "corpus.jsonl", "-o", tmp / "idx"], check=True,
                   capture_output=True)
    s = Server("embedded:smollm2-135m", "--port", "0", "--name", "smol", "--index", str(tmp / "idx"),
               "--max-tokens", "32", "--ctx", "1024", log=tmp / "serve.log")
    yield s
    assert s.stop() == 0, s.log.read_text()
    assert "Traceback" not in s.log.read_text()


def test_openai_client_whole_and_streamed(server) -> None:
    c = server.client()
    assert [m.id for m in c.models.list()] == ["smol", "smol+ttt"]
    raw = c.chat.completions.with_raw_response.create(model="smol", messages=QUESTION, max_tokens=24)
    assert "not a medical source" in raw.headers["x-finemed-caution"]
    whole = raw.parse()
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 24
    pieces = [ch.choices[0].delta.content or "" for ch in
              c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=24, stream=True)
              if ch.choices]
    assert len(pieces) > 10 and "".join(pieces) == whole.choices[0].message.content


def test_an_answer_does_not_depend_on_the_request_before(server) -> None:
    c = server.client()
    first = c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=32).choices[0].message.content
    other = [{"role": "user", "content": QUESTION[0]["content"].replace("weight loss", "weight gain")}]
    c.chat.completions.create(model="smol", messages=other, max_tokens=8)  # shares a long prefix
    assert c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=32).choices[0].message.content \
        == first


def test_per_request_ttt_streamed_and_not(server) -> None:
    c = server.client()
    r = c.chat.completions.create(model="smol+ttt", messages=QUESTION, max_tokens=8)
    info = r.model_extra["finemed"]
    assert info["ttt"]["mode"] == "lora" and info["ttt"]["loss_after"] < info["ttt"]["loss_before"]
    assert info["neighbours"][0]["id"].startswith("ex-")
    start, stamps = time.monotonic(), []
    for chunk in c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=8, stream=True,
                                           extra_body={"ttt": True}):
        stamps.append((time.monotonic() - start, chunk))
    chunks = [chunk for _, chunk in stamps]
    last = chunks[-1].model_extra["finemed"]
    # the first event (the assistant's role) comes at once, not after the training: a client sees life at once
    (first_at, first), (text_at, _) = stamps[0], stamps[1]
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert first_at < text_at - last["ttt"]["seconds"] / 2, (first_at, text_at, last["ttt"])
    assert last["ttt"]["loss_before"] == info["ttt"]["loss_before"]  # the same neighbour, the same start
    plain = c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=8)
    assert "finemed" not in (plain.model_extra or {})


def test_a_completions_client_that_goes_away_frees_the_server(server) -> None:
    import httpx

    long = {"model": "smol", "prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 900, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after a second and closes the connection
        httpx.post(f"{server.url}/completions", json=long, timeout=1.0)
    start = time.monotonic()
    r = server.client().chat.completions.create(model="smol", messages=QUESTION, max_tokens=4)
    assert r.choices[0].message.content and time.monotonic() - start < 5  # not behind 900 tokens


def test_plain_requests_do_not_wait_behind_ttt(server) -> None:
    c = server.client()
    done: dict[str, float] = {}
    start = time.monotonic()

    def ttt() -> None:
        c.chat.completions.create(model="smol+ttt", messages=QUESTION, max_tokens=200)
        done["ttt"] = time.monotonic() - start

    t = threading.Thread(target=ttt)
    t.start()
    time.sleep(0.5)  # the TTT request is training
    c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=4)
    done["plain"] = time.monotonic() - start
    t.join()
    assert done["plain"] < done["ttt"], done


def test_a_client_that_goes_away_frees_the_server(server) -> None:
    c = server.client()
    stream = c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=900, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    start = time.monotonic()
    r = c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=4)
    assert r.choices[0].message.content and time.monotonic() - start < 5  # not behind 900 tokens


def test_errors_reach_the_openai_client(server) -> None:
    c = server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="last user message"):
        c.chat.completions.create(model="smol+ttt", messages=[{"role": "system", "content": "x"}])


def test_a_busy_port_is_one_clear_line(server, tmp_path) -> None:
    port = server.url.rsplit(":", 1)[1].split("/")[0]
    proc = subprocess.run([*FINEMED, "serve", "embedded:smollm2-135m", "--port", port], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr
