"""What a GGUF judge's verdicts are worth, measured on labelled public questions before `finemed synth`
trusts it with yours, and the paper's comparison of datasets drawn with it:

- departments: accuracy of `synth classify` (the reference's two steps and taxonomy) against MedMCQA's subject
  labels, on the subjects that name one department without doubt (Medicine → Internal Medicine, Surgery,
  Gynaecology & Obstetrics, Pediatrics; Dental, Ophthalmology and ENT → Otorhinolaryngology (ENT) with that
  sub-department; Skin and Anaesthesia → Other Departments with theirs), the sub-department accuracy where
  the subject names one, and the share of its most frequent answer (a judge that always says the same
  department scores that share and no better);
- complexity: whether `synth score` rates long USMLE vignettes (MedQA) above one-line recall questions
  (MedMCQA): the AUC, P(complexity of a MedQA item > that of a MedMCQA item), ties counting half; 0.5 is a
  judge that cannot tell them apart;
- spread: how many distinct quality and complexity values it uses, and the items per second of each stage;
- with `--distributions`: what the paper reports of its judge — the quality and complexity distributions of
  FineMed against other medical SFT sets — for your data (`--ours`, e.g. a `synth` work folder's
  filtered.jsonl) against the shared HuatuoGPT-o1 and UltraMedical samples (or any `--dataset NAME=FILE`),
  every set scored by the same judge, drawn as `finemed report` draws them (share of items per score, the
  sets side by side), with the counts in distributions.md.

    python bench/judge_quality.py                                   # the embedded model
    python bench/judge_quality.py --model judge.gguf --per-department 20 --per-source 40
    python bench/judge_quality.py --model judge.gguf --distributions --ours build/synth/filtered.jsonl

Reads ../shared/data (or --data); appends bench/results/judge_quality_v2.csv with the machine and versions
(judge_quality.csv holds the measurements with finemed's earlier taxonomy and prompts); the distributions go
to bench/results/judge-distributions/JUDGE/ (or --out).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import orjson
from results_csv import RESULTS, append_results

REPO = Path(__file__).resolve().parents[1]
ENT, OTHER = "Otorhinolaryngology (ENT)", "Other Departments"
SUBJECT_DEPARTMENT = {  # MedMCQA subject -> (department, sub-department or None when the subject names none)
    "Medicine": ("Internal Medicine", None),
    "Surgery": ("Surgery", None),
    "Gynaecology & Obstetrics": ("Obstetrics and Gynecology", None),
    "Pediatrics": ("Pediatrics", None),
    "Dental": (ENT, "Dentistry (Oral Medicine)"),
    "Ophthalmology": (ENT, "Ophthalmology"),
    "ENT": (ENT, "Otorhinolaryngology (ENT)"),
    "Skin": (OTHER, "Dermatology and Venereology"),
    "Anaesthesia": (OTHER, "Anesthesiology"),
}
DEFAULT_DATASETS = {"HuatuoGPT-o1": "reasoning_huatuogpt_o1_demo.jsonl", "UltraMedical": "reasoning_ultramedical.jsonl"}


def _read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def department_items(data: Path, per_department: int) -> list[dict]:
    """The first `per_department` MedMCQA dev questions of each labelled subject (file order), with the label."""
    taken: Counter[str] = Counter()
    items = []
    for rec in _read(data / "medmcqa_dev.jsonl"):
        subject = (rec.get("meta") or {}).get("subject")
        if subject in SUBJECT_DEPARTMENT and taken[subject] < per_department:
            taken[subject] += 1
            dept, sub = SUBJECT_DEPARTMENT[subject]
            items.append({"id": rec["id"], "question": rec["question"], "options": rec.get("options"),
                          "expected": dept, "expected_sub": sub})
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


def measure_departments(model, depts: list[dict]) -> list[object]:
    from finemed_cli.synth.judge import classifier

    classified, rate = _run(classifier(model), depts)
    got = [(c["department"], c["subdepartment"]) if c else (None, None) for c in classified]
    valid = [g for g, _ in got if g]
    accuracy = sum(g == d["expected"] for (g, _), d in zip(got, depts, strict=True)) / len(depts)
    with_sub = [(s, d) for (_, s), d in zip(got, depts, strict=True) if d["expected_sub"]]
    sub_accuracy = sum(s == d["expected_sub"] for s, d in with_sub) / max(1, len(with_sub))
    top, top_n = Counter(valid).most_common(1)[0] if valid else ("-", 0)
    print(f"{model.name}: departments {accuracy:.1%} right on {len(depts)} MedMCQA questions (chance 1/6; its most "
          f"frequent answer, {top}, is {top_n / len(depts):.0%} of all), sub-departments {sub_accuracy:.1%} on "
          f"{len(with_sub)}, {len(valid)}/{len(depts)} valid, {rate:.2f} items/s")
    print("  per department (right/asked):", ", ".join(
        f"{dept}: {sum(g == dept for (g, _), d in zip(got, depts, strict=True) if d['expected'] == dept)}/"
        f"{sum(d['expected'] == dept for d in depts)}" for dept in dict.fromkeys(d["expected"] for d in depts)))
    return [len(depts), f"{accuracy:.4f}", len(with_sub), f"{sub_accuracy:.4f}", f"{top_n / len(depts):.4f}",
            len(valid), f"{rate:.3f}"]


def measure_complexity(model, items: list[dict]) -> list[object]:
    from finemed_cli.synth.judge import scorer

    scored, rate = _run(scorer(model), items)
    by: dict[str, list[int]] = {"medqa": [], "medmcqa": []}
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
          f"{len(complexities)} distinct complexity values, {n_valid}/{len(items)} valid, {rate:.2f} items/s")
    return [len(items), f"{separation:.4f}", f"{mean['medqa']:.3f}", f"{mean['medmcqa']:.3f}", len(qualities),
            len(complexities), n_valid, f"{rate:.3f}"]


def distributions(model, datasets: dict[str, Path], per_dataset: int, out: Path) -> None:
    """Score the first `per_dataset` questions of each dataset with the judge and draw the paper's comparison."""
    from finemed_cli.synth.judge import scorer
    from finemed_cli.synth.report import plot_scores, summary_markdown

    scored: dict[str, list[dict]] = {}
    for name, path in datasets.items():
        items = [{"id": r.get("id", str(i)), "question": r["question"], "options": r.get("options")}
                 for i, r in enumerate(_read(path)) if isinstance(r.get("question"), str)][:per_dataset]
        results, rate = _run(scorer(model), items)
        scored[name] = [r for r in results if r]
        means = {s: sum(r[s] for r in scored[name]) / max(1, len(scored[name])) for s in ("quality", "complexity")}
        print(f"  {name}: {len(scored[name])}/{len(items)} scored, mean quality {means['quality']:.2f}, "
              f"complexity {means['complexity']:.2f} ({rate:.2f} items/s)")
    out.mkdir(parents=True, exist_ok=True)
    png = plot_scores(scored, out)
    (out / "distributions.md").write_text(f"judge: {model.name}\n\n" + summary_markdown(scored, [png] if png else []))
    for name, rows in scored.items():
        (out / f"{name}.scored.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    print(f"  wrote {png} and {out / 'distributions.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file of the judge, or an embedded name "
                                                  "(embedded:gemma3-270m) [default: the embedded model]")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--per-department", type=int, default=15, help="MedMCQA questions per labelled subject")
    ap.add_argument("--per-source", type=int, default=30)
    ap.add_argument("--distributions", action="store_true", help="also draw the datasets' score distributions")
    ap.add_argument("--ours", type=Path, default=None, help="your data (records with 'question') to compare")
    ap.add_argument("--dataset", action="append", default=[], metavar="NAME=FILE",
                    help="a dataset to compare [default: the shared HuatuoGPT-o1 and UltraMedical samples]")
    ap.add_argument("--per-dataset", type=int, default=100, help="questions scored per dataset")
    ap.add_argument("--out", type=Path, default=None, help="folder of the distributions [default: bench/results/"
                                                            "judge-distributions/JUDGE]")
    args = ap.parse_args()

    from finemed_cli.synth.llm import LlamaCppModel

    if not (args.data / "medmcqa_dev.jsonl").is_file():
        raise SystemExit(f"{args.data}: no medmcqa_dev.jsonl / medqa_dev.jsonl here; pass --data")
    from finemed_cli.checkpoints.embedded import EMBEDDED_PREFIX, embedded_model
    from finemed_cli.errors import FinemedError

    try:
        path = args.model
        if path and path.startswith(EMBEDDED_PREFIX):
            path = str(embedded_model(path).gguf())
        model = LlamaCppModel(path, n_ctx=4096)
    except FinemedError as e:
        raise SystemExit(f"error: {e}") from None
    row = [model.name, *measure_departments(model, department_items(args.data, args.per_department)),
           *measure_complexity(model, complexity_items(args.data, args.per_source))]
    if args.distributions:
        given = dict(d.split("=", 1) for d in args.dataset)
        datasets = {n: Path(p) for n, p in given.items()} or {n: args.data / f for n, f in DEFAULT_DATASETS.items()}
        if args.ours:
            datasets = {"ours": args.ours, **datasets}
        distributions(model, datasets, args.per_dataset,
                      args.out or RESULTS / "judge-distributions" / model.name.removesuffix(".gguf"))
    model.close()
    append_results("judge_quality_v2", [
        "judge", "department_items", "department_accuracy", "subdepartment_items", "subdepartment_accuracy",
        "most_frequent_share", "classify_valid", "classify_items_per_s", "complexity_items", "complexity_auc",
        "mean_complexity_medqa", "mean_complexity_medmcqa", "distinct_quality", "distinct_complexity", "score_valid",
        "score_items_per_s"], [row])


if __name__ == "__main__":
    main()
