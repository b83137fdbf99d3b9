"""What a user sees: finemed's own labelled, phased progress; other libraries' bars and internal module names
kept out unless -v; -q/-v after the verb; a no-op index rebuild at once; `finemed env` for bug reports."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import EXAMPLES

pytestmark = pytest.mark.integration
FINEMED = [sys.executable, "-m", "finemed_cli"]


def finemed(*args: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*FINEMED, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "corpus.index"
    built = finemed("index", "build", EXAMPLES / "corpus.jsonl", "-o", out)
    assert "index: embedding corpus.jsonl" in built.stderr  # finemed's own bar, labelled
    assert "Batches" not in built.stderr and "INFO" not in built.stderr and "SentenceTransformer" not in built.stderr
    return out


def test_an_unchanged_index_is_not_rebuilt_and_returns_at_once(index_dir) -> None:
    start = time.monotonic()
    proc = finemed("index", "build", EXAMPLES / "corpus.jsonl", "-o", index_dir)
    assert time.monotonic() - start < 2.0  # the embedder is never loaded
    assert "up to date" in proc.stdout


def test_quiet_and_verbose_after_the_verb(index_dir, tmp_path) -> None:
    quiet = finemed("index", "build", EXAMPLES / "corpus.jsonl", "-o", tmp_path / "q.index", "-q")
    assert quiet.stderr == ""  # no bar, no info line
    loud = finemed("index", "build", EXAMPLES / "corpus.jsonl", "-o", index_dir, "--force", "-v")
    assert "Loading SentenceTransformer model" in loud.stderr  # -v lets the libraries' info lines through


def test_answer_shows_its_phases_with_plain_prefixes(index_dir, tmp_path) -> None:
    proc = finemed("answer", EXAMPLES / "questions.jsonl", "-o", tmp_path / "a.jsonl", "--index", index_dir,
                   "--limit", "1", "--max-new-tokens", "8")
    err = proc.stderr
    for line in ("answer: retrieving 1 neighbour(s) for 1 questions", "answer: loading the model", "phase=TTT",
                 "phase=generating", "warning: SmolLM2-135M-Instruct is a tiny embedded model"):
        assert line in err, err
    assert "finemed_cli." not in err and "INFO" not in err and "Converting and de-quantizing" not in err


def test_env_reports_versions_devices_and_paths() -> None:
    info = json.loads(finemed("env", "--json").stdout)
    assert info["packages"]["torch"] and info["cpu"]["logical_cores"] >= 1
    assert "cuda_available" in info["gpu"] and info["llama_cpp"]["installed"] is True
    assert info["paths"]["finemed_home"]
    text = finemed("env").stdout
    assert "llama-cpp-python:" in text and "finemed_home:" in text
