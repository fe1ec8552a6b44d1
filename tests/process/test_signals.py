"""Real signals to real runs: emergency checkpoints, on-demand saves, the exit contract."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from daemon.ckpt.store import read_checkpoint
from daemon.ops.child import event_time
from trainer_proc import UNTIL_STOPPED, TrainerProcess, assert_same_training, final_checkpoint, run_to_end

STOPPED = 75
# ~5.6M parameters (a 67 MB checkpoint): a save long enough to signal during it; 15 steps, 1 epoch.
BIG_MODEL = {"model.hidden": [2000, 2000], "data.train_subset": 1500, "train.epochs": 1}


def stop_and_check(process: TrainerProcess, send) -> dict:
    """Send a stop signal with `send`; the run must save an emergency checkpoint and exit 75."""
    send()
    assert process.wait() == STOPPED, process.output()
    (saved,) = [e for e in process.events("checkpoint_saved") if e["kind"] == "emergency"]
    assert saved["duration_ms"] > 0
    assert process.events("stopped")
    return saved


def resume_and_check_exact(run_config, reference_runs, emergency: dict | None, **reference) -> None:
    rerun = run_to_end(run_config)
    (resumed,) = rerun.events("resumed")
    if emergency is not None:
        assert resumed["kind"] == "emergency"
        assert resumed["global_step"] == emergency["checkpoint_global_step"]
        assert (resumed["epoch"], resumed["step_in_epoch"]) == (emergency["epoch"], emergency["step_in_epoch"])
        assert resumed["steps_lost"] == 0  # nothing trained was lost
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**reference))


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_epoch_saves_and_resumes_at_the_next_batch(run_config, reference_runs, workers):
    run_config.settings = {"checkpoint.every_steps": 10, "data.num_workers": workers}
    process = TrainerProcess.start(run_config)
    process.wait_for("checkpoint_saved", checkpoint_global_step=50)

    emergency = stop_and_check(process, lambda: process.signal(signal.SIGTERM))

    (received,) = process.events("signal_received")
    assert received["signal"] == "SIGTERM" and received["global_step"] == emergency["checkpoint_global_step"]
    assert 0 < emergency["step_in_epoch"] < 40, "mid-epoch, not at the next epoch end"
    resume_and_check_exact(run_config, reference_runs, emergency)


def test_emergency_stop_applies_retention(run_config):
    """Old checkpoints are deleted after the emergency save too, once it is reported durable."""
    run_config.settings = {"checkpoint.every_steps": 5, "checkpoint.keep_last": 2}
    process = TrainerProcess.start(run_config)
    process.wait_for("checkpoint_saved", checkpoint_global_step=15)

    emergency = stop_and_check(process, lambda: process.signal(signal.SIGTERM))

    left = sorted(p.name for p in run_config.checkpoint_dir.glob("ckpt-*.pt"))
    assert len(left) == 2 and left[-1] == Path(emergency["path"]).name, left


def test_ctrl_c_to_the_process_group_with_workers_behaves_like_sigterm(run_config, reference_runs):
    run_config.settings = {"checkpoint.every_steps": 10, "data.num_workers": 2}
    process = TrainerProcess.start(run_config)
    process.wait_for("checkpoint_saved", checkpoint_global_step=20)

    emergency = stop_and_check(process, lambda: process.signal_group(signal.SIGINT))

    assert [e["signal"] for e in process.events("signal_received")] == ["SIGINT"]
    assert "worker" not in process.output().lower()  # no DataLoader worker died or complained
    resume_and_check_exact(run_config, reference_runs, emergency)


def test_sigusr1_saves_now_and_training_goes_on(run_config, reference_runs):
    run_config.settings = {"log.progress_every_seconds": 0.01}
    process = TrainerProcess.start(run_config)
    process.wait_for("progress", where=lambda e: e["global_step"] > 5)
    process.signal(signal.SIGUSR1)
    on_demand = process.wait_for("checkpoint_saved", kind="on_demand")

    assert process.wait() == 0
    read_checkpoint(run_config.checkpoint_dir / on_demand["path"].split("/")[-1])
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs())


def test_sigterm_right_after_an_epoch_end(run_config, reference_runs):
    process = TrainerProcess.start(run_config)
    process.wait_for("checkpoint_saved", kind="epoch", epoch=1)
    process.signal(signal.SIGTERM)

    assert process.wait() == STOPPED
    # Either a few steps of epoch 2 were trained (saved as emergency) or none (nothing new to save).
    saved = [e for e in process.events("checkpoint_saved") if e["kind"] == "emergency"]
    assert saved or process.events("checkpoint_skipped")
    resume_and_check_exact(run_config, reference_runs, saved[0] if saved else None)


def test_sigterm_during_start_up_exits_75_without_a_checkpoint(run_config):
    process = TrainerProcess.start(run_config)
    time.sleep(1.0)  # importing torch
    process.signal(signal.SIGTERM)

    assert process.wait() == STOPPED, process.output()
    assert process.events("checkpoint_skipped")
    assert not list(run_config.checkpoint_dir.glob("ckpt-*"))


def test_second_sigterm_during_the_emergency_save_lets_it_finish(run_config, reference_runs):
    run_config.settings = {**BIG_MODEL, "checkpoint.every_steps": 5}
    process = TrainerProcess.start(run_config)
    process.wait_for("checkpoint_saved", checkpoint_global_step=5)
    process.signal(signal.SIGTERM)
    process.wait_for("signal_received")  # logged just before the emergency save starts

    emergency = stop_and_check(process, lambda: process.signal(signal.SIGTERM))

    assert [e.get("during") for e in process.events("signal_received")] == [None, "emergency_save"]
    resume_and_check_exact(run_config, reference_runs, emergency, **BIG_MODEL)


def test_third_sigterm_exits_at_once_and_the_previous_checkpoint_holds(run_config, reference_runs):
    run_config.settings = {**BIG_MODEL, "checkpoint.every_steps": 5}
    process = TrainerProcess.start(run_config)
    process.wait_for("checkpoint_saved", checkpoint_global_step=5)
    process.signal(signal.SIGTERM)
    process.wait_for("signal_received")
    process.signal(signal.SIGTERM)
    process.signal(signal.SIGTERM)

    assert process.wait() == STOPPED
    for path in run_config.checkpoint_dir.glob("ckpt-*.pt"):
        read_checkpoint(path)  # the forced exit broke nothing
    resume_and_check_exact(run_config, reference_runs, None, **BIG_MODEL)


def test_sigterm_during_a_background_save(run_config, reference_runs):
    run_config.settings = {**BIG_MODEL, "checkpoint.every_steps": 2}
    process = TrainerProcess.start(run_config)
    process.wait_for("checkpoint_saved", checkpoint_global_step=4)  # the next one is in flight by now

    emergency = stop_and_check(process, lambda: process.signal(signal.SIGTERM))

    assert max(e["checkpoint_global_step"] for e in process.events("checkpoint_saved")) == emergency["global_step"]
    resume_and_check_exact(run_config, reference_runs, emergency, **BIG_MODEL)


def test_sigkill_resume_says_how_many_logged_steps_were_lost(run_config):
    run_config.settings = {"checkpoint.every_steps": 20, "log.progress_every_seconds": 0.01}
    process = TrainerProcess.start(run_config)
    process.wait_for("checkpoint_saved", checkpoint_global_step=20)  # written in the background: durable now
    process.wait_for("progress", where=lambda e: e["global_step"] >= 30)
    process.kill()
    last_logged = max(e["global_step"] for e in process.events() if "global_step" in e)

    rerun = run_to_end(run_config)

    (resumed,) = rerun.events("resumed")
    assert resumed["global_step"] == 20
    assert resumed["steps_lost"] >= last_logged - 20 >= 10


def read_history(path: Path) -> list[dict]:
    """The complete records of a metrics history (a run killed mid-line leaves a torn last one)."""
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def wait_in_history(process: TrainerProcess, path: Path, found, silence: float = 90) -> None:
    """Until `found(records)` holds for the history the run appends to, read as it grows; fails when
    it stops growing for `silence` s (stuck) or the run ends."""
    records: list[dict] = []
    offset, grown_at = 0, time.monotonic()
    while not found(records):
        assert process.popen.poll() is None, f"the run ended first:\n{process.output()}"
        assert time.monotonic() - grown_at < silence, f"the history did not grow for {silence} s"
        time.sleep(0.05)
        with path.open("rb") as file:
            file.seek(offset)
            data = file.read()
        complete = data[: data.rfind(b"\n") + 1]
        if complete:
            offset, grown_at = offset + len(complete), time.monotonic()
            records += [json.loads(line) for line in complete.splitlines()]


# Steps with no event for seconds: no progress event, no periodic save, epochs of 60,000 steps.
QUIET = {"data.train_subset": None, "train.batch_size": 1, "train.epochs": UNTIL_STOPPED,
         "log.progress_every_seconds": 1e6, "log.metrics_every_steps": 1}  # fmt: skip
QUIET_S = 3.0  # the run trains this long after its last event before it is killed
MARKER_LAG_S = 1.5  # the marker's lag allowed: MARK_EVERY_S (0.5), and a loaded machine's delays


def test_sigkill_long_after_the_last_event_still_counts_the_steps_lost(run_config):
    """The killed run trained for seconds after its last event (a checkpoint): its successor's
    `steps_lost` counts the steps it trained, up to its marker's lag, read against what it really
    trained (its own history, a line a step, each written before the step's mark)."""
    run_config.settings = QUIET
    history = run_config.checkpoint_dir / "metrics.jsonl"
    process = TrainerProcess.start(run_config)
    process.wait_for("epoch_started")
    process.signal(signal.SIGUSR1)
    process.wait_for("checkpoint_saved", kind="on_demand")

    def quiet_long_enough(records: list[dict]) -> bool:
        return bool(records) and records[-1]["time"] >= event_time(process.events()[-1]) + QUIET_S

    wait_in_history(process, history, quiet_long_enough)
    process.kill()
    trained = {r["global_step"]: r["time"] for r in read_history(history) if r["record"] == "train"}

    rerun = TrainerProcess.start(run_config)
    resumed = rerun.wait_for("resumed")
    rerun.kill()
    marked = resumed["global_step"] + resumed["steps_lost"]
    last = max(trained)
    assert marked <= last, "more steps counted than were trained"
    # Against the step before the last: the kill may fall between the last step's line and its mark.
    lag = trained[last - 1] - trained[marked]
    assert lag <= MARKER_LAG_S, f"{last - marked} trained steps ({lag:.2f} s of training) not counted"


ONE_STEP_EPOCHS = {"data.train_subset": 100, "data.test_subset": 100, "optim.scheduler": {"name": "step", "gamma": 0.5}}


def test_on_demand_save_on_an_epochs_last_step_still_writes_the_final_checkpoint(run_config, reference_runs):
    """SIGUSR1 on the only step of the only epoch: the on-demand file holds the state before the
    epoch ended; completing the epoch changes it (scheduler, history), so a final file must follow."""
    run_config.settings = {**ONE_STEP_EPOCHS, "train.epochs": 1}
    process = TrainerProcess.start(run_config)
    process.wait_for("run_started")  # the first step (and its first optimizer step) is still to come
    process.signal(signal.SIGUSR1)

    assert process.wait() == 0, process.output()
    assert [e["kind"] for e in process.events("checkpoint_saved")] == ["on_demand", "final"]
    status = TrainerProcess.start(run_config, "--json", command="status")
    assert status.wait() == 0
    assert json.loads(status.output())["complete"] is True
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**run_config.settings))


def test_emergency_checkpoint_on_an_epochs_last_step_resumes_exactly(run_config, reference_runs):
    """SIGTERM during the last step of an epoch: the emergency file holds the step, not the epoch's end;
    the resumed run completes that epoch and must save it, or it ends with an older scheduler and history."""
    # One step of 3000 samples through the big model: long enough that the signal lands during it.
    run_config.settings = {
        **BIG_MODEL,
        **ONE_STEP_EPOCHS,
        "train.batch_size": 3000,
        "data.train_subset": 3000,
        "train.epochs": 2,
    }
    process = TrainerProcess.start(run_config)
    process.wait_for("epoch_started")  # past the start-up check: the stop is acted on after the step
    process.signal(signal.SIGTERM)
    assert process.wait() == STOPPED, process.output()
    (emergency,) = process.events("checkpoint_saved")
    assert (emergency["kind"], emergency["epoch"], emergency["step_in_epoch"]) == ("emergency", 0, 1)

    rerun = run_to_end(run_config)

    assert [e["kind"] for e in rerun.events("checkpoint_saved")] == ["epoch", "final"]
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**run_config.settings))


def test_stop_during_the_last_evaluation_completes_the_run(run_config, reference_runs):
    """A SIGTERM after the last step, while the final evaluation and save run: the final checkpoint is
    durable, so the run is complete (exit 0), not stopped (75, which would restart it under systemd)."""
    settings = {**BIG_MODEL, "data.test_subset": 10000}
    run_config.settings = {**settings, "log.progress_every_seconds": 0.001}  # a progress event every step
    process = TrainerProcess.start(run_config)
    process.wait_for("progress", step_in_epoch=15)  # the last step: evaluation and the final save follow
    process.signal(signal.SIGTERM)

    assert process.wait() == 0, process.output()
    (received,) = process.events("signal_received")
    assert received["during"] == "completion"
    assert process.events("training_completed")
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**settings))
