"""The two speed targets of `finemed eval`, each beside its baseline:

1. Scoring existing answer files: 1,000 answers in each of two variants, through the real CLI (process
   start, statistics with 10,000 bootstrap resamples, report.json/.md and the plots), against the target
   of 5 s.
2. loglik mode on the embedded model: questions per second of `option_logliks` (the prompt once, options
   from its repeated KV cache) against scoring each option by its own full forward (what lm-eval-harness
   does), on the same questions; target 5 questions/s on 2 cores.

    python bench/eval.py                 # MedQA dev from ../shared/data when present, else examples/
    python bench/eval.py -n 50

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


def bench_loglik(questions: Path, n: int, dtype: str) -> tuple[float, float, int]:
    import torch

    from finemed_cli.data.records import load_questions
    from finemed_cli.eval.loglik import option_logliks
    from finemed_cli.generate.prompts import question_messages, render_chat
    from finemed_cli.models.loading import load_model

    qs = [q for q in load_questions(questions) if q.options][: n + 1]
    loaded = load_model(None, device="cpu", dtype=dtype)
    model, tok = loaded.model, loaded.tokenizer
    option_logliks(model, tok, qs[0])  # warm-up
    t0 = time.perf_counter()
    for q in qs[1:]:
        option_logliks(model, tok, q)
    ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.no_grad():
        for q in qs[1:]:  # baseline: each option as its own full forward of prompt + option
            text = render_chat(tok, question_messages(q), add_generation_prompt=True)
            for option in q.options.values():
                ids = tok(text + option.strip(), add_special_tokens=False)["input_ids"]
                model(input_ids=torch.tensor([ids])).logits.float().log_softmax(-1)
    base = time.perf_counter() - t0
    return (len(qs) - 1) / ours, (len(qs) - 1) / base, len(qs) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=Path, default=SHARED if SHARED.is_file() else REPO / "examples" / "questions.jsonl")
    ap.add_argument("-n", type=int, default=40, help="questions timed in loglik mode (after one warm-up)")
    ap.add_argument("--answers", type=int, default=1000, help="answers per variant for the scoring benchmark")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="model weight dtypes timed in loglik mode")
    args = ap.parse_args()

    scoring = bench_scoring(args.answers)
    print(f"scoring {args.answers} answers x 2 variants through the CLI: {scoring:.2f} s (target < 5 s)")
    rows = [["score_answers_cli", 2 * args.answers, round(scoring, 3), "s", 5.0, round(5.0 / scoring, 2)]]
    for dtype in args.dtypes.split(","):
        ours, base, n = bench_loglik(args.questions, args.n, dtype)
        print(f"loglik ({dtype} weights) on {n} questions of {args.questions.name}: {ours:.2f} q/s (KV-shared "
              f"options) vs {base:.2f} q/s (one forward per option) = {ours / base:.2f}x (target >= 5 q/s)")
        rows.append([f"loglik_{dtype}", n, round(ours, 3), "q/s", round(base, 3), round(ours / base, 2)])
    append_results("eval", ["benchmark", "n", "value", "unit", "baseline", "ratio"], rows)


if __name__ == "__main__":
    main()
