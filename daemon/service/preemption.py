"""Cloud preemption notices: a thread that polls the platform's metadata service and records the
first notice in the SignalRecorder, as a signal handler records a signal; the step boundary acts on
it (daemon/train/boundary.py): a checkpoint of kind `notice`, or with `preemption.on_notice: stop` a
stop as on SIGTERM.

Each platform's documented endpoint, under `preemption.endpoint` (null: 169.254.169.254):

    aws    PUT /latest/api/token (an IMDSv2 token), then GET /latest/meta-data/spot/instance-action
           every 5 s: 404 until a notice, then {"action": ..., "time": ...}; the deadline is `time`
    gcp    GET /computeMetadata/v1/instance/preempted (Metadata-Flavor: Google): FALSE or TRUE; then
           again with wait_for_change, which answers when it changes; the deadline is 30 s after TRUE
    azure  GET /metadata/scheduledevents (Metadata: true) every 2 s: an event of type Preempt for this
           VM; the deadline is its NotBefore

`auto` asks each once, briefly, on this thread, and watches the one that answers as its platform
does. The thread never holds up training: whatever the service does (hangs, garbage, errors, resets)
is one warning per streak of failures, and polling goes on.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message
from email.utils import parsedate_to_datetime

from daemon import events
from daemon.config.sections import PreemptionConfig
from daemon.service.signals import SignalRecorder

LINK_LOCAL = "http://169.254.169.254"
AWS_ACTIONS = ("terminate", "stop", "hibernate")
AWS_TOKEN_TTL_S = 21600  # the longest IMDSv2 allows
AWS_TOKEN_RENEW_S = 3600  # renewed long before it lapses
GCP_NOTICE_S = 30  # GCP's documented time between the preemption notice and the stop
GCP_WAIT_S = 30  # wait_for_change's own timeout (timeout_sec); the socket waits a little longer
AZURE_VERSION = "2020-07-01"
POLL_S = {"aws": 5.0, "gcp": 1.0, "azure": 2.0}  # gcp: between waits, should a server not wait
REQUEST_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 1.0  # auto: one request to each platform
MAX_BODY = 1 << 16  # every documented answer is a few hundred bytes


class Unanswered(ValueError):
    """The service answered, but not as its platform documents."""


@dataclass(frozen=True)
class Notice:
    platform: str
    action: str  # aws: terminate, stop or hibernate; gcp and azure: preempt
    deadline: str | None  # ISO 8601, UTC; None: unknown


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Message
    body: bytes


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise Unanswered("not JSON") from None
    if not isinstance(value, dict):
        raise Unanswered("not a JSON object")
    return value


def aws_notice(answer: Answer) -> Notice | None:
    """spot/instance-action: 404 while there is no notice."""
    if answer.status == 404:
        return None
    if answer.status != 200:
        raise Unanswered(f"HTTP {answer.status}")
    document = _json(answer.body)
    action, when = document.get("action"), document.get("time")
    if action not in AWS_ACTIONS or not isinstance(when, str):
        raise Unanswered("not an instance-action document")
    try:
        deadline: str | None = _iso(datetime.fromisoformat(when.replace("Z", "+00:00")))
    except ValueError:
        deadline = None  # the action is the notice; an unreadable time only loses the deadline
    return Notice("aws", action, deadline)


def gcp_preempted(answer: Answer) -> bool:
    """instance/preempted: TRUE or FALSE, from a server that says it is Google's."""
    if answer.status != 200:
        raise Unanswered(f"HTTP {answer.status}")
    if answer.headers.get("Metadata-Flavor") != "Google":
        raise Unanswered("no Metadata-Flavor: Google header")
    value = answer.body.strip()
    if value not in (b"TRUE", b"FALSE"):
        raise Unanswered("neither TRUE nor FALSE")
    return value == b"TRUE"


def azure_notice(answer: Answer, vm_name: str) -> Notice | None:
    """Scheduled Events: a Preempt event among `Events` that names this VM among its Resources (the
    events of an availability set's other VMs are listed too)."""
    if answer.status != 200:
        raise Unanswered(f"HTTP {answer.status}")
    found = _json(answer.body).get("Events")
    if not isinstance(found, list):
        raise Unanswered("no Events list")
    for event in found:
        if not isinstance(event, dict) or event.get("EventType") != "Preempt":
            continue
        resources = event.get("Resources")
        if vm_name and isinstance(resources, list) and resources and vm_name not in resources:
            continue
        try:
            deadline: str | None = _iso(parsedate_to_datetime(event.get("NotBefore")))  # type: ignore[arg-type]
        except (TypeError, ValueError, IndexError):  # "" once the event has started, or unreadable
            deadline = None
        return Notice("azure", "preempt", deadline)
    return None


class PreemptionWatcher:
    """On the writing rank, with `preemption.notice` other than off: polls on a daemon thread of its
    own, records the first notice in `signals`, then stops polling."""

    def __init__(self, cfg: PreemptionConfig, signals: SignalRecorder) -> None:
        self.base = (cfg.endpoint or LINK_LOCAL).rstrip("/")
        self.wanted = cfg.notice
        self.stop_on_notice = cfg.on_notice == "stop"
        self.signals = signals
        self.notice: Notice | None = None
        self._closed = threading.Event()
        # Never through a proxy of the environment: the metadata service is this machine's own.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._token: tuple[str, float] | None = None  # aws: the IMDSv2 token and when it was issued
        self._etag: str | None = None  # gcp: the value's version that wait_for_change waits past
        self._vm_name = ""  # azure: this VM's name, which its events list among their Resources

    def start(self) -> PreemptionWatcher:
        # Its events carry the run's context (run_id, pid, rank), which lives in contextvars.
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._run,), name="preemption", daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        platform = self._detect() if self.wanted == "auto" else self.wanted
        events.PREEMPTION_WATCHING.emit(platform=platform, endpoint=self.base)
        if platform is None:
            return
        check = {"aws": self._aws, "gcp": self._gcp, "azure": self._azure}[platform]
        failing = False
        while not self._closed.is_set():
            try:
                notice = check()
                failing = False
            except Exception as exc:  # noqa: BLE001 -- whatever the service does, training goes on
                if not failing:
                    events.PREEMPTION_POLL_FAILED.emit(platform=platform, error=_describe(exc))
                failing = True
                notice = None
            if notice is not None:
                self.notice = notice
                # Logged first: the checkpoint it asks for is never logged before it.
                events.PREEMPTION_NOTICE.emit(platform=notice.platform, deadline=notice.deadline, action=notice.action)
                self.signals.record_notice(stop=self.stop_on_notice)
                return
            self._closed.wait(POLL_S[platform])

    def _detect(self) -> str | None:
        """The platform whose service answers as documented, each asked once, briefly."""
        probes: dict[str, Callable[[float], object]] = {
            "gcp": self._gcp_probe,
            "aws": self._aws_token,
            "azure": self._azure_name,
        }
        for platform, probe in probes.items():
            try:
                probe(PROBE_TIMEOUT_S)
                return platform
            except Exception:  # noqa: BLE001, S112 -- not this platform
                continue
        return None

    def _request(self, method: str, path: str, headers: dict[str, str], timeout: float) -> Answer:
        request = urllib.request.Request(self.base + path, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return Answer(response.status, response.headers, _read(response))
        except urllib.error.HTTPError as error:  # an answer all the same: 404 is aws's "no notice"
            with error:
                return Answer(error.code, error.headers, _read(error))

    # -- aws ---------------------------------------------------------------------------------

    def _aws_token(self, timeout: float | None = None) -> str:
        if self._token is None or time.monotonic() - self._token[1] > AWS_TOKEN_RENEW_S:
            answer = self._request(
                "PUT",
                "/latest/api/token",
                {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)},
                timeout or REQUEST_TIMEOUT_S,
            )
            token = answer.body.decode("ascii", "replace").strip()
            if answer.status != 200 or not token or not token.isprintable():
                raise Unanswered(f"no IMDSv2 token (HTTP {answer.status})")
            self._token = (token, time.monotonic())
        return self._token[0]

    def _aws(self) -> Notice | None:
        path = "/latest/meta-data/spot/instance-action"
        answer = self._request("GET", path, {"X-aws-ec2-metadata-token": self._aws_token()}, REQUEST_TIMEOUT_S)
        if answer.status == 401:  # the token lapsed (the instance was stopped, say): a new one next time
            self._token = None
        return aws_notice(answer)

    # -- gcp ---------------------------------------------------------------------------------

    def _gcp_probe(self, timeout: float) -> None:
        gcp_preempted(self._gcp_get("", timeout))

    def _gcp_get(self, query: str, timeout: float) -> Answer:
        return self._request(
            "GET", "/computeMetadata/v1/instance/preempted" + query, {"Metadata-Flavor": "Google"}, timeout
        )

    def _gcp(self) -> Notice | None:
        if self._etag is None:  # the value now: without a version to wait past, a wait would miss a TRUE already set
            answer = self._gcp_get("", REQUEST_TIMEOUT_S)
        else:
            query = f"?wait_for_change=true&timeout_sec={GCP_WAIT_S}&last_etag={self._etag}"
            answer = self._gcp_get(query, GCP_WAIT_S + REQUEST_TIMEOUT_S)
        if gcp_preempted(answer):
            return Notice("gcp", "preempt", _iso(datetime.now(UTC) + timedelta(seconds=GCP_NOTICE_S)))
        etag = answer.headers.get("ETag", "")
        self._etag = etag if etag.isalnum() else None
        return None

    # -- azure -------------------------------------------------------------------------------

    def _azure_name(self, timeout: float | None = None) -> str:
        answer = self._request(
            "GET",
            "/metadata/instance/compute/name?api-version=2020-09-01&format=text",
            {"Metadata": "true"},
            timeout or REQUEST_TIMEOUT_S,
        )
        name = answer.body.decode("utf-8", "replace").strip()
        if answer.status != 200 or not name:
            raise Unanswered(f"no VM name (HTTP {answer.status})")
        self._vm_name = name
        return name

    def _azure(self) -> Notice | None:
        if not self._vm_name:
            self._azure_name()
        path = f"/metadata/scheduledevents?api-version={AZURE_VERSION}"
        return azure_notice(self._request("GET", path, {"Metadata": "true"}, REQUEST_TIMEOUT_S), self._vm_name)


def _read(response) -> bytes:
    body = response.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise Unanswered("answer too long")
    return body


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
