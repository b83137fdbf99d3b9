"""The paper's reference retrieval, as `--key question+response --pooling mean --neighbour-pick random-of-3`
reproduce it: the conversation rendered in the chat template is what is embedded, the embedding is the
unnormalised mean of the last hidden state searched by L2 distance, and one of the best three is drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finemed_cli.data.records import load_corpus
from finemed_cli.errors import DataError
from finemed_cli.retrieval.embed import load_embedder
from finemed_cli.retrieval.index import CorpusIndex, build_index, neighbours
from finemed_cli.retrieval.keys import IndexKeyConfig, index_texts
from tests.conftest import EXAMPLES


def test_mean_pooling_is_the_reference_formula() -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from finemed_cli.checkpoints.embedded import embedded_embedder_dir

    text = "A 36-year-old woman with untreated Graves disease develops a fever of 40.1 C and agitation."
    got = load_embedder(None, pooling="mean").encode([text])[0]
    tok, model = AutoTokenizer.from_pretrained(embedded_embedder_dir()), AutoModel.from_pretrained(
        embedded_embedder_dir())
    with torch.no_grad():  # the reference: last_hidden_state.mean(dim=1) of the one text, no normalising
        want = model(**tok(text, return_tensors="pt", truncation=True)).last_hidden_state.mean(dim=1)[0].numpy()
    assert np.abs(got - want).max() < 1e-5 and abs(np.linalg.norm(got) - 1.0) > 0.01


def test_question_and_response_keys_render_the_conversation() -> None:
    records = load_corpus(EXAMPLES / "corpus.jsonl")[:2]
    texts, made = index_texts(records, "question+response")
    assert made["template_model_name"] == "SmolLM2-135M-Instruct"
    for r, t in zip(records, texts, strict=True):
        assert t.startswith("<|im_start|>system\n") and r.question in t and r.reasoning[:80] in t
    assert index_texts(records, "question")[0] == [r.question for r in records]


def test_a_paper_index_records_how_it_was_made_and_searches_by_l2(tmp_path) -> None:
    out = tmp_path / "paper.index"
    paper = IndexKeyConfig(key="question+response", pooling="mean")
    build_index(EXAMPLES / "corpus.jsonl", out, None, key_config=paper)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["key"], manifest["pooling"], manifest["space"]) == ("question+response", "mean", "l2")
    index = CorpusIndex(out)
    hits = neighbours(index, index.load_embedder(), ["treatment of thyroid storm"], 3)[0]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True) and hits[0].score < 0
    assert build_index(EXAMPLES / "corpus.jsonl", out, None, key_config=paper).reused
    with pytest.raises(DataError, match="key or pooling"):
        build_index(EXAMPLES / "corpus.jsonl", out, None)  # another key: not silently reused or replaced


def test_an_index_from_before_keys_reads_as_questions_pooled_by_the_model(tmp_path, hash_embedder) -> None:
    out = tmp_path / "old.index"
    build_index(EXAMPLES / "corpus.jsonl", out, hash_embedder)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("key", "pooling", "template_model"):
        manifest.pop(key)
    path.write_text(json.dumps(manifest))
    index = CorpusIndex(out)
    assert (index.pooling, index.space) == ("model", "cosine")
    assert build_index(EXAMPLES / "corpus.jsonl", out, hash_embedder).reused


def test_random_of_3_draws_from_the_best_three_the_same_way_every_run(tmp_path, hash_embedder) -> None:
    out = tmp_path / "idx"
    build_index(EXAMPLES / "corpus.jsonl", out, hash_embedder)
    index = CorpusIndex(out)
    texts = [r.question for r in load_corpus(EXAMPLES / "corpus.jsonl")[:20]]
    top3 = neighbours(index, hash_embedder, texts, 3)
    drawn = neighbours(index, hash_embedder, texts, 1, pick="random-of-3", seed=0)
    assert drawn == neighbours(index, hash_embedder, texts, 1, pick="random-of-3", seed=0)
    assert all(d[0] in best for d, best in zip(drawn, top3, strict=True))
    firsts = sum(d[0] == best[0] for d, best in zip(drawn, top3, strict=True))
    assert 0 < firsts < len(texts)  # not always the nearest: a draw
    other = neighbours(index, hash_embedder, texts, 1, pick="random-of-3", seed=1)
    assert other != drawn
