"""JSONL reading (`iter_jsonl`, `read_records`) and resumable appending (`JsonlAppender`)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from finemed_cli.data.jsonl import JsonlAppender, RecordError, iter_jsonl, read_records
from finemed_cli.data.records import QuestionRecord, load_questions
from finemed_cli.errors import DataError, FinemedError


def _line(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


def _q(rid: str, question: str = "What is the first-line treatment?") -> dict[str, Any]:
    return {"id": rid, "question": question}


def _write(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(lines))
    return path


# --------------------------------------------------------------------------- iter_jsonl


def test_iter_jsonl_yields_line_numbers_and_skips_blank_lines(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", _line({"id": "a"}), b"\n", b"   \n", _line({"id": "b"}), b"\r\n")
    assert list(iter_jsonl(p)) == [(1, {"id": "a"}), (4, {"id": "b"})]


def test_iter_jsonl_accepts_last_line_without_newline(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", _line({"id": "a"}), b'{"id": "b"}')
    assert [v["id"] for _, v in iter_jsonl(p)] == ["a", "b"]


def test_iter_jsonl_skips_a_byte_order_mark(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", b"\xef\xbb\xbf" + _line({"id": "a"}), _line({"id": "b"}))
    assert list(iter_jsonl(p)) == [(1, {"id": "a"}), (2, {"id": "b"})]


def test_iter_jsonl_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="no such file") as info:
        list(iter_jsonl(p))
    assert str(p) in str(info.value)


def test_iter_jsonl_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a folder; give a JSONL file"):
        list(iter_jsonl(tmp_path))


def test_iter_jsonl_malformed_json_names_path_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", _line(_q("a")), b'{"id": "b", "question": \n', _line(_q("c")))
    with pytest.raises(DataError) as info:
        list(iter_jsonl(p))
    msg = str(info.value)
    assert msg.startswith(f"{p}:2: ")
    assert "invalid JSON" in msg


def test_data_error_is_a_finemed_error() -> None:
    assert issubclass(DataError, FinemedError)


# --------------------------------------------------------------------------- read_records / load_questions


def test_load_questions_malformed_json_on_line_2_of_3(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", _line(_q("a")), b"{not json}\n", _line(_q("c")))
    with pytest.raises(DataError) as info:
        load_questions(p)
    msg = str(info.value)
    assert f"{p}:2:" in msg
    assert "invalid JSON" in msg
    assert f"{p}:1:" not in msg and f"{p}:3:" not in msg


def test_json_array_line_is_not_an_object(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", _line(_q("a")), _line(["b", "question"]))
    with pytest.raises(DataError) as info:
        load_questions(p)
    msg = str(info.value)
    assert f"{p}:2:" in msg
    assert "expected a JSON object" in msg and "list" in msg


def test_missing_field_names_line_and_field(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", _line(_q("a")), _line({"id": "b", "options": {"A": "x", "B": "y"}}))
    with pytest.raises(DataError) as info:
        load_questions(p)
    msg = str(info.value)
    assert f"{p}:2:" in msg
    assert "missing field 'question'" in msg


def test_wrong_type_names_line_and_field(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", _line({"id": 17, "question": "Which drug?"}))
    with pytest.raises(DataError) as info:
        load_questions(p)
    msg = str(info.value)
    assert f"{p}:1:" in msg
    assert "'id'" in msg and "must be a string" in msg and "int" in msg


def test_empty_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl")
    with pytest.raises(DataError, match="no records") as info:
        load_questions(p)
    assert str(p) in str(info.value)


def test_file_of_only_blank_lines(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", b"\n", b"   \n", b"\t\n", b"\n")
    with pytest.raises(DataError, match="no records") as info:
        load_questions(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize(
    ("payload", "byte"),
    [
        (b"\xff\n", "0xff"),
        ('{"id": "a", "question": "Caf\u00e9 au lait spots?"}\n'.encode("latin-1"), "0xe9"),
    ],
    ids=["0xff", "latin-1"],
)
def test_non_utf8_bytes(tmp_path: Path, payload: bytes, byte: str) -> None:
    p = _write(tmp_path / "q.jsonl", _line(_q("ok")), payload)
    with pytest.raises(DataError) as info:
        load_questions(p)
    msg = str(info.value)
    assert f"{p}:2:" in msg
    assert "not valid UTF-8" in msg
    assert byte in msg


def test_valid_utf8_non_ascii_is_fine(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", _line(_q("a", "Café au lait spots: which syndrome?")))
    assert load_questions(p)[0].question == "Café au lait spots: which syndrome?"


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", _line(_q("dup")), _line(_q("other")), _line(_q("dup")))
    with pytest.raises(DataError) as info:
        load_questions(p)
    msg = str(info.value)
    assert f"{p}:3:" in msg
    assert "duplicate id 'dup'" in msg
    assert "first at line 1" in msg


def test_missing_file_via_load_questions(tmp_path: Path) -> None:
    p = tmp_path / "missing" / "q.jsonl"
    with pytest.raises(DataError, match="no such file") as info:
        load_questions(p)
    assert str(p) in str(info.value)


def test_several_bad_lines_reported_in_one_error(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "q.jsonl",
        _line(_q("a")),  # 1: fine
        _line({"id": "b"}),  # 2: missing question
        _line([1, 2, 3]),  # 3: not an object
        _line({"id": 4, "question": "?"}),  # 4: id not a string
        _line(_q("e")),  # 5: fine
        _line(_q("a")),  # 6: duplicate of line 1
    )
    with pytest.raises(DataError) as info:
        load_questions(p)
    lines = str(info.value).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(f"{p}:2:") and "missing field 'question'" in lines[0]
    assert lines[1].startswith(f"{p}:3:") and "expected a JSON object" in lines[1]
    assert lines[2].startswith(f"{p}:4:") and "'id'" in lines[2]
    assert lines[3].startswith(f"{p}:6:") and "duplicate id 'a'" in lines[3]


def test_malformed_json_is_reported_together_with_other_bad_lines(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "q.jsonl",
        _line(_q("a")),
        b"{not json}\n",  # 2: invalid JSON
        _line({"id": "c"}),  # 3: missing question
        b'{"id": "d", \n',  # 4: invalid JSON
    )
    with pytest.raises(DataError) as info:
        load_questions(p)
    msg = str(info.value)
    assert f"{p}:2:" in msg
    assert f"{p}:3:" in msg
    assert f"{p}:4:" in msg


def test_error_list_is_capped(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", *(_line({"id": f"q{i}"}) for i in range(25)))
    with pytest.raises(DataError) as info:
        load_questions(p)
    lines = str(info.value).splitlines()
    assert len(lines) == 21
    assert lines[0].startswith(f"{p}:1:")
    assert lines[19].startswith(f"{p}:20:")
    assert lines[20] == "… and 5 more"


def test_read_records_with_custom_parser(tmp_path: Path) -> None:
    def parse(obj: dict[str, Any]) -> QuestionRecord:
        if obj.get("question", "").startswith("skip"):
            raise RecordError("field 'question' is not wanted")
        return QuestionRecord.from_json(obj)

    good = _write(tmp_path / "good.jsonl", _line(_q("a")), _line(_q("b")))
    assert [r.id for r in read_records(good, parse)] == ["a", "b"]

    bad = _write(tmp_path / "bad.jsonl", _line(_q("a")), _line(_q("b", "skip me")))
    with pytest.raises(DataError) as info:
        read_records(bad, parse)
    assert str(info.value) == f"{bad}:2: field 'question' is not wanted"


# --------------------------------------------------------------------------- JsonlAppender


def test_appender_writes_complete_lines(tmp_path: Path) -> None:
    p = tmp_path / "out" / "answers.jsonl"  # the parent is created
    with JsonlAppender(p, fsync=False) as w:
        assert w.done_ids == set()
        w.append({"id": "a", "prediction": "B"})
        w.append({"id": "b", "prediction": None, "response": "line one\nline two"})
        assert w.done_ids == {"a", "b"}
    data = p.read_bytes()
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 2  # the embedded newline is escaped, not written raw
    assert list(iter_jsonl(p)) == [
        (1, {"id": "a", "prediction": "B"}),
        (2, {"id": "b", "prediction": None, "response": "line one\nline two"}),
    ]


def test_appender_with_fsync_appends_to_existing_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "answers.jsonl", _line({"id": "old"}))
    with JsonlAppender(p) as w:
        w.append({"id": "new"})
    assert [v["id"] for _, v in iter_jsonl(p)] == ["old", "new"]


def test_appender_reopen_collects_done_ids(tmp_path: Path) -> None:
    p = tmp_path / "answers.jsonl"
    with JsonlAppender(p, fsync=False) as w:
        for rid in ("q1", "q2", "q3"):
            w.append({"id": rid})
    with JsonlAppender(p, fsync=False) as w:
        assert w.done_ids == {"q1", "q2", "q3"}
        w.append({"id": "q4"})
    with JsonlAppender(p, fsync=False) as w:
        assert w.done_ids == {"q1", "q2", "q3", "q4"}
    assert [v["id"] for _, v in iter_jsonl(p)] == ["q1", "q2", "q3", "q4"]


def test_appender_close_is_idempotent(tmp_path: Path) -> None:
    open_fds = len(os.listdir("/proc/self/fd"))
    w = JsonlAppender(tmp_path / "a.jsonl", fsync=False)
    w.append({"id": "q1"})
    w.close()
    w.close()
    assert len(os.listdir("/proc/self/fd")) == open_fds  # the file is closed once and stays closed


def test_appender_cuts_torn_last_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _line({"id": "a", "prediction": "C"}) + _line({"id": "b", "prediction": "A"})
    torn = b'{"id": "c", "response": "The patient presents wi'
    p = _write(tmp_path / "answers.jsonl", good, torn)
    with caplog.at_level(logging.WARNING, logger="finemed_cli.data.jsonl"), JsonlAppender(p, fsync=False) as w:
        assert w.done_ids == {"a", "b"}
        w.append({"id": "c", "response": "The patient presents with goiter."})
    assert p.read_bytes() == good + _line({"id": "c", "response": "The patient presents with goiter."})
    assert any("incomplete last line" in r.getMessage() for r in caplog.records)


def test_appender_keeps_a_complete_last_record_without_newline(tmp_path: Path) -> None:
    # A torn line is one that does not parse: a whole record some other tool wrote without its final newline
    # is kept, and the next record goes on a line of its own.
    good = _line({"id": "a"})
    p = _write(tmp_path / "answers.jsonl", good, b'{"id": "b"}')
    with JsonlAppender(p, fsync=False) as w:
        assert w.done_ids == {"a", "b"}
        w.append({"id": "c"})
    assert [v["id"] for _, v in iter_jsonl(p)] == ["a", "b", "c"]


def test_appender_changes_nothing_until_the_first_append(tmp_path: Path) -> None:
    torn = _line({"id": "a"}) + b'{"id": "b", "resp'
    p = _write(tmp_path / "answers.jsonl", torn)
    with JsonlAppender(p, fsync=False) as w:
        assert w.done_ids == {"a"}
    assert p.read_bytes() == torn  # opened and closed without a record: the torn tail is still there
    missing = tmp_path / "new" / "deeper" / "answers.jsonl"
    with JsonlAppender(missing, fsync=False):
        pass
    assert not missing.parent.parent.exists()  # no folder, no empty file


def test_appender_os_errors_are_one_line_naming_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    w = JsonlAppender(blocker / "answers.jsonl", fsync=False)
    with pytest.raises(DataError) as info:
        w.append({"id": "a"})
    assert str(blocker / "answers.jsonl") in str(info.value) and "\n" not in str(info.value)


def test_appender_torn_only_line_is_replaced_by_the_first_record(tmp_path: Path) -> None:
    p = _write(tmp_path / "answers.jsonl", b'{"id": "a", "resp')
    with JsonlAppender(p, fsync=False) as w:
        assert w.done_ids == set()
        w.append({"id": "a", "response": "whole"})
    assert p.read_bytes() == _line({"id": "a", "response": "whole"})


def test_appender_records_after_repair_parse_back(tmp_path: Path) -> None:
    good = _line({"id": "a", "prediction": "C"})
    p = _write(tmp_path / "answers.jsonl", good, b'{"id": "b", "predic')
    with JsonlAppender(p, fsync=False) as w:
        w.append({"id": "b", "prediction": "D"})
        w.append({"id": "c", "prediction": None})
    assert list(iter_jsonl(p)) == [
        (1, {"id": "a", "prediction": "C"}),
        (2, {"id": "b", "prediction": "D"}),
        (3, {"id": "c", "prediction": None}),
    ]
    with JsonlAppender(p, fsync=False) as w:
        assert w.done_ids == {"a", "b", "c"}


def test_appender_malformed_middle_line_raises_and_leaves_file(tmp_path: Path) -> None:
    content = _line({"id": "a"}) + b'{"id": "b", oops}\n' + _line({"id": "c"})
    p = _write(tmp_path / "answers.jsonl", content)
    with pytest.raises(DataError) as info:
        JsonlAppender(p, fsync=False)
    msg = str(info.value)
    assert f"{p}:2:" in msg
    assert "not valid JSON" in msg
    assert p.read_bytes() == content


def test_appender_line_without_string_id_raises(tmp_path: Path) -> None:
    p = _write(tmp_path / "answers.jsonl", _line({"id": "a"}), b"\n", _line({"id": 3}))
    with pytest.raises(DataError) as info:
        JsonlAppender(p, fsync=False)
    msg = str(info.value)
    assert f"{p}:3:" in msg
    assert "'id'" in msg


def test_appender_non_object_line_raises(tmp_path: Path) -> None:
    p = _write(tmp_path / "answers.jsonl", _line(["a"]))
    with pytest.raises(DataError, match=re.escape(f"{p}:1:")):
        JsonlAppender(p, fsync=False)


def test_appender_uses_append_mode(tmp_path: Path) -> None:
    # Two writers on one file (e.g. a concurrent shard writing the same output) must not overwrite.
    p = tmp_path / "answers.jsonl"
    w1 = JsonlAppender(p, fsync=False)
    w2 = JsonlAppender(p, fsync=False)
    try:
        w1.append({"id": "a"})
        w2.append({"id": "b"})
        w1.append({"id": "c"})
    finally:
        w1.close()
        w2.close()
    assert [v["id"] for _, v in iter_jsonl(p)] == ["a", "b", "c"]
