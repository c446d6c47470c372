/* MoE² fusion kernel: dense fusion from log-probabilities and from probabilities. */
#include "fusion_internal.h"

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

    /* Clamped so that a temperature near 0 gives no infinite 1 / T, because
     * 0 * inf is NaN for each row's maximum. */
    float inv_t = (float)fmin(1.0 / temperature, FLT_MAX);
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
