/* The fused fold on CPU: out = round(W * map(B @ A)), one pass over W, no full-size intermediate.
 *
 * Built at first use by liedeploy/core/native.py with the machine's C compiler (-O3 -march=native)
 * and loaded with ctypes. lie_fold_all splits the rows over OpenMP threads where the build links
 * torch's own OpenMP runtime; elsewhere native.py calls lie_fold_rows on disjoint row ranges from
 * Python threads (ctypes releases the GIL). Written with GCC/Clang vector extensions (no
 * intrinsics): the same source vectorizes for AVX-512, AVX2, SSE and NEON.
 *
 * Per tile of 64 columns of one row: the rank-R product in registers (R fused multiply-adds per
 * element, B already scaled and every adapter's factors concatenated along R), the map (exp, or
 * 1 + x), the multiply by W widened to float32, the rounding to the output dtype (float32, float16
 * or bfloat16, round to nearest even), and a flag for any non-finite result.
 *
 * exp is Cephes' expf (about 1 ulp): n = round(x log2 e), r = x - n ln 2 in two parts, a degree-7
 * polynomial, times 2^n applied as two powers of two, so that overflow gives inf and underflow
 * gives subnormals and zero as IEEE exp does; NaN stays NaN. Rows whose every |dW| is provably at
 * most 1/8 (from |B| and max|A|, the usual case for a fine-tuned task) take a degree-6 Taylor
 * polynomial instead, as accurate there and a third of the work.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_vec.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define TILE (4 * VW)

/* Outputs of at least this many bytes per call, written out of place, go around the cache
 * (non-temporal stores where the machine has them): a fold's output is larger than the cache and
 * is not read back by the fold, so a plain store would first read every output line from memory
 * (a third more memory traffic). 14-20% off a task's packed fold on bench_serve's model. */
#define STREAM_BYTES (1 << 20)

/* Store 32 bytes at p bypassing the cache where p is aligned for it; returns 0 where it did not. */
static inline int stream32(void *p, const void *v) {
#if defined(__AVX__)
    if (((uintptr_t)p & 31) == 0) {
        __m256i x;
        memcpy(&x, v, 32);
        _mm256_stream_si256((__m256i *)p, x);
        return 1;
    }
#endif
    (void)p;
    (void)v;
    return 0;
}

/* Store 64 bytes likewise (two 32-byte stores without AVX-512: both or neither, p being aligned). */
static inline int stream64(void *p, const void *v) {
#if defined(__AVX512F__)
    if (((uintptr_t)p & 63) == 0) {
        __m512 x;
        memcpy(&x, v, 64);
        _mm512_stream_ps((float *)p, x);
        return 1;
    }
    return 0;
#else
    return stream32(p, v) && stream32((char *)p + 32, (const char *)v + 32);
#endif
}

/* Make this thread's non-temporal stores visible to others (before it reports its part done). */
static inline void stream_fence(void) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_sfence();
#endif
}

static inline vf vexp(vf x) {
    /* NaN needs no test: it fails both clamps and propagates through the polynomial */
    vf xc = sel(x > splat(100.0f), splat(100.0f), x);
    xc = sel(xc < splat(-110.0f), splat(-110.0f), xc);
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf t = xc * 1.44269504088896341f + magic;
    vf n = t - magic;
    vi ni = (vi)t - 0x4b400000; /* the integer n, read from t's low bits (no float -> int conversion) */
    vf r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf z = r * r;
    vf y = splat(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    vi n1 = ni >> 1, n2 = ni - n1;
    vf s1 = (vf)((n1 + 127) << 23), s2 = (vf)((n2 + 127) << 23);
    return (y * s1) * s2;
}

/* exp on |x| <= 1/8 (a bound the caller proved from the factors): Taylor to degree 6 in Horner form,
 * truncation below 1e-10 relative, so the float32 evaluation's own rounding (about 1 ulp) dominates.
 * 6 operations instead of about 20 for the range-reduced exp. */
#define SMALL_EXP_BOUND 0.125f
static inline vf vexp_small(vf x) {
    vf y = splat(1.0f / 720.0f);
    y = y * x + 1.0f / 120.0f;
    y = y * x + 1.0f / 24.0f;
    y = y * x + 1.0f / 6.0f;
    y = y * x + 0.5f;
    y = y * x + 1.0f;
    return y * x + 1.0f;
}

enum { MAP_FIRST_ORDER = 0, MAP_EXP = 1, MAP_EXP_SMALL = 2 };

static inline vf vmap(vf x, int map) {
    if (map == MAP_EXP) return vexp(x);
    if (map == MAP_EXP_SMALL) return vexp_small(x);
    return x + 1.0f;
}

static int esize(int dt) { return dt == F32 ? 4 : 2; }

/* Store one vector of results (around the cache where nt); returns a mask of the non-finite ones. */
static inline vi store_out(void *o, int64_t i, vf v, int dt, int nt) {
    if (dt == F32) {
        if (!(nt && stream64((float *)o + i, &v))) memcpy((float *)o + i, &v, sizeof v);
        return (vi)(((vu)v & 0x7fffffffu) >= 0x7f800000u);
    }
    vh h = dt == F16 ? to_f16(v) : to_bf16(v);
    if (!(nt && stream32((uint16_t *)o + i, &h))) memcpy((uint16_t *)o + i, &h, sizeof h);
    vu hu = __builtin_convertvector(h, vu);
    uint32_t em = dt == F16 ? 0x7c00u : 0x7f80u;
    return (vi)((hu & em) == em);
}

/* rows (<= 8) rows of nv (<= 4) vectors: out = W * map(b rows @ a), rows n apart, a's rows lda apart.
 * With pf, the same tile of W at element offset pf is prefetched (the blocked fold's next block). */
static inline __attribute__((always_inline)) vi tile_rows(const float *b0, int64_t R, const float *a, int64_t lda,
                                                          const void *w, void *o, int64_t off, int64_t n, int wdt,
                                                          int odt, int map, int nv, int rows, int nt, int64_t pf) {
    if (pf >= 0)
        for (int q = 0; q < rows; q++)
            for (int v = 0; v < nv; v++)
                __builtin_prefetch((const char *)w + (size_t)(pf + q * n + v * VW) * esize(wdt));
    vf acc[8][4];
    for (int q = 0; q < 8; q++)
        for (int v = 0; v < 4; v++) acc[q][v] = splat(0.0f);
    for (int64_t k = 0; k < R; k++) {
        const float *ak = a + k * lda;
        vf av[4];
        for (int v = 0; v < nv; v++) memcpy(&av[v], ak + v * VW, sizeof av[v]);
        for (int q = 0; q < rows; q++) {
            vf c = splat(b0[q * R + k]);
            for (int v = 0; v < nv; v++) acc[q][v] += c * av[v];
        }
    }
    vi bad = (vi)splatu(0);
    for (int q = 0; q < rows; q++)
        for (int v = 0; v < nv; v++) {
            int64_t at = off + q * n + v * VW;
            bad |= store_out(o, at, load_w(w, at, wdt) * vmap(acc[q][v], map), odt, nt);
        }
    return bad;
}

/* One row of a 64-column tile, and four rows at once (each load of A feeds four rows' accumulators:
 * 16 of the 32 vector registers). */
static inline vi tile(const float *brow, const float *a, int64_t lda, int64_t R, const void *w,
                      void *o, int64_t off, int wdt, int odt, int map, int nt) {
    return tile_rows(brow, R, a, lda, w, o, off, 0, wdt, odt, map, 4, 1, nt, -1);
}

static inline vi tile4(const float *b0, int64_t R, const float *a, int64_t lda, const void *w, void *o,
                       int64_t off, int64_t n, int wdt, int odt, int map, int nt) {
    return tile_rows(b0, R, a, lda, w, o, off, n, wdt, odt, map, 4, 4, nt, -1);
}


/* The last n % 64 columns of a row: W's tail into a zero-padded tile, folded with A's zero-padded
 * tail columns, the valid part copied out. Returns 1 if a valid result is non-finite (a padded
 * lane may be NaN where B is infinite while the valid ones are exp(-inf) = 0: they are not read). */
static int tail_row(const float *brow, int64_t R, const float *tail_a, const void *w, void *out, int64_t base,
                    int64_t rest, int wdt, int odt, int map) {
    unsigned char wt[TILE * 4], ot[TILE * 4];
    memset(wt, 0, sizeof wt);
    memcpy(wt, (const unsigned char *)w + (size_t)base * esize(wdt), (size_t)rest * esize(wdt));
    (void)tile(brow, tail_a, TILE, R, wt, ot, 0, wdt, odt, map, 0);
    int bad = 0;
    for (int64_t c = 0; c < rest; c++) {
        if (odt == F32) {
            uint32_t u; memcpy(&u, ot + 4 * c, 4);
            bad |= (u & 0x7fffffffu) >= 0x7f800000u;
        } else {
            uint16_t h; memcpy(&h, ot + 2 * c, 2);
            uint16_t em = odt == F16 ? 0x7c00u : 0x7f80u;
            bad |= (h & em) == em;
        }
    }
    memcpy((unsigned char *)out + (size_t)base * esize(odt), ot, (size_t)rest * esize(odt));
    return bad;
}

/* max_j |a[j]| over n floats; +inf if any is NaN or inf. */
static float absmax(const float *a, int64_t n) {
    vf m = splat(0.0f);
    vi odd = (vi)splatu(0);
    int64_t j = 0;
    for (; j + VW <= n; j += VW) {
        vf v;
        memcpy(&v, a + j, sizeof v);
        vf av = (vf)((vu)v & 0x7fffffffu);
        odd |= (vi)((vu)av >= 0x7f800000u);
        m = sel(av > m, av, m);
    }
    float r = 0.0f;
    for (int l = 0; l < VW; l++) {
        if (odd[l]) return __builtin_inff();
        r = m[l] > r ? m[l] : r;
    }
    for (; j < n; j++) {
        float v = a[j] < 0 ? -a[j] : a[j];
        if (!(v < __builtin_inff())) return __builtin_inff();
        r = v > r ? v : r;
    }
    return r;
}

/* The map for a group of rows: the short exp where every |(B @ A)_ij| of those rows is provably
 * <= 1/8 (|sum_k b_ik a_kj| <= sum_k |b_ik| max_j |a_kj|), the full exp otherwise. */
static int row_map(const float *b, int64_t R, int64_t rows, const float *amax, int exact) {
    if (!exact || amax == 0) return exact ? MAP_EXP : MAP_FIRST_ORDER;
    for (int64_t q = 0; q < rows; q++) {
        float bound = 0.0f;
        for (int64_t k = 0; k < R; k++) {
            float bk = b[q * R + k];
            bound += (bk < 0 ? -bk : bk) * amax[k];
        }
        if (!(bound * 1.0001f <= SMALL_EXP_BOUND)) return MAP_EXP;  /* NaN goes here too */
    }
    return MAP_EXP_SMALL;
}

/* Rows [r0, r1) of out (m x n, row-major) = round(W * map(B @ A)); B is m x R, A is R x n, both
 * float32 row-major; W and out row-major in their dtypes (out may be W itself). Rows go four at a
 * time through full tiles of 64 columns; the last n % 64 columns go through a zero-padded copy of
 * A's tail columns, built once per call (R <= 64).
 * Returns 1 if any result is non-finite, 0 if none, -1 if R is too large for the tail copy. */
int lie_fold_rows(const void *w, int wdt, void *out, int odt, const float *b, const float *a,
                  int64_t n, int64_t R, int64_t r0, int64_t r1, int exact) {
    int64_t full = n - n % TILE, rest = n - full;
    int nt = out != w && (r1 - r0) * n * esize(odt) >= STREAM_BYTES;
    float amax_buf[256];
    const float *amax = 0;
    if (exact && R <= 256) {
        for (int64_t k = 0; k < R; k++) amax_buf[k] = absmax(a + k * n, n);
        amax = amax_buf;
    }
    float tail_a[64 * TILE];
    vi bad = (vi)splatu(0);
    int tail_bad = 0;
    if (rest > 0) {
        if (R > 64) return -1;
        memset(tail_a, 0, sizeof(float) * (size_t)(R * TILE));
        for (int64_t k = 0; k < R; k++)
            memcpy(tail_a + k * TILE, a + k * n + full, sizeof(float) * (size_t)rest);
    }
    /* A's full tiles, each copied once into a contiguous R x 64 panel: read in place, a tile's R rows
     * of A lie n floats apart, and for many n they fall in the same few L1 sets and evict each other
     * (1.4-1.8x slower at rank 16-32). Not worth it for fewer than four rows. */
    float *panels = 0;
    if (r1 - r0 >= 4 && full > 0) {
        panels = (float *)aligned_alloc(64, sizeof(float) * (size_t)(R * full));  /* a multiple of 64 bytes */
        for (int64_t j = 0; panels && j < full; j += TILE)
            for (int64_t k = 0; k < R; k++) memcpy(panels + j * R + k * TILE, a + k * n + j, sizeof(float) * TILE);
    }
    int64_t i = r0;
    for (; i + 4 <= r1; i += 4) {
        int map = row_map(b + i * R, R, 4, amax, exact);
        /* float32 with the short exp (the usual case): a copy of its own, with no per-vector dispatch */
        if (panels && wdt == F32 && odt == F32 && map == MAP_EXP_SMALL)
            for (int64_t j = 0; j < full; j += TILE)
                bad |= tile4(b + i * R, R, panels + j * R, TILE, w, out, i * n + j, n, F32, F32, MAP_EXP_SMALL, nt);
        else
            for (int64_t j = 0; j < full; j += TILE)
                bad |= panels ? tile4(b + i * R, R, panels + j * R, TILE, w, out, i * n + j, n, wdt, odt, map, nt)
                              : tile4(b + i * R, R, a + j, n, w, out, i * n + j, n, wdt, odt, map, nt);
        for (int64_t q = i; rest > 0 && q < i + 4; q++)
            tail_bad |= tail_row(b + q * R, R, tail_a, w, out, q * n + full, rest, wdt, odt, map);
    }
    for (; i < r1; i++) {
        int map = row_map(b + i * R, R, 1, amax, exact);
        for (int64_t j = 0; j < full; j += TILE)
            bad |= tile(b + i * R, a + j, n, R, w, out, i * n + j, wdt, odt, map, nt);
        if (rest > 0)
            tail_bad |= tail_row(b + i * R, R, tail_a, w, out, i * n + full, rest, wdt, odt, map);
    }
    free(panels);
    if (nt) stream_fence();
    int any = tail_bad;
    for (int l = 0; l < VW; l++) any |= bad[l] != 0;
    return any;
}

/* Whether this build splits rows over OpenMP threads (built with -fopenmp against the OpenMP
 * runtime torch already loaded, so the fold runs on torch's own thread team). */
int lie_fold_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* All m rows, split into nthreads ranges of whole groups of four rows (OpenMP builds; otherwise one
 * range on the calling thread). Returns as lie_fold_rows does. */
int lie_fold_all(const void *w, int wdt, void *out, int odt, const float *b, const float *a, int64_t n,
                 int64_t R, int64_t m, int exact, int nthreads) {
    if (n % TILE && R > 64) return -1; /* as lie_fold_rows would for every range */
#ifdef _OPENMP
    if (nthreads > 1) {
        int64_t step = (m + nthreads - 1) / nthreads;
        step = (step + 3) / 4 * 4;
        int res = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : res)
        for (int t = 0; t < nthreads; t++) {
            int64_t r0 = t * step, r1 = r0 + step < m ? r0 + step : m;
            if (r0 < r1) res |= lie_fold_rows(w, wdt, out, odt, b, a, n, R, r0, r1, exact);
        }
        return res;
    }
#endif
    (void)nthreads;
    return lie_fold_rows(w, wdt, out, odt, b, a, n, R, 0, m, exact);
}

/* -- folds written straight into a blocked layout ---------------------------------------------
 * oneDNN's convolution weights in the layouts "Acdb{blk}a" (blk = 16, 32, 48 or 64: the output
 * channels in blocks of blk, innermost; per block the columns in (kh, kw, in) order) are, block by
 * block, a row-major (columns x blk) matrix whose rows are the dense weight's columns. A fold there
 * is the fold of the transposed problem: out[ob][c][o] = round(W[ob][c][o] * map(sum_k A[k][col(c)] B[ob blk + o][k]))
 * with the same products in the same order as the dense fold. Padded output channels hold W = 0
 * and fold to 0. */

/* The map for rows [c, c + g) of an item: the short exp where each row's bound (precomputed) is
 * at most 1/8, the full exp otherwise (NaN bounds go there too). */
static inline int group_map(const float *bound, int64_t g, int exact) {
    if (!exact) return MAP_FIRST_ORDER;
    for (int64_t q = 0; q < g; q++)
        if (!(bound[q] * 1.0001f <= SMALL_EXP_BOUND)) return MAP_EXP;
    return MAP_EXP_SMALL;
}

/* One output block of an item: G rows at a time (8 where a row is one or two vectors, so that 16
 * accumulators are live, as in the dense kernel's 4 rows x 4 vectors), then single rows. Each tile
 * prefetches the same rows of the next output block (next >= 0): an item's W is one short run per
 * block, too short for the hardware prefetcher, which left a third of the fold waiting on loads of
 * W. The short exp gets a copy of the tile of its own (no per-vector test of the map). */
static inline __attribute__((always_inline)) vi block_tiles(const float *bt, int64_t R, const float *at, const void *w,
                                                            void *out, int64_t base, int64_t blk, int wdt, int odt,
                                                            const float *bound, int64_t rows, int exact, int nt,
                                                            int64_t next, int nv, int g) {
    vi bad = (vi)splatu(0);
    int64_t c = 0;
    for (; c + g <= rows; c += g) {
        int map = group_map(bound + c, g, exact);
        int64_t pf = next < 0 ? -1 : next + c * blk;
        if (map == MAP_EXP_SMALL)
            bad |= tile_rows(bt + c * R, R, at, blk, w, out, base + c * blk, blk, wdt, odt, MAP_EXP_SMALL, nv, g, nt, pf);
        else
            bad |= tile_rows(bt + c * R, R, at, blk, w, out, base + c * blk, blk, wdt, odt, map, nv, g, nt, pf);
    }
    for (; c < rows; c++)
        bad |= tile_rows(bt + c * R, R, at, blk, w, out, base + c * blk, blk, wdt, odt, group_map(bound + c, 1, exact),
                         nv, 1, nt, next < 0 ? -1 : next + c * blk);
    return bad;
}

/* Every block size, with the dtypes given as constants (float32 in and out: a copy of its own). */
#define ITEM_BLOCK(WDT, ODT)                                                                                     \
    (blk == 4 * VW   ? block_tiles(bt, R, at, w, out, base, blk, WDT, ODT, bound, rows, exact, nt, next, 4, 4)  \
     : blk == 3 * VW ? block_tiles(bt, R, at, w, out, base, blk, WDT, ODT, bound, rows, exact, nt, next, 3, 4)  \
     : blk == 2 * VW ? block_tiles(bt, R, at, w, out, base, blk, WDT, ODT, bound, rows, exact, nt, next, 2, 8)  \
                     : block_tiles(bt, R, at, w, out, base, blk, WDT, ODT, bound, rows, exact, nt, next, 1, 8))

/* One item: rows [c0, c0 + rows) of a layer (O x I x KH x KW, rank R), through every output block.
 * The rows' factors are gathered once into scratch: bt (rows x R) = A's columns for these rows in
 * the blocked order (kh, kw, in), read from the dense order (in, kh, kw), and each row's bound on
 * |dW| over all output channels (sum_k |bt_qk| bmax_k, bmax_k = max_o |B_ok|: it picks the short
 * exp as the dense kernel's bound does); atl is the layer's B^T zero-padded to whole blocks, block by
 * block (per output block a contiguous R x blk panel: rows O_pad apart would share L1 sets). Returns 1
 * if a result is non-finite. */
static int fold_item(const void *w, int wdt, void *out, int odt, const float *atl, const float *a, const int64_t *d,
                     const float *bmax, int64_t c0, int64_t rows, int exact, int nt, float *scratch) {
    const int64_t I = d[1], KH = d[2], KW = d[3], R = d[4], blk = d[5], cols = I * KH * KW;
    float *bt = scratch, *bound = bt + R * rows;
    for (int64_t q = 0; q < rows; q++) {
        int64_t c = c0 + q, hw = c / I, i = c % I;
        int64_t col = i * KH * KW + hw;  /* hw = kh KW + kw: the dense column of (in, kh, kw) */
        float s = 0.0f;
        for (int64_t k = 0; k < R; k++) {
            float v = a[k * cols + col];
            bt[q * R + k] = v;
            s += (v < 0 ? -v : v) * bmax[k];
        }
        bound[q] = s;
    }
    vi bad = (vi)splatu(0);
    for (int64_t ob = 0; ob * blk < d[0]; ob++) {
        const float *at = atl + ob * R * blk;
        int64_t base = (ob * cols + c0) * blk, next = (ob + 1) * blk < d[0] ? base + cols * blk : -1;
        bad |= wdt == F32 && odt == F32 ? ITEM_BLOCK(F32, F32) : ITEM_BLOCK(wdt, odt);
    }
    int any = 0;
    for (int l = 0; l < VW; l++) any |= bad[l] != 0;
    return any;
}

#define ITEM_ROWS 64

/* Every packed Conv2d weight of one task in one call: layer l has dims d[6 l..6 l + 5] = (O, I, KH,
 * KW, R, blk), its base w[l] and output out[l] (may be w[l]) in the layout above, b[l] (O x R,
 * scaled) and a[l] (R x I KH KW, dense column order), float32 row-major. Items of up to 64 rows
 * (through every output block), over nthreads OpenMP threads (or the calling thread). bad[l] is set to 1 where
 * a result of layer l is non-finite. Returns 0, or -1 if a blk is not VW, 2, 3 or 4 VW (nothing
 * written), or -2 if scratch could not be allocated. */
int lie_fold_blocked(int64_t nl, const int64_t *d, void *const *w, void *const *out, const float *const *b,
                     const float *const *a, int wdt, int odt, int exact, int nthreads, int *bad) {
    int64_t total = 0, rmax = 1, bytes = 0;
    for (int64_t l = 0; l < nl; l++) {
        const int64_t *dl = d + 6 * l;
        int64_t blk = dl[5];
        if (blk != VW && blk != 2 * VW && blk != 3 * VW && blk != 4 * VW) return -1;
        total += (dl[1] * dl[2] * dl[3] + ITEM_ROWS - 1) / ITEM_ROWS;
        bytes += (dl[0] + blk - 1) / blk * blk * dl[1] * dl[2] * dl[3] * esize(odt);
        rmax = dl[4] > rmax ? dl[4] : rmax;
        bad[l] = 0;
    }
    /* per layer, once: B^T zero-padded to whole blocks, as one R x blk panel per block, and max_o |B_ok| per k (NaN
     * stays NaN: the full exp) */
    int64_t *atoff = (int64_t *)malloc(sizeof(int64_t) * (size_t)(nl + 1));
    if (!atoff) return -2;
    atoff[0] = 0;
    for (int64_t l = 0; l < nl; l++) {
        const int64_t *dl = d + 6 * l;
        atoff[l + 1] = atoff[l] + dl[4] * ((dl[0] + dl[5] - 1) / dl[5] * dl[5]);
    }
    /* the panels first, 64-byte aligned (each is a multiple of 64 bytes), then the maxima */
    int64_t panel_floats = (atoff[nl] + 15) / 16 * 16;
    float *atall = (float *)aligned_alloc(64, sizeof(float) * (size_t)(panel_floats + ((nl * rmax + 15) / 16 * 16)));
    if (!atall) {
        free(atoff);
        return -2;
    }
    float *bmax = atall + panel_floats;
    for (int64_t l = 0; l < nl; l++) {
        const int64_t O = d[6 * l], R = d[6 * l + 4], blk = d[6 * l + 5], opad = (O + blk - 1) / blk * blk;
        float *m = bmax + l * rmax, *at = atall + atoff[l];
        for (int64_t k = 0; k < R; k++) {
            m[k] = 0.0f;
            for (int64_t o = O; o < opad; o++) at[(o / blk * R + k) * blk + o % blk] = 0.0f;
        }
        for (int64_t o = 0; o < O; o++)
            for (int64_t k = 0; k < R; k++) {
                float v = b[l][o * R + k];
                at[(o / blk * R + k) * blk + o % blk] = v;
                v = v < 0 ? -v : v;
                m[k] = (v > m[k] || v != v) ? v : m[k];
            }
    }
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads > 1 ? nthreads : 1)
#endif
    {
        float *scratch = (float *)malloc(sizeof(float) * (size_t)(rmax * ITEM_ROWS + ITEM_ROWS));
        if (!scratch) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)  /* items cost in proportion to their layer's channels */
#endif
        for (int64_t it = 0; it < total; it++) {
            if (!scratch) continue;
            int64_t l = 0, rest = it, per = 0, cols = 0;
            for (; l < nl; l++) {  /* the layer of item it (a handful of layers: a linear scan) */
                const int64_t *dl = d + 6 * l;
                cols = dl[1] * dl[2] * dl[3];
                per = (cols + ITEM_ROWS - 1) / ITEM_ROWS;
                if (rest < per) break;
                rest -= per;
            }
            int64_t c0 = rest * ITEM_ROWS, rows = c0 + ITEM_ROWS < cols ? ITEM_ROWS : cols - c0;
            if (fold_item(w[l], wdt, out[l], odt, atall + atoff[l], a[l], d + 6 * l, bmax + l * rmax, c0, rows, exact,
                          out[l] != w[l] && bytes >= STREAM_BYTES, scratch)) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
                bad[l] = 1;
            }
        }
        stream_fence();
        free(scratch);
    }
    free(atall);
    free(atoff);
    (void)nthreads;
    return failed ? -2 : 0;
}
