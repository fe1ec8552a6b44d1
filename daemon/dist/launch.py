"""`trainer run` with several ranks: this process starts them through torch's elastic agent and
stays the one that systemd, a terminal or a scheduler sees.

The agent runs on a thread of its own, where torch installs no signal handlers: ours stay in place
and only record, and the main thread forwards what they recorded to every rank's process group
(the agent starts each rank in a session of its own; SIGUSR1 is not among the signals torchrun
itself would forward). The main thread also speaks sd_notify, and turns the ranks' exit codes into
this process's own: a stop (75) or an error that another attempt cannot change (78, 73, ...) ends
the group without a restart; a rank that crashed or was killed restarts the group while
`dist.max_restarts` allows.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import uuid

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from daemon import events
from daemon.config.sections import DistConfig
from daemon.errors import ExitCode
from daemon.service.notify import Notifier
from daemon.service.signals import SignalRecorder

# Exits that say what happened on purpose: another attempt would end the same way (or, for a stop,
# must not train on). In the order in which they name the cause when ranks disagree.
FINAL_EXITS = (
    ExitCode.CONFIG,
    ExitCode.CANT_WRITE,
    ExitCode.IN_USE,
    ExitCode.NO_INPUT,
    ExitCode.CRASH_LOOP,
    ExitCode.STOPPED,
)
SUPERVISE_EVERY = 0.05  # seconds between the main thread's looks at the agent (a signal wakes it at once)
RUN_ID = "trainer"  # the rendezvous of this config's nodes: the same on every node
CREDENTIALS = struct.Struct("3i")  # struct ucred: the sender's pid, uid, gid


class _Agent(LocalElasticAgent):
    """torch's local agent, reading a group in which every rank ended with a final exit as
    finished: its failure path would restart the group.

    Both methods are torch's private ones (2.14 has no public restart policy or restart hook): how
    its run loop calls them is checked by tests/unit/test_elastic_agent_hooks.py, and pyproject.toml
    bounds torch to the versions that test passed on."""

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        codes = {rank: failure.exitcode for rank, failure in result.failures.items()}
        if result.state != WorkerState.FAILED or not all(code in FINAL_EXITS for code in codes.values()):
            return result
        ranks = [worker.global_rank for worker in worker_group.workers]
        return RunResult(state=WorkerState.SUCCEEDED, return_values={rank: codes.get(rank, 0) for rank in ranks})

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        events.RANKS_RESTARTING.emit(
            remaining_restarts=self._remaining_restarts, max_restarts=worker_group.spec.max_restarts
        )
        super()._restart_workers(worker_group)


def exit_code(result: RunResult) -> ExitCode:
    """This process's exit code for the ranks' outcome."""
    if result.is_failed():  # crashed or killed, restarts exhausted: systemd restarts after 1
        return ExitCode.FAILURE
    codes = {code or 0 for code in result.return_values.values()}  # a binary's success carries None
    return next((code for code in FINAL_EXITS if code in codes), ExitCode.COMPLETE)


def build_agent(cfg: DistConfig, argv: list[str]) -> _Agent:
    """The agent that starts `python -m daemon <argv>` as this node's ranks."""
    # One node: a rendezvous store on a free port of this machine, as `torchrun --standalone` does,
    # so that two runs on one machine never meet. Several: the configured endpoint, on every node.
    endpoint = cfg.rdzv_endpoint if cfg.nnodes > 1 else "127.0.0.1:0"
    rendezvous = RendezvousParameters(
        backend="c10d",
        endpoint=endpoint,
        run_id=RUN_ID,
        min_nodes=cfg.nnodes,
        max_nodes=cfg.nnodes,
        timeout=int(cfg.timeout_seconds),
    )
    spec = WorkerSpec(
        role="trainer",
        local_world_size=cfg.nproc_per_node,
        entrypoint=sys.executable,
        args=("-m", "daemon", *argv),
        rdzv_handler=get_rendezvous_handler(rendezvous),
        max_restarts=cfg.max_restarts,
    )
    return _Agent(spec=spec, logs_specs=DefaultLogsSpecs())


def launch(cfg: DistConfig, argv: list[str], signals: SignalRecorder, notifier: Notifier) -> ExitCode:
    """Run the ranks to their end; the exit code they make."""
    # JSON lines only on stdout: the agent's own log lines say in events of ours what they would.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # The ranks are not the service's main process: systemd hears from this one, and the ranks'
    # own notifications reach only the heartbeats.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    heartbeats = Heartbeats(notifier.watchdog_seconds) if notifier.watchdog_seconds else None
    if heartbeats:
        os.environ.update(heartbeats.environ)
    # A store of the ranks' own, not the rendezvous's: shared, it keeps the previous attempt's
    # addresses after a restart, and a restarted rank may connect to a dead one's (pytorch#135712).
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    agent = build_agent(cfg, argv)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = agent.run()
        except BaseException as exc:  # re-raised on the main thread, at the CLI's boundary
            outcome["error"] = exc
        finally:
            agent.get_worker_group().spec.rdzv_handler.shutdown()

    thread = threading.Thread(target=run, name="elastic-agent", daemon=True)
    thread.start()
    forwarder = Forwarder(signals)
    started: set[int] = set()
    with SignalWakeup() as wakeup:
        while thread.is_alive():
            wakeup.wait(SUPERVISE_EVERY)
            pids = [worker.id for worker in agent.get_worker_group().workers if worker.id is not None]
            if pids and set(pids) != started:
                started = set(pids)
                events.RANKS_STARTED.emit(pids=pids, nproc_per_node=cfg.nproc_per_node, nnodes=cfg.nnodes)
                notifier.ready(f"{len(pids)} ranks training")
            forwarder.forward(pids)
            if heartbeats and heartbeats.all_beat(pids):
                notifier.watchdog()
    if heartbeats:
        heartbeats.close()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    code = exit_code(result)
    exits = {rank: failure.exitcode for rank, failure in result.failures.items()} or result.return_values
    events.RANKS_EXITED.emit(exit_codes={str(rank): code or 0 for rank, code in exits.items()}, exit_code=int(code))
    notifier.stopping(f"ranks exited, {int(code)}")
    return code


class SignalWakeup:
    """A pipe that Python's C-level signal handler writes a byte to: the main thread's wait between
    its looks at the agent ends as soon as a signal arrives, and the ranks get it within a
    millisecond instead of up to SUPERVISE_EVERY later (a stop's latency is counted in steps)."""

    def __enter__(self) -> SignalWakeup:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        return self

    def wait(self, seconds: float) -> None:
        if select.select([self._read], [], [], seconds)[0]:
            while True:
                try:
                    os.read(self._read, 512)
                except BlockingIOError:
                    break

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._read)
        os.close(self._write)


class Heartbeats:
    """The ranks' watchdog pets, passed on to systemd only once every rank has sent one: a rank
    stuck in a step or a collective then stops the service's pets, and WatchdogSec= kills and
    restarts the service as it would a single process. Each rank's own Notifier sends them, to a
    socket of this process named as its NOTIFY_SOCKET; the kernel says which process sent each."""

    def __init__(self, watchdog_seconds: float) -> None:
        name = f"trainer-ranks-{uuid.uuid4().hex}"  # abstract: nothing to clean up on disk
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.socket.bind("\0" + name)
        # The ranks pet at twice this process's rate: a whole round arrives within each of its intervals.
        self.environ = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": str(int(watchdog_seconds * 1e6 / 2))}
        self.beat: set[int] = set()  # ranks (pids) heard from since the last whole round

    def all_beat(self, pids: list[int]) -> bool:
        """Whether every rank in `pids` has sent a pet since the last time this said so."""
        while True:
            try:
                message, ancillary, _flags, _address = self.socket.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size))
            except BlockingIOError:
                break
            if b"WATCHDOG=1" not in message.split(b"\n"):
                continue
            for level, kind, data in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    self.beat.add(CREDENTIALS.unpack(data[: CREDENTIALS.size])[0])
        if not pids or not self.beat.issuperset(pids):
            return False
        self.beat.clear()
        return True

    def close(self) -> None:
        self.socket.close()


class Forwarder:
    """Sends each stop signal this process recorded to every rank's process group (a rank started
    later, after a restart, gets them too), and each SIGUSR1 to the ranks running when it came."""

    def __init__(self, signals: SignalRecorder) -> None:
        self.signals = signals
        self.stops: list[int] = []
        self.sent: dict[int, int] = {}  # pid -> stop signals sent to it

    def forward(self, pids: list[int]) -> None:
        for event in self.signals.unreported_stops():
            events.SIGNAL_RECEIVED.emit(signal=event.name, forwarded_to=pids)
            self.stops.append(event.signum)
        saves = [signal.SIGUSR1] if pids and self.signals.take_save_request() else []
        for pid in pids:
            for signum in self.stops[self.sent.get(pid, 0) :] + saves:
                _send(pid, signum)
            self.sent[pid] = len(self.stops)


def _send(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)  # the rank and any DataLoader workers it started
    except ProcessLookupError:
        pass  # it has exited already
