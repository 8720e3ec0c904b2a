/* The BF16 GEMM of the CPU backend (contract and packed layout in
 * gemm_bf16.h).
 *
 * Blocking, as in BLIS: a task owns a block of y (rows [m0, m1) x panels
 * [qa, qz)). It walks its rows in A blocks of at most MC rows and K in
 * blocks of at most KC k-pairs; it packs each A block (x rounded to BF16)
 * into its scratch slice, where it stays in L2, then for each panel runs the
 * micro-kernel down the A block, reusing the panel's B micro-panel (KC x 128
 * bytes) from L1/L2 for every tile. The micro-kernel keeps an MR x 32 tile
 * of y in registers and writes it once per K block, adding bias and beta y
 * on the first. While a panel runs, the next panel's B micro-panel is
 * prefetched into L2 (a share per tile) and each tile prefetches the next
 * tile of y, so that weights and outputs larger than the caches do not stall
 * the kernel.
 *
 * The avx512bf16 path: MR_BF16 x 32 tiles, 2 zmm accumulators per row; per
 * k-pair two zmm loads of B and one 32-bit broadcast of A per row. Its A
 * micro-panel is laid out in chunks of KCH k-pairs, [chunk][row][KCH pairs],
 * so that packing is one vcvtne2ps2bf16 and one 64-byte store per row and
 * chunk, and the unrolled kernel addresses each broadcast with a constant
 * displacement. The avx2/avx512 path: 6 x 16 tiles (half panels), B widened
 * to F32 with a shift (even k) or a mask (odd k); the generic path: 4 x 32 in
 * plain C. Both read A as [k-pair][row][2] floats already rounded to BF16.
 *
 * Rounding: x and w are rounded to nearest even (round_bf16, as
 * bs_f32_to_bf16) except that vcvtne2ps2bf16 (x on the avx512bf16 path)
 * flushes F32 denormals to zero, and vdpbf16ps treats BF16 denormals as zero;
 * normal operands give every path the same products. */
#include "gemm_bf16.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GEMM_X86 1
#define T512     __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define INLINE   static inline __attribute__((always_inline))
#endif

#define NR       BS__GEMM_NR
#define PAIR_U16 (NR * 2) /* uint16 per k-pair of a panel */
#define MR_BF16  14       /* tile rows, avx512bf16 path */
#define MR_AVX2  6        /* tile rows, avx2 path (tiles of 16 columns) */
#define MR_GEN   4        /* tile rows, generic path */
#define KCH      16       /* k-pairs per chunk of the avx512bf16 A layout */
/* Most k-pairs per K block: avx512bf16 (a multiple of KCH), and the other
 * paths (their A blocks take 8 bytes a pair, not 4). Measured on Zen 5: one
 * K block up to K = 1280 beats L1-sized ones (256 pairs; each further block
 * reads and writes y's tile again, and y is often in memory), the B
 * micro-panel streaming from L2 instead. */
#define KC_BF16 640
#define KC_F32  320
#define MC      168 /* most rows per A block: a multiple of every MR */
/* GEMMs below this many flops run on the calling thread. */
#define SERIAL_FLOPS (2.0 * 1024 * 1024)

/* Pool runs: at most this many tasks, the last ones of about this many
 * steps (50 us of a core). A step is a k-pair of one tile row on the
 * avx512bf16 path (2 vdpbf16ps, a cycle); a tile costs at least
 * TILE_MIN_STEPS per k-pair (vdpbf16ps latency, B loads). */
#define TASKS_MAX      64
#define TASK_MIN_STEPS 2e5
#define TILE_MIN_STEPS 6
/* GEMMs of at least this many steps a thread (1 ms) run as a grid of equal
 * tasks, for up to GRID_THREADS_MAX threads (the search simulates the run). */
#define GRID_STEPS       4e6
#define GRID_THREADS_MAX 16

enum path { PATH_GENERIC, PATH_AVX2, PATH_BF16 };
enum split { SPLIT_M, SPLIT_N, SPLIT_2D };

static int64_t cdiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

static int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

/* Round to nearest even, as bs_f32_to_bf16. */
static inline uint16_t round_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float bf16_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Lanes l of a 32-column panel whose y column off + l is in [0, n). */
static uint32_t col_mask(int64_t off, int64_t n)
{
    int64_t lo = off < 0 ? -off : 0, hi = n - off < NR ? n - off : NR;
    uint64_t m = ((uint64_t)1 << hi) - 1;
    return (uint32_t)(m & ~(((uint64_t)1 << lo) - 1));
}

/* ---- packing the weight ------------------------------------------------ */

size_t bs__gemm_bf16_packed_bytes(int64_t n, int64_t k)
{
    return (size_t)cdiv(n, NR) * (size_t)cdiv(k, 2) * PAIR_U16 * sizeof(uint16_t);
}

struct pack_job {
    uint16_t *dst;
    const float *w;
    int64_t n, k;
};

static void pack_panels(void *arg, int64_t p0, int64_t p1)
{
    const struct pack_job *j = arg;
    int64_t kpn = cdiv(j->k, 2);
    for (int64_t p = p0; p < p1; p++) {
        uint16_t *d = j->dst + p * kpn * PAIR_U16;
        for (int r = 0; r < NR; r++) {
            int64_t row = p * NR + r;
            const float *w = row < j->n ? j->w + row * j->k : NULL;
            for (int64_t i = 0; i < 2 * kpn; i++)
                d[(i >> 1) * PAIR_U16 + 2 * r + (i & 1)] =
                    w != NULL && i < j->k ? round_bf16(w[i]) : 0;
        }
    }
}

void bs__gemm_bf16_pack(struct bs__cpu *c, void *dst, const float *w, int64_t n, int64_t k)
{
    struct pack_job j = {.dst = dst, .w = w, .n = n, .k = k};
    if (n > 0 && k > 0)
        bs__cpu_parallel_for(c, cdiv(n, NR), NR * k, pack_panels, &j);
}

/* ---- the job ----------------------------------------------------------- */

struct gemm_job {
    const void *x; /* F32, or BF16 (x_bf16) */
    bool x_bf16;
    int64_t m, k, ldx;
    const uint16_t *w;
    int64_t kpn;    /* k-pairs of the packed weight */
    int64_t n0, n;  /* rows of w wanted: y's columns */
    const float *b; /* [n] or NULL */
    float *y;
    int64_t ldy;
    float beta;
    enum path path;
    int64_t kc;     /* k-pairs per K block */
    int64_t mp, mr; /* micro-panels of mr rows along m */
    int64_t q0, np; /* first covering panel, number of covering panels */
    /* Tasks: ranges [bounds[t], bounds[t + 1]) of micro-panels (SPLIT_M) or
     * panels (SPLIT_N), or the tiles of an mt x qt grid (SPLIT_2D). */
    enum split split;
    int64_t bounds[TASKS_MAX + 1];
    int64_t mt, qt;
    char *scratch; /* pool runs: slices of slot bytes */
    size_t slot;
};

/* y at row i, column off of the y block, as an address: off may be negative
 * for the panel that a view's first row falls in (only lanes at columns >= 0
 * are ever touched), so it is computed as an integer, not a pointer. */
static inline float *y_at(const struct gemm_job *j, int64_t i, int64_t off)
{
    return (float *)((uintptr_t)(j->y + i * j->ldy) + (uintptr_t)(off * (int64_t)sizeof(float)));
}

static inline const float *bias_at(const float *b, int64_t off)
{
    return b ? (const float *)((uintptr_t)b + (uintptr_t)(off * (int64_t)sizeof(float))) : NULL;
}

/* The K = 0 product: y = b + beta y. */
static void bias_only(const struct gemm_job *j)
{
    for (int64_t i = 0; i < j->m; i++) {
        float *y = j->y + i * j->ldy;
        for (int64_t c = 0; c < j->n; c++)
            y[c] = (j->b ? j->b[c] : 0.0f) + (j->beta != 0.0f ? y[c] : 0.0f);
    }
}

/* ---- the generic path (also the avx2 path's A packing) ----------------- */

/* A block for the avx2 and generic paths: rows [0, rows) of x, k-pairs
 * [kb, kb + kc), rounded to BF16 and stored as floats, [k-pair][row][2] per
 * micro-panel of mr rows. A BF16 x (pack_a_f32_bf16) is widened as it is:
 * the same values. */
static void pack_a_f32_bf16(float *dst, const uint16_t *x, int64_t ldx, int64_t rows, int64_t k,
                            int64_t kb, int64_t kc, int64_t mr_max)
{
    for (int64_t i = 0; i < rows; i += mr_max) {
        int64_t mr = min64(mr_max, rows - i);
        float *d = dst + i * kc * 2;
        for (int64_t r = 0; r < mr; r++) {
            const uint16_t *xr = x + (i + r) * ldx + 2 * kb;
            int64_t left = k - 2 * kb;
            for (int64_t p = 0; p < kc; p++) {
                d[(p * mr + r) * 2] = bf16_f32(xr[2 * p]);
                d[(p * mr + r) * 2 + 1] = 2 * p + 1 < left ? bf16_f32(xr[2 * p + 1]) : 0;
            }
        }
    }
}

static void pack_a_f32(float *dst, const float *x, int64_t ldx, int64_t rows, int64_t k, int64_t kb,
                       int64_t kc, int64_t mr_max)
{
    for (int64_t i = 0; i < rows; i += mr_max) {
        int64_t mr = min64(mr_max, rows - i);
        float *d = dst + i * kc * 2;
        for (int64_t r = 0; r < mr; r++) {
            const float *xr = x + (i + r) * ldx + 2 * kb;
            int64_t left = k - 2 * kb; /* elements of x from xr on */
            for (int64_t p = 0; p < kc; p++) {
                d[(p * mr + r) * 2] = bf16_f32(round_bf16(xr[2 * p]));
                d[(p * mr + r) * 2 + 1] =
                    2 * p + 1 < left ? bf16_f32(round_bf16(xr[2 * p + 1])) : 0;
            }
        }
    }
}

/* Tile of mr x 32 (rows of a, the panel b) over kc k-pairs; writes the lanes
 * of mask to y (row stride ldy, lane l at column off + l). */
static void kern_gen(int64_t mr, int64_t kc, const float *a, const uint16_t *b,
                     const struct gemm_job *j, int64_t i, int64_t off, const float *bias,
                     uint32_t mask, bool load_c)
{
    float acc[MR_GEN][NR];
    memset(acc, 0, sizeof(acc));
    for (int64_t p = 0; p < kc; p++) {
        const uint16_t *bk = b + p * PAIR_U16;
        const float *ak = a + p * mr * 2;
        float we[NR], wo[NR];
        for (int l = 0; l < NR; l++) {
            we[l] = bf16_f32(bk[2 * l]);
            wo[l] = bf16_f32(bk[2 * l + 1]);
        }
        for (int64_t r = 0; r < mr; r++) {
            float a0 = ak[2 * r], a1 = ak[2 * r + 1];
            for (int l = 0; l < NR; l++)
                acc[r][l] += a0 * we[l];
            for (int l = 0; l < NR; l++)
                acc[r][l] += a1 * wo[l];
        }
    }
    for (int64_t r = 0; r < mr; r++) {
        float *y = j->y + (i + r) * j->ldy;
        for (int l = 0; l < NR; l++) {
            if (!(mask >> l & 1))
                continue;
            int64_t c = off + l;
            float v = acc[r][l] + (bias ? bias[c] : 0.0f);
            y[c] = load_c ? v + y[c] : v;
        }
    }
}

static void block_gen(const struct gemm_job *j, const float *a, int64_t i0, int64_t rows,
                      int64_t qa, int64_t qz, int64_t kb, int64_t kc, bool first)
{
    const float *bias = first ? j->b : NULL;
    bool load_c = !first || j->beta != 0.0f;
    for (int64_t q = qa; q < qz; q++) {
        const uint16_t *bq = j->w + (q * j->kpn + kb) * PAIR_U16;
        int64_t off = q * NR - j->n0;
        uint32_t mask = col_mask(off, j->n);
        for (int64_t i = 0; i < rows; i += MR_GEN)
            kern_gen(min64(MR_GEN, rows - i), kc, a + i * kc * 2, bq, j, i0 + i, off, bias, mask,
                     load_c);
    }
}

#ifdef GEMM_X86
/* ---- the avx2 path ----------------------------------------------------- */

/* All-ones in the 32-bit lanes l < 8 whose bit l is set in bits. */
static inline __m256i lane_mask8(unsigned bits)
{
    const __m256i pow2 = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), pow2),
                              _mm256_setzero_si256());
}

/* v + bias + y (the terms present) stored to the lanes of bits (8 lanes). */
static inline void store8(float *y, __m256 v, const float *bias, bool load_c, unsigned bits)
{
    if (bits == 0xff) {
        if (bias)
            v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
        if (load_c)
            v = _mm256_add_ps(v, _mm256_loadu_ps(y));
        _mm256_storeu_ps(y, v);
    } else if (bits != 0) {
        __m256i m = lane_mask8(bits);
        if (bias)
            v = _mm256_add_ps(v, _mm256_maskload_ps(bias, m));
        if (load_c)
            v = _mm256_add_ps(v, _mm256_maskload_ps(y, m));
        _mm256_maskstore_ps(y, m, v);
    }
}

/* Tile of mr x 16: a as pack_a_f32, b the panel's half (16 rows' pairs per
 * k-pair, at stride PAIR_U16); y, bias at the tile's first column. */
INLINE void kern_avx2(const int mr, int64_t kc, const float *a, const uint16_t *b, float *y,
                      int64_t ldy, const float *bias, unsigned mask, bool load_c)
{
    __m256 c0[MR_AVX2], c1[MR_AVX2];
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++)
        c0[r] = c1[r] = _mm256_setzero_ps();
    for (int64_t p = 0; p < kc; p++) {
        const uint16_t *bk = b + p * PAIR_U16;
        const float *ak = a + p * mr * 2;
        __m256i v0 = _mm256_load_si256((const __m256i *)bk);
        __m256i v1 = _mm256_load_si256((const __m256i *)(bk + 16));
        __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
        __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
#pragma GCC unroll 6
        for (int r = 0; r < mr; r++) {
            __m256 ar = _mm256_broadcast_ss(ak + 2 * r);
            c0[r] = _mm256_fmadd_ps(ar, w0, c0[r]);
            c1[r] = _mm256_fmadd_ps(ar, w1, c1[r]);
        }
        /* Odd k: clear the low halves with two shifts, not a mask, which
         * would take a sixteenth register and spill an accumulator. */
        w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(v0, 16), 16));
        w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(v1, 16), 16));
#pragma GCC unroll 6
        for (int r = 0; r < mr; r++) {
            __m256 ar = _mm256_broadcast_ss(ak + 2 * r + 1);
            c0[r] = _mm256_fmadd_ps(ar, w0, c0[r]);
            c1[r] = _mm256_fmadd_ps(ar, w1, c1[r]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
        store8(y + r * ldy, c0[r], bias, load_c, mask & 0xff);
        store8(y + r * ldy + 8, c1[r], bias ? bias + 8 : NULL, load_c, mask >> 8 & 0xff);
    }
}

typedef void (*kern_avx2_fn)(int64_t kc, const float *a, const uint16_t *b, float *y, int64_t ldy,
                             const float *bias, unsigned mask, bool load_c);
#define KERN_AVX2(R)                                                                               \
    static void kern_avx2_##R(int64_t kc, const float *a, const uint16_t *b, float *y,             \
                              int64_t ldy, const float *bias, unsigned mask, bool load_c)          \
    {                                                                                              \
        kern_avx2(R, kc, a, b, y, ldy, bias, mask, load_c);                                        \
    }
KERN_AVX2(1)
KERN_AVX2(2)
KERN_AVX2(3)
KERN_AVX2(4)
KERN_AVX2(5)
KERN_AVX2(6)
static const kern_avx2_fn kern_avx2_tab[MR_AVX2 + 1] = {
    NULL, kern_avx2_1, kern_avx2_2, kern_avx2_3, kern_avx2_4, kern_avx2_5, kern_avx2_6,
};

static void block_avx2(const struct gemm_job *j, const float *a, int64_t i0, int64_t rows,
                       int64_t qa, int64_t qz, int64_t kb, int64_t kc, bool first)
{
    const float *bias = first ? j->b : NULL;
    bool load_c = !first || j->beta != 0.0f;
    for (int64_t q = qa; q < qz; q++) {
        int64_t off = q * NR - j->n0;
        uint32_t mask = col_mask(off, j->n);
        for (int h = 0; h < 2; h++) {
            unsigned bits = mask >> (16 * h) & 0xffff;
            if (bits == 0)
                continue;
            const uint16_t *bq = j->w + (q * j->kpn + kb) * PAIR_U16 + 32 * h;
            int64_t o = off + 16 * h;
            for (int64_t i = 0; i < rows; i += MR_AVX2)
                kern_avx2_tab[min64(MR_AVX2, rows - i)](kc, a + i * kc * 2, bq, y_at(j, i0 + i, o),
                                                        j->ldy, bias_at(bias, o), bits, load_c);
        }
    }
}

/* ---- the avx512bf16 path ----------------------------------------------- */

/* A block for the avx512bf16 path: rows [0, rows) of x, k-pairs [kb, kb +
 * kc), as BF16 pairs (one uint32 each, column 2kp in the low half), per
 * micro-panel of MR_BF16 rows in chunks [chunk][row][KCH pairs]. */
T512 static void pack_a_bf16(uint32_t *dst, const float *x, int64_t ldx, int64_t rows, int64_t k,
                             int64_t kb, int64_t kc)
{
    int64_t nch = cdiv(kc, KCH);
    for (int64_t i = 0; i < rows; i += MR_BF16) {
        int64_t mr = min64(MR_BF16, rows - i);
        uint32_t *d = dst + i * nch * KCH;
        for (int64_t r = 0; r < mr; r++) {
            const float *xr = x + (i + r) * ldx;
            for (int64_t ch = 0; ch < nch; ch++) {
                int64_t e = 2 * (kb + ch * KCH), left = k - e;
                __m512 lo, hi;
                if (left >= 2 * KCH) {
                    lo = _mm512_loadu_ps(xr + e);
                    hi = _mm512_loadu_ps(xr + e + 16);
                } else {
                    __mmask32 m = (__mmask32)(((uint64_t)1 << left) - 1);
                    lo = _mm512_maskz_loadu_ps((__mmask16)m, xr + e);
                    hi = _mm512_maskz_loadu_ps((__mmask16)(m >> 16), xr + e + 16);
                }
                __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_store_si512((void *)(d + (ch * mr + r) * KCH), (__m512i)v);
            }
        }
    }
}

/* The same from a BF16 x: its pairs copied as they are. The F32 path's
 * vcvtne2ps2bf16 flushes denormals to zero where this keeps them, but
 * vdpbf16ps takes BF16 denormals as zero: the products are the same. */
T512 static void pack_a_bf16_bf16(uint32_t *dst, const uint16_t *x, int64_t ldx, int64_t rows,
                                  int64_t k, int64_t kb, int64_t kc)
{
    int64_t nch = cdiv(kc, KCH);
    for (int64_t i = 0; i < rows; i += MR_BF16) {
        int64_t mr = min64(MR_BF16, rows - i);
        uint32_t *d = dst + i * nch * KCH;
        for (int64_t r = 0; r < mr; r++) {
            const uint16_t *xr = x + (i + r) * ldx;
            for (int64_t ch = 0; ch < nch; ch++) {
                int64_t e = 2 * (kb + ch * KCH), left = k - e;
                __m512i v;
                if (left >= 2 * KCH)
                    v = _mm512_loadu_si512((const void *)(xr + e));
                else
                    v = _mm512_maskz_loadu_epi16((__mmask32)(((uint64_t)1 << left) - 1), xr + e);
                _mm512_store_si512((void *)(d + (ch * mr + r) * KCH), v);
            }
        }
    }
}

/* One k-pair into accumulators c0, c1: s is the pair's index in its chunk
 * ac. */
#define BF16_STEP(c0, c1, bk, ac, s)                                                               \
    do {                                                                                           \
        __m512bh b0_ = (__m512bh)_mm512_load_si512((const void *)(bk));                            \
        __m512bh b1_ = (__m512bh)_mm512_load_si512((const void *)((bk) + 32));                     \
        _Pragma("GCC unroll 14") for (int r = 0; r < mr; r++)                                      \
        {                                                                                          \
            __m512bh a_ = (__m512bh)_mm512_set1_epi32((int)(ac)[r * KCH + (s)]);                   \
            c0[r] = _mm512_dpbf16_ps(c0[r], a_, b0_);                                              \
            c1[r] = _mm512_dpbf16_ps(c1[r], a_, b1_);                                              \
        }                                                                                          \
    } while (0)

/* Tiles of at most this many rows keep a second set of accumulators for odd
 * k-pairs: 2 x mr dependency chains would not cover vdpbf16ps's latency. */
#define MR_SPLIT 6

/* Tile of mr x 32: a as pack_a_bf16 (one micro-panel), b the panel at the
 * block's first k-pair; y, bias at the panel's first column, lanes of mask. */
INLINE T512 void kern_bf16(const int mr, int64_t kc, const uint32_t *a, const uint16_t *b, float *y,
                           int64_t ldy, const float *bias, uint32_t mask, bool load_c)
{
    __m512 c0[MR_BF16], c1[MR_BF16], d0[MR_SPLIT], d1[MR_SPLIT];
#pragma GCC unroll 14
    for (int r = 0; r < mr; r++)
        c0[r] = c1[r] = _mm512_setzero_ps();
#pragma GCC unroll 6
    for (int r = 0; r < MR_SPLIT; r++)
        d0[r] = d1[r] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + KCH <= kc; p += KCH) {
        const uint32_t *ac = a + p * mr;
        const uint16_t *bk = b + p * PAIR_U16;
#pragma GCC unroll 16
        for (int s = 0; s < KCH; s++) {
            if (mr <= MR_SPLIT && (s & 1))
                BF16_STEP(d0, d1, bk + s * PAIR_U16, ac, s);
            else
                BF16_STEP(c0, c1, bk + s * PAIR_U16, ac, s);
        }
    }
    const uint32_t *ac = a + p * mr;
    for (int s = 0; p + s < kc; s++)
        BF16_STEP(c0, c1, b + (p + s) * PAIR_U16, ac, s);
    if (mr <= MR_SPLIT) {
        const int ms = mr < MR_SPLIT ? mr : MR_SPLIT; /* mr, in d's bounds for the compiler */
#pragma GCC unroll 6
        for (int r = 0; r < ms; r++) {
            c0[r] = _mm512_add_ps(c0[r], d0[r]);
            c1[r] = _mm512_add_ps(c1[r], d1[r]);
        }
    }

    __mmask16 k0 = (__mmask16)mask, k1 = (__mmask16)(mask >> 16);
    __m512 bias0 = _mm512_setzero_ps(), bias1 = bias0;
    if (bias) {
        bias0 = _mm512_maskz_loadu_ps(k0, bias);
        bias1 = _mm512_maskz_loadu_ps(k1, bias + 16);
    }
#pragma GCC unroll 14
    for (int r = 0; r < mr; r++) {
        float *yr = y + r * ldy;
        __m512 v0 = _mm512_add_ps(c0[r], bias0), v1 = _mm512_add_ps(c1[r], bias1);
        if (load_c) {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(k0, yr));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(k1, yr + 16));
        }
        _mm512_mask_storeu_ps(yr, k0, v0);
        _mm512_mask_storeu_ps(yr + 16, k1, v1);
    }
}

typedef void (*kern_bf16_fn)(int64_t kc, const uint32_t *a, const uint16_t *b, float *y,
                             int64_t ldy, const float *bias, uint32_t mask, bool load_c);
#define KERN_BF16(R)                                                                               \
    T512 static void kern_bf16_##R(int64_t kc, const uint32_t *a, const uint16_t *b, float *y,     \
                                   int64_t ldy, const float *bias, uint32_t mask, bool load_c)     \
    {                                                                                              \
        kern_bf16(R, kc, a, b, y, ldy, bias, mask, load_c);                                        \
    }
KERN_BF16(1)
KERN_BF16(2)
KERN_BF16(3)
KERN_BF16(4)
KERN_BF16(5)
KERN_BF16(6)
KERN_BF16(7)
KERN_BF16(8)
KERN_BF16(9)
KERN_BF16(10)
KERN_BF16(11)
KERN_BF16(12)
KERN_BF16(13)
KERN_BF16(14)
static const kern_bf16_fn kern_bf16_tab[MR_BF16 + 1] = {
    NULL,         kern_bf16_1,  kern_bf16_2,  kern_bf16_3,  kern_bf16_4,
    kern_bf16_5,  kern_bf16_6,  kern_bf16_7,  kern_bf16_8,  kern_bf16_9,
    kern_bf16_10, kern_bf16_11, kern_bf16_12, kern_bf16_13, kern_bf16_14,
};

static void block_bf16(const struct gemm_job *j, const uint32_t *a, int64_t i0, int64_t rows,
                       int64_t qa, int64_t qz, int64_t kb, int64_t kc, bool first)
{
    const float *bias = first ? j->b : NULL;
    bool load_c = !first || j->beta != 0.0f;
    int64_t nch = cdiv(kc, KCH), calls = cdiv(rows, MR_BF16), lines = kc * PAIR_U16 * 2 / 64;
    for (int64_t q = qa; q < qz; q++) {
        const uint16_t *bq = j->w + (q * j->kpn + kb) * PAIR_U16;
        int64_t off = q * NR - j->n0;
        uint32_t mask = col_mask(off, j->n);
        /* The next panel's B micro-panel, into L2 a share per call: the first
         * call on it would otherwise wait on memory (large weights). */
        const char *next = q + 1 < qz ? (const char *)(bq + j->kpn * PAIR_U16) : NULL;
        for (int64_t i = 0, c = 0; i < rows; i += MR_BF16, c++) {
            if (next != NULL)
                for (int64_t l = c * lines / calls; l < (c + 1) * lines / calls; l++)
                    _mm_prefetch(next + l * 64, _MM_HINT_T1);
            /* The next tile of y, which the epilogue reads or writes: it is
             * often in memory (y larger than the caches). */
            int64_t ni = i + MR_BF16 < rows ? i + MR_BF16 : 0, no = ni ? off : off + NR;
            if (ni != 0 || q + 1 < qz)
                for (int64_t r = ni; r < ni + MR_BF16 && r < rows; r++) {
                    const char *p = (const char *)y_at(j, i0 + r, no);
                    _mm_prefetch(p, _MM_HINT_T0);
                    _mm_prefetch(p + 64, _MM_HINT_T0);
                    _mm_prefetch(p + 124, _MM_HINT_T0);
                }
            kern_bf16_tab[min64(MR_BF16, rows - i)](kc, a + i * nch * KCH, bq, y_at(j, i0 + i, off),
                                                    j->ldy, bias_at(bias, off), mask, load_c);
        }
    }
}
#endif /* GEMM_X86 */

/* ---- the driver -------------------------------------------------------- */

/* Bytes of an A block of rows x kc k-pairs on path p: a BF16 pair, or two
 * floats. */
static size_t a_block_bytes(enum path p, int64_t rows, int64_t kc)
{
    return (size_t)rows * (size_t)kc * (p == PATH_BF16 ? 4 : 8);
}

size_t bs__gemm_bf16_scratch_bytes(void)
{
    size_t bf16 = a_block_bytes(PATH_BF16, MC, KC_BF16), f32 = a_block_bytes(PATH_AVX2, MC, KC_F32);
    return bf16 > f32 ? bf16 : f32;
}

/* Range e of n items split in t near-equal ranges: its start. */
static int64_t split_at(int64_t n, int64_t t, int64_t e)
{
    return n / t * e + (e < n % t ? e : n % t);
}

/* Rows [m0, m1) x panels [qa, qz) of y, with A blocks in abuf: the rows in
 * near-equal A blocks of at most MC (each block streams the task's B). */
static void gemm_block(const struct gemm_job *j, void *abuf, int64_t m0, int64_t m1, int64_t qa,
                       int64_t qz)
{
    int64_t mps = cdiv(m1 - m0, j->mr), nmc = cdiv(m1 - m0, MC);
    for (int64_t e = 0; e < nmc; e++) {
        int64_t i0 = m0 + split_at(mps, nmc, e) * j->mr;
        int64_t rows = min64(m0 + split_at(mps, nmc, e + 1) * j->mr, m1) - i0;
        const float *x = j->x_bf16 ? NULL : (const float *)j->x + i0 * j->ldx;
        const uint16_t *xh = j->x_bf16 ? (const uint16_t *)j->x + i0 * j->ldx : NULL;
        for (int64_t kb = 0; kb < j->kpn; kb += j->kc) {
            int64_t kc = min64(j->kc, j->kpn - kb);
            bool first = kb == 0;
            switch (j->path) {
#ifdef GEMM_X86
            case PATH_BF16:
                if (xh != NULL)
                    pack_a_bf16_bf16(abuf, xh, j->ldx, rows, j->k, kb, kc);
                else
                    pack_a_bf16(abuf, x, j->ldx, rows, j->k, kb, kc);
                block_bf16(j, abuf, i0, rows, qa, qz, kb, kc, first);
                break;
            case PATH_AVX2:
                if (xh != NULL)
                    pack_a_f32_bf16(abuf, xh, j->ldx, rows, j->k, kb, kc, MR_AVX2);
                else
                    pack_a_f32(abuf, x, j->ldx, rows, j->k, kb, kc, MR_AVX2);
                block_avx2(j, abuf, i0, rows, qa, qz, kb, kc, first);
                break;
#endif
            default:
                if (xh != NULL)
                    pack_a_f32_bf16(abuf, xh, j->ldx, rows, j->k, kb, kc, MR_GEN);
                else
                    pack_a_f32(abuf, x, j->ldx, rows, j->k, kb, kc, MR_GEN);
                block_gen(j, abuf, i0, rows, qa, qz, kb, kc, first);
                break;
            }
        }
    }
}

static void gemm_task(void *arg, int64_t task, int thread)
{
    const struct gemm_job *j = arg;
    int64_t m0 = 0, m1 = j->m, qa = j->q0, qz = j->q0 + j->np;
    int64_t u0 = j->bounds[task], u1 = j->bounds[task + 1];
    if (j->split == SPLIT_M) {
        m0 = u0 * j->mr;
        m1 = min64(u1 * j->mr, j->m);
    } else if (j->split == SPLIT_N) {
        qa = j->q0 + u0;
        qz = j->q0 + u1;
    } else { /* SPLIT_2D: tiles of an mt x qt grid */
        int64_t mi = task / j->qt, qi = task % j->qt;
        m0 = split_at(j->mp, j->mt, mi) * j->mr;
        m1 = min64(split_at(j->mp, j->mt, mi + 1) * j->mr, j->m);
        qa = j->q0 + split_at(j->np, j->qt, qi);
        qz = j->q0 + split_at(j->np, j->qt, qi + 1);
    }
    gemm_block(j, j->scratch + (size_t)thread * j->slot, m0, m1, qa, qz);
}

/* Split units (micro-panels or panels) of unit_steps each into tasks of
 * decreasing size, as OpenMP's guided schedule: each takes 1/(2 threads) of
 * what is left, and at least TASK_MIN_STEPS. The pool's caller starts at once
 * and its workers some 50 us later (a futex wake-up on a VM); equal tasks
 * would leave that gap at the end, the small last ones close it. Returns the
 * number of tasks. */
static int64_t guided_split(struct gemm_job *j, int64_t units, double unit_steps, int threads)
{
    int64_t least = (int64_t)(TASK_MIN_STEPS / unit_steps);
    least = least < 1 ? 1 : least;
    for (;; least *= 2) {
        int64_t at = 0, n = 0;
        while (at < units && n < TASKS_MAX) {
            int64_t size = cdiv(units - at, 2 * (int64_t)threads);
            j->bounds[n++] = at;
            at += min64(size > least ? size : least, units - at);
        }
        if (at == units) {
            j->bounds[n] = units;
            return n;
        }
    }
}

/* Bytes of cache a weight may take and still be read from L3 each time a
 * task's A block streams it: half the L3. */
static double l3_budget(void)
{
    long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return l3 > 0 ? (double)l3 / 2 : (double)(8 << 20);
}

/* Cost of a task of mps micro-panels (the last one of mr_last rows) by nps
 * panels, in k-pair steps of a full micro-panel: a tile's steps cost about
 * its rows plus its two B loads; each task also packs its A block. */
static double task_cost(const struct gemm_job *j, int64_t mps, int64_t mr_last, int64_t nps)
{
    double rows = (double)(mps - 1) * (double)j->mr + (double)mr_last;
    double tiles = (double)(mps - 1) * ((double)j->mr + 2) + ((double)mr_last + 2);
    return tiles / ((double)j->mr + 2) * (double)nps + 0.05 * rows / (double)j->mr + 0.5;
}

/* The time the pool takes for an mt x qt grid: tasks go, in order, to the
 * first thread free (the pool's atomic counter). */
static double grid_makespan(const struct gemm_job *j, int64_t mt, int64_t qt, int threads)
{
    double busy[GRID_THREADS_MAX] = {0};
    for (int64_t t = 0; t < mt * qt; t++) {
        int64_t mi = t / qt, qi = t % qt;
        int64_t a = split_at(j->mp, mt, mi), z = split_at(j->mp, mt, mi + 1);
        int64_t last = z == j->mp ? j->m - (j->mp - 1) * j->mr : j->mr;
        int64_t nps = split_at(j->np, qt, qi + 1) - split_at(j->np, qt, qi);
        int f = 0;
        for (int i = 1; i < threads; i++)
            if (busy[i] < busy[f])
                f = i;
        busy[f] += task_cost(j, z - a, last, nps);
    }
    double end = 0;
    for (int i = 0; i < threads; i++)
        end = busy[i] > end ? busy[i] : end;
    return end;
}

/* The mt x qt grid (at most 8 tasks a thread) with the shortest modelled run,
 * fewest tasks on ties; threads <= GRID_THREADS_MAX. */
static int64_t choose_grid(struct gemm_job *j, int threads)
{
    int64_t most = 8 * (int64_t)threads;
    double best = 0;
    j->split = SPLIT_2D;
    j->mt = j->qt = 1;
    for (int64_t mt = 1; mt <= j->mp && mt <= most; mt++)
        for (int64_t qt = 1; qt <= j->np && mt * qt <= most; qt++) {
            double t = grid_makespan(j, mt, qt, threads);
            if (best == 0 || t < best * 0.999) {
                best = t;
                j->mt = mt;
                j->qt = qt;
            }
        }
    return j->mt * j->qt;
}

/* Split the work. Large GEMMs (GRID_STEPS a thread or more) into a grid of
 * equal tasks: the workers' late start then costs under 2%, less than the
 * extra streams of B or packs of A that small tasks cost. Smaller ones
 * guided: along M (each task all panels) while the weight stays in L3, else
 * along N (each task all rows: packing x again is cheap next to streaming a
 * large weight from memory); tiny ones as a grid. Returns the number of
 * tasks. */
static int64_t plan_tasks(struct gemm_job *j, int threads)
{
    double w_bytes = (double)j->np * (double)j->kpn * PAIR_U16 * 2, kpn = (double)j->kpn;
    double steps = (double)j->m * (double)j->np * kpn;
    if (threads <= GRID_THREADS_MAX && steps >= GRID_STEPS * threads)
        return choose_grid(j, threads);
    if (j->mp >= 4 * threads && (w_bytes <= l3_budget() || j->np < 4 * threads)) {
        j->split = SPLIT_M;
        return guided_split(j, j->mp, (double)j->mr * (double)j->np * kpn, threads);
    }
    if (j->np >= 4 * threads) {
        int64_t last = j->m - (j->mp - 1) * j->mr;
        double rows =
            (double)((j->mp - 1) * j->mr + (last > TILE_MIN_STEPS ? last : TILE_MIN_STEPS));
        j->split = SPLIT_N;
        return guided_split(j, j->np, rows * kpn, threads);
    }
    j->split = SPLIT_2D;
    j->mt = min64(j->mp, 2 * (int64_t)threads);
    j->qt = min64(j->np, cdiv(4 * (int64_t)threads, j->mt));
    return j->mt * j->qt;
}

int bs__gemm_bf16_run(struct bs__cpu *c, const struct bs__gemm_bf16_args *g, void *scratch,
                      struct bs_err *err)
{
    struct gemm_job j = {
        .x = g->x,
        .x_bf16 = g->x_bf16,
        .m = g->m,
        .k = g->k,
        .ldx = g->ldx,
        .w = g->w,
        .kpn = cdiv(g->k, 2),
        .n0 = g->n0,
        .n = g->n,
        .b = g->b,
        .y = g->y,
        .ldy = g->ldy,
        .beta = g->beta,
        .path = PATH_GENERIC,
        .mr = MR_GEN,
    };
    if (g->m == 0 || g->n == 0)
        return 0;
    if (g->k == 0) {
        bias_only(&j);
        return 0;
    }
#ifdef GEMM_X86
    if (c->isa >= BS__ISA_AVX512_BF16) {
        j.path = PATH_BF16;
        j.mr = MR_BF16;
    } else if (c->isa >= BS__ISA_AVX2) {
        j.path = PATH_AVX2;
        j.mr = MR_AVX2;
    }
#endif
    int64_t kc_max = j.path == PATH_BF16 ? KC_BF16 : KC_F32, nkb = cdiv(j.kpn, kc_max);
    j.kc = min64(cdiv(cdiv(j.kpn, nkb), KCH) * KCH, kc_max);
    j.mp = cdiv(j.m, j.mr);
    j.q0 = j.n0 / NR;
    j.np = cdiv(j.n0 + j.n, NR) - j.q0;
    if (c->n_threads == 1 || 2.0 * (double)g->m * (double)g->n * (double)g->k < SERIAL_FLOPS) {
        size_t bytes = a_block_bytes(j.path, min64(j.m, MC), j.kc);
        void *buf = NULL;
        if (posix_memalign(&buf, 64, bytes) != 0)
            return bs_err_set(err, BS_ENOMEM, "linear: cannot allocate %zu bytes of scratch",
                              bytes);
        gemm_block(&j, buf, 0, j.m, j.q0, j.q0 + j.np);
        free(buf);
        return 0;
    }
    int64_t tasks = plan_tasks(&j, c->n_threads);
    j.scratch = scratch;
    j.slot = bs__gemm_bf16_scratch_bytes();
    bs_pool_run(c->pool, tasks, gemm_task, &j);
    return 0;
}
