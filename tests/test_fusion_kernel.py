"""The compiled kernel itself: its exp approximation, its checks on raw calls, and
concurrent use from several threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from coordinator import fusion, fusion_errors

# Raises KernelNotBuiltError, with the rebuild command, when the module is missing.
ffi, lib = fusion._require_kernel()

# Maximum relative error of the kernel's exp() over [-87, 88], as csrc/fusion.c states.
EXP_RTOL = 1.5e-7


def kernel_exp(values: np.ndarray) -> np.ndarray:
    result = np.ascontiguousarray(values, dtype=np.float32).copy()
    lib.moe2_compute_exp(ffi.from_buffer("float[]", result, require_writable=True), result.size)
    return result


def test_exp_approximation_relative_error():
    x = np.concatenate([np.linspace(-87.0, 88.0, 2_000_001, dtype=np.float32),
                        np.float32([-1e-30, 0.0, 1e-30, -0.34657359, 0.34657359])])

    approx = kernel_exp(x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))

    relative = np.abs(approx / exact - 1.0)
    assert relative.max() < EXP_RTOL, f"x = {x[np.argmax(relative)]!r}"


def test_log_approximation_error():
    # Every 1009th positive float bit pattern below infinity, subnormals included.
    bits = np.arange(1, 0x7F800000, 1009, dtype=np.uint32)
    x = bits.view(np.float32)
    approx = x.copy()
    lib.moe2_compute_log(ffi.from_buffer("float[]", approx, require_writable=True), approx.size)

    exact = np.log(x.astype(np.float64))
    excess = np.abs(approx.astype(np.float64) - exact) - (1e-7 + 1.2e-7 * np.abs(exact))
    assert excess.max() <= 0, f"x = {x[np.argmax(excess)]!r}"


def test_exp_approximation_flushes_below_minus_87():
    x = np.float32([-87.01, -100.0, -1e4, -3.4e38])

    assert np.all(kernel_exp(x) == 0.0)


def test_exp_approximation_is_monotonic():
    x = np.linspace(-20.0, 0.0, 200_001, dtype=np.float32)

    assert np.all(np.diff(kernel_exp(x)) >= 0)


# --- raw calls: bad pointers and short buffers return codes, never crash -------------

def new_error():
    return ffi.new("moe2_error *")


def test_fuse_logprobs_null_pointers_and_short_scratch():
    row = np.zeros(16, np.float32)
    rows = ffi.new("float *[]", [ffi.from_buffer("float[]", row)])
    weights = ffi.new("double[]", [1.0])
    out = np.empty(16, np.float32)
    out_pointer = ffi.from_buffer("float[]", out, require_writable=True)
    size = lib.moe2_get_logprobs_scratch_size(1, 16)
    scratch = ffi.new("char[]", size)
    error = new_error()

    assert lib.moe2_fuse_logprobs(ffi.NULL, 1, 16, weights, 1.0, out_pointer, scratch, size,
                                  error) == fusion_errors.ERR_NULL_POINTER
    assert lib.moe2_fuse_logprobs(rows, 1, 16, weights, 1.0, out_pointer, scratch, size - 1,
                                  error) == fusion_errors.ERR_SCRATCH
    assert error.limit == size
    assert lib.moe2_fuse_logprobs(rows, 0, 16, weights, 1.0, out_pointer, scratch, size,
                                  error) == fusion_errors.ERR_LENGTH
    assert lib.moe2_fuse_logprobs(rows, 1, 16, weights, 1.0, out_pointer, scratch, size,
                                  error) == fusion_errors.OK
    assert np.allclose(out, 1 / 16)


def test_fuse_lists_short_output_and_scratch():
    ids = np.array([1, 2, 3], np.int32)
    logprobs = np.log(np.float32([0.5, 0.3, 0.1]))
    counts = np.array([3], np.int32)
    size = lib.moe2_get_lists_scratch_size(1, 3)
    scratch = ffi.new("char[]", size)
    out_ids = ffi.new("int32_t[]", 3)
    out_probs = ffi.new("float[]", 3)
    out_count = ffi.new("int64_t *")
    out_tail = ffi.new("double *")
    error = new_error()

    def call(capacity, scratch_size):
        return lib.moe2_fuse_lists(ffi.from_buffer("int32_t[]", ids), ffi.from_buffer("float[]", logprobs),
                                   ffi.from_buffer("int32_t[]", counts), ffi.new("double[]", [0.1]), 1, 10,
                                   ffi.new("double[]", [1.0]), out_ids, out_probs, capacity, out_count,
                                   out_tail, scratch, scratch_size, error)

    assert call(2, size) == fusion_errors.ERR_SCRATCH
    assert call(3, size - 1) == fusion_errors.ERR_SCRATCH
    assert call(3, size) == fusion_errors.OK
    assert out_count[0] == 3
    assert lib.moe2_get_lists_scratch_size(0, 3) == -1
    assert lib.moe2_get_lists_scratch_size(1, -1) == -1


def test_sample_token_short_scratch():
    probs = np.float32([0.2, 0.8])
    size = lib.moe2_get_sample_scratch_size(2)
    scratch = ffi.new("char[]", size)
    token = ffi.new("int64_t *")
    error = new_error()

    status = lib.moe2_sample_token(ffi.from_buffer("float[]", probs), ffi.NULL, 2, 2, 1.0, 0, 1.0, 0.0, 0.5,
                                   scratch, size - 1, token, error)

    assert status == fusion_errors.ERR_SCRATCH
    with pytest.raises(fusion_errors.FusionKernelError, match="too small"):
        fusion._raise_kernel_error(error, "probs")
    assert lib.moe2_sample_token(ffi.from_buffer("float[]", probs), ffi.NULL, 2, 2, 1.0, 0, 1.0, 0.0, 0.5,
                                 ffi.NULL, size, token, error) == fusion_errors.ERR_NULL_POINTER


def test_fuse_logprobs_ignores_stale_scratch():
    """The scratch buffer is shared with other calls and may hold any bytes, NaN
    patterns included; the result must not depend on them."""
    rows = np.random.default_rng(2).normal(0, 3, (6, 5000)).astype(np.float32)
    weights = np.array([1.0, 2.0, 0.0, 0.5, 1.0, 3.0])
    pointers = ffi.new("float *[]", [ffi.from_buffer("float[]", row) for row in rows])
    size = lib.moe2_get_logprobs_scratch_size(len(rows), rows.shape[1])
    expected = fusion.fuse_dense(rows, weights)

    for fill in (0x00, 0xFF, 0x7F):
        scratch = np.full(size, fill, dtype=np.uint8)
        out = np.empty(rows.shape[1], np.float32)
        status = lib.moe2_fuse_logprobs(pointers, len(rows), rows.shape[1], ffi.from_buffer("double[]", weights),
                                        1.0, ffi.from_buffer("float[]", out, require_writable=True),
                                        ffi.from_buffer(scratch, require_writable=True), size, new_error())
        assert status == fusion_errors.OK
        assert np.array_equal(out, expected), f"scratch filled with {fill:#x}"


# --- threads ------------------------------------------------------------------------

def test_concurrent_calls_match_sequential():
    """cffi releases the GIL during kernel calls, and each thread has its own scratch,
    so concurrent calls must give the sequential results."""
    rng = np.random.default_rng(11)
    jobs = []
    for _ in range(24):
        rows = rng.normal(0, 3, (4, 20_000)).astype(np.float32)
        weights = rng.random(4) + 0.1
        jobs.append((rows, weights, float(rng.random())))

    def run(job):
        rows, weights, u = job
        fused = fusion.fuse_dense(rows, weights)
        return fused, fusion.sample(fused, temperature=0.8, top_k=50, top_p=0.9, u=u)

    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, jobs))

    for (fused_a, token_a), (fused_b, token_b) in zip(sequential, concurrent):
        assert np.array_equal(fused_a, fused_b)
        assert token_a == token_b
