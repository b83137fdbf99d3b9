"""lm-eval's own `local-completions` model against `finemed serve`, beside `finemed eval --mode loglik --compare
no-ttt`, on the same MedQA items and model: the accuracies of both, and whether they are equal.

    python bench/lm_eval_serve.py                        # the 100 shared MedQA dev items, embedded SmolLM2
    python bench/lm_eval_serve.py --limit 10

The lm-eval task is built from the question file (a YAML in a temporary folder, `include_path`): each item's
context is the chat prompt `finemed eval --mode loglik` scores options after (finemed's system prompt, the
question and its lettered options, the generation prompt; `eval/loglik.py`), each choice an option's text with
no delimiter. lm-eval tokenizes through the server (`/tokenize`, `/tokenizer_info`: its remote tokenizer) and
sends `echo: true, logprobs: 1, max_tokens: 1` on the token ids. Two differences are expected: lm-eval moves the
prompt's trailing newline into every continuation, so each option's sum carries the newline's log-probability (the
same for all options of an item: acc is unchanged, acc_norm can move), and finemed eval scores with torch on the
GGUF's dequantised weights while the server scores with llama.cpp (F32 KV cache). So by default the server
gets those same weights as an F32 GGUF (`finemed export --outtype f32` of the dequantised model) and finemed
eval runs with `--dtype float32` (its `auto` is bfloat16 on CPU: option scores up to 0.45 nats from float32's,
measured, the same letter as the F32 server on 8 of 10 items): llama.cpp and torch then differ by rounding
only (1e-4 nats). `--served q4_1` serves the shipped Q4_1 GGUF instead, whose llama.cpp
matmuls quantize activations to 8 bits (measured on 10 items: option scores up to 1.2 nats from torch's, the
same letter on 7 of 10). Per item the script compares the option differences (each option minus option A,
which cancels the newline) and the picked letters. lm-eval's API models need `pip install lm-eval[api]`
(tenacity). Appends to bench/results/lm_eval_serve.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_csv import append_results

FINEMED = Path(sys.executable).with_name("finemed")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medqa_dev.jsonl"  # ../shared beside the repo


def build_task(questions: Path, limit: int | None, folder: Path, system_source: Path) -> str:
    """Write the lm-eval task (YAML and its JSONL) for the first `limit` items; returns the task name."""
    from transformers import AutoTokenizer

    from finemed_cli.data.records import load_questions
    from finemed_cli.modeling.prompts import question_messages, render_chat, resolve_system_prompt

    tokenizer = AutoTokenizer.from_pretrained(system_source)
    system = resolve_system_prompt(None, system_source)
    rows = []
    for q in load_questions(questions)[:limit]:
        letters = list(q.options)
        rows.append({"id": q.id, "prompt": render_chat(tokenizer, question_messages(q, system), True),
                     "choices": [t.strip() for t in q.options.values()], "letters": letters,
                     "gold": letters.index(q.answer)})
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "finemed_medqa.yaml").write_text(
        "task: finemed_medqa\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: prompt\ndoc_to_choice: choices\n"
        "doc_to_target: gold\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return "finemed_medqa"


def start_server(model: str, log: Path, threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(FINEMED), "serve", model, "--port", "0", "--name", "m", "--ctx", "2048",
                             "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.time() + 600
    while time.time() < deadline:
        m = re.search(r"at (http://\S+)/v1", log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"finemed serve exited:\n{log.read_text()}")
        time.sleep(0.2)
    raise SystemExit("finemed serve never said where it listens")


def run_lm_eval(url: str, folder: Path, task: str) -> tuple[dict, list[dict], float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=[task], task_manager=TaskManager(include_path=str(folder)),
        model_args=f"base_url={url}/v1/completions,model=m,tokenizer_backend=remote,num_concurrent=1,"
                   "max_retries=1,tokenized_requests=True",
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    return out["results"][task], out["samples"][task], time.perf_counter() - t0


def run_finemed_eval(questions: Path, limit: int, folder: Path, dtype: str) -> tuple[dict, dict[str, dict], float]:
    t0 = time.perf_counter()
    subprocess.run([str(FINEMED), "-q", "eval", str(questions), "--mode", "loglik", "--compare", "no-ttt",
                    "--limit", str(limit), "--dtype", dtype, "-o", str(folder / "eval")], check=True)
    seconds = time.perf_counter() - t0
    report = json.loads((folder / "eval" / "report.json").read_text())
    records = {}
    for path in (folder / "eval").rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("variant") == "no-ttt" and "scores" in rec:
                records[rec["id"]] = rec
    return report, records, seconds


def compare(samples: list[dict], records: dict[str, dict]) -> dict[str, float]:
    """Per item: does lm-eval pick finemed's letter, and how far apart are the option differences."""
    same = same_norm = 0
    worst = 0.0
    for s in samples:
        doc, rec = s["doc"], records[s["doc"]["id"]]
        ours = [float(r[0][0]) for r in s["resps"]]
        theirs = [rec["scores"][letter]["logprob"] for letter in doc["letters"]]
        worst = max(worst, max(abs((a - ours[0]) - (b - theirs[0])) for a, b in zip(ours, theirs, strict=True)))
        same += doc["letters"][max(range(len(ours)), key=ours.__getitem__)] == rec["prediction"]
        per_char = [x / len(c) for x, c in zip(ours, doc["choices"], strict=True)]
        same_norm += doc["letters"][max(range(len(ours)), key=per_char.__getitem__)] == rec["prediction_norm"]
    n = len(samples)
    return {"same_prediction": same / n, "same_prediction_norm": same_norm / n, "max_option_diff_gap": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=Path, default=DATA)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--served", choices=["f32", "q4_1"], default="f32",
                    help="the GGUF the server scores with: the eval's weights as F32, or the shipped Q4_1")
    ap.add_argument("--eval-dtype", default="float32",
                    help="finemed eval's --dtype: float32 scores as the F32 GGUF does (its auto is bfloat16 on CPU)")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from finemed_cli.checkpoints.embedded import embedded_model_dir

    folder = Path(tempfile.mkdtemp(prefix="bench-lm-eval-serve-"))
    task = build_task(args.questions, args.limit, folder, embedded_model_dir())
    served = "embedded:smollm2-135m"
    if args.served == "f32":
        served = str(folder / "smollm2-135m-f32.gguf")
        subprocess.run([str(FINEMED), "-q", "export", str(embedded_model_dir()), "-o", served, "--outtype", "f32"],
                       check=True)
    proc, url = start_server(served, folder / "serve.log", args.threads)
    try:
        results, samples, lm_seconds = run_lm_eval(url, folder, task)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    report, records, fm_seconds = run_finemed_eval(args.questions, args.limit, folder, args.eval_dtype)
    fm_acc = sum(r["correct"] for r in records.values()) / len(records)
    fm_norm = sum(r["correct_norm"] for r in records.values()) / len(records)
    lm_acc, lm_norm = results["acc,none"], results["acc_norm,none"]
    agree = compare(samples, records)
    print(f"{len(samples)} MedQA items, embedded SmolLM2-135M, served as {args.served}")
    print(f"  lm-eval local-completions on finemed serve: acc {lm_acc:.4f}  acc_norm {lm_norm:.4f}  ({lm_seconds:.0f} s)")
    print(f"  finemed eval --mode loglik (no-ttt, {args.eval_dtype}): acc {fm_acc:.4f}  acc_norm {fm_norm:.4f}  ({fm_seconds:.0f} s)")
    print(f"  acc equal: {lm_acc == fm_acc}; acc_norm equal: {lm_norm == fm_norm}; same letter on "
          f"{agree['same_prediction']:.0%} of items (acc_norm {agree['same_prediction_norm']:.0%}); largest gap "
          f"between the two's option differences {agree['max_option_diff_gap']:.2e} nats")
    append_results("lm_eval_serve", ["items", "served", "eval_dtype", "lm_eval_acc", "finemed_acc", "lm_eval_acc_norm", "finemed_acc_norm",
                                     "same_prediction", "max_option_diff_gap", "lm_eval_s", "finemed_s"],
                   [[len(samples), args.served, args.eval_dtype, lm_acc, fm_acc, lm_norm, fm_norm, agree["same_prediction"],
                     f"{agree['max_option_diff_gap']:.3e}", round(lm_seconds, 1), round(fm_seconds, 1)]])


if __name__ == "__main__":
    main()
