"""Outputs of `answer` and every `eval` mode on the embedded model, reduced to what must not change when the
code is refactored: every record with its timings removed, digested. Record before a refactor, check after.

    python bench/identical_outputs.py record bench/results/identical-outputs.json
    python bench/identical_outputs.py check bench/results/identical-outputs.json

The runs are small (a few questions each) and use the shipped examples and, when present, the shared MedQA dev
file; the same machine and library versions give the same bytes (greedy decoding, a fixed seed).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
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


def digest(path: Path) -> str:
    lines = [json.dumps(stripped(json.loads(line)), sort_keys=True) for line in path.read_text().splitlines()
             if line.strip()]
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


def collect() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for args in runs(tmp):
            print("finemed", " ".join(args), file=sys.stderr)
            subprocess.run([*FINEMED, *args, "--no-progress"] if args[0] in ("answer", "eval") else
                           [*FINEMED, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        files = sorted(p for p in tmp.rglob("*.jsonl") if "lm-eval" not in p.parts and p.name != "corpus.jsonl"
                       and "corpus.index" not in p.parts)
        return {str(p.relative_to(tmp)): digest(p) for p in files}


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("record", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    where = Path(sys.argv[2])
    now = collect()
    if sys.argv[1] == "record":
        where.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(now)} output files in {where}")
        return 0
    before = json.loads(where.read_text())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    for name in sorted(before.keys() | now.keys()):
        print(f"{'same   ' if name not in changed else 'CHANGED'} {name}")
    print(f"{len(before) - len(changed)} of {len(before)} output files identical (timings removed)")
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
