/* The latent hook fused into one CPU kernel (server/fused_hook.py builds and calls it).
 *
 * For each token t of set g = tok_set[t] (tokens sorted by set), over the set's latents i in order:
 *     pre_i = b_enc[i] + x[t] . enc_rows[i];   z_i = pre_i > floor[i] ? pre_i : 0
 *     c = mul[j] z_i + add[j];   out[t] += c dec[i]   (terms with c == 0 skipped)
 * A token's arithmetic depends only on the token and its set: the same dot product (fixed lane
 * order, then a fixed tree) and the same sum order of decoder terms whatever else the call holds,
 * so the kernel is batch-invariant by construction (`dot` is one out-of-line function, and without
 * -ffast-math the compiler keeps the written order). Tokens of one set are taken in blocks of
 * `block`, so an encoder or decoder row read once serves the block from the L1 cache; blocks are
 * spread over `threads` OpenMP threads, each block entirely on one thread. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 64
#ifndef PREFETCH
#define PREFETCH 4
#endif

__attribute__((noinline)) static float dot(const float *restrict a, const float *restrict b, int64_t d) {
    float acc[LANES] = {0};
    int64_t k = 0;
    for (; k + LANES <= d; k += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[k + l] * b[k + l];
    float tail = 0.0f;
    for (; k < d; k++) tail += a[k] * b[k];
    for (int w = LANES / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0] + tail;
}

/* x . q for an int8 row q (exact in float32), as `dot`: the screen's estimate is this times the row's scale. */
__attribute__((noinline)) static float dot_i8(const float *restrict a, const int8_t *restrict q, int64_t d) {
    float acc[LANES] = {0};
    int64_t k = 0;
    for (; k + LANES <= d; k += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[k + l] * (float)q[k + l];
    float tail = 0.0f;
    for (; k < d; k++) tail += a[k] * (float)q[k];
    for (int w = LANES / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0] + tail;
}

/* The screen (enc_q != NULL): latent i cannot fire at token t when
 *     s~ + ||x|| slack[i] <= floor[i] - b_enc[i]
 * where s~ = scale[i] (x . q_i), q_i the row quantised to int8 with the row's own scale, and slack[i]
 * bounds |x . row_i - s~| / ||x|| (the quantisation of the row plus both dot products' float32
 * rounding; server/fused_hook.py derives it). Then the exact
 * pre-activation b + x . row_i is <= floor[i], so z_i = 0 exactly, without reading the float32 row;
 * every other latent is computed exactly, as without the screen: the result is bit-identical, and
 * the encoder bytes read per latent drop to a quarter. The comparison runs in double with a relative margin. */
int ra_fused_delta(const float *x, int64_t n, int64_t d, const int64_t *rows, const int64_t *tok_set,
                   const int64_t *offsets, const int64_t *ids, const float *mul, const float *add,
                   const float *enc_rows, const float *b_enc, const float *floor_, const float *dec, float *out,
                   int add_input, int64_t block, int threads, const int8_t *enc_q, const float *q_scale,
                   const double *slack, int64_t screen_max_tokens, int64_t *counts) {
    /* Token t is row rows[t] of x and out (t itself when rows is NULL); out's row gets the token's
     * summed terms, plus the token's input when add_input is set (rows no token names are not touched).
     * counts[0] += the (token, latent) pairs that went through the screen, counts[1] += those of them
     * whose pre-activation was computed in full. */
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)(2 * n + 1));
    if (starts == NULL) return 1;
    int64_t *screened = starts + n + 1;  /* per item: whether its latents go through the screen */
    int64_t n_items = 0;
    for (int64_t t = 0; t < n;) {  /* runs of up to `block` consecutive tokens of one set */
        int64_t end = t;  /* the set's tokens: [t, end) */
        while (end < n && tok_set[end] == tok_set[t]) end++;
        /* a set with more tokens than that re-reads its rows from the cache: there the screen's extra
         * dot products cost more than the memory they save (benchmarks/hook_cost.py) */
        const int64_t screen = enc_q != NULL && end - t <= screen_max_tokens;
        for (int64_t b = t; b < end; b += block) {
            starts[n_items] = b;
            screened[n_items++] = screen;
        }
        t = end;
    }
    starts[n_items] = n;
    int64_t n_screened = 0, n_exact = 0, failed = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(+ : n_screened, n_exact, failed)
    for (int64_t item = 0; item < n_items; item++) {
        const int64_t t0 = starts[item], nb = starts[item + 1] - t0, g = tok_set[t0];
        const int screen = (int)screened[item];
        float *acc = calloc((size_t)(nb * d), sizeof(float));  /* the block's summed terms */
        double norm[nb];
        const float *xt[nb];
        if (acc == NULL) {
            failed++;
            continue;
        }
        n_screened += screen * nb * (offsets[g + 1] - offsets[g]);
        for (int64_t b = 0; b < nb; b++) {
            xt[b] = x + (rows != NULL ? rows[t0 + b] : t0 + b) * d;
            double ss = 0.0;
            for (int64_t k = 0; k < d; k++) ss += (double)xt[b][k] * (double)xt[b][k];
            norm[b] = sqrt(ss);
        }
        for (int64_t j = offsets[g]; j < offsets[g + 1]; j++) {
            const int64_t i = ids[j];
            const float *er = enc_rows + i * d, *dr = dec + i * d;
            if (j + PREFETCH < offsets[g + 1]) {  /* rows are scattered: ask for a later latent's row now */
                const int64_t ahead = ids[j + PREFETCH];
                if (screen)
                    for (int64_t k = 0; k < d; k += 64) __builtin_prefetch(enc_q + ahead * d + k);
                else
                    for (int64_t k = 0; k < d; k += 16) __builtin_prefetch(enc_rows + ahead * d + k);
            }
            const double room = (double)floor_[i] - (double)b_enc[i];
            for (int64_t b = 0; b < nb; b++) {
                float z = 0.0f;
                int fires = 1;
                if (screen) {
                    const double est = (double)(q_scale[i] * dot_i8(xt[b], enc_q + i * d, d));
                    const double reach = est + norm[b] * slack[i];
                    const double margin = 1e-9 * (fabs(est) + fabs(reach) + fabs(room) + 1e-30);
                    fires = !(reach + margin <= room);  /* NaN / inf: not decided, computed exactly */
                }
                if (fires) {
                    const float pre = b_enc[i] + dot(xt[b], er, d);
                    z = pre > floor_[i] ? pre : 0.0f;
                    n_exact += screen;
                }
                const float c = mul[j] * z + add[j];
                if (c != 0.0f) {
                    float *a = acc + b * d;
                    for (int64_t k = 0; k < d; k++) a[k] += c * dr[k];
                }
            }
        }
        for (int64_t b = 0; b < nb; b++) {
            float *o = out + (rows != NULL ? rows[t0 + b] : t0 + b) * d;
            const float *a = acc + b * d;
            if (add_input)
                for (int64_t k = 0; k < d; k++) o[k] = xt[b][k] + a[k];
            else
                for (int64_t k = 0; k < d; k++) o[k] = a[k];
        }
        free(acc);
    }
    free(starts);
    counts[0] += n_screened;
    counts[1] += n_exact;
    return failed ? 1 : 0;
}
