"""`finemed answer`: per question, retrieve k neighbours → TTT → generate → extract → append → restore."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemed_cli.config.answer import AnswerConfig
from finemed_cli.data.jsonl import JsonlAppender
from finemed_cli.data.output import OutputLock, check_output
from finemed_cli.data.records import QuestionRecord, load_questions
from finemed_cli.generate.extract import extract_choice, extract_open_answer, letter_text_disagreement
from finemed_cli.modeling.prompts import SYSTEM_PROMPT, question_messages, resolve_system_prompt
from finemed_cli.pipeline.ggml_ttt import ggml_config, ggml_engine, tokenizer_only
from finemed_cli.pipeline.resume import answer_settings, check_resume

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
    questions = load_questions(config.questions)
    with OutputLock(config.output), JsonlAppender(config.output) as writer:  # the file is made at its first record
        todo, total, skipped = select_questions(questions, config.shard, writer.done_ids, config.limit)
        summary = AnswerSummary(total=total, skipped=skipped, answered=0)
        if skipped:
            logger.info("%s: %d of %d questions already answered; resuming", config.output, skipped, total)
        if todo:
            _answer_all(config, todo, writer, summary, progress, on_record, embedder, loaded)
        return summary


def _answer_all(config: AnswerConfig, todo: list[QuestionRecord], writer: JsonlAppender,
                summary: AnswerSummary, progress: bool, on_record: Any, embedder: Any, loaded: Any) -> None:
    import torch

    from finemed_cli.checkpoints.embedded import caution_line, embedded_caution
    from finemed_cli.checkpoints.loading import load_model, pick_device
    from finemed_cli.generate.select import make_generator

    torch.manual_seed(config.seed)
    config = with_ttt_settings(config, loaded.source if loaded is not None else None)
    settings = answer_settings(config)
    check_resume(config.output, settings)  # before anything loads: a mismatch costs no time
    ggml = config.ttt.engine == "ggml" and config.ttt.mode != "off"
    if ggml:
        config = ggml_config(config)
    elif loaded is None:
        planned(config, None)  # the least this run can need: a plan that cannot fit is refused before any load
    neighbours_of = _retrieve(config, todo, embedder)
    if loaded is None and ggml:  # ggml trains on the GGUF: no torch model, only its tokenizer
        loaded = tokenizer_only(config.model)
    elif loaded is None:
        config = planned(config, neighbours_of)
        logger.info("answer: loading the model %s", config.model or "(embedded default)")
        loaded = load_model(config.model, device=config.device, dtype=config.dtype, quantize=config.quantize)
    caution = embedded_caution(Path(loaded.source))
    if caution:
        logger.warning("%s", caution_line(caution))
    gen = config.generation
    system = resolve_system_prompt(config.system_prompt, loaded.source)
    generator = make_generator(gen, loaded, config.model, pick_device(config.device), config.ttt.mode)
    try:
        with ggml_engine(config, generator) as engine:
            _answer_loop(config, todo, neighbours_of, loaded, generator, writer, summary, progress, on_record,
                         system, settings, engine)
    finally:
        if hasattr(generator, "close"):
            generator.close()


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


def planned(config: AnswerConfig, neighbours_of: list[list[Any]] | None) -> AnswerConfig:
    """`config` with `quantize`, the GGUF type and the generator the memory plan chose (`pipeline.plan`): the
    TTT workload is the longest question's neighbours as TTT will read them, counted by the tokenizer
    (`neighbours_of` None: no TTT tokens, the least the run can need; checked quietly)."""
    import dataclasses

    from finemed_cli.checkpoints.loading import load_tokenizer
    from finemed_cli.modeling.examples import lora_examples
    from finemed_cli.pipeline.plan import RunLoad, plan_run

    gen, ttt = config.generation, config.ttt
    tokens = 0 if neighbours_of is None else None
    if ttt.mode == "lora" and neighbours_of and any(neighbours_of):
        tokenizer = load_tokenizer(config.model)
        length: dict[str, int] = {}  # each distinct neighbour tokenized once
        for n in (n for nbrs in neighbours_of for n in nbrs if n.record.id not in length):
            length[n.record.id] = sum(e.input_ids.shape[1] for e in lora_examples(
                tokenizer, [n.record], ttt.max_length, loss_on=ttt.loss_on))
        per_question = sorted(sum(length[n.record.id] for n in nbrs) for nbrs in neighbours_of)
        tokens = sum(per_question[-config.batch_size:])  # a batch trains its questions' tokens in one pass
    gguf_file = gen.gguf or (Path(config.model) if (config.model or "").endswith(".gguf") else None)
    need = plan_run(RunLoad(config.model, config.device, config.dtype, config.quantize, gen.backend,
                            gen.gguf_type, gguf_file, gen.max_new_tokens + 1024), ttt, tokens,
                    quiet=neighbours_of is None)
    plan = need.plan
    backend = "transformers" if plan.gguf_type is None and gen.backend == "auto" else gen.backend
    gguf_type = plan.gguf_type if plan.gguf_type not in (None, "given") else gen.gguf_type
    if gguf_type == "auto":
        gguf_type = "q4_k_m" if plan.quantize == "nf4" else "f16"
    return dataclasses.replace(config, quantize=plan.quantize,
                               generation=dataclasses.replace(gen, backend=backend, gguf_type=gguf_type))


def with_ttt_settings(config: Any, model_dir: str | None) -> Any:
    """`config` with its TTT settings file applied (`--ttt-settings`, or found beside the model or index);
    `ttt_settings` then names the file used, or "none"."""
    import dataclasses

    from finemed_cli.config.ttt_settings import apply_ttt_settings, find_ttt_settings, load_ttt_settings

    if model_dir is None and config.ttt_settings == "auto":
        from finemed_cli.checkpoints.loading import resolve_model_source

        model_dir = resolve_model_source(config.model)[1]
    path = find_ttt_settings(config.ttt_settings, model_dir, config.index)
    if path is None:
        return dataclasses.replace(config, ttt_settings="none")
    ttt = apply_ttt_settings(config.ttt, load_ttt_settings(path), config.ttt_explicit)
    logger.info("TTT settings from %s: %s", path, ttt)
    return dataclasses.replace(config, ttt=ttt, ttt_settings=str(path))


def _answer_loop(config: AnswerConfig, todo: list[QuestionRecord], neighbours_of: list[list[Any]], loaded: Any,
                 generator: Any, writer: JsonlAppender, summary: AnswerSummary, progress: bool,
                 on_record: Any, system: str | None, settings: dict[str, Any], ggml: Any = None) -> None:
    from finemed_cli.console import bar as progress_bar
    from finemed_cli.pipeline.items import adapted_chunks

    gen = config.generation
    bar = progress_bar(total=len(todo), desc=f"answer ({generator.backend})", unit="q", progress=progress)
    adapting = "TTT" if config.ttt.mode != "off" else "generating"
    try:
        keep = []
        for i, q in enumerate(todo):
            shown = [n.record for n in neighbours_of[i]] if config.icl else []
            problem = prompt_problem(q, loaded.tokenizer, generator, gen.max_new_tokens, system, shown)
            if problem:
                _reject(config, q, problem, loaded, writer, summary, bar, on_record, system, settings)
            else:
                keep.append(i)
        # the relevance gate: a question whose best neighbour is too far is answered without TTT
        records = [[] if config.ttt.gated([n.score for n in neighbours_of[i]]) else [n.record for n in neighbours_of[i]]
                   for i in keep]
        # closing: an error mid-chunk still ends its TTT session (the model restored) before it propagates
        with contextlib.closing(adapted_chunks(loaded.model, loaded.tokenizer, records, config.ttt,
                                               seed=config.seed, ttt_batch=config.batch_size,
                                               system=system, ggml=ggml)) as chunks:
            _phase(bar, adapting, summary)  # the chunk's TTT runs as the loop asks for it
            for chunk in chunks:
                for j, pos in enumerate(chunk.positions):
                    q, nbrs = todo[keep[pos]], neighbours_of[keep[pos]]
                    _phase(bar, "generating", summary)
                    shown = [n.record for n in nbrs] if config.icl else []
                    result = generator.generate(question_messages(q, system, shown),
                                                max_new_tokens=gen.max_new_tokens,
                                                temperature=gen.temperature, top_p=gen.top_p, seed=config.seed,
                                                adapter=chunk.activate(j), thought_tokens=gen.thought_tokens)
                    _finish(config, q, nbrs, chunk.results[j], result, loaded, writer, summary, bar, on_record,
                            system, settings, batch=len(chunk.positions) if chunk.batch is not None else 1)
                _phase(bar, adapting if summary.answered < len(todo) else "done", summary)
    finally:
        bar.close()


def _phase(bar: Any, phase: str, summary: AnswerSummary) -> None:
    """Show what the run is doing now (TTT or generating) beside the running accuracy."""
    shown = {"phase": phase}
    if summary.scored:
        shown["acc"] = f"{summary.correct}/{summary.scored}"
    bar.set_postfix(shown)


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


def _reject(config: AnswerConfig, q: QuestionRecord, problem: str, loaded: Any, writer: JsonlAppender,
            summary: AnswerSummary, bar: Any, on_record: Any, system: str | None, settings: dict[str, Any]) -> None:
    """The record of a question that was not answered: no response, no prediction, and the reason."""
    logger.warning("%s: not answered: %s", q.id, problem)
    rec = answer_record(q, "", [], {"mode": "skipped"}, {"tokens": 0, "seconds": 0.0, "backend": None},
                        loaded.name, config.seed, system)
    rec["error"] = problem
    rec["settings"] = settings
    writer.append(rec)
    summary.answered += 1
    summary.rejected += 1
    if "correct" in rec:
        summary.scored += 1
    bar.update(1)
    if on_record is not None:
        on_record(rec)


def _finish(config: AnswerConfig, q: QuestionRecord, neighbours: list[Any], ttt: Any, result: Any, loaded: Any,
            writer: JsonlAppender, summary: AnswerSummary, bar: Any, on_record: Any, system: str | None,
            settings: dict[str, Any], batch: int = 1) -> None:
    """Write one answer record and account for it."""
    ttt_json = ttt.to_json()
    if config.ttt_settings not in (None, "auto", "none"):
        ttt_json["settings"] = config.ttt_settings  # the tuned settings file it ran with
    if config.ttt.mode != "off" and config.ttt.gated([n.score for n in neighbours]):
        ttt_json["gated"] = config.ttt.min_sim  # skipped: the best neighbour's similarity is below it
    if batch > 1:
        ttt_json["batch"] = batch  # `seconds` is this question's share of the batch's TTT
    rec = answer_record(q, result.text, [{"id": n.record.id, "score": round(n.score, 6)} for n in neighbours],
                        ttt_json, result.to_json(), loaded.name, config.seed, system)
    if config.icl:
        rec["icl"] = [n.record.id for n in neighbours]  # shown in the prompt as worked examples
    if config.quantize == "nf4":  # the memory plan's low-memory choice (full precision is recorded by omission)
        rec["quantized"] = {"base": "nf4", "gguf": config.generation.gguf_type
                            if result.to_json().get("backend") == "llama.cpp" else None}
    rec["settings"] = settings  # what a resumed run must match (pipeline/resume.py)
    writer.append(rec)
    summary.answered += 1
    if ttt.mode != "off":
        summary.ttt_seconds.append(ttt.seconds)
    summary.generation_seconds.append(result.seconds)
    if "correct" in rec:
        summary.scored += 1
        summary.correct += int(rec["correct"])
    bar.update(1)
    if on_record is not None:
        on_record(rec)
