"""sd_notify datagrams, read from a real AF_UNIX socket standing in for systemd's."""

from __future__ import annotations

import os
import socket
import time

import pytest

from daemon.service.notify import Notifier


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def received(sock) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())


def test_messages_reach_the_socket(listener):
    path, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})

    notifier.ready("epoch 1/5 step 0/600")
    notifier.status("epoch 1/5 step 10/600 loss 0.5")
    notifier.extend_timeout(12.5)
    notifier.stopping("saving")

    assert received(sock) == {"READY": "1", "STATUS": "epoch 1/5 step 0/600", "MAINPID": str(os.getpid())}
    assert received(sock) == {"STATUS": "epoch 1/5 step 10/600 loss 0.5"}
    assert received(sock) == {"EXTEND_TIMEOUT_USEC": "12500000"}
    assert received(sock) == {"STOPPING": "1", "STATUS": "saving"}


def test_abstract_socket_address():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"trainer-test-{os.getpid()}"
    sock.bind("\0" + name)
    sock.settimeout(2)
    with sock:
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert received(sock) == {"STATUS": "hello"}


def test_watchdog_is_sent_at_twice_the_rate_systemd_expects(listener):
    path, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})

    notifier.watchdog()
    notifier.watchdog()  # within 0.1 s of the first: not sent
    time.sleep(0.11)
    notifier.watchdog()

    assert received(sock) == {"WATCHDOG": "1"}
    assert received(sock) == {"WATCHDOG": "1"}
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_watchdog_meant_for_another_process_is_not_ours(listener):
    path, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    notifier.watchdog()
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_without_notify_socket_everything_is_a_no_op():
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("x")
    notifier.watchdog()
    notifier.stopping("x")
