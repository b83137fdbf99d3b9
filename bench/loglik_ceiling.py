"""Where loglik mode's 5 questions/s target stands on this machine: what finemed reaches on MedQA, what the
machine's matrix multiplies allow at best, and the two other ways to run the embedded model, side by side.

1. `finemed`: `option_logliks_batch` as `finemed eval --mode loglik` runs it without TTT (bf16, 8 questions
   packed per pass, shared system prompt run once).
2. `matmul bound`: the questions' linear-layer FLOPs (2 x non-embedding parameters x tokens run) at the
   bf16 GEMM rate this machine reaches on the model's largest layer shape: a ceiling for any exact bf16
   implementation, before attention and element-wise work.
3. `llama.cpp`: the GGUF's prompt evaluation over the same tokens per question (prompt after the shared
   prefix, then the options), no logits read: an upper bound on a llama.cpp scorer.
4. `int8 dynamic`: torch's dynamic int8 quantisation of the decoder's linear layers (fp32 activations
   quantised per tensor, weights per output channel), and how many of its predictions agree with bf16's.

    python bench/loglik_ceiling.py                     # MedQA dev from ../shared/data, 80 questions
    python bench/loglik_ceiling.py --gguf model.gguf   # another GGUF for the llama.cpp arm

Appends bench/results/loglik_ceiling.csv.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "medqa_dev.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default=str(SHARED), help="benchmark file with options")
    ap.add_argument("-n", type=int, default=80, help="questions timed (after 8 warm-up ones)")
    ap.add_argument("--gguf", default=None, help="GGUF for the llama.cpp arm [default: the embedded one]")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from finemed_cli.checkpoints.embedded import embedded_gguf
    from finemed_cli.checkpoints.loading import load_model
    from finemed_cli.eval.benchmarks import load_benchmark
    from finemed_cli.eval.loglik import _encode, option_logliks_batch, shared_prefix
    from finemed_cli.pipeline.eval_runs import LOGLIK_BATCH

    qs = [it.question for it in load_benchmark(args.questions) if it.question.options][: args.n + LOGLIK_BATCH]
    warm, timed = qs[:LOGLIK_BATCH], qs[LOGLIK_BATCH:]
    loaded = load_model(None, device="cpu", dtype="bfloat16")
    model, tok = loaded.model, loaded.tokenizer
    prefix = shared_prefix(model, tok)
    p = len(prefix.ids) if prefix else 0
    seqs = []  # the tokens each question runs through the model: its prompt after the prefix, then its options
    for q in timed:
        prompt, conts = _encode(tok, q)
        seqs.append(prompt[p:] + [t for c in conts for t in c])
    tokens = sum(map(len, seqs))
    rows, rates = [], {}

    def finemed(m: torch.nn.Module, pre: object) -> tuple[float, list[str]]:
        option_logliks_batch(m, tok, warm, pre)
        preds = []
        t0 = time.perf_counter()
        for i in range(0, len(timed), LOGLIK_BATCH):
            for s in option_logliks_batch(m, tok, timed[i : i + LOGLIK_BATCH], pre):
                preds.append(max(s, key=lambda k: s[k].logprob))
        return len(timed) / (time.perf_counter() - t0), preds

    rates["finemed"], bf16_preds = finemed(model, prefix)

    # 2. The matmul bound: linear-layer FLOPs at the best bf16 GEMM rate measured on the MLP's shape.
    decoder = model.get_decoder()
    linear_params = sum(mod.weight.numel() for mod in decoder.layers.modules() if isinstance(mod, torch.nn.Linear))
    flops = 2 * linear_params * tokens
    x = torch.randn(LOGLIK_BATCH * tokens // len(timed), model.config.hidden_size, dtype=torch.bfloat16)
    w = torch.randn(model.config.intermediate_size, model.config.hidden_size, dtype=torch.bfloat16)
    F.linear(x, w)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            F.linear(x, w)
        best = max(best, 10 * 2 * x.shape[0] * w.numel() / (time.perf_counter() - t0))
    rates["matmul bound"] = len(timed) / (flops / best)

    # 3. llama.cpp prompt evaluation of the same tokens.
    from finemed_cli.generate.llamacpp import open_gguf

    gguf = Path(args.gguf) if args.gguf else embedded_gguf()
    llm = open_gguf(gguf, n_ctx=4096)
    llm.eval(seqs[0])
    t0 = time.perf_counter()
    for s in seqs:
        llm.reset()
        llm.eval(s)
    rates[f"llama.cpp ({gguf.name})"] = len(timed) / (time.perf_counter() - t0)
    llm.close()

    # 4. Dynamic int8 (fp32 model: torch's quantised linear takes fp32 activations).
    del model, loaded
    fp32 = load_model(None, device="cpu", dtype="float32").model
    q8 = copy.deepcopy(fp32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantisation is deprecated in favour of torchao
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(q8.get_decoder().layers, {torch.nn.Linear: per_channel_dynamic_qconfig},
                         dtype=torch.qint8, inplace=True)
    rates["int8 dynamic"], q8_preds = finemed(q8, shared_prefix(q8, tok))
    agree = sum(a == b for a, b in zip(bf16_preds, q8_preds, strict=True))

    print(f"{len(timed)} questions of {Path(args.questions).name}, {tokens / len(timed):.0f} tokens each after the "
          f"shared prefix; {flops / len(timed) / 1e9:.1f} GFLOP of linear layers each; best bf16 GEMM "
          f"{best / 1e9:.0f} GFLOPS")
    for arm, qps in rates.items():
        print(f"  {arm:<48} {qps:6.2f} q/s  {qps / rates['finemed']:5.2f}x finemed  (target >= 5 q/s)")
    print(f"  int8 predictions equal to bf16's: {agree} of {len(timed)}")
    for arm, qps in rates.items():
        rows.append([f"loglik_{arm.split(' (')[0].replace(' ', '_')}_{Path(args.questions).stem}", len(timed),
                     round(qps, 3), "q/s", round(rates["finemed"], 3), round(qps / rates["finemed"], 2)])
    rows.append([f"loglik_int8_agreement_{Path(args.questions).stem}", len(timed), agree, "items", len(timed),
                 round(agree / len(timed), 2)])
    append_results("loglik_ceiling", ["benchmark", "n", "value", "unit", "baseline", "ratio"], rows)


if __name__ == "__main__":
    main()
