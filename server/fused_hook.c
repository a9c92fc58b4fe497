/* The latent hook fused into one CPU kernel (server/fused_hook.py builds and calls it).
 *
 * For each token t of set g = tok_set[t] (tokens sorted by set), over the set's latents i = ids[j] in
 * order (ids, mul, add: the set's own arrays, set_ids[g], set_mul[g], set_add[g], set_len[g] long):
 *     pre_i = b_enc[i] + x[t] . enc_rows[i];   z_i = pre_i > floor[i] ? pre_i : 0
 *     c = mul[j] z_i + add[j];   out[t] += c dec[i]   (terms with c == 0 skipped)
 * A token's arithmetic depends only on the token and its set: the same dot product (fixed lane
 * order, then a fixed tree) and the same sum order of decoder terms whatever else the call holds,
 * so the kernel is batch-invariant by construction (`dot` and `dot4` are one body with the token
 * count a constant, each token's lanes computed by the same expressions; without -ffast-math the
 * compiler keeps the written order; tests/test_fused_hook.py checks the bits alone and in blocks).
 * A set's tokens are split into work items spread over `threads` OpenMP threads, each item
 * entirely on one thread; within an item the latents go in chunks and the tokens in blocks of
 * `block`, so that an encoder or decoder row read from memory once serves its block from L1 and
 * the item's other blocks from L2. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 64
#ifndef PREFETCH
#define PREFETCH 4
#endif
#ifndef CHUNK
#define CHUNK 32 /* latents whose encoder and decoder rows (2 x 32 x d floats) stay in L2 across token blocks */
#endif
#ifndef ITEM_TOKENS
#define ITEM_TOKENS 64 /* most tokens of one work item: their accumulators (64 x d floats) stay in L2 too */
#endif

/* Dot products of up to NT_MAX tokens with one row, `nt` a compile-time constant in each caller
 * (dot, dot4), so that each token's arithmetic is the same whatever else the call holds: 64 lanes
 * (four 16-float vectors) accumulated in order along the row, a scalar tail, then a fixed tree
 * ((v0 + v1) + (v2 + v3), then halves down to one lane) plus the tail. The row is read once for all
 * the tokens. */
typedef float vf16 __attribute__((vector_size(64)));
#define NT_MAX 4
#ifndef SCREEN_CHUNK
#define SCREEN_CHUNK 64 /* latents the screen passes over before their float32 rows are read (see ra_fused_delta) */
#endif

static inline vf16 load_f(const float *p) {
    vf16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum(vf16 v0, vf16 v1, vf16 v2, vf16 v3, float tail) {
    const vf16 v = (v0 + v1) + (v2 + v3);
    float a[16], h8[8], h4[4];  /* halves added lane by lane (any GCC or clang; the compiler keeps it in registers) */
    memcpy(a, &v, sizeof a);
    for (int l = 0; l < 8; l++) h8[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++) h4[l] = h8[l] + h8[l + 4];
    return ((h4[0] + h4[2]) + (h4[1] + h4[3])) + tail;
}

static inline __attribute__((always_inline)) void dots(const float *const *xs, int nt, const float *restrict r,
                                                       int64_t d, float *out) {
    vf16 acc[NT_MAX][4] = {{{0}}};
    int64_t k = 0;
    for (; k + 64 <= d; k += 64) {
        const vf16 r0 = load_f(r + k), r1 = load_f(r + k + 16), r2 = load_f(r + k + 32), r3 = load_f(r + k + 48);
        for (int t = 0; t < nt; t++) {
            const float *x = xs[t] + k;
            acc[t][0] += load_f(x) * r0;
            acc[t][1] += load_f(x + 16) * r1;
            acc[t][2] += load_f(x + 32) * r2;
            acc[t][3] += load_f(x + 48) * r3;
        }
    }
    for (int t = 0; t < nt; t++) {
        float tail = 0.0f;
        for (int64_t j = k; j < d; j++) tail += xs[t][j] * r[j];
        out[t] = hsum(acc[t][0], acc[t][1], acc[t][2], acc[t][3], tail);
    }
}

/* x . row for one token, and for four tokens at once (the row read once): bit for bit the same per token. */
__attribute__((noinline)) static float dot(const float *x, const float *restrict r, int64_t d) {
    float out;
    dots(&x, 1, r, d, &out);
    return out;
}
__attribute__((noinline)) static void dot4(const float *const *xs, const float *restrict r, int64_t d, float *out) {
    dots(xs, 4, r, d, out);
}
/* The screen's estimate: xq . q for the token quantised to int16 and an int8 row, in int32 (exact:
 * |xq| <= xmax keeps every partial sum below 2^31, see `screen_xmax`), so its order does not matter. */
__attribute__((noinline)) static int32_t dot_q(const int16_t *restrict xq, const int8_t *restrict q, int64_t d) {
    int32_t s = 0;
    for (int64_t k = 0; k < d; k++) s += (int32_t)xq[k] * (int32_t)q[k];
    return s;
}
__attribute__((noinline)) static void dot4_q(const int16_t *restrict x0, const int16_t *restrict x1,
                                             const int16_t *restrict x2, const int16_t *restrict x3,
                                             const int8_t *restrict q, int64_t d, int32_t *out) {
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t k = 0; k < d; k++) {
        const int32_t v = q[k];
        s0 += (int32_t)x0[k] * v;
        s1 += (int32_t)x1[k] * v;
        s2 += (int32_t)x2[k] * v;
        s3 += (int32_t)x3[k] * v;
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

/* The largest |xq| for width d: d * 127 * xmax < 2^31, and at most 2^14 - 1. */
static int32_t screen_xmax(int64_t d) {
    const int64_t cap = (INT64_C(2147483647)) / (127 * (d > 0 ? d : 1));
    return (int32_t)(cap < 16383 ? cap : 16383);
}

/* Quantise token x to int16 (xq = round(x / sx), sx = max|x| / xmax), returning sx and setting *resid to
 * an upper bound on ||x - sx xq|| (in double, 1e-6 added for its rounding); -1 where x has a NaN or inf
 * (the token skips the screen: every latent is computed in full). The caller zeroes the heavy
 * dimensions first: they are computed apart, in double. */
static double quantise_token(const float *x, int64_t d, int32_t xmax, int16_t *xq, double *resid) {
    float mx = 0.0f;
    for (int64_t k = 0; k < d; k++) {
        const float a = fabsf(x[k]);
        if (!(a <= 3.4028234663852886e38f)) return -1.0;
        mx = a > mx ? a : mx;
    }
    if (mx == 0.0f) {
        memset(xq, 0, sizeof(int16_t) * (size_t)d);
        *resid = 0.0;
        return 0.0;
    }
    const double sx = (double)mx / (double)xmax;
    double ss = 0.0;
    for (int64_t k = 0; k < d; k++) {
        double r = nearbyint((double)x[k] / sx);
        r = r > xmax ? xmax : (r < -xmax ? -xmax : r);
        xq[k] = (int16_t)r;
        const double e = (double)x[k] - sx * r;
        ss += e * e;
    }
    *resid = sqrt(ss) * (1.0 + 1e-6);
    return sx;
}

/* A token's numbers for the screen: ||x||, ||x_r|| (x without its heavy dimensions), sx and the
 * residual of x_r's int16 quantisation (quantise_token), and x at the heavy dimensions (in double).
 * tmp: d floats of scratch. sx < 0: x has a NaN or inf. */
static void screen_token(const float *x, int64_t d, int32_t xmax, const int64_t *heavy, int64_t n_heavy,
                         float *tmp, int16_t *xq, double *norm, double *norm_r, double *sx, double *resid, double *xh) {
    memcpy(tmp, x, sizeof(float) * (size_t)d);
    int finite = 1;
    for (int64_t h = 0; h < n_heavy; h++) {
        xh[h] = (double)x[heavy[h]];
        finite &= fabs(xh[h]) <= 3.4028234663852886e38;
        tmp[heavy[h]] = 0.0f;
    }
    double ss = 0.0, ss_r = 0.0;
    for (int64_t k = 0; k < d; k++) {
        ss += (double)x[k] * (double)x[k];
        ss_r += (double)tmp[k] * (double)tmp[k];
    }
    *norm = sqrt(ss) * (1.0 + 1e-6);
    *norm_r = sqrt(ss_r) * (1.0 + 1e-6);
    *sx = finite ? quantise_token(tmp, d, xmax, xq, resid) : -1.0;
}

/* The screen (enc_q != NULL): latent i cannot fire at token t when
 *     s~ + x_h . e_h + ||x|| rounding[i] + ||x_r|| q_err[i] + ||x_r - sx xq|| q_norm[i]
 *         <= room[i] = floor[i] - b_enc[i]
 * Here x_h is the token at the `heavy` dimensions (a residual stream's few massive ones) and x_r the
 * rest; x_h . e_h is computed in double from the float32 row's values there, kept in the latent's meta
 * row. s~ = scale[i] sx (xq . q_i) with q_i the row quantised to int8 with the row's own scale, xq the
 * token's x_r quantised to int16 with its own scale sx; q_err[i] = ||e_i - q~_i||, q_norm[i] = ||q~_i||
 * and rounding[i] bounds the exact dot product's float32 rounding per unit ||x|| (server/fused_hook.py's
 * `screen_bounds` derives the bound). Taking the heavy dimensions apart shrinks the bound from ||x||
 * q_err to ||x_r|| q_err, and ||x|| is mostly the heavy dimensions'. A latent's meta row is 8 doubles,
 * one cache line: [room, q_err, rounding, q_norm, scale, then HEAVY float32 values of the row at the
 * heavy dimensions]. Then the exact pre-activation b + x . row_i is <= floor[i], so z_i = 0 exactly,
 * without reading the float32 row; every other latent is computed exactly, as without the screen:
 * the result is bit-identical, and the encoder bytes read per latent drop to a quarter. The
 * comparison runs in double with a relative margin. */
#define META 8
#define HEAVY 6
int ra_fused_delta(const float *x, int64_t n, int64_t d, const int64_t *rows, const int64_t *tok_set,
                   const int64_t *set_len, const int64_t *const *set_ids, const float *const *set_mul,
                   const float *const *set_add, const int8_t *const *set_q, const float *enc_rows,
                   const float *b_enc, const float *floor_, const float *dec, float *out,
                   int add_input, int64_t block, int threads, const int8_t *enc_q, const double *meta,
                   const int64_t *heavy, int64_t n_heavy, int64_t screen_max_tokens, int64_t *counts) {
    /* Token t is row rows[t] of x and out (t itself when rows is NULL); out's row gets the token's
     * summed terms, plus the token's input when add_input is set (rows no token names are not touched).
     * counts[0] += the (token, latent) pairs that went through the screen, counts[1] += those of them
     * whose pre-activation was computed in full, counts[2] += n (atomic adds: the process's totals).
     *
     * Work items: a set's tokens, split evenly into ceil(T / ITEM_TOKENS) items, or into as many as there
     * are threads (at least `block` tokens each) when that is more, so that a lone prefill uses every
     * thread. Within an item the set's latents go in chunks of CHUNK (SCREEN_CHUNK when screened): a
     * chunk's rows, read from memory once, serve every token block of the item from the cache. Each token
     * still takes its set's latents in order, so the split changes no bit of the result.
     *
     * set_q (may be NULL, as may any set_q[g]): set g's int8 rows, copied in the set's order (row j is
     * latent ids[j]'s), so that the screen reads them as one stream; scattered rows cost about three times
     * the time per byte (the screen is bound by memory: the model's weights pass through the caches
     * between two calls). A set without a copy reads its rows from enc_q. */
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)(2 * n + 1));
    if (starts == NULL) return 1;
    int64_t *screened = starts + n + 1;  /* per item: whether its latents go through the screen */
    int64_t n_items = 0;
    for (int64_t t = 0; t < n;) {
        int64_t end = t;  /* the set's tokens: [t, end) */
        while (end < n && tok_set[end] == tok_set[t]) end++;
        const int64_t T = end - t;
        /* a set with more tokens than that re-reads its rows from the cache: there the screen's extra
         * dot products cost more than the memory they save (benchmarks/hook_cost.py) */
        const int64_t screen = enc_q != NULL && T <= screen_max_tokens;
        int64_t parts = (T + ITEM_TOKENS - 1) / ITEM_TOKENS;
        const int64_t by_threads = (T + block - 1) / block < threads ? (T + block - 1) / block : threads;
        if (by_threads > parts) parts = by_threads;
        for (int64_t p = 0; p < parts; p++) {
            starts[n_items] = t + p * T / parts;
            screened[n_items++] = screen;
        }
        t = end;
    }
    starts[n_items] = n;
    int64_t n_screened = 0, n_exact = 0, failed = 0;
    if (n_heavy > HEAVY) n_heavy = HEAVY;
    if (n_heavy < 0) n_heavy = 0;
    const int32_t xmax = screen_xmax(d);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(+ : n_screened, n_exact, failed)
    for (int64_t item = 0; item < n_items; item++) {
        const int64_t t0 = starts[item], nt = starts[item + 1] - t0, g = tok_set[t0];
        const int64_t lo = 0, hi = set_len[g];  /* the set's latents: ids[lo:hi], with their edits */
        const int64_t *ids = set_ids[g];
        const float *mul = set_mul[g], *add = set_add[g];
        const int8_t *set_rows = set_q != NULL ? set_q[g] : NULL;
        const int screen = (int)screened[item];
        float *acc = calloc((size_t)(nt * d), sizeof(float));  /* the item's summed terms */
        /* per token: ||x||, ||x_r||, sx, ||x_r - sx xq||, then x at the heavy dimensions */
        double *norm = malloc(sizeof(double) * (size_t)((4 + HEAVY) * nt));
        double *norm_r = norm + nt, *sx = norm + 2 * nt, *resid = norm + 3 * nt, *xh = norm + 4 * nt;
        const float **xt = (const float **)malloc(sizeof(float *) * (size_t)nt);
        int16_t *xq = screen ? malloc(sizeof(int16_t) * (size_t)(nt * d)) : NULL;
        float *tmp = screen ? malloc(sizeof(float) * (size_t)d) : NULL;
        unsigned char *fire = screen ? malloc((size_t)(SCREEN_CHUNK * block)) : NULL;
        if (acc == NULL || norm == NULL || xt == NULL || (screen && (xq == NULL || tmp == NULL || fire == NULL))) {
            free(fire);
            free(acc);
            free(norm);
            free(xt);
            free(xq);
            free(tmp);
            failed++;
            continue;
        }
        n_screened += screen * nt * (hi - lo);
        for (int64_t b = 0; b < nt; b++) {
            xt[b] = x + (rows != NULL ? rows[t0 + b] : t0 + b) * d;
            if (screen)
                screen_token(xt[b], d, xmax, heavy, n_heavy, tmp, xq + b * d, norm + b, norm_r + b, sx + b, resid + b,
                             xh + b * HEAVY);
        }
        free(tmp);
        /* Latents in chunks, tokens in blocks. Screened: two passes over each chunk and block; the first
         * screens every pair and asks for the float32 encoder and decoder rows of each latent that one of
         * the block's tokens needs, the second computes those pairs in full and adds every term, latents in
         * order as without the screen. */
        const int64_t chunk = screen ? SCREEN_CHUNK : CHUNK;
        for (int64_t j0 = lo; j0 < hi; j0 += chunk) {
            const int64_t j1 = j0 + chunk < hi ? j0 + chunk : hi;
            for (int64_t b0 = 0; b0 < nt; b0 += block) {
                const int64_t b1 = b0 + block < nt ? b0 + block : nt;
                if (screen) {
                    for (int64_t j = j0; j < j1; j++) {
                        const int64_t i = ids[j];
                        if (b0 == 0 && j + PREFETCH < hi) {  /* a later latent's meta row (and its row, if scattered) */
                            const int64_t ahead = ids[j + PREFETCH];
                            __builtin_prefetch(meta + META * ahead);
                            if (set_rows == NULL)
                                for (int64_t k = 0; k < d; k += 64) __builtin_prefetch(enc_q + ahead * d + k);
                        }
                        /* room, q_err, rounding, q_norm, scale, heavy values */
                        const double *mi = meta + META * i;
                        const float *hv = (const float *)(mi + 5);
                        const int8_t *qi = set_rows != NULL ? set_rows + j * d : enc_q + i * d;
                        unsigned char *fj = fire + (j - j0) * block;  /* fj[b - b0]: token b's pair */
                        int any = 0;
                        for (int64_t b = b0; b < b1; b += NT_MAX) {
                            const int64_t m = b1 - b < NT_MAX ? b1 - b : NT_MAX;
                            int32_t est_dot[NT_MAX];
                            if (m == NT_MAX)
                                dot4_q(xq + b * d, xq + (b + 1) * d, xq + (b + 2) * d, xq + (b + 3) * d, qi, d, est_dot);
                            else
                                for (int64_t u = 0; u < m; u++) est_dot[u] = dot_q(xq + (b + u) * d, qi, d);
                            for (int64_t u = 0; u < m; u++) {
                                int f = sx[b + u] < 0.0;  /* NaN / inf in the token: computed exactly */
                                if (!f) {
                                    double est = mi[4] * sx[b + u] * (double)est_dot[u], habs = 0.0;
                                    for (int64_t h = 0; h < n_heavy; h++) {
                                        const double p = xh[(b + u) * HEAVY + h] * (double)hv[h];
                                        est += p;
                                        habs += fabs(p);
                                    }
                                    const double reach =
                                        est + norm[b + u] * mi[2] + norm_r[b + u] * mi[1] + resid[b + u] * mi[3];
                                    const double margin = 1e-9 * (fabs(est) + habs + fabs(reach) + fabs(mi[0]) + 1e-30);
                                    f = !(reach + margin <= mi[0]);
                                }
                                fj[b - b0 + u] = (unsigned char)f;
                                any |= f;
                            }
                        }
                        if (any)  /* read in the second pass, after this chunk's screen: on the way meanwhile */
                            for (int64_t k = 0; k < d; k += 16) {
                                __builtin_prefetch(enc_rows + i * d + k);
                                __builtin_prefetch(dec + i * d + k);
                            }
                    }
                    for (int64_t j = j0; j < j1; j++) {
                        const int64_t i = ids[j];
                        const float *er = enc_rows + i * d, *dr = dec + i * d;
                        const unsigned char *fj = fire + (j - j0) * block;
                        for (int64_t b = b0; b < b1; b++) {
                            float z = 0.0f;
                            if (fj[b - b0]) {
                                const float pre = b_enc[i] + dot(xt[b], er, d);
                                z = pre > floor_[i] ? pre : 0.0f;
                                n_exact++;
                            }
                            const float c = mul[j] * z + add[j];
                            if (c != 0.0f) {
                                float *a = acc + b * d;
                                for (int64_t k = 0; k < d; k++) a[k] += c * dr[k];
                            }
                        }
                    }
                } else {
                    for (int64_t j = j0; j < j1; j++) {
                        const int64_t i = ids[j];
                        const float *er = enc_rows + i * d, *dr = dec + i * d;
                        if (b0 == 0 && j + PREFETCH < hi) {  /* rows are scattered: ask for a later latent's row now */
                            const int64_t ahead = ids[j + PREFETCH];
                            __builtin_prefetch(b_enc + ahead);
                            __builtin_prefetch(floor_ + ahead);
                            for (int64_t k = 0; k < d; k += 16) __builtin_prefetch(enc_rows + ahead * d + k);
                        }
                        for (int64_t b = b0; b < b1; b += NT_MAX) {  /* NT_MAX tokens at a time: the row read once */
                            const int64_t m = b1 - b < NT_MAX ? b1 - b : NT_MAX;
                            float dots[NT_MAX];
                            if (m == NT_MAX)
                                dot4(xt + b, er, d, dots);
                            else
                                for (int64_t u = 0; u < m; u++) dots[u] = dot(xt[b + u], er, d);
                            for (int64_t u = 0; u < m; u++) {
                                const float pre = b_enc[i] + dots[u];
                                const float z = pre > floor_[i] ? pre : 0.0f;
                                const float c = mul[j] * z + add[j];
                                if (c != 0.0f) {
                                    float *a = acc + (b + u) * d;
                                    for (int64_t k = 0; k < d; k++) a[k] += c * dr[k];
                                }
                            }
                        }
                    }
                }
            }
        }
        for (int64_t b = 0; b < nt; b++) {
            float *o = out + (rows != NULL ? rows[t0 + b] : t0 + b) * d;
            const float *a = acc + b * d;
            if (add_input)
                for (int64_t k = 0; k < d; k++) o[k] = xt[b][k] + a[k];
            else
                for (int64_t k = 0; k < d; k++) o[k] = a[k];
        }
        free(acc);
        free(norm);
        free(xt);
        free(xq);
        free(fire);
    }
    free(starts);
    __atomic_fetch_add(&counts[0], n_screened, __ATOMIC_RELAXED);
    __atomic_fetch_add(&counts[1], n_exact, __ATOMIC_RELAXED);
    __atomic_fetch_add(&counts[2], n, __ATOMIC_RELAXED);
    return failed ? 1 : 0;
}

/* What stays the same across a layer plan's calls (fused_hook.StepKernel fills it once): all fields
 * 8 bytes wide, so that ctypes and C agree on the layout without padding. */
typedef struct {
    const int64_t *row_set;  /* [n_rows]: each row's set at this layer, -1: none */
    int64_t n_rows, n_sets, max_tokens;
    const int64_t *set_len;  /* [n_sets], then each set's ids, mul and add arrays */
    const int64_t *const *set_ids;
    const float *const *set_mul, *const *set_add;
    const int8_t *const *set_q;  /* [n_sets] each set's int8 rows in its order, or NULL (ra_fused_delta) */
    const float *enc_rows, *b_enc, *floor_, *dec;
    const int8_t *enc_q;  /* NULL: no screen */
    const double *meta;
    const int64_t *heavy, *heavy_n;  /* *heavy_n: how many heavy dimensions are in use (< 0: none yet) */
    int64_t screen_max_tokens, block;
    int64_t *counts;
} ra_step_args;

/* One layer call of a packed step, grouping included: token t of x [n, d] belongs to row tok_row[t]
 * (-1 or >= n_rows: no row) and so to set row_set[row] (-1: no op at this layer). out [n, d] gets x,
 * with the tokens of every set that has at most max_tokens tokens here edited (x + terms, as
 * ra_fused_delta with add_input; out may be x itself). Sets with more tokens are left to the caller,
 * their tokens copied unedited. Returns how many sets were left, or -1 when out of memory. Tokens go by
 * set, in token order within a set (what the caller's stable sort gave before): a token's bits do not
 * depend on it. */
int64_t ra_fused_step(float *x, int64_t n, int64_t d, const int64_t *tok_row, float *out, float *residual,
                      int threads, const ra_step_args *a) {
    /* out == x: the stream is edited in place; then residual (if not NULL: vLLM's hidden / residual pair)
     * is first added into x and zeroed, so that x is the stream the next layer reads (x + 0) */
    if (out != x) {
        memcpy(out, x, sizeof(float) * (size_t)(n * d));
    } else if (residual != NULL) {
        for (int64_t k = 0; k < n * d; k++) x[k] += residual[k];
        memset(residual, 0, sizeof(float) * (size_t)(n * d));
    }
    const int64_t n_sets = a->n_sets;
    int64_t *count = calloc((size_t)(n_sets + 1), sizeof(int64_t));
    int64_t *tok_g = malloc(sizeof(int64_t) * (size_t)(n > 0 ? 3 * n : 1));
    if (count == NULL || tok_g == NULL) {
        free(count);
        free(tok_g);
        return -1;
    }
    int64_t *sel = tok_g + n, *sel_set = tok_g + 2 * n;
    for (int64_t t = 0; t < n; t++) {
        const int64_t r = tok_row[t];
        const int64_t g = (r >= 0 && r < a->n_rows) ? a->row_set[r] : -1;
        tok_g[t] = (g >= 0 && g < n_sets) ? g : -1;
        if (tok_g[t] >= 0) count[tok_g[t]]++;
    }
    int64_t m = 0, n_left = 0;
    for (int64_t g = 0; g < n_sets; g++) {  /* start of each taken set's tokens in sel (counting sort) */
        const int64_t c = count[g];
        const int left = c > a->max_tokens;
        n_left += left;
        count[g] = left ? -1 : m;
        m += left ? 0 : c;
    }
    for (int64_t t = 0; t < n; t++) {
        const int64_t g = tok_g[t];
        if (g >= 0 && count[g] >= 0) {
            sel[count[g]] = t;
            sel_set[count[g]++] = g;
        }
    }
    const int64_t n_heavy = a->enc_q != NULL && *a->heavy_n > 0 ? *a->heavy_n : 0;
    const int rc = m == 0 ? 0
                          : ra_fused_delta(x, m, d, sel, sel_set, a->set_len, a->set_ids, a->set_mul, a->set_add, a->set_q,
                                           a->enc_rows, a->b_enc, a->floor_, a->dec, out, 1, a->block, threads,
                                           a->enc_q, a->meta,
                                           a->heavy, n_heavy, a->screen_max_tokens, a->counts);
    free(count);
    free(tok_g);
    return rc ? -1 : n_left;
}
