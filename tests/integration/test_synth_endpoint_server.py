"""synth with its judge on a real OpenAI-compatible server on loopback (llama-cpp-python's, on the embedded
GGUF): the score stage gives records of the same shape as the local path's, in input order, and a rerun from
the response cache sends no request (the server is stopped first, so any request would fail the run)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

from finemed_cli.checkpoints.embedded import embedded_gguf
from finemed_cli.config.endpoint import EndpointConfig
from finemed_cli.config.synth import SynthConfig
from finemed_cli.synth.stages import Models, StageFiles, run_named_stage
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf()), "--port",
                             str(port), "--n_ctx", "4096", "--model_alias", "smol", "--verbose", "False"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    while True:
        try:
            httpx.get(f"{url}/models", timeout=1).raise_for_status()
            break
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"llama_cpp.server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield url, proc
    proc.kill()
    proc.wait()
    log.close()


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def shape(value):
    """Keys and value types, recursively: what a record looks like, not what a model said."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    return type(value).__name__


def run(judge, src, out):
    models = Models()
    try:
        summary = run_named_stage("score", StageFiles(src, out), SynthConfig(judge=judge, retries=2), models,
                                  progress=False)
        return summary, [(c.requests, c.cache.hits) for c in models.clients.values()]
    finally:
        models.close()


def test_score_on_a_loopback_server_matches_the_local_records_and_a_rerun_sends_nothing(server, tmp_path):
    url, proc = server  # 2 questions: on 2 quiet cores a few seconds per path
    src = tmp_path / "q.jsonl"
    src.write_text("".join(line + "\n" for line in (EXAMPLES / "questions.jsonl").read_text().splitlines()[:2]))
    judge = EndpointConfig(url=url, model="smol", concurrency=2, backoff=0.1)
    first, counts = run(judge, src, tmp_path / "served" / "scored.jsonl")
    assert (first.written, first.rejected) == (2, 0) and counts[0][0] >= 3  # GET /models and 2 replies at least
    one = tmp_path / "one.jsonl"  # the local path on one question: its schema-bound decoding is the slow part
    one.write_text(src.read_text().splitlines()[0] + "\n")
    run(None, one, tmp_path / "local" / "scored.jsonl")
    served, (here,) = read(tmp_path / "served" / "scored.jsonl"), read(tmp_path / "local" / "scored.jsonl")
    assert [r["id"] for r in served] == [json.loads(x)["id"] for x in src.open()]
    assert [shape(r) for r in served] == [shape(here)] * 2
    assert {r["judge"]["model"] for r in served} == {"smol"}
    cache = tmp_path / "served" / "endpoint-cache.jsonl"
    assert len(cache.read_text().splitlines()) == 2

    proc.kill()
    proc.wait()
    (tmp_path / "served" / "scored.jsonl").unlink()
    again, counts = run(judge, src, tmp_path / "served" / "scored.jsonl")
    assert again.written == 2 and counts == [(0, 2)]  # no request sent, both replies from the cache
    assert read(tmp_path / "served" / "scored.jsonl") == served


@pytest.mark.slow
def test_synth_run_with_every_role_on_the_server_makes_the_local_stages(server, tmp_path):
    from tests.integration.test_cli import finemed

    url, proc = server
    body = (f"raw: {EXAMPLES / 'raw.jsonl'}\nkeep_case_specific: true\ncommon_max_tokens: 32\n"
            "complex_max_tokens: 48\npair_samples: 2\nlimit: 3\n")
    role = f"{{url: '{url}', model: smol, concurrency: 2}}"
    served = tmp_path / "served.yaml"
    served.write_text(body + f"out_dir: {tmp_path / 'served'}\n"
                      + "".join(f"{r}: {role}\n" for r in ("judge", "reasoner", "reward_model", "base")))
    local = tmp_path / "local.yaml"
    local.write_text(body + f"out_dir: {tmp_path / 'local'}\n")
    finemed("synth", "run", served, "--no-progress")
    finemed("synth", "run", local, "--no-progress")
    stages = [s["stage"] for s in json.loads((tmp_path / "local" / "summary.json").read_text())]
    assert [s["stage"] for s in json.loads((tmp_path / "served" / "summary.json").read_text())] == stages
    for name in ("questions.jsonl", "scored.jsonl", "classified.jsonl"):  # the judge's stages, shape for shape
        assert {json.dumps(shape(r)) for r in read(tmp_path / "served" / name)} == \
            {json.dumps(shape(r)) for r in read(tmp_path / "local" / name)}, name
    outputs = {p.name: p.read_bytes() for p in (tmp_path / "served").glob("*.jsonl") if "cache" not in p.name}
    proc.kill()
    proc.wait()
    for name in outputs:
        (tmp_path / "served" / name).unlink()
    finemed("synth", "run", served, "--no-progress")  # every reply from the cache: the server is gone
    assert {n: (tmp_path / "served" / n).read_bytes() for n in outputs} == outputs


@pytest.mark.slow  # a whole synth run through the embedded model first: minutes on 2 cores
def test_synth_run_under_torchrun_writes_the_files_one_process_writes(server, tmp_path):
    """Every stage's output, rejects and common tier from 2 ranks equal one process's byte for byte: the ranks
    send the same requests (answered here from the one-process run's cache, the server stopped), and the
    merge puts each record where one process wrote it."""
    from tests.integration.test_cli import finemed

    url, proc = server
    role = f"{{url: '{url}', model: smol, concurrency: 2}}"
    body = (f"raw: {EXAMPLES / 'raw.jsonl'}\nkeep_case_specific: true\ncommon_max_tokens: 32\n"
            "complex_max_tokens: 48\npair_samples: 2\nlimit: 4\n"
            + "".join(f"{r}: {role}\n" for r in ("judge", "reasoner", "reward_model", "base")))
    for name in ("one", "two"):
        (tmp_path / f"{name}.yaml").write_text(body + f"out_dir: {tmp_path / name}\n")
    finemed("synth", "run", tmp_path / "one.yaml", "--no-progress")
    proc.kill()
    proc.wait()
    (tmp_path / "two").mkdir()
    shutil.copy(tmp_path / "one" / "endpoint-cache.jsonl", tmp_path / "two" / "endpoint-cache.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "finemed_cli", "synth", "run", str(tmp_path / "two.yaml"), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "one").glob("*.jsonl") if "cache" not in p.name)
    assert {"questions.jsonl", "scored.jsonl", "classified.jsonl"} <= set(files)
    merged = {n: (tmp_path / "two" / n).read_bytes() for n in files}
    assert merged == {n: (tmp_path / "one" / n).read_bytes() for n in files}
    counts = [{k: v for k, v in s.items() if k not in ("seconds", "items_per_s")}
              for s in json.loads((tmp_path / "one" / "summary.json").read_text())]
    assert [{k: v for k, v in s.items() if k not in ("seconds", "items_per_s")}
            for s in json.loads((tmp_path / "two" / "summary.json").read_text())] == counts
    assert sorted(p.name for p in (tmp_path / "two" / "questions.jsonl.parts").iterdir())[:2] == \
        ["rank-0-of-2.jsonl", "rank-1-of-2.jsonl"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # a rerun: every part done, merged again
    assert done.returncode == 0, done.stderr[-3000:]
    assert {n: (tmp_path / "two" / n).read_bytes() for n in files} == merged
