"""Generator plumbing without a model: the Thought budget, and which backend a run gets."""

from __future__ import annotations

import pytest

from finemed_cli.config.answer import GenerationConfig
from finemed_cli.errors import ConfigError
from finemed_cli.generate.base import budgeted_generate
from finemed_cli.generate.select import make_generator


class CharTokenizer:
    """One token per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def scripted(text: str, stops: bool):
    """A continue_fn that writes `text` (then ends the turn if `stops`), recording each call."""
    calls = []

    def cont(prefix, budget):
        calls.append((len(prefix), budget))
        out = [ord(c) for c in text][:budget]
        return out, stops and len(text) <= budget

    return cont, calls


def test_no_budget_is_one_call() -> None:
    cont, calls = scripted("x" * 50, stops=False)
    assert len(budgeted_generate(cont, CharTokenizer(), [1, 2], 20, None)) == 20
    assert calls == [(2, 20)]


def test_thought_budget_forces_the_summary_header() -> None:
    tok = CharTokenizer()
    cont, calls = scripted("thinking " * 20, stops=False)
    new = budgeted_generate(cont, tok, [1, 2, 3], 100, 30)
    text = tok.decode(new)
    assert text.startswith("thinking thinking") and "\n\n## Summarization\n" in text
    assert len(new) == 100
    header = len("\n\n## Summarization\n")
    assert calls == [(3, 30), (3 + 30 + header, 100 - 30 - header)]


def test_thought_budget_unused_when_the_model_stops_or_summarises() -> None:
    tok = CharTokenizer()
    cont, calls = scripted("short answer", stops=True)
    assert tok.decode(budgeted_generate(cont, tok, [1], 100, 30)) == "short answer"
    assert len(calls) == 1
    cont, calls = scripted("## Summarization\nThe answer is (A). " * 3, stops=False)
    new = budgeted_generate(cont, tok, [1], 100, 30)
    assert tok.decode(new).count("## Summarization") >= 2  # continued, no header forced in between
    assert calls[1] == (31, 70)


def test_paper_mode_cannot_use_llama_cpp(tiny_model) -> None:
    with pytest.raises(ConfigError, match="paper"):
        make_generator(GenerationConfig(backend="llama.cpp"), tiny_model, None, "cpu", ttt_mode="paper")


def test_auto_falls_back_to_transformers_without_an_exportable_model(tiny_model) -> None:
    gen = make_generator(GenerationConfig(backend="auto"), tiny_model, None, "cpu")
    assert gen.backend == "transformers"
    gen = make_generator(GenerationConfig(backend="auto"), tiny_model, "x.gguf", "cpu", ttt_mode="paper")
    assert gen.backend == "transformers"


def test_generation_config_errors() -> None:
    errors = GenerationConfig(backend="vllm", gguf_type="q2_k", max_new_tokens=10, thought_tokens=20).validate()
    assert any("'vllm'" in e for e in errors) and any("q2_k" in e for e in errors)
    assert any("thought tokens" in e for e in errors)


def test_auto_measures_once_and_remembers(tiny_model, tmp_path, monkeypatch) -> None:
    import json

    from finemed_cli.generate import select
    from finemed_cli.generate.base import GenerationResult

    monkeypatch.setenv("FINEMED_HOME", str(tmp_path))
    monkeypatch.setattr(select, "llama_cpp_available", lambda: True)

    class InstantGenerator:
        backend = "llama.cpp"

        def generate(self, messages, max_new_tokens, **kw):
            return GenerationResult("x", max_new_tokens, 0.0, self.backend)

    made = []

    def make():
        made.append(InstantGenerator())
        return made[-1]

    assert select.choose_backend(tiny_model, "cpu", make) == "llama.cpp"
    assert len(made) == 1
    cached = json.loads((tmp_path / "generators.json").read_text())
    (entry,) = cached.values()
    assert entry["backend"] == "llama.cpp" and entry["transformers_tokens_per_s"] > 0
    assert select.choose_backend(tiny_model, "cpu", make) == "llama.cpp"
    assert len(made) == 1  # remembered, not measured again
