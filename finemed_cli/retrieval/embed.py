"""Sentence embeddings for retrieval: sentence-transformers, normalised, CLS pooling for bge models; or the
pooling an index asks for (`--pooling`): the reference code's unnormalised mean of the last hidden state."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from finemed_cli.checkpoints.embedded import DEFAULT_EMBEDDER_NAME, embedded_embedder_dir
from finemed_cli.errors import ModelError
from finemed_cli.hub import hub_snapshot, parse_hub_ref

logger = logging.getLogger(__name__)


POOLINGS = ("model", "cls", "mean")


class Embedder(Protocol):
    """Anything that turns texts into float32 vectors (L2-normalised unless `normalised` is False)."""

    name: str
    dimension: int

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray: ...


def canonical_embedder_name(name: str | None) -> str:
    """The name an index manifest records: the embedded default's hub id, a hub id, or an absolute path."""
    if name is None or name in (DEFAULT_EMBEDDER_NAME, "all-MiniLM-L6-v2"):
        return DEFAULT_EMBEDDER_NAME
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def _local(name: str) -> str:
    """A directory for an embedder given as a path or a hub id (cache first, download when allowed)."""
    if Path(name).exists():
        return name
    ref = parse_hub_ref(name)
    if ref is None or ref.gguf:
        raise ModelError(f"embedder {name!r}: no such directory, and not a hub id (org/name); check the path")
    return str(hub_snapshot(ref, "embedder"))


class SentenceTransformerEmbedder:
    """A sentence-transformers model.

    pooling `model`: the model's own sentence-transformers set-up; a directory without one gets CLS pooling
    for bge models (their documented pooling) and mean pooling otherwise; normalised. `cls`: the first token's
    state, normalised. `mean`: the mean of the last hidden state over the text's tokens, not normalised — what
    the paper's reference code embeds with (searched by L2 distance there, and so here).
    """

    def __init__(self, name: str | None = None, device: str | None = None, pooling: str = "model") -> None:
        if pooling not in POOLINGS:
            raise ModelError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.name = canonical_embedder_name(name)
        self.pooling = pooling
        self.normalised = pooling != "mean"
        # Resolved before the heavy imports: a hub id missing offline fails in milliseconds, not seconds
        source = str(embedded_embedder_dir()) if self.name == DEFAULT_EMBEDDER_NAME else _local(self.name)
        import transformers
        from sentence_transformers import SentenceTransformer, models

        transformers.utils.logging.disable_progress_bar()  # weight-loading bars; the encode bar stays
        try:
            if pooling != "model" or (Path(source).is_dir() and not (Path(source) / "modules.json").is_file()):
                word = models.Transformer(source)
                mode = pooling if pooling != "model" else "cls" if "bge" in self.name.lower() else "mean"
                width = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
                pool = models.Pooling(width(), pooling_mode=mode)
                tail = [models.Normalize()] if self.normalised else []
                self._model = SentenceTransformer(modules=[word, pool, *tail], device=device)
            else:
                self._model = SentenceTransformer(source, device=device)
        except OSError as e:
            raise ModelError(
                f"cannot load embedder {name!r}: {e}. Pass a sentence-transformers directory or hub id, or "
                "leave --embedder out for the embedded all-MiniLM-L6-v2"
            ) from None
        dim = self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension") \
            else self._model.get_sentence_embedding_dimension()
        self.dimension = int(dim)

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        vectors = self._model.encode(
            texts, batch_size=batch_size, normalize_embeddings=self.normalised, convert_to_numpy=True,
            show_progress_bar=progress,
        )
        return np.asarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the embedder reads of `texts` (special tokens included, before truncation)."""
        return sum(len(ids) for ids in self._model.tokenizer(texts)["input_ids"])


def embed_all(embedder: Embedder, texts: list[str], *, progress: bool, desc: str = "embedding") -> np.ndarray:
    """Every text's vector, with finemed's own labelled bar (records/s, ETA) in place of the library's
    unlabelled `Batches` one; chunks of 256 keep the bar moving without costing batch efficiency."""
    from finemed_cli.console import bar

    chunks = []
    with bar(total=len(texts), progress=progress, desc=desc, unit="text") as b:
        for i in range(0, len(texts), 256):
            part = texts[i:i + 256]
            chunks.append(embedder.encode(part))
            b.update(len(part))
    return np.concatenate(chunks)


def load_embedder(name: str | None = None, device: str | None = None, pooling: str = "model") -> Embedder:
    """Load an embedder by hub id or directory (None: the embedded all-MiniLM-L6-v2), pooled as `pooling`."""
    return SentenceTransformerEmbedder(name, device=device, pooling=pooling)
