"""Energy meters for agents: jetson-stats, tegrastats, NVML, RAPL, a labelled estimate, or none."""

from agent.energy.base import (
    METHOD_COUNTER,
    METHOD_ESTIMATED,
    METHOD_INTEGRATED,
    METHOD_NONE,
    EnergyMeter,
    EnergyRecord,
    MeterUnavailable,
    NoneMeter,
)
from agent.energy.detect import AUTO_ORDER, METER_NAMES, METER_OPTIONS, create_meter

__all__ = [
    "AUTO_ORDER",
    "METER_NAMES",
    "METER_OPTIONS",
    "METHOD_COUNTER",
    "METHOD_ESTIMATED",
    "METHOD_INTEGRATED",
    "METHOD_NONE",
    "EnergyMeter",
    "EnergyRecord",
    "MeterUnavailable",
    "NoneMeter",
    "create_meter",
]
