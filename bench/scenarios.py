"""The benchmark's scenarios: each runs its contenders as real processes and records samples."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.processes import CONFIG, REPO, PeakRSS, daemon, finish, script, step_s
from daemon.ops.child import START, TrainerChild, event_time

BIG_HIDDEN = [5600, 5600, 5600, 5600]  # 98.5M parameters
TINY_PROGRESS = {"log.progress_every_seconds": 0.001}  # a `progress` event after every step
MLP_WARMUP_STEPS = 100  # past the start-up: its first steps and last full garbage collections (~0.1-0.2 s)
SIGKILL_ATTEMPTS = 5  # tries at landing a SIGKILL inside a background write
# Before each raw save, as the daemon's come after training (raw_save.py): back to back, reusing the
# page cache the previous save freed, they took ~15% (MLP) to ~60% (100M) less time here.
RAW_PAUSE_S = {"mlp": 1, "big": 5}
# glibc's malloc set as the daemon sets it at start (daemon/service/allocator.py), for the fair floor (a tuned).
TUNED_ALLOCATOR = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"}
# checkpoint.max_overhead's contenders: the interval chosen from measurements, against (c)'s epoch.
BUDGETS = {"d_budget_1": 0.01, "d_budget_2": 0.02, "d_budget_5": 0.05}
THROUGHPUT = ("a", "a_tuned", "b", "c", "c_active", "d", "d_sync", "c_1t", "d_1t", *BUDGETS)
TASK = ("cnn_daemon", "cnn_plain")  # examples/mnist_cnn.yaml through the daemon; plain_cnn.py
EXAMPLE_CONFIG = REPO / "examples" / "mnist_cnn.yaml"
CONTENDED = ("c", "c_active", "a_tuned")  # each quiet, then beside cores + 1 busy loops
DAEMON_POLICIES: dict[str, dict] = {
    "c": {},
    "c_active": {"train.cpu_wait": "active"},  # libgomp's own waiting, the daemon's default before train.cpu_wait
    "d": {"checkpoint.every_steps": 50, "log.level": "debug"},  # debug: the `checkpoint_snapshot` stall events
    "d_sync": {"checkpoint.every_steps": 50, "checkpoint.async_save": False},
    # One training thread, so the background writer has a core of its own: what the saves of (d)
    # cost when they do not compete with the training's threads for the cores.
    "c_1t": {"train.cpu_threads": 1},
    "d_1t": {"checkpoint.every_steps": 50, "train.cpu_threads": 1},
    **{contender: {"checkpoint.max_overhead": budget} for contender, budget in BUDGETS.items()},
}
RANKS = 2
# Both sides of the several-ranks comparison run one thread per rank (torchrun's default), no checkpoints.
DDP_DAEMON = {
    "dist.nproc_per_node": RANKS,
    "train.cpu_threads": 1,
    "checkpoint.every_steps": 0,
    "checkpoint.every_seconds": 0,
}
DDP = ("ddp_plain", "ddp_agreement", "ddp_daemon")
AGREEMENT_ROUNDS = 3  # plain_ddp.py --agreement: epochs, each with fresh copies of the model


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
    task_reps: int  # repetitions of the example CNN against its plain loop
    ddp_reps: int  # repetitions of the two-rank measurements


FULL = Plan(
    reps=9, big_reps=2, big_save_every_s=8, big_async_saves=3, big_sync_saves=2, raw_repeats=3, big_plain_steps=6,
    contended_reps=3, task_reps=3, ddp_reps=5,
)  # fmt: skip
QUICK = Plan(
    reps=1, big_reps=1, big_save_every_s=8, big_async_saves=2, big_sync_saves=1, raw_repeats=1, big_plain_steps=3,
    contended_reps=1, task_reps=1, ddp_reps=1,
)  # fmt: skip


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

    def daemon(self, run_dir: Path, settings: dict) -> TrainerChild:
        return daemon(self.data, run_dir, settings)

    def script(self, name: str, *args: str, env: dict | None = None) -> TrainerChild:
        return script(self.data, name, *args, env=env)

    def fresh_dir(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    # -- 1. throughput (and the seed's fresh start, and memory) -----------------------------

    def one_epoch(self, contender: str, rep: int) -> tuple[TrainerChild, float]:
        """A plain loop's or the daemon's one-epoch run, finished; and the seconds of its epoch."""
        if contender in ("a", "a_tuned"):
            child = finish(self.script("plain_loop", env=TUNED_ALLOCATOR if contender == "a_tuned" else None), 0)
            started = child.wait_for("train_started")
        else:
            run_dir = self.fresh_dir(f"{contender}-{rep}")
            child = finish(self.daemon(run_dir, DAEMON_POLICIES[contender]), 0)
            shutil.rmtree(run_dir)
            started = child.wait_for("fresh_start")
        return child, event_time(child.wait_for("epoch_completed")) - event_time(started)

    def throughput(self, contender: str, rep: int) -> None:
        if contender == "b":
            self.seed_checkpoint(rep).unlink(missing_ok=True)
            child = finish(self.script("seed_recipe", f"--checkpoint={self.seed_checkpoint(rep)}"), 0)
            started = child.wait_for("train_started")
            self.record("restart.seed_fresh", event_time(child.wait_for("first_step")) - child.launched)
            seconds = event_time(child.wait_for("epoch_completed")) - event_time(started)
        else:
            child, seconds = self.one_epoch(contender, rep)
        if contender in DAEMON_POLICIES:
            (completed,) = child.events("epoch_completed")
            self.record(f"throughput.{contender}.train_steps_per_s", completed["steps_per_s"])
            self.record(f"checkpoint.{contender}.bytes", max(e["bytes"] for e in child.events("checkpoint_saved")))
            if contender == "d":
                for event in child.events("checkpoint_snapshot"):
                    self.record("stall.mlp.async_ms", event["stall_ms"])
            if contender == "d_sync":
                for event in child.events("checkpoint_saved"):
                    if event["kind"] == "periodic":
                        self.record("stall.mlp.sync_ms", event["duration_ms"])
            if contender in BUDGETS:
                policy = child.events("save_policy")[-1]  # the interval in force at the epoch's end
                saves = len(child.events("checkpoint_saved", kind="periodic"))
                self.record(f"budget.{contender}", {**policy, "periodic_saves": saves})
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

    # -- 7. a task of one's own: the example CNN against the plain loop written for it -------

    def task(self, contender: str, rep: int) -> None:
        if contender == "cnn_plain":
            child = finish(self.script("plain_cnn"), 0)
            started = child.wait_for("train_started")
        else:
            run_dir = self.fresh_dir(f"{contender}-{rep}")
            child = finish(daemon(self.data, run_dir, {}, config=EXAMPLE_CONFIG), 0)
            shutil.rmtree(run_dir)
            started = child.wait_for("fresh_start")
        self.record(f"task.{contender}.seconds", event_time(child.wait_for("epoch_completed")) - event_time(started))

    def seed_checkpoint(self, rep: int) -> Path:
        return self.work / f"seed-{rep}.pt"

    # -- 2 and 3. restart and emergency, MLP ------------------------------------------------

    def restarts(self, rep: int) -> None:
        seed = self.script("seed_recipe", f"--checkpoint={self.seed_checkpoint(rep)}", "--epochs=2")
        seed.wait_for("train_started", epoch=1)  # it did resume
        self.record("restart.seed_resume", event_time(seed.wait_for("first_step")) - seed.launched)
        seed.signal(signal.SIGKILL)
        finish(seed, -signal.SIGKILL)
        self.seed_checkpoint(rep).unlink()

        run_dir = self.fresh_dir(f"restart-{rep}")
        for phase in ("fresh", "resume"):
            child = self.daemon(run_dir, TINY_PROGRESS)
            first = child.wait_for("progress")
            self.record(f"restart.daemon_{phase}", event_time(first) - child.launched)
            if phase == "resume":
                child.wait_for("resumed", after=START)  # it did resume, not start afresh (logged before progress)
            child.wait_for("progress", global_step=first["global_step"] + MLP_WARMUP_STEPS)
            self.record("emergency.mlp", self.stop(child, step_s=0.01))
        self.raw_save("mlp", newest_checkpoint(run_dir), self.plan.raw_repeats + 2, RAW_PAUSE_S["mlp"])
        shutil.rmtree(run_dir)

    def stop(self, child: TrainerChild, step_s: float) -> dict:
        """SIGTERM at a random point within the next step; the emergency checkpoint's timings."""
        time.sleep(self.random.uniform(0, step_s))
        sent = child.signal(signal.SIGTERM)
        finish(child, 75)
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
            child.signal(signal.SIGKILL)
            finish(child, -signal.SIGKILL)
            cut_short = any(path.name.startswith(".tmp-ckpt-") for path in (run_dir / "checkpoints").iterdir())
            if cut_short:
                break
        status = TrainerChild.cli(
            "status", "--json", f"--config={CONFIG}", f"--set=checkpoint.dir={run_dir / 'checkpoints'}", cwd=REPO
        )
        finish(status, 0)
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
            "-m",
            "bench.raw_save",
            str(checkpoint),
            f"--repeats={repeats}",
            f"--pause={pause_s}",
        ]
        child = finish(TrainerChild(argv, REPO), 0)
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
        emergency = self.stop(child, step_s=step_s(child))
        self.record("big.step_s", step_s(child))
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
            "plain_loop", f"--hidden={','.join(map(str, BIG_HIDDEN))}", f"--steps={self.plan.big_plain_steps}"
        )
        finish(child, 0)
        self.record("memory.big_plain.max_rss", child.max_rss_bytes)

    def ddp_epoch(self, contender: str) -> None:
        """One epoch of two ranks: the daemon (its launcher starts them) or bench.plain_ddp
        under torchrun; or (ddp_agreement) the agreement's cost, plain_ddp.py's side-by-side measure."""
        if contender == "ddp_agreement":
            child = self.plain_ddp("--agreement", f"--epochs={AGREEMENT_ROUNDS}")
            ratios = [e["agreement_s"] / e["plain_s"] for e in child.events("agreement_measured")]
            self.record("ddp.agreement_percent", 100 * (max(ratios) - 1))  # the costlier rank's
            return
        if contender == "ddp_daemon":
            run_dir = self.fresh_dir("ddp")
            child = self.daemon(run_dir, DDP_DAEMON)
            peaks = PeakRSS(child.wait_for("ranks_started")["pids"])
            finish(child, 0)
            seconds = [child.wait_for("epoch_completed", rank=rank, after=START)["seconds"] for rank in range(RANKS)]
            rss = peaks.stop()
        else:
            child = self.plain_ddp()
            seconds = [e["seconds"] for e in child.events("epoch_completed")]
            rss = [e["bytes"] for e in child.events("peak_rss")]
        self.record(f"ddp.{contender}.seconds", max(seconds))  # the slower rank's: the group's epoch
        self.record(f"ddp.{contender}.max_rss", max(rss))

    def plain_ddp(self, *extra: str) -> TrainerChild:
        argv = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}", "-m", "bench.plain_ddp"]
        child = TrainerChild(
            [sys.executable, *argv, f"--data-root={self.data}", *extra], REPO, {"OMP_NUM_THREADS": "1"}
        )
        return finish(child, 0)

    def ddp_stop(self) -> None:
        """SIGTERM to the daemon's launcher at a random point of a step, 50 steps in: until the
        emergency checkpoint is durable (rank 0's `checkpoint_saved`), against a raw save of it."""
        run_dir = self.fresh_dir("ddp")
        child = self.daemon(run_dir, {**DDP_DAEMON, **TINY_PROGRESS})
        first = child.wait_for("progress")
        child.wait_for("progress", where=lambda e: e["global_step"] >= first["global_step"] + 50)
        time.sleep(self.random.uniform(0, 0.01))
        sent = child.signal(signal.SIGTERM)
        finish(child, 75)
        saved = child.wait_for("checkpoint_saved", kind="emergency", after=START)
        steps = [cost["step_ms_mean"] / 1e3 for cost in child.events("agreement_cost")]
        self.record("ddp.stop", {"durable_s": event_time(saved) - sent, "step_s": max(steps), "bytes": saved["bytes"]})
        self.raw_save("ddp", Path(saved["path"]), repeats=1, pause_s=RAW_PAUSE_S["mlp"])

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
                for contender in CONTENDED[shift % len(CONTENDED) :] + CONTENDED[: shift % len(CONTENDED)]:
                    log(f"rep {rep + 1}/{self.plan.reps}: shared machine, {contender}")
                    self.contended(contender, rep)
            if rep < self.plan.task_reps:
                for contender in TASK if rep % 2 == 0 else TASK[::-1]:
                    log(f"rep {rep + 1}/{self.plan.reps}: example CNN, {contender}")
                    self.task(contender, rep)
            if rep < self.plan.big_reps:
                for write in ("async", "sync") if rep % 2 == 0 else ("sync", "async"):
                    log(f"rep {rep + 1}/{self.plan.reps}: 100M model, {write} saves")
                    self.big(rep, write)
                log(f"rep {rep + 1}/{self.plan.reps}: 100M model, plain loop")
                self.big_plain()
            if rep < self.plan.ddp_reps:
                for contender in DDP[rep % len(DDP) :] + DDP[: rep % len(DDP)]:
                    log(f"rep {rep + 1}/{self.plan.reps}: two ranks, {contender}")
                    self.ddp_epoch(contender)
                log(f"rep {rep + 1}/{self.plan.reps}: two ranks, SIGTERM to the launcher")
                self.ddp_stop()


def newest_checkpoint(run_dir: Path) -> Path:
    return max((run_dir / "checkpoints").glob("ckpt-*.pt"))  # names sort by global step
