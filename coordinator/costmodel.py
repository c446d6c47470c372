"""Delay and energy of an expert subset per request, from a profile and application specs.

For an application with prompt lengths L (samples or a distribution) and T output
tokens, the first token comes from the prefill and each later token from one step, so

    delay(S) = E_L[ max_{n in S} prefill_n(L) + sum_{t=1}^{T-1} max_{n in S} step_n(L + t) ] + gate
    energy(S) = E_L[ sum_{n in S} (prefill_energy_n(L) + sum_{t=1}^{T-1} step_energy_n(L + t)) ]

where prefill_n and step_n interpolate the profile linearly in length. Delay is a max
and energy a sum over S, so both grow with S, as the subset search requires.

With top-k selection only k experts of S run for each prompt, but which k depends on
the prompt's gate values. The constraints then take the worst case: energy sums the k
largest expert energies of S, and delay keeps the max over all of S.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from coordinator.smo import Constraint, mask_members

PROFILE_FORMAT = "moe2-profile"
PROFILE_VERSION = 1
STATISTICS = ("median", "p95")
DISTRIBUTION_KINDS = ("uniform", "normal", "lognormal")
# Quantile points that stand for a prompt-length distribution.
DISTRIBUTION_POINTS = 64


@dataclass(frozen=True)
class Curve:
    """A measured quantity against length (tokens), interpolated linearly."""

    lengths: np.ndarray
    values: np.ndarray

    def at(self, lengths: np.ndarray) -> np.ndarray:
        """Interpolate at `lengths`; below the first point the first value holds, and
        beyond the last point the last segment's slope (at least 0) continues."""
        lengths = np.asarray(lengths, dtype=np.float64)
        result = np.interp(lengths, self.lengths, self.values)
        if len(self.lengths) >= 2:
            slope = (self.values[-1] - self.values[-2]) / (self.lengths[-1] - self.lengths[-2])
            beyond = lengths > self.lengths[-1]
            result[beyond] = self.values[-1] + max(slope, 0.0) * (lengths[beyond] - self.lengths[-1])
        return result


@dataclass(frozen=True)
class ExpertCosts:
    name: str
    prefill_seconds: Curve
    step_seconds: Curve
    prefill_joules: Curve | None
    step_joules: Curve | None
    meter: str


@dataclass(frozen=True)
class Profile:
    experts: dict[str, ExpertCosts]
    gate_seconds: float
    source: str


@dataclass(frozen=True)
class Application:
    name: str
    prompt_lengths: np.ndarray     # tokens
    weights: np.ndarray            # sums to 1
    output_tokens: int
    t_max: float                   # seconds


def _curve(section: dict, quantity: str, statistic: str, where: str) -> Curve | None:
    lengths = section.get("lengths")
    values = (section.get(quantity) or {}).get(statistic)
    if values is None or (isinstance(values, list) and any(v is None for v in values)):
        return None
    if not isinstance(lengths, list) or len(lengths) == 0 or len(lengths) != len(values):
        raise ValueError(f"{where}: `lengths` and `{quantity}.{statistic}` must be lists of the same non-zero length")
    lengths_array = np.asarray(lengths, dtype=np.float64)
    values_array = np.asarray(values, dtype=np.float64)
    if np.any(np.diff(lengths_array) <= 0):
        raise ValueError(f"{where}: lengths must be strictly increasing, got {lengths}")
    if not np.all(np.isfinite(values_array)) or np.any(values_array < 0):
        raise ValueError(f"{where}: {quantity}.{statistic} must be finite and >= 0, got {values}")
    return Curve(lengths_array, values_array)


def parse_profile(data: dict[str, Any], statistic: str = "median", source: str = "profile") -> Profile:
    """Build a Profile from the JSON written by `moe2 profile`."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if data.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{source}: not a MoE² profile (format {data.get('format')!r}, expected {PROFILE_FORMAT!r})")
    if data.get("version") != PROFILE_VERSION:
        raise ValueError(f"{source}: profile version {data.get('version')!r} is not supported (expected {PROFILE_VERSION})")
    experts: dict[str, ExpertCosts] = {}
    for index, entry in enumerate(data.get("experts") or []):
        where = f"{source}: experts[{index}]"
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: missing expert name")
        prefill = entry.get("prefill") or {}
        step = entry.get("step") or {}
        prefill_seconds = _curve(prefill, "seconds", statistic, f"{where}.prefill")
        step_seconds = _curve(step, "seconds", statistic, f"{where}.step")
        if prefill_seconds is None or step_seconds is None:
            raise ValueError(f"{where} ({name}): prefill and step seconds are required")
        experts[name] = ExpertCosts(
            name=name,
            prefill_seconds=prefill_seconds,
            step_seconds=step_seconds,
            prefill_joules=_curve(prefill, "joules", statistic, f"{where}.prefill"),
            step_joules=_curve(step, "joules", statistic, f"{where}.step"),
            meter=str((entry.get("meter") or {}).get("name", "none")),
        )
    if not experts:
        raise ValueError(f"{source}: the profile lists no experts")
    gate = data.get("gate") or {}
    gate_seconds = float(((gate.get("seconds") or {}).get(statistic)) or 0.0)
    return Profile(experts=experts, gate_seconds=gate_seconds, source=source)


def load_profile(path: str | Path, statistic: str = "median") -> Profile:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"profile not found: {path}; measure one with `moe2 profile`") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"profile {path} is not valid JSON: {exc}") from None
    return parse_profile(data, statistic, str(path))


def _positive_number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}.{key} = {value!r}: must be a number > 0")
    return float(value)


def _distribution_points(where: str, spec: Any) -> np.ndarray:
    """Quantiles at (i + 0.5) / DISTRIBUTION_POINTS of a prompt-length distribution."""
    key = f"{where}.prompt_length_distribution"
    if not isinstance(spec, dict):
        raise ValueError(f"{key} must be a table such as {{ kind = \"lognormal\", median = 300, sigma = 0.8 }}")
    kind = spec.get("kind")
    levels = (np.arange(DISTRIBUTION_POINTS) + 0.5) / DISTRIBUTION_POINTS
    if kind == "uniform":
        low = _positive_number(key, "min", spec.get("min"))
        high = _positive_number(key, "max", spec.get("max"))
        if high < low:
            raise ValueError(f"{key}: max {high} is below min {low}")
        points = low + levels * (high - low)
    elif kind == "normal":
        normal = statistics.NormalDist(_positive_number(key, "mean", spec.get("mean")),
                                       _positive_number(key, "std", spec.get("std")))
        points = np.array([normal.inv_cdf(level) for level in levels])
    elif kind == "lognormal":
        normal = statistics.NormalDist(math.log(_positive_number(key, "median", spec.get("median"))),
                                       _positive_number(key, "sigma", spec.get("sigma")))
        points = np.exp([normal.inv_cdf(level) for level in levels])
    else:
        raise ValueError(f"{key}.kind = {kind!r}: must be one of {', '.join(DISTRIBUTION_KINDS)}")
    low = spec.get("min", 1) if kind != "uniform" else 1
    high = spec.get("max", math.inf) if kind != "uniform" else math.inf
    return np.clip(np.rint(points), max(1, low), high)


def parse_applications(data: dict[str, Any], source: str = "applications") -> list[Application]:
    """Read `[[applications]]` tables: name, prompt lengths or a distribution,
    output_tokens and t_max (seconds)."""
    entries = data.get("applications")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: no [[applications]] tables; each needs name, prompt_lengths, output_tokens, t_max")
    applications = []
    names = set()
    for index, entry in enumerate(entries):
        where = f"{source}: applications[{index}]"
        allowed = {"name", "prompt_lengths", "prompt_length_weights", "prompt_length_distribution",
                   "output_tokens", "t_max"}
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown keys {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name is missing")
        if name in names:
            raise ValueError(f"{where}.name = {name!r} is used twice")
        names.add(name)

        if ("prompt_lengths" in entry) == ("prompt_length_distribution" in entry):
            raise ValueError(f"{where} ({name}): give exactly one of prompt_lengths and prompt_length_distribution")
        if "prompt_lengths" in entry:
            lengths = entry["prompt_lengths"]
            if (not isinstance(lengths, list) or not lengths
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in lengths)):
                raise ValueError(f"{where}.prompt_lengths = {lengths!r}: must be a non-empty list of token counts > 0")
            prompt_lengths = np.asarray(lengths, dtype=np.float64)
            weights = entry.get("prompt_length_weights")
            if weights is None:
                weight_array = np.full(len(prompt_lengths), 1.0 / len(prompt_lengths))
            else:
                if (not isinstance(weights, list) or len(weights) != len(lengths)
                        or not all(isinstance(w, (int, float)) and w >= 0 for w in weights) or sum(weights) <= 0):
                    raise ValueError(f"{where}.prompt_length_weights = {weights!r}: must be {len(lengths)} "
                                     "non-negative numbers with a positive sum")
                weight_array = np.asarray(weights, dtype=np.float64) / sum(weights)
        else:
            prompt_lengths = _distribution_points(where, entry["prompt_length_distribution"])
            weight_array = np.full(len(prompt_lengths), 1.0 / len(prompt_lengths))

        output_tokens = entry.get("output_tokens")
        if not isinstance(output_tokens, int) or isinstance(output_tokens, bool) or output_tokens < 1:
            raise ValueError(f"{where}.output_tokens = {output_tokens!r}: must be an integer >= 1")
        t_max = _positive_number(where, "t_max", entry.get("t_max"))
        applications.append(Application(name, prompt_lengths, weight_array, output_tokens, t_max))
    return applications


class _MaxOverSubset:
    """sum_p weight_p * max_{n in S} value[n, p], computed per group of points that
    share the same expert order (usually few groups, since speed curves rarely cross)."""

    def __init__(self, values: np.ndarray, weights: np.ndarray):
        n_experts = values.shape[0]
        order = np.argsort(-values, axis=0, kind="stable").T            # [P, N], slowest first
        groups, inverse = np.unique(order, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        # rank[g, n]: position of expert n in group g's order.
        self.rank = np.empty_like(groups)
        self.rank[np.arange(len(groups))[:, None], groups] = np.arange(n_experts)[None, :]
        # group_totals[g, n]: sum of weight_p * value[n, p] over the group's points.
        self.group_totals = np.zeros((len(groups), n_experts))
        np.add.at(self.group_totals, inverse, (values * weights[None, :]).T)

    def value(self, members: np.ndarray) -> float:
        first = members[np.argmin(self.rank[:, members], axis=1)]
        return float(self.group_totals[np.arange(len(first)), first].sum())

    def values(self, membership: np.ndarray) -> np.ndarray:
        n_experts = membership.shape[1]
        total = np.zeros(len(membership))
        for group in range(len(self.rank)):
            ranks = np.where(membership, self.rank[group][None, :], n_experts)
            first = np.argmin(ranks, axis=1)
            total += self.group_totals[group][first]
        return total


class CostModel:
    """Delay and energy per request for each application, over bitmask subsets of
    `experts` (the column order of the loss table)."""

    def __init__(self, profile: Profile, experts: Sequence[str], applications: Sequence[Application],
                 top_k: int | None = None, gate_seconds: float | None = None):
        missing = [name for name in experts if name not in profile.experts]
        if missing:
            raise ValueError(f"{profile.source} has no profile for {', '.join(missing)}; "
                             f"profiled: {', '.join(profile.experts)}. Profile every expert with `moe2 profile`")
        self.experts = tuple(experts)
        self.applications = tuple(applications)
        self.top_k = top_k
        self.gate_seconds = profile.gate_seconds if gate_seconds is None else gate_seconds
        costs = [profile.experts[name] for name in experts]
        self.unmetered = [c.name for c in costs if c.prefill_joules is None or c.step_joules is None]

        self._delay: dict[str, _MaxOverSubset] = {}
        self._energy: dict[str, np.ndarray | None] = {}
        for app in applications:
            # One point per (prompt length, step): prefill at L, steps at L + 1 ... L + T - 1.
            steps = np.arange(1, app.output_tokens, dtype=np.float64)
            step_lengths = (app.prompt_lengths[:, None] + steps[None, :]).reshape(-1)
            step_weights = np.repeat(app.weights, len(steps))
            seconds = np.stack([np.concatenate([c.prefill_seconds.at(app.prompt_lengths),
                                                c.step_seconds.at(step_lengths)]) for c in costs])
            weights = np.concatenate([app.weights, step_weights])
            self._delay[app.name] = _MaxOverSubset(seconds, weights)
            if self.unmetered:
                self._energy[app.name] = None
            else:
                self._energy[app.name] = np.array([
                    app.weights @ c.prefill_joules.at(app.prompt_lengths)
                    + step_weights @ c.step_joules.at(step_lengths) for c in costs])

    def delay(self, app: str, mask: int) -> float:
        return self._delay[app].value(_members(mask)) + self.gate_seconds

    def delays(self, app: str, masks: np.ndarray) -> np.ndarray:
        return self._delay[app].values(_membership(masks, len(self.experts))) + self.gate_seconds

    def energy(self, app: str, mask: int) -> float:
        energies = self._require_energy(app)[_members(mask)]
        if self.top_k is not None:
            energies = np.sort(energies)[-self.top_k:]
        return float(energies.sum())

    def energies(self, app: str, masks: np.ndarray) -> np.ndarray:
        energies = self._require_energy(app)
        membership = _membership(masks, len(self.experts))
        if self.top_k is None:
            return membership @ energies
        return np.sort(membership * energies[None, :], axis=1)[:, -self.top_k:].sum(axis=1)

    def _require_energy(self, app: str) -> np.ndarray:
        energies = self._energy[app]
        if energies is None:
            raise ValueError(f"no energy profile for {', '.join(self.unmetered)} (measured without an energy "
                             "meter); profile on boxes with a meter, or select without an energy budget")
        return energies

    def constraints(self, energy_max: float | None) -> list[Constraint]:
        """Build one delay constraint per application, and one energy constraint per
        application when `energy_max` (joules per request) is set."""
        constraints = []
        for app in self.applications:
            constraints.append(Constraint(
                name=f"delay[{app.name}]", budget=app.t_max, unit="s",
                value=lambda mask, a=app.name: self.delay(a, mask),
                values=lambda masks, a=app.name: self.delays(a, masks)))
        if energy_max is not None:
            if self.unmetered:
                self._require_energy(self.applications[0].name)
            for app in self.applications:
                constraints.append(Constraint(
                    name=f"energy[{app.name}]", budget=energy_max, unit="J",
                    value=lambda mask, a=app.name: self.energy(a, mask),
                    values=lambda masks, a=app.name: self.energies(a, masks)))
        return constraints


def _members(mask: int) -> np.ndarray:
    return np.asarray(mask_members(mask), dtype=np.int64)


def _membership(masks: np.ndarray, n_experts: int) -> np.ndarray:
    bits = np.arange(n_experts, dtype=np.uint64)
    return ((np.asarray(masks, dtype=np.uint64)[:, None] >> bits[None, :]) & np.uint64(1)).astype(bool)
