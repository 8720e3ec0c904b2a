/* FlashAttention-style multi-head attention on the CPU.
 *
 * One pool task per (sample, head, tile of ATT_TQ queries); with BF16
 * products, per group of up to ATT_NQ such tiles (below). Samples may differ
 * in length (ragged batches, below). The task packs its queries transposed
 * and scaled, Q^T (head_dim x ATT_TQ), then walks its sample's keys
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
 * this speed.) Where the context's instruction set (c->isa: what the CPU has,
 * capped by BS_CPU_ISA, so one setting governs every kernel) reaches AVX-512
 * the same kernels run 12 rows x 32 queries in zmm registers; BS_CPU_ISA=avx2
 * keeps the AVX2 ones, and BS_CPU_ISA=generic, like a build without AVX2,
 * makes both products cblas_sgemm calls on the same tiles.
 *
 * BF16 products. A call with compute BF16 on a context with AVX512_BF16 runs
 * both products as vdpbf16ps (pairs of BF16 multiplied, FP32 accumulation) in
 * the same 12 x 32 blocks, a step now covering a pair of the head dim
 * (scores) or of keys (P V): half the steps of the FP32 kernels. The operands
 * are rounded to nearest even in layouts where one 32-bit broadcast gives a
 * row's pair: the query tile, scaled first as the FP32 path scales, as
 * head-dim pairs [head_dim / 2][ATT_TQ]; each key tile's K rows as head-dim
 * pairs [ATT_TK][head_dim / 2] and V as key pairs [ATT_TK / 2][head_dim]; P^T
 * as key pairs [ATT_TK / 2][ATT_TQ], written by the softmax as it computes P.
 * An odd head dim or key count is padded with zeros. The softmax (maxima,
 * exp, the sum l, the mask, o = O / l) is FP32 and the FP32 path's arithmetic
 * (its exp gives the same bits, l sums in the same order): only P's copy for
 * the product is rounded. The query tiles go in and out through 16 x 16
 * register transposes. Converting a key tile costs half of what one query
 * tile's products over it do at head_dim 40, so a BF16 task takes up to
 * ATT_NQ query tiles that share each converted key tile (fewer where that
 * would leave the threads too few tasks, or the accumulators outgrow the L2
 * cache). Scratch: S^T, the key tile in BF16, and per query tile O^T, the
 * BF16 queries and the three vectors; about 280 KB per thread at head_dim 40,
 * 1 MB at 512. A BF16 call on a context below AVX512_BF16 (the CPU,
 * BS_CPU_ISA=avx2 or avx512, or a portable build) runs the FP32 kernels and
 * gives their result to the bit: on the AVX2 path BF16 models compute
 * attention in FP32.
 *
 * Masks, by the rule every backend and kernel follows (README.md, "Inputs and
 * semantics"; kernels/cuda/attn_kernels.cuh). Softmax is invariant under
 * adding a constant to a row, so each mask row is shifted by its own maximum
 * M before it is added: a row masked uniformly (-10000 everywhere) then adds
 * exactly 0 and gives softmax of the raw scores, as exact arithmetic would,
 * instead of losing the scores' low bits in s + (-10000) (float spacing at
 * 10000 is 1e-3). A mask value <= -FLT_MAX (torch.finfo(float32).min, the
 * Hugging Face convention, or -inf) masks its key: weight 0. A row whose keys
 * are all masked gives what diffusers computes where that is finite: with at
 * least one key at -FLT_MAX (M = -FLT_MAX), the average of V over the keys at
 * -FLT_MAX (there s + finfo.min rounds to finfo.min for every key, so the
 * softmax is uniform; -inf keys get 0), done here by replacing the row's
 * scores with 0 and -inf (attn_uniform_rows); with every key at -inf, 0 (a
 * choice: PyTorch's softmax would give NaN; 0 keeps a batch with one empty
 * row usable). Lk = 0 also gives 0. mask_term is the rule per key.
 *
 * Ragged batches (bs_attn_params.q_off, engine/backend.h): each sample is
 * computed as a uniform batch of one on its own rows would be, with the same
 * tiles from its first query and its first key, and its part of the flat
 * mask read as that call's [1, 1 or Lq, Lk] mask; so its rows of o are the
 * bits that call gives (tiles grouped into tasks differently compute the
 * same values). The tasks are enumerated per sample over its own
 * lengths: sample b has heads x ceil(ceil(lq_b / ATT_TQ) / nq) of them, and
 * no task covers another sample's rows or a padding to the longest, so a
 * batch costs what its samples cost. A table of the samples (struct
 * attn_seq) in task order, each with its first task, maps a task to its
 * sample by bisection; the samples go in decreasing order of their largest
 * task's work (queries padded to the register blocks times keys), so that
 * the pool, whose threads take the next task as they finish one, starts the
 * long tasks first and fills the end with short ones. nq (BF16) is chosen as
 * for a uniform batch, from the task count it leaves. A uniform batch needs
 * no table: its sample is task / (heads x q_groups).
 *
 * Thread ownership: the job is read-only during the run; each task writes its
 * own rows of o and the scratch slice of the thread running it. The entry
 * holds the context's scratch_lock from reserving the scratch until the pool
 * run returns. */
#include <cblas.h>
#include <float.h>
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
#define ATT_TQ 64 /* queries per tile */
#endif
#ifndef ATT_TK
#define ATT_TK 256 /* keys per tile */
#endif
#ifndef ATT_NQ
#define ATT_NQ 8 /* query tiles per task at most (BF16; FP32 tasks take 1) */
#endif
#ifndef ATT_NQ_BYTES
#define ATT_NQ_BYTES (512 << 10) /* and the size of their accumulators (attn_group_tiles) */
#endif

/* The products' kernels, chosen per call from the context's instruction set
 * (c->isa) and the call's compute dtype. */
enum attn_kernel {
    KERN_BLAS,   /* cblas_sgemm on the tiles (BS__ISA_GENERIC, or a build without AVX2) */
    KERN_AVX2,   /* 6 x 16 register blocks in ymm */
    KERN_AVX512, /* 12 x 32 register blocks in zmm */
    KERN_BF16,   /* 12 x 32 register blocks of vdpbf16ps (compute BF16, AVX512_BF16) */
};

/* One sample of the batch as its tasks see it: where its rows are, its
 * lengths, its mask, and its tasks (heads x q_groups from task0, head-major). */
struct attn_seq {
    int64_t q_row, k_row; /* its first row of q and o, of k and v */
    int64_t lq, lk;       /* its queries (>= 1) and keys (>= 0) */
    const float *mask;    /* its first mask row, or NULL without a mask */
    int64_t mask_ld;      /* floats from one query's mask row to the next's */
    bool mask_shared;     /* one mask row for all its queries (mask_ld unused) */
    int64_t q_groups;     /* tasks per head: its query tiles / nq rounded up */
    int64_t task0;        /* its first task */
    int64_t cost;         /* ragged batch: its largest task's work, roughly, to order by */
};

struct attn_job {
    const float *q, *k, *v, *mask;
    float *o;
    int64_t ldq, ldk, ldv, ldo;
    int64_t lq, lk;             /* uniform batch: every sample's lengths */
    int64_t mq;                 /* uniform mask rows per sample: 1 or lq (0: no mask) */
    int64_t mask_nb0, mask_nb1; /* uniform mask strides in floats: sample, query row */
    int heads, head_dim;
    float scale;
    int64_t q_tiles; /* uniform batch: query tiles per sample */
    enum attn_kernel kernel;
    int width;        /* query columns per register block: 16 (AVX2, BLAS), 32 (AVX-512) */
    int nq;           /* query tiles per task at most */
    int64_t q_groups; /* uniform batch: tasks per (sample, head), q_tiles / nq rounded up */
    const struct attn_seq *seqs; /* ragged batch: its samples in task order; NULL if uniform */
    int64_t n_seqs;
    int64_t n_tasks;
    float *scratch;
    size_t scratch_floats; /* per thread */
};

/* One query tile of a task, and its view of the thread's scratch: s, kb, vb
 * and pb are shared by the task's tiles, the rest is the tile's own. The
 * BF16 buffers hold BF16 pairs, two values in one uint32_t (the lower index
 * in the low half), as vdpbf16ps multiplies them. */
struct attn_tile {
    float *s;     /* [ATT_TK][ATT_TQ] S^T: scores, then probabilities */
    float *acc;   /* [head_dim][ATT_TQ] output accumulator, transposed (O^T) */
    float *qt;    /* [head_dim][ATT_TQ] the query tile transposed and scaled (FP32) */
    float *m;     /* [ATT_TQ] running max */
    float *l;     /* [ATT_TQ] running sum */
    float *shift; /* [ATT_TQ] mask row maximum subtracted from the mask */
    uint32_t *qb; /* BF16: [hd2][ATT_TQ] the scaled query tile, head-dim pairs */
    uint32_t *kb; /* BF16: [ATT_TK][hd2] the key tile's rows, head-dim pairs */
    uint32_t *vb; /* BF16: [ATT_TK / 2][hd16] the value tile, key pairs */
    uint32_t *pb; /* BF16: [ATT_TK / 2][ATT_TQ] P^T, key pairs */
    int64_t h;    /* the task's head */
    int64_t q0;   /* the tile's first query in its sample, */
    int64_t tq;   /* and its number of queries */
    int64_t k0;   /* the current key tile's first key in its sample */

    const struct attn_seq *sq; /* the task's sample */
};

_Static_assert(ATT_TQ % 32 == 0 && ATT_TK % 2 == 0 && ATT_TQ <= ATT_TK,
               "tiles: ATT_TQ a multiple of 32, ATT_TK even and at least ATT_TQ");

/* Lays one thread's scratch out from base for nq query tiles t[0, nq), or
 * only measures it (base NULL); returns its size in floats. Buffers start
 * 64-byte aligned (hd2: head-dim pairs, hd16: head_dim rounded up to 16); kb
 * has 16 pairs to spare, so that its rows can be stored in whole vectors. */
static size_t attn_layout(struct attn_tile *t, float *base, int head_dim, enum attn_kernel kern,
                          int nq)
{
    size_t hd16 = ((size_t)head_dim + 15) & ~(size_t)15, hd2 = ((size_t)head_dim + 1) / 2;
    size_t tile = hd16 * ATT_TQ; /* a head_dim x ATT_TQ buffer */
    bool bf16 = kern == KERN_BF16;
    size_t off = 0;
#define ATT_TAKE(field, type, n)                                                                   \
    do {                                                                                           \
        if (base != NULL)                                                                          \
            field = (n) > 0 ? (type *)(void *)(base + off) : NULL;                                 \
        off += ((size_t)(n) + 15) & ~(size_t)15;                                                   \
    } while (0)
    ATT_TAKE(t[0].s, float, (size_t)(ATT_TK * ATT_TQ));
    ATT_TAKE(t[0].kb, uint32_t, bf16 ? (size_t)ATT_TK * hd2 + 16 : 0);
    ATT_TAKE(t[0].vb, uint32_t, bf16 ? (size_t)ATT_TK / 2 * hd16 : 0);
    ATT_TAKE(t[0].pb, uint32_t, bf16 ? (size_t)ATT_TK / 2 * ATT_TQ : 0);
    for (int i = 0; i < nq; i++) {
        if (base != NULL && i > 0) {
            t[i].s = t[0].s;
            t[i].kb = t[0].kb;
            t[i].vb = t[0].vb;
            t[i].pb = t[0].pb;
        }
        ATT_TAKE(t[i].acc, float, tile);
        ATT_TAKE(t[i].qt, float, bf16 ? 0 : tile);
        ATT_TAKE(t[i].qb, uint32_t, bf16 ? hd2 * ATT_TQ : 0);
        ATT_TAKE(t[i].m, float, ATT_TQ);
        ATT_TAKE(t[i].l, float, ATT_TQ);
        ATT_TAKE(t[i].shift, float, ATT_TQ);
    }
#undef ATT_TAKE
    return off;
}

/* The sample that task belongs to: in a uniform batch, sample task /
 * (heads x q_groups), described in *own; in a ragged one, found by bisection
 * of the samples' first tasks. */
static const struct attn_seq *attn_seq_of(const struct attn_job *j, int64_t task,
                                          struct attn_seq *own)
{
    if (j->seqs == NULL) {
        int64_t b = task / (j->heads * j->q_groups);
        *own = (struct attn_seq){
            .q_row = b * j->lq,
            .k_row = b * j->lk,
            .lq = j->lq,
            .lk = j->lk,
            .mask = j->mask ? j->mask + b * j->mask_nb0 : NULL,
            .mask_ld = j->mask_nb1,
            .mask_shared = j->mq == 1,
            .q_groups = j->q_groups,
            .task0 = b * j->heads * j->q_groups,
        };
        return own;
    }
    int64_t lo = 0, hi = j->n_seqs - 1; /* the last sample whose task0 <= task */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        if (j->seqs[mid].task0 <= task)
            lo = mid;
        else
            hi = mid - 1;
    }
    return &j->seqs[lo];
}

/* The query tiles of task number task, of sample sq, on this thread's
 * scratch: t[0, n), n returned. A sample's tasks are its heads in turn, each
 * its query tiles in groups of nq. */
static int attn_tiles_at(const struct attn_job *j, int64_t task, const struct attn_seq *sq,
                         int thread, struct attn_tile *t)
{
    int64_t r = task - sq->task0, g = r % sq->q_groups;
    int64_t first = g * j->nq, q_tiles = (sq->lq + ATT_TQ - 1) / ATT_TQ;
    int n = q_tiles - first < j->nq ? (int)(q_tiles - first) : j->nq;
    attn_layout(t, j->scratch + (size_t)thread * j->scratch_floats, j->head_dim, j->kernel, n);
    for (int i = 0; i < n; i++) {
        t[i].sq = sq;
        t[i].h = r / sq->q_groups;
        t[i].q0 = (first + i) * ATT_TQ;
        t[i].tq = sq->lq - t[i].q0 < ATT_TQ ? sq->lq - t[i].q0 : ATT_TQ;
        t[i].k0 = 0;
    }
    return n;
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

/* The mask row of query qi of sample sq. */
static const float *mask_row(const struct attn_seq *sq, int64_t qi)
{
    return sq->mask + (sq->mask_shared ? 0 : qi) * sq->mask_ld;
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

/* The end of a 12 x 32 block of S^T: add[r] to row r (when add is set), the
 * rows folded into the 32 column maxima at mx, the block stored. */
static inline ATT_512 __attribute__((always_inline)) void
st_store512(float *st, __m512 acc[][2], const float *add, float *mx, const int R)
{
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
    st_store512(st, acc, add, mx, R);
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

/* The same two products from BF16 operands where the context has AVX512_BF16
 * and the call asks for BF16 compute: vdpbf16ps multiplies 16 pairs of BF16
 * by 16 pairs and adds both products to 16 FP32 accumulators. Blocks as
 * above (12 rows x 32 queries, 24 accumulators); a step covers a pair of the
 * head dim (scores) or of keys (P V), and a row's pair is one 32-bit
 * broadcast. The build's baseline stays AVX2: these functions alone are
 * compiled for AVX-512 with BF16, and run only when c->isa says so. */
#define ATT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

/* vpermw indices interleaving the halves of 32 BF16: lo[0], hi[0], lo[1], ... */
static const uint16_t att_zip[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

/* Mask of the first n (clamped to [0, 16]) of 16 lanes. */
static inline __mmask16 lanes(int64_t n)
{
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* 16 pairs BF16(a[i]) | BF16(b[i]) << 16, rounded to nearest even. */
static inline ATT_BF16 __m512i bf16_zip(__m512 a, __m512 b)
{
    return _mm512_permutexvar_epi16(_mm512_loadu_si512(att_zip),
                                    (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

/* dst[0, (n + 1) / 2) = BF16(scale * x[c]) for c < n as pairs (c, c + 1), an
 * odd last value paired with 0. Stores whole vectors: up to 15 pairs past
 * the end are overwritten. */
static inline ATT_BF16 void pack_row(uint32_t *dst, const float *x, int n, float scale)
{
    __m512 sc = _mm512_set1_ps(scale);
    for (int c = 0; c < n; c += 32) {
        __m512 a = _mm512_mul_ps(sc, _mm512_maskz_loadu_ps(lanes(n - c), x + c));
        __m512 b = _mm512_mul_ps(sc, _mm512_maskz_loadu_ps(lanes(n - c - 16), x + c + 16));
        _mm512_storeu_si512(dst + c / 2, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
}

/* dst[i] = BF16(r0[i]) | BF16(r1[i]) << 16 for i < n, as whole vectors up to
 * n rounded up to 16 (0 past n); r1 NULL stands for a row of zeros. */
static inline ATT_BF16 void pack_pairs(uint32_t *dst, const float *r0, const float *r1, int n)
{
    for (int i = 0; i < n; i += 16) {
        __m512 a = _mm512_maskz_loadu_ps(lanes(n - i), r0 + i);
        __m512 b = r1 ? _mm512_maskz_loadu_ps(lanes(n - i), r1 + i) : _mm512_setzero_ps();
        _mm512_storeu_si512(dst + i, bf16_zip(a, b));
    }
}

/* Prefetches the cache lines of x[0, n) (for writing: rw 1). Rows of q, k, v
 * and o lie a row stride apart, often more than a page, where the hardware
 * prefetchers do not follow; the BF16 path reads and writes them in passes
 * of their own, so it fetches ATT_AHEAD rows ahead. */
#define ATT_AHEAD 8
static inline void prefetch_row(const float *x, int n, const int rw)
{
    /* __builtin_prefetch needs a constant rw, even at -O0 */
    if (rw) {
        for (int c = 0; c < n; c += 16)
            __builtin_prefetch(x + c, 1, 3);
        __builtin_prefetch(x + n - 1, 1, 3);
    } else {
        for (int c = 0; c < n; c += 16)
            __builtin_prefetch(x + c, 0, 3);
        __builtin_prefetch(x + n - 1, 0, 3);
    }
}

/* Transposes the 16 x 16 block of 32-bit values r[0..15] in place. */
static inline ATT_BF16 void transpose16(__m512i r[16])
{
    __m512i t[16], u[16];
    for (int k = 0; k < 8; k++) {
        t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; k++) {
        u[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
        u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
        u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
        u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
    }
    for (int k = 0; k < 2; k++)
        for (int m = 0; m < 4; m++) {
            t[8 * k + m] = _mm512_shuffle_i32x4(u[8 * k + m], u[8 * k + 4 + m], 0x88);
            t[8 * k + 4 + m] = _mm512_shuffle_i32x4(u[8 * k + m], u[8 * k + 4 + m], 0xdd);
        }
    for (int m = 0; m < 8; m++) {
        r[m] = _mm512_shuffle_i32x4(t[m], t[8 + m], 0x88);
        r[8 + m] = _mm512_shuffle_i32x4(t[m], t[8 + m], 0xdd);
    }
}

/* qb[c][i]: head-dim pair c of query i, scaled before it is rounded (as the
 * FP32 path scales); 0 for the queries from tq to the block width. The rows
 * go to kb first (free until the first key tile), then are transposed in
 * 16 x 16 blocks. */
static ATT_BF16 void attn_pack_qb(const struct attn_job *j, const struct attn_tile *t,
                                  const float *q, int64_t tq)
{
    int hd2 = (j->head_dim + 1) / 2;
    int64_t tqp = round_width(j, tq);
    __m512i r[16];
    for (int64_t i = 0; i < tq; i++) {
        if (i + ATT_AHEAD < tq)
            prefetch_row(q + (i + ATT_AHEAD) * j->ldq, j->head_dim, 0);
        pack_row(t->kb + i * hd2, q + i * j->ldq, j->head_dim, j->scale);
    }
    for (int64_t i0 = 0; i0 < tqp; i0 += 16)
        for (int c0 = 0; c0 < hd2; c0 += 16) {
            for (int i = 0; i < 16; i++) /* kb has 16 pairs to spare past the last row */
                r[i] = i0 + i < tq ? _mm512_loadu_si512(t->kb + (i0 + i) * hd2 + c0)
                                   : _mm512_setzero_si512();
            transpose16(r);
            for (int c = 0; c < 16 && c0 + c < hd2; c++)
                _mm512_storeu_si512(t->qb + (c0 + c) * ATT_TQ + i0, r[c]);
        }
}

/* The key tile at t->k0 (tk keys) in BF16, for all the task's query tiles:
 * K rows as head-dim pairs in kb, V as key pairs in vb (an odd last key
 * paired with zeros). (Prefetching the next tile's rows here measured no
 * faster: the hardware prefetchers follow these strides.) */
static ATT_BF16 void attn_load_kv_bf16(const struct attn_job *j, const struct attn_tile *t,
                                       int64_t tk)
{
    int hd = j->head_dim, hd2 = (hd + 1) / 2, vbs = (hd + 15) & ~15;
    int64_t ldk = j->ldk, ldv = j->ldv;
    const float *k = j->k + (t->sq->k_row + t->k0) * ldk + t->h * hd;
    const float *v = j->v + (t->sq->k_row + t->k0) * ldv + t->h * hd;
    for (int64_t r = 0; r < tk; r++) {
        if (r + ATT_AHEAD < tk)
            prefetch_row(k + (r + ATT_AHEAD) * ldk, hd, 0);
        prefetch_row(v + r * ldv, hd, 0); /* for the loop below */
        pack_row(t->kb + r * hd2, k + r * ldk, hd, 1.0f);
    }
    for (int64_t jp = 0; jp < (tk + 1) / 2; jp++) {
        const float *v0 = v + 2 * jp * ldv;
        pack_pairs(t->vb + jp * vbs, v0, 2 * jp + 1 < tk ? v0 + ldv : NULL, hd);
    }
}

/* R key rows x 32 queries of S^T = K Q^T from BF16 pairs: per pair of the
 * head dim two loads of qb and R broadcasts of a pair of kb. */
static inline ATT_BF16 __attribute__((always_inline)) void
st_block_bf16(float *st, const uint32_t *kb, int hd2, const uint32_t *qb, const float *add,
              float *mx, const int R)
{
    __m512 acc[12][2];
    for (int r = 0; r < R; r++)
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int c = 0; c < hd2; c++) {
        __m512bh q0 = (__m512bh)_mm512_loadu_si512(qb + c * ATT_TQ);
        __m512bh q1 = (__m512bh)_mm512_loadu_si512(qb + c * ATT_TQ + 16);
        for (int r = 0; r < R; r++) {
            __m512bh kv = (__m512bh)_mm512_set1_epi32((int)kb[r * hd2 + c]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], kv, q0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], kv, q1);
        }
    }
    st_store512(st, acc, add, mx, R);
}

/* R head-dim rows x 32 queries of O^T += V^T P^T over np key pairs. */
static inline ATT_BF16 __attribute__((always_inline)) void
pv_block_bf16(float *acc, const uint32_t *pb, const uint32_t *vb, int vbs, int64_t np, const int R)
{
    __m512 o[12][2];
    for (int r = 0; r < R; r++) {
        o[r][0] = _mm512_loadu_ps(acc + r * ATT_TQ);
        o[r][1] = _mm512_loadu_ps(acc + r * ATT_TQ + 16);
    }
    for (int64_t jp = 0; jp < np; jp++) {
        __m512bh p0 = (__m512bh)_mm512_loadu_si512(pb + jp * ATT_TQ);
        __m512bh p1 = (__m512bh)_mm512_loadu_si512(pb + jp * ATT_TQ + 16);
        for (int r = 0; r < R; r++) {
            __m512bh vv = (__m512bh)_mm512_set1_epi32((int)vb[jp * vbs + r]);
            o[r][0] = _mm512_dpbf16_ps(o[r][0], vv, p0);
            o[r][1] = _mm512_dpbf16_ps(o[r][1], vv, p1);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(acc + r * ATT_TQ, o[r][0]);
        _mm512_storeu_ps(acc + r * ATT_TQ + 16, o[r][1]);
    }
}

#define STB(R) st_block_bf16(st, kr, hd2, t->qb + i0, add ? add + r0 : NULL, mx + i0, R)

/* S^T = K Q^T (+ add[row]) and the column maxima from kb and qb. */
static ATT_BF16 void attn_scores_bf16(const struct attn_job *j, const struct attn_tile *t,
                                      int64_t tk, int64_t tqp, const float *add, float *mx)
{
    int hd2 = (j->head_dim + 1) / 2;
    for (int64_t r0 = 0; r0 < tk; r0 += 12) {
        const uint32_t *kr = t->kb + r0 * hd2;
        for (int64_t i0 = 0; i0 < tqp; i0 += 32) {
            float *st = t->s + r0 * ATT_TQ + i0;
            ATT_REM(tk - r0, 12, STB)
        }
    }
}

#ifndef PVB_CHUNK
#define PVB_CHUNK 32 /* key pairs per pass: P^T (8 KB) and V (5 KB at 40) stay in L1 */
#endif
#define PVB(R) pv_block_bf16(t->acc + d0 * ATT_TQ + i0, pb + i0, vb + d0, vbs, n, R)

/* O^T += V^T P^T from pb (the softmax's) and vb. */
static ATT_BF16 void attn_pv_bf16(const struct attn_job *j, const struct attn_tile *t, int64_t tqp,
                                  int64_t tk)
{
    int hd = j->head_dim, vbs = (hd + 15) & ~15;
    int64_t np = (tk + 1) / 2;
    for (int64_t p0 = 0; p0 < np; p0 += PVB_CHUNK) {
        int64_t n = np - p0 < PVB_CHUNK ? np - p0 : PVB_CHUNK;
        const uint32_t *pb = t->pb + p0 * ATT_TQ, *vb = t->vb + p0 * vbs;
        for (int d0 = 0; d0 < hd; d0 += 12)
            for (int64_t i0 = 0; i0 < tqp; i0 += 32) {
                ATT_REM(hd - d0, 12, PVB)
            }
    }
}

#undef STB
#undef PVB
#undef ATT_REM
#undef ATT_CASES_12
#undef ATT_CASES_6
#undef ATT_CASE

#endif /* ATT_SIMD */

/* The products through OpenBLAS: the portable build's kernels, and the
 * SIMD build's under BS_CPU_ISA=generic. */
static void attn_scores_blas(const struct attn_job *j, const struct attn_tile *t, const float *k,
                             int64_t tk, int64_t tqp, const float *add, float *mx)
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

static void attn_pv_blas(const struct attn_job *j, const struct attn_tile *t, const float *v,
                         int64_t tqp, int64_t tk)
{
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, j->head_dim, (blasint)tqp, (blasint)tk,
                1.0f, v, (blasint)j->ldv, t->s, ATT_TQ, 1.0f, t->acc, ATT_TQ);
}

/* The kernels for a call: the context's instruction set (c->isa, so that
 * BS_CPU_ISA governs this op as every other) and the compute dtype; BF16
 * below AVX512_BF16 computes in FP32. */
static enum attn_kernel attn_kernel_for(const struct bs__cpu *c, const struct bs_attn_params *p)
{
#if ATT_SIMD
    if (c->isa >= BS__ISA_AVX512_BF16 && p->compute == BS_TYPE_BF16)
        return KERN_BF16;
    if (c->isa >= BS__ISA_AVX512)
        return KERN_AVX512;
    if (c->isa >= BS__ISA_AVX2)
        return KERN_AVX2;
#endif
    return KERN_BLAS;
}

/* Q^T (FP32) or qb (BF16) for the tile's queries. */
static void attn_pack_q(const struct attn_job *j, const struct attn_tile *t)
{
    const float *q = j->q + (t->sq->q_row + t->q0) * j->ldq + t->h * j->head_dim;
#if ATT_SIMD
    if (j->kernel == KERN_BF16) {
        attn_pack_qb(j, t, q, t->tq);
        return;
    }
#endif
    attn_pack_qt(j, t, q, t->tq);
}

/* The key tile at t->k0 in the BF16 kernels' operand layout (FP32: nothing
 * to do, the products read k and v in place). */
static void attn_load_kv(const struct attn_job *j, const struct attn_tile *t, int64_t tk)
{
#if ATT_SIMD
    if (j->kernel == KERN_BF16)
        attn_load_kv_bf16(j, t, tk);
#endif
}

static __attribute__((noinline)) void attn_scores(const struct attn_job *j,
                                                  const struct attn_tile *t, const float *k,
                                                  int64_t tk, int64_t tqp, const float *add,
                                                  float *mx)
{
    switch (j->kernel) {
#if ATT_SIMD
    case KERN_BF16:
        attn_scores_bf16(j, t, tk, tqp, add, mx);
        break;
    case KERN_AVX512:
        attn_scores512(j, t, k, tk, tqp, add, mx);
        break;
    case KERN_AVX2:
        attn_scores256(j, t, k, tk, tqp, add, mx);
        break;
#endif
    default:
        attn_scores_blas(j, t, k, tk, tqp, add, mx);
        break;
    }
}

/* O^T += V^T P^T for the tile's queries and the tk keys at t->k0. */
static __attribute__((noinline)) void attn_pv(const struct attn_job *j, const struct attn_tile *t,
                                              int64_t tk)
{
    int64_t tqp = round_width(j, t->tq);
    const float *v = j->v + (t->sq->k_row + t->k0) * j->ldv + t->h * j->head_dim;
    switch (j->kernel) {
#if ATT_SIMD
    case KERN_BF16:
        attn_pv_bf16(j, t, tqp, tk);
        break;
    case KERN_AVX512:
        attn_pv512(j, t, v, tqp, tk);
        break;
    case KERN_AVX2:
        attn_pv256(j, t, v, tqp, tk);
        break;
#endif
    default:
        attn_pv_blas(j, t, v, tqp, tk);
        break;
    }
}

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

/* What mask value m adds to its key's score in a row of shift sh (the top
 * of the file): m - sh, or -inf for a masked key (m <= -FLT_MAX, or NaN);
 * in a row all masked with keys at -FLT_MAX (sh = -FLT_MAX) those give 0
 * and -inf keys -inf. */
static inline float mask_term(float m, float sh)
{
    return m > -FLT_MAX || m == sh ? m - sh : -INFINITY; /* m == sh: -FLT_MAX in such a row */
}

/* A mask row [B, 1, Lk] with every key masked and some at -FLT_MAX (shift
 * -FLT_MAX) covers the tile: every query's scores become add (0 or -inf),
 * the products' discarded. */
static void attn_uniform_rows(const struct attn_tile *t, const float *add, int64_t tk, int64_t tqp,
                              float *mx)
{
    for (int64_t jj = 0; jj < tk; jj++) {
        float *row = t->s + jj * ATT_TQ;
        for (int64_t i = 0; i < tqp; i++) {
            row[i] = add[jj];
            mx[i] = add[jj] > mx[i] ? add[jj] : mx[i];
        }
    }
}

/* S^T for one key tile with its mask, and each query's maximum in mx. A mask
 * row shared by all queries is a constant per key, added inside the product;
 * a mask per query is added afterwards. Either is shifted by the query's
 * mask maximum, and a row all masked with keys at -FLT_MAX replaces the
 * scores (see the top of the file). */
static void attn_tile_scores(const struct attn_job *j, const struct attn_tile *t, int64_t tk,
                             float *mx)
{
    float add[ATT_TK];
    const struct attn_seq *sq = t->sq;
    int64_t q0 = t->q0, tq = t->tq, k0 = t->k0;
    const float *k = j->k + (sq->k_row + k0) * j->ldk;
    int64_t tqp = round_width(j, tq);
    bool shared = sq->mask != NULL && sq->mask_shared;
    for (int64_t i = 0; i < tqp; i++)
        mx[i] = -INFINITY;
    if (shared) {
        const float *mr = mask_row(sq, 0) + k0;
        for (int64_t jj = 0; jj < tk; jj++)
            add[jj] = mask_term(mr[jj], t->shift[0]);
    }
    attn_scores(j, t, k + t->h * j->head_dim, tk, tqp, shared ? add : NULL, mx);
    if (sq->mask == NULL)
        return;
    if (shared) {
        if (t->shift[0] == -FLT_MAX) {
            for (int64_t i = 0; i < tqp; i++)
                mx[i] = -INFINITY;
            attn_uniform_rows(t, add, tk, tqp, mx);
        }
        return;
    }
    for (int64_t i = 0; i < tq; i++) {
        const float *mr = mask_row(sq, q0 + i) + k0;
        float sh = t->shift[i];
        if (sh == -FLT_MAX) /* all masked, keys at -FLT_MAX: uniform */
            for (int64_t jj = 0; jj < tk; jj++)
                t->s[jj * ATT_TQ + i] = mask_term(mr[jj], sh);
        else
            for (int64_t jj = 0; jj < tk; jj++)
                t->s[jj * ATT_TQ + i] += mask_term(mr[jj], sh);
        mx[i] = -INFINITY;
    }
    for (int64_t jj = 0; jj < tk; jj++) {
        const float *row = t->s + jj * ATT_TQ;
        for (int64_t i = 0; i < tq; i++)
            mx[i] = row[i] > mx[i] ? row[i] : mx[i];
    }
}

/* The running max and sum of the tile's queries brought up to this key
 * tile's maxima mx: ref, the max its weights are taken against, and corr =
 * exp(m_old - m_new), by which l is rescaled here and the accumulator by
 * softmax_rescale. */
static inline void softmax_begin(const struct attn_tile *t, const float *mx, float *ref,
                                 float *corr)
{
    for (int64_t i = 0; i < t->tq; i++) {
        float m_new = mx[i] > t->m[i] ? mx[i] : t->m[i];
        ref[i] = m_new == -INFINITY ? 0.0f : m_new; /* all -inf so far: weights 0 */
        corr[i] = softmax_exp(t->m[i] - ref[i]);    /* 0 while m_old is -inf */
        t->m[i] = m_new;
        t->l[i] *= corr[i];
    }
}

static inline void softmax_rescale(const struct attn_job *j, const struct attn_tile *t,
                                   const float *corr)
{
    for (int c = 0; c < j->head_dim; c++) {
        float *a = t->acc + c * ATT_TQ;
        for (int64_t i = 0; i < t->tq; i++)
            a[i] *= corr[i];
    }
}

/* Fold one key tile's scores (S^T in t->s, column maxima mx) into the
 * running softmax of the tile's queries: per query a running max m and sum l;
 * leaves probabilities in t->s and rescales the accumulator by
 * exp(m_old - m_new). Loops run over queries, the contiguous dim, so they
 * vectorise. */
static __attribute__((noinline, target_clones("arch=x86-64-v4", "default"))) void
attn_softmax_tile(const struct attn_job *j, const struct attn_tile *t, int64_t tk, const float *mx)
{
    float ref[ATT_TQ], corr[ATT_TQ];
    softmax_begin(t, mx, ref, corr);
    for (int64_t jj = 0; jj < tk; jj++) {
        float *row = t->s + jj * ATT_TQ;
        for (int64_t i = 0; i < t->tq; i++) {
            float e = softmax_exp(row[i] - ref[i]);
            row[i] = e;
            t->l[i] += e;
        }
    }
    softmax_rescale(j, t, corr);
}

#if ATT_SIMD

/* softmax_exp on the lanes in live (0 elsewhere), with the same values: the
 * same operations in the same order, but for the final scaling by 2^n in
 * one vscalefps, which is as exact as softmax_exp's multiplication by 2^n
 * (checked over every float x <= 0 and NaN). */
static inline ATT_BF16 __m512 softmax_exp16(__m512 x, __mmask16 live)
{
    const __m512 lo = _mm512_set1_ps(-87.0f), magic = _mm512_set1_ps(12582912.0f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_mask_mov_ps(x, under, lo);
    __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
    __m512 n = _mm512_sub_ps(t, magic);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(live & (__mmask16)~under, y, n); /* y * 2^n * flush */
}

/* The rows of P for one key tile into pb, for NC chunks of 16 queries: per
 * pair of keys, two rows of scores in, one row of key pairs out. l stays in
 * registers, summed in key order as attn_softmax_tile sums it. */
static inline ATT_BF16 __attribute__((always_inline)) void
softmax_rows_bf16(const struct attn_tile *t, int64_t tk, const float *ref, const int NC)
{
    const float *s = t->s;
    uint32_t *pb = t->pb;
    __m512 rf[4], l[4];
    __mmask16 live[4];
    for (int c = 0; c < NC; c++) {
        live[c] = lanes(t->tq - 16 * c);
        rf[c] = _mm512_maskz_loadu_ps(live[c], ref + 16 * c);
        l[c] = _mm512_maskz_loadu_ps(live[c], t->l + 16 * c);
    }
    for (int64_t jj = 0; jj < tk; jj += 2) {
        const float *row = s + jj * ATT_TQ;
        for (int c = 0; c < NC; c++) {
            __m512 x0 = _mm512_sub_ps(_mm512_loadu_ps(row + 16 * c), rf[c]);
            __m512 e0 = softmax_exp16(x0, live[c]), e1 = _mm512_setzero_ps();
            l[c] = _mm512_add_ps(l[c], e0);
            if (jj + 1 < tk) {
                __m512 x1 = _mm512_sub_ps(_mm512_loadu_ps(row + ATT_TQ + 16 * c), rf[c]);
                e1 = softmax_exp16(x1, live[c]);
                l[c] = _mm512_add_ps(l[c], e1);
            }
            _mm512_storeu_si512(pb + jj / 2 * ATT_TQ + 16 * c, bf16_zip(e0, e1));
        }
    }
    for (int c = 0; c < NC; c++)
        _mm512_mask_storeu_ps(t->l + 16 * c, live[c], l[c]);
}

/* attn_softmax_tile for the BF16 products: the same values of P, l and the
 * accumulator, but P goes straight to pb as key pairs rounded to BF16 (0 for
 * the queries from tq to the block width, and for the pad of an odd tk). */
static ATT_BF16 void attn_softmax_bf16(const struct attn_job *j, const struct attn_tile *t,
                                       int64_t tk, const float *mx)
{
    float ref[ATT_TQ], corr[ATT_TQ];
    softmax_begin(t, mx, ref, corr);
    for (int64_t i0 = 0; i0 < t->tq; i0 += 64) {
        struct attn_tile u = *t; /* 64 queries at a time */
        u.s += i0, u.pb += i0, u.l += i0, u.tq -= i0;
        if (u.tq > 32)
            softmax_rows_bf16(&u, tk, ref + i0, 4);
        else
            softmax_rows_bf16(&u, tk, ref + i0, 2);
    }
    softmax_rescale(j, t, corr);
}

/* attn_tile_end for the BF16 kernels, the same values: O^T transposed back
 * in 16 x 16 blocks, each row scaled by its 1 / l (0 where l is 0). */
static ATT_BF16 void attn_tile_end_bf16(const struct attn_job *j, const struct attn_tile *t)
{
    int hd = j->head_dim;
    __m512i r[16];
    float *o = j->o + (t->sq->q_row + t->q0) * j->ldo + t->h * hd;
    for (int64_t i = 0; i < t->tq && i < 16; i++)
        prefetch_row(o + i * j->ldo, hd, 1);
    for (int64_t i0 = 0; i0 < t->tq; i0 += 16)
        for (int c0 = 0; c0 < hd; c0 += 16) {
            for (int64_t i = i0 + 16; c0 == 0 && i < t->tq && i < i0 + 32; i++)
                prefetch_row(o + i * j->ldo, hd, 1);
            for (int c = 0; c < 16; c++)
                r[c] = c0 + c < hd ? _mm512_loadu_si512(t->acc + (c0 + c) * ATT_TQ + i0)
                                   : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16 && i0 + i < t->tq; i++) {
                float l = t->l[i0 + i], inv = l > 0.0f ? 1.0f / l : 0.0f;
                __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(r[i]), _mm512_set1_ps(inv));
                _mm512_mask_storeu_ps(o + (i0 + i) * j->ldo + c0, lanes(hd - c0), v);
            }
        }
}

#endif /* ATT_SIMD */

static void attn_softmax(const struct attn_job *j, const struct attn_tile *t, int64_t tk,
                         const float *mx)
{
#if ATT_SIMD
    if (j->kernel == KERN_BF16) {
        attn_softmax_bf16(j, t, tk, mx);
        return;
    }
#endif
    attn_softmax_tile(j, t, tk, mx);
}

/* Mask row maxima, the rows' shifts: -FLT_MAX for a row all masked with
 * keys at -FLT_MAX; 0 where a row is -inf everywhere, or without a mask. */
static void attn_mask_shift(const struct attn_tile *t)
{
    const struct attn_seq *sq = t->sq;
    for (int64_t i = 0; i < t->tq; i++) {
        if (sq->mask == NULL || (i > 0 && sq->mask_shared)) {
            t->shift[i] = sq->mask ? t->shift[0] : 0.0f;
            continue;
        }
        float mx = max_f32(mask_row(sq, t->q0 + i), sq->lk);
        t->shift[i] = isfinite(mx) ? mx : 0.0f;
    }
}

/* Start a query tile: its queries packed, m = -inf, l = 0, mask shifts, O = 0. */
static void attn_tile_begin(const struct attn_job *j, const struct attn_tile *t)
{
    attn_pack_q(j, t);
    for (int64_t i = 0; i < t->tq; i++) {
        t->m[i] = -INFINITY;
        t->l[i] = 0.0f;
    }
    attn_mask_shift(t);
    memset(t->acc, 0, (size_t)ATT_TQ * (size_t)j->head_dim * sizeof(float));
}

/* o = O / l for the tile's queries (0 where l is 0: nothing to attend to). */
static void attn_tile_end(const struct attn_job *j, const struct attn_tile *t)
{
    int hd = j->head_dim;
#if ATT_SIMD
    if (j->kernel == KERN_BF16) {
        attn_tile_end_bf16(j, t);
        return;
    }
#endif
    for (int64_t i = 0; i < t->tq; i++) {
        float inv = t->l[i] > 0.0f ? 1.0f / t->l[i] : 0.0f;
        float *o = j->o + (t->sq->q_row + t->q0 + i) * j->ldo + t->h * hd;
        for (int c = 0; c < hd; c++)
            o[c] = t->acc[c * ATT_TQ + i] * inv;
    }
}

static void attn_task(void *arg, int64_t task, int thread)
{
    const struct attn_job *j = arg;
    struct attn_seq own;
    struct attn_tile t[ATT_NQ];
    float mx[ATT_TQ];
    const struct attn_seq *sq = attn_seq_of(j, task, &own);
    int n = attn_tiles_at(j, task, sq, thread, t);
    int64_t lk = sq->lk;
    for (int i = 0; i < n; i++)
        attn_tile_begin(j, &t[i]);
    for (int64_t k0 = 0; k0 < lk; k0 += ATT_TK) {
        int64_t tk = lk - k0 < ATT_TK ? lk - k0 : ATT_TK;
        for (int i = 0; i < n; i++)
            t[i].k0 = k0;
        attn_load_kv(j, &t[0], tk);
        for (int i = 0; i < n; i++) {
            attn_tile_scores(j, &t[i], tk, mx);
            attn_softmax(j, &t[i], tk, mx);
            attn_pv(j, &t[i], tk);
        }
    }
    for (int i = 0; i < n; i++)
        attn_tile_end(j, &t[i]);
}

/* Tasks with up to nq query tiles each: per sample and head, its query
 * tiles / nq rounded up. */
static int64_t attn_count_tasks(const struct attn_job *j, int64_t batch, int nq)
{
    if (j->seqs == NULL)
        return batch * j->heads * ((j->q_tiles + nq - 1) / nq);
    int64_t n = 0;
    for (int64_t b = 0; b < j->n_seqs; b++)
        n += ((j->seqs[b].lq + ATT_TQ - 1) / ATT_TQ + nq - 1) / nq;
    return n * j->heads;
}

/* Query tiles per task: 1 for the FP32 kernels; for BF16, where they share
 * each key tile's conversion, up to ATT_NQ while their accumulators stay
 * within ATT_NQ_BYTES (the L2 cache's half: nq 2 at head_dim 512) and at
 * least 4 tasks per thread are left to balance. j->q_tiles is the most
 * query tiles a sample has. */
static void attn_group_tiles(struct attn_job *j, int64_t batch, int n_threads)
{
    int64_t tile_bytes = ((j->head_dim + 15) & ~15) * ATT_TQ * 4;
    j->nq = 1;
    if (j->kernel == KERN_BF16)
        for (int nq = ATT_NQ; nq > 1 && j->nq == 1; nq /= 2)
            if (nq <= j->q_tiles && nq * tile_bytes <= ATT_NQ_BYTES &&
                attn_count_tasks(j, batch, nq) >= 4 * (int64_t)n_threads)
                j->nq = nq;
    j->q_groups = (j->q_tiles + j->nq - 1) / j->nq;
}

/* Ragged batches: samples whose tasks cost more go first. */
static int attn_seq_cmp(const void *a, const void *b)
{
    const struct attn_seq *x = a, *y = b;
    if (x->cost != y->cost)
        return x->cost > y->cost ? -1 : 1;
    return x->q_row < y->q_row ? -1 : x->q_row > y->q_row; /* q_row is unique */
}

/* The samples of a ragged batch in task order (*seqs, malloc'ed, for the
 * caller to free), the query tiles per task and the task count: each
 * sample's tasks in a row, the samples by decreasing cost of their largest
 * task, so that the pool's threads, taking tasks in order, end together. */
static int attn_ragged_init(struct attn_job *j, const struct bs_attn_params *p, int n_threads,
                            struct attn_seq **seqs, struct bs_err *err)
{
    struct attn_seq *sq = malloc((size_t)p->batch * sizeof(*sq));
    if (sq == NULL)
        return bs_err_set(err, BS_ENOMEM, "attention: cannot allocate a ragged batch of %lld",
                          (long long)p->batch);
    j->q_tiles = 0;
    for (int64_t b = 0; b < p->batch; b++) {
        int64_t lq = p->q_off[b + 1] - p->q_off[b], lk = p->k_off[b + 1] - p->k_off[b];
        sq[b] = (struct attn_seq){
            .q_row = p->q_off[b],
            .k_row = p->k_off[b],
            .lq = lq,
            .lk = lk,
            .mask = p->mask ? (const float *)p->mask->data + p->m_off[b] : NULL,
            .mask_ld = lk,
            .mask_shared = !p->mask_per_query || lq == 1, /* as a uniform [1, 1, Lk] mask */
        };
        int64_t tiles = (lq + ATT_TQ - 1) / ATT_TQ;
        j->q_tiles = tiles > j->q_tiles ? tiles : j->q_tiles;
    }
    j->seqs = sq;
    j->n_seqs = p->batch;
    attn_group_tiles(j, p->batch, n_threads);
    for (int64_t b = 0; b < p->batch; b++) {
        int64_t tiles = (sq[b].lq + ATT_TQ - 1) / ATT_TQ, most = (int64_t)j->nq * ATT_TQ;
        sq[b].q_groups = (tiles + j->nq - 1) / j->nq;
        /* its queries (padded to the register blocks) times its keys, + 1 for their packing */
        sq[b].cost = bs_mul_sat(round_width(j, sq[b].lq < most ? sq[b].lq : most), sq[b].lk + 1);
    }
    qsort(sq, (size_t)p->batch, sizeof(*sq), attn_seq_cmp);
    j->n_tasks = 0;
    for (int64_t b = 0; b < p->batch; b++) {
        sq[b].task0 = j->n_tasks;
        j->n_tasks += p->heads * sq[b].q_groups;
    }
    *seqs = sq;
    return 0;
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

/* The shared checks of a uniform or a ragged batch, and the CPU's own. */
static int attn_check(const struct bs_tensor *o, const struct bs_tensor *q,
                      const struct bs_tensor *k, const struct bs_tensor *v,
                      const struct bs_attn_params *p, struct bs_err *err)
{
    int rc;
    if (p->q_off != NULL) {
        if ((rc = bs_opcheck_attention_ragged(o, q, k, v, p, err)))
            return rc;
        return attn_check_ld(o, q, k, v, err);
    }
    if ((rc = bs_opcheck_attention(o, q, k, v, p, err)) || (rc = attn_check_ld(o, q, k, v, err)))
        return rc;
    return bs_opcheck_attention_mask(p, err);
}

int bs__cpu_attention(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                      const struct bs_tensor *k, const struct bs_tensor *v,
                      const struct bs_attn_params *p, struct bs_err *err)
{
    struct bs__cpu *c = ctx;
    struct attn_job j = {0};
    struct attn_seq *seqs = NULL;
    int rc;
    if ((rc = attn_check(o, q, k, v, p, err)))
        return rc;
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
    j.heads = p->heads;
    j.head_dim = p->head_dim;
    j.scale = p->scale;
    j.kernel = attn_kernel_for(c, p);
    j.width = j.kernel >= KERN_AVX512 ? 32 : 16;
    if (p->q_off != NULL) {
        if ((rc = attn_ragged_init(&j, p, c->n_threads, &seqs, err)))
            return rc;
    } else {
        if (p->mask != NULL) {
            j.mask = p->mask->data;
            j.mq = p->mask->ne[1] == 1 ? 1 : p->lq;
            j.mask_nb0 = p->mask->nb[0] / 4;
            j.mask_nb1 = p->mask->nb[1] / 4;
        }
        j.lq = p->lq;
        j.lk = p->lk;
        j.q_tiles = (p->lq + ATT_TQ - 1) / ATT_TQ;
        attn_group_tiles(&j, p->batch, c->n_threads);
        j.n_tasks = p->batch * p->heads * j.q_groups;
    }

    pthread_mutex_lock(&c->scratch_lock);
    rc = bs__cpu_scratch_reserve(c, attn_layout(NULL, NULL, p->head_dim, j.kernel, j.nq), err);
    if (rc == 0) {
        j.scratch = c->scratch;
        j.scratch_floats = c->scratch_floats;
        bs_pool_run(c->pool, j.n_tasks, attn_task, &j);
    }
    pthread_mutex_unlock(&c->scratch_lock);
    free(seqs);
    return rc;
}
