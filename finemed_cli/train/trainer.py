"""The training loop of one stage (`Trainer.run_stage`): resume from a checkpoint, the DPO reference scored once,
the held-out loss before and after, the optimizer steps with their metrics and checkpoints, then the stage's
adapter (or weights) saved and folded into the next stage's start (`chain.ModelChain`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch

from finemed_cli.config.train import StageSettings, TrainConfig
from finemed_cli.console import bar
from finemed_cli.data.jsonl import JsonlAppender
from finemed_cli.data.output import atomic_write
from finemed_cli.errors import ConfigError, DataError
from finemed_cli.manifest import write_manifest
from finemed_cli.modeling.loss import LossScaler
from finemed_cli.train import fsdp
from finemed_cli.train.backend import autocast
from finemed_cli.train.chain import ModelChain, stage_dir
from finemed_cli.train.checkpoint import load_checkpoint, save_checkpoint
from finemed_cli.train.data import StageData
from finemed_cli.train.distributed import Dist
from finemed_cli.train.losses import dpo_loss, evaluate_sft, pair_logps, sequence_nll
from finemed_cli.train.schedule import lr_schedule, planned_steps, step_stream
from finemed_cli.train.tracking import Tracker

logger = logging.getLogger(__name__)
DONE = "summary.json"  # a finished stage's summary; its presence marks the stage done


class _NoMetrics:
    """Where ranks other than 0 log: nowhere."""

    def __enter__(self) -> _NoMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def append(self, record: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class RuntimeConfig:
    """How this process trains, as the recipe resolved it (not part of the YAML config)."""

    backend: str  # the training backend chosen (transformers, unsloth)
    progress: bool = True  # show the step bar (rank 0 only)
    dist: Dist = field(default_factory=Dist)  # this process's place among torchrun's
    precision: str = "fp32"  # the compute precision: fp32, bf16 or fp16
    device: str = "cpu"
    chain: str = "merge"  # how LoRA stages chain (`chain.ModelChain`)


@dataclass
class _StageRun:
    """The state of one stage's training, built by `run_stage` and carried through its loop."""

    model: Any
    stage: StageSettings
    index: int
    data: StageData
    optimizer: Any
    scheduler: Any
    params: list[torch.Tensor]
    total: int  # the stage's planned optimizer steps
    out: Path  # the stage directory
    start: int = 0  # the step it starts from (a resumed checkpoint's)
    reference: Any = None  # DPO: the reference log-probabilities


class Trainer:
    """Trains the stages of one config on one model."""

    def __init__(self, cfg: TrainConfig, model: Any, tokenizer: Any, runtime: RuntimeConfig):
        self.cfg, self.tokenizer, self.backend = cfg, tokenizer, runtime.backend
        self.progress, self.dist, self.precision = runtime.progress, runtime.dist, runtime.precision
        self.amp = autocast(runtime.device, runtime.precision)
        self.scaler = LossScaler(runtime.precision == "fp16")  # fp16 (GPUs before compute capability 8.0) needs it
        self.models = ModelChain(cfg, model, runtime.backend, runtime.dist, runtime.precision, runtime.device,
                                 runtime.chain)
        self.tracker = Tracker()  # the run's experiment trackers (recipe.py sets them): none by default

    @property
    def chain(self) -> str:
        return self.models.chain

    @property
    def fsdp(self) -> bool:
        return self.models.fsdp

    # --- one stage ------------------------------------------------------------------------------------
    def run_stage(self, index: int, data: StageData, resume: bool) -> dict[str, Any]:
        """Train stage `index` (from its checkpoint with `resume`), evaluate it before and after, save it."""
        from finemed_cli.modeling.varlen import packed_attention

        stage = self.cfg.stages[index]
        out = stage_dir(self.cfg, index)
        out.mkdir(parents=True, exist_ok=True)
        total = planned_steps(stage, len(data.train), self.dist.world)
        model = self.models.wrap(index)
        model.train()
        if self.cfg.model.gradient_checkpointing and self.backend != "unsloth":  # unsloth: set at load
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(stage, total))
        run = _StageRun(model, stage, index, data, optimizer, scheduler, params, total, out)
        run.start = start = self._restore(run, resume)
        if self.dist.main and data.held:  # minutes on a CPU before the stage's bar appears: say what runs
            logger.info("stage %d (%s): held-out loss on %d %s before the first step", index + 1, stage.label,
                        len(data.held), "pairs" if stage.kind == "dpo" else "sequences")
        with packed_attention(model):
            run.reference = self._reference_logps(model, data, out) if stage.kind == "dpo" else None
            before = self._evaluate(model, stage, data, run.reference)
            summary = self._loop(run)
            model.eval()
            after = self._evaluate(model, stage, data, run.reference)
        summary.update(held_out_before=before, held_out_after=after, processes=self.dist.world)
        if before is not None:
            self.tracker.log(out.name, start, {"held_out_loss": before})
            self.tracker.log(out.name, total, {"held_out_loss": after})
        self.models.save(model, out / ("model" if self.chain == "full" else "adapter"))
        self.models.unwrap(model)
        if self.dist.main:
            from finemed_cli.train.loss_plot import plot_losses

            plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"stage {index + 1}: {stage.label}")
            write_manifest(out, config=self.cfg.to_json(), stage=index, data=data.files, backend=self.backend,
                           seed=self.cfg.seed, processes=self.dist.world, precision=self.precision)
            (out / DONE).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
            (out / "checkpoint.pt").unlink(missing_ok=True)
        self.dist.barrier()
        return summary

    def _restore(self, run: _StageRun, resume: bool) -> int:
        """The step a stage starts from: its checkpoint's (resume), or 0 with its old metrics cleared."""
        index, out, model, params, optimizer, scheduler, total = (run.index, run.out, run.model, run.params,
                                                                  run.optimizer, run.scheduler, run.total)
        stage = self.cfg.stages[index]
        ckpt = out / "checkpoint.pt"
        start = 0
        if resume and ckpt.is_file():
            state = load_checkpoint(ckpt)
            if state.get("world", 1) != self.dist.world:
                raise ConfigError(f"{ckpt} was written by {state.get('world', 1)} process(es), this run has "
                                  f"{self.dist.world}: the step stream depends on it; resume with as many, or "
                                  "delete the checkpoint to rerun the stage")
            if ("model" in state) != self.fsdp:
                raise ConfigError(f"{ckpt} was written by {'an un' if self.fsdp else 'a '}sharded run; resume it "
                                  "the same way (model.fsdp, and torchrun for a sharded one), or delete it to "
                                  "rerun the stage")
            if self.fsdp:
                fsdp.load_full_state(model, optimizer, state["model"], state["optimizer"])
            else:
                for p, saved in zip(params, state["params"], strict=True):
                    p.data.copy_(saved)
                optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            start = state["step"]
            logger.info("stage %d (%s): resuming at step %d of %d", index + 1, stage.label, start, total)
        elif not resume and self.dist.main:
            for name in ("metrics.jsonl", "reference_logps.json"):
                (out / name).unlink(missing_ok=True)
        self.dist.barrier()
        moved = self.chain != "merge"  # the weights the reference was taken from have trained since
        if stage.kind == "dpo" and start and moved and not (out / "reference_logps.json").is_file():
            raise ConfigError(f"{out}: the checkpoint is at step {start} but reference_logps.json is gone; the "
                              "model has moved since the stage began, so rerun the stage: delete checkpoint.pt")
        return start

    def _evaluate(self, model: Any, stage: StageSettings, data: StageData, reference: Any) -> float | None:
        was = model.training
        model.eval()
        try:
            if stage.kind == "sft":
                with self.amp():
                    return evaluate_sft(model, data.held, stage.batch_size, self.dist)
            if not data.held:
                return None
            total = 0.0
            with torch.no_grad(), self.amp():
                for i, real in self._my_share(len(data.held)):
                    loss = dpo_loss(model, [data.held[i]], stage.beta, reference["held"], [i])[0]
                    total += float(loss) if real else 0.0
            return self.dist.sum_floats(total)[0] / len(data.held)
        finally:
            model.train(was)

    @torch.no_grad()
    def _reference_logps(self, model: Any, data: StageData, out: Path) -> dict[str, Any]:
        """Log-probabilities of chosen and rejected under the reference (adapter off), computed once per
        stage and cached in the stage directory (a resumed stage reads them back)."""
        path = out / "reference_logps.json"
        cached = path.is_file()
        self.dist.barrier()  # every rank has looked before rank 0 may write it
        if cached:
            return orjson.loads(path.read_bytes())
        was = model.training
        model.eval()
        mine: dict[str, dict[int, list[float]]] = {"train": {}, "held": {}}
        merged = self.chain == "merge" and hasattr(model, "disable_adapter")  # else: the model as it stands
        ctx = model.disable_adapter() if merged else contextlib.nullcontext()
        with ctx, self.amp():
            for split in ("train", "held"):
                pairs = getattr(data, split)
                for i, real in self._my_share(len(pairs)):
                    c, r = pair_logps(model, [pairs[i]])
                    if real:
                        mine[split][i] = [float(c[0]), float(r[0])]
        model.train(was)
        ref: dict[str, Any] = {}
        for split in ("train", "held"):
            merged = {i: v for part in self.dist.gather(mine[split]) for i, v in part.items()}
            ref[split] = [merged[i] for i in range(len(getattr(data, split)))]
        if self.dist.main:
            atomic_write(path, orjson.dumps(ref))
        return ref

    def _my_share(self, n: int) -> list[tuple[int, bool]]:
        """This rank's indices of `n` items (`fsdp.my_share`: sharded, padded with replays of item 0)."""
        return fsdp.my_share(list(range(n)), self.dist.rank, self.dist.world, self.fsdp, 0)

    def _loop(self, run: _StageRun) -> dict[str, Any]:
        """The stage's optimizer steps from `run.start` to `run.total`: metrics logged, checkpoints saved."""
        model, stage, index, data, total, out = run.model, run.stage, run.index, run.data, run.total, run.out
        optimizer, scheduler, params = run.optimizer, run.scheduler, run.params
        dist = self.dist
        seed = self.cfg.seed * 1000 + index
        steps = bar(total=total, initial=run.start, desc=f"stage {index + 1}/{len(self.cfg.stages)} {stage.label}",
                    unit="step", progress=self.progress and dist.main)
        t0 = time.perf_counter()
        tokens_seen = 0
        last_loss = None
        with JsonlAppender(out / "metrics.jsonl") if dist.main else _NoMetrics() as metrics:
            for step, step_micro in enumerate(step_stream(stage, len(data.train), seed, total, dist.world)):
                if step < run.start:
                    continue
                optimizer.zero_grad(set_to_none=True)
                logged, step_tokens = self._accumulate(model, stage, data, step_micro, run.reference, params)
                if not math.isfinite(logged["loss"]):
                    raise DataError(f"stage {stage.label}: the loss became {logged['loss']} at step {step + 1}; "
                                    "lower lr or check the data")
                lr = scheduler.get_last_lr()[0]
                if logged.pop("finite_grads", 1.0):  # fp16: an overflowing step is skipped, its scale halved
                    optimizer.step()
                scheduler.step()
                tokens_seen += step_tokens
                elapsed = time.perf_counter() - t0
                last_loss = logged["loss"]
                if (step + 1) % self.cfg.log_every == 0 or step + 1 == total:
                    line = {"id": f"step-{step + 1}", "step": step + 1, "lr": lr, "tokens": step_tokens,
                            "tokens_per_s": round(tokens_seen / elapsed, 1), **logged}
                    metrics.append(line)
                    self.tracker.log(out.name, step + 1, line)
                steps.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens_seen / elapsed:.0f}")
                steps.update(1)
                if (step + 1) % self.cfg.save_every == 0 and step + 1 < total:
                    self.checkpoint(out, model, params, optimizer, scheduler, step + 1)
        steps.close()
        elapsed = time.perf_counter() - t0
        return {"stage": index + 1, "kind": stage.kind, "label": stage.label, "steps": total,
                "records": data.report.records, "train_sequences": len(data.train), "held_out": len(data.held),
                "truncated": data.report.truncated, "skipped": data.report.skipped,
                "filtered_out": data.report.filtered_out, "files": data.report.files, "final_loss": last_loss,
                "seconds": round(elapsed, 2), "tokens_per_s": round(tokens_seen / elapsed, 1) if elapsed else None}

    def _accumulate(self, model: Any, stage: StageSettings, data: StageData, step_micro: list[list[int]],
                    reference: Any, params: list[torch.Tensor]) -> tuple[dict[str, float], int]:
        """One optimizer step's gradients (this process's share of its micro-batches, normalised globally;
        sharded, every rank runs as many passes as rank 0, replaying a micro-batch at zero weight where its own
        share is short), summed over processes and clipped. Returns the logged values and the tokens seen."""
        dist = self.dist
        share = fsdp.my_share(step_micro, dist.rank, dist.world, self.fsdp, step_micro[0])
        logged: dict[str, float] = {"loss": 0.0}
        step_tokens = 0
        if stage.kind == "sft":
            denom = sum(data.train[i].target_tokens for mb in step_micro for i in mb)
            for mb, real in share:
                seqs = [data.train[i] for i in mb]
                with self.amp():
                    loss = sequence_nll(model, seqs).sum() / denom * (1.0 if real else 0.0)
                self.scaler.scale(loss).backward()
                if real:
                    logged["loss"] += float(loss.detach())
                    step_tokens += sum(len(s.input_ids) for s in seqs)
        else:
            count = sum(len(mb) for mb in step_micro)
            logged.update(margin=0.0, accuracy=0.0)
            for mb, real in share:
                pairs = [data.train[i] for i in mb]
                with self.amp():
                    losses, margins, wins = dpo_loss(model, pairs, stage.beta, reference["train"], mb)
                self.scaler.scale(losses.sum() / count * (1.0 if real else 0.0)).backward()
                if real:
                    logged["loss"] += float(losses.detach().sum()) / count
                    logged["margin"] += float(margins.sum()) / count
                    logged["accuracy"] += float(wins.sum()) / count
                    step_tokens += sum(len(e.input_ids) for p in pairs for e in p)
        if dist.active:
            if not self.fsdp:  # sharded: the last backward reduce-scattered (summed) them already
                dist.sum_grads(params)
            keys = sorted(logged)
            logged = dict(zip(keys, dist.sum_floats(*(logged[k] for k in keys)), strict=True))
            step_tokens = int(dist.sum_floats(step_tokens)[0])
        if self.scaler.enabled:
            every = (lambda ok: dist.sum_floats(float(not ok))[0] == 0) if dist.active else None
            logged["finite_grads"] = float(self.scaler.unscale(params, every))
        if stage.max_grad_norm and logged.get("finite_grads", 1.0):
            logged["grad_norm"] = fsdp.grad_norm(params, stage.max_grad_norm)
        return logged, step_tokens

    def checkpoint(self, out: Path, model: Any, params: list[torch.Tensor], optimizer: Any, scheduler: Any,
                   step: int) -> None:
        """A resumable checkpoint of the stage at `step` (a collective when sharded)."""
        save_checkpoint(out, model, params, optimizer, scheduler, step, self.dist, self.fsdp)
