/* CPU attention with BF16 products (bs_attn_params.compute = BS_TYPE_BF16) on
 * AVX512_BF16, against a double-precision reference, and its FP32 fallback.
 *
 * The BF16 kernel rounds q (after scaling, as the FP32 path scales), k and v
 * to BF16 (round to nearest even) and multiplies them exactly into FP32 sums;
 * its softmax is FP32, and it rounds P to BF16 once more for P V. The
 * reference takes the same rounded q, k and v, so their rounding is not an
 * error here, and keeps P exact. What remains:
 *   - P's rounding: each weight p_j moves by at most 2^-8 of itself (BF16
 *     keeps 8 significant bits, so round to nearest errs by at most half of
 *     2^-7), hence output element c by at most
 *         2^-8 * sum_j p_j |v_jc| / sum_j p_j,
 *     computed per element from the reference's own weights (times 1 + 2^-7,
 *     as the kernel rounds its FP32 weights, not these). This bound is exact
 *     arithmetic, not a guess: an element that strays further has a wrong
 *     weight or value, not a rounding.
 *   - FP32 arithmetic: scores summed over the head dim, the exp (relative
 *     2e-7), the sum l, the accumulator and its rescaling: SLACK = 2e-5
 *     absolute for |v| <= 1 and scores of order 10, a fifth of the 1e-4 the
 *     FP32 op is held to in test_cpu_ops.c (a dropped key, a wrong value or
 *     weight move an output by about 1 / Lk of |v| or more).
 * Tolerance per element: 2^-8 (1 + 2^-7) * sum_j p_j |v_jc| / l + SLACK.
 * The first term is a worst case: it would let a bias of the weights under
 * 2^-8 pass. So the cases run again with q = 0 (and masks of 0, -10000 and
 * -inf only), where every weight is 0 or 1 and P's rounding exact: there
 * only FP32 sums of at most a few hundred values remain, held to
 * SLACK_EXACT = 5e-7 (the errors measure about 2e-8), which a weight off by
 * 1e-4 exceeds. Each case prints its worst error as a share of its
 * tolerance.
 *
 * The reference follows the mask rule (kernels/cpu/attn_cpu.c, top); FILL_RULE
 * cases have rows of every kind it names: all -FLT_MAX (torch.finfo.min: the
 * average of V), all -inf (0), the two mixed, -FLT_MAX or -inf among finite
 * values, all -10000 and all 30000 (the raw scores' softmax).
 *
 * Also checked: rows with nothing to attend to (Lk = 0, a mask row -inf
 * everywhere) are exactly 0; o's padding columns are left alone; 1 and 2
 * threads give the same bits; the BF16 result differs from the FP32 kernel's
 * (the BF16 kernel ran); and under BS_CPU_ISA=avx2 or avx512, or on a CPU or
 * a build without AVX512_BF16, a BF16 call gives the FP32 kernel's result to
 * the bit. The BF16 part is skipped, with a message, only where the CPU lacks
 * AVX512_BF16 (a portable build, which runs no AVX code, checks the fallback
 * only and says so). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <float.h>

#include "backend.h"
#include "ops_cpu.h"
#include "tensor.h"
#define TEST_RNG_SEED 0x2545f4914f6cdd1dull
#include "test_rand.h"
#include "test_attn_util.h"

#define SLACK       2e-5 /* FP32 arithmetic, absolute (see the top) */
#define SLACK_EXACT 5e-7 /* the same where every weight is 0 or 1 */

/* Backends: 1 and 2 threads on the CPU's best instruction set, and 2 threads
 * capped at avx2 and at avx512 (BF16 calls there run the FP32 kernels). */
static struct bs_backend be1, be2, be_avx2, be_avx512;
static bool bf16_runs; /* be1 and be2 have the BF16 kernels */

/* ---- helpers ----------------------------------------------------------- */

/* A [rows, cols] F32 rows tensor over data with row stride ld. */
static struct bs_tensor mat(float *data, int64_t rows, int64_t cols, int64_t ld)
{
    int64_t ne[2] = {rows, ld};
    struct bs_tensor t = bs_tensor_make(BS_TYPE_F32, 2, ne, data);
    return bs_tensor_view_cols(&t, 0, cols);
}

static int setenv_isa(const char *isa)
{
    return isa != NULL ? setenv("BS_CPU_ISA", isa, 1) : unsetenv("BS_CPU_ISA");
}

static enum bs__cpu_isa isa_of(const struct bs_backend *be)
{
    return ((const struct bs__cpu *)be->ctx)->isa;
}

/* ---- cases ------------------------------------------------------------- */

enum mask_kind { MASK_NONE, MASK_PER_SAMPLE, MASK_PER_QUERY };
enum mask_fill {
    FILL_RANDOM,       /* noise, about 30% -10000 */
    FILL_FULLY_MASKED, /* some rows -10000 everywhere */
    FILL_NEG_INF,      /* about 30% -inf, row 1 -inf everywhere (output 0) */
    FILL_RULE,         /* rows of every kind the mask rule names (rule_value01) */
};

struct attn_case {
    int64_t batch, lq, lk;
    int heads, hd;
    enum mask_kind mask;
    enum mask_fill fill;
    bool fused; /* q, k, v column views of one [B*L, 3*inner] buffer (else padded rows) */
};

/* Tiles in attn_cpu.c: 64 queries (up to 8 of them per BF16 task), 256 keys. */
static const struct attn_case cases[] = {
    {1, 1, 1, 1, 1, MASK_NONE, FILL_RANDOM, false},                 /* head dim 1, Lq = Lk = 1 */
    {3, 33, 31, 3, 1, MASK_PER_QUERY, FILL_NEG_INF, false},         /* head dim 1 with a mask */
    {2, 77, 77, 2, 7, MASK_PER_SAMPLE, FILL_RANDOM, false},         /* odd head dim, 77 */
    {2, 130, 130, 2, 40, MASK_PER_QUERY, FILL_RANDOM, true},        /* 130, fused QKV */
    {1, 64, 256, 8, 40, MASK_NONE, FILL_RANDOM, true},              /* tile multiples */
    {1, 65, 257, 2, 64, MASK_PER_SAMPLE, FILL_FULLY_MASKED, false}, /* multiples + 1 */
    {4, 256, 256, 2, 72, MASK_NONE, FILL_RANDOM, true},             /* DiT-like, 4 query tiles */
    {2, 77, 130, 2, 80, MASK_PER_QUERY, FILL_NEG_INF, false},       /* query row 1 all -inf */
    {2, 64, 77, 2, 160, MASK_PER_SAMPLE, FILL_RANDOM, false},       /* SD mid block, cross */
    {2, 64, 64, 8, 160, MASK_NONE, FILL_RANDOM, true},              /* SD mid block, self */
    {1, 130, 130, 1, 512, MASK_NONE, FILL_RANDOM, true},            /* VAE-like, one head */
    {1, 65, 77, 1, 512, MASK_PER_QUERY, FILL_FULLY_MASKED, false},
    {2, 20, 0, 2, 40, MASK_NONE, FILL_RANDOM, false},             /* Lk = 0: output 0 */
    {2, 1, 513, 2, 40, MASK_PER_SAMPLE, FILL_NEG_INF, false},     /* Lq 1, sample 1 all -inf */
    {1, 200, 512, 2, 13, MASK_PER_QUERY, FILL_RANDOM, true},      /* 2 key tiles exactly */
    {1, 577, 65, 1, 7, MASK_PER_QUERY, FILL_FULLY_MASKED, false}, /* 9 query tiles + 1 */
    {1, 1025, 77, 2, 40, MASK_PER_SAMPLE, FILL_RANDOM, true},     /* 17 query tiles */
    {2, 129, 300, 3, 24, MASK_PER_QUERY, FILL_NEG_INF, true},     /* even head dim not of 16s */
    {2, 130, 77, 2, 128, MASK_PER_QUERY, FILL_FULLY_MASKED, true},
    /* The mask rule: every kind of row in both forms; 2 key tiles */
    {2, 40, 300, 2, 40, MASK_PER_QUERY, FILL_RULE, false},
    {8, 70, 77, 2, 64, MASK_PER_SAMPLE, FILL_RULE, false},
    {8, 3, 513, 1, 40, MASK_PER_SAMPLE, FILL_RULE, false},
};

/* Mask row r of FILL_RULE, key j of lk (u uniform in [-1, 1)), with values
 * that keep every weight 0 or 1 where q = 0: row r % 8 is all -FLT_MAX, all
 * -inf, -inf then -FLT_MAX on odd keys of the second half (and the last
 * key), -FLT_MAX or 0, all -10000, -inf or 0, -FLT_MAX, -inf or 0, all
 * 30000. */
static float rule_value01(int64_t r, int64_t j, int64_t lk, float u)
{
    switch (r % 8) {
    case 0:
        return -FLT_MAX;
    case 1:
        return -INFINITY;
    case 2:
        return j == lk - 1 || (j >= lk / 2 && j % 2) ? -FLT_MAX : -INFINITY;
    case 3:
        return u < -0.4f ? -FLT_MAX : 0.0f;
    case 4:
        return -10000.0f;
    case 5:
        return u < -0.4f ? -INFINITY : 0.0f;
    case 6:
        return u < -0.3f ? -FLT_MAX : u < 0.3f ? -INFINITY : 0.0f;
    default:
        return 30000.0f;
    }
}

static float *make_mask(int64_t batch, int64_t mq, int64_t lk, enum mask_fill fill)
{
    float *m = malloc((size_t)(batch * mq * lk > 0 ? batch * mq * lk : 1) * sizeof(float));
    assert_non_null(m);
    for (int64_t r = 0; r < batch * mq; r++)
        for (int64_t j = 0; j < lk; j++) {
            float u = frand(), *e = &m[r * lk + j];
            switch (fill) {
            case FILL_RANDOM:
                *e = u < -0.4f ? -10000.0f : 0.5f * frand();
                break;
            case FILL_FULLY_MASKED:
                *e = r % 3 == 1 ? -10000.0f : u < -0.4f ? -10000.0f : 0.0f;
                break;
            case FILL_NEG_INF:
                *e = r == 1 || u < -0.4f ? -INFINITY : 0.0f;
                break;
            case FILL_RULE:
                *e = rule_value01(r, j, lk, u);
                break;
            }
        }
    return m;
}

/* One case's inputs, owned buffers and tensors. */
struct attn_io {
    const struct attn_case *c;
    int64_t inner, mq, ldq, ldk, ldv, ldo;
    float *qkv, *qb, *kb, *vb, *mask;
    const float *q, *k, *v;
    struct bs_tensor tq, tk, tv, tm;
    struct bs_attn_params p;
};

/* zero_q: q = 0, so that every score is 0 and every weight 0 or 1 (with a
 * mask of 0, -10000 and -inf: the fills but FILL_RANDOM). */
static void io_init(struct attn_io *a, const struct attn_case *c, bool zero_q)
{
    memset(a, 0, sizeof(*a));
    a->c = c;
    a->inner = (int64_t)c->heads * c->hd;
    a->mq = c->mask == MASK_PER_QUERY ? c->lq : 1;
    a->ldo = a->inner + 7;
    if (c->fused) { /* q, k and v from the first B*Lq or B*Lk rows */
        int64_t rows = c->batch * (c->lq > c->lk ? c->lq : c->lk);
        a->qkv = alloc_scaled(rows * 3 * a->inner, 1.0f);
        a->q = a->qkv, a->k = a->qkv + a->inner, a->v = a->qkv + 2 * a->inner;
        a->ldq = a->ldk = a->ldv = 3 * a->inner;
    } else { /* separate buffers with padded rows; q larger for a sharper softmax */
        a->ldq = a->inner + 3, a->ldk = a->inner + 5, a->ldv = a->inner;
        a->q = a->qb = alloc_scaled(c->batch * c->lq * a->ldq, 3.0f);
        a->k = a->kb = alloc_scaled(c->batch * c->lk * a->ldk, 1.0f);
        a->v = a->vb = alloc_scaled(c->batch * c->lk * a->ldv, 1.0f);
    }
    for (int64_t r = 0; zero_q && r < c->batch * c->lq; r++)
        memset((float *)a->q + r * a->ldq, 0, (size_t)a->inner * sizeof(float));
    a->tq = mat((float *)a->q, c->batch * c->lq, a->inner, a->ldq);
    a->tk = mat((float *)a->k, c->batch * c->lk, a->inner, a->ldk);
    a->tv = mat((float *)a->v, c->batch * c->lk, a->inner, a->ldv);
    if (c->mask != MASK_NONE) {
        int64_t ne[3] = {c->batch, a->mq, c->lk};
        a->mask = make_mask(c->batch, a->mq, c->lk, c->fill);
        a->tm = bs_tensor_make(BS_TYPE_F32, 3, ne, a->mask);
    }
    a->p = (struct bs_attn_params){
        .batch = c->batch,
        .lq = c->lq,
        .lk = c->lk,
        .heads = c->heads,
        .head_dim = c->hd,
        .scale = 1.0f / sqrtf((float)c->hd),
        .mask = a->mask ? &a->tm : NULL,
    };
}

static void io_free(struct attn_io *a)
{
    free(a->qkv), free(a->qb), free(a->kb), free(a->vb), free(a->mask);
}

/* The reference (dense [B*Lq, inner]) and its P-rounding bound per element;
 * bf16: from q, k, v rounded as the BF16 kernel rounds them. dead[row] is
 * set where the row has nothing to attend to. */
static void reference(const struct attn_io *a, bool bf16, double *want, double *bound, bool *dead)
{
    const struct attn_case *c = a->c;
    int hd = c->hd;
    double *s = malloc((size_t)(c->lk > 0 ? c->lk : 1) * sizeof(double));
    float *qr = malloc((size_t)hd * sizeof(float));
    assert_true(s != NULL && qr != NULL);
    for (int64_t b = 0; b < c->batch; b++)
        for (int h = 0; h < c->heads; h++)
            for (int64_t i = 0; i < c->lq; i++) {
                int64_t row = b * c->lq + i;
                const float *mr =
                    a->mask ? a->mask + (b * a->mq + (a->mq == 1 ? 0 : i)) * c->lk : NULL;
                dead[row] = !ref_attend_row(
                    a->q + row * a->ldq + h * hd, a->p.scale, a->k + b * c->lk * a->ldk + h * hd,
                    a->ldk, a->v + b * c->lk * a->ldv + h * hd, a->ldv, c->lk, hd, mr, bf16, s, qr,
                    want + row * a->inner + h * hd, bound + row * a->inner + h * hd);
            }
    free(s), free(qr);
}

/* Runs the op; o (B*Lq rows of ldo, pre-filled with a pattern) is allocated here. */
static float *run_op(struct bs_backend *be, struct attn_io *a, enum bs_dtype compute)
{
    struct bs_err err = {0};
    int64_t rows = a->c->batch * a->c->lq;
    float *o = malloc((size_t)(rows > 0 ? rows * a->ldo : 1) * sizeof(float));
    assert_non_null(o);
    for (int64_t i = 0; i < rows * a->ldo; i++)
        o[i] = 1234.5f;
    struct bs_tensor to = mat(o, rows, a->inner, a->ldo);
    a->p.compute = compute;
    int rc = be->iface->attention(be->ctx, &to, &a->tq, &a->tk, &a->tv, &a->p, &err);
    if (rc != 0)
        fail_msg("attention failed: %d %s", rc, err.msg);
    return o;
}

static void describe(const struct attn_case *c, char *buf, size_t n)
{
    snprintf(buf, n, "B %lld Lq %lld Lk %lld heads %d x %d mask %d fill %d fused %d",
             (long long)c->batch, (long long)c->lq, (long long)c->lk, c->heads, c->hd, c->mask,
             c->fill, c->fused);
}

/* o against the BF16 reference within its tolerance (exact: every weight 0
 * or 1, no P rounding); dead rows exactly 0 and the padding columns
 * untouched. Returns the worst share of the tolerance. */
static double check_bf16(const struct attn_io *a, const float *o, const double *want,
                         const double *bound, const bool *dead, bool exact, const char *what)
{
    double worst = 0.0;
    int64_t rows = a->c->batch * a->c->lq;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t e = 0; e < a->inner; e++) {
            double got = o[r * a->ldo + e], w = want[r * a->inner + e];
            double tol = exact ? SLACK_EXACT
                               : ldexp(1.0 + ldexp(1.0, -7), -8) * bound[r * a->inner + e] + SLACK;
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
            if (o[r * a->ldo + e] != 1234.5f)
                fail_msg("%s: row %lld: padding column %lld written", what, (long long)r,
                         (long long)e);
    }
    return worst;
}

static bool same_bits(const float *x, const float *y, const struct attn_io *a)
{
    return memcmp(x, y, (size_t)(a->c->batch * a->c->lq * a->ldo) * sizeof(float)) == 0;
}

/* ---- tests ------------------------------------------------------------- */

static int setup(void **state)
{
    struct bs_err err = {0};
    const char *env = getenv("BS_CPU_ISA");
    char *saved = env ? strdup(env) : NULL;
    int rc = setenv_isa(NULL) || bs_backend_cpu_init(&be1, 1, &err) ||
             bs_backend_cpu_init(&be2, 2, &err) || setenv_isa("avx2") ||
             bs_backend_cpu_init(&be_avx2, 2, &err) || setenv_isa("avx512") ||
             bs_backend_cpu_init(&be_avx512, 2, &err) || setenv_isa(saved);
    free(saved);
    if (rc != 0) {
        fprintf(stderr, "setup: %s\n", err.msg);
        return -1;
    }
    bf16_runs = isa_of(&be1) >= BS__ISA_AVX512_BF16;
    return 0;
}

static int teardown(void **state)
{
    bs_backend_free(&be1);
    bs_backend_free(&be2);
    bs_backend_free(&be_avx2);
    bs_backend_free(&be_avx512);
    return 0;
}

/* The contexts took the instruction set they should: the CPU's best unless
 * the build is portable, capped by BS_CPU_ISA. */
static void test_isa(void **state)
{
    bool cpu_bf16 = false, simd_build = isa_of(&be1) >= BS__ISA_AVX2;
#if defined(__x86_64__)
    __builtin_cpu_init();
    cpu_bf16 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bf16");
#endif
    printf("isa: %s (1 thread), %s (2), %s (BS_CPU_ISA=avx2), %s (BS_CPU_ISA=avx512)\n",
           bs__cpu_isa_name(isa_of(&be1)), bs__cpu_isa_name(isa_of(&be2)),
           bs__cpu_isa_name(isa_of(&be_avx2)), bs__cpu_isa_name(isa_of(&be_avx512)));
    assert_int_equal(isa_of(&be1), isa_of(&be2));
    if (simd_build) {
        assert_int_equal(isa_of(&be_avx2), BS__ISA_AVX2);
        assert_true(isa_of(&be_avx512) >= BS__ISA_AVX2 && isa_of(&be_avx512) <= BS__ISA_AVX512);
        if (cpu_bf16)
            assert_int_equal(isa_of(&be1), BS__ISA_AVX512_BF16);
    }
    if (!cpu_bf16)
        printf("SKIP: this CPU lacks AVX512_BF16: BF16 products not checked, fallback only\n");
    else if (!simd_build)
        printf("NOTE: portable build (no AVX code): BF16 calls compute in FP32; checking "
               "that fallback only\n");
}

/* One case with BF16 products against the rounded reference, on 1 and 2
 * threads. */
static void run_bf16_case(const struct attn_case *c, bool zero_q)
{
    struct attn_io a;
    char what[160];
    io_init(&a, c, zero_q);
    describe(c, what, sizeof(what));
    int64_t cells = c->batch * c->lq * a.inner;
    double *want = calloc((size_t)cells + 1, sizeof(double));
    double *bound = calloc((size_t)cells + 1, sizeof(double));
    bool *dead = calloc((size_t)(c->batch * c->lq) + 1, sizeof(bool));
    assert_true(want != NULL && bound != NULL && dead != NULL);
    reference(&a, true, want, bound, dead);

    float *o1 = run_op(&be1, &a, BS_TYPE_BF16), *o2 = run_op(&be2, &a, BS_TYPE_BF16);
    float *o32 = run_op(&be2, &a, BS_TYPE_F32);
    double share = check_bf16(&a, o1, want, bound, dead, zero_q, what);
    if (!same_bits(o1, o2, &a))
        fail_msg("%s: 1 and 2 threads differ", what);
    int64_t live = 0;
    for (int64_t r = 0; r < c->batch * c->lq; r++)
        live += !dead[r];
    if (live > 0 && same_bits(o1, o32, &a))
        fail_msg("%s: BF16 result equals the FP32 kernel's: BF16 products did not run", what);
    printf("%s %-62s worst %.2f of tolerance\n", zero_q ? "0/1 weights" : "bf16", what, share);
    free(o1), free(o2), free(o32), free(want), free(bound), free(dead);
    io_free(&a);
}

static void test_bf16_products(void **state)
{
    if (!bf16_runs) {
        printf("SKIP: no AVX512_BF16 kernels here (see test_isa)\n");
        return;
    }
    for (size_t n = 0; n < sizeof(cases) / sizeof(cases[0]); n++)
        run_bf16_case(&cases[n], false);
}

/* The same cases with every weight 0 or 1 (q = 0, masks without
 * FILL_RANDOM's noise): P's rounding is exact, so what is left is FP32
 * arithmetic on the value side (V's conversion, P's layout, l, the masks,
 * the rescaling across key tiles), held to SLACK_EXACT. */
static void test_bf16_exact_weights(void **state)
{
    if (!bf16_runs) {
        printf("SKIP: no AVX512_BF16 kernels here (see test_isa)\n");
        return;
    }
    for (size_t n = 0; n < sizeof(cases) / sizeof(cases[0]); n++)
        if (cases[n].mask == MASK_NONE || cases[n].fill != FILL_RANDOM)
            run_bf16_case(&cases[n], true);
}

/* A mask whose rows are each one constant (-10000, 30000, 0, -1e30, 5) adds
 * nothing to the BF16 kernel either: its output equals the unmasked one
 * within 1e-5 of max |o| (the shift makes it exact), in both mask forms. */
static void test_bf16_constant_rows(void **state)
{
    static const float consts[] = {-10000.0f, 30000.0f, 0.0f, -1e30f, 5.0f};
    if (!bf16_runs) {
        printf("SKIP: no AVX512_BF16 kernels here (see test_isa)\n");
        return;
    }
    for (int per_query = 0; per_query < 2; per_query++) {
        const struct attn_case c = {
            3, 70, 300, 2, 40, per_query ? MASK_PER_QUERY : MASK_PER_SAMPLE, FILL_RANDOM, false};
        struct attn_io a;
        io_init(&a, &c, false);
        a.p.mask = NULL; /* unmasked first; then io_init's mask, made constant per row */
        float *o0 = run_op(&be2, &a, BS_TYPE_BF16);
        a.p.mask = &a.tm;
        for (int64_t r = 0; r < c.batch * a.mq; r++)
            for (int64_t j = 0; j < c.lk; j++)
                a.mask[r * c.lk + j] = consts[r % 5];
        float *o1 = run_op(&be2, &a, BS_TYPE_BF16);
        double e = 0, big = 0;
        for (int64_t r = 0; r < c.batch * c.lq; r++)
            for (int64_t d = 0; d < a.inner; d++) {
                e = fmax(e, fabs((double)o1[r * a.ldo + d] - o0[r * a.ldo + d]));
                big = fmax(big, fabs((double)o0[r * a.ldo + d]));
            }
        printf("bf16 constant mask rows (%s): max |masked - unmasked| %.3g (%.2f of 1e-5 x max "
               "|o|)\n",
               per_query ? "[B,Lq,Lk]" : "[B,1,Lk]", e, e / (1e-5 * big));
        if (!(e <= 1e-5 * big))
            fail_msg("bf16: constant mask rows change the output by %.3g", e);
        free(o0), free(o1);
        io_free(&a);
    }
}

/* A BF16 call where the context has no BF16 kernels gives the FP32 kernel's
 * bits; that result is FP32-accurate (1e-4, as test_cpu_ops holds it). */
static void test_fallback(void **state)
{
    static const size_t picks[] = {2, 5, 7, 8, 11, 17};
    struct bs_backend *bes[3] = {&be_avx2, &be_avx512, &be1};
    const char *names[3] = {"BS_CPU_ISA=avx2", "BS_CPU_ISA=avx512", "default"};
    for (int b = 0; b < 3; b++) {
        if (isa_of(bes[b]) >= BS__ISA_AVX512_BF16)
            continue; /* be1 when it has the BF16 kernels: test_bf16_products */
        for (size_t n = 0; n < sizeof(picks) / sizeof(picks[0]); n++) {
            const struct attn_case *c = &cases[picks[n]];
            struct attn_io a;
            char what[200], desc[160];
            io_init(&a, c, false);
            describe(c, desc, sizeof(desc));
            snprintf(what, sizeof(what), "%s: %s", names[b], desc);
            int64_t cells = c->batch * c->lq * a.inner;
            double *want = calloc((size_t)cells + 1, sizeof(double));
            double *bound = calloc((size_t)cells + 1, sizeof(double));
            bool *dead = calloc((size_t)(c->batch * c->lq) + 1, sizeof(bool));
            assert_true(want != NULL && bound != NULL && dead != NULL);
            reference(&a, false, want, bound, dead);
            float *o16 = run_op(bes[b], &a, BS_TYPE_BF16), *o32 = run_op(bes[b], &a, BS_TYPE_F32);
            if (!same_bits(o16, o32, &a))
                fail_msg("%s: BF16 call differs from the FP32 kernel", what);
            double e = 0.0;
            for (int64_t r = 0; r < c->batch * c->lq; r++)
                for (int64_t d = 0; d < a.inner; d++)
                    e = fmax(e, fabs(o16[r * a.ldo + d] - want[r * a.inner + d]));
            if (!(e <= 1e-4))
                fail_msg("%s: max abs error %.3g > 1e-4", what, e);
            printf("fallback %-70s max error %.2g\n", what, e);
            free(o16), free(o32), free(want), free(bound), free(dead);
            io_free(&a);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_isa),
        cmocka_unit_test(test_bf16_products),
        cmocka_unit_test(test_bf16_exact_weights),
        cmocka_unit_test(test_bf16_constant_rows),
        cmocka_unit_test(test_fallback),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
