"""`run_answer` end to end on a tiny model and a hash embedder: records, resume, shards, restored weights."""

from __future__ import annotations

import orjson
import pytest
import torch

from finemed_cli.config.answer import AnswerConfig, GenerationConfig, TTTConfig
from finemed_cli.errors import ConfigError, ModelError
from finemed_cli.pipeline.answer import run_answer
from finemed_cli.retrieval.index import CorpusIndex, build_index
from tests.conftest import EXAMPLES


@pytest.fixture()
def index_dir(tmp_path, hash_embedder):
    out = tmp_path / "corpus.index"
    build_index(EXAMPLES / "corpus.jsonl", out, hash_embedder)
    return out


def config(tmp_path, index_dir, **kw) -> AnswerConfig:
    base = dict(questions=EXAMPLES / "questions.jsonl", output=tmp_path / "answers.jsonl", index=index_dir,
                ttt=TTTConfig(mode="lora", k=2, lr=1e-2), generation=GenerationConfig(max_new_tokens=6),
                limit=3)
    base.update(kw)
    return AnswerConfig(**base)


def read(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_answer_writes_contract_records_and_restores_weights(tmp_path, index_dir, hash_embedder, tiny_model):
    saved = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    summary = run_answer(config(tmp_path, index_dir), progress=False, embedder=hash_embedder, loaded=tiny_model)
    assert summary.answered == 3 and summary.skipped == 0
    records = read(tmp_path / "answers.jsonl")
    assert [r["id"] for r in records] == ["ex-q01", "ex-q02", "ex-q03"]
    for r in records:
        assert set(r) >= {"id", "response", "prediction", "answer", "correct", "neighbours", "ttt",
                          "generation", "model", "seed"}
        assert len(r["neighbours"]) == 2 and all(set(n) == {"id", "score"} for n in r["neighbours"])
        assert r["neighbours"][0]["score"] >= r["neighbours"][1]["score"]
        assert r["ttt"]["mode"] == "lora" and r["ttt"]["loss_after"] < r["ttt"]["loss_before"]
        assert r["generation"]["backend"] == "transformers" and 0 < r["generation"]["tokens"] <= 6
        assert r["model"] == "tiny-llama" and isinstance(r["correct"], bool)
    for k, v in tiny_model.model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_rerun_resumes_without_duplicates(tmp_path, index_dir, hash_embedder, tiny_model):
    run_answer(config(tmp_path, index_dir, limit=2), progress=False, embedder=hash_embedder, loaded=tiny_model)
    # a killed writer's torn tail
    with open(tmp_path / "answers.jsonl", "ab") as f:
        f.write(b'{"id": "ex-q03", "respon')
    s = run_answer(config(tmp_path, index_dir, limit=4), progress=False, embedder=hash_embedder, loaded=tiny_model)
    assert (s.skipped, s.answered) == (2, 2)
    ids = [r["id"] for r in read(tmp_path / "answers.jsonl")]
    assert ids == ["ex-q01", "ex-q02", "ex-q03", "ex-q04"]
    again = run_answer(config(tmp_path, index_dir, limit=4), progress=False, embedder=hash_embedder,
                       loaded=tiny_model)
    assert again.answered == 0 and again.skipped == 4


def test_shards_split_the_file(tmp_path, index_dir, hash_embedder, tiny_model):
    ids = []
    for i in range(3):
        cfg = config(tmp_path, index_dir, shard=(i, 3), limit=2, output=tmp_path / f"s{i}.jsonl",
                     ttt=TTTConfig(mode="off"))
        run_answer(cfg, progress=False, embedder=hash_embedder, loaded=tiny_model)
        ids += [r["id"] for r in read(tmp_path / f"s{i}.jsonl")]
    assert sorted(ids) == ["ex-q01", "ex-q02", "ex-q03", "ex-q04", "ex-q05", "ex-q06"]


def test_no_ttt_records_mode_off(tmp_path, hash_embedder, tiny_model):
    cfg = config(tmp_path, None, ttt=TTTConfig(mode="off"), limit=1)
    run_answer(cfg, progress=False, embedder=hash_embedder, loaded=tiny_model)
    (r,) = read(tmp_path / "answers.jsonl")
    assert r["ttt"]["mode"] == "off" and r["neighbours"] == []


def test_index_refuses_another_embedder(index_dir):
    idx = CorpusIndex(index_dir)
    assert idx.embedder == "test/hash-embedder" and len(idx) == 60
    idx.check_embedder(None)
    idx.check_embedder("test/hash-embedder")
    with pytest.raises(ModelError, match="built with embedder 'test/hash-embedder'"):
        idx.check_embedder("BAAI/bge-large-en-v1.5")


def test_index_build_reuses_or_refuses(tmp_path, index_dir, hash_embedder):
    from finemed_cli.errors import DataError

    again = build_index(EXAMPLES / "corpus.jsonl", index_dir, hash_embedder)
    assert again.reused
    other = tmp_path / "other.jsonl"
    other.write_bytes(b"\n".join((EXAMPLES / "corpus.jsonl").read_bytes().splitlines()[:5]) + b"\n")
    with pytest.raises(DataError, match="--force"):
        build_index(other, index_dir, hash_embedder)
    rebuilt = build_index(other, index_dir, hash_embedder, force=True)
    assert rebuilt.count == 5 and not rebuilt.reused


def test_batch_size_gives_the_answers_of_one_at_a_time(tmp_path, index_dir, hash_embedder, tiny_model):
    saved = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    runs = {}
    for b in (1, 3):
        out = tmp_path / f"b{b}.jsonl"
        run_answer(config(tmp_path, index_dir, output=out, limit=5, batch_size=b,
                          generation=GenerationConfig(max_new_tokens=6, backend="transformers")),
                   progress=False, embedder=hash_embedder, loaded=tiny_model)
        runs[b] = read(out)
    assert [r["id"] for r in runs[3]] == [r["id"] for r in runs[1]]
    for one, batched in zip(runs[1], runs[3], strict=True):
        assert batched["ttt"]["batch"] in (3, 2) and "batch" not in one["ttt"]  # 5 questions: 3 + 2
        assert batched["ttt"]["loss_before"] == pytest.approx(one["ttt"]["loss_before"], abs=2e-5)
        assert batched["ttt"]["loss_after"] == pytest.approx(one["ttt"]["loss_after"], abs=2e-5)
        assert batched["response"] == one["response"]
    for k, v in tiny_model.model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_batch_size_with_the_paper_mode_is_refused(tmp_path, index_dir):
    with pytest.raises(ConfigError, match="batch-size"):
        config(tmp_path, index_dir, batch_size=2, ttt=TTTConfig(mode="paper")).validate()
