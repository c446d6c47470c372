"""MoE² coordinator: gating, expert selection, fused generation and the offline pipeline."""

__version__ = "0.1.0"
