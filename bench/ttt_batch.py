"""Questions per second of batched LoRA TTT (B questions' adapters in one forward/backward) against the same
questions trained one at a time, on the embedded model (or --model), with each question's retrieved
neighbours. TTT only: generation is the same either way.

    python bench/ttt_batch.py                  # B = 1, 4, 8, 16 over 16 questions on this machine

Appends bench/results/ttt_batch.csv with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=Path, default=REPO / "examples" / "questions.jsonl")
    ap.add_argument("--corpus", type=Path, default=REPO / "examples" / "corpus.jsonl")
    ap.add_argument("--model", default=None)
    ap.add_argument("-n", type=int, default=16, help="questions timed (after one warm-up question)")
    ap.add_argument("-k", type=int, default=1)
    ap.add_argument("--batch-sizes", default="4,8,16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="model weights: auto (fp32 on CPU), bfloat16, float32")
    ap.add_argument("--sort", action="store_true",
                    help="batch questions of similar neighbour length together (less padding)")
    args = ap.parse_args()

    import torch

    from finemed_cli.config.answer import TTTConfig
    from finemed_cli.data.records import load_questions
    from finemed_cli.models.loading import load_model
    from finemed_cli.retrieval.embed import load_embedder
    from finemed_cli.retrieval.index import CorpusIndex, build_index
    from finemed_cli.runtime import tune_allocator
    from finemed_cli.ttt.update import ttt_batch_session, ttt_session

    tune_allocator()
    questions = load_questions(args.questions)[: args.n + 1]
    embedder = load_embedder(None)
    with tempfile.TemporaryDirectory() as tmp:
        build_index(args.corpus, Path(tmp) / "idx", embedder)
        index = CorpusIndex(Path(tmp) / "idx")
        hits = index.search(embedder.encode([q.question for q in questions]), args.k)
    neighbours = [[h.record for h in hs] for hs in hits]
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    config = TTTConfig(k=args.k)
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)

    with ttt_session(model, tok, neighbours[0], config):  # warm-up
        pass
    work = neighbours[1:]
    if args.sort:
        work.sort(key=lambda nb: sum(len(r.question) + len(r.reasoning) + len(r.answer) for r in nb))
    start = time.perf_counter()
    for nb in work:
        with ttt_session(model, tok, nb, config):
            pass
    sync()
    seq_s = time.perf_counter() - start
    seq_qps = len(work) / seq_s
    print(f"sequential: {len(work)} questions in {seq_s:.2f} s = {seq_qps:.3f} q/s")
    # the dtype goes in the model column: the CSV's columns predate it
    name = f"{loaded.name} ({str(next(model.parameters()).dtype).removeprefix('torch.')})"
    rows = [[name, args.k, len(work), args.sort, 1, f"{seq_s:.3f}", f"{seq_qps:.4f}", "1.000"]]
    for b in (int(x) for x in args.batch_sizes.split(",")):
        start = time.perf_counter()
        for lo in range(0, len(work), b):
            with ttt_batch_session(model, tok, work[lo : lo + b], config):
                pass
        sync()
        s = time.perf_counter() - start
        qps = len(work) / s
        print(f"batched B={b:<2}: {s:.2f} s = {qps:.3f} q/s, {qps / seq_qps:.2f}x sequential")
        rows.append([name, args.k, len(work), args.sort, b, f"{s:.3f}", f"{qps:.4f}", f"{qps / seq_qps:.3f}"])
    append_results("ttt_batch", ["model", "k", "questions", "sorted", "batch", "seconds", "questions_per_s",
                                 "vs_sequential"], rows)


if __name__ == "__main__":
    main()
