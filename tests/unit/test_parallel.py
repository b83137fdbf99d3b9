"""Data parallel's pieces: each rank's share, the part files, and the merge in input order."""

from __future__ import annotations

import orjson
import pytest
from click.testing import CliRunner

from finemed_cli.cli.main import cli
from finemed_cli.errors import DataError
from finemed_cli.parallel import Ranks, launched, merge_parts, part_path, share_limit


def _write(path, ids):
    path.write_bytes(b"".join(orjson.dumps({"id": i, "response": f"r{i}"}) + b"\n" for i in ids))
    return path


def _ids(path):
    return [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()]


def test_launched_reads_torchruns_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert launched() == Ranks(1, 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched() is None  # a world of one is a plain run
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert launched() is None


@pytest.mark.parametrize(("limit", "world"), [(None, 2), (1, 2), (5, 2), (7, 3), (2, 4)])
def test_the_shares_of_a_limit_are_the_first_limit_items(limit, world):
    items = list(range(10))
    shares = [items[r::world][: share_limit(limit, Ranks(r, world))] for r in range(world)]
    assert sorted(x for s in shares for x in s) == items[:limit]


def test_merge_follows_the_question_order(tmp_path):
    a = _write(tmp_path / "a.jsonl", ["q3", "q1"])
    b = _write(tmp_path / "b.jsonl", ["q2", "q4"])
    assert merge_parts([a, b], tmp_path / "out.jsonl", ["q1", "q2", "q3", "q4"]) == 4
    assert _ids(tmp_path / "out.jsonl") == ["q1", "q2", "q3", "q4"]


def test_merge_places_each_record_by_the_input_it_came_from(tmp_path):
    # a synth questions stage: rank 0 had texts t1 and t3 (two questions each, t3's second rejected), rank 1 t2
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b"".join(orjson.dumps({"id": i, "source_id": s}) + b"\n"
                           for i, s in [("t1-q1", "t1"), ("t1-q2", "t1"), ("t3-q1", "t3")]))
    b.write_bytes(b"".join(orjson.dumps({"id": i, "source_id": s}) + b"\n" for i, s in [("t2-q2", "t2")]))
    merge_parts([a, b], tmp_path / "out.jsonl", ["t1", "t2", "t3"], origin=lambda r: r["source_id"])
    assert _ids(tmp_path / "out.jsonl") == ["t1-q1", "t1-q2", "t2-q2", "t3-q1"]


def test_merge_without_an_order_interleaves_shards(tmp_path):
    # --shard 0/2 answered q1, q3, q5; --shard 1/2 answered q2, q4
    parts = [_write(tmp_path / "s0.jsonl", ["q1", "q3", "q5"]), _write(tmp_path / "s1.jsonl", ["q2", "q4"])]
    merge_parts(parts, tmp_path / "out.jsonl")
    assert _ids(tmp_path / "out.jsonl") == ["q1", "q2", "q3", "q4", "q5"]


def test_merge_refuses_parts_of_two_runs_and_writes_nothing(tmp_path):
    a = _write(tmp_path / "a.jsonl", ["q1", "q2"])
    b = _write(tmp_path / "b.jsonl", ["q2"])
    out = _write(tmp_path / "out.jsonl", ["old"])
    with pytest.raises(DataError, match=r"b\.jsonl:1: id 'q2' is also in .*a\.jsonl:2"):
        merge_parts([a, b], out)
    assert _ids(out) == ["old"]


def test_merge_names_a_line_that_is_not_a_record(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q1"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not an answer record"):
        merge_parts([bad], tmp_path / "out.jsonl")


def test_part_paths_are_per_rank_beside_the_output(tmp_path):
    out = tmp_path / "answers.jsonl"
    assert part_path(out, Ranks(1, 2)) == tmp_path / "answers.jsonl.parts" / "rank-1-of-2.jsonl"


def test_merge_command(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b"".join(orjson.dumps({"id": f"q{i}", "question": f"question {i}?"}) + b"\n"
                                   for i in range(1, 5)))
    s0 = _write(tmp_path / "s0.jsonl", ["q3", "q1"])
    s1 = _write(tmp_path / "s1.jsonl", ["q4", "q2"])
    result = CliRunner().invoke(cli, ["merge", str(s0), str(s1), "--questions", str(questions), "-o",
                                      str(tmp_path / "all.jsonl")])
    assert result.exit_code == 0, result.output
    assert "4 records from 2 parts" in result.output
    assert _ids(tmp_path / "all.jsonl") == ["q1", "q2", "q3", "q4"]
