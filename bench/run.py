"""The benchmark: the daemon against a plain PyTorch loop and the seed recipe.

    .venv/bin/python bench/run.py [--quick] [--reps N] [--big-reps N]

Every contender is a real process launched from here (the daemon through its CLI, the others
from bench/), so all pay the same process costs; their timings come from the JSON lines they
print (the daemon's log events, the markers of bench/common.py). One run interleaves them
(A B C … then again, in a rotated order) so that the machine's noise spreads over all of
them; figures are medians with min–max, throughput ratios are taken within each repetition
(then their median), and the targets are judged on medians.

1. Throughput, MNIST MLP 784-500-10, Adam, batch 100, one epoch per process: seconds from the
   start of training to the end of the epoch (training, test evaluation, and the checkpoint
   where there is one), for (a) plain_loop.py; (a tuned) the same with glibc's malloc tuned by
   GLIBC_TUNABLES as the daemon tunes it at start, the fair floor the targets are judged against;
   (b) seed_recipe.py; (c) the daemon, default checkpoint policy; (c active) the same with
   train.cpu_wait=active (libgomp's own spin-waiting); (d) the daemon saving every 50 steps
   (asynchronously, the default), and (d sync) the same with checkpoint.async_save=false.
2. Emergency latency: SIGTERM sent at a random point of a step, to the `checkpoint_saved`
   event of the emergency checkpoint (logged once it is fsynced, renamed and the directory
   fsynced) and to the process exit; for the MLP and for the ~100M-parameter model
   (model.hidden=[5600]*4), against raw_save.py (torch.save + fsync of that very checkpoint,
   each save after a pause, as the daemon's come after training: see raw_save.py).
   The target applies with the background writer idle; a stop during a background save
   waits for it (README, "Signals") and is shown apart.
3. Restart latency: launch to the first completed step (the daemon's first `progress` event,
   with log.progress_every_seconds tiny; the scripts' `first_step` marker), fresh and resumed.
4. Periodic-save stall: how long the loop is blocked per periodic save, the debug event
   `checkpoint_snapshot.stall_ms` when asynchronous, the save's `duration_ms` when synchronous.
5. Memory: peak RSS (wait4's ru_maxrss) of the daemon against the plain loop with the same
   model; a snapshot of the state (the checkpoint's size) is allowed on top.
6. A shared machine: (c), (c active) and (a tuned) each run one epoch on the quiet machine, then
   one beside cores + 1 busy-loop processes; the share of its quiet throughput each keeps.
7. Durability: a SIGKILL while the background writer is busy (a save every step), then
   `trainer status`: every checkpoint left must verify.

Writes bench/results/latest.json and prints a table with a PASS/FAIL per target.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CONFIG = REPO / "config.yaml"
RESULTS = BENCH / "results" / "latest.json"
README_BEGIN = "<!-- bench:begin: written by bench/run.py --update-readme -->"
README_END = "<!-- bench:end -->"
BIG_HIDDEN = [5600, 5600, 5600, 5600]  # 98.5M parameters
TINY_PROGRESS = {"log.progress_every_seconds": 0.001}  # a `progress` event after every step
MLP_WARMUP_STEPS = 100  # past the start-up: its first steps and last full garbage collections (~0.1-0.2 s)
SIGKILL_ATTEMPTS = 5  # tries at landing a SIGKILL inside a background write
# Before each raw save, as the daemon's come after training (raw_save.py): back to back, reusing the
# page cache the previous save freed, they took ~15% (MLP) to ~60% (100M) less time here.
RAW_PAUSE_S = {"mlp": 1, "big": 5}
# glibc's malloc set as the daemon sets it at start (daemon/allocator.py), for the fair floor (a tuned).
TUNED_ALLOCATOR = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"}
THROUGHPUT = ("a", "a_tuned", "b", "c", "c_active", "d", "d_sync")
CONTENDED = ("c", "c_active", "a_tuned")  # each quiet, then beside cores + 1 busy loops
DAEMON_POLICIES = {
    "c": {},
    "c_active": {"train.cpu_wait": "active"},  # libgomp's own waiting, the daemon's default before train.cpu_wait
    "d": {"checkpoint.every_steps": 50, "log.level": "debug"},  # debug: the `checkpoint_snapshot` stall events
    "d_sync": {"checkpoint.every_steps": 50, "checkpoint.async_save": False},
}
LABELS = {
    "a": "(a) plain loop, tensors, no checkpoint",
    "a_tuned": "(a tuned) the same, malloc tuned as the daemon's (the fair floor)",
    "c_active": "(c active) daemon, default policy, cpu_wait active",
    "b": "(b) seed recipe",
    "c": "(c) daemon, default policy",
    "d": "(d) daemon, every 50 steps (async)",
    "d_sync": "(d sync) daemon, every 50 steps (sync)",
}


@dataclass(frozen=True)
class Plan:
    reps: int  # repetitions of the MLP measurements
    big_reps: int  # repetitions of the ~100M-parameter ones
    big_save_every_s: float  # the big model's checkpoint.every_seconds: room for the writer to finish
    big_async_saves: int  # periodic saves to wait for before stopping the big model
    big_sync_saves: int
    raw_repeats: int
    big_plain_steps: int
    contended_reps: int  # repetitions of the shared-machine measurements


FULL = Plan(
    reps=9, big_reps=2, big_save_every_s=8, big_async_saves=3, big_sync_saves=2, raw_repeats=3, big_plain_steps=6,
    contended_reps=3,
)  # fmt: skip
QUICK = Plan(
    reps=1, big_reps=1, big_save_every_s=8, big_async_saves=2, big_sync_saves=1, raw_repeats=1, big_plain_steps=3,
    contended_reps=1,
)  # fmt: skip


class BenchError(Exception):
    pass


def event_time(record: dict) -> float:
    """Wall-clock time of a JSON line: the daemon's ISO `timestamp`, or the scripts' `time`."""
    if "time" in record:
        return record["time"]
    return datetime.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


class Child:
    """A contender process: its stdout kept line by line, reaped with wait4 for its exit time
    and peak RSS."""

    def __init__(self, argv: list[str], cwd: Path, env: dict | None = None) -> None:
        self.argv = argv
        self.launched = time.time()
        self.popen = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )  # fmt: skip
        self.lines: list[str] = []
        self.records: list[dict] = []
        self.exit_code: int | None = None
        self.exited_at: float | None = None
        self.max_rss_bytes: int | None = None
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reaper = threading.Thread(target=self._reap, daemon=True)
        self._reader.start()
        self._reaper.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line)
                if line.startswith("{") and line.rstrip().endswith("}"):  # a JSON event, not `status --json`
                    self.records.append(json.loads(line))
                self._changed.notify_all()

    def _reap(self) -> None:
        _, status, usage = os.wait4(self.popen.pid, 0)
        exited_at = time.time()
        with self._changed:
            self.exited_at, self.exit_code = exited_at, os.waitstatus_to_exitcode(status)
            self.max_rss_bytes = usage.ru_maxrss * 1024  # KiB on Linux
            self.popen.returncode = self.exit_code  # reaped here: Popen must not wait for it again
            self._changed.notify_all()

    def wait_for(self, event: str, timeout: float = 300, nth: int = 1, after: dict | None = None, **fields) -> dict:
        """The `nth` line so far or to come (after the line `after`) that is `event` with these fields."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                start = next(i + 1 for i, r in enumerate(self.records) if r is after) if after else 0
                records = self.records[start:]
                matches = [
                    r for r in records if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
                ]
                if len(matches) >= nth:
                    return matches[nth - 1]
                if self.exit_code is not None and not self._reader.is_alive():
                    raise BenchError(f"ended (exit {self.exit_code}) before {event} {fields}:\n{self.tail()}")
                if deadline <= time.monotonic():
                    raise BenchError(f"no {event} {fields} within {timeout} s:\n{self.tail()}")
                self._changed.wait(deadline - time.monotonic())

    def events(self, event: str) -> list[dict]:
        with self._changed:
            return [record for record in self.records if record.get("event") == event]

    def step_intervals(self) -> list[float]:
        """Seconds between consecutive `progress` events: one step each with TINY_PROGRESS."""
        times = [event_time(record) for record in self.events("progress")]
        return [later - earlier for earlier, later in zip(times, times[1:])]

    def send(self, signum: int) -> float:
        sent = time.time()
        os.kill(self.popen.pid, signum)
        return sent

    def finish(self, expect: int, timeout: float = 600) -> Child:
        self._reaper.join(timeout)
        if self.exit_code is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self._reaper.join()
            raise BenchError(f"still running after {timeout} s, killed:\n{self.tail()}")
        self._reader.join()
        if self.exit_code != expect:
            raise BenchError(f"exit {self.exit_code}, expected {expect}:\n{self.tail()}")
        return self

    def tail(self) -> str:
        return f"$ {' '.join(self.argv)}\n" + "".join(self.lines[-15:])


class Bench:
    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.data = work / "data"
        self.samples: dict[str, list] = {}
        self.random = random.Random(0)

    def record(self, key: str, value) -> None:
        self.samples.setdefault(key, []).append(value)

    # -- launching ---------------------------------------------------------------------------

    def daemon(self, run_dir: Path, settings: dict) -> Child:
        settings = {
            "data.root": str(self.data), "checkpoint.dir": str(run_dir / "checkpoints"), "train.epochs": 1,
            "log.format": "json", **settings,
        }  # fmt: skip
        overrides = [f"--set={key}={json.dumps(value)}" for key, value in settings.items()]
        return Child([sys.executable, "-m", "daemon", "run", f"--config={CONFIG}", *overrides], REPO)

    def script(self, name: str, *args: str, env: dict | None = None) -> Child:
        return Child([sys.executable, str(BENCH / name), f"--data-root={self.data}", *args], REPO, env)

    def fresh_dir(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    # -- 1. throughput (and the seed's fresh start, and memory) -----------------------------

    def one_epoch(self, contender: str, rep: int) -> tuple[Child, float]:
        """A plain loop's or the daemon's one-epoch run, finished; and the seconds of its epoch."""
        if contender in ("a", "a_tuned"):
            child = self.script("plain_loop.py", env=TUNED_ALLOCATOR if contender == "a_tuned" else None).finish(0)
            started = child.wait_for("train_started")
        else:
            run_dir = self.fresh_dir(f"{contender}-{rep}")
            child = self.daemon(run_dir, DAEMON_POLICIES[contender]).finish(0)
            shutil.rmtree(run_dir)
            started = child.wait_for("fresh_start")
        return child, event_time(child.wait_for("epoch_completed")) - event_time(started)

    def throughput(self, contender: str, rep: int) -> None:
        if contender == "b":
            self.seed_checkpoint(rep).unlink(missing_ok=True)
            child = self.script("seed_recipe.py", f"--checkpoint={self.seed_checkpoint(rep)}").finish(0)
            started = child.wait_for("train_started")
            self.record("restart.seed_fresh", event_time(child.wait_for("first_step")) - child.launched)
            seconds = event_time(child.wait_for("epoch_completed")) - event_time(started)
        else:
            child, seconds = self.one_epoch(contender, rep)
        if contender in DAEMON_POLICIES:
            completed = child.wait_for("epoch_completed")
            self.record(f"throughput.{contender}.train_steps_per_s", completed["steps_per_s"])
            self.record(f"checkpoint.{contender}.bytes", max(e["bytes"] for e in child.events("checkpoint_saved")))
            if contender == "d":
                for event in child.events("checkpoint_snapshot"):
                    self.record("stall.mlp.async_ms", event["stall_ms"])
            if contender == "d_sync":
                for event in child.events("checkpoint_saved"):
                    if event["kind"] == "periodic":
                        self.record("stall.mlp.sync_ms", event["duration_ms"])
        self.record(f"throughput.{contender}.seconds", seconds)
        self.record(f"memory.{contender}.max_rss", child.max_rss_bytes)

    # -- 6. a shared machine -------------------------------------------------------------------

    def contended(self, contender: str, rep: int) -> None:
        """One epoch on the quiet machine, then one beside cores + 1 busy loops: the share kept."""
        quiet = self.one_epoch(contender, rep)[1]
        hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range((os.cpu_count() or 1) + 1)]
        try:
            busy = self.one_epoch(contender, rep)[1]
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        self.record(f"contended.{contender}", {"quiet_s": quiet, "busy_s": busy, "share": quiet / busy})

    def seed_checkpoint(self, rep: int) -> Path:
        return self.work / f"seed-{rep}.pt"

    # -- 2 and 3. restart and emergency, MLP ------------------------------------------------

    def restarts(self, rep: int) -> None:
        seed = self.script("seed_recipe.py", f"--checkpoint={self.seed_checkpoint(rep)}", "--epochs=2")
        seed.wait_for("train_started", epoch=1)  # it did resume
        self.record("restart.seed_resume", event_time(seed.wait_for("first_step")) - seed.launched)
        seed.send(signal.SIGKILL)
        seed.finish(-signal.SIGKILL)
        self.seed_checkpoint(rep).unlink()

        run_dir = self.fresh_dir(f"restart-{rep}")
        for phase in ("fresh", "resume"):
            child = self.daemon(run_dir, TINY_PROGRESS)
            first = child.wait_for("progress")
            self.record(f"restart.daemon_{phase}", event_time(first) - child.launched)
            if phase == "resume":
                child.wait_for("resumed")  # it did resume, not start afresh
            child.wait_for("progress", global_step=first["global_step"] + MLP_WARMUP_STEPS)
            self.record("emergency.mlp", self.stop(child, step_s=0.01))
        self.raw_save("mlp", newest_checkpoint(run_dir), self.plan.raw_repeats + 2, RAW_PAUSE_S["mlp"])
        shutil.rmtree(run_dir)

    def stop(self, child: Child, step_s: float) -> dict:
        """SIGTERM at a random point within the next step; the emergency checkpoint's timings."""
        time.sleep(self.random.uniform(0, step_s))
        sent = child.send(signal.SIGTERM)
        child.finish(75)
        received = child.wait_for("signal_received")
        saved = child.wait_for("checkpoint_saved", kind="emergency")
        return {
            "durable_s": event_time(saved) - sent,
            "exit_s": child.exited_at - sent,
            "waited_ms": received["waited_ms"],  # from the handler to the end of the step in progress
            "save_ms": saved["duration_ms"],
            "bytes": saved["bytes"],
        }

    def sigkill_during_background_write(self) -> None:
        """SIGKILL while the writer is busy (a save every step keeps it so): every checkpoint left
        must verify, and the temp file shows that a write was really cut short."""
        run_dir = self.fresh_dir("sigkill")
        for attempt in range(SIGKILL_ATTEMPTS):
            child = self.daemon(run_dir, {"checkpoint.every_steps": 1, "checkpoint.keep_last": 2})
            child.wait_for("checkpoint_saved", checkpoint_global_step=MLP_WARMUP_STEPS * (attempt + 1))
            time.sleep(self.random.uniform(0, 0.05))
            child.send(signal.SIGKILL)
            child.finish(-signal.SIGKILL)
            cut_short = any(path.name.startswith(".tmp-ckpt-") for path in (run_dir / "checkpoints").iterdir())
            if cut_short:
                break
        status = Child([sys.executable, "-m", "daemon", "status", "--json", f"--config={CONFIG}",
                        f"--set=checkpoint.dir={run_dir / 'checkpoints'}"], REPO).finish(0)  # fmt: skip
        report = json.loads("".join(status.lines))
        self.record("durability.sigkill", {
            "write_cut_short": cut_short,
            "checkpoints": len(report["checkpoints"]),
            "valid": sum(row["valid"] for row in report["checkpoints"]),
            "resume_from": report["resume_from"],
        })  # fmt: skip
        shutil.rmtree(run_dir)

    def raw_save(self, model: str, checkpoint: Path, repeats: int, pause_s: float) -> None:
        argv = [
            sys.executable,
            str(BENCH / "raw_save.py"),
            str(checkpoint),
            f"--repeats={repeats}",
            f"--pause={pause_s}",
        ]
        child = Child(argv, REPO).finish(0)
        for seconds in child.wait_for("raw_save")["seconds"]:
            self.record(f"raw_save.{model}_s", seconds)

    # -- 2, 4 and 5 for the ~100M-parameter model -------------------------------------------

    def big(self, rep: int, write: str) -> None:
        plan = self.plan
        run_dir = self.fresh_dir(f"big-{write}-{rep}")
        settings = {
            "model.hidden": BIG_HIDDEN, "checkpoint.every_steps": 0, "checkpoint.every_seconds": plan.big_save_every_s,
            "checkpoint.keep_last": 1, "checkpoint.async_save": write == "async", "log.level": "debug", **TINY_PROGRESS,
        }  # fmt: skip
        child = self.daemon(run_dir, settings)
        if write == "async":  # the stop comes while the last periodic save is being written
            last_save = child.wait_for("checkpoint_snapshot", nth=plan.big_async_saves)
        else:  # the stop comes with no save in progress
            last_save = child.wait_for("checkpoint_saved", kind="periodic", nth=plan.big_sync_saves)
        child.wait_for("progress", after=last_save)
        emergency = self.stop(child, step_s=statistics.median(child.step_intervals()))
        self.record("big.step_s", statistics.median(child.step_intervals()))
        self.record("checkpoint.big.bytes", emergency["bytes"])
        self.record(f"memory.big_{write}.max_rss", child.max_rss_bytes)
        if write == "async":
            self.record("emergency.big_writer_busy", emergency)
            first, *later = child.events("checkpoint_snapshot")
            self.record("stall.big.async_first_ms", first["stall_ms"])  # allocates the snapshot buffers
            for event in later:
                self.record("stall.big.async_ms", event["stall_ms"])
        else:
            self.record("emergency.big", emergency)
            for event in child.events("checkpoint_saved"):
                if event["kind"] == "periodic":
                    self.record("stall.big.sync_ms", event["duration_ms"])
            self.raw_save("big", newest_checkpoint(run_dir), plan.raw_repeats, RAW_PAUSE_S["big"])
        shutil.rmtree(run_dir)

    def big_plain(self) -> None:
        child = self.script(
            "plain_loop.py", f"--hidden={','.join(map(str, BIG_HIDDEN))}", f"--steps={self.plan.big_plain_steps}"
        )
        child.finish(0)
        self.record("memory.big_plain.max_rss", child.max_rss_bytes)

    # -- the run -----------------------------------------------------------------------------

    def run(self, log: Callable[[str], None]) -> None:
        for rep in range(self.plan.reps):
            shift = rep % len(THROUGHPUT)
            for contender in THROUGHPUT[shift:] + THROUGHPUT[:shift]:
                log(f"rep {rep + 1}/{self.plan.reps}: throughput {contender}")
                self.throughput(contender, rep)
            log(f"rep {rep + 1}/{self.plan.reps}: restarts")
            self.restarts(rep)
            if rep == 0:
                log("SIGKILL during a background write")
                self.sigkill_during_background_write()
            if rep < self.plan.contended_reps:
                for contender in CONTENDED[shift % len(CONTENDED):] + CONTENDED[:shift % len(CONTENDED)]:
                    log(f"rep {rep + 1}/{self.plan.reps}: shared machine, {contender}")
                    self.contended(contender, rep)
            if rep < self.plan.big_reps:
                for write in ("async", "sync") if rep % 2 == 0 else ("sync", "async"):
                    log(f"rep {rep + 1}/{self.plan.reps}: 100M model, {write} saves")
                    self.big(rep, write)
                log(f"rep {rep + 1}/{self.plan.reps}: 100M model, plain loop")
                self.big_plain()


def newest_checkpoint(run_dir: Path) -> Path:
    return max((run_dir / "checkpoints").glob("ckpt-*.pt"))  # names sort by global step


# -- figures and targets -------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(samples: dict[str, list]) -> tuple[dict, list[dict]]:
    def med(key: str) -> float:
        return statistics.median(samples[key])

    def field(key: str, name: str) -> list[float]:
        return [sample[name] for sample in samples[key]]

    figures: dict = {"throughput": {}, "emergency": {}, "restart": {}, "stall": {}, "memory": {}}
    for contender in THROUGHPUT:
        seconds = samples[f"throughput.{contender}.seconds"]
        figures["throughput"][contender] = {
            "seconds_per_epoch": spread(seconds),
            "steps_per_s": spread([600 / s for s in seconds]),
        }
    def paired(numerator: str, denominator: str) -> dict:
        """The ratio within each repetition, whose contenders ran within a minute of each other:
        the machine's slow swings cancel better than in a ratio of medians over the whole run."""
        over = zip(samples[f"throughput.{numerator}.seconds"], samples[f"throughput.{denominator}.seconds"])
        return spread([n / d for n, d in over])

    ratios = {
        "(c)/(a tuned)": paired("c", "a_tuned"),
        "(d)/(a tuned)": paired("d", "a_tuned"),
        "(d sync)/(a tuned)": paired("d_sync", "a_tuned"),
        "(c)/(a)": paired("c", "a"),
        "(c)/(c active)": paired("c", "c_active"),
        "(b)/(c)": paired("b", "c"),
    }
    figures["throughput"]["ratios"] = ratios
    figures["contended"] = {
        contender: {name: spread(field(f"contended.{contender}", name)) for name in ("quiet_s", "busy_s", "share")}
        for contender in CONTENDED
    }

    steps = {"mlp": 1 / med("throughput.c.train_steps_per_s"), "big": med("big.step_s")}
    for name, model in (("mlp", "mlp"), ("big", "big"), ("big_writer_busy", "big")):
        figures["emergency"][name] = {
            "durable_s": spread(field(f"emergency.{name}", "durable_s")),
            "exit_s": spread(field(f"emergency.{name}", "exit_s")),
            "waited_ms": spread(field(f"emergency.{name}", "waited_ms")),
            "save_ms": spread(field(f"emergency.{name}", "save_ms")),
            "step_s": steps[model],
            "raw_save_s": spread(samples[f"raw_save.{model}_s"]),
            "budget_s": steps[model] + 1.25 * med(f"raw_save.{model}_s"),
        }
    for name in ("daemon_fresh", "daemon_resume", "seed_fresh", "seed_resume"):
        figures["restart"][name] = spread(samples[f"restart.{name}"])
    for key in ("mlp.async", "mlp.sync", "big.async_first", "big.async", "big.sync"):
        figures["stall"][key] = spread(samples[f"stall.{key}_ms"])
    for name in ("a", "a_tuned", "b", "c", "c_active", "d", "d_sync", "big_plain", "big_async", "big_sync"):
        figures["memory"][name] = spread(samples[f"memory.{name}.max_rss"])
    snapshot = {"mlp": med("checkpoint.d.bytes"), "big": med("checkpoint.big.bytes")}
    figures["memory"]["snapshot_bytes"] = snapshot

    rss_limit = {
        "mlp": (1.1 * med("memory.a.max_rss") + snapshot["mlp"]) / 1e6,
        "big": (1.1 * med("memory.big_plain.max_rss") + snapshot["big"]) / 1e6,
    }
    emergency = figures["emergency"]
    targets = [
        ("(c)/(a tuned) s/epoch", ratios["(c)/(a tuned)"]["median"], "<=", 1.03),
        ("(d)/(a tuned) s/epoch", ratios["(d)/(a tuned)"]["median"], "<=", 1.05),
        ("(b)/(c) s/epoch", ratios["(b)/(c)"]["median"], ">=", 2.0),
        ("(c)/(c active) s/epoch, quiet: cpu_wait against libgomp's default", ratios["(c)/(c active)"]["median"], "<=", 1.03),
        ("(c) beside busy loops: share of its quiet throughput", figures["contended"]["c"]["share"]["median"], ">=", 0.35),
        (
            "MLP SIGTERM → durable, s (step + 1.25 × raw)",
            emergency["mlp"]["durable_s"]["median"],
            "<=",
            emergency["mlp"]["budget_s"],
        ),
        (
            "100M SIGTERM → durable, s (step + 1.25 × raw)",
            emergency["big"]["durable_s"]["median"],
            "<=",
            emergency["big"]["budget_s"],
        ),
        ("MLP SIGTERM → exit, s", emergency["mlp"]["exit_s"]["median"], "<", 1.0),
        (
            "launch → first resumed step, s (1.1 × seed's)",
            med("restart.daemon_resume"),
            "<=",
            1.1 * med("restart.seed_fresh"),
        ),
        ("100M async stall / sync save", med("stall.big.async_ms") / med("stall.big.sync_ms"), "<=", 0.15),
        ("peak RSS, MLP daemon (c), MB", med("memory.c.max_rss") / 1e6, "<=", rss_limit["mlp"]),
        ("peak RSS, MLP daemon (d), MB", med("memory.d.max_rss") / 1e6, "<=", rss_limit["mlp"]),
        ("peak RSS, 100M daemon async, MB", med("memory.big_async.max_rss") / 1e6, "<=", rss_limit["big"]),
    ]
    sigkill = samples["durability.sigkill"][0]
    figures["durability"] = sigkill
    # nan (a FAIL) when no SIGKILL landed inside a write: the check proved nothing
    invalid = sigkill["checkpoints"] - sigkill["valid"] if sigkill["write_cut_short"] else math.nan
    targets.append(("invalid checkpoints after SIGKILL inside a background write", invalid, "<=", 0))
    passed = {"<=": lambda v, limit: v <= limit, "<": lambda v, limit: v < limit, ">=": lambda v, limit: v >= limit}
    checks = [
        {"target": name, "value": value, "op": op, "limit": limit, "pass": passed[op](value, limit)}
        for name, value, op, limit in targets
    ]
    return figures, checks


# -- output --------------------------------------------------------------------------------

Table = tuple[str, list[str], list[list[str]]]  # title, column headers, rows


def mmm(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    """median (min–max)"""
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})"


def tables(figures: dict, checks: list[dict]) -> list[Table]:
    throughput = [
        [
            LABELS[c],
            mmm(figures["throughput"][c]["seconds_per_epoch"], digits=2),
            f"{figures['throughput'][c]['steps_per_s']['median']:.0f}",
        ]
        for c in THROUGHPUT
    ]
    throughput += [[f"ratio {name}", mmm(value), ""] for name, value in figures["throughput"]["ratios"].items()]
    emergency_labels = {
        "mlp": "MLP",
        "big": "100M, writer idle",
        "big_writer_busy": "100M, during a background save (waits for it)",
    }
    emergency = [
        [
            label,
            mmm(e["durable_s"]),
            mmm(e["exit_s"]),
            f"{e['step_s']:.3f}",
            mmm(e["raw_save_s"]),
            f"{e['budget_s']:.3f}",
        ]
        for name, label in emergency_labels.items()
        for e in [figures["emergency"][name]]
    ]
    restart_labels = {
        "daemon_fresh": "daemon, fresh",
        "daemon_resume": "daemon, resumed",
        "seed_fresh": "seed recipe, fresh",
        "seed_resume": "seed recipe, resumed",
    }
    restart = [[label, mmm(figures["restart"][name], digits=2)] for name, label in restart_labels.items()]
    stall = figures["stall"]
    stalls = [
        ["MLP (every 50 steps)", mmm(stall["mlp.async"], digits=1), mmm(stall["mlp.sync"], digits=1)],
        ["100M, first save of a process (allocates the snapshot)", mmm(stall["big.async_first"], digits=0), ""],
        ["100M, later saves", mmm(stall["big.async"], digits=0), mmm(stall["big.sync"], digits=0)],
    ]
    memory_labels = {
        "a": "(a) plain loop, MLP", "a_tuned": "(a tuned) plain loop, malloc tuned", "b": "(b) seed recipe",
        "c": "(c) daemon, default policy", "c_active": "(c active) daemon, cpu_wait active",
        "d": "(d) daemon, every 50 steps (async)", "d_sync": "(d sync) daemon, every 50 steps (sync)",
        "big_plain": "plain loop, 100M", "big_async": "daemon 100M, async saves", "big_sync": "daemon 100M, sync saves",
    }  # fmt: skip
    memory = [[label, mmm(figures["memory"][name], 1e-6, 0)] for name, label in memory_labels.items()]
    snapshot = figures["memory"]["snapshot_bytes"]
    memory.append(
        ["one snapshot (checkpoint size): MLP / 100M", f"{snapshot['mlp'] / 1e6:.1f} / {snapshot['big'] / 1e6:.0f}"]
    )
    verdicts = [
        [
            check["target"],
            f"{check['value']:.3f}",
            f"{check['op']} {check['limit']:.3f}",
            "PASS" if check["pass"] else "FAIL",
        ]
        for check in checks
    ]
    return [
        ("1. Throughput, one epoch (MNIST MLP, batch 100)", ["contender", "s/epoch", "steps/s"], throughput),
        (
            "2. Emergency checkpoint, s after SIGTERM",
            ["model", "durable", "exit", "one step", "raw save + fsync", "step + 1.25 × raw"],
            emergency,
        ),
        ("3. Restart, s from launch to the first completed step", ["process", "s"], restart),
        ("4. Periodic-save stall, ms the loop is blocked per save", ["model", "async", "sync"], stalls),
        ("5. Peak RSS, MB", ["process", "MB"], memory),
        (
            f"6. A shared machine: one epoch quiet, then beside {(os.cpu_count() or 1) + 1} busy loops",
            ["contender", "quiet s/epoch", "busy s/epoch", "share of quiet throughput"],
            [
                [LABELS[c], mmm(f["quiet_s"], digits=2), mmm(f["busy_s"], digits=2), mmm(f["share"], digits=2)]
                for c in CONTENDED
                for f in [figures["contended"][c]]
            ],
        ),
        ("Targets (on medians)", ["target", "value", "limit", ""], verdicts),
    ]


def as_text(table: Table) -> str:
    title, headers, rows = table
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [title, "  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def as_markdown(table: Table) -> str:
    title, headers, rows = table
    lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(info: dict) -> str:
    m = info["machine"]
    return (
        f"`{info['command']}`, {info['started']}, {info['wall_s']:.0f} s. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gb']} GB, Linux {m['kernel']}, Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads); {info['noise']}. Figures: median (min–max) over the runs; a ratio's are over the repetitions, each within one."
    )


def update_readme(block: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    begin, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    readme.write_text(text[:begin] + "\n" + block + "\n" + text[end:])


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def cpu_ticks() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(value) for value in stat.readline().split()[1:]]


def main() -> int:
    parser = argparse.ArgumentParser(description="The benchmark (README, 'Benchmark').")
    parser.add_argument("--quick", action="store_true", help="a smoke check: one repetition, fewer saves")
    parser.add_argument("--reps", type=int, help="repetitions of the MLP measurements")
    parser.add_argument("--big-reps", type=int, help="repetitions of the 100M-parameter measurements")
    parser.add_argument("--update-readme", action="store_true", help="write the tables into README.md")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()), help="room for ~5 GB of checkpoints"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    plan = Plan(**{**plan.__dict__, **{k: v for k, v in (("reps", args.reps), ("big_reps", args.big_reps)) if v}})

    sys.path.insert(0, str(REPO))
    from daemon.data import prepare_mnist

    started, ticks = time.time(), cpu_ticks()
    work = Path(tempfile.mkdtemp(prefix="trainer-bench-", dir=args.workdir))
    try:
        prepare_mnist(work / "data", download=False)
        bench = Bench(plan, work)
        bench.run(lambda message: print(f"[{time.time() - started:6.1f} s] {message}", file=sys.stderr, flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    spent = [after - before for before, after in zip(ticks, cpu_ticks())]
    steal = spent[7] / max(sum(spent), 1)  # /proc/stat: user nice system idle iowait irq softirq steal
    figures, checks = summarize(bench.samples)
    info = {
        "command": " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]]),
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="minutes"),
        "wall_s": round(time.time() - started, 1),
        "plan": plan.__dict__,
        "machine": machine(),
        "noise": f"load average {os.getloadavg()[0]:.2f} at the end, CPU steal {steal:.1%} during the run",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**info, "figures": figures, "targets": checks, "samples": bench.samples}, indent=2))
    print("\n\n".join([provenance(info), *map(as_text, tables(figures, checks))]))
    if args.update_readme:
        update_readme("\n\n".join([provenance(info), *map(as_markdown, tables(figures, checks))]))
    print(f"\nwritten: {args.out}" + (" and README.md" if args.update_readme else ""))
    return 0 if all(check["pass"] for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
