/* MoE² fusion kernel: sampling with temperature, top-k, top-p and min-p. */
#include "fusion_internal.h"

#include <string.h>

/* Keys of the top-p prefilter histogram: the top 11 bits of a non-negative float. */
#define HISTOGRAM_SHIFT 20
#define HISTOGRAM_SIZE 2048

/* Kept sets up to this size are sorted and walked as a list. */
#define SMALL_KEPT 256

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
                         int tempered, float inv_t, float largest, float log_max, double u,
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
                /* The exact exponent is 0 for p_max and negative below it. The
                 * error of log_approx(), times 1 / T near 0, would give p_max the
                 * weight 0 (or another token more than p_max), so p_max gets 1
                 * exactly and the exponent is clamped at 0. */
                float exponent = (log_approx(x[i]) - log_max) * inv_t;
                float value = x[i] == largest ? 1.0f : exp_approx(exponent < 0.0f ? exponent : 0.0f);
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
        int64_t n_kept = 0;
        for (int64_t i = 0; i < count; i++) {
            s->keys[n_kept] = s->keys[i];
            n_kept += key_prob(s->keys[i]) >= min_bound;
        }
        count = n_kept;
    }
    return count;
}

/* Position of the sampled token, after the inputs have been validated. */
static int64_t sample_position(const float *p, int64_t n, float largest, double total,
                               double temperature, int32_t top_k, double top_p,
                               double min_p, double u, sample_scratch *s)
{
    /* A temperature near 0 must not make 1 / T infinite, because 0 * inf is NaN
     * for the most probable token. */
    double inv_t = fmin(1.0 / temperature, DBL_MAX);
    float inv_t_float = (float)fmin(inv_t, FLT_MAX);
    int tempered = temperature != 1.0;
    double log_max = log((double)largest);
    float min_bound = min_p > 0.0 ? round_up_to_float(min_p * (double)largest) : 0.0f;
    int selecting = (top_k > 0 && top_k < n) || top_p < 1.0;

    /* Without a ranking filter, every token at or above min_p is kept. */
    float bound = min_bound > 0.0f ? min_bound : FLT_TRUE_MIN;
    int32_t bound_position = (int32_t)(n - 1);
    if (!selecting && min_bound == 0.0f) {
        return walk_mask(p, n, bound, bound_position, tempered, inv_t_float, largest,
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
    return walk_mask(p, n, bound, bound_position, tempered, inv_t_float, largest, (float)log_max,
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
