/* Row segments through their own Linear weights, for decode steps of several tasks at once:
 * out[r, :] = x[r, :] @ W_s^T (+ b_s) for the rows r of segment s, W_s row-major (N x K) in float32,
 * float16 or bfloat16 (widened to float32 as loaded), x, b and out float32, sums in float32.
 *
 * Built with fold_kernel.c into one library by liedeploy/core/native.py. A decode step feeds a
 * Linear one to a few rows per task; one BLAS call per task at M = 1-5 with the weights out of cache
 * took 1.6-3.3x this kernel's time on a 2-core EPYC (benchmarks/bench_rows.py, float32). Here every
 * segment's weight is streamed once: per block of four
 * weight rows, each 16-float load of W feeds every row of x of the segment (x stays in L1), with one
 * vector accumulator per (row, weight row) pair, summed across lanes at the end. The sum's order is
 * fixed (vector lanes, then the lanes pairwise, then the K % 16 tail), so a row's result does not
 * depend on the other rows, their tasks or the thread count.
 *
 * lie_rows_linear splits (segment, block of 64 output columns) items over OpenMP threads where the
 * build links torch's own OpenMP runtime; elsewhere it runs on the calling thread.
 */
#include <stdint.h>
#include <string.h>

#include "kernel_vec.h"

#define COLS 64 /* output columns per work item */

static inline float hsum(vf v) {
    /* pairwise over the lanes: a fixed order */
    float s[VW];
    memcpy(s, &v, sizeof s);
    for (int w = VW / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) s[l] += s[l + w];
    return s[0];
}

static inline float load1(const void *w, int64_t i, int dt) {
    if (dt == F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    vh v = {0};
    v[0] = h;
    return load_w(&v, 0, dt)[0]; /* the vector conversion, one lane */
}

/* MR rows of x times the four weight rows from row n of W (compile-time MR and DT: the
 * accumulators stay in registers, the loads are specialised to the weight's dtype) */
static inline __attribute__((always_inline)) void tile(const float *x0, int64_t ldx, const void *W, int64_t K,
                                                       int64_t kv, const float *bias, float *o, int64_t ldo,
                                                       int64_t n, const int MR, const int DT) {
    const int64_t w0 = n * K; /* element offsets into W */
    const char *wb = (const char *)W;
    const int es = DT == F32 ? 4 : 2;
    vf acc[4][4];
    memset(acc, 0, sizeof acc);
    for (int64_t k = 0; k < kv; k += VW) {
        vf a = load_w(W, w0 + k, DT), b = load_w(W, w0 + K + k, DT), c = load_w(W, w0 + 2 * K + k, DT),
           d = load_w(W, w0 + 3 * K + k, DT);
        /* the weight rows two tiles ahead (a hint: never faults, also past the weight's end) */
        __builtin_prefetch(wb + es * (w0 + 8 * K + k));
        __builtin_prefetch(wb + es * (w0 + 9 * K + k));
        __builtin_prefetch(wb + es * (w0 + 10 * K + k));
        __builtin_prefetch(wb + es * (w0 + 11 * K + k));
        for (int i = 0; i < MR; i++) {
            vf xv = load_w(x0, i * ldx + k, F32);
            acc[i][0] += xv * a;
            acc[i][1] += xv * b;
            acc[i][2] += xv * c;
            acc[i][3] += xv * d;
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 4; j++) {
            float s = hsum(acc[i][j]);
            for (int64_t k = kv; k < K; k++) s += x0[i * ldx + k] * load1(W, w0 + j * K + k, DT);
            o[i * ldo + n + j] = bias ? s + bias[n + j] : s;
        }
}

/* rows [0, m) of x (ldx apart) times weight rows [n0, n1) of W (K floats each), into out (ldo apart) */
static inline __attribute__((always_inline)) void block(const float *x, int64_t ldx, int64_t m, const void *W,
                                                        int64_t K, const float *bias, float *out, int64_t ldo,
                                                        int64_t n0, int64_t n1, const int DT) {
    const int64_t kv = K / VW * VW;
    for (int64_t r = 0; r < m; r += 4) {
        const int64_t mr = m - r < 4 ? m - r : 4;
        const float *x0 = x + r * ldx;
        float *o = out + r * ldo;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) {
            switch (mr) {
            case 4: tile(x0, ldx, W, K, kv, bias, o, ldo, n, 4, DT); break;
            case 3: tile(x0, ldx, W, K, kv, bias, o, ldo, n, 3, DT); break;
            case 2: tile(x0, ldx, W, K, kv, bias, o, ldo, n, 2, DT); break;
            default: tile(x0, ldx, W, K, kv, bias, o, ldo, n, 1, DT); break;
            }
        }
        for (; n < n1; n++) {
            const int64_t w0 = n * K;
            for (int i = 0; i < mr; i++) {
                vf acc = {0};
                for (int64_t k = 0; k < kv; k += VW) acc += load_w(x0, i * ldx + k, F32) * load_w(W, w0 + k, DT);
                float s = hsum(acc);
                for (int64_t k = kv; k < K; k++) s += x0[i * ldx + k] * load1(W, w0 + k, DT);
                o[i * ldo + n] = bias ? s + bias[n] : s;
            }
        }
    }
}

static void block_any(const float *x, int64_t ldx, int64_t m, const void *W, int64_t K, const float *bias,
                      float *out, int64_t ldo, int64_t n0, int64_t n1, int wdt) {
    if (wdt == F16) block(x, ldx, m, W, K, bias, out, ldo, n0, n1, F16);
    else if (wdt == BF16) block(x, ldx, m, W, K, bias, out, ldo, n0, n1, BF16);
    else block(x, ldx, m, W, K, bias, out, ldo, n0, n1, F32);
}

/* Segment s covers rows [starts[s], starts[s + 1]) of x (R x K) and out (R x N), through weights[s]
 * (N x K, of dtype wdt: 0 float32, 1 float16, 2 bfloat16) and biases[s] (N floats, or NULL). */
void lie_rows_linear(const float *x, float *out, int64_t K, int64_t N, int64_t nseg, const int64_t *starts,
                     const void *const *weights, const float *const *biases, int wdt, int nthreads) {
    const int64_t per = (N + COLS - 1) / COLS, items = nseg * per;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (nthreads > 1)
#endif
    for (int64_t it = 0; it < items; it++) {
        const int64_t s = it / per, n0 = (it % per) * COLS, n1 = n0 + COLS < N ? n0 + COLS : N;
        const int64_t r0 = starts[s], m = starts[s + 1] - r0;
        if (m > 0) block_any(x + r0 * K, K, m, weights[s], K, biases[s], out + r0 * N, N, n0, n1, wdt);
    }
    (void)nthreads;
}
