"""Jetson power through jetson-stats (jtop), when its service is reachable.

jtop's service reads the INA3221 rails and serves them over the socket /run/jtop.sock
to members of the `jtop` group. Its `power` property is
`{"rail": {NAME: {"power": mW, ...}}, "tot": {"power": mW, "name": NAME?}}`, where
`tot` carries the VDD_IN or POM_5V_IN rail when the board has one. The meter applies
the same total-power rules as the tegrastats meter to those rails, so both meters
cover the same rails on the same board.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from agent.energy.base import MeterUnavailable
from agent.energy.tegrastats import RailPowerMeter

log = logging.getLogger(__name__)

JTOP_SOCKET = Path("/run/jtop.sock")
DEFAULT_INTERVAL_MS = 500


def rails_from_power(power: dict[str, Any]) -> dict[str, float]:
    """Return every rail's power in watts from jtop's `power` dictionary."""
    rails = {name: float(values["power"]) / 1000.0
             for name, values in (power.get("rail") or {}).items() if "power" in values}
    total = power.get("tot") or {}
    if "name" in total and "power" in total:
        rails[str(total["name"])] = float(total["power"]) / 1000.0
    return rails


def _default_client(interval_s: float) -> Any:
    try:
        from jtop import jtop
    except ImportError:
        raise MeterUnavailable("jetson-stats is not installed (`pip install jetson-stats`, "
                               "which also installs the jtop service)") from None
    return jtop(interval=interval_s)


def check_service(socket_path: Path = JTOP_SOCKET) -> None:
    """Raise MeterUnavailable with the reason when the jtop service cannot be reached."""
    if not socket_path.exists():
        raise MeterUnavailable(f"the jtop service is inactive ({socket_path} is missing); "
                               "start it with `sudo systemctl start jtop.service`")
    if not os.access(socket_path, os.R_OK | os.W_OK):
        raise MeterUnavailable(f"no permission on {socket_path}: add the agent's user to the jtop group "
                               "(`sudo usermod -aG jtop USER`) and log in again")


class JtopMeter(RailPowerMeter):
    """Integrates the board total from jtop's rail readings.

    `client_factory(interval_s)` returns an object with jtop's `start()`, `ok()`,
    `power` and `close()`; the default opens jetson-stats' `jtop`.
    """

    name = "jtop"

    def __init__(self, interval_ms: int = DEFAULT_INTERVAL_MS,
                 client_factory: Callable[[float], Any] | None = None,
                 socket_path: Path = JTOP_SOCKET, first_reading_timeout_s: float = 5.0):
        super().__init__(update_interval_s=interval_ms / 1000.0)
        if client_factory is None:
            check_service(socket_path)
            client_factory = _default_client
        self._first_reading = threading.Event()
        self._client = client_factory(self.update_interval_s)
        try:
            self._client.start()
        except Exception as exc:  # noqa: BLE001 - jtop raises JtopException and OSError subclasses
            raise MeterUnavailable(f"jtop did not start: {exc}") from None

        self._thread = threading.Thread(target=self._read_loop, name="jtop-reader", daemon=True)
        self._thread.start()
        if not self._first_reading.wait(first_reading_timeout_s):
            self.close()
            raise MeterUnavailable(f"jtop gave no power reading within {first_reading_timeout_s:g} s")
        if not self.rails:
            seen = self._rails_seen()
            self.close()
            raise MeterUnavailable(f"jtop reports no known total-power rail (rails seen: {seen})")

    def _read_loop(self) -> None:
        failures = 0
        while not self._stop_event.is_set():
            try:
                if not self._client.ok():
                    break
                rails = rails_from_power(self._client.power)
            except Exception as exc:  # noqa: BLE001 - keep measuring through a bad reading
                failures += 1
                if failures in (1, 10, 100) or failures % 1000 == 0:
                    log.warning("jtop: power read failed (%d failures so far): %s", failures, exc)
                self._stop_event.wait(self.update_interval_s)
                continue
            self._add_reading(time.monotonic(), rails)
            self._first_reading.set()
        if not self._stop_event.is_set():
            self.unavailable_note = "the jtop service connection closed"
            log.error("jtop: the service connection closed, so energy is unknown from now on")

    def close(self) -> None:
        self._stop_event.set()
        try:
            self._client.close()
        except Exception as exc:  # noqa: BLE001 - closing must not raise from a broken service
            log.warning("jtop: close failed: %s", exc)
        super().close()

