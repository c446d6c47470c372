"""sd_notify messages over a real unix datagram socket, as systemd receives them."""

import os
import socket

import pytest

from agent.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_notifier_sends_ready_and_watchdog(notify_socket):
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    assert notifier.enabled
    assert notifier.ready("serving")
    assert sock.recv(256) == b"READY=1\nSTATUS=serving"
    assert notifier.watchdog()
    assert sock.recv(256) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(256) == b"STOPPING=1"
    notifier.close()


def test_notifier_without_systemd_is_noop():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval_s is None


def test_notifier_watchdog_interval_is_half_timeout():
    notifier = Notifier({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == pytest.approx(5.0)


def test_notifier_ignores_watchdog_of_other_pid():
    notifier = Notifier({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.watchdog_interval_s is None


def test_notifier_reports_missing_socket(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    assert notifier.ready() is False
    notifier.close()
