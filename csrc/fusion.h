/*
 * MoE² fusion and sampling kernel.
 *
 * Fuses the next-token distributions of k experts into one distribution,
 * F = sum_n w_n f_n with the weights renormalized to sum 1, and samples a token
 * from it. Every function validates its inputs, returns a status code and, when
 * `error` is not NULL, stores which value failed. No function keeps global state
 * or writes outside the buffers it is given, so all of them are thread-safe as long
 * as threads do not share output or scratch buffers. No function allocates
 * memory: the caller passes scratch buffers of the sizes the moe2_get_*_size
 * functions return.
 *
 * The text between the cdef markers is also the cffi declaration of the module, so
 * it must stay plain C declarations: no preprocessor directives, no macros.
 */
#ifndef MOE2_FUSION_H
#define MOE2_FUSION_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef begin */

/* Status codes returned by every function. */
enum {
    MOE2_OK = 0,
    MOE2_ERR_NULL_POINTER = 1,  /* a required pointer is NULL */
    MOE2_ERR_LENGTH = 2,        /* a length is out of range or disagrees with another */
    MOE2_ERR_NOT_FINITE = 3,    /* NaN or infinity in an input array */
    MOE2_ERR_WEIGHT = 4,        /* a weight is negative or not finite */
    MOE2_ERR_ZERO_WEIGHTS = 5,  /* all weights are zero */
    MOE2_ERR_ID_RANGE = 6,      /* a token id is negative or >= n_vocab */
    MOE2_ERR_ID_DUPLICATE = 7,  /* an expert lists a token id twice, or ids are not ascending */
    MOE2_ERR_TAIL = 8,          /* a tail mass is negative, above 1 or not finite */
    MOE2_ERR_PARAMETER = 9,     /* temperature, top_k, top_p, min_p or u is out of range */
    MOE2_ERR_NEGATIVE = 10,     /* a probability is negative */
    MOE2_ERR_ZERO_MASS = 11,    /* a distribution has no probability mass */
    MOE2_ERR_SCRATCH = 12       /* a scratch or output buffer is too small */
};

/* Which parameter failed, stored in moe2_error.parameter for MOE2_ERR_PARAMETER. */
enum {
    MOE2_PARAM_NONE = 0,
    MOE2_PARAM_TEMPERATURE = 1,
    MOE2_PARAM_TOP_K = 2,
    MOE2_PARAM_TOP_P = 3,
    MOE2_PARAM_MIN_P = 4,
    MOE2_PARAM_U = 5
};

/*
 * Details of a failure. `expert` is the expert (row or list) index and `index` the
 * element index within that expert's array, each -1 when it does not apply.
 * `value` is the offending value; for MOE2_ERR_LENGTH and MOE2_ERR_SCRATCH it is the
 * length that was given and `limit` the length that was required or allowed.
 */
typedef struct moe2_error {
    int32_t status;
    int32_t expert;
    int64_t index;
    int32_t parameter;
    double value;
    double limit;
} moe2_error;

/*
 * Bytes of scratch that moe2_fuse_logprobs needs for k rows of n elements (about
 * 4 k n); -1 when k or n is out of range.
 */
int64_t moe2_get_logprobs_scratch_size(int32_t k, int64_t n);

/*
 * Fuse k dense rows of log-probabilities (or logits) of length n:
 *     out[i] = sum_n w_n softmax(rows[n] / temperature)[i],  w renormalized to sum 1.
 * The softmax subtracts each row's maximum and sums in double. Every row is checked
 * for NaN and infinity, including rows whose weight is 0. temperature must be finite
 * and > 0. out has n elements and may not overlap the rows.
 * Accuracy, estimated from the error terms: relative error per element up to about
 * 2.5e-6 for probabilities above 1e-9 and 6.5e-6 near 1e-38. The main terms are the
 * float rounding of (x - max) / temperature, the exp approximation (1.5e-7) and the
 * float partial sums of the normalizer (1e-6). Elements with
 * (x - max) / temperature < -87 give 0 (absolute error below 1.7e-38). The tests
 * check a relative error of 1e-5.
 */
int32_t moe2_fuse_logprobs(const float *const *rows, int32_t k, int64_t n,
                           const double *weights, double temperature, float *out,
                           void *scratch, int64_t scratch_size, moe2_error *error);

/*
 * Bytes of scratch that moe2_fuse_probs needs for k rows of n elements (about
 * 8 n); -1 when k or n is out of range.
 */
int64_t moe2_get_probs_scratch_size(int32_t k, int64_t n);

/*
 * Fuse k dense rows of probabilities of length n:
 *     out[i] = sum_n w_n rows[n][i] / sum_j rows[n][j],  w renormalized to sum 1.
 * Probabilities must be finite and >= 0, and every row must have positive mass.
 */
int32_t moe2_fuse_probs(const float *const *rows, int32_t k, int64_t n,
                        const double *weights, float *out, void *scratch,
                        int64_t scratch_size, moe2_error *error);

/*
 * Bytes of scratch that moe2_fuse_lists needs for k experts that list n_listed
 * entries in total (the sum of counts); -1 when k or n_listed is out of range.
 */
int64_t moe2_get_lists_scratch_size(int32_t k, int64_t n_listed);

/*
 * Fuse k sparse top-m lists over a vocabulary of n_vocab tokens.
 *
 * Expert n lists counts[n] token ids with their log-probabilities; the lists are
 * stored back to back in `ids` and `logprobs`. tails[n] is the probability mass of
 * the n_vocab - counts[n] tokens that expert n did not list, and is spread evenly
 * over them. Each expert is renormalized so that its listed probabilities plus its
 * tail sum to 1. When an expert lists every token, its tail has nowhere to go and is
 * ignored, so lists that cover the vocabulary give the dense fusion of the same
 * log-probabilities.
 *
 * Output: the union of all listed ids in ascending order (out_ids), the fused
 * probability of each (out_probs) and their number (*out_count). *out_tail is the
 * fused mass of all other tokens, spread evenly over them, so each of them has
 * probability *out_tail / (n_vocab - *out_count). The outputs need room for
 * min(n_listed, n_vocab) entries (`capacity`), and scratch needs
 * moe2_get_lists_scratch_size(k, n_listed) bytes.
 *
 * Error bound against the fusion of the experts' full distributions, when each tail
 * is the exact mass of the unlisted tokens: at most sum_n w_n tails[n] per token and
 * 2 sum_n w_n tails[n] in total (L1), plus rounding.
 */
int32_t moe2_fuse_lists(const int32_t *ids, const float *logprobs,
                        const int32_t *counts, const double *tails, int32_t k,
                        int64_t n_vocab, const double *weights,
                        int32_t *out_ids, float *out_probs, int64_t capacity,
                        int64_t *out_count, double *out_tail,
                        void *scratch, int64_t scratch_size, moe2_error *error);

/* Bytes of scratch that moe2_sample_token needs for n probabilities; -1 when n < 0. */
int64_t moe2_get_sample_scratch_size(int64_t n);

/*
 * Sample a token from n probabilities (they need not sum to 1).
 *
 * ids: NULL for a dense distribution (the token at position i is i), or n token ids
 * in strictly ascending order, each in [0, n_vocab), for a sparse one. Only listed
 * tokens can be sampled. For a dense distribution n_vocab is ignored.
 *
 * temperature == 0 returns the most probable token. Otherwise the filters run in
 * llama.cpp's order on the tokens ordered by probability (descending, ties by
 * ascending id), and each keeps a prefix of that order: top_k keeps at most top_k
 * tokens (0: off); top_p then keeps the shortest prefix whose mass reaches top_p
 * times the mass of the tokens top_k kept (1: off); min_p then keeps the tokens with
 * probability >= min_p times the maximum (0: off). The kept tokens are weighted by
 * (p / p_max)^(1 / temperature), and the result is the first kept token, in
 * ascending id order, at which the cumulative weight exceeds u times the total
 * weight. Tokens of probability 0 are never returned. Ties resolve to the lowest id.
 *
 * Ranges: temperature finite and >= 0, top_k >= 0, 0 < top_p <= 1,
 * 0 <= min_p <= 1, 0 <= u < 1. scratch has at least
 * moe2_get_sample_scratch_size(n) bytes.
 */
int32_t moe2_sample_token(const float *probs, const int32_t *ids, int64_t n,
                          int64_t n_vocab, double temperature, int32_t top_k,
                          double top_p, double min_p, double u,
                          void *scratch, int64_t scratch_size,
                          int64_t *out_token, moe2_error *error);

/* Compute exp(x) with the kernel's approximation, for tests: n floats, in place. */
void moe2_compute_exp(float *values, int64_t n);

/* Compute ln(x) with the sampler's approximation, for tests: n floats > 0, in place. */
void moe2_compute_log(float *values, int64_t n);

/* cdef end */

#ifdef __cplusplus
}
#endif

#endif /* MOE2_FUSION_H */
