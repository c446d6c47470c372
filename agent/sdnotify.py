"""systemd service notification (sd_notify) without libsystemd.

Under a unit with `Type=notify`, systemd passes the path of a datagram socket in
`NOTIFY_SOCKET`. The service sends `READY=1` once it serves and `STOPPING=1` on
shutdown. When `WatchdogSec=` is set, it also sends `WATCHDOG=1` at least every
`WATCHDOG_USEC / 2` microseconds. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("moe2.agent.sdnotify")


class Notifier:
    """Send sd_notify messages to the socket named in NOTIFY_SOCKET, if any."""

    def __init__(self, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        # An address starting with '@' is in the Linux abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        applies_here = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval_s: float | None = None
        if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and applies_here:
            # Ping at half the timeout, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval_s = int(watchdog_usec) / 2e6

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, state: str) -> bool:
        """Send one state string such as "READY=1"; return False when not under systemd."""
        if not self._address:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(state.encode("utf-8"), self._address)
        except OSError as exc:
            log.warning("sd_notify %r to %r failed: %s", state, self._address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
