/*
 * MoE² fusion and sampling kernel. The contract of every public function is in
 * fusion.h.
 *
 * Speed: exp() dominates dense fusion, so the hot loops use exp_approx(), a
 * range reduction plus a degree-6 polynomial that gcc -O3 vectorizes, instead of
 * libm's expf. On x86-64 Linux with gcc, each hot loop is compiled three times
 * (baseline SSE2, x86-64-v3 with AVX2 and FMA, x86-64-v4 with AVX-512) and the
 * loader picks the best one for the running CPU, so the module stays portable.
 * Elsewhere the baseline build runs.
 */
#include "fusion.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MOE2_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define MOE2_CLONES
#endif

/* Elements per block: 4 KiB of float32, so a block of every row stays in L1. */
#define BLOCK 1024

/* Keys of the sampling prefilter histogram: the top 11 bits of a non-negative float. */
#define HISTOGRAM_SHIFT 20
#define HISTOGRAM_SIZE 2048

/* Ranges of the quickselect loops below which a plain insertion sort is used. */
#define SMALL_RANGE 16

/* Kept sets up to this size are sorted and walked as a list in the sampler. */
#define SMALL_KEPT 256

typedef union {
    float f;
    uint32_t u;
} float_bits;

/* --- errors ---------------------------------------------------------------------- */

static void clear_error(moe2_error *error)
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

static int32_t fail(moe2_error *error, int32_t status, int32_t expert, int64_t index,
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

static int32_t fail_length(moe2_error *error, int32_t status, int32_t expert,
                           double value, double limit)
{
    if (error != NULL) {
        error->limit = limit;
    }
    return fail(error, status, expert, -1, value);
}

static int32_t fail_parameter(moe2_error *error, int32_t parameter, double value)
{
    if (error != NULL) {
        error->parameter = parameter;
    }
    return fail(error, MOE2_ERR_PARAMETER, -1, -1, value);
}

/* --- fast exp and log ------------------------------------------------------------- */

/*
 * exp(x) for float x <= 88, with relative error below 1.5e-7 (measured over
 * [-87, 0] by tests/test_fusion_kernel.py). x = n ln2 + r with |r| <= ln2 / 2, and
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
 * ln(x) for finite x > 0, subnormals included, with absolute error below 3e-7.
 * x = m 2^e with m in [sqrt(1/2), sqrt(2)), and ln(m) = 2 atanh(s) with
 * s = (m - 1) / (m + 1), |s| <= 0.172, summed up to s^9 (truncation below 3e-9).
 * A subnormal x is m 2^-149 with an integer mantissa m that converts to float
 * exactly, so no float arithmetic ever sees a subnormal (which is slow on x86).
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

/* --- shared checks ---------------------------------------------------------------- */

/* Index of the first NaN or infinity in x[0..n), or -1. */
MOE2_CLONES
static int64_t find_nonfinite(const float *x, int64_t n)
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

/*
 * Validate k weights and store them renormalized to sum 1 in `normalized`.
 * Weights are divided by their maximum before summing, so huge finite weights
 * cannot overflow the sum.
 */
static int32_t normalize_weights(const double *weights, int32_t k, double *normalized,
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

static int32_t check_rows(const float *const *rows, int32_t k, int64_t n,
                          const double *weights, const float *out, const void *scratch,
                          moe2_error *error)
{
    if (rows == NULL || weights == NULL || out == NULL || scratch == NULL) {
        return fail(error, MOE2_ERR_NULL_POINTER, -1, -1, 0.0);
    }
    if (k < 1) {
        return fail_length(error, MOE2_ERR_LENGTH, -1, (double)k, 1.0);
    }
    if (n < 1) {
        return fail_length(error, MOE2_ERR_LENGTH, -1, (double)n, 1.0);
    }
    for (int32_t e = 0; e < k; e++) {
        if (rows[e] == NULL) {
            return fail(error, MOE2_ERR_NULL_POINTER, e, -1, 0.0);
        }
    }
    return MOE2_OK;
}

static int32_t check_scratch(int64_t given, int64_t needed, moe2_error *error)
{
    if (needed < 0) {
        return fail_length(error, MOE2_ERR_LENGTH, -1, (double)needed, 0.0);
    }
    if (given < needed) {
        return fail_length(error, MOE2_ERR_SCRATCH, -1, (double)given, (double)needed);
    }
    return MOE2_OK;
}

static void *align_scratch(void *scratch)
{
    return (void *)(((uintptr_t)scratch + 63u) & ~(uintptr_t)63u);
}

/* --- dense fusion from log-probabilities ------------------------------------------ */

/*
 * Each exponential is computed once. Rows are processed in groups of GROUP_ROWS.
 * Pass 1 stores each row's e_i = exp((x_i - s_b) * inv_t) in scratch, where s_b is
 * the row's running maximum at block b (online softmax), and sums each block in
 * double. Pass 2 adds w_n exp((s_b - max_n) * inv_t) / S_n * e_i of the whole group
 * to a double accumulator in one sweep, where S_n is computed from the block sums
 * with those same factors. The accumulator is converted to float32 into `out` at the
 * end, so `out` is left untouched when an input is rejected.
 */
#define GROUP_ROWS 4

int64_t moe2_get_logprobs_scratch_size(int32_t k, int64_t n)
{
    if (k < 1 || n < 1 || n > INT64_MAX / 64) {
        return -1;
    }
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    int64_t padded = blocks * BLOCK;
    /* Alignment, the accumulator (double), a group's exponentials (float) and
     * per-block factors (double), per-expert coefficients (double), and one row's
     * per-block shifts (float) and sums (double). */
    return 64 + 8 * padded + GROUP_ROWS * (4 * padded + 8 * blocks) + 8 * (int64_t)k
           + blocks * (4 + 8);
}

/*
 * Compute exp((x_i - shift) * inv_t) of one block into y and return their sum in
 * double. Float partial sums of 16 elements per lane keep the loop as fast as exp()
 * alone; each has relative error below 1e-6. *bad is set when the block contains
 * NaN or infinity, and *block_max is its maximum.
 */
MOE2_CLONES
static double exp_block(const float *x, int64_t len, float shift, float inv_t, float *y,
                        float *block_max, int32_t *bad)
{
    double sum = 0.0;
    float largest = -FLT_MAX;
    int32_t nonfinite = 0;
    for (int64_t chunk = 0; chunk < len; chunk += 256) {
        int64_t chunk_len = len - chunk < 256 ? len - chunk : 256;
        float partial = 0.0f;
#pragma omp simd reduction(+:partial) reduction(max:largest) reduction(|:nonfinite)
        for (int64_t i = chunk; i < chunk + chunk_len; i++) {
            nonfinite |= is_nonfinite(x[i]);
            largest = x[i] > largest ? x[i] : largest;
            y[i] = exp_approx((x[i] - shift) * inv_t);
            partial += y[i];
        }
        sum += (double)partial;
    }
    *block_max = largest;
    *bad = nonfinite;
    return sum;
}

/*
 * Validate one row, store its exponentials relative to the running maximum, and
 * record each block's shift and sum. Returns the index of the first NaN or
 * infinity, or -1; *max_out is the row's maximum.
 *
 * Each block is computed against the maximum of the blocks before it, and again
 * in the rare case that it holds a new maximum, so a block is read once, not
 * twice (once for its maximum, once for its exponentials).
 */
static int64_t exp_logprob_row(const float *row, int64_t n, float inv_t, float *exps,
                               float *block_shift, double *block_sum, float *max_out)
{
    float running_max = row[0];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        float block_max = 0.0f;
        int32_t bad = 0;
        double sum = exp_block(row + start, len, running_max, inv_t, exps + start, &block_max, &bad);
        if (bad) {
            return start + find_nonfinite(row + start, len);
        }
        if (block_max > running_max) {
            running_max = block_max;
            sum = exp_block(row + start, len, running_max, inv_t, exps + start, &block_max, &bad);
        }
        block_shift[start / BLOCK] = running_max;
        block_sum[start / BLOCK] = sum;
    }
    *max_out = running_max;
    return -1;
}

/*
 * acc[i] (+)= sum_r factor[r][b] * group[r][i] over the `rows` rows of a group
 * (at most GROUP_ROWS), where b is the block of i; `first` assigns instead of adding.
 */
MOE2_CLONES
static void accumulate_group(const float *const *group, int rows, int64_t n,
                             const double *factor, int64_t blocks, int first, double *acc)
{
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        int64_t b = start / BLOCK;
        double f[GROUP_ROWS] = {0.0, 0.0, 0.0, 0.0};
        const float *y[GROUP_ROWS];
        for (int r = 0; r < GROUP_ROWS; r++) {
            /* Rows beyond `rows` read row 0 again with factor 0. */
            f[r] = r < rows ? factor[r * blocks + b] : 0.0;
            y[r] = group[r < rows ? r : 0] + start;
        }
        double *z = acc + start;
        /* Assign on the first group: the scratch may hold any bytes, NaN included,
         * and 0 * NaN would stay NaN. */
        if (first) {
#pragma omp simd
            for (int64_t i = 0; i < len; i++) {
                z[i] = f[0] * (double)y[0][i] + f[1] * (double)y[1][i]
                       + f[2] * (double)y[2][i] + f[3] * (double)y[3][i];
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < len; i++) {
                z[i] += f[0] * (double)y[0][i] + f[1] * (double)y[1][i]
                        + f[2] * (double)y[2][i] + f[3] * (double)y[3][i];
            }
        }
    }
}

MOE2_CLONES
static void store_float(const double *acc, int64_t n, float *out)
{
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        out[i] = (float)acc[i];
    }
}

/*
 * Run pass 1 on row e into the group slot `slot`, and turn its block sums into the
 * factors coef_e exp((s_b - max) * inv_t) / S_e. Returns the first bad index or -1.
 */
static int64_t prepare_logprob_row(const float *row, int64_t n, float inv_t, double coef,
                                   float *exps, double *factor, float *block_shift,
                                   double *block_sum)
{
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    float row_max = 0.0f;
    int64_t bad = exp_logprob_row(row, n, inv_t, exps, block_shift, block_sum, &row_max);
    if (bad >= 0) {
        return bad;
    }
    /* S_e >= 1 because the maximum contributes exp(0). */
    double sum = 0.0;
    for (int64_t b = 0; b < blocks; b++) {
        factor[b] = exp(((double)block_shift[b] - (double)row_max) * (double)inv_t);
        sum += block_sum[b] * factor[b];
    }
    for (int64_t b = 0; b < blocks; b++) {
        factor[b] *= coef / sum;
    }
    return -1;
}

int32_t moe2_fuse_logprobs(const float *const *rows, int32_t k, int64_t n,
                           const double *weights, double temperature, float *out,
                           void *scratch, int64_t scratch_size, moe2_error *error)
{
    clear_error(error);
    int32_t status = check_rows(rows, k, n, weights, out, scratch, error);
    if (status == MOE2_OK) {
        status = check_scratch(scratch_size, moe2_get_logprobs_scratch_size(k, n), error);
    }
    if (status != MOE2_OK) {
        return status;
    }
    if (!isfinite(temperature) || temperature <= 0.0) {
        return fail_parameter(error, MOE2_PARAM_TEMPERATURE, temperature);
    }

    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    int64_t padded = blocks * BLOCK;
    double *acc = align_scratch(scratch);
    float *exps = (float *)(acc + padded);
    double *factor = (double *)(exps + GROUP_ROWS * padded);
    double *coef = factor + GROUP_ROWS * blocks;
    double *block_sum = coef + k;
    float *block_shift = (float *)(block_sum + blocks);

    status = normalize_weights(weights, k, coef, error);
    if (status != MOE2_OK) {
        return status;
    }

    float inv_t = (float)(1.0 / temperature);
    int first = 1;
    for (int32_t group = 0; group < k; group += GROUP_ROWS) {
        const float *group_rows[GROUP_ROWS];
        int rows_in_group = 0;
        for (int32_t e = group; e < k && e < group + GROUP_ROWS; e++) {
            int64_t bad = -1;
            if (coef[e] == 0.0) {
                /* The row adds nothing, but it is still validated. */
                bad = find_nonfinite(rows[e], n);
            } else {
                group_rows[rows_in_group] = exps + rows_in_group * padded;
                bad = prepare_logprob_row(rows[e], n, inv_t, coef[e], exps + rows_in_group * padded,
                                          factor + rows_in_group * blocks, block_shift, block_sum);
                rows_in_group++;
            }
            if (bad >= 0) {
                return fail(error, MOE2_ERR_NOT_FINITE, e, bad, (double)rows[e][bad]);
            }
        }
        if (rows_in_group > 0) {
            accumulate_group(group_rows, rows_in_group, n, factor, blocks, first, acc);
            first = 0;
        }
    }

    store_float(acc, n, out);
    return MOE2_OK;
}

/* --- dense fusion from probabilities ---------------------------------------------- */

/*
 * Rows are processed in groups of GROUP_ROWS: pass 1 validates and sums each row of
 * the group, pass 2 adds the group to a double accumulator in one sweep. A group's
 * rows are read twice, but the second read finds them in cache.
 */

int64_t moe2_get_probs_scratch_size(int32_t k, int64_t n)
{
    if (k < 1 || n < 1 || n > INT64_MAX / 64) {
        return -1;
    }
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    /* Alignment, the accumulator, a group's per-block factors and the coefficients. */
    return 64 + 8 * blocks * BLOCK + 8 * GROUP_ROWS * blocks + 8 * (int64_t)k;
}

/* Validate one row of probabilities and sum it in double. Returns the first bad index or -1. */
MOE2_CLONES
static int64_t measure_prob_row(const float *row, int64_t n, double *sum_out)
{
    double sum = 0.0;

    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        const float *x = row + start;

        int32_t bad = 0;
        double block_sum = 0.0;
#pragma omp simd reduction(|:bad) reduction(+:block_sum)
        for (int64_t i = 0; i < len; i++) {
            bad |= is_nonfinite(x[i]) | (x[i] < 0.0f);
            block_sum += (double)x[i];
        }
        if (bad) {
            for (int64_t i = 0; i < len; i++) {
                if (is_nonfinite(x[i]) || x[i] < 0.0f) {
                    return start + i;
                }
            }
        }
        sum += block_sum;
    }

    *sum_out = sum;
    return -1;
}

int32_t moe2_fuse_probs(const float *const *rows, int32_t k, int64_t n,
                        const double *weights, float *out, void *scratch,
                        int64_t scratch_size, moe2_error *error)
{
    clear_error(error);
    int32_t status = check_rows(rows, k, n, weights, out, scratch, error);
    if (status == MOE2_OK) {
        status = check_scratch(scratch_size, moe2_get_probs_scratch_size(k, n), error);
    }
    if (status != MOE2_OK) {
        return status;
    }

    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    double *acc = align_scratch(scratch);
    double *factor = acc + blocks * BLOCK;
    double *coef = factor + GROUP_ROWS * blocks;
    status = normalize_weights(weights, k, coef, error);
    if (status != MOE2_OK) {
        return status;
    }

    int first = 1;
    for (int32_t group = 0; group < k; group += GROUP_ROWS) {
        const float *group_rows[GROUP_ROWS];
        int rows_in_group = 0;
        for (int32_t e = group; e < k && e < group + GROUP_ROWS; e++) {
            double sum = 0.0;
            int64_t bad = measure_prob_row(rows[e], n, &sum);
            if (bad >= 0) {
                float value = rows[e][bad];
                int32_t code = is_nonfinite(value) ? MOE2_ERR_NOT_FINITE : MOE2_ERR_NEGATIVE;
                return fail(error, code, e, bad, (double)value);
            }
            if (sum == 0.0) {
                return fail(error, MOE2_ERR_ZERO_MASS, e, -1, 0.0);
            }
            if (coef[e] > 0.0) {
                for (int64_t b = 0; b < blocks; b++) {
                    factor[rows_in_group * blocks + b] = coef[e] / sum;
                }
                group_rows[rows_in_group++] = rows[e];
            }
        }
        if (rows_in_group > 0) {
            accumulate_group(group_rows, rows_in_group, n, factor, blocks, first, acc);
            first = 0;
        }
    }

    store_float(acc, n, out);
    return MOE2_OK;
}

/* --- sparse fusion of top-m lists ------------------------------------------------- */

/* Digits of the radix sort that orders the union of ids. */
#define RADIX_BITS 11
#define RADIX_SIZE (1 << RADIX_BITS)

/*
 * Open-addressing table from token id to union index. A slot packs both, id in the
 * high 32 bits, so a probe reads one word.
 */
#define EMPTY_SLOT UINT64_MAX

/* Slots of the table: a power of two at least twice the number of entries. */
static int64_t count_table_slots(int64_t n_listed)
{
    int64_t slots = 16;
    while (slots < 2 * n_listed) {
        slots *= 2;
    }
    return slots;
}

int64_t moe2_get_lists_scratch_size(int32_t k, int64_t n_listed)
{
    if (k < 1 || n_listed < 0 || n_listed > INT32_MAX / 4) {
        return -1;
    }
    int64_t slots = count_table_slots(n_listed);
    /* Doubles: weights, per-entry exponentials and union sums. Uint64: the table,
     * the union's sort keys and their sort copy. Int32: the last expert per union
     * entry. 64 bytes leave room to align the start. */
    return 64 + 8 * ((int64_t)k + 2 * n_listed) + 8 * slots + 16 * n_listed + 4 * n_listed;
}

/*
 * Sort n keys (token id in the high 32 bits) ascending with an LSD radix sort on
 * the bits that n_vocab - 1 needs. Returns the array that holds the result: keys
 * or tmp.
 */
static uint64_t *sort_union_keys(uint64_t *keys, uint64_t *tmp, int64_t n, int64_t n_vocab)
{
    if (n <= SMALL_RANGE) {
        for (int64_t i = 1; i < n; i++) {
            uint64_t key = keys[i];
            int64_t j = i;
            while (j > 0 && keys[j - 1] > key) {
                keys[j] = keys[j - 1];
                j--;
            }
            keys[j] = key;
        }
        return keys;
    }

    int bits = 0;
    while (bits < 32 && ((uint64_t)(n_vocab - 1) >> bits) != 0) {
        bits++;
    }
    /* Split the bits evenly over the fewest passes of at most RADIX_BITS, so that
     * 18-bit ids take two passes of 9 bits (512 buckets) rather than 11 + 7. */
    int passes = (bits + RADIX_BITS - 1) / RADIX_BITS;
    int digit_bits = passes > 0 ? (bits + passes - 1) / passes : 0;
    uint32_t digit_mask = (1u << digit_bits) - 1u;
    uint32_t count[RADIX_SIZE];

    uint64_t *src = keys;
    uint64_t *dst = tmp;
    for (int shift = 32; shift < 32 + bits; shift += digit_bits) {
        memset(count, 0, (digit_mask + 1) * sizeof(uint32_t));
        for (int64_t i = 0; i < n; i++) {
            count[(src[i] >> shift) & digit_mask]++;
        }
        uint32_t offset = 0;
        for (uint32_t d = 0; d <= digit_mask; d++) {
            uint32_t c = count[d];
            count[d] = offset;
            offset += c;
        }
        for (int64_t i = 0; i < n; i++) {
            dst[count[(src[i] >> shift) & digit_mask]++] = src[i];
        }
        uint64_t *swap = src;
        src = dst;
        dst = swap;
    }
    return src;
}

/* Validate the counts of moe2_fuse_lists and store their sum in *n_listed_out. */
static int32_t check_lists(const int32_t *ids, const float *logprobs,
                           const int32_t *counts, int32_t k,
                           int64_t n_vocab, int64_t *n_listed_out, moe2_error *error)
{
    if (k < 1) {
        return fail_length(error, MOE2_ERR_LENGTH, -1, (double)k, 1.0);
    }
    if (n_vocab < 1 || n_vocab > (int64_t)INT32_MAX + 1) {
        return fail_length(error, MOE2_ERR_LENGTH, -1, (double)n_vocab, 1.0);
    }

    int64_t n_listed = 0;
    for (int32_t e = 0; e < k; e++) {
        if (counts[e] < 0 || counts[e] > n_vocab) {
            return fail_length(error, MOE2_ERR_LENGTH, e, (double)counts[e], (double)n_vocab);
        }
        n_listed += counts[e];
    }
    if (n_listed > 0 && (ids == NULL || logprobs == NULL)) {
        return fail(error, MOE2_ERR_NULL_POINTER, -1, -1, 0.0);
    }
    *n_listed_out = n_listed;
    return MOE2_OK;
}

static int32_t check_list_values(const int32_t *ids, const float *logprobs,
                                 const int32_t *counts, const double *tails, int32_t k,
                                 int64_t n_vocab, moe2_error *error)
{
    for (int32_t e = 0; e < k; e++) {
        double tail = tails[e];
        if (!isfinite(tail) || tail < 0.0 || tail > 1.0) {
            return fail(error, MOE2_ERR_TAIL, e, e, tail);
        }
    }

    int64_t offset = 0;
    for (int32_t e = 0; e < k; e++) {
        int64_t bad = find_nonfinite(logprobs + offset, counts[e]);
        if (bad >= 0) {
            return fail(error, MOE2_ERR_NOT_FINITE, e, bad, (double)logprobs[offset + bad]);
        }
        for (int64_t i = 0; i < counts[e]; i++) {
            int32_t id = ids[offset + i];
            if (id < 0 || id >= n_vocab) {
                return fail(error, MOE2_ERR_ID_RANGE, e, i, (double)id);
            }
        }
        offset += counts[e];
    }
    return MOE2_OK;
}

/* Maximum of n floats, or -FLT_MAX when n == 0. */
MOE2_CLONES
static float find_max(const float *x, int64_t n)
{
    float largest = -FLT_MAX;
#pragma omp simd reduction(max:largest)
    for (int64_t i = 0; i < n; i++) {
        largest = x[i] > largest ? x[i] : largest;
    }
    return largest;
}

/* Store exp(lp[i] - shift) in out[i] and return their sum in double. */
MOE2_CLONES
static double exp_list(const float *lp, int64_t n, float shift, double *out)
{
    double sum = 0.0;
#pragma omp simd reduction(+:sum)
    for (int64_t i = 0; i < n; i++) {
        out[i] = (double)exp_approx(lp[i] - shift);
        sum += out[i];
    }
    return sum;
}

int32_t moe2_fuse_lists(const int32_t *ids, const float *logprobs,
                        const int32_t *counts, const double *tails, int32_t k,
                        int64_t n_vocab, const double *weights,
                        int32_t *out_ids, float *out_probs, int64_t capacity,
                        int64_t *out_count, double *out_tail,
                        void *scratch, int64_t scratch_size, moe2_error *error)
{
    clear_error(error);
    if (counts == NULL || tails == NULL || weights == NULL || out_ids == NULL
        || out_probs == NULL || out_count == NULL || out_tail == NULL || scratch == NULL) {
        return fail(error, MOE2_ERR_NULL_POINTER, -1, -1, 0.0);
    }

    int64_t n_listed = 0;
    int32_t status = check_lists(ids, logprobs, counts, k, n_vocab, &n_listed, error);
    if (status != MOE2_OK) {
        return status;
    }
    int64_t needed_capacity = n_listed < n_vocab ? n_listed : n_vocab;
    if (capacity < needed_capacity) {
        return fail_length(error, MOE2_ERR_SCRATCH, -1, (double)capacity, (double)needed_capacity);
    }
    int64_t needed_scratch = moe2_get_lists_scratch_size(k, n_listed);
    if (needed_scratch < 0) {
        return fail_length(error, MOE2_ERR_LENGTH, -1, (double)n_listed, (double)(INT32_MAX / 4));
    }
    if (scratch_size < needed_scratch) {
        return fail_length(error, MOE2_ERR_SCRATCH, -1, (double)scratch_size, (double)needed_scratch);
    }

    /* Carve the scratch: doubles, then uint64, then int32 arrays. */
    int64_t slots = count_table_slots(n_listed);
    double *w = align_scratch(scratch);
    double *exps = w + k;
    double *sums = exps + n_listed;
    uint64_t *table = (uint64_t *)(sums + n_listed);
    uint64_t *keys = table + slots;
    uint64_t *tmp_keys = keys + n_listed;
    int32_t *last_expert = (int32_t *)(tmp_keys + n_listed);

    status = normalize_weights(weights, k, w, error);
    if (status != MOE2_OK) {
        return status;
    }
    status = check_list_values(ids, logprobs, counts, tails, k, n_vocab, error);
    if (status != MOE2_OK) {
        return status;
    }

    memset(table, 0xff, (size_t)slots * sizeof(uint64_t));
    int table_bits = 0;
    while (((int64_t)1 << table_bits) < slots) {
        table_bits++;
    }

    int64_t n_union = 0;
    double tail_per_token = 0.0;
    int64_t offset = 0;
    for (int32_t e = 0; e < k; e++) {
        int64_t count = counts[e];
        const float *lp = logprobs + offset;

        /* Normalize against the largest of the listed log-probabilities and
         * log(tail), so that neither the exponentials nor the tail overflow. */
        float top = find_max(lp, count);
        int has_tail = tails[e] > 0.0 && count < n_vocab;
        double log_tail = has_tail ? log(tails[e]) : -INFINITY;
        if (count == 0 && !has_tail) {
            return fail(error, MOE2_ERR_ZERO_MASS, e, -1, 0.0);
        }
        double reference = count > 0 && (double)top > log_tail ? (double)top : log_tail;
        float shift = (float)reference;

        double listed_sum = exp_list(lp, count, shift, exps + offset);
        double tail_term = has_tail ? exp(log_tail - (double)shift) : 0.0;
        double scale = w[e] / (listed_sum + tail_term);
        double expert_tail = has_tail ? scale * tail_term / (double)(n_vocab - count) : 0.0;
        tail_per_token += expert_tail;

        /* Every union entry starts at the sum of all per-token tails (added at the
         * end); an expert that lists the token replaces its tail share. */
        for (int64_t i = 0; i < count; i++) {
            int32_t id = ids[offset + i];
            double contribution = scale * exps[offset + i] - expert_tail;
            uint32_t slot = ((uint32_t)id * 2654435761u) >> (32 - table_bits);
            for (;;) {
                uint64_t packed = table[slot];
                if (packed == EMPTY_SLOT) {
                    packed = ((uint64_t)(uint32_t)id << 32) | (uint64_t)n_union;
                    table[slot] = packed;
                    keys[n_union] = packed;
                    last_expert[n_union] = e;
                    sums[n_union] = contribution;
                    n_union++;
                    break;
                }
                if ((int32_t)(packed >> 32) == id) {
                    uint32_t entry = (uint32_t)packed;
                    if (last_expert[entry] == e) {
                        return fail(error, MOE2_ERR_ID_DUPLICATE, e, i, (double)id);
                    }
                    last_expert[entry] = e;
                    sums[entry] += contribution;
                    break;
                }
                slot = (slot + 1) & (uint32_t)(slots - 1);
            }
        }
        offset += count;
    }

    const uint64_t *sorted = sort_union_keys(keys, tmp_keys, n_union, n_vocab);
    for (int64_t u = 0; u < n_union; u++) {
        double value = sums[(uint32_t)sorted[u]] + tail_per_token;
        out_ids[u] = (int32_t)(sorted[u] >> 32);
        out_probs[u] = value > 0.0 ? (float)value : 0.0f;
    }
    *out_count = n_union;
    *out_tail = tail_per_token * (double)(n_vocab - n_union);
    return MOE2_OK;
}

/* --- sampling --------------------------------------------------------------------- */

/*
 * Ranking: token a ranks before token b when p_a > p_b, or p_a == p_b and a < b.
 * For p >= 0 the float's bits order like its value, so the 64-bit key
 * (bits(p) << 32) | ~position orders tokens by rank: a larger key ranks first.
 */
typedef uint64_t rank_key;

/* Elements per block of the top-k prefilter's block maxima. */
#define MAX_BLOCK 64

static inline rank_key make_key(float p, int64_t position)
{
    float_bits bits;
    bits.f = p;
    return ((rank_key)bits.u << 32) | (uint32_t)~(uint32_t)position;
}

static inline float key_prob(rank_key key)
{
    float_bits bits;
    bits.u = (uint32_t)(key >> 32);
    return bits.f;
}

static inline int64_t key_position(rank_key key)
{
    return (int64_t)(uint32_t)~(uint32_t)key;
}

typedef struct sample_scratch {
    rank_key *keys;     /* n candidates */
    float *weights;     /* n tempered weights */
    double *block_sums; /* one per BLOCK */
    float *block_max;   /* one per MAX_BLOCK */
    double *masses;     /* 2 * HISTOGRAM_SIZE */
} sample_scratch;

int64_t moe2_get_sample_scratch_size(int64_t n)
{
    if (n < 0 || n > INT32_MAX) {
        return -1;
    }
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    int64_t max_blocks = (n + MAX_BLOCK - 1) / MAX_BLOCK;
    return 64 + 8 * n + 4 * n + 8 * blocks + 4 * max_blocks + 2 * HISTOGRAM_SIZE * 8;
}

static sample_scratch carve_sample_scratch(void *scratch, int64_t n)
{
    sample_scratch s;
    s.keys = align_scratch(scratch);
    s.masses = (double *)(s.keys + n);
    s.block_sums = s.masses + 2 * HISTOGRAM_SIZE;
    s.weights = (float *)(s.block_sums + (n + BLOCK - 1) / BLOCK);
    s.block_max = s.weights + n;
    return s;
}

static void sort_keys_descending(rank_key *keys, int64_t n)
{
    for (int64_t i = 1; i < n; i++) {
        rank_key value = keys[i];
        int64_t j = i;
        while (j > 0 && keys[j - 1] < value) {
            keys[j] = keys[j - 1];
            j--;
        }
        keys[j] = value;
    }
}

/*
 * Partition keys[lo..hi) around the median of three pseudo-random elements, larger
 * keys first, and return the pivot's final index. Keys are distinct (each contains
 * its position), so equal probabilities cannot unbalance the partition.
 */
static int64_t partition_keys(rank_key *keys, int64_t lo, int64_t hi, uint64_t *rng)
{
    int64_t pick[3];
    for (int j = 0; j < 3; j++) {
        *rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
        pick[j] = lo + (int64_t)((*rng >> 33) % (uint64_t)(hi - lo));
    }
    rank_key a = keys[pick[0]], b = keys[pick[1]], c = keys[pick[2]];
    int64_t median = pick[2];
    if ((a > b) != (a > c)) {
        median = pick[0];
    } else if ((b > a) != (b > c)) {
        median = pick[1];
    }

    rank_key pivot = keys[median];
    keys[median] = keys[hi - 1];
    keys[hi - 1] = pivot;
    int64_t store = lo;
    for (int64_t i = lo; i < hi - 1; i++) {
        if (keys[i] > pivot) {
            rank_key tmp = keys[i];
            keys[i] = keys[store];
            keys[store] = tmp;
            store++;
        }
    }
    keys[hi - 1] = keys[store];
    keys[store] = pivot;
    return store;
}

/* Reorder keys[0..n) so that the `keep` largest come first, in any order. */
static void select_top(rank_key *keys, int64_t n, int64_t keep)
{
    int64_t lo = 0;
    int64_t hi = n;
    uint64_t rng = 0x9e3779b97f4a7c15ull ^ (uint64_t)n;
    while (hi - lo > SMALL_RANGE) {
        int64_t j = partition_keys(keys, lo, hi, &rng);
        if (j == keep || j + 1 == keep) {
            return;
        }
        if (j < keep) {
            lo = j + 1;
        } else {
            hi = j;
        }
    }
    sort_keys_descending(keys + lo, hi - lo);
}

/*
 * Reorder keys[0..n) so that the shortest best-ranked prefix whose probability mass
 * reaches `target` comes first, and return its length (n when rounding leaves the
 * whole array short of the target).
 */
static int64_t select_mass(rank_key *keys, int64_t n, double target)
{
    int64_t lo = 0;
    int64_t hi = n;
    double before = 0.0; /* mass of keys[0..lo) */
    uint64_t rng = 0x9e3779b97f4a7c15ull ^ (uint64_t)n;
    while (hi - lo > SMALL_RANGE) {
        int64_t j = partition_keys(keys, lo, hi, &rng);
        double left = 0.0;
        for (int64_t i = lo; i < j; i++) {
            left += (double)key_prob(keys[i]);
        }
        double pivot = (double)key_prob(keys[j]);
        if (before + left >= target) {
            hi = j;
        } else if (before + left + pivot >= target) {
            return j + 1;
        } else {
            before += left + pivot;
            lo = j + 1;
        }
    }
    sort_keys_descending(keys + lo, hi - lo);
    for (int64_t i = lo; i < hi; i++) {
        before += (double)key_prob(keys[i]);
        if (before >= target) {
            return i + 1;
        }
    }
    return hi;
}

/*
 * Validate probabilities and find their maximum and total mass in double.
 * Returns the index of the first NaN, infinite or negative value, or -1.
 */
MOE2_CLONES
static int64_t scan_probs(const float *p, int64_t n, float *max_out, double *total_out)
{
    float largest = 0.0f;
    double total = 0.0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        const float *x = p + start;
        int32_t bad = 0;
        double block_sum = 0.0;
#pragma omp simd reduction(|:bad) reduction(max:largest) reduction(+:block_sum)
        for (int64_t i = 0; i < len; i++) {
            bad |= is_nonfinite(x[i]) | (x[i] < 0.0f);
            largest = x[i] > largest ? x[i] : largest;
            block_sum += (double)x[i];
        }
        if (bad) {
            for (int64_t i = 0; i < len; i++) {
                if (is_nonfinite(x[i]) || x[i] < 0.0f) {
                    return start + i;
                }
            }
        }
        total += block_sum;
    }
    *max_out = largest;
    *total_out = total;
    return -1;
}

/* First position whose probability equals `value`, which must occur. */
MOE2_CLONES
static int64_t find_first_equal(const float *p, int64_t n, float value)
{
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        const float *x = p + start;
        int32_t hit = 0;
#pragma omp simd reduction(|:hit)
        for (int64_t i = 0; i < len; i++) {
            hit |= x[i] == value;
        }
        if (hit) {
            for (int64_t i = 0; i < len; i++) {
                if (x[i] == value) {
                    return start + i;
                }
            }
        }
    }
    return n - 1;
}

/* Maximum of every MAX_BLOCK probabilities. */
MOE2_CLONES
static void find_block_max(const float *p, int64_t n, float *block_max)
{
    for (int64_t start = 0; start < n; start += MAX_BLOCK) {
        int64_t len = n - start < MAX_BLOCK ? n - start : MAX_BLOCK;
        float largest = 0.0f;
#pragma omp simd reduction(max:largest)
        for (int64_t i = start; i < start + len; i++) {
            largest = p[i] > largest ? p[i] : largest;
        }
        block_max[start / MAX_BLOCK] = largest;
    }
}

/* Smallest float f with (double)f >= value, for value >= 0. */
static float round_up_to_float(double value)
{
    float f = (float)value;
    return (double)f < value ? nextafterf(f, FLT_MAX) : f;
}

/*
 * Lower bound on the probability of the top_k best tokens: the top_k-th largest
 * block maximum. top_k blocks have a maximum at or above it, so at least top_k
 * tokens do. 0 when there are fewer blocks than top_k.
 */
static float find_top_k_bound(const float *block_max, int64_t n_blocks, int32_t top_k,
                              rank_key *keys)
{
    if (top_k > n_blocks) {
        return 0.0f;
    }
    for (int64_t b = 0; b < n_blocks; b++) {
        keys[b] = make_key(block_max[b], b);
    }
    select_top(keys, n_blocks, top_k);
    rank_key worst = keys[0];
    for (int32_t i = 1; i < top_k; i++) {
        worst = keys[i] < worst ? keys[i] : worst;
    }
    return key_prob(worst);
}

static float find_mass_histogram_bound(const float *p, int64_t n, double target,
                                       double *masses);

/*
 * Lower bound on the probability of every token in the shortest prefix of the
 * ranking with mass >= target. First try the block maxima: if the largest j of
 * them sum to the target, at least that mass lies at or above the j-th, so the
 * prefix does too. Otherwise use a histogram of mass over the top 11 bits of each
 * probability. 0 means no bound.
 */
static float find_top_p_bound(const float *p, int64_t n, double target,
                              const float *block_max, rank_key *keys, double *masses)
{
    int64_t n_blocks = (n + MAX_BLOCK - 1) / MAX_BLOCK;
    double block_max_total = 0.0;
    for (int64_t b = 0; b < n_blocks; b++) {
        keys[b] = make_key(block_max[b], b);
        block_max_total += (double)block_max[b];
    }
    /* The relative slack keeps the bound at or below the true one despite the
     * different summation order here and in select_mass(). */
    double slack_target = target * (1.0 + 1e-7);
    if (block_max_total >= slack_target * (1.0 + 1e-7)) {
        int64_t count = select_mass(keys, n_blocks, slack_target);
        rank_key worst = keys[0];
        for (int64_t i = 1; i < count; i++) {
            worst = keys[i] < worst ? keys[i] : worst;
        }
        return key_prob(worst);
    }
    return find_mass_histogram_bound(p, n, slack_target, masses);
}

/* The histogram half of find_top_p_bound. */
static float find_mass_histogram_bound(const float *p, int64_t n, double target,
                                       double *masses)
{
    double *masses_even = masses;
    double *masses_odd = masses + HISTOGRAM_SIZE;
    memset(masses, 0, 2 * HISTOGRAM_SIZE * sizeof(double));

    /* Two interleaved histograms halve the store-to-load chains on popular keys.
     * Masking the sign bit sends -0.0 to key 0 with +0.0. */
    for (int64_t i = 0; i + 1 < n; i += 2) {
        float_bits a, b;
        a.f = p[i];
        b.f = p[i + 1];
        masses_even[(a.u & 0x7fffffffu) >> HISTOGRAM_SHIFT] += (double)a.f;
        masses_odd[(b.u & 0x7fffffffu) >> HISTOGRAM_SHIFT] += (double)b.f;
    }
    if (n % 2 == 1) {
        float_bits a;
        a.f = p[n - 1];
        masses_even[(a.u & 0x7fffffffu) >> HISTOGRAM_SHIFT] += (double)a.f;
    }

    double cumulative = 0.0;
    for (int32_t key = HISTOGRAM_SIZE - 1; key > 0; key--) {
        cumulative += masses_even[key] + masses_odd[key];
        if (cumulative >= target) {
            float_bits bound;
            bound.u = (uint32_t)key << HISTOGRAM_SHIFT;
            return bound.f;
        }
    }
    return 0.0f;
}

/*
 * Store the keys of the tokens with p > 0 and p >= bound; returns their number.
 * Blocks whose maximum is below the bound are skipped when block_max is given.
 */
static int64_t gather_keys(const float *p, int64_t n, float bound, const float *block_max,
                           rank_key *keys)
{
    int64_t count = 0;
    for (int64_t start = 0; start < n; start += MAX_BLOCK) {
        if (block_max != NULL && block_max[start / MAX_BLOCK] < bound) {
            continue;
        }
        int64_t end = n - start < MAX_BLOCK ? n : start + MAX_BLOCK;
        for (int64_t i = start; i < end; i++) {
            keys[count] = make_key(p[i], i);
            count += p[i] > 0.0f && p[i] >= bound;
        }
    }
    return count;
}

/*
 * Sample among a short list of kept tokens, walked in ascending position order.
 * Weights are computed in double with libm.
 */
static int64_t walk_list(const float *p, const rank_key *keys, int64_t count,
                         double inv_t, double log_max, double u)
{
    int32_t positions[SMALL_KEPT];
    double weights[SMALL_KEPT];
    for (int64_t i = 0; i < count; i++) {
        int32_t value = (int32_t)key_position(keys[i]);
        int64_t j = i;
        while (j > 0 && positions[j - 1] > value) {
            positions[j] = positions[j - 1];
            j--;
        }
        positions[j] = value;
    }

    double total = 0.0;
    for (int64_t i = 0; i < count; i++) {
        double prob = (double)p[positions[i]];
        weights[i] = inv_t == 1.0 ? prob : exp((log(prob) - log_max) * inv_t);
        total += weights[i];
    }

    double target = u * total;
    double cumulative = 0.0;
    int64_t last_positive = -1;
    for (int64_t i = 0; i < count; i++) {
        if (weights[i] > 0.0) {
            cumulative += weights[i];
            last_positive = positions[i];
            if (cumulative > target) {
                return positions[i];
            }
        }
    }
    return last_positive;
}

/*
 * Sample among all tokens ranked at or before (bound, bound_position), walked in
 * ascending position order. Block sums are vectorized; the block that crosses the
 * target is scanned one element at a time. With a temperature, weights use the
 * float approximations and are kept in `weights`.
 */
MOE2_CLONES
static int64_t walk_mask(const float *p, int64_t n, float bound, int32_t bound_position,
                         int tempered, float inv_t, float log_max, double u,
                         float *weights, double *block_sums)
{
    double total = 0.0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int32_t len = (int32_t)(n - start < BLOCK ? n - start : BLOCK);
        int32_t last = bound_position - (int32_t)start; /* keep ties at or before it */
        const float *x = p + start;
        float *w = weights + start;
        double block_sum = 0.0;
        if (tempered) {
#pragma omp simd reduction(+:block_sum)
            for (int32_t i = 0; i < len; i++) {
                int keep = x[i] > bound || (x[i] == bound && i <= last);
                float value = exp_approx((log_approx(x[i]) - log_max) * inv_t);
                w[i] = keep ? value : 0.0f;
                block_sum += (double)w[i];
            }
        } else {
#pragma omp simd reduction(+:block_sum)
            for (int32_t i = 0; i < len; i++) {
                int keep = x[i] > bound || (x[i] == bound && i <= last);
                block_sum += keep ? (double)x[i] : 0.0;
            }
        }
        block_sums[start / BLOCK] = block_sum;
        total += block_sum;
    }

    double target = u * total;
    double cumulative = 0.0;
    int64_t last_positive = -1;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        double block_sum = block_sums[start / BLOCK];
        if (block_sum > 0.0 && cumulative + block_sum > target) {
            for (int64_t i = start; i < start + len; i++) {
                int keep = p[i] > bound || (p[i] == bound && i <= bound_position);
                double value = tempered ? (double)weights[i] : (keep ? (double)p[i] : 0.0);
                if (value > 0.0) {
                    cumulative += value;
                    last_positive = i;
                    if (cumulative > target) {
                        return i;
                    }
                }
            }
            /* Rounding left the scan short of the block sum: take its last token. */
            return last_positive;
        }
        cumulative += block_sum;
    }

    /* u * total rounded up to total: take the last token with positive weight. */
    for (int64_t i = n - 1; i >= 0; i--) {
        int keep = p[i] > bound || (p[i] == bound && i <= bound_position);
        double value = tempered ? (double)weights[i] : (keep ? (double)p[i] : 0.0);
        if (value > 0.0) {
            return i;
        }
    }
    return -1;
}

static int32_t check_sample_parameters(double temperature, int32_t top_k, double top_p,
                                       double min_p, double u, moe2_error *error)
{
    if (!isfinite(temperature) || temperature < 0.0) {
        return fail_parameter(error, MOE2_PARAM_TEMPERATURE, temperature);
    }
    if (top_k < 0) {
        return fail_parameter(error, MOE2_PARAM_TOP_K, (double)top_k);
    }
    if (!(top_p > 0.0 && top_p <= 1.0)) {
        return fail_parameter(error, MOE2_PARAM_TOP_P, top_p);
    }
    if (!(min_p >= 0.0 && min_p <= 1.0)) {
        return fail_parameter(error, MOE2_PARAM_MIN_P, min_p);
    }
    if (!(u >= 0.0 && u < 1.0)) {
        return fail_parameter(error, MOE2_PARAM_U, u);
    }
    return MOE2_OK;
}

static int32_t check_sample_ids(const int32_t *ids, int64_t n, int64_t n_vocab,
                                moe2_error *error)
{
    if (n > n_vocab) {
        return fail_length(error, MOE2_ERR_LENGTH, -1, (double)n, (double)n_vocab);
    }
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= n_vocab) {
            return fail(error, MOE2_ERR_ID_RANGE, -1, i, (double)ids[i]);
        }
        if (i > 0 && ids[i] <= ids[i - 1]) {
            return fail(error, MOE2_ERR_ID_DUPLICATE, -1, i, (double)ids[i]);
        }
    }
    return MOE2_OK;
}

/*
 * Apply top_k, top_p and min_p and store the keys of the kept tokens; returns their
 * number. The kept set is always a prefix of the ranking.
 */
static int64_t select_kept(const float *p, int64_t n, double total, int32_t top_k,
                           double top_p, float min_bound, sample_scratch *s)
{
    int by_count = top_k > 0 && top_k < n;
    int64_t n_blocks = (n + MAX_BLOCK - 1) / MAX_BLOCK;
    find_block_max(p, n, s->block_max);

    /* Gather a superset of what top_k (or, without it, top_p) keeps. min_p can
     * narrow the gather only when top_p does not need the mass it removes. */
    float bound = by_count ? find_top_k_bound(s->block_max, n_blocks, top_k, s->keys)
                           : find_top_p_bound(p, n, top_p * total, s->block_max, s->keys,
                                              s->masses);
    if (top_p == 1.0 && min_bound > bound) {
        bound = min_bound;
    }
    int64_t count = gather_keys(p, n, bound, s->block_max, s->keys);

    if (by_count && count > top_k) {
        select_top(s->keys, count, top_k);
        count = top_k;
    }
    if (top_p < 1.0) {
        double mass = total;
        if (by_count) {
            mass = 0.0;
            for (int64_t i = 0; i < count; i++) {
                mass += (double)key_prob(s->keys[i]);
            }
        }
        count = select_mass(s->keys, count, top_p * mass);
    }
    if (min_bound > 0.0f) {
        int64_t kept = 0;
        for (int64_t i = 0; i < count; i++) {
            s->keys[kept] = s->keys[i];
            kept += key_prob(s->keys[i]) >= min_bound;
        }
        count = kept;
    }
    return count;
}

/* Position of the sampled token, after the inputs have been validated. */
static int64_t sample_position(const float *p, int64_t n, float largest, double total,
                               double temperature, int32_t top_k, double top_p,
                               double min_p, double u, sample_scratch *s)
{
    double inv_t = 1.0 / temperature;
    int tempered = temperature != 1.0;
    double log_max = log((double)largest);
    float min_bound = min_p > 0.0 ? round_up_to_float(min_p * (double)largest) : 0.0f;
    int selecting = (top_k > 0 && top_k < n) || top_p < 1.0;

    /* Without a ranking filter, every token at or above min_p is kept. */
    float bound = min_bound > 0.0f ? min_bound : FLT_TRUE_MIN;
    int32_t bound_position = (int32_t)(n - 1);
    if (!selecting && min_bound == 0.0f) {
        return walk_mask(p, n, bound, bound_position, tempered, (float)inv_t,
                         (float)log_max, u, s->weights, s->block_sums);
    }

    int64_t count = 0;
    if (selecting) {
        count = select_kept(p, n, total, top_k, top_p, min_bound, s);
    } else {
        find_block_max(p, n, s->block_max);
        count = gather_keys(p, n, min_bound, s->block_max, s->keys);
    }
    if (count <= SMALL_KEPT) {
        return walk_list(p, s->keys, count, tempered ? inv_t : 1.0, log_max, u);
    }
    if (selecting) {
        /* Everything ranked at or before the last kept token is kept. */
        rank_key last = s->keys[0];
        for (int64_t i = 1; i < count; i++) {
            last = s->keys[i] < last ? s->keys[i] : last;
        }
        bound = key_prob(last);
        bound_position = (int32_t)key_position(last);
    }
    return walk_mask(p, n, bound, bound_position, tempered, (float)inv_t, (float)log_max,
                     u, s->weights, s->block_sums);
}

int32_t moe2_sample_token(const float *probs, const int32_t *ids, int64_t n,
                          int64_t n_vocab, double temperature, int32_t top_k,
                          double top_p, double min_p, double u,
                          void *scratch, int64_t scratch_size,
                          int64_t *out_token, moe2_error *error)
{
    clear_error(error);
    if (probs == NULL || out_token == NULL || scratch == NULL) {
        return fail(error, MOE2_ERR_NULL_POINTER, -1, -1, 0.0);
    }
    if (n < 1 || n > INT32_MAX) {
        return fail_length(error, MOE2_ERR_LENGTH, -1, (double)n, 1.0);
    }
    int32_t status = check_scratch(scratch_size, moe2_get_sample_scratch_size(n), error);
    if (status == MOE2_OK) {
        status = check_sample_parameters(temperature, top_k, top_p, min_p, u, error);
    }
    if (status == MOE2_OK && ids != NULL) {
        status = check_sample_ids(ids, n, n_vocab, error);
    }
    if (status != MOE2_OK) {
        return status;
    }

    float largest = 0.0f;
    double total = 0.0;
    int64_t bad = scan_probs(probs, n, &largest, &total);
    if (bad >= 0) {
        int32_t code = is_nonfinite(probs[bad]) ? MOE2_ERR_NOT_FINITE : MOE2_ERR_NEGATIVE;
        return fail(error, code, -1, bad, (double)probs[bad]);
    }
    if (largest == 0.0f) {
        return fail(error, MOE2_ERR_ZERO_MASS, -1, -1, 0.0);
    }

    int64_t position;
    if (temperature == 0.0) {
        position = find_first_equal(probs, n, largest);
    } else {
        sample_scratch s = carve_sample_scratch(scratch, n);
        position = sample_position(probs, n, largest, total, temperature, top_k, top_p,
                                   min_p, u, &s);
    }
    *out_token = ids != NULL ? (int64_t)ids[position] : position;
    return MOE2_OK;
}
