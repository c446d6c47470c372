"""NVML meter logic against recorded NVML behaviour: counter deltas, NotSupported, and
failed starts. A small stand-in for the pynvml module replays the recorded values."""

from __future__ import annotations

import time

import pytest

from agent.energy.base import MeterUnavailable
from agent.energy.nvml import NvmlCounterMeter, NvmlPowerMeter, open_nvml_meter

NOT_SUPPORTED = 3       # NVML_ERROR_NOT_SUPPORTED in nvml.h
LIBRARY_NOT_FOUND = 12  # NVML_ERROR_LIBRARY_NOT_FOUND


class RecordedNvmlError(Exception):
    """Mirrors pynvml.NVMLError: the NVML return code is in `value`."""

    def __init__(self, value: int):
        super().__init__(f"NVML error {value}")
        self.value = value


class RecordedNvml:
    """Replays NVML results: each query returns its next recorded value, or raises
    RecordedNvmlError when the recorded value is an int error code wrapped in a tuple."""

    NVMLError = RecordedNvmlError
    NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED

    def __init__(self, energy_mj=(), power_mw=(), init_error=None, name=b"NVIDIA GeForce RTX 4090"):
        self.energy_mj = list(energy_mj)
        self.power_mw = list(power_mw)
        self.init_error = init_error
        self.name = name
        self.shutdowns = 0

    @staticmethod
    def _next(values):
        value = values[0] if len(values) == 1 else values.pop(0)
        if isinstance(value, tuple):
            raise RecordedNvmlError(value[0])
        return value

    def nvmlInit(self):
        if self.init_error is not None:
            raise RecordedNvmlError(self.init_error)

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        if index != 0:
            raise RecordedNvmlError(2)  # NVML_ERROR_INVALID_ARGUMENT
        return "handle0"

    def nvmlDeviceGetName(self, handle):
        return self.name

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return self._next(self.energy_mj)

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._next(self.power_mw)


def test_nvml_counter_delta_in_joules():
    # Probe read, then start and stop of one window: 2,500 mJ apart.
    nvml = RecordedNvml(energy_mj=[5_000_000, 5_000_000, 5_002_500])

    meter = open_nvml_meter(nvml=nvml)
    record = meter.stop(meter.start())
    meter.close()

    assert isinstance(meter, NvmlCounterMeter)
    assert record.joules == pytest.approx(2.5)
    assert record.method == "counter"
    assert record.meter == "nvml"
    assert record.rails == ("gpu0",)
    assert record.extra["device"] == "NVIDIA GeForce RTX 4090"
    assert nvml.shutdowns == 1


def test_nvml_counter_split_shares_reads():
    nvml = RecordedNvml(energy_mj=[100, 100, 1100, 4100])
    meter = open_nvml_meter(nvml=nvml)

    mark = meter.start()
    first, mark = meter.split(mark)
    second, _ = meter.split(mark)

    assert first.joules == pytest.approx(1.0)
    assert second.joules == pytest.approx(3.0)


def test_nvml_counter_backwards_unknown():
    # A driver reload restarts the counter near zero.
    nvml = RecordedNvml(energy_mj=[9_000_000, 9_000_000, 1_200])
    meter = open_nvml_meter(nvml=nvml)

    record = meter.stop(meter.start())

    assert record.joules is None
    assert "backwards" in record.note


def test_nvml_counter_read_failure_unknown():
    nvml = RecordedNvml(energy_mj=[1_000, 1_000, (15,)])  # NVML_ERROR_GPU_IS_LOST
    meter = open_nvml_meter(nvml=nvml)

    record = meter.stop(meter.start())

    assert record.joules is None
    assert record.note == "energy counter read failed"


def test_nvml_short_window_flagged():
    nvml = RecordedNvml(energy_mj=[0, 0, 10])
    meter = open_nvml_meter(nvml=nvml)

    record = meter.stop(meter.start())

    assert record.below_resolution


@pytest.mark.timeout(30)
def test_nvml_power_fallback_integrated():
    # Pre-Volta GPUs: the energy counter is NotSupported but power reads 250 W.
    nvml = RecordedNvml(energy_mj=[(NOT_SUPPORTED,)], power_mw=[250_000])

    meter = open_nvml_meter(nvml=nvml, interval_ms=10)
    try:
        time.sleep(0.05)
        mark = meter.start()
        time.sleep(0.1)
        record = meter.stop(mark)
        rails = meter.rail_power()
    finally:
        meter.close()

    assert isinstance(meter, NvmlPowerMeter)
    assert record.method == "integrated"
    assert record.joules == pytest.approx(250.0 * record.seconds, rel=1e-9)
    assert rails == {"gpu0": 250.0}


def test_nvml_jetson_not_supported_unavailable():
    # On Jetson, NVML starts but both energy and power queries raise NotSupported.
    nvml = RecordedNvml(energy_mj=[(NOT_SUPPORTED,)], power_mw=[(NOT_SUPPORTED,)], name=b"Orin (nvgpu)")

    with pytest.raises(MeterUnavailable, match="NotSupported on Orin"):
        open_nvml_meter(nvml=nvml)
    assert nvml.shutdowns == 1


def test_nvml_init_failure_unavailable():
    nvml = RecordedNvml(init_error=LIBRARY_NOT_FOUND)

    with pytest.raises(MeterUnavailable, match="NVML did not start") as info:
        open_nvml_meter(nvml=nvml)
    assert "Check that an NVIDIA driver is loaded" in str(info.value)


def test_nvml_missing_device_unavailable():
    nvml = RecordedNvml(energy_mj=[0])

    with pytest.raises(MeterUnavailable, match="no GPU at index 3"):
        open_nvml_meter(device_index=3, nvml=nvml)


def test_nvml_real_library_without_driver():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is loaded on this machine")

    with pytest.raises(MeterUnavailable, match="NVML did not start"):
        open_nvml_meter()
