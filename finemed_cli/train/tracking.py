"""What a training run reports beyond its stage folders: the resolved config (one block in the log, and
`resolved_config.json` beside the run, written before step 1) and the experiment trackers of `report_to:`,
which get every metric line the stages write to their metrics.jsonl.

- tensorboard: event files in RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`), written by torch's
  SummaryWriter; each stage's scalars under its folder's name (`stage-1-sft/loss`) against its own step.
- wandb: one wandb run per training run (its id is kept in RUN/wandb_run_id, so --resume continues it);
  WANDB_MODE (offline, disabled), WANDB_PROJECT and WANDB_ENTITY are read by wandb as usual.
Each is an optional extra, looked up once before the model loads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from finemed_cli.config.train import StageSettings, TrainConfig
from finemed_cli.data.output import atomic_write
from finemed_cli.errors import ConfigError
from finemed_cli.train.schedule import planned_steps, warmup_steps

logger = logging.getLogger(__name__)
RESOLVED = "resolved_config.json"


def check_reporters(names: list[str]) -> None:
    """Every tracker in `report_to` is installed; else one error naming the extra that installs it."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        extras = ",".join(missing)
        raise ConfigError(f"report_to lists {', '.join(missing)}, which is not installed here: pip install "
                          f"'finemed[{extras}]' (or drop it from report_to)")


def stage_plan(cfg: TrainConfig, index: int, world: int, data: Any = None,
               summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """One stage as it will run: its data (a StageData, or the summary of a stage done before a resume),
    steps, warm-up, learning rate and effective batch."""
    stage: StageSettings = cfg.stages[index]
    if data is not None:
        report = data.report
        sources = [{"source": s, "shape": shape, "records": report.sizes.get(s)} for s, shape in report.files.items()]
        sizes = {"records": report.records, "train": len(data.train), "held_out": len(data.held),
                 "tokens": data.tokens, "truncated": report.truncated}
    else:
        summary = summary or {}
        sources = [{"source": s, "shape": shape} for s, shape in summary.get("files", {}).items()]
        sizes = {"records": summary.get("records"), "train": summary.get("train_sequences"),
                 "held_out": summary.get("held_out"), "done": True}
    total = planned_steps(stage, sizes["train"] or 0, world)
    return {"stage": index + 1, "kind": stage.kind, "label": stage.label, "data": sources, "split": stage.split,
            "columns": stage.columns, **sizes, "steps": total, "warmup_steps": warmup_steps(stage, total),
            "lr": stage.lr, "scheduler": stage.scheduler, "batch_size": stage.batch_size,
            "grad_accum": stage.grad_accum, "effective_batch": stage.batch_size * stage.grad_accum * world,
            "max_length": stage.max_length, "epochs": None if stage.max_steps else stage.epochs,
            **({"beta": stage.beta} if stage.kind == "dpo" else {})}


def resolved_config(cfg: TrainConfig, stages: list[dict[str, Any]], **run: Any) -> dict[str, Any]:
    """The run's settings as resolved on this machine (`run`: backend, precision, device, …) and its stages."""
    m = cfg.model
    return {"run": str(cfg.run_dir), "model": m.name or "embedded default", **run, "method": m.method,
            "lora": None if m.method == "full" else {"rank": m.lora.rank, "alpha": m.lora.alpha,
                                                     "dropout": m.lora.dropout, "targets": m.lora.targets},
            "gradient_checkpointing": m.gradient_checkpointing, "fsdp": m.fsdp, "seed": cfg.seed,
            "report_to": cfg.report_to, "stages": stages, "config": cfg.to_json()}


def write_resolved(run: Path, resolved: dict[str, Any]) -> Path:
    """`resolved_config.json` in the run folder (whole or not at all), and its summary in the log."""
    run.mkdir(parents=True, exist_ok=True)
    path = atomic_write(run / RESOLVED, orjson.dumps(resolved, option=orjson.OPT_INDENT_2))
    logger.info("%s", describe(resolved))
    return path


def describe(r: dict[str, Any]) -> str:
    """The resolved config as a few lines: the run, then one line per stage."""
    lines = [f"run {r['run']}: {r['model']}, {r['method']} on {r['backend']}, precision {r['precision']} "
             f"(weights {r['weights']}) on {r['device']}, {r['processes']} process(es), stages chained by "
             f"{r['between_stages']}, seed {r['seed']}" + (f", report_to {', '.join(r['report_to'])}"
                                                         if r["report_to"] else "")]
    for s in r["stages"]:
        data = ", ".join(f"{d['source']} ({d['shape']}" + (f", {d['records']}" if d.get("records") is not None
                                                          else "") + ")" for d in s["data"])
        if s.get("done"):
            lines.append(f"  stage {s['stage']} {s['kind']} ({s['label']}): done before this run ({data})")
            continue
        lines.append(f"  stage {s['stage']} {s['kind']} ({s['label']}): {data} -> {s['train']} "
                     f"{'pairs' if s['kind'] == 'dpo' else 'sequences'} ({s['held_out']} held out, "
                     f"{s['tokens']:,} tokens); {s['steps']} steps, warm-up {s['warmup_steps']}, lr {s['lr']:g} "
                     f"{s['scheduler']}, effective batch {s['effective_batch']} ({s['batch_size']} x "
                     f"{s['grad_accum']} accumulated x {r['processes']} process(es)), max_length {s['max_length']}")
    return "\n".join(lines)


class Tracker:
    """The trackers of one run (open on rank 0 only); with none asked for, logging costs nothing."""

    def __init__(self, names: list[str] | tuple[str, ...] = (), run: Path | None = None,
                 resolved: dict[str, Any] | None = None) -> None:
        self.writer: Any = None
        self.wandb: Any = None
        self._steps: set[str] = set()  # the stages whose step metric wandb knows
        if "tensorboard" in names and run is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))
        if "wandb" in names and run is not None:
            self.wandb = _start_wandb(run, resolved or {})

    def log(self, stage: str, step: int, values: dict[str, Any]) -> None:
        """The numbers in `values` as `STAGE/NAME` scalars at the stage's optimizer `step`."""
        scalars = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "id")}
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"{stage}/{name}", value, step)
        if self.wandb is not None:
            if stage not in self._steps:  # each stage counts its own steps from 1
                self.wandb.define_metric(f"{stage}/step")
                self.wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self._steps.add(stage)
            self.wandb.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in scalars.items()}})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_wandb(run: Path, resolved: dict[str, Any]) -> Any:
    import wandb

    id_file = run / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    try:
        handle = wandb.init(project=os.environ.get("WANDB_PROJECT", "finemed"), name=run.name, id=run_id,
                            resume="allow", dir=str(run), config=resolved)
    except wandb.errors.Error as e:
        raise ConfigError(f"report_to wandb: wandb could not start ({str(e).strip().splitlines()[0][:200]}); log "
                          "in with `wandb login`, or set WANDB_MODE=offline (sync later with `wandb sync`)") from None
    id_file.write_text(run_id)
    return handle
