"""What an index embeds of each corpus record (`finemed index build --key`).

`question`: the question alone (finemed's default: a test question is compared with questions).
`question+response`: the record as the paper's reference code stores its TTT data — the whole conversation
(system prompt, question, chosen response) rendered with the chat template of the model that TTT trains —
and embedded as that one text, while the query stays the bare question, as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finemed_cli.data.records import CorpusRecord
from finemed_cli.errors import ConfigError

KEYS = ("question", "question+response")


@dataclass(frozen=True)
class IndexKeyConfig:
    """What an index embeds of each record and how (`finemed index build --key --pooling --template-model`)."""

    key: str = "question"  # one of KEYS
    pooling: str = "model"  # how a named embedder pools (retrieval/embed.py); `mean` indexes by L2 distance
    template_model: str | None = None  # whose chat template renders a `question+response` record (None: embedded)


def index_texts(records: list[CorpusRecord], key: str, template_model: str | None = None
                ) -> tuple[list[str], dict[str, Any]]:
    """The text embedded for each record, and what the manifest records about how it was made."""
    if key == "question":
        return [r.question for r in records], {}
    if key != "question+response":
        raise ConfigError(f"--key {key!r} is not one of {', '.join(KEYS)}")
    from finemed_cli.checkpoints.loading import load_tokenizer, resolve_model_source
    from finemed_cli.modeling.prompts import example_messages, render_chat, resolve_system_prompt

    name, source, _ = resolve_model_source(template_model)
    tokenizer = load_tokenizer(template_model)
    system = resolve_system_prompt(None, source)
    texts = []
    for r in records:
        prompt, completion = example_messages(r, system)
        texts.append(render_chat(tokenizer, [*prompt, completion], add_generation_prompt=False))
    return texts, {"template_model_name": name, "system_prompt": system}
