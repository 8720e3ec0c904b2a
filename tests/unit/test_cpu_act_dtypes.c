/* Narrow activations on the CPU backend (engine/backend.h, ABI 6): every op
 * with BF16 and F16 activation tensors, in each mix the contract allows (x
 * narrow and y F32, x F32 and y narrow, both narrow, in place), against the
 * contract's reference: the narrow inputs widened to F32 (bs_convert_to_f32),
 * the backend's own F32 op on those (contiguous copies), the result rounded
 * once (bs_convert_from_f32).
 *
 * Tolerance: none. Every comparison is bit for bit, over the whole output
 * buffer (row padding included, which must stay as it was): the CPU backend
 * computes a narrow op in F32 with the F32 op's arithmetic (its elementwise
 * kernels on chunks of widened values, layer norm on widened rows, the rest
 * through F32 copies), so the F32 results before rounding are the
 * reference's own bits. The linear on a packed BF16 weight with a BF16 x
 * (the GEMM reads x as it is, no F32 copy) is checked against the same
 * reference, whose F32 x the GEMM rounds to those very values, on each
 * dispatch path this CPU has (avx512bf16, avx2, generic).
 *
 * Also: the conversion helpers (bs__cpu_widen, bs__cpu_narrow) against
 * bs_convert_* over every BF16 and F16 value and over floats of every
 * exponent (denormals, overflow, inf and NaN included; the only stated
 * difference: F16C quietens a signalling F16 NaN as it widens); q, k and v of
 * mixed dtypes and a transpose between dtypes fail with BS_EINVAL; the
 * backend lists BF16 and F16 in act_dtypes. */
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
#define TEST_RNG_SEED 0x9e3779b97f4a7c15ull
#include "test_rand.h"

static struct bs_backend be;

static const enum bs_dtype narrow_types[2] = {BS_TYPE_BF16, BS_TYPE_F16};

/* The (x, y) dtype mixes with at least one narrow side. */
struct mix {
    enum bs_dtype x, y;
};
static const struct mix mixes[] = {
    {BS_TYPE_BF16, BS_TYPE_F32}, {BS_TYPE_F16, BS_TYPE_F32},   {BS_TYPE_F32, BS_TYPE_BF16},
    {BS_TYPE_F32, BS_TYPE_F16},  {BS_TYPE_BF16, BS_TYPE_BF16}, {BS_TYPE_F16, BS_TYPE_F16},
    {BS_TYPE_BF16, BS_TYPE_F16}, {BS_TYPE_F16, BS_TYPE_BF16},
};
#define N_MIXES (sizeof(mixes) / sizeof(mixes[0]))

/* ---- tensors ----------------------------------------------------------- */

/* A [rows, cols] rows tensor of dtype t, row stride ld, in its own buffer
 * (free t.data's base with free_rows): each row holds vals' row rounded to
 * t, the padding a fixed pattern. */
static struct bs_tensor make_rows(enum bs_dtype t, int64_t rows, int64_t cols, int64_t ld,
                                  const float *vals)
{
    size_t es = bs_dtype_size(t), bytes = (size_t)(rows * ld) * es;
    char *mem = malloc(bytes ? bytes : 1);
    assert_non_null(mem);
    memset(mem, 0x5a, bytes);
    for (int64_t r = 0; r < rows; r++)
        bs_convert_from_f32(mem + (size_t)(r * ld) * es, t, vals + r * cols, cols);
    int64_t ne[2] = {rows, ld};
    struct bs_tensor full = bs_tensor_make(t, 2, ne, mem);
    return bs_tensor_view_cols(&full, 0, cols);
}

/* Bytes of a rows tensor's buffer (from its first row to its last's end of stride). */
static size_t rows_bytes(const struct bs_tensor *t)
{
    return (size_t)(bs_tensor_nrows(t) * bs_tensor_ld(t)) * bs_dtype_size(t->type);
}

/* t's values widened into a contiguous F32 buffer (the reference's input). */
static float *widen_rows(const struct bs_tensor *t)
{
    int64_t rows = bs_tensor_nrows(t), cols = t->ne[t->n_dims - 1], ld = bs_tensor_ld(t);
    size_t es = bs_dtype_size(t->type);
    float *f = malloc((size_t)(rows * cols + 1) * sizeof(float));
    assert_non_null(f);
    for (int64_t r = 0; r < rows; r++)
        bs_convert_to_f32(f + r * cols, (const char *)t->data + (size_t)(r * ld) * es, t->type,
                          cols);
    return f;
}

/* A contiguous F32 tensor of shape t over data. */
static struct bs_tensor f32_like(const struct bs_tensor *t, float *data)
{
    return bs_tensor_make(BS_TYPE_F32, t->n_dims, t->ne, data);
}

/* The buffer y must hold: before (y's buffer before the op) with each row
 * replaced by ref's row (contiguous F32) rounded to y's dtype. */
static char *expected(const struct bs_tensor *y, const char *before, const float *ref)
{
    int64_t rows = bs_tensor_nrows(y), cols = y->ne[y->n_dims - 1], ld = bs_tensor_ld(y);
    size_t es = bs_dtype_size(y->type), bytes = rows_bytes(y);
    char *e = malloc(bytes ? bytes : 1);
    assert_non_null(e);
    memcpy(e, before, bytes);
    for (int64_t r = 0; r < rows; r++)
        bs_convert_from_f32(e + (size_t)(r * ld) * es, y->type, ref + r * cols, cols);
    return e;
}

/* Bit-for-bit comparison of y's buffer with want; names the first difference. */
static void check_bits(const char *what, const struct bs_tensor *y, const char *want)
{
    size_t bytes = rows_bytes(y), es = bs_dtype_size(y->type);
    const char *got = y->data;
    size_t diffs = 0, first = 0;
    for (size_t i = 0; i < bytes; i += es)
        if (memcmp(got + i, want + i, es) != 0 && diffs++ == 0)
            first = i / es;
    if (diffs != 0) {
        float g = 0, w = 0;
        bs_convert_to_f32(&g, got + first * es, y->type, 1);
        bs_convert_to_f32(&w, want + first * es, y->type, 1);
        fail_msg("%s: %zu of %zu %s values differ; first at element %zu: %.9g, want %.9g", what,
                 diffs, bytes / es, bs_dtype_name(y->type), first, (double)g, (double)w);
    }
}

static void free_rows(struct bs_tensor *t)
{
    free(t->data);
}

/* n random values in [-amp, amp). */
static float *rand_vals(int64_t n, float amp)
{
    float *v = alloc_rand(n);
    for (int64_t i = 0; i < n; i++)
        v[i] *= amp;
    return v;
}

static int setup(void **state)
{
    struct bs_err err = {0};
    return bs_backend_cpu_init(&be, 2, &err);
}

static int teardown(void **state)
{
    bs_backend_free(&be);
    return 0;
}

/* ---- conversions ------------------------------------------------------- */

static void test_convert(void **state)
{
    /* Widening: every 16-bit pattern, in one call (vector body and tail). */
    uint16_t *h = malloc(65536 * 2 + 6);
    float *got = malloc(65539 * 4), *want = malloc(65539 * 4);
    assert_true(h && got && want);
    for (int i = 0; i < 65539; i++)
        h[i] = (uint16_t)i;
    for (int t = 0; t < 2; t++) {
        enum bs_dtype dt = narrow_types[t];
        bs__cpu_widen(got, h, dt, 65539);
        bs_convert_to_f32(want, h, dt, 65539);
        for (int i = 0; i < 65539; i++) {
            bool snan16 =
                dt == BS_TYPE_F16 && (h[i] & 0x7c00) == 0x7c00 && (h[i] & 0x3ff) && !(h[i] & 0x200);
            if (snan16)
                assert_true(isnan(got[i]) && isnan(want[i]));
            else if (memcmp(&got[i], &want[i], 4) != 0)
                fail_msg("widen %s 0x%04x: %a, want %a", bs_dtype_name(dt), h[i], (double)got[i],
                         (double)want[i]);
        }
    }
    /* Narrowing: floats of every exponent and sign with random mantissas,
     * and the ties and edges by name. */
    enum { N = 1 << 16 };
    float *f = malloc((N + 16) * sizeof(float));
    uint16_t *g16 = malloc((N + 16) * 2), *w16 = malloc((N + 16) * 2);
    assert_true(f && g16 && w16);
    for (int i = 0; i < N; i++) {
        frand();
        uint32_t u = (uint32_t)(rng >> 20) ^ ((uint32_t)i << 23); /* i sets sign and exponent */
        if (i % 7 == 0)
            u = (u & 0xffff0000u) | 0x8000u; /* a BF16 tie */
        else if (i % 7 == 1)
            u = (u & ~0x1fffu) | 0x1000u; /* an F16 tie (normal range) */
        memcpy(&f[i], &u, 4);
    }
    const float edges[16] = {65504.0f, 65520.0f, 65519.99f,    -65520.0f,     0x1p-25f, 0x1.8p-25f,
                             0x1p-24f, 0x1p-14f, 0x1.ff8p-15f, 3.3895314e38f, INFINITY, -INFINITY,
                             NAN,      -NAN,     0.0f,         -0.0f};
    memcpy(f + N, edges, sizeof(edges));
    for (int t = 0; t < 2; t++) {
        enum bs_dtype dt = narrow_types[t];
        bs__cpu_narrow(g16, dt, f, N + 16);
        bs_convert_from_f32(w16, dt, f, N + 16);
        for (int i = 0; i < N + 16; i++)
            if (g16[i] != w16[i])
                fail_msg("narrow %s %a: 0x%04x, want 0x%04x", bs_dtype_name(dt), (double)f[i],
                         g16[i], w16[i]);
    }
    free(h);
    free(got);
    free(want);
    free(f);
    free(g16);
    free(w16);
}

/* ---- act, glu, add ----------------------------------------------------- */

/* act over x [rows, cols] (stride ldx) into y (stride ldy) of the mix m, or
 * in place (y is x) when inplace; against the reference. */
static void act_case(struct mix m, enum bs_act act, int64_t rows, int64_t cols, int64_t ldx,
                     int64_t ldy, bool inplace)
{
    struct bs_err err = {0};
    float *vx = rand_vals(rows * cols, 4.0f), *vy = rand_vals(rows * cols, 1.0f);
    struct bs_tensor x = make_rows(m.x, rows, cols, ldx, vx);
    struct bs_tensor y = inplace ? x : make_rows(m.y, rows, cols, ldy, vy);
    float *xf = widen_rows(&x), *rf = malloc((size_t)(rows * cols + 1) * sizeof(float));
    struct bs_tensor tx = f32_like(&x, xf), tr = f32_like(&x, rf);
    assert_int_equal(be.iface->act(be.ctx, &tr, &tx, act, &err), 0);
    char *want = expected(&y, y.data, rf);
    int rc = be.iface->act(be.ctx, &y, &x, act, &err);
    if (rc != 0)
        fail_msg("act: %s", err.msg);
    char what[128];
    snprintf(what, sizeof(what), "act %d %s -> %s [%lld x %lld]%s", (int)act, bs_dtype_name(m.x),
             bs_dtype_name(y.type), (long long)rows, (long long)cols, inplace ? " in place" : "");
    check_bits(what, &y, want);
    free(want);
    free(xf);
    free(rf);
    if (!inplace)
        free_rows(&y);
    free_rows(&x);
    free(vx);
    free(vy);
}

static void test_act(void **state)
{
    const enum bs_act acts[] = {BS_ACT_NONE, BS_ACT_GELU,       BS_ACT_GELU_TANH,
                                BS_ACT_SILU, BS_ACT_QUICK_GELU, BS_ACT_MISH};
    for (size_t i = 0; i < N_MIXES; i++)
        for (size_t a = 0; a < sizeof(acts) / sizeof(acts[0]); a++) {
            act_case(mixes[i], acts[a], 37, 100, 100, 100, false); /* flat: 3 x 1024 + 628 */
            act_case(mixes[i], acts[a], 9, 300, 310, 305, false);  /* strided rows */
        }
    for (int t = 0; t < 2; t++) {
        struct mix m = {narrow_types[t], narrow_types[t]};
        act_case(m, BS_ACT_GELU, 37, 100, 100, 100, true);
        act_case(m, BS_ACT_SILU, 9, 300, 310, 310, true);
    }
}

/* glu: x [rows, 2n] into y [rows, n]; alias: y is x's first n columns. */
static void glu_case(struct mix m, enum bs_act act, int64_t rows, int64_t n, bool alias)
{
    struct bs_err err = {0};
    float *vx = rand_vals(rows * 2 * n, 3.0f), *vy = rand_vals(rows * n, 1.0f);
    struct bs_tensor x = make_rows(m.x, rows, 2 * n, 2 * n + 3, vx);
    struct bs_tensor y = alias ? bs_tensor_view_cols(&x, 0, n) : make_rows(m.y, rows, n, n + 1, vy);
    float *xf = widen_rows(&x), *rf = malloc((size_t)(rows * n) * sizeof(float));
    struct bs_tensor tx = f32_like(&x, xf), tr = f32_like(&y, rf);
    assert_int_equal(be.iface->glu(be.ctx, &tr, &tx, act, &err), 0);
    char *want = expected(&y, y.data, rf);
    if (be.iface->glu(be.ctx, &y, &x, act, &err) != 0)
        fail_msg("glu: %s", err.msg);
    char what[128];
    snprintf(what, sizeof(what), "glu %s -> %s%s", bs_dtype_name(m.x), bs_dtype_name(y.type),
             alias ? " (y aliases x)" : "");
    check_bits(what, &y, want);
    free(want);
    free(xf);
    free(rf);
    if (!alias)
        free_rows(&y);
    free_rows(&x);
    free(vx);
    free(vy);
}

static void test_glu(void **state)
{
    for (size_t i = 0; i < N_MIXES; i++) {
        glu_case(mixes[i], BS_ACT_GELU, 7, 300, false);
        glu_case(mixes[i], BS_ACT_SILU, 130, 40, false);
    }
    for (int t = 0; t < 2; t++)
        glu_case((struct mix){narrow_types[t], narrow_types[t]}, BS_ACT_GELU, 7, 300, true);
}

/* add: y = alpha (y + gate x); inplace: x is y itself. */
static void add_case(struct mix m, bool gated, float alpha, bool inplace)
{
    struct bs_err err = {0};
    int64_t rows = 12, cols = 270, rps = 4;
    float *vx = rand_vals(rows * cols, 2.0f), *vy = rand_vals(rows * cols, 2.0f);
    float *vg = rand_vals(3 * cols, 1.0f);
    struct bs_tensor y = make_rows(m.y, rows, cols, cols, vy);
    struct bs_tensor x = inplace ? y : make_rows(m.x, rows, cols, cols + 5, vx);
    int64_t gne[2] = {3, cols};
    struct bs_tensor gate = bs_tensor_make(BS_TYPE_F32, 2, gne, vg);
    float *xf = widen_rows(&x), *rf = widen_rows(&y);
    struct bs_tensor tx = f32_like(&x, xf), tr = f32_like(&y, rf);
    assert_int_equal(be.iface->add(be.ctx, &tr, &tx, gated ? &gate : NULL, rps, alpha, &err), 0);
    char *want = expected(&y, y.data, rf);
    if (be.iface->add(be.ctx, &y, &x, gated ? &gate : NULL, rps, alpha, &err) != 0)
        fail_msg("add: %s", err.msg);
    char what[128];
    snprintf(what, sizeof(what), "add %s -> %s%s%s", bs_dtype_name(x.type), bs_dtype_name(y.type),
             gated ? " gated" : "", inplace ? " in place" : "");
    check_bits(what, &y, want);
    free(want);
    free(xf);
    free(rf);
    if (!inplace)
        free_rows(&x);
    free_rows(&y);
    free(vx);
    free(vy);
    free(vg);
}

static void test_add(void **state)
{
    for (size_t i = 0; i < N_MIXES; i++) {
        add_case(mixes[i], true, 1.0f, false);
        add_case(mixes[i], false, 0.5f, false);
    }
    for (int t = 0; t < 2; t++) {
        add_case((struct mix){narrow_types[t], narrow_types[t]}, true, 1.0f, true);
        /* F16 overflow: 2 x 2 x 30000 rounds to inf, as the reference rounds */
        add_case((struct mix){BS_TYPE_F32, narrow_types[t]}, false, 30000.0f, false);
    }
}

/* ---- transpose --------------------------------------------------------- */

static void test_transpose(void **state)
{
    struct bs_err err = {0};
    int64_t b = 3, r = 45, c = 70, nx[3] = {b, r, c}, ny[3] = {b, c, r};
    float *v = rand_vals(b * r * c, 10.0f);
    for (int t = 0; t < 2; t++) {
        enum bs_dtype dt = narrow_types[t];
        struct bs_tensor x0 = make_rows(dt, b * r, c, c, v);
        struct bs_tensor x = bs_tensor_reshape(&x0, 3, nx);
        float *yv = rand_vals(b * r * c, 1.0f);
        struct bs_tensor y0 = make_rows(dt, b * c, r, r, yv);
        struct bs_tensor y = bs_tensor_reshape(&y0, 3, ny);
        float *xf = widen_rows(&x0), *rf = malloc((size_t)(b * r * c) * sizeof(float));
        struct bs_tensor tx = bs_tensor_make(BS_TYPE_F32, 3, nx, xf);
        struct bs_tensor tr = bs_tensor_make(BS_TYPE_F32, 3, ny, rf);
        assert_int_equal(be.iface->transpose(be.ctx, &tr, &tx, &err), 0);
        char *want = expected(&y0, y0.data, rf);
        assert_int_equal(be.iface->transpose(be.ctx, &y, &x, &err), 0);
        check_bits(dt == BS_TYPE_BF16 ? "transpose BF16" : "transpose F16", &y0, want);
        /* x and y of different dtypes */
        struct bs_tensor yf = bs_tensor_make(BS_TYPE_F32, 3, ny, rf);
        assert_int_equal(be.iface->transpose(be.ctx, &yf, &x, &err), BS_EINVAL);
        assert_non_null(strstr(err.msg, "one dtype"));
        struct bs_tensor yo = bs_tensor_make(narrow_types[1 - t], 3, ny, y0.data);
        assert_int_equal(be.iface->transpose(be.ctx, &yo, &x, &err), BS_EINVAL);
        free(want);
        free(xf);
        free(rf);
        free(yv);
        free_rows(&x0);
        free_rows(&y0);
    }
    free(v);
}

/* ---- norms ------------------------------------------------------------- */

/* layer_norm over [rows, d] with gamma, beta and a modulation of rows / rps
 * samples; inplace: y is x. */
static void ln_case(struct mix m, int64_t rows, int64_t d, bool affine, bool inplace)
{
    struct bs_err err = {0};
    int64_t rps = 5, samples = (rows + rps - 1) / rps;
    float *vx = rand_vals(rows * d, 3.0f), *vy = rand_vals(rows * d, 1.0f);
    for (int64_t i = 0; i < rows * d; i++)
        vx[i] += 2.0f; /* a mean away from 0 */
    float *gv = rand_vals(d, 1.0f), *bv = rand_vals(d, 1.0f);
    float *sc = rand_vals(samples * d, 0.5f), *sh = rand_vals(samples * d, 0.5f);
    int64_t nd[1] = {d}, nm[2] = {samples, d};
    struct bs_tensor gamma = bs_tensor_make(BS_TYPE_F32, 1, nd, gv);
    struct bs_tensor beta = bs_tensor_make(BS_TYPE_F32, 1, nd, bv);
    struct bs_tensor scale = bs_tensor_make(BS_TYPE_F32, 2, nm, sc);
    struct bs_tensor shift = bs_tensor_make(BS_TYPE_F32, 2, nm, sh);
    struct bs_norm_params p = {.eps = 1e-6f, .rows_per_sample = rps};
    if (affine) {
        p.gamma = &gamma;
        p.beta = &beta;
        p.scale = &scale;
        p.shift = &shift;
    }
    struct bs_tensor x = make_rows(m.x, rows, d, d + 7, vx);
    struct bs_tensor y = inplace ? x : make_rows(m.y, rows, d, d, vy);
    float *xf = widen_rows(&x), *rf = malloc((size_t)(rows * d) * sizeof(float));
    struct bs_tensor tx = f32_like(&x, xf), tr = f32_like(&x, rf);
    assert_int_equal(be.iface->layer_norm(be.ctx, &tr, &tx, &p, &err), 0);
    char *want = expected(&y, y.data, rf);
    if (be.iface->layer_norm(be.ctx, &y, &x, &p, &err) != 0)
        fail_msg("layer_norm: %s", err.msg);
    char what[128];
    snprintf(what, sizeof(what), "layer_norm %s -> %s d %lld%s%s", bs_dtype_name(m.x),
             bs_dtype_name(y.type), (long long)d, affine ? " modulated" : "",
             inplace ? " in place" : "");
    check_bits(what, &y, want);
    free(want);
    free(xf);
    free(rf);
    if (!inplace)
        free_rows(&y);
    free_rows(&x);
    free(vx);
    free(vy);
    free(gv);
    free(bv);
    free(sc);
    free(sh);
}

static void test_layer_norm(void **state)
{
    for (size_t i = 0; i < N_MIXES; i++) {
        ln_case(mixes[i], 23, 200, true, false);
        ln_case(mixes[i], 9, 64, false, false);
        ln_case(mixes[i], 4, BS__CPU_ROW_MAX + 904, true, false); /* F32 copies */
    }
    for (int t = 0; t < 2; t++) {
        struct mix m = {narrow_types[t], narrow_types[t]};
        ln_case(m, 23, 200, true, true);
        ln_case(m, 4, BS__CPU_ROW_MAX + 904, true, true);
    }
}

static void gn_case(struct mix m, bool affine)
{
    struct bs_err err = {0};
    int64_t bsz = 2, ch = 12, s = 50, groups = 4, n = bsz * ch * s;
    float *vx = rand_vals(n, 2.0f), *vy = rand_vals(n, 1.0f);
    float *gv = rand_vals(ch, 1.0f), *bv = rand_vals(ch, 1.0f);
    float *sc = rand_vals(bsz * ch, 0.5f), *sh = rand_vals(bsz * ch, 0.5f);
    int64_t nc[1] = {ch}, nm[2] = {bsz, ch}, ne[3] = {bsz, ch, s};
    struct bs_tensor gamma = bs_tensor_make(BS_TYPE_F32, 1, nc, gv);
    struct bs_tensor beta = bs_tensor_make(BS_TYPE_F32, 1, nc, bv);
    struct bs_tensor scale = bs_tensor_make(BS_TYPE_F32, 2, nm, sc);
    struct bs_tensor shift = bs_tensor_make(BS_TYPE_F32, 2, nm, sh);
    struct bs_norm_params p = {.eps = 1e-5f, .groups = (int)groups};
    if (affine) {
        p.gamma = &gamma;
        p.beta = &beta;
        p.scale = &scale;
        p.shift = &shift;
    }
    struct bs_tensor x0 = make_rows(m.x, bsz * ch, s, s, vx);
    struct bs_tensor y0 = make_rows(m.y, bsz * ch, s, s, vy);
    struct bs_tensor x = bs_tensor_reshape(&x0, 3, ne), y = bs_tensor_reshape(&y0, 3, ne);
    float *xf = widen_rows(&x0), *rf = malloc((size_t)n * sizeof(float));
    struct bs_tensor tx = bs_tensor_make(BS_TYPE_F32, 3, ne, xf);
    struct bs_tensor tr = bs_tensor_make(BS_TYPE_F32, 3, ne, rf);
    assert_int_equal(be.iface->group_norm(be.ctx, &tr, &tx, &p, &err), 0);
    char *want = expected(&y0, y0.data, rf);
    if (be.iface->group_norm(be.ctx, &y, &x, &p, &err) != 0)
        fail_msg("group_norm: %s", err.msg);
    char what[128];
    snprintf(what, sizeof(what), "group_norm %s -> %s%s", bs_dtype_name(m.x), bs_dtype_name(m.y),
             affine ? " modulated" : "");
    check_bits(what, &y0, want);
    free(want);
    free(xf);
    free(rf);
    free_rows(&x0);
    free_rows(&y0);
    free(vx);
    free(vy);
    free(gv);
    free(bv);
    free(sc);
    free(sh);
}

static void test_group_norm(void **state)
{
    for (size_t i = 0; i < N_MIXES; i++) {
        gn_case(mixes[i], true);
        gn_case(mixes[i], false);
    }
}

/* ---- linear ------------------------------------------------------------ */

/* linear on be2 with weight w (F32 [n, k], or a packed one), x [m, k] (stride
 * k + 3) and y [m, n] of the mix, bias, beta; against the reference (the
 * same w). */
static void linear_case(struct bs_backend *b2, struct mix mx, const struct bs_tensor *w, int64_t m,
                        bool bias, float beta)
{
    struct bs_err err = {0};
    int64_t n = w->ne[0], k = w->ne[1];
    float *vx = rand_vals(m * k, 1.0f), *vy = rand_vals(m * n, 1.0f), *vb = rand_vals(n, 1.0f);
    int64_t nb[1] = {n};
    struct bs_tensor b = bs_tensor_make(BS_TYPE_F32, 1, nb, vb);
    struct bs_tensor x = make_rows(mx.x, m, k, k + 3, vx);
    struct bs_tensor y = make_rows(mx.y, m, n, n + 2, vy);
    float *xf = widen_rows(&x), *rf = widen_rows(&y);
    struct bs_tensor tx = f32_like(&x, xf), tr = f32_like(&y, rf);
    assert_int_equal(b2->iface->linear(b2->ctx, &tr, &tx, w, bias ? &b : NULL, beta, &err), 0);
    char *want = expected(&y, y.data, rf);
    if (b2->iface->linear(b2->ctx, &y, &x, w, bias ? &b : NULL, beta, &err) != 0)
        fail_msg("linear: %s", err.msg);
    char what[160];
    snprintf(what, sizeof(what), "linear %s x, %s w, -> %s y [%lld x %lld x %lld] beta %g",
             bs_dtype_name(mx.x), bs_dtype_name(w->type), bs_dtype_name(mx.y), (long long)m,
             (long long)n, (long long)k, (double)beta);
    check_bits(what, &y, want);
    free(want);
    free(xf);
    free(rf);
    free_rows(&x);
    free_rows(&y);
    free(vx);
    free(vy);
    free(vb);
}

static void test_linear_f32_weight(void **state)
{
    int64_t n = 70, k = 90, ne[2] = {n, k};
    float *wv = rand_vals(n * k, 0.2f);
    struct bs_tensor w = bs_tensor_make(BS_TYPE_F32, 2, ne, wv);
    for (size_t i = 0; i < N_MIXES; i++) {
        linear_case(&be, mixes[i], &w, 33, true, 0.0f);
        linear_case(&be, mixes[i], &w, 200, false, 1.0f); /* pool-split GEMM, residual */
    }
    free(wv);
}

/* A backend on path isa, 2 threads; false when the CPU does not reach it. */
static bool backend_on(struct bs_backend *b2, const char *isa)
{
    struct bs_err err = {0};
    setenv("BS_CPU_ISA", isa, 1);
    int rc = bs_backend_cpu_init(b2, 2, &err);
    unsetenv("BS_CPU_ISA");
    assert_int_equal(rc, 0);
    if (strcmp(bs__cpu_isa_name(((const struct bs__cpu *)b2->ctx)->isa), isa) == 0)
        return true;
    bs_backend_free(b2);
    return false;
}

/* The packed BF16 weight with BF16 x (the GEMM reads x as it is) and the
 * other mixes (F32 copies), on each dispatch path; sizes that run serially
 * and on the pool, odd K, and a view of rows of the weight. */
static void test_linear_packed(void **state)
{
    const char *isas[] = {"avx512bf16", "avx2", "generic"};
    for (int p = 0; p < 3; p++) {
        struct bs_backend b2;
        if (!backend_on(&b2, isas[p])) {
            print_message("linear packed: this CPU has no %s path, not run\n", isas[p]);
            continue;
        }
        const int64_t shapes[][2] = {{96, 1301}, {40, 33}};
        for (int s = 0; s < 2; s++) {
            struct bs_err err = {0};
            int64_t n = shapes[s][0], k = shapes[s][1], ne[2] = {n, k};
            float *wv = rand_vals(n * k, 0.1f);
            struct bs_tensor wf = bs_tensor_make(BS_TYPE_F32, 2, ne, wv), w;
            assert_int_equal(b2.iface->pack_weight(b2.ctx, &w, &wf, BS_TYPE_BF16, &err), 0);
            for (size_t i = 0; i < N_MIXES; i++) {
                linear_case(&b2, mixes[i], &w, 7, true, 0.0f);
                linear_case(&b2, mixes[i], &w, 230, s == 0, 1.0f);
            }
            struct bs_tensor view = bs_tensor_view_outer(&w, 32, n - 40);
            linear_case(&b2, (struct mix){BS_TYPE_BF16, BS_TYPE_BF16}, &view, 50, true, 1.0f);
            linear_case(&b2, (struct mix){BS_TYPE_BF16, BS_TYPE_F32}, &view, 50, true, 0.0f);
            b2.iface->buf_free(b2.ctx, w.data);
            free(wv);
        }
        print_message("linear packed: %s path, BF16 x read directly, bit for bit\n", isas[p]);
        bs_backend_free(&b2);
    }
}

/* ---- attention --------------------------------------------------------- */

/* Attention with q, k, v of dtype tq and o of dtype to, against the
 * reference; ragged: three samples of different lengths with a flat mask (a
 * row per sample), else a uniform batch with a [B, 1, Lk] mask; every
 * seventh key masked with -inf. q, k and v are column views of one fused QKV
 * buffer, o has padding columns. */
static void attn_case(enum bs_dtype tq, enum bs_dtype to, bool ragged, enum bs_dtype compute)
{
    struct bs_err err = {0};
    int heads = 2, hd = 40, inner = heads * hd;
    int64_t lqs[3] = {70, 5, 33}, lks[3] = {90, 1, 64};
    int64_t batch = ragged ? 3 : 2, lq = 70, lk = 90;
    int64_t q_off[4] = {0}, k_off[4] = {0}, m_off[3] = {0};
    for (int64_t b = 0; b < batch; b++) {
        q_off[b + 1] = q_off[b] + (ragged ? lqs[b] : lq);
        k_off[b + 1] = k_off[b] + (ragged ? lks[b] : lk);
        m_off[b] = k_off[b]; /* one row per sample, its keys' part */
    }
    int64_t rq = q_off[batch], rk = k_off[batch], rows = rq > rk ? rq : rk;
    float *vqkv = rand_vals(rows * 3 * inner, 2.0f), *vo = rand_vals(rq * inner, 1.0f);
    struct bs_tensor qkv = make_rows(tq, rows, 3 * inner, 3 * inner, vqkv);
    struct bs_tensor qa = bs_tensor_view_cols(&qkv, 0, inner);
    struct bs_tensor q = bs_tensor_view_outer(&qa, 0, rq);
    struct bs_tensor ka = bs_tensor_view_cols(&qkv, inner, inner);
    struct bs_tensor k = bs_tensor_view_outer(&ka, 0, rk);
    struct bs_tensor va = bs_tensor_view_cols(&qkv, 2 * inner, inner);
    struct bs_tensor v = bs_tensor_view_outer(&va, 0, rk);
    struct bs_tensor o = make_rows(to, rq, inner, inner + 4, vo);
    float *mv = rand_vals(rk, 1.0f);
    for (int64_t i = 0; i < rk; i += 7)
        mv[i] = -INFINITY;
    int64_t mne[3] = {batch, 1, lk}, fne[1] = {rk};
    struct bs_tensor mask =
        ragged ? bs_tensor_make(BS_TYPE_F32, 1, fne, mv) : bs_tensor_make(BS_TYPE_F32, 3, mne, mv);
    struct bs_attn_params p = {.batch = batch,
                               .lq = lq,
                               .lk = lk,
                               .heads = heads,
                               .head_dim = hd,
                               .scale = 0.158f,
                               .mask = &mask,
                               .compute = compute};
    if (ragged) {
        p.q_off = q_off;
        p.k_off = k_off;
        p.m_off = m_off;
    }
    float *qf = widen_rows(&q), *kf = widen_rows(&k), *vf = widen_rows(&v);
    float *rf = malloc((size_t)(rq * inner) * sizeof(float));
    struct bs_tensor tq2 = f32_like(&q, qf), tk = f32_like(&k, kf), tv = f32_like(&v, vf);
    struct bs_tensor tr = f32_like(&o, rf);
    if (be.iface->attention(be.ctx, &tr, &tq2, &tk, &tv, &p, &err) != 0)
        fail_msg("attention (reference): %s", err.msg);
    char *want = expected(&o, o.data, rf);
    if (be.iface->attention(be.ctx, &o, &q, &k, &v, &p, &err) != 0)
        fail_msg("attention: %s", err.msg);
    char what[128];
    snprintf(what, sizeof(what), "attention %s qkv -> %s o, %s, compute %s", bs_dtype_name(tq),
             bs_dtype_name(to), ragged ? "ragged" : "uniform", bs_dtype_name(compute));
    check_bits(what, &o, want);
    free(want);
    free(qf);
    free(kf);
    free(vf);
    free(rf);
    free(mv);
    free_rows(&qkv);
    free_rows(&o);
    free(vqkv);
    free(vo);
}

static void test_attention(void **state)
{
    const enum bs_dtype all[3] = {BS_TYPE_F32, BS_TYPE_BF16, BS_TYPE_F16};
    for (int r = 0; r < 2; r++)
        for (int c = 0; c < 2; c++)
            for (int a = 0; a < 3; a++)
                for (int b = 0; b < 3; b++)
                    if (a != 0 || b != 0)
                        attn_case(all[a], all[b], r == 1, c ? BS_TYPE_BF16 : BS_TYPE_F32);
}

/* ---- two threads at once ---------------------------------------------- */

/* Narrow linears from two threads at once (the calls only: cmocka checks on
 * the main thread): one holds the backend's cached F32 copies, the other gets
 * memory of its own; both must give the reference's bits every time. */
struct conc {
    struct bs_tensor x, y;
    const struct bs_tensor *w;
    char *want;
    int bad; /* calls that failed or gave other bits */
};

static void *conc_main(void *arg)
{
    struct conc *j = arg;
    for (int i = 0; i < 40; i++) {
        struct bs_err err = {0};
        memset(j->y.data, 0, rows_bytes(&j->y));
        if (be.iface->linear(be.ctx, &j->y, &j->x, j->w, NULL, 0.0f, &err) != 0 ||
            memcmp(j->y.data, j->want, rows_bytes(&j->y)) != 0)
            j->bad++;
    }
    return NULL;
}

static void test_concurrent(void **state)
{
    struct bs_err err = {0};
    int64_t m = 120, n = 64, k = 300, ne[2] = {n, k};
    float *wv = rand_vals(n * k, 0.2f);
    struct bs_tensor w = bs_tensor_make(BS_TYPE_F32, 2, ne, wv);
    struct conc j[2];
    for (int t = 0; t < 2; t++) {
        float *vx = rand_vals(m * k, 1.0f), *zero = calloc((size_t)(m * n), sizeof(float));
        j[t].x = make_rows(t ? BS_TYPE_F16 : BS_TYPE_BF16, m, k, k, vx);
        j[t].y = make_rows(t ? BS_TYPE_BF16 : BS_TYPE_F16, m, n, n, zero);
        j[t].w = &w;
        j[t].bad = 0;
        float *xf = widen_rows(&j[t].x), *rf = malloc((size_t)(m * n) * sizeof(float));
        struct bs_tensor tx = f32_like(&j[t].x, xf), tr = f32_like(&j[t].y, rf);
        assert_int_equal(be.iface->linear(be.ctx, &tr, &tx, &w, NULL, 0.0f, &err), 0);
        j[t].want = expected(&j[t].y, j[t].y.data, rf);
        free(vx);
        free(zero);
        free(xf);
        free(rf);
    }
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, conc_main, &j[1]), 0);
    conc_main(&j[0]);
    assert_int_equal(pthread_join(th, NULL), 0);
    for (int t = 0; t < 2; t++) {
        assert_int_equal(j[t].bad, 0);
        free(j[t].want);
        free_rows(&j[t].x);
        free_rows(&j[t].y);
    }
    free(wv);
}

/* ---- empty operands ---------------------------------------------------- */

/* No rows: every op returns 0 and touches nothing, on the F32 copies' path
 * too (a layer norm row longer than the stack buffers, a linear, attention). */
static void test_empty(void **state)
{
    struct bs_err err = {0};
    int64_t d = BS__CPU_ROW_MAX + 904, n = 16, ne_w[2] = {n, d};
    float one = 1.0f, *wv = calloc((size_t)(n * d), sizeof(float));
    struct bs_tensor x = make_rows(BS_TYPE_BF16, 0, d, d, &one);
    struct bs_tensor y = make_rows(BS_TYPE_F16, 0, d, d, &one);
    struct bs_tensor yl = make_rows(BS_TYPE_BF16, 0, n, n, &one);
    struct bs_tensor w = bs_tensor_make(BS_TYPE_F32, 2, ne_w, wv);
    struct bs_norm_params p = {.eps = 1e-5f};
    assert_int_equal(be.iface->layer_norm(be.ctx, &y, &x, &p, &err), 0);
    assert_int_equal(be.iface->layer_norm(be.ctx, &x, &x, &p, &err), 0);
    assert_int_equal(be.iface->linear(be.ctx, &yl, &x, &w, NULL, 1.0f, &err), 0);
    struct bs_tensor q = make_rows(BS_TYPE_F16, 0, 32, 32, &one);
    struct bs_tensor o = make_rows(BS_TYPE_BF16, 0, 32, 32, &one);
    struct bs_attn_params ap = {
        .batch = 0, .lq = 3, .lk = 3, .heads = 2, .head_dim = 16, .scale = 1.0f};
    assert_int_equal(be.iface->attention(be.ctx, &o, &q, &q, &q, &ap, &err), 0);
    free_rows(&x);
    free_rows(&y);
    free_rows(&yl);
    free_rows(&q);
    free_rows(&o);
    free(wv);
}

/* ---- errors and the table ---------------------------------------------- */

static void test_errors(void **state)
{
    struct bs_err err = {0};
    assert_int_equal(be.iface->act_dtypes, (1u << BS_TYPE_BF16) | (1u << BS_TYPE_F16));
    float buf[4 * 16] = {0};
    int64_t ne[2] = {4, 16};
    struct bs_tensor qb = bs_tensor_make(BS_TYPE_BF16, 2, ne, buf);
    struct bs_tensor kh = bs_tensor_make(BS_TYPE_F16, 2, ne, buf);
    struct bs_tensor vf = bs_tensor_make(BS_TYPE_F32, 2, ne, buf);
    float ob[4 * 16];
    struct bs_tensor o = bs_tensor_make(BS_TYPE_BF16, 2, ne, ob);
    struct bs_attn_params p = {
        .batch = 1, .lq = 4, .lk = 4, .heads = 2, .head_dim = 8, .scale = 1.0f};
    assert_int_equal(be.iface->attention(be.ctx, &o, &qb, &kh, &qb, &p, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "one dtype"));
    assert_int_equal(be.iface->attention(be.ctx, &o, &qb, &qb, &vf, &p, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "one dtype"));
    /* an I64 activation is no activation dtype */
    struct bs_tensor xi = bs_tensor_make(BS_TYPE_I64, 2, ne, buf);
    assert_int_equal(be.iface->act(be.ctx, &o, &xi, BS_ACT_GELU, &err), BS_EINVAL);
    /* the generic path still checks first: a narrow group norm with bad groups */
    int64_t gne[3] = {1, 4, 8};
    struct bs_tensor gx = bs_tensor_make(BS_TYPE_BF16, 3, gne, buf);
    struct bs_tensor gy = bs_tensor_make(BS_TYPE_BF16, 3, gne, ob);
    struct bs_norm_params np = {.eps = 1e-5f, .groups = 3};
    assert_int_equal(be.iface->group_norm(be.ctx, &gy, &gx, &np, &err), BS_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_convert),       cmocka_unit_test(test_act),
        cmocka_unit_test(test_glu),           cmocka_unit_test(test_add),
        cmocka_unit_test(test_transpose),     cmocka_unit_test(test_layer_norm),
        cmocka_unit_test(test_group_norm),    cmocka_unit_test(test_linear_f32_weight),
        cmocka_unit_test(test_linear_packed), cmocka_unit_test(test_attention),
        cmocka_unit_test(test_concurrent),    cmocka_unit_test(test_empty),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
