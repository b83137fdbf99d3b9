"""Tokenizers to and from GGUF: byte-level BPE (`gpt2` in GGUF, with merges and the pre-tokenizer type) and
SentencePiece (`llama`, from `tokenizer.model`).

llama.cpp reimplements each pre-tokenizer by name (`tokenizer.ggml.pre`), so the name written must be the
one whose splitting equals the HF tokenizer's. We read it off the tokenizer.json pre-tokenizer structure
(the table below); the same table turns a GGUF name back into an HF pre-tokenizer when the embedded GGUF is
materialised, so both directions stay one idea.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemed_cli.errors import ExportError
from finemed_cli.gguf.tokens import BYTE, CONTROL, NORMAL, PRE_TOKENIZERS, UNKNOWN, UNUSED, USER_DEFINED
from finemed_cli.modeling.template import END_OF_TURN_TOKENS


def _signature(pre: dict[str, Any] | None) -> tuple:
    """What decides how text is split; offsets, prefix-space and behaviour flags that do not are ignored."""
    if pre is None:
        return ()
    if pre.get("type") == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _signature(p))
    kind = pre.get("type")
    if kind == "ByteLevel":
        return (("ByteLevel", bool(pre.get("use_regex", True)), bool(pre.get("add_prefix_space", False))),)
    if kind == "Digits":
        return (("Digits", bool(pre.get("individual_digits", False))),)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return (("Split", pattern.get("Regex", pattern.get("String")), bool(pre.get("invert", False))),)
    return ((kind, json.dumps(pre, sort_keys=True)),)


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer name for an HF tokenizer.json.

    Raises:
        ExportError: the pre-tokenizer is not one llama.cpp is known (by us) to reproduce.
    """
    sig = _signature(tokenizer_json.get("pre_tokenizer"))
    for name, pre in PRE_TOKENIZERS.items():
        if _signature(pre) == sig:
            return name
    raise ExportError(
        f"unsupported pre-tokenizer {json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]}; finemed knows "
        f"{', '.join(PRE_TOKENIZERS)}. If you know llama.cpp's name for it, pass --pre-tokenizer NAME")


@dataclass
class Vocab:
    """Everything GGUF's `tokenizer.*` keys carry."""

    model: str  # gpt2 (byte-level BPE) or llama (SentencePiece)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot → id
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(model_dir: Path, cfg: dict[str, Any]) -> str | None:
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _special_ids(cfg: dict[str, Any], model_config: dict[str, Any], ids: dict[str, int],
                 template: str | None) -> dict[str, int]:
    """bos/eos/unk/pad ids from tokenizer_config.json (then config.json), and the template's end-of-turn."""
    out: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):
        text = _token_text(cfg.get(f"{key}_token"))
        if text is not None and text in ids:
            out[key] = ids[text]
        elif isinstance(model_config.get(f"{key}_token_id"), int):
            out[key] = model_config[f"{key}_token_id"]
    # The end-of-turn token of the chat template, when it is not eos: without it llama.cpp would not stop
    # at the end of an answer and the model would go on talking to itself.
    for candidate in END_OF_TURN_TOKENS:
        if template and candidate in template and candidate in ids:
            if ids[candidate] != out.get("eos"):
                out["eot"] = ids[candidate]
            break
    return out


def _adds(tokenizer_json_path: Path | None, cfg: dict[str, Any],
          special: dict[str, int]) -> tuple[bool | None, bool | None]:
    """Whether the tokenizer adds bos / eos on its own: observed through `tokenizers` when there is a
    tokenizer.json (config flags are often stale), else tokenizer_config.json's flags."""
    if tokenizer_json_path is not None and tokenizer_json_path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_json_path))
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
        extra = len(full) > len(plain)
        return (extra and "bos" in special and full[0] == special["bos"],
                extra and "eos" in special and full[-1] == special["eos"])
    return cfg.get("add_bos_token"), cfg.get("add_eos_token")


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_vocab(model_dir: Path, model_config: dict[str, Any], pre_tokenizer: str | None = None) -> Vocab:
    """Read the vocabulary of an HF model directory into GGUF's form, from its files alone (importing
    transformers' tokenizer classes takes about 5 s, longer than the whole F16 export of a small model).

    Args:
        model_dir: the directory (tokenizer.json or tokenizer.model, tokenizer_config.json).
        model_config: its config.json; embedding rows past the tokenizer's are padded as unused tokens.
        pre_tokenizer: override the detected llama.cpp pre-tokenizer name.
    """
    vocab_size = int(model_config["vocab_size"])
    tj_path = model_dir / "tokenizer.json"
    tokenizer_json = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else None
    bpe = tokenizer_json is not None and tokenizer_json.get("model", {}).get("type") == "BPE"
    if bpe and not tokenizer_json["model"].get("byte_fallback"):
        vocab = _bpe_vocab(tokenizer_json, vocab_size, pre_tokenizer)
    elif (model_dir / "tokenizer.model").is_file():
        vocab = _spm_vocab(model_dir / "tokenizer.model", tokenizer_json, vocab_size)
    elif bpe:  # SentencePiece BPE as tokenizer.json only (Gemma without tokenizer.model, a GGUF's materialised)
        vocab = _spm_bpe_vocab(tokenizer_json, vocab_size)
    else:
        raise ExportError(
            f"{model_dir}: no BPE tokenizer.json and no SentencePiece tokenizer.model; finemed exports those "
            "tokenizer kinds")
    cfg = _tokenizer_config(model_dir)
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    vocab.chat_template = _chat_template(model_dir, cfg)
    vocab.special_ids = _special_ids(cfg, model_config, ids, vocab.chat_template)
    vocab.add_bos, vocab.add_eos = _adds(tj_path if tokenizer_json is not None else None, cfg,
                                         vocab.special_ids)
    if cfg.get("add_prefix_space") is not None:
        vocab.add_space_prefix = bool(cfg["add_prefix_space"])
    return vocab


def _bpe_vocab(tj: dict[str, Any], vocab_size: int, pre_tokenizer: str | None) -> Vocab:
    pre = pre_tokenizer or detect_pre_tokenizer(tj)
    by_id: dict[int, str] = {i: t for t, i in tj["model"]["vocab"].items()}
    types: dict[int, int] = {}
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    token_types = [types.get(i, NORMAL if i in by_id else UNUSED) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    return Vocab("gpt2", pre, tokens, token_types, merges=merges)


def _spm_vocab(path: Path, tj: dict[str, Any] | None, vocab_size: int) -> Vocab:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise ExportError("exporting a SentencePiece tokenizer needs the sentencepiece package: "
                          "pip install sentencepiece") from None
    sp = SentencePieceProcessor(model_file=str(path))
    n = sp.vocab_size()
    size = max(vocab_size, n)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-1000.0] * size
    types = [UNUSED] * size
    for i in range(n):
        tokens[i] = sp.id_to_piece(i)
        scores[i] = sp.get_score(i)
        types[i] = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                    UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    for added in (tj or {}).get("added_tokens", []):
        i = added["id"]
        if i >= n:  # tokens added on top of the SentencePiece model
            tokens[i] = added["content"]
            types[i] = CONTROL if added.get("special") else USER_DEFINED
            scores[i] = -1000.0
    return Vocab("llama", "default", tokens, types, scores=scores)


def _spm_bpe_vocab(tj: dict[str, Any], vocab_size: int) -> Vocab:
    """A SentencePiece-style BPE tokenizer.json (byte fallback, '▁' for spaces) as llama.cpp's `llama` vocab.
    llama.cpp merges the adjacent pair whose merged piece scores highest, so each piece scores minus the
    rank of the first merge that makes it: the same order as the BPE merges, the same tokens."""
    model = tj["model"]
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [NORMAL if i in by_id else UNUSED for i in range(size)]
    scores = [-1e9 if i in by_id else -1000.0 for i in range(size)]  # single characters: no merge makes them
    ids = {t: i for i, t in by_id.items()}
    for rank, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = ids.get(a + b)
        if i is not None and scores[i] == -1e9:
            scores[i] = -float(rank)
    for i, t in by_id.items():
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i], scores[i] = BYTE, 0.0
    if model.get("unk_token") in ids:
        types[ids[model["unk_token"]]] = UNKNOWN
    for added in tj.get("added_tokens", []):
        i = added["id"]
        tokens[i] = added["content"]
        types[i] = CONTROL if added.get("special") else USER_DEFINED
        scores[i] = -1000.0
    vocab = Vocab("llama", "default", tokens, types, scores=scores)
    normalizer = json.dumps(tj.get("normalizer") or {})
    vocab.add_space_prefix = '"Prepend"' in normalizer
    return vocab
