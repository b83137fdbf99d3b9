"""`finemed export --ollama`: an Ollama Modelfile beside the GGUF, so `ollama create NAME -f FILE` serves the
model with the prompt format it was trained on: FROM the file, the TEMPLATE of its chat-template family
(export/ollama_template.py), its stop tokens, finemed's system prompt for finemed's own models, and greedy
sampling over the model's context. Everything is read from the GGUF, the file Ollama will load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.errors import ExportError
from finemed_cli.export.ollama_template import ChatFamily, ollama_template
from finemed_cli.gguf.constants import SYSTEM_PROMPT_KEY
from finemed_cli.modeling.template import FALLBACK_TEMPLATE

logger = logging.getLogger(__name__)

MODELFILE_SUFFIX = ".Modelfile"  # med.gguf → med.Modelfile: several exports can share a folder
# As `finemed chat`'s defaults: greedy answers. The context is the model's, capped: Ollama allocates the KV
# cache for all of num_ctx, and 128k tokens of an 8B model's cache is ~16 GB.
TEMPERATURE = 0
NUM_CTX_CAP = 8192


@dataclass
class ModelfileResult:
    path: Path
    family: str
    model_name: str

    @property
    def command(self) -> str:
        """The command that makes the Ollama model."""
        return f"ollama create {self.model_name} -f {shlex.quote(str(self.path))}"


def modelfile_path(gguf_path: str | os.PathLike[str]) -> Path:
    """Where `--ollama` writes the Modelfile of a GGUF: beside it, `<stem>.Modelfile`."""
    path = Path(gguf_path)
    return path.with_name(path.stem + MODELFILE_SUFFIX)


def ollama_model_name(name: str) -> str:
    """A name `ollama create` takes: lower case letters, digits, `.`, `_` and `-`."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return cleaned or "finemed-model"


def _fields(gguf_path: Path) -> dict[str, Any]:
    from gguf import GGUFReader, Keys

    try:
        reader = GGUFReader(str(gguf_path))
    except (OSError, ValueError) as e:
        raise ExportError(f"{gguf_path}: not a readable GGUF ({e})") from None

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value(Keys.General.ARCHITECTURE)
    tokens = value(Keys.Tokenizer.LIST) or []

    def token(key: str) -> str | None:
        i = value(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return {"template": value(Keys.Tokenizer.CHAT_TEMPLATE), "bos": token(Keys.Tokenizer.BOS_ID),
            "eos": token(Keys.Tokenizer.EOS_ID), "add_bos": bool(value(Keys.Tokenizer.ADD_BOS)),
            "context": value(Keys.LLM.CONTEXT_LENGTH.format(arch=arch)) if arch else None,
            "name": value(Keys.General.NAME) or "", "trained_prompt": value(SYSTEM_PROMPT_KEY)}


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ExportError(f'the {what} holds """, which ends a Modelfile value; remove it')
    return f'"""{text}"""'


def modelfile_text(gguf_path: str | os.PathLike[str], model_name: str) -> tuple[str, ChatFamily]:
    """The Modelfile of a GGUF finemed exported, and its chat family (see `write_modelfile`)."""
    from finemed_cli.checkpoints.embedded import gguf_caution
    from finemed_cli.modeling.prompts import gguf_system_prompt

    gguf_path = Path(gguf_path)
    meta = _fields(gguf_path)
    # A GGUF without a chat template is talked to in finemed's plain format, as `finemed chat` and `serve` do
    family, template = ollama_template(meta["template"] or FALLBACK_TEMPLATE, bos=meta["bos"], eos=meta["eos"],
                                       add_bos=meta["add_bos"])
    # The system prompt `finemed chat` and `serve` give this GGUF by default: finemed's own models only.
    system = gguf_system_prompt(None, meta["trained_prompt"], gguf_caution(gguf_path, meta["name"]))
    stops = list(family.stops)
    if meta["eos"] and meta["eos"] not in stops:
        stops.append(meta["eos"])
    lines = [f"# Written by `finemed export --ollama` for {gguf_path.name} (chat template family: {family.title}).",
             f"# Make the model: ollama create {model_name} -f {modelfile_path(gguf_path).name}",
             f"FROM ./{gguf_path.name}",
             f"TEMPLATE {_quoted(template, 'chat template')}"]
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    lines.append(f"PARAMETER temperature {TEMPERATURE}")
    if meta["context"]:
        lines.append(f"PARAMETER num_ctx {min(int(meta['context']), NUM_CTX_CAP)}")
    return "\n".join(lines) + "\n", family


def write_modelfile(gguf_path: str | os.PathLike[str], model_name: str | None = None) -> ModelfileResult:
    """Write an Ollama Modelfile beside a GGUF: FROM the file, a TEMPLATE in Go template syntax for its chat
    template, its stop tokens, finemed's system prompt for finemed's own models, greedy sampling and a
    context of the model's length (at most `NUM_CTX_CAP`).

    Args:
        gguf_path: the exported GGUF.
        model_name: the Ollama model name for the printed command (default: the file's stem).

    Raises:
        ExportError: the GGUF's chat template is one finemed cannot translate (the message says how to write
            TEMPLATE by hand).
    """
    from finemed_cli.data.output import atomic_write

    gguf_path = Path(gguf_path)
    name = ollama_model_name(model_name or gguf_path.stem)
    text, family = modelfile_text(gguf_path, name)
    path = modelfile_path(gguf_path)
    atomic_write(path, text.encode("utf-8"))
    logger.info("wrote %s (%s)", path, family.name)
    return ModelfileResult(path, family.name, name)
