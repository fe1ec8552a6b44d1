"""Several ranks, started by `trainer run` through torch's elastic agent: a signal to any one rank
stops every rank after the same step with the emergency checkpoint durable, and the resumed run
ends bitwise equal to an unbroken one."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest

from daemon.ops.child import START
from trainer_proc import DIST_SETTINGS as SETTINGS
from trainer_proc import TINY, UNTIL_STOPPED, TrainerProcess, assert_same_training, final_checkpoint, ranks, run_to_end


def kill_ranks(pids: list[int]) -> None:
    """Ranks live in sessions of their own: a failed test must not leave them running."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def signal_a_rank(
    process: TrainerProcess, pids: list[int], target: int, signum: int, at_step: int, expect: int
) -> None:
    """Once rank 0's checkpoint at `at_step` is durable, `signum` to the process `target`; the
    launcher must then exit `expect`."""
    try:
        process.wait_for("checkpoint_saved", checkpoint_global_step=at_step, rank=0)
        os.kill(target, signum)
        assert process.wait() == expect, process.output()
    finally:
        process.kill()
        kill_ranks(pids)


@pytest.mark.parametrize(
    ("nproc", "target"),
    [(2, "rank 1"), (3, "rank 1"), (2, "launcher")],  # rank 1 alone: neither the launcher nor rank 0 hears it
)
def test_sigterm_stops_every_rank_at_one_step_and_resumes_exactly(run_config, reference_runs, nproc, target):
    run_config.settings = {**ranks(nproc), "log.progress_every_seconds": 0.001}  # a progress event a step
    process = TrainerProcess.start(run_config)
    pids = process.wait_for("ranks_started")["pids"]
    signal_a_rank(process, pids, pids[1] if target == "rank 1" else process.pid, signal.SIGTERM, at_step=10, expect=75)
    stopped = process.events("stopped")
    assert sorted(event["rank"] for event in stopped) == list(range(nproc)), process.output()
    assert len({event["global_step"] for event in stopped}) == 1, stopped
    step = stopped[0]["global_step"]
    # The emergency checkpoint; or, when the stop came as an epoch ended, that epoch's (checkpoint_skipped).
    (saved,) = [e for e in process.events("checkpoint_saved") if e["checkpoint_global_step"] == step and e["rank"] == 0]
    assert saved["kind"] == ("epoch" if process.events("checkpoint_skipped") else "emergency") and 10 < step < 60
    assert process.events("ranks_exited")[-1]["exit_codes"] == {str(rank): 75 for rank in range(nproc)}

    resumed_run = run_to_end(run_config)

    assert [e["global_step"] for e in resumed_run.events("resumed")] == [step]
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**ranks(nproc)))
    # Every rank reports the epoch's loss over all ranks' samples: one value per epoch.
    completed = resumed_run.events("epoch_completed")
    assert sorted(e["rank"] for e in completed if e["epoch"] == 3) == list(range(nproc))
    assert len({(e["epoch"], e["train_loss"]) for e in completed}) == len({e["epoch"] for e in completed})
    # Progress shows each rank's own slice: after the last step, near the loss over all of them (not a share of it).
    (last_loss,) = {e["train_loss"] for e in completed if e["epoch"] == 3}
    for rank in range(nproc):
        (last,) = resumed_run.events("progress", rank=rank, epoch=2, step_in_epoch=20)
        assert 0.8 < last["loss"] / last_loss < 1.25, (last, last_loss)


def test_sigusr1_to_one_rank_checkpoints_every_rank_at_one_step_and_training_goes_on(run_config, reference_runs):
    """A save asked of rank 1 alone: rank 0 writes it (every rank at the same step), and the run
    ends as an unbroken one."""
    run_config.settings = ranks(2)
    process = TrainerProcess.start(run_config)
    pids = process.wait_for("ranks_started")["pids"]
    signal_a_rank(process, pids, pids[1], signal.SIGUSR1, at_step=10, expect=0)

    saved = process.events("checkpoint_saved", kind="on_demand")  # each rank logs the one file rank 0 wrote
    assert sorted(e["rank"] for e in saved) == [0, 1] and len({e["path"] for e in saved}) == 1, saved
    assert saved[0]["checkpoint_global_step"] > 10
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**ranks(2)))


def test_a_changed_world_size_is_refused(run_config):
    run_config.settings = {**ranks(2), "train.max_steps": 10}
    run_to_end(run_config)

    run_config.settings = {**SETTINGS, "train.max_steps": 20}
    alone = TrainerProcess.start(run_config)

    assert alone.wait() == 78, alone.output()
    (refused,) = alone.events("checkpoint_incompatible")
    assert "trained by 2 rank(s), this run has 1" in refused["message"]


def test_a_task_with_state_of_its_own_resumes_exactly_on_3_ranks(run_config, reference_runs):
    """The tiny task keeps state that differs by rank, draws dropout, and accumulates gradients:
    each rank gets its own state back, and the pass that settles DDP's buckets before the first
    step leaves no trace (its step count, average and RNG draws are undone)."""
    settings = {**TINY, "dist.nproc_per_node": 3, "train.batch_size": 24}
    run_config.settings = settings
    process = TrainerProcess.start(run_config)
    pids = process.wait_for("ranks_started")["pids"]
    signal_a_rank(process, pids, pids[2], signal.SIGTERM, at_step=6, expect=75)
    run_to_end(run_config)

    final = final_checkpoint(run_config.checkpoint_dir)
    assert len({final["task"][f"rank_{rank}"]["inputs_seen"] for rank in range(3)}) == 3
    assert_same_training(final, reference_runs(**settings))


def test_a_parameter_the_step_leaves_unused_is_refused_with_several_ranks(run_config):
    run_config.settings = {**TINY, "dist.nproc_per_node": 2, "task.options": {"unused_parameter": True}}
    process = TrainerProcess.start(run_config)

    assert process.wait() == 78, process.output()
    assert "parameters without a gradient (unused)" in process.events("config_error")[0]["message"]


def test_under_a_plain_torchrun_a_stop_of_one_rank_stops_both_and_the_resume_is_exact(run_config, reference_runs):
    """A scheduler's own launch, as the README gives it: the ranks see RANK and WORLD_SIZE and do
    not launch again; torchrun itself exits 1 after a stop (its own rule), every rank 75."""
    run_config.settings = SETTINGS  # dist.nproc_per_node stays 1: torchrun starts the ranks
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python",
                "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")  # fmt: skip
    process = TrainerProcess.start(run_config, wrapper=torchrun)
    pids = [process.wait_for("run_started", rank=rank, after=START)["pid"] for rank in (0, 1)]
    signal_a_rank(process, pids, pids[1], signal.SIGTERM, at_step=10, expect=1)
    stopped = process.events("stopped")
    assert sorted(e["rank"] for e in stopped) == [0, 1] and len({e["global_step"] for e in stopped}) == 1, stopped
    assert stopped[0]["global_step"] > 10

    resumed = TrainerProcess.start(run_config, wrapper=torchrun)
    assert resumed.wait() == 0, resumed.output()
    assert [e["global_step"] for e in resumed.events("resumed")] == [stopped[0]["global_step"]]
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**ranks(2)))


def test_sigkill_of_a_rank_restarts_the_group_which_finishes_exactly(run_config, reference_runs):
    run_config.settings = {**ranks(2), "dist.max_restarts": 1}
    process = TrainerProcess.start(run_config)
    pids = process.wait_for("ranks_started")["pids"]
    signal_a_rank(process, pids, pids[1], signal.SIGKILL, at_step=10, expect=0)

    assert process.events("ranks_restarting")
    assert [e["rank"] for e in process.events("resumed")] == [0]
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**ranks(2)))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(run_config) -> tuple[TrainerProcess, TrainerProcess]:
    """Two launchers of one rank each, as two machines would start them, meeting on 127.0.0.1."""
    return TrainerProcess.start(run_config), TrainerProcess.start(run_config)


def finish_nodes(nodes: tuple[TrainerProcess, TrainerProcess], expect: int) -> None:
    pids = []
    try:
        for node in nodes:
            pids += node.wait_for("ranks_started", silence=180, after=START)["pids"]
        for node in nodes:
            assert node.wait(180) == expect, node.output()
    finally:
        for node in nodes:
            node.kill()
        kill_ranks(pids)


def test_sigterm_to_one_nodes_launcher_stops_both_nodes_and_resumes_exactly(run_config, reference_runs):
    run_config.settings = {**SETTINGS, "dist.nnodes": 2, "dist.rdzv_endpoint": f"127.0.0.1:{free_port()}"}
    first, second = two_nodes(run_config)
    first.wait_for("checkpoint_saved", silence=180, checkpoint_global_step=10, rank=0)
    second.signal(signal.SIGTERM)  # the other node's launcher: its rank stops, the agreement stops rank 0
    finish_nodes((first, second), expect=75)
    stopped = [event["global_step"] for node in (first, second) for event in node.events("stopped")]
    assert len(stopped) == 2 and len(set(stopped)) == 1, stopped

    run_config.settings = {**run_config.settings, "dist.rdzv_endpoint": f"127.0.0.1:{free_port()}"}
    finish_nodes(two_nodes(run_config), expect=0)

    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**ranks(2)))


def watchdog_pets(sock: socket.socket, seconds: float) -> int:
    """How many WATCHDOG=1 the launcher sent systemd's stand-in within `seconds`."""
    pets, deadline = 0, time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            pets += b"WATCHDOG=1" in sock.recv(4096).split(b"\n")
        except TimeoutError:
            break
    return pets


def test_the_watchdog_follows_every_ranks_progress(run_config, tmp_path):
    """The launcher pets systemd's watchdog only while every rank trains: with one rank frozen
    (the other then waits in a collective), the pets stop, and WatchdogSec= would restart the unit."""
    run_config.settings = {**ranks(2), "train.epochs": UNTIL_STOPPED}  # killed at the end
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        watchdog = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"}
        process = TrainerProcess.start(run_config, env=watchdog)
        pids = process.wait_for("ranks_started")["pids"]
        try:
            process.wait_for("checkpoint_saved", checkpoint_global_step=10, rank=0)
            assert watchdog_pets(systemd, 2) >= 2  # every 0.5 s while the ranks train
            os.kill(pids[1], signal.SIGSTOP)
            watchdog_pets(systemd, 0.6)  # a pet in flight, and a whole round begun before the stop
            assert watchdog_pets(systemd, 3) == 0  # systemd would have killed it after 1 s
            assert process.popen.poll() is None
        finally:
            process.kill()
            kill_ranks(pids)
