"""`finemed index build|query`."""

from __future__ import annotations

from pathlib import Path

import click

from finemed_cli.cli.options import threads_option
from finemed_cli.retrieval.embed import POOLINGS
from finemed_cli.retrieval.keys import KEYS


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
@click.option("--key", type=click.Choice(KEYS), default="question", show_default=True,
              help="What is embedded of each record: its question, or the whole conversation (system prompt, "
                   "question, response) in --template-model's chat template, as the paper's reference code does.")
@click.option("--pooling", type=click.Choice(POOLINGS), default="model", show_default=True,
              help="model: the embedder's own pooling, normalised, cosine search; cls: the first token, normalised; "
                   "mean: the unnormalised mean of the last hidden state, L2 search (the reference code's).")
@click.option("--template-model", default=None,
              help="With --key question+response: the model whose chat template renders the records (the one TTT "
                   "trains) [default: the embedded SmolLM2].")
@threads_option(help="CPU threads of the embedder [default: the physical cores torch finds].", expose_value=False)
def build(corpus: Path, output: Path, embedder: str | None, force: bool, device: str | None, key: str,
          pooling: str, template_model: str | None) -> None:
    """Embed each CORPUS record (its question, by default) into an hnswlib index.

    The directory holds index.bin, records.jsonl and manifest.json (embedder, key, pooling, dimension, count,
    corpus hash).
    """
    from finemed_cli.retrieval.index import build_index
    from finemed_cli.retrieval.keys import IndexKeyConfig

    if template_model is not None and key == "question":
        raise click.BadParameter("renders records for --key question+response only", param_hint="--template-model")
    result = build_index(corpus, output, embedder, force=force, progress=True, device=device,
                         key_config=IndexKeyConfig(key, pooling, template_model))
    verb = "up to date" if result.reused else "built"
    click.echo(f"{result.path}: {verb}, {result.count} records, {result.dimension}-d, embedder {result.embedder}")


@index.command("query")
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.argument("text")
@click.option("-k", type=click.IntRange(min=1), default=3, show_default=True, help="Neighbours to show.")
@click.option("--embedder", default=None, help="Must match the index's embedder (default: the index's).")
@threads_option(help="CPU threads of the embedder [default: the physical cores torch finds].", expose_value=False)
def query(index_dir: Path, text: str, k: int, embedder: str | None) -> None:
    """Show the K records of INDEX_DIR nearest to TEXT, with cosine scores."""
    from finemed_cli.retrieval.index import CorpusIndex

    idx = CorpusIndex(index_dir)
    idx.check_embedder(embedder)
    vec = idx.load_embedder().encode([text])
    for n in idx.search(vec, k)[0]:
        dept = " / ".join(x for x in (n.record.department, n.record.subdepartment) if x)
        q = " ".join(n.record.question.split())
        click.echo(f"{n.score:.3f}  {n.record.id}  {dept or '-'}  {q[:100]}")
