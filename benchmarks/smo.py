"""SMO against exhaustive search: time, loss evaluations and answers.

Each instance is a synthetic score table with domain experts (an expert gives high
probability to the targets of its own domain) and gate values that prefer the right
expert with noise, so the renormalized-gate loss is close to monotone but not exactly.
Experts sit on three kinds of box (fast and power-hungry, slow and frugal, and a
middle kind) with linear delay and energy profiles. Budgets are set relative to the
instance: the delay budget excludes the slowest experts, and the energy budget is a
fraction of what the remaining experts use together.

Prints one JSON line at the end, with per-N medians:
  {"benchmark": "smo", "rows": [...], "identical_answers": ..., "smo_median_s_n32": ...}

Usage: python benchmarks/smo.py [--quick] [--seeds K]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.costmodel import CostModel, parse_applications, parse_profile  # noqa: E402
from coordinator.losstable import LossTable, ScoreTable  # noqa: E402
from coordinator.smo import exhaustive, smo  # noqa: E402

LENGTHS = [32, 128, 512, 2048]
# (prefill seconds per 32 tokens, step seconds, watts) per kind of box, roughly a
# desktop GPU, a Jetson-class board and a CPU server.
BOX_KINDS = [(0.004, 0.012, 300.0), (0.03, 0.05, 25.0), (0.08, 0.09, 90.0)]
APPLICATIONS = {"applications": [
    {"name": "chat", "prompt_lengths": [64, 256, 1024], "output_tokens": 32, "t_max": 1.0},
    {"name": "summary", "prompt_length_distribution": {"kind": "lognormal", "median": 800, "sigma": 0.6,
                                                       "max": 4096}, "output_tokens": 16, "t_max": 1.0},
]}


def make_instance(n_experts: int, seed: int, n_examples: int = 48, targets: int = 6):
    rng = np.random.default_rng(seed)
    n_domains = max(2, n_experts // 2)
    expert_domain = rng.integers(0, n_domains, n_experts)
    example_domain = rng.integers(0, n_domains, n_examples)
    own = expert_domain[None, :] == example_domain[:, None]                   # [E, N]
    quality = np.where(own, rng.uniform(0.4, 0.9, own.shape), rng.uniform(0.02, 0.3, own.shape))
    probs = np.repeat(quality, targets, axis=0) * rng.uniform(0.6, 1.0, (n_examples * targets, n_experts))
    offsets = np.arange(0, n_examples * targets + 1, targets, dtype=np.int64)
    names = tuple(f"expert{i}" for i in range(n_experts))
    table = ScoreTable(np.log(probs), offsets, names)
    logits = 3.0 * np.log(quality) + rng.normal(0, 0.7, quality.shape)
    gates = np.exp(logits - logits.max(axis=1, keepdims=True))
    gates /= gates.sum(axis=1, keepdims=True)

    experts = []
    for name in names:
        prefill, step, watts = BOX_KINDS[rng.integers(0, len(BOX_KINDS))]
        prefill *= rng.uniform(0.8, 1.25)
        step *= rng.uniform(0.8, 1.25)
        prefill_seconds = [prefill * n / 32 for n in LENGTHS]
        step_seconds = [step * (1 + n / 8192) for n in LENGTHS]
        experts.append({
            "name": name,
            "prefill": {"lengths": LENGTHS, "seconds": {"median": prefill_seconds},
                        "joules": {"median": [watts * s for s in prefill_seconds]}},
            "step": {"lengths": LENGTHS, "seconds": {"median": step_seconds},
                     "joules": {"median": [watts * s for s in step_seconds]}},
        })
    profile = parse_profile({"format": "moe2-profile", "version": 1, "experts": experts})
    return table, gates, profile


def run_case(n_experts: int, seed: int, energy_fraction: float, with_exhaustive: bool) -> dict:
    table, gates, profile = make_instance(n_experts, seed)
    # t_max keeps the fastest 80% of experts, each on its own, for every application.
    base = CostModel(profile, table.experts, parse_applications(APPLICATIONS))
    apps = []
    for app in base.applications:
        alone = sorted(base.delay(app.name, 1 << n) for n in range(n_experts))
        t_max = alone[max(0, int(0.8 * n_experts) - 1)]
        apps.append(replace(app, t_max=t_max))
    costs = CostModel(profile, table.experts, apps)
    # E_max is a fraction of the energy of all experts that meet the delay budgets.
    delay_constraints = costs.constraints(energy_max=None)
    fast_mask = sum(1 << n for n in range(n_experts) if all(c.value(1 << n) <= c.budget for c in delay_constraints))
    energy_max = energy_fraction * max(costs.energy(app.name, fast_mask) for app in apps)
    constraints = costs.constraints(energy_max)

    losses = LossTable(table, gates)
    started = time.perf_counter()
    found = smo(n_experts, losses.loss, constraints)
    smo_seconds = time.perf_counter() - started
    row = {"n": n_experts, "seed": seed, "energy_fraction": energy_fraction, "smo_s": smo_seconds,
           "smo_loss_evaluations": found.loss_evaluations, "smo_size": bin(found.subset or 0).count("1"), "violations": found.monotonicity_violations}
    if with_exhaustive:
        reference_losses = LossTable(table, gates)
        started = time.perf_counter()
        reference = exhaustive(n_experts, reference_losses.loss, constraints, batch_loss=reference_losses.losses)
        row["exhaustive_s"] = time.perf_counter() - started
        row["exhaustive_loss_evaluations"] = reference.loss_evaluations
        row["identical"] = found.subset == reference.subset
        row["gap"] = (found.loss - reference.loss) if found.loss is not None else None
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few seeds (under a minute)")
    parser.add_argument("--seeds", type=int, help="instances per size and budget (default: 5, or 2 with --quick)")
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 5)
    compared = [8, 12, 16] if args.quick else [8, 12, 16, 20]
    alone = [32] if args.quick else [32, 48, 64]
    fractions = [0.6, 0.8] if args.quick else [0.5, 0.7, 0.9]

    rows = []
    for n_experts in compared + alone:
        for fraction in fractions:
            for seed in range(seeds):
                row = run_case(n_experts, seed, fraction, with_exhaustive=n_experts in compared)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)

    summary = []
    for n_experts in compared + alone:
        for fraction in fractions:
            group = [r for r in rows if r["n"] == n_experts and r["energy_fraction"] == fraction]
            entry = {"n": n_experts, "energy_fraction": fraction, "instances": len(group),
                     "smo_median_s": statistics.median(r["smo_s"] for r in group),
                     "smo_median_evaluations": statistics.median(r["smo_loss_evaluations"] for r in group),
                     "median_size": statistics.median(r["smo_size"] for r in group),
                     "violations_median": statistics.median(r["violations"] for r in group)}
            if n_experts in compared:
                entry["exhaustive_median_s"] = statistics.median(r["exhaustive_s"] for r in group)
                entry["exhaustive_median_evaluations"] = statistics.median(
                    r["exhaustive_loss_evaluations"] for r in group)
                entry["identical"] = sum(r["identical"] for r in group)
                entry["max_gap"] = max(r["gap"] for r in group)
            summary.append(entry)
            print(json.dumps(entry), file=sys.stderr)

    with_reference = [r for r in rows if "identical" in r]
    n32 = [r["smo_s"] for r in rows if r["n"] == 32]
    print(json.dumps({
        "benchmark": "smo",
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "quick": args.quick,
        "rows": summary,
        "identical_answers": f"{sum(r['identical'] for r in with_reference)}/{len(with_reference)}",
        "max_gap": max(r["gap"] for r in with_reference),
        "smo_median_s_n32": statistics.median(n32),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
