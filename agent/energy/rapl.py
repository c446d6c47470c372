"""x86 CPU energy from the Linux powercap RAPL interface (/sys/class/powercap).

Each zone has an `energy_uj` counter (microjoules) that wraps to 0 after
`max_energy_range_uj`. A window's energy is the sum over the chosen zones of the
counter difference, with one wrap added back when a counter went down.

By default the meter covers the package zones (`package-N`) and the DRAM zones, which
RAPL reports apart from the package. Core, uncore and psys zones are left out because
they overlap the package.

Since Linux 5.10, `energy_uj` is readable by root only, so permission denied makes the
meter unavailable with a hint, never zero energy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from agent.energy.base import METHOD_COUNTER, CounterMeter, EnergyRecord, MeterUnavailable

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/class/powercap")
DEFAULT_ZONE_PREFIXES = ("package-", "dram")
# NOTE: 1 ms is the commonly stated refresh period of RAPL energy counters on Intel
# CPUs. It is an assumption here, used only to flag shorter windows.
RAPL_RESOLUTION_S = 0.001

PERMISSION_HINT = (
    "reading {path} needs root since Linux 5.10. Give the agent's group read access at "
    "boot, for example with the systemd-tmpfiles line "
    "`z /sys/class/powercap/intel-rapl:*/energy_uj 0440 root moe2 -` or an equivalent udev "
    "rule, and run the agent as a member of that group"
)


@dataclass(frozen=True)
class RaplZone:
    name: str            # the zone's `name` file, such as package-0 or dram
    path: Path
    max_range_uj: int


def _read_text(path: Path) -> str:
    return path.read_text().strip()


def find_zones(root: Path = DEFAULT_ROOT, prefixes: Sequence[str] = DEFAULT_ZONE_PREFIXES,
               read_text: Callable[[Path], str] = _read_text) -> list[RaplZone]:
    """List the RAPL zones under `root` whose names start with one of `prefixes`."""
    zones = []
    for directory in sorted(root.glob("intel-rapl:*")):
        try:
            name = read_text(directory / "name")
            max_range = int(read_text(directory / "max_energy_range_uj"))
        except FileNotFoundError:
            continue
        if any(name.startswith(prefix) for prefix in prefixes):
            zones.append(RaplZone(name=name, path=directory, max_range_uj=max_range))
    return zones


def counter_delta(first: int, last: int, max_range_uj: int) -> int:
    """Return the microjoules between two reads of a counter that wraps at max_range_uj.

    NOTE: more than one wrap between the reads cannot be seen. At 100 W a 2^32 uJ
    range wraps in about 43 s and a 2^38 uJ range in about 44 min, so windows must
    stay shorter than that.
    """
    if last >= first:
        return last - first
    return last + max_range_uj - first


class RaplMeter(CounterMeter):
    """Energy of the chosen RAPL zones as counter differences."""

    name = "rapl"
    method = METHOD_COUNTER
    update_interval_s = RAPL_RESOLUTION_S

    def __init__(self, root: Path | str = DEFAULT_ROOT, zone_prefixes: Sequence[str] = DEFAULT_ZONE_PREFIXES,
                 read_text: Callable[[Path], str] = _read_text):
        root = Path(root)
        self._read_text = read_text
        if not root.exists():
            raise MeterUnavailable(f"{root} does not exist: this kernel or CPU has no powercap RAPL interface")
        try:
            self.zones = find_zones(root, zone_prefixes, read_text)
        except PermissionError as exc:
            raise MeterUnavailable(PERMISSION_HINT.format(path=exc.filename or root)) from None
        if not self.zones:
            raise MeterUnavailable(f"no RAPL zone named {' or '.join(zone_prefixes)}* under {root}")
        self.rails = tuple(zone.name for zone in self.zones)
        # A real read decides availability: the counters are root-only on recent kernels.
        for zone in self.zones:
            try:
                int(read_text(zone.path / "energy_uj"))
            except PermissionError:
                raise MeterUnavailable(PERMISSION_HINT.format(path=zone.path / "energy_uj")) from None
            except (OSError, ValueError) as exc:
                raise MeterUnavailable(f"cannot read {zone.path / 'energy_uj'}: {exc}") from None

    def _read(self) -> tuple[int, ...] | None:
        try:
            return tuple(int(self._read_text(zone.path / "energy_uj")) for zone in self.zones)
        except (OSError, ValueError) as exc:
            log.warning("rapl: energy counter read failed: %s", exc)
            return None

    def split(self, mark: tuple[float, tuple[int, ...] | None]) -> tuple[EnergyRecord, tuple[float, tuple[int, ...] | None]]:
        started, first = mark
        now, last = time.monotonic(), self._read()
        seconds = now - started
        joules, note = None, None
        if first is None or last is None:
            note = "energy counter read failed"
        else:
            microjoules = sum(counter_delta(a, b, zone.max_range_uj)
                              for a, b, zone in zip(first, last, self.zones))
            joules = microjoules / 1e6
        record = EnergyRecord(joules=joules, seconds=seconds, meter=self.name, method=self.method,
                              rails=self.rails, below_resolution=seconds < self.update_interval_s, note=note)
        return record, (now, last)

    def describe(self) -> dict:
        description = super().describe()
        description["rails"] = list(self.rails)
        return description
