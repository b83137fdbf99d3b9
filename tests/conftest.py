"""Shared fixtures: tiny random Llama models and a tiny tokenizer built in-process (no network, fixed
seeds), the shared data directory when present, and the markers' skip rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "examples"

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _finemed_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tests share one materialised embedded model per machine (it takes ~20 s to make), but never write
    # into a user's real cache unless FINEMED_HOME already points somewhere.
    os.environ.setdefault("FINEMED_HOME", str(Path.home() / ".cache" / "finemed-tests"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with ChatML special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The patient has hyperthyroidism and the answer is (B).",
        "## Thought\nLet me think about the findings.\n\n## Summarization\nThe answer is (A).",
        "Insulin lowers glucose; metformin is first line in type 2 diabetes.",
        "You are a careful medical expert. Reason step by step before answering.",
    ] * 10
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 4, tie: bool = True):
    """A 4-layer Llama with hidden size 32 and fixed random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def _randomise_norms(model, scale: float = 0.2) -> None:
    """Norm weights off their init (Gemma's zeros, others' ones), so the export's handling of them shows."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * scale)


def make_tiny(family: str, vocab: int):
    """A tiny random model of a family (llama3-tied, mistral, qwen2, qwen3, gemma2, gemma3, phi3), norms off their
    init; Gemma's sliding windows are 8 tokens, so test prompts run past them."""
    import torch
    import transformers as tf

    torch.manual_seed(7)
    # family -> its config; Gemma ties its embeddings (llama.cpp's Gemma graphs have no output tensor)
    common = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 512,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False}
    if family == "llama3-tied":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**common, "tie_word_embeddings": True}, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, sliding_window=None))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2))
        with torch.no_grad():  # random q/k/v biases: the export must carry them
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, head_dim=16))
    elif family == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
            **{**common, "tie_word_embeddings": True}, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
            attn_logit_softcapping=0.5, final_logit_softcapping=0.1,  # low caps: they change the result
            attn_implementation="eager"))
    elif family == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **{**common, "tie_word_embeddings": True}, num_hidden_layers=6, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}))
    elif family == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=4, sliding_window=None))
    else:
        raise ValueError(family)
    _randomise_norms(model)
    if family == "gemma2":  # scores and logits well past the caps, so soft-capping shapes the result
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(6.0)
    return model.eval().requires_grad_(False)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from finemed_cli.checkpoints.loading import LoadedModel

    model = make_tiny_llama(len(tiny_tokenizer))
    return LoadedModel(model, tiny_tokenizer, "tiny-llama", "in-process")


class HashEmbedder:
    """A deterministic bag-of-words embedder for tests: no model, same interface as the real one."""

    name = "test/hash-embedder"
    dimension = 64

    def encode(self, texts, batch_size: int = 32, progress: bool = False):
        import zlib

        import numpy as np

        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % self.dimension] += 1.0
            out[i] /= max(np.linalg.norm(out[i]), 1e-6)
        return out


@pytest.fixture()
def hash_embedder():
    return HashEmbedder()


@pytest.fixture()
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared development data not found at {SHARED_DATA}")
    return SHARED_DATA
