"""`finemed answer`: per question, retrieve k neighbours → TTT → generate → extract → append → restore."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemed_cli.config.answer import AnswerConfig
from finemed_cli.config.ttt_settings import with_ttt_settings
from finemed_cli.data.jsonl import JsonlAppender
from finemed_cli.data.output import OutputLock, check_output
from finemed_cli.data.records import QuestionRecord, load_questions
from finemed_cli.errors import ConfigError
from finemed_cli.generate.extract import extract_choice, extract_open_answer, letter_text_disagreement
from finemed_cli.modeling.prompts import SYSTEM_PROMPT, question_messages, resolve_system_prompt
from finemed_cli.parallel import (
    Ranks,
    join,
    launched,
    merge_parts,
    part_path,
    share_limit,
    wait_for_all,
)
from finemed_cli.pipeline.ggml_ttt import ggml_config, ggml_engine, tokenizer_only
from finemed_cli.pipeline.plan import planned_answer
from finemed_cli.pipeline.resume import answer_settings, check_resume
from finemed_cli.pipeline.runner import AdaptedChunk, ItemContext, ItemRunner

logger = logging.getLogger(__name__)


@dataclass
class AnswerSummary:
    total: int  # questions in this shard
    skipped: int  # already in the output (resumed)
    answered: int  # answered by this run
    correct: int = 0
    scored: int = 0  # answered items with a gold letter
    rejected: int = 0  # written without an answer (`error`: the prompt does not fit the context)
    ttt_seconds: list[float] = field(default_factory=list)
    generation_seconds: list[float] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None

    @staticmethod
    def _mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    @property
    def mean_ttt_seconds(self) -> float | None:
        return self._mean(self.ttt_seconds)

    @property
    def mean_generation_seconds(self) -> float | None:
        return self._mean(self.generation_seconds)


def select_questions(questions: list[QuestionRecord], shard: tuple[int, int], done: set[str],
                     limit: int | None) -> tuple[list[QuestionRecord], int, int]:
    """This shard's questions (every n-th from i), minus those done, capped at `limit` (counted over the
    shard, so a rerun with the same limit does not answer more). Returns (todo, shard size, skipped)."""
    i, n = shard
    mine = questions[i::n]
    if limit is not None:
        mine = mine[:limit]
    todo = [q for q in mine if q.id not in done]
    return todo, len(mine), len(mine) - len(todo)


def answer_record(q: QuestionRecord, response: str, neighbours: list[dict[str, Any]], ttt: dict[str, Any],
                  generation: dict[str, Any], model_name: str, seed: int, system: str | None) -> dict[str, Any]:
    """The answer record of DESIGN.md's contract, with the system prompt used (None: the template's own)."""
    if q.options:
        prediction: str | None = extract_choice(response, q.options)
    else:
        prediction = extract_open_answer(response) or None
    rec: dict[str, Any] = {"id": q.id, "response": response, "prediction": prediction}
    # "the answer is D. <B's text>": scored wrong here, as `finemed eval` scores it unless --trust-letter
    found = letter_text_disagreement(response, q.options) if q.options else None
    if q.answer is not None:
        rec["answer"] = q.answer
        if q.options:
            rec["correct"] = prediction == q.answer and found is None
    rec.update(neighbours=neighbours, ttt=ttt, generation=generation, model=model_name, seed=seed,
               system_prompt=system)
    if found is not None:
        rec["disagreement"] = {"letter": found.letter, "text": found.text}
    return rec


def run_answer(
    config: AnswerConfig,
    *,
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    embedder: Any = None,
    loaded: Any = None,
) -> AnswerSummary:
    """Answer a question file into an answer file, resumably.

    Args:
        config: the run.
        progress: show a tqdm bar on stderr.
        on_record: called with each record once it is written (the CLI prints with it).
        embedder: an already-loaded embedder (tests, benchmarks); loaded from the index's manifest if None.
        loaded: an already-loaded `LoadedModel` (tests, benchmarks); loaded from `config.model` if None.
    """
    config.validate()
    check_output(config.output, inputs=[config.questions, config.index, config.model, config.generation.gguf])
    ranks = launched() if config.shard == (0, 1) else None
    if ranks is not None:  # under torchrun: this rank's share into its own part, merged at the end
        return _answer_share(config, ranks, progress=progress, on_record=on_record, embedder=embedder, loaded=loaded)
    questions = load_questions(config.questions)
    with OutputLock(config.output), JsonlAppender(config.output) as writer:  # the file is made at its first record
        todo, total, skipped = select_questions(questions, config.shard, writer.done_ids, config.limit)
        summary = AnswerSummary(total=total, skipped=skipped, answered=0)
        if skipped:
            logger.info("%s: %d of %d questions already answered; resuming", config.output, skipped, total)
        if todo:
            _answer_all(config, todo, writer, summary, progress, on_record, embedder, loaded)
        return summary


def _answer_share(config: AnswerConfig, ranks: Ranks, **given: Any) -> AnswerSummary:
    """This rank's share of the questions (every n-th from its rank, of the first `limit`) answered into its
    part (parallel.py); rank 0 writes the output, every part merged in input order, once all ranks
    are done."""
    import dataclasses

    part = part_path(config.output, ranks)
    if config.output.exists() and not part.parent.is_dir():
        raise ConfigError(f"{config.output} was written by one process: continue it with one process, or give "
                          f"torchrun another -o (its ranks write parts into {part.parent} and merge them)")
    join(ranks)  # every rank started before any works
    limit = share_limit(config.limit, ranks)
    summary = AnswerSummary(total=0, skipped=0, answered=0)
    if limit != 0:
        part.parent.mkdir(parents=True, exist_ok=True)
        share = dataclasses.replace(config, output=part, shard=(ranks.rank, ranks.world), limit=limit)
        summary = run_answer(share, **given)
    wait_for_all(ranks)
    if ranks.main:
        with OutputLock(config.output):
            parts = [part_path(config.output, Ranks(r, ranks.world)) for r in range(ranks.world)]
            merge_parts([p for p in parts if p.exists()], config.output,
                        [q.id for q in load_questions(config.questions)])
    return summary


def _answer_all(config: AnswerConfig, todo: list[QuestionRecord], writer: JsonlAppender,
                summary: AnswerSummary, progress: bool, on_record: Any, embedder: Any, loaded: Any) -> None:
    import torch

    from finemed_cli.checkpoints.embedded import caution_line, embedded_caution
    from finemed_cli.checkpoints.loading import load_model, pick_device
    from finemed_cli.generate.select import make_generator

    torch.manual_seed(config.seed)
    config = with_ttt_settings(config, settings_model_dir(config, loaded))
    settings = answer_settings(config)
    check_resume(config.output, settings)  # before anything loads: a mismatch costs no time
    ggml = config.ttt.engine == "ggml" and config.ttt.mode != "off"
    if ggml:
        config = ggml_config(config)
    elif loaded is None:
        planned_answer(config, None)  # the least this run can need: a plan that cannot fit is refused before any load
    neighbours_of = _retrieve(config, todo, embedder)
    if loaded is None and ggml:  # ggml trains on the GGUF: no torch model, only its tokenizer
        loaded = tokenizer_only(config.model)
    elif loaded is None:
        config = planned_answer(config, neighbours_of)
        logger.info("answer: loading the model %s", config.model or "(embedded default)")
        loaded = load_model(config.model, device=config.device, dtype=config.dtype, quantize=config.quantize)
    caution = embedded_caution(Path(loaded.source))
    if caution:
        logger.warning("%s", caution_line(caution))
    system = resolve_system_prompt(config.system_prompt, loaded.source)
    generator = make_generator(config.generation, loaded, config.model, pick_device(config.device), config.ttt.mode)
    try:
        with ggml_engine(config, generator) as engine:
            ctx = ItemContext(f"answer ({generator.backend})", loaded, config.ttt, writer, seed=config.seed,
                              system=system, ttt_batch=config.batch_size, ggml=engine, progress=progress,
                              total=len(todo), unit="q", doing="generating", on_record=on_record)
            run = AnswerRun(config, ctx, generator, settings, summary)
            run.answer(todo, neighbours_of)
    finally:
        if hasattr(generator, "close"):
            generator.close()


def settings_model_dir(config: Any, loaded: Any = None) -> str | None:
    """The model directory a TTT settings file is looked for in when `ttt_settings` is "auto": the loaded
    model's, else the one `config.model` resolves to."""
    if config.ttt_settings != "auto":
        return None
    if loaded is not None:
        return loaded.source
    from finemed_cli.checkpoints.loading import resolve_model_source

    return resolve_model_source(config.model)[1]


def _retrieve(config: AnswerConfig, todo: list[QuestionRecord], embedder: Any) -> list[list[Any]]:
    """Each question's neighbours (none without an index). An embedder loaded here is let go before the model
    loads (bge-large holds 1.3 GB in fp32)."""
    from finemed_cli.retrieval.index import CorpusIndex, neighbours

    if config.index is None:
        return [[] for _ in todo]
    index = CorpusIndex(config.index)
    index.check_embedder(config.embedder)
    if embedder is None:
        logger.info("answer: loading the embedder %s", index.embedder)
        embedder = index.load_embedder()
    logger.info("answer: retrieving %d neighbour(s) for %d questions from %s", config.ttt.k, len(todo),
                config.index)
    return neighbours(index, embedder, [q.question for q in todo], config.ttt.k, pick=config.ttt.pick,
                      seed=config.seed)


@dataclass
class AnswerRun:
    """One answer run's state inside the item runner: the settings, the runner's context, the generator, the
    settings every record carries and the summary the CLI prints."""

    config: AnswerConfig
    ctx: ItemContext
    generator: Any
    settings: dict[str, Any]
    summary: AnswerSummary
    todo: list[QuestionRecord] = field(default_factory=list)  # the questions the runner answers, in order
    neighbours: list[list[Any]] = field(default_factory=list)  # and each one's retrieved neighbours

    def answer(self, todo: list[QuestionRecord], neighbours_of: list[list[Any]]) -> None:
        """Answer `todo` (each with its retrieved neighbours): a question whose prompt cannot fit is recorded
        as not answered before the loop; the rest go through the item runner."""
        config, gen = self.config, self.config.generation
        with ItemRunner(self.ctx) as runner:
            keep = []
            for i, q in enumerate(todo):
                shown = [n.record for n in neighbours_of[i]] if config.icl else []
                problem = prompt_problem(q, self.ctx.loaded.tokenizer, self.generator, gen.max_new_tokens,
                                         self.ctx.system, shown)
                if problem:
                    self.summary.rejected += 1
                    runner.write(self.rejected(q, problem))
                else:
                    keep.append(i)
            self.todo = [todo[i] for i in keep]
            self.neighbours = [neighbours_of[i] for i in keep]
            runner.run([[n.record for n in nbrs] for nbrs in self.neighbours],
                       [[n.score for n in nbrs] for nbrs in self.neighbours], self.generate)
        tally = self.ctx.tally
        self.summary.answered, self.summary.scored, self.summary.correct = tally.written, tally.scored, tally.correct

    def generate(self, chunk: AdaptedChunk) -> Iterator[dict[str, Any]]:
        """The records of the chunk's questions, each generated with its own adapter live."""
        config, gen = self.config, self.config.generation
        batch = len(chunk.positions) if chunk.batch is not None else 1
        for j, pos in enumerate(chunk.positions):
            q, nbrs = self.todo[pos], self.neighbours[pos]
            shown = [n.record for n in nbrs] if config.icl else []
            result = self.generator.generate(question_messages(q, self.ctx.system, shown),
                                             max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                             top_p=gen.top_p, seed=config.seed, adapter=chunk.activate(j),
                                             thought_tokens=gen.thought_tokens)
            yield self.record(q, nbrs, chunk.results[j], result, batch)

    def record(self, q: QuestionRecord, neighbours: list[Any], ttt: Any, result: Any, batch: int) -> dict[str, Any]:
        """One answer record, its TTT and generation times counted in the summary."""
        config = self.config
        ttt_json = ttt.to_json()
        if config.ttt_settings not in (None, "auto", "none"):
            ttt_json["settings"] = config.ttt_settings  # the tuned settings file it ran with
        if config.ttt.mode != "off" and config.ttt.gated([n.score for n in neighbours]):
            ttt_json["gated"] = config.ttt.min_sim  # skipped: the best neighbour's similarity is below it
        if batch > 1:
            ttt_json["batch"] = batch  # `seconds` is this question's share of the batch's TTT
        rec = answer_record(q, result.text, [{"id": n.record.id, "score": round(n.score, 6)} for n in neighbours],
                            ttt_json, result.to_json(), self.ctx.loaded.name, config.seed, self.ctx.system)
        if config.icl:
            rec["icl"] = [n.record.id for n in neighbours]  # shown in the prompt as worked examples
        if config.quantize == "nf4":  # the memory plan's low-memory choice (full precision is recorded by omission)
            rec["quantized"] = {"base": "nf4", "gguf": config.generation.gguf_type
                                if result.to_json().get("backend") == "llama.cpp" else None}
        rec["settings"] = self.settings  # what a resumed run must match (pipeline/resume.py)
        if ttt.mode != "off":
            self.summary.ttt_seconds.append(ttt.seconds)
        self.summary.generation_seconds.append(result.seconds)
        return rec

    def rejected(self, q: QuestionRecord, problem: str) -> dict[str, Any]:
        """The record of a question that was not answered: no response, no prediction, and the reason."""
        logger.warning("%s: not answered: %s", q.id, problem)
        rec = answer_record(q, "", [], {"mode": "skipped"}, {"tokens": 0, "seconds": 0.0, "backend": None},
                            self.ctx.loaded.name, self.config.seed, self.ctx.system)
        rec["error"] = problem
        rec["settings"] = self.settings
        return rec


def prompt_problem(q: QuestionRecord, tokenizer: Any, generator: Any, max_new_tokens: int,
                   system: str | None = SYSTEM_PROMPT, examples: list[Any] | None = None) -> str | None:
    """Why a question cannot be answered as it is, or None. A prompt that leaves no room for the response in
    the generator's context is not truncated: cutting the start of a clinical vignette would answer another
    question, so it is recorded as not answered, with the counts, and the run goes on."""
    from finemed_cli.modeling.prompts import prompt_ids

    limit = getattr(generator, "context_length", None)
    if not limit:
        return None
    n = len(prompt_ids(tokenizer, question_messages(q, system, examples or ())))
    if n + max_new_tokens <= limit:
        return None
    what = "the question and its examples (--icl: use a smaller k)" if examples else "the question"
    fix = (f"shorten {what}" if n >= limit else
           f"lower --max-new-tokens to {limit - n} or less, or shorten {what}")
    return (f"the prompt ({n} tokens) and --max-new-tokens ({max_new_tokens}) exceed the {generator.backend} "
            f"context of {limit} tokens; {fix}")
