"""Coordinator overhead per step: fused generation through k agents on loopback.

For k = 1, 2 and 4 agents and both distribution formats, the coordinator generates
greedily from the same prompt, and every step is split into
- the slowest served agent's own compute time (reported in each reply: decode,
  log-softmax or top-m), and
- the coordinator overhead: the step latency (token sent to next token sampled)
  minus that compute time. It contains msgpack encoding in the agent, ZeroMQ on
  loopback, decoding, fusion, sampling and the asyncio loop.
The overhead is split further into two parts. The coordinator's local work per step
runs from the arrival of the last fused reply to the sampled token. The transport
per reply is its round trip minus the agent's compute time. The fusion and sampling
call is also timed on its own.
The median round trip of `ping` through the same client gives the transport floor.

Baseline in the same run: the same GGUF decoded directly with llama-cpp-python in
this process (`Llama.eval([token])` plus copying the logits row), with the same
thread count, giving the per-token time of a single model without MoE².

Agents are `moe2-agent` processes with `--n-threads` threads each. On a machine with
fewer cores than k x threads, agents compete for cores, which inflates their compute
time but not the overhead. Goals at V = 262,144 (the demo model): overhead <= 1 ms per
step sparse (m = 256) and <= 3 ms dense.

    python benchmarks/generate.py --quick
    python benchmarks/generate.py --model path/to/expert.gguf --tokens 64 --rounds 3

The last line printed is one JSON object with the key figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from coordinator import generate as generate_module  # noqa: E402
from coordinator.config import parse_config  # noqa: E402
from coordinator.generate import Coordinator  # noqa: E402
from coordinator.local_agents import AgentSpec, LocalAgents  # noqa: E402

PROMPT = "The history of the printing press begins in"
SPARSE_GOAL_MS = 1.0
DENSE_GOAL_MS = 3.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF model (default: the demo model from the model cache)")
    parser.add_argument("--quick", action="store_true", help="1 round of 16 tokens (under a minute on 2 cores)")
    parser.add_argument("--tokens", type=int, default=48, help="generated tokens per run (default: 48)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all k and formats (default: 2)")
    parser.add_argument("--ks", default="1,2,4", help="numbers of fused agents, comma-separated (default: 1,2,4)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per agent and baseline (default: 1)")
    parser.add_argument("--m", type=int, default=256, help="top-m size of the sparse format (default: 256)")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.rounds = 16, 1
    args.ks = sorted({int(k) for k in args.ks.split(",")})
    if not args.ks or args.ks[0] < 1:
        parser.error(f"--ks must list positive integers, got {args.ks}")
    return args


def single_model_decode_ms(model: Path, threads: int, tokens: int) -> tuple[float, int]:
    """Return the median ms per decoded token of llama-cpp-python alone, and n_vocab."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=1024, n_threads=threads, verbose=False)
    try:
        n_vocab = llm.n_vocab()

        def last_logits() -> np.ndarray:
            # With logits_all=False, Llama.scores is not filled in llama-cpp-python 0.3.x,
            # so the row is read from the context directly.
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()

        llm.eval(llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=True))
        token = int(np.argmax(last_logits()))
        times = []
        for _ in range(tokens):
            start = time.perf_counter()
            llm.eval([token])
            logits = last_logits()
            times.append(time.perf_counter() - start)
            token = int(np.argmax(logits))
        return statistics.median(times) * 1000, n_vocab
    finally:
        llm.close()


class FusionTimer:
    """Wrap coordinator.generate.fuse_and_sample to time each call."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._original = generate_module.fuse_and_sample

    def __enter__(self) -> FusionTimer:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)

        generate_module.fuse_and_sample = timed
        return self

    def __exit__(self, *exc_info: object) -> None:
        generate_module.fuse_and_sample = self._original


async def ping_round_trip_ms(endpoint: str, count: int) -> float:
    """Return the median round trip of `ping` through the coordinator's asyncio client."""
    import zmq.asyncio

    from coordinator.client import AgentClient

    context = zmq.asyncio.Context()
    client = AgentClient("ping", endpoint, context)
    try:
        client.start()
        times = [await client.ping(10.0) for _ in range(count)]
    finally:
        client.close()
        context.destroy(linger=0)
    return statistics.median(times) * 1000


async def run_generation(endpoints: dict[str, str], k: int, dist: str, m: int, tokens: int) -> dict:
    data = {
        "experts": [{"name": name, "endpoint": endpoint} for name, endpoint in endpoints.items()],
        "selection": {"subset": list(endpoints)[:k], "top_k": k},
        "distribution": {"format": dist, **({"top_m": m} if dist == "sparse" else {})},
        "sampling": {"temperature": 0.0, "max_tokens": tokens},
        "timeouts": {"step_deadline_s": 30.0, "step_s": 60.0, "open_s": 120.0},
    }
    async with Coordinator(parse_config(data)) as coordinator:
        with FusionTimer() as timer:
            result = await coordinator.generate(PROMPT)
    replies = sum(e.replies for e in result.experts)
    return {
        "tokens": len(result.tokens),
        "step_ms": result.token_latency_mean_s * 1000,
        "overhead_ms": result.overhead_mean_ms,
        "overhead_p95_ms": result.overhead_p95_ms,
        "local_ms": result.local_mean_ms,
        "transport_ms": result.transport_mean_ms,
        "agent_compute_ms": sum(e.compute_s for e in result.experts) / replies * 1000,
        "fuse_sample_ms": statistics.mean(timer.seconds[1:] or timer.seconds) * 1000,
        "late_or_dropped": len(result.events),
    }


def main() -> int:
    args = parse_args()
    if args.model is None:
        from models.fetch import model_path

        args.model = model_path("demo")

    baseline_ms, n_vocab = single_model_decode_ms(args.model, args.threads, args.tokens)
    print(f"single model, llama-cpp-python alone: {baseline_ms:.2f} ms per token (V = {n_vocab})", file=sys.stderr)

    specs = [AgentSpec(f"agent{i}", args.model, n_threads=args.threads, n_ctx=1024, max_sessions=2)
             for i in range(max(args.ks))]
    runs: dict[tuple[str, int], list[dict]] = {}
    with LocalAgents(specs, log_level="WARNING") as agents:
        endpoints = {agent.name: agent.endpoint for agent in agents.agents}
        ping_ms = asyncio.run(ping_round_trip_ms(agents.agents[0].endpoint, 200))
        print(f"ping round trip through the asyncio client: {ping_ms:.3f} ms", file=sys.stderr)
        for _ in range(args.rounds):
            for dist in ("sparse", "dense"):
                for k in args.ks:
                    run = asyncio.run(run_generation(endpoints, k, dist, args.m, args.tokens))
                    runs.setdefault((dist, k), []).append(run)
                    print(f"{dist:6s} k={k}: step {run['step_ms']:.2f} ms, agent compute {run['agent_compute_ms']:.2f} ms, "
                          f"overhead {run['overhead_ms']:.3f} ms (p95 {run['overhead_p95_ms']:.3f}), "
                          f"local {run['local_ms']:.3f} ms, transport {run['transport_ms']:.3f} ms, "
                          f"fusion+sampling {run['fuse_sample_ms']:.3f} ms", file=sys.stderr)

    results: dict[str, dict[str, dict]] = {}
    for (dist, k), items in runs.items():
        row = {key: round(statistics.median(item[key] for item in items), 3)
               for key in ("step_ms", "agent_compute_ms", "overhead_ms", "overhead_p95_ms", "local_ms",
                           "transport_ms", "fuse_sample_ms")}
        row["step_vs_single_model"] = round(row["step_ms"] / baseline_ms, 3)
        row["late_or_dropped"] = sum(item["late_or_dropped"] for item in items)
        results.setdefault(dist, {})[str(k)] = row

    worst = {dist: max(row["overhead_ms"] for row in rows.values()) for dist, rows in results.items()}
    summary = {
        "benchmark": "generate",
        "model": args.model.name,
        "n_vocab": n_vocab,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "threads_per_agent": args.threads,
        "cpus": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
        "single_model_ms": round(baseline_ms, 3),
        "ping_ms": round(ping_ms, 3),
        "results": results,
        "max_overhead_ms": {dist: round(value, 3) for dist, value in worst.items()},
        "goal_met": {"sparse": worst.get("sparse", 0) <= SPARSE_GOAL_MS, "dense": worst.get("dense", 0) <= DENSE_GOAL_MS},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
