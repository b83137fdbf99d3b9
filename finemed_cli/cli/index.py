"""`finemed index build|query`."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def index() -> None:
    """Build and query the retrieval index of reasoning examples."""


@index.command("build")
@click.argument("corpus", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Index directory to write.")
@click.option("--embedder", default=None, help="sentence-transformers model dir or hub id "
              "(default: the embedded all-MiniLM-L6-v2; the paper uses BAAI/bge-large-en-v1.5).")
@click.option("--force", is_flag=True,
              help="Rebuild even if up to date, or replace an index of another corpus (only an index finemed built "
                   "is ever replaced).")
@click.option("--device", default=None, help="Embedding device (default: cuda if available, else cpu).")
def build(corpus: Path, output: Path, embedder: str | None, force: bool, device: str | None) -> None:
    """Embed the question of each CORPUS record into an hnswlib cosine index.

    The directory holds index.bin, records.jsonl and manifest.json (embedder, dimension, count, corpus hash).
    """
    from finemed_cli.retrieval.index import build_index

    result = build_index(corpus, output, embedder, force=force, progress=True, device=device)
    verb = "up to date" if result.reused else "built"
    click.echo(f"{result.path}: {verb}, {result.count} records, {result.dimension}-d, embedder {result.embedder}")


@index.command("query")
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.argument("text")
@click.option("-k", default=3, show_default=True, help="Neighbours to show.")
@click.option("--embedder", default=None, help="Must match the index's embedder (default: the index's).")
def query(index_dir: Path, text: str, k: int, embedder: str | None) -> None:
    """Show the K records of INDEX_DIR nearest to TEXT, with cosine scores."""
    from finemed_cli.retrieval.embed import load_embedder
    from finemed_cli.retrieval.index import CorpusIndex

    idx = CorpusIndex(index_dir)
    idx.check_embedder(embedder)
    vec = load_embedder(idx.embedder).encode([text])
    for n in idx.search(vec, k)[0]:
        dept = " / ".join(x for x in (n.record.department, n.record.subdepartment) if x)
        q = " ".join(n.record.question.split())
        click.echo(f"{n.score:.3f}  {n.record.id}  {dept or '-'}  {q[:100]}")
