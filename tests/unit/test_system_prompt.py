"""The system prompt is a setting and travels with the model: --system-prompt TEXT|@FILE|none|model, what a
finemed-trained model's final/ records, answer records and eval reports, and the GGUF key chat reads."""

from __future__ import annotations

import json

import pytest

from finemed_cli.data.records import QuestionRecord
from finemed_cli.errors import ConfigError
from finemed_cli.modeling.prompts import (
    MODEL_PROMPT_FILE,
    SYSTEM_PROMPT,
    question_messages,
    resolve_system_prompt,
)
from tests.conftest import make_tiny_llama

TRAINED = "You are an endocrinologist. Think under **Thought**, conclude under **Summarization**."


def test_the_option_values(tmp_path) -> None:
    (tmp_path / "p.txt").write_text("From a file.\n", encoding="utf-8")
    assert resolve_system_prompt(None) == SYSTEM_PROMPT
    assert resolve_system_prompt("model") is None
    assert resolve_system_prompt("none") == ""
    assert resolve_system_prompt("finemed") == SYSTEM_PROMPT
    assert resolve_system_prompt(f"@{tmp_path / 'p.txt'}") == "From a file."
    assert resolve_system_prompt("Be brief.") == "Be brief."
    (tmp_path / MODEL_PROMPT_FILE).write_text(json.dumps({"system_prompt": TRAINED}))
    assert resolve_system_prompt(None, tmp_path) == TRAINED  # the model's own, by default
    assert resolve_system_prompt("Be brief.", tmp_path) == "Be brief."  # the option wins


def test_bad_prompt_files_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*missing.txt.*check the path"):
        resolve_system_prompt(f"@{tmp_path / 'missing.txt'}")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        resolve_system_prompt(f"@{tmp_path / 'latin1.txt'}")
    (tmp_path / MODEL_PROMPT_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="finemed.json: not readable JSON"):
        resolve_system_prompt(None, tmp_path)


def test_model_leaves_the_system_turn_to_the_template_and_none_sends_an_empty_one() -> None:
    q = QuestionRecord(id="q", question="TSH?")
    assert [m["role"] for m in question_messages(q, None)] == ["user"]
    assert question_messages(q, "")[0] == {"role": "system", "content": ""}


@pytest.fixture()
def trained(tmp_path, tiny_tokenizer):
    """A tiny base model with no chat template, trained one SFT stage with a custom system prompt."""
    import yaml

    from finemed_cli.config.train import load_train_config
    from finemed_cli.train.recipe import run_train

    base = tmp_path / "base"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(base)
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.save_pretrained(base)  # a base model: no chat template
    (tmp_path / "prompt.txt").write_text(TRAINED + "\n", encoding="utf-8")
    rows = [{"id": f"r{i}", "question": f"Case {i}: high TSH?", "reasoning": "The thyroid fails.",
             "answer": "The answer is (B)."} for i in range(8)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "name": "p", "output_dir": str(tmp_path / "runs"), "system_prompt": "@prompt.txt",
        "model": {"name": str(base), "lora": {"rank": 4, "alpha": 8}, "precision": "fp32"},
        "stages": [{"kind": "sft", "data": ["corpus.jsonl"], "max_steps": 2, "batch_size": 4, "max_length": 256}]}))
    return run_train(load_train_config(tmp_path / "train.yaml"), progress=False) / "final"


def test_train_stores_its_prompt_and_template_and_answer_uses_them_by_default(trained, tmp_path,
                                                                           monkeypatch) -> None:
    from finemed_cli.checkpoints.loading import load_model
    from finemed_cli.config.answer import AnswerConfig, GenerationConfig, TTTConfig
    from finemed_cli.generate.hf import TransformersGenerator
    from finemed_cli.modeling.template import FALLBACK_TEMPLATE
    from finemed_cli.pipeline.answer import run_answer

    meta = json.loads((trained / MODEL_PROMPT_FILE).read_text())
    assert meta == {"system_prompt": TRAINED, "chat_template": "finemed fallback"}
    loaded = load_model(str(trained), device="cpu")
    assert loaded.tokenizer.chat_template == FALLBACK_TEMPLATE  # saved: the GGUF gets it too

    seen = []
    original = TransformersGenerator.generate

    def spy(self, messages, **kw):
        seen.append(messages)
        return original(self, messages, **kw)

    monkeypatch.setattr(TransformersGenerator, "generate", spy)
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "q1", "question": "TSH?", "options": {"A": "x", "B": "y"}})
                                      + "\n")
    gen = GenerationConfig(max_new_tokens=2, backend="transformers")
    for option, want in ((None, TRAINED), ("model", None), ("Be brief.", "Be brief.")):
        out = tmp_path / f"a-{option}.jsonl"
        run_answer(AnswerConfig(questions=tmp_path / "q.jsonl", output=out, ttt=TTTConfig(mode="off"),
                                generation=gen, system_prompt=option), progress=False, loaded=loaded)
        assert json.loads(out.read_text())["system_prompt"] == want
        assert (seen[-1][0]["content"] if seen[-1][0]["role"] == "system" else None) == want


def test_the_gguf_carries_the_prompt_and_chat_uses_it(trained, tmp_path, monkeypatch) -> None:
    pytest.importorskip("llama_cpp")
    from finemed_cli.export.gguf import export_gguf
    from finemed_cli.generate.chat import ChatSession
    from finemed_cli.gguf.constants import SYSTEM_PROMPT_KEY
    from tests.robustness.conftest import run_finemed

    out = export_gguf(trained, tmp_path / "p.gguf", "f32").path
    from gguf import GGUFReader

    assert GGUFReader(str(out)).fields[SYSTEM_PROMPT_KEY].contents() == TRAINED
    seen = []

    def reply(self, text):
        seen.append(self.messages())
        yield "ok"

    monkeypatch.setattr(ChatSession, "reply", reply)
    assert run_finemed("chat", out, "-p", "hi").code == 0
    assert seen[-1][0] == {"role": "system", "content": TRAINED}
    assert run_finemed("chat", out, "-p", "hi", "--system-prompt", "model").code == 0
    assert seen[-1] == []  # reply() is what adds the user turn; no system turn was set
    (trained / MODEL_PROMPT_FILE).unlink()  # any other model: its template's own default, no finemed prompt
    plain = export_gguf(trained, tmp_path / "plain.gguf", "f32").path
    assert run_finemed("chat", plain, "-p", "hi").code == 0
    assert seen[-1] == []
