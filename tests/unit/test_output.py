"""data/output.py: whole files by rename, and what a killed run leaves beside an output is swept by the next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finemed_cli.data.output import atomic_file, atomic_write, check_output, sweep_temporaries, temporary
from finemed_cli.errors import DataError


def test_atomic_write_replaces_the_whole_file_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    out.write_bytes(b"old")
    atomic_write(out, b"new")
    assert out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_an_error_inside_atomic_file_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("stopped")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_sweep_removes_what_dead_processes_left_and_keeps_what_live_ones_write(tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    gone = int(dead.stdout)
    stale_file = tmp_path / f".model.gguf.tmp{gone}"
    stale_f16 = tmp_path / f".model.gguf.f16.tmp{gone}"
    stale_dir = tmp_path / f".model.gguf.old{gone}"
    backup = tmp_path / f"model.gguf.old{gone}"  # a name a person chose: never swept
    live = temporary(out)  # this process: alive
    other = tmp_path / f".other.gguf.tmp{gone}"  # another output's: not ours to sweep
    for p in (stale_file, stale_f16, live, other, backup):
        p.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "inside").write_bytes(b"x")
    removed = sweep_temporaries(out)
    assert sorted(removed) == sorted([stale_file, stale_f16, stale_dir])
    assert live.exists() and other.exists() and backup.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_an_output_that_is_a_fifo_or_a_device_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        check_output(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        check_output("/dev/null")


def test_an_output_that_is_a_dangling_link_is_refused_before_anything_runs(tmp_path: Path) -> None:
    link = tmp_path / "answers.jsonl"
    link.symlink_to(tmp_path / "nowhere" / "answers.jsonl")
    with pytest.raises(DataError, match="broken symbolic link"):
        check_output(link)
