"""One run per checkpoint directory: a second trainer exits at once with 69, naming the holder;
`trainer status` still answers and says who holds it; a killed run leaves no stale lock."""

from __future__ import annotations

import json
import signal

from trainer_proc import UNTIL_STOPPED, TrainerProcess, run_to_end

IN_USE = 69


def status(run_config) -> dict:
    process = TrainerProcess.start(run_config, "--json", command="status")
    assert process.wait() == 0, process.output()
    return json.loads(process.output())


def test_second_run_on_a_directory_in_use_exits_69_and_status_names_the_holder(run_config):
    run_config.settings = {"train.epochs": UNTIL_STOPPED, "checkpoint.every_steps": 1}  # a save a step; killed below
    first = TrainerProcess.start(run_config)
    try:
        first.wait_for("checkpoint_saved", checkpoint_global_step=3)

        second = TrainerProcess.start(run_config)
        assert second.wait() == IN_USE, second.output()
        (refused,) = second.events()
        assert refused["event"] == "checkpoint_dir_in_use" and refused["holder_pid"] == first.popen.pid
        assert f"PID {first.popen.pid}" in refused["message"]
        report = status(run_config)
        assert (report["run_in_progress"], report["run_pid"]) == (True, first.popen.pid)
        assert first.popen.poll() is None, "the first run goes on"
    finally:
        first.signal_group(signal.SIGKILL)
        first.kill()

    # The kernel dropped the lock with its holder: no stale lock to clean up.
    assert status(run_config)["run_in_progress"] is False
    run_config.settings["train.epochs"] = 1
    resumed = run_to_end(run_config)
    assert resumed.events("resumed") or resumed.events("training_already_complete")
