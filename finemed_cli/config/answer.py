"""Configuration of `finemed answer`: TTT, generation and the run itself."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finemed_cli.errors import ConfigError
from finemed_cli.gguf.constants import OUTTYPES

TTT_MODES = ("lora", "paper", "off")
LOSS_ON = ("response", "reasoning")
PICKS = ("top", "random-of-3")
GENERATORS = ("auto", "llama.cpp", "transformers")
QUANTIZE_MODES = ("auto", "none", "nf4")
# what the one-time export for llama.cpp may write: every outtype (the one list, gguf/constants.py); auto: the
# memory plan's choice, f16 where it fits, else q4_k_m
GGUF_TYPES = ("auto", *OUTTYPES)
QUANTIZE_HELP = ("weights of the model TTT trains on: none (full precision, --dtype), nf4 (a 4-bit frozen base, "
                 "bitsandbytes; the LoRA adapter stays fp32), auto (full precision where the memory plan fits, "
                 "else nf4 with a q4_k_m generator, else nf4 generating itself; set FINEMED_MEMORY=12GB to plan "
                 "for less than the device has)")
TTT_SETTINGS_HELP = ("TTT settings file from `finemed ttt-calibrate`; auto: ttt-settings.json in the model's "
                     "directory, else beside the index; none: no file. Options given on the command line win")
SYSTEM_PROMPT_HELP = ("system prompt: TEXT, @FILE (its text), none (an empty system turn), or model (no system "
                      "turn: the chat template's own default) [default: the prompt the model was trained with "
                      "by finemed, else finemed's o1-style '## Thought' prompt]. The text is written into "
                      "every answer record (as the file's readers may read it): keep secrets out of it")
TTT_ENGINES = ("torch", "ggml")
DEFAULT_CONTEXT = 4096  # tokens llama.cpp opens a GGUF with, unless the model was trained on fewer
GPU_LAYERS_HELP = ("layers llama.cpp offloads to the GPU; -1: all, 0: none [default: all where llama.cpp was built "
                   "with GPU support, else none]")
# Llama / Qwen2 / Mistral projection names; the paper's TTT touches every weight, LoRA the linear ones.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TTTConfig:
    """Test-time training on the retrieved neighbours of each question."""

    mode: str = field(default="lora", metadata={"help": "lora (finemed), paper (reference baseline) or off"})
    k: int = field(default=1, metadata={"help": "neighbours retrieved (and trained on) per question"})
    steps: int | None = field(default=None, metadata={"help": "TTT optimizer steps [default: 1]"})
    lr: float | None = field(default=None, metadata={"help": "TTT learning rate [default: lora 3e-3, paper 1e-6]"})
    rank: int = field(default=8, metadata={"help": "LoRA rank of the TTT adapter"})
    layers: int | None = field(default=None, metadata={
        "help": "top decoder layers given LoRA (0: all) [default: a quarter of them, at least 1]; the frozen "
                "layers below run once per neighbour"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha of the TTT adapter (scaling = alpha / rank)"})
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={
        "help": "comma-separated projections that get LoRA"})
    max_length: int = field(default=2048, metadata={"help": "tokens kept per neighbour in lora mode"})
    pad_to: int = field(default=6144, metadata={
        "help": "paper mode pads each neighbour to this many tokens, as the reference code; 0: no padding"})
    pick: str = field(default="top", metadata={
        "help": "which retrieved neighbours TTT trains on: top (the k nearest) or random-of-3 (k at random from "
                "the best 3, seeded: the reference code's rebuttal version)"})
    loss_on: str = field(default="response", metadata={
        "help": "what TTT learns of each neighbour: response (its Thought and Summarization) or reasoning (the "
                "Thought only)"})
    loss_chunk: int = field(default=256, metadata={
        "help": "labelled tokens per LM-head chunk (lora; bounds the vocabulary-wide logits held at once)"})
    engine: str = field(default="torch", metadata={
        "help": "what trains the TTT adapter: torch (on the model's weights in memory) or ggml (prototype: on the "
                "GGUF llama.cpp generates from, no torch model loaded; lora mode, llama.cpp generator, Llama "
                "architecture; measured slower, see the README)"})
    min_sim: float | None = field(default=None, metadata={
        "help": "relevance gate: no TTT for a question whose best neighbour's retrieval similarity is below this "
                "(the paper warns that irrelevant neighbours degrade the answer; `ttt-calibrate` measures a "
                "value) [default: no gate]"})

    def gated(self, scores: Sequence[float]) -> bool:
        """Whether the relevance gate skips TTT for a question whose neighbours scored `scores`."""
        return self.min_sim is not None and (not scores or max(scores) < self.min_sim)

    def resolved_steps(self) -> int:
        return self.steps if self.steps is not None else 1

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-6 if self.mode == "paper" else 3e-3)

    def resolved_layers(self, total: int) -> int:
        """How many top layers get LoRA, out of `total`."""
        if self.layers == 0:
            return total
        return min(total, self.layers) if self.layers else max(1, total // 4)

    def validate(self) -> list[str]:
        errors = []
        if self.mode not in TTT_MODES:
            errors.append(f"ttt mode {self.mode!r} is not one of {', '.join(TTT_MODES)}")
        if self.k < 1:
            errors.append(f"k (neighbours) must be at least 1, got {self.k}")
        if self.resolved_steps() < 1:
            errors.append(f"ttt steps must be at least 1, got {self.steps}")
        if not math.isfinite(self.resolved_lr()) or self.resolved_lr() <= 0:  # NaN passes `<= 0` alone
            errors.append(f"ttt lr must be a positive number, got {self.lr}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            errors.append(f"ttt alpha must be a positive number, got {self.alpha}")
        if not 1 <= self.rank <= 1024:
            errors.append(f"LoRA rank must be from 1 to 1024, got {self.rank}")
        if self.layers is not None and self.layers < 0:
            errors.append(f"ttt layers must be 0 (all) or a count, got {self.layers}")
        if self.pick not in PICKS:
            errors.append(f"neighbour pick {self.pick!r} is not one of {', '.join(PICKS)}")
        if self.loss_on not in LOSS_ON:
            errors.append(f"ttt loss_on {self.loss_on!r} is not one of {', '.join(LOSS_ON)}")
        if self.max_length < 16:
            errors.append(f"ttt max length must be at least 16 tokens, got {self.max_length}")
        if self.engine not in TTT_ENGINES:
            errors.append(f"ttt engine {self.engine!r} is not one of {', '.join(TTT_ENGINES)}")
        elif self.engine == "ggml" and self.mode == "paper":
            errors.append("the ggml engine trains a LoRA adapter; --ttt-mode paper updates every weight: use torch")
        if self.min_sim is not None and not -1 <= self.min_sim <= 1:  # NaN fails both bounds
            errors.append(f"ttt min_sim must be a similarity from -1 to 1, got {self.min_sim}")
        if self.pad_to < 0:
            errors.append(f"ttt pad-to must be 0 (off) or a token count, got {self.pad_to}")
        if not self.targets:
            errors.append("LoRA targets are empty; name at least one projection, e.g. q_proj")
        return errors


@dataclass
class GenerationConfig:
    """Decoding settings."""

    max_new_tokens: int = field(default=512, metadata={"help": "response token budget"})
    temperature: float = field(default=0.0, metadata={"help": "0 for greedy decoding"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling when temperature > 0"})
    backend: str = field(default="auto", metadata={
        "help": "generation backend; auto measures both once per machine and model and takes the faster"})
    gguf: Path | None = field(default=None, metadata={
        "help": "the model's GGUF for llama.cpp [default: exported once from the model into $FINEMED_HOME]"})
    gguf_type: str = field(default="auto", metadata={
        "help": "outtype of that one-time export; auto: f16, or q4_k_m where the memory plan needs it"})
    n_gpu_layers: int | None = field(default=None, metadata={"help": GPU_LAYERS_HELP})
    n_ctx: int | None = field(default=None, metadata={
        "help": "context length in tokens llama.cpp opens the GGUF with, at most the model's trained context "
                f"[default: {DEFAULT_CONTEXT}]"})
    thought_tokens: int | None = field(default=None, metadata={
        "help": "token budget of the Thought section; past it '## Summarization' is written for the model"})

    def validate(self) -> list[str]:
        errors = []
        if self.max_new_tokens < 1:
            errors.append(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top-p must be in (0, 1], got {self.top_p}")
        if self.backend not in GENERATORS:
            errors.append(f"generator {self.backend!r} is not one of {', '.join(GENERATORS)}")
        if self.gguf_type not in GGUF_TYPES:
            errors.append(f"gguf type {self.gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
        if self.n_ctx is not None and self.n_ctx < 16:
            errors.append(f"context must be at least 16 tokens, got {self.n_ctx}")
        if self.n_gpu_layers is not None and self.n_gpu_layers < -1:
            errors.append(f"n-gpu-layers must be -1 (all), 0 (none) or a count, got {self.n_gpu_layers}")
        if self.thought_tokens is not None and not 1 <= self.thought_tokens <= self.max_new_tokens:
            errors.append(f"thought tokens must be from 1 to max new tokens ({self.max_new_tokens}), "
                          f"got {self.thought_tokens}")
        return errors


@dataclass
class AnswerConfig:
    """One `finemed answer` run."""

    questions: Path
    output: Path
    index: Path | None = None
    model: str | None = None
    embedder: str | None = None
    ttt: TTTConfig = field(default_factory=TTTConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    system_prompt: str | None = field(default=None, metadata={"help": SYSTEM_PROMPT_HELP})
    ttt_settings: str | None = field(default="auto", metadata={"help": TTT_SETTINGS_HELP})
    ttt_explicit: tuple[str, ...] = ()  # TTT fields given on the command line (a settings file leaves them)
    seed: int = field(default=0, metadata={"help": "seeds TTT and sampling"})
    shard: tuple[int, int] = (0, 1)
    limit: int | None = field(default=None, metadata={"help": "answer at most this many questions (of this shard)"})
    device: str = field(default="auto", metadata={"help": "where the model runs: auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "precision of the weights: auto (bf16 on GPUs from compute capability 8.0, fp16 below, fp32 on "
                "CPU), float32, bfloat16, float16"})
    quantize: str = field(default="auto", metadata={"help": QUANTIZE_HELP})
    batch_size: int = field(default=1, metadata={
        "help": "questions whose LoRA TTT adapters train together in one forward/backward (multi-adapter "
                "LoRA); each keeps its own adapter, optimizer state and loss"})
    icl: bool = field(default=False, metadata={
        "help": "show the k retrieved neighbours in the prompt as worked examples (earlier turns: question, o1 "
                "response), with TTT or without it (--no-ttt): the in-context baseline; needs --index"})

    def validate(self) -> None:
        """Raise ConfigError listing every problem at once."""
        errors = self.ttt.validate() + self.generation.validate()
        i, n = self.shard
        if n < 1 or not 0 <= i < n:
            errors.append(f"shard {i}/{n} is invalid; use i/n with 0 <= i < n, e.g. --shard 0/4")
        if not 0 <= self.seed < 2**63:
            errors.append(f"seed must be from 0 to 2**63 - 1, got {self.seed}")
        if self.quantize not in QUANTIZE_MODES:
            errors.append(f"quantize {self.quantize!r} is not one of {', '.join(QUANTIZE_MODES)}")
        elif self.quantize == "nf4" and self.ttt.mode == "paper":
            errors.append("--ttt-mode paper updates every weight, which a 4-bit base cannot hold: use "
                          "--ttt-mode lora with --quantize nf4, or --quantize none")
        if self.batch_size < 1:
            errors.append(f"batch size must be at least 1, got {self.batch_size}")
        if self.batch_size > 1 and self.ttt.mode == "paper":
            errors.append("--batch-size trains several LoRA adapters at once; the paper mode updates every "
                          "weight and runs one question at a time: drop --batch-size or use --ttt-mode lora")
        if self.limit is not None and self.limit < 1:
            errors.append(f"limit must be at least 1, got {self.limit}")
        if self.icl and self.index is None:
            errors.append("--icl shows retrieved examples in the prompt: pass --index DIR (build one with "
                          "`finemed index build CORPUS.jsonl -o DIR`)")
        elif self.ttt.mode != "off" and self.index is None:
            errors.append("TTT needs retrieved examples: pass --index DIR (build one with "
                          "`finemed index build CORPUS.jsonl -o DIR`), or --no-ttt")
        if errors:
            raise ConfigError("; ".join(errors))
