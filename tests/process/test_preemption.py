"""Cloud preemption notices, from a fake metadata service (tests/metadata_server.py) to a real run:
a `notice` checkpoint and training on, or a stop; a misbehaving service changes nothing."""

from __future__ import annotations

import signal
import time

import pytest

from metadata_server import PLATFORMS, MetadataServer
from trainer_proc import UNTIL_STOPPED, TrainerProcess, assert_same_training, final_checkpoint, run_to_end

STOPPED = 75
# Resume-safe: the reference run, unbroken, has none of these settings.
WATCHING = {"preemption.on_notice": "checkpoint", "log.progress_every_seconds": 0.01}
WITHIN_S = 60  # for what a notice brings: aws polls every 5 s; the rest is a loaded machine's delays


def logged(process: TrainerProcess, event: str, **fields) -> dict:
    """The first `event` with these fields, within WITHIN_S: a run that trains until stopped never
    falls silent, so waiting for its output to stop (wait_for) would wait for ever."""
    deadline = time.monotonic() + WITHIN_S
    while not process.events(event, **fields):
        if process.popen.poll() is not None:
            process.wait()  # its output read to the end
            break
        assert time.monotonic() < deadline, f"no {event} {fields} within {WITHIN_S} s"
        time.sleep(0.05)
    found = process.events(event, **fields)
    assert found, f"the run ended without {event} {fields}:\n{process.output()}"
    return found[0]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_notice_checkpoints_and_training_goes_on(run_config, reference_runs, platform):
    with MetadataServer(platform) as server:
        run_config.settings = {
            **WATCHING,
            "preemption.notice": platform,
            "preemption.endpoint": server.url,
            "train.epochs": UNTIL_STOPPED,
        }
        process = TrainerProcess.start(run_config)
        process.wait_for("progress", where=lambda e: e["global_step"] > 5)
        server.announce()
        notice = logged(process, "preemption_notice")
        saved = logged(process, "checkpoint_saved", kind="notice")
        process.wait_for("progress", where=lambda e: e["global_step"] > saved["global_step"])  # training goes on
        process.signal(signal.SIGTERM)
        assert process.wait() == STOPPED, process.output()
        server.withdraw()  # the machine that got it is gone: the run resumes on a fresh one

        assert notice["platform"] == platform and notice["deadline"]
        (emergency,) = process.events("checkpoint_saved", kind="emergency")
        assert [e["signal"] for e in process.events("signal_received")] == ["SIGTERM"]
        if platform != "gcp":
            return  # how the notice arrives differs by platform; what follows from it does not
        end = emergency["global_step"] + 5
        run_config.settings["train.max_steps"] = end
        rerun = run_to_end(run_config)
    assert rerun.events("resumed", kind="emergency")
    assert not rerun.events("preemption_notice")
    assert_same_training(
        final_checkpoint(run_config.checkpoint_dir),
        reference_runs(**{"train.epochs": UNTIL_STOPPED, "train.max_steps": end}),
    )


def test_on_notice_stop_stops_as_sigterm_does(run_config):
    with MetadataServer("azure") as server:
        run_config.settings = {
            **WATCHING,
            "preemption.notice": "azure",
            "preemption.endpoint": server.url,
            "preemption.on_notice": "stop",
            "train.epochs": UNTIL_STOPPED,
        }
        process = TrainerProcess.start(run_config)
        process.wait_for("progress", where=lambda e: e["global_step"] > 5)
        server.announce()
        logged(process, "preemption_notice")
        logged(process, "stopped")
        assert process.wait() == STOPPED, process.output()
    assert process.events("preemption_notice")
    kinds = [e["kind"] for e in process.events("checkpoint_saved")]
    assert kinds[-1] == "emergency" and "notice" not in kinds, kinds
    assert process.events("stopped") and not process.events("signal_received")


@pytest.mark.parametrize("misbehaviour", ["hang", "reset"])  # all four: tests/unit/test_preemption.py
def test_a_misbehaving_metadata_service_changes_nothing(run_config, misbehaviour):
    """The run ends at its train.max_steps as it would without a watcher: a hung request holds
    nothing up, an error is at most one warning (tests/unit/test_preemption.py sees many)."""
    with MetadataServer("aws", misbehaviour=misbehaviour) as server:
        run_config.settings = {"train.max_steps": 30, "preemption.notice": "aws", "preemption.endpoint": server.url}
        process = run_to_end(run_config)
        assert server.requests, "the watcher asked nothing"
    assert "Traceback" not in process.output()  # nor did the watcher's thread die
    assert process.events("training_completed")
    assert not process.events("preemption_notice")
    assert len(process.events("preemption_poll_failed")) <= 1
    assert not [e for e in process.events() if e["level"] in ("error", "critical")]
