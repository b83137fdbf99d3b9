"""GGUF tokenizer → fast HF tokenizer, for a GGUF given as a model (TTT and training need an HF directory).

transformers' own GGUF tokenizer conversion drops byte-level BPE pre-tokenizers (SmolLM2's digit split) and
takes bos for eos, and on a SentencePiece GGUF (Gemma 3) it splits every word into characters; so both are
rebuilt here from the GGUF's own keys, and checked against llama.cpp's tokenizer (tests/export).
"""

from __future__ import annotations

import json
from typing import Any

from finemed_cli.errors import ExportError
from finemed_cli.gguf.tokens import BYTE, CONTROL, NORMAL, PRE_TOKENIZERS, USER_DEFINED


def _fields(reader: Any) -> Any:
    def value(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    return value


def hf_tokenizer_from_gguf(reader: Any) -> Any:
    """A fast HF tokenizer equal to the GGUF's: byte-level BPE (`gpt2`) or SentencePiece BPE (`llama`)."""
    from gguf import Keys
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    K = Keys.Tokenizer
    value = _fields(reader)
    kind = value(K.MODEL)
    if kind == "gpt2":
        spec = _bpe_spec(value)
    elif kind == "llama":
        spec = _spm_spec(value)
    else:
        raise ExportError(f"GGUF tokenizer {kind!r} is not supported (byte-level BPE 'gpt2' and SentencePiece "
                          "'llama' are); pass the model's HF directory instead")
    tokens: list[str] = value(K.LIST)
    names = {K.BOS_ID: "bos_token", K.EOS_ID: "eos_token", K.UNK_ID: "unk_token", K.PAD_ID: "pad_token"}
    kwargs = {arg: tokens[int(value(key))] for key, arg in names.items() if value(key) is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **kwargs)
    template = value(K.CHAT_TEMPLATE)
    if template:
        fast.chat_template = template
    return fast


def _added(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    """Control tokens (special) and user-defined ones (matched whole before the model, as llama.cpp does)."""
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": k == CONTROL}
            for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k in (CONTROL, USER_DEFINED)]


def _bpe_spec(value: Any) -> dict[str, Any]:
    from gguf import Keys

    K = Keys.Tokenizer
    pre = value(K.PRE) or "gpt-2"
    if pre not in PRE_TOKENIZERS:
        raise ExportError(f"GGUF pre-tokenizer {pre!r} unknown to finemed (known: {', '.join(PRE_TOKENIZERS)})")
    tokens: list[str] = value(K.LIST)
    added = [a for a in _added(tokens, value(K.TOKEN_TYPE)) if a["special"]]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in value(K.MERGES)]},
    }


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """BPE merges equivalent to SentencePiece's score-ordered merging (llama.cpp's `llama` tokenizer): every
    split of a normal piece into two normal pieces, the merged piece's score deciding the rank."""
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == NORMAL}
    found = []
    for piece, pid in vocab.items():
        splits = [(piece[:j], piece[j:]) for j in range(1, len(piece)) if piece[:j] in vocab and piece[j:] in vocab]
        splits.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        found += [(-scores[pid], pid, a, b) for a, b in splits]
    found.sort(key=lambda m: (m[0], m[1]))  # highest score first; a piece's splits stay in their order
    return [[a, b] for _, _, a, b in found]


def _spm_spec(value: Any) -> dict[str, Any]:
    from gguf import Keys

    K = Keys.Tokenizer
    tokens: list[str] = value(K.LIST)
    types: list[int] = value(K.TOKEN_TYPE)
    prefix = bool(value(K.ADD_PREFIX) if value(K.ADD_PREFIX) is not None else True)
    space = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, space]} \
        if prefix else space
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = value(K.BOS_ID)
    post = None
    if value(K.ADD_BOS) and bos is not None:
        b = tokens[int(bos)]
        post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": b, "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b: {"id": b, "ids": [int(bos)], "tokens": [b]}}}
    unk = value(K.UNK_ID)
    vocab = {t: i for i, t in enumerate(tokens)}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(tokens, types),
        "normalizer": normalizer, "pre_tokenizer": None, "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[int(unk)] if unk is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": any(k == BYTE for k in types), "ignore_merges": False, "vocab": vocab,
                  "merges": spm_merges(tokens, value(K.SCORES), types)},
    }
