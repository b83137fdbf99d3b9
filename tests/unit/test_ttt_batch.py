"""Batched multi-adapter TTT equals separate TTT runs: losses, trained adapters, and the model after."""

from __future__ import annotations

import pytest
import torch

from finemed_cli.config.answer import TTTConfig
from finemed_cli.data.records import load_corpus
from finemed_cli.ttt.update import ttt_batch_session, ttt_session
from tests.conftest import EXAMPLES

# Padding and batched matmuls change only the rounding order (fp32).
ATOL = 2e-5


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(EXAMPLES / "corpus.jsonl")


@pytest.mark.parametrize("k", [1, 2])
def test_batched_equals_separate(tiny_model, corpus, k) -> None:
    _batched_equals_separate(tiny_model, corpus, k)


@pytest.mark.cuda
def test_batched_equals_separate_on_cuda(tiny_model, corpus) -> None:
    """The adapters' initial A comes from each adapter's own CPU generator, not CUDA's global one (issue 23)."""
    _batched_equals_separate(tiny_model, corpus, 2, device="cuda")


def test_adapter_initialisation_ignores_the_global_generators(tiny_model) -> None:
    """What makes batched equal sequential on any device: A is drawn from the adapter's own seeded generator."""
    from finemed_cli.ttt.lora import attach_lora, attach_lora_batched

    firsts = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        single = attach_lora(tiny_model.model, seed=5)
        firsts.append({n: m.lora_a.detach().clone() for n, m in single.layers.items()})
        single.detach()
    assert all(torch.equal(firsts[0][n], firsts[1][n]) for n in firsts[0])
    batched = attach_lora_batched(tiny_model.model, 3, seed=5)
    try:
        for name, layer in batched.layers.items():
            for i in range(3):
                assert torch.equal(layer.lora_a[i], firsts[0][name])
    finally:
        batched.detach()


def _batched_equals_separate(tiny_model, corpus, k: int, device: str = "cpu") -> None:
    model, tok = tiny_model.model.to(device), tiny_model.tokenizer
    config = TTTConfig(k=k, steps=2, lr=1e-2, max_length=1500)
    neighbours = [corpus[i : i + k] for i in (0, 7, 21)]  # different lengths: padding is exercised
    state = {n: p.clone() for n, p in model.state_dict().items()}
    separate = []
    for recs in neighbours:
        with ttt_session(model, tok, recs, config, seed=3) as r:
            layers = {n: (m.lora_a.detach().clone(), m.lora_b.detach().clone()) for n, m in r.adapter.layers.items()}
            separate.append((r.loss_before, r.loss_after, layers))
    with ttt_batch_session(model, tok, neighbours, config, seed=3) as batch:
        assert len(batch.results) == 3
        for res, (before, after, layers) in zip(batch.results, separate, strict=True):
            assert res.loss_before == pytest.approx(before, abs=ATOL)
            assert res.loss_after == pytest.approx(after, abs=ATOL)
            assert res.loss_after < res.loss_before
            for name, (a, b) in layers.items():
                va = res.adapter.layers[name]
                torch.testing.assert_close(va.lora_a, a, atol=ATOL, rtol=0)
                torch.testing.assert_close(va.lora_b, b, atol=ATOL, rtol=0)
        # Selecting question 1's adapter gives the logits its own session gave.
        ids = tok("The answer is (B).", return_tensors="pt")["input_ids"].to(device)
        batch.select(1)
        with torch.no_grad():
            got = model(ids).logits
    with ttt_session(model, tok, neighbours[1], config, seed=3), torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for n, p in model.state_dict().items():  # the base is untouched
        assert torch.equal(p, state[n]), n


def test_packed_forward_equals_separate_forwards(tiny_model) -> None:
    from finemed_cli.modeling.examples import TrainingExample, pack_examples
    from finemed_cli.modeling.varlen import LENGTHS_KWARG, packed_attention

    model = tiny_model.model
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 60, (1, n), generator=g) for n in (5, 17, 9)]
    examples = [TrainingExample(s, s.clone()) for s in seqs]
    packed = pack_examples(examples)
    assert packed.lengths == (5, 17, 9) and packed.position_ids[0, 5] == 0
    assert (packed.labels[0, [0, 5, 22]] == -100).all()  # no loss across a sequence boundary
    impl = model.config._attn_implementation
    with torch.no_grad():
        with packed_attention(model):
            got = model(packed.input_ids, position_ids=packed.position_ids,
                        **{LENGTHS_KWARG: packed.lengths}).logits
            unpacked = model(seqs[1]).logits  # without lengths: ordinary attention
        want = torch.cat([model(s).logits for s in seqs], dim=1)
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(unpacked, want[:, 5:22], atol=1e-5, rtol=0)
