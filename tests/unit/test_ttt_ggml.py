"""The ggml TTT engine (issue 36) against the torch engine: same start, same losses, same adapter.

Tolerances, from the measurements behind them (2-core CPU, llama-cpp-python 0.3.36's ggml):
- loss before/after: 1e-4 absolute. Measured on the embedded SmolLM2-135M at F32: 9e-6 and 6e-6.
- adapter: AdamW's first step is lr·g/(|g|+eps), a sign for any gradient well above eps, so an element whose
  gradient is near zero may land anywhere in ±lr in either engine. Measured on the embedded model: 82 of
  290,304 B elements (0.03%) differ by more than 1e-4, none by more than 2·lr (the bound). The test allows
  0.1% and checks the bound exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from finemed_cli.config.answer import TTTConfig
from finemed_cli.data.records import CorpusRecord
from finemed_cli.export.arch import permute_rows
from finemed_cli.modeling.examples import lora_examples
from finemed_cli.modeling.prompts import SYSTEM_PROMPT

pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")

from finemed_cli.ttt.ggml.engine import GgmlTTT, pack_tokens, write_lora_gguf  # noqa: E402
from finemed_cli.ttt.ggml.model import GGUF_TARGETS, open_gguf  # noqa: E402
from finemed_cli.ttt.lora import attach_lora  # noqa: E402
from finemed_cli.ttt.update import lora_session  # noqa: E402

NEIGHBOURS = [
    CorpusRecord("n1", "Which drug is first line in type 2 diabetes?",
                 "Let me think about the findings. Metformin lowers glucose.", "Metformin. The answer is (A)."),
    CorpusRecord("n2", "What causes hyperthyroidism with a diffuse goiter?",
                 "The patient has hyperthyroidism. Let me think.", "Graves disease. The answer is (B)."),
]


def gguf_name(hf: str) -> str:
    parts = hf.split(".")
    return f"blk.{parts[2]}.{GGUF_TARGETS[parts[-1]]}.weight"


def to_gguf_rows(hf: str, b: torch.Tensor, heads: dict[str, int]) -> np.ndarray:
    proj = hf.rsplit(".", 1)[-1]
    return (permute_rows(b, heads[proj]) if proj in heads else b).numpy()


def both_engines(model, tokenizer, gguf, config: TTTConfig):
    """(torch result, {gguf name: torch (A, B) after}, ggml result, the initial {gguf name: (A, B)})."""
    n_layer = model.config.num_hidden_layers
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    first = n_layer - config.resolved_layers(n_layer)
    probe = attach_lora(model, config.rank, config.alpha, config.targets, seed=0, first_layer=first)
    init = {gguf_name(n): (lay.lora_a.detach().numpy().copy(), to_gguf_rows(n, lay.lora_b.detach(), heads))
            for n, lay in probe.layers.items()}
    probe.detach()
    with lora_session(model, tokenizer, NEIGHBOURS, config, 0) as res:
        after = {gguf_name(n): (lay.lora_a.detach().clone().numpy(), to_gguf_rows(n, lay.lora_b.detach().clone(), heads))
                 for n, lay in res.adapter.layers.items()}
    examples = [(e.input_ids[0].tolist(), e.labels[0].tolist())
                for e in lora_examples(tokenizer, NEIGHBOURS, config.max_length, SYSTEM_PROMPT, config.loss_on)]
    engine = GgmlTTT(open_gguf(gguf), config)
    try:
        ours = engine.train(examples, 0, init)
    finally:
        engine.close()
    return res, after, ours, init


def assert_same_adapter(after, ours, lr: float) -> None:
    assert set(after) == set(ours.adapter)
    off = total = 0
    for name, (a, b) in after.items():
        ga, gb = ours.adapter[name]
        for want, got in ((a, ga), (b, gb)):
            diff = np.abs(got - want)
            assert diff.max() <= 2 * lr * ours.steps + 1e-6, name  # no step moves an element further
            off += int((diff > 1e-4).sum())
            total += diff.size
    assert off <= total // 1000, f"{off} of {total} adapter elements differ by more than 1e-4"


@pytest.fixture()
def tiny_gguf(tiny_tokenizer, tmp_path):
    """A 4-layer random Llama (grouped-query attention: 4 heads, 2 KV heads) and its F32 GGUF."""
    from finemed_cli.export.gguf import export_gguf
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save_pretrained(tmp_path / "hf")
    return model, export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", "f32").path


def test_pack_tokens_masks_across_examples_and_restarts_positions() -> None:
    packed = pack_tokens([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])])
    assert packed.pos.tolist() == [0, 1, 2, 0, 1]
    assert packed.rows.tolist() == [0, 1, 3] and packed.targets.tolist() == [6, 7, 9]
    allowed = np.isfinite(packed.mask)
    assert allowed[4].tolist() == [False, False, False, True, True]  # example 2 never sees example 1
    assert allowed[1].tolist() == [True, True, False, False, False]  # nor a token its future


def test_two_steps_match_the_torch_engine_on_a_tiny_llama(tiny_gguf, tiny_tokenizer) -> None:
    model, gguf = tiny_gguf
    config = TTTConfig(steps=2, layers=2, lr=1e-2)  # two steps: A trains too (its gradient is 0 while B = 0)
    res, after, ours, init = both_engines(model, tiny_tokenizer, gguf, config)
    assert ours.tokens == res.tokens
    assert ours.loss_before == pytest.approx(res.loss_before, abs=1e-4)
    assert ours.loss_after == pytest.approx(res.loss_after, abs=1e-4)
    assert ours.loss_after < ours.loss_before
    assert_same_adapter(after, ours, config.resolved_lr())
    # A was compared after it moved: step 2 changed it in both engines
    assert all(np.abs(a - init[n][0]).max() > 1e-3 for n, (a, _) in ours.adapter.items())


def test_the_lora_gguf_equals_the_torch_engines_export(tiny_gguf, tiny_tokenizer, tmp_path) -> None:
    import gguf as gguf_py

    from finemed_cli.export.lora_gguf import export_lora_gguf

    model, path = tiny_gguf
    config = TTTConfig(layers=2)
    res, _, ours, _ = both_engines(model, tiny_tokenizer, path, config)
    theirs_path = export_lora_gguf(res.adapter, model.config.to_dict(), tmp_path / "torch.gguf")
    ours_path = write_lora_gguf(ours, tmp_path / "ggml.gguf")
    theirs, mine = gguf_py.GGUFReader(str(theirs_path)), gguf_py.GGUFReader(str(ours_path))
    assert mine.fields["adapter.type"].contents() == "lora"
    assert mine.fields["adapter.lora.alpha"].contents() == pytest.approx(config.alpha)
    want = {t.name: np.array(t.data) for t in theirs.tensors}
    got = {t.name: np.array(t.data) for t in mine.tensors}
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        assert np.abs(got[name] - w).max() <= 2 * config.resolved_lr() + 1e-6, name


def test_a_q8_0_gguf_trains_on_its_quantized_weights(tiny_tokenizer, tmp_path) -> None:
    from finemed_cli.export.gguf import export_gguf
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save_pretrained(tmp_path / "hf")
    path = export_gguf(tmp_path / "hf", tmp_path / "q8.gguf", "q8_0").path
    weights = open_gguf(path)
    assert weights.type_name("blk.3.attn_q.weight") == "q8_0"  # the graph reads the quantized bytes
    examples = [(e.input_ids[0].tolist(), e.labels[0].tolist())
                for e in lora_examples(tiny_tokenizer, NEIGHBOURS, 2048, SYSTEM_PROMPT, "response")]
    engine = GgmlTTT(weights, TTTConfig(steps=3, layers=2, lr=1e-2))
    try:
        r = engine.train(examples)
    finally:
        engine.close()
    assert np.isfinite(r.loss_before) and r.loss_after < r.loss_before
    assert all(np.abs(b).max() > 0 for _, b in r.adapter.values())


@pytest.mark.integration
def test_one_step_matches_the_torch_engine_on_the_embedded_model_at_f32(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finemed_cli.checkpoints.embedded import embedded_model_dir
    from finemed_cli.export.gguf import export_gguf

    source = embedded_model_dir()
    gguf = export_gguf(source, tmp_path / "f32.gguf", "f32").path
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = TTTConfig()
    res, after, ours, _ = both_engines(model, tokenizer, gguf, config)
    assert ours.loss_before == pytest.approx(res.loss_before, abs=1e-4)
    assert ours.loss_after == pytest.approx(res.loss_after, abs=1e-4)
    assert_same_adapter(after, ours, config.resolved_lr())


def llama_cpp_nll(llm, examples) -> float:
    """Mean NLL of the labelled tokens under llama.cpp, as the TTT loss is measured."""
    total = count = 0.0
    for ids, labels in examples:
        logprobs = llm.logprobs(ids)
        for t in range(len(ids) - 1):
            if labels[t + 1] != -100:
                total -= logprobs[t, labels[t + 1]]
                count += 1
    return total / count


def test_llama_cpp_applies_the_adapter_and_scores_what_the_engine_measured(tiny_gguf, tiny_tokenizer) -> None:
    """End to end: the session's LoRA GGUF, swapped into llama.cpp on the same GGUF, gives llama.cpp's NLL on
    the neighbours equal to the engine's loss after the step (and without it, the loss before)."""
    from finemed_cli.generate.llamacpp import LlamaCpp
    from finemed_cli.ttt.ggml.session import GgmlEngine

    model, path = tiny_gguf
    config = TTTConfig(layers=2, lr=1e-2)
    examples = [(e.input_ids[0].tolist(), e.labels[0].tolist())
                for e in lora_examples(tiny_tokenizer, NEIGHBOURS, config.max_length, SYSTEM_PROMPT, "response")]
    llm = LlamaCpp(path, logits_all=True, exact=True)
    with GgmlEngine(path, config) as engine, engine.session(tiny_tokenizer, NEIGHBOURS) as res:
        assert abs(res.loss_after - res.loss_before) > 1e-3  # the adapter changes what llama.cpp computes
        assert llama_cpp_nll(llm, examples) == pytest.approx(res.loss_before, abs=1e-3)
        with llm.adapter_applied(res.adapter):
            assert llama_cpp_nll(llm, examples) == pytest.approx(res.loss_after, abs=1e-3)
