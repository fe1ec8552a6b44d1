"""The remote tier against a real S3 server (moto's, on loopback), through a proxy that fails the way
networks do: real trainer processes, real signals, a "new machine" made by deleting checkpoint.dir."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from structlog.testing import capture_logs

from daemon.ckpt.lease import RELEASE_WAIT_S, Lease
from daemon.ckpt.remote import RemoteTier
from s3_server import S3_ENVIRONMENT, FaultProxy, S3Server, credentials
from trainer_proc import UNTIL_STOPPED, RunConfig, TrainerProcess, assert_same_training, final_checkpoint

MANIFEST = ".manifest.json"


@pytest.fixture(scope="module")
def s3():
    with credentials():
        server = S3Server()
        yield server
        server.stop()


class Remote:
    """A bucket of its own on the server, reached by the trainer through `proxy`."""

    def __init__(self, s3: S3Server, bucket: str) -> None:
        self.fs = s3.filesystem()
        self.fs.mkdir(bucket)
        self.proxy = FaultProxy((s3.host, s3.port))
        self.prefix = f"{bucket}/run"
        self.settings = {
            "checkpoint.remote": f"s3://{self.prefix}",
            "checkpoint.remote_options": {"endpoint_url": self.proxy.url},
        }

    def names(self) -> set[str]:
        self.fs.invalidate_cache()
        try:
            return {path.rsplit("/", 1)[-1] for path in self.fs.ls(self.prefix, detail=False)}
        except FileNotFoundError:
            return set()

    def committed(self) -> set[str]:
        return {name.removesuffix(MANIFEST) for name in self.names() if name.endswith(MANIFEST)}

    def path(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def commit(self, name: str, data: bytes) -> None:
        """An object and a manifest that matches it, as a run would commit them."""
        self.fs.pipe_file(self.path(name), data)
        manifest = {
            "format": 1,
            "name": name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "committed_at": time.time(),
        }
        self.fs.pipe_file(self.path(name + MANIFEST), json.dumps(manifest).encode())


@pytest.fixture
def remote(s3, request):
    bucket = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    made = Remote(s3, bucket)
    yield made
    made.proxy.close()


def start(config: RunConfig, *extra: str) -> TrainerProcess:
    return TrainerProcess.start(config, *extra, env=S3_ENVIRONMENT)


def one(process: TrainerProcess, event: str, **fields) -> dict:
    found = process.events(event, **fields)
    assert len(found) == 1, f"{len(found)} {event} events; the run's output:\n{process.output()[-6000:]}"
    return found[0]


def new_machine(config: RunConfig) -> None:
    """The local tier is gone, as with a preempted VM's disk."""
    shutil.rmtree(config.checkpoint_dir)


def test_a_new_machine_resumes_from_the_remote_exactly(run_config, remote, reference_runs):
    """SIGKILL during an upload (the partial object is never used), then SIGTERM (the emergency
    checkpoint is uploaded before exit 75), each followed by a start on an empty checkpoint.dir."""
    run_config.settings = {**remote.settings, "checkpoint.every_steps": 10}
    remote.proxy.bytes_per_s = 1_500_000  # a 4.8 MB checkpoint takes ~3 s to upload
    remote.proxy.set_mode("slow")
    first = start(run_config)
    committed = first.wait_for("upload_completed")["name"]
    first.wait_for("upload_started", where=lambda e: e["name"] != committed)
    first.kill()
    killed = first.events("upload_started")[-1]["name"]
    assert killed not in remote.committed() and committed in remote.committed()

    new_machine(run_config)
    remote.proxy.set_mode("pass")
    second = start(run_config)
    resumed = second.wait_for("resumed")
    second.wait_for("checkpoint_saved", where=lambda e: e["checkpoint_global_step"] > resumed["global_step"])
    second.signal(signal.SIGTERM)
    assert second.wait() == 75, second.output()
    downloaded = one(second, "remote_resume")
    assert downloaded["url"].endswith("/" + committed), downloaded
    emergency = one(second, "checkpoint_saved", kind="emergency")
    emergency_name = emergency["path"].rsplit("/", 1)[-1]
    assert emergency["checkpoint_global_step"] > resumed["global_step"]
    assert any(e["name"] == emergency_name for e in second.events("upload_completed")), second.output()
    assert emergency_name in remote.committed()

    new_machine(run_config)
    last = start(run_config)
    assert last.wait() == 0, last.output()
    downloaded = one(last, "remote_resume")
    assert downloaded["url"].endswith("/" + emergency_name)
    assert last.events("resumed")[0]["kind"] == "emergency"
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs())


def test_training_goes_on_through_an_outage_and_a_stop_waits_only_so_long(run_config, remote):
    run_config.settings = {
        **remote.settings,
        "checkpoint.every_steps": 5,
        "checkpoint.remote_stop_timeout_seconds": 3,
        "train.epochs": UNTIL_STOPPED,
    }
    first = start(run_config)
    first.wait_for("upload_completed")
    remote.proxy.set_mode("refuse")  # the server is down
    failed = first.wait_for("upload_failed")
    assert failed["retry_in_s"] >= 1 and failed["error"], failed
    # Training goes on meanwhile, saving locally.
    saved = first.events("checkpoint_saved")[-1]["checkpoint_global_step"]
    first.wait_for("checkpoint_saved", where=lambda e: e["checkpoint_global_step"] >= saved + 10)
    assert first.popen.poll() is None

    remote.proxy.set_mode("pass")  # back: the newest checkpoint is uploaded
    recovered = first.wait_for("upload_completed", where=lambda e: e["timestamp"] > failed["timestamp"])
    assert recovered["name"] in remote.committed()

    remote.proxy.set_mode("stall")  # a hung server at stop time
    signalled = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait() == 75, first.output()
    assert time.monotonic() - signalled < 3 + 30, "the stop waited past its timeout"
    abandoned = one(first, "upload_abandoned")
    # The stop's checkpoint: an emergency one, or the epoch's when the signal met an epoch's end.
    newest = max(path.name for path in run_config.checkpoint_dir.glob("ckpt-*.pt"))
    assert abandoned["name"] == newest and abandoned["waited_s"] >= 3, abandoned
    assert newest not in remote.committed()

    # The same machine resumes from its local copy, and uploads it.
    remote.proxy.set_mode("pass")
    second = start(run_config)
    resumed = second.wait_for("resumed")
    assert resumed["path"].endswith(newest) and not second.events("remote_resume"), resumed
    second.wait_for("upload_completed", name=newest)
    second.signal(signal.SIGTERM)
    assert second.wait() == 75, second.output()


def test_corrupted_forged_and_uncommitted_remote_objects_are_never_used(run_config, remote, reference_runs):
    run_config.settings = {**remote.settings, "checkpoint.every_steps": 10, "train.epochs": 1}
    first = start(run_config)
    assert first.wait() == 0, first.output()
    committed = sorted(remote.committed())
    newest = committed[-1]
    assert newest.endswith("-final.pt"), committed

    real = remote.fs.cat_file(remote.path(newest))
    flipped = bytearray(real)
    flipped[len(flipped) // 2] ^= 0xFF
    remote.fs.pipe_file(remote.path(newest), bytes(flipped))  # corrupted after its commit
    forged = "ckpt-0000009999-periodic.pt"
    with open(run_config.workdir / "forged.pt", "wb") as file:
        torch.save({"format_version": 1, "kind": "periodic", "global_step": 9999}, file)
    remote.commit(forged, (run_config.workdir / "forged.pt").read_bytes())  # a manifest that matches its bytes
    remote.fs.pipe_file(remote.path("ckpt-0000009000-periodic.pt" + MANIFEST), b"{not json")
    remote.fs.pipe_file(remote.path("ckpt-0000009000-periodic.pt"), real)
    remote.fs.pipe_file(remote.path("ckpt-0000008000-periodic.pt"), real)  # an upload killed before its manifest

    new_machine(run_config)
    run_config.settings["train.epochs"] = 3
    second = start(run_config)
    assert second.wait() == 0, second.output()

    invalid = {event["path"].rsplit("/", 1)[-1]: event for event in second.events("checkpoint_invalid")}
    assert "SHA-256" in invalid[newest + MANIFEST]["reason"], invalid
    assert "ckpt-0000009000-periodic.pt" + MANIFEST in invalid
    assert forged + MANIFEST in invalid  # its content: not a checkpoint of this run
    for name in (newest, forged, "ckpt-0000009000-periodic.pt"):
        assert name + MANIFEST + ".invalid" in remote.names(), remote.names()
    downloaded = one(second, "remote_resume")
    assert downloaded["url"].endswith("/" + committed[-2]), downloaded
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs())


def plant_lease(remote: Remote, host: str, expires_in: float) -> None:
    """The lease another machine's run holds (or held, when it has lapsed)."""
    lease = {"host": host, "pid": 4242, "token": "0123456789abcdef", "expires_at": time.time() + expires_in}
    remote.fs.pipe_file(remote.path("lease.json"), json.dumps(lease).encode())


def test_one_run_per_remote_prefix(run_config, remote, mnist_root, tmp_path_factory):
    run_config.settings = {**remote.settings, "train.epochs": UNTIL_STOPPED, "checkpoint.remote_lease_seconds": 3}
    other = RunConfig(tmp_path_factory.mktemp("other-machine"), mnist_root, dict(run_config.settings))
    first = start(run_config)
    first.wait_for("run_started")

    other.settings["train.max_steps"] = 20  # a run the lease failed to refuse ends soon
    second = start(other)
    assert second.wait() == 69, second.output()
    del other.settings["train.max_steps"]
    in_use = one(second, "remote_in_use")
    assert in_use["holder"] == f"{socket.gethostname()} PID {first.pid}", in_use

    first.kill()  # its lease stays behind; its process is gone
    third = start(other)
    taken = third.wait_for("lease_taken_over")
    assert taken["reason"] == "its process on this host is gone", taken
    third.wait_for("epoch_started")

    plant_lease(remote, "another-machine", 60)  # another run took the lease over
    other.settings["train.max_steps"] = 20
    lost = third.wait_for("lease_lost")
    assert third.wait() == 69 and "another-machine" in lost["holder"], third.output()

    fourth = start(other)  # with train.max_steps: see `second`
    assert fourth.wait() == 69, fourth.output()
    assert fourth.events("remote_in_use")[0]["holder"] == "another-machine PID 4242"

    plant_lease(remote, "another-machine", -1)  # it lapsed: that machine stopped renewing
    fifth = start(run_config)
    assert fifth.wait_for("lease_taken_over")["reason"] == "it lapsed"
    fifth.wait_for("epoch_started")
    fifth.signal(signal.SIGTERM)
    assert fifth.wait() == 75, fifth.output()
    # A run that ends releases its lease, or says why not (its store too slow: a machine this loaded).
    assert "lease.json" not in remote.names() or fifth.events("lease_not_released"), fifth.output()


def test_a_lease_the_store_does_not_let_go_of_in_time_is_reported(remote):
    """A run's end waits RELEASE_WAIT_S for its lease's removal; a store that stops answering leaves the
    lease to lapse, and the run says so instead of exiting as if it had been released."""
    tier = RemoteTier(remote.settings["checkpoint.remote"], remote.settings["checkpoint.remote_options"])
    lease = Lease(tier, 60.0)
    lease.acquire()
    remote.proxy.set_mode("stall")
    remote.proxy.cut()  # the pooled connections too: every request from here on hangs

    with capture_logs() as logs:
        lease.release()

    (report,) = [log for log in logs if log["event"] == "lease_not_released"]
    assert report["reason"] == f"no answer within {RELEASE_WAIT_S:g} s" and report["waited_s"] >= RELEASE_WAIT_S
    assert "lease.json" in remote.names()  # left to lapse


def with_secret(remote: Remote) -> dict:
    options = remote.settings["checkpoint.remote_options"]
    return {**remote.settings, "checkpoint.remote_options": {**options, "aws_secret_access_key": "x"}}


@pytest.mark.parametrize(
    ("settings", "mode", "exit_code", "event", "says"),
    [
        (lambda r: {**r.settings, "checkpoint.remote": "s3://no-such-bucket/run"}, "pass", 78, "config_error", "does not exist"),
        (lambda r: {**r.settings, "checkpoint.remote": "s3:/bucket"}, "pass", 78, "config_error", "is not a URL"),
        (with_secret, "pass", 78, "config_error", "looks like a credential"),
        (lambda r: r.settings, "deny_writes", 73, "checkpoint_write_failed", "no permission"),
        (lambda r: r.settings, "refuse", 69, "remote_unreachable", "did not answer"),
    ],
    ids=["no-bucket", "malformed-url", "credential-in-config", "no-write-permission", "unreachable"],
)  # fmt: skip
def test_bad_remote_settings_are_refused_before_training(run_config, remote, settings, mode, exit_code, event, says):
    run_config.settings = settings(remote)
    remote.proxy.set_mode(mode)
    process = start(run_config)
    assert process.wait() == exit_code, process.output()
    error = one(process, event)
    assert says in error["message"] and "checkpoint.remote" in error["message"], error
    assert not process.events("epoch_started") and not process.events("crashed")


def test_status_shows_the_remote_tier_and_survives_a_planted_state_file(run_config, remote):
    run_config.settings = {**remote.settings, "checkpoint.every_steps": 10, "train.epochs": 1}
    assert start(run_config).wait() == 0

    def status() -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "daemon", "status", "--config", str(run_config.write()), "--json"],
            cwd=run_config.workdir, capture_output=True, text=True, env={**os.environ, **S3_ENVIRONMENT},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)["remote"]

    shown = status()
    assert shown["newest"] == "ckpt-0000000040-final.pt" and shown["newest_age_s"] >= 0, shown
    assert shown["pending"] == [] and shown["last_error"] is None

    state = run_config.checkpoint_dir / "remote-state.json"
    state.unlink()
    os.mkfifo(state)  # would hang a reader that opens it blocking
    assert "not a regular file" in status()["uploader_state_unusable"]
    state.unlink()
    state.symlink_to("/etc/shadow")
    assert "link" in status()["uploader_state_unusable"]


def test_verify_resumes_on_a_new_machine_each_time(run_config, remote):
    run_config.settings = remote.settings
    path = run_config.write()
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "verify", "--config", str(path), "--steps", "40", "--json"],
        cwd=run_config.workdir, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        env={**os.environ, **S3_ENVIRONMENT},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"], report
    assert report["interruptions"][2]["resumed_from"]["kind"] == "emergency"
    assert not remote.names(), "verify removes what it uploaded"
