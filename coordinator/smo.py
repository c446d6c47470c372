"""Subset Monotonic Optimization (SMO): choose the expert subset S with the lowest loss
under delay and energy budgets.

Subsets of N experts are int bitmasks (bit n set when expert n is in S). The search
assumes two monotone properties:

- every constraint value is non-decreasing as S grows (delay is a max over S, energy a
  sum), so the feasible sets are closed under taking subsets;
- the loss is non-increasing as S grows, so L(S) is a lower bound on the loss of every
  subset of S.

SMO starts from the full set and searches downward, best bound first. A popped set that
meets every budget becomes the incumbent and is not branched, because its subsets cannot
do better. An infeasible one is branched by removing one expert at a time. Sets whose
bound cannot beat the incumbent by more than epsilon are pruned, every set is generated
once, and sets contained in an already evaluated feasible set are dropped as dominated.
Under both assumptions the chosen subset is epsilon-optimal. Losses computed with a finite,
renormalized gate are only approximately monotone, so the search counts the violations
it meets (a subset whose loss is lower than its superset's). It then descends from the
chosen subset through one-smaller subsets while the loss falls, which only moves when the loss
is not monotone. `exhaustive` gives the true optimum for the optimality gap where 2^N
is small enough.

Nothing here does I/O. Losses and constraint values come in as callables.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

LossFunction = Callable[[int], float]
BatchLossFunction = Callable[[np.ndarray], np.ndarray]

# Relative tolerance below which a subset's lower loss is not counted as a violation,
# so float rounding in equal losses is not reported.
VIOLATION_RELATIVE_TOLERANCE = 1e-12

# Bitmasks are batched as uint64 for the vectorized exhaustive search.
MAX_EXPERTS = 64


@dataclass(frozen=True)
class Constraint:
    """One budget: `value(mask) <= budget` must hold. `value` must not decrease as S grows.

    `values`, when given, evaluates a uint64 array of masks at once (used by
    `exhaustive`); it must agree with `value`.
    """

    name: str
    budget: float
    value: Callable[[int], float]
    values: Callable[[np.ndarray], np.ndarray] | None = None
    unit: str = ""


@dataclass(frozen=True)
class Infeasibility:
    """Why no subset meets the budgets: the tightest constraint at the best single expert.

    Under monotone constraints a single expert is the cheapest way to meet each budget,
    so `expert` is the one whose worst budget ratio (value / budget) is lowest, and
    `constraint` is the budget it misses by the largest ratio.
    """

    constraint: str
    expert: int
    value: float
    budget: float
    unit: str = ""


@dataclass
class SearchResult:
    """Outcome of `smo` or `exhaustive`."""

    subset: int | None
    loss: float | None
    constraint_values: dict[str, float]
    loss_evaluations: int
    feasibility_checks: int
    vertices_expanded: int = 0
    monotonicity_violations: int = 0
    # False when `max_expansions` stopped the search before it proved epsilon-optimality.
    complete: bool = True
    # Lowest bound left in the queue when the search stopped (inf once it is exhausted).
    lower_bound: float = math.inf
    infeasibility: Infeasibility | None = None
    excluded_experts: tuple[int, ...] = field(default_factory=tuple)

    @property
    def feasible(self) -> bool:
        return self.subset is not None


def mask_members(mask: int) -> list[int]:
    """Return the expert indices in `mask`, ascending."""
    members = []
    index = 0
    while mask:
        if mask & 1:
            members.append(index)
        mask >>= 1
        index += 1
    return members


def mask_from_members(members: Sequence[int]) -> int:
    mask = 0
    for index in members:
        mask |= 1 << index
    return mask


def _check_size(n_experts: int) -> None:
    if not 1 <= n_experts <= MAX_EXPERTS:
        raise ValueError(f"number of experts must be between 1 and {MAX_EXPERTS}, got {n_experts}")


def _is_feasible(mask: int, constraints: Sequence[Constraint]) -> bool:
    return all(c.value(mask) <= c.budget for c in constraints)


def _constraint_values(mask: int, constraints: Sequence[Constraint]) -> dict[str, float]:
    return {c.name: float(c.value(mask)) for c in constraints}


def find_infeasibility(n_experts: int, constraints: Sequence[Constraint]) -> Infeasibility:
    """Name the tightest constraint of a problem where no single expert meets every budget."""
    best: tuple[float, Infeasibility] | None = None
    for expert in range(n_experts):
        mask = 1 << expert
        worst: tuple[float, Infeasibility] | None = None
        for c in constraints:
            value = float(c.value(mask))
            if c.budget > 0:
                ratio = value / c.budget
            else:
                ratio = math.inf if value > 0 else 0.0
            if worst is None or ratio > worst[0]:
                worst = (ratio, Infeasibility(c.name, expert, value, c.budget, c.unit))
        if worst is not None and (best is None or worst[0] < best[0]):
            best = worst
    if best is None:
        raise ValueError("find_infeasibility needs at least one constraint")
    return best[1]


def smo(
    n_experts: int,
    loss: LossFunction,
    constraints: Sequence[Constraint],
    epsilon: float = 0.0,
    max_expansions: int | None = None,
    refine: bool = True,
) -> SearchResult:
    """Search for an epsilon-optimal feasible subset from the full set downward.

    `epsilon` (in loss units) prunes every set whose bound is not lower than the
    incumbent's loss minus epsilon. `max_expansions` caps the number of branched sets.
    When the cap stops the search, the result has `complete=False` and the incumbent
    found so far, and `lower_bound` bounds the optimum from below (under monotonicity).
    `refine` runs a descent from the chosen subset through one-smaller subsets, which
    changes the result only where the loss is not monotone.
    """
    _check_size(n_experts)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")

    losses: dict[int, float] = {}
    feasibility_checks = 0

    def evaluate(mask: int) -> float:
        if mask not in losses:
            losses[mask] = float(loss(mask))
        return losses[mask]

    # Reduction: with constraints closed under subsets, an expert that misses a budget
    # on its own is in no feasible set, so it leaves the universe before the search.
    universe = 0
    excluded = []
    for expert in range(n_experts):
        feasibility_checks += 1
        if _is_feasible(1 << expert, constraints):
            universe |= 1 << expert
        else:
            excluded.append(expert)
    if universe == 0:
        return SearchResult(
            subset=None, loss=None, constraint_values={}, loss_evaluations=0,
            feasibility_checks=feasibility_checks,
            infeasibility=find_infeasibility(n_experts, constraints),
            excluded_experts=tuple(excluded),
        )

    best_mask: int | None = None
    best_loss = math.inf
    evaluated_feasible: list[int] = []
    expansions = 0
    violations = 0
    complete = True

    # Heap entries: (bound, evaluated, mask). A set enters with its parent's loss as
    # bound and is evaluated only when popped, which saves the loss of every set the
    # incumbent prunes. An evaluated set whose own loss is above the next bound goes
    # back in, so sets leave the heap in the order of their true bounds.
    heap: list[tuple[float, bool, int]] = [(-math.inf, False, universe)]
    generated = {universe}

    while heap:
        bound, evaluated, mask = heap[0]
        if bound >= best_loss - epsilon:
            break
        if max_expansions is not None and expansions >= max_expansions:
            complete = False
            break
        heapq.heappop(heap)

        if not evaluated:
            set_loss = evaluate(mask)
            tolerance = VIOLATION_RELATIVE_TOLERANCE * max(1.0, abs(bound))
            if set_loss < bound - tolerance:
                violations += 1
            if heap and set_loss > heap[0][0]:
                heapq.heappush(heap, (set_loss, True, mask))
                continue
        else:
            set_loss = bound
        if set_loss >= best_loss - epsilon:
            continue

        feasibility_checks += 1
        if _is_feasible(mask, constraints):
            best_mask, best_loss = mask, set_loss
            evaluated_feasible.append(mask)
            continue

        expansions += 1
        for expert in mask_members(mask):
            child = mask & ~(1 << expert)
            if child == 0 or child in generated:
                continue
            generated.add(child)
            if any(child & ~feasible == 0 for feasible in evaluated_feasible):
                continue
            heapq.heappush(heap, (set_loss, False, child))

    lower_bound = heap[0][0] if heap else math.inf

    # Descent: under a monotone loss no subset of the incumbent is better, but a gate
    # that overrates an expert can make dropping it lower the loss. Move to the best
    # one-smaller subset while that lowers the loss, and count each move as a violation.
    while refine and best_mask is not None and complete:
        children = [best_mask & ~(1 << expert) for expert in mask_members(best_mask)]
        children = [child for child in children if child]
        if not children:
            break
        child_loss, child = min((evaluate(child), child) for child in children)
        if child_loss >= best_loss - VIOLATION_RELATIVE_TOLERANCE * max(1.0, abs(best_loss)):
            break
        violations += 1
        best_mask, best_loss = child, child_loss

    if best_mask is None:
        # Every set was searched (or the cap hit) without a feasible one. The
        # reduction above guarantees feasible singletons exist, so this happens only
        # when the cap stopped the search.
        return SearchResult(
            subset=None, loss=None, constraint_values={}, loss_evaluations=len(losses),
            feasibility_checks=feasibility_checks, vertices_expanded=expansions,
            monotonicity_violations=violations, complete=complete, lower_bound=lower_bound,
            excluded_experts=tuple(excluded),
        )
    return SearchResult(
        subset=best_mask,
        loss=best_loss,
        constraint_values=_constraint_values(best_mask, constraints),
        loss_evaluations=len(losses),
        feasibility_checks=feasibility_checks,
        vertices_expanded=expansions,
        monotonicity_violations=violations,
        complete=complete,
        lower_bound=lower_bound,
        excluded_experts=tuple(excluded),
    )


def all_masks(n_experts: int) -> np.ndarray:
    """Return every non-empty subset of n_experts as a uint64 array, ascending."""
    _check_size(n_experts)
    if n_experts > 30:
        raise ValueError(f"exhaustive search over {n_experts} experts needs 2^{n_experts} sets; use at most 30")
    return np.arange(1, 1 << n_experts, dtype=np.uint64)


def exhaustive(
    n_experts: int,
    loss: LossFunction,
    constraints: Sequence[Constraint],
    batch_loss: BatchLossFunction | None = None,
    chunk_size: int = 1 << 16,
) -> SearchResult:
    """Find the true optimum by checking all 2^N - 1 subsets.

    The loss is evaluated only on feasible sets. `batch_loss` (a uint64 array of masks
    to an array of losses) and each constraint's `values` are used when given. Ties in
    loss go to the smaller mask value.
    """
    _check_size(n_experts)
    vectorized = batch_loss is not None and all(c.values is not None for c in constraints)
    best_mask: int | None = None
    best_loss = math.inf
    loss_evaluations = 0
    feasibility_checks = 0

    if vectorized:
        masks = all_masks(n_experts)
        for start in range(0, len(masks), chunk_size):
            chunk = masks[start:start + chunk_size]
            feasible = np.ones(len(chunk), dtype=bool)
            for c in constraints:
                feasible &= np.asarray(c.values(chunk)) <= c.budget
            feasibility_checks += len(chunk)
            candidates = chunk[feasible]
            if len(candidates) == 0:
                continue
            chunk_losses = np.asarray(batch_loss(candidates), dtype=np.float64)
            loss_evaluations += len(candidates)
            index = int(np.argmin(chunk_losses))
            if chunk_losses[index] < best_loss:
                best_loss = float(chunk_losses[index])
                best_mask = int(candidates[index])
    else:
        for mask in range(1, 1 << n_experts):
            feasibility_checks += 1
            if not _is_feasible(mask, constraints):
                continue
            set_loss = float(loss(mask))
            loss_evaluations += 1
            if set_loss < best_loss:
                best_mask, best_loss = mask, set_loss

    if best_mask is None:
        return SearchResult(
            subset=None, loss=None, constraint_values={}, loss_evaluations=loss_evaluations,
            feasibility_checks=feasibility_checks,
            infeasibility=find_infeasibility(n_experts, constraints),
        )
    return SearchResult(
        subset=best_mask, loss=best_loss,
        constraint_values=_constraint_values(best_mask, constraints),
        loss_evaluations=loss_evaluations, feasibility_checks=feasibility_checks,
    )


def count_violations(n_experts: int, loss: LossFunction) -> int:
    """Count (set, one-smaller subset) pairs where the subset has the lower loss.

    This visits all 2^N sets and N children each, so it is meant for small N (tests
    and diagnostics).
    """
    violations = 0
    for mask in range(1, 1 << n_experts):
        set_loss = loss(mask)
        for expert in mask_members(mask):
            child = mask & ~(1 << expert)
            if child and loss(child) < set_loss - VIOLATION_RELATIVE_TOLERANCE * max(1.0, abs(set_loss)):
                violations += 1
    return violations

