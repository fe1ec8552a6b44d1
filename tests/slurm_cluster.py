"""A one-node SLURM cluster from Debian's packages (munge, slurmctld, slurmd), for tests that submit
real batch jobs and stop them with SLURM's own signals.

    with SlurmCluster(tmp_path / "slurm") as cluster:
        job = cluster.sbatch(script, "--time=10", args=["--config", "config.yaml"], workdir=workdir)
        job.wait_for_event("checkpoint_saved", checkpoint_global_step=10)
        cluster.run("scontrol", "requeue", job.id)
        job.wait_for_state("PENDING", restarts=1)

Isolation (why each piece is as it is):

* Every daemon runs in the foreground (`-D`, `-F`) as a child of the test process, with its state,
  spool, logs, pid files and munge socket under one folder; nothing goes through systemd, /etc/slurm,
  /etc/munge or /run/munge, so a SLURM or munge the machine runs for itself is left alone.
* Its own munge key and socket (`AuthInfo=socket=`), and its own free ports on 127.0.0.1.
* The commands find it through SLURM_CONF, set in the environment of their subprocesses only.
* Plugins that need no cgroups: proctrack/linuxproc finds a step's processes as the descendants of
  its first task, so a signal to the step reaches a launcher and each of its ranks, wherever their
  sessions are.
* Teardown cancels every job and waits until its processes are gone, stops the daemons (SIGTERM,
  then SIGKILL after a bound), and kills any process still carrying this cluster's SLURM_CONF in its
  environment (a slurmstepd, or a job's process, left behind by a daemon that died first).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from daemon.ops.child import matches, parse_event

T = TypeVar("T")

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
PARTITION = "test"
# SLURM's default, kept explicit: the grace between SIGTERM and SIGKILL when SLURM ends a job, the
# budget an emergency checkpoint has (README, "Preemptible machines and clusters").
KILL_WAIT = 30
POLL = 0.2  # s between two looks at a job or a file: an interval, never a measure of progress
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


def which(command: str) -> str | None:
    """The command's path; the daemons live in /usr/sbin, which a CI user's PATH may lack."""
    return shutil.which(command, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def missing_requirements() -> list[str]:
    """Why this machine cannot run SlurmCluster; empty if it can."""
    missing = [] if os.geteuid() == 0 else ["not running as root (slurmd starts jobs as their user)"]
    absent = [command for command in COMMANDS if which(command) is None]
    if absent:
        missing.append(
            f"not installed: {', '.join(absent)} (Debian: apt-get install slurmctld slurmd slurm-client munge)"
        )
    return missing


def wait_until(condition: Callable[[], T | None], timeout: float, what: Callable[[], str] | str) -> T:
    """The first value of `condition()` that is not None (nor False), looking every POLL s; raises
    TimeoutError naming `what` when `timeout` s pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what() if callable(what) else what}")
        time.sleep(POLL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    """munged, slurmctld and slurmd for one node, this machine; started in __enter__, stopped in __exit__."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.daemons: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment of a SLURM command: this one, with SLURM_CONF naming this cluster and no
        other SLURM_ variable (the suite may itself run inside someone's job)."""
        outer = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
        return {**outer, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> SlurmCluster:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            if self._controller_up():
                self.cancel_all()
        finally:
            self._stop_daemons()

    def _start(self) -> None:
        munge = self.root / "munge"
        for directory in (munge, self.logs, self.root / "state", self.root / "spool"):
            directory.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o755)  # munged wants its socket's folder open to every client
        socket_path = munge / "munge.socket"
        if len(str(socket_path)) >= 100:  # sun_path holds 108 bytes
            raise RuntimeError(f"{socket_path}: too long for a unix socket")
        key = munge / "munge.key"
        with os.fdopen(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as out:  # munged's own mode
            out.write(secrets.token_bytes(1024))
        self.conf.write_text(self._slurm_conf(socket_path))
        # --force: pytest's temporary folders are not laid out as munged's checks of /etc and /run expect.
        self._daemon(["munged", "-F", "--force", f"--key-file={key}", f"--socket={socket_path}",
                      f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                      f"--log-file={self.logs / 'munged.log'}"], "munged")  # fmt: skip
        wait_until(socket_path.exists, 30, lambda: f"munged's socket; log:\n{self.log_tail('munged')}")
        self._daemon(["slurmctld", "-D", "-i"], "slurmctld")
        wait_until(self._controller_up, 60, lambda: f"slurmctld answering; log:\n{self.log_tail('slurmctld')}")
        self._daemon(["slurmd", "-D", "-N", self.node], "slurmd")
        wait_until(lambda: self.node_state() == "IDLE", 60, lambda: f"node idle; log:\n{self.log_tail('slurmd')}")

    def _slurm_conf(self, munge_socket: Path) -> str:
        ctld_port, slurmd_port = free_port(), free_port()
        cpus = max(2, os.cpu_count() or 1)  # a two-rank job takes 2 CPUs, however few this machine has
        return "\n".join([
            "ClusterName=trainer-tests",
            "MailProg=/bin/true",  # no mail is sent; the default path need not exist
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd.log'}",
            # No cgroups: a step's processes are its first task's descendants; no CPU binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",  # first come, first served
            # A job released or requeued starts at once: no batching of batch jobs' starts (3 s by
            # default), and a pass over the queue every 2 s (not 60) for a change that starts none.
            "SchedulerParameters=batch_sched_delay=0,sched_interval=2",
            f"KillWait={KILL_WAIT}",
            "JobRequeue=1",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # the node's CPUs as written here, not as counted
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])  # fmt: skip

    def _daemon(self, argv: list[str], name: str) -> None:
        command = [which(argv[0]) or argv[0], *argv[1:]]
        with open(self.logs / f"{name}.out", "ab") as out:
            self.daemons.append(
                subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env)
            )

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = ""
        for path in (self.logs / f"{name}.out", self.logs / f"{name}.log"):
            with contextlib.suppress(FileNotFoundError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # The commands

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def _controller_up(self) -> bool:
        if not self.conf.exists():
            return False
        return "UP" in self.run("scontrol", "ping", check=False).stdout

    def node_state(self) -> str:
        fields = _fields(self.run("scontrol", "-o", "show", "node", self.node).stdout)
        return fields.get("State", "")

    def sbatch(
        self, script: Path, *options: str, args: Sequence[str] = (), workdir: Path, env: dict[str, str] | None = None
    ) -> Job:
        """Submit `script` with `options` (before the script: they override its #SBATCH lines) and
        `args` (after it: the script's own), its output in `workdir`."""
        output = workdir / "job-%j.out"
        argv = ["sbatch", "--parsable", f"--chdir={workdir}", f"--output={output}", *options, str(script), *args]
        done = subprocess.run(argv, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch exited {done.returncode}: {done.stderr.strip()}")
        job_id = done.stdout.strip().split(";")[0]
        return Job(self, job_id, Path(str(output).replace("%j", job_id)))

    def jobs(self) -> list[str]:
        return self.run("squeue", "--noheader", "--format=%i").stdout.split()

    def cancel_all(self, timeout: float = KILL_WAIT + 60) -> None:
        """Every job cancelled, and gone from the queue (its processes ended: SIGKILL after KillWait)."""
        jobs = self.jobs()
        if jobs:
            self.run("scancel", *jobs, check=False)
        wait_until(lambda: not self.jobs(), timeout, lambda: f"the queue empty: {self.jobs()}")

    def hold_node(self) -> None:
        """No job starts on the node (a running one runs on): a requeued job stays pending until
        release_node, whatever SLURM's own delay before a requeued job may start again."""
        self.run("scontrol", "update", f"NodeName={self.node}", "State=DRAIN", "Reason=held by a test")

    def release_node(self) -> None:
        if "DRAIN" in self.node_state():
            self.run("scontrol", "update", f"NodeName={self.node}", "State=RESUME")

    # Teardown

    def _stop_daemons(self) -> None:
        for daemon in reversed(self.daemons):  # slurmd, slurmctld, then munged, which they need to the end
            with contextlib.suppress(ProcessLookupError):
                daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        self.daemons.clear()
        for pid in self._processes_of_this_cluster():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _processes_of_this_cluster(self) -> Iterable[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    yield int(entry.name)


class Job:
    """A submitted batch job: its state as scontrol shows it, and the trainer's JSON events in its
    output file (every run of it, with --open-mode=append)."""

    def __init__(self, cluster: SlurmCluster, job_id: str, output: Path) -> None:
        self.cluster = cluster
        self.id = job_id
        self.output = output

    def info(self) -> dict[str, str]:
        """`scontrol show job`'s fields: JobState, Restarts, Reason, ExitCode, TimeLimit..."""
        return _fields(self.cluster.run("scontrol", "-o", "show", "job", self.id).stdout)

    def text(self) -> str:
        try:
            return self.output.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def events(self, event: str | None = None, **fields: object) -> list[dict]:
        records = (parse_event(line) for line in self.text().splitlines())
        return [record for record in records if record is not None and matches(record, event, fields)]

    def describe(self) -> str:
        try:
            info = self.info()
            state = f"{info.get('JobState')} (Restarts={info.get('Restarts')})"
        except RuntimeError as error:  # the controller no longer knows the job, or is gone
            state = str(error)
        return f"job {self.id}: {state}; output:\n{self.text()}"

    def wait_for_event(self, event: str, timeout: float = 180, nth: int = 1, **fields: object) -> dict:
        """The `nth` event named `event` with these field values in the output, once it is there;
        raises as soon as the job has ended without it."""
        looked = [0.0]  # when the job's state was last asked for: once a second at most

        def found() -> dict | None:
            ended = False
            if time.monotonic() - looked[0] > 1:
                looked[0] = time.monotonic()
                ended = self.info().get("JobState") in FINISHED  # before the output: all of it is there
            hits = self.events(event, **fields)
            if len(hits) >= nth:
                return hits[nth - 1]
            if ended:
                raise AssertionError(f"{event} {fields} never came: {self.describe()}")
            return None

        return wait_until(found, timeout, lambda: f"{event} {fields} in the output of {self.describe()}")

    def wait_for_text(self, text: str, timeout: float = 180) -> None:
        """Until `text` is in the output (a line of the batch script's, say)."""
        wait_until(lambda: text in self.text(), timeout, lambda: f"{text!r} in the output of {self.describe()}")

    def wait_for_state(self, *states: str, restarts: int | None = None, timeout: float = 180) -> dict[str, str]:
        """scontrol's fields, once the job is in one of `states` (after `restarts` requeues, if given)."""

        def reached() -> dict[str, str] | None:
            info = self.info()
            if info.get("JobState") in states and (restarts is None or int(info.get("Restarts", -1)) == restarts):
                return info
            return None

        return wait_until(reached, timeout, lambda: f"{' or '.join(states)} (restarts {restarts}), {self.describe()}")

    def wait_to_finish(self, timeout: float = 300) -> dict[str, str]:
        return self.wait_for_state(*FINISHED, timeout=timeout)

    def elapsed_seconds(self) -> int:
        """The run's elapsed time as SLURM counts it (RunTime, [D-]HH:MM:SS)."""
        days, _, clock = self.info()["RunTime"].rpartition("-")
        hours, minutes, seconds = (int(part) for part in clock.split(":"))
        return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds

    def set_time_limit_minutes_from_now(self, minutes_ahead: int) -> int:
        """The time limit set to `minutes_ahead` whole minutes past the elapsed whole minutes (SLURM
        counts in minutes): it falls between `minutes_ahead` - 1 and `minutes_ahead` minutes from now.
        The new limit, in minutes."""
        limit = math.floor(self.elapsed_seconds() / 60) + minutes_ahead
        self.cluster.run("scontrol", "update", f"JobId={self.id}", f"TimeLimit={limit}")
        return limit

    def release(self) -> None:
        """A requeued job may start now, not after SLURM's delay (about 2 minutes after a requeue)."""
        self.cluster.run("scontrol", "update", f"JobId={self.id}", "StartTime=now")


def _fields(line: str) -> dict[str, str]:
    """`Key=Value Key=Value ...` of `scontrol -o show`: the values this harness reads hold no spaces."""
    return dict(re.findall(r"(\w+)=(\S*)", line))
