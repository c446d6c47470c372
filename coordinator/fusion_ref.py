"""Numpy reference implementation of the fusion kernel (csrc/fusion.c).

Every function mirrors one kernel function: it validates in the same order, raises
the same exceptions and computes the same result, in float64 with numpy's exp and
log instead of the kernel's float32 approximations. The tests compare the kernel
against it; `coordinator.fusion` runs it only when asked to (backend="reference"
or MOE2_FUSION=reference).

Inputs arrive already shaped by `coordinator.fusion` (1-D float32 rows of equal
length, int32 ids, float64 weights and tails); these functions check values only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator import fusion_errors as errors


def _check_weights(weights: np.ndarray) -> np.ndarray:
    """Validate weights and return them renormalized to sum 1, as the kernel does."""
    for n, w in enumerate(weights):
        if not np.isfinite(w) or w < 0:
            errors.raise_status(errors.ERR_WEIGHT, "weights", expert=n, index=n, value=float(w))
    largest = float(weights.max())
    if largest == 0.0:
        errors.raise_status(errors.ERR_ZERO_WEIGHTS, "weights")
    scaled = weights.astype(np.float64) / largest
    return scaled / scaled.sum()


def _first_nonfinite(values: np.ndarray) -> int:
    bad = np.flatnonzero(~np.isfinite(values))
    return int(bad[0]) if bad.size else -1


def _check_temperature(temperature: float, allow_zero: bool) -> None:
    """Sampling allows temperature 0 (greedy); fusion divides by it, so it does not."""
    valid = np.isfinite(temperature) and (temperature >= 0 if allow_zero else temperature > 0)
    if not valid:
        errors.raise_status(errors.ERR_PARAMETER, "probs" if allow_zero else "logprobs",
                            value=float(temperature), parameter="temperature")


def fuse_logprobs(rows: Sequence[np.ndarray], weights: np.ndarray, temperature: float) -> np.ndarray:
    """Return sum_n w_n softmax(rows[n] / temperature) as float32, with w renormalized."""
    _check_temperature(temperature, allow_zero=False)
    w = _check_weights(weights)
    for n, row in enumerate(rows):
        bad = _first_nonfinite(row)
        if bad >= 0:
            errors.raise_status(errors.ERR_NOT_FINITE, "logprobs", expert=n, index=bad,
                                value=float(row[bad]))

    fused = np.zeros(rows[0].shape[0], dtype=np.float64)
    for n, row in enumerate(rows):
        if w[n] == 0.0:
            continue
        z = row.astype(np.float64)
        e = np.exp((z - z.max()) / temperature)
        fused += w[n] * e / e.sum()
    return fused.astype(np.float32)


def fuse_probs(rows: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Return sum_n w_n rows[n] / sum(rows[n]) as float32, with w renormalized."""
    w = _check_weights(weights)
    sums = []
    for n, row in enumerate(rows):
        bad = np.flatnonzero(~np.isfinite(row) | (row < 0))
        if bad.size:
            i = int(bad[0])
            code = errors.ERR_NOT_FINITE if not np.isfinite(row[i]) else errors.ERR_NEGATIVE
            errors.raise_status(code, "probs", expert=n, index=i, value=float(row[i]))
        total = float(row.astype(np.float64).sum())
        if total == 0.0:
            errors.raise_status(errors.ERR_ZERO_MASS, "probs", expert=n)
        sums.append(total)

    fused = np.zeros(rows[0].shape[0], dtype=np.float64)
    for n, row in enumerate(rows):
        if w[n] != 0.0:
            fused += w[n] * row.astype(np.float64) / sums[n]
    return fused.astype(np.float32)


def fuse_lists(ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray], tails: np.ndarray,
               weights: np.ndarray, n_vocab: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Fuse top-m lists; return (union ids ascending, fused probabilities, fused tail mass).

    Expert n's tail is spread evenly over the n_vocab - m_n tokens it did not list,
    and ignored when it lists every token. Each expert is renormalized so that its
    listed probabilities plus its tail sum to 1.
    """
    if n_vocab < 1:
        errors.raise_status(errors.ERR_LENGTH, "n_vocab", value=n_vocab, limit=1)
    for n, listed in enumerate(ids):
        if listed.size > n_vocab:
            errors.raise_status(errors.ERR_LENGTH, "ids", expert=n, value=listed.size, limit=n_vocab)
    w = _check_weights(weights)
    for n, tail in enumerate(tails):
        if not np.isfinite(tail) or tail < 0 or tail > 1:
            errors.raise_status(errors.ERR_TAIL, "tails", expert=n, index=n, value=float(tail))
    for n, (listed, lp) in enumerate(zip(ids, logprobs)):
        bad = _first_nonfinite(lp)
        if bad >= 0:
            errors.raise_status(errors.ERR_NOT_FINITE, "logprobs", expert=n, index=bad,
                                value=float(lp[bad]))
        out_of_range = np.flatnonzero((listed < 0) | (listed >= n_vocab))
        if out_of_range.size:
            i = int(out_of_range[0])
            errors.raise_status(errors.ERR_ID_RANGE, "ids", expert=n, index=i, value=int(listed[i]))

    union_ids = np.unique(np.concatenate([np.asarray(listed, dtype=np.int64) for listed in ids]))
    per_expert = []
    tail_per_token = 0.0
    for n, (listed, lp) in enumerate(zip(ids, logprobs)):
        count = listed.size
        has_tail = tails[n] > 0 and count < n_vocab
        if count == 0 and not has_tail:
            errors.raise_status(errors.ERR_ZERO_MASS, "ids", expert=n)
        _, first = np.unique(listed, return_index=True)
        if first.size < count:
            # The kernel reports the first element whose id appeared earlier in the list.
            seen = np.zeros(count, dtype=bool)
            seen[first] = True
            i = int(np.flatnonzero(~seen)[0])
            errors.raise_status(errors.ERR_ID_DUPLICATE, "ids", expert=n, index=i, value=int(listed[i]))

        log_tail = np.log(tails[n]) if has_tail else -np.inf
        reference = max(float(lp.max()) if count else -np.inf, log_tail)
        listed_exp = np.exp(lp.astype(np.float64) - reference)
        tail_term = np.exp(log_tail - reference) if has_tail else 0.0
        scale = w[n] / (listed_exp.sum() + tail_term)
        expert_tail = scale * tail_term / (n_vocab - count) if has_tail else 0.0
        tail_per_token += expert_tail
        per_expert.append((listed, scale * listed_exp, expert_tail))

    fused = np.zeros(union_ids.size, dtype=np.float64)
    for listed, probs, expert_tail in per_expert:
        fused[np.searchsorted(union_ids, listed)] += probs - expert_tail
    fused = np.maximum(fused + tail_per_token, 0.0)
    tail = tail_per_token * (n_vocab - union_ids.size)
    return union_ids.astype(np.int32), fused.astype(np.float32), float(tail)


def _check_sample_parameters(temperature: float, top_k: int, top_p: float, min_p: float,
                             u: float) -> None:
    _check_temperature(temperature, allow_zero=True)
    checks = (("top_k", top_k, top_k >= 0), ("top_p", top_p, 0 < top_p <= 1),
              ("min_p", min_p, 0 <= min_p <= 1), ("u", u, 0 <= u < 1))
    for name, value, valid in checks:
        if not valid:
            errors.raise_status(errors.ERR_PARAMETER, "probs", value=value, parameter=name)


def _check_sample_ids(ids: np.ndarray, n_vocab: int) -> None:
    if ids.size > n_vocab:
        errors.raise_status(errors.ERR_LENGTH, "ids", value=ids.size, limit=n_vocab)
    for i, token in enumerate(ids):
        if token < 0 or token >= n_vocab:
            errors.raise_status(errors.ERR_ID_RANGE, "ids", index=i, value=int(token))
        if i > 0 and token <= ids[i - 1]:
            errors.raise_status(errors.ERR_ID_DUPLICATE, "ids", index=i, value=int(token))


def count_kept(probs: np.ndarray, order: np.ndarray, top_k: int, top_p: float,
               min_p: float) -> int:
    """Return how many tokens of `order` (the ranking) the top-k, top-p and min-p
    filters keep, applied in that order."""
    p = probs.astype(np.float64)
    ranked = p[order]
    count = int(np.count_nonzero(ranked > 0))
    if top_k > 0:
        count = min(count, top_k)
    if top_p < 1:
        cumulative = np.cumsum(ranked[:count])
        target = top_p * cumulative[-1]
        count = min(count, int(np.searchsorted(cumulative, target, side="left")) + 1)
    if min_p > 0:
        bound = min_p * float(p.max())
        count = min(count, int(np.count_nonzero(ranked[:count] >= bound)))
    return count


def rank_positions(probs: np.ndarray) -> np.ndarray:
    """Return positions ordered by probability, descending, ties by ascending position."""
    positions = np.arange(probs.size)
    return np.lexsort((positions, -probs.astype(np.float64)))


def kept_weights(probs: np.ndarray, temperature: float, top_k: int, top_p: float,
                 min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (kept positions ascending, their sampling weights (p / p_max)^(1/T))."""
    order = rank_positions(probs)
    kept = np.sort(order[:count_kept(probs, order, top_k, top_p, min_p)])
    p = probs[kept].astype(np.float64)
    if temperature == 1.0:
        return kept, p
    log_max = np.log(float(probs.max()))
    # A temperature near 0 overflows the division to -inf, whose exp() is the exact weight 0.
    with np.errstate(over="ignore"):
        return kept, np.exp((np.log(p) - log_max) / temperature)


def sample_token(probs: np.ndarray, ids: np.ndarray | None, n_vocab: int, temperature: float,
                 top_k: int, top_p: float, min_p: float, u: float) -> int:
    """Sample a token id as moe2_sample_token does; see csrc/fusion.h for the rules."""
    _check_sample_parameters(temperature, top_k, top_p, min_p, u)
    if ids is not None:
        _check_sample_ids(ids, n_vocab)
    bad = np.flatnonzero(~np.isfinite(probs) | (probs < 0))
    if bad.size:
        i = int(bad[0])
        code = errors.ERR_NOT_FINITE if not np.isfinite(probs[i]) else errors.ERR_NEGATIVE
        errors.raise_status(code, "probs", index=i, value=float(probs[i]))
    if float(probs.max()) == 0.0:
        errors.raise_status(errors.ERR_ZERO_MASS, "probs")

    if temperature == 0:
        position = int(np.argmax(probs))
    else:
        kept, weights = kept_weights(probs, temperature, top_k, top_p, min_p)
        cumulative = np.cumsum(weights)
        chosen = int(np.searchsorted(cumulative, u * cumulative[-1], side="right"))
        position = int(kept[min(chosen, kept.size - 1)])
    return int(ids[position]) if ids is not None else position
