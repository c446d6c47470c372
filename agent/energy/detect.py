"""Choose and open an energy meter by name, or detect the best one available.

Auto-detection tries jtop, tegrastats, NVML and RAPL in that order and takes the first
that gives a real reading. It logs why each earlier one was skipped, and falls back to
`none` (energy null) when none can read. `estimate` is used only when named, with `watts_per_core`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from agent.energy.base import EnergyMeter, MeterUnavailable, NoneMeter

log = logging.getLogger(__name__)

METER_NAMES = ("auto", "jtop", "tegrastats", "nvml", "rapl", "estimate", "none")
AUTO_ORDER = ("jtop", "tegrastats", "nvml", "rapl")

# Options each meter accepts; create_meter rejects others.
METER_OPTIONS: dict[str, tuple[str, ...]] = {
    "jtop": ("interval_ms",),
    "tegrastats": ("interval_ms", "command"),
    "nvml": ("interval_ms", "device_index"),
    "rapl": ("root", "zone_prefixes"),
    "estimate": ("watts_per_core",),
    "none": (),
}


def _open_jtop(interval_ms: int | None = None) -> EnergyMeter:
    from agent.energy.jtop import DEFAULT_INTERVAL_MS, JtopMeter

    return JtopMeter(interval_ms=interval_ms or DEFAULT_INTERVAL_MS)


def _open_tegrastats(interval_ms: int | None = None, command: list[str] | None = None) -> EnergyMeter:
    from agent.energy.tegrastats import TegrastatsMeter

    return TegrastatsMeter(interval_ms=interval_ms or 100, command=command)


def _open_nvml(interval_ms: int | None = None, device_index: int = 0) -> EnergyMeter:
    from agent.energy.nvml import DEFAULT_POWER_INTERVAL_MS, open_nvml_meter

    return open_nvml_meter(device_index=device_index, interval_ms=interval_ms or DEFAULT_POWER_INTERVAL_MS)


def _open_rapl(root: str | None = None, zone_prefixes: tuple[str, ...] | None = None) -> EnergyMeter:
    from agent.energy.rapl import DEFAULT_ROOT, DEFAULT_ZONE_PREFIXES, RaplMeter

    return RaplMeter(root=root or DEFAULT_ROOT, zone_prefixes=zone_prefixes or DEFAULT_ZONE_PREFIXES)


def _open_estimate(watts_per_core: float | None = None) -> EnergyMeter:
    from agent.energy.estimate import EstimateMeter

    if watts_per_core is None:
        raise ValueError("the estimate meter needs watts_per_core (the user's figure for one busy core)")
    return EstimateMeter(watts_per_core)


OPENERS: dict[str, Callable[..., EnergyMeter]] = {
    "jtop": _open_jtop,
    "tegrastats": _open_tegrastats,
    "nvml": _open_nvml,
    "rapl": _open_rapl,
    "estimate": _open_estimate,
    "none": lambda: NoneMeter(),
}


def _options_for(name: str, options: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if key in METER_OPTIONS[name] and value is not None}


def create_meter(name: str = "auto", **options: Any) -> EnergyMeter:
    """Open the meter `name` (one of METER_NAMES) with its options.

    A named meter that cannot measure raises MeterUnavailable with the reason. `auto`
    never raises for an unavailable meter; it logs each skipped meter and its reason.
    """
    if name not in METER_NAMES:
        raise ValueError(f"unknown energy meter {name!r}; choose one of {', '.join(METER_NAMES)}")
    known = {option for names in METER_OPTIONS.values() for option in names}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown energy meter options: {', '.join(unknown)}; known: {', '.join(sorted(known))}")

    if name != "auto":
        meter = OPENERS[name](**_options_for(name, options))
        log.info("energy meter: %s (%s)", meter.name, meter.method)
        return meter

    for candidate in AUTO_ORDER:
        try:
            meter = OPENERS[candidate](**_options_for(candidate, options))
        except MeterUnavailable as exc:
            log.info("energy meter %s skipped: %s", candidate, exc)
            continue
        log.info("energy meter: %s (%s), detected automatically", meter.name, meter.method)
        return meter
    log.warning("no energy meter available (tried %s), so energy is reported as null", ", ".join(AUTO_ORDER))
    return NoneMeter()
