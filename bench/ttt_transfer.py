"""Does TTT carry anything into the answer? Calibrate on one half of the shared MedQA dev file, evaluate the
choice on the other half, per embedded model: accuracy (loglik), the oracle ceiling (the same setting trained on
each item's own gold answer), the letter leak and the effect by neighbour-similarity band.

    python bench/ttt_transfer.py                                    # both embedded models, 50 + 50 items
    python bench/ttt_transfer.py --models embedded:smollm2-135m --calib 30 --held 30 --minutes 20

The neighbours come from an index of the shared HuatuoGPT-o1 traces (real, letter-free o1 reasoning), or
`--corpus` (e.g. the shared vlievin CoT traces, whose answers name a letter: the leak is then measurable; eval
drops the corpus records whose question is a benchmark item). Writes
bench/results/ttt-transfer/<model>/calib-C-held-H[-corpus].md with the commands it ran and the numbers it read
back; the calibration and eval folders stay under --work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DEFAULT_CORPUS = "reasoning_huatuogpt_o1_demo.jsonl"
CANDIDATES = "ttt,ttt(steps=4,layers=all),ttt(steps=4,layers=all,loss_on=reasoning)"


def finemed(*args: object) -> str:
    cmd = [sys.executable, "-m", "finemed_cli", *map(str, args)]
    print("+ finemed " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)
    return "finemed " + " ".join(map(str, args))


def split(items: Path, calib: int, held: int, work: Path) -> tuple[Path, Path]:
    lines = items.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) < calib + held:
        raise SystemExit(f"{items} has {len(lines)} items; --calib {calib} + --held {held} needs more")
    a, b = work / "calib.jsonl", work / "held.jsonl"
    a.write_text("".join(lines[:calib]), encoding="utf-8")
    b.write_text("".join(lines[calib:calib + held]), encoding="utf-8")
    return a, b


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def clean_corpus(corpus: Path, items: Path, work: Path) -> Path:
    """The corpus without any record whose question is one of the benchmark's: a neighbour that is the item's
    own worked answer would measure the oracle, not retrieval (the vlievin traces hold 93 of the 100 MedQA dev
    questions' own CoTs)."""
    asked = {_norm(json.loads(line)["question"]) for line in items.read_text(encoding="utf-8").splitlines() if line}
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line]
    # a corpus question may carry its options after the stem, so a record is the item's when it starts with it
    kept = [line for line in lines
            if not any(_norm(json.loads(line).get("question", "")).startswith(a) for a in asked)]
    if len(kept) == len(lines):
        return corpus
    print(f"{corpus.name}: {len(lines) - len(kept)} record(s) dropped whose question is a benchmark item", flush=True)
    out = work / f"{corpus.stem}-clean.jsonl"
    out.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return out


def summary(report: dict, variants: list[str]) -> list[str]:
    res, transfer = report["results"], (report.get("transfer") or {}).get("variants", {})
    lines = ["| variant | accuracy | 95% CI | vs no-ttt (points) | p | letter leak rise | gated |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name in variants:
        r = res[name]
        comp = next((c for c in report["comparisons"] if {c["a"], c["b"]} == {"no-ttt", name}), None)
        diff = "" if comp is None else f"{100 * (comp['difference'] if comp['a'] == name else -comp['difference']):+.1f}"
        p = "" if comp is None else f"{comp['p_value']:.3g}"
        t = transfer.get(name, {})
        leak = f"{100 * t['leak']['rise']:+.1f} (n={t['leak']['items']})" if t.get("leak") else "n/a"
        lines.append(f"| {name} | {100 * r['accuracy']:.1f}% | [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] "
                     f"| {diff} | {p} | {leak} | {t.get('gated', '')} |")
    for name, t in transfer.items():
        bands = "; ".join(f"sim {b['similarity'][0]:.2f}-{b['similarity'][1]:.2f}: {100 * b['difference']:+.1f} "
                          f"(n={b['n']}, +{b['helped']}/-{b['hurt']})" for b in t["by_similarity"])
        if bands:
            lines.append(f"\nBy similarity band, {name} vs no-ttt: {bands}")
    return lines


def run_model(model: str, args: argparse.Namespace, calib: Path, held: Path, index: Path) -> Path:
    tag = model.split(":")[-1].replace("/", "_")
    cal_out, eval_out = args.work / f"{tag}-calib", args.work / f"{tag}-held"
    start = time.perf_counter()
    commands = [finemed("ttt-calibrate", calib, "--mode", "loglik", "--index", index, "--model", model, "-o", cal_out,
                        "--candidates", args.candidates, "--max-minutes", args.minutes, "--dtype", "float32",
                        "--no-progress")]
    log = json.loads((cal_out / "calibration.json").read_text())
    # the chosen setting, or (none chosen) the strongest candidate, so the held-out half still shows what it does
    judged = log["chosen"] or log["rows"][-1]["variant"]
    variants = ["no-ttt", judged, f"oracle-{judged}"]  # names hold commas: never split the joined string
    compare = ",".join(variants)
    commands.append(finemed("eval", held, "--mode", "loglik", "--index", index, "--model", model, "-o", eval_out,
                            "--compare", compare, "--dtype", "float32", "--ttt-settings", "none", "--no-progress"))
    report = json.loads((eval_out / "report.json").read_text())
    minutes = (time.perf_counter() - start) / 60
    rows = [f"- {r['variant']}: {100 * r['improvement']:+.1f} points [{100 * r['ci95'][0]:+.1f}, "
            f"{100 * r['ci95'][1]:+.1f}]" + (f"; oracle {100 * r['oracle']['improvement']:+.1f} points"
                                             if r.get("oracle") else "")
            + (f"; letter leak {100 * r['leak']['rise']:+.1f}" if r.get("leak") else "") for r in log["rows"]]
    text = "\n".join([
        f"# TTT transfer: {model}", "",
        f"Calibrated on {calib.name} ({args.calib} items), evaluated on {held.name} ({args.held} other items), "
        f"neighbours from {args.corpus.name}; calibration {sum(log['minutes'].values()):.0f} minutes (calibration.json, "
        f"over all its runs), this run {minutes:.0f} minutes (what it resumed from --work costs nothing).", "",
        "## Calibration (dev half)", "", *rows, "", f"Chosen: {log['chosen'] or 'none (TTT off)'}", "",
        f"## Held-out half: {compare}", "", *summary(report, variants), "",
        "## Commands", "", "```", *commands, "```", ""])
    corpus = "" if args.corpus.name == DEFAULT_CORPUS else f"-{args.corpus.stem}"
    out = REPO / "bench" / "results" / "ttt-transfer" / tag / f"calib-{args.calib}-held-{args.held}{corpus}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=Path, default=DATA / "medqa_dev.jsonl")
    parser.add_argument("--corpus", type=Path, default=DATA / DEFAULT_CORPUS)
    parser.add_argument("--models", default="embedded:smollm2-135m,embedded:gemma3-270m")
    parser.add_argument("--calib", type=int, default=50)
    parser.add_argument("--held", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=60.0, help="calibration budget per model")
    parser.add_argument("--candidates", default=CANDIDATES)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "ttt_transfer")
    args = parser.parse_args()
    for p in (args.items, args.corpus):
        if not p.is_file():
            raise SystemExit(f"{p}: no such file (the shared data, or pass --items/--corpus)")
    args.work.mkdir(parents=True, exist_ok=True)
    calib, held = split(args.items, args.calib, args.held, args.work)
    corpus = clean_corpus(args.corpus, args.items, args.work)
    index = args.work / f"{corpus.stem}.index"
    finemed("index", "build", corpus, "-o", index)
    for model in args.models.split(","):
        run_model(model, args, calib, held, index)


if __name__ == "__main__":
    main()
