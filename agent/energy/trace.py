"""Power samples over time and their integral, for meters that read power, not energy.

`PowerTrace` keeps timestamped total-power samples and integrates the piecewise-linear
curve through them (the trapezoidal rule) over any window. Before the first sample and
after the latest one, the nearest sample's power is held; the record stores for how many
seconds (`extra["extrapolated_s"]`), because a window that ends between two samples is
normal for per-step windows. `SampledMeter` turns a trace into the meter interface.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from agent.energy.base import METHOD_INTEGRATED, EnergyMeter, EnergyRecord

log = logging.getLogger(__name__)

# One hour of samples is kept; a window that starts earlier is reported as unknown.
DEFAULT_HORIZON_S = 3600.0
# A window end this far past the latest sample (plus 5 update intervals) means the
# sampler stalled, so the energy is reported as unknown instead of extrapolated.
STALE_MARGIN_S = 1.0


@dataclass(frozen=True)
class Integral:
    joules: float | None
    samples: int              # samples strictly inside the window
    extrapolated_s: float     # window seconds outside the first-to-latest sample span
    note: str | None = None


class PowerTrace:
    """Thread-safe timestamped power samples (monotonic seconds, watts).

    A sample's watts may be None when that reading had no total (for example a
    tegrastats line without a known total rail). A window touching such a sample has
    unknown energy.
    """

    def __init__(self, horizon_s: float = DEFAULT_HORIZON_S):
        self.horizon_s = horizon_s
        self._samples: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()
        self._dropped_before: float | None = None

    def add(self, timestamp: float, watts: float | None) -> None:
        value = float("nan") if watts is None else float(watts)
        with self._lock:
            self._samples.append((timestamp, value))
            while self._samples and self._samples[0][0] < timestamp - self.horizon_s:
                self._dropped_before = self._samples.popleft()[0]

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)

    def latest(self) -> tuple[float, float | None] | None:
        with self._lock:
            if not self._samples:
                return None
            timestamp, watts = self._samples[-1]
        return timestamp, (None if np.isnan(watts) else watts)

    def integrate(self, start: float, stop: float) -> Integral:
        """Integrate power over [start, stop] (monotonic seconds) into joules."""
        with self._lock:
            samples = list(self._samples)
            dropped_before = self._dropped_before
        if not samples:
            return Integral(None, 0, 0.0, "no power sample yet")
        if dropped_before is not None and start <= dropped_before:
            return Integral(None, 0, 0.0, f"window starts more than {self.horizon_s:g} s back, "
                                          "before the oldest kept power sample")
        times = np.array([t for t, _ in samples])
        watts = np.array([w for _, w in samples])

        # The samples that shape the curve over the window: those inside it, plus the
        # nearest one on each side for the interpolated end points.
        first = max(int(np.searchsorted(times, start, side="right")) - 1, 0)
        last = min(int(np.searchsorted(times, stop, side="left")), len(times) - 1)
        if np.any(np.isnan(watts[first:last + 1])):
            return Integral(None, 0, 0.0, "a power reading in the window had no total power")

        inside = (times > start) & (times < stop)
        points = np.concatenate([[start], times[inside], [stop]])
        values = np.interp(points, times, watts)
        joules = float(np.sum((values[1:] + values[:-1]) * np.diff(points)) / 2.0)
        extrapolated = max(0.0, stop - max(start, times[-1])) + max(0.0, min(stop, times[0]) - start)
        return Integral(joules, int(inside.sum()), extrapolated)


class SampledMeter(EnergyMeter):
    """A meter whose energy is the integral of a `PowerTrace` over the window.

    Subclasses feed `self.trace` (from a polling thread started with `_start_polling`
    or from their own reader) and keep `self.rails` naming the rails the total covers.
    """

    method = METHOD_INTEGRATED

    def __init__(self, update_interval_s: float, horizon_s: float = DEFAULT_HORIZON_S):
        self.update_interval_s = update_interval_s
        self.trace = PowerTrace(horizon_s)
        self.rails: tuple[str, ...] = ()
        self.unavailable_note: str | None = None
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> float:
        return time.monotonic()

    def stop(self, mark: float) -> EnergyRecord:
        return self._record(mark, time.monotonic())

    def split(self, mark: float) -> tuple[EnergyRecord, float]:
        now = time.monotonic()
        return self._record(mark, now), now

    def _record(self, start: float, stop: float) -> EnergyRecord:
        seconds = stop - start
        below_resolution = seconds < self.update_interval_s
        if self.unavailable_note is not None:
            return EnergyRecord(joules=None, seconds=seconds, meter=self.name, method=self.method,
                                rails=self.rails, below_resolution=below_resolution, note=self.unavailable_note)
        integral = self.trace.integrate(start, stop)
        latest = self.trace.latest()
        if latest is not None and stop - latest[0] > STALE_MARGIN_S + 5 * self.update_interval_s:
            return EnergyRecord(joules=None, seconds=seconds, meter=self.name, method=self.method,
                                rails=self.rails, below_resolution=below_resolution,
                                note=f"no power sample for {stop - latest[0]:.1f} s")
        return EnergyRecord(
            joules=integral.joules,
            seconds=seconds,
            meter=self.name,
            method=self.method,
            rails=self.rails,
            below_resolution=below_resolution,
            note=integral.note,
            extra={"samples": integral.samples, "extrapolated_s": round(integral.extrapolated_s, 6)},
        )

    def _start_polling(self, read: Callable[[], float | None], thread_name: str) -> None:
        """Call `read()` (total watts, or None) every update interval on a daemon thread."""

        def poll() -> None:
            failures = 0
            while not self._stop_event.is_set():
                try:
                    watts = read()
                except Exception as exc:  # noqa: BLE001 - a meter read must not kill the agent
                    failures += 1
                    if failures in (1, 10, 100) or failures % 1000 == 0:
                        log.warning("%s: power read failed (%d failures so far): %s", self.name, failures, exc)
                    watts = None
                self.trace.add(time.monotonic(), watts)
                self._stop_event.wait(self.update_interval_s)

        self._thread = threading.Thread(target=poll, name=thread_name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=max(2.0, 3 * self.update_interval_s))
            self._thread = None

    def describe(self) -> dict[str, Any]:
        description = super().describe()
        description["rails"] = list(self.rails)
        return description
