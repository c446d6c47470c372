"""The ensemble loss L(S) of any expert subset, from a cached score table and gate values.

For example i with gate values g_i (softmax output over all N experts) and subset S,
the weights are w_n = g_in / sum_{m in S} g_im, optionally restricted to the k experts
of S with the largest g_in (ties broken by expert order), as at inference. The loss is

    loss_i(S) = - sum_t log sum_{n in S} w_n exp(logprobs[t, n])

over the example's target tokens t, and L(S) is the mean of loss_i over examples, in
nats per example. Subsets are int bitmasks over the score table's expert columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The score table's reader lives with its writer; it is re-exported for `moe2 select`.
from coordinator.scoretable import ScoreTable, ScoreTableError, load_score_table

__all__ = ["LossTable", "ScoreTable", "ScoreTableError", "load_gates", "load_score_table", "validate_gates"]

# Rows x experts x subsets handled at once by the batched evaluation (float64 elements).
_BATCH_ELEMENTS = 1 << 22


def load_gates(path: str | Path, n_examples: int, n_experts: int) -> np.ndarray:
    """Read gate values, an NPY array [n_examples, N] of positive softmax outputs."""
    path = Path(path)
    try:
        gates = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"gate values not found: {path}") from None
    return validate_gates(gates, n_examples, n_experts, str(path))


def validate_gates(gates: np.ndarray, n_examples: int, n_experts: int, source: str = "gate values") -> np.ndarray:
    gates = np.asarray(gates, dtype=np.float64)
    if gates.shape != (n_examples, n_experts):
        raise ValueError(f"{source}: shape {gates.shape} does not match the score table "
                         f"({n_examples} examples, {n_experts} experts)")
    if not np.all(np.isfinite(gates)) or np.any(gates <= 0):
        raise ValueError(f"{source}: gate values must be finite and > 0 (softmax outputs)")
    return gates


class LossTable:
    """L(S) for bitmask subsets, memoized; `evaluations` counts subsets actually computed."""

    def __init__(self, table: ScoreTable, gates: np.ndarray | None = None, top_k: int | None = None):
        table.validate()
        n_experts = table.n_experts
        if top_k is not None and not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be between 1 and the number of experts ({n_experts}), got {top_k}")
        self.table = table
        self.top_k = top_k
        self.n_experts = n_experts
        self.evaluations = 0
        self._memo: dict[int, float] = {}

        if gates is None:
            gates = np.full((table.n_examples, n_experts), 1.0 / n_experts)
        self.gates = validate_gates(gates, table.n_examples, n_experts)

        self._logprobs = np.asarray(table.logprobs, dtype=np.float64)
        lengths = np.diff(table.offsets).astype(np.int64)
        self._example_of_row = np.repeat(np.arange(table.n_examples), lengths)
        self._log_gates = np.log(self.gates)
        # Experts of each example from the largest gate value down; the stable sort
        # keeps expert order among equal gate values.
        self._gate_order = np.argsort(-self.gates, axis=1, kind="stable")

        # Exp-space form for the batched path: probabilities scaled by each row's max.
        self._row_max = self._logprobs.max(axis=1)
        self._scaled_probs = np.exp(self._logprobs - self._row_max[:, None])
        self._row_gates = self.gates[self._example_of_row]                  # [T, N]
        self._gated_probs = self._row_gates * self._scaled_probs

    def loss(self, mask: int) -> float:
        """Return L(S) for the subset `mask` (nats per example)."""
        mask = int(mask)
        cached = self._memo.get(mask)
        if cached is not None:
            return cached
        if mask <= 0 or mask >> self.n_experts:
            raise ValueError(f"subset mask {mask:#x} is empty or names experts beyond {self.n_experts}")
        value = self._compute(mask)
        self._memo[mask] = value
        self.evaluations += 1
        return value

    __call__ = loss

    def losses(self, masks: np.ndarray) -> np.ndarray:
        """Return L(S) for every mask of a uint64 array; computed values are memoized."""
        masks = np.asarray(masks, dtype=np.uint64)
        if len(masks) and (masks.min() == 0 or int(masks.max()) >> self.n_experts):
            raise ValueError(f"subset masks must be non-zero and name only the {self.n_experts} experts")
        pending = np.array([mask for mask in np.unique(masks).tolist() if mask not in self._memo], dtype=np.uint64)
        if len(pending):
            membership = self._membership(pending)
            n_rows = self._logprobs.shape[0]
            row_elements = n_rows * (self.n_experts if self.top_k is not None else 1)
            per_chunk = max(1, _BATCH_ELEMENTS // max(1, row_elements))
            for start in range(0, len(pending), per_chunk):
                values = self._compute_batch(membership[start:start + per_chunk])
                for mask, value in zip(pending[start:start + per_chunk].tolist(), values.tolist()):
                    self._memo[mask] = value
            self.evaluations += len(pending)
        return np.array([self._memo[mask] for mask in masks.tolist()], dtype=np.float64)

    def _membership(self, masks: np.ndarray) -> np.ndarray:
        bits = np.arange(self.n_experts, dtype=np.uint64)
        return ((masks[:, None] >> bits[None, :]) & np.uint64(1)).astype(bool)

    def _selected(self, in_subset: np.ndarray) -> np.ndarray:
        """Return the experts each example uses [b, n_examples, N]: S, or its top k by gate."""
        n_examples = self.gates.shape[0]
        if self.top_k is None:
            return np.broadcast_to(in_subset[:, None, :], (len(in_subset), n_examples, self.n_experts))
        # Walk each example's experts in gate order and keep the first k that are in S.
        in_order = in_subset[:, self._gate_order]                # [b, E, N] in gate order
        rank = np.cumsum(in_order, axis=2)
        keep_in_order = in_order & (rank <= self.top_k)
        selected = np.zeros_like(keep_in_order)
        rows = np.arange(n_examples)[:, None]
        selected[:, rows, self._gate_order] = keep_in_order
        return selected

    def _weights(self, in_subset: np.ndarray) -> np.ndarray:
        selected = self._selected(in_subset)
        weights = np.where(selected, self.gates[None, :, :], 0.0)
        return weights / weights.sum(axis=2, keepdims=True)

    def _compute(self, mask: int) -> float:
        in_subset = self._membership(np.array([mask], dtype=np.uint64))[0]
        return self._mean_example_loss(self._log_mixture_exact(in_subset))

    def _log_mixture_exact(self, in_subset: np.ndarray) -> np.ndarray:
        """Return log sum_n w_n p_n for every target row [T], in log space."""
        weights = self._weights(in_subset[None, :])[0]             # [E, N]
        with np.errstate(divide="ignore"):
            log_weights = np.log(weights)[self._example_of_row]    # [T, N], -inf outside S
        return _row_logsumexp(self._logprobs + log_weights)

    def _compute_batch(self, in_subset: np.ndarray) -> np.ndarray:
        """Losses of a batch of subsets [b, N], in exp space with an exact fallback."""
        if self.top_k is None:
            # Without top-k every example uses all of S, so the mixture is a ratio of
            # two matrix products: sum_{n in S} g_n p_n / sum_{n in S} g_n.
            membership = in_subset.astype(np.float64)
            mixture = (membership @ self._gated_probs.T) / (membership @ self._row_gates.T)
        else:
            weights = self._weights(in_subset)                     # [b, E, N]
            mixture = np.einsum("btn,tn->bt", weights[:, self._example_of_row, :], self._scaled_probs)
        with np.errstate(divide="ignore"):
            log_mixture = np.log(mixture) + self._row_max[None, :]
        # Where every selected probability underflowed after scaling by the row max,
        # recompute that subset in log space.
        for subset_index in np.unique(np.nonzero(~np.isfinite(log_mixture))[0]).tolist():
            log_mixture[subset_index] = self._log_mixture_exact(in_subset[subset_index])
        return self._mean_example_losses(log_mixture)

    def _mean_example_loss(self, log_mixture: np.ndarray) -> float:
        return float(self._mean_example_losses(log_mixture[None, :])[0])

    def _mean_example_losses(self, log_mixture: np.ndarray) -> np.ndarray:
        """Mean over examples of the summed target losses, for each row of [b, T]."""
        cumulative = np.zeros((log_mixture.shape[0], log_mixture.shape[1] + 1))
        np.cumsum(-log_mixture, axis=1, out=cumulative[:, 1:])
        offsets = self.table.offsets
        per_example = cumulative[:, offsets[1:]] - cumulative[:, offsets[:-1]]
        return per_example.mean(axis=1)


def _row_logsumexp(values: np.ndarray) -> np.ndarray:
    row_max = values.max(axis=1)
    safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(values - safe_max[:, None]).sum(axis=1)) + safe_max
