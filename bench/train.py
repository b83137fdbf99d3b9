"""Tokens per second and peak memory of `finemed train` SFT against TRL's `SFTTrainer` with its defaults,
on the same model, the same tokenized sequences, the same LoRA, batch size and number of steps.

    python bench/train.py                          # embedded model, CPU; shared HuatuoGPT-o1 demo if present
                                                   # (the trl arms need `make setup EXTRAS=dev,bench`)
    python bench/train.py --steps 16 --batch-size 8 --arms finemed,trl
    python bench/train.py --device cuda --model DIR --backend unsloth --method qlora --arms finemed,trl  # GPU

Arms (each in its own process, so peak memory is its own):
- `finemed`: `finemed train` with one SFT stage (packed rows, no padding, LM head on labelled tokens only),
  on `--backend` (auto: unsloth on CUDA when installed) and `--method` (lora, or qlora: 4-bit base, unsloth).
- `trl`: `SFTTrainer` with its defaults: padded batches, no packing, gradient checkpointing on, bf16 autocast
  (TRL 1.x turns both on by default), loss on every token. Same LoRA via `peft_config`; with `--method qlora`
  the base is loaded 4-bit NF4 through bitsandbytes, TRL+peft's own QLoRA.
- `trl-fp32`: the same but with gradient checkpointing and bf16 off, to show how much of the gap is the
  defaults and how much is padding and the LM head.
Tokens are real (non-padding) tokens of the sequences trained on; time is the training loop alone.

Appends bench/results/train.csv with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "reasoning_huatuogpt_o1_demo.jsonl"
ARMS = ("finemed", "trl", "trl-fp32")


def _peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _finemed(args: argparse.Namespace, tmp: Path) -> dict:
    from finemed_cli.config.train import LoRASettings, ModelSettings, StageSettings, TrainConfig
    from finemed_cli.train.recipe import run_train

    stage = StageSettings(kind="sft", data=[str(args.data)], max_steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, max_length=args.max_length, warmup_ratio=0.0,
                          limit=args.limit)
    cfg = TrainConfig(name="bench", output_dir=str(tmp), seed=0, save_every=10**9, stages=[stage],
                      model=ModelSettings(name=args.model, method=args.method,
                                          lora=LoRASettings(rank=args.rank, alpha=2 * args.rank)))
    run = run_train(cfg, device=args.device, backend=args.backend, progress=False)
    s = json.loads((run / "stage-1-sft" / "summary.json").read_text())
    backend = json.loads((run / "manifest.json").read_text())["backend"]
    return {"tokens": round(s["tokens_per_s"] * s["seconds"]), "seconds": s["seconds"], "backend": backend}


class _TorchChunkedLogProb:
    """TRL 1.x computes SFT's loss with a fused LM head whose Triton kernel has no CPU driver ("0 active
    drivers" on a machine with Triton but no GPU), so on CPU its `SFTTrainer` cannot train at all. This is
    the same computation in torch (LM head on the labelled positions only, log-softmax, gather; entropy and
    top-1 for its metrics), patched in on CPU only so that TRL's trainer can run here."""

    @staticmethod
    def apply(hidden, weight, bias, labels, temperature, chunk_size, softcap, logit_scale, outputs):  # noqa: ANN001, ANN205
        import torch

        logits = torch.nn.functional.linear(hidden, weight, bias) * logit_scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        logp = (logits / temperature).float().log_softmax(-1)
        picked = logp.gather(-1, labels[:, None]).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
            top1 = logits.argmax(-1) == labels if "is_top1" in outputs else None
        return picked, entropy, None, None, top1


def _trl(args: argparse.Namespace, tmp: Path, defaults: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from finemed_cli.checkpoints.loading import load_model, pick_device
    from finemed_cli.config.answer import DEFAULT_TARGETS
    from finemed_cli.train.data import DataReport, encode_conversation, read_training_file

    device = pick_device(args.device)
    if device == "cpu":
        import trl.trainer.utils

        trl.trainer.utils._ChunkedLogProbFunction = _TorchChunkedLogProb
    loaded = load_model(args.model, device=device, dtype="float32" if device == "cpu" else "bfloat16")
    if args.method == "qlora":
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        loaded.model.to("meta")  # only its tokenizer is kept
        model = AutoModelForCausalLM.from_pretrained(loaded.source, quantization_config=quant,
                                                     dtype=torch.bfloat16, device_map={"": 0})
    else:
        model = loaded.model
    _, convs = read_training_file(args.data, "sft")
    convs = convs[: args.limit] if args.limit else convs
    # The very token ids finemed trains on, so both arms do the same work.
    seqs = [e.input_ids for c in convs
            if (e := encode_conversation(loaded.tokenizer, c, args.max_length, DataReport())) is not None]
    extra = {} if defaults else {"gradient_checkpointing": False, "bf16": False}
    config = SFTConfig(output_dir=str(tmp), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       max_length=args.max_length, learning_rate=args.lr, report_to=[], save_strategy="no",
                       logging_steps=1, seed=0, use_cpu=device == "cpu", disable_tqdm=True, **extra)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS),
                      bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"input_ids": seqs}),
                         processing_class=loaded.tokenizer, peft_config=lora)
    seen = [0]
    compute_loss = trainer.compute_loss

    def counting(model: object, inputs: dict, *a: object, **k: object) -> object:
        # Counted where the batch is trained on (the data loader fetches one batch ahead).
        mask = inputs.get("attention_mask")
        seen[0] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = counting
    out = trainer.train()
    return {"tokens": seen[0], "seconds": out.metrics["train_runtime"]}


def _child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = _finemed(args, Path(tmp)) if args.arm == "finemed" else _trl(args, Path(tmp), args.arm == "trl")
    result.setdefault("backend", "trl")
    result.update(arm=args.arm, peak_mib=round(_peak_mib(), 1), tokens_per_s=round(result["tokens"] / result["seconds"], 1))
    Path(args.result).write_text(json.dumps(result))


def _label(row: dict, args: argparse.Namespace) -> str:
    """The arm as the CSV names it: plain names for the CPU defaults, backend and method added otherwise."""
    label = row["arm"] if row["backend"] in ("trl", "transformers") else f"{row['arm']}-{row['backend']}"
    return label + ("-qlora" if args.method == "qlora" else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED if SHARED.is_file() else REPO / "examples" / "corpus.jsonl")
    ap.add_argument("--model", default=None, help="HF directory or id (default: the embedded model)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N records")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", choices=["auto", "transformers", "unsloth"],
                    help="finemed arm's backend (auto: unsloth on CUDA when installed)")
    ap.add_argument("--method", default="lora", choices=["lora", "qlora"], help="qlora: 4-bit base in both arms")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        return _child(args)

    rows = []
    arms = args.arms.split(",")
    for arm in arms:
        if arm not in ARMS:
            sys.exit(f"--arms: unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    if any(a.startswith("trl") for a in arms) and not all(importlib.util.find_spec(m) for m in ("trl", "datasets")):
        sys.exit("the trl arms need TRL and datasets, which finemed itself does not use: "
                 "make setup EXTRAS=dev,bench (or pip install 'finemed[bench]')")
    for arm in arms:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--arm", arm, "--result", f.name]
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            rows.append(json.loads(Path(f.name).read_text()))
    base = next((r for r in rows if r["arm"] == "trl"), rows[0])
    print(f"\n{args.data.name}: {args.steps} steps x {args.batch_size} sequences, max_length {args.max_length}, "
          f"{args.method} rank {args.rank}")
    print(f"{'arm':10} {'backend':>12} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'peak MiB':>9} {'vs ' + base['arm']:>8}")
    for r in rows:
        print(f"{r['arm']:10} {r['backend']:>12} {r['tokens']:8d} {r['seconds']:8.1f} {r['tokens_per_s']:8.1f} {r['peak_mib']:9.0f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:7.2f}x")
    append_results("train", ["data", "steps", "batch_size", "max_length", "rank", "arm", "tokens", "seconds",
                             "tokens_per_s", "peak_mib", "ratio_vs_" + base["arm"]],
                   [[args.data.name, args.steps, args.batch_size, args.max_length, args.rank, _label(r, args), r["tokens"],
                     r["seconds"], r["tokens_per_s"], r["peak_mib"],
                     round(r["tokens_per_s"] / base["tokens_per_s"], 3)] for r in rows])


if __name__ == "__main__":
    main()
