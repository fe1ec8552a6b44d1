"""`trainer verify`: show, on this machine, that an interrupted run ends bitwise equal to an unbroken one.

The configuration given is run twice for a short horizon (`train.max_steps`), each in a scratch
directory with a periodic checkpoint every few steps: once unbroken, and once interrupted by real
signals to real processes: SIGUSR1 (an on-demand save, training goes on), SIGKILL right after a
periodic checkpoint (the restart redoes the steps since), SIGTERM (the emergency checkpoint, exit
75), each interruption followed by a restart with the same command line. The two final states are
compared bitwise: position, model, optimizer, scheduler, data order, every RNG, metrics. When they
differ, the periodic checkpoints the two runs share tell between which steps they parted. With
`checkpoint.remote` set, each restart of the interrupted run also finds its local directory gone,
as on a new machine, and resumes from the remote tier.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from daemon import events
from daemon.ckpt.layout import CHECKPOINT_NAME
from daemon.ckpt.remote import RemoteTier
from daemon.ckpt.store import CheckpointStore, Entry, read_checkpoint
from daemon.config.sections import Config
from daemon.errors import ExitCode, TrainerError
from daemon.ops.child import TrainerChild

# What a resumed run must reproduce. Left out: `kind`, and `config` (its checkpoint.dir differs).
# What a checkpoint holds besides the training state: which save wrote it, and the settings the run
# had (a resumed run may change the resume-safe ones; the fingerprint covers the others).
NOT_TRAINING_STATE = ("kind", "config")
# Compared last: they follow from the parameters, which say more about where two runs part.
DERIVED_STATE = ("metrics", "history")
CHECKPOINTS_PER_RUN = 10  # periodic saves over the horizon: where the runs parted is known to a tenth
SILENCE_S = 600  # a child that logs nothing for this long is stuck (a big model's save can take a while)


def first_difference(actual, expected, where: str = "") -> str | None:
    """The path of the first leaf where two checkpoint states differ (tensors compared bitwise,
    dtype and shape included), or None. Top level: every key but NOT_TRAINING_STATE."""
    if not where:
        keys = [*expected, *(key for key in actual if key not in expected)]
        keys.sort(key=lambda key: key in DERIVED_STATE)  # stable: otherwise in the checkpoint's order
        for key in (key for key in keys if key not in NOT_TRAINING_STATE):
            found = first_difference(actual.get(key), expected.get(key), key)
            if found:
                return found
        return None
    if isinstance(expected, torch.Tensor):
        same = isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype and torch.equal(actual, expected)
        return None if same else where
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or actual.keys() != expected.keys():
            return where
        for key in expected:
            found = first_difference(actual[key], expected[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            found = first_difference(a, e, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if actual == expected else where


class VerifyError(TrainerError):
    """A verification run did not behave as planned (it crashed, or ended before it could be interrupted)."""

    exit_code = ExitCode.FAILURE
    event = events.VERIFY_ERROR


@dataclass
class Interruption:
    signal: str
    global_step: int  # the newest step the run had logged when the signal was sent
    resumed_from: dict | None = None  # kind and global step of the checkpoint the next start used
    landed: bool = True  # False: the run had trained its last step before the signal was acted on


@dataclass
class Report:
    passed: bool
    steps: int
    seconds: float
    interruptions: list[Interruption] = field(default_factory=list)
    first_difference: str | None = None
    equal_up_to_step: int | None = None  # the last shared periodic checkpoint still equal
    differs_from_step: int | None = None  # the first one that differs
    kept: str | None = None  # the scratch directory, kept for inspection after a FAIL

    def as_text(self) -> str:
        plan = ", ".join(
            f"{i.signal} at step {i.global_step}"
            + (
                f" (resumed from the {i.resumed_from['kind']} checkpoint at step {i.resumed_from['global_step']})"
                if i.resumed_from
                else ""
            )
            + ("" if i.landed else " (after the last step: the run completed)")
            for i in self.interruptions
        )
        if self.passed:
            return (
                f"PASS: {self.steps} steps, interrupted by {plan}: model, optimizer, scheduler, data order, "
                f"RNG and metrics bitwise equal to the unbroken run ({self.seconds:.1f} s)"
            )
        where = ""
        if self.differs_from_step is not None:
            where = (
                f"; the runs parted between step {self.equal_up_to_step or 0} (equal) and step {self.differs_from_step}"
            )
        return (
            f"FAIL: {self.first_difference} differs after {self.steps} steps, interrupted by {plan}{where}. "
            f"Both runs are kept in {self.kept}"
        )


class Verifier:
    def __init__(self, config: Path, overrides: list[str], steps: int) -> None:
        self.config = config
        self.overrides = [arg for override in overrides for arg in ("--set", override)]
        self.steps = steps
        self.scratch = Path(tempfile.mkdtemp(prefix="trainer-verify-"))
        # With a remote tier, each run trains into a prefix of its own under it, and each restart of
        # the interrupted run finds its local directory gone (a new machine): it resumes from the remote.
        checkpoint = Config.from_yaml(config, overrides).checkpoint
        self.remote = f"{checkpoint.remote.rstrip('/')}/{self.scratch.name}" if checkpoint.remote else None
        self.remote_options = checkpoint.remote_options
        self.segments = 0  # local directories of the interrupted run set aside so far

    def _start(self, run: str, every: int) -> TrainerChild:
        remote = {"checkpoint.remote": f"{self.remote}/{run}"} if self.remote else {}
        if self.remote and run == "interrupted" and (self.scratch / run).exists():
            self.segments += 1
            (self.scratch / run).rename(self.scratch / f"{run}-segment-{self.segments}")
        settings = {
            **remote,
            "checkpoint.dir": str(self.scratch / run),
            "checkpoint.every_steps": every,
            "checkpoint.every_seconds": 0,
            "checkpoint.keep_last": 1_000_000,  # every periodic checkpoint stays, to find where runs part
            "train.max_steps": self.steps,
            "log.format": "json",
        }
        sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
        return TrainerChild.cli("run", "--config", str(self.config), *self.overrides, *sets, cwd=Path.cwd())

    def _finish(self, child: TrainerChild, expect: ExitCode, what: str) -> TrainerChild:
        rc = child.wait(SILENCE_S)
        if rc != expect:
            raise VerifyError(f"the {what} exited {rc}, expected {int(expect)}; its output:\n{child.output()[-4000:]}")
        return child

    def run(self) -> Report:
        started = time.monotonic()
        every = max(1, self.steps // CHECKPOINTS_PER_RUN)
        reference = self._start("unbroken", every)
        run_started = reference.wait_for("run_started", SILENCE_S)
        total = min(self.steps, run_started["epochs"] * run_started["steps_per_epoch"])
        if total < self.steps:  # a shorter run than the horizon asked for: space the saves over it
            reference.kill()
            shutil.rmtree(self.scratch / "unbroken")
            every = max(1, total // CHECKPOINTS_PER_RUN)
            reference = self._start("unbroken", every)
        self._finish(reference, ExitCode.COMPLETE, "unbroken run")

        interruptions = self._interrupted_run(total, every)
        difference = first_difference(self._final_state("interrupted"), self._final_state("unbroken"))
        report = Report(difference is None, total, time.monotonic() - started, interruptions, difference)
        if difference is not None:
            report.equal_up_to_step, report.differs_from_step = self._parting()
            report.kept = str(self.scratch)
        return report

    def _interrupted_run(self, total: int, every: int) -> list[Interruption]:
        """SIGUSR1 at a fifth of the horizon, SIGKILL after the periodic checkpoint past two fifths, SIGTERM
        after the resumed run's first checkpoint (about half-way); a restart after each stop, then on
        to the end. On a loaded machine the SIGTERM can come after the last step: the run then
        completes (exit 0), and the comparison holds for the interruptions that landed."""
        done: list[Interruption] = []

        def after(child: TrainerChild, step: int, **match) -> int:
            event = child.wait_for(
                "checkpoint_saved", SILENCE_S, where=lambda e: e["checkpoint_global_step"] >= step, **match
            )
            return event["checkpoint_global_step"]

        def resumed(child: TrainerChild) -> dict | None:
            """What the restart resumed from; None: it started afresh, which a new machine does when
            the remote tier had no checkpoint committed yet (the run was killed before its first upload)."""
            event = child.wait_for(None, SILENCE_S, where=lambda e: e.get("event") in ("resumed", "fresh_start"))
            return {"kind": event["kind"], "global_step": event["global_step"]} if event["event"] == "resumed" else None

        first = self._start("interrupted", every)
        try:
            step = after(first, max(1, total // 5))
            first.signal(signal.SIGUSR1)
            done.append(Interruption("SIGUSR1", step))
            first.wait_for("checkpoint_saved", SILENCE_S, kind="on_demand")
            step = after(first, max(1, 2 * total // 5), kind="periodic")
            first.kill()
            done.append(Interruption("SIGKILL", step))
        except Exception:
            first.kill()
            raise

        second = self._start("interrupted", every)
        try:
            done[-1].resumed_from = resumed(second)
            from_step = done[-1].resumed_from["global_step"] if done[-1].resumed_from else 0
            step = after(second, from_step + 1)
            second.signal(signal.SIGTERM)
            done.append(Interruption("SIGTERM", step))
            if second.wait(SILENCE_S) == ExitCode.COMPLETE and second.events("training_completed"):
                done[-1].landed = False
                return done
            self._finish(second, ExitCode.STOPPED, "interrupted run (after SIGTERM)")
        except Exception:
            second.kill()
            raise

        last = self._start("interrupted", every)
        done[-1].resumed_from = resumed(last)
        self._finish(last, ExitCode.COMPLETE, "interrupted run, finishing")
        return done

    def _final_state(self, run: str) -> dict:
        def invalid(entry: Entry, _aside: Path | None) -> None:
            raise VerifyError(f"the {run} run left an invalid checkpoint {entry.path.name}: {entry.reason}")

        entry = CheckpointStore(self.scratch / run, keep_last=1).newest_valid(on_invalid=invalid)
        if entry is None:
            raise VerifyError(f"the {run} run left no checkpoint")
        return entry.valid_state

    def _parting(self) -> tuple[int | None, int | None]:
        """The last periodic checkpoint step both runs share with equal state, and the first that differs."""

        def periodic(run: str) -> dict[int, Path]:
            found = {}
            for path in (path for folder in self.scratch.glob(f"{run}*") for path in folder.iterdir()):
                match = CHECKPOINT_NAME.match(path.name)
                if match and match["kind"] == "periodic":
                    found[int(match["step"])] = path
            return found

        unbroken, interrupted = periodic("unbroken"), periodic("interrupted")
        equal = None
        for step in sorted(unbroken.keys() & interrupted.keys()):
            if first_difference(read_checkpoint(interrupted[step]), read_checkpoint(unbroken[step])) is not None:
                return equal, step
            equal = step
        return equal, None

    def clean_up(self, report: Report | None) -> None:
        if report is None or report.passed:
            shutil.rmtree(self.scratch, ignore_errors=True)
            if self.remote:
                try:
                    tier = RemoteTier(self.remote, self.remote_options)
                    tier.fs.rm(tier.root, recursive=True)
                except Exception:  # noqa: BLE001 -- left for the operator; the report says where
                    pass


def verify(config: Path, overrides: list[str], steps: int, as_json: bool) -> int:
    """Run the verification and print its report; PASS exits 0, FAIL 1."""
    verifier = Verifier(config, overrides, steps)
    report = None
    try:
        report = verifier.run()
    finally:
        verifier.clean_up(report)
    print(json.dumps(asdict(report), indent=2) if as_json else report.as_text(), flush=True)
    return ExitCode.COMPLETE if report.passed else ExitCode.FAILURE
