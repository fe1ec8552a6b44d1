"""The systemd contract of issue 4, under a real systemd (252) with the real unit file.

One container (tests/systemd_harness.py) serves the module. In it:

* systemd/trainer@.service is installed unchanged; a drop-in overrides only paths and pace:
  ExecStart (this venv's `trainer` and a config the service can read), RestartSec (short),
  and, only where the interpreter lives under /root or /home (pyenv), ProtectHome=tmpfs with
  BindReadOnlyPaths= for it: with the unit's ProtectHome=yes the service could not exec it.
  DynamicUser=, StateDirectory=, PrivateTmp= and the rest of the hardening stay on.
* a directory under pytest's tmp_path is bind-mounted over /var/lib, inside the container's
  mount namespace only: StateDirectory=trainer/NAME (with DynamicUser=, really
  /var/lib/private/trainer/NAME) and the configs (/var/lib/trainer-test/NAME.yaml) live there,
  so the test reads the checkpoints from the host and nothing touches the host's /var/lib.
  pytest's /tmp would be invisible to the service (PrivateTmp=yes).

`test_lifecycle_contract` walks one instance through start, `kill PID`, `systemctl kill -s
SIGTERM`, SIGKILL, `systemctl stop`, start, completion and a later start, checking at every
step what systemd did (`systemctl show`) and what the trainer logged (its JSON lines, read
back with `journalctl -o json`), and ends with the final weights bitwise equal to an
uninterrupted run. The configuration error and the crash loop use their own instances.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.checkpoint import CheckpointStore
from systemd_harness import INNER_ENV, BootedSystemd, missing_requirements, verify_unit
from trainer_proc import SMALL_SETTINGS, assert_same_training, final_checkpoint

REPO = Path(__file__).resolve().parents[1]
UNIT_FILE = REPO / "systemd" / "trainer@.service"
UNIT_EXEC = "/opt/trainer/.venv/bin/trainer"  # what the shipped unit runs
VENV_TRAINER = Path(sys.prefix) / "bin" / "trainer"  # this venv's console script
CONFIG_DIR = "/var/lib/trainer-test"  # as the container sees it (under the bind-mounted /var/lib)
RESTART_SEC = 0.3
# Long enough to see that systemd did not restart a unit it must leave alone.
NO_RESTART_WAIT = 6 * RESTART_SEC

# 40 steps an epoch (train_subset 4000, batch 100) x 12 epochs: about 3.5 s of training on an idle
# machine of this kind, where the four interruptions use some 70 to 170 steps in all.
SETTINGS = {
    "train.epochs": 12,
    "checkpoint.every_steps": 10,
    "checkpoint.keep_last": 5,
    "log.progress_every_seconds": 0.1,
}
EXIT_STOPPED, EXIT_CONFIG = 75, 78
STATUS_TEXT = re.compile(r"^epoch \d+/\d+ step \d+/\d+ loss \d+\.\d{4}$")

# ProtectHome=yes hides these; PrivateTmp=yes replaces these.
HOME_DIRS = ("/home", "/root", "/run/user")
TMP_DIRS = ("/tmp", "/var/tmp")


def _skip(reason: str) -> None:
    print(f"SKIP: {reason}", file=sys.stderr)  # visible in the log, not only with -rs
    pytest.skip(reason)


def _under(path: Path, roots: tuple[str, ...]) -> bool:
    return any(path == Path(root) or Path(root) in path.parents for root in roots)


def _service_paths() -> list[Path]:
    """What the service must read: the venv's interpreter install, the venv, the repo (editable)."""
    paths = {Path(sys.base_prefix), Path(sys.base_prefix).resolve(), Path(sys.prefix), REPO}
    return sorted(paths)


def _visibility_drop_in() -> tuple[list[str], list[str]]:
    """Drop-in lines that let the service see `_service_paths()`, and why it still could not."""
    binds = [p for p in _service_paths() if _under(p, HOME_DIRS + TMP_DIRS)]
    binds = [p for p in binds if not any(other in p.parents for other in binds)]  # outermost only
    lines = []
    if any(_under(p, HOME_DIRS) for p in binds):
        lines.append("ProtectHome=tmpfs")  # home stays hidden, but bind mounts may go inside it
    if binds:
        lines.append("BindReadOnlyPaths=" + " ".join(str(p) for p in binds))
    problems = []
    for path in _service_paths():
        if any(b == path or b in path.parents for b in binds):
            continue  # bind-mounted: the parents in the service are systemd's own 0755 directories
        for directory in [*reversed(path.parents), path]:
            if directory.stat().st_mode & stat.S_IXOTH == 0:
                problems.append(f"{directory} is not searchable by others: the DynamicUser cannot reach {path}")
                break
    return lines, problems


def drop_in() -> str:
    lines, _ = _visibility_drop_in()
    return "\n".join([
        "[Service]",
        "ExecStart=",
        f"ExecStart={VENV_TRAINER} run --config {CONFIG_DIR}/%i.yaml",
        f"RestartSec={RESTART_SEC}",
        *lines,
    ]) + "\n"  # fmt: skip


def unit_setting(key: str) -> str:
    """A setting as written in the shipped unit file."""
    [value] = re.findall(rf"^{key}=(.*)$", UNIT_FILE.read_text(), flags=re.MULTILINE)
    return value.strip()


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
            try:
                event = json.loads(message) if message.startswith("{") else None
            except ValueError:
                event = None  # a line that only looks like JSON: kept as a message
            with self._lock:
                self._messages.append(message)
                if isinstance(event, dict):
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
        return [
            e for e in events
            if (name is None or e.get("event") == name)
            and (pid is None or e.get("pid") == pid)
            and all(e.get(k) == v for k, v in fields.items())
        ]  # fmt: skip

    def _wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        try:
            return self.sd.wait_for(predicate, timeout=timeout, interval=0.02, what=what)
        except TimeoutError as e:
            tail = "\n".join(self.messages()[-30:])
            raise AssertionError(f"{e}\nlast journal lines of {self.unit}:\n{tail}") from None

    def wait_event(
        self, name: str, pid: int | None, timeout: float = 60, where: Callable[[dict], bool] = lambda e: True,
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


@pytest.fixture
def follow(service: Service) -> Iterator[Callable[[str], Journal]]:
    """follow(unit) -> a Journal of it, closed after the test."""
    journals: list[Journal] = []

    def make(unit: str) -> Journal:
        journals.append(Journal(service.sd, unit))
        return journals[-1]

    yield make
    for journal in journals:
        journal.close()


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

    @staticmethod
    def unit(instance: str) -> str:
        return f"trainer@{instance}.service"

    def write_config(self, instance: str, settings: dict[str, Any]) -> None:
        """The config that `trainer_proc.RunConfig` writes for `reference_runs(**settings)`, but
        with the dataset laid out by the service itself, relative to its state directory."""
        tree: dict[str, dict[str, Any]] = {}
        for key, value in {**SMALL_SETTINGS, "data.root": "data", **settings}.items():
            section, name = key.split(".", 1)
            tree.setdefault(section, {})[name] = value
        path = self.var_lib / "trainer-test" / f"{instance}.yaml"
        path.write_text(yaml.safe_dump(tree))
        path.chmod(0o644)

    def checkpoint_dir(self, instance: str) -> Path:
        # DynamicUser=yes puts StateDirectory= below /var/lib/private (0700), /var/lib/trainer is a link.
        return self.var_lib / "private" / "trainer" / instance / "checkpoints"

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sd.systemctl("show", "--timestamp=us+utc", *(f"--property={p}" for p in props), "--", unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def require_systemd_harness() -> None:
    problems = missing_requirements()
    if problems:
        _skip("systemd harness unavailable: " + "; ".join(problems))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    require_systemd_harness()
    if not VENV_TRAINER.exists():
        _skip(f"{VENV_TRAINER} not found: run the tests with the venv's python, where `trainer` is installed")
    _, problems = _visibility_drop_in()
    if problems:
        _skip("; ".join(problems))
    root = tmp_path_factory.mktemp("systemd-contract")
    var_lib = root / "var-lib"
    (var_lib / "trainer-test").mkdir(parents=True)
    for directory in (var_lib, var_lib / "trainer-test"):
        directory.chmod(0o755)  # readable by the service's dynamic user
    with BootedSystemd(root / "systemd") as sd:
        print(f"systemd booted in {sd.boot_seconds:.2f}s as host PID {sd.pid}")
        sd.run("mount", "--bind", str(var_lib), "/var/lib")
        sd.write_file("/etc/systemd/system/trainer@.service", UNIT_FILE.read_text())
        sd.write_file("/etc/systemd/system/trainer@.service.d/test.conf", drop_in())
        print(f"drop-in trainer@.service.d/test.conf:\n{drop_in()}", end="")
        # The unit's WantedBy= target, up as on a booted host, so that `systemctl enable` works as
        # deployed. An enabled unit is referenced by it, so systemd keeps the unit's last exit
        # status after it stops instead of garbage-collecting it (an unreferenced unit that went
        # inactive shows ExecMainStatus=0, NRestarts=0 whatever happened).
        sd.write_file("/etc/systemd/system/multi-user.target", "[Unit]\nDescription=Stand-in multi-user.target\n")
        sd.systemctl("daemon-reload")
        sd.systemctl("start", "multi-user.target")
        yield Service(sd, var_lib)


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


def wait_training(journal: Journal, pid: int, since_step: int, total_steps: int) -> dict:
    """A `progress` event showing that `pid` trains past `since_step`, well before the end."""
    event = journal.wait_event("progress", pid, where=lambda e: e["global_step"] >= since_step + 5)
    assert event["global_step"] < total_steps * 0.8, f"the run is nearly over already ({event}): raise train.epochs"
    return event


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


# -- the tests ------------------------------------------------------------------------------------


def test_unit_file_passes_verify(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("systemd-analyze") is None:
        _skip("systemd-analyze missing or not root")
    if not VENV_TRAINER.exists():
        _skip(f"{VENV_TRAINER} not found")
    text = UNIT_FILE.read_text()
    assert f"ExecStart={UNIT_EXEC} " in text
    # verify checks that the executable exists: the one substitution, this venv's trainer.
    rendered = tmp_path / UNIT_FILE.name
    rendered.write_text(text.replace(UNIT_EXEC, str(VENV_TRAINER)))
    assert verify_unit(rendered) == []


def test_lifecycle_contract(service: Service, follow, reference_runs) -> None:
    sd, instance = service.sd, "walk"
    unit = service.unit(instance)
    service.write_config(instance, SETTINGS)
    journal = follow(unit)
    sd.systemctl("enable", unit)  # as deployed (`systemctl enable --now`); nothing starts yet
    props = service.show(unit, "DropInPaths", "UnitFileState", "ActiveState")
    assert props == {
        "DropInPaths": "/etc/systemd/system/trainer@.service.d/test.conf", "UnitFileState": "enabled",
        "ActiveState": "inactive",
    }  # fmt: skip
    epochs = SETTINGS["train.epochs"]

    # `systemctl start`: returns once READY=1 came, after the service laid out and loaded the
    # data and looked for a checkpoint (none: a fresh start).
    sd.systemctl("start", unit)
    pid = assert_started(service, unit)
    assert service.show(unit, "StatusText")["StatusText"].startswith(f"epoch 1/{epochs} step 0/")  # sent with READY=1
    journal.wait_event("dataset_prepared", pid)
    assert_ready_after_resume(service, unit, journal, pid, "fresh_start")
    total_steps = journal.wait_event("run_started", pid)["steps_per_epoch"] * epochs
    # STATUS= follows the training: `systemctl show -p StatusText`.
    status = sd.wait_for(
        lambda: STATUS_TEXT.match(service.show(unit, "StatusText")["StatusText"]), timeout=30, what="STATUS= progress"
    )
    print(f"StatusText: {status.group(0)!r}")

    # SIGTERM from outside, by `kill PID` and through systemd: emergency checkpoint, exit 75,
    # restart, exact resume.
    sigterms = {
        "kill -TERM": lambda: sd.run("kill", "-TERM", str(pid)),
        "systemctl kill -s SIGTERM": lambda: sd.systemctl("kill", "-s", "SIGTERM", unit),
    }
    since_step = 0
    for restarts, (how, send_sigterm) in enumerate(sigterms.items(), start=1):
        wait_training(journal, pid, since_step=since_step, total_steps=total_steps)
        send_sigterm()
        new_pid = wait_restarted(service, unit, pid, restarts=restarts)
        stopped, kind = assert_emergency_stop(journal, pid)
        resumed = assert_resumed_at(journal, new_pid, stopped, kind)
        assert_ready_after_resume(service, unit, journal, new_pid, "resumed")
        print(f"{how}: stopped and resumed at {position(resumed)}")
        pid, since_step = new_pid, resumed["global_step"]

    # SIGKILL (as a crash or the OOM killer): no emergency checkpoint; restart and resume from the
    # newest checkpoint on disk at the moment of the kill. The process is frozen meanwhile, so
    # that its background writer cannot complete another one between the look and the kill.
    since = resumed["global_step"]
    journal.wait_event("checkpoint_saved", pid, kind="periodic", where=lambda e: e["checkpoint_global_step"] > since)
    sd.run("kill", "-STOP", str(pid))
    sd.wait_for(lambda: "T (stopped)" in sd.run("cat", f"/proc/{pid}/status").stdout, timeout=10, what="SIGSTOP")
    newest = next(e for e in CheckpointStore(service.checkpoint_dir(instance), 1).scan() if e.valid)
    sd.run("kill", "-KILL", str(pid))
    new_pid = wait_restarted(service, unit, pid, restarts=3)
    journal.wait_message(f"{unit}: Main process exited, code=killed, status=9/KILL")
    assert not journal.events("stopped", pid) and not journal.events("checkpoint_saved", pid, kind="emergency")
    assert newest.kind in ("periodic", "epoch")
    expected = {"epoch": newest.state["epoch"], "step_in_epoch": newest.state["step_in_epoch"],
                "global_step": newest.global_step, "path": newest.path}  # fmt: skip
    resumed = assert_resumed_at(journal, new_pid, expected, kind=newest.kind)
    assert resumed["steps_redone"] >= 0  # what was trained after that checkpoint is trained again
    assert_ready_after_resume(service, unit, journal, new_pid, "resumed")
    print(f"SIGKILL: resumed from the {newest.kind} checkpoint at {position(resumed)}, {resumed['steps_redone']} redone")
    pid = new_pid

    # `systemctl stop`: emergency checkpoint, exit 75, a success: inactive, not failed; no restart.
    wait_training(journal, pid, since_step=resumed["global_step"], total_steps=total_steps)
    sd.systemctl("stop", unit)
    stopped, kind = assert_emergency_stop(journal, pid)
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "inactive", "SubState": "dead", "Result": "success", "ExecMainCode": "1",
         "ExecMainStatus": str(EXIT_STOPPED), "NRestarts": "3", "MainPID": "0"},
    )  # fmt: skip
    print(f"systemctl stop: stopped at {position(stopped)}")

    # The next `systemctl start` resumes exactly there.
    sd.systemctl("start", unit)
    pid = assert_started(service, unit)
    assert_resumed_at(journal, pid, stopped, kind)
    assert_ready_after_resume(service, unit, journal, pid, "resumed")

    # Training completes: exit 0, no restart, inactive.
    sd.wait_for(
        lambda: service.show(unit, "ActiveState")["ActiveState"] != "active",
        timeout=300, interval=0.5, what="training to complete",
    )  # fmt: skip
    completed = journal.wait_event("training_completed", pid)
    assert completed["global_step"] == total_steps
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "inactive", "SubState": "dead", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0",
         "NRestarts": "0", "MainPID": "0"},
    )  # fmt: skip

    # A later start logs that training is complete and exits 0 at once. It is the unit's 6th start
    # within seconds, one more than StartLimitBurst= lets through in StartLimitIntervalSec= (10 min):
    # `reset-failed` stands for the time that passes before such a start in real life.
    sd.systemctl("reset-failed", unit)
    sd.systemctl("start", unit)  # returns: READY=1 comes before the trainer finds nothing to do
    pid = int(service.show(unit, "ExecMainPID")["ExecMainPID"])  # kept after the process is gone
    done = journal.wait_event("training_already_complete", pid)
    assert done["global_step"] == total_steps
    sd.wait_for(lambda: service.show(unit, "ActiveState")["ActiveState"] == "inactive", timeout=30, what="the exit")
    props = service.show(unit, "Result", "ExecMainCode", "ExecMainStatus", "NRestarts", "ActiveEnterTimestamp",
                         "ExecMainExitTimestamp")  # fmt: skip
    assert (props["Result"], props["ExecMainCode"], props["ExecMainStatus"], props["NRestarts"]) == (
        "success", "1", "0", "0"
    )  # fmt: skip
    print(f"already complete: exit {realtime(props['ExecMainExitTimestamp']) - realtime(props['ActiveEnterTimestamp'])}"
          " after READY=1")  # fmt: skip
    trained = [e for e in journal.events(pid=pid) if e["event"] in ("progress", "checkpoint_saved", "epoch_completed")]
    assert not trained

    # After all of that, the same weights, optimizer state and metrics as an uninterrupted run.
    final = final_checkpoint(service.checkpoint_dir(instance))
    assert_same_training(final, reference_runs(**SETTINGS))


def test_config_error_exits_78_without_restart(service: Service, follow) -> None:
    sd, instance = service.sd, "badconfig"
    unit = service.unit(instance)
    service.write_config(instance, {**SETTINGS, "train.epochs": 0})
    journal = follow(unit)
    assert sd.systemctl("start", unit, check=False).returncode != 0  # it exits before READY=1
    error = journal.wait_event("config_error", pid=None)
    assert error["exit_code"] == EXIT_CONFIG
    assert f"{CONFIG_DIR}/{instance}.yaml: train.epochs: must be >= 1" in error["message"]
    journal.wait_message(f"{unit}: Main process exited, code=exited, status=78/CONFIG")
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": str(EXIT_CONFIG), "NRestarts": "0"},
    )  # fmt: skip
    assert len(journal.events("config_error")) == 1 and journal.starts() == 1


def test_crash_loop_is_rate_limited(service: Service, follow) -> None:
    sd, instance = service.sd, "crashloop"
    unit = service.unit(instance)
    service.write_config(instance, SETTINGS)
    burst = int(unit_setting("StartLimitBurst"))
    assert service.show(unit, "StartLimitBurst")["StartLimitBurst"] == str(burst)
    journal = follow(unit)

    # Every main process dies by SIGKILL as soon as it exists (a crash during start-up).
    sd.systemctl("start", "--no-block", unit)
    killed: list[str] = []
    deadline = time.monotonic() + 60
    while (props := service.show(unit, "ActiveState", "MainPID"))["ActiveState"] != "failed":
        assert time.monotonic() < deadline, f"no start limit after {len(killed)} crashes: {props}"
        if props["MainPID"] not in ("0", *killed):
            sd.run("kill", "-KILL", props["MainPID"], check=False)
            killed.append(props["MainPID"])
        time.sleep(0.01)
    assert len(killed) == burst, killed
    refusal = f"{unit}: Start request repeated too quickly."
    journal.wait_message(refusal)
    # systemd 252 counts the refused restart in NRestarts and keeps the crash's Result.
    assert_stays_down(
        service, unit, journal, {"ActiveState": "failed", "Result": "signal", "NRestarts": str(burst), "MainPID": "0"}
    )
    assert journal.starts() == burst
    # Even a manual start is refused until StartLimitIntervalSec= has passed (or `reset-failed`).
    assert sd.systemctl("start", unit, check=False).returncode != 0
    journal.wait_message(refusal, count=2)
    assert journal.starts() == burst
    assert service.show(unit, "ActiveState", "MainPID") == {"ActiveState": "failed", "MainPID": "0"}
