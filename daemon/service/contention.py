"""Whether other work wants this run's CPUs: the measure `train.cpu_wait: auto` follows.

OpenMP threads that spin at a barrier (libgomp's default, `active`) are fastest on CPUs nobody else
wants, and collapse when others want them: the thread the team waits for is descheduled while the
team spins through its time slices. Sleeping soon (`bounded`) keeps a fair share there, at a cost
of ~40% on a quiet machine. Neither is right everywhere, so `auto` measures and follows.

The measure: the busy time of the CPUs this process may run on (/proc/stat, per CPU, steal time
included), less this process's own CPU time, per second of wall time. That is the CPU other
processes took, this run's DataLoader workers among them, and on a virtual machine what the
hypervisor gave to other guests. It does not depend on how this process's own threads wait.
"""

from __future__ import annotations

import os
import resource
import time

# CPUs' worth of time other work used: from this much the run shares its CPUs; below the quiet
# level it has them to itself. Between the two, the policy in force stays (hysteresis).
SHARED_CPUS = 0.5
QUIET_CPUS = 0.25
START_SAMPLE_S = 0.1  # the start-up's look, before torch loads (libgomp reads its settings then)
WINDOW_S = 1.0  # one reading a second during training
# A switch restarts the process (a checkpoint, an exec, a resume: ~2-3 s on the MLP), so it must be
# worth it: spinning beside busy work costs up to 90% and is left after a few seconds of it; sleeping
# on a quiet machine costs ~40% and is left after half a minute of quiet.
SHARED_FOR_S = 3.0
QUIET_FOR_S = 30.0
HOLD_S = 60.0  # after a switch, none for this long: intermittent load cannot make it flap faster
# Ticks of /proc/stat's cpuN lines: user nice system idle iowait irq softirq steal (guest time is
# counted in user already).
IDLE, IOWAIT, ACCOUNTED = 3, 4, 8


class CpuSampler:
    """Other work's CPU use on this process's CPUs, since the previous reading."""

    def __init__(self) -> None:
        self._cpus = {f"cpu{n}" for n in os.sched_getaffinity(0)}
        self._tick_s = 1 / os.sysconf("SC_CLK_TCK")
        self._last = self._read()
        self.since = time.monotonic()

    def _read(self) -> tuple[float, float, float] | None:
        """(wall time, busy CPU seconds of our CPUs, this process's CPU seconds); None without /proc/stat."""
        try:
            with open("/proc/stat") as stat:
                lines = stat.read().splitlines()
        except OSError:
            return None
        busy = 0
        for line in lines:
            name, _, values = line.partition(" ")
            if name in self._cpus:
                ticks = [int(v) for v in values.split()[:ACCOUNTED]]
                busy += sum(ticks) - ticks[IDLE] - ticks[IOWAIT]
        own = resource.getrusage(resource.RUSAGE_SELF)
        return time.monotonic(), busy * self._tick_s, own.ru_utime + own.ru_stime

    def others(self) -> float | None:
        """CPUs' worth of time other work used since the previous call; None where it cannot be read."""
        now, before = self._read(), self._last
        self._last = now
        if now is None or before is None or now[0] <= before[0]:
            return None
        return max(0.0, ((now[1] - before[1]) - (now[2] - before[2])) / (now[0] - before[0]))


def policy_at_start(sampler: CpuSampler) -> tuple[str, float | None]:
    """The waiting policy for a run starting now, and the measure it is chosen on: `bounded` where
    other work is busy on our CPUs (or nothing can be measured), else `active`. `sampler`: begun as
    early as the process could (its imports and config parsing overlap the look)."""
    time.sleep(max(0.0, START_SAMPLE_S - (time.monotonic() - sampler.since)))
    others = sampler.others()
    return ("active" if others is not None and others < SHARED_CPUS else "bounded"), others


class WaitAdvisor:
    """Reads the measure once a second at the loop's safe points and says when the run should
    switch its waiting policy: after SHARED_FOR_S of shared CPUs under `active`, after QUIET_FOR_S
    of quiet ones under `bounded`, never within HOLD_S of the previous switch."""

    def __init__(self, policy: str, switched: bool) -> None:
        self.policy = policy
        self.sampler = CpuSampler()
        now = time.monotonic()
        self._read_at = now
        self._hold_until = now + HOLD_S if switched else now
        self._against_since: float | None = None  # since when every reading has argued for the other policy
        self.others: float | None = None  # the last reading

    def reading(self) -> dict:
        """What was last measured, for the `progress` events: other work's use of this run's CPUs."""
        if self.others is None:
            return {}
        return {"cpu_wait": self.policy, "others_cpus": round(self.others, 2)}

    def poll(self) -> str | None:
        """The other policy, once it is due; None while this one stays."""
        now = time.monotonic()
        if now - self._read_at < WINDOW_S:
            return None
        window_start, self._read_at = self._read_at, now
        self.others = self.sampler.others()
        if self.others is None:
            return None
        if self.policy == "active":
            against, needed, other = self.others >= SHARED_CPUS, SHARED_FOR_S, "bounded"
        else:
            against, needed, other = self.others < QUIET_CPUS, QUIET_FOR_S, "active"
        if not against:
            self._against_since = None
            return None
        if self._against_since is None:
            self._against_since = window_start
        return other if now - self._against_since >= needed and now >= self._hold_until else None
