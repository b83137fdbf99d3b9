"""`finemed index`: an hnswlib index over corpus records — by default the cosine index of their questions;
`--key question+response` and `--pooling mean` give the paper's reference retrieval (retrieval/keys.py).

An index directory holds `index.bin` (hnswlib), `records.jsonl` (the corpus records, in index order) and
`manifest.json` (embedder, dimension, count, corpus and records hashes, hnsw parameters, versions). Opening
an index checks all of them against each other before hnswlib reads a byte (`verify_index`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from finemed_cli.data.output import OutputLock, check_output, ensure_parent, os_error, temporary
from finemed_cli.data.records import CorpusRecord, load_corpus
from finemed_cli.errors import DataError, ModelError
from finemed_cli.manifest import read_manifest, sha256_file, write_manifest
from finemed_cli.retrieval.embed import Embedder, canonical_embedder_name, embed_all, load_embedder
from finemed_cli.retrieval.keys import IndexKeyConfig, index_texts

logger = logging.getLogger(__name__)

INDEX_FILE = "index.bin"
RECORDS_FILE = "records.jsonl"
FORMAT = "finemed-index/2"  # 2: records_sha256 and index_bytes in the manifest, checked on open
# hnswlib defaults measured on clustered 1024-d embeddings: recall@3 = 1.000 at ef=50 (DESIGN.md field notes).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 64


@dataclass(frozen=True)
class Neighbour:
    record: CorpusRecord
    score: float  # cosine similarity; for an index searched by L2 distance (`--pooling mean`), minus the squared one


@dataclass(frozen=True)
class BuildIndexResult:
    path: Path
    count: int
    dimension: int
    embedder: str
    reused: bool


@dataclass(frozen=True)
class _Corpus:
    path: Path
    sha256: str
    records: list[CorpusRecord]


def build_index(
    corpus: str | os.PathLike[str],
    output: str | os.PathLike[str],
    embedder: Embedder | str | None = None,
    *,
    force: bool = False,
    progress: bool = False,
    device: str | None = None,
    key_config: IndexKeyConfig = IndexKeyConfig(),
) -> BuildIndexResult:
    """Embed each corpus record's question and write an index directory.

    Args:
        corpus: the corpus JSONL.
        output: the index directory.
        embedder: a loaded embedder, or the name of one (None: the embedded default), loaded only when the
            index must be (re)built: an index already up to date with the corpus returns at once.
        force: rebuild even when up to date, and replace an index finemed built of another corpus. A folder
            finemed did not build is never replaced.
        progress: show the embedding progress bar.
        device: where a named embedder runs.
        key_config: what is embedded of each record (its key, retrieval/keys.py; the `template_model` whose chat
            template renders a `question+response` record) and how a named embedder pools (`mean`: L2 distance).

    Raises:
        DataError: the output is the corpus or holds it, is not an index finemed built, or exists without
            `force`.
    """
    corpus, output = Path(corpus), Path(output)
    check_output(output, inputs=[corpus], kind="dir", replaces=True, what="index")
    named = embedder is None or isinstance(embedder, str)  # else an Embedder object
    name = canonical_embedder_name(embedder) if named else embedder.name  # type: ignore[union-attr,arg-type]
    records = load_corpus(corpus)
    source = _Corpus(corpus, sha256_file(corpus), records)
    key, pooling, template_model = key_config.key, key_config.pooling, key_config.template_model
    how = {"key": key, "pooling": pooling if named else getattr(embedder, "pooling", "model"),
           "template_model": template_model if key != "question" else None}
    with OutputLock(output):
        if output.exists() and any(output.iterdir()):
            manifest = _existing_index(output, corpus, source.sha256, name, force, how)
            if manifest is not None:
                return BuildIndexResult(output, manifest["count"], manifest["dimension"], name, reused=True)
        texts, made = index_texts(records, key, template_model)
        dimension = _write_index(output, source, texts,
                                 load_embedder(name, device=device, pooling=pooling) if named else embedder, name,
                                 progress, {**how, **made})
    return BuildIndexResult(output, len(records), dimension, name, reused=False)


def _existing_index(output: Path, corpus: Path, corpus_hash: str, name: str, force: bool,
                    how: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an index at `output` that is up to date with the corpus and intact (reuse it), or None
    (build it: replacing an index finemed made). Anything else there is refused."""
    manifest = _finemed_manifest(output)
    if manifest is None:
        raise DataError(f"{output}: exists and is not an index finemed built (no finemed manifest.json); "
                        "finemed replaces only its own indexes: choose another -o, or move it away")
    current = (manifest.get("format") == FORMAT and manifest.get("corpus_sha256") == corpus_hash
               and manifest.get("embedder") == name and all(_made(manifest, k) == v for k, v in how.items()))
    if current and not force:
        try:
            verify_index(output)
            logger.info("%s is up to date with %s", output, corpus)
            return manifest
        except DataError as e:
            logger.warning("%s: %s; rebuilding it", output, e)
    elif not force:
        why = ("was built by an older finemed" if manifest.get("format") != FORMAT else
               f"is an index of another corpus, embedder, key or pooling ({manifest.get('embedder')}, key "
               f"{_made(manifest, 'key')}, pooling {_made(manifest, 'pooling')})")
        raise DataError(f"{output} {why}; pass --force to replace it, or choose another -o")
    return None


def _made(manifest: dict[str, Any], key: str) -> Any:
    """How an index was made; an index from before `--key`/`--pooling` embedded questions, pooled as the model."""
    return manifest.get(key, {"key": "question", "pooling": "model"}.get(key))


def _write_index(output: Path, source: _Corpus, texts: list[str], embedder: Any, name: str, progress: bool,
                 how: dict[str, Any]) -> int:
    """Embed and write the index into a temporary folder beside `output`, then swap it in by renames (the old
    index stays whole until the new one is in place); returns the dimension."""
    import hnswlib

    corpus, records = source.path, source.records

    ensure_parent(output)
    tmp, old = temporary(output), temporary(output, "old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()  # before the embedding: a folder that cannot be written fails now, not after it
        vectors = embed_all(embedder, texts, progress=progress, desc=f"index: embedding {corpus.name}")
        space = "cosine" if getattr(embedder, "normalised", True) else "l2"
        index = hnswlib.Index(space=space, dim=vectors.shape[1])
        index.init_index(max_elements=len(records), ef_construction=HNSW_EF_CONSTRUCTION, M=HNSW_M, random_seed=0)
        index.add_items(vectors, np.arange(len(records)))
        index.save_index(str(tmp / INDEX_FILE))
        body = b"".join(orjson.dumps(r.to_json()) + b"\n" for r in records)
        (tmp / RECORDS_FILE).write_bytes(body)
        write_manifest(
            tmp, format=FORMAT, embedder=name, dimension=int(vectors.shape[1]), count=len(records),
            corpus=str(corpus.resolve()), corpus_sha256=source.sha256, records_sha256=hashlib.sha256(body).hexdigest(),
            index_bytes=(tmp / INDEX_FILE).stat().st_size, space=space, **how,
            hnsw={"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH},
        )
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
    except OSError as e:
        raise os_error(e, output) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return int(vectors.shape[1])


def _finemed_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of an index finemed built (any version), or None."""
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError):
        return None
    if isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("finemed-index/"):
        return manifest
    return None


# hnswlib's index file: a 96-byte header (6 size_t, int, uint32, 3 size_t, double, size_t), the level-0
# records of cur_element_count elements, then each element's upper-level link list (uint32 size + bytes).
_HNSW_HEADER = struct.Struct("<6Q i I 3Q d Q")


def _check_hnsw_file(path: Path, dimension: int, count: int) -> None:
    """Check index.bin's header and layout against the manifest before hnswlib reads it: a mismatch there
    is heap corruption in hnswlib, not an exception."""
    import mmap

    def bad(why: str) -> DataError:
        return DataError(f"{path}: {why}; the index is damaged or from another build: rebuild it with "
                         "`finemed index build CORPUS.jsonl -o DIR --force`")

    size = path.stat().st_size
    if size < _HNSW_HEADER.size:
        raise bad(f"{size} bytes, shorter than an hnswlib header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        (offset0, max_elements, cur, per_element, label_offset, offset_data, _level, _entry, _max_m, max_m0,
         _m, _mult, _efc) = _HNSW_HEADER.unpack_from(m, 0)
        if cur != count or max_elements < cur:
            raise bad(f"holds {cur} vectors, the manifest says {count}")
        if offset0 != 0 or offset_data != max_m0 * 4 + 4 or label_offset - offset_data != 4 * dimension \
                or per_element != label_offset + 8:
            found = (label_offset - offset_data) / 4
            raise bad(f"holds {found:g}-dimensional vectors, the manifest says {dimension}")
        pos = _HNSW_HEADER.size + cur * per_element
        for _ in range(cur):
            if pos + 4 > size:
                raise bad("truncated")
            pos += 4 + struct.unpack_from("<I", m, pos)[0]
        if pos != size:
            raise bad(f"{size - pos:+d} bytes against its own layout")


def verify_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check an index directory before anything reads it: the manifest (finemed's, this format), the files,
    the records' hash and count, and index.bin's dimension and count. Returns the manifest.

    Raises:
        DataError: naming the file and the problem, with the fix.
    """
    path = Path(path)
    rebuild = "rebuild it with `finemed index build CORPUS.jsonl -o DIR --force`"
    if not path.is_dir():
        raise DataError(f"{path}: no such index folder; build one with `finemed index build CORPUS.jsonl -o DIR`")
    if not (path / "manifest.json").is_file():
        raise DataError(f"{path}: not a finemed index (no manifest.json); build one with "
                        "`finemed index build CORPUS.jsonl -o DIR`")
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError):
        raise DataError(f"{path / 'manifest.json'}: not readable JSON; {rebuild}") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        old = isinstance(fmt, str) and fmt.startswith("finemed-index/")
        raise DataError(f"{path}: {'an index from an older finemed' if old else 'not a finemed index'} "
                        f"(format {fmt!r}, expected {FORMAT}); {rebuild}")
    types = {"embedder": str, "dimension": int, "count": int, "records_sha256": str}
    for key, tp in types.items():
        value = manifest.get(key)
        if not isinstance(value, tp) or isinstance(value, bool) or (tp is int and value < 1):
            raise DataError(f"{path / 'manifest.json'}: {key!r} is missing or invalid ({value!r}); {rebuild}")
    for name in (INDEX_FILE, RECORDS_FILE):
        if not (path / name).is_file():
            raise DataError(f"{path}: {name} is missing; {rebuild}")
    if sha256_file(path / RECORDS_FILE) != manifest["records_sha256"]:
        raise DataError(f"{path / RECORDS_FILE}: changed since the index was built (its hash differs from the "
                        f"manifest's), so neighbours would be the wrong records; {rebuild}")
    _check_hnsw_file(path / INDEX_FILE, manifest["dimension"], manifest["count"])
    return manifest


class CorpusIndex:
    """A loaded index directory: search by vector, get records back. Checked whole before hnswlib opens it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import hnswlib

        self.path = Path(path)
        self.manifest = verify_index(self.path)
        self.embedder = self.manifest["embedder"]
        self.pooling = _made(self.manifest, "pooling")
        self.space = self.manifest.get("space", "cosine")
        self.dimension = int(self.manifest["dimension"])
        self.records = load_corpus(self.path / RECORDS_FILE)
        if len(self.records) != self.manifest["count"]:
            raise DataError(f"{self.path / RECORDS_FILE}: {len(self.records)} records, the manifest says "
                            f"{self.manifest['count']}; rebuild the index")
        self._index = hnswlib.Index(space=self.space, dim=self.dimension)
        self._index.load_index(str(self.path / INDEX_FILE), max_elements=len(self.records))
        self._index.set_ef(max(HNSW_EF_SEARCH, 1))

    def __len__(self) -> int:
        return len(self.records)

    def load_embedder(self, device: str | None = None) -> Embedder:
        """The embedder this index was built with, pooled as it was."""
        return load_embedder(self.embedder, device=device, pooling=self.pooling)

    def check_embedder(self, embedder_name: str | None) -> None:
        """Refuse an embedder other than the one the index was built with."""
        if embedder_name is not None and canonical_embedder_name(embedder_name) != self.embedder:
            raise ModelError(
                f"{self.path} was built with embedder {self.embedder!r}, not {embedder_name!r}: "
                f"pass --embedder {self.embedder} (or leave --embedder out), or rebuild the index"
            )

    def search(self, vectors: np.ndarray, k: int) -> list[list[Neighbour]]:
        """The k nearest records for each query vector (rows), best first, scored by cosine similarity (by minus
        the squared L2 distance in an L2 index)."""
        k = min(k, len(self.records))
        if k <= 0:
            return [[] for _ in range(len(vectors))]
        self._index.set_ef(max(HNSW_EF_SEARCH, k))
        labels, distances = self._index.knn_query(np.asarray(vectors, dtype=np.float32), k=k)
        return [
            [Neighbour(self.records[int(i)], float(1.0 - d if self.space == "cosine" else -d))
             for i, d in zip(row_l, row_d, strict=True)]
            for row_l, row_d in zip(labels, distances, strict=True)
        ]


# Extra hits searched when an item's own record must be skipped: itself and copies of it under other ids.
_SELF_MARGIN = 3
PICK_POOL = 3  # `random-of-3` draws from this many best hits (the reference code's rebuttal version)


def neighbours(index: CorpusIndex, embedder: Embedder, texts: list[str], k: int,
               exclude: list[str] | None = None, pick: str = "top", seed: int = 0) -> list[list[Neighbour]]:
    """The k nearest records of each text, best first. With `exclude` (one id per text: held-out records of
    the index's own corpus), neither the text's own record nor a copy of its question under another id is
    its neighbour. `pick` random-of-3: k drawn at random from the best max(3, k), as the reference code's
    rebuttal version does, by a generator seeded with `seed` and the text (the same draw on every rerun)."""
    from finemed_cli.data.text import normalise

    pool = max(k, PICK_POOL) if pick == "random-of-3" else k
    hits = index.search(embedder.encode(texts), pool + (_SELF_MARGIN if exclude else 0))
    if exclude:
        hits = [[h for h in hs if h.record.id != own_id and normalise(h.record.question) != normalise(text)]
                for text, own_id, hs in zip(texts, exclude, hits, strict=True)]
    if pick != "random-of-3":
        return [hs[:k] for hs in hits]
    out = []
    for text, hs in zip(texts, hits, strict=True):
        rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")])
        chosen = sorted(rng.choice(min(len(hs), pool), size=min(k, len(hs)), replace=False))
        out.append([hs[i] for i in chosen])
    return out
