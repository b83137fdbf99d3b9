"""Recall@1 of the hnswlib index against exact search, on real embeddings of the shared reasoning corpus."""

from __future__ import annotations

import numpy as np
import pytest

from finemed_cli.data.records import load_questions
from finemed_cli.retrieval.embed import load_embedder
from finemed_cli.retrieval.index import CorpusIndex, build_index

pytestmark = pytest.mark.integration


def test_hnsw_recall_at_1_against_exact_search(shared_data, tmp_path):
    corpus = tmp_path / "reasoning.jsonl"
    with corpus.open("wb") as f:
        for name in ("reasoning_huatuogpt_o1_demo.jsonl", "reasoning_vlievin_cot.jsonl",
                     "reasoning_ultramedical.jsonl"):
            f.write((shared_data / name).read_bytes())
    embedder = load_embedder(None)
    build_index(corpus, tmp_path / "idx", embedder)
    index = CorpusIndex(tmp_path / "idx")
    assert len(index) > 1000
    queries = [q.question for q in load_questions(shared_data / "medqa_dev.jsonl")]
    queries += [q.question for q in load_questions(shared_data / "pubmedqa_dev.jsonl")[:200]]
    queries += [q.question for q in load_questions(shared_data / "medmcqa_dev.jsonl")[:200]]
    q = embedder.encode(queries)
    docs = embedder.encode([r.question for r in index.records])
    exact = np.argmax(q @ docs.T, axis=1)
    found = [hits[0].record.id for hits in index.search(q, 1)]
    recall = np.mean([index.records[e].id == f for e, f in zip(exact, found, strict=True)])
    assert recall >= 0.99, f"recall@1 {recall:.4f} over {len(queries)} queries"
