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
    cont, calls = scripted("**Summarization**\nThe answer is (A). " * 3, stops=False)  # FineMedLM-o1's style
    new = budgeted_generate(cont, tok, [1], 100, 30)
    assert "## Summarization" not in tok.decode(new) and calls[1] == (31, 70)


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


def test_auto_falls_back_with_a_notice_when_llama_cpp_cannot_take_the_architecture(
        tiny_tokenizer, tmp_path, monkeypatch, caplog) -> None:
    import logging

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from finemed_cli.checkpoints.loading import LoadedModel
    from finemed_cli.generate import select

    monkeypatch.setenv("FINEMED_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(select, "llama_cpp_available", lambda: True)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64)).eval()
    model.save_pretrained(tmp_path / "neox")
    tiny_tokenizer.save_pretrained(tmp_path / "neox")
    loaded = LoadedModel(model, tiny_tokenizer, "neox", str(tmp_path / "neox"))
    with caplog.at_level(logging.WARNING, logger="finemed_cli.generate.select"):
        gen = make_generator(GenerationConfig(backend="auto"), loaded, None, "cpu")
    assert gen.backend == "transformers"
    (notice,) = [r.getMessage() for r in caplog.records]
    assert notice.startswith("generator auto: transformers, as llama.cpp cannot take this model")
    assert "GPTNeoXForCausalLM" in notice


def _ends_turns_with(model, token_id: int) -> None:
    """Make `token_id` the model's every greedy choice."""
    def push(module, inputs, output):
        output[..., token_id] += 1e4
        return output

    model.lm_head.register_forward_hook(push)


def test_transformers_stops_on_the_end_of_turn_token_when_it_is_not_eos(tiny_tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    from finemed_cli.generate.hf import TransformersGenerator
    from finemed_cli.modeling.prompts import end_of_generation_ids
    from tests.conftest import make_tiny_llama

    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", bos_token="<|im_start|>")
    tok.chat_template = tiny_tokenizer.chat_template  # ChatML: turns end with <|im_end|>, which is not eos
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert eot != tok.eos_token_id
    model = make_tiny_llama(len(tok))
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    assert end_of_generation_ids(tok, model) == [tok.eos_token_id, eot]
    _ends_turns_with(model, eot)
    result = TransformersGenerator(model, tok).generate([{"role": "user", "content": "hi"}], max_new_tokens=16)
    assert result.tokens == 0 and result.text == ""


def test_every_eos_id_the_generation_config_lists_ends_generation(tiny_tokenizer) -> None:
    from finemed_cli.generate.hf import TransformersGenerator
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer))
    other = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, other]  # as Llama 3 and Gemma 3 do
    _ends_turns_with(model, other)
    result = TransformersGenerator(model, tiny_tokenizer).generate([{"role": "user", "content": "hi"}],
                                                                   max_new_tokens=16)
    assert result.tokens == 0


def test_gpu_layers_default_to_all_only_where_llama_cpp_can_offload(monkeypatch) -> None:
    import llama_cpp

    from finemed_cli.backends import default_gpu_layers
    from finemed_cli.checkpoints.loading import resolve_gguf
    from finemed_cli.generate.llamacpp import LlamaCpp

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert default_gpu_layers() == -1
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    assert default_gpu_layers() == 0
    with LlamaCpp(resolve_gguf("embedded:smollm2-135m"), n_ctx=64, n_gpu_layers=3) as llama:
        assert llama.llm.model_params.n_gpu_layers == 3
