"""Hypothesis strategies and tolerances shared by the fusion tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

# The C kernel agrees with the float64 reference within RTOL * reference + ATOL per
# element. Its float32 exp approximation has relative error below 1.5e-7, and the
# float32 rounding of (x - max) / temperature adds up to |x - max| / temperature
# * 2^-24, at most about 5e-6 for any probability above 1e-38; RTOL leaves a
# margin over that. Values below exp(-87) are flushed to 0, hence ATOL.
RTOL = 1e-5
ATOL = 1e-30

# Small vocabularies for edge cases, mid-size ones, and the three real ones
# (Llama 2, Qwen2.5 with padding, Gemma 3).
VOCAB_SIZES = st.one_of(st.integers(2, 64), st.integers(65, 4096),
                        st.sampled_from([32_000, 151_936, 262_144]))
EXPERT_COUNTS = st.sampled_from([1, 2, 3, 8, 16])
ROW_KINDS = ("normal", "extreme", "one_hot", "uniform", "mixed")


@dataclass
class DenseCase:
    rows: np.ndarray  # float32 [k, n]
    weights: np.ndarray  # float64 [k]
    kind: str


def make_logits(rng: np.random.Generator, k: int, n: int, kind: str) -> np.ndarray:
    """Return k rows of n float32 logits of the given kind."""
    if kind == "normal":
        rows = rng.normal(0.0, 3.0, (k, n))
    elif kind == "extreme":
        rows = rng.uniform(-1e4, 1e4, (k, n))
    elif kind == "one_hot":
        rows = np.full((k, n), -1e4)
        rows[np.arange(k), rng.integers(0, n, k)] = 0.0
    elif kind == "uniform":
        rows = np.full((k, n), rng.normal())
    else:
        rows = rng.normal(0.0, 3.0, (k, n))
        spikes = rng.random((k, n)) < 0.01
        rows[spikes] = rng.choice([-1e4, 1e4], size=int(spikes.sum()))
    return rows.astype(np.float32)


def normalize_logprobs(logits: np.ndarray) -> np.ndarray:
    """Return float32 log-softmax of each row, computed in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)


@st.composite
def weight_vectors(draw, k: int) -> np.ndarray:
    """Non-negative finite weights with at least one positive, including extremes."""
    values = draw(st.lists(
        st.one_of(st.floats(0.0, 10.0), st.sampled_from([0.0, 1e-300, 1e300, 1.0])),
        min_size=k, max_size=k))
    weights = np.array(values, dtype=np.float64)
    if not (weights > 0).any():
        weights[draw(st.integers(0, k - 1))] = 1.0
    return weights


@st.composite
def dense_cases(draw) -> DenseCase:
    k = draw(EXPERT_COUNTS)
    n = draw(VOCAB_SIZES)
    kind = draw(st.sampled_from(ROW_KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return DenseCase(make_logits(rng, k, n, kind), draw(weight_vectors(k)), kind)


def assert_close_to_reference(actual: np.ndarray, reference: np.ndarray) -> None:
    """Assert |actual - reference| <= RTOL * reference + ATOL everywhere, naming the worst."""
    actual64 = actual.astype(np.float64)
    reference64 = reference.astype(np.float64)
    excess = np.abs(actual64 - reference64) - (RTOL * np.abs(reference64) + ATOL)
    worst = int(np.argmax(excess))
    assert excess[worst] <= 0, (
        f"element {worst}: kernel {actual64[worst]!r}, reference {reference64[worst]!r}")
