"""What one unit keeps from another, and what the sandbox keeps from the service, under a real
systemd (252) with the units installed as the README says (the `service` fixture, conftest.py).

* trainer.service's state directory is trainer/default; an instance's is trainer/instances/NAME,
  which no instance name can turn into trainer/default. Started beside a running trainer.service
  with a copy of its config, trainer@default trains in a directory of its own, and trainer.service
  trains on to the end as if it were alone (systemd used to hand trainer@default the directory of
  the running trainer: its next save failed, exit 73, and the instance resumed its run).
* A task file in a directory the units hide (PrivateTmp=, ProtectHome=) is a configuration error
  (78) that says so and gives the drop-in that shows it; installed, that drop-in lets the run start.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from trainer_service import (
    EXIT_CONFIG,
    SYSTEM,
    Journal,
    Service,
    assert_emergency_stop,
    assert_resumed_at,
    assert_started,
    assert_stays_down,
)

from trainer_proc import NOT_BUILTIN, TINY_TASK, UNTIL_STOPPED, assert_same_training, final_checkpoint

# 40 steps an epoch; a run ends when the test stops it, or at a train.max_steps set on a restart.
SETTINGS = {
    "train.epochs": UNTIL_STOPPED,
    "checkpoint.every_steps": 10,
    "checkpoint.keep_last": 5,
    "log.progress_every_seconds": 0.1,
}
# The tiny task, two steps: a run that imports its task and ends.
TASK_SETTINGS = {**NOT_BUILTIN, "train.epochs": 1, "train.max_steps": 2, "train.batch_size": 16}


def state_dir(service: Service, unit: str) -> Path:
    """A unit's state directory, as the host sees it (DynamicUser=yes keeps it below private/)."""
    instance = unit.removesuffix(".service").partition("@")[2]
    return service.var_lib / "private" / "trainer" / (f"instances/{instance}" if instance else "default")


def saves(journal: Journal, pid: int) -> list[int]:
    return [e["checkpoint_global_step"] for e in journal.events("checkpoint_saved", pid)]


def test_no_instance_name_reaches_trainer_service_s_directory(service: Service, follow, reference_runs) -> None:
    sd, unit = service.sd, "trainer.service"
    service.write_config("config", SETTINGS)
    service.write_config("default", SETTINGS)  # /etc/trainer/default.yaml, a copy of the config
    journal = follow(unit)
    sd.systemctl("enable", "--now", unit)  # enabled, systemd keeps its exit status once it ends
    pid = assert_started(service, unit)
    journal.wait_event("checkpoint_saved", pid, kind="periodic")
    owner = state_dir(service, unit).stat().st_uid
    assert owner == service.uid_of(pid)

    # "." would name trainer/instances itself, and ".." is no path systemd takes: neither starts
    # (the first makes no user name), and neither touches a directory.
    for name in ("trainer@..service", "trainer@...service"):
        assert sd.systemctl("start", name, check=False).returncode != 0, name
    assert (service.var_lib / "private" / "trainer").stat().st_uid == 0

    instance = "trainer@default.service"
    instance_journal = follow(instance)
    sd.systemctl("start", instance)
    instance_pid = assert_started(service, instance)
    started = sd.wait_for(
        lambda: instance_journal.events("fresh_start", instance_pid) or instance_journal.events("resumed", instance_pid),
        timeout=60, what="the instance's fresh_start or resumed",
    )  # fmt: skip
    assert started[0]["event"] == "fresh_start", started  # not trainer.service's run
    instance_journal.wait_event("checkpoint_saved", instance_pid, kind="periodic")
    assert list(service.checkpoint_dir("instances/default").glob("ckpt-*-periodic.pt"))
    assert state_dir(service, instance).stat().st_uid == service.uid_of(instance_pid) != owner

    # trainer.service saves on, in its own directory, still its user's: twice more since the
    # instance started and saved.
    since = max(saves(journal, pid))
    sd.wait_for(
        lambda: journal.events("checkpoint_write_failed") or sum(step > since for step in saves(journal, pid)) >= 2,
        timeout=120, interval=0.1, what="two saves of trainer.service after the instance's",
    )  # fmt: skip
    assert not journal.events("checkpoint_write_failed"), journal.events("checkpoint_write_failed")
    assert state_dir(service, unit).stat().st_uid == owner
    assert service.show(unit, "ActiveState", "MainPID", "NRestarts") == {
        "ActiveState": "active", "MainPID": str(pid), "NRestarts": "0",
    }  # fmt: skip

    # Both stop as they should (an emergency checkpoint each, exit 75); trainer.service, started to
    # end 20 steps on, completes its run bitwise equal to an unbroken one.
    sd.systemctl("stop", instance)
    assert_emergency_stop(instance_journal, instance_pid)
    sd.systemctl("stop", unit)
    stopped, kind = assert_emergency_stop(journal, pid)
    end = stopped["global_step"] + 20
    service.write_config("config", {**SETTINGS, "train.max_steps": end})
    sd.systemctl("start", unit)
    last = assert_started(service, unit)
    assert_resumed_at(journal, last, stopped, kind)
    journal.wait_event("training_completed", last, timeout=300)
    sd.wait_for(lambda: service.show(unit, "ActiveState")["ActiveState"] == "inactive", timeout=60, what="its exit")
    assert service.show(unit, "Result", "ExecMainStatus") == {"Result": "success", "ExecMainStatus": "0"}
    assert not journal.events("checkpoint_write_failed")
    assert_same_training(
        final_checkpoint(service.checkpoint_dir("default")), reference_runs(**{**SETTINGS, "train.max_steps": end})
    )


@pytest.mark.parametrize("hidden", ["/tmp", "/home"])
def test_a_task_file_the_sandbox_hides_is_a_config_error_that_says_how_to_show_it(
    service: Service, follow, tmp_path: Path, hidden: str
) -> None:
    """/tmp: the host's, where pytest's tmp_path is (PrivateTmp= gives the service a /tmp of its own).
    /home: a directory of the test's, mounted there in the container (ProtectHome=)."""
    sd = service.sd
    if hidden == "/tmp":
        written = tasks = tmp_path / "tasks"  # where the test writes it, where the service would see it
    else:
        home = tmp_path / "home"
        written, tasks = home / "alice" / "tasks", Path("/home/alice/tasks")
    written.mkdir(parents=True)
    written.chmod(0o755)  # readable by the service's user, once shown
    shutil.copyfile(TINY_TASK, written / "my_task.py")
    (written / "my_task.py").chmod(0o644)
    if hidden == "/home":
        home.chmod(0o755)
        (home / "alice").chmod(0o700)  # as homes are: the drop-in shows what is below it all the same
        sd.run("mount", "--bind", str(home), "/home")
    name = f"hidden{hidden.replace('/', '')}"
    unit = f"trainer@{name}.service"
    service.write_config(name, {**TASK_SETTINGS, "task.entry": f"{tasks / 'my_task.py'}:build"})
    journal = follow(unit)

    assert sd.systemctl("start", unit, check=False).returncode != 0  # it exits before READY=1
    error = journal.wait_event("config_error", pid=None)
    assert error["exit_code"] == EXIT_CONFIG
    setting = "PrivateTmp=" if hidden == "/tmp" else "ProtectHome="
    message, _, drop_in = error["message"].partition(f"(`systemctl edit {unit}`):\n")
    print(error["message"])
    assert message.startswith(
        f"task.entry: cannot import {tasks / 'my_task.py'}: the service's sandbox hides {hidden} ({setting} in its unit)"
    ), error["message"]
    assert "/opt/trainer-tasks" in message
    assert drop_in.splitlines() == [
        "[Service]",
        *(["ProtectHome=tmpfs"] if hidden == "/home" else []),
        f"BindReadOnlyPaths={tasks}",
    ]
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": str(EXIT_CONFIG), "NRestarts": "0"},
    )  # fmt: skip

    # The drop-in, as `systemctl edit` would write it: the run starts and completes.
    sd.write_file(f"{SYSTEM}/{unit}.d/override.conf", drop_in + "\n")
    sd.systemctl("daemon-reload")
    sd.systemctl("reset-failed", unit)
    sd.systemctl("start", unit, check=False)  # returns at READY=1, or at the exit: two steps are quick
    journal.wait_event("training_completed", pid=None)
    journal.wait_message(f"{unit}: Deactivated successfully.")
    assert len(journal.events("config_error")) == 1
