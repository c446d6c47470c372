"""Per-step latency through the agent on loopback versus the same decode called directly.

Baseline step: llama-cpp-python's `Llama.eval([token])` (one llama_decode of one token)
followed by copying the last logits row into a numpy array, the least a caller needs
to use the distribution. Agent step: `AgentClient.step` against a `moe2-agent` process
on tcp://127.0.0.1, which adds the log-softmax (dense), the softmax (dense_prob) or
the top-m selection (sparse), msgpack, ZeroMQ and decoding the reply on the client
side.

Both sides load the same GGUF with the same thread count and flash attention setting
and decode the same token sequence from the same prompt. The four paths (baseline,
dense, dense_prob, sparse) take one step each in turn, so a change in machine load
hits all of them alike. `*_ratio` is the ratio of median step latencies and decides
the goals: sparse (m = 256) <= 1.05, dense and dense_prob <= 1.15. `*_paired_ratio`
is the median of the per-step ratios, which is less sensitive to load that changes
during the run.

    python benchmarks/agent_step.py --quick
    python benchmarks/agent_step.py --model path/to/expert.gguf --threads 4 --rounds 8

The last line printed is one JSON object with the key figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import llama_cpp
import numpy as np

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from agent.client import AgentClient  # noqa: E402
from agent.config import load_config  # noqa: E402
from agent.model import ExpertModel  # noqa: E402
from agent.protocol import DENSE, DENSE_PROB, DistributionFormat  # noqa: E402
from agent.server import AgentServer  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Germany is"
SPARSE_GOAL = 1.05
DENSE_GOAL = 1.15
SERVING = re.compile(r"serving \S+ on (tcp://127\.0\.0\.1:\d+)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF model (default: the demo model from the model cache)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 16 steps (under a minute on 2 idle cores)")
    parser.add_argument("--rounds", type=int, default=6,
                        help="rounds of baseline, dense, dense_prob and sparse (default: 6)")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per round and path (default: 48)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="llama.cpp threads on both sides (default: the CPUs this process may use)")
    parser.add_argument("--m", type=int, default=256, help="top-m size of the sparse format (default: 256)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the agent's server in a thread of this process instead of a moe2-agent "
                             "process, which leaves out the scheduling of a second process")
    parser.add_argument("--flash-attn", choices=("on", "off"), default="on",
                        help="flash attention on both sides (default: on, what llama.cpp's auto picks on CPU)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 3, 16
    if args.model is None:
        from models.fetch import model_path
        args.model = model_path("demo")
    return args


class AgentThread:
    """An agent server in a thread of this process, on a free loopback port."""

    def __init__(self, args: argparse.Namespace, n_ctx: int):
        config = load_config({"model": args.model, "bind": "tcp://127.0.0.1:*", "n_threads": args.threads,
                              "n_ctx": n_ctx, "max_sessions": 3, "flash_attn": args.flash_attn})
        self.server = AgentServer(config, ExpertModel(config))
        self.address = self.server.endpoint
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=30)
        self.server.close()
        self.server.model.close()


class AgentProcess:
    """A `moe2-agent` subprocess on a free loopback port."""

    def __init__(self, args: argparse.Namespace, n_ctx: int):
        command = [sys.executable, "-m", "agent.cli", "--model", str(args.model), "--bind", "tcp://127.0.0.1:*",
                   "--n-threads", str(args.threads), "--n-ctx", str(n_ctx), "--max-sessions", "3",
                   "--flash-attn", args.flash_attn, "--log-level", "INFO"]
        self.process = subprocess.Popen(command, cwd=REPOSITORY, env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.address = self._wait_for_address()
        # Keep draining stderr so the agent never blocks on a full pipe.
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def _wait_for_address(self, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        lines = []
        for line in self.process.stderr:
            lines.append(line)
            if match := SERVING.search(line):
                return match.group(1)
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("the agent did not start:\n" + "".join(lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class BaselineStepper:
    """Steps of the direct path: Llama.eval of one token, then a copy of its logits."""

    def __init__(self, llm: llama_cpp.Llama, prompt: list[int]):
        self.llm = llm
        self.n_vocab = llm.n_vocab()
        llm.reset()
        llm.eval(prompt)

    def step(self, _step: int, token: int) -> float:
        started = time.perf_counter()
        self.llm.eval([token])
        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()
        elapsed = time.perf_counter() - started
        assert logits.std() > 0, "the baseline read constant logits"
        return elapsed


class AgentStepper:
    """Steps of one agent session in format `fmt`; keeps the agent's compute seconds."""

    def __init__(self, client: AgentClient, session: str, prompt: list[int], fmt: DistributionFormat):
        self.client = client
        self.session = session
        self.fmt = fmt
        self.compute_s: list[float] = []
        client.open(session, prompt, fmt)

    def step(self, step: int, token: int) -> float:
        started = time.perf_counter()
        result = self.client.step(self.session, step, token, self.fmt)
        elapsed = time.perf_counter() - started
        self.compute_s.append(result.compute_s)
        return elapsed

    def close(self) -> None:
        self.client.close_session(self.session)


def lockstep_round(steppers: dict, tokens: list[int], latencies: dict[str, list[float]]) -> None:
    """Decode `tokens` on every path, one step of each in turn, rotating which goes first."""
    names = list(steppers)
    for step, token in enumerate(tokens, start=1):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            latencies[name].append(steppers[name].step(step, token))


def greedy_tokens(llm: llama_cpp.Llama, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    tokens = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == n:
            break
    # Past an end-of-generation token, keep decoding plain text tokens.
    return (tokens + [llm.tokenize(b" the", add_bos=False)[0]] * n)[:n]


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def main() -> int:
    args = parse_args()
    llm = llama_cpp.Llama(str(args.model), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                          flash_attn=args.flash_attn == "on", verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), special=True)
    tokens = greedy_tokens(llm, prompt, args.steps)
    agent = (AgentThread if args.in_process else AgentProcess)(args, n_ctx=len(prompt) + args.steps + 8)
    sparse = DistributionFormat("sparse", args.m)
    latencies: dict[str, list[float]] = {"baseline": [], "dense": [], "dense_prob": [], "sparse": []}
    compute: dict[str, list[float]] = {"dense": [], "dense_prob": [], "sparse": []}
    try:
        with AgentClient(agent.address, timeout_s=60) as client:
            client.open("warm-up", prompt, DENSE)
            client.close_session("warm-up")
            for round_index in range(args.rounds):
                steppers = {"baseline": BaselineStepper(llm, prompt),
                            "dense": AgentStepper(client, f"dense-{round_index}", prompt, DENSE),
                            "dense_prob": AgentStepper(client, f"dense-prob-{round_index}", prompt, DENSE_PROB),
                            "sparse": AgentStepper(client, f"sparse-{round_index}", prompt, sparse)}
                lockstep_round(steppers, tokens, latencies)
                for name in compute:
                    compute[name] += steppers[name].compute_s
                    steppers[name].close()
                print(f"round {round_index + 1}/{args.rounds}: medians so far: "
                      + ", ".join(f"{name} {median_ms(values):.2f} ms" for name, values in latencies.items()),
                      file=sys.stderr)
    finally:
        agent.stop()
        llm.close()

    baseline = np.array(latencies["baseline"])
    result = {
        "benchmark": "agent_step",
        "model": args.model.name,
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, load {os.getloadavg()[0]:.1f}",
        "threads": args.threads,
        "flash_attn": args.flash_attn,
        "agent": "thread" if args.in_process else "process",
        "sparse_m": args.m,
        "steps_per_path": len(baseline),
        "baseline_ms": round(median_ms(latencies["baseline"]), 3),
    }
    for name, goal in (("dense", DENSE_GOAL), ("dense_prob", DENSE_GOAL), ("sparse", SPARSE_GOAL)):
        steps = np.array(latencies[name])
        ratio = float(np.median(steps) / np.median(baseline))
        result[f"{name}_ms"] = round(median_ms(latencies[name]), 3)
        result[f"{name}_agent_compute_ms"] = round(median_ms(compute[name]), 3)
        result[f"{name}_ratio"] = round(ratio, 4)
        result[f"{name}_paired_ratio"] = round(float(np.median(steps / baseline)), 4)
        result[f"{name}_goal_met"] = ratio <= goal
    # Below 1: the agent step is faster with probabilities than with log-probabilities.
    result["dense_prob_vs_dense_paired_ratio"] = round(
        float(np.median(np.array(latencies["dense_prob"]) / np.array(latencies["dense"]))), 4)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
