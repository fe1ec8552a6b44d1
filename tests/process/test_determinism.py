"""What a run's determinism rests on reaches torch, is logged, and survives a resume."""

from __future__ import annotations

import textwrap

from trainer_proc import TrainerProcess, assert_same_training, final_checkpoint, run_to_end

CONFIG_ERROR = 78

# A user's model calling an op without a deterministic kernel (a C++ extension's, say), which
# refuses as torch's own do (all of those are CUDA ops) when deterministic algorithms are on.
NONDETERMINISTIC_OP = """
import torch

_forward = torch.nn.Linear.forward


def forward(self, x):
    if torch.are_deterministic_algorithms_enabled():
        raise RuntimeError(
            "my_scatter_op does not have a deterministic implementation, but you set "
            "'torch.use_deterministic_algorithms(True)'."
        )
    return _forward(self, x)


torch.nn.Linear.forward = forward
"""


def test_determinism_event_reports_what_torch_runs_with(run_config):
    run_config.settings = {"train.epochs": 1, "train.cpu_threads": 1, "train.cpu_wait": "passive"}

    run = run_to_end(run_config)

    (determinism,) = run.events("determinism")
    assert determinism["deterministic_algorithms"] is True
    assert determinism["cpu_threads"] == 1  # torch.get_num_threads() in the trainer
    assert determinism["environment"] == {
        "OMP_NUM_THREADS": "1", "OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE", "GOMP_SPINCOUNT": "0", "MKL_CBWR": "AUTO,STRICT",
    }  # fmt: skip


def test_a_resumed_run_keeps_its_thread_count(run_config, reference_runs):
    run_config.settings = {"train.cpu_threads": 1, "checkpoint.every_steps": 10}
    process = TrainerProcess.start(run_config)
    process.wait_for("checkpoint_saved", checkpoint_global_step=50)
    process.kill()

    run_config.settings = {"train.cpu_threads": None, "checkpoint.every_steps": 10}  # auto: every CPU here
    resumed = run_to_end(run_config)

    (determinism,) = resumed.events("determinism")
    assert determinism["cpu_threads"] == 1
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**{"train.cpu_threads": 1}))


def test_a_resume_with_another_explicit_thread_count_is_refused(run_config):
    run_config.settings = {"train.cpu_threads": 1, "checkpoint.every_steps": 10}
    process = TrainerProcess.start(run_config)
    process.wait_for("checkpoint_saved", checkpoint_global_step=10)
    process.kill()

    run_config.settings = {"train.cpu_threads": 2, "checkpoint.every_steps": 10}
    refused = TrainerProcess.start(run_config)

    assert refused.wait() == CONFIG_ERROR
    (error,) = refused.events("checkpoint_incompatible")
    assert "trained with 1 CPU threads" in error["message"] and "train.cpu_threads" in error["message"]


def test_an_op_without_a_deterministic_kernel_is_a_config_error(run_config, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(NONDETERMINISTIC_OP))
    run_config.settings = {"train.epochs": 1}

    refused = TrainerProcess.start(run_config, env={"PYTHONPATH": str(site)})

    assert refused.wait() == CONFIG_ERROR, refused.output()
    (error,) = refused.events("config_error")
    assert "my_scatter_op" in error["message"] and "train.deterministic" in error["message"]

    run_config.settings = {"train.epochs": 1, "train.deterministic": False}
    allowed = TrainerProcess.start(run_config, env={"PYTHONPATH": str(site)})
    assert allowed.wait() == 0, allowed.output()
