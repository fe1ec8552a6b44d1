"""A cloud's metadata service on 127.0.0.1, for `preemption.endpoint`: the documented answers of AWS
(IMDSv2), GCP and Azure (Scheduled Events) before and after a preemption notice, or a misbehaviour.

    with MetadataServer("aws") as server:   # preemption.endpoint: server.url
        ...
        server.announce()                   # from here the platform answers with a notice
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PLATFORMS = ("aws", "gcp", "azure")
MISBEHAVIOURS = ("hang", "garbage", "500", "reset")
AWS_NOTICE = {"action": "terminate", "time": "2026-05-01T12:00:00Z"}
AZURE_VM = "trainer-vm"
AZURE_NOT_BEFORE = "Fri, 01 May 2026 12:00:00 GMT"
WAIT_BOUND_S = 3.0  # gcp's wait_for_change blocks at most this long here, whatever timeout_sec asks
HANG_S = 60.0  # a hanging answer is never sent: the client gives up first


class MetadataServer:
    def __init__(self, platform: str, misbehaviour: str | None = None) -> None:
        assert platform in PLATFORMS and misbehaviour in (None, *MISBEHAVIOURS)
        self.platform = platform
        self.misbehaviour = misbehaviour
        self.requests: list[str] = []  # "METHOD path", as they arrive
        self.announced = threading.Event()
        self.closed = threading.Event()
        self.tokens: set[str] = set()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def announce(self) -> None:
        self.announced.set()

    def withdraw(self) -> None:
        self.announced.clear()

    def close(self) -> None:
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> MetadataServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the answers -------------------------------------------------------------------------

    def answer(self, method: str, path: str, headers) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(path)
        query = parse_qs(url.query)
        if self.platform == "aws":
            return self._aws(method, url.path, headers)
        if self.platform == "gcp":
            return self._gcp(method, url.path, query, headers)
        return self._azure(method, url.path, headers)

    def _aws(self, method: str, path: str, headers) -> tuple[int, dict[str, str], bytes]:
        if method == "PUT" and path == "/latest/api/token":
            if not headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return 400, {}, b"Bad Request"
            token = f"token-{len(self.tokens)}"
            self.tokens.add(token)
            return 200, {}, token.encode()
        if method == "GET" and path == "/latest/meta-data/spot/instance-action":
            if headers.get("X-aws-ec2-metadata-token") not in self.tokens:
                return 401, {}, b"Unauthorized"
            if not self.announced.is_set():
                return 404, {}, b"Not Found"
            return 200, {"Content-Type": "text/plain"}, json.dumps(AWS_NOTICE).encode()
        return 404, {}, b"Not Found"

    def _gcp(self, method: str, path: str, query: dict, headers) -> tuple[int, dict[str, str], bytes]:
        google = {"Metadata-Flavor": "Google"}
        if method != "GET" or path != "/computeMetadata/v1/instance/preempted":
            return 404, google, b"Not Found"
        if headers.get("Metadata-Flavor") != "Google":
            return 403, google, b"Missing Metadata-Flavor:Google header."
        if query.get("wait_for_change") == ["true"] and query.get("last_etag") == [self._gcp_etag()]:
            bound = min(float(query.get("timeout_sec", ["3600"])[0]), WAIT_BOUND_S)
            self.announced.wait(bound)  # answers when the value changes, or with it unchanged at the timeout
        value = b"TRUE" if self.announced.is_set() else b"FALSE"
        return 200, {**google, "ETag": self._gcp_etag(), "Content-Type": "application/text"}, value

    def _gcp_etag(self) -> str:
        return "e2" if self.announced.is_set() else "e1"

    def _azure(self, method: str, path: str, headers) -> tuple[int, dict[str, str], bytes]:
        if headers.get("Metadata") != "true":
            return 400, {}, json.dumps({"error": "Bad request. Required metadata header not specified"}).encode()
        if method == "GET" and path == "/metadata/instance/compute/name":
            return 200, {"Content-Type": "text/plain"}, AZURE_VM.encode()
        if method == "GET" and path == "/metadata/scheduledevents":
            # Another VM of the availability set is preempted first: not a notice for this one.
            others = _azure_event("other-vm", "A")
            found = [others, _azure_event(AZURE_VM, "B")] if self.announced.is_set() else [others]
            body = {"DocumentIncarnation": len(found), "Events": found}
            return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()
        return 404, {}, b"Not Found"


def _azure_event(vm: str, event_id: str) -> dict:
    return {
        "EventId": event_id,
        "EventStatus": "Scheduled",
        "EventType": "Preempt",
        "ResourceType": "VirtualMachine",
        "Resources": [vm],
        "NotBefore": AZURE_NOT_BEFORE,
        "Description": "",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
    }


def _handler(server: MetadataServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            server.requests.append(f"{self.command} {self.path}")
            if server.misbehaviour == "hang":
                server.closed.wait(HANG_S)
                return
            if server.misbehaviour == "garbage":
                self.wfile.write(b"\x00\xffnot HTTP at all{{{\r\n\r\n")
                return
            if server.misbehaviour == "reset":  # SO_LINGER 0: the close sends a RST
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                return
            if server.misbehaviour == "500":
                status, headers, body = 500, {}, b"Internal Server Error"
            else:
                status, headers, body = server.answer(self.command, self.path, self.headers)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = _serve

        def log_message(self, format: str, *args: object) -> None:
            pass  # the test's output is the trainer's

    return Handler


def wait_for_requests(server: MetadataServer, count: int, timeout: float = 30.0) -> None:
    """Until the server has seen `count` requests."""
    deadline = time.monotonic() + timeout
    while len(server.requests) < count:
        assert time.monotonic() < deadline, f"{len(server.requests)} requests in {timeout} s: {server.requests}"
        time.sleep(0.02)
