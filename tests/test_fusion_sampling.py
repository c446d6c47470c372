"""Sampling from fused distributions: rules, reproducibility and frequencies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from coordinator import fusion, fusion_ref
from fusion_cases import VOCAB_SIZES

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])

# Significance level of the chi-square tests. The draws come from a fixed seed, so
# each test is deterministic, and a correct sampler passes at this level for the seed.
ALPHA = 1e-3
DRAWS = 20_000
SEED = 20240611

# The kernel's cumulative sums and its float32 tempered weights differ from the
# reference's by rounding, with relative error estimated at up to 1e-5 for temperature 0.05.
# So the kernel may pick another token when u * total lies within this fraction of
# the total from the boundary between the two tokens.
BOUNDARY_RTOL = 1e-4


@st.composite
def distributions(draw) -> np.ndarray:
    """Probability vectors: peaked like an LLM's, flat, with ties, or with zeros."""
    n = draw(VOCAB_SIZES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["peaked", "flat", "ties", "zeros"]))
    if kind == "peaked":
        logits = rng.normal(0.0, 4.0, n)
    elif kind == "flat":
        logits = rng.normal(0.0, 0.1, n)
    elif kind == "ties":
        logits = rng.integers(0, 4, n).astype(np.float64)
    else:
        logits = np.where(rng.random(n) < 0.5, -np.inf, rng.normal(0.0, 2.0, n))
        logits[rng.integers(0, n)] = 0.0
    probs = np.exp(logits - logits.max())
    return (probs / probs.sum()).astype(np.float32)


SAMPLING_PARAMETERS = st.fixed_dictionaries({
    "temperature": st.sampled_from([1.0, 0.7, 1.5, 0.05, 4.0]),
    "top_k": st.sampled_from([0, 1, 2, 40, 300, 5000]),
    "top_p": st.sampled_from([1.0, 0.95, 0.5, 0.1, 1e-6]),
    "min_p": st.sampled_from([0.0, 0.05, 0.5, 1.0]),
})


def allowed_tokens(probs: np.ndarray, top_k: int, top_p: float, min_p: float) -> set[int]:
    order = fusion_ref.rank_positions(probs)
    return set(order[:fusion_ref.count_kept(probs, order, top_k, top_p, min_p)].tolist())


def consistent_with_reference(probs: np.ndarray, token: int, u: float, temperature: float,
                              top_k: int, top_p: float, min_p: float) -> bool:
    """Whether `token` is the reference's choice for some target within BOUNDARY_RTOL
    of u * total, or lies in a top-p cut that rounding makes ambiguous."""
    kept, weights = fusion_ref.kept_weights(probs, temperature, top_k, top_p, min_p)
    matches = np.flatnonzero(kept == token)
    if matches.size == 0:
        loose = allowed_tokens(probs, top_k, min(1.0, top_p * (1 + BOUNDARY_RTOL)), min_p)
        tight = allowed_tokens(probs, top_k, top_p * (1 - BOUNDARY_RTOL), min_p)
        return token in loose and loose != tight
    j = int(matches[0])
    cumulative = np.cumsum(weights)
    tolerance = BOUNDARY_RTOL * cumulative[-1]
    target = u * cumulative[-1]
    below = cumulative[j - 1] if j > 0 else 0.0
    return bool(weights[j] > 0 and below - tolerance <= target <= cumulative[j] + tolerance)


def draw_frequencies(distribution, draws: int, **parameters) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    size = distribution.n_vocab if isinstance(distribution, fusion.SparseFused) else distribution.size
    counts = np.zeros(size, dtype=np.int64)
    for u in rng.random(draws):
        counts[fusion.sample(distribution, u=float(u), **parameters)] += 1
    return counts


def assert_frequencies_match(counts: np.ndarray, expected_probs: np.ndarray) -> None:
    """Chi-square goodness of fit at level ALPHA over the tokens with expected mass."""
    support = expected_probs > 0
    assert counts[~support].sum() == 0, f"sampled outside the support: {np.flatnonzero(counts * ~support)}"
    expected = expected_probs[support] / expected_probs[support].sum() * counts.sum()
    result = stats.chisquare(counts[support], expected)
    assert result.pvalue > ALPHA, f"chi-square p = {result.pvalue:.2e}, counts {counts[support]}"


# --- agreement with the reference ---------------------------------------------------

@PROPERTY_SETTINGS
@given(probs=distributions(), parameters=SAMPLING_PARAMETERS,
       us=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8))
def test_sample_matches_reference(probs, parameters, us):
    for u in us:
        kernel = fusion.sample(probs, u=u, backend="c", **parameters)
        reference = fusion.sample(probs, u=u, backend="reference", **parameters)

        assert kernel == reference or consistent_with_reference(probs, kernel, u, **parameters), (
            f"u={u!r}: kernel {kernel}, reference {reference}")


@PROPERTY_SETTINGS
@given(probs=distributions(), parameters=SAMPLING_PARAMETERS,
       us=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8))
def test_sample_stays_in_allowed_set(probs, parameters, us):
    temperature = parameters.pop("temperature")
    allowed = allowed_tokens(probs, **parameters)
    for u in us:
        token = fusion.sample(probs, u=u, temperature=temperature, **parameters)

        assert token in allowed
        assert probs[token] > 0


@PROPERTY_SETTINGS
@given(probs=distributions(), parameters=SAMPLING_PARAMETERS, u=st.floats(0.0, 1.0, exclude_max=True))
def test_sample_is_reproducible(probs, parameters, u):
    first = fusion.sample(probs, u=u, **parameters)
    second = fusion.sample(probs.copy(), u=u, **parameters)

    assert first == second


# --- greedy and ties ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["c", "reference"])
def test_sample_greedy_tie_takes_lowest_id(backend):
    probs = np.array([0.1, 0.3, 0.05, 0.3, 0.25], dtype=np.float32)

    assert fusion.sample(probs, temperature=0.0, backend=backend) == 1


@pytest.mark.parametrize("backend", ["c", "reference"])
@pytest.mark.parametrize("temperature", [1e-8, 1e-12, 1e-30, 1e-45, 1e-300, 5e-324])
@pytest.mark.parametrize("filters", [{}, {"top_k": 2}, {"top_p": 0.9}, {"min_p": 0.05}])
@pytest.mark.parametrize("n", [3, 300, 5000])
def test_sample_tiny_temperature_takes_max(backend, temperature, filters, n):
    probs = (np.random.default_rng(n).random(n) * 0.3).astype(np.float32)
    # For this p_max the kernel's log approximation differs from log() by about 1e-7.
    best = n // 2
    probs[best] = 0.3592432737350464

    for u in (0.0, 0.5, np.nextafter(1.0, 0.0)):
        assert fusion.sample(probs, temperature=temperature, u=u, backend=backend, **filters) == best


@pytest.mark.parametrize("backend", ["c", "reference"])
def test_sample_top_k_tie_keeps_lowest_ids(backend):
    probs = np.array([0.1, 0.2, 0.2, 0.2, 0.3], dtype=np.float32)
    # top_k = 2 keeps token 4 and, of the three tied tokens, the lowest id 1.
    tokens = {fusion.sample(probs, top_k=2, u=u, backend=backend) for u in np.linspace(0, 0.999, 50)}

    assert tokens == {1, 4}


@pytest.mark.parametrize("backend", ["c", "reference"])
def test_sample_u_extremes_pick_ends(backend):
    probs = np.array([0.0, 0.2, 0.0, 0.5, 0.3, 0.0], dtype=np.float32)

    assert fusion.sample(probs, u=0.0, backend=backend) == 1
    assert fusion.sample(probs, u=np.nextafter(1.0, 0.0), backend=backend) == 4


@pytest.mark.parametrize("backend", ["c", "reference"])
def test_sample_sparse_returns_listed_ids(backend):
    fused = fusion.fuse_sparse([np.array([7, 3]), np.array([3, 11])],
                               [np.log([0.5, 0.3]), np.log([0.6, 0.1])], [0.2, 0.3], [1.0, 1.0], 100)
    listed = set(fused.ids.tolist())

    tokens = {fusion.sample(fused, u=u, backend=backend) for u in np.linspace(0, 0.999, 200)}

    assert tokens == listed
    assert fusion.sample(fused, temperature=0.0, backend=backend) == 3


def test_sample_large_vocabulary_paths():
    # More than 256 kept tokens take the masked walk over the whole vocabulary, fewer
    # take the sorted list; both must agree with the reference.
    rng = np.random.default_rng(5)
    probs = rng.random(262_144).astype(np.float32) ** 4
    probs /= probs.sum()
    for parameters in ({"top_k": 100}, {"top_k": 10_000}, {"top_p": 0.3}, {"top_p": 0.001},
                       {"min_p": 0.9}, {"min_p": 0.2, "temperature": 0.5}, {"temperature": 2.0}):
        for u in (0.0, 0.123, 0.5, 0.987):
            kernel = fusion.sample(probs, u=u, **parameters)
            reference = fusion.sample(probs, u=u, backend="reference", **parameters)
            assert kernel == reference or consistent_with_reference(
                probs, kernel, u, parameters.get("temperature", 1.0), parameters.get("top_k", 0),
                parameters.get("top_p", 1.0), parameters.get("min_p", 0.0)), (parameters, u)


# --- frequencies ----------------------------------------------------------------------

FREQUENCY_PROBS = np.array([0.30, 0.20, 0.15, 0.12, 0.08, 0.06, 0.04, 0.03, 0.015, 0.005, 0.0, 0.0],
                           dtype=np.float32)


def test_sample_frequencies_match_probabilities():
    counts = draw_frequencies(FREQUENCY_PROBS, DRAWS)

    assert_frequencies_match(counts, FREQUENCY_PROBS.astype(np.float64))


def test_sample_frequencies_with_temperature():
    temperature = 0.6
    counts = draw_frequencies(FREQUENCY_PROBS, DRAWS, temperature=temperature)

    expected = FREQUENCY_PROBS.astype(np.float64) ** (1 / temperature)
    assert_frequencies_match(counts, expected)


def test_sample_frequencies_with_filters():
    # top_k = 6 keeps tokens 0-5 (mass 0.91). top_p = 0.75 then needs 0.6825, which
    # tokens 0-3 reach (0.77) and tokens 0-2 do not (0.65). min_p = 0.3 keeps
    # p >= 0.09, which token 3 (0.12) passes.
    counts = draw_frequencies(FREQUENCY_PROBS, DRAWS, top_k=6, top_p=0.75, min_p=0.3)

    expected = np.where(np.arange(FREQUENCY_PROBS.size) < 4, FREQUENCY_PROBS, 0.0)
    assert_frequencies_match(counts, expected.astype(np.float64))


def test_sample_frequencies_sparse():
    fused = fusion.fuse_sparse([np.array([4, 9, 2]), np.array([9, 5])],
                               [np.log([0.4, 0.3, 0.1]), np.log([0.7, 0.2])], [0.2, 0.1], [0.6, 0.4], 50)
    counts = draw_frequencies(fused, DRAWS)

    expected = np.zeros(50)
    expected[fused.ids] = fused.probs
    assert_frequencies_match(counts, expected)
