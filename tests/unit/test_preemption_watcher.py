"""The preemption watcher: each platform's documented answers parsed, and the watcher polling a fake
metadata service (tests/metadata_server.py) on its thread, as it does in a run."""

from __future__ import annotations

import json
import time
from email.message import Message

import pytest
from structlog.testing import capture_logs

from daemon.config.sections import CheckpointConfig, Config, PreemptionConfig
from daemon.errors import ConfigError
from daemon.ops import status
from daemon.service import preemption
from daemon.service.preemption import Answer, Notice, PreemptionWatcher, Unanswered
from daemon.service.signals import SignalRecorder
from metadata_server import AZURE_NOT_BEFORE, AZURE_VM, MISBEHAVIOURS, PLATFORMS, MetadataServer, wait_for_requests


def answer(status: int, body: bytes | str | dict, **headers: str) -> Answer:
    message = Message()
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    return Answer(status, message, data)


# -- the documented answers -------------------------------------------------------------------


def test_aws_instance_action():
    assert preemption.aws_notice(answer(404, "Not Found")) is None
    notice = preemption.aws_notice(answer(200, {"action": "stop", "time": "2026-05-01T12:00:00Z"}))
    assert notice == Notice("aws", "stop", "2026-05-01T12:00:00Z")
    unreadable_time = preemption.aws_notice(answer(200, {"action": "terminate", "time": "soon"}))
    assert unreadable_time == Notice("aws", "terminate", None)


@pytest.mark.parametrize(
    "bad",
    [
        answer(500, "Internal Server Error"),
        answer(200, b"\x00\xff{"),
        answer(200, "[1, 2]"),
        answer(200, {"action": "explode", "time": "2026-05-01T12:00:00Z"}),
        answer(200, {"action": "terminate"}),
    ],
)
def test_aws_refuses_what_it_does_not_document(bad):
    with pytest.raises(Unanswered):
        preemption.aws_notice(bad)


def test_gcp_preempted():
    assert preemption.gcp_preempted(answer(200, "FALSE", Metadata_Flavor="Google")) is False
    assert preemption.gcp_preempted(answer(200, "TRUE\n", Metadata_Flavor="Google")) is True
    for bad in (answer(200, "TRUE"), answer(200, "maybe", Metadata_Flavor="Google"), answer(503, "TRUE")):
        with pytest.raises(Unanswered):
            preemption.gcp_preempted(bad)  # a server that is not Google's, garbage, an error


def azure_events(*events: dict) -> Answer:
    return answer(200, {"DocumentIncarnation": 1, "Events": list(events)})


def test_azure_scheduled_events():
    preempt = {"EventType": "Preempt", "Resources": [AZURE_VM], "NotBefore": AZURE_NOT_BEFORE}
    assert preemption.azure_notice(azure_events(), AZURE_VM) is None
    assert preemption.azure_notice(azure_events({**preempt, "EventType": "Freeze"}), AZURE_VM) is None
    assert preemption.azure_notice(azure_events({**preempt, "Resources": ["other-vm"]}), AZURE_VM) is None
    assert preemption.azure_notice(azure_events(preempt), AZURE_VM) == Notice(
        "azure", "preempt", "2026-05-01T12:00:00Z"
    )
    started = preemption.azure_notice(azure_events({**preempt, "NotBefore": ""}), AZURE_VM)
    assert started == Notice("azure", "preempt", None)
    for bad in (answer(200, {"Events": "none"}), answer(200, "<html>"), answer(404, "Not Found")):
        with pytest.raises(Unanswered):
            preemption.azure_notice(bad, AZURE_VM)


@pytest.mark.parametrize(
    ("key", "value"),
    [("notice", "oracle"), ("on_notice", "pray"), ("endpoint", "127.0.0.1:8080"), ("endpoint", "http://h/?x=1")],
)
def test_config_names_the_bad_key(key, value):
    with pytest.raises(ConfigError, match=f"preemption.{key}"):
        PreemptionConfig(**{key: value})


# -- the watcher against a metadata service ---------------------------------------------------


@pytest.fixture
def fast(monkeypatch):
    """Polls and timeouts of a fraction of a second, so that a test sees many."""
    for platform in PLATFORMS:
        monkeypatch.setitem(preemption.POLL_S, platform, 0.05)
    monkeypatch.setattr(preemption, "REQUEST_TIMEOUT_S", 0.3)
    monkeypatch.setattr(preemption, "PROBE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(preemption, "GCP_WAIT_S", 1)


def watch(
    server: MetadataServer, notice: str, on_notice: str = "checkpoint"
) -> tuple[PreemptionWatcher, SignalRecorder]:
    signals = SignalRecorder()
    watcher = PreemptionWatcher(PreemptionConfig(notice=notice, endpoint=server.url, on_notice=on_notice), signals)
    return watcher.start(), signals


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.02)


@pytest.mark.parametrize("notice", ["named", "auto"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_notice_is_recorded_as_a_checkpoint_request(fast, platform, notice):
    with MetadataServer(platform) as server, capture_logs() as logs:
        watcher, signals = watch(server, platform if notice == "named" else "auto")
        wait_for_requests(server, 4)  # polled a while without a notice
        assert not signals.save_requested
        server.announce()
        wait_until(lambda: signals.save_requested)
        watcher.close()
    assert watcher.notice is not None and watcher.notice.platform == platform
    assert not signals.stop_requested
    assert signals.take_save_request() == "notice"
    assert signals.take_save_request() is None  # consumed
    (logged,) = [e for e in logs if e["event"] == "preemption_notice"]
    assert logged["platform"] == platform and logged["action"] == watcher.notice.action
    assert logged["deadline"] == watcher.notice.deadline and logged["deadline"].endswith("Z")
    assert [e["platform"] for e in logs if e["event"] == "preemption_watching"] == [platform]


def test_a_notice_with_on_notice_stop_is_a_stop_request(fast):
    with MetadataServer("gcp") as server:
        server.announce()
        watcher, signals = watch(server, "gcp", on_notice="stop")
        wait_until(lambda: signals.stop_requested)
        watcher.close()
    assert not signals.save_requested and not signals.stops  # no signal: FORCE_EXIT_AFTER counts signals only


def test_auto_finds_no_platform_and_stops_quietly(fast):
    with MetadataServer("aws", misbehaviour="500") as server, capture_logs() as logs:
        watch(server, "auto")
        wait_until(lambda: any(e["event"] == "preemption_watching" for e in logs))
        seen = len(server.requests)
        time.sleep(0.3)  # several poll intervals
        assert len(server.requests) == seen == 3, server.requests  # one probe each, then nothing
    assert [e["platform"] for e in logs if e["event"] == "preemption_watching"] == [None]
    assert not [e for e in logs if e["log_level"] == "warning"]


@pytest.mark.parametrize("misbehaviour", MISBEHAVIOURS)
def test_a_misbehaving_service_is_one_warning_and_polling_goes_on(fast, misbehaviour):
    with MetadataServer("aws", misbehaviour=misbehaviour) as server, capture_logs() as logs:
        watcher, signals = watch(server, "aws")
        wait_for_requests(server, 3)  # a streak of failures
        server.misbehaviour = None  # the service recovers, with a notice
        server.announce()
        wait_until(lambda: signals.save_requested)
        watcher.close()
    warnings = [e for e in logs if e["log_level"] == "warning" and e["event"] != "preemption_notice"]
    assert [e["event"] for e in warnings] == ["preemption_poll_failed"], warnings
    assert warnings[0]["platform"] == "aws" and warnings[0]["error"]


# -- trainer status ---------------------------------------------------------------------------


def test_status_shows_a_notice_until_the_run_resumes(tmp_path, capsys):
    def record(name: str, **fields) -> str:
        return json.dumps({"record": name, "epoch": 0, "step_in_epoch": 7, "global_step": 7, "time": 1.0, **fields})

    history = tmp_path / "metrics.jsonl"
    cfg = Config(checkpoint=CheckpointConfig(dir=str(tmp_path)))
    history.write_text(record("checkpoint", kind="on_demand") + "\n")
    assert status.report(cfg)["preemption_notice"] is None

    history.write_text(record("checkpoint", kind="notice") + "\n")
    report = status.report(cfg)
    assert report["preemption_notice"] == {"global_step": 7, "time": 1.0}
    status.show(report, as_json=False)
    assert "preemption notice" in capsys.readouterr().out

    history.write_text(record("checkpoint", kind="notice") + "\n" + record("resume", kind="emergency") + "\n")
    assert status.report(cfg)["preemption_notice"] is None  # the machine that got it is gone
