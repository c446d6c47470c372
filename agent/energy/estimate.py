"""A user-configured energy estimate: CPU seconds of this process times watts per core.

This is a model, not a measurement, so every record has method `estimated`. It is used only
when configured with a watts-per-core figure; auto-detection never picks it.
"""

from __future__ import annotations

import math
import time

from agent.energy.base import METHOD_ESTIMATED, CounterMeter, EnergyRecord


class EstimateMeter(CounterMeter):
    """Joules = CPU seconds of this process (all threads) x `watts_per_core`."""

    name = "estimate"
    method = METHOD_ESTIMATED
    update_interval_s = 0.0

    def __init__(self, watts_per_core: float):
        if not (isinstance(watts_per_core, (int, float)) and math.isfinite(watts_per_core) and watts_per_core > 0):
            raise ValueError(f"watts per core must be a number > 0, got {watts_per_core!r}")
        self.watts_per_core = float(watts_per_core)

    def _read(self) -> float:
        return time.process_time()

    def split(self, mark: tuple[float, float]) -> tuple[EnergyRecord, tuple[float, float]]:
        started, cpu_started = mark
        now, cpu_now = time.monotonic(), time.process_time()
        cpu_seconds = cpu_now - cpu_started
        record = EnergyRecord(
            joules=cpu_seconds * self.watts_per_core,
            seconds=now - started,
            meter=self.name,
            method=self.method,
            rails=("cpu-process",),
            note=f"estimate: {cpu_seconds:.4f} CPU s x {self.watts_per_core:g} W per core",
            extra={"cpu_seconds": cpu_seconds, "watts_per_core": self.watts_per_core},
        )
        return record, (now, cpu_now)

    def describe(self) -> dict:
        description = super().describe()
        description["watts_per_core"] = self.watts_per_core
        return description
