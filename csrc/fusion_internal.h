/*
 * Shared internals of the fusion kernel: build switches, block size, error helpers,
 * the fast exp and log approximations, and the checks that several parts use.
 * Not part of the public interface (fusion.h).
 */
#ifndef MOE2_FUSION_INTERNAL_H
#define MOE2_FUSION_INTERNAL_H

#include "fusion.h"

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/*
 * On x86-64 Linux with gcc, each hot loop is compiled three times (baseline SSE2,
 * x86-64-v3 with AVX2 and FMA, x86-64-v4 with AVX-512), and the loader picks the
 * best one for the running CPU, so the module stays portable. Elsewhere, or when
 * built with -DMOE2_NO_CLONES (to test one instruction set), the loops are
 * compiled once for the compiler's target.
 */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(MOE2_NO_CLONES)
#define MOE2_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define MOE2_CLONES
#endif

/* Functions shared between the kernel's source files, kept out of the module's exports. */
#if defined(__GNUC__)
#define MOE2_INTERNAL __attribute__((visibility("hidden")))
#else
#define MOE2_INTERNAL
#endif

/* Elements per block: 4 KiB of float32, so a block of every row stays in L1. */
#define BLOCK 1024

/* Ranges below which the sorting and selection loops use a plain insertion sort. */
#define SMALL_RANGE 16

typedef union {
    float f;
    uint32_t u;
} float_bits;

/* --- errors ---------------------------------------------------------------------- */

static inline void clear_error(moe2_error *error)
{
    if (error != NULL) {
        error->status = MOE2_OK;
        error->expert = -1;
        error->index = -1;
        error->parameter = MOE2_PARAM_NONE;
        error->value = 0.0;
        error->limit = 0.0;
    }
}

static inline int32_t fail(moe2_error *error, int32_t status, int32_t expert, int64_t index,
                           double value)
{
    if (error != NULL) {
        error->status = status;
        error->expert = expert;
        error->index = index;
        error->value = value;
    }
    return status;
}

static inline int32_t fail_length(moe2_error *error, int32_t status, int32_t expert,
                                  double value, double limit)
{
    if (error != NULL) {
        error->limit = limit;
    }
    return fail(error, status, expert, -1, value);
}

static inline int32_t fail_parameter(moe2_error *error, int32_t parameter, double value)
{
    if (error != NULL) {
        error->parameter = parameter;
    }
    return fail(error, MOE2_ERR_PARAMETER, -1, -1, value);
}

/* --- fast exp and log ------------------------------------------------------------- */

/*
 * exp(x) for float x <= 88, with relative error below 1.5e-7 over [-87, 88]
 * (checked by tests/test_fusion_kernel.py). x = n ln2 + r with |r| <= ln2 / 2, and
 * e^r is a degree-6 polynomial fitted at Chebyshev nodes. Inputs below -87 return 0:
 * the exact value is below 1.7e-38, so the absolute error stays below that.
 * NaN is not handled: callers validate their inputs first.
 */
static inline float exp_approx(float x)
{
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f;   /* 9 significant bits, so n * ln2_hi is exact */
    const float ln2_lo = -2.12194442e-4f; /* ln2 - ln2_hi */
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */

    float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (clamped * log2e + round_magic) - round_magic;
    float r = (clamped - n * ln2_hi) - n * ln2_lo;

    float p = 1.394110848e-3f;
    p = p * r + 8.375125937e-3f;
    p = p * r + 4.166635126e-2f;
    p = p * r + 1.666641533e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;

    float_bits scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    float result = p * scale.f;
    return x < -87.0f ? 0.0f : result;
}

/*
 * ln(x) for finite x > 0, subnormals included, with absolute error below
 * 1e-7 + 1.2e-7 |ln x|, the second term from rounding the result to float
 * (checked by tests/test_fusion_kernel.py).
 * x = m 2^e with m in [sqrt(1/2), sqrt(2)), and ln(m) = 2 atanh(s) with
 * s = (m - 1) / (m + 1), |s| <= 0.172, summed up to s^9 (truncation below 3e-9).
 * A subnormal x is m 2^-149 with an integer mantissa m that converts to float
 * exactly, so no float operation gets a subnormal operand, which is slow on x86.
 */
static inline float log_approx(float x)
{
    const float ln2 = 0.693147180559945309f;
    float_bits bits;
    bits.f = x;
    int subnormal = bits.u < 0x00800000u;
    float_bits mantissa_value;
    mantissa_value.f = (float)(int32_t)bits.u;
    uint32_t u = subnormal ? mantissa_value.u : bits.u;
    float e_adjust = subnormal ? -149.0f : 0.0f;

    /* Split into exponent and a mantissa in [sqrt(1/2), sqrt(2)). */
    int32_t e = (int32_t)((u >> 23) & 0xffu) - 127;
    bits.u = (u & 0x007fffffu) | 0x3f800000u;
    float m = bits.f;
    float big = m > 1.41421356f ? 1.0f : 0.0f;
    m = m * (1.0f - 0.5f * big);
    float exponent = (float)e + big + e_adjust;

    float s = (m - 1.0f) / (m + 1.0f);
    float s2 = s * s;
    float series = 1.0f / 9.0f;
    series = series * s2 + 1.0f / 7.0f;
    series = series * s2 + 1.0f / 5.0f;
    series = series * s2 + 1.0f / 3.0f;
    series = series * s2 + 1.0f;
    return exponent * ln2 + 2.0f * s * series;
}

static inline int is_nonfinite(float x)
{
    float_bits bits;
    bits.f = x;
    return (bits.u & 0x7f800000u) == 0x7f800000u;
}

/* --- shared checks ---------------------------------------------------------------- */

/* Index of the first NaN or infinity in x[0..n), or -1. */
MOE2_INTERNAL int64_t find_nonfinite(const float *x, int64_t n);

/*
 * Validate k weights and store them renormalized to sum 1 in `normalized`.
 * Weights are divided by their maximum before summing, so huge finite weights
 * cannot overflow the sum.
 */
MOE2_INTERNAL int32_t normalize_weights(const double *weights, int32_t k, double *normalized,
                                        moe2_error *error);

static inline int32_t check_scratch(int64_t size, int64_t needed, moe2_error *error)
{
    if (needed < 0) {
        return fail_length(error, MOE2_ERR_LENGTH, -1, (double)needed, 0.0);
    }
    if (size < needed) {
        return fail_length(error, MOE2_ERR_SCRATCH, -1, (double)size, (double)needed);
    }
    return MOE2_OK;
}

/* Round a scratch pointer up to a multiple of 64. Every scratch size includes the
 * 64 bytes that this may skip. */
static inline void *align_scratch(void *scratch)
{
    return (void *)(((uintptr_t)scratch + 63u) & ~(uintptr_t)63u);
}

#endif /* MOE2_FUSION_INTERNAL_H */
