"""Tasks of the user's own: the example CNN (augmentation in 2 workers) and a tiny task with
gradient accumulation, clipping, bf16, warmup and a per-step schedule resume bitwise-exactly after
real signals; a task that cannot be loaded is a config error, one that fails is a crash."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.errors import ExitCode
from daemon.ops.verify import first_difference
from trainer_proc import (
    NOT_BUILTIN,
    TINY,
    TINY_TASK,
    TrainerProcess,
    assert_same_training,
    final_checkpoint,
    run_to_end,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = {
    **NOT_BUILTIN,
    "task.entry": f"{REPO / 'examples' / 'mnist_cnn.py'}:build",
    "task.options": {"width": 8, "train_subset": 600, "test_subset": 200},
    "data.num_workers": 2,
    "train.epochs": 2,
    "train.batch_size": 50,
    "checkpoint.every_steps": 3,
}


def stop_then_finish(run_config, stop: str, after_step: int) -> tuple[TrainerProcess, TrainerProcess]:
    """Start; SIGTERM at the first progress event at or past `after_step`, or SIGKILL once a periodic
    checkpoint at or past it is durable; then run to the end."""
    process = TrainerProcess.start(run_config)
    if stop == "SIGTERM":
        process.wait_for("progress", where=lambda e: e["global_step"] >= after_step)
        process.signal(signal.SIGTERM)
        assert process.wait() == ExitCode.STOPPED, process.output()
        assert process.events("checkpoint_saved")[-1]["kind"] == "emergency"
    else:
        process.wait_for("checkpoint_saved", where=lambda e: e["checkpoint_global_step"] >= after_step)
        process.kill()
        process.wait()
    return process, run_to_end(run_config)


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_example_cnn_with_augmentation_in_workers_resumes_exactly(run_config, reference_runs, stop):
    run_config.settings = {**EXAMPLE, "log.progress_every_seconds": 0.001}
    _, rerun = stop_then_finish(run_config, stop, after_step=6 if stop == "SIGTERM" else 3)
    (resumed,) = rerun.events("resumed")
    assert resumed["kind"] == ("emergency" if stop == "SIGTERM" else "periodic")

    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**EXAMPLE))


def test_augmentation_does_not_depend_on_the_number_of_workers(reference_runs):
    assert_same_training(reference_runs(**{**EXAMPLE, "data.num_workers": 0}), reference_runs(**EXAMPLE))


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_accumulation_clipping_bf16_and_warmup_resume_exactly(run_config, reference_runs, stop):
    run_config.settings = TINY
    _, rerun = stop_then_finish(run_config, stop, after_step=4)
    (resumed,) = rerun.events("resumed")
    # A stop lands on an optimizer step: the checkpoint never holds half-accumulated gradients.
    assert resumed["global_step"] >= 3

    reference = reference_runs(**TINY)
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference)
    assert reference["global_step"] == 20
    assert reference["warmup"]["last_epoch"] == reference["scheduler"]["last_epoch"] == 20
    assert reference["task"]["steps"] == 60  # the task's own state: a count of batches trained
    assert set(reference["history"][-1]) == {"epoch", "test_mse", "train_loss", "train_abs_error"}


def test_a_tasks_own_optimizer_and_scheduler_resume_exactly(run_config, reference_runs):
    settings = {**TINY, "task.options": {"own_optimizer": True}, "optim.warmup_steps": 0, "optim.scheduler": None}
    run_config.settings = settings
    stop_then_finish(run_config, "SIGTERM", after_step=4)

    reference = reference_runs(**settings)
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference)
    assert reference["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert reference["scheduler"]["last_epoch"] == 2  # stepped per epoch


@pytest.mark.parametrize(
    "without",
    [
        {"train.grad_accum_steps": 1},
        {"train.precision": "fp32"},
        {"optim.clip_grad_norm": None},
        {"optim.warmup_steps": 0},
        {"optim.scheduler": {"name": "step", "step_size": 3, "gamma": 0.7, "interval": "epoch"}},
    ],
    ids=["accumulation", "bf16", "clipping", "warmup", "per-step schedule"],
)
def test_each_training_feature_changes_what_is_trained(reference_runs, without):
    """The exactness tests above pass whatever the features do: each must also take effect."""
    settings = {**TINY, "train.epochs": 1}
    trained, without_it = reference_runs(**settings), reference_runs(**{**settings, **without})
    # The parameters, not the whole checkpoint: its fingerprint differs whatever the feature does.
    assert first_difference(trained["state_dict"], without_it["state_dict"], "state_dict") is not None


def test_events_name_the_headline_metric_and_the_step_metrics(run_config):
    run_config.settings = {**TINY, "train.epochs": 1}
    run = run_to_end(run_config)
    (epoch,) = run.events("epoch_completed")
    assert epoch["headline"] == "test_mse" and epoch["test_mse"] > 0 and "train_abs_error" in epoch
    assert "train_abs_error" in run.events("progress")[-1]
    (completed,) = run.events("training_completed")
    assert completed["headline"] == "test_mse" and completed["test_mse"] == epoch["test_mse"]


@pytest.mark.parametrize(
    "entry, says",
    [
        ("no_such_module_here:build", "cannot import no_such_module_here"),
        ("missing/file.py:build", "cannot import missing/file.py"),
        ("tiny_task.py:no_such_callable", "has no callable 'no_such_callable'"),
        ("tiny_task.py:build_incomplete", "without model"),
    ],
)
def test_a_task_that_cannot_be_loaded_is_a_config_error(run_config, entry, says):
    if entry.startswith("tiny_task.py"):
        entry = f"{TINY_TASK.parent}/{entry}"
    run_config.settings = {**NOT_BUILTIN, "task.entry": entry}
    process = TrainerProcess.start(run_config)
    assert process.wait() == ExitCode.CONFIG, process.output()
    (error,) = process.events("config_error")
    assert "task.entry" in error["message"] and says in error["message"]
    assert not run_config.checkpoint_dir.exists()


def test_a_task_that_raises_ends_as_a_crash_with_its_traceback(run_config):
    run_config.settings = {**TINY, "task.options": {"fail_at_step": 5}}
    process = TrainerProcess.start(run_config)
    assert process.wait() == ExitCode.FAILURE, process.output()
    (crashed,) = process.events("crashed")
    assert "the tiny task fails on purpose" in str(crashed["exception"])


def test_an_evaluation_named_like_the_daemons_metrics_is_a_config_error_and_loses_nothing(run_config):
    run_config.settings = {**TINY, "task.options": {"metric": "train_mse"}}
    process = TrainerProcess.start(run_config)
    assert process.wait() == ExitCode.CONFIG, process.output()
    (error,) = process.events("config_error")
    assert "evaluates metrics named ['train_mse']" in error["message"]
    (saved,) = [e for e in process.events("checkpoint_saved") if e["kind"] == "emergency"]
    assert saved["global_step"] == 10  # the first epoch's steps, trained before the evaluation


def test_resuming_with_another_task_version_or_options_is_refused(run_config):
    run_config.settings = {**TINY, "train.epochs": 1}
    run_to_end(run_config)
    run_config.settings = {**TINY, "train.epochs": 2, "task.options": {"samples": 240}}
    process = TrainerProcess.start(run_config)
    assert process.wait() == ExitCode.CONFIG, process.output()
    (refused,) = process.events("checkpoint_incompatible")
    assert "task.options.samples: None in the checkpoint, 240 now" in refused["message"]


def test_builtin_settings_beside_another_task_are_a_config_error(run_config):
    run_config.settings = {**TINY, "model.hidden": [10]}
    process = TrainerProcess.start(run_config)
    assert process.wait() == ExitCode.CONFIG
    (error,) = process.events("config_error")
    assert "model.hidden: configures the built-in MNIST MLP" in error["message"]


def test_python_entry_point_runs_the_daemon(run_config):
    """`from daemon import run` in a user's script: the same run, logs and exit code as the CLI."""
    run_config.settings = {**TINY, "train.epochs": 1}
    config = run_config.write()
    script = textwrap.dedent(f"""
        from daemon import run
        raise SystemExit(run({str(config)!r}, overrides=["train.max_steps=4"]))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=run_config.workdir, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"event": "training_completed"' in result.stdout
    assert final_checkpoint(run_config.checkpoint_dir)["global_step"] == 4
