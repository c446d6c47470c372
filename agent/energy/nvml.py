"""NVIDIA GPU energy through NVML (the `pynvml` module of nvidia-ml-py).

The preferred backend reads the GPU's total-energy counter (millijoules since the
driver loaded, Volta and newer) at both ends of a window. Where that call reports
NotSupported, power samples (milliwatts) are integrated instead and records have method
`integrated`. The backend is chosen by a real successful read, not by `nvmlInit`
succeeding: on Jetson, NVML initializes but power queries raise NotSupported.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from agent.energy.base import METHOD_COUNTER, CounterMeter, EnergyMeter, EnergyRecord, MeterUnavailable
from agent.energy.trace import SampledMeter

log = logging.getLogger(__name__)

# NOTE: NVML documents neither how often the energy counter nor the power reading is
# refreshed; 0.1 s is an assumed resolution used to flag short windows.
DEFAULT_COUNTER_RESOLUTION_S = 0.1
DEFAULT_POWER_INTERVAL_MS = 100


def _import_nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        raise MeterUnavailable("the nvidia-ml-py package (module pynvml) is not installed; "
                               "install it with `pip install nvidia-ml-py`") from None
    return pynvml


def _is_not_supported(nvml: Any, exc: BaseException) -> bool:
    return isinstance(exc, nvml.NVMLError) and getattr(exc, "value", None) == nvml.NVML_ERROR_NOT_SUPPORTED


def _open_device(nvml: Any, device_index: int) -> tuple[Any, str]:
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise MeterUnavailable(f"NVML did not start ({exc}). Check that an NVIDIA driver is loaded, "
                               "for example with nvidia-smi") from None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
        name = nvml.nvmlDeviceGetName(handle)
    except nvml.NVMLError as exc:
        nvml.nvmlShutdown()
        raise MeterUnavailable(f"NVML has no GPU at index {device_index}: {exc}") from None
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return handle, str(name)


class NvmlCounterMeter(CounterMeter):
    """Energy as the difference of two total-energy counter reads (mJ)."""

    name = "nvml"
    method = METHOD_COUNTER

    def __init__(self, nvml: Any, handle: Any, device_name: str, device_index: int,
                 resolution_s: float = DEFAULT_COUNTER_RESOLUTION_S):
        self.nvml = nvml
        self.handle = handle
        self.device_name = device_name
        self.device_index = device_index
        self.update_interval_s = resolution_s
        self.rails = (f"gpu{device_index}",)
        self._closed = False

    def _read(self) -> int | None:
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except self.nvml.NVMLError as exc:
            log.warning("nvml: energy counter read failed on GPU %d: %s", self.device_index, exc)
            return None

    def split(self, mark: tuple[float, int | None]) -> tuple[EnergyRecord, tuple[float, int | None]]:
        started, first = mark
        now, last = time.monotonic(), self._read()
        seconds = now - started
        joules, note = None, None
        if first is None or last is None:
            note = "energy counter read failed"
        elif last < first:
            note = "energy counter went backwards (driver reloaded?)"
        else:
            joules = (last - first) / 1000.0
        record = EnergyRecord(joules=joules, seconds=seconds, meter=self.name, method=self.method,
                              rails=self.rails, below_resolution=seconds < self.update_interval_s, note=note,
                              extra={"device": self.device_name})
        return record, (now, last)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.nvml.nvmlShutdown()

    def describe(self) -> dict:
        description = super().describe()
        description.update(device=self.device_name, rails=list(self.rails))
        return description


class NvmlPowerMeter(SampledMeter):
    """Energy as integrated power samples (mW), for GPUs without the energy counter."""

    name = "nvml"

    def __init__(self, nvml: Any, handle: Any, device_name: str, device_index: int,
                 interval_ms: int = DEFAULT_POWER_INTERVAL_MS):
        super().__init__(update_interval_s=interval_ms / 1000.0)
        self.nvml = nvml
        self.handle = handle
        self.device_name = device_name
        self.rails = (f"gpu{device_index}",)
        self._closed = False
        self._start_polling(self._read_watts, f"nvml-power-{device_index}")

    def _read_watts(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0

    def rail_power(self) -> dict[str, float] | None:
        latest = self.trace.latest()
        if latest is None or latest[1] is None:
            return None
        return {self.rails[0]: latest[1]}

    def close(self) -> None:
        super().close()
        if not self._closed:
            self._closed = True
            self.nvml.nvmlShutdown()

    def describe(self) -> dict:
        description = super().describe()
        description["device"] = self.device_name
        return description


def open_nvml_meter(device_index: int = 0, interval_ms: int = DEFAULT_POWER_INTERVAL_MS,
                    nvml: Any | None = None) -> EnergyMeter:
    """Open the best NVML backend that gives a real reading on GPU `device_index`.

    `nvml` replaces the pynvml module (same functions and NVMLError). Raises
    MeterUnavailable with the reason when neither backend can read.
    """
    nvml = nvml if nvml is not None else _import_nvml()
    handle, device_name = _open_device(nvml, device_index)

    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        log.info("nvml: using the total-energy counter of GPU %d (%s)", device_index, device_name)
        return NvmlCounterMeter(nvml, handle, device_name, device_index)
    except nvml.NVMLError as exc:
        counter_error = exc
    log.info("nvml: total-energy counter unavailable on GPU %d (%s): %s; trying power samples",
             device_index, device_name, counter_error)

    try:
        nvml.nvmlDeviceGetPowerUsage(handle)
    except nvml.NVMLError as exc:
        nvml.nvmlShutdown()
        if _is_not_supported(nvml, exc):
            raise MeterUnavailable(f"NVML reports power as NotSupported on {device_name} (as on Jetson, "
                                   "where tegrastats or jtop measure power)") from None
        raise MeterUnavailable(f"NVML power read failed on {device_name}: {exc}") from None
    log.info("nvml: integrating power samples of GPU %d (%s) every %d ms", device_index, device_name, interval_ms)
    return NvmlPowerMeter(nvml, handle, device_name, device_index, interval_ms)
