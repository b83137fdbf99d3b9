"""Fixtures for export tests: tiny Llama/Qwen2 models saved as HF directories, and llama.cpp helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finemed_cli.ttt.lora import attach_lora
from tests.conftest import make_tiny_llama

pytest.importorskip("llama_cpp", reason="export parity tests need llama-cpp-python")

PROMPTS = [
    "The patient has hyperthyroidism and the answer is (B).",
    "## Thought\nLet me think about the findings 12 and 345.",
    "Insulin lowers glucose; metformin is first line.",
]


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_qwen2(vocab_size: int, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random biases: the export must carry them
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    model.requires_grad_(False)
    return model


def make_tiny_llama3_rope(vocab_size: int):
    """A tiny Llama with Llama 3.1's frequency-dependent RoPE scaling (exported as the rope_freqs tensor)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_model(make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_untied_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_model(make_tiny_llama(len(tiny_tokenizer), seed=3, tie=False), tiny_tokenizer,
                      tmp_path_factory.mktemp("tiny-untied"))


def hf_logprobs(model, ids: list[int]):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    # eager, as finemed loads Gemma 2 (checkpoints/loading.py): SDPA drops its attention soft-capping
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", attn_implementation="eager").eval()
    model.requires_grad_(False)
    return model


def random_adapter(model, seed: int, first_layer: int = 1):
    """A finemed TTT adapter with random B (a fresh one is the identity), on layers `first_layer` and up."""
    adapter = attach_lora(model, rank=4, alpha=8, seed=seed, first_layer=first_layer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen) * 0.3)
    return adapter
