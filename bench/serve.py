"""`finemed serve` against llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`) on the same GGUF,
in one run: time to first token and tokens/s, streamed through the `openai` client as a front end would; then
the extra latency per-request TTT adds (`finemed serve --index`, model NAME+ttt against NAME).

    python bench/serve.py                       # embedded SmolLM2, 6 questions, 128 tokens
    python bench/serve.py --model model.gguf -n 10 --max-tokens 256

The servers (llama_cpp.server, finemed serve, finemed serve --prompt-cache) run at once, idle but for the
request in flight: requests alternate between them, one at a time,
so neither competes for the cores and slow drift of the machine hits both alike. Both get the same messages
(finemed's system prompt written out, so they share a long prefix), greedy decoding, no repeat penalty, the
same threads and context; their texts are compared, and tokens are counted by tokenizing the text with the GGUF's vocabulary, the same way for
both. Decode tokens/s = (tokens - 1) / (last token time - first token time); TTFT = first content chunk.
Appends to bench/results/serve.csv.

Then concurrent clients (`--concurrency 1,4,8`): for each server and each level, that many requests sent at once
(different questions, streamed), aggregate tokens/s = all their tokens / the wall time until the last ends, and
each request's end-to-end seconds; finemed serve / llama_cpp.server printed per level. Appends to
bench/results/serve_concurrency.csv. `--only-concurrency` skips the one-at-a-time part.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]
FINEMED = Path(sys.executable).with_name("finemed")


def start(cmd: list[str], ready: re.Pattern[str] | None, log: Path) -> tuple[subprocess.Popen, str | None]:
    """Start a server; with `ready`, wait for the line that gives its URL."""
    f = log.open("w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while ready is not None and time.time() < deadline:
        m = ready.search(log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited:\n{log.read_text()}")
        time.sleep(0.2)
    return proc, None


def wait_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    for _ in range(3000):
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/models", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"server at {url} never answered")


def one(client: Any, model: str, messages: list[dict], max_tokens: int, extra: dict) -> dict[str, Any]:
    """One streamed request: (text, ttft, seconds from first to last token, total seconds)."""
    t0 = time.perf_counter()
    first = last = None
    pieces = []
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0,
                                            stream=True, extra_body=extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            pieces.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    return {"text": "".join(pieces), "ttft": (first or end) - t0, "decode": (last or end) - (first or end),
            "total": end - t0}


def summarise(name: str, runs: list[dict], count: Any) -> dict[str, Any]:
    tokens = [count(r["text"]) for r in runs]
    decode_rate = sum(t - 1 for t in tokens) / sum(r["decode"] for r in runs)
    row = {"server": name, "requests": len(runs), "tokens": sum(tokens),
           "ttft_s": statistics.median(r["ttft"] for r in runs), "decode_tokens_per_s": decode_rate,
           "total_tokens_per_s": sum(tokens) / sum(r["total"] for r in runs),
           "mean_total_s": statistics.mean(r["total"] for r in runs)}
    print(f"{name:>26}: TTFT {row['ttft_s'] * 1000:7.1f} ms (median)  decode {decode_rate:6.1f} tok/s  "
          f"end-to-end {row['total_tokens_per_s']:6.1f} tok/s  ({row['tokens']} tokens, {len(runs)} requests)")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m", help="GGUF (path, hub or embedded:KEY)")
    ap.add_argument("--questions", type=Path, default=REPO / "examples" / "questions.jsonl")
    ap.add_argument("--corpus", type=Path, default=REPO / "examples" / "corpus.jsonl", help="TTT part's index")
    ap.add_argument("-n", type=int, default=6, help="questions (requests per server)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--no-ttt", action="store_true", help="skip the TTT latency part")
    ap.add_argument("--concurrency", default="1,4,8", help="concurrent clients per level ('' skips the part)")
    ap.add_argument("--only-concurrency", action="store_true", help="skip the one-request-at-a-time part")
    args = ap.parse_args()
    if args.only_concurrency:
        args.no_ttt = True

    import llama_cpp
    import openai

    from finemed_cli.checkpoints.loading import resolve_gguf
    from finemed_cli.data.records import load_questions
    from finemed_cli.modeling.prompts import question_messages

    gguf = resolve_gguf(args.model)
    vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    questions = load_questions(args.questions)
    prompts = [question_messages(q) for q in questions[: args.n]]
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    # the questions after the warm-up's: no server starts a level with its prompt cached
    many = [question_messages(questions[(1 + i) % len(questions)]) for i in range(max(levels, default=1))]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    threads, ctx = str(args.threads), str(args.ctx)
    servers: list[subprocess.Popen] = []
    try:
        port = _free_port()
        lc, _ = start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", threads,
                       "--n_threads_batch", threads, "--n_ctx", ctx, "--port", str(port), "--host", "127.0.0.1",
                       # its default lets a new request cut the one streaming (measured: 3 of 4 concurrent
                       # requests came back empty); finemed serve queues them
                       "--interrupt_requests", "False"],
                      None, tmp / "llama_cpp_server.log")
        servers.append(lc)
        index_args: list[str] = []
        if not args.no_ttt:
            subprocess.run([str(FINEMED), "-q", "index", "build", str(args.corpus), "-o", str(tmp / "idx")],
                           check=True)
            index_args = ["--index", str(tmp / "idx")]
        fm, fm_url = start([str(FINEMED), "serve", str(gguf), "--port", "0", "--threads", threads, "--ctx", ctx,
                            "--name", "m", *index_args], re.compile(r"at (http://\S+/v1)"), tmp / "finemed.log")
        servers.append(fm)
        fc, fc_url = start([str(FINEMED), "serve", str(gguf), "--port", "0", "--threads", threads, "--ctx", ctx,
                            "--name", "m", "--prompt-cache"], re.compile(r"at (http://\S+/v1)"),
                           tmp / "finemed-cache.log")
        servers.append(fc)
        lc_url = f"http://127.0.0.1:{port}/v1"
        wait_up(lc_url, lc, tmp / "llama_cpp_server.log")
        wait_up(fm_url, fm, tmp / "finemed.log")
        arms = {"llama_cpp.server": (openai.OpenAI(base_url=lc_url, api_key="-"), str(gguf),
                                     {"repeat_penalty": 1.0}),
                "finemed serve": (openai.OpenAI(base_url=fm_url, api_key="-"), "m", {}),
                "finemed serve --prompt-cache": (openai.OpenAI(base_url=fc_url, api_key="-"), "m", {})}
        if not args.no_ttt:
            arms["finemed serve +ttt"] = (arms["finemed serve"][0], "m+ttt", {})
        runs: dict[str, list[dict]] = {a: [] for a in arms}
        for client, model, extra in arms.values():  # warm-up: threads, caches, the TTT model's first pass
            one(client, model, prompts[0], 8, extra)
        if not args.only_concurrency:
            for p in prompts:
                for name, (client, model, extra) in arms.items():
                    runs[name].append(one(client, model, p, args.max_tokens, extra))
            report(runs, count, args, gguf)
        if levels:
            concurrent({k: arms[k] for k in ("llama_cpp.server", "finemed serve")}, many, levels, count, args, gguf)
    finally:
        for s in servers:
            s.terminate()
            s.wait(timeout=30)


def report(runs: dict[str, list[dict]], count: Any, args: argparse.Namespace, gguf: Path) -> None:
    same = sum(a["text"] == b["text"] for a, b in zip(runs["llama_cpp.server"], runs["finemed serve"], strict=True))
    cached = sum(a["text"] == b["text"] for a, b in zip(runs["finemed serve"], runs["finemed serve --prompt-cache"],
                                                        strict=True))
    print(f"{gguf.name}, {args.threads} threads, {args.max_tokens} max tokens; identical texts: "
          f"{same}/{len(runs['finemed serve'])} (finemed serve vs --prompt-cache: {cached})")
    rows = {name: summarise(name, r, count) for name, r in runs.items()}
    base, ours = rows["llama_cpp.server"], rows["finemed serve"]
    ratios = {}
    for name in ("finemed serve", "finemed serve --prompt-cache"):
        r = rows[name]
        ratios[name] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        print(f"{name} / llama_cpp.server: decode tokens/s x{ratios[name]:.3f} (target >= 0.90), end-to-end "
              f"x{r['total_tokens_per_s'] / base['total_tokens_per_s']:.3f}, TTFT x{r['ttft_s'] / base['ttft_s']:.3f}")
    ttt_extra = None
    if "finemed serve +ttt" in rows:
        ttt_extra = rows["finemed serve +ttt"]["ttft_s"] - ours["ttft_s"]
        print(f"per-request TTT adds {ttt_extra:.2f} s before the first token (median TTFT "
              f"{rows['finemed serve +ttt']['ttft_s']:.2f} s vs {ours['ttft_s']:.2f} s)")
    cols = ["model", "server", "requests", "max_tokens", "tokens", "ttft_s", "decode_tokens_per_s",
            "total_tokens_per_s", "decode_ratio_to_llama_cpp_server", "ttt_extra_ttft_s", "identical_texts"]
    out = [[gguf.name, r["server"], r["requests"], args.max_tokens, r["tokens"], round(r["ttft_s"], 4),
            round(r["decode_tokens_per_s"], 2), round(r["total_tokens_per_s"], 2),
            round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 4),
            "" if ttt_extra is None else round(ttt_extra, 3), same] for r in rows.values()]
    append_results("serve", cols, out)


def concurrent(arms: dict[str, tuple], prompts: list[list[dict]], levels: list[int], count: Any,
               args: argparse.Namespace, gguf: Path) -> None:
    """Each level's requests sent at once to each server in turn: aggregate tokens/s and end-to-end times."""
    from concurrent.futures import ThreadPoolExecutor

    rows, rates = [], {}
    for level in levels:
        for name, (client, model, extra) in arms.items():
            t0 = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                runs = list(pool.map(one, [client] * level, [model] * level, prompts[:level],
                                     [args.max_tokens] * level, [extra] * level))
            wall = time.perf_counter() - t0
            tokens = sum(count(r["text"]) for r in runs)
            rates[(name, level)] = tokens / wall
            totals = sorted(round(r["total"], 2) for r in runs)
            print(f"{level} at once, {name:>17}: {tokens / wall:6.1f} tok/s aggregate ({tokens} tokens in "
                  f"{wall:.1f} s); end-to-end per request {totals} s")
            rows.append([gguf.name, name, level, args.max_tokens, tokens, round(wall, 3), round(tokens / wall, 2),
                         " ".join(map(str, totals))])
        ratio = rates[("finemed serve", level)] / rates[("llama_cpp.server", level)]
        print(f"{level} at once: finemed serve / llama_cpp.server aggregate tokens/s x{ratio:.3f}")
    append_results("serve_concurrency", ["model", "server", "clients", "max_tokens", "tokens", "wall_s",
                                         "tokens_per_s", "end_to_end_s"], rows)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
