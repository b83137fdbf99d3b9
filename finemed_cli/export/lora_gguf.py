"""LoRA adapters for export: read from a peft directory or a live finemed adapter, merged into a base, or
written as a llama.cpp LoRA GGUF (`adapter.type = lora`, per-tensor `<name>.lora_a` / `.lora_b`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.checkpoints.files import check_safetensors, read_json_object
from finemed_cli.errors import ExportError

_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraWeights:
    """Per module (HF name, e.g. `model.layers.3.self_attn.q_proj`): A (r, in) and B (out, r), fp32."""

    rank: int
    alpha: float  # effective: scaling = alpha / rank (rsLoRA folded in)
    modules: dict[str, tuple[Any, Any]]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta(self, module: str) -> Any | None:
        """scaling · B A for a module's weight (out, in), or None when the module has no adapter."""
        ab = self.modules.get(module)
        if ab is None:
            return None
        a, b = ab
        return (b.float() @ a.float()) * self.scaling

    @classmethod
    def from_adapter(cls, adapter: Any) -> LoraWeights:
        """From a `finemed_cli.ttt.lora.LoRAAdapter` (TTT's adapter of one question)."""
        modules = {name: (layer.lora_a.detach().float().cpu(), layer.lora_b.detach().float().cpu())
                   for name, layer in adapter.layers.items()}
        return cls(adapter.rank, float(adapter.alpha), modules)

    @classmethod
    def from_peft_dir(cls, path: Path) -> LoraWeights:
        """From a peft adapter directory (`adapter_config.json` + `adapter_model.safetensors`)."""
        from safetensors.torch import load_file

        cfg_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise ExportError(f"{path}: not a peft LoRA adapter (needs adapter_config.json and "
                              "adapter_model.safetensors)")
        cfg = read_json_object(cfg_path, "save the adapter again with peft's save_pretrained")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ExportError(f"{path}: adapter type {cfg.get('peft_type')!r} is not LoRA")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ExportError(f"{path}: per-module ranks or alphas (rank_pattern/alpha_pattern) are not supported")
        rank, alpha = _rank_and_alpha(cfg, cfg_path)
        if cfg.get("use_rslora"):
            alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha/√r; llama.cpp by alpha/r
        check_safetensors([weights])  # load_file's own words for a file cut short name no file
        state = load_file(str(weights))
        modules: dict[str, list[Any]] = {}
        for key, tensor in state.items():
            name = key.removeprefix(_PEFT_PREFIX)
            for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
                if name.endswith(part):
                    module = name[: -len(part)].replace(".default", "")
                    modules.setdefault(module, [None, None])[slot] = tensor.float()
        bad = [m for m, ab in modules.items() if ab[0] is None or ab[1] is None]
        if bad or not modules:
            raise ExportError(f"{weights}: incomplete LoRA pairs for {', '.join(bad[:3]) or 'every module'}")
        return cls(rank, alpha, {m: (a, b) for m, (a, b) in modules.items()})


def _rank_and_alpha(cfg: dict[str, Any], cfg_path: Path) -> tuple[int, float]:
    """peft's `r` (a positive integer) and `lora_alpha` (a finite number), or one line naming the field."""
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ExportError(f"{cfg_path}: r is {rank!r}; it must be the adapter's rank, a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ExportError(f"{cfg_path}: lora_alpha is {alpha!r}; it must be a finite number")
    return rank, float(alpha)


def load_lora(source: Any) -> LoraWeights:
    """A `LoraWeights` from a peft directory path, a finemed `LoRAAdapter`, or itself."""
    if isinstance(source, LoraWeights):
        return source
    if isinstance(source, (str, os.PathLike)):
        return LoraWeights.from_peft_dir(Path(source))
    if hasattr(source, "layers") and hasattr(source, "rank"):
        return LoraWeights.from_adapter(source)
    raise TypeError(f"cannot read a LoRA adapter from {type(source).__name__}")


def export_lora_gguf(adapter: Any, config: dict[str, Any], output: str | os.PathLike[str],
                     outtype: str = "f32", name: str | None = None) -> Path:
    """Write a LoRA adapter as a llama.cpp LoRA GGUF for a base of the given HF config.

    Args:
        adapter: a peft directory, a finemed `LoRAAdapter` or `LoraWeights`.
        config: the base model's config.json (architecture, layers, heads).
        output: the .gguf file (written under a temporary name, then renamed).
        outtype: f32 or f16.
    """
    import gguf
    import torch

    from finemed_cli.export.arch import arch_of, permute_rows
    from finemed_cli.export.writer import gguf_writer

    if outtype not in ("f32", "f16"):
        raise ExportError(f"LoRA adapters are written as f32 or f16, not {outtype!r}")
    lora = load_lora(adapter)
    _, spec = arch_of(config)
    names = spec.tensor_names(int(config["num_hidden_layers"]))
    dtype = torch.float32 if outtype == "f32" else torch.float16
    heads = {"q_proj": int(config["num_attention_heads"]),
             "k_proj": int(config.get("num_key_value_heads") or config["num_attention_heads"])}
    output = Path(output)
    with gguf_writer(output, spec.gguf_arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name or "finemed LoRA")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.alpha))
        for module, (a, b) in sorted(lora.modules.items()):
            base = names.get_name(module + ".weight", try_suffixes=(".weight",))
            if base is None:
                raise ExportError(f"LoRA module {module!r} has no GGUF name for architecture {spec.gguf_arch}")
            proj = module.rsplit(".", 1)[-1]
            if spec.permute_qk and proj in heads:
                b = permute_rows(b, heads[proj])  # B's rows are the permuted q/k output rows
            writer.add_tensor(f"{base}.lora_a", a.to(dtype).contiguous().numpy())
            writer.add_tensor(f"{base}.lora_b", b.to(dtype).contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return output
