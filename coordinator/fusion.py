"""Fusion of the experts' next-token distributions, and sampling from the result.

This module binds the C kernel (csrc/fusion.c, compiled into coordinator._fusion_c
at install time) and turns numpy arrays into kernel calls:

    fused = fuse_dense([logprobs_0, logprobs_1], weights)        # float32 [n_tokens]
    token = sample(fused, temperature=0.8, top_p=0.95, u=rng.random())

    sparse = fuse_sparse(ids, logprobs, tails, weights, n_vocab)  # SparseFused
    token = sample(sparse, temperature=0.8, u=rng.random())

The fused distribution is F = sum_n w_n f_n, with the weights renormalized to sum 1.
Dense inputs must cover the real tokens only (n_tokens of the agent's info), so
padded ids never get probability.

Backends: the C kernel by default, or the numpy reference (coordinator.fusion_ref)
when a call passes backend="reference" or the environment sets
MOE2_FUSION=reference. A missing compiled module raises KernelNotBuiltError when a
C call is made; it never falls back to the reference silently.

Errors: every invalid input raises a subclass of FusionInputError (a ValueError)
from coordinator.fusion_errors, whose message names the value and its position.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coordinator import fusion_errors as errors
from coordinator import fusion_ref
from coordinator.fusion_errors import (  # noqa: F401  (re-exported for callers)
    DuplicateTokenIdError, FusionError, FusionInputError, FusionKernelError,
    InvalidParameterError, InvalidTailError, InvalidWeightError, KernelNotBuiltError,
    NegativeProbabilityError, NonFiniteError, ShapeError, TokenIdRangeError,
    ZeroMassError, ZeroWeightsError)

BACKEND_ENV = "MOE2_FUSION"
BACKENDS = ("c", "reference")
INT32_MAX = 2**31 - 1

try:
    from coordinator._fusion_c import ffi as _ffi, lib as _lib
    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # reported when a C call is made, see _require_kernel()
    _ffi = _lib = None
    _IMPORT_ERROR = exc


@dataclass(frozen=True)
class SparseFused:
    """Fused distribution of sparse top-m lists.

    ids: the union of listed token ids, int32, ascending.
    probs: the fused probability of each id, float32.
    tail: the fused probability mass of all tokens not in ids, spread evenly over them.
    n_vocab: the vocabulary size the ids index.
    """

    ids: np.ndarray
    probs: np.ndarray
    tail: float
    n_vocab: int

    @property
    def tail_prob(self) -> float:
        """Probability of each token outside `ids` (0 when ids cover the vocabulary)."""
        unlisted = self.n_vocab - self.ids.size
        return self.tail / unlisted if unlisted > 0 else 0.0

    def to_dense(self) -> np.ndarray:
        """Return the distribution over all n_vocab tokens as float32."""
        dense = np.full(self.n_vocab, self.tail_prob, dtype=np.float32)
        dense[self.ids] = self.probs
        return dense


# --- backend selection --------------------------------------------------------------

def resolve_backend(backend: str | None = None) -> str:
    """Return the backend to use: the argument, else MOE2_FUSION, else "c"."""
    name = backend if backend is not None else os.environ.get(BACKEND_ENV, "c")
    name = name.strip().lower()
    if name not in BACKENDS:
        source = "backend argument" if backend is not None else f"environment variable {BACKEND_ENV}"
        raise ValueError(f"invalid fusion backend {name!r} from the {source}; use 'c' or 'reference'")
    return name


def _require_kernel():
    if _lib is None:
        raise KernelNotBuiltError(
            "the compiled fusion kernel coordinator._fusion_c is missing or failed to load "
            f"({_IMPORT_ERROR}); rebuild it with `pip install -e .` (or `make test`) from the "
            "repository root, or choose the numpy reference explicitly with "
            f"backend='reference' or {BACKEND_ENV}=reference")
    return _ffi, _lib


# --- buffers ------------------------------------------------------------------------

class _ThreadBuffers(threading.local):
    """Per-thread scratch memory and error record, so concurrent calls never share them."""

    def __init__(self) -> None:
        self.scratch = np.empty(0, dtype=np.uint8)
        self.error = None

    def get_scratch(self, size: int) -> np.ndarray:
        if self.scratch.size < size:
            self.scratch = np.empty(size, dtype=np.uint8)
        return self.scratch

    def get_error(self, ffi):
        if self.error is None:
            self.error = ffi.new("moe2_error *")
        return self.error


_buffers = _ThreadBuffers()


def _raise_kernel_error(error, array: str) -> None:
    parameter = errors.PARAMETERS.get(error.parameter)
    errors.raise_status(error.status, array, expert=error.expert,
                        index=error.index, value=error.value, limit=error.limit,
                        parameter=parameter)


# --- input shaping ------------------------------------------------------------------

def _as_float32_vector(values, name: str, expert: int | None = None) -> np.ndarray:
    if type(values) is np.ndarray and values.dtype == np.float32 and values.ndim == 1 \
            and values.flags.c_contiguous:
        return values  # the common case, checked first because it runs every step
    array = np.asarray(values)
    where = name if expert is None else f"{name}[{expert}]"
    if array.ndim != 1:
        raise ShapeError(f"{where} must be 1-D, got shape {array.shape}", expert=expert)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{where} must contain numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _as_rows(values, name: str) -> list[np.ndarray]:
    """Return k 1-D float32 rows of equal length from a 2-D array or a list of vectors."""
    if isinstance(values, np.ndarray) and values.ndim == 2:
        matrix = np.ascontiguousarray(values, dtype=np.float32)
        rows = list(matrix)
    elif isinstance(values, np.ndarray) and values.ndim != 2:
        raise ShapeError(f"{name} must be a 2-D array [k, n_tokens] or a list of k 1-D arrays, "
                         f"got shape {values.shape}")
    else:
        rows = [_as_float32_vector(row, name, n) for n, row in enumerate(values)]
    if not rows:
        raise ShapeError(f"{name} is empty; pass at least one expert's distribution")
    length = rows[0].size
    if length == 0:
        raise ShapeError(f"{name}[0] is empty; a distribution needs at least one token", expert=0)
    for n, row in enumerate(rows):
        if row.size != length:
            raise ShapeError(f"{name}[{n}] has {row.size} tokens but {name}[0] has {length}; "
                             "every expert must cover the same n_tokens", expert=n)
    return rows


def _as_weights(weights, k: int) -> np.ndarray:
    array = np.ascontiguousarray(weights, dtype=np.float64)
    if array.ndim != 1 or array.size != k:
        raise ShapeError(f"weights has shape {array.shape}, expected ({k},): one weight per expert")
    return array


def _as_out(out, n: int) -> np.ndarray:
    if out is None:
        return np.empty(n, dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (n,) \
            or not out.flags.c_contiguous or not out.flags.writeable:
        shape = getattr(out, "shape", None)
        dtype = getattr(out, "dtype", type(out).__name__)
        raise ShapeError(f"out must be a writable C-contiguous float32 array of shape ({n},), "
                         f"got shape {shape} and dtype {dtype}")
    return out


def _as_ids(values, name: str, expert: int | None = None) -> np.ndarray:
    if type(values) is np.ndarray and values.dtype == np.int32 and values.ndim == 1 \
            and values.flags.c_contiguous:
        return values
    array = np.asarray(values)
    where = name if expert is None else f"{name}[{expert}]"
    if array.ndim != 1:
        raise ShapeError(f"{where} must be 1-D, got shape {array.shape}", expert=expert)
    if array.size == 0:
        return np.empty(0, dtype=np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{where} must contain integer token ids, got dtype {array.dtype}")
    if array.dtype != np.int32:
        # Check before narrowing, so an id beyond int32 is reported rather than wrapped.
        outside = np.flatnonzero((array < 0) | (array > INT32_MAX))
        if outside.size:
            i = int(outside[0])
            errors.raise_status(errors.ERR_ID_RANGE, name, expert=expert, index=i,
                                value=int(array[i]))
    return np.ascontiguousarray(array, dtype=np.int32)


def _float_rows_pointer(ffi, rows: list[np.ndarray]):
    pointers = ffi.new("float *[]", len(rows))
    for n, row in enumerate(rows):
        pointers[n] = ffi.from_buffer("float[]", row)
    return pointers


# --- dense fusion -------------------------------------------------------------------

def fuse_dense(logprobs, weights, *, temperature: float = 1.0, out: np.ndarray | None = None,
               backend: str | None = None) -> np.ndarray:
    """Fuse k dense distributions given as log-probabilities or logits.

    Returns F = sum_n w_n softmax(logprobs[n] / temperature) as float32 of length
    n_tokens, with w renormalized to sum 1. logprobs is a [k, n_tokens] array or a
    list of k 1-D arrays (converted to float32 if needed; float32 inputs are not
    copied). temperature scales each expert's logits before the mixture; 1 gives the
    method's F. out, if given, receives the result and is returned.

    The C kernel agrees with the float64 reference within a relative error of
    1e-5 per element plus an absolute error of 1e-30 (RTOL and ATOL in
    tests/fusion_cases.py).

    Raises ShapeError, NonFiniteError, InvalidWeightError, ZeroWeightsError or
    InvalidParameterError (temperature not finite and > 0).
    """
    rows = _as_rows(logprobs, "logprobs")
    w = _as_weights(weights, len(rows))
    out = _as_out(out, rows[0].size)
    temperature = float(temperature)

    if resolve_backend(backend) == "reference":
        out[:] = fusion_ref.fuse_logprobs(rows, w, temperature)
        return out

    ffi, lib = _require_kernel()
    error = _buffers.get_error(ffi)
    scratch = _buffers.get_scratch(lib.moe2_get_logprobs_scratch_size(len(rows), rows[0].size))
    status = lib.moe2_fuse_logprobs(_float_rows_pointer(ffi, rows), len(rows), rows[0].size,
                                    ffi.from_buffer("double[]", w), temperature,
                                    ffi.from_buffer("float[]", out, require_writable=True),
                                    ffi.from_buffer(scratch, require_writable=True), scratch.size,
                                    error)
    if status != errors.OK:
        _raise_kernel_error(error, "logprobs")
    return out


def fuse_dense_probs(probs, weights, *, out: np.ndarray | None = None,
                     backend: str | None = None) -> np.ndarray:
    """Fuse k dense distributions given as probabilities.

    Returns F = sum_n w_n probs[n] / sum(probs[n]) as float32, with w renormalized
    to sum 1. Each row is renormalized, so rows that sum to 1 only up to float32
    rounding are fine. Shapes as in fuse_dense.

    Raises ShapeError, NonFiniteError, NegativeProbabilityError, ZeroMassError (a row
    of zeros), InvalidWeightError or ZeroWeightsError.
    """
    rows = _as_rows(probs, "probs")
    w = _as_weights(weights, len(rows))
    out = _as_out(out, rows[0].size)

    if resolve_backend(backend) == "reference":
        out[:] = fusion_ref.fuse_probs(rows, w)
        return out

    ffi, lib = _require_kernel()
    error = _buffers.get_error(ffi)
    scratch = _buffers.get_scratch(lib.moe2_get_probs_scratch_size(len(rows), rows[0].size))
    status = lib.moe2_fuse_probs(_float_rows_pointer(ffi, rows), len(rows), rows[0].size,
                                 ffi.from_buffer("double[]", w),
                                 ffi.from_buffer("float[]", out, require_writable=True),
                                 ffi.from_buffer(scratch, require_writable=True), scratch.size,
                                 error)
    if status != errors.OK:
        _raise_kernel_error(error, "probs")
    return out


# --- sparse fusion ------------------------------------------------------------------

def fuse_sparse(ids: Sequence, logprobs: Sequence, tails, weights, n_vocab: int, *,
                backend: str | None = None) -> SparseFused:
    """Fuse k sparse top-m lists over a vocabulary of n_vocab tokens.

    ids[n] and logprobs[n] are expert n's listed token ids and their
    log-probabilities; tails[n] is the probability mass of the tokens it did not
    list. Tail rule: an expert's tail is spread evenly over the n_vocab - m_n tokens
    it did not list, and ignored when it lists every token. Each expert is
    renormalized so that its listed probabilities plus its tail sum to 1. When every
    list covers the vocabulary, the result equals fuse_dense on the same values.

    Error bound: suppose each tail is the exact mass of the unlisted tokens. Then the
    result differs from the dense fusion of the experts' full distributions by at
    most sum_n w_n tails[n] per token, and by at most 2 sum_n w_n tails[n] in total
    (L1), plus rounding.

    Raises ShapeError, NonFiniteError, TokenIdRangeError, DuplicateTokenIdError (an
    expert lists a token twice), InvalidTailError (outside [0, 1]), ZeroMassError
    (an empty list with tail 0), InvalidWeightError or ZeroWeightsError.
    """
    k = len(ids)
    if k == 0:
        raise ShapeError("ids is empty; pass at least one expert's list")
    if len(logprobs) != k:
        raise ShapeError(f"ids has {k} lists but logprobs has {len(logprobs)}; pass one per expert")
    n_vocab = int(n_vocab)
    if n_vocab < 1 or n_vocab > INT32_MAX + 1:
        raise ShapeError(f"n_vocab = {n_vocab} is invalid; it must be in [1, 2**31]")
    id_lists = [_as_ids(listed, "ids", n) for n, listed in enumerate(ids)]
    lp_lists = [_as_float32_vector(lp, "logprobs", n) for n, lp in enumerate(logprobs)]
    for n, (listed, lp) in enumerate(zip(id_lists, lp_lists)):
        if listed.size != lp.size:
            raise ShapeError(f"ids[{n}] has {listed.size} entries but logprobs[{n}] has "
                             f"{lp.size}; each id needs one log-probability", expert=n)
    tail_array = np.ascontiguousarray(tails, dtype=np.float64)
    if tail_array.shape != (k,):
        raise ShapeError(f"tails has shape {tail_array.shape}, expected ({k},): one tail per expert")
    w = _as_weights(weights, k)

    if resolve_backend(backend) == "reference":
        union, probs, tail = fusion_ref.fuse_lists(id_lists, lp_lists, tail_array, w, n_vocab)
        return SparseFused(union, probs, tail, n_vocab)

    ffi, lib = _require_kernel()
    counts = np.array([listed.size for listed in id_lists], dtype=np.int32)
    all_ids = np.concatenate(id_lists) if k > 1 else id_lists[0]
    all_lp = np.concatenate(lp_lists) if k > 1 else lp_lists[0]
    n_listed = int(counts.sum())
    capacity = min(n_listed, n_vocab)
    out_ids = np.empty(capacity, dtype=np.int32)
    out_probs = np.empty(capacity, dtype=np.float32)
    scratch_size = lib.moe2_get_lists_scratch_size(k, n_listed)
    if scratch_size < 0:
        raise ShapeError(f"the lists hold {n_listed} entries in total, more than the kernel supports")
    scratch = _buffers.get_scratch(scratch_size)
    out_count = ffi.new("int64_t *")
    out_tail = ffi.new("double *")
    error = _buffers.get_error(ffi)

    status = lib.moe2_fuse_lists(
        ffi.from_buffer("int32_t[]", all_ids), ffi.from_buffer("float[]", all_lp),
        ffi.from_buffer("int32_t[]", counts), ffi.from_buffer("double[]", tail_array), k,
        n_vocab, ffi.from_buffer("double[]", w),
        ffi.from_buffer("int32_t[]", out_ids, require_writable=True),
        ffi.from_buffer("float[]", out_probs, require_writable=True), capacity,
        out_count, out_tail, ffi.from_buffer(scratch, require_writable=True), scratch.size, error)
    if status != errors.OK:
        _raise_kernel_error(error, "logprobs" if status == errors.ERR_NOT_FINITE else "ids")
    count = out_count[0]
    return SparseFused(out_ids[:count], out_probs[:count], float(out_tail[0]), n_vocab)


# --- sampling -----------------------------------------------------------------------

def sample(distribution: np.ndarray | SparseFused, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0, u: float | None = None,
           backend: str | None = None) -> int:
    """Sample a token id from a fused distribution.

    distribution: dense probabilities (1-D, need not sum to 1), or a SparseFused, from
    which only the listed ids can be sampled: its tail is dropped and the listed
    probabilities are renormalized, as top-k sampling would do.

    temperature == 0 returns the most probable token (u is then optional). Otherwise
    top_k (0: off), top_p (1: off) and min_p (0: off) filter the tokens in that
    order, and the kept tokens are weighted by (p / p_max)^(1 / temperature). Then u,
    a uniform number in [0, 1) from the caller's generator, picks one by inverse CDF
    over the kept tokens in ascending id order. The same u and inputs always give
    the same token. Ties resolve to the lowest id; tokens of probability 0 are
    never returned. The full rules are in csrc/fusion.h.

    The C kernel and the reference return the same token except when u * total falls
    near a boundary between two tokens' cumulative weights. At temperature 1 "near"
    means within the rounding of double sums. At other temperatures it can reach
    about 1e-5 of the total (estimated at 0.05), because the kernel computes tempered
    weights with float32 approximations of exp and log.

    Raises InvalidParameterError, ShapeError, NonFiniteError,
    NegativeProbabilityError, ZeroMassError (no positive probability),
    TokenIdRangeError or DuplicateTokenIdError (sparse ids not strictly ascending).
    """
    if isinstance(distribution, SparseFused):
        probs = _as_float32_vector(distribution.probs, "probs")
        ids = _as_ids(distribution.ids, "ids")
        n_vocab = int(distribution.n_vocab)
        if ids.size != probs.size:
            raise ShapeError(f"ids has {ids.size} entries but probs has {probs.size}")
    else:
        probs = _as_float32_vector(distribution, "probs")
        ids = None
        n_vocab = probs.size
    if probs.size == 0:
        raise ShapeError("probs is empty; there is no token to sample")

    temperature = float(temperature)
    if u is None:
        if temperature != 0.0:
            raise InvalidParameterError(
                "u is missing; pass a uniform random number in [0, 1) from the caller's "
                "generator (it is optional only when temperature == 0)")
        u = 0.0
    u = float(u)
    top_p = float(top_p)
    min_p = float(min_p)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise TypeError(f"top_k must be an integer, got {top_k!r}")
    top_k = min(int(top_k), INT32_MAX)

    if resolve_backend(backend) == "reference":
        return fusion_ref.sample_token(probs, ids, n_vocab, temperature, top_k, top_p, min_p, u)

    ffi, lib = _require_kernel()
    scratch = _buffers.get_scratch(lib.moe2_get_sample_scratch_size(probs.size))
    token = ffi.new("int64_t *")
    error = _buffers.get_error(ffi)
    id_pointer = ffi.NULL if ids is None else ffi.from_buffer("int32_t[]", ids)
    status = lib.moe2_sample_token(ffi.from_buffer("float[]", probs), id_pointer, probs.size,
                                   n_vocab, temperature, top_k, top_p, min_p, u,
                                   ffi.from_buffer(scratch, require_writable=True), scratch.size,
                                   token, error)
    if status != errors.OK:
        _raise_kernel_error(error, "ids" if status in (errors.ERR_ID_RANGE, errors.ERR_ID_DUPLICATE,
                                                       errors.ERR_LENGTH) else "probs")
    return int(token[0])
