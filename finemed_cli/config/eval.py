"""Configuration of `finemed eval`: what to evaluate, the variants compared, and how (the CLI's options are
derived from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemed_cli.checkpoints.embedded import DEFAULT_MODEL_NAME
from finemed_cli.config.answer import SYSTEM_PROMPT_HELP, TTT_SETTINGS_HELP, GenerationConfig, TTTConfig
from finemed_cli.data.sources import column_problems
from finemed_cli.errors import ConfigError

MODES = ("generate", "loglik", "perplexity")
# the benchmarks eval/benchmarks.py reads, by the name --source takes
SOURCES = ("finemed", "medqa", "medmcqa", "pubmedqa", "mmlu", "mmlu_pro")
EMBEDDED = f"{DEFAULT_MODEL_NAME} (embedded)"  # what an unset --model loads


@dataclass
class EvalConfig:
    """One `finemed eval` run."""

    inputs: list[Path | str]  # files, or Hub datasets `hf:org/name[:config]` (kept as text)
    out: Path
    mode: str = field(default="generate", metadata={
        "help": "what is measured. generate: answer and extract the letter; loglik: score each option's "
                "log-likelihood; perplexity: bits per token of held-out corpus records' reasoning and answer"})
    compare: str | None = field(default=None, metadata={
        "help": "variants on the same items: ttt, no-ttt, paper, and icl, ttt+icl, paper+icl (the "
                "retrieved neighbours in the prompt as worked examples), each optionally with TTT settings, "
                "ttt(steps=4,lr=1e-3), and @MODEL (another model) [default: ttt,no-ttt]. When scoring answer "
                "files: a name for each file, in order"})
    index: Path | None = field(default=None, metadata={
        "help": "index directory for TTT neighbours (and the decontamination check)"})
    model: str | None = field(default=None, metadata={
        "help": "HF model dir, .gguf file, hub id or embedded:gemma3-270m [default: the embedded SmolLM2]"})
    source: str | None = field(default=None, metadata={"help": "benchmark format [default: detected from the file]"})
    split: str | None = field(default=None, metadata={
        "help": "the split to evaluate of an hf:org/name[:config] input [default: test, else validation]"})
    columns: dict[str, str] = field(default_factory=dict, metadata={
        "help": "the inputs' fields renamed to finemed's, our=theirs pairs, e.g. question=prompt,options=choices,"
                "answer=label (options given as a list are lettered A, B, …; an integer answer is an option's "
                "0-based index)"})
    limit: int | None = field(default=None, metadata={
        "help": "use the first N items of each input file (with --drop-contaminated: the first N clean ones)"})
    questions: Path | None = field(default=None, metadata={
        "help": "when scoring answer files: the benchmark or question file they answer. Its answer key and "
                "options are used (the letter is extracted again from each response) and its sources and "
                "departments label the report"})
    subjects: str = field(default="medical", metadata={
        "help": "MMLU and MMLU-Pro files: keep their medical subjects (MMLU's anatomy, clinical knowledge, "
                "college biology and medicine, medical genetics, professional medicine; MMLU-Pro's health) "
                "or all"})
    medmcqa_cop_base: int | None = field(default=None, metadata={
        "help": "MedMCQA's 'cop': 0 when 0 = A (Hugging Face copies), 1 when 1 = A (the original release) "
                "[default: inferred from the file]"})
    ttt: TTTConfig = field(default_factory=TTTConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int = field(default=1, metadata={
        "help": "LoRA TTT variants: questions whose adapters train together in one forward/backward (equal to "
                "one at a time up to rounding; faster on a GPU)"})
    max_length: int = field(default=2048, metadata={"help": "perplexity mode: tokens kept per record"})
    against: list[Path] = field(default_factory=list, metadata={
        "help": "training data to check the items against for contamination (repeatable); the index corpus "
                "is always checked"})
    ngram: int = field(default=8, metadata={"help": "decontamination n-gram length (words)"})
    overlap: float = field(default=0.5, metadata={
        "help": "share of an item's n-grams found in the references that flags it"})
    drop_contaminated: bool = field(default=False, metadata={"help": "leave flagged items out of the evaluation"})
    trust_letter: bool = field(default=False, metadata={
        "help": "generate mode: score a response whose letter and option text disagree ('the answer is D. "
                "<option B's text>') by its letter; without it such a response counts as unanswered"})
    system_prompt: str | None = field(default=None, metadata={"help": SYSTEM_PROMPT_HELP})
    ttt_settings: str | None = field(default="auto", metadata={"help": TTT_SETTINGS_HELP})
    ttt_explicit: tuple[str, ...] = ()  # TTT fields given on the command line (a settings file leaves them)
    seed: int = field(default=0, metadata={"help": "seeds TTT, sampling and the bootstrap"})
    device: str = field(default="auto", metadata={"help": "where the model runs: auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "precision of the weights: auto, float32, bfloat16, float16"})
    quantize: str = field(default="none", metadata={
        "help": "weights of the scored model: none (full precision) or nf4 (the 4-bit base `answer` may run on, "
                "to measure what it costs)"})
    progress: bool = True

    def validate(self) -> None:
        """Raise ConfigError listing every problem at once."""
        errors = self.ttt.validate() + self.generation.validate()
        if self.mode not in MODES:
            errors.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.source is not None and self.source not in SOURCES:
            errors.append(f"source {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.subjects not in ("medical", "all"):
            errors.append(f"subjects {self.subjects!r}: use medical or all")
        if self.batch_size < 1:
            errors.append(f"batch size {self.batch_size}: give 1 or more questions per TTT batch")
        if self.limit is not None and self.limit < 1:
            errors.append(f"limit must be at least 1, got {self.limit}")
        if self.ngram < 1 or not 0 < self.overlap <= 1:
            errors.append(f"decontamination needs ngram >= 1 and 0 < overlap <= 1, got {self.ngram}, {self.overlap}")
        errors += [f"columns {problem}" for problem in column_problems(self.columns)]
        if not 0 <= self.seed < 2**63:
            errors.append(f"seed must be from 0 to 2**63 - 1, got {self.seed}")
        if self.quantize not in ("none", "nf4"):
            errors.append(f"quantize {self.quantize!r} is not one of none, nf4")
        if self.max_length < 16:
            errors.append(f"max length must be at least 16 tokens, got {self.max_length}")
        if errors:
            raise ConfigError("; ".join(errors))

    def extra_inputs(self) -> list[Any]:
        """Every input besides the benchmark files: none of them may be written."""
        return [self.index, self.questions, self.model, *self.against]

    def report_config(self, running: bool = True) -> dict[str, Any]:
        """Every setting as the run used it, defaults resolved (report.json's `config`). `running`: variants
        were run here (not answer files scored), so the TTT, generation and decontamination settings apply."""
        out: dict[str, Any] = {
            "mode": self.mode, "inputs": [str(p) for p in self.inputs], "compare": self.compare,
            **({"split": self.split} if self.split else {}), **({"columns": self.columns} if self.columns else {}),
            "source": self.source or "detected per file", "subjects": self.subjects,
            "medmcqa_cop_base": "inferred from the file" if self.medmcqa_cop_base is None else self.medmcqa_cop_base,
            "limit": "all" if self.limit is None else self.limit, "seed": self.seed,
            "title": ", ".join(p.stem if isinstance(p, Path) else str(p).split("/")[-1] for p in self.inputs)}
        if self.mode == "generate":
            out["trust_letter"] = self.trust_letter
        if not running:
            return out
        t = self.ttt
        out.update({
            "index": str(self.index) if self.index else None, "model": self.model or EMBEDDED,
            "system_prompt": self.system_prompt or "the model's own, else finemed's (see system_prompts)",
            "ttt_settings": self.ttt_settings, "batch_size": self.batch_size, "device": self.device,
            "quantize": self.quantize,
            # the `ttt` kind's settings; each variant's own (a paper variant's steps and rate) are under `variants`
            "ttt": {"mode": t.mode, "k": t.k, "pick": t.pick, "steps": t.resolved_steps(), "lr": t.resolved_lr(),
                    "rank": t.rank, "alpha": t.alpha,
                    "layers": "all" if t.layers == 0 else ("a quarter" if t.layers is None else t.layers),
                    "targets": list(t.targets), "loss_on": t.loss_on, "max_length": t.max_length,
                    "pad_to": t.pad_to, "loss_chunk": t.loss_chunk},
            "decontamination": {"against": [str(p) for p in self.against], "index_corpus": self.index is not None,
                                "ngram": self.ngram, "overlap": self.overlap, "drop": self.drop_contaminated},
        })
        if self.mode == "generate":
            g = self.generation
            out["generation"] = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
                                 "backend": g.backend,  # auto: each variant's `generator` says which ran
                                 "thought_tokens": "no budget" if g.thought_tokens is None else g.thought_tokens}
        if self.mode == "perplexity":
            out["max_length"] = self.max_length
        return out
