"""What a training run reports besides its stage folders: the resolved config, written before step 1, and the
`report_to:` trackers (TensorBoard event files read back here; wandb through a stand-in module)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from finemed_cli.config.train import load_train_config
from finemed_cli.errors import ConfigError
from finemed_cli.train.tracking import Tracker, check_reporters
from finemed_cli.train.trainer import Trainer
from tests.conftest import make_tiny_llama


@pytest.fixture()
def tracked_run(tmp_path, tiny_tokenizer) -> Path:
    """A tiny model, SFT data and a config of two SFT stages reporting to TensorBoard."""
    model_dir = tmp_path / "tiny"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Case {i}: high TSH, low T4?", "completion": "Hypothyroidism."})
                            + "\n" for i in range(12)))
    stage = {"kind": "sft", "data": [data.name], "lr": 1e-2, "batch_size": 2, "max_length": 128}
    body = {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 1, "report_to": ["tensorboard"],
            "model": {"name": str(model_dir), "lora": {"rank": 4, "alpha": 8}, "precision": "fp32"},
            "stages": [{**stage, "max_steps": 5, "grad_accum": 2, "warmup_ratio": 0.4, "scheduler": "constant"},
                       {**stage, "name": "again", "max_steps": 2}]}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_tensorboard_gets_every_metric_and_the_resolved_config_comes_before_step_1(tracked_run, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finemed_cli.train.recipe import run_train

    cfg = load_train_config(tracked_run)
    seen = []
    run_stage = Trainer.run_stage

    def spy(self, index, data, resume):  # what is on disk as each stage begins
        seen.append((json.loads((cfg.run_dir / "resolved_config.json").read_text()),
                     (cfg.run_dir / f"stage-{index + 1}-sft" / "metrics.jsonl").exists()))
        return run_stage(self, index, data, resume)

    monkeypatch.setattr(Trainer, "run_stage", spy)
    run = run_train(cfg, progress=False)
    resolved, metrics_yet = seen[0]
    assert not metrics_yet
    first, second = resolved["stages"]
    assert (first["steps"], first["warmup_steps"], first["effective_batch"], first["lr"]) == (5, 2, 4, 0.01)
    assert first["data"] == [{"source": str(tracked_run.parent / "sft.jsonl"), "shape": "prompt_completion",
                              "records": 12}]
    assert (second["steps"], second["warmup_steps"], second["effective_batch"]) == (2, 0, 2)
    assert (resolved["precision"], resolved["backend"], resolved["device"], resolved["processes"]) == (
        "fp32", "transformers", "cpu", 1)

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for stage in ("stage-1-sft", "stage-2-sft"):
        metrics = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        loss = events.Scalars(f"{stage}/loss")
        assert [e.step for e in loss] == [m["step"] for m in metrics]
        assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)  # stored as float32
        assert {f"{stage}/{k}" for k in ("lr", "grad_norm", "tokens_per_s", "tokens")} <= tags


def test_a_tracker_that_is_not_installed_is_named_with_its_extra(tracked_run, monkeypatch) -> None:
    from finemed_cli.train.recipe import run_train

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"report_to lists wandb, which is not installed here: pip install "
                                          r"'finemed\[wandb\]'"):
        check_reporters(["tensorboard", "wandb"])
    with pytest.raises(ConfigError, match="is not one of tensorboard, wandb"):
        load_train_config(tracked_run, ["report_to=[mlflow]"])
    cfg = load_train_config(tracked_run, ["report_to=[wandb]"])
    with pytest.raises(ConfigError, match=r"finemed\[wandb\]"):
        run_train(cfg, progress=False)
    assert not cfg.run_dir.exists()  # refused before anything was made


def test_wandb_gets_each_stage_against_its_own_step(tmp_path, monkeypatch) -> None:
    calls = []

    class Run:
        def define_metric(self, name, step_metric=None):
            calls.append(("define", name, step_metric))

        def log(self, values):
            calls.append(("log", values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs["id"], kwargs["resume"], kwargs["config"]))
        return Run()

    fake = types.SimpleNamespace(init=init, util=types.SimpleNamespace(generate_id=lambda: "abc123"),
                                 errors=types.SimpleNamespace(Error=RuntimeError))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with Tracker(["wandb"], tmp_path, {"lr": 0.1}) as tracker:
        tracker.log("stage-1-sft", 1, {"id": "step-1", "step": 1, "loss": 2.5, "lr": 0.1})
        tracker.log("stage-1-sft", 2, {"loss": 2.0})
    assert calls[0] == ("init", "abc123", "allow", {"lr": 0.1})
    assert calls[1:3] == [("define", "stage-1-sft/step", None), ("define", "stage-1-sft/*", "stage-1-sft/step")]
    assert calls[3] == ("log", {"stage-1-sft/step": 1, "stage-1-sft/loss": 2.5, "stage-1-sft/lr": 0.1})
    assert calls[4] == ("log", {"stage-1-sft/step": 2, "stage-1-sft/loss": 2.0}) and calls[5] == ("finish",)
    assert (tmp_path / "wandb_run_id").read_text() == "abc123"  # a resumed run continues the same wandb run
