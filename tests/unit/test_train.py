"""finemed train on tiny random models: config errors, data shapes, each stage kind, the DPO reference,
and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from finemed_cli.config.train import load_train_config
from finemed_cli.errors import ConfigError, DataError
from finemed_cli.train.data import IGNORE, DataReport, encode_conversation, read_training_file
from tests.conftest import EXAMPLES, make_tiny_llama


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("train-*.yaml")))
def test_every_example_config_loads(name) -> None:
    # Data files of the GPU examples are the user's own: only the tiny example's ship with finemed.
    cfg = load_train_config(EXAMPLES / name, check_files=name == "train-tiny.yaml")
    assert cfg.stages and cfg.stages[-1].kind == "dpo"


def test_bad_config_reports_every_problem_with_its_key(tmp_path) -> None:
    path = _config(tmp_path, {"modle": {}, "model": {"method": "lorra", "lora": {"rank": 0}},
                              "stages": [{"kind": "ppo", "data": ["missing.jsonl"], "lr": -1, "batch_size": "four"}]})
    with pytest.raises(ConfigError) as e:
        load_train_config(path)
    text = str(e.value)
    assert "modle: unknown key; did you mean 'model'?" in text
    assert "stages.0.batch_size: expected int" in text
    for key in ("model.method", "model.lora.rank", "stages.0.kind", "stages.0.data.0", "stages.0.lr"):
        assert key in text, key


def test_epochs_and_lr_must_be_finite_and_human_sized(tmp_path) -> None:
    """`epochs: 1.0e+300` once planned 6e302 steps (issue 31); an infinite lr stays refused."""
    (tmp_path / "d.jsonl").write_text('{"id": "a", "prompt": "p", "completion": "c"}\n')
    path = _config(tmp_path, {"stages": [{"kind": "sft", "data": ["d.jsonl"], "epochs": 1.0e300, "lr": float("inf")}]})
    with pytest.raises(ConfigError) as e:
        load_train_config(path)
    assert "stages.0.epochs: must be a finite number of passes, above 0 and at most 10000" in str(e.value)
    assert "stages.0.lr: must be a finite number, got inf" in str(e.value)  # the loader's own check


def test_fsdp_needs_full_fine_tuning_on_the_transformers_backend(tmp_path) -> None:
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    path = _config(tmp_path, {"model": {"fsdp": True, "backend": "unsloth"}, "stages": [{"data": [data.name]}]})
    with pytest.raises(ConfigError) as e:
        load_train_config(path)
    assert "model.fsdp: shards full fine-tuning only, but model.method is 'lora'" in str(e.value)
    assert "model.fsdp: runs on the transformers backend" in str(e.value)
    assert load_train_config(path, ["model.method=full", "model.backend=auto"]).model.fsdp


def test_set_overrides_any_key(tmp_path) -> None:
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    path = _config(tmp_path, {"stages": [{"kind": "sft", "data": [data.name]}]})
    cfg = load_train_config(path, ["stages.0.epochs=2", "model.lora.targets=[q_proj]", "name=other"])
    assert cfg.stages[0].epochs == 2.0 and cfg.model.lora.targets == ["q_proj"] and cfg.run_dir.name == "other"
    with pytest.raises(ConfigError, match="stages has 1 entries"):
        load_train_config(path, ["stages.3.lr=1"])


SHAPES = {
    "alpaca": {"instruction": "Name a thyroid hormone.", "input": "", "output": "Thyroxine."},
    "prompt_completion": {"prompt": "Name a thyroid hormone.", "completion": "Thyroxine."},
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                              {"role": "user", "content": "Name a thyroid hormone."},
                              {"role": "assistant", "content": "Thyroxine."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Name a thyroid hormone."},
                                   {"from": "gpt", "value": "Thyroxine."}]},
    "corpus": {"id": "c1", "question": "Name a thyroid hormone.", "reasoning": "The gland makes T4.",
               "answer": "Thyroxine."},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_record_shape_trains_on_the_assistant_turns_only(tmp_path, tiny_tokenizer, shape) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [SHAPES[shape]] * 2)
    got, convs = read_training_file(path, "sft")
    assert got == shape and len(convs) == 2
    enc = encode_conversation(tiny_tokenizer, convs[0], 4096, DataReport())
    learned = tiny_tokenizer.decode([t for t in enc.labels if t != IGNORE])
    assert "Thyroxine." in learned and "Name a thyroid hormone" not in learned
    if shape == "messages":  # both assistant turns, neither user turn
        assert "Hello." in learned and "Hi" not in learned
    assert tiny_tokenizer.decode(enc.input_ids).count("Name a thyroid hormone") == 1


def test_truncation_keeps_the_prompt_and_is_counted(tmp_path, tiny_tokenizer) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "short", "completion": "long answer " * 50}])
    _, convs = read_training_file(path, "sft")
    report = DataReport()
    enc = encode_conversation(tiny_tokenizer, convs[0], 40, report)
    assert len(enc.input_ids) == 40 and report.truncated == 1 and "short" in tiny_tokenizer.decode(enc.input_ids)


def test_bad_data_names_file_line_and_fix(tmp_path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""},
                                               {"instruction": "x", "output": "y"}])
    with pytest.raises(DataError) as e:
        read_training_file(path, "sft")
    assert f"{path}:2: field 'completion' must be a non-empty string" in str(e.value)
    assert f"{path}:3: not a prompt_completion record" in str(e.value)
    with pytest.raises(DataError, match="a dpo stage needs preference pairs"):
        read_training_file(path, "dpo")
    unknown = _write_jsonl(tmp_path / "u.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="u.jsonl:1: cannot tell the record format"):
        read_training_file(unknown, "sft")


@pytest.fixture()
def tiny_run(tmp_path, tiny_tokenizer):
    """A saved tiny model, SFT data and preference pairs, and a config training SFT then DPO."""
    model_dir = tmp_path / "tiny"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    sft = _write_jsonl(tmp_path / "sft.jsonl", [
        {"id": f"s{i}", "prompt": f"Case {i}: high TSH, low T4?",
         "completion": "## Thought\nThe thyroid fails.\n\n## Summarization\nThe answer is (B)."} for i in range(12)])
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": f"Case {i}: first-line drug in type 2 diabetes?"}],
         "chosen": "## Thought\nMetformin first.\n\n## Summarization\nMetformin.",
         "rejected": "## Thought\nInsulin always.\n\n## Summarization\nInsulin."} for i in range(6)])
    body = {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 1, "save_every": 1,
            "model": {"name": str(model_dir), "lora": {"rank": 4, "alpha": 8}, "precision": "fp32"},
            "stages": [{"kind": "sft", "data": [sft.name], "max_steps": 6, "lr": 1e-2, "batch_size": 4,
                        "warmup_ratio": 0.0, "scheduler": "constant", "max_length": 256, "eval_fraction": 0.25},
                       {"kind": "dpo", "data": [pairs.name], "max_steps": 4, "lr": 1e-2, "batch_size": 2,
                        "warmup_ratio": 0.0, "max_length": 256}]}
    return _config(tmp_path, body), model_dir


def _metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_then_dpo_on_a_tiny_model(tiny_run) -> None:
    from transformers import AutoModelForCausalLM

    from finemed_cli.train.data import prepare_stage_data
    from finemed_cli.train.losses import pair_logps
    from finemed_cli.train.recipe import run_train

    path, model_dir = tiny_run
    cfg = load_train_config(path)
    run = run_train(cfg, progress=False)
    sft = json.loads((run / "stage-1-sft" / "summary.json").read_text())
    losses = [m["loss"] for m in _metrics(run / "stage-1-sft")]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert sft["held_out_after"] < sft["held_out_before"]
    assert (run / "stage-1-sft" / "loss.png").stat().st_size > 1000
    dpo = _metrics(run / "stage-2-dpo")
    assert dpo[-1]["loss"] < dpo[0]["loss"] and dpo[0]["loss"] == pytest.approx(0.6931, abs=1e-3)

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    changed = {n for n, p in final.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(any(t in n for t in cfg.model.lora.targets) for n in changed)  # the rest is frozen

    # DPO's reference (adapter disabled) is the SFT result: the base plus stage 1's merged adapter.
    from peft import PeftModel

    sft_model = PeftModel.from_pretrained(base, run / "stage-1-sft" / "adapter").merge_and_unload().eval()
    data = prepare_stage_data(cfg, cfg.stages[1], tokenizer_of(run / "final"))
    ref = json.loads((run / "stage-2-dpo" / "reference_logps.json").read_text())["train"]
    from finemed_cli.modeling.varlen import packed_attention

    with torch.no_grad(), packed_attention(sft_model):
        c, r = pair_logps(sft_model, data.train[:2])
    torch.testing.assert_close(torch.tensor(ref[:2]), torch.stack([c, r], 1), atol=1e-4, rtol=0)


def test_bf16_autocast_on_cpu_trains_and_keeps_fp32_weights(tiny_run) -> None:
    """precision bf16 on CPU: the matmuls autocast, the weights (and so the merged result) stay fp32."""
    from safetensors.torch import load_file

    from finemed_cli.train.backend import autocast
    from finemed_cli.train.recipe import run_train

    path, _ = tiny_run
    run = run_train(load_train_config(path, ["name=bf16", "model.precision=bf16", "stages=[{kind: sft, "
                                             "data: [sft.jsonl], max_steps: 6, lr: 0.01, batch_size: 4, "
                                             "warmup_ratio: 0, max_length: 256}]"]), progress=False)
    losses = [m["loss"] for m in _metrics(run / "stage-1-sft")]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert {t.dtype for t in load_file(run / "final" / "model.safetensors").values()} == {torch.float32}
    assert json.loads((run / "manifest.json").read_text())["precision"] == "bf16"
    with autocast("cpu", "bf16")():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def tokenizer_of(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("chain", ["merge", "continue"])
def test_resume_equals_uninterrupted(tiny_run, monkeypatch, chain) -> None:
    from safetensors.torch import load_file

    from finemed_cli.train import recipe

    path, _ = tiny_run
    chained = f"model.lora.between_stages={chain}"
    whole = recipe.run_train(load_train_config(path, ["name=whole", chained]), progress=False)

    real = recipe.Trainer.checkpoint
    calls = []

    def crash_after_two(self, out, model, params, optimizer, scheduler, step):
        real(self, out, model, params, optimizer, scheduler, step)
        calls.append(step)
        if len(calls) == 5:  # stage 1 done, stage 2 at step 2
            raise KeyboardInterrupt

    monkeypatch.setattr(recipe.Trainer, "checkpoint", crash_after_two)
    cfg = load_train_config(path, ["name=cut", chained])
    with pytest.raises(KeyboardInterrupt):
        recipe.run_train(cfg, progress=False)
    monkeypatch.setattr(recipe.Trainer, "checkpoint", real)
    with pytest.raises(ConfigError, match="pass --resume"):
        recipe.run_train(cfg, progress=False)
    resumed = recipe.run_train(cfg, resume=True, progress=False)
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    assert [m["step"] for m in _metrics(resumed / "stage-2-dpo")] == [1, 2, 3, 4]


def test_resume_refuses_a_checkpoint_of_another_process_count(tiny_run, monkeypatch) -> None:
    """The step stream depends on the number of processes: a checkpoint is resumed only by as many."""
    from finemed_cli.train import recipe

    path, _ = tiny_run
    real = recipe.Trainer.checkpoint

    def stop(self, out, model, params, optimizer, scheduler, step):
        real(self, out, model, params, optimizer, scheduler, step)
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe.Trainer, "checkpoint", stop)
    cfg = load_train_config(path, ["name=cut"])
    with pytest.raises(KeyboardInterrupt):
        recipe.run_train(cfg, progress=False)
    monkeypatch.setattr(recipe.Trainer, "checkpoint", real)
    ckpt = cfg.run_dir / "stage-1-sft" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    assert state["world"] == 1
    torch.save({**state, "world": 2}, ckpt)
    with pytest.raises(ConfigError, match="written by 2 process"):
        recipe.run_train(cfg, resume=True, progress=False)


class _Planted:
    """What an attacker pickles: unpickling it calls a function of their choice (here: writes a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the planted checkpoint ran code"))


def test_resume_never_runs_code_from_a_planted_checkpoint(tiny_run, tmp_path) -> None:
    """`--resume` reads checkpoint.pt with `weights_only=True`: a pickle that would run code is refused, and the
    code does not run."""
    from finemed_cli.train import recipe

    path, _ = tiny_run
    cfg = load_train_config(path, ["name=planted"])
    stage = cfg.run_dir / "stage-1-sft"
    stage.mkdir(parents=True)
    marker = tmp_path / "pwned.txt"
    torch.save({"params": [], "optimizer": _Planted(marker), "scheduler": {}, "rng": torch.get_rng_state(),
                "step": 1, "world": 1}, stage / "checkpoint.pt")
    with pytest.raises(ConfigError, match="not a checkpoint finemed can load safely"):
        recipe.run_train(cfg, resume=True, progress=False)
    assert not marker.exists(), "unpickling the checkpoint ran the planted code"
    # The same file through the unsafe path would have run it: the test can fail.
    torch.load(stage / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_full_fine_tuning_resumes_from_the_saved_stage_weights(tiny_run, monkeypatch) -> None:
    """A finished full-fine-tuning stage leaves its weights in stage-K/model/; a resumed run starts the
    next stage from them, so its result equals an uninterrupted run's."""
    from safetensors.torch import load_file

    from finemed_cli.train import recipe

    path, _ = tiny_run
    sft = "{kind: sft, data: [sft.jsonl], max_steps: 3, lr: 0.001, batch_size: 4, warmup_ratio: 0, max_length: 256}"
    sets = ["model.method=full", f"stages=[{sft}, {sft}]"]
    whole = recipe.run_train(load_train_config(path, ["name=whole", *sets]), progress=False)
    real = recipe.Trainer.run_stage

    def stop_at_second(self, index, data, resume):
        if index == 1:
            raise KeyboardInterrupt
        return real(self, index, data, resume)

    monkeypatch.setattr(recipe.Trainer, "run_stage", stop_at_second)
    cfg = load_train_config(path, ["name=cut", *sets])
    with pytest.raises(KeyboardInterrupt):
        recipe.run_train(cfg, progress=False)
    monkeypatch.setattr(recipe.Trainer, "run_stage", real)
    assert (cfg.run_dir / "stage-1-sft" / "model").is_dir()
    resumed = recipe.run_train(cfg, resume=True, progress=False)
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_continue_trains_one_adapter_through_the_stages_and_merges_it_into_a_fresh_base(tiny_run) -> None:
    """between_stages continue (what qlora and unsloth use): stage 2 trains stage 1's adapter on, DPO's
    reference is the model as stage 1 left it (adapter on), and final/ is the base with the last adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finemed_cli.modeling.varlen import packed_attention
    from finemed_cli.train.data import prepare_stage_data
    from finemed_cli.train.losses import pair_logps
    from finemed_cli.train.recipe import run_train

    path, model_dir = tiny_run
    cfg = load_train_config(path, ["model.lora.between_stages=continue"])
    run = run_train(cfg, progress=False)
    assert json.loads((run / "manifest.json").read_text())["between_stages"] == "continue"
    dpo = _metrics(run / "stage-2-dpo")
    # The policy starts where the reference was taken: DPO's first loss is log 2.
    assert dpo[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and dpo[-1]["loss"] < dpo[0]["loss"]

    def with_adapter(stage: str):
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        return PeftModel.from_pretrained(base, run / stage / "adapter").merge_and_unload().eval()

    # The reference is the SFT result. A fresh stage-2 adapter would make it the base instead.
    data = prepare_stage_data(cfg, cfg.stages[1], tokenizer_of(run / "final"))
    ref = json.loads((run / "stage-2-dpo" / "reference_logps.json").read_text())["train"]
    sft_model, base = with_adapter("stage-1-sft"), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad(), packed_attention(sft_model), packed_attention(base):
        sft_logps = torch.stack(pair_logps(sft_model, data.train[:2]), 1)
        base_logps = torch.stack(pair_logps(base, data.train[:2]), 1)
    torch.testing.assert_close(torch.tensor(ref[:2]), sft_logps, atol=1e-4, rtol=0)
    assert (sft_logps - base_logps).abs().max() > 1e-2

    final = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    expected = with_adapter("stage-2-dpo").state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=0)


def test_stage_chaining_is_checked(tiny_run) -> None:
    from finemed_cli.train.backend import pick_chain

    path, _ = tiny_run
    with pytest.raises(ConfigError, match="model.lora.between_stages: 'stack' is not one of"):
        load_train_config(path, ["model.lora.between_stages=stack"])
    with pytest.raises(ConfigError, match="merge cannot fold an adapter into a 4-bit base"):
        load_train_config(path, ["model.method=qlora", "model.lora.between_stages=merge"])
    assert pick_chain(load_train_config(path), "transformers") == "merge"
    assert pick_chain(load_train_config(path), "unsloth") == "continue"
    assert pick_chain(load_train_config(path, ["model.method=qlora"]), "unsloth") == "continue"
    with pytest.raises(ConfigError, match="merge runs on the transformers backend only"):
        pick_chain(load_train_config(path, ["model.lora.between_stages=merge"]), "unsloth")


def test_two_processes_equal_one_with_twice_the_accumulation(tiny_run, tmp_path) -> None:
    """Data parallel under torchrun (gloo, CPU): 2 processes at grad_accum 1 take exactly the steps of one
    process at grad_accum 2, so their results must agree to float rounding."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from finemed_cli.train import recipe

    path, _ = tiny_run
    accum = ["stages.0.grad_accum={}", "stages.1.grad_accum={}"]
    one = recipe.run_train(load_train_config(path, ["name=one", *(k.format(2) for k in accum)]), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "finemed_cli", "train", str(path), "--set", "name=two", "--no-progress",
           *(a for k in accum for a in ("--set", k.format(1)))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = one.parent / "two"
    for stage in ("stage-1-sft", "stage-2-dpo"):
        a, b = _metrics(one / stage), _metrics(two / stage)
        assert [m["step"] for m in a] == [m["step"] for m in b]
        for x, y in zip(a, b, strict=True):
            assert y["loss"] == pytest.approx(x["loss"], abs=1e-5) and y["tokens"] == x["tokens"]
    assert json.loads((two / "manifest.json").read_text())["processes"] == 2
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


_STOP_MID_STAGE = """
import sys
from finemed_cli.cli.main import main
from finemed_cli.train import recipe

real = recipe.Trainer.checkpoint

def checkpoint_then_stop(self, out, model, params, optimizer, scheduler, step):
    real(self, out, model, params, optimizer, scheduler, step)
    if out.name.startswith("stage-2") and step == 1:
        raise SystemExit(3)  # every rank, after the collective checkpoint: an interrupted run

recipe.Trainer.checkpoint = checkpoint_then_stop
main()
"""


@pytest.mark.slow  # 29 s: make test keeps 2 processes against one (test_two_processes_equal_one_with_twice_the_accumulation)
def test_fsdp_shards_full_fine_tuning_with_the_result_of_one_process(tiny_run, tmp_path) -> None:
    """model.fsdp under torchrun (gloo, CPU): 2 sharded processes at grad_accum 1 equal one unsharded
    process at grad_accum 2 — losses, held-out losses and final weights — through a short last step and an
    odd held-out split (the rank with less work replays at zero weight), a DPO stage whose reference is the
    model before the stage (no second copy), gathered checkpoints every step, and a run stopped mid-stage and
    resumed from its sharded checkpoint."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from finemed_cli.train import recipe

    path, _ = tiny_run
    # 10 records split 5 trained (3 micro-batches of 2: steps of 2 and 1) and 5 held out (3 on rank 0, 2 on
    # rank 1: two held-out batches against one), so both replays are exercised.
    _write_jsonl(path.parent / "odd.jsonl", [
        {"id": f"f{i}", "prompt": f"Case {i}: TSH {i + 4} mU/L, low free T4?",
         "completion": "## Thought\nPrimary hypothyroidism.\n\n## Summarization\nLevothyroxine."} for i in range(10)])
    sft = ("{{kind: sft, data: [odd.jsonl], epochs: 1, lr: 0.001, batch_size: 2, grad_accum: {}, "
           "warmup_ratio: 0, scheduler: linear, max_length: 256, eval_fraction: 0.5}}")
    # DPO: 1 pair trained over 3 epochs (steps of 2 and 1), 5 held out; its reference is scored in lockstep too.
    dpo = ("{{kind: dpo, data: [pairs.jsonl], epochs: 3, lr: 0.001, batch_size: 1, grad_accum: {}, "
           "warmup_ratio: 0, max_length: 256, eval_fraction: 0.5}}")

    def stages(accum: int) -> str:
        return f"stages=[{sft.format(accum)}, {sft.format(accum)}, {dpo.format(accum)}]"

    one = recipe.run_train(load_train_config(path, ["name=one", "model.method=full", stages(2)]), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [str(path), "--no-progress", "--set", "model.method=full", "--set", "model.fsdp=true",
            "--set", stages(1)]

    def torchrun(*extra: str, script: list[str] | None = None) -> subprocess.CompletedProcess:
        cmd = [*launch, *(script or ["-m", "finemed_cli"]), "train", *args, *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    done = torchrun("--set", "name=two")
    assert done.returncode == 0, done.stderr[-8000:]
    assert "sharded over 2 processes" in done.stderr
    two = one.parent / "two"
    for stage, split in (("stage-1-sft", (5, 5)), ("stage-2-sft", (5, 5)), ("stage-3-dpo", (1, 5))):
        a, b = _metrics(one / stage), _metrics(two / stage)
        assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
        for x, y in zip(a, b, strict=True):
            assert y["loss"] == pytest.approx(x["loss"], abs=1e-5) and y["tokens"] == x["tokens"]
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        s1 = json.loads((one / stage / "summary.json").read_text())
        s2 = json.loads((two / stage / "summary.json").read_text())
        assert (s2["train_sequences"], s2["held_out"]) == split
        assert s2["held_out_before"] == pytest.approx(s1["held_out_before"], abs=1e-5)
        assert s2["held_out_after"] == pytest.approx(s1["held_out_after"], abs=1e-5)
    # The reference is the model before DPO's first step: there the policy equals it, every margin is 0.
    assert _metrics(one / "stage-3-dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert a.keys() == b.keys()  # the tied head saved once, as unsharded
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                           load_file(tiny_run[1] / "model.safetensors")["model.layers.0.mlp.up_proj.weight"])

    driver = tmp_path / "stop_mid_stage.py"
    driver.write_text(_STOP_MID_STAGE)
    cut = torchrun("--set", "name=cut", script=[str(driver)])
    assert cut.returncode != 0 and (one.parent / "cut" / "stage-2-sft" / "checkpoint.pt").is_file(), cut.stderr[-3000:]
    resumed = torchrun("--set", "name=cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    c = load_file(one.parent / "cut" / "final" / "model.safetensors")
    for name in b:
        torch.testing.assert_close(c[name], b[name], atol=1e-6, rtol=0)


def test_peft_lora_layers_compute_through_finemed_kernels(tiny_tokenizer, monkeypatch) -> None:
    """The routed forward gives peft's output and gradients, and really runs finemed_kernels.lora_linear;
    with the adapter disabled (DPO's reference) peft's own path gives the base model."""
    import copy

    from peft import LoraConfig, get_peft_model

    import finemed_kernels
    from finemed_cli.train.kernels import route_through_kernels

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    base = make_tiny_llama(len(tiny_tokenizer))
    plain = get_peft_model(copy.deepcopy(base), config)
    for name, p in plain.named_parameters():  # B is zero at init: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    routed = copy.deepcopy(plain)
    assert route_through_kernels(routed) == 3 * 4
    calls = []
    real = finemed_kernels.lora_linear
    monkeypatch.setattr(finemed_kernels, "lora_linear", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9))
    outs = []
    for m in (plain, routed):
        loss = m(input_ids=ids).logits.square().mean()
        loss.backward()
        outs.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert len(calls) == 12
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], atol=1e-6, rtol=1e-5)
    with torch.no_grad(), routed.disable_adapter():
        torch.testing.assert_close(routed(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_unsloth_trains_the_curriculum_on_a_gpu(tiny_run, method) -> None:
    """The unsloth backend for real: 4-bit (qlora) or 16-bit base, its patched attention fed packed rows
    through packed_seq_lengths (packed sums must equal one sequence at a time), SFT then DPO, final/ merged
    into the 16-bit base."""
    pytest.importorskip("unsloth")
    from transformers import AutoModelForCausalLM

    from finemed_cli.modeling.varlen import packed_attention
    from finemed_cli.train import unsloth_backend
    from finemed_cli.train.data import prepare_stage_data
    from finemed_cli.train.losses import sequence_nll
    from finemed_cli.train.recipe import run_train

    path, model_dir = tiny_run
    sets = [f"name=unsloth-{method}", "model.backend=unsloth", f"model.method={method}", "model.precision=bf16"]
    cfg = load_train_config(path, sets)
    model = unsloth_backend.add_lora(unsloth_backend.load(cfg, torch.bfloat16), cfg, seed=0)
    assert model.finemed_packed_kwarg == "packed_seq_lengths"
    data = prepare_stage_data(cfg, cfg.stages[0], tokenizer_of(model_dir))
    with torch.no_grad(), packed_attention(model), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = sequence_nll(model, data.train[:4])
        alone = torch.cat([sequence_nll(model, [s]) for s in data.train[:4]])
    torch.testing.assert_close(packed, alone, rtol=1e-2, atol=1e-2)
    del model
    torch.cuda.empty_cache()

    run = run_train(cfg, progress=False)
    losses = [m["loss"] for m in _metrics(run / "stage-1-sft")]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    dpo = _metrics(run / "stage-2-dpo")
    assert dpo[0]["loss"] == pytest.approx(0.6931, abs=1e-2) and dpo[-1]["loss"] < dpo[0]["loss"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["backend"] == "unsloth" and manifest["between_stages"] == "continue"
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    final = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    changed = {n for n, p in final.items() if not torch.allclose(p.float(), base[n].float(), atol=1e-3)}
    assert changed and all(any(t in n for t in cfg.model.lora.targets) for n in changed)
