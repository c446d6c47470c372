"""`moe2 generate "prompt"`: generate a completion with the selected experts, streaming it.

The generated text goes to stdout as it is produced, and a short summary to stderr, so
the text can be piped on its own. With --json nothing is streamed, and stdout gets one
JSON object with the text, tokens and all figures of the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from coordinator.config import EMBEDDER_ONNX, EMBEDDER_TOKENIZER, Config, ConfigError, load_config
from coordinator.embedding import EmbedderError
from coordinator.gating import Gate, GateError
from coordinator.generate import Coordinator, GenerationError
from coordinator.result import ExpertReport, GenerationResult

HELP = "generate an answer with the selected experts, streaming it"

DEFAULT_CONFIG = "moe2.toml"

log = logging.getLogger("moe2.coordinator.cli")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help=f"coordinator TOML file (default: $MOE2_CONFIG, else ./{DEFAULT_CONFIG})")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    add_config_argument(parser)
    parser.add_argument("--top-k", type=int, default=None, help="number of experts fused per prompt (default: from the config)")
    parser.add_argument("--max-tokens", type=int, default=None, help="maximum number of generated tokens")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 selects greedy decoding")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a fresh one, reported)")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop when this text is generated (repeatable; replaces the config's list)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")


def config_path(args: argparse.Namespace) -> Path:
    if args.config is not None:
        return args.config
    return Path(os.environ.get("MOE2_CONFIG", DEFAULT_CONFIG))


def load_gate(config: Config) -> Gate | None:
    """Return the gate for the experts of S, or None (uniform values) without [gating].

    Gate outputs are matched to the configured experts by name. After the handshake the
    coordinator warns about an expert whose fingerprint differs from the gate's for that name.
    """
    if not config.gating.enabled:
        return None
    embedder = config.gating.embedder
    gate = Gate.load(config.gating.gate, embedder_onnx=embedder / EMBEDDER_ONNX,
                     tokenizer=embedder / EMBEDDER_TOKENIZER, providers=list(config.gating.providers))
    return gate.for_experts(list(config.subset))


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(config_path(args))
        config = config.with_overrides(top_k=args.top_k, max_tokens=args.max_tokens, temperature=args.temperature,
                                       top_p=args.top_p, seed=args.seed, stop=args.stop)
        gate = load_gate(config)
    except (ConfigError, GateError, EmbedderError) as exc:
        print(f"moe2 generate: {exc}", file=sys.stderr)
        return 2

    try:
        result = asyncio.run(_generate(config, gate, args.prompt, stream=not args.json))
    except (GenerationError, GateError) as exc:
        print(f"moe2 generate: {exc}", file=sys.stderr)
        return 1

    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(format_summary(result), file=sys.stderr)
    return 0


async def _generate(config: Config, gate: Gate | None, prompt: str, stream: bool) -> GenerationResult:
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    async with Coordinator(config, gate) as coordinator:
        return await coordinator.generate(prompt, on_text=write if stream else None)


def _seconds(value: float | None, scale: float = 1.0, unit: str = "s", digits: int = 3) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}g} {unit}"


def _joules(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3g} J"


def describe_stop(result: GenerationResult) -> str:
    """Return why generation ended, in words: the stop text, the end token or the limit."""
    if result.stop_reason == "stop":
        return f"stopped at stop text {result.stop_text!r}"
    if result.stop_reason == "eos" and result.tokens:
        return f"stopped at an end-of-sequence token (id {result.tokens[-1]})"
    if result.stop_reason == "max_tokens":
        return f"stopped at the token limit ({result.max_tokens})"
    return f"stopped by {result.stop_reason}"


def describe_unknown_energy(experts: list[ExpertReport]) -> str:
    """Return why the energy of a request is unknown, naming the experts and their meters."""
    unknown = [expert for expert in experts if expert.energy_j is None]
    no_meter = [expert.name for expert in unknown if expert.meter in (None, "none")]
    no_reply = [expert.name for expert in unknown if expert.name not in no_meter and expert.replies == 0]
    no_reading = [f"{expert.meter} on {expert.name}" for expert in unknown
                  if expert.name not in no_meter and expert.replies > 0]
    reasons = []
    if no_meter:
        reasons.append(f"no meter on {', '.join(no_meter)}")
    if no_reply:
        reasons.append(f"no reply from {', '.join(no_reply)}")
    if no_reading:
        reasons.append(f"no reading in some replies from {', '.join(no_reading)}")
    return "; ".join(reasons)


def format_summary(result: GenerationResult) -> str:
    """Return a few human-readable lines: experts, weights, timing, energy."""
    lines = ["---"]
    gate = "uniform (no trained gate configured)" if result.gate_uniform else f"trained, {result.gate_s * 1000:.1f} ms"
    lines.append(f"gate: {gate}; top-k {result.top_k}; request {result.request_id}")
    steps = len(result.tokens)
    for expert in result.experts:
        line = (f"  {expert.name}: gate {expert.gate:.4f}, weight {expert.weight:.4f}, "
                f"served {expert.served_steps}/{steps} steps, energy {_joules(expert.energy_j)}")
        if expert.late_steps:
            line += f", late {expert.late_steps}x"
        if expert.dropped_at_step is not None:
            line += f", dropped at step {expert.dropped_at_step} ({expert.drop_reason})"
        lines.append(line)
    for event in result.events:
        if event.kind == "unavailable":
            lines.append(f"  {event.expert}: left out, handshake failed: {event.detail}")
    lines.append(f"tokens: {steps}, {describe_stop(result)}; first token {_seconds(result.time_to_first_token_s)}; "
                 f"per token {_seconds(result.token_latency_mean_s, 1000, 'ms')} mean, "
                 f"{_seconds(result.token_latency_p95_s, 1000, 'ms')} p95; "
                 f"{'n/a' if result.tokens_per_s is None else f'{result.tokens_per_s:.3g}'} tokens/s")
    if result.overhead_mean_ms is not None:
        lines.append(f"coordinator overhead per step: {result.overhead_mean_ms:.2f} ms mean "
                     f"(step latency minus the slowest served expert's compute time and the wait for late experts)")
    if result.late_wait_steps:
        plural = "" if result.late_wait_steps == 1 else "s"
        lines.append(f"waited for late experts: {result.late_wait_s:.3g} s in total, at {result.late_wait_steps} "
                     f"step{plural} that reached the deadline")
    if result.energy_j is None:
        lines.append(f"energy: unknown ({describe_unknown_energy(result.experts)})")
    else:
        lines.append(f"energy: {_joules(result.energy_j)} in total")
    return "\n".join(lines)
