"""How one model passes through the stages of a run: the trainable form of each stage (a fresh or continued
LoRA adapter, or every weight, FSDP-sharded under torchrun), folding a finished stage into the next one's
start, taking over stages finished by an earlier run, and saving.

LoRA stages chain in one of two ways (`model.lora.between_stages`), and in both DPO's reference is the model
as the previous stages left it, with no second copy of the model ever held:
- merge: each stage trains a fresh adapter on the model as the previous stages left it, then merges it in.
  The reference is the model with the adapter disabled.
- continue (qlora, the unsloth backend): one adapter trains through every stage, `stage-K/adapter/` holding
  it as stage K left it; `final/` merges it into the base loaded afresh in 16 bits, so a 4-bit base adds
  no quantization error to the result.
Full fine-tuning saves each stage's weights in `stage-K/model/` (what a resumed run starts from).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from finemed_cli.config.train import TrainConfig
from finemed_cli.errors import ConfigError
from finemed_cli.train import fsdp
from finemed_cli.train.backend import WEIGHT_DTYPES
from finemed_cli.train.distributed import Dist

logger = logging.getLogger(__name__)


def stage_dir(cfg: TrainConfig, index: int) -> Path:
    return cfg.run_dir / f"stage-{index + 1}-{cfg.stages[index].kind}"


class ModelChain:
    """The model of a run as it passes from stage to stage."""

    def __init__(self, cfg: TrainConfig, model: Any, backend: str, dist: Dist, precision: str, device: str,
                 chain: str) -> None:
        self.cfg, self.model, self.backend, self.dist, self.precision = cfg, model, backend, dist, precision
        self.on_gpu = device.startswith("cuda")
        self.chain = "full" if cfg.model.method == "full" else chain
        self.adapter: Any = None  # the one adapter of a `continue` run, once made
        self.fsdp = cfg.model.fsdp and dist.active
        if cfg.model.fsdp and not dist.active:
            logger.warning("model.fsdp: one process, nothing to shard; launch with torchrun or accelerate "
                           "launch to shard over several")

    def wrap(self, index: int) -> Any:
        """The trainable model of stage `index`: a fresh (or the continued) LoRA adapter, or every weight."""
        m = self.cfg.model
        if self.chain == "full":
            self.model.requires_grad_(True)
            if self.fsdp:  # fp32 shards; on a GPU gathered in bf16/fp16 for compute (see `_run_stages`)
                low = self.on_gpu and self.precision != "fp32"
                fsdp.shard(self.model, WEIGHT_DTYPES[self.precision] if low else None)
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

            adapter = self.wrap(index)
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

    def unwrap(self, trained: Any) -> None:
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

    def save(self, model: Any, path: Path) -> None:
        """`save_pretrained` by rank 0 (a sharded model's weights gathered from every rank first)."""
        kwargs = {"state_dict": fsdp.full_state_dict(model)} if fsdp.is_sharded(model) else {}
        if self.dist.main:
            model.save_pretrained(path, **kwargs)
