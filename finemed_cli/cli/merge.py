"""`finemed merge`: the parts of a sharded run into one file, in input order."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The merged file to write.")
@click.option("--questions", type=click.Path(path_type=Path), default=None,
              help="The question file the parts answer: the merged records follow its order [default: round robin "
                   "over the parts, which is input order for `--shard 0/n` … `n-1/n` given in shard order].")
def merge(parts: tuple[Path, ...], output: Path, questions: Path | None) -> None:
    """Merge the answer files of `finemed answer --shard i/n` runs into OUTPUT.

    \b
    finemed answer q.jsonl --shard 0/2 -o part0.jsonl ; finemed answer q.jsonl --shard 1/2 -o part1.jsonl
    finemed merge part0.jsonl part1.jsonl --questions q.jsonl -o answers.jsonl

    Under torchrun the ranks merge their parts themselves. An id found in two parts is refused (parts of two
    runs mixed); nothing is written then.
    """
    from finemed_cli.data.jsonl import check_input_file
    from finemed_cli.data.output import OutputLock, check_output
    from finemed_cli.data.records import load_questions
    from finemed_cli.parallel import merge_parts

    for p in parts:
        check_input_file(p)
    check_output(output, inputs=[*parts, *([questions] if questions else [])])
    order = [q.id for q in load_questions(questions)] if questions is not None else None
    with OutputLock(output):
        n = merge_parts(list(parts), output, order)
    click.echo(f"{output}: {n} records from {len(parts)} parts")
