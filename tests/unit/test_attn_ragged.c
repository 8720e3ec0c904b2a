/* Ragged ("varlen") attention on the CPU backend: samples of different
 * lengths packed without padding (bs_attn_params.q_off, k_off, m_off,
 * mask_per_query), against per-sample uniform calls and a double-precision
 * reference.
 *
 * On every instruction set this CPU runs (BS_CPU_ISA generic, avx2, avx512,
 * avx512bf16; 2 threads each), in FP32 and with BF16 products:
 *   - each sample's rows of o are bit for bit what a uniform call with batch
 *     1 on that sample's rows (views of the same buffers) gives, since the
 *     ragged path runs the same tiles from the sample's first query and key;
 *   - FP32 stays within 1e-4 absolute of the double reference, as
 *     test_cpu_ops.c holds uniform attention (|q| <= 3, |k|, |v| <= 1);
 *   - BF16 products (AVX512_BF16) stay within the bound test_attn_bf16.c
 *     derives, against the reference on q, k and v rounded to BF16 as the
 *     kernel rounds them: 2^-8 (1 + 2^-7) sum_j p_j |v_jc| / l (P's
 *     rounding) + 2e-5 (FP32 arithmetic); below AVX512_BF16 a BF16 call
 *     gives the FP32 bits;
 *   - rows with nothing to attend to (a sample without keys, a mask row -inf
 *     everywhere) are exactly 0, o's padding columns are left alone, and the
 *     mask's gaps around the samples' parts hold NaN, which no sample reads.
 * Also: 1 and 2 threads give the same bits; a ragged batch of equal lengths
 * gives the uniform batch call's bits; each malformed argument fails with
 * BS_EINVAL and a message naming it. The cases print their worst error as a
 * share of the tolerance.
 *
 * `test_attn_ragged --bench` times one mixed batch instead (self-attention,
 * lengths 1024, 4096, 256 and 1, 8 heads x 64, 2 threads): the ragged call
 * against the sum of per-sample calls. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>
#include <float.h>

#include "backend.h"
#include "ops_cpu.h"
#include "tensor.h"
#define TEST_RNG_SEED 0x853c49e6748fea9bull
#include "test_rand.h"
#include "test_attn_util.h"

#define FP32_TOL    1e-4 /* FP32 against the double reference (see the top) */
#define BF16_SLACK  2e-5 /* BF16: FP32 arithmetic besides P's rounding */
#define MAX_SAMPLES 8
#define PAD         1234.5f /* o's padding columns, never written */

static enum bs__cpu_isa isa_of(const struct bs_backend *be)
{
    return ((const struct bs__cpu *)be->ctx)->isa;
}

/* The instruction sets, 2 threads each, and 1 thread on the best. */
static const char *const isa_names[] = {"generic", "avx2", "avx512", "avx512bf16"};
#define N_ISA 4
static struct bs_backend be_isa[N_ISA], be_one;
static bool isa_runs[N_ISA]; /* this CPU and build reach that set */

/* ---- helpers ----------------------------------------------------------- */

/* A [rows, cols] F32 rows tensor over data with row stride ld. */
static struct bs_tensor mat(float *data, int64_t rows, int64_t cols, int64_t ld)
{
    int64_t ne[2] = {rows, ld};
    struct bs_tensor t = bs_tensor_make(BS_TYPE_F32, 2, ne, data);
    return bs_tensor_view_cols(&t, 0, cols);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- cases ------------------------------------------------------------- */

enum mask_kind { MASK_NONE, MASK_PER_SAMPLE, MASK_PER_QUERY };
enum mask_fill {
    FILL_RANDOM,       /* noise, about 30% -10000 */
    FILL_FULLY_MASKED, /* every third row -10000 everywhere */
    FILL_NEG_INF,      /* about 30% -inf, every fourth row -inf everywhere (output 0) */
    FILL_RULE,         /* rows of every kind the mask rule names (rule_value) */
};

struct ragged_case {
    int heads, hd;
    int n;                   /* samples */
    int64_t lq[MAX_SAMPLES]; /* queries per sample */
    int64_t lk[MAX_SAMPLES]; /* keys per sample */
    enum mask_kind mask;
    enum mask_fill fill;
    bool fused; /* self-attention (lk = lq): q, k, v column views of one buffer */
};

/* Tiles in attn_cpu.c: 64 queries (up to 8 per BF16 task), 256 keys. */
static const struct ragged_case cases[] = {
    /* self, lengths 1 to 5 query tiles, fused QKV */
    {2, 40, 4, {1, 130, 300, 64}, {1, 130, 300, 64}, MASK_NONE, FILL_RANDOM, true},
    /* cross with a sample without keys, one query, [lk] masks */
    {3, 64, 3, {77, 1, 200}, {300, 0, 77}, MASK_PER_SAMPLE, FILL_RANDOM, false},
    /* the mask rule per query, 3 key tiles in one sample, one key in another */
    {2, 72, 3, {150, 5, 65}, {513, 40, 1}, MASK_PER_QUERY, FILL_RULE, false},
    /* rows -inf everywhere; one query with a per-query mask (a shared row) */
    {2, 80, 3, {257, 1, 33}, {257, 1, 33}, MASK_PER_QUERY, FILL_NEG_INF, true},
    /* the mask rule per sample; first sample without keys */
    {2, 128, 5, {70, 1, 129, 3, 20}, {0, 260, 77, 300, 5}, MASK_PER_SAMPLE, FILL_RULE, false},
    /* -10000 rows, long keys */
    {1, 160, 2, {64, 200}, {600, 30}, MASK_PER_QUERY, FILL_FULLY_MASKED, false},
    /* small odd head dims, many one-query samples */
    {4, 8, 5, {1, 1, 1, 1, 600}, {1, 300, 0, 5, 600}, MASK_NONE, FILL_RANDOM, false},
    {3, 24, 3, {100, 700, 2}, {100, 700, 2}, MASK_PER_SAMPLE, FILL_FULLY_MASKED, true},
    {2, 13, 4, {33, 64, 65, 1}, {7, 0, 256, 257}, MASK_PER_QUERY, FILL_RANDOM, false},
    /* BF16 tasks of several query tiles, partly filled */
    {1, 40, 3, {1000, 50, 513}, {128, 256, 1000}, MASK_PER_QUERY, FILL_RANDOM, false},
    /* one sample */
    {2, 64, 1, {129}, {257}, MASK_PER_QUERY, FILL_RULE, false},
};

/* Mask row r (counted over the whole batch) of lk values into m. */
static void fill_row(float *m, int64_t r, int64_t lk, enum mask_fill fill)
{
    for (int64_t j = 0; j < lk; j++) {
        float u = frand();
        switch (fill) {
        case FILL_RANDOM:
            m[j] = u < -0.4f ? -10000.0f : 0.5f * frand();
            break;
        case FILL_FULLY_MASKED:
            m[j] = r % 3 == 1 || u < -0.4f ? -10000.0f : 0.0f;
            break;
        case FILL_NEG_INF:
            m[j] = r % 4 == 1 || u < -0.4f ? -INFINITY : 0.0f;
            break;
        case FILL_RULE:
            m[j] = rule_value(r, j, lk, u);
            break;
        }
    }
}

/* One case's inputs: packed q, k, v, the flat mask, offsets and params. */
struct ragged_io {
    const struct ragged_case *c;
    int64_t inner, ldq, ldk, ldv, ldo, rows_q, rows_k;
    int64_t q_off[MAX_SAMPLES + 1], k_off[MAX_SAMPLES + 1], m_off[MAX_SAMPLES];
    float *qkv, *qb, *kb, *vb, *mask;
    const float *q, *k, *v;
    struct bs_tensor tq, tk, tv, tm;
    struct bs_attn_params p;
};

/* Mask values of sample b: its lk values, per query or once. */
static int64_t mask_rows(const struct ragged_io *a, int b)
{
    return a->c->mask == MASK_PER_QUERY ? a->c->lq[b] : 1;
}

/* gap: NaN between the samples' mask parts (and before the first), which
 * a kernel reading outside its sample's part turns into a NaN output. */
static void io_init(struct ragged_io *a, const struct ragged_case *c, bool gap)
{
    memset(a, 0, sizeof(*a));
    a->c = c;
    a->inner = (int64_t)c->heads * c->hd;
    a->ldo = a->inner + 7;
    int64_t lq_max = 0, lk_max = 0, mask_n = 0;
    for (int b = 0; b < c->n; b++) {
        a->q_off[b + 1] = a->q_off[b] + c->lq[b];
        a->k_off[b + 1] = a->k_off[b] + c->lk[b];
        lq_max = c->lq[b] > lq_max ? c->lq[b] : lq_max;
        lk_max = c->lk[b] > lk_max ? c->lk[b] : lk_max;
        a->m_off[b] = mask_n + (gap ? 3 : 0);
        mask_n = a->m_off[b] + mask_rows(a, b) * c->lk[b];
    }
    a->rows_q = a->q_off[c->n];
    a->rows_k = a->k_off[c->n];
    if (c->fused) { /* self-attention: rows_q == rows_k */
        a->qkv = alloc_rand(a->rows_q * 3 * a->inner);
        a->q = a->qkv, a->k = a->qkv + a->inner, a->v = a->qkv + 2 * a->inner;
        a->ldq = a->ldk = a->ldv = 3 * a->inner;
    } else { /* padded rows; q larger for a sharper softmax */
        a->ldq = a->inner + 3, a->ldk = a->inner + 5, a->ldv = a->inner;
        a->q = a->qb = alloc_scaled(a->rows_q * a->ldq, 3.0f);
        a->k = a->kb = alloc_rand(a->rows_k * a->ldk);
        a->v = a->vb = alloc_rand(a->rows_k * a->ldv);
    }
    a->tq = mat((float *)a->q, a->rows_q, a->inner, a->ldq);
    a->tk = mat((float *)a->k, a->rows_k, a->inner, a->ldk);
    a->tv = mat((float *)a->v, a->rows_k, a->inner, a->ldv);
    if (c->mask != MASK_NONE) {
        mask_n += gap ? 3 : 0;
        a->mask = alloc_rand(mask_n);
        for (int64_t i = 0; i < mask_n; i++)
            a->mask[i] = NAN;
        for (int b = 0, r = 0; b < c->n; b++)
            for (int64_t i = 0; i < mask_rows(a, b); i++, r++)
                fill_row(a->mask + a->m_off[b] + i * c->lk[b], r, c->lk[b], c->fill);
        /* any shape will do: two rows where the count is even */
        int64_t ne[2] = {2, mask_n / 2};
        a->tm = mask_n % 2 ? bs_tensor_make(BS_TYPE_F32, 1, &mask_n, a->mask)
                           : bs_tensor_make(BS_TYPE_F32, 2, ne, a->mask);
    }
    a->p = (struct bs_attn_params){
        .batch = c->n,
        .lq = lq_max,
        .lk = lk_max,
        .heads = c->heads,
        .head_dim = c->hd,
        .scale = 1.0f / sqrtf((float)c->hd),
        .mask = a->mask ? &a->tm : NULL,
        .q_off = a->q_off,
        .k_off = a->k_off,
        .m_off = a->mask ? a->m_off : NULL,
        .mask_per_query = c->mask == MASK_PER_QUERY,
    };
}

static void io_free(struct ragged_io *a)
{
    free(a->qkv), free(a->qb), free(a->kb), free(a->vb), free(a->mask);
}

static void describe(const struct ragged_case *c, char *buf, size_t size)
{
    int n = snprintf(buf, size, "%d x %d mask %d fill %d%s lq/lk", c->heads, c->hd, c->mask,
                     c->fill, c->fused ? " fused" : "");
    for (int b = 0; b < c->n && n > 0 && (size_t)n < size; b++)
        n += snprintf(buf + n, size - (size_t)n, " %lld/%lld", (long long)c->lq[b],
                      (long long)c->lk[b]);
}

/* The reference (dense [rows_q, inner]) by the mask rule, and P's rounding
 * bound per element; bf16: from q, k, v rounded as the BF16 kernel rounds
 * them. dead[row] is set where the row has nothing to attend to. */
static void reference(const struct ragged_io *a, bool bf16, double *want, double *bound, bool *dead)
{
    const struct ragged_case *c = a->c;
    int hd = c->hd;
    double *s = malloc((size_t)(a->p.lk > 0 ? a->p.lk : 1) * sizeof(double));
    float *qr = malloc((size_t)hd * sizeof(float));
    assert_true(s != NULL && qr != NULL);
    for (int b = 0; b < c->n; b++)
        for (int h = 0; h < c->heads; h++)
            for (int64_t i = 0; i < c->lq[b]; i++) {
                int64_t row = a->q_off[b] + i, lk = c->lk[b];
                const float *mr = NULL;
                if (a->mask)
                    mr = a->mask + a->m_off[b] + (c->mask == MASK_PER_QUERY ? i * lk : 0);
                dead[row] = !ref_attend_row(
                    a->q + row * a->ldq + h * hd, a->p.scale, a->k + a->k_off[b] * a->ldk + h * hd,
                    a->ldk, a->v + a->k_off[b] * a->ldv + h * hd, a->ldv, lk, hd, mr, bf16, s, qr,
                    want + row * a->inner + h * hd, bound + row * a->inner + h * hd);
            }
    free(s), free(qr);
}

/* o (rows_q rows of ldo, PAD everywhere) for the op's output. */
static float *alloc_o(const struct ragged_io *a)
{
    float *o = malloc((size_t)(a->rows_q * a->ldo) * sizeof(float));
    assert_non_null(o);
    for (int64_t i = 0; i < a->rows_q * a->ldo; i++)
        o[i] = PAD;
    return o;
}

/* The ragged call. */
static float *run_ragged(struct bs_backend *be, struct ragged_io *a, enum bs_dtype compute)
{
    struct bs_err err = {0};
    float *o = alloc_o(a);
    struct bs_tensor to = mat(o, a->rows_q, a->inner, a->ldo);
    a->p.compute = compute;
    int rc = be->iface->attention(be->ctx, &to, &a->tq, &a->tk, &a->tv, &a->p, &err);
    if (rc != 0)
        fail_msg("ragged attention failed: %d %s", rc, err.msg);
    return o;
}

/* One uniform call with batch 1 per sample, on views of the same rows. */
static float *run_split(struct bs_backend *be, struct ragged_io *a, enum bs_dtype compute)
{
    struct bs_err err = {0};
    float *o = alloc_o(a);
    struct bs_tensor to = mat(o, a->rows_q, a->inner, a->ldo);
    for (int b = 0; b < a->c->n; b++) {
        int64_t lq = a->c->lq[b], lk = a->c->lk[b], ne[3] = {1, mask_rows(a, b), lk};
        struct bs_tensor q = bs_tensor_view_outer(&a->tq, a->q_off[b], lq);
        struct bs_tensor k = bs_tensor_view_outer(&a->tk, a->k_off[b], lk);
        struct bs_tensor v = bs_tensor_view_outer(&a->tv, a->k_off[b], lk);
        struct bs_tensor ob = bs_tensor_view_outer(&to, a->q_off[b], lq);
        struct bs_tensor m =
            bs_tensor_make(BS_TYPE_F32, 3, ne, a->mask ? a->mask + a->m_off[b] : NULL);
        struct bs_attn_params p = {
            .batch = 1,
            .lq = lq,
            .lk = lk,
            .heads = a->p.heads,
            .head_dim = a->p.head_dim,
            .scale = a->p.scale,
            .mask = a->mask ? &m : NULL,
            .compute = compute,
        };
        int rc = be->iface->attention(be->ctx, &ob, &q, &k, &v, &p, &err);
        if (rc != 0)
            fail_msg("sample %d alone failed: %d %s", b, rc, err.msg);
    }
    return o;
}

static bool same_bits(const float *x, const float *y, const struct ragged_io *a)
{
    return memcmp(x, y, (size_t)(a->rows_q * a->ldo) * sizeof(float)) == 0;
}

/* The first element where x and y differ, for the failure message. */
static void fail_differ(const float *x, const float *y, const struct ragged_io *a, const char *what)
{
    for (int64_t r = 0; r < a->rows_q; r++)
        for (int64_t e = 0; e < a->ldo; e++)
            if (memcmp(&x[r * a->ldo + e], &y[r * a->ldo + e], sizeof(float)) != 0)
                fail_msg("%s: row %lld col %lld: %.9g against %.9g", what, (long long)r,
                         (long long)e, x[r * a->ldo + e], y[r * a->ldo + e]);
}

/* o against the reference: within tol (bound: P's rounding, BF16), dead
 * rows exactly 0, padding untouched. Returns the worst share of the
 * tolerance. */
static double check_ref(const struct ragged_io *a, const float *o, const double *want,
                        const double *bound, const bool *dead, bool bf16, const char *what)
{
    double worst = 0.0;
    for (int64_t r = 0; r < a->rows_q; r++) {
        for (int64_t e = 0; e < a->inner; e++) {
            double got = o[r * a->ldo + e], w = want[r * a->inner + e];
            double tol =
                bf16 ? ldexp(1.0 + ldexp(1.0, -7), -8) * bound[r * a->inner + e] + BF16_SLACK
                     : FP32_TOL;
            double share = fabs(got - w) / tol;
            if (dead[r] && got != 0.0)
                fail_msg("%s: row %lld has nothing to attend to but o[%lld] = %g", what,
                         (long long)r, (long long)e, got);
            if (!(share <= 1.0))
                fail_msg("%s: row %lld col %lld: got %.9g, want %.9g (tolerance %.3g)", what,
                         (long long)r, (long long)e, got, w, tol);
            worst = share > worst ? share : worst;
        }
        for (int64_t e = a->inner; e < a->ldo; e++)
            if (o[r * a->ldo + e] != PAD)
                fail_msg("%s: row %lld: padding column %lld written", what, (long long)r,
                         (long long)e);
    }
    return worst;
}

/* ---- tests ------------------------------------------------------------- */

static int setenv_isa(const char *isa)
{
    return isa != NULL ? setenv("BS_CPU_ISA", isa, 1) : unsetenv("BS_CPU_ISA");
}

static int setup(void **state)
{
    struct bs_err err = {0};
    const char *env = getenv("BS_CPU_ISA");
    char *saved = env ? strdup(env) : NULL;
    int rc = 0;
    for (int i = 0; i < N_ISA && rc == 0; i++) {
        rc = setenv_isa(isa_names[i]) || bs_backend_cpu_init(&be_isa[i], 2, &err);
        isa_runs[i] = rc == 0 && isa_of(&be_isa[i]) == (enum bs__cpu_isa)i;
    }
    rc = rc || setenv_isa(NULL) || bs_backend_cpu_init(&be_one, 1, &err) || setenv_isa(saved);
    free(saved);
    if (rc != 0) {
        fprintf(stderr, "setup: %s\n", err.msg);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    for (int i = 0; i < N_ISA; i++)
        bs_backend_free(&be_isa[i]);
    bs_backend_free(&be_one);
    return 0;
}

/* The instruction sets reached; at least the generic one always runs. */
static void test_isa(void **state)
{
    for (int i = 0; i < N_ISA; i++)
        printf("BS_CPU_ISA=%-10s -> %s%s\n", isa_names[i], bs__cpu_isa_name(isa_of(&be_isa[i])),
               isa_runs[i] ? "" : " (SKIP: not on this CPU or build)");
    assert_true(isa_runs[0]);
    assert_int_equal(isa_of(&be_one), isa_of(&be_isa[N_ISA - 1]));
}

/* One case on one instruction set in both dtypes: ragged against split
 * calls (bits), against the reference; BF16 below AVX512_BF16 against FP32
 * (bits). */
static void run_case(int isa, struct ragged_io *a, const double *want32, const double *want16,
                     const double *bound16, const bool *dead)
{
    struct bs_backend *be = &be_isa[isa];
    char what[200], desc[160];
    bool bf16_kernel = isa_of(be) >= BS__ISA_AVX512_BF16;
    describe(a->c, desc, sizeof(desc));
    float *r32 = run_ragged(be, a, BS_TYPE_F32), *s32 = run_split(be, a, BS_TYPE_F32);
    float *r16 = run_ragged(be, a, BS_TYPE_BF16), *s16 = run_split(be, a, BS_TYPE_BF16);
    snprintf(what, sizeof(what), "%s fp32 %s", isa_names[isa], desc);
    if (!same_bits(r32, s32, a))
        fail_differ(r32, s32, a, what);
    double e32 = check_ref(a, r32, want32, NULL, dead, false, what);
    snprintf(what, sizeof(what), "%s bf16 %s", isa_names[isa], desc);
    if (!same_bits(r16, s16, a))
        fail_differ(r16, s16, a, what);
    if (!bf16_kernel && !same_bits(r16, r32, a))
        fail_differ(r16, r32, a, what);
    double e16 = bf16_kernel ? check_ref(a, r16, want16, bound16, dead, true, what) : e32;
    printf("%-10s %-60s = split; fp32 %.2g, bf16 %.2g of tolerance\n", isa_names[isa], desc, e32,
           e16);
    if (isa == N_ISA - 1 || !isa_runs[isa + 1]) { /* the best set: 1 thread gives the same bits */
        float *one32 = run_ragged(&be_one, a, BS_TYPE_F32);
        float *one16 = run_ragged(&be_one, a, BS_TYPE_BF16);
        if (!same_bits(one32, r32, a) || !same_bits(one16, r16, a))
            fail_msg("%s: 1 and 2 threads differ", desc);
        free(one32), free(one16);
    }
    free(r32), free(s32), free(r16), free(s16);
}

/* Every case on every instruction set. */
static void test_ragged_cases(void **state)
{
    for (size_t n = 0; n < sizeof(cases) / sizeof(cases[0]); n++) {
        struct ragged_io a;
        io_init(&a, &cases[n], true);
        int64_t cells = a.rows_q * a.inner;
        double *want32 = calloc((size_t)cells + 1, sizeof(double));
        double *want16 = calloc((size_t)cells + 1, sizeof(double));
        double *bound = calloc((size_t)cells + 1, sizeof(double));
        bool *dead = calloc((size_t)a.rows_q + 1, sizeof(bool));
        assert_true(want32 != NULL && want16 != NULL && bound != NULL && dead != NULL);
        reference(&a, false, want32, bound, dead);
        reference(&a, true, want16, bound, dead);
        int64_t n_dead = 0;
        for (int64_t r = 0; r < a.rows_q; r++)
            n_dead += dead[r];
        printf("case %zu: %lld of %lld query rows with nothing to attend to\n", n,
               (long long)n_dead, (long long)a.rows_q);
        for (int i = 0; i < N_ISA; i++)
            if (isa_runs[i])
                run_case(i, &a, want32, want16, bound, dead);
        free(want32), free(want16), free(bound), free(dead);
        io_free(&a);
    }
}

/* A ragged batch of equal lengths is a uniform batch: the same bits as the
 * uniform call on the whole batch, with masks of both forms (the flat mask
 * read as [B, Mq, Lk]). */
static void test_equal_lengths(void **state)
{
    static const struct ragged_case eq[] = {
        {2, 40, 3, {130, 130, 130}, {77, 77, 77}, MASK_PER_QUERY, FILL_RULE, false},
        {2, 64, 3, {65, 65, 65}, {300, 300, 300}, MASK_PER_SAMPLE, FILL_RANDOM, false},
        {3, 24, 2, {200, 200}, {200, 200}, MASK_NONE, FILL_RANDOM, true},
    };
    for (size_t n = 0; n < sizeof(eq) / sizeof(eq[0]); n++) {
        struct ragged_io a;
        io_init(&a, &eq[n], false);
        for (int i = 0; i < N_ISA; i++) {
            if (!isa_runs[i])
                continue;
            struct bs_backend *be = &be_isa[i];
            for (int dt = 0; dt < 2; dt++) {
                enum bs_dtype compute = dt ? BS_TYPE_BF16 : BS_TYPE_F32;
                struct bs_err err = {0};
                float *r = run_ragged(be, &a, compute), *u = alloc_o(&a);
                struct bs_tensor to = mat(u, a.rows_q, a.inner, a.ldo);
                int64_t ne[3] = {eq[n].n, mask_rows(&a, 0), eq[n].lk[0]};
                struct bs_tensor m = bs_tensor_make(BS_TYPE_F32, 3, ne, a.mask);
                struct bs_attn_params p = a.p;
                p.q_off = p.k_off = p.m_off = NULL;
                p.mask_per_query = false;
                p.mask = a.mask ? &m : NULL;
                int rc = be->iface->attention(be->ctx, &to, &a.tq, &a.tk, &a.tv, &p, &err);
                if (rc != 0)
                    fail_msg("uniform call failed: %d %s", rc, err.msg);
                char what[200], desc[160];
                describe(&eq[n], desc, sizeof(desc));
                snprintf(what, sizeof(what), "%s %s equal lengths %s", isa_names[i],
                         dt ? "bf16" : "fp32", desc);
                if (!same_bits(r, u, &a))
                    fail_differ(r, u, &a, what);
                free(r), free(u);
            }
        }
        printf("equal lengths case %zu: ragged = uniform batch on every instruction set\n", n);
        io_free(&a);
    }
}

/* A batch of no samples does nothing and succeeds. */
static void test_empty_batch(void **state)
{
    struct bs_err err = {0};
    float x = 1.0f, o = PAD;
    int64_t off[1] = {0};
    struct bs_tensor t = mat(&x, 0, 8, 8), to = mat(&o, 0, 8, 8);
    struct bs_attn_params p = {
        .batch = 0, .heads = 1, .head_dim = 8, .scale = 1.0f, .q_off = off, .k_off = off};
    int rc = be_one.iface->attention(be_one.ctx, &to, &t, &t, &t, &p, &err);
    if (rc != 0)
        fail_msg("empty ragged batch: %d %s", rc, err.msg);
    assert_true(o == PAD);
}

/* The malformed arguments: each fails with BS_EINVAL and a message naming
 * it; the valid call they are made from succeeds. */
struct bad_call {
    struct bs_tensor o, q, k, v, m;
    int64_t q_off[3], k_off[3], m_off[2];
    struct bs_attn_params p;
};

/* Two samples, 3 and 5 queries, 4 and 0 keys, 2 heads x 8, a per-query mask
 * of exactly 3 x 4 values. */
static void bad_init(struct bad_call *c, float *buf)
{
    memset(c, 0, sizeof(*c));
    int64_t m_ne = 12;
    c->q = mat(buf, 8, 16, 16);
    c->o = mat(buf + 8 * 16, 8, 16, 16);
    c->k = mat(buf + 16 * 16, 4, 16, 16);
    c->v = mat(buf + 20 * 16, 4, 16, 16);
    c->m = bs_tensor_make(BS_TYPE_F32, 1, &m_ne, buf + 24 * 16);
    memcpy(c->q_off, (int64_t[]){0, 3, 8}, sizeof(c->q_off));
    memcpy(c->k_off, (int64_t[]){0, 4, 4}, sizeof(c->k_off));
    memcpy(c->m_off, (int64_t[]){0, 12}, sizeof(c->m_off));
    c->p = (struct bs_attn_params){.batch = 2,
                                   .lq = 5,
                                   .lk = 4,
                                   .heads = 2,
                                   .head_dim = 8,
                                   .scale = 0.3f,
                                   .mask = &c->m,
                                   .q_off = c->q_off,
                                   .k_off = c->k_off,
                                   .m_off = c->m_off,
                                   .mask_per_query = true};
}

static int bad_run(struct bad_call *c, struct bs_err *err)
{
    memset(err, 0, sizeof(*err));
    return be_one.iface->attention(be_one.ctx, &c->o, &c->q, &c->k, &c->v, &c->p, err);
}

static void test_errors(void **state)
{
    enum {
        Q0,
        Q_DOWN,
        Q_EMPTY,
        Q_LONG,
        K_NULL,
        K0,
        K_DOWN,
        K_LONG,
        Q_ROWS,
        O_ROWS,
        K_ROWS,
        V_ROWS,
        M_NULL,
        M_PAST,
        M_NEG,
        M_SHIFT,
        M_TYPE,
        M_STRIDED,
        PER_QUERY_UNIFORM,
        KOFF_UNIFORM,
        MOFF_UNIFORM,
        N_BAD,
    };
    static const char *const expect[N_BAD] = {
        [Q0] = "q_off[0] must be 0",
        [Q_DOWN] = "q_off decreases",
        [Q_EMPTY] = "sample 0 has 0 queries",
        [Q_LONG] = "sample 1 has 5 queries",
        [K_NULL] = "needs k_off",
        [K0] = "k_off[0] must be 0",
        [K_DOWN] = "k_off decreases",
        [K_LONG] = "sample 0 has 4 keys",
        [Q_ROWS] = "q must have q_off[2] = 8 rows",
        [O_ROWS] = "o must have q_off[2] = 8 rows",
        [K_ROWS] = "k must have k_off[2] = 4 rows",
        [V_ROWS] = "v must have k_off[2] = 4 rows",
        [M_NULL] = "needs m_off",
        [M_PAST] = "mask of sample 1",
        [M_NEG] = "m_off[0] = -1",
        [M_SHIFT] = "m_off[0] = 1",
        [M_TYPE] = "must be contiguous F32 (got F16 [12])",
        [M_STRIDED] = "not contiguous",
        [PER_QUERY_UNIFORM] = "q_off is not set",
        [KOFF_UNIFORM] = "q_off is not set",
        [MOFF_UNIFORM] = "q_off is not set",
    };
    float *buf = calloc(40 * 16, sizeof(float));
    assert_non_null(buf);
    struct bad_call c;
    struct bs_err err;
    bad_init(&c, buf);
    if (bad_run(&c, &err) != 0)
        fail_msg("the valid call failed: %s", err.msg);
    for (int i = 0; i < N_BAD; i++) {
        bad_init(&c, buf);
        int64_t ne2[2] = {3, 8};
        struct bs_tensor wide = bs_tensor_make(BS_TYPE_F32, 2, ne2, buf + 24 * 16);
        switch (i) {
        case Q0:
            c.q_off[0] = 1;
            break;
        case Q_DOWN:
            c.q_off[2] = 2;
            break;
        case Q_EMPTY:
            c.q_off[1] = 0;
            break;
        case Q_LONG:
            c.p.lq = 4; /* sample 0 has 3, sample 1 has 5 */
            break;
        case K_NULL:
            c.p.k_off = NULL;
            break;
        case K0:
            c.k_off[0] = 1;
            break;
        case K_DOWN:
            c.k_off[2] = 2;
            break;
        case K_LONG:
            c.p.lk = 3;
            break;
        case Q_ROWS:
            c.q = mat(buf, 9, 16, 16);
            break;
        case O_ROWS:
            c.o = mat(buf + 8 * 16, 7, 16, 16);
            break;
        case K_ROWS:
            c.k = mat(buf + 16 * 16, 5, 16, 16);
            break;
        case V_ROWS:
            c.v = mat(buf + 20 * 16, 3, 16, 16);
            break;
        case M_NULL:
            c.p.m_off = NULL;
            break;
        case M_PAST: /* sample 1 has no keys: its part may start at 12, not past it */
            c.m_off[1] = 13;
            break;
        case M_NEG:
            c.m_off[0] = -1;
            break;
        case M_SHIFT: /* 12 values from 1 in a mask of 12 */
            c.m_off[0] = 1;
            break;
        case M_TYPE: /* 12 contiguous F16 values */
            c.m = bs_tensor_make(BS_TYPE_F16, 1, (int64_t[]){12}, buf + 24 * 16);
            break;
        case M_STRIDED: /* 3 rows of 4 of 8: 12 values, not contiguous */
            c.m = bs_tensor_view_cols(&wide, 0, 4);
            break;
        case PER_QUERY_UNIFORM:
        case KOFF_UNIFORM:
        case MOFF_UNIFORM: /* a valid uniform call but for the one field */
            c.p = (struct bs_attn_params){
                .batch = 2, .lq = 4, .lk = 2, .heads = 2, .head_dim = 8, .scale = 0.3f};
            c.p.mask_per_query = i == PER_QUERY_UNIFORM;
            c.p.k_off = i == KOFF_UNIFORM ? c.k_off : NULL;
            c.p.m_off = i == MOFF_UNIFORM ? c.m_off : NULL;
            break;
        }
        int rc = bad_run(&c, &err);
        printf("bad %2d: %d \"%s\"\n", i, rc, err.msg);
        if (rc != BS_EINVAL)
            fail_msg("bad argument %d (want \"%s\"): got %d \"%s\"", i, expect[i], rc, err.msg);
        if (strstr(err.msg, expect[i]) == NULL)
            fail_msg("bad argument %d: message \"%s\" does not say \"%s\"", i, err.msg, expect[i]);
    }
    /* the uniform call those three start from is valid */
    bad_init(&c, buf);
    c.p = (struct bs_attn_params){
        .batch = 2, .lq = 4, .lk = 2, .heads = 2, .head_dim = 8, .scale = 0.3f};
    if (bad_run(&c, &err) != 0)
        fail_msg("the valid uniform call failed: %s", err.msg);
    free(buf);
}

/* ---- timing (--bench) -------------------------------------------------- */

/* Best of reps of the ragged call and of the per-sample calls. */
static void bench_one(struct bs_backend *be, struct ragged_io *a, enum bs_dtype compute, int reps)
{
    double best_r = INFINITY, best_s = INFINITY;
    for (int r = 0; r < reps + 1; r++) { /* the first round warms up */
        double t0 = now_s();
        free(run_ragged(be, a, compute));
        double t1 = now_s();
        free(run_split(be, a, compute));
        double t2 = now_s();
        if (r > 0) {
            best_r = fmin(best_r, t1 - t0);
            best_s = fmin(best_s, t2 - t1);
        }
    }
    printf("%s: ragged %.1f ms, per-sample calls %.1f ms (ratio %.3f)\n",
           compute == BS_TYPE_BF16 ? "bf16" : "fp32", 1e3 * best_r, 1e3 * best_s, best_r / best_s);
}

static int bench(void)
{
    static const struct ragged_case c = {
        8, 64, 4, {1024, 4096, 256, 1}, {1024, 4096, 256, 1}, MASK_NONE, FILL_RANDOM, false};
    struct bs_backend be;
    struct bs_err err = {0};
    struct ragged_io a;
    if (bs_backend_cpu_init(&be, 2, &err) != 0) {
        fprintf(stderr, "bench: %s\n", err.msg);
        return 1;
    }
    io_init(&a, &c, false);
    printf("ragged self-attention, lengths 1024 4096 256 1, 8 heads x 64, 2 threads, %s, "
           "best of 3\n",
           bs__cpu_isa_name(isa_of(&be)));
    bench_one(&be, &a, BS_TYPE_F32, 3);
    bench_one(&be, &a, BS_TYPE_BF16, 3);
    io_free(&a);
    bs_backend_free(&be);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--bench") == 0)
        return bench();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_isa),           cmocka_unit_test(test_ragged_cases),
        cmocka_unit_test(test_equal_lengths), cmocka_unit_test(test_empty_batch),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
