"""The systemd contract under a real systemd (252) with the real units.

One container (tests/systemd_harness.py) serves the module. In it:

* the units are installed as the README says, by `systemd/install.py` run with this venv's
  python: trainer.service, trainer@.service, the shared drop-in common.conf and, where the
  interpreter lives under /root or /home (pyenv), its paths.conf. A drop-in `test.conf` overrides
  only paths and pace: ExecStart (a config the service can read), RestartSec (short) and, scaled
  with it, StartLimitIntervalSec. DynamicUser=, StateDirectory=, PrivateTmp= and the rest of the
  hardening stay on.
* a directory under pytest's tmp_path is bind-mounted over /var/lib, inside the container's
  mount namespace only: the state directories (with DynamicUser=, really
  /var/lib/private/trainer/NAME) and the configs (/var/lib/trainer-test/NAME.yaml) live there,
  so the test reads the checkpoints from the host and nothing touches the host's /var/lib.
  pytest's /tmp would be invisible to the service (PrivateTmp=yes).

`test_lifecycle_contract` walks trainer.service, with the README's commands verbatim, through
`systemctl enable --now`, ten SIGTERM preemptions in a row (`kill PID` and `systemctl kill`),
SIGKILL, `systemctl stop`, `systemctl start`, completion and a later start, checking at every
step what systemd did (`systemctl show`) and what the trainer logged (its JSON lines, read back
with `journalctl -o json`), and ends with the final weights bitwise equal to an uninterrupted run.
The other behaviours use instances of trainer@.service.
"""

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.ckpt.store import CheckpointStore
from daemon.ops.child import matches, parse_event
from systemd_harness import INNER_ENV, BootedSystemd, missing_requirements, verify_unit
from trainer_proc import SMALL_SETTINGS, assert_same_training, busy_loops, final_checkpoint, ranks

REPO = Path(__file__).resolve().parents[1]
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

# 40 steps an epoch (train_subset 4000, batch 100) x 32 epochs: about 10 s of training on an idle
# machine of this kind, where the thirteen interruptions use some 100 to 400 steps in all, and up
# to ~520 on a loaded one: they must all land well before the end.
SETTINGS = {
    "train.epochs": 32,
    "checkpoint.every_steps": 10,
    "checkpoint.keep_last": 5,
    "log.progress_every_seconds": 0.1,
}
PREEMPTIONS = 10
EXIT_STOPPED, EXIT_CRASH_LOOP, EXIT_CONFIG = 75, 70, 78
STATUS_LINE = re.compile(r'Status: "(epoch \d+/\d+ step \d+/\d+ loss \d+\.\d{4})"')

# The README's commands, run verbatim (each must appear in README.md as written here).
ENABLE_NOW = "systemctl enable --now trainer"
START = "systemctl start trainer"
STATUS = "systemctl status trainer"
JOURNAL = "journalctl -u trainer"
JOURNAL_JQ = (
    "journalctl -u trainer SYSLOG_IDENTIFIER=trainer -o cat | jq -c 'select(.event==\"resumed\") | {kind, global_step}'"
)
JOURNAL_ERRORS = "journalctl -p err -u trainer"


def _skip(reason: str) -> None:
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
        # DynamicUser=yes puts StateDirectory= below /var/lib/private (0700), /var/lib/trainer is a link.
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


def require_systemd_harness() -> None:
    problems = missing_requirements()
    if problems:
        _skip("systemd harness unavailable: " + "; ".join(problems))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    require_systemd_harness()
    if not VENV_TRAINER.exists():
        _skip(f"{VENV_TRAINER} not found: run the tests with the venv's python, where `trainer` is installed")
    root = tmp_path_factory.mktemp("systemd-contract")
    var_lib = root / "var-lib"
    (var_lib / "trainer-test").mkdir(parents=True)
    for directory in (var_lib, var_lib / "trainer-test"):
        directory.chmod(0o755)  # readable by the service's dynamic user
    with BootedSystemd(root / "systemd") as sd:
        print(f"systemd booted in {sd.boot_seconds:.2f}s as host PID {sd.pid}")
        sd.run("mount", "--bind", str(var_lib), "/var/lib")
        # As the README installs it (with this venv's python), into the container's /etc/systemd.
        installed = sd.run(sys.executable, str(INSTALL), check=False)
        if installed.returncode != 0:
            _skip(f"the service could not run this venv: {installed.stderr.strip()}")
        print(installed.stdout, end="")
        sd.write_file(f"{SYSTEM}/trainer.service.d/test.conf", drop_in("config"))
        sd.write_file(f"{SYSTEM}/trainer@.service.d/test.conf", drop_in("%i"))
        print(f"drop-in trainer@.service.d/test.conf:\n{drop_in('%i')}", end="")
        # The units' WantedBy= target, up as on a booted host, so that `systemctl enable` works as
        # deployed. An enabled unit is referenced by it, so systemd keeps the unit's last exit
        # status after it stops instead of garbage-collecting it (an unreferenced unit that went
        # inactive shows ExecMainStatus=0, NRestarts=0 whatever happened).
        sd.write_file(f"{SYSTEM}/multi-user.target", "[Unit]\nDescription=Stand-in multi-user.target\n")
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


def new_main_pid(service: Service, unit: str, old_pid: int) -> int:
    """Wait for a main process of `unit` other than `old_pid` (READY=1 or not); its PID."""

    def fresh() -> int | None:
        pid = service.show(unit, "MainPID")["MainPID"]
        return int(pid) if pid not in ("0", str(old_pid)) else None

    return service.sd.wait_for(fresh, timeout=60, interval=0.02, what=f"a new main process of {unit}")


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


def require_systemd_analyze() -> None:
    if os.geteuid() != 0 or shutil.which("systemd-analyze") is None:
        _skip("systemd-analyze missing or not root")


@pytest.mark.parametrize("drop_ins", [(), ("cuda.conf", "network.conf")])
def test_units_pass_verify(tmp_path: Path, drop_ins: tuple[str, ...]) -> None:
    require_systemd_analyze()
    for unit in installed_units(tmp_path, *drop_ins):
        assert f"ExecStart={VENV_TRAINER} " in unit.read_text()
        assert verify_unit(unit) == [], unit


@pytest.mark.parametrize("drop_ins", [(), ("cuda.conf", "network.conf")])
def test_units_are_hardened(tmp_path: Path, drop_ins: tuple[str, ...]) -> None:
    """`systemd-analyze security` exposure at most 2.5 ("OK"), also with the documented GPU and
    network drop-ins."""
    require_systemd_analyze()
    for unit in installed_units(tmp_path, *drop_ins):
        out = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
            capture_output=True, text=True, check=True, env={**INNER_ENV, "SYSTEMD_COLORS": "0"},
        ).stdout  # fmt: skip
        [exposure] = re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", out)
        print(f"{unit.name} with {drop_ins or 'no extra drop-ins'}: exposure {exposure}")
        assert float(exposure) <= 2.5, out


def test_lifecycle_contract(service: Service, follow, reference_runs) -> None:
    """trainer.service through the README's commands and ten preemptions in a row."""
    if shutil.which("jq") is None:
        _skip("jq not found: the README's journal command pipes into it (`apt-get install jq`; .ci/run does)")
    sd, unit, state = service.sd, "trainer.service", "default"
    service.write_config("config", SETTINGS)
    journal = follow(unit)
    epochs = SETTINGS["train.epochs"]

    # `systemctl enable --now trainer`: returns once READY=1 came, after the service laid out and
    # loaded the data and looked for a checkpoint (none: a fresh start).
    service.shell(ENABLE_NOW)
    props = service.show(unit, "DropInPaths", "UnitFileState", "User")
    assert props["DropInPaths"].split()[0] == f"{SYSTEM}/trainer.service.d/common.conf"
    assert (props["UnitFileState"], props["User"]) == ("enabled", "trainer")
    pid = assert_started(service, unit)
    assert service.show(unit, "StatusText")["StatusText"].startswith(f"epoch 1/{epochs} step 0/")  # sent with READY=1
    journal.wait_event("dataset_prepared", pid)
    assert_ready_after_resume(service, unit, journal, pid, "fresh_start")
    total_steps = journal.wait_event("run_started", pid)["steps_per_epoch"] * epochs
    # STATUS= follows the training: `systemctl status trainer`.
    status = sd.wait_for(lambda: STATUS_LINE.search(service.shell(STATUS).stdout), timeout=30, what="STATUS= progress")
    print(f"{STATUS}: {status.group(0)}")

    # Preemptions, ten in a row, by `kill PID` and through systemd: each an emergency checkpoint,
    # exit 75, a restart and an exact resume; however fast they come, they never exhaust the start
    # limit (with the old limit of 5 starts in 10 minutes, the 5th was the last).
    sigterms = [
        ("kill -TERM", lambda pid: sd.run("kill", "-TERM", str(pid))),
        ("systemctl kill -s SIGTERM", lambda pid: sd.systemctl("kill", "-s", "SIGTERM", unit)),
    ]
    since_step = 0
    for restarts in range(1, PREEMPTIONS + 1):
        how, send_sigterm = sigterms[restarts % 2]
        wait_training(journal, pid, since_step=since_step, total_steps=total_steps)
        send_sigterm(pid)
        new_pid = wait_restarted(service, unit, pid, restarts=restarts)
        stopped, kind = assert_emergency_stop(journal, pid)
        resumed = assert_resumed_at(journal, new_pid, stopped, kind)
        assert_ready_after_resume(service, unit, journal, new_pid, "resumed")
        print(f"preemption {restarts} ({how}): stopped and resumed at {position(resumed)}")
        pid, since_step = new_pid, resumed["global_step"]

    # SIGKILL (as a crash or the OOM killer): no emergency checkpoint; restart and resume from the
    # newest checkpoint on disk at the moment of the kill. The process is frozen meanwhile, so
    # that its background writer cannot complete another one between the look and the kill.
    since = resumed["global_step"]
    journal.wait_event("checkpoint_saved", pid, kind="periodic", where=lambda e: e["checkpoint_global_step"] > since)
    sd.run("kill", "-STOP", str(pid))
    sd.wait_for(lambda: "T (stopped)" in sd.run("cat", f"/proc/{pid}/status").stdout, timeout=10, what="SIGSTOP")
    newest = next(e for e in CheckpointStore(service.checkpoint_dir(state), 1).scan() if e.valid)
    sd.run("kill", "-KILL", str(pid))
    new_pid = wait_restarted(service, unit, pid, restarts=PREEMPTIONS + 1)
    journal.wait_message(f"{unit}: Main process exited, code=killed, status=9/KILL")
    assert not journal.events("stopped", pid) and not journal.events("checkpoint_saved", pid, kind="emergency")
    assert newest.kind in ("periodic", "epoch")
    expected = {"epoch": newest.state["epoch"], "step_in_epoch": newest.state["step_in_epoch"],
                "global_step": newest.global_step, "path": newest.path}  # fmt: skip
    resumed = assert_resumed_at(journal, new_pid, expected, kind=newest.kind)
    assert resumed["steps_redone"] >= 0  # what was trained after that checkpoint is trained again
    assert_ready_after_resume(service, unit, journal, new_pid, "resumed")
    print(f"SIGKILL: resumed from the {newest.kind} checkpoint at {position(resumed)}, "
          f"{resumed['steps_redone']} redone")  # fmt: skip
    pid = new_pid

    # `systemctl stop`: emergency checkpoint, exit 75, a success: inactive, not failed; no restart.
    wait_training(journal, pid, since_step=resumed["global_step"], total_steps=total_steps)
    sd.systemctl("stop", unit)
    stopped, kind = assert_emergency_stop(journal, pid)
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "inactive", "SubState": "dead", "Result": "success", "ExecMainCode": "1",
         "ExecMainStatus": str(EXIT_STOPPED), "NRestarts": str(PREEMPTIONS + 1), "MainPID": "0"},
    )  # fmt: skip
    print(f"systemctl stop: stopped at {position(stopped)}")

    # `systemctl start trainer` resumes exactly there.
    service.shell(START)
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

    # A later start logs that training is complete and exits 0 at once (14 starts so far, and
    # still within the start limit: they came seconds apart).
    service.shell(START)  # returns: READY=1 comes before the trainer finds nothing to do
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

    # The README's journal commands: `journalctl -u trainer` shows systemd's lines and the trainer's;
    # with SYSLOG_IDENTIFIER=trainer only the trainer's JSON, which jq reads.
    shown = service.shell(JOURNAL).stdout
    assert f"Started {unit}" in shown and '"event": "training_completed"' in shown
    resumes = [json.loads(line) for line in service.shell(JOURNAL_JQ).stdout.splitlines()]
    assert len(resumes) == PREEMPTIONS + 3 and all(set(r) == {"kind", "global_step"} for r in resumes), resumes
    assert '"event"' not in service.shell(JOURNAL_ERRORS).stdout  # nothing went wrong

    # After all of that, the same weights, optimizer state and metrics as an uninterrupted run.
    final = final_checkpoint(service.checkpoint_dir(state))
    assert_same_training(final, reference_runs(**SETTINGS))


def test_config_error_exits_78_without_restart(service: Service, follow) -> None:
    sd, instance = service.sd, "badconfig"
    unit = f"trainer@{instance}.service"
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
    # Stored as an error (PRIORITY=3): `journalctl -p err` shows the cause beside systemd's
    # "Failed to start", and `-o cat` gives it as the bare JSON object.
    errors = sd.run("journalctl", "-p", "err", "-u", unit, "-o", "cat").stdout.splitlines()
    assert json.loads(errors[0]) == error, errors
    assert any(line.startswith(f"Failed to start {unit}") for line in errors[1:]), errors


def test_crash_loop_at_start_is_rate_limited(service: Service, follow) -> None:
    """A process that dies as soon as it exists (a broken install), again and again."""
    sd, instance = service.sd, "crashloop"
    unit = f"trainer@{instance}.service"
    service.write_config(instance, SETTINGS)
    burst = int(common_setting("StartLimitBurst"))
    assert service.show(unit, "StartLimitBurst")["StartLimitBurst"] == str(burst)
    journal = follow(unit)

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


def test_crash_loop_without_progress_is_refused(service: Service, follow) -> None:
    """A run that dies later than systemd's start limit can see, always before its first
    checkpoint: the trainer refuses its 6th start (exit 70), and systemd leaves it failed."""
    sd, instance = service.sd, "nowhere"
    unit = f"trainer@{instance}.service"
    # 200 steps an epoch, saved only at its end: the kill always comes before the first checkpoint.
    service.write_config(instance, {**SETTINGS, "data.train_subset": 20000, "checkpoint.every_steps": 0})
    journal = follow(unit)
    sd.systemctl("start", "--no-block", unit)
    pid = 0
    for crashes in range(1, 6):
        pid = new_main_pid(service, unit, pid)
        journal.wait_event("run_started", pid)  # data loaded: the crash comes well after the start
        sd.run("kill", "-KILL", str(pid), check=False)
        journal.wait_message(f"{unit}: Main process exited, code=killed, status=9/KILL", count=crashes)
    refused = journal.wait_event("crash_loop", pid=None)
    assert refused["exit_code"] == EXIT_CRASH_LOOP and "5 crashes in a row since the first start" in refused["message"]
    journal.wait_message(f"{unit}: Main process exited, code=exited, status={EXIT_CRASH_LOOP}/SOFTWARE")
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": str(EXIT_CRASH_LOOP), "NRestarts": "5"},
    )  # fmt: skip
    assert journal.starts() == 6 and not journal.events("fresh_start", refused["pid"])
    assert not any("Start request repeated too quickly" in m for m in journal.messages())
    errors = sd.run("journalctl", "-p", "err", "-u", unit, "SYSLOG_IDENTIFIER=trainer", "-o", "cat").stdout
    assert [json.loads(line)["event"] for line in errors.splitlines()] == ["crash_loop"]


def test_death_by_sigterm_restarts(service: Service, follow) -> None:
    """A SIGTERM that kills the main process, landing where the trainer has no handler (before it
    installs them, after it restores them on the way out), is a preemption too: a restart, as for
    exit 75. `Restart=on-failure` alone takes death by SIGTERM for a clean exit once the unit runs
    (before READY=1 the start fails with result 'protocol' and restarts anyway). Here a shell
    stands for such a trainer, run as Type=simple so that the unit runs at once."""
    sd, instance = service.sd, "early"
    unit = f"trainer@{instance}.service"
    sd.write_file(
        f"{SYSTEM}/{unit}.d/{INSTANCE_DROP_IN}",
        f"[Service]\nType=simple\nExecStart=\nExecStart=/bin/sh -c 'sleep 60; exec {VENV_TRAINER} run'\n",
    )  # fmt: skip
    sd.systemctl("daemon-reload")
    journal = follow(unit)
    sd.systemctl("start", unit)
    pid = new_main_pid(service, unit, 0)
    # Once it runs the shell (before, it is systemd's own child setting up the sandbox).
    sd.wait_for(lambda: sd.run("cat", f"/proc/{pid}/comm").stdout.strip() == "sh", timeout=30, what="the shell")
    sd.systemctl("kill", "-s", "SIGTERM", "--kill-whom=main", unit)
    journal.wait_message(f"{unit}: Deactivated successfully.")  # a clean exit, for systemd
    journal.wait_message(f"{unit}: Scheduled restart job, restart counter is at 1.")
    sd.systemctl("stop", unit)
    assert service.show(unit, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}


def test_two_ranks_preempted_restart_and_finish_exactly(service: Service, follow, reference_runs) -> None:
    """trainer@dist trains with two ranks (the network drop-in, as the README says: gloo speaks TCP
    on loopback). A SIGTERM to the main process, the launcher, reaches both ranks; they stop after
    the same step, rank 0 makes the emergency checkpoint durable, the launcher exits 75 and systemd
    restarts it; the finished run equals an unbroken 2-rank run bitwise."""
    sd, instance = service.sd, "dist"
    unit = f"trainer@{instance}.service"
    # 200 steps: the journal may show step 10 a second or two late on a loaded machine, and the
    # signal must still land mid-run.
    settings = {**ranks(2), "train.epochs": 10}
    service.write_config(instance, settings)
    sd.write_file(f"{SYSTEM}/{unit}.d/network.conf", (UNIT_DIR / "network.conf").read_text())
    sd.systemctl("daemon-reload")
    journal = follow(unit)
    sd.systemctl("start", unit)
    launcher = assert_started(service, unit)  # READY=1 from the launcher, once the ranks run
    journal.wait_event("checkpoint_saved", None, rank=0, checkpoint_global_step=10)

    sd.run("kill", "-TERM", str(launcher))
    new_launcher = wait_restarted(service, unit, launcher, restarts=1)  # after 75: RestartForceExitStatus=
    exited = journal.wait_event("ranks_exited", launcher)
    assert exited["exit_code"] == EXIT_STOPPED and exited["exit_codes"] == {"0": EXIT_STOPPED, "1": EXIT_STOPPED}
    stopped = [journal.wait_event("stopped", None, rank=rank) for rank in (0, 1)]
    assert len({position(event) for event in stopped}) == 1, stopped
    assert stopped[0]["global_step"] < 200, "the run was over before the signal: raise train.epochs"
    # The emergency checkpoint, or the epoch's when the signal came as an epoch ended (that state is
    # on disk already: `checkpoint_skipped`), as for one process (assert_emergency_stop).
    step = stopped[0]["global_step"]
    saved = journal.wait_event("checkpoint_saved", None, rank=0, where=lambda e: e["checkpoint_global_step"] == step)
    skipped = journal.events("checkpoint_skipped", None, rank=0)
    assert saved["kind"] == ("epoch" if skipped else "emergency"), (saved, skipped)
    resumed = journal.wait_event("resumed", None, rank=0)
    assert position(resumed) == position(saved) and resumed["kind"] == saved["kind"]

    sd.wait_for(
        lambda: service.show(unit, "ActiveState")["ActiveState"] == "inactive", timeout=300, interval=0.5,
        what="training to complete",
    )  # fmt: skip
    assert journal.wait_event("ranks_exited", new_launcher)["exit_code"] == 0
    assert service.show(unit, "Result", "ExecMainStatus") == {"Result": "success", "ExecMainStatus": "0"}
    assert_same_training(final_checkpoint(service.checkpoint_dir(instance)), reference_runs(**settings))


def test_a_cpu_wait_handover_keeps_the_main_pid_and_the_run_exact(service: Service, follow, reference_runs) -> None:
    """`train.cpu_wait: auto` under the hardened unit: busy loops beside a spinning run make it
    checkpoint and re-execute itself with the other policy. systemd sees one main process throughout
    (the same PID, no restart, READY=1 again is harmless), and the run ends bitwise equal to an
    unbroken one."""
    sd, instance = service.sd, "handover"
    unit = f"trainer@{instance}.service"
    settings = {"train.cpu_wait": "auto", "train.cpu_threads": 2, "train.epochs": 10}
    service.write_config(instance, settings)
    journal = follow(unit)
    sd.systemctl("start", unit)
    pid = assert_started(service, unit)
    start = journal.wait_event("determinism", pid)
    assert start["others_cpus"] is not None, "the unit cannot read /proc/stat: auto cannot measure"
    if start["cpu_wait_in_force"] != "active":
        sd.systemctl("stop", unit)
        pytest.skip(f"other work used {start['others_cpus']} CPUs at start: the run chose bounded, nothing to switch from")
    with busy_loops():
        switch = journal.wait_event("cpu_wait_switch", pid, to="bounded")
        resumed = journal.wait_event("resumed", pid, kind="handover")
    assert position(resumed) == position(switch)
    # The journal is read behind systemd's state: the run may have ended already (MainPID 0), so the
    # one main process is shown by the PID that logs the end below, and by no restart.
    assert service.show(unit, "NRestarts") == {"NRestarts": "0"}
    sd.wait_for(
        lambda: service.show(unit, "ActiveState")["ActiveState"] == "inactive", timeout=300, interval=0.5,
        what="training to complete",
    )  # fmt: skip
    assert service.show(unit, "Result", "ExecMainStatus", "NRestarts") == {"Result": "success", "ExecMainStatus": "0", "NRestarts": "0"}
    journal.wait_event("training_completed", pid)  # logged by the PID systemd started
    assert_same_training(final_checkpoint(service.checkpoint_dir(instance)), reference_runs(**{**settings, "train.cpu_wait": "bounded"}))


def test_exec_failure_does_not_loop(service: Service, follow) -> None:
    """203/EXEC (here a missing interpreter; in real life one under a hidden /root) needs a person."""
    sd, instance = service.sd, "noexec"
    unit = f"trainer@{instance}.service"
    missing = "[Service]\nExecStart=\nExecStart=/nonexistent/trainer run\n"
    sd.write_file(f"{SYSTEM}/{unit}.d/{INSTANCE_DROP_IN}", missing)
    sd.systemctl("daemon-reload")
    journal = follow(unit)
    assert sd.systemctl("start", unit, check=False).returncode != 0
    journal.wait_message(f"{unit}: Main process exited, code=exited, status=203/EXEC")
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "203", "NRestarts": "0"},
    )  # fmt: skip
    assert journal.starts() == 1


def test_instances_cannot_reach_each_other(service: Service) -> None:
    """trainer@a runs as trainer-a, trainer@b as trainer-b: from inside a (its namespaces, its user),
    b can be neither signalled nor read; a itself can, so the probe works."""
    sd = service.sd
    pids = {}
    for instance in ("alice", "bob"):
        service.write_config(instance, {**SETTINGS, "train.epochs": 1000})
        sd.systemctl("start", f"trainer@{instance}.service")
        pids[instance] = int(service.show(f"trainer@{instance}.service", "MainPID")["MainPID"])
    uid = service.uid_of(pids["alice"])

    def from_alice(command: str) -> subprocess.CompletedProcess[str]:
        return sd.run("nsenter", "-t", str(pids["alice"]), "-a", "setpriv", f"--reuid={uid}", f"--regid={uid}",
                      "--keep-groups", "sh", "-c", command, check=False)  # fmt: skip

    for target, reachable in ((pids["alice"], True), (pids["bob"], False)):
        signalled = from_alice(f"kill -0 {target}")
        environ = from_alice(f"cat /proc/{target}/environ")
        assert (signalled.returncode == 0, environ.returncode == 0) == (reachable, reachable), (signalled, environ)
        assert ("PYTHONUNBUFFERED=1" in environ.stdout) == reachable
    assert uid != service.uid_of(pids["bob"])
    assert service.show("trainer@alice.service", "User")["User"] == "trainer-alice"
    for instance in pids:
        sd.systemctl("stop", f"trainer@{instance}.service")
