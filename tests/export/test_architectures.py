"""Every architecture in the export registry, on a tiny random model built in-process: transformers' logits
against llama.cpp's on the exported F32 GGUF (F32 KV cache, no flash attention), the chat prompt's tokens, and
a TTT LoRA adapter exported as a GGUF LoRA giving the adapted model's logits. Prompts run past the sliding
windows (8 tokens here), so the windowed layers are checked too.

Tolerance: 1e-3 absolute on normalised log-probabilities (as tests/export/test_gguf_tiny.py); `-s` prints the
largest difference, recorded in the README's model table. Llama/Mistral/Qwen3/Phi-3 agree to ~1e-6; Gemma to
3e-4..9e-4, as llama.cpp's CPU GELU reads an F16 table.
"""

from __future__ import annotations

import numpy as np
import pytest

from finemed_cli.errors import ExportError
from finemed_cli.export.arch import ARCHITECTURES, arch_of
from finemed_cli.export.gguf import export_gguf, read_config
from finemed_cli.generate.llamacpp import LlamaCppGenerator
from tests.conftest import make_tiny
from tests.export.conftest import PROMPTS, hf_logprobs, load_hf, random_adapter, save_model

TOL = 1e-3
LONG = ("A 45-year-old woman has weight loss, tremor and heat intolerance for three months. TSH is 0.01 "
        "mIU/L and free T4 is 4.5 ng/dL; the thyroid is diffusely enlarged. The answer is (B).")


FAMILIES = {"llama3-tied": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
            "gemma3": "gemma3",
            "phi3": "phi3"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tiny_tokenizer, tmp_path_factory):
    family = request.param
    tokenizer = tiny_tokenizer
    # Not named after the family: llama.cpp gives a model *named* phi3 the special tokens of Phi-3's own
    # vocabulary (<s>, </s>, <unk>), which this tiny one lacks
    d = save_model(make_tiny(family, len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny"))
    return family, d, export_gguf(d, d.parent / f"{family}-f32.gguf", "f32").path, tokenizer


def _ids(tokenizer) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in [*PROMPTS, LONG]]


def test_logits_match_transformers(exported) -> None:
    family, d, gguf_path, tiny_tokenizer = exported
    from gguf import GGUFReader

    assert GGUFReader(str(gguf_path)).fields["general.architecture"].contents() == FAMILIES[family]
    model = load_hf(d)
    with LlamaCppGenerator(gguf_path, tiny_tokenizer, None, exact=True, logits_all=True, n_ctx=512) as gen:
        worst = max(float(np.abs(gen.logprobs(ids) - hf_logprobs(model, ids)).max()) for ids in _ids(tiny_tokenizer))
    print(f"{family}: max |Δ log-prob| {worst:.2e}")
    assert worst < TOL


def test_chat_prompt_tokens_match_transformers(exported) -> None:
    from finemed_cli.generate.chat import ChatSession

    _, _, gguf_path, tiny_tokenizer = exported
    messages = [{"role": "system", "content": "You are a careful medical expert."},
                {"role": "user", "content": "Is 125 mg/dL of glucose high?"}]
    want = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    session = ChatSession(gguf_path, n_ctx=512)
    try:
        assert session.prompt_ids(messages) == list(want)
    finally:
        session.close()


def test_a_ttt_adapter_as_a_gguf_lora_gives_the_adapted_models_logits(exported) -> None:
    family, d, gguf_path, tiny_tokenizer = exported
    model = load_hf(d)
    ids = tiny_tokenizer(LONG, add_special_tokens=False)["input_ids"]
    with LlamaCppGenerator(gguf_path, tiny_tokenizer, read_config(d), exact=True, logits_all=True,
                           n_ctx=512) as gen:
        before = gen.logprobs(ids)
        adapter = random_adapter(model, seed=3)
        if family == "phi3":  # the default targets reach the fused projections too
            assert {"qkv_proj", "gate_up_proj"} <= {name.rsplit(".", 1)[-1] for name in adapter.layers}
        try:
            want = hf_logprobs(model, ids)
            assert np.abs(want - before).max() > 0.05  # the adapter matters
            with gen.adapter_applied(adapter):
                got = gen.logprobs(ids)
        finally:
            adapter.detach()
    worst = float(np.abs(got - want).max())
    print(f"{family} + LoRA: max |Δ log-prob| {worst:.2e}")
    assert worst < TOL


def test_the_registry_has_an_entry_per_family() -> None:
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
            "Gemma3ForCausalLM", "Phi3ForCausalLM"} <= set(ARCHITECTURES)


@pytest.mark.parametrize(("config", "why"), [
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096, "max_position_embeddings": 32768},
     "sliding attention window"),
    ({"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"type": "longrope"}, "max_position_embeddings": 131072},
     "LongRoPE"),
    ({"architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 18, "hidden_size": 640, "num_attention_heads": 4,
      "head_dim": 256, "query_pre_attn_scalar": 128}, "never reads query_pre_attn_scalar|not the head size"),
    ({"architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 2,
      "head_dim": 32, "query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64"),
])
def test_configs_llama_cpp_cannot_run_are_refused_with_the_reason(config, why) -> None:
    with pytest.raises(ExportError, match=why):
        arch_of(config)



@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_k_m"])
def test_every_outtype_loads_and_predicts_like_f32(exported, outtype) -> None:
    """The other outtypes of the same export: llama.cpp loads them and they rank the next token as F32 does
    (rounding only; K-quant rows of 64 fall back to llama.cpp's own choice of type)."""
    family, d, f32_path, tokenizer = exported
    path = export_gguf(d, d.parent / f"{family}-{outtype}.gguf", outtype).path
    ids = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    with LlamaCppGenerator(f32_path, tokenizer, None, exact=True, logits_all=True, n_ctx=512) as gen:
        want = gen.logprobs(ids)
    with LlamaCppGenerator(path, tokenizer, None, exact=True, logits_all=True, n_ctx=512) as gen:
        got = gen.logprobs(ids)
    assert np.isfinite(got).all()
    assert float(np.abs(got - want).max()) < (0.05 if outtype in ("f16", "bf16", "q8_0") else 0.5), family


def test_a_hub_style_gemma3_config_keeps_its_local_rope_base(tmp_path) -> None:
    """google/gemma-3-* config.json (transformers 4 style): rope_theta 1e6 global, rope_local_base_freq 1e4."""
    from gguf import GGUFReader, GGUFWriter

    from finemed_cli.export.arch import write_hparams

    config = {"architectures": ["Gemma3ForCausalLM"], "max_position_embeddings": 32768, "hidden_size": 640,
              "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
              "head_dim": 256, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "vocab_size": 262144,
              "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 512}
    writer = GGUFWriter(str(tmp_path / "h.gguf"), "gemma3")
    write_hparams(writer, config)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = GGUFReader(str(tmp_path / "h.gguf")).fields
    assert fields["gemma3.rope.freq_base"].contents() == 1_000_000.0
    assert fields["gemma3.rope.freq_base_swa"].contents() == 10_000.0
