"""trainer's units inside a systemd booted by systemd_harness.py: installed as the README says, a
config per unit, the unit's journal followed, and the steps of a unit's life checked (what systemd
did, what the trainer logged). The fixtures that hand them to the tests are in conftest.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from systemd_harness import INNER_ENV, BootedSystemd

from daemon.ops.child import matches, parse_event
from trainer_proc import SMALL_SETTINGS

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
UNIT_DIR = REPO / "systemd"
INSTALL = UNIT_DIR / "install.py"
COMMON = UNIT_DIR / "common.conf"
VENV_TRAINER = Path(sys.prefix) / "bin" / "trainer"  # this venv's console script
CONFIG_DIR = "/var/lib/trainer-test"  # as the container sees it (under the bind-mounted /var/lib)
SYSTEM = "/etc/systemd/system"
RESTART_SEC = 0.3
# A drop-in for one instance: drop-ins apply in the order of their file names, whatever their
# directory, and this one must come after trainer@.service.d/test.conf.
INSTANCE_DROP_IN = "z-instance.conf"
# Long enough to see that systemd did not restart a unit it must leave alone.
NO_RESTART_WAIT = 6 * RESTART_SEC
EXIT_STOPPED, EXIT_CRASH_LOOP, EXIT_CONFIG = 75, 70, 78


def skip(reason: str) -> None:
    print(f"SKIP: {reason}", file=sys.stderr)  # visible in the log, not only with -rs
    pytest.skip(reason)


def common_setting(key: str) -> str:
    """A setting as written in the shipped shared drop-in."""
    [value] = re.findall(rf"^{key}=(.*)$", COMMON.read_text(), flags=re.MULTILINE)
    return value.strip()


def start_limit_interval() -> float:
    """StartLimitIntervalSec= for RestartSec=RESTART_SEC with the shipped limit's margin: the
    shipped one catches processes that die within `margin` seconds of their start, again and
    again, `burst` times in a row (see common.conf); so does this one, RestartSec apart."""
    burst, interval = int(common_setting("StartLimitBurst")), float(common_setting("StartLimitIntervalSec"))
    margin = interval / burst - float(common_setting("RestartSec"))
    assert margin > 0.5, "the shipped start limit catches no crash loop"
    return burst * (RESTART_SEC + margin)


def drop_in(config: str) -> str:
    """test.conf: this venv's trainer with `CONFIG_DIR/<config>.yaml`, restarts at a test's pace."""
    return "\n".join([
        "[Unit]",
        f"StartLimitIntervalSec={start_limit_interval()}",
        "[Service]",
        "ExecStart=",
        f"ExecStart={VENV_TRAINER} run --config {CONFIG_DIR}/{config}.yaml",
        f"RestartSec={RESTART_SEC}",
    ]) + "\n"  # fmt: skip


# -- reading the journal ------------------------------------------------------------------------


class Journal:
    """A unit's journal, followed (`journalctl -f -o json`) from a thread: systemd's own messages
    about the unit and the trainer's JSON events. Entries arrive asynchronously: wait for them."""

    def __init__(self, sd: BootedSystemd, unit: str) -> None:
        self.sd, self.unit = sd, unit
        self._messages: list[str] = []
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            ["nsenter", "-t", str(sd.pid), "-a",
             "journalctl", "--no-pager", "--follow", "--lines=all", "--output=json", f"--unit={unit}"],
            env=INNER_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True,  # its own process group: nsenter and the journalctl it forks
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            message = json.loads(line).get("MESSAGE") if line.strip() else None
            if not isinstance(message, str):
                continue  # absent, or not UTF-8 (journald then gives a list of bytes)
            event = parse_event(message)  # the trainer's event, as its stdout gave it; None for systemd's lines
            with self._lock:
                self._messages.append(message)
                if event:
                    self._events.append(event)

    def close(self) -> None:
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait()
        self._reader.join(timeout=5)

    def messages(self) -> list[str]:
        with self._lock:
            return list(self._messages)

    def events(self, name: str | None = None, pid: int | None = None, **fields: Any) -> list[dict[str, Any]]:
        with self._lock:
            events = list(self._events)
        wanted = {**fields, **({"pid": pid} if pid is not None else {})}
        return [e for e in events if matches(e, name, wanted)]

    def _wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        try:
            return self.sd.wait_for(predicate, timeout=timeout, interval=0.02, what=what)
        except TimeoutError as e:
            tail = "\n".join(self.messages()[-30:])
            raise AssertionError(f"{e}\nlast journal lines of {self.unit}:\n{tail}") from None

    def wait_event(
        self,
        name: str,
        pid: int | None,
        timeout: float = 60,
        where: Callable[[dict], bool] = lambda e: True,
        **fields: Any,
    ) -> dict[str, Any]:
        match = lambda: next((e for e in self.events(name, pid, **fields) if where(e)), None)  # noqa: E731
        return self._wait(match, timeout, f"event {name} {fields} from PID {pid}")

    def wait_message(self, text: str, count: int = 1, timeout: float = 30) -> None:
        """Until `count` messages (systemd's own, mostly) contain `text`."""
        self._wait(lambda: sum(text in m for m in self.messages()) >= count, timeout, f"{count}x {text!r}")

    def starts(self) -> int:
        """How many times systemd began starting the unit."""
        return sum(m.startswith(f"Starting {self.unit} ") for m in self.messages())

    def restarts(self) -> int:
        """How many times systemd scheduled an automatic restart."""
        return sum(m.startswith(f"{self.unit}: Scheduled restart job") for m in self.messages())


def position(event: dict[str, Any]) -> tuple[int, int, int]:
    return event["epoch"], event["step_in_epoch"], event["global_step"]


def realtime(text: str) -> datetime:
    """A trainer timestamp (ISO, UTC) or a `systemctl show --timestamp=us+utc` one."""
    if text.endswith("Z"):
        return datetime.fromisoformat(text[:-1] + "+00:00")
    _weekday, day, clock, zone = text.split()
    assert zone == "UTC", text
    return datetime.fromisoformat(f"{day}T{clock}+00:00")


# -- the service --------------------------------------------------------------------------------


@dataclass
class Service:
    sd: BootedSystemd
    var_lib: Path  # host directory that the container sees as /var/lib

    def write_config(self, name: str, settings: dict[str, Any]) -> None:
        """`CONFIG_DIR/<name>.yaml`: the config that `trainer_proc.RunConfig` writes for
        `reference_runs(**settings)`, but with the dataset laid out by the service itself,
        relative to its state directory."""
        tree: dict[str, dict[str, Any]] = {}
        for key, value in {**SMALL_SETTINGS, "data.root": "data", **settings}.items():
            section, key_name = key.split(".", 1)
            tree.setdefault(section, {})[key_name] = value
        path = self.var_lib / "trainer-test" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        path.chmod(0o644)

    def checkpoint_dir(self, state: str) -> Path:
        """`state`: "default" (trainer.service's) or "instances/NAME" (trainer@NAME's). DynamicUser=yes puts
        StateDirectory= below /var/lib/private (0700); /var/lib/trainer is a link."""
        return self.var_lib / "private" / "trainer" / state / "checkpoints"

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sd.systemctl("show", "--timestamp=us+utc", *(f"--property={p}" for p in props), "--", unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def shell(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A documented command line, verbatim, as a shell in the container runs it."""
        assert command in README.read_text(), f"not in the README: {command}"
        return self.sd.run("sh", "-c", command, check=check)

    def uid_of(self, pid: int) -> int:
        status = self.sd.run("cat", f"/proc/{pid}/status").stdout
        return int(re.search(r"^Uid:\s+(\d+)", status, flags=re.MULTILINE).group(1))


def installed_units(root: Path, *extra_drop_ins: str) -> list[Path]:
    """The units as systemd/install.py writes them below `root`, with `extra_drop_ins` (files in
    systemd/) added to both as the README says."""
    subprocess.run([sys.executable, str(INSTALL), "--root", str(root)], check=True, capture_output=True)
    system = root / SYSTEM.lstrip("/")
    units = [system / "trainer.service", system / "trainer@.service"]
    for unit in units:
        for name in extra_drop_ins:
            shutil.copyfile(UNIT_DIR / name, system / f"{unit.name}.d" / name)
    return units


# -- steps of the walk ----------------------------------------------------------------------------


def assert_ready_after_resume(service: Service, unit: str, journal: Journal, pid: int, start_event: str) -> dict:
    """READY=1 came after the data was loaded and the checkpoint restored: systemd's
    ActiveEnterTimestamp (when it got READY=1) follows the trainer's own timestamps of both."""
    props = service.show(unit, "ActiveEnterTimestamp", "MainPID")
    assert props["MainPID"] == str(pid)
    ready_at = realtime(props["ActiveEnterTimestamp"])
    loaded = journal.wait_event("run_started", pid)  # logged once the dataset is loaded
    started = journal.wait_event(start_event, pid)  # fresh_start or resumed
    assert realtime(loaded["timestamp"]) <= realtime(started["timestamp"]) <= ready_at, (loaded, started, ready_at)
    return started


def assert_started(service: Service, unit: str) -> int:
    """Right after `systemctl start` returned: the unit runs (READY=1 came); its main PID."""
    props = service.show(unit, "ActiveState", "SubState", "MainPID", "NRestarts")
    assert (props["ActiveState"], props["SubState"], props["NRestarts"]) == ("active", "running", "0"), props
    return int(props["MainPID"])


def wait_restarted(service: Service, unit: str, old_pid: int, restarts: int) -> int:
    """Wait for systemd to restart `unit` (a new main process that sent READY=1); its PID."""

    def restarted() -> dict[str, str] | None:
        props = service.show(unit, "ActiveState", "SubState", "NRestarts", "MainPID")
        fresh = props["SubState"] == "running" and props["MainPID"] not in ("0", str(old_pid))
        return props if fresh else None

    props = service.sd.wait_for(restarted, timeout=60, interval=0.1, what=f"{unit} to restart")
    assert props["ActiveState"] == "active"
    assert props["NRestarts"] == str(restarts)
    return int(props["MainPID"])


def new_main_pid(service: Service, unit: str, old_pid: int) -> int:
    """Wait for a main process of `unit` other than `old_pid` (READY=1 or not); its PID."""

    def fresh() -> int | None:
        pid = service.show(unit, "MainPID")["MainPID"]
        return int(pid) if pid not in ("0", str(old_pid)) else None

    return service.sd.wait_for(fresh, timeout=60, interval=0.02, what=f"a new main process of {unit}")


def wait_training(journal: Journal, pid: int, since_step: int) -> dict:
    """A `progress` event showing that `pid` trains past `since_step`."""
    return journal.wait_event("progress", pid, where=lambda e: e["global_step"] >= since_step + 5)


def assert_emergency_stop(journal: Journal, pid: int) -> tuple[dict, str]:
    """The process checkpointed its last step, then logged `stopped` with exit code 75.

    Returns that event, with the checkpoint's path added, and the checkpoint's kind: "emergency",
    or, when the signal came during an epoch's end, the "epoch" checkpoint just written (the
    trainer then logs `checkpoint_skipped`: that state is on disk already)."""
    stopped = journal.wait_event("stopped", pid)
    assert stopped["exit_code"] == EXIT_STOPPED
    # All logged before `stopped`, in order.
    step = stopped["global_step"]
    [saved] = [e for e in journal.events("checkpoint_saved", pid) if e["checkpoint_global_step"] == step]
    skipped = journal.events("checkpoint_skipped", pid)
    assert saved["kind"] == ("epoch" if skipped else "emergency"), (saved, skipped)
    assert position(saved) == position(stopped)
    return {**stopped, "path": saved["path"]}, saved["kind"]


def assert_resumed_at(journal: Journal, pid: int, expected: dict, kind: str) -> dict:
    """The `resumed` event of `pid`: the checkpoint file and the position expected."""
    resumed = journal.wait_event("resumed", pid)
    assert position(resumed) == position(expected), (resumed, expected)
    assert resumed["kind"] == kind
    assert Path(resumed["path"]).name == Path(expected["path"]).name
    return resumed


def assert_stays_down(service: Service, unit: str, journal: Journal, expected: dict[str, str]) -> None:
    """systemd does not restart the unit: after several RestartSec, the same state and no new start."""
    before = journal.starts(), journal.restarts()
    time.sleep(NO_RESTART_WAIT)
    assert service.show(unit, *expected) == expected
    assert (journal.starts(), journal.restarts()) == before, "systemd started the unit again"
