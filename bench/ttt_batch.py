"""Questions per second of batched LoRA TTT (B questions' adapters in one forward/backward) against the same
questions trained one at a time, on the embedded model (or --model), with each question's retrieved
neighbours. TTT only: generation is the same either way.

    python bench/ttt_batch.py                  # B = 1, 4, 8, 16 over 16 questions on this machine
    python bench/ttt_batch.py --device cuda    # on a GPU

The arms take turns for --repeats rounds (3) and the median of each is reported.

Appends bench/results/ttt_batch.csv with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import functools
import statistics
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
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each arm's median is reported")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="model weights: auto (fp32 on CPU), bfloat16, float32")
    ap.add_argument("--sort", action="store_true",
                    help="batch questions of similar neighbour length together (less padding)")
    args = ap.parse_args()
    if args.repeats < 1 or args.n < 1:
        ap.error("--repeats and -n must be at least 1")

    import torch

    from finemed_cli.checkpoints.loading import load_model
    from finemed_cli.config.answer import TTTConfig
    from finemed_cli.data.records import load_questions
    from finemed_cli.retrieval.embed import load_embedder
    from finemed_cli.retrieval.index import CorpusIndex, build_index
    from finemed_cli.ttt.update import ttt_batch_session, ttt_session

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
    batch_sizes = sorted({b for b in map(int, args.batch_sizes.split(",")) if b > 1})
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)

    with ttt_session(model, tok, neighbours[0], config):  # warm-up, each path at its largest shapes
        pass
    if batch_sizes:
        with ttt_batch_session(model, tok, [neighbours[0]] * batch_sizes[-1], config):
            pass
    work = neighbours[1:]
    if args.sort:
        work.sort(key=lambda nb: sum(len(r.question) + len(r.reasoning) + len(r.answer) for r in nb))

    def sequential() -> None:
        for nb in work:
            with ttt_session(model, tok, nb, config):
                pass

    def batched(b: int) -> None:
        for lo in range(0, len(work), b):
            with ttt_batch_session(model, tok, work[lo : lo + b], config):
                pass

    # The arms take turns, `--repeats` rounds in rotating order, and each arm's median counts: on a shared
    # 2-core machine one arm timed after the other picked up drifts of ±20% (0.96x to 1.26x across runs).
    arms = {1: sequential, **{b: functools.partial(batched, b) for b in batch_sizes}}
    times: dict[int, list[float]] = {b: [] for b in arms}
    order = list(arms)
    for r in range(args.repeats):
        for b in order[r % len(order):] + order[: r % len(order)]:  # each round starts with another arm
            start = time.perf_counter()
            arms[b]()
            sync()
            times[b].append(time.perf_counter() - start)
        print(f"round {r + 1}: " + ", ".join(f"B={b} {times[b][-1]:.2f} s" for b in order), flush=True)
    # the dtype and the rounds go in the model column: the CSV's columns predate them
    name = (f"{loaded.name} ({str(next(model.parameters()).dtype).removeprefix('torch.')}, "
            f"median of {args.repeats})")
    seq_s = statistics.median(times[1])
    seq_qps = len(work) / seq_s
    rows = []
    for b in arms:
        s = statistics.median(times[b])
        qps = len(work) / s
        label = "sequential" if b == 1 else f"batched B={b:<2}"
        print(f"{label}: median {s:.2f} s = {qps:.3f} q/s, {qps / seq_qps:.2f}x sequential "
              f"(rounds: {', '.join(f'{t:.2f}' for t in times[b])})")
        rows.append([name, args.k, len(work), args.sort, b, f"{s:.3f}", f"{qps:.4f}", f"{qps / seq_qps:.3f}"])
    append_results("ttt_batch", ["model", "k", "questions", "sorted", "batch", "seconds", "questions_per_s",
                                 "vs_sequential"], rows)


if __name__ == "__main__":
    main()
