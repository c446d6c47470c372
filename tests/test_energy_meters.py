"""jtop, the labelled estimate, stalled samplers and meter detection."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.energy import MeterUnavailable, NoneMeter, create_meter
from agent.energy import detect
from agent.energy.estimate import EstimateMeter
from agent.energy.jtop import JtopMeter, check_service, rails_from_power
from agent.energy.trace import SampledMeter

REPLAY = Path(__file__).parent / "tegrastats_replay.py"
FIXTURES = Path(__file__).parent / "fixtures" / "tegrastats"

# jtop `power` dictionaries as jetson-stats 4 builds them (milliwatts): on Orin NX the
# VDD_IN rail moves to `tot` with its name, on AGX Orin `tot` is an unnamed sum.
ORIN_NX_POWER = {
    "rail": {"VDD_CPU_GPU_CV": {"volt": 5000, "curr": 1779, "power": 8896, "avg": 7585},
             "VDD_SOC": {"volt": 5000, "curr": 784, "power": 3923, "avg": 3515}},
    "tot": {"volt": 5000, "curr": 3589, "power": 17946, "avg": 15710, "name": "VDD_IN"},
}
AGX_ORIN_POWER = {
    "rail": {"VDD_GPU_SOC": {"power": 2798, "avg": 2798}, "VDD_CPU_CV": {"power": 799, "avg": 799},
             "VIN_SYS_5V0": {"power": 3315, "avg": 3315}, "VDDQ_VDD2_1V8AO": {"power": 403, "avg": 403}},
    "tot": {"power": 7315, "avg": 7315},
}


class RecordedJtop:
    """Stands in for jtop.jtop: `ok()` paces readings at the interval, `power` replays."""

    def __init__(self, interval_s, power, start_error=None):
        self.interval_s = interval_s
        self.power = power
        self.start_error = start_error
        self.closed = threading.Event()

    def start(self):
        if self.start_error is not None:
            raise self.start_error

    def ok(self):
        return not self.closed.wait(self.interval_s)

    def close(self):
        self.closed.set()


def test_rails_from_power_includes_total_rail():
    rails = rails_from_power(ORIN_NX_POWER)

    assert rails == pytest.approx({"VDD_CPU_GPU_CV": 8.896, "VDD_SOC": 3.923, "VDD_IN": 17.946})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("power, watts, rails", [
    (ORIN_NX_POWER, 17.946, ("VDD_IN",)),
    (AGX_ORIN_POWER, 2.798 + 0.799 + 3.315, ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")),
])
def test_jtop_meter_board_total(power, watts, rails):
    meter = JtopMeter(interval_ms=10, client_factory=lambda interval: RecordedJtop(interval, power))
    try:
        mark = meter.start()
        time.sleep(0.1)
        record = meter.stop(mark)
    finally:
        meter.close()

    assert record.meter == "jtop"
    assert record.rails == rails
    assert record.joules == pytest.approx(watts * record.seconds, rel=1e-9)


@pytest.mark.timeout(30)
def test_jtop_start_failure_unavailable():
    error = RuntimeError("The jtop.service is not active. Please run: sudo systemctl restart jtop.service")
    factory = lambda interval: RecordedJtop(interval, ORIN_NX_POWER, start_error=error)  # noqa: E731

    with pytest.raises(MeterUnavailable, match="jtop did not start: The jtop.service is not active"):
        JtopMeter(client_factory=factory)


def test_jtop_service_inactive(tmp_path):
    with pytest.raises(MeterUnavailable, match="inactive"):
        check_service(tmp_path / "jtop.sock")


def test_jtop_not_installed_unavailable(tmp_path):
    try:
        import jtop  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("jetson-stats is installed here")
    socket_path = tmp_path / "jtop.sock"
    socket_path.touch()

    with pytest.raises(MeterUnavailable, match="jetson-stats is not installed"):
        JtopMeter(socket_path=socket_path)


def test_estimate_meter_labelled():
    meter = EstimateMeter(watts_per_core=7.5)

    mark = meter.start()
    total = 0
    for value in range(300_000):
        total += value * value
    record = meter.stop(mark)

    assert record.method == "estimated"
    assert record.extra["cpu_seconds"] > 0
    assert record.joules == pytest.approx(record.extra["cpu_seconds"] * 7.5)
    assert "estimate" in record.note


@pytest.mark.parametrize("watts", [0, -3.0, float("nan"), "10"])
def test_estimate_meter_rejects_invalid_watts(watts):
    with pytest.raises(ValueError, match="watts per core"):
        EstimateMeter(watts)


@pytest.mark.timeout(30)
def test_sampled_meter_stalled_sampler_unknown():
    meter = SampledMeter(update_interval_s=0.01)
    meter.name = "stalled"
    meter.trace.add(time.monotonic() - 5.0, 10.0)

    record = meter.stop(meter.start() - 0.5)

    assert record.joules is None
    assert record.note.startswith("no power sample for")


def test_create_meter_none():
    meter = create_meter("none")

    record = meter.stop(meter.start())

    assert isinstance(meter, NoneMeter)
    assert record.joules is None


def test_create_meter_unknown_name():
    with pytest.raises(ValueError, match="unknown energy meter 'ina'"):
        create_meter("ina")


def test_create_meter_unknown_option():
    with pytest.raises(ValueError, match="unknown energy meter options: interval"):
        create_meter("none", interval=5)


def test_create_meter_estimate_needs_watts():
    with pytest.raises(ValueError, match="watts_per_core"):
        create_meter("estimate")


@pytest.mark.timeout(30)
def test_create_meter_named_tegrastats():
    command = [sys.executable, str(REPLAY), str(FIXTURES / "orin-nano-8gb-jp6.txt"), "20"]

    with create_meter("tegrastats", interval_ms=20, command=command) as meter:
        record = meter.stop(meter.start())

    assert record.meter == "tegrastats"
    assert record.rails == ("VDD_IN",)


def test_create_meter_auto_order_and_reasons(monkeypatch, caplog):
    opened = []

    def unavailable(name):
        def opener(**options):
            opened.append(name)
            raise MeterUnavailable(f"{name} missing here")
        return opener

    def available(**options):
        opened.append("nvml")
        meter = NoneMeter()
        meter.name = "nvml"
        return meter

    monkeypatch.setitem(detect.OPENERS, "jtop", unavailable("jtop"))
    monkeypatch.setitem(detect.OPENERS, "tegrastats", unavailable("tegrastats"))
    monkeypatch.setitem(detect.OPENERS, "nvml", available)
    monkeypatch.setitem(detect.OPENERS, "rapl", unavailable("rapl"))

    with caplog.at_level(logging.INFO, logger="agent.energy.detect"):
        meter = create_meter("auto")

    assert meter.name == "nvml"
    assert opened == ["jtop", "tegrastats", "nvml"]
    assert "energy meter jtop skipped: jtop missing here" in caplog.text
    assert "energy meter tegrastats skipped: tegrastats missing here" in caplog.text


def test_create_meter_auto_falls_back_to_none(monkeypatch, caplog):
    for name in detect.AUTO_ORDER:
        def opener(_name=name, **options):
            raise MeterUnavailable(f"{_name} missing here")
        monkeypatch.setitem(detect.OPENERS, name, opener)

    with caplog.at_level(logging.INFO, logger="agent.energy.detect"):
        meter = create_meter("auto")

    assert isinstance(meter, NoneMeter)
    assert "no energy meter available" in caplog.text
    assert caplog.text.count("skipped") == len(detect.AUTO_ORDER)


def test_create_meter_named_unavailable_raises(tmp_path):
    with pytest.raises(MeterUnavailable, match="no powercap RAPL interface"):
        create_meter("rapl", root=str(tmp_path / "absent"))
