"""The issue's acceptance run, behind the `slow` marker (`make test-slow`): 20 MedQA dev questions answered
with LoRA TTT on an index of the HuatuoGPT-o1 reasoning demo, through the real CLI."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_twenty_medqa_questions_with_ttt(shared_data, tmp_path):
    run = [sys.executable, "-m", "finemed_cli"]
    subprocess.run([*run, "index", "build", shared_data / "reasoning_huatuogpt_o1_demo.jsonl", "-o",
                    tmp_path / "idx"], check=True, capture_output=True)
    out = tmp_path / "answers.jsonl"
    subprocess.run([*run, "answer", shared_data / "medqa_dev.jsonl", "-o", out, "--index", tmp_path / "idx",
                    "--limit", "20", "--max-new-tokens", "48", "--no-progress"], check=True, capture_output=True)
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(records) == 20 and len({r["id"] for r in records}) == 20
    for r in records:
        assert r["neighbours"] and r["neighbours"][0]["id"].startswith("huatuo")
        assert r["ttt"]["loss_after"] < r["ttt"]["loss_before"]
        assert r["answer"] in "ABCD" and isinstance(r["correct"], bool)
        assert r["prediction"] is None or r["prediction"] in "ABCD"
