"""The low-memory path's two copies agree on what the adapter does: TTT trains on a 4-bit NF4 base in torch, and
llama.cpp answers with a Q4_K_M GGUF plus that adapter; the adapter's effect on every next-token log-probability
(with minus without) must match between them, as it does at full precision (F32 on both sides)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finemed_cli.checkpoints.loading import load_model
from finemed_cli.export.gguf import export_gguf, read_config
from finemed_cli.generate.llamacpp import LlamaCpp
from tests.export.conftest import PROMPTS, random_adapter, save_model


@pytest.fixture(scope="module")
def k_quant_sized_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Llama whose rows are 256 wide, so Q4_K_M quantizes real K-blocks (narrower rows fall back)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    return save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("k-quant-sized"))


def _next_token_logps(logps: np.ndarray, ids: list[int]) -> np.ndarray:
    return logps[np.arange(len(ids) - 1), ids[1:]]


def _effects(model_dir, gguf, quantize: str, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(torch's, llama.cpp's) adapter effect on each next-token log-probability, over PROMPTS."""
    loaded = load_model(str(model_dir), device="cpu", quantize=quantize)
    ids_of = [tokenizer(p).input_ids for p in PROMPTS]

    def hf(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = loaded.model(torch.tensor([ids])).logits[0].double()
        return _next_token_logps(torch.log_softmax(logits, -1).numpy(), ids)

    plain = [hf(ids) for ids in ids_of]
    adapter = random_adapter(loaded.model, seed=3, first_layer=0)
    adapted = [hf(ids) for ids in ids_of]
    with LlamaCpp(gguf, n_ctx=256, exact=True, logits_all=True, model_config=read_config(model_dir)) as llama:
        l_plain = [_next_token_logps(llama.logprobs(ids), ids) for ids in ids_of]
        with llama.adapter_applied(adapter):
            l_adapted = [_next_token_logps(llama.logprobs(ids), ids) for ids in ids_of]
    adapter.detach()
    torch_effect = np.concatenate([a - p for a, p in zip(adapted, plain, strict=True)])
    llama_effect = np.concatenate([a - p for a, p in zip(l_adapted, l_plain, strict=True)])
    return torch_effect, llama_effect


def test_the_adapter_moves_a_4bit_base_and_a_q4_k_m_gguf_alike(k_quant_sized_dir, tiny_tokenizer, tmp_path) -> None:
    """Tolerance, stated: at full precision (torch fp32, F32 GGUF) the adapter's effects agree to 0.1% of their
    size. Between the 4-bit copies (NF4 torch, Q4_K_M llama.cpp) they can agree only as far as two independent
    roundings of the base allow: their mean absolute difference must stay within 1.25x the root-sum-square of
    each copy's own difference from full precision, with a correlation above 0.95. Measured (this model,
    adapter seed 3): full 0.00%; NF4 vs Q4_K_M 23.1% of the effect's size against 16.7% (NF4 vs full) and 18.0%
    (Q4_K_M vs full), so 0.94x the root-sum-square; correlation 0.971. An adapter applied at another scale or
    on other layers lands far outside (llama.cpp at half the scale: 86%, and 79% at full precision)."""
    f32 = export_gguf(k_quant_sized_dir, tmp_path / "m-f32.gguf", "f32").path
    q4 = export_gguf(k_quant_sized_dir, tmp_path / "m-q4_k_m.gguf", "q4_k_m").path
    torch_full, llama_full = _effects(k_quant_sized_dir, f32, "none", tiny_tokenizer)
    torch_nf4, llama_q4 = _effects(k_quant_sized_dir, q4, "nf4", tiny_tokenizer)

    def mean_abs(x: np.ndarray) -> float:
        return float(np.abs(x).mean())

    size = mean_abs(torch_full)
    assert size > 0.05  # the adapter moves the log-probabilities measurably
    assert mean_abs(torch_full - llama_full) <= 1e-3 * size
    own = np.hypot(mean_abs(torch_nf4 - torch_full), mean_abs(llama_q4 - llama_full))
    between = mean_abs(torch_nf4 - llama_q4)
    print(f"effect {size:.4f}; NF4 vs Q4_K_M {100 * between / size:.1f}% (root-sum-square of each vs full "
          f"{100 * own / size:.1f}%), correlation {np.corrcoef(torch_nf4, llama_q4)[0, 1]:.3f}")
    assert between <= 1.25 * own
    assert np.corrcoef(torch_nf4, llama_q4)[0, 1] > 0.95
