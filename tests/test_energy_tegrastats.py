"""tegrastats parsing, board totals, integration, and the meter on a real subprocess
that replays lines recorded on six Jetson boards."""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path

import pytest

from agent.energy.base import MeterUnavailable
from agent.energy.tegrastats import TegrastatsMeter, board_total, parse_line
from agent.energy.trace import PowerTrace

FIXTURES = Path(__file__).parent / "fixtures" / "tegrastats"
REPLAY = Path(__file__).parent / "tegrastats_replay.py"


def fixture_lines(name: str) -> list[str]:
    return [line for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


# Per fixture: every rail as (current W, average W, max W or None), the total in watts,
# the rails it comes from, and the timestamp of the first line.
EXPECTED = {
    "agx-orin-64gb-jp6.txt": {
        "rails": {"VDD_GPU_SOC": (2.798, 2.798, None), "VDD_CPU_CV": (0.799, 0.799, None),
                  "VIN_SYS_5V0": (3.315, 3.315, None)},
        "total": 2.798 + 0.799 + 3.315,
        "total_rails": ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"),
        "timestamp": dt.datetime(2025, 7, 21, 16, 33, 42),
    },
    "agx-orin-64gb-jp72.txt": {
        "rails": {"VDD_GPU_SOC": (5.139, 5.139, 5.139), "VDD_CPU_CV": (3.268, 3.268, 3.268),
                  "VIN_SYS_5V0": (5.5, 5.5, 5.5)},
        "total": 5.139 + 3.268 + 5.5,
        "total_rails": ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"),
        "timestamp": dt.datetime(2026, 7, 25, 9, 8, 28),
    },
    "nano-4gb-maxn.txt": {
        "rails": {"POM_5V_IN": (2.746, 2.911, None), "POM_5V_GPU": (0.159, 0.161, None),
                  "POM_5V_CPU": (0.796, 0.989, None)},
        "total": 2.746,
        "total_rails": ("POM_5V_IN",),
        "timestamp": None,
    },
    "orin-nano-8gb-jp6.txt": {
        "rails": {"VDD_IN": (12.479, 12.479, None), "VDD_CPU_GPU_CV": (4.667, 4.667, None),
                  "VDD_SOC": (2.817, 2.817, None)},
        "total": 12.479,
        "total_rails": ("VDD_IN",),
        "timestamp": dt.datetime(2024, 11, 15, 8, 38, 9),
    },
    "orin-nx-8gb.txt": {
        "rails": {"VDD_IN": (17.946, 15.710, None), "VDD_CPU_GPU_CV": (8.896, 7.585, None),
                  "VDD_SOC": (3.923, 3.515, None)},
        "total": 17.946,
        "total_rails": ("VDD_IN",),
        "timestamp": dt.datetime(2025, 5, 15, 18, 30, 28),
    },
    "tx2-pre-jp5.txt": {
        "rails": {"VDD_SYS_GPU": (0.182, 0.182, None), "VDD_SYS_SOC": (0.730, 0.730, None),
                  "VDD_4V0_WIFI": (0.0, 0.0, None), "VDD_IN": (5.297, 5.297, None),
                  "VDD_SYS_CPU": (1.917, 1.917, None), "VDD_SYS_DDR": (1.241, 1.241, None)},
        "total": 5.297,
        "total_rails": ("VDD_IN",),
        "timestamp": None,
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parse_line_fixture_rails(name):
    expected = EXPECTED[name]

    sample = parse_line(fixture_lines(name)[0])

    assert set(sample.rails) == set(expected["rails"])
    for rail, (current, average, maximum) in expected["rails"].items():
        reading = sample.rails[rail]
        assert reading.current_w == pytest.approx(current), rail
        assert reading.average_w == pytest.approx(average), rail
        assert reading.max_w == (pytest.approx(maximum) if maximum is not None else None), rail
    assert sample.timestamp == expected["timestamp"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_board_total_fixture_no_double_count(name):
    expected = EXPECTED[name]

    total = board_total(parse_line(fixture_lines(name)[0]).rails)

    assert total.watts == pytest.approx(expected["total"])
    assert total.rails == expected["total_rails"]


def test_board_total_nano_ignores_sub_rails():
    rails = parse_line(fixture_lines("nano-4gb-maxn.txt")[1]).rails

    total = board_total(rails)

    assert total.watts == pytest.approx(2.980)
    assert total.watts < sum(r.current_w for r in rails.values())


def test_board_total_agx_orin_skips_vddq_rail():
    # VDDQ_VDD2_1V8AO is part of VIN_SYS_5V0 on AGX Orin, so adding it would count it twice.
    line = fixture_lines("agx-orin-64gb-jp6.txt")[0] + " VDDQ_VDD2_1V8AO 403mW/403mW"

    sample = parse_line(line)
    total = board_total(sample.rails)

    assert sample.rails["VDDQ_VDD2_1V8AO"].current_w == pytest.approx(0.403)
    assert total.watts == pytest.approx(2.798 + 0.799 + 3.315)


def test_board_total_agx_xavier_sums_six_rails():
    line = ("RAM 2000/15692MB (lfb 3x4MB) CPU [1%@1190,off,off,off] GPU 155/155 CPU 311/311 "
            "SOC 1243/1243 CV 0/0 VDDRQ 155/155 SYS5V 1950/1950")

    total = board_total(parse_line(line).rails)

    assert total.watts == pytest.approx((155 + 311 + 1243 + 0 + 155 + 1950) / 1000)
    assert total.rails == ("GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V")


def test_board_total_unknown_rails_unavailable():
    # The TX2 line without its VDD_IN total: the other rails are kept but give no total.
    line = fixture_lines("tx2-pre-jp5.txt")[0].replace("VDD_IN 5297/5297 ", "")

    sample = parse_line(line)
    total = board_total(sample.rails)

    assert "VDD_SYS_GPU" in sample.rails
    assert "VDD_IN" not in sample.rails
    assert total.watts is None
    assert total.rails == ()
    assert total.scope == "unavailable"


def test_parse_line_keeps_unknown_rails():
    line = fixture_lines("orin-nx-8gb.txt")[0] + " VDD_NEW_RAIL 1234mW/1000mW"

    sample = parse_line(line)

    assert sample.rails["VDD_NEW_RAIL"].current_w == pytest.approx(1.234)
    assert board_total(sample.rails).watts == pytest.approx(17.946)


def test_parse_line_skips_non_rail_fields():
    sample = parse_line(fixture_lines("nano-4gb-maxn.txt")[0])

    for field in ("RAM", "SWAP", "IRAM", "EMC_FREQ", "GR3D_FREQ", "APE"):
        assert field not in sample.rails


def test_parse_line_without_rails():
    sample = parse_line("RAM 1464/3964MB (lfb 214x4MB) CPU [90%@1479] EMC_FREQ 6%@1600")

    assert sample.rails == {}
    assert board_total(sample.rails).watts is None


def test_integration_recorded_nano_sequence():
    first, second = fixture_lines("nano-4gb-maxn.txt")
    trace = PowerTrace()
    # Recorded at a 1000 ms interval: the lines alternate 2.746 W and 2.980 W.
    for index in range(5):
        line = first if index % 2 == 0 else second
        trace.add(100.0 + index, board_total(parse_line(line).rails).watts)

    integral = trace.integrate(100.0, 104.0)

    # Four 1-s trapezoids, each averaging the two powers.
    assert integral.joules == pytest.approx(4 * (2.746 + 2.980) / 2)
    assert integral.samples == 3
    assert integral.extrapolated_s == 0.0


def test_integration_partial_window_interpolates():
    trace = PowerTrace()
    trace.add(0.0, board_total(parse_line(fixture_lines("orin-nano-8gb-jp6.txt")[0]).rails).watts)
    trace.add(1.0, board_total(parse_line(fixture_lines("orin-nx-8gb.txt")[0]).rails).watts)

    integral = trace.integrate(0.25, 0.75)

    power_at = lambda t: 12.479 + (17.946 - 12.479) * t  # noqa: E731 - the line through the two samples
    assert integral.joules == pytest.approx(0.5 * (power_at(0.25) + power_at(0.75)) / 2)
    assert integral.samples == 0


def test_integration_holds_latest_power_after_last_sample():
    trace = PowerTrace()
    trace.add(10.0, 5.0)
    trace.add(11.0, 7.0)

    integral = trace.integrate(10.5, 11.5)

    assert integral.joules == pytest.approx(0.5 * (6.0 + 7.0) / 2 + 0.5 * 7.0)
    assert integral.extrapolated_s == pytest.approx(0.5)


def test_integration_sample_without_total_unknown():
    trace = PowerTrace()
    trace.add(0.0, 5.0)
    trace.add(1.0, None)
    trace.add(2.0, 5.0)

    assert trace.integrate(0.5, 1.5).joules is None
    assert trace.integrate(0.5, 1.5).note is not None
    assert trace.integrate(2.0, 3.0).joules == pytest.approx(5.0)


def test_integration_empty_trace_unknown():
    integral = PowerTrace().integrate(0.0, 1.0)

    assert integral.joules is None
    assert integral.note == "no power sample yet"


def test_integration_window_older_than_horizon_unknown():
    trace = PowerTrace(horizon_s=10.0)
    for second in range(30):
        trace.add(float(second), 1.0)

    assert trace.integrate(5.0, 25.0).joules is None
    assert trace.integrate(20.0, 25.0).joules == pytest.approx(5.0)


def replay_command(name: str, interval_ms: int, count: int | None = None) -> list[str]:
    command = [sys.executable, str(REPLAY), str(FIXTURES / name), str(interval_ms)]
    return command + ([str(count)] if count is not None else [])


@pytest.mark.timeout(30)
def test_meter_constant_power_energy():
    with TegrastatsMeter(interval_ms=20, command=replay_command("orin-nx-8gb.txt", 20)) as meter:
        mark = meter.start()
        time.sleep(0.3)
        record = meter.stop(mark)
        rails = meter.rail_power()

    assert record.meter == "tegrastats"
    assert record.method == "integrated"
    assert record.rails == ("VDD_IN",)
    assert record.joules == pytest.approx(17.946 * record.seconds, rel=1e-9)
    assert record.extra["samples"] >= 1
    assert not record.below_resolution
    assert rails["VDD_CPU_GPU_CV"] == pytest.approx(8.896)


@pytest.mark.timeout(30)
def test_meter_alternating_power_bounds():
    with TegrastatsMeter(interval_ms=20, command=replay_command("nano-4gb-maxn.txt", 20)) as meter:
        mark = meter.start()
        time.sleep(0.3)
        record = meter.stop(mark)

    assert record.rails == ("POM_5V_IN",)
    assert 2.746 * record.seconds - 1e-9 <= record.joules <= 2.980 * record.seconds + 1e-9


@pytest.mark.timeout(30)
def test_meter_short_window_below_resolution():
    with TegrastatsMeter(interval_ms=500, command=replay_command("orin-nano-8gb-jp6.txt", 500)) as meter:
        record = meter.stop(meter.start())

    assert record.below_resolution
    assert record.joules == pytest.approx(12.479 * record.seconds, rel=1e-9)


@pytest.mark.timeout(30)
def test_meter_split_chains_windows():
    with TegrastatsMeter(interval_ms=20, command=replay_command("agx-orin-64gb-jp72.txt", 20)) as meter:
        mark = meter.start()
        records = []
        for _ in range(3):
            time.sleep(0.05)
            record, mark = meter.split(mark)
            records.append(record)

    for record in records:
        assert record.joules == pytest.approx(13.907 * record.seconds, rel=1e-9)
        assert record.rails == ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")


@pytest.mark.timeout(30)
def test_meter_without_total_rail_unavailable(tmp_path):
    line = fixture_lines("tx2-pre-jp5.txt")[0].replace("VDD_IN 5297/5297 ", "")
    (tmp_path / "no-total.txt").write_text(line + "\n")
    command = [sys.executable, str(REPLAY), str(tmp_path / "no-total.txt"), "20"]

    with pytest.raises(MeterUnavailable, match="no known total-power rail"):
        TegrastatsMeter(interval_ms=20, command=command)


def test_meter_missing_command_unavailable():
    with pytest.raises(MeterUnavailable, match="not found"):
        TegrastatsMeter(command=["/nonexistent/tegrastats", "--interval", "100"])


@pytest.mark.timeout(30)
def test_meter_command_exits_unavailable():
    command = [sys.executable, "-c", "import sys; sys.stderr.write('tegrastats: permission denied'); sys.exit(3)"]

    with pytest.raises(MeterUnavailable, match="exit status 3"):
        TegrastatsMeter(command=command, first_line_timeout_s=5.0)


@pytest.mark.timeout(30)
def test_meter_after_exit_reports_unknown():
    meter = TegrastatsMeter(interval_ms=20, command=replay_command("orin-nx-8gb.txt", 20, count=3))
    try:
        mark = meter.start()
        deadline = time.monotonic() + 10
        while meter.unavailable_note is None and time.monotonic() < deadline:
            time.sleep(0.02)
        record = meter.stop(mark)
    finally:
        meter.close()

    assert record.joules is None
    assert "exited" in record.note
