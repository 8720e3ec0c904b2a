/* FlashAttention-style multi-head attention on the CPU.
 *
 * One pool task per (batch, head, tile of ATT_TQ queries). The task packs its
 * queries transposed and scaled, Q^T (head_dim x ATT_TQ), then walks the keys
 * in tiles of ATT_TK, reading q, k and v in place through their row stride
 * (fused QKV buffers need no copy). Per key tile: S^T = K Q^T with the mask
 * added and each query's maximum taken on the way; an online softmax along
 * the queries (per query a running max m and sum l, the accumulator rescaled
 * by exp(m_old - m_new)); O^T += V^T P^T. At the end o = O / l. Everything
 * is laid out with the queries contiguous, so the softmax loops vectorise and
 * need no horizontal reductions. Scratch is per thread: S^T (ATT_TK x
 * ATT_TQ), O^T and Q^T (head_dim x ATT_TQ each) and three ATT_TQ vectors,
 * about 150 KB at head_dim 160, whatever Lq and Lk are.
 *
 * Products. With AVX2 and FMA both run in register-blocked kernels written
 * here rather than OpenBLAS: at these shapes (K = head_dim = 40 for the
 * scores, N = head_dim for P V) a BLAS call spends much of its time packing
 * and in edge kernels. Each 6 x 16 block of S^T is 12 accumulators fed per
 * step of the head dim by two loads of Q^T and six broadcasts from rows of K;
 * each 6 x 16 block of O^T is 12 accumulators fed per key by two loads of a
 * row of P^T and six broadcasts from a row of V. (Blocking O by query rows
 * instead streams the whole V tile once per pair of queries and ran at half
 * this speed.) Where the CPU has AVX-512 (checked at run time) the same
 * kernels run 12 rows x 32 queries in zmm registers; BS_CPU_ISA=avx2 keeps
 * the AVX2 ones. Without AVX2 in the build both products are cblas_sgemm
 * calls on the same tiles.
 *
 * Masks. Softmax is invariant under adding a constant to a row, so each mask
 * row is shifted by its own maximum before it is added: a row masked
 * uniformly (-10000 everywhere) then adds exactly 0 and gives softmax of the
 * raw scores, as exact arithmetic would, instead of losing the scores' low
 * bits in s + (-10000) (float spacing at 10000 is 1e-3).
 * -inf entries give weight 0. A query whose mask row is -inf everywhere has no
 * key to attend to: its output row is 0 (a choice: PyTorch's softmax would
 * give NaN; 0 keeps a batch with one empty row usable). Lk = 0 also gives 0.
 *
 * Thread ownership: the job is read-only during the run; each task writes its
 * own rows of o and the scratch slice of the thread running it. The entry
 * holds the context's scratch_lock from reserving the scratch until the pool
 * run returns. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ATT_SIMD 1 /* our own register-blocked products (below) */
#else
#define ATT_SIMD 0 /* portable build: both products through OpenBLAS */
#endif

#include "opcheck.h"
#include "ops_cpu.h"
#include "vmath.h"

/* Tile sizes (override with -D to tune): 64 x 256 measured as fast as larger
 * tiles for 8 heads x 40 at 4096 tokens, and gives more tasks to balance. */
#ifndef ATT_TQ
#define ATT_TQ 64 /* queries per task */
#endif
#ifndef ATT_TK
#define ATT_TK 256 /* keys per tile */
#endif

struct attn_job {
    const float *q, *k, *v, *mask;
    float *o;
    int64_t ldq, ldk, ldv, ldo;
    int64_t lq, lk;
    int64_t mq;                 /* mask rows per sample: 1 or lq (0: no mask) */
    int64_t mask_nb0, mask_nb1; /* mask strides in floats: sample, query row */
    int heads, head_dim;
    float scale;
    int64_t q_tiles;
    int width; /* query columns per register block: 16 (AVX2), 32 (AVX-512) */
    float *scratch;
    size_t scratch_floats; /* per thread */
};

/* Per-thread scratch layout. */
struct attn_tile {
    float *s;     /* [ATT_TK][ATT_TQ] S^T: scores, then probabilities */
    float *acc;   /* [head_dim][ATT_TQ] output accumulator, transposed (O^T) */
    float *qt;    /* [head_dim][ATT_TQ] the query tile transposed and scaled */
    float *m;     /* [ATT_TQ] running max */
    float *l;     /* [ATT_TQ] running sum */
    float *shift; /* [ATT_TQ] mask row maximum subtracted from the mask */
    int64_t h;    /* the task's head */
};

static size_t attn_scratch_floats(int head_dim)
{
    size_t hd = ((size_t)head_dim + 15) & ~(size_t)15;
    return (size_t)ATT_TQ * ATT_TK + 2 * (size_t)ATT_TQ * hd + 3 * (size_t)ATT_TQ;
}

static struct attn_tile attn_tile_at(const struct attn_job *j, int thread)
{
    struct attn_tile t;
    size_t hd = ((size_t)j->head_dim + 15) & ~(size_t)15;
    t.s = j->scratch + (size_t)thread * j->scratch_floats;
    t.acc = t.s + (size_t)ATT_TQ * ATT_TK;
    t.qt = t.acc + (size_t)ATT_TQ * hd;
    t.m = t.qt + hd * ATT_TQ;
    t.l = t.m + ATT_TQ;
    t.shift = t.l + ATT_TQ;
    return t;
}

#define LANES 16

/* Max of n floats in LANES lanes (vectorised without reassociation flags). */
static float max_f32(const float *x, int64_t n)
{
    float acc[LANES];
    for (int l = 0; l < LANES; l++)
        acc[l] = -INFINITY;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] = x[i + l] > acc[l] ? x[i + l] : acc[l];
    for (; i < n; i++)
        acc[0] = x[i] > acc[0] ? x[i] : acc[0];
    float m = acc[0];
    for (int l = 1; l < LANES; l++)
        m = acc[l] > m ? acc[l] : m;
    return m;
}

static const float *mask_row(const struct attn_job *j, int64_t b, int64_t qi)
{
    return j->mask + b * j->mask_nb0 + (j->mq == 1 ? 0 : qi) * j->mask_nb1;
}

/* tq rounded up to the register blocks' width (ATT_TQ is a multiple). */
static int64_t round_width(const struct attn_job *j, int64_t tq)
{
    return (tq + j->width - 1) / j->width * j->width;
}

/* qt[c][i] = scale * q[i][c] for the tile's tq queries, 0 up to the block
 * width: S^T = K Q^T then needs no scaling and no edge case in its columns. */
static void attn_pack_qt(const struct attn_job *j, const struct attn_tile *t, const float *q,
                         int64_t tq)
{
    int hd = j->head_dim;
    int64_t tqp = round_width(j, tq);
    for (int64_t i = 0; i < tq; i++)
        for (int c = 0; c < hd; c++)
            t->qt[c * ATT_TQ + i] = j->scale * q[i * j->ldq + c];
    for (int c = 0; c < hd; c++)
        for (int64_t i = tq; i < tqp; i++)
            t->qt[c * ATT_TQ + i] = 0.0f;
}

#if ATT_SIMD

/* Calls BLOCK(R) once, for R = rem clamped to [1, max] as a compile-time
 * constant, so each register-blocked kernel is unrolled for every row count
 * it meets; max is 6 (AVX2) or 12 (AVX-512). */
#define ATT_REM(rem, max, BLOCK)                                                                   \
    switch ((rem) < (max) ? (rem) : (max)) {                                                       \
        ATT_CASES_##max(BLOCK)                                                                     \
    }
#define ATT_CASES_12(BLOCK)                                                                        \
    ATT_CASE(12, BLOCK)                                                                            \
    ATT_CASE(11, BLOCK)                                                                            \
    ATT_CASE(10, BLOCK)                                                                            \
    ATT_CASE(9, BLOCK)                                                                             \
    ATT_CASE(8, BLOCK)                                                                             \
    ATT_CASE(7, BLOCK)                                                                             \
    ATT_CASES_6(BLOCK)
#define ATT_CASES_6(BLOCK)                                                                         \
    ATT_CASE(6, BLOCK)                                                                             \
    ATT_CASE(5, BLOCK)                                                                             \
    ATT_CASE(4, BLOCK)                                                                             \
    ATT_CASE(3, BLOCK)                                                                             \
    ATT_CASE(2, BLOCK)                                                                             \
    default:                                                                                       \
        BLOCK(1);                                                                                  \
        break;
#define ATT_CASE(R, BLOCK)                                                                         \
    case R:                                                                                        \
        BLOCK(R);                                                                                  \
        break;

/* R key rows x 16 query columns of S^T = K Q^T: 2R accumulators; per step of
 * the head dim, two loads of qt and R broadcasts of k. Adds add[r] to key
 * row r (a mask shared by all queries) when add is set, and folds the rows
 * into the 16 column maxima at mx. */
static inline __attribute__((always_inline)) void st_block(float *st, const float *k, int64_t ldk,
                                                           const float *qt, int hd,
                                                           const float *add, float *mx, const int R)
{
    __m256 acc[6][2];
    for (int r = 0; r < R; r++)
        acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int c = 0; c < hd; c++) {
        __m256 q0 = _mm256_loadu_ps(qt + c * ATT_TQ), q1 = _mm256_loadu_ps(qt + c * ATT_TQ + 8);
        for (int r = 0; r < R; r++) {
            __m256 kv = _mm256_broadcast_ss(k + r * ldk + c);
            acc[r][0] = _mm256_fmadd_ps(kv, q0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(kv, q1, acc[r][1]);
        }
    }
    __m256 m0 = _mm256_loadu_ps(mx), m1 = _mm256_loadu_ps(mx + 8);
    for (int r = 0; r < R; r++) {
        if (add != NULL) {
            __m256 a = _mm256_broadcast_ss(add + r);
            acc[r][0] = _mm256_add_ps(acc[r][0], a);
            acc[r][1] = _mm256_add_ps(acc[r][1], a);
        }
        m0 = _mm256_max_ps(acc[r][0], m0); /* a NaN score leaves the max alone */
        m1 = _mm256_max_ps(acc[r][1], m1);
        _mm256_storeu_ps(st + r * ATT_TQ, acc[r][0]);
        _mm256_storeu_ps(st + r * ATT_TQ + 8, acc[r][1]);
    }
    _mm256_storeu_ps(mx, m0);
    _mm256_storeu_ps(mx + 8, m1);
}

#define ST_CASE(R) st_block(st, kr, ldk, qt, hd, add ? add + r0 : NULL, mx + i0, R)

/* S^T (tk rows of ATT_TQ) = K (tk rows of the tile) Q^T (+ add[row]) for
 * tqp columns, and the column maxima into mx. */
static void attn_scores256(const struct attn_job *j, const struct attn_tile *t, const float *k,
                           int64_t tk, int64_t tqp, const float *add, float *mx)
{
    int hd = j->head_dim;
    int64_t ldk = j->ldk;
    /* Key rows outside, query columns inside: the six rows of K stay in L1
     * while all of Q^T (head_dim x 64 floats, 10 KB at 40) is reused. */
    for (int64_t r0 = 0; r0 < tk; r0 += 6) {
        const float *kr = k + r0 * ldk;
        for (int64_t i0 = 0; i0 < tqp; i0 += 16) {
            const float *qt = t->qt + i0;
            float *st = t->s + r0 * ATT_TQ + i0;
            ATT_REM(tk - r0, 6, ST_CASE)
        }
    }
}

#undef ST_CASE

/* R head-dim rows x 16 query columns of O^T += V^T P^T over tk keys: the
 * same shape of kernel as st_block, with v broadcast and P^T rows loaded. */
static inline __attribute__((always_inline)) void
pv_block(float *acc, const float *pt, const float *v, int64_t ldv, int64_t tk, const int R)
{
    __m256 o[6][2];
    for (int r = 0; r < R; r++) {
        o[r][0] = _mm256_loadu_ps(acc + r * ATT_TQ);
        o[r][1] = _mm256_loadu_ps(acc + r * ATT_TQ + 8);
    }
    for (int64_t jj = 0; jj < tk; jj++) {
        __m256 p0 = _mm256_loadu_ps(pt + jj * ATT_TQ), p1 = _mm256_loadu_ps(pt + jj * ATT_TQ + 8);
        for (int r = 0; r < R; r++) {
            __m256 vb = _mm256_broadcast_ss(v + jj * ldv + r);
            o[r][0] = _mm256_fmadd_ps(vb, p0, o[r][0]);
            o[r][1] = _mm256_fmadd_ps(vb, p1, o[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(acc + r * ATT_TQ, o[r][0]);
        _mm256_storeu_ps(acc + r * ATT_TQ + 8, o[r][1]);
    }
}

#ifndef PV_CHUNK
#define PV_CHUNK 64 /* keys per pass: P^T (16 KB) and V (10 KB at 40) stay in L1 */
#endif
#define PV_CASE(R) pv_block(t->acc + d0 * ATT_TQ + i0, pt + i0, vr + d0, ldv, n, R)

/* O^T (head_dim rows of ATT_TQ) += V^T P^T, P^T in t->s, V the tile's tk rows. */
static void attn_pv256(const struct attn_job *j, const struct attn_tile *t, const float *v,
                       int64_t tqp, int64_t tk)
{
    int hd = j->head_dim;
    int64_t ldv = j->ldv;
    for (int64_t j0 = 0; j0 < tk; j0 += PV_CHUNK) {
        int64_t n = tk - j0 < PV_CHUNK ? tk - j0 : PV_CHUNK;
        const float *pt = t->s + j0 * ATT_TQ, *vr = v + j0 * ldv;
        for (int d0 = 0; d0 < hd; d0 += 6)
            for (int64_t i0 = 0; i0 < tqp; i0 += 16) {
                ATT_REM(hd - d0, 6, PV_CASE)
            }
    }
}

#undef PV_CASE

/* The same two products with AVX-512 where the CPU has it (checked at run
 * time; the build targets AVX2): blocks of up to 12 rows x 32 query columns,
 * 24 accumulators of the 32 zmm registers, so each broadcast feeds two
 * 16-wide FMAs and each row load twelve. */
#define ATT_512 __attribute__((target("avx512f")))

static inline ATT_512 __attribute__((always_inline)) void st_block512(float *st, const float *k,
                                                                      int64_t ldk, const float *qt,
                                                                      int hd, const float *add,
                                                                      float *mx, const int R)
{
    __m512 acc[12][2];
    for (int r = 0; r < R; r++)
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int c = 0; c < hd; c++) {
        __m512 q0 = _mm512_loadu_ps(qt + c * ATT_TQ), q1 = _mm512_loadu_ps(qt + c * ATT_TQ + 16);
        for (int r = 0; r < R; r++) {
            __m512 kv = _mm512_set1_ps(k[r * ldk + c]);
            acc[r][0] = _mm512_fmadd_ps(kv, q0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(kv, q1, acc[r][1]);
        }
    }
    __m512 m0 = _mm512_loadu_ps(mx), m1 = _mm512_loadu_ps(mx + 16);
    for (int r = 0; r < R; r++) {
        if (add != NULL) {
            __m512 a = _mm512_set1_ps(add[r]);
            acc[r][0] = _mm512_add_ps(acc[r][0], a);
            acc[r][1] = _mm512_add_ps(acc[r][1], a);
        }
        m0 = _mm512_max_ps(acc[r][0], m0);
        m1 = _mm512_max_ps(acc[r][1], m1);
        _mm512_storeu_ps(st + r * ATT_TQ, acc[r][0]);
        _mm512_storeu_ps(st + r * ATT_TQ + 16, acc[r][1]);
    }
    _mm512_storeu_ps(mx, m0);
    _mm512_storeu_ps(mx + 16, m1);
}

static inline ATT_512 __attribute__((always_inline)) void
pv_block512(float *acc, const float *pt, const float *v, int64_t ldv, int64_t n, const int R)
{
    __m512 o[12][2];
    for (int r = 0; r < R; r++) {
        o[r][0] = _mm512_loadu_ps(acc + r * ATT_TQ);
        o[r][1] = _mm512_loadu_ps(acc + r * ATT_TQ + 16);
    }
    for (int64_t jj = 0; jj < n; jj++) {
        __m512 p0 = _mm512_loadu_ps(pt + jj * ATT_TQ), p1 = _mm512_loadu_ps(pt + jj * ATT_TQ + 16);
        for (int r = 0; r < R; r++) {
            __m512 vb = _mm512_set1_ps(v[jj * ldv + r]);
            o[r][0] = _mm512_fmadd_ps(vb, p0, o[r][0]);
            o[r][1] = _mm512_fmadd_ps(vb, p1, o[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(acc + r * ATT_TQ, o[r][0]);
        _mm512_storeu_ps(acc + r * ATT_TQ + 16, o[r][1]);
    }
}

#define ST512(R) st_block512(st, kr, ldk, t->qt + i0, hd, add ? add + r0 : NULL, mx + i0, R)

static ATT_512 void attn_scores512(const struct attn_job *j, const struct attn_tile *t,
                                   const float *k, int64_t tk, int64_t tqp, const float *add,
                                   float *mx)
{
    int hd = j->head_dim;
    int64_t ldk = j->ldk;
    for (int64_t r0 = 0; r0 < tk; r0 += 12) {
        const float *kr = k + r0 * ldk;
        for (int64_t i0 = 0; i0 < tqp; i0 += 32) {
            float *st = t->s + r0 * ATT_TQ + i0;
            ATT_REM(tk - r0, 12, ST512)
        }
    }
}

#define PV512(R) pv_block512(t->acc + d0 * ATT_TQ + i0, pt + i0, vr + d0, ldv, n, R)

static ATT_512 void attn_pv512(const struct attn_job *j, const struct attn_tile *t, const float *v,
                               int64_t tqp, int64_t tk)
{
    int hd = j->head_dim;
    int64_t ldv = j->ldv;
    for (int64_t j0 = 0; j0 < tk; j0 += PV_CHUNK) {
        int64_t n = tk - j0 < PV_CHUNK ? tk - j0 : PV_CHUNK;
        const float *pt = t->s + j0 * ATT_TQ, *vr = v + j0 * ldv;
        for (int d0 = 0; d0 < hd; d0 += 12)
            for (int64_t i0 = 0; i0 < tqp; i0 += 32) {
                ATT_REM(hd - d0, 12, PV512)
            }
    }
}

#undef ST512
#undef PV512
#undef ATT_REM
#undef ATT_CASES_12
#undef ATT_CASES_6
#undef ATT_CASE

static __attribute__((noinline)) void attn_scores(const struct attn_job *j,
                                                  const struct attn_tile *t, const float *k,
                                                  int64_t tk, int64_t tqp, const float *add,
                                                  float *mx)
{
    if (j->width == 32)
        attn_scores512(j, t, k, tk, tqp, add, mx);
    else
        attn_scores256(j, t, k, tk, tqp, add, mx);
}

static __attribute__((noinline)) void attn_pv(const struct attn_job *j, const struct attn_tile *t,
                                              const float *v, int64_t tqp, int64_t tk)
{
    if (j->width == 32)
        attn_pv512(j, t, v, tqp, tk);
    else
        attn_pv256(j, t, v, tqp, tk);
}

static int att_width = 16;
static pthread_once_t att_width_once = PTHREAD_ONCE_INIT;

/* AVX-512 when the CPU has it, unless BS_CPU_ISA=avx2 asks for the AVX2
 * kernels (the tests run both). */
static void att_width_init(void)
{
    const char *isa = getenv("BS_CPU_ISA");
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && !(isa != NULL && strcmp(isa, "avx2") == 0))
        att_width = 32;
}

static int attn_width(void)
{
    pthread_once(&att_width_once, att_width_init);
    return att_width;
}

#else /* !ATT_SIMD: the same products through OpenBLAS */

static int attn_width(void)
{
    return 16;
}

static __attribute__((noinline)) void attn_scores(const struct attn_job *j,
                                                  const struct attn_tile *t, const float *k,
                                                  int64_t tk, int64_t tqp, const float *add,
                                                  float *mx)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)tk, (blasint)tqp, j->head_dim,
                1.0f, k, (blasint)j->ldk, t->qt, ATT_TQ, 0.0f, t->s, ATT_TQ);
    for (int64_t jj = 0; jj < tk; jj++) {
        float *row = t->s + jj * ATT_TQ;
        for (int64_t i = 0; i < tqp; i++) {
            row[i] += add ? add[jj] : 0.0f;
            mx[i] = row[i] > mx[i] ? row[i] : mx[i];
        }
    }
}

static __attribute__((noinline)) void attn_pv(const struct attn_job *j, const struct attn_tile *t,
                                              const float *v, int64_t tqp, int64_t tk)
{
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, j->head_dim, (blasint)tqp, (blasint)tk,
                1.0f, v, (blasint)j->ldv, t->s, ATT_TQ, 1.0f, t->acc, ATT_TQ);
}

#endif

/* exp(x) for the softmax, where x <= 0 (or NaN): Cephes' degree-5 expf
 * polynomial on [-ln2/2, ln2/2] (relative error about 2e-7, checked against
 * libm in the unit tests through the attention op) with a single 2^n scale,
 * which is enough because n >= -126 here; exactly 0 below -87 and for -inf,
 * so masked keys weigh nothing. Cheaper than bs_expf, which must cover the
 * whole float range. */
static inline float softmax_exp(float x)
{
    float flush = x < -87.0f ? 0.0f : 1.0f;
    x = x < -87.0f ? -87.0f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = BS_FMAF(x, 1.44269504088896341f, magic);
    float n = t - magic;
    int32_t ni = (int32_t)(bs__f2u(t) - bs__f2u(magic));
    float r = BS_FMAF(n, -0.693145751953125f, x);
    r = BS_FMAF(n, -1.42860682030941723212e-6f, r);
    float p = 1.9875691500e-4f;
    p = BS_FMAF(p, r, 1.3981999507e-3f);
    p = BS_FMAF(p, r, 8.3334519073e-3f);
    p = BS_FMAF(p, r, 4.1665795894e-2f);
    p = BS_FMAF(p, r, 1.6666665459e-1f);
    p = BS_FMAF(p, r, 5.0000001201e-1f);
    float y = BS_FMAF(p, r * r, r) + 1.0f;
    return y * bs__u2f((uint32_t)(ni + 127) << 23) * flush;
}

/* S^T for one key tile with its mask, and each query's maximum in mx. A mask
 * row shared by all queries is a constant per key, added inside the product;
 * a mask per query is added afterwards. Either is shifted by the query's
 * mask maximum (see the top of the file). */
static void attn_tile_scores(const struct attn_job *j, const struct attn_tile *t, int64_t b,
                             int64_t q0, int64_t tq, int64_t k0, int64_t tk, float *mx)
{
    float add[ATT_TK];
    const float *k = j->k + (b * j->lk + k0) * j->ldk;
    int64_t tqp = round_width(j, tq);
    for (int64_t i = 0; i < tqp; i++)
        mx[i] = -INFINITY;
    if (j->mask != NULL && j->mq == 1) {
        const float *mr = mask_row(j, b, 0) + k0;
        for (int64_t jj = 0; jj < tk; jj++)
            add[jj] = mr[jj] - t->shift[0];
    }
    attn_scores(j, t, k + t->h * j->head_dim, tk, tqp, j->mask != NULL && j->mq == 1 ? add : NULL,
                mx);
    if (j->mask == NULL || j->mq == 1)
        return;
    for (int64_t i = 0; i < tq; i++) {
        const float *mr = mask_row(j, b, q0 + i) + k0;
        float sh = t->shift[i];
        for (int64_t jj = 0; jj < tk; jj++)
            t->s[jj * ATT_TQ + i] += mr[jj] - sh;
        mx[i] = -INFINITY;
    }
    for (int64_t jj = 0; jj < tk; jj++) {
        const float *row = t->s + jj * ATT_TQ;
        for (int64_t i = 0; i < tq; i++)
            mx[i] = row[i] > mx[i] ? row[i] : mx[i];
    }
}

/* Fold one key tile's scores (S^T in t->s, column maxima mx) into the
 * running softmax of the tile's queries: per query a running max m and sum l;
 * leaves probabilities in t->s and rescales the accumulator by
 * exp(m_old - m_new). Loops run over queries, the contiguous dim, so they
 * vectorise. */
static __attribute__((noinline, target_clones("arch=x86-64-v4", "default"))) void
attn_softmax_tile(const struct attn_job *j, const struct attn_tile *t, int64_t tq, int64_t tk,
                  const float *mx)
{
    float ref[ATT_TQ], corr[ATT_TQ];
    for (int64_t i = 0; i < tq; i++) {
        float m_new = mx[i] > t->m[i] ? mx[i] : t->m[i];
        ref[i] = m_new == -INFINITY ? 0.0f : m_new; /* all -inf so far: weights 0 */
        corr[i] = softmax_exp(t->m[i] - ref[i]);    /* 0 while m_old is -inf */
        t->m[i] = m_new;
        t->l[i] *= corr[i];
    }
    for (int64_t jj = 0; jj < tk; jj++) {
        float *row = t->s + jj * ATT_TQ;
        for (int64_t i = 0; i < tq; i++) {
            float e = softmax_exp(row[i] - ref[i]);
            row[i] = e;
            t->l[i] += e;
        }
    }
    for (int c = 0; c < j->head_dim; c++) {
        float *a = t->acc + c * ATT_TQ;
        for (int64_t i = 0; i < tq; i++)
            a[i] *= corr[i];
    }
}

/* Mask row maxima (0 where a row is -inf everywhere, or without a mask). */
static void attn_mask_shift(const struct attn_job *j, const struct attn_tile *t, int64_t b,
                            int64_t q0, int64_t tq)
{
    for (int64_t i = 0; i < tq; i++) {
        if (j->mask == NULL || (i > 0 && j->mq == 1)) {
            t->shift[i] = j->mask ? t->shift[0] : 0.0f;
            continue;
        }
        float mx = max_f32(mask_row(j, b, q0 + i), j->lk);
        t->shift[i] = isfinite(mx) ? mx : 0.0f;
    }
}

static void attn_task(void *arg, int64_t task, int thread)
{
    const struct attn_job *j = arg;
    int64_t qt = task % j->q_tiles, bh = task / j->q_tiles;
    int64_t b = bh / j->heads, h = bh % j->heads;
    int64_t q0 = qt * ATT_TQ, tq = j->lq - q0 < ATT_TQ ? j->lq - q0 : ATT_TQ;
    int hd = j->head_dim;
    float mx[ATT_TQ];
    struct attn_tile t = attn_tile_at(j, thread);
    t.h = h;

    attn_pack_qt(j, &t, j->q + (b * j->lq + q0) * j->ldq + h * hd, tq);
    for (int64_t i = 0; i < tq; i++) {
        t.m[i] = -INFINITY;
        t.l[i] = 0.0f;
    }
    attn_mask_shift(j, &t, b, q0, tq);
    memset(t.acc, 0, (size_t)ATT_TQ * (size_t)hd * sizeof(float));
    for (int64_t k0 = 0; k0 < j->lk; k0 += ATT_TK) {
        int64_t tk = j->lk - k0 < ATT_TK ? j->lk - k0 : ATT_TK;
        attn_tile_scores(j, &t, b, q0, tq, k0, tk, mx);
        attn_softmax_tile(j, &t, tq, tk, mx);
        attn_pv(j, &t, j->v + (b * j->lk + k0) * j->ldv + h * hd, round_width(j, tq), tk);
    }
    for (int64_t i = 0; i < tq; i++) {
        t.l[i] = t.l[i] > 0.0f ? 1.0f / t.l[i] : 0.0f;
        float *o = j->o + (b * j->lq + q0 + i) * j->ldo + h * hd;
        for (int c = 0; c < hd; c++)
            o[c] = t.acc[c * ATT_TQ + i] * t.l[i];
    }
}

/* The CPU's own limit on top of the shared checks: row strides go to cblas
 * as int. */
static int attn_check_ld(const struct bs_tensor *o, const struct bs_tensor *q,
                         const struct bs_tensor *k, const struct bs_tensor *v, struct bs_err *err)
{
    const struct bs_tensor *ts[4] = {q, k, v, o};
    const char *names[4] = {"q", "k", "v", "o"};
    for (int i = 0; i < 4; i++)
        if (bs_tensor_ld(ts[i]) > INT32_MAX)
            return bs_err_set(err, BS_ERANGE, "attention: %s row stride exceeds the BLAS range",
                              names[i]);
    return 0;
}

int bs__cpu_attention(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                      const struct bs_tensor *k, const struct bs_tensor *v,
                      const struct bs_attn_params *p, struct bs_err *err)
{
    struct bs__cpu *c = ctx;
    struct attn_job j = {0};
    int rc;
    if ((rc = bs_opcheck_attention(o, q, k, v, p, err)) || (rc = attn_check_ld(o, q, k, v, err)) ||
        (rc = bs_opcheck_attention_mask(p, err)))
        return rc;
    if (p->mask != NULL) {
        j.mask = p->mask->data;
        j.mq = p->mask->ne[1] == 1 ? 1 : p->lq;
        j.mask_nb0 = p->mask->nb[0] / 4;
        j.mask_nb1 = p->mask->nb[1] / 4;
    }
    if (p->batch == 0 || p->lq == 0)
        return 0;
    j.q = q->data;
    j.k = k->data;
    j.v = v->data;
    j.o = o->data;
    j.ldq = bs_tensor_ld(q);
    j.ldk = bs_tensor_ld(k);
    j.ldv = bs_tensor_ld(v);
    j.ldo = bs_tensor_ld(o);
    j.lq = p->lq;
    j.lk = p->lk;
    j.heads = p->heads;
    j.head_dim = p->head_dim;
    j.scale = p->scale;
    j.q_tiles = (p->lq + ATT_TQ - 1) / ATT_TQ;
    j.width = attn_width();

    pthread_mutex_lock(&c->scratch_lock);
    rc = bs__cpu_scratch_reserve(c, attn_scratch_floats(p->head_dim), err);
    if (rc == 0) {
        j.scratch = c->scratch;
        j.scratch_floats = c->scratch_floats;
        bs_pool_run(c->pool, p->batch * p->heads * j.q_tiles, attn_task, &j);
    }
    pthread_mutex_unlock(&c->scratch_lock);
    return rc;
}
