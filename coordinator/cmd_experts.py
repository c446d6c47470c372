"""`moe2 experts`: a table of the configured agents with their `info` and health.

Every configured expert is asked for `info` and a `ping`, all at once, each bounded by
`timeouts.handshake_s`. The exit status is 0 when every expert replied, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass

import zmq.asyncio

from coordinator.client import AgentClient, AgentError, AgentInfo, describe_handshake_error
from coordinator.cmd_generate import add_config_argument, config_path
from coordinator.config import Config, ConfigError, load_config

HELP = "list the configured agents with their info and health"


@dataclass
class ExpertStatus:
    name: str
    endpoint: str
    in_subset: bool
    info: AgentInfo | None = None
    ping_ms: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        info = self.info.raw if self.info else None
        if info is not None:
            info = {key: value for key, value in info.items() if key not in ("v", "op", "id", "ok")}
        return {"name": self.name, "endpoint": self.endpoint, "in_subset": self.in_subset,
                "healthy": self.error is None, "ping_ms": self.ping_ms, "error": self.error, "info": info}


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(config_path(args))
    except ConfigError as exc:
        print(f"moe2 experts: {exc}", file=sys.stderr)
        return 2
    statuses = asyncio.run(query_experts(config))
    if args.json:
        print(json.dumps({"experts": [s.to_dict() for s in statuses]}, ensure_ascii=False))
    else:
        print(format_table(statuses))
    return 0 if all(s.error is None for s in statuses) else 1


async def query_experts(config: Config) -> list[ExpertStatus]:
    """Ask every configured expert for `info` and a `ping`, concurrently."""
    context = zmq.asyncio.Context()
    clients = [AgentClient(e.name, e.endpoint, context) for e in config.experts]
    try:
        for client in clients:
            client.start()
        return list(await asyncio.gather(*(_query(client, config) for client in clients)))
    finally:
        for client in clients:
            client.close()
        context.destroy(linger=0)


async def _query(client: AgentClient, config: Config) -> ExpertStatus:
    status = ExpertStatus(client.name, client.endpoint, client.name in config.subset)
    try:
        status.info = await client.info(config.timeouts.handshake_s)
        status.ping_ms = await client.ping(config.timeouts.handshake_s) * 1000
    except AgentError as exc:
        status.error = describe_handshake_error(exc)
    return status


def format_table(statuses: list[ExpertStatus]) -> str:
    """Return an aligned text table, with a note when tokenizers differ within S."""
    header = ("EXPERT", "S", "STATUS", "PING", "MODEL", "TOKENS", "TOKENIZER", "DEVICE", "METER", "ENDPOINT")
    rows = [header]
    for status in statuses:
        info = status.info
        raw = info.raw if info else {}
        rows.append((
            status.name,
            "yes" if status.in_subset else "no",
            "ok" if status.error is None else "error",
            "-" if status.ping_ms is None else f"{status.ping_ms:.1f} ms",
            info.model if info else "-",
            str(info.n_tokens) if info else "-",
            info.tokenizer_fingerprint[:12] if info else "-",
            str(raw.get("device", "-")),
            str(_meter_name(raw.get("energy_meter"))),
            status.endpoint,
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]

    for status in statuses:
        if status.error is not None:
            lines.append(f"{status.name}: {status.error}")
    fingerprints = {s.info.tokenizer_fingerprint for s in statuses if s.info and s.in_subset}
    if len(fingerprints) > 1:
        lines.append("warning: the experts of the subset S have different tokenizers and cannot be fused together")
    return "\n".join(lines)


def _meter_name(meter: object) -> object:
    if isinstance(meter, dict):
        return meter.get("name", "-")
    return meter if meter is not None else "-"
