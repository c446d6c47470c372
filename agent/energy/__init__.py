"""Energy meters for agents: jetson-stats, tegrastats, NVML, RAPL, or none."""

from agent.energy.base import EnergyMeter, EnergyRecord, NoneMeter

__all__ = ["EnergyMeter", "EnergyRecord", "NoneMeter"]
