"""The two speed targets of `finemed eval`, each beside its baseline:

1. Scoring existing answer files: 1,000 answers in each of two variants, through the real CLI (process
   start, statistics with 10,000 bootstrap resamples, report.json/.md and the plots), against the target
   of 5 s.
2. loglik mode on the embedded model, questions per second on the same questions, three ways:
   `finemed` (what `finemed eval --mode loglik` runs without TTT: 8 questions packed per forward, each
   prompt with its options as a tree, the shared system-prompt start run once), `one-at-a-time` (the same
   tree pass for a single question, no shared prefix), and the baseline, each option scored by its own
   full forward of prompt + option (what lm-eval-harness does); target 5 questions/s on 2 cores.

    python bench/eval.py                 # MedQA dev from ../shared/data when present, else examples/
    python bench/eval.py -n 80 --questions ../shared/data/medqa_dev.jsonl,../shared/data/medmcqa_dev.jsonl

Appends bench/results/eval.csv with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "medqa_dev.jsonl"


def bench_scoring(n: int) -> float:
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name, p in (("ttt", 0.45), ("no-ttt", 0.40)):
            path = Path(tmp) / f"{name}.answers.jsonl"
            with path.open("w") as f:
                for i in range(n):
                    gold = rng.choice("ABCD")
                    pred = gold if rng.random() < p else rng.choice([*"ABCD", None])
                    f.write(json.dumps({"id": f"medqa-{i}", "response": "The answer is (X).", "prediction": pred,
                                        "answer": gold, "correct": pred == gold}) + "\n")
            files.append(path)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "finemed_cli", "eval", *map(str, files), "-o", str(Path(tmp) / "r")],
                       check=True, capture_output=True)
        return time.perf_counter() - t0


def bench_loglik(questions: Path, n: int, dtype: str) -> tuple[dict[str, float], int, float]:
    """Questions/s per arm, the number of questions timed and their mean prompt length in tokens."""
    import torch

    from finemed_cli.checkpoints.loading import load_model
    from finemed_cli.eval.benchmarks import load_benchmark
    from finemed_cli.eval.loglik import option_logliks_batch, shared_prefix
    from finemed_cli.modeling.prompts import prompt_ids, question_messages, render_chat
    from finemed_cli.pipeline.eval_runs import LOGLIK_BATCH

    qs = [it.question for it in load_benchmark(questions) if it.question.options][: n + LOGLIK_BATCH]
    warm, timed = qs[:LOGLIK_BATCH], qs[LOGLIK_BATCH:]
    if not timed:
        raise SystemExit(f"{questions}: needs more than {LOGLIK_BATCH} questions with options (8 warm up)")
    loaded = load_model(None, device="cpu", dtype=dtype)
    model, tok = loaded.model, loaded.tokenizer
    tokens = sum(len(prompt_ids(tok, question_messages(q))) for q in timed) / len(timed)
    prefix = shared_prefix(model, tok)
    rates = {}
    option_logliks_batch(model, tok, warm, prefix)  # warm-up (allocations of the largest shapes)
    t0 = time.perf_counter()
    for i in range(0, len(timed), LOGLIK_BATCH):
        option_logliks_batch(model, tok, timed[i : i + LOGLIK_BATCH], prefix)
    rates["finemed"] = len(timed) / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    for q in timed:
        option_logliks_batch(model, tok, [q])
    rates["one-at-a-time"] = len(timed) / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    with torch.no_grad():
        for q in timed:  # baseline: each option as its own full forward of prompt + option
            text = render_chat(tok, question_messages(q), add_generation_prompt=True)
            for option in q.options.values():
                ids = tok(text + option.strip(), add_special_tokens=False)["input_ids"]
                model(input_ids=torch.tensor([ids])).logits.float().log_softmax(-1)
    rates["per-option"] = len(timed) / (time.perf_counter() - t0)
    return rates, len(timed), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default=str(SHARED if SHARED.is_file() else REPO / "examples" / "questions.jsonl"),
                    help="benchmark files (comma-separated) for the loglik timing")
    ap.add_argument("-n", type=int, default=80, help="questions timed in loglik mode (after 8 warm-up ones)")
    ap.add_argument("--answers", type=int, default=1000, help="answers per variant for the scoring benchmark")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="model weight dtypes timed in loglik mode")
    ap.add_argument("--skip-scoring", action="store_true")
    args = ap.parse_args()

    rows = []
    if not args.skip_scoring:
        scoring = bench_scoring(args.answers)
        print(f"scoring {args.answers} answers x 2 variants through the CLI: {scoring:.2f} s (target < 5 s)")
        rows.append(["score_answers_cli", 2 * args.answers, round(scoring, 3), "s", 5.0, round(5.0 / scoring, 2)])
    for path in map(Path, args.questions.split(",")):
        for dtype in args.dtypes.split(","):
            rates, n, tokens = bench_loglik(path, args.n, dtype)
            base = rates["per-option"]
            print(f"loglik, {dtype} weights, {n} questions of {path.name} ({tokens:.0f} prompt tokens on average):")
            for arm, qps in rates.items():
                print(f"  {arm:<14} {qps:6.2f} q/s  {qps / base:5.2f}x per-option"
                      + ("  (target >= 5 q/s)" if arm == "finemed" else ""))
            for arm in ("finemed", "one-at-a-time"):
                rows.append([f"loglik_{dtype}_{arm}_{path.stem}", n, round(rates[arm], 3), "q/s", round(base, 3),
                             round(rates[arm] / base, 2)])
    append_results("eval", ["benchmark", "n", "value", "unit", "baseline", "ratio"], rows)


if __name__ == "__main__":
    main()
