"""Configuration of `finemed train`: one YAML file for the whole curriculum (SFT stages, then DPO).

The YAML maps onto the dataclasses below (`config/loader.py`). Loading collects every problem at once, each
named by its key path (`stages.1.lr`) with what was expected, so a user fixes a config in one edit, not one
error per run. `--set stages.0.epochs=2` overrides any key; the value is read as YAML (numbers, lists, null).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemed_cli.config.answer import DEFAULT_TARGETS
from finemed_cli.config.loader import apply_override, build_dataclass, plain_name, read_yaml
from finemed_cli.data.sources import HubDataset, column_problems, parse_hub_dataset
from finemed_cli.errors import ConfigError

MAX_EPOCHS = 10_000  # `epochs: 1.0e+300` once planned 6e302 steps: a pass count is finite and human-sized

BACKENDS = ("auto", "transformers", "unsloth")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METHODS = ("lora", "qlora", "full")
BETWEEN_STAGES = ("auto", "merge", "continue")
KINDS = ("sft", "dpo")
SCHEDULERS = ("constant", "linear", "cosine")
REPORTERS = ("tensorboard", "wandb")


@dataclass
class LoRASettings:
    rank: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scaling = alpha / rank)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input (0 keeps the fused "
                                                                "finemed_kernels path; > 0 runs peft's)"})
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS),
                               metadata={"help": "projections given LoRA"})
    between_stages: str = field(default="auto", metadata={
        "help": "merge (each stage trains a fresh adapter, merged into the weights after it), continue (one "
                "adapter trained through every stage, merged into the base once at the end: what a 4-bit "
                "base needs) or auto (continue for qlora and the unsloth backend, else merge)"})


@dataclass
class ModelSettings:
    name: str | None = field(default=None, metadata={"help": "HF directory or id; null: the embedded model"})
    backend: str = field(default="auto", metadata={"help": "auto (unsloth on CUDA when installed), "
                                                           "transformers or unsloth"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on a GPU or a CPU with native bf16 matmuls, else fp32), fp32, bf16 or fp16; on CPU "
                "the weights stay fp32 and bf16/fp16 is autocast"})
    method: str = field(default="lora", metadata={"help": "lora, qlora (a 4-bit NF4 base: unsloth on CUDA, else bitsandbytes through transformers, CPU too) or full"})
    lora: LoRASettings = field(default_factory=LoRASettings)
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    fsdp: bool = field(default=False, metadata={
        "help": "method full under torchrun / accelerate launch: shard weights, gradients and optimizer state "
                "over the processes (FSDP2, one unit per decoder layer) instead of replicating them"})


@dataclass
class StageSettings:
    kind: str = field(default="sft", metadata={"help": "sft or dpo"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "JSONL files (paths relative to the config) or Hub datasets, hf:org/name or hf:org/name:config"})
    split: str = field(default="train", metadata={"help": "the split of its Hub datasets (train, validation, "
                                                          "train[:1000], …)"})
    columns: dict[str, str] = field(default_factory=dict, metadata={
        "help": "its data's fields renamed to finemed's, {our_field: their_field}, e.g. {prompt: question, "
                "completion: response} (Hub datasets and JSONL files alike)"})
    name: str | None = field(default=None, metadata={"help": "label in logs (default: the kind)"})
    department: str | None = field(default=None, metadata={"help": "keep corpus records of this department"})
    subdepartment: str | None = field(default=None, metadata={"help": "keep corpus records of this "
                                                                      "sub-department"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (ignored with max_steps)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    scheduler: str = field(default="cosine", metadata={"help": "constant, linear or cosine decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of steps warming up linearly"})
    batch_size: int = field(default=4, metadata={"help": "sequences per micro-batch (packed, no padding)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_length: int = field(default=2048, metadata={"help": "tokens per sequence; longer ones keep the "
                                                            "prompt and lose the end of the response"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    eval_fraction: float = field(default=0.0, metadata={"help": "share of records held out; their loss is "
                                                                "reported before and after the stage"})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N records (after filters)"})

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass
class TrainConfig:
    name: str = field(default="run", metadata={"help": "run name: outputs go to output_dir/name"})
    output_dir: str = field(default="runs", metadata={"help": "parent of the run directory"})
    seed: int = field(default=0, metadata={"help": "seeds data order, LoRA init and dropout"})
    model: ModelSettings = field(default_factory=ModelSettings)
    stages: list[StageSettings] = field(default_factory=list)
    system_prompt: str | None = field(default=None, metadata={
        "help": "system prompt of corpus records and DPO pairs: text, @FILE (relative to the config), none or "
                "model; stored in final/finemed.json, so answer, eval, chat and export use it by default "
                "[default: the base model's finemed prompt, else finemed's o1-style prompt]"})
    save_every: int = field(default=50, metadata={"help": "optimizer steps between resumable checkpoints"})
    log_every: int = field(default=1, metadata={"help": "optimizer steps between metric lines"})
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "experiment trackers that also get the metrics: tensorboard (RUN/tensorboard/; pip install "
                "'finemed[tensorboard]'), wandb (pip install 'finemed[wandb]'; WANDB_MODE=offline is respected)"})
    base_dir: str = field(default=".", metadata={"help": "(set on load) the config's folder"})

    @property
    def run_dir(self) -> Path:
        out = Path(self.output_dir).expanduser()
        return ((out if out.is_absolute() else Path(self.base_dir) / out) / self.name).resolve()

    def data_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    def data_source(self, p: str) -> Path | HubDataset:
        """A stage's data entry: a Hub dataset (`hf:…`) or a file path relative to the config."""
        return parse_hub_dataset(p) or self.data_path(p)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("base_dir")
        return out


def _check(cfg: TrainConfig, check_files: bool = True) -> list[str]:
    errors = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            errors.append(f"{key}: {message}")

    m = cfg.model
    need(m.backend in BACKENDS, "model.backend", f"{m.backend!r} is not one of {', '.join(BACKENDS)}")
    need(m.precision in PRECISIONS, "model.precision", f"{m.precision!r} is not one of {', '.join(PRECISIONS)}")
    need(m.method in METHODS, "model.method", f"{m.method!r} is not one of {', '.join(METHODS)}")
    need(1 <= m.lora.rank <= 1024, "model.lora.rank", f"must be from 1 to 1024, got {m.lora.rank}")
    need(m.lora.alpha > 0, "model.lora.alpha", f"must be positive, got {m.lora.alpha}")
    need(0 <= m.lora.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {m.lora.dropout}")
    need(bool(m.lora.targets), "model.lora.targets", "name at least one projection, e.g. [q_proj, v_proj]")
    need(m.lora.between_stages in BETWEEN_STAGES, "model.lora.between_stages",
         f"{m.lora.between_stages!r} is not one of {', '.join(BETWEEN_STAGES)}")
    need(not (m.method == "qlora" and m.lora.between_stages == "merge"), "model.lora.between_stages",
         "merge cannot fold an adapter into a 4-bit base exactly; use continue (or auto) with qlora")
    need(not m.fsdp or m.method == "full", "model.fsdp",
         f"shards full fine-tuning only, but model.method is {m.method!r}: a LoRA's trainable state is small "
         "enough to replicate; set model.method full or model.fsdp false")
    need(not (m.fsdp and m.backend == "unsloth"), "model.fsdp",
         "runs on the transformers backend; set model.backend transformers (or auto) or model.fsdp false")
    need(plain_name(cfg.name), "name",
         f"a plain folder name (letters, digits, '.', '-', '_'; not '.' or '..'), got {cfg.name!r}: the run is "
         "written to output_dir/name, and that must stay inside output_dir")
    need(0 <= cfg.seed < 2**63, "seed", f"must be from 0 to 2**63 - 1 (torch's range), got {cfg.seed}")
    need(cfg.save_every >= 1, "save_every", f"must be at least 1, got {cfg.save_every}")
    need(cfg.log_every >= 1, "log_every", f"must be at least 1, got {cfg.log_every}")
    for i, name in enumerate(cfg.report_to):
        need(name in REPORTERS, f"report_to.{i}", f"{name!r} is not one of {', '.join(REPORTERS)}")
    need(bool(cfg.stages), "stages", "list at least one stage, e.g. [{kind: sft, data: [corpus.jsonl]}]")
    for i, s in enumerate(cfg.stages):
        _check_stage(cfg, f"stages.{i}", s, check_files, need, errors)
    return errors


def _check_stage(cfg: TrainConfig, key: str, s: Any, check_files: bool, need: Any, errors: list[str]) -> None:
    """The problems of one stage, under `key` (stages.N)."""
    need(s.kind in KINDS, f"{key}.kind", f"{s.kind!r} is not one of {', '.join(KINDS)}")
    need(bool(s.data), f"{key}.data", "list at least one JSONL file or hf:org/name dataset")
    for j, p in enumerate(s.data):
        try:
            hub = parse_hub_dataset(p)
        except ConfigError as e:
            errors.append(f"{key}.data.{j}: {e}")
            continue
        need(hub is not None or not check_files or cfg.data_path(p).is_file(), f"{key}.data.{j}",
             f"{cfg.data_path(p)} does not exist (paths are relative to the config file)")
    for problem in column_problems(s.columns):
        errors.append(f"{key}.columns: {problem}")
    need(bool(s.split.strip()), f"{key}.split", "name a split, e.g. train")
    need(0 < s.epochs <= MAX_EPOCHS, f"{key}.epochs", f"must be a finite number of passes, above 0 and at most {MAX_EPOCHS}, got {s.epochs}")
    need(s.max_steps is None or s.max_steps >= 1, f"{key}.max_steps", f"must be at least 1, got {s.max_steps}")
    need(s.lr > 0, f"{key}.lr", f"must be positive, got {s.lr}")
    need(s.scheduler in SCHEDULERS, f"{key}.scheduler", f"{s.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    need(0 <= s.warmup_ratio < 1, f"{key}.warmup_ratio", f"must be in [0, 1), got {s.warmup_ratio}")
    need(s.batch_size >= 1, f"{key}.batch_size", f"must be at least 1, got {s.batch_size}")
    need(s.grad_accum >= 1, f"{key}.grad_accum", f"must be at least 1, got {s.grad_accum}")
    need(s.max_length >= 16, f"{key}.max_length", f"must be at least 16 tokens, got {s.max_length}")
    need(0 <= s.eval_fraction < 1, f"{key}.eval_fraction", f"must be in [0, 1), got {s.eval_fraction}")
    need(s.beta > 0, f"{key}.beta", f"must be positive, got {s.beta}")
    need(s.limit is None or s.limit >= 1, f"{key}.limit", f"must be at least 1, got {s.limit}")
    need(s.max_grad_norm >= 0, f"{key}.max_grad_norm", f"must be 0 (off) or positive, got {s.max_grad_norm}")


def load_train_config(path: str | Path, overrides: tuple[str, ...] | list[str] = (),
                      check_files: bool = True) -> TrainConfig:
    """Read, override and validate a training config (`check_files`: the data files must exist).

    Raises:
        ConfigError: every problem at once, one per line, each with its key and the fix.
    """
    path = Path(path)
    data = read_yaml(path)
    data = {} if data is None else data
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping (name:, model:, stages:), got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment, errors)
    cfg = build_dataclass(TrainConfig, data, "", errors)
    cfg.base_dir = str(path.resolve().parent)
    errors += _check(cfg, check_files)  # values that failed to parse kept their defaults: no double report
    if errors:
        raise ConfigError(f"{path}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return cfg
