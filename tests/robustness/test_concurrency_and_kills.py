"""Two runs on one output, and runs killed with SIGKILL at random points then rerun: every id exactly once, no
torn line, the inputs byte-identical. The embedded model through the real CLI (subprocesses)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import EXAMPLES
from tests.robustness.conftest import run_finemed

pytestmark = pytest.mark.integration
FINEMED = [sys.executable, "-m", "finemed_cli"]


def _ids(path: Path) -> list[str]:
    data = path.read_bytes() if path.exists() else b""
    assert not data or data.endswith(b"\n"), f"{path} ends in a torn line"
    return [orjson.loads(line)["id"] for line in data.splitlines() if line.strip()]


def _lock_held_for(output: Path) -> bool:
    locks = Path(os.environ["FINEMED_HOME"]) / "locks"
    for info in locks.glob("*.json") if locks.is_dir() else []:
        try:
            if orjson.loads(info.read_bytes())["path"] == str(output.resolve()):
                return True
        except (OSError, orjson.JSONDecodeError, KeyError):
            continue
    return False


def test_a_second_answer_on_the_same_output_refuses_at_once(tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_bytes((EXAMPLES / "questions.jsonl").read_bytes())
    out = tmp_path / "answers.jsonl"
    args = ["answer", questions, "-o", out, "--no-ttt", "--limit", "5", "--max-new-tokens", "24",
            "--generator", "transformers", "--no-progress"]
    first = subprocess.Popen([*FINEMED, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not _lock_held_for(out):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.1)
        started = time.monotonic()
        second = run_finemed(*args, "--seed", "0")
        assert time.monotonic() - started < 10, "the second run did not stop at once"
        assert second.code == 2
        assert f"is being written by another finemed run (process {first.pid}" in second.error_text
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
    ids = _ids(out)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 5
    assert questions.read_bytes() == (EXAMPLES / "questions.jsonl").read_bytes()


def _kill_and_resume(args: list[object], outputs: list[Path], inputs: list[Path], kills: int, seed: int,
                     window: tuple[float, float]) -> None:
    """Start `finemed ARGS`, SIGKILL it after a random delay in `window`, `kills` times, then run it to the end.
    After every kill, and at the end, each output holds every id once and ends in a whole line; the inputs
    never change."""
    rng = random.Random(seed)
    before = {p: p.read_bytes() for p in inputs}
    for _ in range(kills):
        proc = subprocess.Popen([*FINEMED, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(*window))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for p in outputs:
            ids = _ids(p) if p.suffix == ".jsonl" else []
            assert len(ids) == len(set(ids)), f"{p}: an id written twice"
    done = subprocess.run([*FINEMED, *map(str, args)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for p in inputs:
        assert p.read_bytes() == before[p], f"{p} changed"
    for p in outputs:
        if p.suffix == ".jsonl":
            ids = _ids(p)
            assert len(ids) == len(set(ids)), f"{p}: an id written twice"


def _questions_and_index(tmp_path: Path) -> tuple[Path, Path]:
    questions = tmp_path / "q.jsonl"
    questions.write_bytes((EXAMPLES / "questions.jsonl").read_bytes())
    index = tmp_path / "corpus.index"
    assert run_finemed("index", "build", EXAMPLES / "corpus.jsonl", "-o", index).code == 0
    return questions, index


@pytest.mark.slow
def test_answer_killed_ten_times_resumes_to_every_id_once(tmp_path: Path) -> None:
    questions, index = _questions_and_index(tmp_path)
    out = tmp_path / "answers.jsonl"
    _kill_and_resume(["answer", questions, "-o", out, "--index", index, "--limit", "8", "--max-new-tokens", "16",
                      "--no-progress"], [out], [questions], kills=10, seed=1, window=(2.0, 9.0))
    assert sorted(_ids(out)) == [f"ex-q{i:02d}" for i in range(1, 9)]


@pytest.mark.slow
def test_eval_killed_ten_times_resumes_to_every_id_once(tmp_path: Path) -> None:
    questions, index = _questions_and_index(tmp_path)
    report = tmp_path / "report"
    results = [report / "loglik" / "ttt.jsonl", report / "loglik" / "no-ttt.jsonl"]
    _kill_and_resume(["eval", questions, "--mode", "loglik", "--index", index, "--compare", "ttt,no-ttt", "-o",
                      report, "--limit", "16", "--no-progress"], results, [questions], kills=10, seed=2,
                     window=(2.0, 12.0))
    for path in results:  # the first 16 example questions are the multiple-choice ones
        assert sorted(_ids(path)) == [f"ex-q{i:02d}" for i in range(1, 17)]
    assert (report / "report.json").is_file()


@pytest.mark.slow
def test_a_synth_stage_killed_ten_times_resumes_to_every_id_once(tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_bytes((EXAMPLES / "questions.jsonl").read_bytes())
    out, rejects = tmp_path / "scored.jsonl", tmp_path / "scored.rejects.jsonl"
    _kill_and_resume(["synth", "score", questions, "-o", out, "--limit", "12", "--no-progress"], [out, rejects],
                     [questions], kills=10, seed=3, window=(1.5, 6.0))
    done = _ids(out) + _ids(rejects)
    assert sorted(done) == sorted(f"ex-q{i:02d}" for i in range(1, 13))


def _stop_mid_write(args: list[object], folder: Path, sig: int) -> subprocess.Popen:
    """Start `finemed ARGS`, wait until a temporary appears in `folder`, send `sig`; returns the ended process."""
    proc = subprocess.Popen([*FINEMED, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not any(".tmp" in p.name for p in folder.iterdir()):
        assert proc.poll() is None, f"ended before it wrote: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_an_export_stopped_mid_write_leaves_no_temporary_once_rerun(tmp_path: Path, sig: int) -> None:
    """SIGTERM removes the half-written GGUF on the way out; after kill -9 the rerun removes it."""
    from finemed_cli.checkpoints.embedded import embedded_model_dir

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["export", embedded_model_dir(), "-o", out_dir / "model.gguf", "--outtype", "f32"]
    proc = _stop_mid_write(args, out_dir, sig)
    left = sorted(p.name for p in out_dir.iterdir())
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, proc.stderr.read().decode()[-2000:]
        assert left == [], f"SIGTERM left {left}"
    else:
        assert left and all(".tmp" in name for name in left)  # what kill -9 leaves
    assert run_finemed(*args).code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.gguf"]


def test_an_eval_results_file_another_verb_wrote_into_is_refused_by_line(tmp_path: Path) -> None:
    """An answer record in `rep/loglik/no-ttt.jsonl` (written there by `answer -o` while no eval held the file)
    is named with its line and the fix, not a KeyError."""
    questions = tmp_path / "q.jsonl"
    questions.write_bytes((EXAMPLES / "questions.jsonl").read_bytes().splitlines(keepends=True)[0])
    first = orjson.loads(questions.read_bytes())
    results = tmp_path / "rep" / "loglik" / "no-ttt.jsonl"
    results.parent.mkdir(parents=True)
    results.write_bytes(orjson.dumps({"id": first["id"], "response": "B", "prediction": "B"}) + b"\n")
    run = run_finemed("eval", questions, "--mode", "loglik", "--compare", "no-ttt", "-o", tmp_path / "rep",
                      "--no-progress")
    assert run.code == 2, run.stderr
    assert f"{results}:1: not a loglik result of finemed eval" in run.error_text
    assert "delete the file" in run.error_text
