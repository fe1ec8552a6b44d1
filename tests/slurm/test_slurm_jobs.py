"""The trainer as a SLURM batch job (the shipped examples/slurm/ scripts), on a real one-node cluster:
each way SLURM stops a job (the time limit's warning, `scontrol requeue`, `scancel`, `scancel
--signal=TERM`) ends with the emergency checkpoint durable, and the job that follows, requeued or
submitted again, ends bitwise equal to an unbroken run.

A stopped run trains on until its stop (UNTIL_STOPPED epochs); the run that resumes it ends at
`train.max_steps`, which a resume may change, written into the config while a requeued job waits on
the held node (SlurmCluster.hold_node): it never starts before the test knows where the stop landed."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from slurm_cluster import Job
from trainer_proc import DIST_SETTINGS, UNTIL_STOPPED, assert_same_training, final_checkpoint, ranks

STOPPED = 75
MORE_STEPS = 20  # trained by the resumed run after the stop
ONE_RANK = {"train.epochs": UNTIL_STOPPED, "checkpoint.every_steps": 10}  # over trainer_proc's SMALL_SETTINGS
TWO_RANKS = {**ranks(2), "train.epochs": UNTIL_STOPPED}


def stop_of(job: Job, nranks: int = 1) -> dict:
    """The stop of the job's first run: every rank stopped by SIGTERM after one step, exit 75, with
    the checkpoint of that step durable."""
    stopped = job.wait_for_event("stopped", nth=nranks)
    every = job.events("stopped")
    assert sorted(event.get("rank", 0) for event in every) == list(range(nranks)), job.text()
    assert {(event["global_step"], event["exit_code"]) for event in every} == {(stopped["global_step"], STOPPED)}
    assert {event["signal"] for event in job.events("signal_received")} == {"SIGTERM"}, job.text()
    step = stopped["global_step"]
    # Each rank logs the one file rank 0 wrote.
    (saved,) = {event["path"]: event for event in job.events("checkpoint_saved", checkpoint_global_step=step)}.values()
    # `checkpoint_skipped`: the stop came right after a periodic or epoch save of that step, which holds it.
    assert saved["kind"] in (("periodic", "epoch") if job.events("checkpoint_skipped") else ("emergency",)), job.text()
    return stopped


def ends_as_an_unbroken_run(run_config, stopped: dict, reference_runs, next_run: Callable[[], Job]) -> dict:
    """The run `next_run()` starts resumes at the stop's step and, ending MORE_STEPS later, equals an
    unbroken run that ends there (trained meanwhile, beside the job); scontrol's fields of its job."""
    run_config.settings = {**run_config.settings, "train.max_steps": stopped["global_step"] + MORE_STEPS}
    run_config.write()
    with ThreadPoolExecutor(max_workers=1) as pool:
        reference = pool.submit(reference_runs, **run_config.settings)
        job = next_run()
        info = job.wait_to_finish()
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.describe()
        assert {event["global_step"] for event in job.events("resumed")} == {stopped["global_step"]}, job.text()
        assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference.result())
    return info


def released(job: Job) -> Callable[[], Job]:
    """The requeued job, let start: the node first, so that the job's update, which sets the scheduler
    going, finds it free."""

    def release() -> Job:
        job.cluster.release_node()
        job.release()
        return job

    return release


def test_scontrol_requeue_mid_epoch_resumes_at_the_exact_step(slurm, submit, run_config, reference_runs):
    run_config.settings = ONE_RANK
    job = submit("train.sbatch", run_config)
    job.wait_for_event("checkpoint_saved", checkpoint_global_step=10)
    slurm.hold_node()

    slurm.run("scontrol", "requeue", job.id)

    stopped = stop_of(job)
    job.wait_for_state("PENDING", restarts=1)
    # SLURM's own requeue, not doubled by the script's.
    assert ends_as_an_unbroken_run(run_config, stopped, reference_runs, released(job))["Restarts"] == "1"


def test_scancel_ends_the_job_with_its_checkpoint_and_a_later_sbatch_resumes(slurm, submit, run_config, reference_runs):
    run_config.settings = ONE_RANK
    job = submit("train.sbatch", run_config)
    job.wait_for_event("checkpoint_saved", checkpoint_global_step=10)

    slurm.run("scancel", job.id)

    info = job.wait_to_finish()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), job.describe()  # a cancel is not undone
    stopped = stop_of(job)
    ends_as_an_unbroken_run(run_config, stopped, reference_runs, lambda: submit("train.sbatch", run_config))


def test_two_ranks_stopped_by_scancel_signal_term_requeue_and_end_as_an_unbroken_run(
    slurm, submit, run_config, reference_runs
):
    """`scancel --signal=TERM` signals the job's steps only: the launcher and each rank get SIGTERM
    from slurmstepd, every rank stops after one step, the launcher exits 75 and the script requeues."""
    run_config.settings = TWO_RANKS
    job = submit("train-2ranks.sbatch", run_config)
    job.wait_for_event("checkpoint_saved", checkpoint_global_step=DIST_SETTINGS["checkpoint.every_steps"], rank=0)
    slurm.hold_node()

    slurm.run("scancel", "--signal=TERM", job.id)

    stopped = stop_of(job, nranks=2)
    assert job.wait_for_event("ranks_exited")["exit_code"] == STOPPED
    job.wait_for_state("PENDING", restarts=1)
    assert ends_as_an_unbroken_run(run_config, stopped, reference_runs, released(job))["Restarts"] == "1"


def test_the_time_limit_warning_stops_the_run_with_its_checkpoint_and_requeues_it(
    slurm, submit, run_config, reference_runs
):
    """Last in the module: SLURM looks at time limits every 30 s from its start, so a test that began
    with the cluster would wait out nearly the whole first interval."""
    run_config.settings = ONE_RANK
    job = submit("train.sbatch", run_config, "--time=10")  # the script's warning: B:USR1@120
    trainer = job.wait_for_event("run_started")["pid"]
    job.wait_for_event("checkpoint_saved", checkpoint_global_step=10)
    slurm.hold_node()
    # The run waits for the warning where it is, however fast this machine trains: the stop lands a
    # step or so later, not thousands (which the unbroken run would have to train again).
    os.kill(trainer, signal.SIGSTOP)
    # The limit brought 1 to 2 minutes away: the warning (120 s ahead) is due now, and SLURM sends it
    # when it next looks at the time limits (every 30 s), a minute or more before the limit.
    job.set_time_limit_minutes_from_now(2)

    job.wait_for_text("time-limit warning: SIGTERM to the step")  # the script's, on SIGUSR1
    os.kill(trainer, signal.SIGCONT)
    stopped = stop_of(job)

    job.wait_for_state("PENDING", restarts=1)  # requeued by the script before the limit: not TIMEOUT
    assert ends_as_an_unbroken_run(run_config, stopped, reference_runs, released(job))["Restarts"] == "1"
