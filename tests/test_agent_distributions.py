"""Log-softmax, softmax and top-m of agent.distributions against float64 numpy references.

Tolerance: outputs are float32, so they are compared with a float64 log-softmax of the
same float32 logits to 1e-5 absolute, about 5 float32 ulps of values near 30 in
magnitude (the range of real logits in these tests). Probabilities are compared with
the float64 softmax to a relative 1e-5: the error of a probability is about the
absolute error of its float32 shifted logit, which is below 1e-5 for logits less than
128 below the maximum. Values below 1e-37 (float32 subnormals) get an absolute 1e-37.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent import distributions, protocol
from agent.protocol import DistributionFormat

TOLERANCE = 1e-5
PROB_RTOL = 1e-5
PROB_ATOL = 1e-37


def reference_log_softmax(logits: np.ndarray) -> np.ndarray:
    values = logits.astype(np.float64)
    values -= values.max()
    return values - np.log(np.exp(values).sum())


def reference_softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(reference_log_softmax(logits))


def random_logits(rng: np.random.Generator, size: int, scale: float = 8.0) -> np.ndarray:
    return (rng.standard_normal(size) * scale).astype(np.float32)


@pytest.mark.parametrize("size", [1, 7, 1000, 262_144])
def test_log_softmax_matches_float64(size):
    rng = np.random.default_rng(size)
    logits = random_logits(rng, size)

    logprobs = distributions.log_softmax(logits)

    assert logprobs.dtype == np.float32
    assert np.abs(logprobs - reference_log_softmax(logits)).max() < TOLERANCE
    assert np.exp(logprobs.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-5)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 300),
                  elements=st.floats(-30, 30, width=32, allow_nan=False)))
def test_log_softmax_property(logits):
    logprobs = distributions.log_softmax(logits)

    assert np.abs(logprobs - reference_log_softmax(logits)).max() < TOLERANCE
    assert logprobs.max() <= 1e-6


def test_log_softmax_does_not_modify_input():
    logits = random_logits(np.random.default_rng(0), 100)
    original = logits.copy()

    distributions.log_softmax(logits)

    np.testing.assert_array_equal(logits, original)


def test_log_softmax_handles_negative_infinity():
    logits = np.array([0.0, -np.inf, 1.0], dtype=np.float32)

    logprobs = distributions.log_softmax(logits)

    assert logprobs[1] == -np.inf
    assert np.exp(logprobs[[0, 2]].astype(np.float64)).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logits_are_rejected(bad):
    logits = np.zeros(10, dtype=np.float32)
    logits[3] = bad

    with pytest.raises(distributions.NonFiniteLogits):
        distributions.log_softmax(logits)
    with pytest.raises(distributions.NonFiniteLogits):
        distributions.top_m(logits, 4)


def test_all_negative_infinity_is_rejected():
    with pytest.raises(distributions.NonFiniteLogits):
        distributions.log_softmax(np.full(5, -np.inf, dtype=np.float32))


@pytest.mark.parametrize("size", [1, 7, 1000, 262_144])
def test_softmax_matches_float64(size):
    rng = np.random.default_rng(size)
    logits = random_logits(rng, size)

    probs = distributions.softmax(logits)

    assert probs.dtype == np.float32
    assert probs.shape == logits.shape
    np.testing.assert_allclose(probs, reference_softmax(logits), rtol=PROB_RTOL, atol=PROB_ATOL)
    assert probs.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 300),
                  elements=st.floats(-30, 30, width=32, allow_nan=False)))
def test_softmax_property(logits):
    probs = distributions.softmax(logits)

    np.testing.assert_allclose(probs, reference_softmax(logits), rtol=PROB_RTOL, atol=PROB_ATOL)
    assert probs.min() >= 0.0
    assert probs.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)


def test_softmax_equals_exp_of_log_softmax():
    logits = random_logits(np.random.default_rng(5), 262_144, scale=20.0)

    probs = distributions.softmax(logits)
    from_logprobs = np.exp(distributions.log_softmax(logits).astype(np.float64))

    np.testing.assert_allclose(probs, from_logprobs, rtol=PROB_RTOL, atol=PROB_ATOL)


def test_softmax_does_not_modify_input():
    logits = random_logits(np.random.default_rng(0), 100)
    original = logits.copy()

    distributions.softmax(logits)

    np.testing.assert_array_equal(logits, original)


def test_softmax_handles_negative_infinity():
    logits = np.array([0.0, -np.inf, 1.0], dtype=np.float32)

    probs = distributions.softmax(logits)

    assert probs[1] == 0.0
    assert probs.sum(dtype=np.float64) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_softmax_non_finite_logits_rejected(bad):
    logits = np.zeros(10, dtype=np.float32)
    logits[3] = bad

    with pytest.raises(distributions.NonFiniteLogits):
        distributions.softmax(logits)


def test_softmax_all_negative_infinity_rejected():
    with pytest.raises(distributions.NonFiniteLogits):
        distributions.softmax(np.full(5, -np.inf, dtype=np.float32))


def test_encode_dense_prob_matches_softmax():
    logits = random_logits(np.random.default_rng(6), 300)

    dist = protocol.decode_distribution(distributions.encode(logits, protocol.DENSE_PROB))

    assert dist.kind == "dense_prob"
    np.testing.assert_array_equal(dist.probs, distributions.softmax(logits))


@pytest.mark.parametrize("m", [1, 16, 256])
def test_top_m_matches_full_sort(m):
    logits = random_logits(np.random.default_rng(m), 5000)
    full = reference_log_softmax(logits)
    expected_ids = np.argsort(full)[::-1][:m]

    ids, logprobs, tail = distributions.top_m(logits, m)

    assert ids.dtype == np.int32
    assert logprobs.dtype == np.float32
    np.testing.assert_array_equal(np.sort(ids), np.sort(expected_ids))
    assert np.all(np.diff(logprobs) <= 0), "ids are not sorted by decreasing probability"
    assert np.abs(logprobs - full[ids]).max() < TOLERANCE
    assert tail == pytest.approx(1.0 - np.exp(full[expected_ids]).sum(), abs=1e-6)


def test_top_m_larger_than_vocabulary_returns_all():
    logits = random_logits(np.random.default_rng(1), 50)

    ids, logprobs, tail = distributions.top_m(logits, 1000)

    assert sorted(ids.tolist()) == list(range(50))
    assert tail == pytest.approx(0.0, abs=1e-6)
    assert tail >= 0.0


def test_dense_and_sparse_agree_when_m_covers_vocabulary():
    logits = random_logits(np.random.default_rng(2), 300)

    dense = protocol.decode_distribution(distributions.encode(logits, protocol.DENSE))
    sparse = protocol.decode_distribution(distributions.encode(logits, DistributionFormat("sparse", 300)))

    assert dense.kind == "dense"
    assert sparse.kind == "sparse"
    np.testing.assert_allclose(dense.logprobs[sparse.ids], sparse.logprobs, atol=TOLERANCE)
    assert sparse.tail == pytest.approx(0.0, abs=1e-6)


def test_token_logprob_matches_log_softmax():
    logits = random_logits(np.random.default_rng(3), 1000)
    full = reference_log_softmax(logits)

    for token in (0, 17, 999):
        assert distributions.token_logprob(logits, token) == pytest.approx(full[token], abs=1e-6)


@pytest.mark.parametrize("pattern", ["normal", "sample_misses_top", "ties", "one_peak"])
def test_top_m_on_large_vocabulary(pattern):
    rng = np.random.default_rng(4)
    n, m = 262_144, 256
    if pattern == "normal":
        logits = random_logits(rng, n)
    elif pattern == "sample_misses_top":
        # Every SAMPLE_STRIDE-th logit is the highest, so the sampled threshold is too high.
        logits = random_logits(rng, n)
        logits[::distributions.SAMPLE_STRIDE] += 50.0
        logits[1::distributions.SAMPLE_STRIDE] += 100.0
    elif pattern == "ties":
        logits = np.zeros(n, dtype=np.float32)
    else:
        logits = np.full(n, -5.0, dtype=np.float32)
        logits[12345] = 20.0
    full = reference_log_softmax(logits)

    ids, logprobs, tail = distributions.top_m(logits, m)

    assert ids.shape == (m,)
    assert np.unique(ids).size == m
    # Any valid top-m: no logit left out is larger than the smallest one kept.
    left_out = np.setdiff1d(np.arange(n), ids)
    assert logits[left_out].max() <= logits[ids].min()
    assert np.abs(logprobs - full[ids]).max() < TOLERANCE
    assert tail == pytest.approx(max(0.0, 1.0 - np.exp(full[ids]).sum()), abs=1e-6)
