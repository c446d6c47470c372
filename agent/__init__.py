"""MoE² edge agent: serves one GGUF expert's next-token distributions over ZeroMQ."""

__version__ = "0.1.0"
