"""The systemd contract under a real systemd (252) with the real units.

One container (systemd_harness.py; the `service` fixture of conftest.py) serves the module. In it:

* the units are installed as the README says, by `systemd/install.py` run with this venv's
  python: trainer.service, trainer@.service, the shared drop-in common.conf and, where the
  interpreter lives under /root or /home (pyenv), its paths.conf. A drop-in `test.conf` overrides
  only paths and pace: ExecStart (a config the service can read), RestartSec (short) and, scaled
  with it, StartLimitIntervalSec. DynamicUser=, StateDirectory=, PrivateTmp= and the rest of the
  hardening stay on.
* a directory under pytest's tmp_path is bind-mounted over /var/lib, inside the container's
  mount namespace only: the state directories (with DynamicUser=, really
  /var/lib/private/trainer/default and /var/lib/private/trainer/instances/NAME) and the configs (/var/lib/trainer-test/NAME.yaml) live there,
  so the test reads the checkpoints from the host and nothing touches the host's /var/lib.
  pytest's /tmp would be invisible to the service (PrivateTmp=yes).

`test_lifecycle_contract` walks trainer.service, with the README's commands verbatim, through
`systemctl enable --now`, SIGTERM preemptions in a row, one more than the start limit's burst
(`kill PID` and `systemctl kill`), SIGKILL, `systemctl stop`, `systemctl start`, completion and a later start, checking at every
step what systemd did (`systemctl show`) and what the trainer logged (its JSON lines, read back
with `journalctl -o json`), and ends with the final weights bitwise equal to an uninterrupted run.
The other behaviours use instances of trainer@.service.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from systemd_harness import INNER_ENV, verify_unit
from trainer_service import (
    CONFIG_DIR,
    EXIT_CONFIG,
    EXIT_CRASH_LOOP,
    EXIT_STOPPED,
    INSTANCE_DROP_IN,
    SYSTEM,
    UNIT_DIR,
    VENV_TRAINER,
    Service,
    assert_emergency_stop,
    assert_ready_after_resume,
    assert_resumed_at,
    assert_started,
    assert_stays_down,
    common_setting,
    installed_units,
    new_main_pid,
    position,
    realtime,
    skip,
    wait_restarted,
    wait_training,
)

from daemon.ckpt.store import CheckpointStore
from trainer_proc import UNTIL_STOPPED, assert_same_training, busy_loops, final_checkpoint, ranks

# 40 steps an epoch (train_subset 4000, batch 100). A run ends when its test ends it: the epochs are
# UNTIL_STOPPED, and a test that wants a run to complete sets `train.max_steps` (which a resume may
# change) a few steps past where it stopped it, then starts it again.
SETTINGS = {
    "train.epochs": UNTIL_STOPPED,
    "checkpoint.every_steps": 10,
    "checkpoint.keep_last": 5,
    "log.progress_every_seconds": 0.1,
}
# One preemption more than the start limit's burst: each restart is a start, so a limit that
# counted preemptions would stop the unit at the last of them.
PREEMPTIONS = int(common_setting("StartLimitBurst")) + 1
STATUS_LINE = re.compile(r'Status: "(epoch \d+/\d+ step \d+/\d+ loss \d+\.\d{4})"')

# The README's commands, run verbatim (each must appear in README.md as written here).
ENABLE_NOW = "systemctl enable --now trainer"
START = "systemctl start trainer"
STATUS = "systemctl status trainer"
JOURNAL = "journalctl -u trainer"
JOURNAL_JQ = (
    "journalctl -u trainer SYSLOG_IDENTIFIER=trainer -o cat | jq -c 'select(.event==\"resumed\") | {kind, global_step}'"
)
JOURNAL_ERRORS = "journalctl -p err -u trainer"


@pytest.mark.parametrize("drop_ins", [(), ("cuda.conf", "network.conf")])
def test_units_pass_verify(systemd_analyze, tmp_path: Path, drop_ins: tuple[str, ...]) -> None:
    for unit in installed_units(tmp_path, *drop_ins):
        assert f"ExecStart={VENV_TRAINER} " in unit.read_text()
        assert verify_unit(unit) == [], unit


@pytest.mark.parametrize("drop_ins", [(), ("cuda.conf", "network.conf")])
def test_units_are_hardened(systemd_analyze, tmp_path: Path, drop_ins: tuple[str, ...]) -> None:
    """`systemd-analyze security` exposure at most 2.5 ("OK"), also with the documented GPU and
    network drop-ins."""
    for unit in installed_units(tmp_path, *drop_ins):
        out = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
            capture_output=True, text=True, check=True, env={**INNER_ENV, "SYSTEMD_COLORS": "0"},
        ).stdout  # fmt: skip
        [exposure] = re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", out)
        print(f"{unit.name} with {drop_ins or 'no extra drop-ins'}: exposure {exposure}")
        assert float(exposure) <= 2.5, out


def test_lifecycle_contract(service: Service, follow, reference_runs) -> None:
    """trainer.service through the README's commands and more preemptions in a row than the start
    limit's burst."""
    if shutil.which("jq") is None:
        skip("jq not found: the README's journal command pipes into it (`apt-get install jq`; .ci/run does)")
    sd, unit, state = service.sd, "trainer.service", "default"
    service.write_config("config", SETTINGS)
    journal = follow(unit)
    epochs = SETTINGS["train.epochs"]

    # `systemctl enable --now trainer`: returns once READY=1 came, after the service laid out and
    # loaded the data and looked for a checkpoint (none: a fresh start).
    service.shell(ENABLE_NOW)
    props = service.show(unit, "DropInPaths", "UnitFileState", "User")
    assert props["DropInPaths"].split()[0] == f"{SYSTEM}/trainer.service.d/common.conf"
    assert (props["UnitFileState"], props["User"]) == ("enabled", "trainer")
    pid = assert_started(service, unit)
    # STATUS= came with READY=1 ("epoch 1/... step 0/40"); the progress reports may have updated it since.
    assert re.match(rf"epoch \d+/{epochs} step \d+/40\b", service.show(unit, "StatusText")["StatusText"])
    journal.wait_event("dataset_prepared", pid)
    assert_ready_after_resume(service, unit, journal, pid, "fresh_start")
    # STATUS= follows the training: `systemctl status trainer`.
    status = sd.wait_for(lambda: STATUS_LINE.search(service.shell(STATUS).stdout), timeout=30, what="STATUS= progress")
    print(f"{STATUS}: {status.group(0)}")

    # Preemptions in a row, by `kill PID` and through systemd: each an emergency checkpoint, exit 75,
    # a restart and an exact resume; however fast they come, they never exhaust the start limit
    # (with the old limit of 5 starts in 10 minutes, the 5th was the last).
    sigterms = [
        ("kill -TERM", lambda pid: sd.run("kill", "-TERM", str(pid))),
        ("systemctl kill -s SIGTERM", lambda pid: sd.systemctl("kill", "-s", "SIGTERM", unit)),
    ]
    since_step = 0
    for restarts in range(1, PREEMPTIONS + 1):
        how, send_sigterm = sigterms[restarts % 2]
        wait_training(journal, pid, since_step=since_step)
        send_sigterm(pid)
        new_pid = wait_restarted(service, unit, pid, restarts=restarts)
        stopped, kind = assert_emergency_stop(journal, pid)
        resumed = assert_resumed_at(journal, new_pid, stopped, kind)
        assert_ready_after_resume(service, unit, journal, new_pid, "resumed")
        print(f"preemption {restarts} ({how}): stopped and resumed at {position(resumed)}")
        pid, since_step = new_pid, resumed["global_step"]

    # SIGKILL (as a crash or the OOM killer): no emergency checkpoint; restart and resume from the
    # newest checkpoint on disk at the moment of the kill. The process is frozen meanwhile, so
    # that its background writer cannot complete another one between the look and the kill.
    since = resumed["global_step"]
    journal.wait_event("checkpoint_saved", pid, kind="periodic", where=lambda e: e["checkpoint_global_step"] > since)
    sd.run("kill", "-STOP", str(pid))
    sd.wait_for(lambda: "T (stopped)" in sd.run("cat", f"/proc/{pid}/status").stdout, timeout=10, what="SIGSTOP")
    newest = next(e for e in CheckpointStore(service.checkpoint_dir(state), 1).scan() if e.valid)
    sd.run("kill", "-KILL", str(pid))
    new_pid = wait_restarted(service, unit, pid, restarts=PREEMPTIONS + 1)
    journal.wait_message(f"{unit}: Main process exited, code=killed, status=9/KILL")
    assert not journal.events("stopped", pid) and not journal.events("checkpoint_saved", pid, kind="emergency")
    assert newest.kind in ("periodic", "epoch")
    expected = {"epoch": newest.state["epoch"], "step_in_epoch": newest.state["step_in_epoch"],
                "global_step": newest.global_step, "path": newest.path}  # fmt: skip
    resumed = assert_resumed_at(journal, new_pid, expected, kind=newest.kind)
    assert resumed["steps_lost"] >= 0  # what was trained after that checkpoint is trained again
    assert_ready_after_resume(service, unit, journal, new_pid, "resumed")
    print(f"SIGKILL: resumed from the {newest.kind} checkpoint at {position(resumed)}, "
          f"{resumed['steps_lost']} lost")  # fmt: skip
    pid = new_pid

    # `systemctl stop`: emergency checkpoint, exit 75, a success: inactive, not failed; no restart.
    wait_training(journal, pid, since_step=resumed["global_step"])
    sd.systemctl("stop", unit)
    stopped, kind = assert_emergency_stop(journal, pid)
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "inactive", "SubState": "dead", "Result": "success", "ExecMainCode": "1",
         "ExecMainStatus": str(EXIT_STOPPED), "NRestarts": str(PREEMPTIONS + 1), "MainPID": "0"},
    )  # fmt: skip
    print(f"systemctl stop: stopped at {position(stopped)}")

    # `systemctl start trainer` resumes exactly there; told to end 40 steps on (a resume may change
    # train.max_steps: `config_changed`), it completes.
    total_steps = stopped["global_step"] + 40
    service.write_config("config", {**SETTINGS, "train.max_steps": total_steps})
    service.shell(START)
    pid = assert_started(service, unit)
    assert_resumed_at(journal, pid, stopped, kind)
    assert_ready_after_resume(service, unit, journal, pid, "resumed")

    # Training completes: exit 0, no restart, inactive.
    sd.wait_for(
        lambda: service.show(unit, "ActiveState")["ActiveState"] != "active",
        timeout=300, interval=0.5, what="training to complete",
    )  # fmt: skip
    completed = journal.wait_event("training_completed", pid)
    assert completed["global_step"] == total_steps
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "inactive", "SubState": "dead", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0",
         "NRestarts": "0", "MainPID": "0"},
    )  # fmt: skip

    # A later start logs that training is complete and exits 0 at once (14 starts so far, and
    # still within the start limit: they came seconds apart).
    service.shell(START)  # returns: READY=1 comes before the trainer finds nothing to do
    pid = int(service.show(unit, "ExecMainPID")["ExecMainPID"])  # kept after the process is gone
    done = journal.wait_event("training_already_complete", pid)
    assert done["global_step"] == total_steps
    sd.wait_for(lambda: service.show(unit, "ActiveState")["ActiveState"] == "inactive", timeout=30, what="the exit")
    props = service.show(unit, "Result", "ExecMainCode", "ExecMainStatus", "NRestarts", "ActiveEnterTimestamp",
                         "ExecMainExitTimestamp")  # fmt: skip
    assert (props["Result"], props["ExecMainCode"], props["ExecMainStatus"], props["NRestarts"]) == (
        "success", "1", "0", "0"
    )  # fmt: skip
    print(f"already complete: exit {realtime(props['ExecMainExitTimestamp']) - realtime(props['ActiveEnterTimestamp'])}"
          " after READY=1")  # fmt: skip
    trained = [e for e in journal.events(pid=pid) if e["event"] in ("progress", "checkpoint_saved", "epoch_completed")]
    assert not trained

    # The README's journal commands: `journalctl -u trainer` shows systemd's lines and the trainer's;
    # with SYSLOG_IDENTIFIER=trainer only the trainer's JSON, which jq reads.
    shown = service.shell(JOURNAL).stdout
    assert f"Started {unit}" in shown and '"event": "training_completed"' in shown
    resumes = [json.loads(line) for line in service.shell(JOURNAL_JQ).stdout.splitlines()]
    assert len(resumes) == PREEMPTIONS + 3 and all(set(r) == {"kind", "global_step"} for r in resumes), resumes
    assert '"event"' not in service.shell(JOURNAL_ERRORS).stdout  # nothing went wrong

    # After all of that, the same weights, optimizer state and metrics as an uninterrupted run.
    final = final_checkpoint(service.checkpoint_dir(state))
    assert_same_training(final, reference_runs(**{**SETTINGS, "train.max_steps": total_steps}))


def test_config_error_exits_78_without_restart(service: Service, follow) -> None:
    sd, instance = service.sd, "badconfig"
    unit = f"trainer@{instance}.service"
    service.write_config(instance, {**SETTINGS, "train.epochs": 0})
    journal = follow(unit)
    assert sd.systemctl("start", unit, check=False).returncode != 0  # it exits before READY=1
    error = journal.wait_event("config_error", pid=None)
    assert error["exit_code"] == EXIT_CONFIG
    assert f"{CONFIG_DIR}/{instance}.yaml: train.epochs: must be >= 1" in error["message"]
    journal.wait_message(f"{unit}: Main process exited, code=exited, status=78/CONFIG")
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": str(EXIT_CONFIG), "NRestarts": "0"},
    )  # fmt: skip
    assert len(journal.events("config_error")) == 1 and journal.starts() == 1
    # Stored as an error (PRIORITY=3): `journalctl -p err` shows the cause beside systemd's
    # "Failed to start", and `-o cat` gives it as the bare JSON object.
    errors = sd.run("journalctl", "-p", "err", "-u", unit, "-o", "cat").stdout.splitlines()
    assert json.loads(errors[0]) == error, errors
    assert any(line.startswith(f"Failed to start {unit}") for line in errors[1:]), errors


def test_crash_loop_at_start_is_rate_limited(service: Service, follow) -> None:
    """A process that dies as soon as it exists (a broken install), again and again."""
    sd, instance = service.sd, "crashloop"
    unit = f"trainer@{instance}.service"
    service.write_config(instance, SETTINGS)
    burst = int(common_setting("StartLimitBurst"))
    assert service.show(unit, "StartLimitBurst")["StartLimitBurst"] == str(burst)
    journal = follow(unit)

    sd.systemctl("start", "--no-block", unit)
    killed: list[str] = []
    deadline = time.monotonic() + 60
    while (props := service.show(unit, "ActiveState", "MainPID"))["ActiveState"] != "failed":
        assert time.monotonic() < deadline, f"no start limit after {len(killed)} crashes: {props}"
        if props["MainPID"] not in ("0", *killed):
            sd.run("kill", "-KILL", props["MainPID"], check=False)
            killed.append(props["MainPID"])
        time.sleep(0.01)
    assert len(killed) == burst, killed
    refusal = f"{unit}: Start request repeated too quickly."
    journal.wait_message(refusal)
    # systemd 252 counts the refused restart in NRestarts and keeps the crash's Result.
    assert_stays_down(
        service, unit, journal, {"ActiveState": "failed", "Result": "signal", "NRestarts": str(burst), "MainPID": "0"}
    )
    assert journal.starts() == burst
    # Even a manual start is refused until StartLimitIntervalSec= has passed (or `reset-failed`).
    assert sd.systemctl("start", unit, check=False).returncode != 0
    journal.wait_message(refusal, count=2)
    assert journal.starts() == burst
    assert service.show(unit, "ActiveState", "MainPID") == {"ActiveState": "failed", "MainPID": "0"}


def test_crash_loop_without_progress_is_refused(service: Service, follow) -> None:
    """A run that dies later than systemd's start limit can see, always before its first
    checkpoint: the trainer refuses its 6th start (exit 70), and systemd leaves it failed."""
    sd, instance = service.sd, "nowhere"
    unit = f"trainer@{instance}.service"
    # Epochs of 6000 steps (the whole training set, batches of 10), saved only at their end: the kill,
    # as soon as the run is seen to start training, comes long before; checked after each kill.
    settings = {**SETTINGS, "data.train_subset": None, "train.batch_size": 10, "checkpoint.every_steps": 0}
    service.write_config(instance, settings)
    journal = follow(unit)
    sd.systemctl("start", "--no-block", unit)
    pid = 0
    for crashes in range(1, 6):
        pid = new_main_pid(service, unit, pid)
        journal.wait_event("run_started", pid)  # data loaded: the crash comes well after the start
        sd.run("kill", "-KILL", str(pid), check=False)
        journal.wait_message(f"{unit}: Main process exited, code=killed, status=9/KILL", count=crashes)
        assert not list(service.checkpoint_dir(f"instances/{instance}").glob("ckpt-*")), (
            "a checkpoint came before the kill"
        )
    refused = journal.wait_event("crash_loop", pid=None)
    assert refused["exit_code"] == EXIT_CRASH_LOOP and "5 crashes in a row since the first start" in refused["message"]
    journal.wait_message(f"{unit}: Main process exited, code=exited, status={EXIT_CRASH_LOOP}/SOFTWARE")
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": str(EXIT_CRASH_LOOP), "NRestarts": "5"},
    )  # fmt: skip
    assert journal.starts() == 6 and not journal.events("fresh_start", refused["pid"])
    assert not any("Start request repeated too quickly" in m for m in journal.messages())
    errors = sd.run("journalctl", "-p", "err", "-u", unit, "SYSLOG_IDENTIFIER=trainer", "-o", "cat").stdout
    assert [json.loads(line)["event"] for line in errors.splitlines()] == ["crash_loop"]


def test_death_by_sigterm_restarts(service: Service, follow) -> None:
    """A SIGTERM that kills the main process, landing where the trainer has no handler (before it
    installs them, after it restores them on the way out), is a preemption too: a restart, as for
    exit 75. `Restart=on-failure` alone takes death by SIGTERM for a clean exit once the unit runs
    (before READY=1 the start fails with result 'protocol' and restarts anyway). Here a shell
    stands for such a trainer, run as Type=simple so that the unit runs at once."""
    sd, instance = service.sd, "early"
    unit = f"trainer@{instance}.service"
    sd.write_file(
        f"{SYSTEM}/{unit}.d/{INSTANCE_DROP_IN}",
        f"[Service]\nType=simple\nExecStart=\nExecStart=/bin/sh -c 'sleep 60; exec {VENV_TRAINER} run'\n",
    )  # fmt: skip
    sd.systemctl("daemon-reload")
    journal = follow(unit)
    sd.systemctl("start", unit)
    pid = new_main_pid(service, unit, 0)
    # Once it runs the shell (before, it is systemd's own child setting up the sandbox).
    sd.wait_for(lambda: sd.run("cat", f"/proc/{pid}/comm").stdout.strip() == "sh", timeout=30, what="the shell")
    sd.systemctl("kill", "-s", "SIGTERM", "--kill-whom=main", unit)
    journal.wait_message(f"{unit}: Deactivated successfully.")  # a clean exit, for systemd
    journal.wait_message(f"{unit}: Scheduled restart job, restart counter is at 1.")
    sd.systemctl("stop", unit)
    assert service.show(unit, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}


def test_two_ranks_preempted_restart_and_finish_exactly(service: Service, follow, reference_runs) -> None:
    """trainer@dist trains with two ranks (the network drop-in, as the README says: gloo speaks TCP
    on loopback). A SIGTERM to the main process, the launcher, reaches both ranks; they stop after
    the same step, rank 0 makes the emergency checkpoint durable, the launcher exits 75 and systemd
    restarts it; stopped with `systemctl stop` and started again to end a few steps on, the run
    equals an unbroken 2-rank run bitwise."""
    sd, instance = service.sd, "dist"
    unit = f"trainer@{instance}.service"
    settings = {**ranks(2), "train.epochs": UNTIL_STOPPED}  # 20 steps an epoch; ends at a max_steps set below
    service.write_config(instance, settings)
    sd.write_file(f"{SYSTEM}/{unit}.d/network.conf", (UNIT_DIR / "network.conf").read_text())
    sd.systemctl("daemon-reload")
    journal = follow(unit)
    sd.systemctl("start", unit)
    launcher = assert_started(service, unit)  # READY=1 from the launcher, once the ranks run
    journal.wait_event("checkpoint_saved", None, rank=0, checkpoint_global_step=10)

    sd.run("kill", "-TERM", str(launcher))
    new_launcher = wait_restarted(service, unit, launcher, restarts=1)  # after 75: RestartForceExitStatus=
    exited = journal.wait_event("ranks_exited", launcher)
    assert exited["exit_code"] == EXIT_STOPPED and exited["exit_codes"] == {"0": EXIT_STOPPED, "1": EXIT_STOPPED}
    stopped = [journal.wait_event("stopped", None, rank=rank) for rank in (0, 1)]
    assert len({position(event) for event in stopped}) == 1, stopped
    # The emergency checkpoint, or the epoch's when the signal came as an epoch ended (that state is
    # on disk already: `checkpoint_skipped`), as for one process (assert_emergency_stop).
    step = stopped[0]["global_step"]
    saved = journal.wait_event("checkpoint_saved", None, rank=0, where=lambda e: e["checkpoint_global_step"] == step)
    skipped = journal.events("checkpoint_skipped", None, rank=0)
    assert saved["kind"] == ("epoch" if skipped else "emergency"), (saved, skipped)
    resumed = journal.wait_event("resumed", None, rank=0)
    assert position(resumed) == position(saved) and resumed["kind"] == saved["kind"]

    # Stopped again, and started to end 10 steps on (train.max_steps, which a resume may change).
    journal.wait_event("checkpoint_saved", None, rank=0, where=lambda e: e["checkpoint_global_step"] > step)
    sd.systemctl("stop", unit)
    assert journal.wait_event("ranks_exited", new_launcher)["exit_code"] == EXIT_STOPPED
    end = journal.events("stopped", None, rank=0)[-1]["global_step"] + 10
    service.write_config(instance, {**settings, "train.max_steps": end})
    sd.systemctl("start", unit)
    last_launcher = assert_started(service, unit)
    sd.wait_for(
        lambda: service.show(unit, "ActiveState")["ActiveState"] == "inactive", timeout=300, interval=0.5,
        what="training to complete",
    )  # fmt: skip
    assert journal.wait_event("ranks_exited", last_launcher)["exit_code"] == 0
    assert service.show(unit, "Result", "ExecMainStatus") == {"Result": "success", "ExecMainStatus": "0"}
    final = final_checkpoint(service.checkpoint_dir(f"instances/{instance}"))
    assert_same_training(final, reference_runs(**{**settings, "train.max_steps": end}))


def test_a_cpu_wait_handover_keeps_the_main_pid_and_the_run_exact(service: Service, follow, reference_runs) -> None:
    """`train.cpu_wait: auto` under the hardened unit: busy loops beside a spinning run make it
    checkpoint and re-execute itself with the other policy. systemd sees one main process throughout
    (the same PID, no restart, READY=1 again is harmless); stopped, then started to end a few steps
    on, the run ends bitwise equal to an unbroken one."""
    sd, instance = service.sd, "handover"
    unit = f"trainer@{instance}.service"
    settings = {"train.cpu_wait": "auto", "train.cpu_threads": 2, "train.epochs": UNTIL_STOPPED}  # stopped below
    service.write_config(instance, settings)
    journal = follow(unit)
    sd.systemctl("start", unit)
    pid = assert_started(service, unit)
    start = journal.wait_event("determinism", pid)
    assert start["others_cpus"] is not None, "the unit cannot read /proc/stat: auto cannot measure"
    if start["cpu_wait_in_force"] != "active":
        sd.systemctl("stop", unit)
        pytest.skip(
            f"other work used {start['others_cpus']} CPUs at start: the run chose bounded, nothing to switch from"
        )
    with busy_loops():
        switch = journal.wait_event("cpu_wait_switch", pid, to="bounded")
    # Switched: the successor is handed its policy (HOLD_S keeps it), and restarts faster without the loops.
    resumed = journal.wait_event("resumed", pid, kind="handover")
    assert position(resumed) == position(switch)
    journal.wait_event("determinism", pid, cpu_wait_in_force="bounded")  # the successor's, same PID
    assert service.show(unit, "MainPID", "NRestarts") == {"MainPID": str(pid), "NRestarts": "0"}

    # Stopped, and started to end 20 steps on (train.max_steps, which a resume may change).
    sd.systemctl("stop", unit)
    stopped = journal.wait_event("stopped", pid)
    end = stopped["global_step"] + 20
    service.write_config(instance, {**settings, "train.max_steps": end})
    sd.systemctl("start", unit)
    last = assert_started(service, unit)
    sd.wait_for(
        lambda: service.show(unit, "ActiveState")["ActiveState"] == "inactive", timeout=300, interval=0.5,
        what="training to complete",
    )  # fmt: skip
    assert service.show(unit, "Result", "ExecMainStatus", "NRestarts") == {
        "Result": "success",
        "ExecMainStatus": "0",
        "NRestarts": "0",
    }
    journal.wait_event("training_completed", last)
    expected = reference_runs(**{**settings, "train.cpu_wait": "bounded", "train.max_steps": end})
    assert_same_training(final_checkpoint(service.checkpoint_dir(f"instances/{instance}")), expected)


def test_exec_failure_does_not_loop(service: Service, follow) -> None:
    """203/EXEC (here a missing interpreter; in real life one under a hidden /root) needs a person."""
    sd, instance = service.sd, "noexec"
    unit = f"trainer@{instance}.service"
    missing = "[Service]\nExecStart=\nExecStart=/nonexistent/trainer run\n"
    sd.write_file(f"{SYSTEM}/{unit}.d/{INSTANCE_DROP_IN}", missing)
    sd.systemctl("daemon-reload")
    journal = follow(unit)
    assert sd.systemctl("start", unit, check=False).returncode != 0
    journal.wait_message(f"{unit}: Main process exited, code=exited, status=203/EXEC")
    assert_stays_down(
        service, unit, journal,
        {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "203", "NRestarts": "0"},
    )  # fmt: skip
    assert journal.starts() == 1


def test_instances_cannot_reach_each_other(service: Service) -> None:
    """trainer@a runs as trainer-a, trainer@b as trainer-b: from inside a (its namespaces, its user),
    b can be neither signalled nor read; a itself can, so the probe works."""
    sd = service.sd
    pids = {}
    for instance in ("alice", "bob"):
        service.write_config(instance, SETTINGS)  # stopped below
        sd.systemctl("start", f"trainer@{instance}.service")
        pids[instance] = int(service.show(f"trainer@{instance}.service", "MainPID")["MainPID"])
    uid = service.uid_of(pids["alice"])

    def from_alice(command: str) -> subprocess.CompletedProcess[str]:
        return sd.run("nsenter", "-t", str(pids["alice"]), "-a", "setpriv", f"--reuid={uid}", f"--regid={uid}",
                      "--keep-groups", "sh", "-c", command, check=False)  # fmt: skip

    for target, reachable in ((pids["alice"], True), (pids["bob"], False)):
        signalled = from_alice(f"kill -0 {target}")
        environ = from_alice(f"cat /proc/{target}/environ")
        assert (signalled.returncode == 0, environ.returncode == 0) == (reachable, reachable), (signalled, environ)
        assert ("PYTHONUNBUFFERED=1" in environ.stdout) == reachable
    assert uid != service.uid_of(pids["bob"])
    assert service.show("trainer@alice.service", "User")["User"] == "trainer-alice"
    for instance in pids:
        sd.systemctl("stop", f"trainer@{instance}.service")
