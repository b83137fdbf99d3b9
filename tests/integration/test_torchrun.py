"""`finemed answer` under torchrun on 2 CPU processes: one merged output, the same records as one process."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from tests.conftest import EXAMPLES
from tests.integration.test_cli import finemed, index_dir  # noqa: F401  (the module's index fixture)

pytestmark = pytest.mark.integration


def _records(path):
    out = []
    for line in path.read_bytes().splitlines():
        rec = orjson.loads(line)
        rec["ttt"].pop("seconds", None)
        rec["generation"].pop("seconds", None)
        out.append(rec)
    return out


def test_answer_under_torchrun_equals_one_process(index_dir, tmp_path):  # noqa: F811
    args = [EXAMPLES / "questions.jsonl", "--index", index_dir, "--limit", "2", "--max-new-tokens", "6",
            "--no-progress"]
    finemed("answer", *args, "-o", tmp_path / "one.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "finemed_cli", "answer", *map(str, args), "-o", str(tmp_path / "two.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    one, two = _records(tmp_path / "one.jsonl"), _records(tmp_path / "two.jsonl")
    assert [r["id"] for r in two] == ["ex-q01", "ex-q02"]  # merged in input order, one from each rank
    assert two == one
    parts = sorted(p.name for p in (tmp_path / "two.jsonl.parts").iterdir())
    assert parts == ["rank-0-of-2.jsonl", "rank-1-of-2.jsonl"]
    # a rerun resumes every part (nothing left to do) and merges them again into the same file
    before = (tmp_path / "two.jsonl").read_bytes()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "two.jsonl").read_bytes() == before


@pytest.mark.slow  # 34 s: make test keeps the answer case (the same parts and merge), within CI's 15 minutes
def test_eval_loglik_under_torchrun_equals_one_process(index_dir, tmp_path):  # noqa: F811
    medqa = EXAMPLES / "questions.jsonl"
    args = [medqa, "--mode", "loglik", "--index", index_dir, "--limit", "3", "--compare", "ttt,no-ttt",
            "--no-progress"]
    finemed("eval", *args, "-o", tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "finemed_cli", "eval", *map(str, args), "-o", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for variant in ("ttt", "no-ttt"):
        one = [orjson.loads(x) for x in (tmp_path / "one" / "loglik" / f"{variant}.jsonl").read_bytes().splitlines()]
        two = [orjson.loads(x) for x in (tmp_path / "two" / "loglik" / f"{variant}.jsonl").read_bytes().splitlines()]
        assert [r["id"] for r in two] == [r["id"] for r in one]  # merged in item order
        for a, b in zip(one, two, strict=True):
            for rec in (a, b):
                rec.get("ttt", {}).pop("seconds", None)
            assert b == a
    report_one = orjson.loads((tmp_path / "one" / "report.json").read_bytes())
    report_two = orjson.loads((tmp_path / "two" / "report.json").read_bytes())
    assert report_two["results"] == report_one["results"] and report_two["items"] == report_one["items"] == 3
