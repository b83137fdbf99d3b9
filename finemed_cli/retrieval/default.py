"""The index `finemed answer` retrieves from when TTT is on and no `--index` is given: the small corpus finemed
ships (finemed_cli/resources/corpus.jsonl, the README's example corpus), embedded once into
`$FINEMED_HOME/index/` and reused, in a folder keyed by the corpus's bytes and the embedder, so a changed corpus
or another embedder gets an index of its own."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from finemed_cli.manifest import sha256_file
from finemed_cli.paths import finemed_home
from finemed_cli.retrieval.embed import canonical_embedder_name
from finemed_cli.retrieval.index import build_index

logger = logging.getLogger(__name__)

SHIPPED_CORPUS = Path(__file__).resolve().parents[1] / "resources" / "corpus.jsonl"


def default_index_dir(corpus: str | os.PathLike[str] = SHIPPED_CORPUS, embedder: str | None = None) -> Path:
    """Where the default index of `corpus` under `embedder` (None: the embedded default) lives."""
    key = hashlib.sha256(f"{sha256_file(corpus)}\0{canonical_embedder_name(embedder)}".encode()).hexdigest()
    return finemed_home() / "index" / f"{Path(corpus).stem}-{key[:16]}"


def default_index(embedder: str | None = None, *, progress: bool = False,
                  corpus: str | os.PathLike[str] = SHIPPED_CORPUS) -> Path:
    """The shipped corpus's index, built on first use (with `embedder`, None: the embedded default) and reused
    after; says which in one line.

    Raises:
        DataError: the folder holds something that is not an index finemed built.
    """
    out = default_index_dir(corpus, embedder)
    # The folder's name holds the corpus hash and the embedder, and an index is renamed into place whole: a
    # manifest there is this corpus's finished index (opening it verifies it). Said before any embedding: a
    # first run spends seconds on it before anything else shows.
    built = (out / "manifest.json").is_file()
    logger.info("no --index: TTT retrieves from finemed's example corpus, %s %s (for your own: finemed index "
                "build CORPUS.jsonl -o DIR, then --index DIR)", "indexed in" if built else "indexing it once into",
                out)
    if not built:
        build_index(corpus, out, embedder, progress=progress)
    return out
