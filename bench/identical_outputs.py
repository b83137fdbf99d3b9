"""Outputs of `answer` and every `eval` mode on the embedded model, reduced to what must not change when the
code is refactored: every record with its timings removed, digested. Record before a refactor, check after.

    python bench/identical_outputs.py record bench/results/identical-outputs.json
    python bench/identical_outputs.py check bench/results/identical-outputs.json

`record` also keeps the records (`.records.json`, to show what changed) and each command's seconds
(`.seconds.json`); `check` prints the time of each command now beside then, with the ratio (run both on an idle
machine: the ratio is the refactor's cost, the item loop being the only code that changed).

The runs are small (a few questions each) and use the shipped examples and, when present, the shared MedQA dev
file; the same machine and library versions give the same bytes (greedy decoding, a fixed seed).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FINEMED = [sys.executable, "-m", "finemed_cli"]
VOLATILE = {"seconds", "elapsed", "created", "date", "time", "wall_seconds", "finished", "started"}


def stripped(value):
    """`value` without timing fields (any key in VOLATILE or ending in `_seconds`), recursively."""
    if isinstance(value, dict):
        return {k: stripped(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [stripped(v) for v in value]
    return value


def canonical(path: Path, tmp: Path) -> list[str]:
    """The file's records without timings, the run's temporary folder (answer settings name the index by its
    full path) written as $TMP."""
    return [json.dumps(stripped(json.loads(line.replace(str(tmp), "$TMP"))), sort_keys=True)
            for line in path.read_text().splitlines() if line.strip()]


def digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def runs(tmp: Path) -> list[list[str]]:
    index = tmp / "corpus.index"
    medqa = ROOT.parent / "shared" / "data" / "medqa_dev.jsonl"
    bench = str(medqa) if medqa.exists() else str(ROOT / "examples" / "questions.jsonl")
    return [
        ["index", "build", str(ROOT / "examples" / "corpus.jsonl"), "-o", str(index)],
        ["answer", str(ROOT / "examples" / "questions.jsonl"), "-o", str(tmp / "answer-ttt.jsonl"), "--index",
         str(index), "--limit", "3", "--max-new-tokens", "24"],
        ["answer", str(ROOT / "examples" / "questions.jsonl"), "-o", str(tmp / "answer-off.jsonl"), "--no-ttt",
         "--limit", "3", "--max-new-tokens", "24"],
        ["eval", bench, "--mode", "loglik", "--index", str(index), "--limit", "5", "--compare",
         "ttt,no-ttt,oracle-ttt,icl", "-o", str(tmp / "loglik")],
        ["eval", str(ROOT / "examples" / "corpus.jsonl"), "--mode", "perplexity", "--index", str(index),
         "--limit", "3", "--compare", "ttt,no-ttt", "-o", str(tmp / "ppl")],
        ["eval", bench, "--mode", "generate", "--index", str(index), "--limit", "2", "--max-new-tokens", "16",
         "--compare", "ttt,no-ttt", "-o", str(tmp / "gen")],
    ]


def collect() -> tuple[dict[str, list[str]], dict[str, float]]:
    """Each output file's canonical records, and each command's wall seconds (the refactor's cost, if any)."""
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for n, args in enumerate(runs(tmp)):
            print("finemed", " ".join(args), file=sys.stderr)
            t0 = time.perf_counter()
            subprocess.run([*FINEMED, *args, "--no-progress"] if args[0] in ("answer", "eval") else
                           [*FINEMED, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            seconds[f"{n}: " + " ".join(a.replace(str(tmp), "$TMP").replace(str(ROOT.parent), "..") for a in args)] = \
                time.perf_counter() - t0
        files = sorted(p for p in tmp.rglob("*.jsonl") if "lm-eval" not in p.parts and p.name != "corpus.jsonl"
                       and "corpus.index" not in p.parts)
        return {str(p.relative_to(tmp)): canonical(p, tmp) for p in files}, seconds


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("record", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    where = Path(sys.argv[2])
    now, seconds = collect()
    timings = where.with_suffix(".seconds.json")
    if sys.argv[1] == "record":  # the digests, and the records themselves to show what changed
        where.write_text(json.dumps({k: digest(v) for k, v in now.items()}, indent=1, sort_keys=True) + "\n")
        timings.write_text(json.dumps(seconds, indent=1) + "\n")
        where.with_suffix(".records.json").write_text(json.dumps(now, indent=0, sort_keys=True) + "\n")
        print(f"recorded {len(now)} output files in {where}")
        return 0
    before = json.loads(where.read_text())
    records = where.with_suffix(".records.json")
    old = json.loads(records.read_text()) if records.is_file() else {}
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != digest(now.get(k, [])))
    for name in sorted(before.keys() | now.keys()):
        print(f"{'same   ' if name not in changed else 'CHANGED'} {name}")
        for i, (a, b) in enumerate(zip(old.get(name, []), now.get(name, []), strict=False)):
            if a != b:
                print(f"  record {i}: was {a[:300]}\n            now {b[:300]}")
    print(f"{len(before) - len(changed)} of {len(before)} output files identical (timings removed)")
    was = json.loads(timings.read_text()) if timings.is_file() else {}
    for command, t in seconds.items():
        if command in was:
            print(f"{t:7.1f} s now, {was[command]:7.1f} s before ({t / was[command]:.2f}x)  finemed {command}")
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
