"""Several ranks, started by `trainer run` through torch's elastic agent: a signal to any one rank
stops every rank after the same step with the emergency checkpoint durable, and the resumed run
ends bitwise equal to an unbroken one."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from daemon.child import START
from trainer_proc import DIST_SETTINGS as SETTINGS
from trainer_proc import TrainerProcess, assert_same_training, final_checkpoint, ranks, run_to_end


def kill_ranks(pids: list[int]) -> None:
    """Ranks live in sessions of their own: a failed test must not leave them running."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize(
    ("nproc", "target"),
    [(2, "rank 1"), (3, "rank 1"), (2, "launcher")],  # rank 1 alone: neither the launcher nor rank 0 hears it
)
def test_sigterm_stops_every_rank_at_one_step_and_resumes_exactly(run_config, reference_runs, nproc, target):
    run_config.settings = ranks(nproc)
    process = TrainerProcess.start(run_config)
    pids = process.wait_for("ranks_started")["pids"]
    try:
        process.wait_for("checkpoint_saved", checkpoint_global_step=10, rank=0)
        os.kill(pids[1] if target == "rank 1" else process.pid, signal.SIGTERM)
        assert process.wait() == 75, process.output()
    finally:
        process.kill()
        kill_ranks(pids)
    stopped = process.events("stopped")
    assert sorted(event["rank"] for event in stopped) == list(range(nproc)), process.output()
    assert len({event["global_step"] for event in stopped}) == 1, stopped
    step = stopped[0]["global_step"]
    (emergency,) = [e for e in process.events("checkpoint_saved") if e["kind"] == "emergency" and e["rank"] == 0]
    assert emergency["checkpoint_global_step"] == step and 10 < step < 60
    assert process.events("ranks_exited")[-1]["exit_codes"] == {str(rank): 75 for rank in range(nproc)}

    resumed_run = run_to_end(run_config)

    assert [e["global_step"] for e in resumed_run.events("resumed")] == [step]
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**ranks(nproc)))


def test_a_changed_world_size_is_refused(run_config):
    run_config.settings = {**ranks(2), "train.max_steps": 10}
    run_to_end(run_config)

    run_config.settings = {**SETTINGS, "train.max_steps": 20}
    alone = TrainerProcess.start(run_config)

    assert alone.wait() == 78, alone.output()
    (refused,) = alone.events("checkpoint_incompatible")
    assert "trained by 2 rank(s), this run has 1" in refused["message"]


def test_sigkill_of_a_rank_restarts_the_group_which_finishes_exactly(run_config, reference_runs):
    run_config.settings = {**ranks(2), "dist.max_restarts": 1}
    process = TrainerProcess.start(run_config)
    pids = process.wait_for("ranks_started")["pids"]
    try:
        process.wait_for("checkpoint_saved", checkpoint_global_step=10, rank=0)
        os.kill(pids[1], signal.SIGKILL)
        assert process.wait() == 0, process.output()
    finally:
        process.kill()
        kill_ranks(pids)

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
    run_config.settings = {**ranks(2), "train.epochs": 100}
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
