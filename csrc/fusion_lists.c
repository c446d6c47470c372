/* MoE² fusion kernel: sparse fusion of top-m lists with an evenly spread tail. */
#include "fusion_internal.h"

#include <string.h>

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
 * the bits that n_vocab - 1 needs. Returns the array that contains the result:
 * keys or tmp.
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
