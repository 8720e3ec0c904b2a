/* CPU backend ops and thread pool against naive double-precision references.
 *
 * Tolerances (max abs error against the double reference):
 *   linear                      1e-4 (K up to 1000, |x|, |w| <= 1)
 *   layer_norm, group_norm      1e-5 (outputs of order 1, means up to 100)
 *   activations                 1e-5 * max(1, |x|), and never NaN or inf
 *   glu                         1e-5 * max(1, |x|)
 *   attention                   1e-4; 1e-5 for the mask rule's cases (FILL_RULE), and
 *                               1e-5 x max |o| between a mask of constant rows and none
 *   add, transpose, get_rows    exact (or 1e-6 with alpha != 1)
 * and vmath.h's own claims: exp relative 2e-7, erf 1.5e-7, tanh and sigmoid
 * 2e-7, activations 3e-7 * max(1, |x|). */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
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
#include "threadpool.h"
#include "vmath.h"
#define TEST_RNG_SEED 0x9e3779b97f4a7c15ull
#include "test_rand.h"
#include "test_attn_util.h"

/* 3 threads: an odd count, more than the cores of small CI machines, so that
 * the split paths and the pool's interleavings get exercised anyway. */
#define TEST_THREADS 3

static struct bs_backend be;

/* ---- helpers ----------------------------------------------------------- */


static double *alloc_d(int64_t n)
{
    double *p = calloc((size_t)(n > 0 ? n : 1), sizeof(double));
    assert_non_null(p);
    return p;
}

/* A [rows, cols] F32 rows tensor over data with row stride ld. */
static struct bs_tensor mat(float *data, int64_t rows, int64_t cols, int64_t ld)
{
    int64_t ne[2] = {rows, ld};
    struct bs_tensor t = bs_tensor_make(BS_TYPE_F32, 2, ne, data);
    return bs_tensor_view_cols(&t, 0, cols);
}

static struct bs_tensor vec(float *data, int64_t n)
{
    return bs_tensor_make(BS_TYPE_F32, 1, &n, data);
}

/* Max abs error of got (row stride ld) against want (dense rows x cols),
 * scaled per element by max(1, |scale_by[i]|) when scale_by is given. */
static double max_err(const float *got, int64_t ld, const double *want, int64_t rows, int64_t cols,
                      const float *scale_by)
{
    double e = 0.0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            double g = got[r * ld + c], w = want[r * cols + c];
            double d = fabs(g - w);
            if (scale_by != NULL)
                d /= fmax(1.0, fabs((double)scale_by[r * cols + c]));
            if (isnan(g) != isnan(w) || d > e)
                e = isnan(g) != isnan(w) ? INFINITY : d;
        }
    return e;
}

static void expect_close(const char *what, const float *got, int64_t ld, const double *want,
                         int64_t rows, int64_t cols, double tol)
{
    double e = max_err(got, ld, want, rows, cols, NULL);
    if (!(e <= tol))
        fail_msg("%s: max abs error %.3g > %.3g", what, e, tol);
}

static int call_ok(int rc, struct bs_err *err)
{
    if (rc != 0)
        fail_msg("op failed: %d %s", rc, err->msg);
    return rc;
}

static int setup(void **state)
{
    struct bs_err err = {0};
    return bs_backend_cpu_init(&be, TEST_THREADS, &err);
}

static int teardown(void **state)
{
    bs_backend_free(&be);
    return 0;
}

/* ---- thread pool ------------------------------------------------------- */

struct count_job {
    atomic_int *hits;
    atomic_int *busy; /* per thread index: tasks running now */
    atomic_int bad;
    int n_threads;
};

static void count_task(void *arg, int64_t task, int thread)
{
    struct count_job *j = arg;
    if (thread < 0 || thread >= j->n_threads ||
        atomic_fetch_add(&j->busy[thread], 1) != 0) /* two threads with one index */
        atomic_fetch_add(&j->bad, 1);
    atomic_fetch_add(&j->hits[task], 1);
    if (thread >= 0 && thread < j->n_threads)
        atomic_fetch_sub(&j->busy[thread], 1);
}

static void test_pool_many_tasks(void **state)
{
    struct bs_err err = {0};
    bs_pool_t *pool;
    assert_int_equal(bs_pool_init(&pool, 4, &err), 0);
    assert_int_equal(bs_pool_size(pool), 4);
    enum { N = 100000 };
    atomic_int *hits = calloc(N, sizeof(*hits));
    atomic_int busy[4] = {0};
    struct count_job j = {.hits = hits, .busy = busy, .n_threads = 4};
    for (int64_t n = 0; n <= 3; n++) /* 0, 1 (runs inline), 2, 3 tasks */
        bs_pool_run(pool, n, count_task, &j);
    bs_pool_run(pool, N, count_task, &j);
    assert_int_equal(atomic_load(&j.bad), 0);
    assert_int_equal(atomic_load(&hits[0]), 4); /* runs of 1, 2 and 3 tasks, then N */
    assert_int_equal(atomic_load(&hits[1]), 3);
    assert_int_equal(atomic_load(&hits[2]), 2);
    for (int i = 3; i < N; i++)
        assert_int_equal(atomic_load(&hits[i]), 1);
    bs_pool_free(pool);
    bs_pool_free(NULL);
    free(hits);

    assert_int_equal(bs_pool_init(&pool, 0, &err), BS_EINVAL);
    assert_int_equal(bs_pool_init(&pool, 1, &err), 0); /* no workers: all inline */
    hits = calloc(N, sizeof(*hits));
    struct count_job j1 = {.hits = hits, .busy = busy, .n_threads = 1};
    bs_pool_run(pool, 1000, count_task, &j1);
    assert_int_equal(atomic_load(&j1.bad), 0);
    assert_int_equal(atomic_load(&hits[999]), 1);
    bs_pool_free(pool);
    free(hits);
}

struct runner_arg {
    bs_pool_t *pool;
    struct count_job *job;
};

static void *runner(void *p)
{
    struct runner_arg *a = p;
    for (int r = 0; r < 200; r++)
        bs_pool_run(a->pool, 1000, count_task, a->job);
    return NULL;
}

/* Two threads run on one pool at once: every task runs once per run and no
 * two concurrent tasks share a thread index. */
static void test_pool_concurrent_runs(void **state)
{
    struct bs_err err = {0};
    bs_pool_t *pool;
    assert_int_equal(bs_pool_init(&pool, 3, &err), 0);
    atomic_int hits[2][1000] = {{0}};
    atomic_int busy[3] = {0}; /* shared: indices must be unique across both runners */
    struct count_job jobs[2] = {
        {.hits = hits[0], .busy = busy, .n_threads = 3},
        {.hits = hits[1], .busy = busy, .n_threads = 3},
    };
    struct runner_arg args[2] = {{pool, &jobs[0]}, {pool, &jobs[1]}};
    pthread_t tid[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&tid[i], NULL, runner, &args[i]), 0);
    for (int i = 0; i < 2; i++)
        pthread_join(tid[i], NULL);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(atomic_load(&jobs[i].bad), 0);
        for (int t = 0; t < 1000; t++)
            assert_int_equal(atomic_load(&hits[i][t]), 200);
    }
    bs_pool_free(pool);
}

/* ---- backend basics ---------------------------------------------------- */

static void test_backend_basics(void **state)
{
    struct bs_err err = {0};
    assert_string_equal(be.iface->name, "cpu");
    assert_true(be.iface->host_memory);
    void *p = be.iface->buf_alloc(be.ctx, 1000);
    assert_non_null(p);
    assert_int_equal((uintptr_t)p % 64, 0);
    char src[1000];
    for (int i = 0; i < 1000; i++)
        src[i] = (char)i;
    assert_int_equal(be.iface->copy_in(be.ctx, p, src, sizeof(src), &err), 0);
    char back[1000];
    assert_int_equal(be.iface->copy_out(be.ctx, back, p, sizeof(back), &err), 0);
    assert_memory_equal(src, back, sizeof(src));
    be.iface->buf_free(be.ctx, p);

    struct bs_backend other;
    assert_int_equal(bs_backend_cpu_init(&other, -1, &err), BS_EINVAL);
    assert_int_equal(bs_backend_cpu_init(&other, 0, &err), 0); /* one per core */
    bs_backend_free(&other);
    assert_null(other.iface);
    bs_backend_free(&other); /* NULL iface: no-op */
}

/* ---- linear ------------------------------------------------------------ */

struct linear_case {
    int64_t m, n, k, ldx, ldy;
    bool bias;
    float beta;
};

static void run_linear(const struct linear_case *c)
{
    struct bs_err err = {0};
    float *x = alloc_rand(c->m * c->ldx), *w = alloc_rand(c->n * c->k);
    float *b = alloc_rand(c->n), *y = alloc_rand(c->m * c->ldy);
    float *y0 = malloc((size_t)(c->m * c->ldy) * sizeof(float));
    memcpy(y0, y, (size_t)(c->m * c->ldy) * sizeof(float));
    double *want = alloc_d(c->m * c->n);
    for (int64_t r = 0; r < c->m; r++)
        for (int64_t j = 0; j < c->n; j++) {
            double s = c->bias ? b[j] : 0.0;
            for (int64_t i = 0; i < c->k; i++)
                s += (double)x[r * c->ldx + i] * w[j * c->k + i];
            want[r * c->n + j] = s + c->beta * y0[r * c->ldy + j];
        }
    struct bs_tensor tx = mat(x, c->m, c->k, c->ldx), ty = mat(y, c->m, c->n, c->ldy);
    struct bs_tensor tw = mat(w, c->n, c->k, c->k), tb = vec(b, c->n);
    call_ok(be.iface->linear(be.ctx, &ty, &tx, &tw, c->bias ? &tb : NULL, c->beta, &err), &err);
    char what[128];
    snprintf(what, sizeof(what), "linear m %lld n %lld k %lld bias %d beta %g", (long long)c->m,
             (long long)c->n, (long long)c->k, c->bias, (double)c->beta);
    expect_close(what, y, c->ldy, want, c->m, c->n, 1e-4);
    for (int64_t r = 0; r < c->m; r++) /* the padding columns of y are untouched */
        for (int64_t j = c->n; j < c->ldy; j++)
            assert_true(y[r * c->ldy + j] == y0[r * c->ldy + j]);
    free(x), free(w), free(b), free(y), free(y0), free(want);
}

static void test_linear(void **state)
{
    static const struct linear_case cases[] = {
        {1, 7, 5, 5, 7, false, 0.0f},             /* tiny: one call on this thread */
        {2, 1920, 320, 320, 1920, true, 0.0f},    /* M small: split along N */
        {2, 1920, 320, 333, 1930, true, 1.0f},    /* ... strided x and y, accumulate */
        {77, 640, 768, 768, 640, true, 0.0f},     /* M and N split */
        {300, 96, 1000, 1000, 96, false, 1.0f},   /* K ~ 1000 */
        {1000, 130, 64, 3 * 64, 130, true, 0.0f}, /* M split, x a column view */
        {513, 257, 129, 140, 300, true, 1.0f},    /* odd sizes, both strided */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_linear(&cases[i]);
}

static void test_linear_errors(void **state)
{
    struct bs_err err = {0};
    float *x = alloc_rand(64), *w = alloc_rand(64), *y = alloc_rand(64);
    struct bs_tensor tx = mat(x, 4, 4, 4), tw = mat(w, 3, 5, 5), ty = mat(y, 4, 3, 3);
    assert_int_equal(be.iface->linear(be.ctx, &ty, &tx, &tw, NULL, 0.0f, &err), BS_EINVAL);
    tw = mat(w, 3, 4, 4);
    assert_int_equal(be.iface->linear(be.ctx, &ty, &tx, &tw, NULL, 0.5f, &err), BS_EINVAL);
    tx.type = BS_TYPE_F16;
    assert_int_equal(be.iface->linear(be.ctx, &ty, &tx, &tw, NULL, 0.0f, &err), BS_EINVAL);
    free(x), free(w), free(y);
}

/* ---- layer norm -------------------------------------------------------- */

static void layer_norm_ref(double *want, const float *x, int64_t ldx, int64_t rows, int64_t d,
                           float eps, const float *g, const float *bt, const float *sc,
                           const float *sh, int64_t ldm, int64_t rps)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        double mean = 0, var = 0;
        for (int64_t i = 0; i < d; i++)
            mean += xr[i];
        mean /= (double)d;
        for (int64_t i = 0; i < d; i++)
            var += (xr[i] - mean) * (xr[i] - mean);
        var /= (double)d;
        int64_t b = r / rps;
        for (int64_t i = 0; i < d; i++) {
            double v = (xr[i] - mean) / sqrt(var + eps);
            v = v * (g ? g[i] : 1.0) + (bt ? bt[i] : 0.0);
            v = v * (1.0 + (sc ? sc[b * ldm + i] : 0.0)) + (sh ? sh[b * ldm + i] : 0.0);
            want[r * d + i] = v;
        }
    }
}

static void run_layer_norm(int64_t rows, int64_t d, int64_t ld, bool affine, bool modulate,
                           int64_t rps, bool in_place, float offset)
{
    struct bs_err err = {0};
    float *x = alloc_rand(rows * ld), *y = alloc_rand(rows * ld);
    for (int64_t i = 0; i < rows * ld; i++)
        x[i] = x[i] * 2.0f + offset;
    float *g = alloc_rand(d), *bt = alloc_rand(d);
    int64_t samples = (rows + rps - 1) / rps;
    float *mod = alloc_rand(samples * 2 * d); /* [B, 2d]: scale then shift, column views */
    double *want = alloc_d(rows * d);
    layer_norm_ref(want, x, ld, rows, d, 1e-5f, affine ? g : NULL, affine ? bt : NULL,
                   modulate ? mod : NULL, modulate ? mod + d : NULL, 2 * d, rps);
    struct bs_tensor tx = mat(x, rows, d, ld), ty = in_place ? tx : mat(y, rows, d, ld);
    struct bs_tensor tg = vec(g, d), tb = vec(bt, d);
    struct bs_tensor tm = mat(mod, samples, 2 * d, 2 * d);
    struct bs_tensor tsc = bs_tensor_view_cols(&tm, 0, d), tsh = bs_tensor_view_cols(&tm, d, d);
    struct bs_norm_params p = {
        .eps = 1e-5f,
        .gamma = affine ? &tg : NULL,
        .beta = affine ? &tb : NULL,
        .scale = modulate ? &tsc : NULL,
        .shift = modulate ? &tsh : NULL,
        .rows_per_sample = rps,
    };
    call_ok(be.iface->layer_norm(be.ctx, &ty, &tx, &p, &err), &err);
    expect_close("layer_norm", ty.data, ld, want, rows, d, 1e-5);
    free(x), free(y), free(g), free(bt), free(mod), free(want);
}

static void test_layer_norm(void **state)
{
    run_layer_norm(37, 320, 320, false, false, 1, false, 0.0f);
    run_layer_norm(20, 77, 80, true, false, 1, false, 0.0f);      /* strided rows */
    run_layer_norm(30, 64, 64, true, true, 10, false, 0.0f);      /* modulation, 3 samples */
    run_layer_norm(30, 64, 70, false, true, 30, true, 0.0f);      /* one sample, in place */
    run_layer_norm(8, 1152, 1152, true, false, 1, false, 100.0f); /* large mean */
    run_layer_norm(4096, 96, 96, true, true, 1024, false, 0.5f);  /* parallel rows */
    run_layer_norm(3, 1, 1, false, false, 1, false, 0.0f);        /* d = 1: all zeros */
}

/* ---- group norm -------------------------------------------------------- */

static void run_group_norm(int64_t bsz, int64_t ch, int64_t s, int groups, bool affine,
                           bool modulate, float offset)
{
    struct bs_err err = {0};
    int64_t n = bsz * ch * s, cpg = ch / groups;
    float *x = alloc_rand(n), *y = alloc_rand(n), *g = alloc_rand(ch), *bt = alloc_rand(ch);
    for (int64_t i = 0; i < n; i++)
        x[i] = x[i] * 3.0f + offset;
    float *mod = alloc_rand(bsz * 2 * ch);
    double *want = alloc_d(n);
    for (int64_t b = 0; b < bsz; b++)
        for (int gi = 0; gi < groups; gi++) {
            const float *xg = x + (b * ch + gi * cpg) * s;
            double mean = 0, var = 0;
            for (int64_t i = 0; i < cpg * s; i++)
                mean += xg[i];
            mean /= (double)(cpg * s);
            for (int64_t i = 0; i < cpg * s; i++)
                var += (xg[i] - mean) * (xg[i] - mean);
            var /= (double)(cpg * s);
            for (int64_t c = gi * cpg; c < (gi + 1) * cpg; c++)
                for (int64_t i = 0; i < s; i++) {
                    int64_t at = (b * ch + c) * s + i;
                    double v = (x[at] - mean) / sqrt(var + 1e-6);
                    if (affine)
                        v = v * g[c] + bt[c];
                    if (modulate)
                        v = v * (1.0 + mod[b * 2 * ch + c]) + mod[b * 2 * ch + ch + c];
                    want[at] = v;
                }
        }
    int64_t ne[3] = {bsz, ch, s};
    struct bs_tensor tx = bs_tensor_make(BS_TYPE_F32, 3, ne, x);
    struct bs_tensor ty = bs_tensor_make(BS_TYPE_F32, 3, ne, y);
    struct bs_tensor tg = vec(g, ch), tb = vec(bt, ch), tm = mat(mod, bsz, 2 * ch, 2 * ch);
    struct bs_tensor tsc = bs_tensor_view_cols(&tm, 0, ch), tsh = bs_tensor_view_cols(&tm, ch, ch);
    struct bs_norm_params p = {
        .eps = 1e-6f,
        .gamma = affine ? &tg : NULL,
        .beta = affine ? &tb : NULL,
        .scale = modulate ? &tsc : NULL,
        .shift = modulate ? &tsh : NULL,
        .groups = groups,
    };
    call_ok(be.iface->group_norm(be.ctx, &ty, &tx, &p, &err), &err);
    expect_close("group_norm", y, n, want, 1, n, 1e-5);
    p.groups = 5; /* does not divide the channels */
    assert_int_equal(be.iface->group_norm(be.ctx, &ty, &tx, &p, &err), BS_EINVAL);
    free(x), free(y), free(g), free(bt), free(mod), free(want);
}

static void test_group_norm(void **state)
{
    run_group_norm(2, 32, 25, 8, true, false, 0.0f);    /* AttentionBlock-like */
    run_group_norm(2, 16, 1, 4, false, true, 0.0f);     /* S = 1, modulation (AdaGroupNorm) */
    run_group_norm(2, 16, 15, 4, false, true, 0.0f);    /* S > 1, modulation */
    run_group_norm(1, 64, 4096, 32, true, true, 50.0f); /* big groups, large mean, parallel */
}

/* ---- vmath ------------------------------------------------------------ */

static double act_ref(enum bs_act a, double x)
{
    switch (a) {
    case BS_ACT_NONE:
        return x;
    case BS_ACT_GELU:
        return 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
    case BS_ACT_GELU_TANH:
        return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    case BS_ACT_QUICK_GELU:
        return x / (1.0 + exp(-1.702 * x));
    case BS_ACT_SILU:
        return x / (1.0 + exp(-x));
    case BS_ACT_MISH:
        return x * tanh(log1p(exp(x)));
    default:
        return NAN;
    }
}

static float act_f(enum bs_act a, float x)
{
    switch (a) {
    case BS_ACT_GELU:
        return bs_geluf(x);
    case BS_ACT_GELU_TANH:
        return bs_gelu_tanhf(x);
    case BS_ACT_QUICK_GELU:
        return bs_quick_geluf(x);
    case BS_ACT_SILU:
        return bs_siluf(x);
    case BS_ACT_MISH:
        return bs_mishf(x);
    default:
        return x;
    }
}

static void test_vmath(void **state)
{
    double e_exp = 0, e_erf = 0, e_tanh = 0, e_sig = 0, e_act[BS_ACT_COUNT] = {0};
    for (double xd = -87.0; xd < 88.72; xd += 1.7e-4) {
        float x = (float)xd;
        double want = exp((double)x);
        e_exp = fmax(e_exp, fabs(bs_expf(x) - want) / want);
    }
    for (double xd = -30.0; xd < 30.0; xd += 3.1e-4) {
        float x = (float)xd;
        e_erf = fmax(e_erf, fabs(bs_erff(x) - erf(x)));
        e_tanh = fmax(e_tanh, fabs(bs_tanhf(x) - tanh(x)));
        e_sig = fmax(e_sig, fabs(bs_sigmoidf(x) - 1.0 / (1.0 + exp(-(double)x))));
        for (int a = 1; a < BS_ACT_COUNT; a++)
            e_act[a] = fmax(e_act[a], fabs(act_f((enum bs_act)a, x) - act_ref((enum bs_act)a, x)) /
                                          fmax(1.0, fabs(x)));
    }
    if (!(e_exp < 2e-7) || !(e_erf < 1.5e-7) || !(e_tanh < 2e-7) || !(e_sig < 2e-7))
        fail_msg("exp %.3g erf %.3g tanh %.3g sigmoid %.3g", e_exp, e_erf, e_tanh, e_sig);
    for (int a = 1; a < BS_ACT_COUNT; a++)
        if (!(e_act[a] < 3e-7))
            fail_msg("activation %d: scaled error %.3g", a, e_act[a]);
    assert_true(bs_expf(-87.5f) == 0.0f && bs_expf(-INFINITY) == 0.0f);
    assert_true(isinf(bs_expf(88.8f)) && isinf(bs_expf(INFINITY)) && isnan(bs_expf(NAN)));
    assert_true(bs_expf(0.0f) == 1.0f);
    assert_true(bs_erff(0.0f) == 0.0f && bs_erff(10.0f) == 1.0f && bs_erff(-10.0f) == -1.0f);
}

/* ---- activations and glu ----------------------------------------------- */

static const char *act_names[BS_ACT_COUNT] = {"none",       "gelu", "gelu_tanh",
                                              "quick_gelu", "silu", "mish"};

/* Every activation over [-20, 20] in steps of 0.01 plus huge values, as one
 * strided [rows, 100] tensor, out of place and in place. */
static void test_activations(void **state)
{
    struct bs_err err = {0};
    static const float extremes[] = {-3.4e38f, -1e30f,  -1e4f,  -200.0f, -100.0f, -88.0f,
                                     -50.0f,   -1e-30f, -0.0f,  0.0f,    1e-30f,  50.0f,
                                     88.0f,    100.0f,  200.0f, 1e4f,    1e30f,   3.4e38f};
    int64_t n_lin = 4001, n = n_lin + (int64_t)(sizeof(extremes) / sizeof(extremes[0]));
    int64_t cols = 100, rows = (n + cols - 1) / cols, ld = 103;
    float *x = calloc((size_t)(rows * ld), sizeof(float)), *y = calloc((size_t)(rows * ld), 4);
    float *xd = calloc((size_t)(rows * cols), sizeof(float));
    double *want = alloc_d(rows * cols);
    for (int64_t i = 0; i < rows * cols; i++) {
        float v = i < n_lin ? (float)(-20.0 + 0.01 * (double)i)
                  : i < n   ? extremes[i - n_lin]
                            : 0.5f;
        x[(i / cols) * ld + i % cols] = v;
        xd[i] = v;
    }
    for (int a = 0; a < BS_ACT_COUNT; a++) {
        for (int64_t i = 0; i < rows * cols; i++)
            want[i] = act_ref((enum bs_act)a, xd[i]);
        for (int in_place = 0; in_place < 2; in_place++) {
            float *xx = x;
            if (in_place) {
                xx = malloc((size_t)(rows * ld) * sizeof(float));
                memcpy(xx, x, (size_t)(rows * ld) * sizeof(float));
            }
            struct bs_tensor tx = mat(xx, rows, cols, ld);
            struct bs_tensor ty = in_place ? tx : mat(y, rows, cols, ld);
            call_ok(be.iface->act(be.ctx, &ty, &tx, (enum bs_act)a, &err), &err);
            const float *got = ty.data;
            for (int64_t r = 0; r < rows; r++)
                for (int64_t c = 0; c < cols; c++)
                    if (!isfinite(got[r * ld + c]))
                        fail_msg("%s(%g) = %g", act_names[a], (double)xd[r * cols + c],
                                 (double)got[r * ld + c]);
            double e = max_err(got, ld, want, rows, cols, xd);
            if (!(e <= 1e-5))
                fail_msg("%s: scaled error %.3g", act_names[a], e);
            if (in_place)
                free(xx);
        }
    }
    assert_int_equal(
        be.iface->act(be.ctx, &(struct bs_tensor){0}, &(struct bs_tensor){0}, BS_ACT_COUNT, &err),
        BS_EINVAL);
    free(x), free(y), free(xd), free(want);
}

/* A large contiguous tensor (the flattened, parallel path, with a remainder). */
static void test_act_large(void **state)
{
    struct bs_err err = {0};
    int64_t rows = 300, cols = 257, n = rows * cols;
    float *x = alloc_rand(n), *y = alloc_rand(n);
    for (int64_t i = 0; i < n; i++)
        x[i] *= 8.0f;
    double *want = alloc_d(n);
    for (int64_t i = 0; i < n; i++)
        want[i] = act_ref(BS_ACT_SILU, x[i]);
    struct bs_tensor tx = mat(x, rows, cols, cols), ty = mat(y, rows, cols, cols);
    call_ok(be.iface->act(be.ctx, &ty, &tx, BS_ACT_SILU, &err), &err);
    expect_close("silu large", y, cols, want, rows, cols, 1e-5);
    free(x), free(y), free(want);
}

static void run_glu(int64_t m, int64_t n, int64_t ldy, enum bs_act a)
{
    struct bs_err err = {0};
    float *x = alloc_rand(m * 2 * n), *y = alloc_rand(m * ldy);
    for (int64_t i = 0; i < m * 2 * n; i++)
        x[i] *= 6.0f;
    double *want = alloc_d(m * n);
    float *scale_by = malloc((size_t)(m * n) * sizeof(float));
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = 0; i < n; i++) {
            float h = x[r * 2 * n + i], g = x[r * 2 * n + n + i];
            want[r * n + i] = h * act_ref(a, g);
            scale_by[r * n + i] = h * g;
        }
    struct bs_tensor tx = mat(x, m, 2 * n, 2 * n), ty = mat(y, m, n, ldy);
    call_ok(be.iface->glu(be.ctx, &ty, &tx, a, &err), &err);
    double e = max_err(y, ldy, want, m, n, scale_by);
    if (!(e <= 1e-5))
        fail_msg("glu %s m %lld n %lld: scaled error %.3g", act_names[a], (long long)m,
                 (long long)n, e);
    free(x), free(y), free(want), free(scale_by);
}

static void test_glu(void **state)
{
    struct bs_err err = {0};
    run_glu(50, 77, 80, BS_ACT_GELU);
    run_glu(600, 300, 300, BS_ACT_GELU); /* parallel, rows longer than the 256 buffer */
    run_glu(7, 33, 33, BS_ACT_GELU_TANH);
    float x[12], y[6];
    struct bs_tensor tx = mat(x, 2, 6, 6), ty = mat(y, 2, 2, 3);
    assert_int_equal(be.iface->glu(be.ctx, &ty, &tx, BS_ACT_GELU, &err), BS_EINVAL);
}

/* ---- add --------------------------------------------------------------- */

static void run_add(int64_t rows, int64_t d, int64_t ldx, int64_t ldy, bool gate, int64_t rps,
                    float alpha)
{
    struct bs_err err = {0};
    float *x = alloc_rand(rows * ldx), *y = alloc_rand(rows * ldy);
    int64_t samples = (rows + rps - 1) / rps;
    float *g = alloc_rand(samples * 3 * d); /* gate as a column view of [B, 3d] */
    double *want = alloc_d(rows * d);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < d; i++) {
            double gv = gate ? g[(r / rps) * 3 * d + 2 * d + i] : 1.0;
            want[r * d + i] = alpha * ((double)y[r * ldy + i] + gv * x[r * ldx + i]);
        }
    struct bs_tensor tx = mat(x, rows, d, ldx), ty = mat(y, rows, d, ldy);
    struct bs_tensor tg3 = mat(g, samples, 3 * d, 3 * d), tg = bs_tensor_view_cols(&tg3, 2 * d, d);
    call_ok(be.iface->add(be.ctx, &ty, &tx, gate ? &tg : NULL, rps, alpha, &err), &err);
    expect_close("add", y, ldy, want, rows, d, 1e-6);
    free(x), free(y), free(g), free(want);
}

static void test_add(void **state)
{
    run_add(20, 32, 32, 32, false, 1, 1.0f);
    run_add(20, 32, 40, 35, true, 5, 1.0f);      /* gate per sample of 5 rows, strided */
    run_add(60, 45, 45, 45, true, 60, 0.5f);     /* alpha (rescale_output_factor) */
    run_add(4096, 64, 64, 64, true, 1024, 1.0f); /* parallel */
    run_add(7, 9, 9, 9, false, 1, 0.25f);
}

/* ---- transpose and get_rows -------------------------------------------- */

static void run_transpose(int64_t bsz, int64_t r, int64_t c, int nd)
{
    struct bs_err err = {0};
    float *x = alloc_rand(bsz * r * c), *y = alloc_rand(bsz * r * c);
    int64_t nex[3] = {bsz, r, c}, ney[3] = {bsz, c, r};
    struct bs_tensor tx = bs_tensor_make(BS_TYPE_F32, nd, nd == 3 ? nex : nex + 1, x);
    struct bs_tensor ty = bs_tensor_make(BS_TYPE_F32, nd, nd == 3 ? ney : ney + 1, y);
    call_ok(be.iface->transpose(be.ctx, &ty, &tx, &err), &err);
    for (int64_t b = 0; b < bsz; b++)
        for (int64_t i = 0; i < r; i++)
            for (int64_t j = 0; j < c; j++)
                if (y[(b * c + j) * r + i] != x[(b * r + i) * c + j])
                    fail_msg("transpose %lldx%lldx%lld: wrong at %lld,%lld,%lld", (long long)bsz,
                             (long long)r, (long long)c, (long long)b, (long long)i, (long long)j);
    free(x), free(y);
}

static void test_transpose(void **state)
{
    struct bs_err err = {0};
    run_transpose(3, 37, 45, 3);
    run_transpose(1, 1, 70, 3);
    run_transpose(2, 300, 257, 3); /* parallel */
    run_transpose(1, 33, 31, 2);
    float x[6], y[6];
    int64_t ne[3] = {1, 2, 3};
    struct bs_tensor tx = bs_tensor_make(BS_TYPE_F32, 3, ne, x), ty = tx;
    ty.data = y;
    assert_int_equal(be.iface->transpose(be.ctx, &ty, &tx, &err), BS_EINVAL);
}

static void test_get_rows(void **state)
{
    struct bs_err err = {0};
    float *table = alloc_rand(10 * 40), *y = alloc_rand(4 * 36);
    struct bs_tensor tt = mat(table, 10, 33, 40), ty = mat(y, 4, 33, 36);
    int64_t idx[4] = {3, 0, 9, 3};
    call_ok(be.iface->get_rows(be.ctx, &ty, &tt, idx, 4, &err), &err);
    for (int i = 0; i < 4; i++)
        assert_memory_equal(y + i * 36, table + idx[i] * 40, 33 * sizeof(float));
    int64_t bad[4] = {3, 10, 0, 0};
    assert_int_equal(be.iface->get_rows(be.ctx, &ty, &tt, bad, 4, &err), BS_EINVAL);
    free(table), free(y);
}

/* ---- attention --------------------------------------------------------- */

enum mask_kind { MASK_NONE, MASK_PER_SAMPLE, MASK_PER_QUERY };
enum mask_fill {
    FILL_RANDOM,       /* noise, about 30% -10000 */
    FILL_FULLY_MASKED, /* some rows -10000 everywhere */
    FILL_NEG_INF,      /* about 30% -inf, one row -inf everywhere */
    FILL_RULE,         /* rows of every kind the mask rule names (make_mask) */
};

struct attn_io {
    int64_t batch, lq, lk;
    int heads, hd;
    float scale;
    const float *q, *k, *v, *mask;
    int64_t ldq, ldk, ldv, mq;
};

/* Reference output row (head_dim values) of query i, head h, sample b, by
 * the mask rule (kernels/cpu/attn_cpu.c, top): a mask value <= -FLT_MAX masks
 * its key; a row whose keys are all masked, some at -FLT_MAX, averages V over
 * those; all at -inf (or Lk = 0) gives 0. The row's maximum M is subtracted
 * from the mask, which in double changes nothing but the name. */
static void attn_ref_row(double *out, const struct attn_io *a, int64_t b, int h, int64_t i,
                         double *s)
{
    const float *q = a->q + (b * a->lq + i) * a->ldq + h * a->hd;
    const float *mr = a->mask ? a->mask + (b * a->mq + (a->mq == 1 ? 0 : i)) * a->lk : NULL;
    double mx = -INFINITY, mm = -INFINITY;
    for (int64_t j = 0; mr && j < a->lk; j++)
        mm = fmax(mm, mr[j]);
    for (int64_t j = 0; j < a->lk; j++) {
        const float *k = a->k + (b * a->lk + j) * a->ldk + h * a->hd;
        double d = 0;
        for (int c = 0; c < a->hd; c++)
            d += (double)q[c] * k[c];
        s[j] = a->scale * d;
        if (mr && mm == -FLT_MAX) /* all masked, some at -FLT_MAX: uniform over those */
            s[j] = mr[j] == -FLT_MAX ? 0.0 : -INFINITY;
        else if (mr)
            s[j] = mr[j] <= -FLT_MAX ? -INFINITY : s[j] + ((double)mr[j] - mm);
        mx = fmax(mx, s[j]);
    }
    for (int c = 0; c < a->hd; c++)
        out[c] = 0.0;
    if (mx == -INFINITY) /* nothing to attend to: 0 by the backend's contract */
        return;
    double sum = 0;
    for (int64_t j = 0; j < a->lk; j++) {
        s[j] = exp(s[j] - mx);
        sum += s[j];
    }
    for (int64_t j = 0; j < a->lk; j++) {
        const float *v = a->v + (b * a->lk + j) * a->ldv + h * a->hd;
        for (int c = 0; c < a->hd; c++)
            out[c] += s[j] / sum * v[c];
    }
}

static float *make_mask(int64_t batch, int64_t mq, int64_t lk, enum mask_fill fill)
{
    float *m = malloc((size_t)(batch * mq * lk) * sizeof(float));
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
                *e = rule_value(r, j, lk, u);
                break;
            }
        }
    return m;
}

struct attn_case {
    int64_t batch, lq, lk;
    int heads, hd;
    enum mask_kind mask;
    enum mask_fill fill;
    bool fused; /* q, k, v column views of one [B*L, 3*inner] buffer */
};

static void run_attention(const struct attn_case *c)
{
    struct bs_err err = {0};
    int64_t inner = (int64_t)c->heads * c->hd, mq = c->mask == MASK_PER_QUERY ? c->lq : 1;
    float *qkv = NULL, *qb = NULL, *kb = NULL, *vb = NULL, *mask = NULL;
    struct attn_io a = {
        .batch = c->batch,
        .lq = c->lq,
        .lk = c->lk,
        .heads = c->heads,
        .hd = c->hd,
        .scale = 1.0f / sqrtf((float)c->hd),
        .mq = mq,
    };
    if (c->fused) {
        qkv = alloc_rand(c->batch * c->lq * 3 * inner);
        a.q = qkv, a.k = qkv + inner, a.v = qkv + 2 * inner;
        a.ldq = a.ldk = a.ldv = 3 * inner;
    } else { /* separate buffers with padded rows */
        a.ldq = inner + 3, a.ldk = inner + 5, a.ldv = inner;
        a.q = qb = alloc_rand(c->batch * c->lq * a.ldq);
        a.k = kb = alloc_rand(c->batch * c->lk * a.ldk);
        a.v = vb = alloc_rand(c->batch * c->lk * a.ldv);
    }
    for (int64_t i = 0; !c->fused && i < c->batch * c->lq * a.ldq; i++)
        qb[i] *= 3.0f; /* sharper softmax */
    if (c->mask != MASK_NONE)
        a.mask = mask = make_mask(c->batch, mq, c->lk, c->fill);
    int64_t ldo = inner + 7;
    float *o = alloc_rand(c->batch * c->lq * ldo);
    double *want = alloc_d(c->batch * c->lq * inner), *s = alloc_d(c->lk);
    for (int64_t b = 0; b < c->batch; b++)
        for (int h = 0; h < c->heads; h++)
            for (int64_t i = 0; i < c->lq; i++)
                attn_ref_row(want + (b * c->lq + i) * inner + h * c->hd, &a, b, h, i, s);

    struct bs_tensor tq = mat((float *)a.q, c->batch * c->lq, inner, a.ldq);
    struct bs_tensor tk = mat((float *)a.k, c->batch * c->lk, inner, a.ldk);
    struct bs_tensor tv = mat((float *)a.v, c->batch * c->lk, inner, a.ldv);
    struct bs_tensor to = mat(o, c->batch * c->lq, inner, ldo);
    int64_t ne[3] = {c->batch, mq, c->lk};
    struct bs_tensor tm = bs_tensor_make(BS_TYPE_F32, 3, ne, mask);
    struct bs_attn_params p = {
        .batch = c->batch,
        .lq = c->lq,
        .lk = c->lk,
        .heads = c->heads,
        .head_dim = c->hd,
        .scale = a.scale,
        .mask = mask ? &tm : NULL,
    };
    call_ok(be.iface->attention(be.ctx, &to, &tq, &tk, &tv, &p, &err), &err);
    char what[160];
    snprintf(what, sizeof(what),
             "attention B %lld Lq %lld Lk %lld heads %d x %d mask %d fill %d "
             "fused %d",
             (long long)c->batch, (long long)c->lq, (long long)c->lk, c->heads, c->hd, c->mask,
             c->fill, c->fused);
    double tol = c->fill == FILL_RULE ? 1e-5 : 1e-4;
    double e = max_err(o, ldo, want, c->batch * c->lq, inner, NULL);
    if (c->fill == FILL_RULE)
        printf("%s: max abs error %.3g (%.2f of %.0e)\n", what, e, e / tol, tol);
    expect_close(what, o, ldo, want, c->batch * c->lq, inner, tol);
    free(qkv), free(qb), free(kb), free(vb), free(mask), free(o), free(want), free(s);
}

static void test_attention(void **state)
{
    static const struct attn_case cases[] = {
        {2, 150, 150, 2, 40, MASK_NONE, FILL_RANDOM, false},      /* self */
        {2, 150, 77, 8, 8, MASK_PER_SAMPLE, FILL_RANDOM, false},  /* cross, [B,1,Lk] */
        {2, 150, 77, 1, 72, MASK_PER_QUERY, FILL_RANDOM, false},  /* cross, [B,Lq,Lk] */
        {1, 70, 300, 2, 160, MASK_PER_QUERY, FILL_RANDOM, false}, /* 2 key tiles, partial */
        {2, 20, 20, 8, 40, MASK_PER_SAMPLE, FILL_RANDOM, true},   /* fused QKV */
        {2, 130, 130, 3, 24, MASK_PER_QUERY, FILL_RANDOM, true},  /* fused, odd head dim */
        {2, 65, 1, 2, 40, MASK_PER_SAMPLE, FILL_RANDOM, false},   /* Lk = 1 */
        {3, 1, 20, 2, 64, MASK_NONE, FILL_RANDOM, false},         /* Lq = 1 */
        {2, 40, 77, 2, 80, MASK_PER_QUERY, FILL_FULLY_MASKED, false},
        {2, 40, 600, 1, 40, MASK_PER_SAMPLE, FILL_FULLY_MASKED, false}, /* sample 1 all masked */
        {2, 40, 300, 2, 40, MASK_PER_QUERY, FILL_NEG_INF, false},       /* row 1 -inf: output 0 */
        {2, 40, 30, 2, 40, MASK_PER_SAMPLE, FILL_NEG_INF, false}, /* sample 1 -inf: output 0 */
        /* Edges of the register blocks (6 keys or head-dim rows x 16 queries) */
        {1, 50, 50, 3, 13, MASK_PER_SAMPLE, FILL_RANDOM, true},  /* head dim 6k + 1 */
        {2, 33, 7, 2, 5, MASK_PER_QUERY, FILL_RANDOM, false},    /* head dim 5, Lk 7 */
        {1, 16, 65, 4, 1, MASK_NONE, FILL_RANDOM, false},        /* head dim 1 */
        {1, 263, 263, 2, 15, MASK_NONE, FILL_RANDOM, true},      /* 5 query tiles, Lk 256 + 7 */
        {1, 17, 50, 3, 13, MASK_PER_QUERY, FILL_RANDOM, false},  /* Lq 16 + 1 */
        /* The mask rule: every kind of row, both mask forms, 2 key tiles */
        {2, 40, 300, 2, 40, MASK_PER_QUERY, FILL_RULE, false},
        {8, 20, 77, 2, 24, MASK_PER_SAMPLE, FILL_RULE, false},
        {8, 65, 65, 2, 16, MASK_PER_SAMPLE, FILL_RULE, true},
        {16, 3, 300, 1, 8, MASK_PER_SAMPLE, FILL_RULE, false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_attention(&cases[i]);
}

/* A mask whose rows are each one constant (-10000, 30000, 0, -1e30, 5) adds
 * nothing: the output equals the unmasked one within 1e-5 of max |o| (the
 * shift makes it exact), in both mask forms. Without the shift, s + (-10000)
 * in FP32 loses the scores' low bits (spacing 1e-3 there). */
static void test_attention_mask_constant_rows(void **state)
{
    static const float consts[] = {-10000.0f, 30000.0f, 0.0f, -1e30f, 5.0f};
    const int64_t batch = 3, lq = 70, lk = 300, heads = 2, hd = 40, inner = heads * hd;
    struct bs_err err = {0};
    float *q = alloc_rand(batch * lq * inner), *kv = alloc_rand(batch * lk * inner);
    float *o0 = alloc_rand(batch * lq * inner), *o1 = alloc_rand(batch * lq * inner);
    float *mask = malloc((size_t)(batch * lq * lk) * sizeof(float));
    assert_non_null(mask);
    for (int64_t i = 0; i < batch * lq * inner; i++)
        q[i] *= 3.0f;
    struct bs_tensor tq = mat(q, batch * lq, inner, inner), tk = mat(kv, batch * lk, inner, inner);
    struct bs_tensor t0 = mat(o0, batch * lq, inner, inner), t1 = mat(o1, batch * lq, inner, inner);
    struct bs_attn_params p = {.batch = batch,
                               .lq = lq,
                               .lk = lk,
                               .heads = heads,
                               .head_dim = hd,
                               .scale = 1.0f / sqrtf((float)hd)};
    call_ok(be.iface->attention(be.ctx, &t0, &tq, &tk, &tk, &p, &err), &err);
    for (int mq = 1; mq <= lq; mq += lq - 1) {
        for (int64_t r = 0; r < batch * mq; r++)
            for (int64_t j = 0; j < lk; j++)
                mask[r * lk + j] = consts[r % 5];
        int64_t ne[3] = {batch, mq, lk};
        struct bs_tensor tm = bs_tensor_make(BS_TYPE_F32, 3, ne, mask);
        p.mask = &tm;
        call_ok(be.iface->attention(be.ctx, &t1, &tq, &tk, &tk, &p, &err), &err);
        double e = 0, big = 0;
        for (int64_t i = 0; i < batch * lq * inner; i++) {
            e = fmax(e, fabs((double)o1[i] - o0[i]));
            big = fmax(big, fabs((double)o0[i]));
        }
        printf(
            "constant mask rows (Mq %d): max |masked - unmasked| %.3g (%.2f of 1e-5 x max |o|)\n",
            mq, e, e / (1e-5 * big));
        if (!(e <= 1e-5 * big))
            fail_msg("constant mask rows (Mq %d) change the output by %.3g", mq, e);
    }
    free(q), free(kv), free(o0), free(o1), free(mask);
}

/* Self-attention over 2 x 2048 tokens, 8 heads x 40, fused QKV: the scratch
 * stays far below the 256 MB a full score matrix would take; spot-check rows
 * against the reference. */
static void test_attention_memory(void **state)
{
    struct bs_err err = {0};
    int64_t batch = 2, l = 2048, inner = 320;
    float *qkv = alloc_rand(batch * l * 3 * inner), *o = alloc_rand(batch * l * inner);
    struct bs_tensor buf = mat(qkv, batch * l, 3 * inner, 3 * inner);
    struct bs_tensor tq = bs_tensor_view_cols(&buf, 0, inner);
    struct bs_tensor tk = bs_tensor_view_cols(&buf, inner, inner);
    struct bs_tensor tv = bs_tensor_view_cols(&buf, 2 * inner, inner);
    struct bs_tensor to = mat(o, batch * l, inner, inner);
    struct bs_attn_params p = {
        .batch = batch,
        .lq = l,
        .lk = l,
        .heads = 8,
        .head_dim = 40,
        .scale = 1.0f / sqrtf(40.0f),
    };
    call_ok(be.iface->attention(be.ctx, &to, &tq, &tk, &tv, &p, &err), &err);
    size_t scratch = bs__cpu_scratch_bytes(be.ctx);
    assert_true(scratch > 0);
    if (scratch >= 16u << 20)
        fail_msg("attention scratch %zu bytes >= 16 MB", scratch);

    struct attn_io a = {
        .batch = batch,
        .lq = l,
        .lk = l,
        .heads = 8,
        .hd = 40,
        .scale = p.scale,
        .q = qkv,
        .k = qkv + inner,
        .v = qkv + 2 * inner,
        .ldq = 3 * inner,
        .ldk = 3 * inner,
        .ldv = 3 * inner,
        .mq = 1,
    };
    double *s = alloc_d(l), want[40];
    const int64_t rows[] = {0, 63, 64, 1000, 2047};
    for (int64_t b = 0; b < batch; b++)
        for (int h = 0; h < 8; h += 3)
            for (size_t r = 0; r < sizeof(rows) / sizeof(rows[0]); r++) {
                attn_ref_row(want, &a, b, h, rows[r], s);
                expect_close("attention 2x2048", o + (b * l + rows[r]) * inner + h * 40, 40, want,
                             1, 40, 1e-4);
            }
    free(qkv), free(o), free(s);
}

struct attn_thread_arg {
    int hd;
    int fails;
};

/* Attention from several threads at once, with head dims that make the
 * scratch grow under the others' feet unless the lock works. */
static void *attn_thread(void *arg)
{
    struct attn_thread_arg *t = arg;
    struct bs_err err = {0};
    int64_t lq = 100, lk = 90, inner = 2 * (int64_t)t->hd;
    uint64_t seed = 12345u + (uint64_t)t->hd;
    float *q = malloc((size_t)(lq * inner) * 4), *k = malloc((size_t)(lk * inner) * 4);
    float *v = malloc((size_t)(lk * inner) * 4), *o = malloc((size_t)(lq * inner) * 4);
    for (int64_t i = 0; i < lq * inner; i++) { /* a local generator: frand is not thread safe */
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        q[i] = (float)((int64_t)(seed >> 30) % 1000) / 1000.0f;
        if (i < lk * inner) {
            k[i] = (float)((int64_t)(seed >> 40) % 1000) / 1000.0f;
            v[i] = (float)((int64_t)(seed >> 20) % 1000) / 1000.0f;
        }
    }
    struct attn_io a = {.batch = 1,
                        .lq = lq,
                        .lk = lk,
                        .heads = 2,
                        .hd = t->hd,
                        .scale = 0.3f,
                        .q = q,
                        .k = k,
                        .v = v,
                        .ldq = inner,
                        .ldk = inner,
                        .ldv = inner,
                        .mq = 1};
    double *want = alloc_d(lq * inner), s[90];
    for (int h = 0; h < 2; h++)
        for (int64_t i = 0; i < lq; i++)
            attn_ref_row(want + i * inner + h * t->hd, &a, 0, h, i, s);
    struct bs_tensor tq = mat(q, lq, inner, inner), tk = mat(k, lk, inner, inner);
    struct bs_tensor tv = mat(v, lk, inner, inner), to = mat(o, lq, inner, inner);
    struct bs_attn_params p = {
        .batch = 1, .lq = lq, .lk = lk, .heads = 2, .head_dim = t->hd, .scale = 0.3f};
    for (int r = 0; r < 20; r++) {
        memset(o, 0, (size_t)(lq * inner) * 4);
        if (be.iface->attention(be.ctx, &to, &tq, &tk, &tv, &p, &err) != 0 ||
            !(max_err(o, inner, want, lq, inner, NULL) <= 1e-4))
            t->fails++;
    }
    free(q), free(k), free(v), free(o), free(want);
    return NULL;
}

static void test_attention_concurrent(void **state)
{
    struct attn_thread_arg args[3] = {{.hd = 8}, {.hd = 200}, {.hd = 40}};
    pthread_t tid[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(pthread_create(&tid[i], NULL, attn_thread, &args[i]), 0);
    for (int i = 0; i < 3; i++)
        pthread_join(tid[i], NULL);
    for (int i = 0; i < 3; i++)
        assert_int_equal(args[i].fails, 0);
}

static void test_attention_errors(void **state)
{
    struct bs_err err = {0};
    float *d = alloc_rand(64 * 64), *out = alloc_rand(16 * 16);
    struct bs_tensor t = mat(d, 16, 16, 16), o = mat(out, 16, 16, 16);
    struct bs_attn_params p = {.batch = 2, .lq = 8, .lk = 8, .heads = 2, .head_dim = 8};
    call_ok(be.iface->attention(be.ctx, &o, &t, &t, &t, &p, &err), &err);
    p.head_dim = 4; /* 2 x 4 != 16 columns */
    assert_int_equal(be.iface->attention(be.ctx, &o, &t, &t, &t, &p, &err), BS_EINVAL);
    p.head_dim = 8;
    int64_t ne[3] = {2, 3, 8}; /* Mq neither 1 nor Lq */
    struct bs_tensor m = bs_tensor_make(BS_TYPE_F32, 3, ne, d);
    p.mask = &m;
    assert_int_equal(be.iface->attention(be.ctx, &o, &t, &t, &t, &p, &err), BS_EINVAL);
    free(d), free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_many_tasks),
        cmocka_unit_test(test_pool_concurrent_runs),
        cmocka_unit_test(test_backend_basics),
        cmocka_unit_test(test_linear),
        cmocka_unit_test(test_linear_errors),
        cmocka_unit_test(test_layer_norm),
        cmocka_unit_test(test_group_norm),
        cmocka_unit_test(test_vmath),
        cmocka_unit_test(test_activations),
        cmocka_unit_test(test_act_large),
        cmocka_unit_test(test_glu),
        cmocka_unit_test(test_add),
        cmocka_unit_test(test_transpose),
        cmocka_unit_test(test_get_rows),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_mask_constant_rows),
        cmocka_unit_test(test_attention_memory),
        cmocka_unit_test(test_attention_concurrent),
        cmocka_unit_test(test_attention_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
