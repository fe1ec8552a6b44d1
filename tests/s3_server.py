"""A real S3 endpoint on loopback for the remote tier's tests: moto's server (it speaks S3's HTTP
protocol), and in front of it a proxy that fails the way networks and stores do.

The trainer under test talks to the proxy. Its modes:

    pass          every byte relayed both ways
    refuse        each new connection is closed at once, and open ones are cut (the server is down)
    stall         connections are accepted and never answered (a hung server or a black-holed route)
    slow          relayed at `bytes_per_s` each way (a thin link: an upload takes seconds)
    deny_writes   PUT, POST and DELETE are answered 403 AccessDenied, as S3 answers a role without
                  write permission; reads are relayed (one request per connection)
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

S3_ENVIRONMENT = {
    # moto accepts any credentials; the trainer finds these through botocore's standard chain.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No instance-metadata lookups for credentials or region off-cloud.
    "AWS_EC2_METADATA_DISABLED": "true",
}

ACCESS_DENIED = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
ACCESS_DENIED_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
)


class S3Server:
    """moto's S3 server on 127.0.0.1, in this process (the trainer is another)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        self.url = f"http://{self.host}:{self.port}"

    def filesystem(self):
        """An s3fs filesystem on this server, straight (not through any proxy), for the test's own looks
        (with S3_ENVIRONMENT's credentials: use it inside `credentials()`)."""
        import fsspec

        return fsspec.filesystem("s3", endpoint_url=self.url, skip_instance_cache=True)

    def stop(self) -> None:
        self._server.stop()


@contextlib.contextmanager
def credentials() -> Iterator[None]:
    """S3_ENVIRONMENT in this process, for the test's own filesystem."""
    saved = {key: os.environ.get(key) for key in S3_ENVIRONMENT}
    os.environ.update(S3_ENVIRONMENT)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream` (host, port), whose mode a test sets."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.bytes_per_s = 1_000_000
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "refuse", "stall", "slow", "deny_writes"), mode
        self.mode = mode
        if mode in ("refuse", "deny_writes"):
            self.cut()

    def cut(self) -> None:
        """Close every open connection (a client reusing one finds it reset)."""
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
            self._open.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            mode = self.mode
            if mode == "refuse":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # a reset, as from a port nobody listens on
                continue
            self._track(client)
            target = self._stall if mode == "stall" else self._one_request if mode == "deny_writes" else self._relay
            threading.Thread(target=target, args=(client,), daemon=True).start()

    def _stall(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while client.recv(65536):
                pass

    def _relay(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        self._track(server)
        threading.Thread(target=self._pump, args=(server, client), daemon=True).start()
        self._pump(client, server)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                limit = 16384 if self.mode == "slow" else 65536
                data = source.recv(limit)
                if not data:
                    break
                if self.mode == "stall":
                    continue  # swallowed: nothing comes back
                if self.mode == "slow":
                    time.sleep(len(data) / self.bytes_per_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _one_request(self, client: socket.socket) -> None:
        """deny_writes: read one request; answer a write 403, relay a read with `Connection: close`."""
        try:
            head, body = _read_request(client)
            method = head.split(b" ", 1)[0]
            if method in (b"PUT", b"POST", b"DELETE"):
                client.sendall(ACCESS_DENIED % (len(ACCESS_DENIED_BODY), ACCESS_DENIED_BODY))
                return
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
            server = socket.create_connection(self.upstream)
            server.sendall(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body)
            while data := server.recv(65536):
                client.sendall(data)
            server.close()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()


def _read_request(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP request's head (without its blank line) and body (Content-Length or chunked)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("closed before a request")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    headers = {
        line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")[1:]
        if b":" in line
    }
    if headers.get(b"expect", b"").lower() == b"100-continue":
        return head, rest  # the body follows only once the server says so: a refusal answers first
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return head, rest
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return head, rest
