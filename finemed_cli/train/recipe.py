"""`finemed train`: the whole curriculum from one config: SFT stages, then DPO, each starting from the
previous stage's result, resumable, with metrics, a loss curve and a manifest per stage.

Layout of a run (`output_dir/name/`):
    stage-1-sft/        adapter/ (peft), metrics.jsonl, loss.png, summary.json, manifest.json
    stage-2-sft/ …
    stage-K-dpo/        … plus reference_logps.json (the reference model's log-probabilities, computed once)
    final/              the merged model (HF directory: `finemed answer --model`, `finemed export`)
    manifest.json

LoRA stages chain in one of two ways (`model.lora.between_stages`), and in both DPO's reference is the model
as the previous stages left it, with no second copy of the model ever held:
- merge: each stage trains a fresh adapter on the model as the previous stages left it, then merges it in.
  The reference is the model with the adapter disabled.
- continue (qlora, the unsloth backend): one adapter trains through every stage, `stage-K/adapter/` holding
  it as stage K left it; `final/` merges it into the base loaded afresh in 16 bits, so a 4-bit base adds
  no quantization error to the result. The reference log-probabilities are taken, adapter on, before the
  stage's first step.
Full fine-tuning saves each stage's weights in `stage-K/model/` (what a resumed run starts from); its DPO
reference is, as for `continue`, the model before the stage's first step, scored once and cached.

Batches are packed: a micro-batch's sequences are concatenated into one row with no padding and attend
per sequence (`ttt.varlen`); the LM head runs only on labelled tokens (`ttt.loss.rows_nll`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch

from finemed_cli.config.train import StageSettings, TrainConfig
from finemed_cli.data.jsonl import JsonlAppender
from finemed_cli.data.output import OutputLock, check_output
from finemed_cli.errors import ConfigError, DataError
from finemed_cli.manifest import sha256_file, write_manifest
from finemed_cli.models.loading import cpu_has_fast_bf16
from finemed_cli.train import fsdp
from finemed_cli.train.data import (
    DataReport,
    Encoded,
    filter_department,
    held_out,
    read_training_file,
)
from finemed_cli.train.data import encode_conversation as _encode_conv
from finemed_cli.train.data import encode_pair as _encode_pair
from finemed_cli.train.distributed import Dist, init_distributed, shutdown

logger = logging.getLogger(__name__)
DONE = "summary.json"


@dataclass
class StageData:
    """A stage's tokenized data: SFT sequences, or DPO pairs (chosen, rejected); and what was held out."""

    train: list[Any]
    held: list[Any]
    report: DataReport
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256

    @property
    def tokens(self) -> int:
        def n(item: Any) -> int:
            return sum(len(e.input_ids) for e in item) if isinstance(item, tuple) else len(item.input_ids)

        return sum(n(x) for x in self.train)


def stage_dir(cfg: TrainConfig, index: int) -> Path:
    return cfg.run_dir / f"stage-{index + 1}-{cfg.stages[index].kind}"


def prepare_stage_data(cfg: TrainConfig, stage: StageSettings, tokenizer: Any) -> StageData:
    """Read, filter, split and tokenize a stage's files; every bad line of every file is reported at once."""
    report = DataReport()
    items: list[Any] = []
    hashes = {}
    errors = []
    for p in stage.data:
        path = cfg.data_path(p)
        try:
            shape, records = read_training_file(path, stage.kind)
        except DataError as e:
            errors.append(str(e))
            continue
        report.files[str(path)] = shape
        hashes[str(path)] = sha256_file(path)
        if stage.department or stage.subdepartment:
            if shape != "corpus":
                raise ConfigError(f"{path}: a department filter needs FineMed corpus records (department and "
                                  f"subdepartment fields); this file holds {shape} records")
            kept = filter_department(records, stage.department, stage.subdepartment)  # type: ignore[arg-type]
            report.filtered_out += len(records) - len(kept)
            records = kept
        items += records
    if errors:
        raise DataError("\n".join(errors))
    if stage.limit:
        items = items[: stage.limit]
    report.records = len(items)
    if not items:
        raise DataError(f"stage {stage.label}: no records left after the filters "
                        f"(department={stage.department!r}, subdepartment={stage.subdepartment!r})")
    train, held = [], []
    for it in items:
        enc = (_encode_pair(tokenizer, it, stage.max_length, report) if stage.kind == "dpo"
               else _encode_conv(tokenizer, it, stage.max_length, report))
        if enc is not None:
            (held if held_out(it.id, stage.eval_fraction, cfg.seed) else train).append(enc)
    if not train:
        raise DataError(f"stage {stage.label}: nothing to train on after tokenizing "
                        f"({report.skipped} record(s) had no response tokens within max_length "
                        f"{stage.max_length}); raise max_length")
    return StageData(train, held, report, hashes)


def _micro_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def planned_steps(stage: StageSettings, n_items: int, world: int = 1) -> int:
    """Optimizer steps of a stage; with `world` processes each step takes `grad_accum` micro-batches on
    each of them."""
    micro = math.ceil(n_items / stage.batch_size)
    if stage.max_steps:
        return stage.max_steps
    return max(1, math.ceil(stage.epochs * micro / (stage.grad_accum * world)))


def _schedule(stage: StageSettings, total: int) -> Any:
    warm = int(stage.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if stage.scheduler == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return max(0.0, 1 - progress) if stage.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _pack(seqs: list[Encoded]) -> Any:
    from finemed_cli.ttt.examples import TrainingExample, pack_examples

    return pack_examples([TrainingExample(torch.tensor([e.input_ids]), torch.tensor([e.labels])) for e in seqs])


def _sequence_nll(model: Any, seqs: list[Encoded]) -> torch.Tensor:
    """Per-sequence sums of NLL over labelled tokens, the sequences packed into one row."""
    from finemed_cli.ttt.loss import rows_nll

    return rows_nll(model, _pack(seqs))


def _step_stream(stage: StageSettings, n_items: int, seed: int, total: int,
                 world: int = 1) -> Iterator[list[list[int]]]:
    """The micro-batches of each optimizer step in order (`grad_accum × world` of them; rank r takes
    every world-th): epochs reshuffled with their own seed. The stream depends on `world` only through the
    step size, so 2 processes at grad_accum 1 see exactly the steps of 1 process at grad_accum 2."""
    per_step = stage.grad_accum * world
    epoch = 0
    pending: list[list[int]] = []
    produced = 0
    while produced < total:
        pending += _micro_batches(n_items, stage.batch_size, seed * 1009 + epoch)
        epoch += 1
        while len(pending) >= per_step and produced < total:
            yield pending[:per_step]
            pending = pending[per_step:]
            produced += 1
        if pending and produced < total and epoch >= math.ceil(stage.epochs) and not stage.max_steps:
            yield pending  # the last, short accumulation of the final epoch
            produced += 1
            pending = []


@torch.no_grad()
def evaluate_sft(model: Any, items: list[Encoded], batch_size: int, dist: Dist = Dist()) -> float | None:
    """Mean token NLL over held-out sequences (each rank scores its share)."""
    if not items:
        return None
    mine = fsdp.my_share(items, dist.rank, dist.world, fsdp.is_sharded(model), items[0])
    total = tokens = 0.0
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        nll = _sequence_nll(model, [e for e, _ in chunk])
        total += float(nll[torch.tensor([real for _, real in chunk], device=nll.device)].sum())
        tokens += sum(e.target_tokens for e, real in chunk if real)
    total, tokens = dist.sum_floats(total, tokens)
    return total / tokens


def _pair_logps(model: Any, pairs: list[tuple[Encoded, Encoded]]) -> tuple[torch.Tensor, torch.Tensor]:
    nll = _sequence_nll(model, [e for pair in pairs for e in pair])
    return -nll[0::2], -nll[1::2]


class _NoMetrics:
    """Where ranks other than 0 log: nowhere."""

    def __enter__(self) -> _NoMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def append(self, record: dict[str, Any]) -> None:
        pass


class Trainer:
    """Trains the stages of one config on one model."""

    def __init__(self, cfg: TrainConfig, model: Any, tokenizer: Any, backend: str, progress: bool = True,
                 dist: Dist = Dist(), precision: str = "fp32", device: str = "cpu", chain: str = "merge"):
        self.cfg, self.model, self.tokenizer, self.backend = cfg, model, tokenizer, backend
        self.progress, self.dist, self.precision = progress, dist, precision
        self.amp = _amp(device, precision)
        self.on_gpu = device.startswith("cuda")
        self.chain = "full" if cfg.model.method == "full" else chain
        self.adapter: Any = None  # the one adapter of a `continue` run, once made
        self.fsdp = cfg.model.fsdp and dist.active
        if cfg.model.fsdp and not dist.active:
            logger.warning("model.fsdp: one process, nothing to shard; launch with torchrun or accelerate "
                           "launch to shard over several")

    # --- adapters -------------------------------------------------------------------------------------
    def _wrap(self, index: int) -> Any:
        m = self.cfg.model
        if self.chain == "full":
            self.model.requires_grad_(True)
            if self.fsdp:  # fp32 shards; on a GPU gathered in bf16/fp16 for compute (see `_run_stages`)
                low = self.on_gpu and self.precision != "fp32"
                fsdp.shard(self.model, _WEIGHT_DTYPES[self.precision] if low else None)
            return self.model
        if self.adapter is not None:  # continue: the next stage trains the same adapter on
            return self.adapter
        seed = self.cfg.seed * 7919 + index  # the adapter's init
        torch.manual_seed(seed)
        if self.backend == "unsloth":
            from finemed_cli.train import unsloth_backend

            peft_model = unsloth_backend.add_lora(self.model, self.cfg, seed)
        else:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=m.lora.rank, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                              target_modules=list(m.lora.targets), bias="none", task_type="CAUSAL_LM")
            try:
                peft_model = get_peft_model(self.model, lora)
            except ValueError as e:
                raise ConfigError(f"model.lora.targets: {e}") from None
            from finemed_cli.train.kernels import route_through_kernels

            route_through_kernels(peft_model)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        for p in trainable:  # TTT lesson: fp32 masters, or small updates round away
            p.data = p.data.float()
        self.dist.broadcast_(trainable)
        if self.chain == "continue":
            self.adapter = peft_model
        return peft_model

    def adopt(self, index: int) -> None:
        """Take over the result of stage `index`, done in an earlier run (`--resume`)."""
        out = stage_dir(self.cfg, index)
        if self.chain == "full":
            from safetensors.torch import load_file

            state = {}
            for f in sorted((out / "model").glob("*.safetensors")):
                state.update(load_file(f, device="cpu"))  # copied into the model's device: no second GPU copy
            own = self.model.state_dict()
            saved = {own[k].data_ptr() for k in state if k in own}
            # A tied LM head is saved once, under the embedding's name: only untied absences are losses.
            lost = [k for k in own if k not in state and own[k].data_ptr() not in saved]
            if not state or lost:
                raise ConfigError(f"{out / 'model'}: the saved weights of stage {index + 1} are missing or "
                                  f"incomplete ({len(lost)} tensors); rerun without --resume (or remove {out})")
            self.model.load_state_dict(state, strict=False)
        elif self.chain == "continue":
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            adapter = self._wrap(index)
            set_peft_model_state_dict(adapter, load_peft_weights(str(out / "adapter"),
                                                                 device=str(next(adapter.parameters()).device)))
            for p in adapter.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            from peft import PeftModel

            dtype = next(self.model.parameters()).dtype
            self.model = PeftModel.from_pretrained(self.model, out / "adapter").merge_and_unload()
            self.model.to(dtype).requires_grad_(False)

    def _unwrap(self, trained: Any) -> None:
        """Fold the stage's adapter into the weights: the next stage starts from this result (continue: the
        adapter stays, and trains on in the next stage)."""
        if self.chain == "full":
            self.model.requires_grad_(False)
            return
        if self.chain == "continue":
            return
        dtype = next(self.model.parameters()).dtype
        self.model = trained.merge_and_unload()
        self.model.to(dtype)
        self.model.requires_grad_(False)

    # --- one stage ------------------------------------------------------------------------------------
    def run_stage(self, index: int, data: StageData, resume: bool) -> dict[str, Any]:
        from finemed_cli.ttt.varlen import packed_attention

        stage = self.cfg.stages[index]
        main = self.dist.main
        out = stage_dir(self.cfg, index)
        out.mkdir(parents=True, exist_ok=True)
        total = planned_steps(stage, len(data.train), self.dist.world)
        model = self._wrap(index)
        model.train()
        if self.cfg.model.gradient_checkpointing and self.backend != "unsloth":  # unsloth: set at load
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(stage, total))
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
        elif not resume and main:
            for name in ("metrics.jsonl", "reference_logps.json"):
                (out / name).unlink(missing_ok=True)
        self.dist.barrier()
        moved = self.chain != "merge"  # the weights the reference was taken from have trained since
        if stage.kind == "dpo" and start and moved and not (out / "reference_logps.json").is_file():
            raise ConfigError(f"{out}: the checkpoint is at step {start} but reference_logps.json is gone; the "
                              "model has moved since the stage began, so rerun the stage: delete checkpoint.pt")
        with packed_attention(model):
            reference = self._reference_logps(model, data, out) if stage.kind == "dpo" else None
            before = self._evaluate(model, stage, data, reference)
            summary = self._loop(model, stage, index, data, optimizer, scheduler, params, total, start, out,
                                 reference)
            model.eval()
            after = self._evaluate(model, stage, data, reference)
        summary.update(held_out_before=before, held_out_after=after, processes=self.dist.world)
        self._save(model, out / ("model" if self.chain == "full" else "adapter"))
        self._unwrap(model)
        if main:
            from finemed_cli.train.report import plot_losses

            plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"stage {index + 1}: {stage.label}")
            write_manifest(out, config=self.cfg.to_json(), stage=index, data=data.files, backend=self.backend,
                           seed=self.cfg.seed, processes=self.dist.world, precision=self.precision)
            (out / DONE).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
            ckpt.unlink(missing_ok=True)
        self.dist.barrier()
        return summary

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
                    loss = self._dpo_loss(model, [data.held[i]], stage, reference, [i], held=True)[0]
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
                    c, r = _pair_logps(model, [pairs[i]])
                    if real:
                        mine[split][i] = [float(c[0]), float(r[0])]
        model.train(was)
        ref: dict[str, Any] = {}
        for split in ("train", "held"):
            merged = {i: v for part in self.dist.gather(mine[split]) for i, v in part.items()}
            ref[split] = [merged[i] for i in range(len(getattr(data, split)))]
        if self.dist.main:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps(ref))
            tmp.replace(path)
        return ref

    def _my_share(self, n: int) -> list[tuple[int, bool]]:
        """This rank's indices of `n` items (`fsdp.my_share`: sharded, padded with replays of item 0)."""
        return fsdp.my_share(list(range(n)), self.dist.rank, self.dist.world, self.fsdp, 0)

    def _dpo_loss(self, model: Any, pairs: list[tuple[Encoded, Encoded]], stage: StageSettings,
                  reference: dict[str, Any], indices: list[int],
                  held: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sigmoid DPO loss per pair (`indices`: the pairs' positions in their split, for the reference
        log-probabilities), the implicit reward margin, and whether chosen wins."""
        pc, pr = _pair_logps(model, pairs)
        table = reference["held" if held else "train"]
        ref = torch.tensor([table[i] for i in indices], device=pc.device)
        margin = stage.beta * ((pc - ref[:, 0]) - (pr - ref[:, 1]))
        return -torch.nn.functional.logsigmoid(margin), margin.detach(), (margin > 0).float()

    def _loop(self, model: Any, stage: StageSettings, index: int, data: StageData, optimizer: Any,
              scheduler: Any, params: list[torch.Tensor], total: int, start: int, out: Path,
              reference: Any) -> dict[str, Any]:
        from tqdm import tqdm

        dist = self.dist
        seed = self.cfg.seed * 1000 + index
        bar = tqdm(total=total, initial=start, desc=f"stage {index + 1}/{len(self.cfg.stages)} {stage.label}",
                   unit="step", disable=not (self.progress and dist.main), dynamic_ncols=True)
        t0 = time.perf_counter()
        tokens_seen = 0
        last_loss = None
        with JsonlAppender(out / "metrics.jsonl") if dist.main else _NoMetrics() as metrics:
            for step, step_micro in enumerate(_step_stream(stage, len(data.train), seed, total, dist.world)):
                if step < start:
                    continue
                # This process's share, normalised globally; sharded, every rank runs as many passes as rank 0
                # (the longest share), replaying a micro-batch at zero weight where its own share is short.
                share = fsdp.my_share(step_micro, dist.rank, dist.world, self.fsdp, step_micro[0])
                optimizer.zero_grad(set_to_none=True)
                logged: dict[str, float] = {"loss": 0.0}
                step_tokens = 0
                if stage.kind == "sft":
                    denom = sum(data.train[i].target_tokens for mb in step_micro for i in mb)
                    for mb, real in share:
                        seqs = [data.train[i] for i in mb]
                        with self.amp():
                            loss = _sequence_nll(model, seqs).sum() / denom * (1.0 if real else 0.0)
                        loss.backward()
                        if real:
                            logged["loss"] += float(loss.detach())
                            step_tokens += sum(len(s.input_ids) for s in seqs)
                else:
                    count = sum(len(mb) for mb in step_micro)
                    logged.update(margin=0.0, accuracy=0.0)
                    for mb, real in share:
                        pairs = [data.train[i] for i in mb]
                        with self.amp():
                            losses, margins, wins = self._dpo_loss(model, pairs, stage, reference, mb)
                        (losses.sum() / count * (1.0 if real else 0.0)).backward()
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
                if stage.max_grad_norm:
                    logged["grad_norm"] = fsdp.grad_norm(params, stage.max_grad_norm)
                if not math.isfinite(logged["loss"]):
                    raise DataError(f"stage {stage.label}: the loss became {logged['loss']} at step {step + 1}; "
                                    "lower lr or check the data")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                tokens_seen += step_tokens
                elapsed = time.perf_counter() - t0
                last_loss = logged["loss"]
                if (step + 1) % self.cfg.log_every == 0 or step + 1 == total:
                    metrics.append({"id": f"step-{step + 1}", "step": step + 1, "lr": lr, "tokens": step_tokens,
                                    "tokens_per_s": round(tokens_seen / elapsed, 1), **logged})
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens_seen / elapsed:.0f}")
                bar.update(1)
                if (step + 1) % self.cfg.save_every == 0 and step + 1 < total:
                    self._checkpoint(out, model, params, optimizer, scheduler, step + 1)
        bar.close()
        elapsed = time.perf_counter() - t0
        return {"stage": index + 1, "kind": stage.kind, "label": stage.label, "steps": total,
                "records": data.report.records, "train_sequences": len(data.train), "held_out": len(data.held),
                "truncated": data.report.truncated, "skipped": data.report.skipped,
                "filtered_out": data.report.filtered_out, "files": data.report.files, "final_loss": last_loss,
                "seconds": round(elapsed, 2), "tokens_per_s": round(tokens_seen / elapsed, 1) if elapsed else None}

    def _checkpoint(self, out: Path, model: Any, params: list[torch.Tensor], optimizer: Any, scheduler: Any,
                    step: int) -> None:
        """Rank 0 writes the trainable state (sharded: gathered from every rank first, a collective)."""
        if self.fsdp:
            state = {"model": fsdp.full_state_dict(model), "optimizer": fsdp.full_optimizer_state(model, optimizer)}
        elif self.dist.main:
            state = {"params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict()}
        if not self.dist.main:
            return
        tmp = out / "checkpoint.pt.tmp"
        torch.save({**state, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": step,
                    "world": self.dist.world}, tmp)
        tmp.replace(out / "checkpoint.pt")

    def _save(self, model: Any, path: Path) -> None:
        """`save_pretrained` by rank 0 (a sharded model's weights gathered from every rank first)."""
        kwargs = {"state_dict": fsdp.full_state_dict(model)} if fsdp.is_sharded(model) else {}
        if self.dist.main:
            model.save_pretrained(path, **kwargs)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A resumable checkpoint, read with `weights_only=True`: tensors and plain Python values only, so a
    planted file cannot run code (torch's full unpickler would run whatever the file names)."""
    import pickle

    try:
        # mmap: the ranks of one machine share the file's pages rather than each holding a copy
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a checkpoint finemed can load safely ({first[:160]}); delete it to rerun "
                          "the stage from its start") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng", "step"} <= state.keys():
        raise ConfigError(f"{path}: not a finemed checkpoint (missing keys); delete it to rerun the stage")
    return state


def _precision(cfg: TrainConfig, device: str) -> str:
    p = cfg.model.precision
    if p == "auto":
        return "bf16" if device.startswith("cuda") or cpu_has_fast_bf16() else "fp32"
    return p


def _amp(device: str, precision: str) -> Any:
    """Forward passes under autocast for bf16/fp16. On CPU the weights stay fp32 (the masters the merged
    stages accumulate into) and only the matmuls run in bf16; on GPU the weights are loaded in bf16 already."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return lambda: torch.autocast(kind, dtype=dtype)


def pick_backend(cfg: TrainConfig, forced: str | None = None) -> str:
    """unsloth when CUDA and unsloth are there (or asked for), transformers+peft otherwise."""
    want = forced or cfg.model.backend
    cuda = torch.cuda.is_available()
    if want == "transformers" or (want == "auto" and cfg.model.fsdp):
        return "transformers"
    if want == "unsloth" and not cuda:
        raise ConfigError("model.backend unsloth needs an NVIDIA GPU; use backend: transformers (or auto) here")
    if want in ("unsloth", "auto") and cuda:
        try:
            import unsloth  # noqa: F401
        except ImportError:
            if want == "unsloth":
                raise ConfigError("model.backend unsloth: unsloth is not installed; pip install 'finemed[gpu]'") from None
            return "transformers"
        return "unsloth"
    return "transformers"


def plan(cfg: TrainConfig, tokenizer: Any, world: int | None = None) -> list[dict[str, Any]]:
    """What each stage will do: records after filters, sequences (pairs for DPO), tokens, steps (over
    `world` processes; default: WORLD_SIZE, as under torchrun)."""
    import os

    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    rows = []
    for i, stage in enumerate(cfg.stages):
        data = prepare_stage_data(cfg, stage, tokenizer)
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
    from finemed_cli.models.loading import pick_device

    run = cfg.run_dir
    chosen = pick_backend(cfg, backend)
    dev = pick_device(device)
    precision = _precision(cfg, dev)
    if cfg.model.method == "qlora" and chosen != "unsloth":
        raise ConfigError("model.method qlora needs the unsloth backend: an NVIDIA GPU and "
                          "pip install 'finemed[gpu]'; use method lora here")
    if cfg.model.fsdp and chosen == "unsloth":
        raise ConfigError("model.fsdp runs on the transformers backend; drop --backend unsloth or set "
                          "model.fsdp false")
    chain = pick_chain(cfg, chosen)
    inputs = [cfg.data_path(p) for stage in cfg.stages for p in stage.data] + [cfg.model.name]
    check_output(run, inputs=inputs, kind="dir", what="run folder")
    dist = init_distributed(dev)
    # One run per run folder: rank 0 holds the lock (the ranks of one run share it).
    lock = OutputLock(run) if dist.main else None
    try:
        if lock is not None:
            lock.acquire()
        taken = run.exists() and any(run.iterdir())
        dist.barrier()  # every rank has looked before rank 0 creates anything
        if taken and not resume:
            raise ConfigError(f"{run} already holds a run; pass --resume to continue it, or --set name=NEW "
                              "for a new one")
        # The run folder is made with the first stage's, once the model has loaded.
        return _run_stages(cfg, resume, chosen, chain, dist.device(dev), precision, progress, dist)
    finally:
        if lock is not None:
            lock.release()
        shutdown(dist)


def pick_chain(cfg: TrainConfig, backend: str) -> str:
    """How LoRA stages follow each other: `merge` or `continue` (see the module docstring)."""
    want = cfg.model.lora.between_stages
    if want == "auto":
        return "continue" if cfg.model.method == "qlora" or backend == "unsloth" else "merge"
    if want == "merge" and backend == "unsloth":
        raise ConfigError("model.lora.between_stages merge runs on the transformers backend only (unsloth "
                          "patches a model's LoRA layers once); use continue (or auto) with unsloth")
    return want


_WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load(cfg: TrainConfig, backend: str, dev: str, weights: str) -> Any:
    from finemed_cli.models.loading import LoadedModel, load_model, load_tokenizer, resolve_model_source

    if backend != "unsloth":
        return load_model(cfg.model.name, device=dev, dtype=weights)
    from finemed_cli.train import unsloth_backend

    name, source, _ = resolve_model_source(cfg.model.name)
    # finemed's tokenizer, not unsloth's (which may fix up pad tokens): both backends tokenize the same.
    return LoadedModel(unsloth_backend.load(cfg, _WEIGHT_DTYPES[weights]), load_tokenizer(cfg.model.name),
                       name, source)


def merge_final(cfg: TrainConfig, adapter_dir: Path, weights: str) -> Any:
    """The base model loaded afresh (CPU, `weights` dtype) with the adapter in `adapter_dir` merged in: for
    a `continue` run, whose base in training may have been 4-bit."""
    from peft import PeftModel

    from finemed_cli.models.loading import load_model

    base = load_model(cfg.model.name, device="cpu", dtype=weights)
    return PeftModel.from_pretrained(base.model, adapter_dir).merge_and_unload().eval()


def _run_stages(cfg: TrainConfig, resume: bool, chosen: str, chain: str, dev: str, precision: str,
                progress: bool, dist: Dist) -> Path:
    run = cfg.run_dir
    # GPU weights in the compute precision, except sharded full fine-tuning: fp32 master shards (1/world
    # each), gathered in the compute precision by FSDP's mixed-precision policy. CPU: fp32 under autocast.
    sharded = cfg.model.fsdp and dist.active
    weights = precision if dev.startswith("cuda") and not sharded else "fp32"
    loaded = _load(cfg, chosen, dev, weights)
    tokenizer, base_name = loaded.tokenizer, loaded.name
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, loaded.model, tokenizer, chosen, progress, dist, precision, dev, chain)
    del loaded  # the trainer holds the model: nothing else may keep it alive (the final merge frees it)
    logger.info("precision %s (weights %s) on %s, backend %s, stages chained by %s", precision, weights, dev,
                chosen, trainer.chain)
    summaries = []
    for i, stage in enumerate(cfg.stages):
        out = stage_dir(cfg, i)
        if resume and (out / DONE).is_file():
            summaries.append(orjson.loads((out / DONE).read_bytes()))
            trainer.adopt(i)
            logger.info("stage %d (%s) already done; its result is taken over", i + 1, stage.label)
            continue
        data = prepare_stage_data(cfg, stage, tokenizer)
        summary = trainer.run_stage(i, data, resume)
        summaries.append(summary)
        if dist.main:
            _log_summary(summary)
    final = run / "final"
    if dist.main and trainer.chain == "continue":
        trainer.model = trainer.adapter = None  # free the training copy (a GPU's memory) before the merge
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        trainer.model = merge_final(cfg, stage_dir(cfg, len(cfg.stages) - 1) / "adapter", weights)
    trainer.model.eval()
    trainer._save(trainer.model, final)  # on every rank: a sharded model is gathered for rank 0
    if dist.main:
        tokenizer.save_pretrained(final)
        for where in (final, run):
            write_manifest(where, config=cfg.to_json(), base_model=base_name, stages=summaries,
                           backend=chosen, seed=cfg.seed, processes=dist.world, precision=precision,
                           between_stages=trainer.chain)
    dist.barrier()
    return run


def _log_summary(s: dict[str, Any]) -> None:
    held = ""
    if s.get("held_out_before") is not None:
        held = f", held-out loss {s['held_out_before']:.4f} -> {s['held_out_after']:.4f}"
    logger.info("stage %d (%s, %s): %d steps, %d sequences (%d truncated), final loss %.4f, %.0f tokens/s%s",
                s["stage"], s["label"], s["kind"], s["steps"], s["train_sequences"], s["truncated"],
                s["final_loss"] or float("nan"), s["tokens_per_s"] or 0, held)
