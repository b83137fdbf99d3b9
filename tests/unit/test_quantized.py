"""The low-memory path (issue 30): TTT on a 4-bit NF4 base, restored exactly; QLoRA training without unsloth;
memory planned before anything loads; the dtype a GPU computes."""

from __future__ import annotations

import json

import pytest
import torch

from finemed_cli.checkpoints.loading import load_model
from finemed_cli.checkpoints.memory import (
    GiB,
    ModelShape,
    Plan,
    Workload,
    choose_plan,
    estimate,
    model_shape,
    parse_size,
)
from finemed_cli.checkpoints.quantized import is_quantized_linear, quantized_weights_digest
from finemed_cli.config.answer import GGUF_TYPES, TTTConfig
from finemed_cli.data.records import CorpusRecord
from finemed_cli.errors import ConfigError, ModelError
from finemed_cli.ttt.update import ttt_session
from tests.conftest import make_tiny_llama

NEIGHBOUR = CorpusRecord(id="n1", question="Which drug is first line in type 2 diabetes?",
                         reasoning="Metformin first.", answer="The answer is metformin.")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-nf4")
    make_tiny_llama(len(tiny_tokenizer), seed=5, tie=False).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_ttt_on_a_4bit_base_learns_and_leaves_the_base_bit_identical(tiny_dir) -> None:
    loaded = load_model(str(tiny_dir), device="cpu", quantize="nf4")
    projections = [m for n, m in loaded.model.named_modules() if n.endswith("q_proj")]
    assert projections and all(is_quantized_linear(m) for m in projections)
    ids = loaded.tokenizer("Metformin is first line.").input_ids
    before, digest = _logits(loaded.model, ids), quantized_weights_digest(loaded.model)
    config = TTTConfig(steps=3, lr=1e-2, layers=0)
    with ttt_session(loaded.model, loaded.tokenizer, [NEIGHBOUR], config) as result:
        adapted = _logits(loaded.model, ids)
        assert len(result.adapter.layers) == 4 * 7
    assert result.loss_after < result.loss_before
    assert not torch.equal(adapted, before)  # the adapter reached the output through the 4-bit layers
    assert quantized_weights_digest(loaded.model) == digest
    assert torch.equal(_logits(loaded.model, ids), before)


def test_batched_ttt_on_a_4bit_base_equals_one_question_at_a_time(tiny_dir) -> None:
    from finemed_cli.ttt.update import ttt_batch_session

    loaded = load_model(str(tiny_dir), device="cpu", quantize="nf4")
    other = CorpusRecord(id="n2", question="What does TSH do?", reasoning="It drives the thyroid.",
                         answer="It stimulates it.")
    config = TTTConfig(steps=2, lr=1e-2, layers=2)
    singles = []
    for rec in (NEIGHBOUR, other):
        with ttt_session(loaded.model, loaded.tokenizer, [rec], config) as r:
            singles.append(r.loss_after)
    with ttt_batch_session(loaded.model, loaded.tokenizer, [[NEIGHBOUR], [other]], config) as batch:
        assert [r.loss_after for r in batch.results] == pytest.approx(singles, abs=1e-4)


def test_qlora_trains_the_tiny_config_to_final_without_unsloth(tmp_path, tiny_tokenizer, monkeypatch) -> None:
    from finemed_cli.config.train import load_train_config
    from finemed_cli.train.recipe import run_train

    model_dir = tmp_path / "tiny"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"Case {i}: high TSH, low T4?",
                                       "completion": "## Thought\nThe thyroid fails.\n\n## Summarization\n(B)."})
                           + "\n" for i in range(8)))
    config = tmp_path / "t.yaml"
    config.write_text(json.dumps({
        "name": "q", "output_dir": str(tmp_path / "runs"), "seed": 1,
        "model": {"name": str(model_dir), "method": "qlora", "backend": "transformers", "precision": "fp32",
                  "lora": {"rank": 4, "alpha": 8}},
        "stages": [{"kind": "sft", "data": [sft.name], "max_steps": 5, "lr": 2e-2, "batch_size": 4,
                    "warmup_ratio": 0.0, "scheduler": "constant", "max_length": 128}]}))
    run = run_train(load_train_config(config), progress=False)
    losses = [json.loads(line)["loss"] for line in (run / "stage-1-sft" / "metrics.jsonl").read_text().splitlines()]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    from safetensors.torch import load_file

    final, base = load_file(run / "final" / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.float32}  # merged into a fresh full-precision base
    changed = {n for n, t in final.items() if not torch.equal(t, base[n])}
    assert changed and all("proj" in n for n in changed)


SHAPE_8B = ModelShape(layer_linear=6_979_321_856, embedding=525_336_576, head=525_336_576, other=266_240,
                      layers=32, hidden=4096, kv_dim=1024, vocab=128256)


def _work(device: str = "cuda", mode: str = "lora", tokens: int = 1024) -> Workload:
    return Workload(device=device, dtype_bytes=2, ttt_mode=mode, ttt_tokens=tokens, ttt_layers=8, loss_chunk=256,
                    generate_tokens=1536)


def test_the_plan_refuses_what_cannot_fit_in_one_line_with_the_fix(monkeypatch) -> None:
    monkeypatch.setenv("FINEMED_MEMORY", "12GB")
    with pytest.raises(ConfigError) as e:
        choose_plan(SHAPE_8B, _work(), "none", "f16", what="llama-8b")
    text = str(e.value)
    assert "\n" not in text and "12.0 GB is available" in text and "--quantize auto (or --quantize nf4" in text
    need = choose_plan(SHAPE_8B, _work(), "auto", "auto", what="llama-8b")  # auto: the plan that fits
    assert need.plan.quantize == "nf4" and need.total <= 12 * GiB
    with pytest.raises(ConfigError, match="--ttt-mode paper copies every weight"):
        choose_plan(SHAPE_8B, _work(mode="paper", tokens=6144), "auto", None, what="llama-8b")
    monkeypatch.setenv("FINEMED_MEMORY", "80GB")
    assert choose_plan(SHAPE_8B, _work(), "auto", "auto").plan == Plan("none", "f16")


def test_the_estimate_grows_with_what_a_plan_holds() -> None:
    full = estimate(SHAPE_8B, Plan("none", "f16"), _work()).total
    two = estimate(SHAPE_8B, Plan("nf4", "q4_k_m"), _work()).total
    one = estimate(SHAPE_8B, Plan("nf4", None), _work()).total
    assert full > 30 * GiB > two > one
    paper = estimate(SHAPE_8B, Plan("none", None), _work(mode="paper", tokens=6144)).total
    assert paper > 128 * GiB  # an fp32 copy, gradients and Adam: 16 bytes a parameter before activations


def test_model_shape_reads_roles_from_the_checkpoint_headers(tiny_dir) -> None:
    shape = model_shape(tiny_dir)
    model = load_model(str(tiny_dir), device="cpu").model
    assert shape.total == sum(p.numel() for p in model.parameters())
    assert shape.layer_linear == sum(m.weight.numel() for n, m in model.named_modules()
                                     if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert shape.head == shape.embedding > 0 and shape.layers == 4


def test_answer_refuses_before_any_load(tmp_path, monkeypatch) -> None:
    """The CLI path: a plan that cannot fit ends before the embedder or the model loads."""
    from finemed_cli.config.answer import AnswerConfig
    from finemed_cli.pipeline import answer as answer_mod

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "q1", "question": "What is TSH?"}) + "\n")
    monkeypatch.setenv("FINEMED_MEMORY", "200MB")
    monkeypatch.setattr("finemed_cli.retrieval.index.CorpusIndex", lambda *a, **k: pytest.fail("index opened"))
    with pytest.raises(ConfigError, match="needs about .* and 0.2 GB is available"):
        answer_mod.run_answer(AnswerConfig(q, tmp_path / "out" / "a.jsonl", index=tmp_path / "idx",
                                           quantize="none"), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("text", "size"), [("12GB", 12 * GiB), ("800MB", 800 * 1024**2), ("1.5G", int(1.5 * GiB)),
                                            ("4096", 4096)])
def test_memory_sizes_parse(text, size) -> None:
    assert parse_size(text) == size
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("twelve")


def test_answer_offers_the_k_quants() -> None:
    from finemed_cli.checkpoints.memory import GGUF_BYTES
    from finemed_cli.gguf.constants import OUTTYPES

    assert {"q4_k_m", "q5_k_m", "q6_k"} <= set(GGUF_TYPES) and set(GGUF_TYPES) - {"auto"} <= set(OUTTYPES)
    assert set(GGUF_BYTES) == set(OUTTYPES)  # the memory plan sizes every outtype answer may ask for


@pytest.mark.parametrize(("capability", "want"), [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_auto_dtype_follows_the_gpu_capability(monkeypatch, capability, want) -> None:
    from finemed_cli.checkpoints.loading import pick_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    assert pick_dtype("auto", "cuda") == want
    if capability < (8, 0):
        with pytest.raises(ModelError, match="no native bf16; use --dtype auto"):
            pick_dtype("bfloat16", "cuda")
    assert pick_dtype("auto", "cpu") == torch.float32


def test_loss_scaling_skips_an_overflowing_step_and_halves_the_scale() -> None:
    from finemed_cli.modeling.loss import LossScaler

    p = torch.nn.Parameter(torch.ones(3))
    scaler = LossScaler(True, factor=8.0, growth_interval=2)
    scaler.scale(p.sum()).backward()
    assert torch.equal(p.grad, torch.full((3,), 8.0)) and scaler.unscale([p]) and torch.equal(p.grad, torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not scaler.unscale([p]) and scaler.factor == 4.0
    off = LossScaler(False)
    loss = p.sum()
    assert off.scale(loss) is loss and off.unscale([p])


def test_ttt_on_an_fp16_model_scales_its_loss_and_learns(tiny_dir) -> None:
    """What a GPU before compute capability 8.0 runs (fp16 weights), on the CPU: the loss is scaled so the
    fp32 adapter's small gradients survive the fp16 backward, and the update lowers the loss."""
    loaded = load_model(str(tiny_dir), device="cpu", dtype="float16")
    with ttt_session(loaded.model, loaded.tokenizer, [NEIGHBOUR], TTTConfig(steps=3, lr=1e-2, layers=0)) as r:
        assert all(p.dtype == torch.float32 for p in r.adapter.parameters())
    assert r.loss_after < r.loss_before and torch.isfinite(torch.tensor(r.loss_after))
