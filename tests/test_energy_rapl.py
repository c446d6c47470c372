"""RAPL meter on a powercap tree written to a temporary folder: zone choice, counter
deltas, wraparound at max_energy_range_uj, and permission denied."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.energy.base import MeterUnavailable
from agent.energy.rapl import RaplMeter, counter_delta, find_zones

# Typical values: a 2^38 uJ package range and a 2^32 uJ DRAM range.
PACKAGE_RANGE = 262_143_328_850
DRAM_RANGE = 4_294_967_295


def write_zone(root: Path, zone: str, name: str, max_range: int, energy: int) -> Path:
    path = root / zone
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "max_energy_range_uj").write_text(f"{max_range}\n")
    (path / "energy_uj").write_text(f"{energy}\n")
    return path


@pytest.fixture
def powercap(tmp_path):
    """Two packages with core and DRAM sub-zones, and a psys zone."""
    root = tmp_path / "powercap"
    zones = {
        "package-0": write_zone(root, "intel-rapl:0", "package-0", PACKAGE_RANGE, 1_000_000),
        "core": write_zone(root, "intel-rapl:0:0", "core", PACKAGE_RANGE, 400_000),
        "dram": write_zone(root, "intel-rapl:0:1", "dram", DRAM_RANGE, 50_000),
        "package-1": write_zone(root, "intel-rapl:1", "package-1", PACKAGE_RANGE, 2_000_000),
        "psys": write_zone(root, "intel-rapl:2", "psys", PACKAGE_RANGE, 9_000_000),
    }
    return root, zones


def set_energy(zone: Path, energy: int) -> None:
    (zone / "energy_uj").write_text(f"{energy}\n")


def test_find_zones_packages_and_dram(powercap):
    root, _ = powercap

    names = [zone.name for zone in find_zones(root)]

    assert names == ["package-0", "dram", "package-1"]


def test_rapl_counter_deltas(powercap):
    root, zones = powercap
    meter = RaplMeter(root)

    mark = meter.start()
    set_energy(zones["package-0"], 3_500_000)   # +2.5 J
    set_energy(zones["dram"], 250_000)          # +0.2 J
    set_energy(zones["package-1"], 2_300_000)   # +0.3 J
    set_energy(zones["core"], 2_000_000)        # inside package-0, not counted
    set_energy(zones["psys"], 99_000_000)       # overlaps the packages, not counted
    record = meter.stop(mark)

    assert record.joules == pytest.approx(3.0)
    assert record.method == "counter"
    assert record.rails == ("package-0", "dram", "package-1")


def test_rapl_wraparound(powercap):
    root, zones = powercap
    set_energy(zones["package-0"], PACKAGE_RANGE - 1_000_000)
    meter = RaplMeter(root, zone_prefixes=("package-0",))

    mark = meter.start()
    set_energy(zones["package-0"], 500_000)
    record = meter.stop(mark)

    assert record.joules == pytest.approx(1.5)


def test_counter_delta_cases():
    assert counter_delta(100, 350, 1000) == 250
    assert counter_delta(900, 100, 1000) == 200
    assert counter_delta(500, 500, 1000) == 0


def test_rapl_split_chains_windows(powercap):
    root, zones = powercap
    meter = RaplMeter(root, zone_prefixes=("package-1",))

    mark = meter.start()
    set_energy(zones["package-1"], 2_100_000)
    first, mark = meter.split(mark)
    set_energy(zones["package-1"], 2_400_000)
    second, _ = meter.split(mark)

    assert first.joules == pytest.approx(0.1)
    assert second.joules == pytest.approx(0.3)


def test_rapl_permission_denied_unavailable(powercap):
    root, _ = powercap

    def read_text(path: Path) -> str:
        # Linux 5.10 and later: energy_uj is mode 0400 root, other files stay readable.
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return path.read_text().strip()

    with pytest.raises(MeterUnavailable) as error:
        RaplMeter(root, read_text=read_text)

    message = str(error.value)
    assert "needs root since Linux 5.10" in message
    assert "udev" in message
    assert "group" in message


def test_rapl_read_failure_mid_run_unknown(powercap):
    root, zones = powercap
    meter = RaplMeter(root, zone_prefixes=("package-0",))

    mark = meter.start()
    (zones["package-0"] / "energy_uj").unlink()
    record = meter.stop(mark)

    assert record.joules is None
    assert record.note == "energy counter read failed"


def test_rapl_missing_interface_unavailable(tmp_path):
    with pytest.raises(MeterUnavailable, match="no powercap RAPL interface"):
        RaplMeter(tmp_path / "absent")


def test_rapl_no_matching_zone_unavailable(powercap):
    root, _ = powercap

    with pytest.raises(MeterUnavailable, match="no RAPL zone named gpu"):
        RaplMeter(root, zone_prefixes=("gpu",))
