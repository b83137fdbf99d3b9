"""What the 4-bit base costs in answers: `finemed eval --mode loglik` of the full-precision model and of its NF4
base on the same items, paired (agreement of the predictions, accuracy of each, exact McNemar), per model.

    python bench/quant_quality.py                       # the shared MedQA dev file, both embedded models
    python bench/quant_quality.py --items FILE --models embedded:smollm2-135m --limit 50

Both arms run in fp32 on the CPU (`--dtype float32`), so the only difference is the base's 4-bit rounding.
Prints a table and appends it to bench/results/quant_quality.csv; the eval report folders stay under --work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ITEMS = REPO.parent / "shared" / "data" / "medqa_dev.jsonl"


def run_eval(items: Path, model: str, quantize: str, out: Path, limit: int | None) -> dict[str, dict]:
    """Per item id: prediction and correctness of `model` with `--quantize quantize` (no TTT)."""
    cmd = [sys.executable, "-m", "finemed_cli", "eval", str(items), "--mode", "loglik", "--compare", "no-ttt",
           "-o", str(out), "--model", model, "--quantize", quantize, "--dtype", "float32", "--no-progress"]
    if limit:
        cmd += ["--limit", str(limit)]
    subprocess.run(cmd, check=True)
    rows = [json.loads(line) for line in (out / "loglik" / "no-ttt.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in rows if "correct" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=Path, default=DEFAULT_ITEMS)
    parser.add_argument("--models", default="embedded:smollm2-135m,embedded:gemma3-270m")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "quant_quality")
    args = parser.parse_args()
    if not args.items.is_file():
        raise SystemExit(f"{args.items}: no such file (the shared MedQA dev file, or pass --items)")
    from finemed_cli.eval.stats import accuracy_ci, mcnemar_exact

    rows = []
    for model in args.models.split(","):
        tag = model.split(":")[-1].replace("/", "_")
        start = time.perf_counter()
        full = run_eval(args.items, model, "none", args.work / f"{tag}-none", args.limit)
        nf4 = run_eval(args.items, model, "nf4", args.work / f"{tag}-nf4", args.limit)
        ids = sorted(set(full) & set(nf4))
        a = [bool(full[i]["correct"]) for i in ids]
        b = [bool(nf4[i]["correct"]) for i in ids]
        same = sum(full[i]["prediction"] == nf4[i]["prediction"] for i in ids)
        test = mcnemar_exact(b, a)
        acc_a, acc_b = accuracy_ci(a), accuracy_ci(b)
        rows.append([model, len(ids), same / len(ids), acc_a.estimate, acc_b.estimate, test.difference,
                     test.a_only, test.b_only, test.p_value, round(time.perf_counter() - start, 1)])
        print(f"{model}: {len(ids)} items, predictions agree {same}/{len(ids)} ({100 * same / len(ids):.0f}%), "
              f"accuracy full {100 * acc_a.estimate:.1f}% [{100 * acc_a.low:.1f}, {100 * acc_a.high:.1f}] vs nf4 "
              f"{100 * acc_b.estimate:.1f}% [{100 * acc_b.low:.1f}, {100 * acc_b.high:.1f}], nf4 - full "
              f"{100 * test.difference:+.1f} points ({test.a_only} vs {test.b_only} discordant, McNemar p = "
              f"{test.p_value:.3g})", flush=True)
    append_results("quant_quality", ["model", "items", "agreement", "acc_full", "acc_nf4", "nf4_minus_full",
                                     "nf4_only", "full_only", "mcnemar_p", "seconds"],
                   [[r[0], r[1], round(r[2], 4), round(r[3], 4), round(r[4], 4), round(r[5], 4), *r[6:]]
                    for r in rows])


if __name__ == "__main__":
    main()
