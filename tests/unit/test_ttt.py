"""TTT on tiny random Llamas: losses fall, adapters train, and the base weights come back bit-identical."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finemed_cli.config.answer import TTTConfig
from finemed_cli.data.records import CorpusRecord
from finemed_cli.modeling.examples import IGNORE, lora_examples, paper_examples
from finemed_cli.modeling.loss import FrozenHeadNLL, compute_prefix, example_nll, hf_loss
from finemed_cli.ttt.lora import LoRALinear, attach_lora
from finemed_cli.ttt.update import ttt_session

NEIGHBOURS = [
    CorpusRecord("n1", "Which drug is first line in type 2 diabetes?",
                 "Let me think about the findings. Metformin lowers glucose.", "Metformin. The answer is (A)."),
    CorpusRecord("n2", "What causes hyperthyroidism with a diffuse goiter?",
                 "The patient has hyperthyroidism. Let me think.", "Graves disease. The answer is (B)."),
]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    # Mid-session the adapter wraps each target as `<name>.base`: compare those base weights too.
    now = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert set(now) == set(saved)
    for k, v in saved.items():
        assert torch.equal(now[k], v), f"{k} changed"
        assert not now[k].requires_grad, f"{k} left trainable"


def test_lora_linear_equals_merged_weight() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=True)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 5, 24)
    merged = base.weight + layer.scaling * layer.lora_b @ layer.lora_a
    torch.testing.assert_close(layer(x), F.linear(x, merged, base.bias), rtol=1e-5, atol=1e-5)


def test_attach_targets_top_layers_and_detach_restores_modules(tiny_model) -> None:
    model = tiny_model.model
    originals = {n: m for n, m in model.named_modules()}
    adapter = attach_lora(model, rank=2, alpha=4, targets=("q_proj", "down_proj"), first_layer=3)
    assert sorted(adapter.layers) == ["model.layers.3.mlp.down_proj", "model.layers.3.self_attn.q_proj"]
    assert isinstance(model.model.layers[3].self_attn.q_proj, LoRALinear)
    assert not isinstance(model.model.layers[2].self_attn.q_proj, LoRALinear)
    adapter.detach()
    for n, m in model.named_modules():
        assert originals[n] is m


def test_attach_unknown_target_names_the_models_layers(tiny_model) -> None:
    from finemed_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="q_proj"):
        attach_lora(tiny_model.model, targets=("c_attn",))


def test_lora_examples_mask_the_prompt_and_do_not_pad(tiny_model) -> None:
    tok = tiny_model.tokenizer
    examples = lora_examples(tok, NEIGHBOURS, max_length=4096)
    assert len(examples) == 2
    for e, r in zip(examples, NEIGHBOURS, strict=True):
        labels = e.labels[0].tolist()
        n_prompt = labels.index(next(x for x in labels if x != IGNORE))
        assert n_prompt > 0 and all(x == IGNORE for x in labels[:n_prompt])
        assert all(x != IGNORE for x in labels[n_prompt:])
        assert e.attention_mask is None
        completion = tok.decode(e.input_ids[0, n_prompt:])
        assert completion.startswith("## Thought") and r.answer in completion
    short = lora_examples(tok, NEIGHBOURS[:1], max_length=examples[0].input_ids.shape[1] - 3)
    assert short[0].input_ids.shape[1] == examples[0].input_ids.shape[1] - 3


def test_paper_examples_pad_to_and_exclude_padding(tiny_model) -> None:
    tok = tiny_model.tokenizer
    padded = paper_examples(tok, NEIGHBOURS[:1], pad_to=600)[0]
    plain = paper_examples(tok, NEIGHBOURS[:1], pad_to=0)[0]
    n = plain.input_ids.shape[1]
    assert padded.input_ids.shape == (1, 600)
    assert padded.attention_mask[0].sum() == n
    assert (padded.labels[0, n:] == IGNORE).all() and (padded.labels[0, :n] != IGNORE).all()
    # same loss padded or not: padding changes the cost, not the objective
    model = tiny_model.model
    with torch.no_grad():
        a, na = hf_loss(model, padded)
        b, nb = hf_loss(model, plain)
    assert na == nb
    torch.testing.assert_close(a / na, b / nb, rtol=1e-4, atol=1e-5)


def test_fast_loss_and_prefix_match_the_plain_forward(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    e = lora_examples(tok, NEIGHBOURS[:1], 4096)[0]
    adapter = attach_lora(model, rank=4, alpha=8, first_layer=2)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1)
        logits = model(input_ids=e.input_ids).logits[:, :-1]
        keep = e.labels[:, 1:] != IGNORE
        expected = F.cross_entropy(logits[keep], e.labels[:, 1:][keep], reduction="sum")
        full, n = example_nll(model, e, chunk=7)
        cached, _ = example_nll(model, e, chunk=7, prefix=compute_prefix(model, e, 2))
    adapter.detach()
    assert n == int(keep.sum())
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-4)


def test_fast_loss_gradients_match_the_plain_loss(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    e = lora_examples(tok, NEIGHBOURS[:1], 4096)[0]
    adapter = attach_lora(model, rank=4, alpha=8, first_layer=1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1)
    params = list(adapter.parameters())
    keep = e.labels[:, 1:] != IGNORE
    ref = F.cross_entropy(model(input_ids=e.input_ids).logits[:, :-1][keep], e.labels[:, 1:][keep],
                          reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    ours, _ = example_nll(model, e, chunk=5, prefix=compute_prefix(model, e, 1))
    our_grads = torch.autograd.grad(ours, params)
    adapter.detach()
    for g, r in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens,chunk", [(1, 4), (13, 4), (16, 16), (0, 8)])
def test_frozen_head_nll_gives_cross_entropy_and_its_gradient_under_any_token_weights(tokens, chunk) -> None:
    # the gradient is worked out in the forward pass, so weigh the tokens unevenly to check the backward scales it
    gen = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 50, (tokens,), generator=gen)
    scale = torch.rand(tokens, generator=gen, dtype=torch.float64)
    ours = FrozenHeadNLL.apply(hidden, weight, targets, chunk)
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    if tokens:
        (g,) = torch.autograd.grad((ours * scale).sum(), hidden)
        (r,) = torch.autograd.grad((ref * scale).sum(), hidden)
        torch.testing.assert_close(g, r)
    # a hidden state that needs no gradient (how `rows_nll` calls it under no_grad) takes the losses-only path
    plain = FrozenHeadNLL.apply(hidden.detach(), weight, targets, chunk)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, ours.detach())


@pytest.mark.parametrize("layers", [None, 4])
def test_lora_ttt_lowers_the_loss_and_leaves_the_base_bit_identical(tiny_model, layers) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    saved = snapshot(model)
    config = TTTConfig(mode="lora", steps=3, lr=1e-2, rank=4, layers=layers)
    with ttt_session(model, tok, NEIGHBOURS, config, seed=0) as result:
        assert result.mode == "lora" and result.steps == 3
        assert result.loss_after < result.loss_before
        assert result.tokens > 0 and result.seconds > 0
        assert any(p.abs().sum() > 0 for n, p in result.adapter.state_dict().items() if "lora_B" in n)
        assert_bit_identical(model, saved)  # the base is never written, even mid-session
        expected_layers = {f"model.layers.{i}." for i in range(4 - config.resolved_layers(4), 4)}
        assert {n.split("self_attn")[0].split("mlp")[0] for n in result.adapter.layers} == expected_layers
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert_bit_identical(model, saved)


def test_paper_ttt_updates_every_weight_then_restores_them_bit_identically(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    saved = snapshot(model)
    config = TTTConfig(mode="paper", steps=2, lr=1e-3, pad_to=512)
    with ttt_session(model, tok, NEIGHBOURS, config) as result:
        assert result.mode == "paper"
        assert result.loss_after < result.loss_before
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, saved[k])]
        assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    assert_bit_identical(model, saved)


def test_ttt_off_or_without_neighbours_changes_nothing(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    saved = snapshot(model)
    with ttt_session(model, tok, NEIGHBOURS, TTTConfig(mode="off")) as r:
        assert r.mode == "off" and r.loss_before is None
    with ttt_session(model, tok, [], TTTConfig(mode="lora")) as r:
        assert r.mode == "off"
    assert_bit_identical(model, saved)


def test_session_restores_the_base_when_the_body_raises(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    saved = snapshot(model)
    for mode in ("lora", "paper"):
        with pytest.raises(RuntimeError, match="boom"), \
                ttt_session(model, tok, NEIGHBOURS[:1], TTTConfig(mode=mode, lr=1e-2, pad_to=0)):
            raise RuntimeError("boom")
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert_bit_identical(model, saved)


def test_paper_ttt_on_a_bf16_model_updates_in_fp32_and_restores_bf16_bit_identically(tiny_tokenizer) -> None:
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer)).to(torch.bfloat16)
    saved = snapshot(model)
    with ttt_session(model, tiny_tokenizer, NEIGHBOURS, TTTConfig(mode="paper", lr=1e-6, pad_to=0)) as r:
        assert next(model.parameters()).dtype == torch.float32
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, saved[k].float())]
        assert changed, "a 1e-6 Adam step must survive in fp32"
        assert r.loss_after <= r.loss_before
    assert next(model.parameters()).dtype == torch.bfloat16
    assert_bit_identical(model, saved)


@pytest.fixture(scope="module")
def saved_tiny_llama(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama saved to disk, so that loading it in bf16 is the real path: `from_pretrained(dtype=bf16)`
    keeps the rotary `inv_freq` buffer in fp32, which a cast of the whole model would not."""
    path = tmp_path_factory.mktemp("tiny-llama")
    from tests.conftest import make_tiny_llama

    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["lora", "batched", "paper"])
def test_every_ttt_mode_restores_the_same_model_logits_and_buffers_included(saved_tiny_llama, tiny_tokenizer,
                                                                             mode, dtype) -> None:
    from transformers import LlamaForCausalLM

    from finemed_cli.ttt.update import ttt_batch_session

    model = LlamaForCausalLM.from_pretrained(saved_tiny_llama, dtype=dtype).eval().requires_grad_(False)
    buffers = {n: (b.dtype, b.clone()) for n, b in model.named_buffers()}
    prompt = torch.randint(3, len(tiny_tokenizer), (1, 480), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(prompt).logits
    config = TTTConfig(mode="paper" if mode == "paper" else "lora", lr=1e-2, pad_to=0)
    if mode == "batched":
        with ttt_batch_session(model, tiny_tokenizer, [NEIGHBOURS[:1], NEIGHBOURS[1:]], config) as batch:
            batch.select(0)
            with torch.no_grad():
                during = model(prompt).logits
    else:
        with ttt_session(model, tiny_tokenizer, NEIGHBOURS, config), torch.no_grad():
            during = model(prompt).logits
    assert not torch.equal(during.to(before.dtype), before), "TTT must change the model inside the session"
    with torch.no_grad():
        after = model(prompt).logits
    assert after.dtype == before.dtype and torch.equal(after, before)
    for n, b in model.named_buffers():
        assert b.dtype == buffers[n][0] and torch.equal(b, buffers[n][1]), f"buffer {n} changed"
    assert all(p.dtype == dtype and not p.requires_grad for p in model.parameters())


def test_loss_on_reasoning_learns_the_thought_only(tiny_tokenizer) -> None:
    from finemed_cli.data.records import CorpusRecord
    from finemed_cli.modeling.examples import IGNORE, lora_examples

    rec = CorpusRecord("r", "TSH high, T4 low?", "The thyroid fails, so TSH rises.", "The answer is (B).")
    (whole,) = lora_examples(tiny_tokenizer, [rec], 2048)
    (thought,) = lora_examples(tiny_tokenizer, [rec], 2048, loss_on="reasoning")
    learned = [t for t, label in zip(thought.input_ids[0].tolist(), thought.labels[0].tolist(), strict=True)
               if label != IGNORE]
    text = tiny_tokenizer.decode(learned)
    assert "The thyroid fails" in text and "answer is" not in text and "Summarization" not in text
    assert 0 < thought.target_tokens < whole.target_tokens


def test_examples_from_a_template_whose_generation_prompt_is_not_a_prefix(tiny_tokenizer) -> None:
    """Thinking templates (R1 distills, QwQ) open the generation prompt with '<think>' that the rendered assistant
    turn does not have: the prompt is cut where the response starts, in both loss modes."""
    import copy

    from finemed_cli.data.records import CorpusRecord
    from finemed_cli.modeling.examples import lora_examples

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}")
    rec = CorpusRecord("r", "TSH high, T4 low?", "The thyroid fails.", "The answer is (B).")
    for loss_on in ("response", "reasoning"):
        (example,) = lora_examples(tok, [rec], 2048, loss_on=loss_on)
        assert example.target_tokens > 0
