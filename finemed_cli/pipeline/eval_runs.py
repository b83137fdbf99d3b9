"""Running `finemed eval`'s variants on the same items: each variant's per-item results appended to its own
file (resumed on a rerun, refused under other settings), TTT through the one item loop."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemed_cli.config.answer import GenerationConfig, TTTConfig
from finemed_cli.data.jsonl import JsonlAppender
from finemed_cli.data.output import OutputLock, ensure_parent
from finemed_cli.data.records import CorpusRecord, QuestionRecord
from finemed_cli.eval.benchmarks import BenchmarkItem
from finemed_cli.eval.results import claim_results, file_name, variant_settings
from finemed_cli.eval.variants import Variant
from finemed_cli.parallel import Ranks, done_ids, merge_parts, part_path, wait_for_all
from finemed_cli.pipeline.runner import AdaptedChunk, ItemContext, ItemRunner

logger = logging.getLogger(__name__)

# Questions scored per forward pass without TTT. Packing 8 MedQA questions (about 2,000 tokens) with the shared
# system prompt run once took the embedded model from 2.84 to 4.11 questions/s in bf16 and from 1.57 to 2.24 in
# fp32, against one question per pass (80 questions, 2 cores; bench/eval.py).
LOGLIK_BATCH = 8


class Models:
    """Loads each model once, whatever the number of variants using it (one in memory at a time), and
    knows the system prompt each is run with (`--system-prompt`, resolved against the model's directory)."""

    def __init__(self, device: str, dtype: str, system_prompt: str | None = None,
                 loaded: dict[str | None, Any] | None = None, quantize: str = "none") -> None:
        """`loaded`: models already in memory by --model name (tests, benchmarks); `quantize`: none or nf4."""
        self.device, self.dtype, self.system_prompt, self.quantize = device, dtype, system_prompt, quantize
        self._given = dict(loaded or {})
        self._cache: dict[str | None, Any] = {}
        self.prompts: dict[str, str | None] = {}  # model name -> the system prompt it was run with

    def system(self, loaded: Any) -> str | None:
        from finemed_cli.modeling.prompts import resolve_system_prompt

        if loaded.name not in self.prompts:
            self.prompts[loaded.name] = resolve_system_prompt(self.system_prompt, loaded.source)
        return self.prompts[loaded.name]

    def settings(self, name: str | None) -> dict[str, Any]:
        """The system prompt as results settings record it: only when it is not finemed's default, so results
        made before the option existed still resume."""
        from finemed_cli.modeling.prompts import SYSTEM_PROMPT

        prompt = self.system(self.get(name))
        out: dict[str, Any] = {} if prompt == SYSTEM_PROMPT else {"system_prompt": prompt}
        if self.quantize != "none":  # a 4-bit base's results never resume a full-precision file, nor the reverse
            out["quantize"] = self.quantize
        return out

    def get(self, name: str | None) -> Any:
        if name in self._given:
            return self._given[name]
        if name not in self._cache:
            from finemed_cli.checkpoints.loading import load_model

            self._cache.clear()
            self._cache[name] = load_model(name, device=self.device, dtype=self.dtype, quantize=self.quantize)
        return self._cache[name]


@dataclass
class EvalRun:
    """What every variant of one `finemed eval` run shares: where results go, the models, the base TTT
    settings and seed, the index with its embedder (None without retrieval), and LoRA TTT's batch size."""

    out: Path
    models: Models
    ttt: TTTConfig
    seed: int = 0
    progress: bool = True
    index: Any = None  # a retrieval.index.CorpusIndex
    embedder: Any = None
    ttt_batch: int = 1
    ranks: Ranks | None = None  # under torchrun: this process's place (each rank scores its share of the items)


# compute(loaded, item indices, adapted, batched adapter or None, the items' worked examples (each [] unless the
# variant is in-context)) -> one record (or None) per item
Compute = Callable[[Any, list[int], bool, Any, list[list[CorpusRecord]]], list[dict[str, Any] | None]]


@dataclass
class ItemKind:
    """One kind of per-item result: its folder name, the work per chunk of items, whether an item's own record
    is kept out of its neighbours (held-out records of the index's corpus), items per pass without TTT, and
    settings its result files must match to resume."""

    name: str
    compute: Compute
    exclude_self: bool = False
    batch: int = 1
    settings: dict[str, Any] = field(default_factory=dict)


def run_generate(run: EvalRun, variants: list[Variant], questions: Path,
                 generation: GenerationConfig) -> dict[str, Path]:
    """Each variant answers the question file with `run_answer` into `out/answers/<variant>.jsonl`."""
    from finemed_cli.config.answer import AnswerConfig
    from finemed_cli.pipeline.answer import run_answer

    models, index = run.models, getattr(run.index, "path", None)
    files = {}
    for v in variants:
        path = run.out / "answers" / f"{file_name(v.name)}.jsonl"
        claim_results(path, variant_settings(v, models.dtype, run.ttt, run.seed, index,
                                             max_new_tokens=generation.max_new_tokens, generator=generation.backend,
                                             temperature=generation.temperature, top_p=generation.top_p,
                                             thought_tokens=generation.thought_tokens,
                                             **models.settings(v.model)))
        config = AnswerConfig(questions=questions, output=path, index=index if v.retrieves else None,
                              model=v.model, ttt=v.ttt_config(run.ttt), generation=generation, seed=run.seed,
                              icl=v.icl, device=models.device, dtype=models.dtype, quantize=models.quantize,
                              batch_size=run.ttt_batch if v.ttt == "lora" else 1,
                              system_prompt=models.system_prompt, ttt_settings="none")  # applied by eval
        logger.info("variant %s: answering into %s", v.name, path)
        run_answer(config, progress=run.progress, loaded=models.get(v.model),
                   embedder=run.embedder if v.retrieves else None)
        files[v.name] = path
    return files


def run_items(run: EvalRun, kind: ItemKind, variants: list[Variant],
              items: list[QuestionRecord] | list[CorpusRecord]) -> dict[str, Path]:
    """For each variant, `kind.compute` on the items (questions or held-out records: retrieved for by their
    question, written by their id) not yet in `out/<kind>/<variant>.jsonl`, through the item runner (TTT on
    each item's neighbours, or on its own gold in an oracle variant, or `kind.batch` items at once without
    TTT). Records are appended as soon as they exist."""
    ids = [it.id for it in items]
    files = {}
    eta = _Eta(variants, len(ids) if run.ranks is None else len(range(run.ranks.rank, len(ids), run.ranks.world)))
    for v in variants:
        eta.next_variant(v.name, kind.name)
        path = run.out / kind.name / f"{file_name(v.name)}.jsonl"
        files[v.name] = path
        claim_results(path, variant_settings(v, run.models.dtype, run.ttt, run.seed, getattr(run.index, "path", None),
                                             **kind.settings, **run.models.settings(v.model)))
        # under torchrun: this rank's share of the items, into its own part beside the variant's file
        mine = range(len(ids)) if run.ranks is None else range(run.ranks.rank, len(ids), run.ranks.world)
        merged = set() if run.ranks is None else set(done_ids(path))
        out = path if run.ranks is None else part_path(path, run.ranks)
        ensure_parent(out)
        # locked like any output: another verb writing into the file mid-run is refused, not interleaved
        with OutputLock(out), JsonlAppender(out) as writer:
            todo = [i for i in mine if ids[i] not in writer.done_ids and ids[i] not in merged]
            if todo:
                _run_variant(run, kind, v, items, todo, writer)
                eta.done(len(todo))
    if run.ranks is not None:
        merge_ranks(run.ranks, list(files.values()), ids)
    return files


class _Eta:
    """The whole run's progress across variants, logged as each variant starts: which of how many, and the time
    the rest will take at the seconds per item measured so far (TTT variants and plain ones timed apart; a
    kind not timed yet counts at the other's rate). Resumed items count as work, so it errs long."""

    def __init__(self, variants: list[Variant], items: int) -> None:
        self.adapts = [v.ttt != "off" for v in variants]
        self.items, self.index, self.t0 = items, -1, 0.0
        self.spent: dict[bool, list[float]] = {True: [0.0, 0], False: [0.0, 0]}  # adapts -> [seconds, items]

    def next_variant(self, name: str, kind: str) -> None:
        import time

        self.index += 1
        self.t0 = time.perf_counter()
        rates = {k: s / n for k, (s, n) in self.spent.items() if n}
        left = ""
        if rates:
            seconds = sum(self.items * rates.get(a, max(rates.values())) for a in self.adapts[self.index:])
            left = f", about {seconds / 60:.0f} min left for this and the {len(self.adapts) - self.index - 1} after it"
        logger.info("%s: variant %d of %d, %s%s", kind, self.index + 1, len(self.adapts), name, left)

    def done(self, items: int) -> None:
        import time

        spent = self.spent[self.adapts[self.index]]
        spent[0] += time.perf_counter() - self.t0
        spent[1] += items


def merge_ranks(ranks: Ranks, paths: list[Path], order: list[str]) -> None:
    """Once every rank has written its parts, rank 0 merges each file's parts into it (with what it held
    already), in item order."""
    wait_for_all(ranks)
    if ranks.main:
        for path in paths:
            parts = [part_path(path, Ranks(r, ranks.world)) for r in range(ranks.world)]
            with OutputLock(path):
                merge_parts([p for p in parts if p.exists()], path, order, base=path)


def _neighbours(run: EvalRun, kind: ItemKind, v: Variant, items: list[Any],
                todo: list[int]) -> tuple[list[list[CorpusRecord]], list[list[float]]]:
    """Each item's neighbours and their retrieval scores: retrieved, or the item's own gold (oracle), or none."""
    from finemed_cli.eval.transfer import oracle_record
    from finemed_cli.retrieval.index import neighbours

    if v.oracle:
        return [[o] if (o := oracle_record(items[i])) else [] for i in todo], [[] for _ in todo]
    if not v.retrieves:
        return [[] for _ in todo], [[] for _ in todo]
    config = v.ttt_config(run.ttt)
    found = neighbours(run.index, run.embedder, [items[i].question for i in todo], config.k,
                       exclude=[items[i].id for i in todo] if kind.exclude_self else None, pick=config.pick,
                       seed=run.seed)
    return [[n.record for n in hits] for hits in found], [[round(n.score, 6) for n in hits] for hits in found]


def _run_variant(run: EvalRun, kind: ItemKind, v: Variant, items: list[Any], todo: list[int],
                 writer: JsonlAppender) -> None:
    """One variant's items through the item runner, each record marked with the variant and its neighbours."""
    loaded = run.models.get(v.model)
    config = v.ttt_config(run.ttt)
    nbrs, relevance = _neighbours(run, kind, v, items, todo)
    ctx = ItemContext(f"{kind.name} {v.name}", loaded, config, writer, seed=run.seed,
                      system=run.models.system(loaded), ttt_batch=run.ttt_batch, plain_batch=kind.batch,
                      progress=run.progress, total=len(items), done=len(items) - len(todo))

    def compute(chunk: AdaptedChunk) -> list[dict[str, Any] | None]:
        shown = [nbrs[p] if v.icl else [] for p in chunk.positions]
        recs = kind.compute(loaded, [todo[p] for p in chunk.positions], v.ttt != "off", chunk.batched_adapter,
                            shown)
        out: list[dict[str, Any] | None] = []
        for p, rec in zip(chunk.positions, recs, strict=True):
            if rec is not None:
                rec = {**rec, "variant": v.name, "neighbours": [n.id for n in nbrs[p]],
                       **({"neighbour_scores": relevance[p]} if v.retrieves else {}),
                       **_transfer_fields(v, config, nbrs[p], relevance[p])}
                rec = {**rec, "icl": rec["neighbours"]} if v.icl else rec
            out.append(rec)
        return out

    with ItemRunner(ctx) as runner:
        runner.run(nbrs, relevance, compute)


def _transfer_fields(v: Variant, config: TTTConfig, nbrs: list[CorpusRecord], scores: list[float]) -> dict[str, Any]:
    """What eval/transfer.py scores beside accuracy: the gate that skipped TTT (its threshold), and the first
    neighbour's own gold letter (a prediction repeating it is the letter leak)."""
    from finemed_cli.eval.transfer import neighbour_letter

    out: dict[str, Any] = {}
    if v.ttt != "off" and config.gated(scores):
        out["gated"] = config.min_sim
    if nbrs and not v.oracle and (letter := neighbour_letter(nbrs[0])) is not None:
        out["neighbour_letter"] = letter
    return out


def run_loglik(run: EvalRun, variants: list[Variant], items: list[BenchmarkItem]) -> dict[str, Path]:
    """Option log-likelihoods per item and variant into `out/loglik/<variant>.jsonl`."""
    from finemed_cli.eval.loglik import loglik_record, option_logliks_batch, shared_prefix

    prefixes: Any = weakref.WeakKeyDictionary()  # model -> its shared prefix, gone with the model

    def compute(loaded: Any, idxs: list[int], adapted: bool, adapter: Any,
                shown: list[list[CorpusRecord]]) -> list[dict[str, Any] | None]:
        qs = [items[i].question for i in idxs]
        system = run.models.system(loaded)
        prefix = None
        if not adapted:  # the shared system-prompt start, run once per model (TTT changes it per question)
            if loaded.model not in prefixes:
                prefixes[loaded.model] = shared_prefix(loaded.model, loaded.tokenizer, system)
            prefix = prefixes[loaded.model]
        scores = option_logliks_batch(loaded.model, loaded.tokenizer, qs, prefix, adapter, system, shown)
        return [loglik_record(q, s, "") for q, s in zip(qs, scores, strict=True)]

    return run_items(run, ItemKind("loglik", compute, batch=LOGLIK_BATCH), variants, [it.question for it in items])


def run_perplexity(run: EvalRun, variants: list[Variant], records: list[CorpusRecord],
                   max_length: int) -> dict[str, Path]:
    """Nats and tokens of each held-out record's reasoning and answer into `out/perplexity/<variant>.jsonl`;
    with TTT on the record's neighbours, never the record itself."""
    from finemed_cli.eval.loglik import response_example, response_nll

    def one(loaded: Any, i: int, shown: list[CorpusRecord]) -> dict[str, Any]:
        example = response_example(loaded.tokenizer, records[i], max_length, run.models.system(loaded), shown)
        if example is None:  # kept as done, so a rerun does not try it again
            return {"id": records[i].id, "skipped": f"no response token within --max-length {max_length}"}
        nats, tokens = response_nll(loaded.model, example)
        return {"id": records[i].id, "nats": round(nats, 5), "tokens": tokens}

    def compute(loaded: Any, idxs: list[int], _adapted: bool, _adapter: Any,
                shown: list[list[CorpusRecord]]) -> list[dict[str, Any] | None]:
        return [one(loaded, i, s) for i, s in zip(idxs, shown, strict=True)]

    kind = ItemKind("perplexity", compute, exclude_self=True, settings={"max_length": max_length})
    return run_items(run, kind, variants, records)
