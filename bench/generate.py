"""Tokens/s of llama.cpp against transformers generate on the same prompts (part A), and seconds per
question of `finemed answer` with TTT on, with each generator (part B), on the embedded model.

    python bench/generate.py                                   # 5 questions, 256 new tokens, both parts
    python bench/generate.py -n 2 --max-new-tokens 32 --limit 2 --parts A,B

A: one process; the model is loaded once; each generator does a short warm-up generation, then greedy
generation on the first -n questions; tokens/s is total new tokens / total generation seconds, for
llama.cpp on each of --gguf-types (GGUFs exported once into $FINEMED_HOME) and for transformers.
B: the real CLI, `finemed answer --generator G`, once per generator into a fresh output file (no warm-up: as a
user runs it); reads `ttt.seconds` and `generation.seconds` of each answer record and checks that both runs
trained the same (`ttt.loss_before` / `loss_after` per question). Appends to bench/results/generate.csv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]
FINEMED = Path(sys.executable).with_name("finemed")


def part_a(args: argparse.Namespace) -> list[dict]:
    from finemed_cli.checkpoints.loading import load_model
    from finemed_cli.data.records import load_questions
    from finemed_cli.export.gguf import read_config
    from finemed_cli.generate.hf import TransformersGenerator
    from finemed_cli.generate.llamacpp import LlamaCppGenerator
    from finemed_cli.generate.select import model_gguf
    from finemed_cli.modeling.prompts import question_messages

    lm = load_model(None)
    prompts = [question_messages(q) for q in load_questions(args.questions)[: args.n]]

    def rate(g: Any) -> tuple[int, float]:
        g.generate(prompts[0], max_new_tokens=8, temperature=0.0)  # warm-up: threads, caches
        tokens = seconds = 0.0
        for p in prompts:
            r = g.generate(p, max_new_tokens=args.max_new_tokens, temperature=0.0)
            tokens, seconds = tokens + r.tokens, seconds + r.seconds
        return int(tokens), seconds

    rows = []
    tokens, seconds = rate(TransformersGenerator(lm.model, lm.tokenizer))
    hf = {"part": "A", "backend": "transformers", "gguf_type": "", "n": len(prompts), "tokens": tokens,
          "seconds": seconds, "tokens_per_s": tokens / seconds}
    rows.append(hf)
    for t in args.gguf_types.split(","):
        g = LlamaCppGenerator(model_gguf(lm.source, lm.name, t), lm.tokenizer, read_config(Path(lm.source)))
        try:
            tokens, seconds = rate(g)
        finally:
            g.close()
        rows.append({"part": "A", "backend": "llama.cpp", "gguf_type": t, "n": len(prompts), "tokens": tokens,
                     "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "speedup": tokens / seconds / hf["tokens_per_s"]})
    print(f"\nA: greedy generation, {len(prompts)} questions, up to {args.max_new_tokens} new tokens each")
    print(f"{'backend':<18} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'vs transformers':>16}")
    for r in rows:
        name = r["backend"] + (f" {r['gguf_type']}" if r["gguf_type"] else "")
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "(baseline)"
        print(f"{name:<18} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f} {speedup:>16}")
    return rows


def answer_run(gen: str, index: Path, out_dir: Path, args: argparse.Namespace) -> tuple[float, list[dict]]:
    out = out_dir / f"answers-{gen}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [str(FINEMED), "answer", str(args.questions), "--index", str(index), "-o", str(out), "--limit",
           str(args.limit), "--max-new-tokens", str(args.max_new_tokens), "--generator", gen, "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def part_b(args: argparse.Namespace, tmp: Path) -> list[dict]:
    index = args.index
    if index is None:
        index = tmp / "index"
        print("building the index …", file=sys.stderr, flush=True)
        subprocess.run([str(FINEMED), "index", "build", str(args.corpus), "-o", str(index)], check=True,
                       capture_output=True)
    rows, records = [], {}
    for gen in ("llama.cpp", "transformers"):
        print(f"running finemed answer --generator {gen} …", file=sys.stderr, flush=True)
        wall, recs = answer_run(gen, index, tmp, args)
        records[gen] = {r["id"]: r for r in recs}
        n = len(recs)
        ttt = sum(r["ttt"]["seconds"] for r in recs) / n
        gen_s = sum(r["generation"]["seconds"] for r in recs) / n
        tokens = sum(r["generation"]["tokens"] for r in recs) / n
        rows.append({"part": "B", "backend": gen, "gguf_type": "f16" if gen == "llama.cpp" else "", "n": n,
                     "ttt_s": ttt, "gen_s": gen_s, "per_q_s": ttt + gen_s, "wall_s": wall, "tokens": tokens})
    llama, hf = rows
    llama["speedup"] = hf["per_q_s"] / llama["per_q_s"]
    print(f"\nB: finemed answer with LoRA TTT, {llama['n']} questions, "
          f"--max-new-tokens {args.max_new_tokens}")
    print(f"{'generator':<13} {'TTT s/q':>8} {'gen s/q':>8} {'tokens/q':>9} {'s/q':>7} {'wall s':>7}")
    for r in rows:
        print(f"{r['backend']:<13} {r['ttt_s']:>8.2f} {r['gen_s']:>8.2f} {r['tokens']:>9.1f} "
              f"{r['per_q_s']:>7.2f} {r['wall_s']:>7.1f}")
    print(f"transformers/llama.cpp seconds per question: {llama['speedup']:.2f}x")
    diffs = [abs(a["ttt"][k] - records["transformers"][i]["ttt"][k])
             for i, a in records["llama.cpp"].items() if i in records["transformers"]
             for k in ("loss_before", "loss_after") if a["ttt"].get(k) is not None]
    same = set(records["llama.cpp"]) == set(records["transformers"])
    print(f"same TTT in both runs: max |loss difference| {max(diffs, default=float('nan')):.2e} over "
          f"{len(diffs)} losses; same question ids: {same}")
    return rows



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=Path, default=REPO / "examples" / "questions.jsonl")
    ap.add_argument("--corpus", type=Path, default=REPO / "examples" / "corpus.jsonl")
    ap.add_argument("--index", type=Path, default=None,
                    help="prebuilt index for B (default: built from --corpus into a temp dir)")
    ap.add_argument("-n", type=int, default=5, help="questions generated per backend in A")
    ap.add_argument("--limit", type=int, default=5, help="questions answered per generator in B")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--gguf-types", default="f16,q8_0", help="GGUF outtypes llama.cpp runs in A")
    ap.add_argument("--parts", default="A,B", help="A, B or A,B")
    args = ap.parse_args()
    parts = set(args.parts.upper().split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="finemed-bench-generate-") as tmp:
        if "A" in parts:
            rows += part_a(args)
        if "B" in parts:
            rows += part_b(args, Path(tmp))

    keys = ("tokens_per_s", "ttt_s", "gen_s", "per_q_s", "wall_s", "speedup")
    append_results("generate", ["model", "questions", "max_new_tokens", "part", "backend", "gguf_type", "n",
                                "tokens_per_s", "ttt_s_per_q", "gen_s_per_q", "s_per_q", "wall_s",
                                "llama_cpp_speedup"],
                   [["SmolLM2-135M-Instruct (embedded)", args.questions.name, args.max_new_tokens, r["part"],
                     r["backend"], r["gguf_type"], r["n"],
                     *(f"{r[k]:.3f}" if isinstance(r.get(k), float) else "" for k in keys)] for r in rows])


if __name__ == "__main__":
    main()
