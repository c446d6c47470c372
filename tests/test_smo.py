"""SMO against exhaustive search on random instances, monotone and not."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from coordinator.smo import (
    Constraint,
    count_violations,
    exhaustive,
    find_infeasibility,
    mask_from_members,
    mask_members,
    smo,
)


def coverage_loss(scores: np.ndarray):
    """Monotone non-increasing loss: mean over rows of -log of the summed scores in S."""
    def loss(mask: int) -> float:
        return float(-np.log(scores[:, mask_members(mask)].sum(axis=1)).mean())
    return loss


def best_of_loss(costs: np.ndarray):
    """Monotone non-increasing loss with many ties: mean over rows of the min cost in S."""
    def loss(mask: int) -> float:
        return float(costs[:, mask_members(mask)].min(axis=1).mean())
    return loss


def mixture_loss(probs: np.ndarray, gates: np.ndarray):
    """Renormalized-gate mixture loss, which is not monotone in general."""
    def loss(mask: int) -> float:
        members = mask_members(mask)
        weights = gates[:, members] / gates[:, members].sum(axis=1, keepdims=True)
        return float(-np.log((weights * probs[:, members]).sum(axis=1)).mean())
    return loss


def sum_constraint(name: str, values: np.ndarray, budget: float) -> Constraint:
    return Constraint(name, budget, lambda mask: float(values[mask_members(mask)].sum()))


def max_constraint(name: str, values: np.ndarray, budget: float) -> Constraint:
    return Constraint(name, budget, lambda mask: float(values[mask_members(mask)].max()))


def random_constraints(rng: np.random.Generator, n_experts: int) -> list[Constraint]:
    """Energy (a sum) and delay (a max) with budgets from tight (infeasible) to loose."""
    energy = rng.uniform(0.5, 2.0, n_experts)
    delay = rng.uniform(0.5, 2.0, n_experts)
    return [
        sum_constraint("energy", energy, rng.uniform(0.2, 1.1) * energy.sum()),
        max_constraint("delay", delay, rng.uniform(0.3, 2.1)),
    ]


def brute_force(n_experts, loss, constraints):
    best = (math.inf, None)
    for size in range(1, n_experts + 1):
        for members in itertools.combinations(range(n_experts), size):
            mask = mask_from_members(members)
            if all(c.value(mask) <= c.budget for c in constraints):
                best = min(best, (loss(mask), mask), key=lambda item: item[0])
    return best


def test_smo_matches_exhaustive_monotone():
    rng = np.random.default_rng(20240601)
    infeasible = 0
    for trial in range(400):
        n_experts = int(rng.integers(1, 15)) if trial % 4 else int(rng.integers(10, 15))
        if trial % 2:
            loss = coverage_loss(rng.random((16, n_experts)) + 1e-3)
        else:
            loss = best_of_loss(rng.random((16, n_experts)))
        constraints = random_constraints(rng, n_experts)

        found = smo(n_experts, loss, constraints)
        reference = exhaustive(n_experts, loss, constraints)

        assert found.feasible == reference.feasible, f"trial {trial}"
        if not reference.feasible:
            infeasible += 1
            assert found.infeasibility == reference.infeasibility
            continue
        assert found.loss == pytest.approx(reference.loss, abs=1e-12), f"trial {trial}"
        assert all(found.constraint_values[c.name] <= c.budget for c in constraints)
        assert found.monotonicity_violations == 0
        assert found.complete
    assert infeasible > 10, "the budgets should include infeasible problems"


def test_smo_unique_optimum_strictly_monotone():
    rng = np.random.default_rng(7)
    for _ in range(100):
        n_experts = int(rng.integers(2, 13))
        loss = coverage_loss(rng.random((8, n_experts)) + 1e-3)
        constraints = random_constraints(rng, n_experts)

        found = smo(n_experts, loss, constraints)
        reference_loss, reference_mask = brute_force(n_experts, loss, constraints)

        assert found.subset == reference_mask
        if reference_mask is not None:
            assert found.loss == pytest.approx(reference_loss, abs=1e-12)


def test_smo_fewer_evaluations_loose_budgets():
    rng = np.random.default_rng(3)
    n_experts = 14
    loss = coverage_loss(rng.random((16, n_experts)) + 1e-3)
    energy = rng.uniform(0.5, 2.0, n_experts)
    constraints = [sum_constraint("energy", energy, 0.8 * energy.sum())]

    found = smo(n_experts, loss, constraints)
    reference = exhaustive(n_experts, loss, constraints)

    assert found.loss == pytest.approx(reference.loss, abs=1e-12)
    assert found.loss_evaluations < reference.loss_evaluations / 10


def test_smo_epsilon_answer_within_epsilon():
    rng = np.random.default_rng(11)
    for _ in range(100):
        n_experts = int(rng.integers(2, 12))
        loss = coverage_loss(rng.random((8, n_experts)) + 1e-3)
        constraints = random_constraints(rng, n_experts)
        epsilon = float(rng.uniform(0.0, 0.3))

        found = smo(n_experts, loss, constraints, epsilon=epsilon)
        reference = exhaustive(n_experts, loss, constraints)

        if reference.feasible:
            assert found.loss <= reference.loss + epsilon + 1e-12
        else:
            assert not found.feasible


def test_smo_gap_non_monotone_instances():
    rng = np.random.default_rng(5)
    violating_instances = 0
    positive_gaps = 0
    for _ in range(300):
        n_experts = int(rng.integers(3, 11))
        probs = rng.random((6, n_experts)) ** 4 + 1e-4
        gates = rng.dirichlet(np.full(n_experts, 0.5), size=6) + 1e-9
        loss = mixture_loss(probs, gates)
        constraints = random_constraints(rng, n_experts)

        found = smo(n_experts, loss, constraints)
        reference = exhaustive(n_experts, loss, constraints)
        true_loss, true_mask = brute_force(n_experts, loss, constraints)

        if true_mask is None:
            assert not found.feasible
            continue
        gap = found.loss - reference.loss
        assert gap == pytest.approx(found.loss - true_loss, abs=1e-12)
        assert gap >= -1e-12
        assert found.loss == pytest.approx(loss(found.subset), abs=1e-12)
        if count_violations(n_experts, loss) > 0:
            violating_instances += 1
        if gap > 1e-9:
            positive_gaps += 1
    assert violating_instances > 100, "mixture losses should often violate monotonicity"
    assert positive_gaps > 0, "some instances should show SMO's gap"


def test_smo_counts_violations_it_meets():
    # Expert 2 is rated highly by the gate but has a low probability, so adding it
    # to any set raises the loss. Expert 1 is weaker than expert 0, so {0} alone beats
    # {0, 1}: the descent after the search must find it.
    probs = np.array([[0.6, 0.5, 0.01]])
    gates = np.array([[0.2, 0.2, 0.6]])
    loss = mixture_loss(probs, gates)
    energy = np.array([1.0, 1.0, 1.0])
    constraints = [sum_constraint("energy", energy, 2.0)]

    found = smo(3, loss, constraints)
    unrefined = smo(3, loss, constraints, refine=False)
    reference = exhaustive(3, loss, constraints)

    assert found.subset == mask_from_members([0]) == reference.subset
    assert unrefined.subset == mask_from_members([0, 1])
    assert found.monotonicity_violations > unrefined.monotonicity_violations >= 1


def test_smo_infeasible_names_tightest_constraint():
    energy = np.array([5.0, 3.0, 4.0])
    delay = np.array([1.0, 9.0, 1.5])
    constraints = [sum_constraint("energy", energy, 4.5), max_constraint("delay", delay, 1.2)]
    loss = coverage_loss(np.ones((1, 3)))

    found = smo(3, loss, constraints)

    assert not found.feasible
    assert found.loss_evaluations == 0
    # Worst budget ratios: expert 0 misses energy by 5 / 4.5 = 1.11, expert 1 misses
    # delay by 9 / 1.2, expert 2 misses delay by 1.5 / 1.2 = 1.25. Expert 0 comes
    # closest, so it and the energy budget are named.
    assert found.infeasibility.expert == 0
    assert found.infeasibility.constraint == "energy"
    assert found.infeasibility.value == 5.0
    assert found.infeasibility.budget == 4.5


def test_find_infeasibility_zero_budget():
    constraints = [sum_constraint("energy", np.array([1.0, 2.0]), 0.0)]

    info = find_infeasibility(2, constraints)

    assert info.constraint == "energy"
    assert info.expert == 0


def test_smo_excludes_experts_infeasible_alone():
    delay = np.array([0.5, 3.0, 0.7, 0.6])
    constraints = [max_constraint("delay", delay, 1.0)]
    loss = coverage_loss(np.ones((2, 4)))

    found = smo(4, loss, constraints)

    assert found.excluded_experts == (1,)
    assert found.subset == mask_from_members([0, 2, 3])


def test_smo_full_set_when_budgets_loose():
    loss = coverage_loss(np.random.default_rng(1).random((4, 6)) + 0.1)
    constraints = [sum_constraint("energy", np.ones(6), 100.0)]

    found = smo(6, loss, constraints)

    assert found.subset == (1 << 6) - 1
    # The full set, then its six one-smaller subsets in the descent.
    assert found.loss_evaluations == 7
    assert found.vertices_expanded == 0


def test_smo_max_expansions_returns_incomplete():
    rng = np.random.default_rng(2)
    n_experts = 12
    loss = coverage_loss(rng.random((8, n_experts)) + 1e-3)
    constraints = [sum_constraint("energy", np.ones(n_experts), 3.0)]

    found = smo(n_experts, loss, constraints, max_expansions=5)
    complete = smo(n_experts, loss, constraints)

    assert not found.complete
    assert found.vertices_expanded == 5
    assert complete.complete
    assert found.lower_bound <= complete.loss


def test_exhaustive_vectorized_matches_scalar():
    rng = np.random.default_rng(9)
    n_experts = 8
    scores = rng.random((8, n_experts)) + 1e-3
    loss = coverage_loss(scores)
    energy = rng.uniform(0.5, 2.0, n_experts)

    def energies(masks):
        bits = (masks[:, None] >> np.arange(n_experts, dtype=np.uint64)) & np.uint64(1)
        return bits.astype(float) @ energy

    def losses(masks):
        return np.array([loss(int(mask)) for mask in masks])

    vectorized = [Constraint("energy", 0.5 * energy.sum(), lambda m: float(energy[mask_members(m)].sum()), energies)]
    scalar = [Constraint("energy", 0.5 * energy.sum(), lambda m: float(energy[mask_members(m)].sum()))]

    fast = exhaustive(n_experts, loss, vectorized, batch_loss=losses, chunk_size=17)
    slow = exhaustive(n_experts, loss, scalar)

    assert fast.subset == slow.subset
    assert fast.loss == slow.loss
    assert fast.loss_evaluations == slow.loss_evaluations


@pytest.mark.parametrize("bad", [0, 65])
def test_smo_rejects_invalid_expert_count(bad):
    with pytest.raises(ValueError, match="number of experts"):
        smo(bad, lambda mask: 0.0, [])


def test_smo_rejects_negative_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        smo(3, lambda mask: 0.0, [], epsilon=-0.1)
