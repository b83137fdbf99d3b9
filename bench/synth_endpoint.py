"""`synth score` with its judge on an OpenAI-compatible server: records/s at 1, 4 and 8 records in flight, and
the ratio to one at a time.

    python bench/synth_endpoint.py                      # llama-cpp-python's server on loopback, embedded SmolLM2
    python bench/synth_endpoint.py -n 40 --url http://gpu:8000/v1 --served-model Qwen/Qwen2.5-7B-Instruct

Without --url the bench starts `python -m llama_cpp.server` on the GGUF (--model, default the embedded one).
That server decodes one request at a time (a lock around its model), so concurrency there only overlaps the
HTTP and JSON work with decoding: expect a ratio near 1. A batching server (vLLM, SGLang, llama-server
--parallel N) decodes the requests in flight together, which is what `concurrency:` is for. Each arm writes
to its own folder, so no reply comes from another arm's cache; arms run interleaved over --rounds, so the drift
of a shared machine hits all of them, and the load average is recorded with the row. Appends to bench/results/synth_endpoint.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]


def start_server(gguf: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                             "--n_ctx", "4096", "--n_threads", str(threads), "--model_alias", "bench",
                             "--verbose", "False"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(1500):
        if proc.poll() is not None:
            raise SystemExit(f"llama_cpp.server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"llama_cpp.server did not answer in 5 minutes:\n{log.read_text()}")


def arm(url: str, model: str, concurrency: int, src: Path, out: Path) -> tuple[float, int, int]:
    """(seconds, records written, requests sent) of one score stage at `concurrency`."""
    from finemed_cli.config.endpoint import EndpointConfig
    from finemed_cli.config.synth import SynthConfig
    from finemed_cli.synth.stages import Models, StageFiles, run_named_stage

    judge = EndpointConfig(url=url, model=model, concurrency=concurrency)
    models = Models()
    try:
        t0 = time.perf_counter()
        summary = run_named_stage("score", StageFiles(src, out / "scored.jsonl"), SynthConfig(judge=judge), models,
                                  progress=False)
        seconds = time.perf_counter() - t0
        return seconds, summary.written + summary.rejected, sum(c.requests for c in models.clients.values())
    finally:
        models.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=12, help="questions scored per arm (from examples/questions.jsonl)")
    p.add_argument("--model", type=Path, default=None, help="GGUF for the loopback server [embedded]")
    p.add_argument("--url", default=None, help="an OpenAI-compatible base URL instead of a loopback server")
    p.add_argument("--served-model", default="bench", help="the model name at --url")
    p.add_argument("--threads", type=int, default=2, help="the loopback server's threads")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--rounds", type=int, default=2, help="each arm this many times, interleaved")
    args = p.parse_args()
    from finemed_cli.checkpoints.embedded import embedded_gguf

    gguf = args.model or embedded_gguf()
    lines = (REPO / "examples" / "questions.jsonl").read_text().splitlines()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        src = tmp / "q.jsonl"
        src.write_text("".join(json.dumps(json.loads(lines[i % len(lines)]) | {"id": f"q{i}"}) + "\n"
                               for i in range(args.n)))
        proc, url = (None, args.url) if args.url else start_server(gguf, args.threads, tmp / "server.log")
        try:
            warm = tmp / "warm.jsonl"
            warm.write_text(lines[0] + "\n")
            arm(url, args.served_model, 1, warm, tmp / "warm")  # the server's first request is slower
            levels = [int(c) for c in args.concurrency.split(",")]
            runs = {c: (0.0, 0, 0) for c in levels}
            for r in range(args.rounds):  # arms interleaved, the order rotated: drift of a shared machine hits all
                for c in levels[r % len(levels):] + levels[:r % len(levels)]:
                    got = arm(url, args.served_model, c, src, tmp / f"c{c}-{r}")
                    runs[c] = tuple(a + b for a, b in zip(runs[c], got, strict=True))
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    base = runs[min(runs)][1] / runs[min(runs)][0]
    rows = []
    for c, (seconds, records, requests) in runs.items():
        rate = records / seconds
        print(f"concurrency {c}: {records} records in {seconds:.1f} s, {rate:.3f} records/s, "
              f"x{rate / base:.2f} vs concurrency {min(runs)} ({requests} requests)")
        rows.append([args.url or "llama_cpp.server (loopback)", args.served_model if args.url else gguf.name,
                     args.threads if not args.url else "", c, args.rounds, records, requests, round(seconds, 2),
                     round(rate, 4), round(rate / base, 3), round(os.getloadavg()[0], 1)])
    append_results("synth_endpoint", ["server", "model", "server_threads", "concurrency", "rounds", "records",
                                      "requests", "seconds", "records_per_s", "ratio_to_concurrency_1",
                                      "load_average_after"], rows)


if __name__ == "__main__":
    main()
