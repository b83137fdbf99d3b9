"""Seconds per question of finemed's LoRA TTT against the reference procedure (`--ttt-mode paper`), and the
extra peak memory of TTT over plain answering, on the same model, questions and neighbours, in one run.

    python bench/ttt.py                                  # embedded model, examples/, 4 questions
    python bench/ttt.py --questions ../shared/data/medqa_dev.jsonl \
        --corpus ../shared/data/reasoning_huatuogpt_o1_demo.jsonl -n 5

Each variant runs in its own process (peak RSS is per process): plain answering (no TTT), LoRA TTT at its
defaults, the paper procedure at its defaults (padded to 6144 tokens) and unpadded (--ttt-pad-to 0).
One warm-up question per process is not counted. Prints a table with the ratios and appends the rows to
bench/results/ttt.csv with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "no-ttt": {"mode": "off"},
    "lora": {"mode": "lora"},
    "paper": {"mode": "paper"},
    "paper-pad0": {"mode": "paper", "pad_to": 0},
}


def worker(args: argparse.Namespace) -> None:
    import torch

    from finemed_cli.checkpoints.loading import load_model
    from finemed_cli.config.answer import TTTConfig
    from finemed_cli.data.records import load_questions
    from finemed_cli.generate.hf import TransformersGenerator
    from finemed_cli.modeling.prompts import question_messages
    from finemed_cli.retrieval.embed import load_embedder
    from finemed_cli.retrieval.index import CorpusIndex
    from finemed_cli.ttt.update import ttt_session

    torch.manual_seed(0)
    questions = load_questions(args.questions)[: args.n + 1]
    index = CorpusIndex(args.index)
    neighbours = index.search(load_embedder(index.embedder).encode([q.question for q in questions]), args.k)
    loaded = load_model(args.model)
    generator = TransformersGenerator(loaded.model, loaded.tokenizer)
    config = TTTConfig(**VARIANTS[args.worker], k=args.k)
    rows = []
    for i, (q, nb) in enumerate(zip(questions, neighbours, strict=True)):
        start = time.perf_counter()
        with ttt_session(loaded.model, loaded.tokenizer, [n.record for n in nb], config) as ttt:
            gen = generator.generate(question_messages(q), max_new_tokens=args.max_new_tokens)
        total = time.perf_counter() - start
        if i > 0:  # the first question warms up kernels and allocators
            rows.append({"ttt_s": ttt.seconds, "total_s": total, "gen_s": gen.seconds, "tokens": ttt.tokens,
                         "loss_before": ttt.loss_before, "loss_after": ttt.loss_after,
                         "neighbours": [n.record.id for n in nb]})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "peak_mb": peak_mb}))


def run_variant(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--questions", str(args.questions), "--index",
           str(args.index), "-n", str(args.n), "-k", str(args.k), "--max-new-tokens", str(args.max_new_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=Path, default=REPO / "examples" / "questions.jsonl")
    ap.add_argument("--corpus", type=Path, default=REPO / "examples" / "corpus.jsonl")
    ap.add_argument("--index", type=Path, default=None, help="prebuilt index (default: built from --corpus)")
    ap.add_argument("--model", default=None)
    ap.add_argument("-n", type=int, default=4, help="questions timed per variant (after one warm-up)")
    ap.add_argument("-k", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    from finemed_cli.retrieval.embed import load_embedder
    from finemed_cli.retrieval.index import build_index

    if args.index is None:
        args.index = Path(tempfile.mkdtemp(prefix="finemed-bench-")) / "corpus.index"
        build_index(args.corpus, args.index, load_embedder(None))
    results = {}
    for name in args.variants.split(","):
        print(f"running {name} …", file=sys.stderr, flush=True)
        results[name] = run_variant(name, args)

    def mean(name: str, key: str) -> float:
        rows = results[name]["rows"]
        return sum(r[key] for r in rows) / len(rows)

    base_peak = results["no-ttt"]["peak_mb"] if "no-ttt" in results else None
    print(f"\n{'variant':<12} {'TTT s/q':>9} {'total s/q':>10} {'tokens':>7} {'loss before→after':>20} "
          f"{'peak MB':>9} {'extra peak':>10}")
    summary = {}
    for name, res in results.items():
        ttt, total = mean(name, "ttt_s"), mean(name, "total_s")
        toks = mean(name, "tokens")
        rows = res["rows"]
        losses = "-" if rows[0]["loss_before"] is None else \
            f"{mean(name, 'loss_before'):.3f}→{mean(name, 'loss_after'):.3f}"
        extra = (res["peak_mb"] - base_peak) / base_peak if base_peak else float("nan")
        summary[name] = {"ttt_s": ttt, "total_s": total, "peak_mb": res["peak_mb"], "extra_peak": extra}
        print(f"{name:<12} {ttt:>9.2f} {total:>10.2f} {toks:>7.0f} {losses:>20} {res['peak_mb']:>9.0f} "
              f"{extra:>+10.1%}")
    if "lora" in summary:
        for base in ("paper", "paper-pad0"):
            if base in summary:
                r = summary[base]["ttt_s"] / summary["lora"]["ttt_s"]
                print(f"LoRA TTT is {r:.1f}x faster per question than {base} "
                      f"({summary[base]['ttt_s']:.2f} s vs {summary['lora']['ttt_s']:.2f} s)")
    append_results("ttt", ["model", "questions", "n", "k", "variant", "ttt_s_per_q", "total_s_per_q", "peak_mb",
                           "extra_peak_vs_no_ttt"],
                   [[args.model or "SmolLM2-135M-Instruct (embedded)", args.questions.name, args.n, args.k, name,
                     f"{s['ttt_s']:.3f}", f"{s['total_s']:.3f}", f"{s['peak_mb']:.0f}", f"{s['extra_peak']:.4f}"]
                    for name, s in summary.items()])


if __name__ == "__main__":
    main()
