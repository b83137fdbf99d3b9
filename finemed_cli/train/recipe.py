"""`finemed train`: the whole curriculum from one config: SFT stages, then DPO, each starting from the
previous stage's result, resumable, with metrics, a loss curve and a manifest per stage.

Layout of a run (`output_dir/name/`):
    stage-1-sft/        adapter/ (peft), metrics.jsonl, loss.png, summary.json, manifest.json
    stage-2-sft/ …
    stage-K-dpo/        … plus reference_logps.json (the reference model's log-probabilities, computed once)
    final/              the merged model (HF directory: `finemed answer --model`, `finemed export`)
    resolved_config.json  the settings as resolved here (precision, steps, warm-up, effective batch, data
                        sizes), written before step 1 (train/tracking.py); tensorboard/ with report_to
    manifest.json

This recipe composes the components (torchtune-style): `data` (files → tokenized stage data), `trainer` (one
stage's loop), `schedule` (the step stream and learning rate), `losses` (SFT NLL and DPO over packed rows),
`backend` (transformers or unsloth, precision, loading, the final merge), `chain` (how stages pass the model
on), `checkpoint` and `fsdp`/`distributed` (several processes). DPO's reference is the model as the previous stages left it: for
a merged chain the model with the adapter off; otherwise the model before the stage's first step, scored
once and cached.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson
import torch

from finemed_cli.config.train import TrainConfig
from finemed_cli.data.output import OutputLock, check_output
from finemed_cli.errors import ConfigError
from finemed_cli.manifest import write_manifest
from finemed_cli.modeling.prompts import resolve_system_prompt, save_prompt
from finemed_cli.train.backend import (
    load_for_training,
    merge_final,
    pick_backend,
    pick_chain,
    resolve_precision,
)
from finemed_cli.train.chain import stage_dir
from finemed_cli.train.data import prepare_stage_data
from finemed_cli.train.distributed import Dist, init_distributed, shutdown
from finemed_cli.train.schedule import planned_steps
from finemed_cli.train.tracking import Tracker, check_reporters, resolved_config, stage_plan, write_resolved
from finemed_cli.train.trainer import DONE, RuntimeConfig, Trainer

logger = logging.getLogger(__name__)


def training_system_prompt(cfg: TrainConfig, model_source: str | None) -> str | None:
    """The system prompt a run trains with: `system_prompt` of the config (an @FILE relative to it), else the
    base model's own finemed prompt, else finemed's."""
    value = cfg.system_prompt
    if value is not None and value.startswith("@"):
        value = "@" + str(cfg.data_path(value[1:]))
    return resolve_system_prompt(value, model_source)


def plan(cfg: TrainConfig, tokenizer: Any, world: int | None = None) -> list[dict[str, Any]]:
    """What each stage will do: records after filters, sequences (pairs for DPO), tokens, steps (over
    `world` processes; default: WORLD_SIZE, as under torchrun)."""
    from finemed_cli.checkpoints.loading import resolve_model_source

    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    system = training_system_prompt(cfg, resolve_model_source(cfg.model.name)[1])
    rows = []
    for i, stage in enumerate(cfg.stages):
        data = prepare_stage_data(cfg, stage, tokenizer, system)
        rows.append({"stage": i + 1, "kind": stage.kind, "label": stage.label, "files": data.report.files,
                     "records": data.report.records, "filtered_out": data.report.filtered_out,
                     "train": len(data.train), "held_out": len(data.held), "tokens": data.tokens,
                     "truncated": data.report.truncated, "skipped": data.report.skipped,
                     "steps": planned_steps(stage, len(data.train), world), "lr": stage.lr, "epochs": stage.epochs})
    return rows


def run_train(cfg: TrainConfig, resume: bool = False, backend: str | None = None, device: str | None = None,
              progress: bool = True) -> Path:
    """Train every stage of `cfg` in order and write `final/`; returns the run directory.

    Raises:
        ConfigError: the run directory exists without `resume`, or the config does not fit this machine.
    """
    from finemed_cli.checkpoints.loading import pick_device

    run = cfg.run_dir
    chosen = pick_backend(cfg, backend)
    dev = pick_device(device)
    precision = resolve_precision(cfg, dev)
    if cfg.model.fsdp and chosen == "unsloth":
        raise ConfigError("model.fsdp runs on the transformers backend; drop --backend unsloth or set "
                          "model.fsdp false")
    chain = pick_chain(cfg, chosen)
    check_reporters(cfg.report_to)
    inputs = [s for stage in cfg.stages for p in stage.data if isinstance(s := cfg.data_source(p), Path)]
    inputs += [cfg.model.name]
    check_output(run, inputs=inputs, kind="dir", what="run folder")
    dist = init_distributed(dev)
    # One run per run folder: rank 0 holds the lock (the ranks of one run share it).
    lock = OutputLock(run) if dist.main else None
    try:
        if lock is not None:
            lock.acquire()
        taken = run.exists() and any(run.iterdir())
        dist.barrier()  # every rank has looked before rank 0 creates anything
        if taken:
            check_run_folder(run)
        if taken and not resume:
            raise ConfigError(f"{run} already holds a run; pass --resume to continue it, or --set name=NEW "
                              "for a new one")
        # The run folder is made with the first stage's, once the model has loaded.
        return run_stages(cfg, resume, chosen, chain, dist.device(dev), precision, progress, dist)
    finally:
        if lock is not None:
            lock.release()
        shutdown(dist)


def check_run_folder(run: Path) -> None:
    """A non-empty run folder is resumed (or refused) only when it is a finemed run: it holds nothing a run never
    writes (its resolved config, stage folders, final/, tracking files, temporaries). A project folder, a `.git`, a system folder
    named like the run is never written into, with --resume or without."""
    import re

    names = [p.name for p in run.iterdir()]
    ours = re.compile(r"stage-\d+-[a-z]+|final|tensorboard|wandb_run_id|wandb|\.?resolved_config\.json.*|"
                      r"\.?.+\.(?:tmp|old)\d+")
    foreign = sorted(n for n in names if not ours.fullmatch(n) and not (n == "manifest.json" and _ours(run / n)))
    if foreign:
        shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
        raise ConfigError(f"{run} is not a finemed run folder (it holds {shown}); finemed trains "
                          "only into an empty folder or its own run: choose another name (--set name=NEW) or "
                          "output_dir")


def _ours(manifest: Path) -> bool:
    """A run's manifest.json as `finemed train` writes it (its config and the versions), not another tool's."""
    try:
        body = orjson.loads(manifest.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(body, dict) and isinstance(body.get("config"), dict) and "versions" in body


def run_stages(cfg: TrainConfig, resume: bool, chosen: str, chain: str, dev: str, precision: str,
                progress: bool, dist: Dist) -> Path:
    run = cfg.run_dir
    # GPU weights in the compute precision, except sharded full fine-tuning: fp32 master shards (1/world
    # each), gathered in the compute precision by FSDP's mixed-precision policy. CPU: fp32 under autocast.
    sharded = cfg.model.fsdp and dist.active
    weights = precision if dev.startswith("cuda") and not sharded else "fp32"
    if dist.main:  # the first bar comes after the model loads and every stage's data is read: say so now
        logger.info("train %s: %d stages on %s (%s backend); loading the model, then reading and tokenizing "
                    "every stage's data before the first step", run, len(cfg.stages), dev, chosen)
    loaded = load_for_training(cfg, chosen, dev, weights)
    tokenizer, base_name = loaded.tokenizer, loaded.name
    system = training_system_prompt(cfg, loaded.source)
    torch.manual_seed(cfg.seed)
    runtime = RuntimeConfig(chosen, progress, dist, precision, dev, chain)
    trainer = Trainer(cfg, loaded.model, tokenizer, runtime)
    del loaded  # the trainer holds the model: nothing else may keep it alive (the final merge frees it)
    # Every stage's data is read before step 1: a bad record of the last stage stops the run now, not hours in,
    # and the resolved config has every stage's steps and warm-up. Only the first stage's tokenized data is
    # kept: the others are read again when their turn comes (a curriculum reuses its files stage after stage,
    # so keeping all of them would hold the corpus in memory several times over).
    done = {i: orjson.loads((stage_dir(cfg, i) / DONE).read_bytes()) for i in range(len(cfg.stages))
            if resume and (stage_dir(cfg, i) / DONE).is_file()}
    data: dict[int, Any] = {}
    plans = []
    if dist.main:
        logger.info("train: preparing the data of %d stages (read, checked, tokenized, packed)",
                    len(cfg.stages) - len(done))
    for i, stage in enumerate(cfg.stages):
        prepared = None if i in done else prepare_stage_data(cfg, stage, tokenizer, system)
        plans.append(stage_plan(cfg, i, dist.world, prepared, done.get(i)))
        if prepared is not None and not data:
            data[i] = prepared
    resolved = resolved_config(cfg, plans, backend=chosen, precision=precision, weights=weights, device=dev,
                               processes=dist.world, between_stages=trainer.chain)
    if dist.main:
        write_resolved(run, resolved)
    with Tracker(cfg.report_to if dist.main else (), run, resolved) as tracker:
        trainer.tracker = tracker
        summaries = []
        for i, stage in enumerate(cfg.stages):
            if i in done:
                summaries.append(done[i])
                trainer.models.adopt(i)
                logger.info("stage %d (%s) already done; its result is taken over", i + 1, stage.label)
                continue
            stage_data = data.pop(i) if i in data else prepare_stage_data(cfg, stage, tokenizer, system)
            summary = trainer.run_stage(i, stage_data, resume)
            del stage_data  # its memory goes when the stage ends
            summaries.append(summary)
            if dist.main:
                _log_summary(summary)
    _finish(cfg, trainer, tokenizer, system, weights, summaries, dict(base_model=base_name, backend=chosen,
                                                                        precision=precision, dist=dist))
    return run


def _finish(cfg: TrainConfig, trainer: Trainer, tokenizer: Any, system: str | None, weights: str,
            summaries: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """`final/`: the last stage's model, merged (`continue`: into a fresh base), its prompt and manifests."""
    run, dist = cfg.run_dir, info["dist"]
    final = run / "final"
    if dist.main and trainer.chain == "continue":
        trainer.models.model = trainer.models.adapter = None  # free the training copy (a GPU's memory) first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        trainer.models.model = merge_final(cfg, stage_dir(cfg, len(cfg.stages) - 1) / "adapter", weights)
    trainer.models.model.eval()
    trainer.models.save(trainer.models.model, final)  # on every rank: a sharded model is gathered for rank 0
    if dist.main:
        save_prompt(tokenizer, final, system)
        for where in (final, run):
            write_manifest(where, config=cfg.to_json(), base_model=info["base_model"], stages=summaries,
                           backend=info["backend"], seed=cfg.seed, processes=dist.world,
                           precision=info["precision"], between_stages=trainer.chain)
    dist.barrier()


def _log_summary(s: dict[str, Any]) -> None:
    held = ""
    if s.get("held_out_before") is not None:
        held = f", held-out loss {s['held_out_before']:.4f} -> {s['held_out_after']:.4f}"
    logger.info("stage %d (%s, %s): %d steps, %d sequences (%d truncated), final loss %.4f, %.0f tokens/s%s",
                s["stage"], s["label"], s["kind"], s["steps"], s["train_sequences"], s["truncated"],
                s["final_loss"] or float("nan"), s["tokens_per_s"] or 0, held)
