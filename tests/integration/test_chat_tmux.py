"""`finemed chat` in a real terminal (tmux): Ctrl-C mid-reply stops the reply and keeps the session, and the
Up key recalls the last line (readline)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]

QUESTION = "Tell me everything about the thyroid gland"


def _pane(tmux: list[str]) -> str:
    return subprocess.run([*tmux, "capture-pane", "-p", "-t", "chat"], capture_output=True, text=True).stdout


def _wait(tmux: list[str], predicate, timeout: float = 120.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = _pane(tmux)
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"timed out; the pane shows:\n{_pane(tmux)}")


def test_ctrl_c_stops_the_reply_keeps_the_session_and_up_recalls(tmp_path) -> None:
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    home = os.environ.get("FINEMED_HOME", "")
    command = (f"cd {REPO} && FINEMED_HOME={home} {sys.executable} -m finemed_cli chat embedded:smollm2-135m "
               "--max-tokens 2000 --temperature 0.9 --seed 1")
    subprocess.run([*tmux, "new-session", "-d", "-s", "chat", "-x", "200", "-y", "50", command], check=True)
    try:
        _wait(tmux, lambda t: t.rstrip().endswith("you>"))
        subprocess.run([*tmux, "send-keys", "-t", "chat", QUESTION, "Enter"], check=True)
        _wait(tmux, lambda t: len(t.split(QUESTION, 1)[-1].strip()) > 40, timeout=60)  # the reply is streaming
        subprocess.run([*tmux, "send-keys", "-t", "chat", "C-c"], check=True)
        text = _wait(tmux, lambda t: "(reply stopped)" in t and t.rstrip().endswith("you>"), timeout=30)
        assert "interrupted" not in text  # the session did not end
        subprocess.run([*tmux, "send-keys", "-t", "chat", "Up"], check=True)
        _wait(tmux, lambda t: t.rstrip().endswith(f"you> {QUESTION}"), timeout=10)
        subprocess.run([*tmux, "send-keys", "-t", "chat", "C-u", "/exit", "Enter"], check=True)
        end = time.monotonic() + 30
        while time.monotonic() < end and subprocess.run([*tmux, "has-session", "-t", "chat"],
                                                        capture_output=True).returncode == 0:
            time.sleep(0.2)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
