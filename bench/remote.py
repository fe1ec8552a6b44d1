"""The remote tier's benchmark: what `checkpoint.remote` costs the training, how fast the daemon
uploads, how long a stop takes to be durable in the remote, and how long a fresh machine takes to
resume from it.

    .venv/bin/python -m bench.remote [--quick] [--reps N] [--update-docs]

(from the repository root). The store is moto's S3 server (the one the remote tier's tests start),
in this process on 127.0.0.1: the daemons reach it over loopback through botocore as they would
reach S3, with the credentials of the environment (AWS_ACCESS_KEY_ID ... set here for every child).
It shares the machine's cores with the training, so what the tier costs here includes what the
server costs, and its speed is moto's, not a network's. Every daemon is a real process launched as
bench/run.py launches them (bench/processes.py), on real MNIST with the default MLP; contenders are
interleaved within each repetition (A B, then B A), ratios are taken within a repetition and their
median judged, figures are medians with min–max.

1. Training with the remote tier: one epoch of the default MLP saving every 50 steps
   (checkpoint.every_steps=50, every_seconds=0, asynchronously, log.level=debug for the
   `checkpoint_snapshot` stall events), s/epoch from `fresh_start` to `epoch_completed` as in
   bench/run.py's (d), with checkpoint.remote set and not set; and the loop's stall per save
   (`checkpoint_snapshot.stall_ms`) both ways. Uploads go on a thread of their own, newest first,
   never queued (a save made while one uploads replaces the one waiting: `upload_skipped`). Where
   the time goes: the CPU seconds of the daemon's process (its whole run) and of this process (the
   S3 server's threads, and the event reader the other runs have too), from getrusage. The target
   is the stall per save (the loop never waits for the network); the s/epoch ratio is shown beside
   it: each upload's CPU (botocore, the hash, the server here) is taken from the cores the training
   uses, which at 12 uploads in a few seconds is what this scenario measures.
2. Upload throughput: the commit (`RemoteTier.upload` after the lease's check, as the uploader
   makes it: hashing the file while it is put, then the manifest; on S3 two requests) of a
   checkpoint, against a plain s3fs `put_file` of the same file to the same server, both from this
   process, alternated (for the MLP one untimed put of each for the connection, then several
   pairs; for 100M one pair; nothing else running); the target is judged on the ratio within each
   repetition. Beside it, `upload_completed.mb_per_s` of the daemon's own uploads, of 1's runs and
   of 3's 100M runs, those made while training (whose CPU the uploader shares with the training's
   two threads) apart from those made once it was over (each run's final checkpoint; the 100M
   emergency one).
3. SIGTERM → emergency checkpoint durable in the remote: a run with no periodic saves is sent
   SIGUSR1 some steps in (an on-demand checkpoint, which is uploaded); once its `upload_completed`
   is logged the uploader is idle, and a SIGTERM at a random point of a later step stops the run.
   From the signal to the emergency checkpoint's `checkpoint_saved` (durable locally) and to its
   `upload_completed` (committed in the remote), and to the exit (which waits for the upload, up to
   checkpoint.remote_stop_timeout_seconds, raised here to 300 s so that a slow upload is measured
   rather than abandoned); for the MLP and for the ~100M-parameter model (model.hidden=[5600]*4, a
   1.2 GB checkpoint, with a plain put_file of its emergency checkpoint beside it). Judged against a
   30 s grace period (Kubernetes' default terminationGracePeriodSeconds, a GCE preemption notice).
4. A fresh machine: from the MLP run of 3 (its checkpoints local and committed in the remote), a
   launch to the first completed step (the first `progress` event, log.progress_every_seconds tiny)
   with an empty checkpoint.dir (the newest checkpoint is downloaded: `remote_resume`), with the run's
   checkpoint.dir copied back in place and the remote tier on, and the same with it off. Each is
   SIGKILLed at its first step; its lease.json is deleted before the next, as if it had released it.
   The MLP only: moto reads a whole object for each ranged GET, so the daemon's 8 MB-block download
   of the 100M model's 1.2 GB checkpoint would measure moto, for minutes.

Writes bench/results/remote.json and prints the tables with a PASS/FAIL per target; with
`--update-docs`, writes them into docs/benchmark.md too, between its `bench-remote:` markers
(bench/run.py's tables, between the `bench:` markers, are left alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.processes import BenchError, daemon, finish
from bench.report import DOCS, Table, as_markdown, as_text, cpu_ticks, mmm, provenance, run_info, spread, update_docs
from bench.scenarios import BIG_HIDDEN, MLP_WARMUP_STEPS, TINY_PROGRESS
from daemon.builtin.mnist_files import prepare_mnist
from daemon.ckpt.lease import Lease
from daemon.ckpt.remote import RemoteTier
from daemon.ops.child import START, TrainerChild, event_time

RESULTS = Path(__file__).resolve().parent / "results" / "remote.json"
DOCS_BEGIN = "<!-- bench-remote:begin"
DOCS_BEGIN_LINE = "<!-- bench-remote:begin: written by python -m bench.remote --update-docs -->"
DOCS_END = "<!-- bench-remote:end -->"

# moto accepts any credentials; the daemons find these through botocore's standard chain.
S3_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups off-cloud
}
BUCKET = "bench"
EVERY_50 = {"checkpoint.every_steps": 50, "checkpoint.every_seconds": 0, "log.level": "debug"}
# No periodic saves: the only checkpoints are the on-demand one (SIGUSR1) and the emergency one.
# A fixed waiting policy: with `auto` a busy machine may make the run hand over (a save of its own).
STOP_SETTINGS = {
    "checkpoint.every_steps": 0,
    "checkpoint.every_seconds": 0,
    "train.cpu_wait": "bounded",
    **TINY_PROGRESS,
}
STOP_TIMEOUT_S = 300  # checkpoint.remote_stop_timeout_seconds for the stops (default 20)
GRACE_S = 30.0  # the grace period the stops are judged against
BIG_WARMUP_STEPS = 3  # the 100M model's first steps are slow (allocations)
STALL = ("off", "on")
RESTART = ("remote_empty", "local_remote", "local_only")
UPLOADS = {  # the rows of R2
    "daemon": "daemon, every upload (`upload_completed.mb_per_s`)",
    "daemon_training": "… while training (MLP: R1's periodic checkpoints; 100M: the on-demand one of R3)",
    "daemon_after": "… once training was over (MLP: R1's final checkpoints; 100M: R3's emergency one)",
    "commit": "the commit (`RemoteTier.upload`), from the benchmark process",
    "plain": "plain s3fs `put_file` of the same file, from the benchmark process",
}


@dataclass(frozen=True)
class Plan:
    reps: int  # repetitions of every measurement
    plain_puts: int  # pairs of a commit and a plain put of the MLP checkpoint per repetition


FULL = Plan(reps=3, plain_puts=10)
QUICK = Plan(reps=1, plain_puts=10)


class S3:
    """moto's S3 server on 127.0.0.1 in this process, a bucket on it, and an s3fs filesystem on it
    for this process's own puts and looks."""

    def __init__(self) -> None:
        import fsspec
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.CRITICAL)  # a line a request, and moto's retried 500s
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.fs = fsspec.filesystem("s3", endpoint_url=self.url, skip_instance_cache=True)
        self.fs.mkdir(BUCKET)

    def settings(self, prefix: str) -> dict:
        return {"checkpoint.remote": f"s3://{BUCKET}/{prefix}", "checkpoint.remote_options": {"endpoint_url": self.url}}

    def remove(self, prefix: str) -> None:
        self.fs.invalidate_cache()
        if self.fs.exists(f"{BUCKET}/{prefix}"):
            self.fs.rm(f"{BUCKET}/{prefix}", recursive=True)

    def put_mb_per_s(self, path: Path, key: str) -> float:
        """A plain s3fs put_file of `path`, timed here; the object is deleted after."""
        started = time.perf_counter()
        self.fs.put_file(str(path), f"{BUCKET}/{key}")
        seconds = time.perf_counter() - started
        self.fs.rm_file(f"{BUCKET}/{key}")
        return path.stat().st_size / 1e6 / seconds

    def commits_and_puts(self, path: Path, prefix: str, pairs: int, warm: bool) -> dict[str, list[float]]:
        """MB/s of `pairs` commits of `path` into `prefix` (as the uploader makes them, under a lease,
        after the resume's listing) alternated with as many plain puts; `warm`: after one untimed of
        each (which opens the connections: a share of a small file's time, none of a large one's)."""
        tier = RemoteTier(f"s3://{BUCKET}/{prefix}", {"endpoint_url": self.url})
        lease = Lease(tier, 60.0)
        lease.acquire()
        tier.committed()
        speeds: dict[str, list[float]] = {"commit": [], "plain": []}
        for i in range(pairs + warm):
            started = time.perf_counter()
            lease.confirm_before_commit()
            tier.upload(path, f"ckpt-{i + 1:010d}-periodic.pt")
            commit = path.stat().st_size / 1e6 / (time.perf_counter() - started)
            plain = self.put_mb_per_s(path, f"{prefix}-plain/{i}")
            if i or not warm:
                speeds["commit"].append(commit)
                speeds["plain"].append(plain)
        lease.release()
        self.remove(prefix)
        return speeds

    def stop(self) -> None:
        self._server.stop()


class RemoteBench:
    def __init__(self, plan: Plan, work: Path, s3: S3) -> None:
        self.plan = plan
        self.work = work
        self.data = work / "data"
        self.s3 = s3
        self.samples: dict[str, list] = {}
        self.random = random.Random(0)

    def record(self, key: str, value: Any) -> None:
        self.samples.setdefault(key, []).append(value)

    def daemon(self, run_dir: Path, settings: dict) -> TrainerChild:
        return daemon(self.data, run_dir, settings)

    def fresh_dir(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    # -- 1 and 2. an epoch saving every 50 steps, remote tier on and off; plain puts --------

    def epoch(self, contender: str, rep: int, uploads: dict) -> None:
        run_dir = self.fresh_dir(f"epoch-{contender}-{rep}")
        prefix = f"epoch-{rep}"
        remote = self.s3.settings(prefix) if contender == "on" else {}
        before = cpu_seconds()
        child = finish(self.daemon(run_dir, {**EVERY_50, **remote}), 0)
        self.record(f"epoch.{contender}.cpu", {k: v - before[k] for k, v in cpu_seconds().items()})
        started = child.wait_for("fresh_start")
        seconds = event_time(child.wait_for("epoch_completed")) - event_time(started)
        self.record(f"epoch.{contender}.seconds", seconds)
        for event in child.events("checkpoint_snapshot"):
            self.record(f"epoch.{contender}.stall_ms", event["stall_ms"])
        if contender == "on":
            (final,) = child.events("checkpoint_saved", kind="final")
            final_path = Path(final["path"])
            completed = child.events("upload_completed")
            uploads.update(upload_speeds(completed, after_training=final_path.name), bytes=final["bytes"])
            self.record("epoch.on.uploads", {
                "saved": len(child.events("checkpoint_saved")),
                "completed": len(completed),
                "skipped": len(child.events("upload_skipped")),
                "failed": len(child.events("upload_failed")),
                "abandoned": len(child.events("upload_abandoned")),
            })  # fmt: skip
            self.s3.remove(prefix)
            uploads.update(self.s3.commits_and_puts(final_path, f"commit-mlp-{rep}", self.plan.plain_puts, warm=True))
        shutil.rmtree(run_dir)

    # -- 3. SIGTERM → durable in the remote -------------------------------------------------

    def stop(self, model: str, rep: int) -> tuple[Path, str]:
        """A run stopped by SIGTERM with the uploader idle; returns its run directory and prefix."""
        run_dir = self.fresh_dir(f"stop-{model}-{rep}")
        prefix = f"stop-{model}-{rep}"
        settings = {
            **STOP_SETTINGS, **self.s3.settings(prefix), "checkpoint.remote_stop_timeout_seconds": STOP_TIMEOUT_S,
            **({"model.hidden": BIG_HIDDEN, "checkpoint.keep_last": 1} if model == "big" else {}),
        }  # fmt: skip
        child = self.daemon(run_dir, settings)
        first = child.wait_for("progress")
        warmup = MLP_WARMUP_STEPS if model == "mlp" else BIG_WARMUP_STEPS
        child.wait_for("progress", where=lambda e: e["global_step"] >= first["global_step"] + warmup)
        child.signal(signal.SIGUSR1)  # an on-demand checkpoint, uploaded
        uploaded = child.wait_for("upload_completed", silence=600)
        step = child.wait_for("progress", after=uploaded)
        later = child.wait_for("progress", after=step)  # two steps after the upload: one step's length
        time.sleep(self.random.uniform(0, event_time(later) - event_time(step)))
        sent = child.signal(signal.SIGTERM)
        finish(child, 75)
        saved = child.wait_for("checkpoint_saved", kind="emergency", after=START)
        name = Path(saved["path"]).name
        if len(child.events("checkpoint_saved")) != 2:  # another would have kept the uploader busy
            raise BenchError(f"{model}: a save besides the on-demand and emergency ones:\n{child.output()[-3000:]}")
        committed = [e for e in child.events("upload_completed") if e["name"] == name]
        if not committed:
            raise BenchError(f"{model}: the emergency checkpoint was not uploaded:\n{child.output()[-3000:]}")
        self.record(f"stop.{model}", {
            "durable_local_s": event_time(saved) - sent,
            "durable_remote_s": event_time(committed[0]) - sent,
            "exit_s": child.exited_at - sent,
            "upload_ms": committed[0]["ms"],
            "bytes": committed[0]["bytes"],
            "failed": len(child.events("upload_failed")),
        })  # fmt: skip
        if model == "big":
            uploads = upload_speeds(child.events("upload_completed"), after_training=name)
            uploads.update(self.s3.commits_and_puts(Path(saved["path"]), f"commit-big-{rep}", 1, warm=False))
            self.record("upload.big", uploads)
            self.s3.remove(prefix)
            shutil.rmtree(run_dir)
        return run_dir, prefix

    # -- 4. a fresh machine ------------------------------------------------------------------

    def restart(self, contender: str, source: Path, prefix: str) -> None:
        """Launch → first step, resuming from what the stopped run `source` left (local, remote)."""
        run_dir = self.fresh_dir("restart")
        if contender != "remote_empty":
            shutil.copytree(source / "checkpoints", run_dir / "checkpoints")
        remote = self.s3.settings(prefix) if contender != "local_only" else {}
        child = self.daemon(run_dir, {**TINY_PROGRESS, **remote})
        first = child.wait_for("progress")
        child.kill()
        downloads = child.events("remote_resume")
        if not child.events("resumed") or bool(downloads) != (contender == "remote_empty"):
            raise BenchError(f"{contender}: not the resume expected:\n{child.output()[-3000:]}")
        self.record(f"restart.{contender}", event_time(first) - child.launched)
        if downloads:
            self.record("restart.download_ms", downloads[0]["ms"])
        if remote:  # as if the killed run had released its lease
            self.s3.fs.rm_file(f"{BUCKET}/{prefix}/lease.json")
        shutil.rmtree(run_dir)

    # -- the run -----------------------------------------------------------------------------

    def run(self, log: Callable[[str], None]) -> None:
        for rep in range(self.plan.reps):
            uploads: dict = {}
            for contender in STALL if rep % 2 == 0 else STALL[::-1]:
                log(f"rep {rep + 1}/{self.plan.reps}: an epoch saving every 50 steps, remote tier {contender}")
                self.epoch(contender, rep, uploads)
            self.record("upload.mlp", uploads)
            log(f"rep {rep + 1}/{self.plan.reps}: MLP, SIGTERM")
            source, prefix = self.stop("mlp", rep)
            shift = rep % len(RESTART)
            for contender in RESTART[shift:] + RESTART[:shift]:
                log(f"rep {rep + 1}/{self.plan.reps}: launch → first resumed step, {contender}")
                self.restart(contender, source, prefix)
            self.s3.remove(prefix)
            shutil.rmtree(source)
            log(f"rep {rep + 1}/{self.plan.reps}: 100M model, SIGTERM")
            self.stop("big", rep)


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) so far of this process (the S3 server's threads, the event readers)
    and of its reaped children (the daemons)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"bench_s": own.ru_utime + own.ru_stime, "daemon_s": children.ru_utime + children.ru_stime}


def upload_speeds(completed: list[dict], after_training: str) -> dict[str, list[float]]:
    """MB/s of each `upload_completed`: all, those while training, and that of `after_training`."""
    return {
        "daemon": [e["mb_per_s"] for e in completed],
        "daemon_training": [e["mb_per_s"] for e in completed if e["name"] != after_training],
        "daemon_after": [e["mb_per_s"] for e in completed if e["name"] == after_training],
    }


# -- figures, targets, tables ----------------------------------------------------------------


def summarize(samples: dict[str, list]) -> tuple[dict, list[dict]]:
    def field(key: str, name: str) -> list[float]:
        return [sample[name] for sample in samples[key]]

    seconds = {contender: samples[f"epoch.{contender}.seconds"] for contender in STALL}
    counts = samples["epoch.on.uploads"]
    figures: dict = {
        "epoch": {
            **{
                c: {
                    "seconds": spread(seconds[c]),
                    "stall_ms": spread(samples[f"epoch.{c}.stall_ms"]),
                    **{name: spread(field(f"epoch.{c}.cpu", name)) for name in ("daemon_s", "bench_s")},
                }
                for c in STALL
            },
            "ratio": spread([on / off for on, off in zip(seconds["on"], seconds["off"], strict=True)]),
            "uploads_per_run": {name: spread([count[name] for count in counts]) for name in counts[0]},
        }
    }
    upload: dict = {}
    for model in ("mlp", "big"):
        reps = samples[f"upload.{model}"]
        upload[model] = {
            **{key: spread([v for rep in reps for v in rep[key]]) for key in UPLOADS},
            "ratio": spread([statistics.median(rep["commit"]) / statistics.median(rep["plain"]) for rep in reps]),
            "daemon_ratio": spread(
                [statistics.median(rep["daemon"]) / statistics.median(rep["plain"]) for rep in reps]
            ),
        }
    upload["mlp"]["bytes"] = statistics.median(rep["bytes"] for rep in samples["upload.mlp"])
    upload["big"]["bytes"] = statistics.median(field("stop.big", "bytes"))
    figures["upload"] = upload
    figures["stop"] = {
        model: {
            name: spread(field(f"stop.{model}", name))
            for name in ("durable_local_s", "durable_remote_s", "exit_s", "upload_ms", "failed")
        }
        for model in ("mlp", "big")
    }
    figures["restart"] = {contender: spread(samples[f"restart.{contender}"]) for contender in RESTART}
    figures["restart"]["download_ms"] = spread(samples["restart.download_ms"])

    targets = [
        (
            "(remote tier on)/(off) loop stall per periodic save, MLP saving every 50 steps",
            figures["epoch"]["on"]["stall_ms"]["median"] / figures["epoch"]["off"]["stall_ms"]["median"],
            "<=",
            1.05,
        ),
        ("upload MB/s, commit / plain s3fs put_file, MLP checkpoint", upload["mlp"]["ratio"]["median"], ">=", 0.9),
        ("upload MB/s, commit / plain s3fs put_file, 100M checkpoint", upload["big"]["ratio"]["median"], ">=", 0.9),
        ("MLP SIGTERM → durable in the remote, s", figures["stop"]["mlp"]["durable_remote_s"]["median"], "<=", GRACE_S),
        (
            "100M SIGTERM → durable in the remote, s",
            figures["stop"]["big"]["durable_remote_s"]["median"],
            "<=",
            GRACE_S,
        ),
    ]
    passed = {"<=": lambda v, limit: v <= limit, ">=": lambda v, limit: v >= limit}
    checks = [
        {"target": name, "value": value, "op": op, "limit": limit, "pass": passed[op](value, limit)}
        for name, value, op, limit in targets
    ]
    return figures, checks


def tables(figures: dict, checks: list[dict]) -> list[Table]:
    epoch, upload, stop, restart = figures["epoch"], figures["upload"], figures["stop"], figures["restart"]
    counts = epoch["uploads_per_run"]
    per_run = " / ".join(f"{counts[name]['median']:g}" for name in ("saved", "completed", "skipped", "failed"))
    mlp_mb, big_mb = upload["mlp"]["bytes"] / 1e6, upload["big"]["bytes"] / 1e6
    verdicts = [
        [check["target"], f"{check['value']:.3f}", f"{check['op']} {check['limit']:.3f}", "PASS" if check["pass"] else "FAIL"]
        for check in checks
    ]  # fmt: skip
    return [
        (
            "R1. One epoch of the MLP saving every 50 steps (async), remote tier off and on",
            [
                "contender",
                "s/epoch",
                "stall per save, ms",
                "CPU s, the daemon's process (whole run)",
                "CPU s, the benchmark's process (the S3 server, the event reader)",
            ],
            [
                [
                    f"remote tier {c}",
                    mmm(e["seconds"], digits=2),
                    mmm(e["stall_ms"], digits=1),
                    mmm(e["daemon_s"], digits=1),
                    mmm(e["bench_s"], digits=1),
                ]
                for c in STALL
                for e in [epoch[c]]
            ]
            + [
                ["ratio on/off", mmm(epoch["ratio"]), "", "", ""],
                ["checkpoints saved / uploaded / skipped / failed, per run with the tier on", per_run, "", "", ""],
            ],
        ),
        (
            "R2. Upload throughput, MB/s",
            ["upload", f"MLP checkpoint ({mlp_mb:.1f} MB)", f"100M checkpoint ({big_mb:.0f} MB)"],
            [
                [label, mmm(upload["mlp"][key], digits=1), mmm(upload["big"][key], digits=1)]
                for key, label in UPLOADS.items()
            ]
            + [
                ["ratio commit / plain", mmm(upload["mlp"]["ratio"]), mmm(upload["big"]["ratio"])],
                [
                    "ratio daemon (every upload) / plain",
                    mmm(upload["mlp"]["daemon_ratio"]),
                    mmm(upload["big"]["daemon_ratio"]),
                ],
            ],
        ),
        (
            "R3. Emergency checkpoint, s after SIGTERM (the uploader idle)",
            ["model", "durable locally", "durable in the remote", "exit", "its upload, s", "failed upload attempts"],
            [
                [
                    label,
                    mmm(s["durable_local_s"]),
                    mmm(s["durable_remote_s"]),
                    mmm(s["exit_s"]),
                    mmm(s["upload_ms"], 1e-3),
                    f"{s['failed']['max']:g}",
                ]
                for model, label in (("mlp", "MLP"), ("big", "100M"))
                for s in [stop[model]]
            ],
        ),
        (
            "R4. A fresh machine: s from launch to the first resumed step (MLP)",
            ["checkpoint.dir", "s"],
            [
                [
                    f"empty: the newest checkpoint downloaded from the remote ({mmm(restart['download_ms'], digits=0)} ms)",
                    mmm(restart["remote_empty"], digits=2),
                ],
                ["intact, remote tier on", mmm(restart["local_remote"], digits=2)],
                ["intact, remote tier off", mmm(restart["local_only"], digits=2)],
            ],
        ),
        ("Targets (on medians)", ["target", "value", "limit", ""], verdicts),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.remote", description="The remote tier's benchmark.")
    parser.add_argument("--quick", action="store_true", help="a smoke check: one repetition")
    parser.add_argument("--reps", type=int, help="repetitions")
    parser.add_argument("--update-docs", action="store_true", help="write the tables into docs/benchmark.md too")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()), help="room for ~3 GB of checkpoints"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.reps:
        plan = Plan(**{**plan.__dict__, "reps": args.reps})

    os.environ.update(S3_ENVIRONMENT)  # for the children (TrainerChild passes the environment on) and s3fs here
    started, ticks = time.time(), cpu_ticks()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trainer-bench-remote-", dir=args.workdir))
    s3 = None
    try:
        prepare_mnist(work / "data", download=False)
        s3 = S3()
        bench = RemoteBench(plan, work, s3)
        bench.run(lambda message: print(f"[{time.time() - started:6.1f} s] {message}", file=sys.stderr, flush=True))
    finally:
        if s3 is not None:
            s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    figures, checks = summarize(bench.samples)
    info = run_info("bench.remote", started, ticks, plan)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**info, "figures": figures, "targets": checks, "samples": bench.samples}, indent=2))
    print("\n\n".join([provenance(info), *map(as_text, tables(figures, checks))]))
    if args.update_docs:
        block = "\n\n".join([provenance(info), *map(as_markdown, tables(figures, checks))])
        update_docs(block, begin_marker=DOCS_BEGIN, begin_line=DOCS_BEGIN_LINE, end_marker=DOCS_END)
    print(f"\nwritten: {args.out}" + (f" and {DOCS.relative_to(DOCS.parents[1])}" if args.update_docs else ""))
    return 0 if all(check["pass"] for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
