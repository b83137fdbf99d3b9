"""The hostile-input harness: run a `finemed` command line in-process, as the console script does (so a
FinemedError becomes `error: …` on stderr and exit code 2, and anything else escapes as the traceback a user
would see), and snapshot a folder tree to prove that a refused run changed nothing in it."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.conftest import EXAMPLES


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def error_text(self) -> str:
        """stderr from the `error:` line on: the line, and the problems a config error lists under it."""
        lines = self.stderr.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith(("error:", "Error:"))]
        return "\n".join(lines[starts[0]:]) if starts else ""


def run_finemed(*args: object, cwd: Path | None = None) -> Run:
    """`finemed ARGS` in this process; an exception other than SystemExit propagates (a traceback: a bug)."""
    from finemed_cli.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["finemed", *map(str, args)]
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return Run(code, out.getvalue(), err.getvalue())


def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every path under `root` (files with their bytes, links with their targets, folders), for equality."""
    tree: dict[str, bytes | str | None] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                tree[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                tree[rel] = p.read_bytes()
            else:
                tree[rel] = None
    return tree


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


@pytest.fixture()
def workspace(tmp_path: Path, hash_embedder) -> Path:
    """A folder a user would have: questions, a corpus, an index of it, an earlier answer file."""
    from finemed_cli.retrieval.index import build_index

    (tmp_path / "questions.jsonl").write_bytes((EXAMPLES / "questions.jsonl").read_bytes())
    (tmp_path / "corpus.jsonl").write_bytes((EXAMPLES / "corpus.jsonl").read_bytes())
    build_index(tmp_path / "corpus.jsonl", tmp_path / "corpus.index", hash_embedder)
    write_jsonl(tmp_path / "answers.jsonl", [{"id": "ex-q01", "response": "…", "prediction": "B"}])
    return tmp_path
