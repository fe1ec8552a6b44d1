"""`trainer run` / `trainer status`: parse arguments, load the config, configure logging,
run, and turn the outcome into a documented exit code (the one exception boundary).
"""

from __future__ import annotations

import argparse
import os
import sys

from daemon import events
from daemon.ckpt.crashloop import CrashLoopGuard
from daemon.config.sections import Config
from daemon.errors import ConfigError, ExitCode, TrainerError
from daemon.service import logs
from daemon.service.allocator import keep_freed_memory
from daemon.service.contention import CpuSampler
from daemon.service.notify import Notifier
from daemon.service.signals import SignalRecorder
from daemon.service.threads import configure_before_torch, hand_over


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="Signal-aware PyTorch training daemon.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "train, resuming from the newest valid checkpoint"),
        ("status", "list the checkpoints and the one a run would resume from"),
        ("verify", "run the config twice for a few steps, once interrupted by real signals; compare bitwise"),
        ("plot", "draw the metrics history of the run (or of RUN_DIRs, overlaid) to a PNG"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", default="config.yaml", help="YAML config file (default: %(default)s)")
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override a setting (value parsed as YAML); repeatable",
        )
    commands.choices["status"].add_argument("--json", action="store_true", help="print JSON")
    commands.choices["verify"].add_argument(
        "--steps", type=int, default=200, help="the horizon in steps (default: %(default)s)"
    )
    commands.choices["verify"].add_argument("--json", action="store_true", help="print the report as JSON")
    commands.choices["plot"].add_argument(
        "--out", default="metrics.png", help="the PNG to write (default: %(default)s)"
    )
    commands.choices["plot"].add_argument(
        "run_dirs",
        nargs="*",
        metavar="RUN_DIR",
        help="checkpoint directories to draw (default: the config's checkpoint.dir)",
    )
    return parser


def main(signals: SignalRecorder, argv: list[str] | None = None, started: CpuSampler | None = None) -> int:
    """`signals`: installed by the entry point (daemon/entry.py) before this module was imported;
    `started`: its look at the machine's CPUs (None: not the `trainer` command's own process)."""
    args = _parser().parse_args(argv)
    try:
        cfg = Config.from_yaml(args.config, args.overrides)
    except ConfigError as exc:
        logs.configure()
        return exc.report()
    logs.configure(cfg.log.level, cfg.log.format)
    if args.command == "status":
        return _status(cfg, as_json=args.json)
    if args.command == "verify":
        return _verify(args)
    if args.command == "plot":
        return _plot(cfg, args)
    return _run(cfg, signals, sys.argv[1:] if argv is None else argv, started)


def _run(cfg: Config, signals: SignalRecorder, argv: list[str], started: CpuSampler | None) -> int:
    import contextlib
    from pathlib import Path

    notifier = Notifier()
    cpu = configure_before_torch(cfg.train.cpu_threads, cfg.train.cpu_wait, started)
    keep_freed_memory()  # before torch allocates anything
    try:
        if cfg.dist.launches and "RANK" not in os.environ:  # not yet one of the ranks: start them
            from daemon.dist.launch import launch

            return launch(cfg.dist, argv, signals, notifier)
        # The checkpoint directory is rank 0's (or the single process's) alone.
        writer = os.environ.get("RANK", "0") == "0"
        with (
            CrashLoopGuard(Path(cfg.checkpoint.dir)) if writer else contextlib.nullcontext()
        ):  # before torch: a crash importing it counts
            import torch

            from daemon.train.assembly import assemble  # imports torch: after the signal handlers are in place
            from daemon.train.loop import Trainer

            torch.set_num_threads(cpu.threads)  # as already in force, unless a script imported torch first
            trainer = Trainer(assemble(cfg, signals, notifier, cpu))
            outcome = trainer.run()
    except TrainerError as exc:
        return exc.report()
    except Exception:
        events.CRASHED.emit_with_traceback(exit_code=int(ExitCode.FAILURE))
        return ExitCode.FAILURE
    if outcome.handover is None:
        return outcome.exit_code
    try:
        run_lock = trainer.parts.run_lock  # kept through the exec: the directory is never free between the two
        hand_over(outcome.handover, signals, run_lock.handover_descriptors() if run_lock else {})  # never returns
    except OSError as exc:
        events.HANDOVER_FAILED.emit(
            message=f"could not start the process to hand over to: {exc}; the checkpoint "
            f"holds the position, a restart resumes it",
            exit_code=int(ExitCode.STOPPED),
        )
        return ExitCode.STOPPED
    for event in signals.unreported_stops():
        events.SIGNAL_RECEIVED.emit(signal=event.name, during="handover")
    events.STOPPED.emit(exit_code=int(ExitCode.STOPPED))
    return ExitCode.STOPPED


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from daemon.ops.verify import verify

    if args.steps < 4:
        events.USAGE_ERROR.emit(message="--steps must be at least 4: three interruptions and a step between each")
        return ExitCode.USAGE
    try:
        return verify(Path(args.config), args.overrides, args.steps, as_json=args.json)
    except TrainerError as exc:
        return exc.report()


def _plot(cfg: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from daemon.ops.plot import plot

        directories = [Path(d) for d in args.run_dirs] or [Path(cfg.checkpoint.dir)]
        drawn = plot(directories, Path(args.out))
    except ModuleNotFoundError as exc:
        return ConfigError(f"trainer plot needs {exc.name}: pip install 'trainer[plot]' (matplotlib)").report()
    except TrainerError as exc:
        return exc.report()
    events.PLOT_WRITTEN.emit(path=args.out, runs=drawn)
    return ExitCode.COMPLETE


def _status(cfg: Config, as_json: bool) -> int:
    from daemon.ops.status import report, show

    show(report(cfg), as_json)
    return ExitCode.COMPLETE
