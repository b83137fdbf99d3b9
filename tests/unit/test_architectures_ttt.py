"""TTT and loglik scoring on every architecture finemed exports (tiny random models): a LoRA TTT session lowers
the neighbours' loss and restores the model's logits exactly; option log-likelihoods equal a plain full forward
per option. Qwen3 and Phi-3 take the fast path (frozen-prefix layers, fused head loss, packed scoring); Gemma's
per-layer-type masks and rotary (and Gemma 2's soft-capped head) keep it on the plain one."""

from __future__ import annotations

import math

import pytest
import torch

from finemed_cli.config.answer import TTTConfig
from finemed_cli.data.records import CorpusRecord
from finemed_cli.eval.loglik import option_logliks_batch, shared_prefix
from finemed_cli.modeling.loss import supports_fast_path
from finemed_cli.ttt.update import lora_session
from tests.conftest import make_tiny
from tests.unit.test_eval_loglik import Q2, Q, _brute

NEIGHBOURS = [CorpusRecord("n1", "Graves disease: which antibody?", "Exophthalmos and a diffuse goitre point to "
                           "TSH receptor antibodies.", "The answer is (B)."),
              CorpusRecord("n2", "First-line drug in type 2 diabetes?", "Metformin lowers hepatic glucose output.",
                           "Metformin.")]
FAST = {"llama3-tied": True, "mistral": True, "qwen2": True, "qwen3": True, "phi3": True, "gemma2": False,
        "gemma3": False}


@pytest.mark.parametrize("family", sorted(FAST))
def test_lora_ttt_learns_and_restores_exactly(family, tiny_tokenizer) -> None:
    model = make_tiny(family, len(tiny_tokenizer))
    assert supports_fast_path(model) == FAST[family]
    ids = torch.tensor([tiny_tokenizer(Q2.question * 3, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    config = TTTConfig(steps=3, lr=1e-2, layers=1)
    with lora_session(model, tiny_tokenizer, NEIGHBOURS, config, seed=0) as result:
        assert result.loss_after < result.loss_before
        with torch.no_grad():
            assert not torch.equal(model(ids).logits, before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("family", sorted(FAST))
def test_option_logliks_equal_a_full_forward_per_option(family, tiny_tokenizer) -> None:
    model = make_tiny(family, len(tiny_tokenizer))
    prefix = shared_prefix(model, tiny_tokenizer)
    assert (prefix is not None) == FAST[family]
    for q, got in zip((Q, Q2), option_logliks_batch(model, tiny_tokenizer, [Q, Q2], prefix), strict=True):
        want = _brute(model, tiny_tokenizer, q)
        for letter in q.options:
            assert math.isclose(got[letter].logprob, want[letter], abs_tol=1e-4), (family, q.id, letter)
