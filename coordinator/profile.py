"""`moe2 profile`: delay and energy profiles of every expert, through the real
coordinator-to-agent path.

For each expert and each length L (32 ... 4096 by default, capped by the session
context), a run opens a session on L prompt tokens, which measures the prefill, then
sends `--steps` steps, which measure decoding at context lengths L ... L + steps - 1
(recorded at L). Runs repeat `--repeats` times after `--warmup` unrecorded runs, and the
profile keeps the median and the 95th percentile. Times are measured at the
coordinator from request to reply, so they include the network and queueing. Joules
come from the agent's energy meter and are null where it has none.

Prompts are token ids drawn with a fixed seed from the expert's normal (non-control)
tokens, so every run is the same. The profile is JSON (read by `moe2 select`), and a
PNG plots delay and energy against prompt and context length, one line per expert.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zmq.asyncio

from agent import protocol
from coordinator.client import AgentClient, AgentError, AgentInfo, Vocabulary
from coordinator.cmd_generate import add_config_argument, config_path
from coordinator.config import Config, ConfigError, load_config
from coordinator.costmodel import PROFILE_FORMAT, PROFILE_VERSION

HELP = "measure delay and energy profiles of every expert"

log = logging.getLogger("moe2.profile")

DEFAULT_LENGTHS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# llama.cpp's LLAMA_TOKEN_ATTR_NORMAL bit in the `attrs` of a vocab reply (llama.h).
TOKEN_ATTR_NORMAL = 1 << 2
PROMPT_SEED = 20240601


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--output", type=Path, required=True, help="profile JSON to write")
    parser.add_argument("--plot", type=Path, help="PNG plot to write (default: the output path with .png)")
    parser.add_argument("--experts", help="comma-separated expert names (default: every configured expert)")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                        help="prompt and context lengths in tokens, comma-separated "
                             f"(default: {','.join(map(str, DEFAULT_LENGTHS))}); lengths above the session "
                             "context are replaced by the largest that fits")
    parser.add_argument("--steps", type=int, default=8, help="decoding steps per run (default: 8)")
    parser.add_argument("--repeats", type=int, default=5, help="recorded runs per length (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded runs per expert first (default: 1)")
    parser.add_argument("--gate-prompts", type=int, default=20,
                        help="prompts timed through the gate when [gating] is configured (default: 20)")


def _statistics(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": float(np.median(values)), "p95": float(np.percentile(values, 95))}


def _series(lengths: list[int], seconds: dict[int, list[float]], joules: dict[int, list[float | None]],
            flags: dict[int, list[bool]]) -> dict[str, Any]:
    """Per-length medians and p95 of seconds and joules; joules are null at a length
    where the meter gave no value."""
    second_stats = [_statistics(seconds[n]) for n in lengths]
    joule_stats = [_statistics([j for j in joules[n] if j is not None]) for n in lengths]
    known = all(stats is not None for stats in joule_stats)
    return {
        "lengths": lengths,
        "seconds": {key: [stats[key] for stats in second_stats] for key in ("median", "p95")},
        "joules": {key: ([stats[key] for stats in joule_stats] if known else None) for key in ("median", "p95")},
        "samples": [len(seconds[n]) for n in lengths],
        "energy_samples": [sum(j is not None for j in joules[n]) for n in lengths],
        "below_resolution_fraction": [float(np.mean(flags[n])) if flags[n] else None for n in lengths],
    }


def _energy(reply: dict) -> tuple[float | None, bool]:
    record = reply.get("energy") or {}
    joules = reply.get("energy_j")
    return (float(joules) if isinstance(joules, (int, float)) else None), bool(record.get("below_resolution"))


def _prompt_tokens(vocabulary: Vocabulary, info: AgentInfo, length: int) -> np.ndarray:
    normal = np.nonzero(vocabulary.attrs[:info.n_tokens] & TOKEN_ATTR_NORMAL)[0]
    normal = np.setdiff1d(normal, np.array(info.eos_ids, dtype=normal.dtype))
    if len(normal) == 0:
        raise AgentError(info.raw.get("name", "?"), "the vocabulary has no normal tokens to build prompts from")
    rng = np.random.default_rng(PROMPT_SEED)
    return rng.choice(normal, size=length).astype("<i4")


def usable_lengths(requested: list[int], info: AgentInfo, steps: int) -> list[int]:
    """Keep the requested lengths that fit a session with `steps` more tokens, and add
    the largest length that fits when some were dropped."""
    domain = (info.raw.get("domain_prompt") or {}).get("n_tokens", 0)
    n_ctx = int(info.raw.get("n_ctx", 0))
    cap = n_ctx - domain - steps - 1
    if cap < 1:
        raise ValueError(f"expert {info.raw.get('name')}: n_ctx {n_ctx} leaves no room for a prompt and {steps} steps")
    lengths = sorted({n for n in requested if n <= cap})
    if len(lengths) < len(set(requested)) and cap not in lengths:
        lengths.append(cap)
    return lengths


async def _run_once(client: AgentClient, config: Config, tokens: np.ndarray, steps: int) -> dict[str, Any]:
    """Open a session on `tokens`, send `steps` steps and close it; return the timings."""
    session = f"profile-{uuid.uuid4().hex[:12]}"
    fmt = config.wire_format.to_wire()
    timeouts = config.timeouts
    started = time.perf_counter()
    reply = await client.call("open", timeouts.open_s, session=session,
                              prompt=protocol.encode_array(tokens, "<i4"), format=fmt)
    prefill_s = time.perf_counter() - started
    prefill_j, prefill_flag = _energy(reply)
    step_s, step_j, step_flags = [], [], []
    try:
        token = int(tokens[-1])
        for step in range(1, steps + 1):
            started = time.perf_counter()
            reply = await client.call("step", timeouts.step_s, session=session, step=step, token=token, format=fmt)
            step_s.append(time.perf_counter() - started)
            joules, flag = _energy(reply)
            step_j.append(joules)
            step_flags.append(flag)
    finally:
        await client.close_session(session, timeouts.close_s)
    return {"prefill_s": prefill_s, "prefill_j": prefill_j, "prefill_flag": prefill_flag,
            "step_s": step_s, "step_j": step_j, "step_flags": step_flags}


async def profile_expert(client: AgentClient, config: Config, requested: list[int], steps: int,
                         repeats: int, warmup: int) -> dict[str, Any]:
    """Measure one expert; return its profile entry."""
    info = await client.info(config.timeouts.handshake_s)
    vocabulary = Vocabulary.from_reply(await client.call("vocab", config.timeouts.handshake_s))
    lengths = usable_lengths(requested, info, steps)
    log.info("profiling %s at lengths %s, %s of 1 prefill + %s", client.name, lengths,
             _count(repeats, "repeat"), _count(steps, "step"))

    for _ in range(warmup):
        await _run_once(client, config, _prompt_tokens(vocabulary, info, lengths[0]), steps)

    prefill_s = {n: [] for n in lengths}
    prefill_j = {n: [] for n in lengths}
    prefill_flags = {n: [] for n in lengths}
    step_s = {n: [] for n in lengths}
    step_j = {n: [] for n in lengths}
    step_flags = {n: [] for n in lengths}
    for length in lengths:
        tokens = _prompt_tokens(vocabulary, info, length)
        for _ in range(repeats):
            run = await _run_once(client, config, tokens, steps)
            prefill_s[length].append(run["prefill_s"])
            prefill_j[length].append(run["prefill_j"])
            prefill_flags[length].append(run["prefill_flag"])
            step_s[length].extend(run["step_s"])
            step_j[length].extend(run["step_j"])
            step_flags[length].extend(run["step_flags"])

    raw = info.raw
    return {
        "name": client.name,
        "endpoint": client.endpoint,
        "model": {key: raw.get(key) for key in ("model", "model_file", "model_sha256", "model_desc", "n_params",
                                                "n_ctx", "lora", "domain_prompt", "tokenizer_fingerprint")},
        "machine": {key: raw.get(key) for key in ("device", "n_gpu_layers", "n_threads", "flash_attn",
                                                  "llama_cpp_python", "version")},
        "meter": raw.get("energy_meter"),
        "prefill": _series(lengths, prefill_s, prefill_j, prefill_flags),
        "step": {**_series(lengths, step_s, step_j, step_flags), "steps_per_run": steps},
    }


def measure_gate(config: Config, prompts: int) -> dict[str, Any] | None:
    """Time the configured gate on synthetic prompts of growing length, or return None."""
    if not config.gating.enabled or prompts < 1:
        return None
    from coordinator.cmd_generate import load_gate

    gate = load_gate(config)
    if gate is None:
        return None
    seconds = []
    for index in range(prompts):
        prompt = " ".join(["question about the expert domain"] * (1 + index * 4))
        seconds.append(gate(prompt).seconds)
    return {"seconds": _statistics(seconds), "prompts": prompts}


def machine_description() -> dict[str, Any]:
    return {"hostname": platform.node(), "system": platform.system(), "release": platform.release(),
            "machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


async def profile_experts(config: Config, names: list[str], lengths: list[int], steps: int, repeats: int,
                          warmup: int) -> list[dict[str, Any]]:
    """Profile the experts one after another, so they do not compete for a shared box."""
    context = zmq.asyncio.Context()
    entries = []
    try:
        for name in names:
            expert = config.expert(name)
            client = AgentClient(expert.name, expert.endpoint, context)
            client.start()
            try:
                entries.append(await profile_expert(client, config, lengths, steps, repeats, warmup))
            finally:
                client.close()
    finally:
        context.destroy(linger=0)
    return entries


def plot_profile(profile: dict[str, Any], path: Path) -> None:
    """Plot delay and energy against prompt length (prefill) and context length (step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    panels = [("prefill", "seconds", "prefill delay (s)", "prompt length (tokens)"),
              ("prefill", "joules", "prefill energy (J)", "prompt length (tokens)"),
              ("step", "seconds", "step delay (s)", "context length (tokens)"),
              ("step", "joules", "step energy (J)", "context length (tokens)")]
    for axis, (phase, quantity, ylabel, xlabel) in zip(axes.flat, panels):
        drawn = False
        for expert in profile["experts"]:
            series = expert[phase]
            median = series[quantity]["median"]
            if median is None:
                continue
            line, = axis.plot(series["lengths"], median, marker="o", label=f"{expert['name']} median")
            axis.plot(series["lengths"], series[quantity]["p95"], linestyle="--", color=line.get_color(),
                      label=f"{expert['name']} p95")
            drawn = True
        if not drawn:
            axis.text(0.5, 0.5, "no energy meter on these experts", ha="center", va="center",
                      transform=axis.transAxes)
        axis.set_xscale("log", base=2)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        if drawn:
            axis.legend(fontsize="small")
    figure.suptitle("Delay and energy per expert (median solid, p95 dashed)")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def output_problem(path: Path, option: str) -> str | None:
    """Return why `path` cannot be written as a file, or None; creates nothing."""
    if path.is_dir():
        return f"{option} {path} is a folder; give a file path"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{option} {path} is not writable"
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{option} {path} cannot be created: {ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{option} {path} cannot be created: folder {ancestor} is not writable"
    return None


def _check_counts(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first of --steps, --repeats and --warmup that is out of range."""
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} is invalid: give at least 1 decoding step per run")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} is invalid: give at least 1 recorded run per length")
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup} is invalid: give 0 or more unrecorded runs")


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--lengths {text!r} is invalid: give comma-separated token counts such as 32,64,128") from None
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"--lengths {text!r} is invalid: every length must be >= 1")
    return lengths


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(config_path(args))
        lengths = _parse_lengths(args.lengths)
        _check_counts(args)
        plot_path = args.plot or args.output.with_suffix(".png")
        for path, option in ((args.output, "--output"), (plot_path, "--plot" if args.plot else "the plot path")):
            problem = output_problem(path, option)
            if problem is not None:
                raise ValueError(problem)
        names = [n.strip() for n in args.experts.split(",")] if args.experts else list(config.expert_names)
        unknown = [n for n in names if n not in config.expert_names]
        if unknown:
            raise ValueError(f"--experts names {', '.join(unknown)}, which are not configured; "
                             f"known: {', '.join(config.expert_names)}")
    except (ConfigError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2

    try:
        experts = asyncio.run(profile_experts(config, names, lengths, args.steps, args.repeats, args.warmup))
        gate = measure_gate(config, args.gate_prompts)
    except (AgentError, ValueError) as exc:
        log.error("profiling failed: %s", exc)
        return 1

    profile = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "coordinator": machine_description(),
        "settings": {"lengths": lengths, "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                     "distribution_format": config.distribution_format, "top_m": config.top_m},
        "gate": gate,
        "experts": experts,
    }
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(profile, indent=1) + "\n")
    except OSError as exc:
        log.error("could not write the profile to %s: %s", args.output, exc)
        return 1
    try:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_profile(profile, plot_path)
    except OSError as exc:
        log.error("wrote profile %s, but could not write the plot %s: %s", args.output, plot_path, exc)
        return 1
    log.info("wrote profile %s and plot %s", args.output, plot_path)
    return 0
