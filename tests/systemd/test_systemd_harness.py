"""Self-test of the systemd harness: boot, a Type=notify service, restarts, journal, teardown, lint."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from systemd_harness import BootedSystemd, verify_unit

# A tiny sd_notify service: READY only after a delay, so that returning from
# `systemctl start` proves systemd waited for it.
SERVICE_SCRIPT = """\
import json, os, socket, sys, time

def notify(message: str) -> None:
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):  # abstract namespace socket
        address = "\\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())

time.sleep(float(sys.argv[1]))
print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
notify("READY=1\\nSTATUS=serving")
while True:
    time.sleep(3600)
"""
READY_DELAY = 0.5


def unit_text(script: Path) -> str:
    return f"""\
[Unit]
Description=Harness self-test notify service

[Service]
Type=notify
ExecStart={sys.executable} {script} {READY_DELAY}
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=0.2
TimeoutStartSec=20
"""


@pytest.fixture
def notify_unit(systemd: BootedSystemd, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """Install a fresh notify service, named after the test; returns the unit name."""
    script = tmp_path / "notify_service.py"  # host tmp_path, seen at the same path inside
    script.write_text(SERVICE_SCRIPT)
    unit = f"harness-{request.node.name.replace('_', '-')}.service"
    systemd.write_file(f"/etc/systemd/system/{unit}", unit_text(script))
    systemd.systemctl("daemon-reload")
    yield unit
    systemd.systemctl("stop", unit, check=False)


def ready_events(sd: BootedSystemd, unit: str) -> list[dict[str, object]]:
    events = []
    for entry in sd.journal(unit):
        message = entry.get("MESSAGE")
        if isinstance(message, str) and message.startswith("{"):
            events.append(json.loads(message))
    return events


def test_start_waits_for_ready_and_logs_to_journal(systemd: BootedSystemd, notify_unit: str) -> None:
    started = time.monotonic()
    systemd.systemctl("start", notify_unit)
    assert time.monotonic() - started >= READY_DELAY, "systemctl start returned before READY=1"

    props = systemd.show(notify_unit, "ActiveState", "SubState", "NRestarts", "ExecMainStatus", "StatusText", "MainPID")
    assert props["ActiveState"] == "active"
    assert props["SubState"] == "running"
    assert props["NRestarts"] == "0"
    assert props["ExecMainStatus"] == "0"
    assert props["StatusText"] == "serving"

    events = systemd.wait_for(lambda: ready_events(systemd, notify_unit), timeout=5, what="JSON line in journal")
    assert events == [{"event": "ready", "pid": int(props["MainPID"])}]  # PID as seen inside the container
    [entry] = [e for e in systemd.journal(notify_unit) if str(e.get("MESSAGE", "")).startswith("{")]
    assert entry["_SYSTEMD_UNIT"] == notify_unit


def test_sigkill_restarts_under_restart_on_failure(systemd: BootedSystemd, notify_unit: str) -> None:
    systemd.systemctl("start", notify_unit)
    first_pid = systemd.show(notify_unit, "MainPID")["MainPID"]

    systemd.run("kill", "-KILL", first_pid)

    def restarted() -> dict[str, str] | None:
        props = systemd.show(notify_unit, "ActiveState", "SubState", "NRestarts", "MainPID")
        running = props["SubState"] == "running" and props["MainPID"] not in ("0", first_pid)
        return props if running and props["NRestarts"] == "1" else None

    props = systemd.wait_for(restarted, timeout=10, what=f"{notify_unit} to restart after SIGKILL")
    assert props["ActiveState"] == "active"

    def both_ready_lines() -> list[object] | None:
        pids = [event["pid"] for event in ready_events(systemd, notify_unit)]
        return pids if len(pids) >= 2 else None

    pids = systemd.wait_for(both_ready_lines, timeout=5, what="second JSON line in journal")
    assert pids == [int(first_pid), int(props["MainPID"])]
    # systemd's own account of the crash is in the unit's journal too.
    messages = [e.get("MESSAGE", "") for e in systemd.journal(notify_unit)]
    assert any("status=9/KILL" in m for m in messages if isinstance(m, str)), messages


def test_stop_leaves_unit_inactive(systemd: BootedSystemd, notify_unit: str) -> None:
    systemd.systemctl("start", notify_unit)
    systemd.systemctl("stop", notify_unit)
    props = systemd.show(notify_unit, "ActiveState", "SubState", "Result", "NRestarts", "MainPID")
    assert props == {
        "ActiveState": "inactive",
        "SubState": "dead",
        "Result": "success",
        "NRestarts": "0",
        "MainPID": "0",
    }


def test_teardown_kills_everything_even_on_interrupt(bootable, tmp_path: Path) -> None:
    sd = BootedSystemd(tmp_path / "systemd")
    with pytest.raises(KeyboardInterrupt):
        with sd:
            pid, cgroup = sd.pid, sd.cgroup
            assert cgroup is not None and cgroup.exists()
            assert sd.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
            # Host state the container must not see or change.
            assert sd.run("ls", "/etc/systemd/system").stdout == ""
            raise KeyboardInterrupt
    assert not Path(f"/proc/{pid}").exists(), "systemd survived teardown"
    assert not cgroup.exists(), "cgroup left behind"
    assert (tmp_path / "systemd" / "journal.txt").read_text(), "journal not saved at teardown"


GOOD_UNIT = f"""\
[Unit]
Description=Good unit
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
ExecStart={sys.executable} -c pass
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


def test_verify_unit_reports_only_real_mistakes(systemd_analyze, tmp_path: Path) -> None:
    good = tmp_path / "trainer-good.service"
    good.write_text(GOOD_UNIT)
    assert verify_unit(good) == []

    bad = tmp_path / "trainer-bad.service"
    bad.write_text(GOOD_UNIT.replace("Restart=", "Restrat="))
    [warning] = verify_unit(bad)
    assert "Unknown key 'Restrat'" in warning

    missing_binary = tmp_path / "trainer-nobin.service"
    missing_binary.write_text(GOOD_UNIT.replace(sys.executable, "/nonexistent/python"))
    assert any("/nonexistent/python is not executable" in line for line in verify_unit(missing_binary))
