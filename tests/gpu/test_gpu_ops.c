/* Every CUDA op against its CPU twin (STYLE rule 13): random inputs, the
 * same call on both backends, outputs compared element by element.
 *
 * usage: test_gpu_ops fp32|bf16|fp16 (the CUDA backend's compute dtype).
 * Exits 77 (CTest: skipped) when no usable GPU is there. test_gpu_ops
 * self-check runs the harness with the CPU backend on both sides (every
 * comparison must then be exact), so that it is tested on machines without
 * a GPU too, narrow (BF16, F16) activations included: the CPU takes them.
 *
 * Tolerances, per element: |gpu - cpu| <= atol + rtol |cpu|.
 * - Ops computed in FP32 in every dtype (norms, activations, gated units,
 *   adds, transpose, gathers): atol 1e-5, rtol 1e-5.
 * - GEMMs and attention in fp32 (TF32 off): atol 1e-4, rtol 1e-4.
 * - GEMMs and attention in bf16: atol 2e-2 x rms(cpu), rtol 2e-2; in fp16:
 *   atol 4e-3 x rms(cpu), rtol 4e-3 (operands rounded to 8 and 11 bits,
 *   FP32 accumulation).
 *
 * linear with x and y of every activation dtype pair (F32, BF16, F16), with
 * and without bias, beta 0 and 1, repeated (the plan cache), and shapes
 * cuBLASLt may decline (odd K, strided misaligned x, M = 1, K = 0);
 * linear_act with each act, gated or not: against the CPU's F32 op on the
 * same (widened) values, its result rounded to the output's dtype; a narrow
 * output may also be 1 ulp off (apt_expect).
 * Norms also in BF16 and F16 (x, y; every pair): against the CPU's F32 op
 * on the widened inputs, rounded; within the F32 tolerance plus 1 ulp of
 * the output's dtype.
 *
 * Also: attention with masks of every kind the mask rule names (rows of
 * -FLT_MAX, -inf, both, with finite values, -10000, 30000); ragged batches
 * (bs_attn_params.q_off) against the CPU twin run on each sample alone; in
 * fp16, an
 * operand beyond 65504 fails the copy that follows with "fp16 overflow"
 * (linear, attention), and the next copy succeeds; three threads running
 * linear and attention at once, each on its own stream, against the CPU.
 *
 * copy_in / copy_out round trips of sizes around the staging chunk
 * (BS_CUDA_XFER_CHUNK: 0, 1, chunk - 1, chunk, chunk + 1, 3 chunks + 13) at
 * odd host and device offsets, bytes past the end untouched; and the GPU
 * timer (BS_PROC_GPU_TIMER): it counts the copies between start and stop
 * with their bytes, a span within the total, and a GEMM's time; a second
 * stop fails. It prints the copies' bandwidth (256 MiB each way).
 *
 * Launch graphs (graph_*): linear + act + add + graph_rows captured once,
 * launched three times with other indices and new data in the same
 * buffers, bit for bit the same as the ops run eagerly; two launches then
 * graph_free at once (it waits for them); on a fresh thread, a capture
 * whose op would grow the scratch fails with BS_EUNSUPP, the stream works
 * afterwards and the eager growth moves graph_epoch. The self-check (no
 * graph ops on the CPU) runs the same comparisons with the ops in place
 * of the launches. */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "xfer.h"

#define EXIT_SKIP 77
#define MASK_DROP -10000.0f

struct env {
    struct bs_backend cpu, gpu;
    const char *dtype;
    double mm_tol;   /* GEMM / attention tolerance (see the header) */
    bool mm_rms;     /* atol scales with rms(cpu) */
    bool self_check; /* both sides are CPU backends */
    int checks, failures;
};

/* One tensor on both backends with the same shape and layout. */
struct pt {
    struct bs_tensor c, g;
    size_t bytes;
};

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static float frand(float lo, float hi)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return lo + (hi - lo) * (float)((double)(rng_state >> 40) / 16777216.0);
}

static void die(const char *what, const struct bs_err *err)
{
    fprintf(stderr, "FAIL %s: %s\n", what, err ? err->msg : "");
    exit(1);
}

static void pt_upload(struct env *e, struct pt *t)
{
    struct bs_err err = {0};
    if (e->gpu.iface->copy_in(e->gpu.ctx, t->g.data, t->c.data, t->bytes, &err) != 0)
        die("copy_in", &err);
}

static void pt_new(struct env *e, struct pt *t, int n_dims, const int64_t *ne, float lo, float hi)
{
    t->c = bs_tensor_make(BS_TYPE_F32, n_dims, ne, NULL);
    t->bytes = bs_tensor_nbytes(&t->c);
    t->g = t->c;
    t->c.data = e->cpu.iface->buf_alloc(e->cpu.ctx, t->bytes);
    t->g.data = e->gpu.iface->buf_alloc(e->gpu.ctx, t->bytes);
    if (t->c.data == NULL || t->g.data == NULL)
        die("buf_alloc", NULL);
    float *p = t->c.data;
    for (size_t i = 0; i < t->bytes / sizeof(float); i++)
        p[i] = frand(lo, hi);
    pt_upload(e, t);
}

static void pt_free(struct env *e, struct pt *t)
{
    e->cpu.iface->buf_free(e->cpu.ctx, t->c.data);
    e->gpu.iface->buf_free(e->gpu.ctx, t->g.data);
}

/* Column views [c0, c0 + n) on both sides. */
static struct pt pt_cols(const struct pt *t, int64_t c0, int64_t n)
{
    struct pt v = *t;
    v.c = bs_tensor_view_cols(&t->c, c0, n);
    v.g = bs_tensor_view_cols(&t->g, c0, n);
    return v;
}

/* Compare n values got with want: |got - want| <= atol + rtol |want| (atol
 * times rms(want) when rms_scaled). */
static void compare(struct env *e, const char *name, const float *got, const float *want, size_t n,
                    double atol, double rtol, bool rms_scaled)
{
    if (rms_scaled) {
        double ss = 0;
        for (size_t i = 0; i < n; i++)
            ss += (double)want[i] * want[i];
        atol *= n ? sqrt(ss / (double)n) : 1.0;
    }
    double worst = 0, max_abs = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        /* d == 0 passes even where the bound is 0 (an all-zero output with an
         * rms-scaled tolerance: 0/0 would count as a failure) */
        double r = d == 0 ? 0 : d / (atol + rtol * fabs((double)want[i]));
        if (!(r <= worst)) /* NaN too */
            worst = isnan(r) ? INFINITY : r;
        if (d > max_abs || isnan(d))
            max_abs = d;
    }
    e->checks++;
    bool ok = worst <= 1.0;
    if (!ok)
        e->failures++;
    printf("%s %-44s max abs err %.3g (%.2f of tolerance)\n", ok ? "ok  " : "FAIL", name, max_abs,
           worst);
}

/* Compare the whole buffer of t (views: the untouched columns must agree too). */
static void expect_close(struct env *e, const char *name, const struct pt *t, double atol,
                         double rtol, bool rms_scaled)
{
    struct bs_err err = {0};
    size_t n = t->bytes / sizeof(float);
    float *got = malloc(t->bytes ? t->bytes : 4);
    if (got == NULL)
        die("malloc", NULL);
    if (e->gpu.iface->copy_out(e->gpu.ctx, got, t->g.data, t->bytes, &err) != 0)
        die(name, &err);
    compare(e, name, got, t->c.data, n, atol, rtol, rms_scaled);
    free(got);
}

static void expect_ew(struct env *e, const char *name, const struct pt *t)
{
    expect_close(e, name, t, 1e-5, 1e-5, false);
}

static void expect_mm(struct env *e, const char *name, const struct pt *t)
{
    expect_close(e, name, t, e->mm_tol, e->mm_tol, e->mm_rms);
}

static void check_rc(const char *name, int rc_cpu, int rc_gpu, const struct bs_err *ec,
                     const struct bs_err *eg)
{
    if (rc_cpu != 0)
        die(name, ec);
    if (rc_gpu != 0)
        die(name, eg);
}

/* Run one op call on both backends: BOTH(name, op, args after ctx) with
 * tensor arguments written as X(t) (the CPU or GPU side of pt t). */
#define BOTH(name, call_cpu, call_gpu)                                                             \
    do {                                                                                           \
        struct bs_err ec_ = {0}, eg_ = {0};                                                        \
        int rc_cpu_ = (call_cpu), rc_gpu_ = (call_gpu);                                            \
        check_rc(name, rc_cpu_, rc_gpu_, &ec_, &eg_);                                              \
    } while (0)
#define CPU e->cpu.iface
#define GPU e->gpu.iface
#define CC  e->cpu.ctx
#define GC  e->gpu.ctx

/* ---- linear --------------------------------------------------------------- */

/* w [n, k] and b [n] inside one buffer, registered as model weights on the
 * GPU (the compute-dtype copy path) when reg is set. */
struct weights {
    struct pt buf;
    struct bs_tensor wc, wg, bc, bg;
};

static void weights_new(struct env *e, struct weights *w, int64_t n, int64_t k, bool reg)
{
    int64_t total = n * k + n;
    pt_new(e, &w->buf, 1, &total, -0.5f, 0.5f);
    int64_t wne[2] = {n, k};
    w->wc = bs_tensor_make(BS_TYPE_F32, 2, wne, w->buf.c.data);
    w->wg = bs_tensor_make(BS_TYPE_F32, 2, wne, w->buf.g.data);
    w->bc = bs_tensor_make(BS_TYPE_F32, 1, &n, (float *)w->buf.c.data + n * k);
    w->bg = bs_tensor_make(BS_TYPE_F32, 1, &n, (float *)w->buf.g.data + n * k);
    struct bs_err err = {0};
    if (reg && GPU->weights_ready != NULL &&
        GPU->weights_ready(GC, w->buf.g.data, w->buf.bytes, &err) != 0)
        die("weights_ready", &err);
}

static void test_linear(struct env *e)
{
    struct weights w, w2, w0, w1;
    struct pt x, y, xw, yw, x0, y0, x1, y1;
    weights_new(e, &w, 130, 96, true);
    pt_new(e, &x, 2, (int64_t[]){77, 96}, -1, 1);
    pt_new(e, &y, 2, (int64_t[]){77, 130}, -1, 1);
    BOTH("linear", CPU->linear(CC, &y.c, &x.c, &w.wc, &w.bc, 0.0f, &ec_),
         GPU->linear(GC, &y.g, &x.g, &w.wg, &w.bg, 0.0f, &eg_));
    expect_mm(e, "linear 77x96 -> 130, bias", &y);
    BOTH("linear", CPU->linear(CC, &y.c, &x.c, &w.wc, &w.bc, 1.0f, &ec_),
         GPU->linear(GC, &y.g, &x.g, &w.wg, &w.bg, 1.0f, &eg_));
    expect_mm(e, "linear, bias + residual (beta 1)", &y);

    /* strided x and y (column views), weights not registered */
    weights_new(e, &w2, 130, 96, false);
    pt_new(e, &xw, 2, (int64_t[]){77, 3 * 96}, -1, 1);
    pt_new(e, &yw, 2, (int64_t[]){77, 2 * 130}, -1, 1);
    struct pt xv = pt_cols(&xw, 96, 96), yv = pt_cols(&yw, 130, 130);
    BOTH("linear", CPU->linear(CC, &yv.c, &xv.c, &w2.wc, NULL, 1.0f, &ec_),
         GPU->linear(GC, &yv.g, &xv.g, &w2.wg, NULL, 1.0f, &eg_));
    expect_mm(e, "linear, column views, unregistered w", &yw);

    /* K = 0: y = bias */
    weights_new(e, &w0, 7, 0, true);
    pt_new(e, &x0, 2, (int64_t[]){5, 0}, -1, 1);
    pt_new(e, &y0, 2, (int64_t[]){5, 7}, -1, 1);
    BOTH("linear", CPU->linear(CC, &y0.c, &x0.c, &w0.wc, &w0.bc, 0.0f, &ec_),
         GPU->linear(GC, &y0.g, &x0.g, &w0.wg, &w0.bg, 0.0f, &eg_));
    expect_ew(e, "linear, K = 0 (bias only)", &y0);

    /* one row (conditioning) */
    weights_new(e, &w1, 384, 256, true);
    pt_new(e, &x1, 2, (int64_t[]){1, 256}, -1, 1);
    pt_new(e, &y1, 2, (int64_t[]){1, 384}, -1, 1);
    BOTH("linear", CPU->linear(CC, &y1.c, &x1.c, &w1.wc, &w1.bc, 0.0f, &ec_),
         GPU->linear(GC, &y1.g, &x1.g, &w1.wg, &w1.bg, 0.0f, &eg_));
    expect_mm(e, "linear, M = 1", &y1);

    /* the checks agree: a wrong shape is EINVAL on both */
    struct bs_err ec = {0}, eg = {0};
    int rc_c = CPU->linear(CC, &y1.c, &x.c, &w1.wc, NULL, 0.0f, &ec);
    int rc_g = GPU->linear(GC, &y1.g, &x.g, &w1.wg, NULL, 0.0f, &eg);
    e->checks++;
    if (rc_c != BS_EINVAL || rc_g != BS_EINVAL || strcmp(ec.msg, eg.msg) != 0) {
        e->failures++;
        printf("FAIL linear shape check: cpu %d \"%s\", gpu %d \"%s\"\n", rc_c, ec.msg, rc_g,
               eg.msg);
    } else {
        printf("ok   linear shape check: %s\n", eg.msg);
    }
    struct pt *all[] = {&x, &y, &xw, &yw, &x0, &y0, &x1, &y1};
    for (size_t i = 0; i < BS_ARRAY_LEN(all); i++)
        pt_free(e, all[i]);
    struct weights *ws[] = {&w, &w2, &w0, &w1};
    for (size_t i = 0; i < BS_ARRAY_LEN(ws); i++)
        pt_free(e, &ws[i]->buf);
}

/* ---- linear with narrow activations, linear_act ------------------------------- */

static const char *const act_names[BS_ACT_COUNT] = {"none",       "gelu", "gelu_tanh",
                                                    "quick_gelu", "silu", "mish"};

/* An activation tensor [rows, cols] (row stride ld elements) of dtype dt on
 * the GPU and its F32 twin on the CPU holding the same values (a narrow
 * dtype's values widened exactly). */
struct apt {
    struct bs_tensor c, g;
    enum bs_dtype dt;
    size_t cbytes, gbytes;
};

static const char *dt_name(enum bs_dtype t)
{
    return t == BS_TYPE_F32 ? "f32" : t == BS_TYPE_BF16 ? "bf16" : "f16";
}

/* Round n floats at p to dt and back (what a tensor of dt can hold). */
static void round_to(float *p, size_t n, enum bs_dtype dt)
{
    if (dt == BS_TYPE_F32 || n == 0)
        return;
    uint16_t *tmp = malloc(n * 2);
    if (tmp == NULL)
        die("malloc", NULL);
    bs_convert_from_f32(tmp, dt, p, (int64_t)n);
    bs_convert_to_f32(p, tmp, dt, (int64_t)n);
    free(tmp);
}

static void apt_upload(struct env *e, struct apt *t)
{
    struct bs_err err = {0};
    size_t n = t->cbytes / sizeof(float);
    void *tmp = malloc(t->gbytes ? t->gbytes : 4);
    if (tmp == NULL)
        die("malloc", NULL);
    bs_convert_from_f32(tmp, t->dt, t->c.data, (int64_t)n);
    if (e->gpu.iface->copy_in(e->gpu.ctx, t->g.data, tmp, t->gbytes, &err) != 0)
        die("copy_in", &err);
    free(tmp);
}

static void apt_new(struct env *e, struct apt *t, int64_t rows, int64_t cols, enum bs_dtype dt,
                    float lo, float hi)
{
    int64_t ne[2] = {rows, cols};
    t->dt = dt;
    t->c = bs_tensor_make(BS_TYPE_F32, 2, ne, NULL);
    t->g = bs_tensor_make(dt, 2, ne, NULL);
    t->cbytes = bs_tensor_nbytes(&t->c);
    t->gbytes = bs_tensor_nbytes(&t->g);
    t->c.data = e->cpu.iface->buf_alloc(e->cpu.ctx, t->cbytes);
    t->g.data = e->gpu.iface->buf_alloc(e->gpu.ctx, t->gbytes);
    if (t->c.data == NULL || t->g.data == NULL)
        die("buf_alloc", NULL);
    float *p = t->c.data;
    for (size_t i = 0; i < t->cbytes / sizeof(float); i++)
        p[i] = frand(lo, hi);
    round_to(p, t->cbytes / sizeof(float), dt);
    apt_upload(e, t);
}

static void apt_free(struct env *e, struct apt *t)
{
    e->cpu.iface->buf_free(e->cpu.ctx, t->c.data);
    e->gpu.iface->buf_free(e->gpu.ctx, t->g.data);
}

/* Column views [c0, c0 + n) on both sides. */
static struct apt apt_cols(const struct apt *t, int64_t c0, int64_t n)
{
    struct apt v = *t;
    v.c = bs_tensor_view_cols(&t->c, c0, n);
    v.g = bs_tensor_view_cols(&t->g, c0, n);
    return v;
}

/* The GPU's whole buffer of t widened against the CPU's rounded to t's
 * dtype (the reference: the F32 op's result rounded once). A narrow
 * output may differ by one unit in the last place where the two F32
 * results straddle a rounding boundary: rtol is at least that ulp. */
static void apt_expect(struct env *e, const char *name, const struct apt *t)
{
    struct bs_err err = {0};
    size_t n = t->cbytes / sizeof(float);
    float *got = malloc(t->cbytes + 4), *want = malloc(t->cbytes + 4);
    void *raw = malloc(t->gbytes + 4);
    if (got == NULL || want == NULL || raw == NULL)
        die("malloc", NULL);
    if (e->gpu.iface->copy_out(e->gpu.ctx, raw, t->g.data, t->gbytes, &err) != 0)
        die(name, &err);
    bs_convert_to_f32(got, raw, t->dt, (int64_t)n);
    memcpy(want, t->c.data, t->cbytes);
    round_to(want, n, t->dt);
    double ulp = t->dt == BS_TYPE_BF16 ? 1.0 / 128 : t->dt == BS_TYPE_F16 ? 1.0 / 1024 : 0;
    double rtol = e->mm_tol > ulp ? e->mm_tol : ulp;
    compare(e, name, got, want, n, e->mm_tol, rtol, e->mm_rms);
    free(got), free(want), free(raw);
}

/* The reference of linear_act on the CPU (which has none): linear into
 * y (or into h [M, 2N] when gated), its result rounded to dt as the GPU's
 * y (h) holds it, then act (glu) in F32. */
static int cpu_linear_act(struct env *e, struct bs_tensor *y, const struct bs_tensor *x,
                          const struct bs_tensor *w, const struct bs_tensor *b, enum bs_act act,
                          bool gated, enum bs_dtype dt, struct bs_err *err)
{
    int rc;
    if (!gated) {
        if ((rc = CPU->linear(CC, y, x, w, b, 0.0f, err)) != 0)
            return rc;
        round_to(y->data, (size_t)(bs_tensor_nrows(y) * bs_tensor_ld(y)), dt);
        return CPU->act(CC, y, y, act, err);
    }
    int64_t ne[2] = {bs_tensor_nrows(y), w->ne[0]};
    struct bs_tensor h = bs_tensor_make(BS_TYPE_F32, 2, ne, NULL);
    h.data = malloc(bs_tensor_nbytes(&h) + 4);
    if (h.data == NULL)
        die("malloc", NULL);
    if ((rc = CPU->linear(CC, &h, x, w, b, 0.0f, err)) == 0) {
        round_to(h.data, (size_t)(ne[0] * ne[1]), dt);
        rc = CPU->glu(CC, y, &h, act, err);
    }
    free(h.data);
    return rc;
}

/* linear_act on the GPU backend, or what the engine does without it. */
static int gpu_linear_act(struct env *e, struct bs_tensor *y, const struct bs_tensor *x,
                          const struct bs_tensor *w, const struct bs_tensor *b, enum bs_act act,
                          bool gated, struct bs_err *err)
{
    if (GPU->linear_act != NULL)
        return GPU->linear_act(GC, y, x, w, b, act, gated, err);
    if (gated)
        die("linear_act: no gated fallback in the self-check", NULL);
    int rc = GPU->linear(GC, y, x, w, b, 0.0f, err);
    return rc != 0 ? rc : GPU->act(GC, y, y, act, err);
}

/* One linear with x of dtype xt and y of dtype yt: bias or none, beta 0
 * then 1 (the residual), then the same call again (the plan cache's hit). */
static void linear_dt_case(struct env *e, const char *what, int64_t m, int64_t k, int64_t n,
                           int64_t x_extra, enum bs_dtype xt, enum bs_dtype yt, bool bias)
{
    char name[128];
    struct weights w;
    struct apt xf, y;
    weights_new(e, &w, n, k, true);
    apt_new(e, &xf, m, k + x_extra, xt, -1, 1);
    apt_new(e, &y, m, n, yt, -1, 1);
    struct apt x = apt_cols(&xf, x_extra, k); /* x_extra > 0: strided, misaligned rows */
    const struct bs_tensor *bc = bias ? &w.bc : NULL, *bg = bias ? &w.bg : NULL;
    for (int rep = 0; rep < 3; rep++) {
        float beta = rep == 0 ? 0.0f : 1.0f;
        BOTH("linear", CPU->linear(CC, &y.c, &x.c, &w.wc, bc, beta, &ec_),
             GPU->linear(GC, &y.g, &x.g, &w.wg, bg, beta, &eg_));
        snprintf(name, sizeof(name), "linear %s, %s -> %s%s, beta %g%s", what, dt_name(xt),
                 dt_name(yt), bias ? ", bias" : "", (double)beta, rep == 2 ? " (again)" : "");
        apt_expect(e, name, &y);
        round_to(y.c.data, y.cbytes / sizeof(float), yt); /* y as the GPU holds it */
        apt_upload(e, &y);
    }
    apt_free(e, &xf), apt_free(e, &y);
    pt_free(e, &w.buf);
}

static void test_linear_dtypes(struct env *e)
{
    static const enum bs_dtype dts[3] = {BS_TYPE_F32, BS_TYPE_BF16, BS_TYPE_F16};
    int nd = 3;
    for (int i = 0; i < nd; i++)
        for (int j = 0; j < nd; j++)
            for (int b = 0; b < 2; b++)
                linear_dt_case(e, "77x96->130", 77, 96, 130, 0, dts[i], dts[j], b);
    /* shapes cuBLASLt may decline: odd K, a row stride no multiple of 8 (x
     * a column view at an odd offset), M = 1, K = 0 */
    for (int i = 0; i < nd; i++) {
        enum bs_dtype dt = dts[i], ct = dts[(i + 1) % 3];
        linear_dt_case(e, "odd k 33, ldx 38", 45, 33, 70, 5, dt, ct, true);
        linear_dt_case(e, "m 1", 1, 256, 384, 0, dt, dt, true);
        linear_dt_case(e, "k 0", 5, 0, 7, 0, dt, ct, true);
        linear_dt_case(e, "k 0, no bias", 5, 0, 7, 0, dt, dt, false);
    }
}

static void test_linear_act(struct env *e)
{
    static const enum bs_dtype dts[3] = {BS_TYPE_F32, BS_TYPE_BF16, BS_TYPE_F16};
    int nd = 3;
    char name[128];
    for (int d = 0; d < nd; d++)
        for (int gated = 0; gated < (GPU->linear_act ? 2 : 1); gated++)
            for (int a = 0; a < BS_ACT_COUNT; a++)
                for (int bias = 0; bias < 3; bias++) { /* none, bias, bias with K = 0 */
                    enum bs_dtype yt = dts[d];
                    int64_t m = 67, k = bias == 2 ? 0 : 96, n = 72;
                    struct weights w;
                    struct apt x, y;
                    weights_new(e, &w, gated ? 2 * n : n, k, true);
                    apt_new(e, &x, m, k, BS_TYPE_F32, -2, 2);
                    apt_new(e, &y, m, n, yt, -1, 1);
                    struct bs_err ec = {0}, eg = {0};
                    if (cpu_linear_act(e, &y.c, &x.c, &w.wc, bias ? &w.bc : NULL, (enum bs_act)a,
                                       gated, yt, &ec) != 0)
                        die("linear_act (cpu)", &ec);
                    if (gpu_linear_act(e, &y.g, &x.g, &w.wg, bias ? &w.bg : NULL, (enum bs_act)a,
                                       gated, &eg) != 0)
                        die("linear_act", &eg);
                    snprintf(name, sizeof(name), "linear_act %s%s -> %s%s", act_names[a],
                             gated ? " gated" : "", dt_name(yt),
                             bias == 2 ? ", bias, K = 0"
                             : bias    ? ", bias"
                                       : "");
                    apt_expect(e, name, &y);
                    apt_free(e, &x), apt_free(e, &y);
                    pt_free(e, &w.buf);
                }
}

/* ---- norms ------------------------------------------------------------------ */

static void test_layer_norm(struct env *e)
{
    struct pt x, y, gamma, beta, scale, shift;
    pt_new(e, &x, 2, (int64_t[]){150, 320}, 2, 4); /* mean far from 0 */
    pt_new(e, &y, 2, (int64_t[]){150, 320}, -1, 1);
    pt_new(e, &gamma, 1, (int64_t[]){320}, 0.5f, 1.5f);
    pt_new(e, &beta, 1, (int64_t[]){320}, -0.5f, 0.5f);
    pt_new(e, &scale, 2, (int64_t[]){3, 320}, -0.5f, 0.5f);
    pt_new(e, &shift, 2, (int64_t[]){3, 320}, -0.5f, 0.5f);
    struct bs_norm_params pc = {1e-6f, &gamma.c, &beta.c, &scale.c, &shift.c, 50, 0};
    struct bs_norm_params pg = {1e-6f, &gamma.g, &beta.g, &scale.g, &shift.g, 50, 0};
    BOTH("layer_norm", CPU->layer_norm(CC, &y.c, &x.c, &pc, &ec_),
         GPU->layer_norm(GC, &y.g, &x.g, &pg, &eg_));
    expect_ew(e, "layer_norm, affine + scale/shift", &y);
    struct bs_norm_params qc = {1e-5f, NULL, NULL, &scale.c, NULL, 150, 0};
    struct bs_norm_params qg = {1e-5f, NULL, NULL, &scale.g, NULL, 150, 0};
    BOTH("layer_norm", CPU->layer_norm(CC, &x.c, &x.c, &qc, &ec_),
         GPU->layer_norm(GC, &x.g, &x.g, &qg, &eg_));
    expect_ew(e, "layer_norm in place, scale only", &x);
    struct pt *all[] = {&x, &y, &gamma, &beta, &scale, &shift};
    for (size_t i = 0; i < BS_ARRAY_LEN(all); i++)
        pt_free(e, all[i]);
}

static void test_group_norm(struct env *e)
{
    struct pt x, y, gamma, beta, scale, shift, v, vy;
    pt_new(e, &x, 3, (int64_t[]){2, 64, 37}, -2, 3);
    pt_new(e, &y, 3, (int64_t[]){2, 64, 37}, -1, 1);
    pt_new(e, &gamma, 1, (int64_t[]){64}, 0.5f, 1.5f);
    pt_new(e, &beta, 1, (int64_t[]){64}, -0.5f, 0.5f);
    pt_new(e, &scale, 2, (int64_t[]){2, 64}, -0.5f, 0.5f);
    pt_new(e, &shift, 2, (int64_t[]){2, 64}, -0.5f, 0.5f);
    struct bs_norm_params pc = {1e-5f, &gamma.c, &beta.c, &scale.c, &shift.c, 0, 32};
    struct bs_norm_params pg = {1e-5f, &gamma.g, &beta.g, &scale.g, &shift.g, 0, 32};
    BOTH("group_norm", CPU->group_norm(CC, &y.c, &x.c, &pc, &ec_),
         GPU->group_norm(GC, &y.g, &x.g, &pg, &eg_));
    expect_ew(e, "group_norm [2,64,37] /32, affine + mod", &y);
    /* the VAE mid block's shape: 512 channels of 32 x 32, 32 groups, eps 1e-6 */
    pt_new(e, &v, 3, (int64_t[]){1, 512, 1024}, -3, 3);
    pt_new(e, &vy, 3, (int64_t[]){1, 512, 1024}, -1, 1);
    struct bs_norm_params vc = {1e-6f, NULL, NULL, NULL, NULL, 0, 32};
    BOTH("group_norm", CPU->group_norm(CC, &vy.c, &v.c, &vc, &ec_),
         GPU->group_norm(GC, &vy.g, &v.g, &vc, &eg_));
    expect_ew(e, "group_norm [1,512,1024] /32", &vy);
    struct pt *all[] = {&x, &y, &gamma, &beta, &scale, &shift, &v, &vy};
    for (size_t i = 0; i < BS_ARRAY_LEN(all); i++)
        pt_free(e, all[i]);
}

/* ---- norms in every activation dtype ------------------------------------------ */

/* A tensor of dtype dt on both backends: the CPU side holds the GPU side's
 * values widened to F32 (the reference of issue 14: widen, F32 op, round). */
struct ptd {
    struct bs_tensor c, g;
    enum bs_dtype dt;
    int64_t n;
};

static void ptd_new(struct env *e, struct ptd *t, enum bs_dtype dt, int n_dims, const int64_t *ne,
                    float lo, float hi, float base)
{
    t->dt = dt;
    t->c = bs_tensor_make(BS_TYPE_F32, n_dims, ne, NULL);
    t->g = bs_tensor_make(dt, n_dims, ne, NULL);
    t->n = bs_tensor_nelements(&t->c);
    size_t es = bs_dtype_size(dt), nb = (size_t)(t->n ? t->n : 1);
    t->c.data = e->cpu.iface->buf_alloc(e->cpu.ctx, nb * 4);
    t->g.data = e->gpu.iface->buf_alloc(e->gpu.ctx, nb * es);
    float *f = malloc(nb * 4);
    void *h = malloc(nb * es);
    if (t->c.data == NULL || t->g.data == NULL || f == NULL || h == NULL)
        die("buf_alloc", NULL);
    for (int64_t i = 0; i < t->n; i++)
        f[i] = base + frand(lo, hi);
    bs_convert_from_f32(h, dt, f, t->n);
    bs_convert_to_f32(t->c.data, h, dt, t->n);
    struct bs_err err = {0};
    if (e->gpu.iface->copy_in(e->gpu.ctx, t->g.data, h, nb * es, &err) != 0)
        die("copy_in", &err);
    free(f);
    free(h);
}

static void ptd_free(struct env *e, struct ptd *t)
{
    e->cpu.iface->buf_free(e->cpu.ctx, t->c.data);
    e->gpu.iface->buf_free(e->gpu.ctx, t->g.data);
}

static struct ptd ptd_cols(const struct ptd *t, int64_t c0, int64_t n)
{
    struct ptd v = *t;
    v.c = bs_tensor_view_cols(&t->c, c0, n);
    v.g = bs_tensor_view_cols(&t->g, c0, n);
    return v;
}

/* The whole buffer of t: F32 within 1e-5 (atol and rtol), BF16/F16 within
 * 1e-5 (atol and rtol) plus 1 ulp of the dtype of the CPU's F32 result
 * rounded (F32 results within 1e-5 may round 1 ulp apart). */
static void expect_dt(struct env *e, const char *name, const struct ptd *t)
{
    struct bs_err err = {0};
    size_t es = bs_dtype_size(t->dt), nb = (size_t)(t->n ? t->n : 1);
    void *h = malloc(nb * es), *want = malloc(nb * es);
    float *got = malloc(nb * 4);
    if (h == NULL || want == NULL || got == NULL)
        die("malloc", NULL);
    if (e->gpu.iface->copy_out(e->gpu.ctx, h, t->g.data, (size_t)t->n * es, &err) != 0)
        die(name, &err);
    bs_convert_to_f32(got, h, t->dt, t->n);
    bs_convert_from_f32(want, t->dt, t->c.data, t->n);
    const float *ref = t->c.data;
    double worst = 0, max_abs = 0;
    for (int64_t i = 0; i < t->n; i++) {
        double r, d;
        if (t->dt == BS_TYPE_F32) {
            d = fabs((double)got[i] - (double)ref[i]);
            r = d == 0 ? 0 : d / (1e-5 + 1e-5 * fabs((double)ref[i]));
        } else {
            /* the narrow dtype's spacing at the reference (its subnormal
             * spacing below the smallest normal) */
            int ex, mant = t->dt == BS_TYPE_BF16 ? 7 : 10,
                    lo_ex = t->dt == BS_TYPE_BF16 ? -125 : -13;
            double a = fabs((double)ref[i]);
            frexp(a > 0 ? a : 1e-30, &ex);
            double ulp = ldexp(1.0, (ex < lo_ex ? lo_ex : ex) - 1 - mant);
            float wf;
            bs_convert_to_f32(&wf, (const uint16_t *)want + i, t->dt, 1);
            d = fabs((double)got[i] - (double)wf);
            r = d == 0 ? 0 : d / (ulp + 1e-5 + 1e-5 * a);
        }
        if (!(r <= worst))
            worst = isnan(r) ? INFINITY : r;
        if (d > max_abs || isnan(d))
            max_abs = d;
    }
    e->checks++;
    bool ok = worst <= 1.0;
    if (!ok)
        e->failures++;
    printf("%s %-44s max abs err %.3g (%.2f of tolerance)\n", ok ? "ok  " : "FAIL", name, max_abs,
           worst);
    free(h), free(want), free(got);
}

/* Layer norm: DiT-XL's AdaLN rows in every dtype pair, rows of 8192 (the
 * registers' most) and past them, a length not a multiple of 8 in aligned
 * rows, unaligned views, in place in 16 bits, 1000 + noise. */
static void test_layer_norm_dtypes(struct env *e)
{
    const enum bs_dtype all[] = {BS_TYPE_F32, BS_TYPE_BF16, BS_TYPE_F16};
    int nd = 3;
    char name[96];
    struct ptd g, b, s, h;
    ptd_new(e, &g, BS_TYPE_F32, 1, (int64_t[]){1152}, 0.5f, 1.5f, 0);
    ptd_new(e, &b, BS_TYPE_F32, 1, (int64_t[]){1152}, -0.5f, 0.5f, 0);
    ptd_new(e, &s, BS_TYPE_F32, 2, (int64_t[]){4, 1152}, -0.5f, 0.5f, 0);
    ptd_new(e, &h, BS_TYPE_F32, 2, (int64_t[]){4, 1152}, -0.5f, 0.5f, 0);
    struct bs_norm_params pc = {1e-6f, &g.c, &b.c, &s.c, &h.c, 256, 0};
    struct bs_norm_params pg = {1e-6f, &g.g, &b.g, &s.g, &h.g, 256, 0};
    for (int i = 0; i < nd; i++)
        for (int j = 0; j < nd; j++) {
            struct ptd x, y;
            ptd_new(e, &x, all[i], 2, (int64_t[]){1024, 1152}, -2, 3, 0);
            ptd_new(e, &y, all[j], 2, (int64_t[]){1024, 1152}, -1, 1, 0);
            BOTH("layer_norm", CPU->layer_norm(CC, &y.c, &x.c, &pc, &ec_),
                 GPU->layer_norm(GC, &y.g, &x.g, &pg, &eg_));
            snprintf(name, sizeof(name), "layer_norm [1024,1152] AdaLN %s -> %s", dt_name(all[i]),
                     dt_name(all[j]));
            expect_dt(e, name, &y);
            ptd_free(e, &x), ptd_free(e, &y);
        }
    struct bs_norm_params q = {1e-5f, NULL, NULL, NULL, NULL, 1, 0};
    const struct {
        int64_t rows, d, ld, c0; /* a view [c0, c0 + d) of rows of ld */
        int dx, dy;              /* indices into all[] */
        float base;
        bool in_place;
    } cs[] = {
        {3, 8192, 8192, 0, 1, 0, 0, false},     {2, 9000, 9000, 0, 0, 0, 100, false},
        {5, 1155, 1160, 0, 0, 2, 0, false},     {6, 640, 700, 3, 2, 1, 0, false},
        {7, 1280, 1280, 0, 1, 1, 0, true},      {7, 1280, 1280, 0, 2, 2, 0, true},
        {64, 1280, 1280, 0, 0, 0, 1000, false}, {1, 20001, 20003, 2, 2, 1, 0, false},
    };
    for (size_t i = 0; i < BS_ARRAY_LEN(cs); i++) {
        if (cs[i].dx >= nd || cs[i].dy >= nd)
            continue;
        struct ptd x, y, xv, yv;
        ptd_new(e, &x, all[cs[i].dx], 2, (int64_t[]){cs[i].rows, cs[i].ld}, -2, 2, cs[i].base);
        xv = ptd_cols(&x, cs[i].c0, cs[i].d);
        if (cs[i].in_place)
            y = x, yv = xv;
        else {
            ptd_new(e, &y, all[cs[i].dy], 2, (int64_t[]){cs[i].rows, cs[i].ld}, -1, 1, 0);
            yv = ptd_cols(&y, cs[i].c0 ? 1 : 0, cs[i].d);
        }
        BOTH("layer_norm", CPU->layer_norm(CC, &yv.c, &xv.c, &q, &ec_),
             GPU->layer_norm(GC, &yv.g, &xv.g, &q, &eg_));
        snprintf(name, sizeof(name), "layer_norm [%lld,%lld] of %lld +%lld %s%s -> %s",
                 (long long)cs[i].rows, (long long)cs[i].d, (long long)cs[i].ld,
                 (long long)cs[i].c0, cs[i].base != 0 ? "mean>>std " : "", dt_name(all[cs[i].dx]),
                 dt_name(all[cs[i].dy]));
        expect_dt(e, name, &y);
        ptd_free(e, &x);
        if (!cs[i].in_place)
            ptd_free(e, &y);
    }
    ptd_free(e, &g), ptd_free(e, &b), ptd_free(e, &s), ptd_free(e, &h);
}

/* Group norm: SD's down-block-0 at batch 1 (320 x 64 x 64, 32 groups: many
 * chunks a group) in F32 and in place in 16 bits, every dtype pair with
 * modulation at batch 2, groups not a multiple of 8, 1000 + noise. */
static void test_group_norm_dtypes(struct env *e)
{
    const enum bs_dtype all[] = {BS_TYPE_F32, BS_TYPE_BF16, BS_TYPE_F16};
    int nd = 3;
    char name[96];
    struct ptd g, b, s, h;
    ptd_new(e, &g, BS_TYPE_F32, 1, (int64_t[]){320}, 0.5f, 1.5f, 0);
    ptd_new(e, &b, BS_TYPE_F32, 1, (int64_t[]){320}, -0.5f, 0.5f, 0);
    ptd_new(e, &s, BS_TYPE_F32, 2, (int64_t[]){2, 320}, -0.5f, 0.5f, 0);
    ptd_new(e, &h, BS_TYPE_F32, 2, (int64_t[]){2, 320}, -0.5f, 0.5f, 0);
    const struct {
        int64_t bsz, ch, sp;
        int groups, dx, dy;
        float base;
        bool mod, in_place;
    } cs[] = {
        {1, 320, 4096, 32, 0, 0, 0, false, false},    {1, 320, 4096, 32, 1, 1, 0, false, true},
        {1, 320, 4096, 32, 2, 2, 0, false, true},     {2, 320, 250, 32, 0, 1, 0, true, false},
        {2, 320, 250, 32, 1, 0, 0, true, false},      {2, 320, 250, 32, 2, 1, 0, true, false},
        {2, 320, 250, 32, 1, 2, 0, true, false},      {1, 60, 999, 20, 2, 0, 0, false, false},
        {1, 320, 1024, 32, 0, 0, 1000, false, false}, {8, 320, 1024, 32, 1, 1, 0, false, false},
    };
    for (size_t i = 0; i < BS_ARRAY_LEN(cs); i++) {
        if (cs[i].dx >= nd || cs[i].dy >= nd)
            continue;
        int64_t ne[3] = {cs[i].bsz, cs[i].ch, cs[i].sp};
        struct ptd x, y;
        ptd_new(e, &x, all[cs[i].dx], 3, ne, -2, 3, cs[i].base);
        if (cs[i].in_place)
            y = x;
        else
            ptd_new(e, &y, all[cs[i].dy], 3, ne, -1, 1, 0);
        bool mod = cs[i].mod;
        struct bs_norm_params pc = {1e-5f, &g.c,        &b.c, mod ? &s.c : NULL, mod ? &h.c : NULL,
                                    0,     cs[i].groups};
        struct bs_norm_params pg = {1e-5f, &g.g,        &b.g, mod ? &s.g : NULL, mod ? &h.g : NULL,
                                    0,     cs[i].groups};
        if (cs[i].ch != 320) /* gamma and beta are [320] */
            pc.gamma = pc.beta = pg.gamma = pg.beta = NULL;
        BOTH("group_norm", CPU->group_norm(CC, &y.c, &x.c, &pc, &ec_),
             GPU->group_norm(GC, &y.g, &x.g, &pg, &eg_));
        snprintf(name, sizeof(name), "group_norm [%lld,%lld,%lld] /%d %s%s%s -> %s",
                 (long long)cs[i].bsz, (long long)cs[i].ch, (long long)cs[i].sp, cs[i].groups,
                 mod ? "mod " : "", cs[i].base != 0 ? "mean>>std " : "", dt_name(all[cs[i].dx]),
                 dt_name(all[cs[i].dy]));
        expect_dt(e, name, &y);
        ptd_free(e, &x);
        if (!cs[i].in_place)
            ptd_free(e, &y);
    }
    ptd_free(e, &g), ptd_free(e, &b), ptd_free(e, &s), ptd_free(e, &h);
}

/* ---- elementwise -------------------------------------------------------------- */

static void test_act_glu(struct env *e)
{
    char name[96];
    for (int a = 0; a < BS_ACT_COUNT; a++) {
        struct pt x, y, g, h;
        pt_new(e, &x, 2, (int64_t[]){100, 257}, -8, 8);
        pt_new(e, &y, 2, (int64_t[]){100, 257}, -1, 1);
        BOTH("act", CPU->act(CC, &y.c, &x.c, (enum bs_act)a, &ec_),
             GPU->act(GC, &y.g, &x.g, (enum bs_act)a, &eg_));
        snprintf(name, sizeof(name), "act %s", act_names[a]);
        expect_ew(e, name, &y);
        struct pt xv = pt_cols(&x, 50, 100); /* in place on a column view */
        BOTH("act", CPU->act(CC, &xv.c, &xv.c, (enum bs_act)a, &ec_),
             GPU->act(GC, &xv.g, &xv.g, (enum bs_act)a, &eg_));
        snprintf(name, sizeof(name), "act %s in place, column view", act_names[a]);
        expect_ew(e, name, &x);

        pt_new(e, &g, 2, (int64_t[]){64, 600}, -6, 6);
        pt_new(e, &h, 2, (int64_t[]){64, 300}, -1, 1);
        BOTH("glu", CPU->glu(CC, &h.c, &g.c, (enum bs_act)a, &ec_),
             GPU->glu(GC, &h.g, &g.g, (enum bs_act)a, &eg_));
        snprintf(name, sizeof(name), "glu %s", act_names[a]);
        expect_ew(e, name, &h);
        struct pt gv = pt_cols(&g, 0, 300); /* y aliases the first half of x */
        BOTH("glu", CPU->glu(CC, &gv.c, &g.c, (enum bs_act)a, &ec_),
             GPU->glu(GC, &gv.g, &g.g, (enum bs_act)a, &eg_));
        snprintf(name, sizeof(name), "glu %s into its own input", act_names[a]);
        expect_ew(e, name, &g);
        pt_free(e, &x);
        pt_free(e, &y);
        pt_free(e, &g);
        pt_free(e, &h);
    }
}

static void test_add_transpose_rows(struct env *e)
{
    struct pt x, y, gate, t, tt, t2, tt2, table, rows;
    pt_new(e, &x, 2, (int64_t[]){120, 200}, -1, 1);
    pt_new(e, &y, 2, (int64_t[]){120, 200}, -1, 1);
    pt_new(e, &gate, 2, (int64_t[]){3, 200}, -2, 2);
    BOTH("add", CPU->add(CC, &y.c, &x.c, &gate.c, 40, 1.0f, &ec_),
         GPU->add(GC, &y.g, &x.g, &gate.g, 40, 1.0f, &eg_));
    expect_ew(e, "add, gate per sample", &y);
    BOTH("add", CPU->add(CC, &y.c, &x.c, NULL, 1, 0.5f, &ec_),
         GPU->add(GC, &y.g, &x.g, NULL, 1, 0.5f, &eg_));
    expect_ew(e, "add, no gate, alpha 0.5", &y);

    pt_new(e, &t, 3, (int64_t[]){3, 70, 45}, -1, 1);
    pt_new(e, &tt, 3, (int64_t[]){3, 45, 70}, -1, 1);
    BOTH("transpose", CPU->transpose(CC, &tt.c, &t.c, &ec_), GPU->transpose(GC, &tt.g, &t.g, &eg_));
    expect_ew(e, "transpose [3,70,45]", &tt);
    pt_new(e, &t2, 2, (int64_t[]){33, 65}, -1, 1);
    pt_new(e, &tt2, 2, (int64_t[]){65, 33}, -1, 1);
    BOTH("transpose", CPU->transpose(CC, &tt2.c, &t2.c, &ec_),
         GPU->transpose(GC, &tt2.g, &t2.g, &eg_));
    expect_ew(e, "transpose [33,65]", &tt2);

    pt_new(e, &table, 2, (int64_t[]){10, 48}, -1, 1);
    pt_new(e, &rows, 2, (int64_t[]){4, 48}, -1, 1);
    const int64_t idx[4] = {3, 0, 9, 3};
    BOTH("get_rows", CPU->get_rows(CC, &rows.c, &table.c, idx, 4, &ec_),
         GPU->get_rows(GC, &rows.g, &table.g, idx, 4, &eg_));
    expect_ew(e, "get_rows", &rows);
    struct pt *all[] = {&x, &y, &gate, &t, &tt, &t2, &tt2, &table, &rows};
    for (size_t i = 0; i < BS_ARRAY_LEN(all); i++)
        pt_free(e, all[i]);
}

/* ---- attention ------------------------------------------------------------------- */

enum mask_kind { MASK_NONE, MASK_KEYS, MASK_FULL, RULE_KEYS, RULE_FULL };

/* Mask row r of a rule mask (RULE_*), key j of lk: as in tests/gpu_emu,
 * rows of every kind the mask rule names. */
static float rule_value(int64_t r, int64_t j, int64_t lk)
{
    float u = frand(-1, 1);
    switch (r % 8) {
    case 0:
        return -FLT_MAX;
    case 1:
        return -INFINITY;
    case 2:
        return j == lk - 1 || (j >= lk / 2 && j % 2) ? -FLT_MAX : -INFINITY;
    case 3:
        return u < -0.4f ? -FLT_MAX : frand(-2, 0);
    case 4:
        return MASK_DROP;
    case 5:
        return u < -0.4f ? -INFINITY : frand(-2, 0);
    case 6:
        return u < -0.3f ? -FLT_MAX : u < 0.3f ? -INFINITY : 0.0f;
    default:
        return 30000.0f;
    }
}

/* One attention case: q from its own tensor, k and v column views of one
 * [B*Lk, 2*inner] tensor (self-attention: all three from one fused QKV). */
static void attn_case(struct env *e, int64_t batch, int64_t lq, int64_t lk, int heads, int hd,
                      enum mask_kind mk, bool fused, bs_proc_attention_unfused_fn unfused)
{
    int64_t inner = (int64_t)heads * hd;
    struct pt qkv, q, kv, o, mask;
    struct pt qv, kv_k, kv_v;
    if (fused) {
        pt_new(e, &qkv, 2, (int64_t[]){batch * lq, 3 * inner}, -1, 1);
        qv = pt_cols(&qkv, 0, inner);
        kv_k = pt_cols(&qkv, inner, inner);
        kv_v = pt_cols(&qkv, 2 * inner, inner);
    } else {
        pt_new(e, &q, 2, (int64_t[]){batch * lq, inner}, -1, 1);
        pt_new(e, &kv, 2, (int64_t[]){batch * lk, 2 * inner}, -1, 1);
        qv = q;
        kv_k = pt_cols(&kv, 0, inner);
        kv_v = pt_cols(&kv, inner, inner);
    }
    pt_new(e, &o, 2, (int64_t[]){batch * lq, inner}, -1, 1);
    struct bs_attn_params pc = {.batch = batch,
                                .lq = lq,
                                .lk = lk,
                                .heads = heads,
                                .head_dim = hd,
                                .scale = 1.0f / sqrtf((float)hd),
                                .compute = BS_TYPE_F32};
    struct bs_attn_params pg = pc;
    if (mk != MASK_NONE) {
        int64_t mq = mk == MASK_KEYS || mk == RULE_KEYS ? 1 : lq;
        pt_new(e, &mask, 3, (int64_t[]){batch, mq, lk}, -2, 0);
        float *m = mask.c.data;
        for (int64_t i = 0; i < batch * mq * lk; i++)
            if (mk >= RULE_KEYS)
                m[i] = rule_value(i / lk, i % lk, lk);
            else if (frand(0, 1) < 0.2f)
                m[i] = MASK_DROP;
        if (mk == MASK_FULL && lq > 1 && lk > 0) /* one row with no key at all */
            for (int64_t i = 0; i < lk; i++)
                m[lk + i] = -INFINITY;
        pt_upload(e, &mask);
        pc.mask = &mask.c;
        pg.mask = &mask.g;
    }
    BOTH("attention", CPU->attention(CC, &o.c, &qv.c, &kv_k.c, &kv_v.c, &pc, &ec_),
         GPU->attention(GC, &o.g, &qv.g, &kv_k.g, &kv_v.g, &pg, &eg_));
    char name[128];
    static const char *const mnames[] = {"no mask", "mask [B,1,Lk]", "mask [B,Lq,Lk]",
                                         "rule mask [B,1,Lk]", "rule mask [B,Lq,Lk]"};
    snprintf(name, sizeof(name), "attention B%lld Lq%lld Lk%lld %dx%d %s%s", (long long)batch,
             (long long)lq, (long long)lk, heads, hd, mnames[mk], fused ? " qkv" : "");
    expect_mm(e, name, &o);
    if (unfused != NULL) {
        memset(o.c.data, 0, o.bytes); /* the CPU result stays the reference */
        BOTH("attention", CPU->attention(CC, &o.c, &qv.c, &kv_k.c, &kv_v.c, &pc, &ec_),
             unfused(&e->gpu, &o.g, &qv.g, &kv_k.g, &kv_v.g, &pg, &eg_));
        snprintf(name, sizeof(name), "attention (unfused baseline) Lq%lld %dx%d", (long long)lq,
                 heads, hd);
        expect_mm(e, name, &o);
    }
    if (fused) {
        pt_free(e, &qkv);
    } else {
        pt_free(e, &q);
        pt_free(e, &kv);
    }
    pt_free(e, &o);
    if (mk != MASK_NONE)
        pt_free(e, &mask);
}

static void test_attention(struct env *e)
{
    static const int hds[] = {40, 64, 72, 80, 160, 24, 30, 200}; /* 30: scalar loads */
    for (size_t i = 0; i < BS_ARRAY_LEN(hds); i++) {
        attn_case(e, 2, 100, 100, 2, hds[i], MASK_NONE, true, NULL); /* self */
        attn_case(e, 2, 64, 77, 2, hds[i], MASK_KEYS, false, NULL);  /* cross, Lk 77 */
        attn_case(e, 2, 70, 130, 2, hds[i], MASK_FULL, false, NULL);
    }
    /* long sequences: 8-warp blocks (head dims up to 80) */
    attn_case(e, 1, 2100, 2100, 2, 64, MASK_KEYS, true, NULL);
    attn_case(e, 1, 2100, 77, 2, 40, MASK_FULL, false, NULL);
    attn_case(e, 1, 1, 5, 3, 64, MASK_NONE, false, NULL);
    attn_case(e, 1, 5, 0, 2, 64, MASK_NONE, false, NULL); /* no keys: zeros */
    attn_case(e, 1, 300, 300, 1, 512, MASK_KEYS, true, NULL);
    for (int i = 0; i < 3; i++) { /* the mask rule: attn_mma (40, 64), attn_f32 (200) */
        attn_case(e, 8, 40, 130, 1, (int[]){40, 64, 200}[i], RULE_KEYS, false, NULL);
        attn_case(e, 1, 70, 130, 2, (int[]){40, 64, 200}[i], RULE_FULL, false, NULL);
    }
    if (e->self_check)
        return;
    bs_proc_attention_unfused_fn fn;
    *(void **)&fn = bs_backend_get_proc_address(&e->gpu, BS_PROC_ATTENTION_UNFUSED);
    if (fn == NULL) {
        e->checks++;
        e->failures++;
        printf("FAIL unfused baseline: the backend has no entry point " BS_PROC_ATTENTION_UNFUSED
               "\n");
        return;
    }
    attn_case(e, 2, 128, 128, 2, 64, MASK_KEYS, true, fn);
    attn_case(e, 2, 40, 130, 2, 64, RULE_FULL, false, fn);
}

/* ---- ragged batches ------------------------------------------------------------- */

#define RAGGED_MAX 4 /* samples of a ragged case */

/* A ragged case: n samples of lq[b] queries and lk[b] keys, heads x hd, a
 * mask of kind mk (flat: one row per sample, or per query for MASK_FULL and
 * RULE_FULL, each part after a gap of 3 elements), and the offsets. */
struct ragged {
    int n, heads, hd;
    const int64_t *lq, *lk;
    enum mask_kind mk;
    bool per_query;
    int64_t q_off[RAGGED_MAX + 1], k_off[RAGGED_MAX + 1], m_off[RAGGED_MAX];
    int64_t mask_len, max_lq, max_lk;
};

static void ragged_offsets(struct ragged *r)
{
    r->per_query = r->mk == MASK_FULL || r->mk == RULE_FULL;
    r->q_off[0] = r->k_off[0] = r->mask_len = r->max_lq = r->max_lk = 0;
    for (int b = 0; b < r->n; b++) {
        r->q_off[b + 1] = r->q_off[b] + r->lq[b];
        r->k_off[b + 1] = r->k_off[b] + r->lk[b];
        r->max_lq = r->lq[b] > r->max_lq ? r->lq[b] : r->max_lq;
        r->max_lk = r->lk[b] > r->max_lk ? r->lk[b] : r->max_lk;
        r->m_off[b] = r->mask_len + 3;
        r->mask_len = r->m_off[b] + (r->per_query ? r->lq[b] : 1) * r->lk[b];
    }
}

static void ragged_mask_fill(const struct ragged *r, float *m)
{
    for (int b = 0, row = 0; b < r->n; b++)
        for (int64_t i = 0; i < (r->per_query ? r->lq[b] : 1); i++, row++)
            for (int64_t j = 0; j < r->lk[b]; j++) {
                float *v = m + r->m_off[b] + i * r->lk[b] + j;
                if (r->mk >= RULE_KEYS)
                    *v = rule_value(row, j, r->lk[b]);
                else if (frand(0, 1) < 0.2f)
                    *v = MASK_DROP;
            }
}

/* Sample b of a ragged batch on the CPU alone (a batch of one on views of
 * its rows and its mask part) against its rows of the GPU's o. */
static void ragged_check_sample(struct env *e, const struct ragged *r, int b, const struct pt *q,
                                const struct pt *kk, const struct pt *vv, const struct pt *o,
                                const struct pt *mask)
{
    int64_t lq = r->lq[b], lk = r->lk[b], inner = (int64_t)r->heads * r->hd;
    struct pt ob = *o;
    ob.c = bs_tensor_view_outer(&o->c, r->q_off[b], lq);
    ob.g = bs_tensor_view_outer(&o->g, r->q_off[b], lq);
    ob.bytes = (size_t)(lq * inner) * sizeof(float);
    struct bs_tensor qb = bs_tensor_view_outer(&q->c, r->q_off[b], lq);
    struct bs_tensor kb = bs_tensor_view_outer(&kk->c, r->k_off[b], lk);
    struct bs_tensor vb = bs_tensor_view_outer(&vv->c, r->k_off[b], lk);
    struct bs_tensor mb = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, r->per_query ? lq : 1, lk},
                                         mask ? (float *)mask->c.data + r->m_off[b] : NULL);
    struct bs_attn_params pc = {.batch = 1,
                                .lq = lq,
                                .lk = lk,
                                .heads = r->heads,
                                .head_dim = r->hd,
                                .scale = 1.0f / sqrtf((float)r->hd),
                                .mask = mask && lk > 0 ? &mb : NULL};
    struct bs_err err = {0};
    if (CPU->attention(CC, &ob.c, &qb, &kb, &vb, &pc, &err) != 0)
        die("attention (a ragged batch's sample, cpu)", &err);
    static const char *const mnames[] = {"no mask", "mask rows", "mask rows per query",
                                         "rule mask rows", "rule mask rows per query"};
    char name[128];
    snprintf(name, sizeof(name), "attention ragged %d/%d Lq%lld Lk%lld %dx%d %s", b, r->n,
             (long long)lq, (long long)lk, r->heads, r->hd, mnames[r->mk]);
    expect_mm(e, name, &ob);
}

/* A ragged batch on the GPU in one call, against the CPU twin on each
 * sample alone; each sample's rows of o compared on their own (a sample
 * without keys is exactly 0). */
static void attn_ragged_case(struct env *e, int n, const int64_t *lq, const int64_t *lk, int heads,
                             int hd, enum mask_kind mk)
{
    struct ragged r = {.n = n, .heads = heads, .hd = hd, .lq = lq, .lk = lk, .mk = mk};
    ragged_offsets(&r);
    int64_t inner = (int64_t)heads * hd;
    struct pt q, kv, o, mask;
    pt_new(e, &q, 2, (int64_t[]){r.q_off[n], inner}, -1, 1);
    pt_new(e, &kv, 2, (int64_t[]){r.k_off[n], 2 * inner}, -1, 1);
    pt_new(e, &o, 2, (int64_t[]){r.q_off[n], inner}, -1, 1);
    struct pt kk = pt_cols(&kv, 0, inner), vv = pt_cols(&kv, inner, inner);
    struct bs_attn_params pg = {.batch = n,
                                .lq = r.max_lq,
                                .lk = r.max_lk,
                                .heads = heads,
                                .head_dim = hd,
                                .scale = 1.0f / sqrtf((float)hd),
                                .q_off = r.q_off,
                                .k_off = r.k_off};
    if (mk != MASK_NONE) {
        pt_new(e, &mask, 1, &r.mask_len, -2, 0);
        ragged_mask_fill(&r, mask.c.data);
        pt_upload(e, &mask);
        pg.mask = &mask.g;
        pg.m_off = r.m_off;
        pg.mask_per_query = r.per_query;
    }
    struct bs_err err = {0};
    if (GPU->attention(GC, &o.g, &q.g, &kk.g, &vv.g, &pg, &err) != 0)
        die("attention (ragged)", &err);
    for (int b = 0; b < n; b++)
        ragged_check_sample(e, &r, b, &q, &kk, &vv, &o, mk != MASK_NONE ? &mask : NULL);
    pt_free(e, &q), pt_free(e, &kv), pt_free(e, &o);
    if (mk != MASK_NONE)
        pt_free(e, &mask);
}

/* Mixed lengths: one query, several query and key tiles of attn_mma (64)
 * and attn_f32 (16), a sample without keys; each padded head dim, attn_f32's
 * above 160, and 8-warp blocks (2048 queries and more). */
static void test_attention_ragged(struct env *e)
{
    static const int hds[] = {40, 64, 72, 80, 128, 160, 200, 30};
    for (size_t i = 0; i < BS_ARRAY_LEN(hds); i++) {
        attn_ragged_case(e, 4, (int64_t[]){1, 130, 65, 7}, (int64_t[]){77, 0, 200, 1}, 2, hds[i],
                         (enum mask_kind)(1 + i % 4));
        attn_ragged_case(e, 3, (int64_t[]){40, 1, 129}, (int64_t[]){130, 65, 3}, 1, hds[i],
                         (enum mask_kind)(i % 5));
    }
    attn_ragged_case(e, 3, (int64_t[]){2100, 3, 700}, (int64_t[]){2100, 77, 0}, 2, 64, MASK_KEYS);
    attn_ragged_case(e, 2, (int64_t[]){5, 2100}, (int64_t[]){300, 77}, 2, 80, RULE_FULL);
}

/* ---- narrow activations (BF16, F16) ------------------------------------------------ */

/* A tensor of dtype dt on the GPU with its F32 twin on the CPU side, which
 * holds the values dt holds (random values rounded through dt): the CPU
 * backend's F32 op on it, rounded once to the output's dtype (npt_expect),
 * is the reference of engine/backend.h for an op on narrow activations. */
struct npt {
    struct bs_tensor c, g;
    enum bs_dtype dt;
    size_t n; /* elements of the whole buffer */
};

static void round_through(float *v, size_t n, enum bs_dtype dt)
{
    if (dt == BS_TYPE_F32 || n == 0)
        return;
    uint16_t *h = malloc(n * sizeof(uint16_t));
    if (h == NULL)
        die("malloc", NULL);
    bs_convert_from_f32(h, dt, v, (int64_t)n);
    bs_convert_to_f32(v, h, dt, (int64_t)n);
    free(h);
}

static void npt_upload(struct env *e, struct npt *t)
{
    struct bs_err err = {0};
    size_t bytes = t->n * bs_dtype_size(t->dt);
    void *h = malloc(bytes ? bytes : 4);
    if (h == NULL)
        die("malloc", NULL);
    bs_convert_from_f32(h, t->dt, t->c.data, (int64_t)t->n);
    if (GPU->copy_in(GC, t->g.data, h, bytes, &err) != 0)
        die("copy_in", &err);
    free(h);
}

static void npt_new(struct env *e, struct npt *t, enum bs_dtype dt, int n_dims, const int64_t *ne,
                    float lo, float hi)
{
    t->dt = dt;
    t->c = bs_tensor_make(BS_TYPE_F32, n_dims, ne, NULL);
    t->g = bs_tensor_make(dt, n_dims, ne, NULL);
    t->n = (size_t)bs_tensor_nelements(&t->c);
    t->c.data = CPU->buf_alloc(CC, t->n * sizeof(float) + 4);
    t->g.data = GPU->buf_alloc(GC, t->n * bs_dtype_size(dt) + 4);
    if (t->c.data == NULL || t->g.data == NULL)
        die("buf_alloc", NULL);
    float *p = t->c.data;
    for (size_t i = 0; i < t->n; i++)
        p[i] = frand(lo, hi);
    round_through(p, t->n, dt);
    npt_upload(e, t);
}

static struct npt npt_cols(const struct npt *t, int64_t c0, int64_t n)
{
    struct npt v = *t;
    v.c = bs_tensor_view_cols(&t->c, c0, n);
    v.g = bs_tensor_view_cols(&t->g, c0, n);
    return v;
}

static void npt_free(struct env *e, struct npt *t)
{
    CPU->buf_free(CC, t->c.data);
    GPU->buf_free(GC, t->g.data);
}

/* An upper bound of one ulp of dt at x (0 for F32). */
static double ulp_dt(enum bs_dtype dt, double x)
{
    x = fabs(x);
    if (dt == BS_TYPE_BF16)
        return fmax(x * 0x1p-7, 0x1p-133);
    if (dt == BS_TYPE_F16)
        return fmax(x * 0x1p-10, 0x1p-24);
    return 0.0;
}

/* The whole GPU buffer of t, widened, against its CPU side rounded to t->dt:
 * per element within atol + rtol |want| + 1 ulp of t->dt (the GPU's FP32
 * result and the CPU's may straddle a rounding boundary); atol scales with
 * rms(want) when rms. */
static void npt_expect(struct env *e, const char *name, const struct npt *t, double atol,
                       double rtol, bool rms)
{
    struct bs_err err = {0};
    size_t es = bs_dtype_size(t->dt), n = t->n;
    void *h = malloc(n * es + 4);
    float *got = malloc(n * sizeof(float) + 4), *want = malloc(n * sizeof(float) + 4);
    if (h == NULL || got == NULL || want == NULL)
        die("malloc", NULL);
    if (GPU->copy_out(GC, h, t->g.data, n * es, &err) != 0)
        die(name, &err);
    bs_convert_to_f32(got, h, t->dt, (int64_t)n);
    memcpy(want, t->c.data, n * sizeof(float));
    round_through(want, n, t->dt);
    if (rms) {
        double ss = 0;
        for (size_t i = 0; i < n; i++)
            ss += (double)want[i] * want[i];
        atol *= n ? sqrt(ss / (double)n) : 1.0;
    }
    double worst = 0, max_abs = 0;
    size_t inexact = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        inexact += d != 0;
        double r = d == 0 ? 0 : d / (atol + rtol * fabs((double)want[i]) + ulp_dt(t->dt, want[i]));
        if (!(r <= worst))
            worst = isnan(r) ? INFINITY : r;
        if (d > max_abs || isnan(d))
            max_abs = d;
    }
    e->checks++;
    bool ok = worst <= 1.0;
    if (!ok)
        e->failures++;
    printf("%s %-44s max abs err %.3g (%.2f of tolerance), %zu of %zu not bit-exact\n",
           ok ? "ok  " : "FAIL", name, max_abs, worst, inexact, n);
    free(h);
    free(got);
    free(want);
}

static const enum bs_dtype act_dts[] = {BS_TYPE_F32, BS_TYPE_BF16, BS_TYPE_F16};

/* act, glu and add on every (input, output) dtype pair the contract allows
 * (not F32 to F32: test_act_glu), transpose in BF16 and F16 (bit for bit:
 * atol 0). */
static void test_narrow_ew(struct env *e)
{
    char name[128];
    int k = 0;
    for (size_t i = 0; i < BS_ARRAY_LEN(act_dts); i++)
        for (size_t j = 0; j < BS_ARRAY_LEN(act_dts); j++, k++) {
            enum bs_dtype tx = act_dts[i], ty = act_dts[j];
            if (tx == BS_TYPE_F32 && ty == BS_TYPE_F32)
                continue;
            int a = k % BS_ACT_COUNT;
            struct npt x, y, g, h, ay, ax;
            struct pt gate;
            npt_new(e, &x, tx, 2, (int64_t[]){100, 300}, -8, 8);
            npt_new(e, &y, ty, 2, (int64_t[]){100, 310}, -1, 1);
            struct npt xv = npt_cols(&x, 0, 257), yv = npt_cols(&y, 3, 257);
            BOTH("act", CPU->act(CC, &yv.c, &xv.c, (enum bs_act)a, &ec_),
                 GPU->act(GC, &yv.g, &xv.g, (enum bs_act)a, &eg_));
            snprintf(name, sizeof(name), "act %s %s -> %s, views", act_names[a], bs_dtype_name(tx),
                     bs_dtype_name(ty));
            npt_expect(e, name, &y, 1e-5, 1e-5, false);

            npt_new(e, &g, tx, 2, (int64_t[]){64, 600}, -6, 6);
            npt_new(e, &h, ty, 2, (int64_t[]){64, 300}, -1, 1);
            BOTH("glu", CPU->glu(CC, &h.c, &g.c, (enum bs_act)a, &ec_),
                 GPU->glu(GC, &h.g, &g.g, (enum bs_act)a, &eg_));
            snprintf(name, sizeof(name), "glu %s %s -> %s", act_names[a], bs_dtype_name(tx),
                     bs_dtype_name(ty));
            npt_expect(e, name, &h, 1e-5, 1e-5, false);

            npt_new(e, &ax, tx, 2, (int64_t[]){120, 200}, -1, 1);
            npt_new(e, &ay, ty, 2, (int64_t[]){120, 200}, -1, 1);
            pt_new(e, &gate, 2, (int64_t[]){3, 200}, -2, 2);
            BOTH("add",
                 CPU->add(CC, &ay.c, &ax.c, k % 2 ? &gate.c : NULL, 40, k % 3 ? 1.0f : 0.5f, &ec_),
                 GPU->add(GC, &ay.g, &ax.g, k % 2 ? &gate.g : NULL, 40, k % 3 ? 1.0f : 0.5f, &eg_));
            snprintf(name, sizeof(name), "add %s -> %s%s", bs_dtype_name(tx), bs_dtype_name(ty),
                     k % 2 ? ", gate per sample" : "");
            npt_expect(e, name, &ay, 1e-5, 1e-5, false);
            struct npt *all[] = {&x, &y, &g, &h, &ax, &ay};
            for (size_t m = 0; m < BS_ARRAY_LEN(all); m++)
                npt_free(e, all[m]);
            pt_free(e, &gate);
        }
    for (size_t i = 1; i < BS_ARRAY_LEN(act_dts); i++) {
        struct npt t, tt;
        npt_new(e, &t, act_dts[i], 3, (int64_t[]){3, 70, 45}, -1, 1);
        npt_new(e, &tt, act_dts[i], 3, (int64_t[]){3, 45, 70}, -1, 1);
        BOTH("transpose", CPU->transpose(CC, &tt.c, &t.c, &ec_),
             GPU->transpose(GC, &tt.g, &t.g, &eg_));
        snprintf(name, sizeof(name), "transpose %s [3,70,45] (bit for bit)",
                 bs_dtype_name(act_dts[i]));
        npt_expect(e, name, &tt, 0, 0, false);
        npt_free(e, &t);
        npt_free(e, &tt);
    }
}

/* Attention with q, k, v of qt and o of ot: q alone and k, v column views
 * of one kv tensor; off 1 starts every view one column in (rows and heads
 * not 16-byte aligned: the conversion pass); fused: q, k, v from one QKV.
 * unfused: the baseline too. */
static void attn_narrow_case(struct env *e, int64_t batch, int64_t lq, int64_t lk, int heads,
                             int hd, enum mask_kind mk, bool fused, int off, enum bs_dtype qt,
                             enum bs_dtype ot, bs_proc_attention_unfused_fn unfused)
{
    int64_t inner = (int64_t)heads * hd;
    struct npt qkv, q, kv, o, qv, kk, vv;
    struct pt mask;
    if (fused) {
        npt_new(e, &qkv, qt, 2, (int64_t[]){batch * lq, 3 * inner}, -1, 1);
        qv = npt_cols(&qkv, 0, inner);
        kk = npt_cols(&qkv, inner, inner);
        vv = npt_cols(&qkv, 2 * inner, inner);
    } else {
        npt_new(e, &q, qt, 2, (int64_t[]){batch * lq, inner + off}, -1, 1);
        npt_new(e, &kv, qt, 2, (int64_t[]){batch * lk, 2 * inner + off}, -1, 1);
        qv = npt_cols(&q, off, inner);
        kk = npt_cols(&kv, off, inner);
        vv = npt_cols(&kv, off + inner, inner);
    }
    npt_new(e, &o, ot, 2, (int64_t[]){batch * lq, inner}, -1, 1);
    struct bs_attn_params pc = {.batch = batch,
                                .lq = lq,
                                .lk = lk,
                                .heads = heads,
                                .head_dim = hd,
                                .scale = 1.0f / sqrtf((float)hd),
                                .compute = BS_TYPE_F32};
    struct bs_attn_params pg = pc;
    if (mk != MASK_NONE) {
        int64_t mq = mk == MASK_KEYS || mk == RULE_KEYS ? 1 : lq;
        pt_new(e, &mask, 3, (int64_t[]){batch, mq, lk}, -2, 0);
        float *m = mask.c.data;
        for (int64_t i = 0; i < batch * mq * lk; i++)
            if (mk >= RULE_KEYS)
                m[i] = rule_value(i / lk, i % lk, lk);
            else if (frand(0, 1) < 0.2f)
                m[i] = MASK_DROP;
        pt_upload(e, &mask);
        pc.mask = &mask.c;
        pg.mask = &mask.g;
    }
    BOTH("attention", CPU->attention(CC, &o.c, &qv.c, &kk.c, &vv.c, &pc, &ec_),
         GPU->attention(GC, &o.g, &qv.g, &kk.g, &vv.g, &pg, &eg_));
    char name[160];
    snprintf(name, sizeof(name), "attention q,k,v %s o %s B%lld Lq%lld Lk%lld %dx%d%s%s",
             bs_dtype_name(qt), bs_dtype_name(ot), (long long)batch, (long long)lq, (long long)lk,
             heads, hd, fused ? " qkv" : "", off ? " unaligned" : "");
    npt_expect(e, name, &o, e->mm_tol, e->mm_tol, e->mm_rms);
    if (unfused != NULL) {
        BOTH("attention (unfused)", 0, unfused(&e->gpu, &o.g, &qv.g, &kk.g, &vv.g, &pg, &eg_));
        snprintf(name, sizeof(name), "attention (unfused) q,k,v %s o %s Lq%lld %dx%d",
                 bs_dtype_name(qt), bs_dtype_name(ot), (long long)lq, heads, hd);
        npt_expect(e, name, &o, e->mm_tol, e->mm_tol, e->mm_rms);
    }
    if (fused) {
        npt_free(e, &qkv);
    } else {
        npt_free(e, &q);
        npt_free(e, &kv);
    }
    npt_free(e, &o);
    if (mk != MASK_NONE)
        pt_free(e, &mask);
}

static void test_narrow_attention(struct env *e)
{
    static const struct {
        enum bs_dtype qt, ot;
    } pairs[] = {{BS_TYPE_BF16, BS_TYPE_BF16}, {BS_TYPE_F16, BS_TYPE_F16},
                 {BS_TYPE_BF16, BS_TYPE_F32},  {BS_TYPE_F32, BS_TYPE_BF16},
                 {BS_TYPE_F16, BS_TYPE_BF16},  {BS_TYPE_BF16, BS_TYPE_F16}};
    bs_proc_attention_unfused_fn fn;
    *(void **)&fn = bs_backend_get_proc_address(&e->gpu, BS_PROC_ATTENTION_UNFUSED);
    for (size_t i = 0; i < BS_ARRAY_LEN(pairs); i++) {
        enum bs_dtype qt = pairs[i].qt, ot = pairs[i].ot;
        attn_narrow_case(e, 2, 100, 100, 2, 64, MASK_NONE, true, 0, qt, ot, NULL);
        attn_narrow_case(e, 2, 70, 130, 2, 64, MASK_FULL, false, 0, qt, ot, fn);
        attn_narrow_case(e, 1, 65, 77, 2, 40, RULE_KEYS, false, 1, qt, ot, NULL);
        attn_narrow_case(e, 1, 2100, 77, 2, 80, MASK_KEYS, false, 0, qt, ot, NULL); /* 8 warps */
        attn_narrow_case(e, 1, 40, 50, 1, 200, RULE_FULL, false, 0, qt, ot, NULL);  /* attn_f32 */
    }
}

/* A ragged batch with q, k, v of qt and o of ot: the CPU twin on each sample
 * alone (F32 on the values qt holds) into o's CPU side, then the whole of o
 * against it rounded to ot (npt_expect, rms over the batch). */
static void attn_narrow_ragged_case(struct env *e, int n, const int64_t *lq, const int64_t *lk,
                                    int heads, int hd, enum mask_kind mk, enum bs_dtype qt,
                                    enum bs_dtype ot)
{
    struct ragged r = {.n = n, .heads = heads, .hd = hd, .lq = lq, .lk = lk, .mk = mk};
    ragged_offsets(&r);
    int64_t inner = (int64_t)heads * hd;
    struct npt q, kv, o;
    struct pt mask;
    npt_new(e, &q, qt, 2, (int64_t[]){r.q_off[n], inner}, -1, 1);
    npt_new(e, &kv, qt, 2, (int64_t[]){r.k_off[n], 2 * inner}, -1, 1);
    npt_new(e, &o, ot, 2, (int64_t[]){r.q_off[n], inner}, -1, 1);
    struct npt kk = npt_cols(&kv, 0, inner), vv = npt_cols(&kv, inner, inner);
    struct bs_attn_params pg = {.batch = n,
                                .lq = r.max_lq,
                                .lk = r.max_lk,
                                .heads = heads,
                                .head_dim = hd,
                                .scale = 1.0f / sqrtf((float)hd),
                                .q_off = r.q_off,
                                .k_off = r.k_off};
    if (mk != MASK_NONE) {
        pt_new(e, &mask, 1, &r.mask_len, -2, 0);
        ragged_mask_fill(&r, mask.c.data);
        pt_upload(e, &mask);
        pg.mask = &mask.g;
        pg.m_off = r.m_off;
        pg.mask_per_query = r.per_query;
    }
    struct bs_err err = {0};
    if (GPU->attention(GC, &o.g, &q.g, &kk.g, &vv.g, &pg, &err) != 0)
        die("attention (ragged, narrow)", &err);
    for (int b = 0; b < n; b++) {
        struct bs_tensor ob = bs_tensor_view_outer(&o.c, r.q_off[b], lq[b]);
        struct bs_tensor qb = bs_tensor_view_outer(&q.c, r.q_off[b], lq[b]);
        struct bs_tensor kb = bs_tensor_view_outer(&kk.c, r.k_off[b], lk[b]);
        struct bs_tensor vb = bs_tensor_view_outer(&vv.c, r.k_off[b], lk[b]);
        struct bs_tensor mb =
            bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, r.per_query ? lq[b] : 1, lk[b]},
                           mk != MASK_NONE ? (float *)mask.c.data + r.m_off[b] : NULL);
        struct bs_attn_params pc = {.batch = 1,
                                    .lq = lq[b],
                                    .lk = lk[b],
                                    .heads = heads,
                                    .head_dim = hd,
                                    .scale = pg.scale,
                                    .mask = mk != MASK_NONE && lk[b] > 0 ? &mb : NULL};
        if (CPU->attention(CC, &ob, &qb, &kb, &vb, &pc, &err) != 0)
            die("attention (a ragged batch's sample, cpu)", &err);
    }
    char name[128];
    snprintf(name, sizeof(name), "attention ragged q,k,v %s o %s B%d %dx%d", bs_dtype_name(qt),
             bs_dtype_name(ot), n, heads, hd);
    npt_expect(e, name, &o, e->mm_tol, e->mm_tol, e->mm_rms);
    npt_free(e, &q), npt_free(e, &kv), npt_free(e, &o);
    if (mk != MASK_NONE)
        pt_free(e, &mask);
}

static void test_narrow_ragged(struct env *e)
{
    attn_narrow_ragged_case(e, 4, (int64_t[]){1, 130, 65, 7}, (int64_t[]){77, 0, 200, 1}, 2, 64,
                            RULE_FULL, BS_TYPE_BF16, BS_TYPE_BF16);
    attn_narrow_ragged_case(e, 3, (int64_t[]){40, 1, 129}, (int64_t[]){130, 65, 3}, 1, 40,
                            MASK_KEYS, BS_TYPE_F16, BS_TYPE_F16);
    attn_narrow_ragged_case(e, 3, (int64_t[]){2100, 3, 700}, (int64_t[]){2100, 77, 0}, 2, 64,
                            MASK_KEYS, BS_TYPE_BF16, BS_TYPE_F32);
    attn_narrow_ragged_case(e, 2, (int64_t[]){17, 5}, (int64_t[]){30, 3}, 1, 200, RULE_KEYS,
                            BS_TYPE_F16, BS_TYPE_BF16);
}

/* ---- fp16 overflow ---------------------------------------------------------- */

/* rc and err of a copy_out of t after an op whose operand overflowed: BS_ERANGE
 * with "fp16 overflow"; the copy after it succeeds (the flag is cleared). */
static void expect_overflow(struct env *e, const char *name, const struct pt *t)
{
    struct bs_err err = {0};
    float *got = malloc(t->bytes);
    if (got == NULL)
        die("malloc", NULL);
    int rc = GPU->copy_out(GC, got, t->g.data, t->bytes, &err);
    struct bs_err err2 = {0};
    int rc2 = GPU->copy_out(GC, got, t->g.data, t->bytes, &err2);
    bool ok = rc == BS_ERANGE && strstr(err.msg, "fp16 overflow") != NULL && rc2 == 0;
    e->checks++;
    e->failures += !ok;
    printf("%s %s: copy_out %d \"%.80s\", then %d\n", ok ? "ok  " : "FAIL", name, rc, err.msg, rc2);
    free(got);
}

static void test_overflow(struct env *e)
{
    struct weights w;
    struct pt x, y, q, o;
    weights_new(e, &w, 64, 32, true);
    pt_new(e, &x, 2, (int64_t[]){8, 32}, -1, 1);
    pt_new(e, &y, 2, (int64_t[]){8, 64}, -1, 1);
    ((float *)x.c.data)[37] = 70000.0f; /* beyond 65504 */
    pt_upload(e, &x);
    struct bs_err err = {0};
    if (GPU->linear(GC, &y.g, &x.g, &w.wg, &w.bg, 0.0f, &err) != 0)
        die("linear", &err);
    expect_overflow(e, "fp16 overflow in linear's x", &y);
    pt_new(e, &q, 2, (int64_t[]){2 * 20, 64}, -1, 1);
    pt_new(e, &o, 2, (int64_t[]){2 * 20, 64}, -1, 1);
    ((float *)q.c.data)[100] = -1e5f;
    pt_upload(e, &q);
    struct bs_attn_params p = {
        .batch = 2, .lq = 20, .lk = 20, .heads = 1, .head_dim = 64, .scale = 0.125f};
    if (GPU->attention(GC, &o.g, &q.g, &q.g, &q.g, &p, &err) != 0)
        die("attention", &err);
    expect_overflow(e, "fp16 overflow in attention's q", &o);
    struct pt *all[] = {&x, &y, &q, &o, &w.buf};
    for (size_t i = 0; i < BS_ARRAY_LEN(all); i++)
        pt_free(e, all[i]);
}

/* ---- threads ----------------------------------------------------------------- */

/* Three threads, each with its own x and y, run linear then attention (y as
 * q, k and v) 10 times on the GPU at once, each on its own stream (and
 * scratch); each result must match the CPU's, computed here first. */
struct worker {
    struct env *e;
    struct weights *w;
    struct pt x, y, o;
    struct bs_attn_params p;
    float *got;
    int rc;
    struct bs_err err;
};

static void *worker_main(void *arg)
{
    struct worker *k = arg;
    struct env *e = k->e;
    for (int it = 0; it < 10 && k->rc == 0; it++) {
        k->rc = GPU->linear(GC, &k->y.g, &k->x.g, &k->w->wg, &k->w->bg, 0.0f, &k->err);
        if (k->rc == 0)
            k->rc = GPU->attention(GC, &k->o.g, &k->y.g, &k->y.g, &k->y.g, &k->p, &k->err);
        if (k->rc == 0)
            k->rc = GPU->copy_out(GC, k->got, k->o.g.data, k->o.bytes, &k->err);
    }
    return NULL;
}

static void test_threads(struct env *e)
{
    enum { N = 3 };
    struct weights w;
    struct worker ks[N];
    pthread_t tid[N];
    weights_new(e, &w, 128, 96, true);
    for (int i = 0; i < N; i++) {
        struct worker *k = &ks[i];
        memset(k, 0, sizeof(*k));
        k->e = e, k->w = &w;
        int64_t l = 300 + 50 * i; /* B 1, L tokens, 2 heads x 64 */
        pt_new(e, &k->x, 2, (int64_t[]){l, 96}, -1, 1);
        pt_new(e, &k->y, 2, (int64_t[]){l, 128}, -1, 1);
        pt_new(e, &k->o, 2, (int64_t[]){l, 128}, -1, 1);
        k->p = (struct bs_attn_params){
            .batch = 1, .lq = l, .lk = l, .heads = 2, .head_dim = 64, .scale = 0.125f};
        struct bs_err err = {0};
        if (CPU->linear(CC, &k->y.c, &k->x.c, &w.wc, &w.bc, 0.0f, &err) != 0 ||
            CPU->attention(CC, &k->o.c, &k->y.c, &k->y.c, &k->y.c, &k->p, &err) != 0)
            die("cpu", &err);
        k->got = malloc(k->o.bytes);
        if (k->got == NULL)
            die("malloc", NULL);
    }
    for (int i = 0; i < N; i++)
        if (pthread_create(&tid[i], NULL, worker_main, &ks[i]) != 0)
            die("pthread_create", NULL);
    for (int i = 0; i < N; i++)
        pthread_join(tid[i], NULL);
    for (int i = 0; i < N; i++) {
        struct worker *k = &ks[i];
        char name[64];
        snprintf(name, sizeof(name), "thread %d: linear + attention, 10 times", i);
        if (k->rc != 0)
            die(name, &k->err);
        expect_mm(e, name, &k->o); /* o.g holds the thread's last result */
        free(k->got);
        pt_free(e, &k->x), pt_free(e, &k->y), pt_free(e, &k->o);
    }
    pt_free(e, &w.buf);
}

/* ---- copies and the GPU timer ------------------------------------------- */

#define GUARD 64

static void expect_true(struct env *e, const char *name, bool ok)
{
    e->checks++;
    if (!ok) {
        printf("FAIL %s\n", name);
        e->failures++;
    }
}

/* size bytes up at device offset doff from host offset 3, then down again
 * into a fresh buffer at host offset 5; the guard bytes stay as they were. */
static void copy_round_trip(struct env *e, size_t size, size_t doff)
{
    char name[640];
    struct bs_err err = {0};
    unsigned char *src = malloc(size + GUARD), *dst = malloc(size + GUARD);
    unsigned char *dev = e->gpu.iface->buf_alloc(e->gpu.ctx, size + doff + GUARD);
    if (src == NULL || dst == NULL || dev == NULL)
        die("copy round trip: out of memory", NULL);
    for (size_t i = 0; i < size + GUARD; i++)
        src[i] = (unsigned char)(i * 167 + 11);
    memset(dst, 0xa5, size + GUARD);
    int rc = e->gpu.iface->copy_in(e->gpu.ctx, dev + doff, src + 3, size, &err);
    if (rc == 0)
        rc = e->gpu.iface->copy_out(e->gpu.ctx, dst + 5, dev + doff, size, &err);
    snprintf(name, sizeof(name), "copy round trip %zu bytes (device offset %zu): %s", size, doff,
             rc ? err.msg : "ok");
    bool ok = rc == 0 && memcmp(dst + 5, src + 3, size) == 0;
    for (size_t i = 0; i < 5; i++)
        ok = ok && dst[i] == 0xa5;
    for (size_t i = size + 5; i < size + GUARD; i++)
        ok = ok && dst[i] == 0xa5;
    expect_true(e, name, ok);
    e->gpu.iface->buf_free(e->gpu.ctx, dev);
    free(src);
    free(dst);
}

static void test_copies(struct env *e)
{
    const size_t c = BS_CUDA_XFER_CHUNK;
    const size_t sizes[] = {0, 1, c - 1, c, c + 1, 2 * c, 3 * c + 13};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        copy_round_trip(e, sizes[i], 0);
        copy_round_trip(e, sizes[i], 7);
    }
}

/* The copies' bandwidth, for the log: bytes each way within the timer. */
static void print_bandwidth(struct env *e, const struct bs_backend_gpu_timer *t, size_t bytes)
{
    struct bs_err err = {0};
    struct bs_gpu_time up = {0}, down = {0};
    void *h = calloc(1, bytes), *d = e->gpu.iface->buf_alloc(e->gpu.ctx, bytes);
    int rc = h && d ? 0 : bs_err_set(&err, BS_ENOMEM, "out of memory");
    if (rc == 0 && (rc = t->start(&e->gpu, &err)) == 0 &&
        (rc = e->gpu.iface->copy_in(e->gpu.ctx, d, h, bytes, &err)) == 0)
        rc = t->stop(&e->gpu, &up, &err);
    if (rc == 0 && (rc = t->start(&e->gpu, &err)) == 0 &&
        (rc = e->gpu.iface->copy_out(e->gpu.ctx, h, d, bytes, &err)) == 0)
        rc = t->stop(&e->gpu, &down, &err);
    expect_true(e, "copies of 256 MiB under the timer", rc == 0);
    if (rc == 0)
        printf("copy_in %zu MiB: %.2f ms on the stream, %.1f GB/s; copy_out: %.2f ms, %.1f GB/s\n",
               bytes >> 20, up.transfer_ms, bytes / (up.transfer_ms * 1e6), down.transfer_ms,
               bytes / (down.transfer_ms * 1e6));
    if (d)
        e->gpu.iface->buf_free(e->gpu.ctx, d);
    free(h);
}

static void test_gpu_timer(struct env *e)
{
    struct bs_err err = {0};
    bs_proc_gpu_timer_fn fn;
    *(void **)&fn = bs_backend_get_proc_address(&e->gpu, BS_PROC_GPU_TIMER);
    expect_true(e, "the cuda backend has " BS_PROC_GPU_TIMER, fn != NULL);
    if (fn == NULL)
        return;
    const struct bs_backend_gpu_timer *t = fn();
    const size_t bytes = 3 * (size_t)BS_CUDA_XFER_CHUNK + 13;
    unsigned char *h = calloc(1, bytes), *d = e->gpu.iface->buf_alloc(e->gpu.ctx, bytes);
    struct bs_gpu_time gt = {0};
    struct weights w;
    struct pt x, y;
    weights_new(e, &w, 1024, 1024, true);
    pt_new(e, &x, 2, (int64_t[]){2048, 1024}, -1, 1);
    pt_new(e, &y, 2, (int64_t[]){2048, 1024}, -1, 1);
    int rc = h && d ? t->start(&e->gpu, &err) : BS_ENOMEM;
    if (rc == 0 && (rc = e->gpu.iface->copy_in(e->gpu.ctx, d, h, bytes, &err)) == 0 &&
        (rc = GPU->linear(GC, &y.g, &x.g, &w.wg, NULL, 0.0f, &err)) == 0 &&
        (rc = e->gpu.iface->copy_out(e->gpu.ctx, h, d, bytes, &err)) == 0)
        rc = t->stop(&e->gpu, &gt, &err);
    printf("timer: total %.3f ms, transfers %.3f ms (%d, %llu bytes): %s\n", gt.total_ms,
           gt.transfer_ms, gt.transfers, (unsigned long long)gt.transfer_bytes,
           rc ? err.msg : "ok");
    expect_true(e, "timer: copies counted with their bytes",
                rc == 0 && gt.transfers == 2 && gt.transfer_bytes == 2 * bytes);
    expect_true(e, "timer: 0 < transfers < total (the GEMM between them)",
                rc == 0 && gt.transfer_ms > 0 && gt.transfer_ms < gt.total_ms);
    err = (struct bs_err){0};
    expect_true(e, "timer: a second stop fails", t->stop(&e->gpu, &gt, &err) == BS_EINVAL);
    /* kernels alone: no copies counted, a positive time */
    rc = t->start(&e->gpu, &err);
    for (int i = 0; rc == 0 && i < 4; i++)
        rc = GPU->linear(GC, &y.g, &x.g, &w.wg, NULL, 0.0f, &err);
    if (rc == 0)
        rc = t->stop(&e->gpu, &gt, &err);
    expect_true(e, "timer: 4 GEMMs, no copies",
                rc == 0 && gt.transfers == 0 && gt.transfer_ms == 0 && gt.total_ms > 0);
    print_bandwidth(e, t, (size_t)256 << 20);
    pt_free(e, &x);
    pt_free(e, &y);
    pt_free(e, &w.buf);
    e->gpu.iface->buf_free(e->gpu.ctx, d);
    free(h);
}

/* ---- launch graphs (graph_*) ----------------------------------------------- */

/* The captured sequence: y = gelu(x w^T + b); z += y; r = table[idx] (3
 * rows), on the GPU side of the tensors; r through graph_rows when slot is
 * set (capturing), else get_rows with idx. */
struct gseq {
    struct weights w;
    struct pt x, table;
};

static int gseq_ops(struct env *e, struct gseq *s, struct pt *y, struct pt *z, struct pt *r,
                    const int64_t *idx, int64_t **slot, struct bs_err *err)
{
    int rc;
    if ((rc = GPU->linear(GC, &y->g, &s->x.g, &s->w.wg, &s->w.bg, 0.0f, err)) != 0 ||
        (rc = GPU->act(GC, &y->g, &y->g, BS_ACT_GELU, err)) != 0 ||
        (rc = GPU->add(GC, &z->g, &y->g, NULL, 1, 1.0f, err)) != 0)
        return rc;
    if (slot != NULL)
        return GPU->graph_rows(GC, &r->g, &s->table.g, 3, slot, err);
    return GPU->get_rows(GC, &r->g, &s->table.g, idx, 3, err);
}

/* The GPU sides of a and b hold the same bytes. */
static void expect_same(struct env *e, const char *name, const struct pt *a, const struct pt *b)
{
    struct bs_err err = {0};
    char *ha = malloc(a->bytes), *hb = malloc(b->bytes);
    if (ha == NULL || hb == NULL)
        die("malloc", NULL);
    if (GPU->copy_out(GC, ha, a->g.data, a->bytes, &err) != 0 ||
        GPU->copy_out(GC, hb, b->g.data, b->bytes, &err) != 0)
        die(name, &err);
    expect_true(e, name, a->bytes == b->bytes && memcmp(ha, hb, a->bytes) == 0);
    free(ha);
    free(hb);
}

/* New x values and the same z on both sides (graph's and eager's). */
static void gseq_inputs(struct env *e, struct gseq *s, struct pt *zg, struct pt *ze)
{
    float *x = s->x.c.data, *z = zg->c.data;
    for (size_t i = 0; i < s->x.bytes / sizeof(float); i++)
        x[i] = frand(-1, 1);
    for (size_t i = 0; i < zg->bytes / sizeof(float); i++)
        z[i] = frand(-1, 1);
    memcpy(ze->c.data, z, zg->bytes);
    pt_upload(e, &s->x);
    pt_upload(e, zg);
    pt_upload(e, ze);
}

/* A fresh thread (scratch 0): a capture whose op would grow the scratch
 * fails cleanly (BS_EUNSUPP), graph_end discards it, and then the same op
 * runs eagerly, grows the scratch (the epoch moves) and is right. */
struct gthread {
    struct env *e;
    struct pt *x, *y;
    int op_rc, end_rc, eager_rc, drain_rc;
    uint64_t ep0, ep1, ep2;
    struct bs_err err;
};

static void *gthread_main(void *arg)
{
    struct gthread *a = arg;
    struct env *e = a->e;
    struct bs_err err = {0};
    struct bs_backend_graph *g = NULL;
    struct bs_norm_params p = {1e-5f, NULL, NULL, NULL, NULL, 0, 8};
    a->ep0 = GPU->graph_epoch(GC);
    if (GPU->graph_begin(GC, &a->err) != 0) {
        a->op_rc = -1000;
        return NULL;
    }
    a->op_rc = GPU->group_norm(GC, &a->y->g, &a->x->g, &p, &a->err);
    a->end_rc = GPU->graph_end(GC, false, &g, &err);
    a->ep1 = GPU->graph_epoch(GC);
    a->eager_rc = GPU->group_norm(GC, &a->y->g, &a->x->g, &p, &err);
    a->drain_rc = GPU->copy_out(GC, NULL, NULL, 0, &err);
    a->ep2 = GPU->graph_epoch(GC);
    return NULL;
}

static void test_graph_scratch(struct env *e)
{
    struct pt x, y;
    pt_new(e, &x, 3, (int64_t[]){2, 64, 256}, -2, 3);
    pt_new(e, &y, 3, (int64_t[]){2, 64, 256}, -1, 1);
    struct gthread a = {.e = e, .x = &x, .y = &y};
    pthread_t tid;
    if (pthread_create(&tid, NULL, gthread_main, &a) != 0)
        die("pthread_create", NULL);
    pthread_join(tid, NULL);
    printf("graph: capture needing scratch: %s\n", a.err.msg);
    expect_true(e, "graph: an op that would grow the scratch fails in a capture (EUNSUPP)",
                a.op_rc == BS_EUNSUPP &&
                    strstr(a.err.msg, "cannot run while a graph is being captured") != NULL);
    expect_true(e, "graph: graph_end after the failed op", a.end_rc == 0);
    expect_true(e, "graph: the stream works after the failed capture",
                a.eager_rc == 0 && a.drain_rc == 0);
    expect_true(e, "graph: no epoch change from the refused growth", a.ep1 == a.ep0);
    expect_true(e, "graph: the scratch's growth moves the epoch", a.ep2 > a.ep1);
    struct bs_err ec = {0};
    struct bs_norm_params p = {1e-5f, NULL, NULL, NULL, NULL, 0, 8};
    if (CPU->group_norm(CC, &y.c, &x.c, &p, &ec) != 0)
        die("group_norm", &ec);
    expect_ew(e, "graph: group_norm after the failed capture", &y);
    pt_free(e, &x);
    pt_free(e, &y);
}

/* A small sequence captured once and launched three times with other
 * indices and new data in the same buffers: bit for bit the same as the
 * ops run eagerly into other buffers; then two launches and a graph_free
 * while they may still run. Self-check (no graph ops): the "graph" side
 * runs the ops eagerly, so the harness's comparisons run too. */
static void test_graphs(struct env *e)
{
    struct gseq s;
    struct pt yg, zg, rg, ye, ze, re;
    struct bs_err err = {0};
    bool has = GPU->graph_begin != NULL;
    int checks0 = e->checks, failures0 = e->failures;
    weights_new(e, &s.w, 96, 64, true);
    pt_new(e, &s.x, 2, (int64_t[]){8, 64}, -1, 1);
    pt_new(e, &s.table, 2, (int64_t[]){16, 96}, -3, 3);
    pt_new(e, &yg, 2, (int64_t[]){8, 96}, -1, 1);
    pt_new(e, &zg, 2, (int64_t[]){8, 96}, -1, 1);
    pt_new(e, &rg, 2, (int64_t[]){3, 96}, -1, 1);
    pt_new(e, &ye, 2, (int64_t[]){8, 96}, -1, 1);
    pt_new(e, &ze, 2, (int64_t[]){8, 96}, -1, 1);
    pt_new(e, &re, 2, (int64_t[]){3, 96}, -1, 1);
    const int64_t idx0[3] = {0, 1, 2};
    /* warm-up (scratch, plans), as the engine's first eager run */
    if (gseq_ops(e, &s, &ye, &ze, &re, idx0, NULL, &err) != 0)
        die("graph warm-up", &err);
    struct bs_backend_graph *g = NULL;
    int64_t *slot = NULL;
    uint64_t ep = has ? GPU->graph_epoch(GC) : 0;
    if (has) {
        int rc = GPU->graph_begin(GC, &err);
        if (rc == 0)
            rc = gseq_ops(e, &s, &yg, &zg, &rg, NULL, &slot, &err);
        struct bs_err ee = {0};
        int rc_end = GPU->graph_end(GC, rc == 0, &g, rc == 0 ? &err : &ee);
        if (rc != 0 || rc_end != 0)
            die("graph capture", &err);
        expect_true(e, "graph: captured, idx slot given", g != NULL && slot != NULL);
        expect_true(e, "graph: epoch unchanged by the capture", GPU->graph_epoch(GC) == ep);
    }
    static const int64_t idx[3][3] = {{3, 15, 7}, {0, 0, 9}, {12, 4, 4}};
    char name[128];
    for (int k = 0; k < 3; k++) {
        gseq_inputs(e, &s, &zg, &ze);
        if (has) {
            if (GPU->graph_wait(GC, g, &err) != 0)
                die("graph_wait", &err);
            memcpy(slot, idx[k], sizeof(idx[k]));
            if (GPU->graph_launch(GC, g, &err) != 0)
                die("graph_launch", &err);
        } else if (gseq_ops(e, &s, &yg, &zg, &rg, idx[k], NULL, &err) != 0)
            die("graph (eager stand-in)", &err);
        if (gseq_ops(e, &s, &ye, &ze, &re, idx[k], NULL, &err) != 0)
            die("graph: eager", &err);
        snprintf(name, sizeof(name), "graph launch %d: y bit for bit", k);
        expect_same(e, name, &yg, &ye);
        snprintf(name, sizeof(name), "graph launch %d: z (+= y) bit for bit", k);
        expect_same(e, name, &zg, &ze);
        snprintf(name, sizeof(name), "graph launch %d: rows %lld %lld %lld bit for bit", k,
                 (long long)idx[k][0], (long long)idx[k][1], (long long)idx[k][2]);
        expect_same(e, name, &rg, &re);
    }
    /* two launches queued, freed at once (graph_free waits for them) */
    gseq_inputs(e, &s, &zg, &ze);
    for (int k = 0; k < 2; k++) {
        if (has) {
            if (GPU->graph_wait(GC, g, &err) != 0)
                die("graph_wait", &err);
            memcpy(slot, idx[2 - k], sizeof(idx[0]));
            if (GPU->graph_launch(GC, g, &err) != 0)
                die("graph_launch", &err);
        } else if (gseq_ops(e, &s, &yg, &zg, &rg, idx[2 - k], NULL, &err) != 0)
            die("graph (eager stand-in)", &err);
        if (gseq_ops(e, &s, &ye, &ze, &re, idx[2 - k], NULL, &err) != 0)
            die("graph: eager", &err);
    }
    if (has)
        GPU->graph_free(GC, g);
    expect_same(e, "graph freed in flight: z after two launches", &zg, &ze);
    expect_same(e, "graph freed in flight: rows", &rg, &re);
    expect_true(e, "graph: the stream works after graph_free",
                GPU->copy_out(GC, NULL, NULL, 0, &err) == 0);
    if (has) {
        expect_true(e, "graph: epoch unchanged by launches", GPU->graph_epoch(GC) == ep);
        test_graph_scratch(e);
    }
    printf("graphs: %d checks, %d failed%s\n", e->checks - checks0, e->failures - failures0,
           has ? "" : " (no graph ops: the ops stood in for the launches)");
    struct pt *all[] = {&s.w.buf, &s.x, &s.table, &yg, &zg, &rg, &ye, &ze, &re};
    for (size_t i = 0; i < BS_ARRAY_LEN(all); i++)
        pt_free(e, all[i]);
}

static void test_all(struct env *e)
{
    test_linear(e);
    test_linear_dtypes(e);
    test_linear_act(e);
    test_layer_norm(e);
    test_group_norm(e);
    test_layer_norm_dtypes(e);
    test_group_norm_dtypes(e);
    test_act_glu(e);
    test_add_transpose_rows(e);
    test_attention(e);
    test_attention_ragged(e);
    test_narrow_ew(e);
    test_narrow_attention(e);
    test_narrow_ragged(e);
    test_threads(e);
    test_copies(e);
    test_graphs(e);
    if (!e->self_check)
        test_gpu_timer(e);
    if (!e->self_check && strcmp(e->dtype, "fp16") == 0)
        test_overflow(e);
}

int main(int argc, char **argv)
{
    struct env env = {0}, *e = &env;
    struct bs_err err = {0};
    if (argc != 2) {
        fprintf(stderr, "usage: test_gpu_ops fp32|bf16|fp16\n");
        return 2;
    }
    e->dtype = argv[1];
    if (strcmp(e->dtype, "self-check") == 0) {
        e->self_check = true;
        e->mm_tol = 1e-12; /* same code, same thread count: identical results */
        if (bs_backend_cpu_init(&e->gpu, 1, &err) != 0 || bs_backend_cpu_init(&e->cpu, 1, &err))
            die("cpu backend", &err);
        test_all(e);
        printf("self-check: %d checks, %d failed\n", e->checks, e->failures);
        bs_backend_free(&e->cpu);
        bs_backend_free(&e->gpu);
        return e->failures || e->checks < 50 ? 1 : 0;
    }
    e->mm_tol = strcmp(e->dtype, "bf16") == 0 ? 2e-2 : strcmp(e->dtype, "fp16") == 0 ? 4e-3 : 1e-4;
    e->mm_rms = strcmp(e->dtype, "fp32") != 0;
    struct bs_backend_opts go = {.device = "cuda", .dtype = e->dtype};
    int rc = bs_backend_init_opts(&e->gpu, &go, &err);
    if (rc == BS_EUNSUPP) {
        printf("SKIP: no usable GPU: %s\n", err.msg);
        return EXIT_SKIP;
    }
    if (rc != 0)
        die("cuda backend", &err);
    printf("%s\n", err.msg);
    if (bs_backend_cpu_init(&e->cpu, 0, &err) != 0)
        die("cpu backend", &err);
    test_all(e);
    printf("%s: %d checks, %d failed\n", e->dtype, e->checks, e->failures);
    bs_backend_free(&e->cpu);
    bs_backend_free(&e->gpu);
    return e->failures ? 1 : 0;
}
