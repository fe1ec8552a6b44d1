"""Log lines: bare JSON on a file or pipe, a syslog priority prefix only when stdout is the journal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from daemon.service import logs


@pytest.fixture(autouse=True)
def logging_restored():
    """Each test configures this process's logging onto a file it then closes: give the next
    tests (an in-process Trainer logs from its constructor on) the configuration they had."""
    config, context = structlog.get_config(), structlog.contextvars.get_contextvars()
    yield
    structlog.configure(**config)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)


def log_to(path: Path, monkeypatch: pytest.MonkeyPatch, journal_stream: str | None) -> list[str]:
    """Configure logging onto the file `path` as stdout, log one event per level, return the lines."""
    with open(path, "w") as stdout:
        if journal_stream is None:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        else:
            st = os.fstat(stdout.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", journal_stream.format(dev=st.st_dev, ino=st.st_ino))
        monkeypatch.setattr(sys, "stdout", stdout)
        logs.configure("debug", "json")
        log = logs.get()
        log.debug("a_debug")
        log.info("an_info")
        log.warning("a_warning")
        log.error("an_error")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("crashed")
        log.critical("a_critical")
    return path.read_text().splitlines()


def test_journal_lines_carry_their_syslog_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = log_to(tmp_path / "out", monkeypatch, journal_stream="{dev}:{ino}")
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<3>", "<2>"]
    # After the prefix, which journald takes off, the same JSON object.
    events = [json.loads(line[3:]) for line in lines]
    assert [e["event"] for e in events] == ["a_debug", "an_info", "a_warning", "an_error", "crashed", "a_critical"]
    assert events[4]["exception"][0]["exc_value"] == "boom"


@pytest.mark.parametrize("journal_stream", [None, "{dev}:1", "", "garbage"])
def test_other_stdout_gets_bare_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal_stream) -> None:
    """A file, a pipe or a terminal, also in a child of a service whose stdout was redirected
    (it inherits $JOURNAL_STREAM, naming the journal's stream and not its own stdout)."""
    lines = log_to(tmp_path / "out", monkeypatch, journal_stream=journal_stream)
    assert [json.loads(line)["level"] for line in lines] == ["debug", "info", "warning", "error", "error", "critical"]


def test_processes_sharing_stdout_write_whole_lines() -> None:
    """The ranks of a run share one stdout, unbuffered under systemd: each line is written whole."""
    chatter = "from daemon.service import logs; logs.configure('info', 'json')\nfor i in range(2000): logs.get().info('tick', i=i)"
    read, write = os.pipe()
    ranks = [subprocess.Popen([sys.executable, "-c", chatter], stdout=write, env={**os.environ, "PYTHONUNBUFFERED": "1"})
             for _ in range(2)]  # fmt: skip
    os.close(write)
    with os.fdopen(read) as shared:
        lines = shared.read().splitlines()
    assert [rank.wait() for rank in ranks] == [0, 0]
    assert sorted(json.loads(line)["i"] for line in lines) == sorted(list(range(2000)) * 2)
