"""`finemed` with hub ids, offline: an embedder named by hub id comes from a (fake) HF cache with no network
call, and on an empty cache `answer` refuses in under 5 s with the id and how to fetch it."""

from __future__ import annotations

import time

import orjson

from tests.conftest import EXAMPLES
from tests.robustness.conftest import run_finemed
from tests.unit.test_hub import dir_files, fake_hf_cache, no_network, online  # noqa: F401 - fixtures

BGE = "BAAI/bge-large-en-v1.5"


def test_answer_with_a_hub_embedder_runs_from_the_cache_and_refuses_fast_without_it(
        online, no_network, tmp_path, monkeypatch):  # noqa: F811
    from finemed_cli.checkpoints.embedded import embedded_embedder_dir

    fake_hf_cache(online, BGE, dir_files(embedded_embedder_dir()))  # another model's files under bge's id
    index = tmp_path / "corpus.index"
    built = run_finemed("index", "build", EXAMPLES / "corpus.jsonl", "-o", index, "--embedder", BGE)
    assert built.code == 0, built.stderr
    assert orjson.loads((index / "manifest.json").read_bytes())["embedder"] == BGE
    answers = tmp_path / "answers.jsonl"
    run = run_finemed("answer", EXAMPLES / "questions.jsonl", "-o", answers, "--index", index, "--embedder",
                      BGE, "--limit", "1", "--max-new-tokens", "4", "--generator", "transformers",
                      "--no-progress")
    assert run.code == 0, run.stderr
    assert len(answers.read_bytes().splitlines()) == 1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    refused = run_finemed("answer", EXAMPLES / "questions.jsonl", "-o", tmp_path / "b.jsonl", "--index", index,
                          "--embedder", BGE, "--no-progress")
    assert time.perf_counter() - start < 5.0
    assert refused.code == 2
    assert f"embedder '{BGE}' is not in the local HF cache" in refused.error_text
    assert "hf download BAAI/bge-large-en-v1.5" in refused.error_text
    assert "Traceback" not in refused.stderr and not (tmp_path / "b.jsonl").exists()
