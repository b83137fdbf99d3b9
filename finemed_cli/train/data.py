"""Training data: every supported record shape detected per file, normalised to chat messages, tokenized
with the model's own chat template, loss on the assistant turns only.

Shapes (one per file, detected from its first record and then required of every line):
- `corpus`: FineMed reasoning examples `{question, reasoning, answer, department?, subdepartment?}`
- `alpaca`: `{instruction, input?, output}`
- `sharegpt`: `{conversations: [{from: human|gpt|system, value}]}`
- `messages`: OpenAI `{messages: [{role, content}]}`
- `prompt_completion`: `{prompt, completion}`
- `preference`: `{prompt, chosen, rejected}` (DPO; prompt a string or messages, the answers strings)

A source is a JSONL file or a Hub dataset `hf:org/name[:config]` (the stage's `split`), its fields renamed by
the stage's `columns:` first (data/sources.py). `prepare_stage_data` turns a stage's sources into its
tokenized training and held-out items.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemed_cli.config.train import StageSettings, TrainConfig
from finemed_cli.data.jsonl import RecordError
from finemed_cli.data.records import CorpusRecord
from finemed_cli.data.sources import HubDataset, source_rows
from finemed_cli.errors import ConfigError, DataError
from finemed_cli.manifest import sha256_file
from finemed_cli.modeling.prompts import SYSTEM_PROMPT, Message, example_messages, render_chat, system_turn

logger = logging.getLogger(__name__)
IGNORE = -100

SFT_SHAPES = ("corpus", "alpaca", "sharegpt", "messages", "prompt_completion")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


@dataclass
class Conversation:
    id: str
    messages: list[Message]  # ends with an assistant turn; every assistant turn is trained on
    department: str | None = None
    subdepartment: str | None = None


@dataclass
class Pair:
    id: str
    prompt: list[Message]
    chosen: str
    rejected: str


@dataclass
class Encoded:
    """One tokenized sequence: ids, labels (IGNORE off the assistant turns) and, for DPO, its pair."""

    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def target_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class DataReport:
    files: dict[str, str] = field(default_factory=dict)  # source -> detected shape
    sizes: dict[str, int] = field(default_factory=dict)  # source -> records read (before the filters)
    records: int = 0
    filtered_out: int = 0
    truncated: int = 0
    skipped: int = 0  # nothing left to learn after truncation (the prompt fills max_length)


def detect_shape(obj: dict[str, Any]) -> str | None:
    if not isinstance(obj, dict):
        return None
    if {"prompt", "chosen", "rejected"} <= obj.keys():
        return "preference"
    if {"question", "reasoning", "answer"} <= obj.keys():
        return "corpus"
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if {"instruction", "output"} <= obj.keys():
        return "alpaca"
    if {"prompt", "completion"} <= obj.keys():
        return "prompt_completion"
    return None


def _record_id(obj: dict[str, Any], name: str, line: int) -> str:
    rid = obj.get("id")
    return str(rid) if rid is not None else f"{Path(name).name}:{line}"


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"field {key!r} must be a non-empty string")
    return value


def _messages(value: Any, key: str, roles: dict[str, str] | None = None) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"field {key!r} must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RecordError(f"{key}[{i}] must be an object")
        role = turn.get("from" if roles else "role")
        content = turn.get("value" if roles else "content")
        if roles is not None:
            role = roles.get(role)  # type: ignore[arg-type]
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            want = "{from: human|gpt|system, value: str}" if roles else "{role: system|user|assistant, content: str}"
            raise RecordError(f"{key}[{i}] must be {want}")
        out.append({"role": role, "content": content})
    return out


def _conversation(shape: str, obj: dict[str, Any], rid: str, system: str | None) -> Conversation:
    if shape == "corpus":
        rec = CorpusRecord.from_json({"id": rid, **obj})
        prompt, answer = example_messages(rec, system)
        return Conversation(rid, [*prompt, answer], rec.department, rec.subdepartment)
    if shape == "alpaca":
        user = _text(obj, "instruction")
        extra = obj.get("input")
        if isinstance(extra, str) and extra.strip():
            user = f"{user}\n\n{extra}"
        return Conversation(rid, [{"role": "user", "content": user}, {"role": "assistant", "content": _text(obj, "output")}])
    if shape == "prompt_completion":
        return Conversation(rid, [{"role": "user", "content": _text(obj, "prompt")},
                                  {"role": "assistant", "content": _text(obj, "completion")}])
    msgs = (_messages(obj["messages"], "messages") if shape == "messages"
            else _messages(obj["conversations"], "conversations", _SHAREGPT_ROLES))
    if msgs[-1]["role"] != "assistant":
        raise RecordError("the last turn must be the assistant's (it is what the model learns)")
    return Conversation(rid, msgs)


def _pair(obj: dict[str, Any], rid: str, system: str | None) -> Pair:
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordError("field 'prompt' is empty")
        messages = [*system_turn(system), {"role": "user", "content": prompt}]
    else:
        messages = _messages(prompt, "prompt")
    return Pair(rid, messages, _text(obj, "chosen"), _text(obj, "rejected"))


def read_training_file(path: Path | HubDataset, kind: str, system: str | None = SYSTEM_PROMPT,
                       split: str = "train", columns: dict[str, str] | None = None
                       ) -> tuple[str, list[Conversation] | list[Pair]]:
    """Every record of one source, as conversations (sft) or pairs (dpo), and the detected shape. Corpus
    records and pairs with a plain-text prompt get `system` as their system turn; chat-shaped records keep
    their own. A Hub dataset reads `split`; `columns` renames fields first ({our_field: their_field}).

    Raises:
        DataError: the source's shape does not fit the stage kind, or bad records (all of them, by line/row).
    """
    errors: list[str] = []
    name, _, rows = source_rows(path, split, columns, errors)
    return parse_training_rows(str(name), rows, kind, system, errors)


def parse_training_rows(name: str, rows: Any, kind: str, system: str | None,
                        errors: list[str]) -> tuple[str, list[Conversation] | list[Pair]]:
    """`read_training_file` after reading: the shape detected from the first record, every record parsed."""
    shape: str | None = None
    out: list[Any] = []
    for line, obj in rows:
        if shape is None:
            shape = detect_shape(obj)
            if shape is None:
                keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(
                    f"{name}:{line}: cannot tell the record format from keys {keys}. Use corpus "
                    "{question, reasoning, answer}, alpaca {instruction, output}, ShareGPT {conversations}, "
                    "OpenAI {messages}, {prompt, completion}, or for DPO {prompt, chosen, rejected}; or rename "
                    "the fields with the stage's columns: {our_field: their_field}")
            if (kind == "dpo") != (shape == "preference"):
                need = "preference pairs {prompt, chosen, rejected}" if kind == "dpo" else \
                    "SFT records (corpus, alpaca, ShareGPT, messages or prompt/completion)"
                raise DataError(f"{name}: a {kind} stage needs {need}; this source holds {shape} records")
        elif detect_shape(obj) != shape:
            errors.append(f"{name}:{line}: not a {shape} record like the first one")
            continue
        rid = _record_id(obj, name, line)
        try:
            out.append(_pair(obj, rid, system) if shape == "preference" else _conversation(shape, obj, rid, system))
        except RecordError as e:
            errors.append(f"{name}:{line}: {e}")
    if errors:
        more = f"\n  … and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"{len(errors)} bad record(s):\n  " + "\n  ".join(errors[:20]) + more)
    if shape is None:
        raise DataError(f"{name}: no records")
    return shape, out


def filter_department(convs: list[Conversation], department: str | None,
                      subdepartment: str | None) -> list[Conversation]:
    """Keep the conversations of a department and/or sub-department (case-insensitive)."""
    def same(a: str | None, b: str | None) -> bool:
        return b is None or (a is not None and a.strip().lower() == b.strip().lower())

    return [c for c in convs if same(c.department, department) and same(c.subdepartment, subdepartment)]


def held_out(rid: str, fraction: float, seed: int) -> bool:
    """A stable split by id: the same records are held out on every run and resume."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{rid}".encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def _turn_spans(tokenizer: Any, messages: list[Message]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that keep only the assistant turns' tokens.

    Each assistant turn's span is found by rendering the conversation up to it (with a generation prompt)
    and up to its end; the pieces are tokenized separately, so the boundaries are exact.
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not through.startswith(before):
            cut = through.rfind(m["content"])
            before = through[:cut] if cut >= len(done) else before
        prompt_part = tokenizer(before[len(done):], add_special_tokens=False)["input_ids"]
        answer_part = tokenizer(through[len(before):], add_special_tokens=False)["input_ids"]
        ids += prompt_part + answer_part
        labels += [IGNORE] * len(prompt_part) + answer_part
        done = through
    if ids and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False) \
            and ids[0] != tokenizer.bos_token_id:
        ids.insert(0, tokenizer.bos_token_id)
        labels.insert(0, IGNORE)
    return ids, labels


def encode_conversation(tokenizer: Any, conv: Conversation, max_length: int,
                        report: DataReport) -> Encoded | None:
    """Tokenize one conversation; longer than `max_length`: the end is cut (the prompt is kept whole)."""
    ids, labels = _turn_spans(tokenizer, conv.messages)
    if len(ids) > max_length:
        report.truncated += 1
        ids, labels = ids[:max_length], labels[:max_length]
    enc = Encoded(conv.id, ids, labels)
    if enc.target_tokens == 0:
        report.skipped += 1
        return None
    return enc


def encode_pair(tokenizer: Any, pair: Pair, max_length: int, report: DataReport) -> tuple[Encoded, Encoded] | None:
    """The chosen and rejected sequences of a pair (same prompt), each cut to `max_length`."""
    out = []
    for answer in (pair.chosen, pair.rejected):
        ids, labels = _turn_spans(tokenizer, [*pair.prompt, {"role": "assistant", "content": answer}])
        if len(ids) > max_length:
            report.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        out.append(Encoded(pair.id, ids, labels))
    if min(e.target_tokens for e in out) == 0:
        report.skipped += 1
        return None
    return out[0], out[1]


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


def prepare_stage_data(cfg: TrainConfig, stage: StageSettings, tokenizer: Any,
                       system: str | None = SYSTEM_PROMPT) -> StageData:
    """Read, filter, split and tokenize a stage's files under the run's system prompt `system`; every bad line
    of every file is reported at once."""
    report = DataReport()
    items: list[Any] = []
    hashes = {}
    errors = []
    for p in stage.data:
        source = cfg.data_source(p)
        bad: list[str] = []
        try:
            where, fingerprint, rows = source_rows(source, stage.split, stage.columns, bad)
            name = str(where)
            shape, records = parse_training_rows(name, rows, stage.kind, system, bad)
        except DataError as e:
            errors.append(str(e))
            continue
        report.files[name] = shape
        report.sizes[name] = len(records)
        hashes[name] = fingerprint or sha256_file(source)
        if stage.department or stage.subdepartment:
            if shape != "corpus":
                raise ConfigError(f"{name}: a department filter needs FineMed corpus records (department and "
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
        enc = (encode_pair(tokenizer, it, stage.max_length, report) if stage.kind == "dpo"
               else encode_conversation(tokenizer, it, stage.max_length, report))
        if enc is not None:
            (held if held_out(it.id, stage.eval_fraction, cfg.seed) else train).append(enc)
    if not train:
        raise DataError(f"stage {stage.label}: nothing to train on after tokenizing "
                        f"({report.skipped} record(s) had no response tokens within max_length "
                        f"{stage.max_length}); raise max_length")
    return StageData(train, held, report, hashes)
