"""`finemed export`: an HF model directory (optionally with a LoRA merged in) → one GGUF file for llama.cpp.

Written with gguf-py's `GGUFWriter`, streaming: tensor infos are planned from the safetensors headers, then
each tensor is read, converted and written in turn, so peak memory is one tensor, not the model. F32, F16,
BF16, Q8_0 and Q4_0 are written directly; K-quants are made from a temporary F16 file by llama.cpp's own
quantizer, in-process. Nothing is downloaded, cloned or compiled.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.checkpoints.files import open_safetensors, read_json_object
from finemed_cli.console import bar as progress_bar
from finemed_cli.data.output import temporary
from finemed_cli.errors import ExportError
from finemed_cli.export.arch import ArchSpec, arch_of, llama3_rope_factors, permute_rows, write_hparams
from finemed_cli.export.lora_gguf import LoraWeights, load_lora
from finemed_cli.export.vocab import Vocab, load_vocab
from finemed_cli.export.writer import gguf_writer
from finemed_cli.gguf.constants import K_QUANTS, OUTTYPES, SYSTEM_PROMPT_KEY, file_type
from finemed_cli.modeling.prompts import trained_system_prompt

logger = logging.getLogger(__name__)



@dataclass
class ExportResult:
    path: Path
    outtype: str
    seconds: float
    bytes: int
    tensors: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


@dataclass
class _Planned:
    gguf_name: str
    hf_name: str | None  # None for synthesised tensors (rope_freqs)
    shape: tuple[int, ...]  # logical (torch order)
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int


def _ggml_type(outtype: str, shape: tuple[int, ...], gguf_name: str) -> Any:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    # As llama.cpp's converter: 1-D tensors (norms, biases) and rope factors stay F32.
    if outtype == "f32" or len(shape) == 1 or gguf_name.startswith("rope_freqs"):
        return Q.F32
    want = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[outtype]
    block = GGML_QUANT_SIZES[want][0]
    if shape[-1] % block:  # rows not a whole number of blocks: fall back to F16
        return Q.F16
    return want


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


class _Weights:
    """The safetensors of an HF directory, read one tensor at a time."""

    def __init__(self, model_dir: Path) -> None:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{model_dir}: no *.safetensors weights; save the model with "
                              "save_pretrained(safe_serialization=True)")
        self._handles = [open_safetensors(f) for f in files]  # a truncated file: refused before the GGUF opens
        self.where: dict[str, Any] = {}
        for h in self._handles:
            for key in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                self.where[key] = h

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def get(self, name: str) -> Any:
        return self.where[name].get_tensor(name)


def _plan(weights: _Weights, config: dict[str, Any], spec: ArchSpec, outtype: str) -> list[_Planned]:
    import gguf

    names = spec.tensor_names(int(config["num_hidden_layers"]))
    planned = []
    tied = bool(config.get("tie_word_embeddings", False))
    for hf_name in weights.where:
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd as the output projection
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"tensor {hf_name!r} has no GGUF name for architecture {spec.gguf_arch}")
        shape = weights.shape(hf_name)
        qtype = _ggml_type(outtype, shape, gguf_name)
        planned.append(_Planned(gguf_name, hf_name, shape, qtype, _nbytes(shape, qtype)))
    factors = llama3_rope_factors(config)
    if factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        planned.append(_Planned(name, None, tuple(factors.shape), gguf.GGMLQuantizationType.F32,
                                factors.nbytes))
    return planned


def _convert(tensor: Any, qtype: Any) -> Any:
    """torch tensor → numpy array of the bytes GGUF stores for `qtype`."""
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype == Q.F32:
        return tensor.to(torch.float32).numpy()
    if qtype == Q.F16:
        return tensor.to(torch.float16).numpy()
    if qtype == Q.BF16:
        return tensor.to(torch.bfloat16).view(torch.int16).numpy()
    return quants.quantize(tensor.to(torch.float32).numpy(), qtype)


def _write_vocab(writer: Any, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
    for key, add in adders.items():
        if key in vocab.special_ids:
            add(vocab.special_ids[key])
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir}: not an HF model directory (no config.json). `finemed export` takes "
                          "a directory from save_pretrained, e.g. runs/NAME/final")
    return read_json_object(path, "re-save the model with save_pretrained")


def _tensor_data(weights: _Weights, p: _Planned, config: dict[str, Any], spec: ArchSpec,
                 lora: LoraWeights | None) -> Any:
    """The tensor as llama.cpp wants it: LoRA merged (in fp32), q/k permuted, converted."""
    import torch

    if p.hf_name is None:
        return llama3_rope_factors(config)
    t = weights.get(p.hf_name)
    if lora is not None and p.hf_name.endswith(".weight"):
        delta = lora.delta(p.hf_name.removesuffix(".weight"))
        if delta is not None:
            t = t.to(torch.float32) + delta
    if spec.norm_offset and p.gguf_name.endswith("norm.weight"):
        t = t.to(torch.float32) + 1.0  # Gemma's (1 + w) RMSNorm as llama.cpp's w
    if spec.permute_qk:
        heads = {"q_proj": int(config["num_attention_heads"]),
                 "k_proj": int(config.get("num_key_value_heads") or config["num_attention_heads"])}
        for proj, n in heads.items():
            if f".{proj}." in p.hf_name:
                t = permute_rows(t, n)
    return _convert(t.contiguous(), p.qtype)


def _lora_for(weights: _Weights, lora: Any) -> LoraWeights | None:
    """The LoRA to merge in, checked against the base's modules."""
    if lora is None:
        return None
    lora_weights = load_lora(lora)
    unknown = [m for m in lora_weights.modules if f"{m}.weight" not in weights.where]
    if unknown:
        raise ExportError(f"the LoRA adapter targets modules the base lacks: {', '.join(unknown[:3])}")
    return lora_weights


def _add_tensor_info(writer: Any, p: _Planned) -> None:
    """Announce a planned tensor (its data follows later, streamed)."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if p.qtype in (Q.Q8_0, Q.Q4_0):
        byte_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
        writer.add_tensor_info(p.gguf_name, byte_shape, np.dtype(np.uint8), p.nbytes, p.qtype)
    else:
        dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.int16}[p.qtype]
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(dtype), p.nbytes, p.qtype if p.qtype == Q.BF16 else None)


def export_gguf(model_dir: str | os.PathLike[str], output: str | os.PathLike[str], outtype: str = "f16", *,
                lora: Any = None, pre_tokenizer: str | None = None,
                name: str | None = None, progress: bool = False) -> ExportResult:
    """Export an HF model directory to a GGUF file.

    Args:
        model_dir: a directory with config.json, *.safetensors and the tokenizer.
        output: the .gguf file; written to a temporary name and renamed when complete.
        outtype: one of OUTTYPES.
        lora: a LoRA merged into the weights first: a peft adapter directory or a finemed `LoRAAdapter`.
        pre_tokenizer: force llama.cpp's pre-tokenizer name (detected from tokenizer.json by default).
        name: `general.name` (default: the directory's name).
        progress: a tqdm bar over the bytes written.

    Raises:
        ExportError: unsupported architecture, tokenizer or outtype; missing files.
    """
    start = time.perf_counter()
    model_dir, output = Path(model_dir), Path(output)
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    if outtype in K_QUANTS:
        return _export_k_quant(model_dir, output, outtype, lora, pre_tokenizer, name, progress, start)

    import gguf

    config = read_config(model_dir)
    _, spec = arch_of(config)
    vocab = load_vocab(model_dir, config, pre_tokenizer)
    weights = _Weights(model_dir)
    lora_weights = _lora_for(weights, lora)
    plan = _plan(weights, config, spec, outtype)

    with gguf_writer(output, spec.gguf_arch) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or model_dir.name)
        write_hparams(writer, config)
        writer.add_file_type(file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_vocab(writer, vocab)
        found, prompt = trained_system_prompt(model_dir)
        if found and prompt is not None:
            writer.add_string(SYSTEM_PROMPT_KEY, prompt)
        for p in plan:
            _add_tensor_info(writer, p)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(p.nbytes for p in plan)
        with progress_bar(total=total, unit="B", unit_scale=True, desc=f"export {outtype}", progress=progress) as bar:
            for p in plan:
                data = _tensor_data(weights, p, config, spec, lora_weights)
                if data.nbytes != p.nbytes:
                    raise ExportError(f"{p.hf_name}: planned {p.nbytes} bytes, got {data.nbytes} (a bug)")
                writer.write_tensor_data(data)
                bar.update(p.nbytes)
    seconds = time.perf_counter() - start
    logger.info("exported %s (%s, %d tensors) in %.1f s", output, outtype, len(plan), seconds)
    return ExportResult(output, outtype, seconds, output.stat().st_size, len(plan))


def _export_k_quant(model_dir: Path, output: Path, outtype: str, lora: Any, pre_tokenizer: str | None,
                    name: str | None, progress: bool, start: float) -> ExportResult:
    """A K-quant: an F16 export to a temporary file, quantized by llama.cpp's own quantizer."""
    from finemed_cli.export.quantize import quantize_gguf

    tmp = temporary(output, "f16.tmp")  # swept after a kill -9 like any temporary
    try:
        f16 = export_gguf(model_dir, tmp, "f16", lora=lora, pre_tokenizer=pre_tokenizer, name=name, progress=progress)
        quantize_gguf(tmp, output, outtype)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(output, outtype, time.perf_counter() - start, output.stat().st_size, f16.tensors)
