"""Every invalid input raises the documented exception, with the same message from
the C kernel and from the numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator import fusion
from coordinator.fusion import (DuplicateTokenIdError, FusionInputError, InvalidParameterError,
                                InvalidTailError, InvalidWeightError, KernelNotBuiltError,
                                NegativeProbabilityError, NonFiniteError, ShapeError,
                                TokenIdRangeError, ZeroMassError, ZeroWeightsError)

BACKENDS = ["c", "reference"]


def logprob_rows(k: int = 3, n: int = 10) -> np.ndarray:
    rows = np.random.default_rng(0).normal(size=(k, n)).astype(np.float32)
    return rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))


def prob_rows(k: int = 3, n: int = 10) -> np.ndarray:
    return np.exp(logprob_rows(k, n))


def sparse_inputs():
    ids = [np.array([0, 5, 9], dtype=np.int32), np.array([5, 2], dtype=np.int32)]
    logprobs = [np.log([0.5, 0.2, 0.1]).astype(np.float32), np.log([0.6, 0.3]).astype(np.float32)]
    return ids, logprobs, np.array([0.2, 0.1]), np.array([1.0, 2.0])


def raised_by_both(call) -> tuple[Exception, Exception]:
    """Run call(backend) on both backends; return both exceptions, which must agree."""
    caught = []
    for backend in BACKENDS:
        with pytest.raises(FusionInputError) as info:
            call(backend)
        caught.append(info.value)
    kernel, reference = caught
    assert type(kernel) is type(reference)
    assert str(kernel) == str(reference)
    assert (kernel.expert, kernel.index) == (reference.expert, reference.index)
    return kernel, reference


# --- dense --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_fuse_dense_nonfinite_logprob_names_position(bad):
    rows = logprob_rows()
    rows[2, 7] = bad

    error, _ = raised_by_both(lambda backend: fusion.fuse_dense(rows, [1, 1, 1], backend=backend))

    assert isinstance(error, NonFiniteError)
    assert (error.expert, error.index) == (2, 7)
    assert "logprobs[2][7]" in str(error)
    assert repr(bad) in str(error)


def test_fuse_dense_nonfinite_zero_weight_row():
    rows = logprob_rows()
    rows[1, 0] = math.nan

    error, _ = raised_by_both(lambda backend: fusion.fuse_dense(rows, [1, 0, 1], backend=backend))

    assert isinstance(error, NonFiniteError)
    assert error.expert == 1


@pytest.mark.parametrize("weights", [[1, -0.5, 1], [1, math.nan, 1], [1, math.inf, 1]])
def test_fuse_dense_invalid_weight(weights):
    error, _ = raised_by_both(lambda backend: fusion.fuse_dense(logprob_rows(), weights, backend=backend))

    assert isinstance(error, InvalidWeightError)
    assert error.expert == 1
    assert "weights[1]" in str(error)


def test_fuse_dense_all_zero_weights():
    error, _ = raised_by_both(lambda backend: fusion.fuse_dense(logprob_rows(), [0, 0, 0], backend=backend))

    assert isinstance(error, ZeroWeightsError)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_fuse_dense_invalid_temperature(temperature):
    error, _ = raised_by_both(lambda backend: fusion.fuse_dense(
        logprob_rows(), [1, 1, 1], temperature=temperature, backend=backend))

    assert isinstance(error, InvalidParameterError)
    assert "temperature" in str(error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_dense_rows_of_different_length(backend):
    rows = [np.zeros(10, np.float32), np.zeros(9, np.float32)]

    with pytest.raises(ShapeError, match=r"logprobs\[1\] has 9 tokens") as info:
        fusion.fuse_dense(rows, [1, 1], backend=backend)
    assert info.value.expert == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [[1, 1], [1, 1, 1, 1], [[1, 1, 1]]])
def test_fuse_dense_weight_count_mismatch(backend, weights):
    with pytest.raises(ShapeError, match="one weight per expert"):
        fusion.fuse_dense(logprob_rows(), weights, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [[], [np.zeros(0, np.float32)], np.zeros((2, 3, 4), np.float32)])
def test_fuse_dense_empty_or_misshapen_input(backend, rows):
    with pytest.raises(ShapeError):
        fusion.fuse_dense(rows, [1.0] * max(1, len(rows)), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_dense_invalid_out_buffer(backend):
    with pytest.raises(ShapeError, match="out must be"):
        fusion.fuse_dense(logprob_rows(), [1, 1, 1], out=np.empty(10, np.float64), backend=backend)


def test_fuse_dense_probs_negative_probability():
    probs = prob_rows()
    probs[0, 3] = -1e-9

    error, _ = raised_by_both(lambda backend: fusion.fuse_dense_probs(probs, [1, 1, 1], backend=backend))

    assert isinstance(error, NegativeProbabilityError)
    assert (error.expert, error.index) == (0, 3)


def test_fuse_dense_probs_nonfinite_probability():
    probs = prob_rows()
    probs[1, 4] = math.inf

    error, _ = raised_by_both(lambda backend: fusion.fuse_dense_probs(probs, [1, 1, 1], backend=backend))

    assert isinstance(error, NonFiniteError)
    assert (error.expert, error.index) == (1, 4)


def test_fuse_dense_probs_zero_row():
    probs = prob_rows()
    probs[2] = 0.0

    error, _ = raised_by_both(lambda backend: fusion.fuse_dense_probs(probs, [1, 1, 1], backend=backend))

    assert isinstance(error, ZeroMassError)
    assert error.expert == 2


# --- sparse -------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", [-1, 10, 2**31 - 1])
def test_fuse_sparse_id_out_of_range(bad_id):
    ids, logprobs, tails, weights = sparse_inputs()
    ids[1][1] = bad_id

    error, _ = raised_by_both(lambda backend: fusion.fuse_sparse(ids, logprobs, tails, weights, 10,
                                                                 backend=backend))

    assert isinstance(error, TokenIdRangeError)
    assert (error.expert, error.index) == (1, 1)
    assert str(bad_id) in str(error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_sparse_id_beyond_int32(backend):
    ids, logprobs, tails, weights = sparse_inputs()
    ids[0] = np.array([0, 2**32 + 5, 9], dtype=np.int64)

    with pytest.raises(TokenIdRangeError, match=str(2**32 + 5)):
        fusion.fuse_sparse(ids, logprobs, tails, weights, 10, backend=backend)


def test_fuse_sparse_duplicate_id_within_expert():
    ids, logprobs, tails, weights = sparse_inputs()
    ids[0] = np.array([0, 5, 0], dtype=np.int32)

    error, _ = raised_by_both(lambda backend: fusion.fuse_sparse(ids, logprobs, tails, weights, 10,
                                                                 backend=backend))

    assert isinstance(error, DuplicateTokenIdError)
    assert (error.expert, error.index) == (0, 2)


@pytest.mark.parametrize("tail", [-1e-6, 1.5, math.nan, math.inf])
def test_fuse_sparse_invalid_tail(tail):
    ids, logprobs, tails, weights = sparse_inputs()
    tails[1] = tail

    error, _ = raised_by_both(lambda backend: fusion.fuse_sparse(ids, logprobs, tails, weights, 10,
                                                                 backend=backend))

    assert isinstance(error, InvalidTailError)
    assert error.expert == 1
    assert "tails[1]" in str(error)


def test_fuse_sparse_nonfinite_logprob():
    ids, logprobs, tails, weights = sparse_inputs()
    logprobs[1][0] = -math.inf

    error, _ = raised_by_both(lambda backend: fusion.fuse_sparse(ids, logprobs, tails, weights, 10,
                                                                 backend=backend))

    assert isinstance(error, NonFiniteError)
    assert (error.expert, error.index) == (1, 0)


def test_fuse_sparse_empty_list_without_tail():
    ids, logprobs, tails, weights = sparse_inputs()
    ids[1] = np.array([], dtype=np.int32)
    logprobs[1] = np.array([], dtype=np.float32)
    tails[1] = 0.0

    error, _ = raised_by_both(lambda backend: fusion.fuse_sparse(ids, logprobs, tails, weights, 10,
                                                                 backend=backend))

    assert isinstance(error, ZeroMassError)
    assert error.expert == 1


def test_fuse_sparse_list_longer_than_vocabulary():
    ids = [np.arange(5, dtype=np.int32)]
    logprobs = [np.full(5, -2.0, dtype=np.float32)]

    error, _ = raised_by_both(lambda backend: fusion.fuse_sparse(ids, logprobs, [0.0], [1.0], 4,
                                                                 backend=backend))

    assert isinstance(error, ShapeError)
    assert error.expert == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_sparse_length_mismatches(backend):
    ids, logprobs, tails, weights = sparse_inputs()

    with pytest.raises(ShapeError, match=r"ids\[1\] has 2 entries but logprobs\[1\] has 1"):
        fusion.fuse_sparse(ids, [logprobs[0], logprobs[1][:1]], tails, weights, 10, backend=backend)
    with pytest.raises(ShapeError, match="one tail per expert"):
        fusion.fuse_sparse(ids, logprobs, [0.1], weights, 10, backend=backend)
    with pytest.raises(ShapeError, match="ids has 2 lists but logprobs has 1"):
        fusion.fuse_sparse(ids, logprobs[:1], tails, weights, 10, backend=backend)
    with pytest.raises(ShapeError, match="n_vocab = 0"):
        fusion.fuse_sparse(ids, logprobs, tails, weights, 0, backend=backend)


@pytest.mark.parametrize("weights", [[1, -1], [0, 0]])
def test_fuse_sparse_invalid_weights(weights):
    ids, logprobs, tails, _ = sparse_inputs()

    error, _ = raised_by_both(lambda backend: fusion.fuse_sparse(ids, logprobs, tails, weights, 10,
                                                                 backend=backend))

    assert isinstance(error, (InvalidWeightError, ZeroWeightsError))


# --- sampling -----------------------------------------------------------------------

PROBS = np.array([0.1, 0.5, 0.4], dtype=np.float32)


@pytest.mark.parametrize("parameter, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
    ("min_p", -0.1), ("min_p", 1.1), ("min_p", math.nan),
    ("u", 1.0), ("u", -0.1), ("u", math.nan),
])
def test_sample_invalid_parameter(parameter, value):
    arguments = {"u": 0.5, parameter: value}

    error, _ = raised_by_both(lambda backend: fusion.sample(PROBS, backend=backend, **arguments))

    assert isinstance(error, InvalidParameterError)
    assert str(error).startswith(f"{parameter} = ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_missing_u(backend):
    with pytest.raises(InvalidParameterError, match="u is missing"):
        fusion.sample(PROBS, temperature=0.8, backend=backend)
    assert fusion.sample(PROBS, temperature=0.0, backend=backend) == 1


@pytest.mark.parametrize("bad, expected", [(math.nan, NonFiniteError), (-0.2, NegativeProbabilityError)])
def test_sample_invalid_probability(bad, expected):
    probs = PROBS.copy()
    probs[2] = bad

    error, _ = raised_by_both(lambda backend: fusion.sample(probs, u=0.5, backend=backend))

    assert isinstance(error, expected)
    assert error.index == 2


def test_sample_all_zero_probabilities():
    error, _ = raised_by_both(lambda backend: fusion.sample(np.zeros(4, np.float32), u=0.5,
                                                            backend=backend))

    assert isinstance(error, ZeroMassError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_empty_distribution(backend):
    with pytest.raises(ShapeError):
        fusion.sample(np.zeros(0, np.float32), u=0.5, backend=backend)


@pytest.mark.parametrize("ids, expected", [([3, 3, 5], DuplicateTokenIdError), ([5, 3, 7], DuplicateTokenIdError),
                                           ([3, 5, 12], TokenIdRangeError)])
def test_sample_sparse_invalid_ids(ids, expected):
    fused = fusion.SparseFused(np.array(ids, np.int32), PROBS, 0.0, 10)

    error, _ = raised_by_both(lambda backend: fusion.sample(fused, u=0.5, backend=backend))

    assert isinstance(error, expected)


# --- backend selection --------------------------------------------------------------

def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv(fusion.BACKEND_ENV, "reference")
    assert fusion.resolve_backend() == "reference"
    assert fusion.resolve_backend("c") == "c"

    monkeypatch.setenv(fusion.BACKEND_ENV, "numpy")
    with pytest.raises(ValueError, match="MOE2_FUSION"):
        fusion.resolve_backend()


def test_missing_kernel_names_rebuild_command(monkeypatch):
    monkeypatch.setattr(fusion, "_lib", None)
    monkeypatch.setattr(fusion, "_IMPORT_ERROR", ImportError("No module named 'coordinator._fusion_c'"))
    monkeypatch.delenv(fusion.BACKEND_ENV, raising=False)

    with pytest.raises(KernelNotBuiltError, match=r"pip install -e \.") as info:
        fusion.fuse_dense(logprob_rows(), [1, 1, 1])
    assert isinstance(info.value, ImportError)

    # The reference stays available, but only when chosen explicitly.
    assert fusion.fuse_dense(logprob_rows(), [1, 1, 1], backend="reference").shape == (10,)
    monkeypatch.setenv(fusion.BACKEND_ENV, "reference")
    assert fusion.sample(PROBS, u=0.3) in (0, 1, 2)
