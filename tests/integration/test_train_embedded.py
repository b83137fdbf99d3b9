"""`finemed train` through the real CLI on the embedded model: the tiny example's four stages (cut to one
step each), then `finemed answer --model …/final` answers with the result."""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import EXAMPLES
from tests.integration.test_cli import finemed, read

pytestmark = pytest.mark.integration


def test_tiny_example_trains_every_stage_and_answers(tmp_path) -> None:
    config = EXAMPLES / "train-tiny.yaml"
    plan = finemed("train", config, "--dry-run")
    assert "stage 3 sft (endocrinology): 16 records, 44 filtered out" in plan.stdout
    short = [f"--set=stages.{i}.max_steps=1" for i in range(4)]
    finemed("train", config, f"--set=output_dir={tmp_path}", *short, "--set=stages.0.batch_size=2",
            "--set=stages.1.batch_size=2", "--set=stages.2.batch_size=2", "--no-progress")
    run = tmp_path / "tiny"
    for stage in ("stage-1-sft", "stage-2-sft", "stage-3-sft", "stage-4-dpo"):
        summary = orjson.loads((run / stage / "summary.json").read_bytes())
        assert summary["steps"] == 1 and summary["final_loss"] > 0
        assert (run / stage / "adapter" / "adapter_config.json").is_file() and (run / stage / "loss.png").is_file()
    assert orjson.loads((run / "stage-1-sft" / "summary.json").read_bytes())["held_out"] > 0
    again = finemed("train", config, f"--set=output_dir={tmp_path}", check=False)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    out = tmp_path / "answers.jsonl"
    finemed("answer", EXAMPLES / "questions.jsonl", "-o", out, "--model", run / "final", "--no-ttt",
            "--limit", "1", "--max-new-tokens", "24")
    (answer,) = read(out)
    assert answer["model"] == "final" and answer["response"]
