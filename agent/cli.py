"""`moe2-agent`: serve one GGUF expert's next-token distributions over ZeroMQ.

    moe2-agent --model models/cache/gemma-3-270m-q4_k_m.gguf
    moe2-agent --config /etc/moe2/agent-medicine.toml --bind tcp://127.0.0.1:5601

Settings are checked and the socket is bound before the model loads (exit status 2 on
invalid settings, 1 when the socket or the model fails). SIGTERM and SIGINT stop the agent cleanly: the
current request finishes, then the socket, context and model are freed. Under systemd
with `Type=notify` the agent reports READY=1 once it serves and pings the watchdog
from its serving loop.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

import zmq

from agent.config import OPTIONS, AgentConfig, ConfigError, load_config
import agent.energy
from agent.energy import EnergyMeter, MeterUnavailable
from agent.model import ExpertModel, ModelError
from agent.sdnotify import Notifier
from agent.server import AgentServer

log = logging.getLogger("moe2.agent")

_ARGUMENT_TYPES = {Path: str, int: int, float: float, str: str}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe2-agent",
        description="Serve one GGUF expert's next-token distributions over ZeroMQ (MoE² agent).",
        epilog="Every option can also be set in the --config TOML file under the same name "
               "with underscores (domain_prompt = \"...\"); flags override the file.")
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings")
    for option in OPTIONS:
        parser.add_argument(option.flag, dest=option.key, type=_ARGUMENT_TYPES[option.kind],
                            default=None, metavar=option.metavar, help=option.help)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_meter(config: AgentConfig) -> EnergyMeter:
    """Open the configured meter; a named meter that cannot measure raises MeterUnavailable."""
    options = {
        "interval_ms": config.energy_interval_ms,
        "watts_per_core": config.energy_watts_per_core,
        "device_index": config.energy_device_index,
    }
    return agent.energy.create_meter(
        config.energy_meter, **{key: value for key, value in options.items() if value is not None})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {option.key: getattr(args, option.key) for option in OPTIONS}
    configure_logging(flags["log_level"] if _is_level(flags["log_level"]) else "INFO")

    try:
        config = load_config(flags, args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    configure_logging(config.log_level)

    # Bind first: a taken address then fails in milliseconds, not after a model load.
    try:
        server = AgentServer(config)
    except zmq.ZMQError as exc:
        log.error("could not bind %s: %s; choose another address with --bind", config.bind, exc)
        return 1

    try:
        meter = create_meter(config)
    except MeterUnavailable as exc:
        log.error("energy meter %r is unavailable: %s. Choose another with --energy-meter "
                  "(auto falls back to none)", config.energy_meter, exc)
        server.close()
        return 1
    try:
        server.model = ExpertModel(config, meter)
    except (ModelError, OSError) as exc:
        log.error("could not load the expert: %s", exc)
        server.close()
        meter.close()
        return 1
    model = server.model

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    notifier = Notifier()
    notifier.ready(f"serving {config.expert_name} on {server.endpoint}")
    try:
        server.serve_forever(on_tick=_watchdog(notifier))
    finally:
        notifier.stopping()
        notifier.close()
        server.close()
        model.close()
        meter.close()
    log.info("agent stopped")
    return 0


def _watchdog(notifier: Notifier):
    """Return a tick callback that pings the systemd watchdog at its interval, or None."""
    interval = notifier.watchdog_interval_s
    if interval is None:
        return None
    last = [0.0]

    def tick() -> None:
        now = time.monotonic()
        if now - last[0] >= interval:
            notifier.watchdog()
            last[0] = now

    return tick


def _is_level(name: str | None) -> bool:
    return isinstance(name, str) and isinstance(logging.getLevelName(name.upper()), int)


if __name__ == "__main__":
    sys.exit(main())
