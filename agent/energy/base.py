"""Energy meter interface.

A meter measures the energy of a window of work: `start()` returns an opaque mark,
`stop(mark)` returns an `EnergyRecord` for the time in between. Unknown energy is
`None`, never 0.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Measurement methods: the way a record's joules were obtained.
METHOD_COUNTER = "counter"          # difference of a hardware energy counter
METHOD_INTEGRATED = "integrated"    # power samples integrated over time
METHOD_ESTIMATED = "estimated"      # a user-configured model, not a measurement
METHOD_NONE = "none"                # no meter: joules is None


@dataclass(frozen=True)
class EnergyRecord:
    """Energy of one window of work."""

    joules: float | None
    seconds: float
    meter: str
    method: str
    rails: tuple[str, ...] = ()
    # True when the window is shorter than the meter's update interval, so the
    # number rests on fewer than two fresh readings.
    below_resolution: bool = False
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict:
        record = asdict(self)
        record["rails"] = list(self.rails)
        return record


class MeterUnavailable(RuntimeError):
    """Error raised when a meter cannot measure on this machine; the message gives the
    reason and the fix."""


class EnergyMeter:
    """Base class: subclasses set `name` and `update_interval_s` and implement the window."""

    name = "none"
    method = METHOD_NONE
    update_interval_s = 0.0

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self, mark: Any) -> EnergyRecord:
        raise NotImplementedError

    def split(self, mark: Any) -> tuple[EnergyRecord, Any]:
        """Close the window of `mark` and open the next one, for back-to-back windows.

        Meters that can end one window and start the next at the same reading override
        this, so no energy falls between the two windows.
        """
        return self.stop(mark), self.start()

    def rail_power(self) -> dict[str, float] | None:
        """Return the latest power of each rail in watts, for meters that read rails."""
        return None

    def close(self) -> None:
        """Release the meter's resources (threads, subprocesses, handles)."""

    def __enter__(self) -> "EnergyMeter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def describe(self) -> dict:
        return {"name": self.name, "method": self.method, "update_interval_s": self.update_interval_s}


class CounterMeter(EnergyMeter):
    """A meter whose window is the difference of two readings of a cumulative counter.

    A mark is (time.monotonic(), `_read()`). Subclasses implement `_read` and `split`,
    which ends a window and starts the next at the same reading.
    """

    def _read(self) -> Any:
        raise NotImplementedError

    def start(self) -> tuple[float, Any]:
        return time.monotonic(), self._read()

    def stop(self, mark: tuple[float, Any]) -> EnergyRecord:
        record, _ = self.split(mark)
        return record


class NoneMeter(EnergyMeter):
    """No energy measurement: every record has joules None."""

    name = "none"
    method = METHOD_NONE

    def start(self) -> float:
        return time.monotonic()

    def stop(self, mark: float) -> EnergyRecord:
        return EnergyRecord(joules=None, seconds=time.monotonic() - mark, meter=self.name, method=self.method)
