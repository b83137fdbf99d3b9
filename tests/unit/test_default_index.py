"""The index `finemed answer` falls back on (TTT on, no --index): the shipped corpus, keyed by its bytes and
the embedder."""

from __future__ import annotations

from finemed_cli.retrieval.default import SHIPPED_CORPUS, default_index_dir
from tests.conftest import EXAMPLES, REPO


def test_the_shipped_corpus_is_the_example_corpus_and_is_package_data() -> None:
    assert SHIPPED_CORPUS.read_bytes() == (EXAMPLES / "corpus.jsonl").read_bytes()
    # installed with the package (pyproject's package-data), not only in a checkout
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]' in pyproject and 'finemed_cli = ["resources/*.jsonl"]' in pyproject


def test_the_folder_is_keyed_by_the_corpus_bytes_and_the_embedder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FINEMED_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(SHIPPED_CORPUS.read_bytes())
    first = default_index_dir(corpus)
    assert first.parent == tmp_path / "home" / "index" and first == default_index_dir(corpus)
    assert default_index_dir(corpus, "all-MiniLM-L6-v2") == first  # the embedded default, by another name
    assert default_index_dir(corpus, "BAAI/bge-large-en-v1.5") != first
    corpus.write_bytes(SHIPPED_CORPUS.read_bytes() + b"\n")
    assert default_index_dir(corpus) != first
