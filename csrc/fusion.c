/*
 * MoE² fusion and sampling kernel: the checks shared by all parts, and the exp and
 * log approximations exposed for tests. The contract of every public function is in
 * fusion.h. The parts live in fusion_dense.c (dense fusion), fusion_lists.c
 * (sparse fusion) and fusion_sample.c (sampling).
 *
 * Speed: exp() dominates dense fusion, so the hot loops use exp_approx(), a range
 * reduction plus a degree-6 polynomial that gcc -O3 vectorizes, instead of libm's
 * expf. See MOE2_CLONES in fusion_internal.h for the per-CPU builds.
 */
#include "fusion_internal.h"

MOE2_CLONES
void moe2_compute_exp(float *values, int64_t n)
{
    if (values == NULL) {
        return;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        values[i] = exp_approx(values[i]);
    }
}

MOE2_CLONES
void moe2_compute_log(float *values, int64_t n)
{
    if (values == NULL) {
        return;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        values[i] = log_approx(values[i]);
    }
}

MOE2_CLONES
int64_t find_nonfinite(const float *x, int64_t n)
{
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        const float *block = x + start;
        int32_t bad = 0;
#pragma omp simd reduction(|:bad)
        for (int64_t i = 0; i < len; i++) {
            bad |= is_nonfinite(block[i]);
        }
        if (bad) {
            for (int64_t i = 0; i < len; i++) {
                if (is_nonfinite(block[i])) {
                    return start + i;
                }
            }
        }
    }
    return -1;
}

int32_t normalize_weights(const double *weights, int32_t k, double *normalized,
                          moe2_error *error)
{
    double largest = 0.0;
    for (int32_t n = 0; n < k; n++) {
        double w = weights[n];
        if (!isfinite(w) || w < 0.0) {
            return fail(error, MOE2_ERR_WEIGHT, n, n, w);
        }
        largest = w > largest ? w : largest;
    }
    if (largest == 0.0) {
        return fail(error, MOE2_ERR_ZERO_WEIGHTS, -1, -1, 0.0);
    }

    double sum = 0.0;
    for (int32_t n = 0; n < k; n++) {
        normalized[n] = weights[n] / largest;
        sum += normalized[n];
    }
    for (int32_t n = 0; n < k; n++) {
        normalized[n] /= sum;
    }
    return MOE2_OK;
}
