/* The CPU backend's BF16 linear (pack_weight, then linear on the packed
 * weight or row views of it; kernels/cpu/gemm_bf16.c) against
 * double-precision references, on every dispatch path this CPU has:
 * avx512bf16 (vdpbf16ps; skipped with a message on a CPU without it), avx2
 * (BS_CPU_ISA=avx2: BF16 weights widened to F32, FMA) and generic
 * (BS_CPU_ISA=generic: plain C), each on 1 and 2 threads.
 *
 * Tolerances, per element of y, with S = sum_k |x_k w_k| + |b| + beta |y0|
 * taken over the operands the check compares with:
 *   tight, against the double product of the BF16-rounded operands (x and w
 *   rounded to nearest even, as bs_f32_to_bf16): (K + 3) * 2^-24 * S. Every
 *   product of two BF16 values is exact in F32, so all the error is F32
 *   summation of at most K + 2 terms, in any order and grouping (K blocks,
 *   vdpbf16ps pairs): at most gamma_{K+1} S, about (K + 1) 2^-24 S.
 *   loose, against the unrounded operands: (2^-7 + 2^-16) * S + the tight
 *   bound. BF16 keeps 8 significant bits, so rounding moves an operand by at
 *   most 2^-8 of itself, and a product by at most (2 * 2^-8 + 2^-16) of
 *   itself.
 * Inputs are uniform in [-1, 1) (no denormals: the avx512bf16 instructions
 * treat them as zero). The test prints, per path, the worst error as a share
 * of each tolerance. */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"
#include "ops_cpu.h"
#include "tensor.h"
#define TEST_RNG_SEED 0x2545f4914f6cdd1dull
#include "test_rand.h"

/* ---- helpers ----------------------------------------------------------- */


static float round_bf16(float f)
{
    return bs_bf16_to_f32(bs_f32_to_bf16(f));
}

/* A [rows, cols] F32 rows tensor over data with row stride ld. */
static struct bs_tensor mat(float *data, int64_t rows, int64_t cols, int64_t ld)
{
    int64_t ne[2] = {rows, ld};
    struct bs_tensor t = bs_tensor_make(BS_TYPE_F32, 2, ne, data);
    return bs_tensor_view_cols(&t, 0, cols);
}

/* A backend on path isa ("avx512bf16", "avx2", "generic") with n threads;
 * false when this CPU (or build) does not reach that path. */
static bool backend_on(struct bs_backend *be, const char *isa, int n)
{
    struct bs_err err = {0};
    setenv("BS_CPU_ISA", isa, 1);
    int rc = bs_backend_cpu_init(be, n, &err);
    unsetenv("BS_CPU_ISA");
    assert_int_equal(rc, 0);
    const struct bs__cpu *c = be->ctx;
    if (strcmp(bs__cpu_isa_name(c->isa), isa) == 0)
        return true;
    bs_backend_free(be);
    return false;
}

/* A packed [n, k] weight from w (F32, row-major); the caller buf_frees data. */
static struct bs_tensor pack(struct bs_backend *be, const float *w, int64_t n, int64_t k)
{
    struct bs_err err = {0};
    int64_t ne[2] = {n, k};
    struct bs_tensor tw = bs_tensor_make(BS_TYPE_F32, 2, ne, (void *)w), packed;
    int rc = be->iface->pack_weight(be->ctx, &packed, &tw, BS_TYPE_BF16, &err);
    if (rc != 0)
        fail_msg("pack_weight [%lld, %lld]: %s", (long long)n, (long long)k, err.msg);
    assert_int_equal(packed.type, BS_TYPE_BF16);
    assert_int_equal(packed.ne[0], n);
    assert_int_equal(packed.ne[1], k);
    return packed;
}

/* ---- linear ------------------------------------------------------------ */

struct lin_case {
    int64_t m, wn, k; /* x [m, k], the packed weight [wn, k] */
    int64_t r0, n;    /* the view: rows [r0, r0 + n) of the weight (y's columns) */
    int64_t ldx, ldy;
    bool bias;
    float beta;
};

/* Worst error as a share of the tolerances, over everything a path ran. */
struct worst {
    double tight, loose;
    double tight_long; /* over the cases with K >= 64 (the summation's share) */
};

/* want = x w[r0:r0+n]^T + b + beta y0 in double, and S (see the header), with
 * x and w rounded to BF16 when round is set. */
static void linear_ref(double *want, double *s, const struct lin_case *t, const float *x,
                       const float *w, const float *b, const float *y0, bool round)
{
    for (int64_t i = 0; i < t->m; i++)
        for (int64_t c = 0; c < t->n; c++) {
            const float *xr = x + i * t->ldx, *wr = w + (t->r0 + c) * t->k;
            double acc = 0, abs = 0;
            for (int64_t kk = 0; kk < t->k; kk++) {
                double p = round ? (double)round_bf16(xr[kk]) * round_bf16(wr[kk])
                                 : (double)xr[kk] * wr[kk];
                acc += p;
                abs += fabs(p);
            }
            double yv = t->beta != 0.0f ? y0[i * t->ldy + c] : 0.0, bv = b ? b[c] : 0.0;
            want[i * t->n + c] = acc + bv + yv;
            s[i * t->n + c] = abs + fabs(bv) + fabs(yv);
        }
}

/* Largest |got - want| / tolerance, tol = scale * S + add_scale * S_tight. */
static double check(const float *got, int64_t ldy, const double *want, const double *s,
                    const double *s_tight, const struct lin_case *t, double scale,
                    double tight_scale)
{
    double worst = 0;
    for (int64_t i = 0; i < t->m; i++)
        for (int64_t c = 0; c < t->n; c++) {
            double g = got[i * ldy + c], e = fabs(g - want[i * t->n + c]);
            double tol = scale * s[i * t->n + c] + tight_scale * s_tight[i * t->n + c];
            double share = e == 0 ? 0 : tol > 0 ? e / tol : INFINITY;
            if (isnan(g))
                share = INFINITY;
            if (share > worst)
                worst = share;
        }
    return worst;
}

/* A case's inputs and references, made once (group setup) for every path. */
struct case_data {
    float *x, *w, *b, *y0;
    double *want_r, *s_r, *want_u, *s_u; /* BF16-rounded and unrounded operands */
};

static void case_build(struct case_data *d, const struct lin_case *t)
{
    size_t cells = (size_t)(t->m * t->n + 1);
    d->x = alloc_rand(t->m * t->ldx);
    d->w = alloc_rand(t->wn * t->k);
    d->b = alloc_rand(t->n);
    d->y0 = alloc_rand(t->m * t->ldy);
    d->want_r = malloc(cells * 8), d->s_r = malloc(cells * 8);
    d->want_u = malloc(cells * 8), d->s_u = malloc(cells * 8);
    assert_true(d->want_r && d->s_r && d->want_u && d->s_u);
    const float *bp = t->bias ? d->b : NULL;
    linear_ref(d->want_r, d->s_r, t, d->x, d->w, bp, d->y0, true);
    linear_ref(d->want_u, d->s_u, t, d->x, d->w, bp, d->y0, false);
}

static void case_free(struct case_data *d)
{
    free(d->x), free(d->w), free(d->b), free(d->y0);
    free(d->want_r), free(d->s_r), free(d->want_u), free(d->s_u);
}

static void run_case(struct bs_backend *be, const struct lin_case *t, const struct case_data *d,
                     struct worst *wst)
{
    struct bs_err err = {0};
    float *y = malloc((size_t)(t->m * t->ldy + 1) * 4);
    assert_non_null(y);
    memcpy(y, d->y0, (size_t)(t->m * t->ldy) * 4);
    struct bs_tensor packed = pack(be, d->w, t->wn, t->k);
    struct bs_tensor tw = bs_tensor_view_outer(&packed, t->r0, t->n);
    struct bs_tensor tx = mat(d->x, t->m, t->k, t->ldx), ty = mat(y, t->m, t->n, t->ldy);
    int64_t nb = t->n;
    struct bs_tensor tb = bs_tensor_make(BS_TYPE_F32, 1, &nb, d->b);
    int rc = be->iface->linear(be->ctx, &ty, &tx, &tw, t->bias ? &tb : NULL, t->beta, &err);
    if (rc != 0)
        fail_msg("linear: %s", err.msg);

    double u = ldexp(1.0, -24);
    double tight = check(y, t->ldy, d->want_r, d->s_r, d->s_r, t, (double)(t->k + 3) * u, 0);
    double loose = check(y, t->ldy, d->want_u, d->s_u, d->s_r, t, ldexp(1.0, -7) + ldexp(1.0, -16),
                         (double)(t->k + 3) * u);
    /* Columns of y outside the view and ldy padding are untouched. */
    for (int64_t i = 0; i < t->m; i++)
        for (int64_t c = t->n; c < t->ldy; c++)
            assert_true(y[i * t->ldy + c] == d->y0[i * t->ldy + c]);
    if (tight > 1.0 || loose > 1.0)
        fail_msg("linear m=%lld n=%lld (rows %lld.. of %lld) k=%lld beta=%g: error %.3g (tight) "
                 "%.3g (loose) of the tolerance",
                 (long long)t->m, (long long)t->n, (long long)t->r0, (long long)t->wn,
                 (long long)t->k, (double)t->beta, tight, loose);
    wst->tight = tight > wst->tight ? tight : wst->tight;
    wst->loose = loose > wst->loose ? loose : wst->loose;
    if (t->k >= 64 && tight > wst->tight_long)
        wst->tight_long = tight;
    be->iface->buf_free(be->ctx, packed.data);
    free(y);
}

static const struct lin_case cases[] = {
    /*  m   wn     k   r0    n   ldx  ldy  bias beta */
    {1, 7, 5, 0, 7, 5, 7, true, 0.0f},                  /* M = 1, N < NR, K odd */
    {3, 40, 1, 0, 40, 1, 40, false, 1.0f},              /* K = 1 */
    {5, 9, 0, 0, 9, 1, 9, true, 1.0f},                  /* K = 0: y = b + y */
    {4, 33, 0, 0, 33, 1, 40, false, 0.0f},              /* K = 0: y = 0 */
    {37, 100, 77, 0, 100, 80, 130, true, 1.0f},         /* odd sizes; x and y column views */
    {29, 64, 64, 0, 64, 64, 64, false, 0.0f},           /* whole panels */
    {20, 96, 48, 32, 64, 48, 64, true, 0.0f},           /* view at a panel boundary */
    {20, 100, 45, 13, 50, 45, 50, true, 1.0f},          /* view across panels, unaligned */
    {15, 100, 31, 37, 3, 40, 9, false, 1.0f},           /* view inside one panel */
    {77, 640, 768, 0, 640, 768, 640, true, 0.0f},       /* threaded: M and N */
    {130, 96, 1500, 0, 96, 1511, 100, true, 1.0f},      /* several K blocks, K tail */
    {600, 200, 301, 0, 200, 320, 200, false, 1.0f},     /* large M: several A blocks */
    {8, 1000, 512, 100, 700, 512, 700, true, 0.0f},     /* small M: split along N */
    {400, 70, 130, 5, 65, 130, 66, true, 1.0f},         /* M > MC, N tail in two panels */
    {90, 200, 200, 7, 190, 210, 200, true, 0.0f},       /* threaded, few tiles: a small grid */
    {300, 1024, 1700, 0, 1024, 1700, 1024, true, 1.0f}, /* large: a grid of equal tasks */
};

#define N_CASES (sizeof(cases) / sizeof(cases[0]))
static struct case_data case_data[N_CASES];

static int setup(void **state)
{
    for (size_t i = 0; i < N_CASES; i++)
        case_build(&case_data[i], &cases[i]);
    return 0;
}

static int teardown(void **state)
{
    for (size_t i = 0; i < N_CASES; i++)
        case_free(&case_data[i]);
    return 0;
}

static void run_path(const char *isa)
{
    for (int threads = 1; threads <= 2; threads++) {
        struct bs_backend be;
        if (!backend_on(&be, isa, threads)) {
            printf("[ SKIPPED  ] %s path: this CPU (or build) does not reach it\n", isa);
            return;
        }
        struct worst wst = {0};
        for (size_t i = 0; i < N_CASES; i++)
            run_case(&be, &cases[i], &case_data[i], &wst);
        printf("[ INFO     ] %s, %d thread%s: worst error %.3f of the tight tolerance (%.3f "
               "with K >= 64), %.3f of the loose one\n",
               isa, threads, threads > 1 ? "s" : "", wst.tight, wst.tight_long, wst.loose);
        bs_backend_free(&be);
    }
}

static void test_linear_avx512bf16(void **state)
{
    run_path("avx512bf16");
}

static void test_linear_avx2(void **state)
{
    run_path("avx2");
}

static void test_linear_generic(void **state)
{
    run_path("generic");
}

/* Several threads calling linear at once on one backend (its pool and its
 * per-thread scratch shared): each gets the bits of a lone call. */
struct concurrent_arg {
    struct bs_backend *be;
    const struct bs_tensor *w;
    const float *x;
    float *y;
    int rc;
};

static void *concurrent_main(void *p)
{
    struct concurrent_arg *a = p;
    struct bs_err err = {0};
    struct bs_tensor tx = mat((float *)a->x, 300, 256, 256), ty = mat(a->y, 300, 192, 192);
    for (int i = 0; i < 20 && a->rc == 0; i++)
        a->rc = a->be->iface->linear(a->be->ctx, &ty, &tx, a->w, NULL, 0.0f, &err);
    return NULL;
}

static void test_concurrent(void **state)
{
    struct bs_backend be;
    struct bs_err err = {0};
    assert_int_equal(bs_backend_cpu_init(&be, 2, &err), 0);
    float *w = alloc_rand(192 * 256), *x = alloc_rand(300 * 256);
    struct bs_tensor packed = pack(&be, w, 192, 256);
    float *want = calloc(300 * 192, 4);
    struct bs_tensor tx = mat(x, 300, 256, 256), ty = mat(want, 300, 192, 192);
    assert_int_equal(be.iface->linear(be.ctx, &ty, &tx, &packed, NULL, 0.0f, &err), 0);
    pthread_t th[4];
    struct concurrent_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (struct concurrent_arg){&be, &packed, x, calloc(300 * 192, 4), 0};
        assert_int_equal(pthread_create(&th[i], NULL, concurrent_main, &args[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(args[i].rc, 0);
        /* The same blocks in the same order: the same bits. */
        assert_memory_equal(args[i].y, want, 300 * 192 * 4);
        free(args[i].y);
    }
    be.iface->buf_free(be.ctx, packed.data);
    free(w), free(x), free(want);
    bs_backend_free(&be);
}

static void test_errors(void **state)
{
    struct bs_backend be;
    struct bs_err err = {0};
    assert_int_equal(bs_backend_cpu_init(&be, 2, &err), 0);
    float *w = alloc_rand(64 * 32), *x = alloc_rand(4 * 32), *y = alloc_rand(4 * 64);
    int64_t ne[2] = {64, 32};
    struct bs_tensor tw = bs_tensor_make(BS_TYPE_F32, 2, ne, w), packed;
    struct bs_tensor tx = mat(x, 4, 32, 32), ty = mat(y, 4, 64, 64);

    /* pack_weight: BF16 only. */
    assert_int_equal(be.iface->pack_weight(be.ctx, &packed, &tw, BS_TYPE_F16, &err), BS_EUNSUPP);
    assert_non_null(strstr(err.msg, "BF16 only"));

    /* A BF16 w this backend did not pack. */
    uint16_t *plain = calloc(64 * 32, 2);
    struct bs_tensor tp = bs_tensor_make(BS_TYPE_BF16, 2, ne, plain);
    assert_int_equal(be.iface->linear(be.ctx, &ty, &tx, &tp, NULL, 0.0f, &err), BS_EINVAL);
    assert_string_equal(err.msg, "linear: BF16 weight not packed by this backend");

    /* A packed one works; a pointer inside it that is not a row start does not. */
    packed = pack(&be, w, 64, 32);
    assert_int_equal(be.iface->linear(be.ctx, &ty, &tx, &packed, NULL, 0.0f, &err), 0);
    struct bs_tensor bad = bs_tensor_view_outer(&packed, 1, 63), ty63 = mat(y, 4, 63, 64);
    bad.data = (char *)bad.data + 2;
    assert_int_equal(be.iface->linear(be.ctx, &ty63, &tx, &bad, NULL, 0.0f, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "not whole rows"));
    /* Shapes are checked as for F32 (opcheck): K must match. */
    struct bs_tensor tx2 = mat(x, 4, 31, 32);
    assert_int_equal(be.iface->linear(be.ctx, &ty, &tx2, &packed, NULL, 0.0f, &err), BS_EINVAL);

    /* buf_free forgets it. */
    void *data = packed.data;
    be.iface->buf_free(be.ctx, data);
    assert_int_equal(be.iface->linear(be.ctx, &ty, &tx, &packed, NULL, 0.0f, &err), BS_EINVAL);
    assert_string_equal(err.msg, "linear: BF16 weight not packed by this backend");

    free(plain), free(w), free(x), free(y);
    bs_backend_free(&be);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_linear_avx512bf16),
        cmocka_unit_test(test_linear_avx2),
        cmocka_unit_test(test_linear_generic),
        cmocka_unit_test(test_concurrent),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
