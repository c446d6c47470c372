"""Dense and sparse fusion: the C kernel against the float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator import fusion
from fusion_cases import (EXPERT_COUNTS, ROW_KINDS, RTOL, VOCAB_SIZES, assert_close_to_reference,
                          dense_cases, make_logits, normalize_logprobs, weight_vectors)

# The fused tail is a sum of per-expert tails, each computed from the same float32
# exponentials as the listed probabilities.
RTOL_TAIL = 1e-5

PROPERTY_SETTINGS = settings(max_examples=80, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


def exact_softmax(row: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = row.astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


# --- dense --------------------------------------------------------------------------

@PROPERTY_SETTINGS
@given(case=dense_cases(), temperature=st.sampled_from([1.0, 0.3, 2.0, 7.5]))
def test_fuse_dense_matches_reference(case, temperature):
    kernel = fusion.fuse_dense(case.rows, case.weights, temperature=temperature, backend="c")
    reference = fusion.fuse_dense(case.rows, case.weights, temperature=temperature,
                                  backend="reference")

    assert kernel.dtype == np.float32
    assert kernel.shape == (case.rows.shape[1],)
    assert_close_to_reference(kernel, reference)
    assert abs(float(kernel.astype(np.float64).sum()) - 1.0) < 1e-5


@PROPERTY_SETTINGS
@given(n=VOCAB_SIZES, kind=st.sampled_from(ROW_KINDS), seed=st.integers(0, 2**32 - 1),
       weight=st.floats(1e-3, 1e3))
def test_fuse_dense_single_expert_unchanged(n, kind, seed, weight):
    row = make_logits(np.random.default_rng(seed), 1, n, kind)[0]

    fused = fusion.fuse_dense([row], [weight])

    assert_close_to_reference(fused, exact_softmax(row))


@PROPERTY_SETTINGS
@given(n=VOCAB_SIZES, k=EXPERT_COUNTS, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_fuse_dense_equal_experts_unchanged(n, k, seed, data):
    row = make_logits(np.random.default_rng(seed), 1, n, "normal")[0]
    weights = data.draw(weight_vectors(k))

    fused = fusion.fuse_dense([row] * k, weights)

    assert_close_to_reference(fused, exact_softmax(row))


def test_fuse_dense_zero_weight_ignored():
    rng = np.random.default_rng(3)
    rows = make_logits(rng, 3, 1000, "normal")

    with_zero = fusion.fuse_dense(rows, [2.0, 0.0, 1.0])
    without = fusion.fuse_dense(rows[[0, 2]], [2.0, 1.0])

    assert_close_to_reference(with_zero, without)


@pytest.mark.parametrize("backend", ["c", "reference"])
@pytest.mark.parametrize("temperature", [1e-10, 1e-40, 1e-300])
def test_fuse_dense_tiny_temperature_one_hot(backend, temperature):
    rows = make_logits(np.random.default_rng(6), 2, 1000, "normal")
    expected = np.zeros((2, 1000))
    expected[0, np.argmax(rows[0])] = 0.25
    expected[1, np.argmax(rows[1])] = 0.75

    fused = fusion.fuse_dense(rows, [1.0, 3.0], temperature=temperature, backend=backend)

    assert np.isfinite(fused).all()
    np.testing.assert_allclose(fused, expected.sum(axis=0), rtol=1e-6, atol=0)


def test_fuse_dense_list_input_and_out():
    rows = make_logits(np.random.default_rng(4), 2, 500, "normal")
    out = np.empty(500, dtype=np.float32)

    result = fusion.fuse_dense([rows[0], rows[1].astype(np.float64)], [1.0, 3.0], out=out)

    assert result is out
    assert_close_to_reference(out, 0.25 * exact_softmax(rows[0]) + 0.75 * exact_softmax(rows[1]))


@PROPERTY_SETTINGS
@given(case=dense_cases())
def test_fuse_dense_probs_matches_reference(case):
    probs = np.exp(normalize_logprobs(case.rows).astype(np.float64)).astype(np.float32)

    kernel = fusion.fuse_dense_probs(probs, case.weights, backend="c")
    reference = fusion.fuse_dense_probs(probs, case.weights, backend="reference")

    assert_close_to_reference(kernel, reference)


@PROPERTY_SETTINGS
@given(case=dense_cases())
def test_fuse_dense_probs_agrees_with_logprobs(case):
    logprobs = normalize_logprobs(case.rows)
    probs = np.exp(logprobs.astype(np.float64)).astype(np.float32)

    from_probs = fusion.fuse_dense_probs(probs, case.weights)
    from_logprobs = fusion.fuse_dense(logprobs, case.weights)

    # exp() of the float32 log-probabilities is rounded to float32 again on one side
    # only, so allow one more float32 rounding on top of the kernel tolerance.
    assert np.allclose(from_probs, from_logprobs, rtol=2e-5, atol=1e-30)


# --- sparse -------------------------------------------------------------------------

def top_m_lists(logprobs: np.ndarray, m: int, rng: np.random.Generator):
    """Return each row's top-m ids (shuffled), their log-probabilities and exact tails."""
    ids, values, tails = [], [], []
    for row in logprobs:
        order = np.argsort(-row, kind="stable")[:m]
        order = rng.permutation(order).astype(np.int32)
        probs = np.exp(row.astype(np.float64))
        listed = np.zeros(row.size, dtype=bool)
        listed[order] = True
        ids.append(order)
        values.append(row[order])
        tails.append(min(1.0, float(probs[~listed].sum() / probs.sum())))
    return ids, values, np.array(tails)


@PROPERTY_SETTINGS
@given(case=dense_cases(), m_fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
def test_fuse_sparse_matches_reference(case, m_fraction, seed):
    logprobs = normalize_logprobs(case.rows)
    n = logprobs.shape[1]
    m = max(1, min(n, int(round(m_fraction * min(n, 2048)))))
    ids, values, tails = top_m_lists(logprobs, m, np.random.default_rng(seed))

    kernel = fusion.fuse_sparse(ids, values, tails, case.weights, n, backend="c")
    reference = fusion.fuse_sparse(ids, values, tails, case.weights, n, backend="reference")

    assert np.array_equal(kernel.ids, reference.ids)
    assert np.all(np.diff(kernel.ids) > 0)
    assert_close_to_reference(kernel.probs, reference.probs)
    assert kernel.tail == pytest.approx(reference.tail, rel=RTOL_TAIL, abs=1e-12)


@PROPERTY_SETTINGS
@given(case=dense_cases(), seed=st.integers(0, 2**32 - 1))
def test_fuse_sparse_full_lists_equal_dense(case, seed):
    if case.rows.shape[1] > 65_536:
        case.rows = case.rows[:, :65_536]
    logprobs = normalize_logprobs(case.rows)
    n = logprobs.shape[1]
    ids, values, _ = top_m_lists(logprobs, n, np.random.default_rng(seed))
    # The tail is ignored when a list covers the vocabulary, whatever its value.
    tails = np.random.default_rng(seed).random(len(ids))

    sparse = fusion.fuse_sparse(ids, values, tails, case.weights, n)
    dense = fusion.fuse_dense(logprobs, case.weights)

    assert np.array_equal(sparse.ids, np.arange(n))
    assert sparse.tail == 0.0
    assert_close_to_reference(sparse.to_dense(), dense)


@PROPERTY_SETTINGS
@given(case=dense_cases(), m=st.integers(1, 512), seed=st.integers(0, 2**32 - 1))
def test_fuse_sparse_error_within_tail_bound(case, m, seed):
    """Against the dense fusion of the full distributions, the sparse result errs by at
    most sum_n w_n tail_n per token and 2 sum_n w_n tail_n in total (L1)."""
    logprobs = normalize_logprobs(case.rows)
    n = logprobs.shape[1]
    ids, values, tails = top_m_lists(logprobs, min(m, n), np.random.default_rng(seed))
    weights = case.weights / case.weights.max()
    weights = weights / weights.sum()

    sparse = fusion.fuse_sparse(ids, values, tails, weights, n).to_dense().astype(np.float64)
    dense = fusion.fuse_dense(logprobs, weights, backend="reference").astype(np.float64)

    bound = float(np.dot(weights, tails))
    error = np.abs(sparse - dense)
    assert error.max() <= bound + 1e-6
    assert error.sum() <= 2 * bound + 1e-5


def test_fuse_sparse_spreads_tail_over_unlisted_tokens():
    # Expert 0 lists tokens 0 and 1 with mass 0.6 and 0.2 and has tail 0.2 over the
    # other 3 tokens; expert 1 lists token 4 with mass 1.
    ids = [np.array([0, 1]), np.array([4])]
    logprobs = [np.log([0.6, 0.2]), np.log([1.0])]

    fused = fusion.fuse_sparse(ids, logprobs, [0.2, 0.0], [1.0, 1.0], 5)

    per_token_tail = 0.2 / 3
    expected = 0.5 * np.array([0.6, 0.2, per_token_tail, per_token_tail, per_token_tail])
    expected[4] += 0.5
    assert fused.ids.tolist() == [0, 1, 4]
    assert np.allclose(fused.probs, expected[[0, 1, 4]], rtol=1e-6)
    assert fused.tail == pytest.approx(2 * 0.5 * per_token_tail, rel=1e-6)
    assert np.allclose(fused.to_dense(), expected, rtol=1e-6)


def test_fuse_sparse_renormalizes_each_expert():
    # Listed mass 0.5 and tail 0.25 sum to 0.75, so each is divided by 0.75.
    fused = fusion.fuse_sparse([np.array([2])], [np.log([0.5])], [0.25], [1.0], 4)

    assert fused.probs[0] == pytest.approx(0.5 / 0.75, rel=1e-6)
    assert fused.tail == pytest.approx(0.25 / 0.75, rel=1e-6)
