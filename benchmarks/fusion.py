"""Fusion kernel against numpy doing the same job and against a plain copy.

Dense, for k in {2, 4, 8} experts and V in {32,000, 151,936, 262,144} tokens:
- C from log-probabilities: `fusion.fuse_dense` into a preallocated `out`;
- numpy from log-probabilities: float32 stable softmax of each row and the weighted
  sum, the fastest plain numpy version found (the float64 reference,
  `coordinator.fusion_ref`, is timed too and reported);
- C from probabilities: `fusion.fuse_dense_probs`;
- numpy from probabilities: row sums and one weighted sum (`coef @ rows`);
- copy: `np.copyto` of the same k * V float32 values, the bandwidth baseline.
Sparse, k = 8 top-m lists for m in {64, 256, 1024} over V = 262,144: `fusion.fuse_sparse`,
the raw kernel call with prepared buffers (no Python conversions), and the reference.
Sampling (informational): `fusion.sample` on a fused V = 262,144 distribution.

Each figure is the minimum over rounds of the mean time of a few calls. The candidates
take turns within each round, so that they see the same machine load. numpy's BLAS is
limited to one thread, like the kernel.

Prints one JSON line at the end:
  {"benchmark": "fusion", "dense": [...], "sparse": [...], "logprobs_speedup": ..., ...}

Usage: python benchmarks/fusion.py [--quick] [--rounds R]
"""

from __future__ import annotations

import os

# One thread for numpy's BLAS, set before numpy loads it, so both sides use one core.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator import fusion, fusion_ref  # noqa: E402

EXPERT_COUNTS = [2, 4, 8]
VOCAB_SIZES = [32_000, 151_936, 262_144]
LIST_SIZES = [64, 256, 1024]
GOALS = {"logprobs_speedup": 3.0, "probs_speedup": 1.0, "copy_fraction": 0.5, "sparse_k8_m256_us": 20.0}


def make_logprobs(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """Log-softmax rows shaped like an LLM's: a normal background and a few likely tokens."""
    logits = rng.normal(0.0, 3.0, (k, n))
    for row in logits:
        row[rng.integers(0, n, 5)] += rng.uniform(8.0, 14.0, 5)
    logits -= logits.max(axis=1, keepdims=True)
    logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logits.astype(np.float32)


def numpy_fuse_logprobs(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    exps = np.exp(rows - rows.max(axis=1, keepdims=True))
    coef = (weights / exps.sum(axis=1, dtype=np.float64)).astype(np.float32)
    exps *= coef[:, None]
    return exps.sum(axis=0)


def numpy_fuse_probs(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    coef = (weights / rows.sum(axis=1, dtype=np.float64)).astype(np.float32)
    return coef @ rows


def time_candidates(candidates: dict[str, Callable[[], object]], rounds: int,
                    calls: int) -> dict[str, float]:
    """Return the minimum over rounds of the mean seconds per call of each candidate."""
    best = {name: float("inf") for name in candidates}
    for function in candidates.values():
        function()  # warm up caches and lazily allocated buffers
    for _ in range(rounds):
        for name, function in candidates.items():
            start = time.perf_counter()
            for _ in range(calls):
                function()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def bench_dense(k: int, n: int, rounds: int, rng: np.random.Generator) -> dict:
    logprobs = make_logprobs(rng, k, n)
    probs = np.exp(logprobs)
    weights = rng.random(k) + 0.1
    weights /= weights.sum()
    out = np.empty(n, dtype=np.float32)
    copy = np.empty_like(logprobs)
    times = time_candidates({
        "c_logprobs": lambda: fusion.fuse_dense(logprobs, weights, out=out),
        "numpy_logprobs": lambda: numpy_fuse_logprobs(logprobs, weights),
        "c_probs": lambda: fusion.fuse_dense_probs(probs, weights, out=out),
        "numpy_probs": lambda: numpy_fuse_probs(probs, weights),
        "copy": lambda: np.copyto(copy, logprobs),
    }, rounds, calls=3)
    reference = time_candidates({"reference": lambda: fusion_ref.fuse_logprobs(list(logprobs), weights, 1.0)},
                                max(1, rounds // 4), calls=1)["reference"]
    bytes_read = logprobs.nbytes
    return {
        "k": k, "n_vocab": n,
        **{f"{name}_ms": round(seconds * 1e3, 4) for name, seconds in times.items()},
        "reference_ms": round(reference * 1e3, 3),
        "logprobs_speedup": round(times["numpy_logprobs"] / times["c_logprobs"], 2),
        "probs_speedup": round(times["numpy_probs"] / times["c_probs"], 2),
        "probs_vs_logprobs": round(times["c_logprobs"] / times["c_probs"], 2),
        "logprobs_copy_fraction": round(times["copy"] / times["c_logprobs"], 3),
        "probs_copy_fraction": round(times["copy"] / times["c_probs"], 3),
        "c_logprobs_read_gb_s": round(bytes_read / times["c_logprobs"] / 1e9, 1),
        "c_probs_read_gb_s": round(bytes_read / times["c_probs"] / 1e9, 1),
        "copy_gb_s": round(bytes_read / times["copy"] / 1e9, 1),
    }


def bench_sparse(m: int, rounds: int, rng: np.random.Generator, k: int = 8, n: int = 262_144) -> dict:
    logprobs = make_logprobs(rng, k, n)
    ids, values, tails = [], [], []
    for row in logprobs:
        top = np.argpartition(-row, m)[:m].astype(np.int32)
        ids.append(top)
        values.append(row[top])
        tails.append(max(0.0, 1.0 - float(np.exp(row[top].astype(np.float64)).sum())))
    tails = np.array(tails)
    weights = rng.random(k) + 0.1

    # The raw kernel call with every buffer prepared, to separate binding overhead.
    ffi, lib = fusion._require_kernel()
    all_ids, all_values = np.concatenate(ids), np.concatenate(values)
    counts = np.full(k, m, dtype=np.int32)
    out_ids = np.empty(k * m, dtype=np.int32)
    out_probs = np.empty(k * m, dtype=np.float32)
    scratch = np.empty(lib.moe2_get_lists_scratch_size(k, k * m), dtype=np.uint8)
    out_count, out_tail, error = ffi.new("int64_t *"), ffi.new("double *"), ffi.new("moe2_error *")
    arguments = (ffi.from_buffer("int32_t[]", all_ids), ffi.from_buffer("float[]", all_values),
                 ffi.from_buffer("int32_t[]", counts), ffi.from_buffer("double[]", tails), k, n,
                 ffi.from_buffer("double[]", weights), ffi.from_buffer("int32_t[]", out_ids),
                 ffi.from_buffer("float[]", out_probs), k * m, out_count, out_tail,
                 ffi.from_buffer(scratch), scratch.size, error)

    times = time_candidates({
        "c_api": lambda: fusion.fuse_sparse(ids, values, tails, weights, n),
        "c_kernel": lambda: lib.moe2_fuse_lists(*arguments),
        "reference": lambda: fusion_ref.fuse_lists(ids, values, tails, weights, n),
    }, rounds, calls=200)
    union = fusion.fuse_sparse(ids, values, tails, weights, n).ids.size
    return {"k": k, "m": m, "n_vocab": n, "union": int(union),
            **{f"{name}_us": round(seconds * 1e6, 2) for name, seconds in times.items()},
            "speedup_api": round(times["reference"] / times["c_api"], 1)}


def bench_sampling(rounds: int, rng: np.random.Generator, n: int = 262_144) -> dict:
    """Time sampling from two fused distributions: the broad one of make_logprobs, whose
    95% nucleus contains tens of thousands of tokens, and a peaked one, where a few
    tokens carry most of the mass as in a confident LLM step."""
    broad = fusion.fuse_dense(make_logprobs(rng, 8, n), rng.random(8) + 0.1)
    peaked_logits = make_logprobs(rng, 8, n) * 3.0
    peaked = fusion.fuse_dense(peaked_logits, rng.random(8) + 0.1)
    settings = {
        "greedy": {"temperature": 0.0},
        "plain": {"temperature": 1.0},
        "temperature_0.8": {"temperature": 0.8},
        "top_k_40": {"top_k": 40},
        "top_p_0.95": {"top_p": 0.95},
        "llama_cpp_defaults": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05},
    }
    result = {}
    for label, fused in (("broad", broad), ("peaked", peaked)):
        times = time_candidates({name: (lambda kw=kw, fused=fused: fusion.sample(fused, u=0.37, **kw))
                                 for name, kw in settings.items()}, rounds, calls=20)
        result.update({f"{label}_{name}_us": round(seconds * 1e6, 1) for name, seconds in times.items()})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, under a minute")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timing rounds per configuration (default: 25, or 6 with --quick)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (6 if args.quick else 25)
    rng = np.random.default_rng(7)

    dense = []
    for k in EXPERT_COUNTS:
        for n in VOCAB_SIZES:
            row = bench_dense(k, n, rounds, rng)
            dense.append(row)
            print(f"dense k={k} V={n:>7}: C logprobs {row['c_logprobs_ms']:.3f} ms "
                  f"(numpy {row['numpy_logprobs_ms']:.3f}, x{row['logprobs_speedup']}), "
                  f"C probs {row['c_probs_ms']:.3f} ms (numpy {row['numpy_probs_ms']:.3f}, "
                  f"x{row['probs_speedup']}), copy {row['copy_ms']:.3f} ms, copy fraction "
                  f"{row['logprobs_copy_fraction']} / {row['probs_copy_fraction']}", file=sys.stderr)
    sparse = []
    for m in LIST_SIZES:
        row = bench_sparse(m, rounds, rng)
        sparse.append(row)
        print(f"sparse k=8 m={m:>4}: API {row['c_api_us']:.1f} us, kernel {row['c_kernel_us']:.1f} us, "
              f"reference {row['reference_us']:.1f} us, union {row['union']}", file=sys.stderr)
    sampling = bench_sampling(rounds, rng)
    print(f"sampling: {sampling}", file=sys.stderr)

    largest = next(row for row in dense if row["k"] == 8 and row["n_vocab"] == 262_144)
    sparse_256 = next(row for row in sparse if row["m"] == 256)
    summary = {
        "benchmark": "fusion",
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "numpy": np.__version__,
        "rounds": rounds,
        "dense": dense,
        "sparse": sparse,
        "sampling": sampling,
        "logprobs_speedup": largest["logprobs_speedup"],
        "probs_speedup": largest["probs_speedup"],
        "logprobs_copy_fraction": largest["logprobs_copy_fraction"],
        "probs_copy_fraction": largest["probs_copy_fraction"],
        "sparse_k8_m256_api_us": sparse_256["c_api_us"],
        "sparse_k8_m256_kernel_us": sparse_256["c_kernel_us"],
        "goals_met": {
            "logprobs_speedup": largest["logprobs_speedup"] >= GOALS["logprobs_speedup"],
            "probs_speedup": largest["probs_speedup"] >= GOALS["probs_speedup"],
            "logprobs_copy_fraction": largest["logprobs_copy_fraction"] >= GOALS["copy_fraction"],
            "probs_copy_fraction": largest["probs_copy_fraction"] >= GOALS["copy_fraction"],
            "sparse_k8_m256_kernel": sparse_256["c_kernel_us"] < GOALS["sparse_k8_m256_us"],
            "sparse_k8_m256_api": sparse_256["c_api_us"] < GOALS["sparse_k8_m256_us"],
        },
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
