"""Every verb against a table of hostile inputs: each must exit non-zero with an `error:` line that names the
file at fault and says what to do, print no traceback, and leave every file it was given (and every output
that already existed) byte-identical, creating nothing beside them.

Cases run in-process (see conftest.py), so a traceback is an exception that fails the test. They stop before
any model loads, which keeps the table fast.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.robustness.conftest import run_finemed, snapshot


@dataclass
class Case:
    id: str
    args: Callable[[Path], list[object]]  # builds the hostile input in the workspace, returns the arguments
    expect: str  # in the error line
    names: str | None = None  # a path the error line must name (relative to the workspace); None: args[1]


def _setup(fn: Callable[[Path], object], args: list[object]) -> Callable[[Path], list[object]]:
    def build(ws: Path) -> list[object]:
        fn(ws)
        return args

    return build


def _write(rel: str, data: bytes) -> Callable[[Path], object]:
    def fn(ws: Path) -> None:
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    return fn


def _edit_manifest(**changes: object) -> Callable[[Path], object]:
    def fn(ws: Path) -> None:
        path = ws / "corpus.index" / "manifest.json"
        body = orjson.loads(path.read_bytes())
        body.update(changes)
        path.write_bytes(orjson.dumps(body))

    return fn


def _many(*fns: Callable[[Path], object]) -> Callable[[Path], object]:
    def fn(ws: Path) -> None:
        for f in fns:
            f(ws)

    return fn


def _truncate(rel: str, keep: int) -> Callable[[Path], object]:
    def fn(ws: Path) -> None:
        p = ws / rel
        p.write_bytes(p.read_bytes()[:keep])

    return fn


def _drop_last_record(rel: str) -> Callable[[Path], object]:
    def fn(ws: Path) -> None:
        p = ws / rel
        lines = p.read_bytes().splitlines(keepends=True)
        p.write_bytes(b"".join(lines[:-1]))

    return fn


def _symlink(rel: str, target: str) -> Callable[[Path], object]:
    return lambda ws: os.symlink(ws / target, ws / rel)


def _hardlink(rel: str, target: str) -> Callable[[Path], object]:
    return lambda ws: os.link(ws / target, ws / rel)


def _train_yaml(body: str) -> Callable[[Path], object]:
    return _write("train.yaml", body.encode())


def _model_dir(config: dict) -> Callable[[Path], object]:
    return _write("model/config.json", orjson.dumps(config))


def _embedded_gguf() -> str:
    from finemed_cli.checkpoints.embedded import embedded_gguf

    return str(embedded_gguf())


TRAIN_OK = "name: run\nstages: [{kind: sft, data: [corpus.jsonl], max_steps: 1}]\n"
ANSWER = ["answer", "questions.jsonl", "--index", "corpus.index"]
NO_TTT = ["answer", "questions.jsonl", "--no-ttt"]
EVAL = ["eval", "questions.jsonl", "--mode", "loglik", "--compare", "no-ttt"]
RAW = b'{"id": "r1", "text": "Metformin is the first-line oral drug for type 2 diabetes in most adults."}\n'

# Nine levels of nine aliases each: 387 million values from 400 bytes (the "billion laughs" of YAML).
ALIAS_BOMB = "x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]\n" for i in range(1, 9)) + "seed: *x8\n"

CASES = [
    # --- answer: where the answers go
    Case("answer-output-is-input", lambda ws: [*NO_TTT, "-o", "questions.jsonl"], "is the input", "questions.jsonl"),
    Case("answer-output-is-input-respelled", lambda ws: [*NO_TTT, "-o", "./sub/../questions.jsonl"],
         "is the input"),
    Case("answer-output-is-input-by-symlink", _setup(_symlink("link.jsonl", "questions.jsonl"),
                                                     [*NO_TTT, "-o", "link.jsonl"]), "is the input", "link.jsonl"),
    Case("answer-output-is-input-by-hard-link", _setup(_hardlink("hard.jsonl", "questions.jsonl"),
                                                       [*NO_TTT, "-o", "hard.jsonl"]), "is the input", "hard.jsonl"),
    Case("answer-output-inside-the-index", lambda ws: [*ANSWER, "-o", "corpus.index/answers.jsonl"],
         "inside the input folder", "corpus.index/answers.jsonl"),
    Case("answer-output-is-a-folder", lambda ws: [*NO_TTT, "-o", "corpus.index"], "is a folder", "corpus.index"),
    Case("answer-output-under-a-file", lambda ws: [*NO_TTT, "-o", "answers.jsonl/more.jsonl"],
         "is a file, not a folder", "answers.jsonl/more.jsonl"),
    Case("answer-output-where-nobody-may-write", lambda ws: [*NO_TTT, "-o", "/proc/sys/finemed/answers.jsonl"],
         "choose a writable location", "/proc/sys/finemed/answers.jsonl"),
    Case("answer-output-is-a-fifo", _setup(lambda ws: os.mkfifo(ws / "pipe"), [*NO_TTT, "-o", "pipe"]),
         "not a regular file", "pipe"),
    Case("answer-output-is-dev-null", lambda ws: [*NO_TTT, "-o", "/dev/null"], "not a regular file", "/dev/null"),
    Case("answer-output-is-a-dangling-link", _setup(_symlink("gone.jsonl", "nowhere/answers.jsonl"),
                                                    [*NO_TTT, "-o", "gone.jsonl"]), "broken symbolic link",
         "gone.jsonl"),
    Case("answer-output-is-a-link-loop", _setup(lambda ws: os.symlink(ws / "loop.jsonl", ws / "loop.jsonl"),
                                                [*NO_TTT, "-o", "loop.jsonl"]), "broken symbolic link", "loop.jsonl"),
    Case("answer-resumes-answers-made-otherwise", _setup(
        _write("old.jsonl", orjson.dumps({"id": "ex-q01", "response": "B", "settings": {
            "model": "embedded", "ttt": {"mode": "lora"}, "seed": 3}}) + b"\n"), [*NO_TTT, "-o", "old.jsonl"]),
         "holds answers made with", "old.jsonl"),
    # --- answer: what it reads
    Case("answer-questions-is-a-folder", lambda ws: ["answer", "corpus.index", "--no-ttt", "-o", "a.jsonl"],
         "is a folder", "corpus.index"),
    Case("answer-questions-missing", lambda ws: ["answer", "nothere.jsonl", "--no-ttt", "-o", "a.jsonl"],
         "no such file", "nothere.jsonl"),
    Case("answer-questions-not-utf8", _setup(_write("latin1.jsonl", '{"id": "q", "question": "Grüß"}\n'.encode("latin-1")),
                                             ["answer", "latin1.jsonl", "--no-ttt", "-o", "a.jsonl"]),
         "not valid UTF-8", "latin1.jsonl"),
    Case("answer-questions-is-a-pipe", _setup(lambda ws: os.mkfifo(ws / "q.pipe"),
                                              ["answer", "q.pipe", "--no-ttt", "-o", "a.jsonl"]),
         "not a regular file", "q.pipe"),
    Case("eval-benchmark-is-a-device", lambda ws: ["eval", "/dev/zero", "-o", "rep", "--compare", "no-ttt"],
         "not a regular file",
         "/dev/zero"),
    Case("answer-questions-name-with-a-newline", lambda ws: ["answer", "a\nb.jsonl", "--no-ttt", "-o", "a.jsonl"],
         "no such file", "a\\nb.jsonl"),
    Case("eval-compare-model-missing", lambda ws: [*EVAL, "-o", "rep", "--compare", "no-ttt,no-ttt@./typo"],
         "no such model directory", "./typo"),
    Case("answer-questions-empty", _setup(_write("empty.jsonl", b"\n"),
                                          ["answer", "empty.jsonl", "--no-ttt", "-o", "a.jsonl"]),
         "no records", "empty.jsonl"),
    Case("answer-questions-symlink-loop", _setup(lambda ws: os.symlink(ws / "loop.jsonl", ws / "loop.jsonl"),
                                                 ["answer", "loop.jsonl", "--no-ttt", "-o", "a.jsonl"]),
         "no such file", "loop.jsonl"),
    Case("answer-questions-huge-number", _setup(_write("big.jsonl", b'{"id": "q", "question": "Q?", "meta": 1e999}\n'),
                                                ["answer", "big.jsonl", "--no-ttt", "-o", "a.jsonl"]),
         "big.jsonl:1", "big.jsonl"),
    Case("answer-questions-nan", _setup(_write("nan.jsonl", b'{"id": "q", "question": NaN}\n'),
                                        ["answer", "nan.jsonl", "--no-ttt", "-o", "a.jsonl"]),
         "invalid JSON", "nan.jsonl"),
    Case("answer-existing-output-is-not-finemed", _setup(_write("notes.jsonl", b'{"note": "mine"}\n'),
                                                         [*NO_TTT, "-o", "notes.jsonl"]),
         "not a finemed output file", "notes.jsonl"),
    Case("answer-bad-settings", lambda ws: [*NO_TTT, "-o", "a.jsonl", "--ttt-rank", "100000", "--top-p", "7"],
         "LoRA rank", ""),
    # --- answer: the index
    Case("index-missing", lambda ws: [*ANSWER[:2], "--index", "nothere.index", "-o", "a.jsonl"], "no such index folder",
         "nothere.index"),
    Case("index-empty-folder", _setup(lambda ws: (ws / "empty.index").mkdir(),
                                      [*ANSWER[:2], "--index", "empty.index", "-o", "a.jsonl"]),
         "not a finemed index", "empty.index"),
    Case("index-manifest-not-json", _setup(_write("corpus.index/manifest.json", b"{oops"), [*ANSWER, "-o", "a.jsonl"]),
         "not readable JSON", "corpus.index/manifest.json"),
    Case("index-dimension-mismatch", _setup(_edit_manifest(dimension=1024), [*ANSWER, "-o", "a.jsonl"]),
         "64-dimensional vectors, the manifest says 1024", "corpus.index/index.bin"),
    Case("index-count-mismatch", _setup(_edit_manifest(count=61), [*ANSWER, "-o", "a.jsonl"]),
         "holds 60 vectors, the manifest says 61", "corpus.index/index.bin"),
    Case("index-records-shorter", _setup(_drop_last_record("corpus.index/records.jsonl"), [*ANSWER, "-o", "a.jsonl"]),
         "changed since the index was built", "corpus.index/records.jsonl"),
    Case("index-records-edited", _setup(lambda ws: (ws / "corpus.index/records.jsonl").write_bytes(
        (ws / "corpus.index/records.jsonl").read_bytes().replace(b"ex-c01", b"ex-c99")), [*ANSWER, "-o", "a.jsonl"]),
         "changed since the index was built", "corpus.index/records.jsonl"),
    Case("index-bin-missing", _setup(lambda ws: (ws / "corpus.index/index.bin").unlink(), [*ANSWER, "-o", "a.jsonl"]),
         "index.bin is missing", "corpus.index"),
    Case("index-bin-truncated", _setup(_truncate("corpus.index/index.bin", 5000), [*ANSWER, "-o", "a.jsonl"]),
         "truncated", "corpus.index/index.bin"),
    Case("index-bin-garbage", _setup(_write("corpus.index/index.bin", b"\x00" * 50), [*ANSWER, "-o", "a.jsonl"]),
         "shorter than an hnswlib header", "corpus.index/index.bin"),
    Case("index-from-older-finemed", _setup(_edit_manifest(format="finemed-index/1"), [*ANSWER, "-o", "a.jsonl"]),
         "older finemed", "corpus.index"),
    Case("index-manifest-null-dimension", _setup(_edit_manifest(dimension=None), [*ANSWER, "-o", "a.jsonl"]),
         "'dimension' is missing or invalid", "corpus.index/manifest.json"),
    # --- answer: the model
    Case("model-unknown-type", _setup(_model_dir({"model_type": "foonet"}), [*NO_TTT, "-o", "a.jsonl", "--model", "model"]),
         "model_type 'foonet' is not known", "model/config.json"),
    Case("model-config-not-json", _setup(_write("model/config.json", b"{nope"),
                                         [*NO_TTT, "-o", "a.jsonl", "--model", "model"]),
         "not a readable JSON object", "model/config.json"),
    Case("model-missing-local-path", lambda ws: [*NO_TTT, "-o", "a.jsonl", "--model", "./runs/x/final"],
         "no such model directory or file", "./runs/x/final"),
    Case("model-folder-without-config", lambda ws: [*NO_TTT, "-o", "a.jsonl", "--model", "corpus.index"],
         "no config.json", "corpus.index"),
    Case("model-not-a-gguf-file", lambda ws: [*NO_TTT, "-o", "a.jsonl", "--model", "corpus.jsonl"],
         "not a .gguf model", "corpus.jsonl"),
    # --- index build
    Case("index-build-output-is-a-file", lambda ws: ["index", "build", "corpus.jsonl", "-o", "answers.jsonl", "--force"],
         "a file is there", "answers.jsonl"),
    Case("index-build-output-is-the-corpus", lambda ws: ["index", "build", "corpus.jsonl", "-o", "corpus.jsonl"],
         "is the input", "corpus.jsonl"),
    Case("index-build-force-over-the-corpus-folder",
         _setup(lambda ws: shutil.copy(ws / "corpus.jsonl", ws / "data.jsonl"), ["index", "build", "data.jsonl", "-o", ".", "--force"]),
         "holds the input", "."),
    Case("index-build-force-over-a-foreign-folder",
         _setup(_write("mine/notes.txt", b"keep me"), ["index", "build", "corpus.jsonl", "-o", "mine", "--force"]),
         "not an index finemed built", "mine"),
    Case("index-build-other-corpus-without-force",
         _setup(_write("other.jsonl", (Path(__file__).parents[2] / "examples" / "corpus.jsonl").read_bytes()[:-1] + b" \n"),
                ["index", "build", "other.jsonl", "-o", "corpus.index", "--embedder", "test/hash-embedder"]),
         "pass --force", "corpus.index"),
    Case("index-build-corpus-bad-record", _setup(_write("bad.jsonl", b'{"id": "c", "question": "Q?"}\n'),
                                                 ["index", "build", "bad.jsonl", "-o", "new.index"]),
         "missing field 'reasoning'", "bad.jsonl"),
    Case("index-build-where-nobody-may-write", lambda ws: ["index", "build", "corpus.jsonl", "-o", "/proc/sys/x.index"],
         "choose a writable location", "/proc/sys/x.index"),
    # --- eval
    Case("eval-output-is-a-file", lambda ws: [*EVAL, "-o", "answers.jsonl"], "is a file", "answers.jsonl"),
    Case("eval-input-is-its-own-questions-file",
         _setup(_write("report/questions.jsonl", (Path(__file__).parents[2] / "examples" / "questions.jsonl").read_bytes()),
                ["eval", "report/questions.jsonl", "--mode", "loglik", "--compare", "no-ttt", "-o", "report"]),
         "is the input", "report/questions.jsonl"),
    Case("eval-output-inside-the-index", lambda ws: [*EVAL, "--index", "corpus.index", "-o", "corpus.index/report"],
         "inside the input folder", "corpus.index/report"),
    Case("eval-record-without-question",
         _setup(_write("noq.jsonl", b'{"id": "a", "options": {"A": "x", "B": "y"}, "answer": "A"}\n'),
                ["eval", "noq.jsonl", "--mode", "loglik", "--compare", "no-ttt", "-o", "report"]),
         "no 'question' field", "noq.jsonl"),
    Case("eval-corrupt-index", _setup(_edit_manifest(count=3), [*EVAL[:-2], "--compare", "ttt", "--index", "corpus.index",
                                                                "-o", "report"]),
         "the manifest says 3", "corpus.index/index.bin"),
    # --- synth
    Case("synth-output-is-input", lambda ws: ["synth", "score", "questions.jsonl", "-o", "questions.jsonl"],
         "is the input", "questions.jsonl"),
    Case("synth-rejects-is-output", lambda ws: ["synth", "filter", "questions.jsonl", "-o", "f.jsonl", "--rejects", "f.jsonl"],
         "is the input", "f.jsonl"),
    Case("synth-rejects-is-input", lambda ws: ["synth", "filter", "questions.jsonl", "-o", "f.jsonl", "--rejects",
                                               "questions.jsonl"], "is the input", "questions.jsonl"),
    Case("synth-empty-input", _setup(_write("empty.jsonl", b""), ["synth", "score", "empty.jsonl", "-o", "s.jsonl"]),
         "no records", "empty.jsonl"),
    Case("synth-input-without-ids", _setup(_write("raw.jsonl", b'{"text": "no id here"}\n'),
                                           ["synth", "questions", "raw.jsonl", "-o", "q.jsonl"]),
         "string 'id'", "raw.jsonl"),
    Case("synth-run-config-not-utf8", _setup(_write("synth.yaml", "raw: r.jsonl\nout_dir: \xff\n".encode("latin-1")),
                                             ["synth", "run", "synth.yaml"]), "not valid UTF-8", "synth.yaml"),
    Case("synth-run-config-bad-values", _setup(_write("synth.yaml", b"raw: null\nout_dir: out\nretries: many\nfoo: 1\n"),
                                               ["synth", "run", "synth.yaml"]), "problem(s)", "synth.yaml"),
    Case("synth-run-raw-missing", _setup(_write("synth.yaml", b"raw: nothere.jsonl\nout_dir: out\n"),
                                         ["synth", "run", "synth.yaml"]), "no such file", "nothere.jsonl"),
    Case("synth-run-out-dir-is-a-file", _setup(_many(_write("r.jsonl", RAW), _write("synth.yaml", b"raw: r.jsonl\nout_dir: answers.jsonl\n")),
                                               ["synth", "run", "synth.yaml"]), "a file is there", "answers.jsonl"),
    Case("synth-run-out-dir-is-raw", _setup(_many(_write("r.jsonl", RAW), _write("synth.yaml", b"raw: r.jsonl\nout_dir: r.jsonl\n")),
                                            ["synth", "run", "synth.yaml"]), "is the input", "r.jsonl"),
    # --- train
    Case("train-null-value", _setup(_train_yaml(TRAIN_OK + "seed: null\nsave_every: ~\n"), ["train", "train.yaml"]),
         "problem(s)", "train.yaml"),
    Case("train-not-utf8", _setup(_write("train.yaml", b"name: r\xe9sum\xe9\n"), ["train", "train.yaml"]),
         "train.yaml:1: not valid UTF-8", "train.yaml"),
    Case("train-not-yaml", _setup(_train_yaml("name: [unclosed\n"), ["train", "train.yaml"]), "not valid YAML",
         "train.yaml"),
    Case("train-name-escapes", _setup(_train_yaml(TRAIN_OK.replace("name: run", "name: '..'")), ["train", "train.yaml"]),
         "must stay inside output_dir", "train.yaml"),
    Case("train-name-with-separator", _setup(_train_yaml(TRAIN_OK.replace("name: run", "name: ../../etc")),
                                             ["train", "train.yaml"]), "must stay inside output_dir", "train.yaml"),
    Case("train-infinite-epochs", _setup(_train_yaml(TRAIN_OK.replace("max_steps: 1", "epochs: .inf")),
                                         ["train", "train.yaml"]), "finite number", "train.yaml"),
    Case("train-nan-lr", _setup(_train_yaml(TRAIN_OK.replace("max_steps: 1", "lr: .nan")), ["train", "train.yaml"]),
         "finite number", "train.yaml"),
    Case("train-resume-into-a-project-folder", _setup(_many(_train_yaml(TRAIN_OK), _write("runs/run/.git/HEAD", b"ref\n"),
                                                         _write("runs/run/manifest.json", b"{}")),
                                                   ["train", "train.yaml", "--resume"]),
         "is not a finemed run folder", "runs/run"),
    Case("train-into-a-folder-of-other-files", _setup(_many(_train_yaml(TRAIN_OK), _write("runs/run/notes.txt", b"x")),
                                                      ["train", "train.yaml"]), "is not a finemed run folder",
         "runs/run"),
    Case("train-yaml-alias-bomb", _setup(_train_yaml(ALIAS_BOMB + TRAIN_OK), ["train", "train.yaml"]),
         "more than 100,000 values", "train.yaml"),
    Case("train-missing-data", _setup(_train_yaml(TRAIN_OK.replace("corpus.jsonl", "gone.jsonl")), ["train", "train.yaml"]),
         "does not exist", "train.yaml"),
    Case("train-config-is-a-folder", lambda ws: ["train", "corpus.index"], "is a directory", "corpus.index"),
    Case("train-not-a-mapping", _setup(_train_yaml("- just\n- a list\n"), ["train", "train.yaml"]),
         "expected a mapping", "train.yaml"),
    # --- export, report, chat
    Case("export-output-inside-the-model", _setup(_model_dir({"model_type": "llama"}),
                                                  ["export", "model", "-o", "model/model.gguf"]),
         "inside the input folder", "model/model.gguf"),
    Case("export-output-is-a-folder", _setup(_model_dir({"model_type": "llama"}), ["export", "model", "-o", "corpus.index"]),
         "is a directory", "corpus.index"),
    Case("report-output-is-a-file", lambda ws: ["report", "corpus.jsonl", "-o", "answers.jsonl", "--no-tsne"],
         "is a file", "answers.jsonl"),
    # --- numbers that are not numbers (issue 31): NaN passes every `x < lo` check, so each is refused by name
    Case("answer-temperature-nan", lambda ws: [*NO_TTT, "-o", "a.jsonl", "--temperature", "nan"],
         "is not a finite number", "--temperature"),
    Case("answer-ttt-alpha-nan", lambda ws: [*ANSWER, "-o", "a.jsonl", "--ttt-alpha", "nan"],
         "is not a finite number", "--ttt-alpha"),
    Case("answer-ttt-lr-inf", lambda ws: [*ANSWER, "-o", "a.jsonl", "--ttt-lr", "inf"],
         "is not a finite number", "--ttt-lr"),
    Case("answer-seed-overflow", lambda ws: [*NO_TTT, "-o", "a.jsonl", "--seed", "1180591620717411303424"],
         "seed must be from 0 to 2**63 - 1", "seed"),
    Case("eval-seed-negative", lambda ws: [*EVAL, "-o", "rep", "--seed", "-1"], "seed must be from 0", "seed"),
    Case("calibrate-max-minutes-nan", lambda ws: ["ttt-calibrate", "questions.jsonl", "--index", "corpus.index",
                                                  "-o", "calib", "--max-minutes", "nan"],
         "is not a finite number", "--max-minutes"),
    Case("chat-top-p-out-of-range", lambda ws: ["chat", "corpus.jsonl", "--top-p", "7"], "is not in the range",
         "--top-p"),
    Case("answer-system-prompt-endless", lambda ws: [*NO_TTT, "-o", "a.jsonl", "--system-prompt", "@/dev/zero"],
         "holds more than 256 KiB", "--system-prompt"),
    Case("model-without-a-tokenizer", _setup(_model_dir({"model_type": "llama"}),
                                             [*NO_TTT, "-o", "a.jsonl", "--model", "model"]),
         "no tokenizer files (tokenizer.json, tokenizer.model)", "model"),
    Case("chat-max-tokens-negative", lambda ws: ["chat", "corpus.jsonl", "--max-tokens", "-5"],
         "is not in the range x>=1", "--max-tokens"),
    Case("index-query-k-zero", lambda ws: ["index", "query", "corpus.index", "thyroid", "-k", "0"],
         "is not in the range x>=1", "-k"),
    Case("chat-not-a-gguf", lambda ws: ["chat", "corpus.jsonl", "-p", "hi"], "", "corpus.jsonl"),
    # --- serve (each fails before it listens for requests)
    Case("serve-not-a-gguf", lambda ws: ["serve", "corpus.jsonl", "--port", "0"], "", "corpus.jsonl"),
    Case("serve-index-is-a-file", lambda ws: ["serve", "corpus.jsonl", "--index", "answers.jsonl", "--port", "0"],
         "", "answers.jsonl"),
    Case("serve-context-past-the-trained-one", lambda ws: ["serve", _embedded_gguf(), "--ctx", "100000000", "--port", "0"],
         "was trained on a context of", "--ctx"),
    Case("serve-no-such-lora", lambda ws: ["serve", "corpus.jsonl", "--lora", "gone.gguf", "--port", "0"],
         "does not exist", "gone.gguf"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_cleanly_and_changes_nothing(case: Case, workspace: Path) -> None:
    args = case.args(workspace)
    before = snapshot(workspace)
    run = run_finemed(*args, cwd=workspace)
    assert run.code != 0, f"accepted: finemed {' '.join(map(str, args))}\n{run.stdout}\n{run.stderr}"
    assert "Traceback" not in run.stderr
    text = run.error_text
    assert text, f"no error line in:\n{run.stderr}"
    assert case.expect in text, text
    first = text.splitlines()[0]
    named = case.names if case.names is not None else str(args[1])
    assert named in first, f"the error does not name {named}: {first}"
    assert snapshot(workspace) == before, "a refused run changed the workspace"
