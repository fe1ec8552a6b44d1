"""Exactness: runs really killed (SIGKILL) and restarted end bitwise identical to unbroken ones."""

from __future__ import annotations

import signal

import pytest

from trainer_proc import TrainerProcess, assert_same_training, final_checkpoint, run_to_end

STEPS_PER_EPOCH = 40  # SMALL_SETTINGS: 4000 samples in batches of 100


def kill_after_checkpoint(config, **match) -> None:
    """Start a run, SIGKILL it as soon as a checkpoint matching `match` is logged."""
    process = TrainerProcess.start(config)
    try:
        process.wait_for("checkpoint_saved", **match)
    finally:
        process.kill()


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_epoch_resumes_exactly(run_config, reference_runs, workers):
    run_config.settings = {"checkpoint.every_steps": 10, "data.num_workers": workers}
    kill_after_checkpoint(run_config, checkpoint_global_step=STEPS_PER_EPOCH + 10)

    resumed_run = run_to_end(run_config)

    (resumed,) = resumed_run.events("resumed")
    assert resumed["epoch"] == 1 and resumed["step_in_epoch"] > 0, resumed
    assert resumed["global_step"] == STEPS_PER_EPOCH + resumed["step_in_epoch"]
    assert resumed["steps_lost"] >= 0
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs())


def test_sigkill_at_epoch_boundary_resumes_exactly(run_config, reference_runs):
    kill_after_checkpoint(run_config, kind="epoch", epoch=1)

    resumed_run = run_to_end(run_config)

    (resumed,) = resumed_run.events("resumed")
    assert (resumed["kind"], resumed["epoch"], resumed["step_in_epoch"]) == ("epoch", 1, 0)
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs())


def test_killed_twice_with_workers_resumes_exactly(run_config, reference_runs):
    run_config.settings = {"checkpoint.every_steps": 7, "data.num_workers": 2}
    kill_after_checkpoint(run_config, checkpoint_global_step=14)
    kill_after_checkpoint(run_config, checkpoint_global_step=84)  # epoch 2, step 4

    resumed_run = run_to_end(run_config)

    (resumed,) = resumed_run.events("resumed")
    assert resumed["epoch"] == 2
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs())


def test_metrics_logged_per_epoch_match_an_unbroken_run(run_config, reference_runs):
    run_config.settings = {"checkpoint.every_steps": 10}
    kill_after_checkpoint(run_config, checkpoint_global_step=20)
    resumed_run = run_to_end(run_config)

    logged = {e["epoch"]: (e["train_loss"], e["test_accuracy"]) for e in resumed_run.events("epoch_completed")}
    expected = {h["epoch"]: (h["train_loss"], h["test_accuracy"]) for h in reference_runs()["history"]}
    assert logged == expected  # every epoch of this run completed after the resume, the first one included


def test_completed_training_says_so_and_exits_zero(run_config):
    run_config.settings = {"train.epochs": 1}
    run_to_end(run_config)

    again = run_to_end(run_config)

    assert again.events("training_already_complete")
    assert not again.events("checkpoint_saved")


def test_more_epochs_continue_a_completed_run_exactly(run_config, reference_runs):
    run_config.settings = {"train.epochs": 2}
    run_to_end(run_config)
    run_config.settings = {"train.epochs": 3}

    continued = run_to_end(run_config)

    (changed,) = continued.events("config_changed")
    assert changed["changes"] == {"train.epochs": {"checkpoint": 2, "now": 3}}
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs())


@pytest.mark.parametrize(
    "setting, value",
    [
        ("train.batch_size", 50),
        ("train.seed", 1),
        ("model.hidden", [100]),
        ("data.shuffle", False),
        ("optim.name", "sgd"),
    ],
)
def test_config_change_that_breaks_exactness_is_refused(run_config, setting, value):
    run_config.settings = {"train.epochs": 1}
    run_to_end(run_config)
    run_config.settings = {"train.epochs": 1, setting: value}

    refused = TrainerProcess.start(run_config)

    assert refused.wait() == 78
    (error,) = refused.events("checkpoint_incompatible")
    assert setting in error["message"]
    assert len(list(run_config.checkpoint_dir.glob("ckpt-*.pt"))) == 1


def test_sigkill_never_leaves_a_broken_checkpoint(run_config):
    """Kill a run that saves at every step, many times: every checkpoint left verifies."""
    from daemon.ckpt.store import read_checkpoint

    run_config.settings = {"checkpoint.every_steps": 1, "checkpoint.keep_last": 3, "model.hidden": [2000, 2000]}
    for kill_at in (3, 9, 15):
        process = TrainerProcess.start(run_config)
        try:
            process.wait_for("checkpoint_saved", checkpoint_global_step=kill_at)
        finally:
            process.signal_group(signal.SIGKILL)
            process.kill()
        for path in run_config.checkpoint_dir.glob("ckpt-*.pt"):
            read_checkpoint(path)  # raises InvalidCheckpoint if broken


def test_default_run_reaches_the_seed_accuracy(run_config):
    """The seed's MLP on all of MNIST, 5 epochs: at least the seed's 97.5% test accuracy, logged."""
    run_config.settings = {"data.train_subset": None, "data.test_subset": None, "model.dropout": 0.0, "train.epochs": 5}

    run = run_to_end(run_config)

    (completed,) = run.events("training_completed")
    assert completed["test_accuracy"] >= 0.975
    assert [e["epoch"] for e in run.events("epoch_completed")] == [1, 2, 3, 4, 5]
