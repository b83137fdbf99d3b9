"""Seconds per question and peak memory of LoRA TTT by ggml on the GGUF (issue 36) against the torch engine, side
by side in one run, on the embedded model and on a random-weight Llama-3.2-1B shape at Q8_0 and Q4_K_M.

    python bench/ttt_engine.py                     # embedded + 1b, 4 questions (the first a warm-up)
    python bench/ttt_engine.py --cases embedded -n 3

Each (case, engine) runs in its own process (peak RSS is that process's VmHWM, model loading included). Both engines get
the same token ids and labels (examples/corpus.jsonl records, one neighbour per question as `ttt.k` = 1), tokenised
here once, so the ggml process never imports torch; both run TTTConfig's defaults and write the adapter's LoRA
GGUF (what llama.cpp is handed), which the timing includes. torch trains on the full-precision HF directory (fp32
on the CPU, as `finemed answer` does); ggml on the GGUF's own bytes. Appends to bench/results/ttt_engine.csv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def torch_worker(hf: str, examples_file: str, n: int, out: Path) -> dict:
    from finemed_cli.checkpoints.loading import load_model
    from finemed_cli.config.answer import TTTConfig
    from finemed_cli.data.records import CorpusRecord
    from finemed_cli.export.lora_gguf import export_lora_gguf
    from finemed_cli.ttt.update import lora_session

    loaded = load_model(hf, "cpu")
    records = [CorpusRecord.from_json(r) for r in json.loads(Path(examples_file).read_text())["records"]]
    times, losses = [], []
    for i in range(n):
        start = time.perf_counter()
        with lora_session(loaded.model, loaded.tokenizer, [records[i]], TTTConfig(), 0) as res:
            export_lora_gguf(res.adapter, loaded.model.config.to_dict(), out / f"torch-{i}.gguf")
        times.append(time.perf_counter() - start)
        losses.append((res.loss_before, res.loss_after))
    return {"times": times, "losses": losses}


def ggml_worker(gguf: str, examples_file: str, n: int, out: Path) -> dict:
    from finemed_cli.config.answer import TTTConfig
    from finemed_cli.ttt.ggml.engine import GgmlTTT, write_lora_gguf
    from finemed_cli.ttt.ggml.model import open_gguf

    data = json.loads(Path(examples_file).read_text())["examples"]
    engine = GgmlTTT(open_gguf(gguf), TTTConfig())
    times, losses = [], []
    for i in range(n):
        start = time.perf_counter()
        res = engine.train([data[i]], 0)
        write_lora_gguf(res, out / f"ggml-{i}.gguf")
        times.append(time.perf_counter() - start)
        losses.append((res.loss_before, res.loss_after))
    return {"times": times, "losses": losses, "torch_imported": "torch" in sys.modules,
            "types": sorted({open_gguf(gguf).type_name(f"blk.0.{w}.weight") for w in ("attn_q", "ffn_down")})}


def write_examples(hf: str, n: int, path: Path) -> None:
    """The first n corpus records and their (ids, labels) as the torch engine builds them."""
    from finemed_cli.checkpoints.loading import load_tokenizer
    from finemed_cli.config.answer import TTTConfig
    from finemed_cli.modeling.examples import lora_examples
    from finemed_cli.modeling.prompts import SYSTEM_PROMPT

    rows = [json.loads(line) for line in (REPO / "examples" / "corpus.jsonl").read_text().splitlines()[:n]]
    from finemed_cli.data.records import CorpusRecord

    tok, cfg = load_tokenizer(hf), TTTConfig()
    examples = []
    for r in rows:
        (e,) = lora_examples(tok, [CorpusRecord.from_json(r)], cfg.max_length, SYSTEM_PROMPT, cfg.loss_on)
        examples.append((e.input_ids[0].tolist(), e.labels[0].tolist()))
    path.write_text(json.dumps({"records": rows, "examples": examples}))


def run(engine: str, model: str, examples: Path, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--worker", engine, "--model", model, "--examples", str(examples),
               "-n", str(n), "--out", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cases(names: list[str], work: Path) -> list[tuple[str, str, str]]:
    """(case, HF directory for torch, GGUF for ggml)."""
    out = []
    if "embedded" in names:
        from finemed_cli.checkpoints.embedded import embedded_gguf, embedded_model_dir

        out.append(("smollm2-135m " + embedded_gguf().stem.rsplit(".", 1)[-1], str(embedded_model_dir()),
                    str(embedded_gguf())))
    if "1b" in names:
        sys.path.insert(0, str(REPO / "bench"))
        from scale import build_model, export

        hf = build_model("1b", work)
        for outtype in ("q8_0", "q4_k_m"):
            out.append((f"llama-3.2-1b-shape {outtype}", str(hf), str(export(hf, outtype)[0])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="embedded,1b")
    p.add_argument("-n", "--questions", type=int, default=4)
    p.add_argument("--work", type=Path, default=REPO / "build" / "scale")
    p.add_argument("--worker", choices=["torch", "ggml"])
    p.add_argument("--model")
    p.add_argument("--examples")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.worker:
        fn = torch_worker if args.worker == "torch" else ggml_worker
        result = fn(args.model, args.examples, args.questions, args.out)
        # VmHWM, the peak of this process's own memory map: getrusage's ru_maxrss also counts the parent's
        # resident memory at fork (measured: both engines read 3133 MB, the parent's size after an export)
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        result["peak_rss_mb"] = int(hwm.split()[1]) / 1024
        print(json.dumps(result))
        return
    rows = []
    for case, hf, gguf in cases(args.cases.split(","), args.work):
        with tempfile.TemporaryDirectory() as tmp:
            ex = Path(tmp) / "examples.json"
            write_examples(hf, args.questions, ex)
            tokens = [sum(1 for x in lab[1:] if x != -100) for _, lab in json.loads(ex.read_text())["examples"]]
            res = {e: run(e, hf if e == "torch" else gguf, ex, args.questions) for e in ("torch", "ggml")}
        s = {e: sum(r["times"][1:]) / max(1, len(r["times"]) - 1) for e, r in res.items()}
        mb = {e: r["peak_rss_mb"] for e, r in res.items()}
        print(f"{case}: labelled tokens/question {tokens[1:]}; ggml reads {res['ggml']['types']}, "
              f"imports torch: {res['ggml']['torch_imported']}")
        for e in ("torch", "ggml"):
            first = res[e]["losses"][1]
            print(f"  {e:5s} {s[e]:7.2f} s/question  peak {mb[e]:8.0f} MB  q2 loss {first[0]:.4f} -> {first[1]:.4f}")
        print(f"  ggml/torch: time {s['ggml'] / s['torch']:.2f}x, peak memory {mb['ggml'] / mb['torch']:.2f}x")
        rows.append([case, args.questions - 1, round(s["torch"], 3), round(s["ggml"], 3),
                     round(s["ggml"] / s["torch"], 3), round(mb["torch"]), round(mb["ggml"]),
                     round(mb["ggml"] / mb["torch"], 3)])
    append_results("ttt_engine", ["case", "questions", "torch_s", "ggml_s", "time_ratio", "torch_peak_mb",
                                  "ggml_peak_mb", "memory_ratio"], rows)


if __name__ == "__main__":
    main()
