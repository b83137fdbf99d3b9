"""What a GGUF judge's verdicts are worth, measured on labelled public questions before `finemed synth`
trusts it with yours:

- departments: accuracy of `synth classify` against MedMCQA's subject labels, on the subjects that map to
  one department without doubt (Medicine → internal medicine, Surgery, Gynaecology & Obstetrics,
  Pediatrics, Psychiatry → neurology and psychiatry, Dental/Ophthalmology/ENT → other), with the share of
  its most frequent answer (a judge that always says the same department scores that share and no better);
- complexity: whether `synth score` rates long USMLE vignettes (MedQA) above one-line recall questions
  (MedMCQA): the AUC, P(complexity of a MedQA item > that of a MedMCQA item), ties counting half; 0.5 is a
  judge that cannot tell them apart;
- spread: how many distinct quality and complexity values it uses, and the items per second of each stage.

    python bench/judge_quality.py                                   # the embedded model
    python bench/judge_quality.py --model judge.gguf --per-department 20 --per-source 40

Reads ../shared/data (or --data); appends bench/results/judge_quality.csv with the machine and versions.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import orjson
from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]
SUBJECT_DEPARTMENT = {
    "Medicine": "Internal medicine",
    "Surgery": "Surgery",
    "Gynaecology & Obstetrics": "Obstetrics and gynecology",
    "Pediatrics": "Pediatrics",
    "Psychiatry": "Neurology and psychiatry",
    "Dental": "Other",
    "Ophthalmology": "Other",
    "ENT": "Other",
}


def _read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def department_items(data: Path, per_department: int) -> list[dict]:
    """The first `per_department` MedMCQA dev questions of each department (file order), with the label."""
    taken: Counter[str] = Counter()
    items = []
    for rec in _read(data / "medmcqa_dev.jsonl"):
        dept = SUBJECT_DEPARTMENT.get((rec.get("meta") or {}).get("subject"))
        if dept and taken[dept] < per_department:
            taken[dept] += 1
            items.append({"id": rec["id"], "question": rec["question"], "expected": dept})
    return items


def complexity_items(data: Path, per_source: int) -> list[dict]:
    medqa = _read(data / "medqa_dev.jsonl")[:per_source]
    recall = [r for r in _read(data / "medmcqa_dev.jsonl") if (r.get("meta") or {}).get("subject") != "Dental"]
    return ([{"id": r["id"], "question": r["question"], "source": "medqa"} for r in medqa]
            + [{"id": r["id"], "question": r["question"], "source": "medmcqa"} for r in recall[:per_source]])


def auc(high: list[int], low: list[int]) -> float:
    """P(a score from `high` > one from `low`), ties counting half."""
    wins = sum((h > lo) + 0.5 * (h == lo) for h in high for lo in low)
    return wins / (len(high) * len(low))


def _run(stage, items: list[dict]) -> tuple[list[dict | None], float]:
    from finemed_cli.synth.stage import Reject

    out: list[dict | None] = []
    start = time.perf_counter()
    for rec in items:
        try:
            out.append(stage(rec))
        except Reject:
            out.append(None)
    return out, len(items) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file of the judge [default: the embedded model]")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--per-department", type=int, default=15)
    ap.add_argument("--per-source", type=int, default=30)
    args = ap.parse_args()

    from finemed_cli.synth.judge import classifier, scorer
    from finemed_cli.synth.llm import LlamaCppModel

    if not (args.data / "medmcqa_dev.jsonl").is_file():
        raise SystemExit(f"{args.data}: no medmcqa_dev.jsonl / medqa_dev.jsonl here; pass --data")
    model = LlamaCppModel(args.model)
    depts = department_items(args.data, args.per_department)
    classified, classify_rate = _run(classifier(model), depts)
    got = [c["department"] if c else None for c in classified]
    valid = [g for g in got if g]
    accuracy = sum(g == d["expected"] for g, d in zip(got, depts, strict=True)) / len(depts)
    top, top_n = Counter(valid).most_common(1)[0] if valid else ("-", 0)
    print(f"{model.name}: departments {accuracy:.1%} right on {len(depts)} MedMCQA questions "
          f"(chance 1/6; its most frequent answer, {top}, is {top_n / len(depts):.0%} of all), "
          f"{len(valid)}/{len(depts)} valid, {classify_rate:.2f} items/s")
    print("  per department (right/asked):", ", ".join(
        f"{dept}: {sum(g == dept for g, d in zip(got, depts, strict=True) if d['expected'] == dept)}/"
        f"{sum(d['expected'] == dept for d in depts)}" for dept in dict.fromkeys(d["expected"] for d in depts)))

    items = complexity_items(args.data, args.per_source)
    scored, score_rate = _run(scorer(model), items)
    by = {"medqa": [], "medmcqa": []}
    qualities, complexities = set(), set()
    for rec, s in zip(items, scored, strict=True):
        if s:
            by[rec["source"]].append(s["complexity"])
            qualities.add(s["quality"])
            complexities.add(s["complexity"])
    separation = auc(by["medqa"], by["medmcqa"]) if by["medqa"] and by["medmcqa"] else float("nan")
    mean = {k: sum(v) / len(v) if v else float("nan") for k, v in by.items()}
    n_valid = len(by["medqa"]) + len(by["medmcqa"])
    print(f"  complexity AUC MedQA vs MedMCQA {separation:.3f} (0.5: cannot tell them apart; mean "
          f"{mean['medqa']:.2f} vs {mean['medmcqa']:.2f}), {len(qualities)} distinct quality and "
          f"{len(complexities)} distinct complexity values, {n_valid}/{len(items)} valid, {score_rate:.2f} items/s")
    model.close()
    append_results("judge_quality", [
        "judge", "department_items", "department_accuracy", "most_frequent_share", "classify_valid",
        "classify_items_per_s", "complexity_items", "complexity_auc", "mean_complexity_medqa",
        "mean_complexity_medmcqa", "distinct_quality", "distinct_complexity", "score_valid", "score_items_per_s"],
        [[model.name, len(depts), f"{accuracy:.4f}", f"{top_n / len(depts):.4f}", len(valid), f"{classify_rate:.3f}",
          len(items), f"{separation:.4f}", f"{mean['medqa']:.3f}", f"{mean['medmcqa']:.3f}", len(qualities),
          len(complexities), n_valid, f"{score_rate:.3f}"]])


if __name__ == "__main__":
    main()
