"""Coordinator overhead per step: fused generation through k agents on loopback.

For k = 1, 2 and 4 agents and the three distribution formats (sparse top-m, dense
log-probabilities, dense_prob probabilities), the coordinator generates greedily from
the same prompt, and every step is split into
- the slowest served agent's own compute time (reported in each reply: decode, then
  log-softmax, softmax or top-m), and
- the coordinator overhead: the step latency (token sent to next token sampled)
  minus that compute time. It contains msgpack encoding in the agent, ZeroMQ on
  loopback, decoding, fusion, sampling and the asyncio loop.
The overhead is split further into two parts. The coordinator's local work per step
runs from the arrival of the last fused reply to the sampled token. The transport
per reply is its round trip minus the agent's compute time. The fusion and sampling
call is also timed on its own.
The median round trip of `ping` through the same client gives the transport floor.
The formats take turns for each k within a round, so the compared runs see similar
machine load.

Fusion against numpy doing the same job: each run keeps the inputs of its first fused
steps (at most `--saved-steps`). After the run, the coordinator's fusion and greedy
sampling (the C kernel) and a numpy version of the same fusion followed by argmax are
timed on them in turns. numpy fuses log-probabilities by a stable softmax
of each row and a weighted sum, probabilities by a weighted sum of the rows divided by
their sums, and sparse lists by np.unique and np.bincount over the union of the ids
with the same tail rule as the kernel. `same_token_as_numpy` reports whether both
picked the same token on every saved step.

Baseline in the same run: the same GGUF decoded directly with llama-cpp-python in
this process (`Llama.eval([token])` plus copying the logits row), with the same
thread count, giving the per-token time of a single model without MoE².

Agents are `moe2-agent` processes with `--n-threads` threads each. On a machine with
fewer cores than k x threads, agents compete for cores, which inflates their compute
time but not the overhead. Goals at V = 262,144 (the demo model): overhead <= 1 ms per
step sparse (m = 256) and <= 3 ms for both dense formats.

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

from agent.protocol import Distribution  # noqa: E402
from coordinator import generate as generate_module  # noqa: E402
from coordinator.config import DISTRIBUTION_FORMATS, parse_config  # noqa: E402
from coordinator.generate import Coordinator  # noqa: E402
from coordinator.local_agents import AgentSpec, LocalAgents  # noqa: E402

PROMPT = "The history of the printing press begins in"
SPARSE_GOAL_MS = 1.0
DENSE_GOAL_MS = 3.0
GOALS_MS = {"sparse": SPARSE_GOAL_MS, "dense": DENSE_GOAL_MS, "dense_prob": DENSE_GOAL_MS}
# Turns of the C and numpy fusion over the saved steps. The minimum per step is kept.
FUSION_REPEATS = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF model (default: the demo model from the model cache)")
    parser.add_argument("--quick", action="store_true", help="1 round of 16 tokens (under a minute on 2 cores)")
    parser.add_argument("--tokens", type=int, default=48, help="generated tokens per run (default: 48)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all k and formats (default: 2)")
    parser.add_argument("--ks", default="1,2,4", help="numbers of fused agents, comma-separated (default: 1,2,4)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per agent and baseline (default: 1)")
    parser.add_argument("--m", type=int, default=256, help="top-m size of the sparse format (default: 256)")
    parser.add_argument("--formats", default="sparse,dense,dense_prob",
                        help="distribution formats, comma-separated (default: sparse,dense,dense_prob)")
    parser.add_argument("--saved-steps", type=int, default=8,
                        help="fused steps per run kept for the C against numpy fusion timing (default: 8)")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.rounds = 16, 1
    if args.tokens < 2 or args.saved_steps < 1:
        parser.error(f"--tokens must be >= 2 and --saved-steps >= 1, got {args.tokens} and {args.saved_steps}")
    args.ks = sorted({int(k) for k in args.ks.split(",")})
    if not args.ks or args.ks[0] < 1:
        parser.error(f"--ks must list positive integers, got {args.ks}")
    args.formats = [name.strip() for name in args.formats.split(",") if name.strip()]
    unknown = [name for name in args.formats if name not in DISTRIBUTION_FORMATS]
    if unknown or not args.formats:
        parser.error(f"--formats must list some of {', '.join(DISTRIBUTION_FORMATS)}, got {args.formats}")
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
    """Wrap coordinator.generate.fuse_and_sample to time each call and keep the inputs
    of the first `saved_steps` calls after the first token."""

    def __init__(self, saved_steps: int) -> None:
        self.seconds: list[float] = []
        self.saved: list[tuple] = []
        self._saved_steps = saved_steps
        self._original = generate_module.fuse_and_sample

    def __enter__(self) -> FusionTimer:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)
                if 1 < len(self.seconds) <= self._saved_steps + 1:
                    self.saved.append((args, kwargs))

        generate_module.fuse_and_sample = timed
        return self

    def __exit__(self, *exc_info: object) -> None:
        generate_module.fuse_and_sample = self._original


# --- numpy doing the fusion's job -------------------------------------------------------

def numpy_fuse_logprobs(rows: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Return sum_n w_n softmax(rows[n]) in float32, what fusion.fuse_dense returns."""
    fused = None
    for row, weight in zip(rows, weights):
        exps = np.exp(row - row.max())
        exps *= np.float32(weight / exps.sum(dtype=np.float64))
        if fused is None:
            fused = exps
        else:
            fused += exps
    return fused


def numpy_fuse_probs(rows: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Return sum_n w_n rows[n] / sum(rows[n]) in float32, what fusion.fuse_dense_probs
    returns. A loop over the rows was as fast as stacking them for one matrix-vector
    product at k = 2 and 4, and 4x faster at k = 1 (numpy 2.4, one thread)."""
    fused = None
    for row, weight in zip(rows, weights):
        scaled = row * np.float32(weight / row.sum(dtype=np.float64))
        if fused is None:
            fused = scaled
        else:
            fused += scaled
    return fused


def numpy_fuse_sparse(distributions: list[Distribution], weights: np.ndarray,
                      n_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (union of ids, fused probabilities) with the kernel's tail rule: each
    expert's tail is spread evenly over the ids it did not list."""
    base = 0.0
    ids, contributions = [], []
    for dist, weight in zip(distributions, weights):
        probs = np.exp(dist.logprobs.astype(np.float64))
        mass = probs.sum() + dist.tail
        unlisted = n_vocab - dist.ids.size
        spread = dist.tail / mass / unlisted if unlisted > 0 else 0.0
        base += weight * spread
        ids.append(dist.ids)
        contributions.append(weight * (probs / mass - spread))
    union, inverse = np.unique(np.concatenate(ids), return_inverse=True)
    fused = np.bincount(inverse, weights=np.concatenate(contributions), minlength=union.size) + base
    return union, fused


def numpy_fuse_greedy(distributions: list[Distribution], weights: np.ndarray, n_tokens: int) -> int:
    """Fuse with numpy and return the most probable token, the job of fuse_and_sample
    at temperature 0."""
    kind = distributions[0].kind
    if kind == "dense":
        return int(np.argmax(numpy_fuse_logprobs([d.logprobs for d in distributions], weights)))
    if kind == "dense_prob":
        return int(np.argmax(numpy_fuse_probs([d.probs for d in distributions], weights)))
    union, fused = numpy_fuse_sparse(list(distributions), weights, n_tokens)
    return int(union[np.argmax(fused)])


def compare_fusion(saved: list[tuple]) -> dict:
    """Time the C fusion and the numpy fusion in turns on the saved steps."""
    c_best = [float("inf")] * len(saved)
    numpy_best = [float("inf")] * len(saved)
    same_token = 0
    for _ in range(FUSION_REPEATS):
        for index, (args, kwargs) in enumerate(saved):
            distributions, weights, n_tokens = args[:3]
            start = time.perf_counter()
            c_token = generate_module.fuse_and_sample(*args, **kwargs)
            middle = time.perf_counter()
            numpy_token = numpy_fuse_greedy(distributions, weights, n_tokens)
            end = time.perf_counter()
            c_best[index] = min(c_best[index], middle - start)
            numpy_best[index] = min(numpy_best[index], end - middle)
            same_token += c_token == numpy_token
    return {"c_fuse_ms": statistics.median(c_best) * 1000,
            "numpy_fuse_ms": statistics.median(numpy_best) * 1000,
            "same_token": same_token == FUSION_REPEATS * len(saved)}


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


async def run_generation(endpoints: dict[str, str], k: int, dist: str, m: int, tokens: int,
                         saved_steps: int) -> dict:
    data = {
        "experts": [{"name": name, "endpoint": endpoint} for name, endpoint in endpoints.items()],
        "selection": {"subset": list(endpoints)[:k], "top_k": k},
        "distribution": {"format": dist, **({"top_m": m} if dist == "sparse" else {})},
        "sampling": {"temperature": 0.0, "max_tokens": tokens},
        "timeouts": {"step_deadline_s": 30.0, "step_s": 60.0, "open_s": 120.0},
    }
    async with Coordinator(parse_config(data)) as coordinator:
        with FusionTimer(saved_steps) as timer:
            result = await coordinator.generate(PROMPT)
    replies = sum(e.replies for e in result.experts)
    fusion = compare_fusion(timer.saved)
    return {
        "tokens": len(result.tokens),
        "step_ms": result.token_latency_mean_s * 1000,
        "overhead_ms": result.overhead_mean_ms,
        "overhead_p95_ms": result.overhead_p95_ms,
        "local_ms": result.local_mean_ms,
        "transport_ms": result.transport_mean_ms,
        "agent_compute_ms": sum(e.compute_s for e in result.experts) / replies * 1000,
        "fuse_sample_ms": statistics.mean(timer.seconds[1:] or timer.seconds) * 1000,
        "c_fuse_ms": fusion["c_fuse_ms"],
        "numpy_fuse_ms": fusion["numpy_fuse_ms"],
        "same_token": fusion["same_token"],
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
            for k in args.ks:
                for dist in args.formats:
                    run = asyncio.run(run_generation(endpoints, k, dist, args.m, args.tokens, args.saved_steps))
                    runs.setdefault((dist, k), []).append(run)
                    print(f"{dist:10s} k={k}: step {run['step_ms']:.2f} ms, agent compute {run['agent_compute_ms']:.2f} ms, "
                          f"overhead {run['overhead_ms']:.3f} ms (p95 {run['overhead_p95_ms']:.3f}), "
                          f"local {run['local_ms']:.3f} ms, transport {run['transport_ms']:.3f} ms, "
                          f"fusion+sampling {run['fuse_sample_ms']:.3f} ms; on saved steps: C {run['c_fuse_ms']:.3f} ms, "
                          f"numpy {run['numpy_fuse_ms']:.3f} ms", file=sys.stderr)

    results: dict[str, dict[str, dict]] = {}
    for (dist, k), items in runs.items():
        row = {key: round(statistics.median(item[key] for item in items), 3)
               for key in ("step_ms", "agent_compute_ms", "overhead_ms", "overhead_p95_ms", "local_ms",
                           "transport_ms", "fuse_sample_ms", "c_fuse_ms", "numpy_fuse_ms")}
        row["step_vs_single_model"] = round(row["step_ms"] / baseline_ms, 3)
        row["numpy_vs_c_fuse"] = round(row["numpy_fuse_ms"] / row["c_fuse_ms"], 2)
        row["same_token_as_numpy"] = all(item["same_token"] for item in items)
        row["late_or_dropped"] = sum(item["late_or_dropped"] for item in items)
        results.setdefault(dist, {})[str(k)] = row

    worst = {dist: max(row["overhead_ms"] for row in rows.values()) for dist, rows in results.items()}
    # Whole step of dense_prob against dense, per k: below 1 means dense_prob is faster.
    dense_prob_vs_dense = {}
    if "dense" in results and "dense_prob" in results:
        for k, row in results["dense_prob"].items():
            dense = results["dense"][k]
            dense_prob_vs_dense[k] = {
                "step_ratio": round(row["step_ms"] / dense["step_ms"], 3),
                "step_diff_ms": round(row["step_ms"] - dense["step_ms"], 3),
                "agent_compute_diff_ms": round(row["agent_compute_ms"] - dense["agent_compute_ms"], 3),
                "overhead_diff_ms": round(row["overhead_ms"] - dense["overhead_ms"], 3),
                "local_diff_ms": round(row["local_ms"] - dense["local_ms"], 3),
            }
    summary = {
        "benchmark": "generate",
        "model": args.model.name,
        "n_vocab": n_vocab,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "threads_per_agent": args.threads,
        "cpus": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
        "load_average": round(os.getloadavg()[0], 2),
        "single_model_ms": round(baseline_ms, 3),
        "ping_ms": round(ping_ms, 3),
        "results": results,
        "max_overhead_ms": {dist: round(value, 3) for dist, value in worst.items()},
        "goal_met": {dist: value <= GOALS_MS[dist] for dist, value in worst.items()},
        "dense_prob_vs_dense": dense_prob_vs_dense,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
