"""`trainer run` / `trainer status`: parse arguments, load the config, configure logging,
run, and turn the outcome into a documented exit code (the one exception boundary).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from daemon import logs
from daemon.allocator import keep_freed_memory
from daemon.config import Config
from daemon.crashloop import CrashLoopGuard
from daemon.errors import ConfigError, ExitCode, TrainerError
from daemon.signals import SignalRecorder
from daemon.systemd import Notifier
from daemon.threads import configure_before_torch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="Signal-aware PyTorch training daemon.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "train, resuming from the newest valid checkpoint"),
        ("status", "list the checkpoints and the one a run would resume from"),
        ("verify", "run the config twice for a few steps, once interrupted by real signals; compare bitwise"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", default="config.yaml", help="YAML config file (default: %(default)s)")
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
            help="override a setting (value parsed as YAML); repeatable",
        )  # fmt: skip
    commands.choices["status"].add_argument("--json", action="store_true", help="print JSON")
    commands.choices["verify"].add_argument("--steps", type=int, default=200, help="the horizon in steps (default: %(default)s)")
    commands.choices["verify"].add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(signals: SignalRecorder, argv: list[str] | None = None) -> int:
    """`signals`: installed by the entry point (daemon/entry.py) before this module was imported."""
    args = _parser().parse_args(argv)
    try:
        cfg = Config.from_yaml(args.config, args.overrides)
    except ConfigError as exc:
        logs.configure()
        logs.get().error(exc.event, message=str(exc), exit_code=int(exc.exit_code))
        return exc.exit_code
    logs.configure(cfg.log.level, cfg.log.format)
    if args.command == "status":
        return _status(cfg, as_json=args.json)
    if args.command == "verify":
        return _verify(args)
    return _run(cfg, signals, sys.argv[1:] if argv is None else argv)


def _run(cfg: Config, signals: SignalRecorder, argv: list[str]) -> int:
    import contextlib
    from pathlib import Path

    log = logs.get()
    notifier = Notifier()
    threads = configure_before_torch(cfg.train.cpu_threads, cfg.train.cpu_wait)
    keep_freed_memory()  # before torch allocates anything
    try:
        if cfg.dist.launches and "RANK" not in os.environ:  # not yet one of the ranks: start them
            from daemon.launch import launch

            return launch(cfg.dist, argv, signals, notifier)
        # The checkpoint directory is rank 0's (or the single process's) alone.
        writer = os.environ.get("RANK", "0") == "0"
        with CrashLoopGuard(Path(cfg.checkpoint.dir)) if writer else contextlib.nullcontext():  # before torch: a crash importing it counts
            import torch

            from daemon.trainer import Trainer  # imports torch: after the signal handlers are in place

            torch.set_num_threads(threads)  # as already in force, unless a script imported torch first
            return Trainer(cfg, signals, notifier).run()
    except TrainerError as exc:
        log.error(exc.event, message=str(exc), exit_code=int(exc.exit_code), **exc.fields)
        return exc.exit_code
    except Exception:
        log.exception("crashed", exit_code=int(ExitCode.FAILURE))
        return ExitCode.FAILURE


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from daemon.verify import verify

    if args.steps < 4:
        logs.get().error("usage_error", message="--steps must be at least 4: three interruptions and a step between each")
        return ExitCode.USAGE
    try:
        return verify(Path(args.config), args.overrides, args.steps, as_json=args.json)
    except TrainerError as exc:
        logs.get().error(exc.event, message=str(exc), exit_code=int(exc.exit_code))
        return exc.exit_code


def _status(cfg: Config, as_json: bool) -> int:
    from pathlib import Path

    from daemon.checkpoint import CheckpointStore
    from daemon.lock import describe, holder

    entries = CheckpointStore(Path(cfg.checkpoint.dir), cfg.checkpoint.keep_last).scan()
    running = holder(Path(cfg.checkpoint.dir))
    resume = next((entry for entry in entries if entry.valid), None)
    rows = [
        {
            "path": str(entry.path),
            "kind": entry.kind,
            "epoch": entry.state["epoch"] if entry.valid else None,
            "step_in_epoch": entry.state["step_in_epoch"] if entry.valid else None,
            "global_step": entry.global_step,
            "bytes": entry.bytes,
            "valid": entry.valid,
            "reason": entry.reason,
        }
        for entry in entries
    ]
    report = {
        "checkpoint_dir": cfg.checkpoint.dir,
        "run_in_progress": running is not None,
        "run_pid": running or None,
        "checkpoints": rows,
        "resume_from": str(resume.path) if resume else None,
        "epochs": cfg.train.epochs,
        "complete": bool(resume and resume.state["epoch"] >= cfg.train.epochs),
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return ExitCode.COMPLETE
    print(f"checkpoints in {report['checkpoint_dir']}:")
    for row in rows:
        where = f"epoch {row['epoch']} step {row['step_in_epoch']}" if row["valid"] else f"INVALID: {row['reason']}"
        print(f"  {row['path']}  {row['kind']:<9}  step {row['global_step']:>8}  {row['bytes']:>10} B  {where}")
    if not rows:
        print("  (none)")
    if running is not None:
        print(f"a run holds this directory ({describe(running)})")
    if resume:
        state = "complete" if report["complete"] else f"at epoch {resume.state['epoch']}/{cfg.train.epochs}"
        print(f"a run resumes from {resume.path} ({state})")
    else:
        print("a run starts afresh")
    return ExitCode.COMPLETE

