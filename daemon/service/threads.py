"""A run's CPU threading: chosen before torch is imported, recorded in every checkpoint.

torch runs CPU kernels on an OpenMP team (GNU libgomp, which MKL's GEMMs share). Three things
about it are settled here rather than left to the environment:

* The thread count (`train.cpu_threads`; null: the CPUs this process may run on, after its
  affinity mask and its cgroup's CPU quota). A float sum split over a different number of threads
  rounds differently, so a run keeps the count it started with: a resume with `cpu_threads` null
  takes the count from the checkpoint, and an explicit different count is refused.
* No runtime may change that count on its own: MKL_DYNAMIC and OMP_DYNAMIC off, MKL's and
  OpenMP's documented conditions for run-to-run reproducible results. MKL's matrix products run
  in strict conditional-numerical-reproducibility mode (MKL_CBWR=AUTO,STRICT: the CPU's fastest
  code path, with results that do not depend on the buffers' memory alignment); for the MLP it
  gives the same bits as MKL's default.
* How long a thread spins at a barrier before it sleeps (`train.cpu_wait`). libgomp's default is
  300,000 spins, milliseconds of burnt CPU per wait: on a shared machine the thread being waited
  for is often descheduled, and the team spends its time slices spinning (docs/exactness.md, "Threads").
  `auto` chooses at start from what other work is doing on our CPUs (daemon/service/contention.py), and
  the run switches later by handing over to a fresh process (`hand_over`): the waiting policy
  changes no result, and the resume from the handover checkpoint is exact.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from daemon.service import contention
from daemon.service.signals import SAVE_SIGNAL, STOP_SIGNALS, SignalRecorder

# libgomp's spin count for each `train.cpu_wait`; None: libgomp's own default (300,000).
# "bounded" is libgomp's throttled count, the one it uses itself when threads outnumber CPUs.
SPIN_COUNTS = {"bounded": 1000, "passive": 0, "active": None}  # every train.cpu_wait but "auto"
# Set by a run handing over to its successor: the waiting policy the successor starts with.
HANDOVER_VARIABLE = "TRAINER_CPU_WAIT_HANDOVER"


@dataclass(frozen=True)
class CpuSetting:
    threads: int
    wait: str  # the policy in force: never "auto"
    others_cpus: float | None  # what `auto` measured at start (None: not measured)
    handed_over: bool  # this process took over from a run that switched its policy
    own_process: bool = True  # the `trainer` command, free to re-execute itself (not `daemon.run` in a script)

    @property
    def switchable(self) -> bool:
        """`auto` follows the machine from here: a team of threads, a policy it chose itself, and a
        process that is the trainer's own."""
        measured = self.handed_over or self.others_cpus is not None
        return self.own_process and self.threads > 1 and self.wait in ("active", "bounded") and measured


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota if one is set."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


def environment(threads: int, wait: str) -> dict[str, str]:
    """The variables the OpenMP and MKL runtimes read when torch loads them."""
    spin = SPIN_COUNTS[wait]
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OMP_DYNAMIC": "FALSE",
        "MKL_DYNAMIC": "FALSE",
        "MKL_CBWR": "AUTO,STRICT",
    }
    if spin is not None:
        env["GOMP_SPINCOUNT"] = str(spin)
    return env


def configure_before_torch(threads: int | None, wait: str, started: contention.CpuSampler | None) -> CpuSetting:
    """Set the runtime variables for this process (and the DataLoader workers it forks); return
    what is in force. Must run before torch is first imported: libgomp reads them once, when it loads.
    `started`: the look at the machine begun at the process's start (daemon/entry.py); None where
    the run is not a process of its own (`daemon.run` in a script), which never hands over."""
    count = threads if threads is not None else available_cpus()
    handover = os.environ.pop(HANDOVER_VARIABLE, None) if started else None
    others = None
    if wait == "auto":
        if handover in SPIN_COUNTS:
            wait = handover
        else:
            handover = None
            wait, others = (
                contention.policy_at_start(started or contention.CpuSampler()) if count > 1 else ("active", None)
            )
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        os.environ.pop(name, None)  # ours, not inherited ones, decide the waiting
    os.environ.update(environment(count, wait))
    return CpuSetting(count, wait, others, handed_over=handover is not None, own_process=started is not None)


def hand_over(wait: str, signals: SignalRecorder, descriptors: dict[str, int]) -> None:
    """Replace this process with a fresh run of the same command line that waits with `wait`; it
    resumes from the checkpoint just written. Returns only where a stop was recorded first (the
    checkpoint holds the position: the caller exits as stopped) or the exec failed. `descriptors`:
    kept open through the exec, each named to the successor by its environment variable (the run
    lock: a POSIX lock lives as long as its process keeps a descriptor of the file open).

    The signals are blocked from the check on: one that arrives now stays pending through the exec
    and reaches the successor's handlers once they are installed (daemon/entry.py). No DataLoader
    worker may outlive this image: the process keeps its PID, so a worker would not see its parent go."""
    signal.pthread_sigmask(signal.SIG_BLOCK, (*STOP_SIGNALS, SAVE_SIGNAL))
    if signals.stop_requested:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (*STOP_SIGNALS, SAVE_SIGNAL))
        return
    import multiprocessing  # here only: every command imports this module (the config's policies)

    for child in multiprocessing.active_children():
        child.kill()  # workers ignore the stop signals
        child.join()
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[HANDOVER_VARIABLE] = wait
    for variable, fd in descriptors.items():
        os.set_inheritable(fd, True)
        os.environ[variable] = str(fd)
    try:
        os.execv(sys.executable, sys.orig_argv)
    finally:  # only after a failed exec
        for variable, fd in descriptors.items():
            os.environ.pop(variable, None)
            os.set_inheritable(fd, False)
        os.environ.pop(HANDOVER_VARIABLE, None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (*STOP_SIGNALS, SAVE_SIGNAL))


def in_force() -> dict:
    """What the CPU runtimes really use, for the `determinism` event (torch imported by now)."""
    import torch

    names = ("OMP_NUM_THREADS", "OMP_DYNAMIC", "MKL_DYNAMIC", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "MKL_CBWR")
    return {
        "cpu_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "environment": {name: os.environ[name] for name in names if name in os.environ},
    }
