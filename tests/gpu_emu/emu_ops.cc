/* The kernels of ops_kernels.cuh under emulation against the CPU backend's
 * ops (the norms: emu_norm.cc): every
 * activation and gated unit; gated adds; transposes with partial tiles; the
 * bias rows of linear (its CPU twin: linear with K = 0); the F32 to BF16/FP16
 * conversion (its twin: bs_convert_from_f32, bit for bit) and its overflow
 * flag (overflow.cuh), with the message the backend turns it into; the row
 * gather of launch graphs (gather_rows_kernel, indices read on the device)
 * against get_rows, bit for bit, and its zero rows for an index out of
 * range. The elementwise
 * kernels run on the entry's grid (ew_grid) and on a smaller one, so that
 * their grid-stride loops over rows and columns run too. */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "emu_common.h"
#include "ops_kernels.cuh"

#define CPU env->cpu.iface
#define CC  env->cpu.ctx

/* A grid smaller than the work: rows and columns both loop. */
static const dim3 small_grid(1, 2);

static const char *const act_names[BS_ACT_COUNT] = {"none",       "gelu", "gelu_tanh",
                                                    "quick_gelu", "silu", "mish"};

static const float *edata(const pair *p)
{
    return p ? (const float *)p->e.data : NULL;
}

static int64_t eld(const pair *p)
{
    return p ? bs_tensor_ld(&p->e) : 0;
}

static const struct bs_tensor *ct(const pair *p)
{
    return p ? &p->c : NULL;
}

/* ---- activations, gated units, adds --------------------------------------------- */

static void run_act(emu_env *env)
{
    tally t;
    t.kernel = "act_kernel";
    char name[96];
    for (int act = 0; act < BS_ACT_COUNT; act++) {
        pair x, y;
        struct bs_err err = {};
        pair_init(&x, {3, 400}, -8, 8);
        pair_init(&y, {3, 257}, -1, 1);
        pair xs = pair_cols(x, 0, 257);
        check_cpu(CPU->act(CC, &y.c, &xs.c, (enum bs_act)act, &err), &err, "act");
        emu_launch(act_kernel<float, float>, ew_grid(3, 257), dim3(EW_THREADS), 0,
                   (float *)y.e.data, (int64_t)257, (const float *)xs.e.data, (int64_t)400,
                   (int64_t)3, (int64_t)257, act);
        snprintf(name, sizeof(name), "act %s [3,257]", act_names[act]);
        expect_close(env, &t, name, y, TOL_EW, TOL_EW, false);
        pair xv = pair_cols(x, 50, 300); /* in place on a view, on the small grid */
        check_cpu(CPU->act(CC, &xv.c, &xv.c, (enum bs_act)act, &err), &err, "act");
        emu_launch(act_kernel<float, float>, small_grid, dim3(EW_THREADS), 0, (float *)xv.e.data,
                   (int64_t)400, (const float *)xv.e.data, (int64_t)400, (int64_t)3, (int64_t)300,
                   act);
        snprintf(name, sizeof(name), "act %s in place, view, grid-stride", act_names[act]);
        expect_close(env, &t, name, x, TOL_EW, TOL_EW, false);
    }
    tally_report(env, t);
}

static void run_glu(emu_env *env)
{
    tally t;
    t.kernel = "glu_kernel";
    char name[96];
    for (int act = 0; act < BS_ACT_COUNT; act++) {
        pair g, h;
        struct bs_err err = {};
        pair_init(&g, {3, 600}, -6, 6);
        pair_init(&h, {3, 300}, -1, 1);
        check_cpu(CPU->glu(CC, &h.c, &g.c, (enum bs_act)act, &err), &err, "glu");
        emu_launch(glu_kernel<float, float>, ew_grid(3, 300), dim3(EW_THREADS), 0,
                   (float *)h.e.data, (int64_t)300, (const float *)g.e.data, (int64_t)600,
                   (int64_t)3, (int64_t)300, act);
        snprintf(name, sizeof(name), "glu %s [3,600]", act_names[act]);
        expect_close(env, &t, name, h, TOL_EW, TOL_EW, false);
        pair gv = pair_cols(g, 0, 300); /* y is the first half of x */
        check_cpu(CPU->glu(CC, &gv.c, &g.c, (enum bs_act)act, &err), &err, "glu");
        emu_launch(glu_kernel<float, float>, small_grid, dim3(EW_THREADS), 0, (float *)g.e.data,
                   (int64_t)600, (const float *)g.e.data, (int64_t)600, (int64_t)3, (int64_t)300,
                   act);
        snprintf(name, sizeof(name), "glu %s into its own input, grid-stride", act_names[act]);
        expect_close(env, &t, name, g, TOL_EW, TOL_EW, false);
    }
    tally_report(env, t);
}

static void add_case(emu_env *env, tally *t, const char *name, pair *y, pair *x, pair *gate,
                     int64_t rps, float alpha, dim3 grid)
{
    struct bs_err err = {};
    pair_sync(y); /* each case from the same y on both sides */
    check_cpu(CPU->add(CC, &y->c, &x->c, ct(gate), rps, alpha, &err), &err, name);
    int64_t rows = bs_tensor_nrows(&x->e), n = x->e.ne[x->e.n_dims - 1];
    struct add_args a = {y->e.data,           x->e.data, edata(gate), bs_tensor_ld(&y->e),
                         bs_tensor_ld(&x->e), eld(gate), rows,        n,
                         rps < 1 ? 1 : rps,   alpha};
    emu_launch(add_kernel<float, float>, grid, dim3(EW_THREADS), 0, a);
    expect_close(env, t, name, *y, TOL_EW, TOL_EW, false);
}

static void run_add(emu_env *env)
{
    tally t;
    t.kernel = "add_kernel";
    pair x, y, gate;
    pair_init(&x, {6, 300}, -1, 1);
    pair_init(&y, {6, 300}, -1, 1);
    pair_init(&gate, {3, 300}, -2, 2);
    add_case(env, &t, "add [6,300], gate per 2 rows", &y, &x, &gate, 2, 1.0f, ew_grid(6, 300));
    add_case(env, &t, "add, no gate, alpha 0.5", &y, &x, NULL, 1, 0.5f, ew_grid(6, 300));
    add_case(env, &t, "add, gate per 3 rows, grid-stride", &y, &x, &gate, 3, 1.0f, small_grid);
    tally_report(env, t);
}

/* ---- transpose ------------------------------------------------------------------- */

static void run_transpose(emu_env *env)
{
    tally t;
    t.kernel = "transpose_kernel";
    static const int64_t shapes[][3] = {{3, 70, 45}, {1, 33, 65}, {2, 32, 32}, {1, 1, 7}};
    for (const int64_t *s : shapes) {
        pair x, y;
        struct bs_err err = {};
        pair_init(&x, {s[0], s[1], s[2]}, -1, 1);
        pair_init(&y, {s[0], s[2], s[1]}, -1, 1);
        check_cpu(CPU->transpose(CC, &y.c, &x.c, &err), &err, "transpose");
        dim3 grid((unsigned)((s[2] + TR_TILE - 1) / TR_TILE),
                  (unsigned)((s[1] + TR_TILE - 1) / TR_TILE), (unsigned)s[0]);
        emu_launch(transpose_kernel<float>, grid, dim3(TR_TILE, 8), 0, (float *)y.e.data,
                   (const float *)x.e.data, s[1], s[2]);
        char name[64];
        snprintf(name, sizeof(name), "transpose [%lld,%lld,%lld]", (long long)s[0], (long long)s[1],
                 (long long)s[2]);
        expect_close(env, &t, name, y, TOL_EW, TOL_EW, false);
    }
    tally_report(env, t);
}

/* ---- bias rows and the operand conversion ---------------------------------------------- */

static void run_bias(emu_env *env)
{
    tally t;
    t.kernel = "bias_kernel";
    pair y, b, x0, w0;
    pair_init(&y, {5, 310}, -1, 1);
    pair_init(&b, {300}, -1, 1);
    pair_init(&x0, {5, 0}, 0, 0);
    pair_init(&w0, {300, 0}, 0, 0);
    pair yv = pair_cols(y, 7, 300);
    struct {
        const char *name;
        pair *b;
        float beta;
        dim3 grid;
    } cases[] = {{"bias, beta 0 (linear K = 0)", &b, 0.0f, ew_grid(5, 300)},
                 {"bias, beta 1 (onto y)", &b, 1.0f, ew_grid(5, 300)},
                 {"no bias, beta 0 (zeros), grid-stride", NULL, 0.0f, small_grid},
                 {"bias, beta 1, grid-stride", &b, 1.0f, small_grid}};
    for (const auto &c : cases) {
        struct bs_err err = {};
        pair_sync(&y);
        check_cpu(CPU->linear(CC, &yv.c, &x0.c, &w0.c, ct(c.b), c.beta, &err), &err, c.name);
        emu_launch(bias_kernel, c.grid, dim3(EW_THREADS), 0, (float *)yv.e.data, (int64_t)310,
                   edata(c.b), (int64_t)5, (int64_t)300, c.beta);
        expect_close(env, &t, c.name, y, TOL_EW, TOL_EW, false);
    }
    tally_report(env, t);
}

/* F32 values for the conversion: random magnitudes from 2^-30 to 2^20 (FP16
 * subnormals and overflow included), ties, and the specials. */
static std::vector<float> conversion_inputs(int64_t n)
{
    std::vector<float> v((size_t)n);
    for (int64_t i = 0; i < n; i++)
        v[(size_t)i] = ldexpf(frand(-1, 1), (int)frand(-30, 20));
    static const float special[] = {
        0.0f,      -0.0f,    1.0f + 1.0f / 256, 1.0f + 3.0f / 256, 65504.0f, 65520.0f,
        -70000.0f, 5.96e-8f, INFINITY,          -INFINITY,         1e-45f,   3.0e38f};
    for (size_t i = 0; i < sizeof(special) / sizeof(special[0]) && i < v.size(); i++)
        v[i * 7 % v.size()] = special[i];
    return v;
}

/* The conversion of conversion_inputs, bit for bit; the overflow flag must
 * be set exactly when a finite input became inf (the FP16 inputs have some,
 * the BF16 ones none). */
template <typename T>
static void to_half_case(emu_env *env, tally *t, enum bs_dtype dt, const char *name, dim3 grid)
{
    const int64_t rows = 3, cols = 300, ld = 310;
    std::vector<float> src = conversion_inputs(rows * ld);
    std::vector<uint16_t> want((size_t)(rows * cols)), got((size_t)(rows * cols), 0xdead);
    for (int64_t r = 0; r < rows; r++)
        bs_convert_from_f32(want.data() + r * cols, dt, src.data() + r * ld, cols);
    int flag = 0;
    emu_launch(to_half_kernel<T>, grid, dim3(EW_THREADS), 0, (T *)got.data(),
               (const float *)src.data(), rows, cols, ld, &flag, BS_OVF_LINEAR);
    double err = 0;
    int mismatches = 0;
    bool overflowed = false;
    for (size_t i = 0; i < want.size(); i++) {
        float fw, fg;
        bs_convert_to_f32(&fw, &want[i], dt, 1);
        bs_convert_to_f32(&fg, &got[i], dt, 1);
        overflowed |= isinf(fw) && isfinite(src[i / cols * ld + i % cols]);
        if (want[i] != got[i]) {
            mismatches++;
            double d = fabs((double)fw - (double)fg);
            err = isnan(d) || d > err ? d : err;
        }
    }
    char what[128];
    snprintf(what, sizeof(what), "%s, overflow flag %s (want %s)", name, flag ? "set" : "clear",
             overflowed ? "set" : "clear");
    bool flag_ok = flag == (overflowed ? BS_OVF_LINEAR : 0);
    expect_value(env, t, what, err, mismatches || !flag_ok ? INFINITY : 0.0);
}

/* The overflow flag of one value: set for a finite value that rounds to inf
 * (FP16 from 65520 up, BF16 from 0x1.ffp127 up), not for 65504 or an inf. */
template <typename T>
static void to_half_flag_case(emu_env *env, tally *t, enum bs_dtype dt, float x, bool want)
{
    float src[3] = {0.5f, x, -2.0f};
    uint16_t dst[3];
    int flag = 0;
    emu_launch(to_half_kernel<T>, dim3(1), dim3(EW_THREADS), 0, (T *)dst, (const float *)src,
               (int64_t)1, (int64_t)3, (int64_t)3, &flag, BS_OVF_LINEAR);
    float back; /* and the kernel's own rounding agrees: inf exactly when flagged */
    bs_convert_to_f32(&back, &dst[1], dt, 1);
    bool agrees = !isfinite(x) || (bool)isinf(back) == want;
    char name[128];
    snprintf(name, sizeof(name), "to_half %s overflow flag of %.9g: %s (want %s), gives %g",
             bs_dtype_name(dt), (double)x, flag ? "set" : "clear", want ? "set" : "clear",
             (double)back);
    expect_value(env, t, name, 0.0, (flag != 0) == want && agrees ? 0.0 : INFINITY);
}

/* The backend's error for a set flag (bs__cuda_overflow_error, what copy_out
 * fails the batch with): BS_ERANGE, naming the dtype, the op and the dtype
 * to use; 0 for a clear flag. */
static void overflow_error_case(emu_env *env, tally *t, enum bs_dtype dt, int flags,
                                const char *want_text)
{
    struct bs_err err = {};
    int rc = bs__cuda_overflow_error(flags, dt, &err);
    bool ok = flags == 0 ? rc == 0 : rc == BS_ERANGE && strstr(err.msg, want_text) != NULL;
    char name[160];
    snprintf(name, sizeof(name), "overflow error, %s flags %d: \"%.60s\"", bs_dtype_name(dt), flags,
             flags ? err.msg : "(none)");
    expect_value(env, t, name, 0.0, ok ? 0.0 : INFINITY);
}

static void run_to_half(emu_env *env)
{
    tally t;
    t.kernel = "to_half_kernel";
    t.note = "BF16 and F16, bit for bit";
    to_half_case<__nv_bfloat16>(env, &t, BS_TYPE_BF16, "to_half bf16, bit-exact", ew_grid(3, 300));
    to_half_case<__half>(env, &t, BS_TYPE_F16, "to_half fp16, bit-exact", ew_grid(3, 300));
    to_half_case<__nv_bfloat16>(env, &t, BS_TYPE_BF16, "to_half bf16, grid-stride", small_grid);
    to_half_case<__half>(env, &t, BS_TYPE_F16, "to_half fp16, grid-stride", small_grid);
    for (float x : {65504.0f, 65519.0f, -65504.0f, INFINITY, -INFINITY, NAN})
        to_half_flag_case<__half>(env, &t, BS_TYPE_F16, x, false);
    for (float x : {65520.0f, -65520.0f, 70000.0f, 3.0e38f, FLT_MAX})
        to_half_flag_case<__half>(env, &t, BS_TYPE_F16, x, true);
    for (float x : {65520.0f, 3.0e38f, nextafterf(0x1.ffp127f, 0.0f), INFINITY})
        to_half_flag_case<__nv_bfloat16>(env, &t, BS_TYPE_BF16, x, false);
    for (float x : {0x1.ffp127f, FLT_MAX, -FLT_MAX})
        to_half_flag_case<__nv_bfloat16>(env, &t, BS_TYPE_BF16, x, true);
    overflow_error_case(env, &t, BS_TYPE_F16, BS_OVF_LINEAR, "fp16 overflow: an operand of linear");
    overflow_error_case(env, &t, BS_TYPE_F16, BS_OVF_ATTENTION, "use --dtype bf16");
    overflow_error_case(env, &t, BS_TYPE_BF16, BS_OVF_LINEAR | BS_OVF_ATTENTION,
                        "bf16 overflow: an operand of linear and attention");
    overflow_error_case(env, &t, BS_TYPE_F16, BS_OVF_WEIGHTS, "a weight of the model");
    overflow_error_case(env, &t, BS_TYPE_F16, 0, "");
    t.note += ", overflow flag";
    tally_report(env, t);
}

/* ---- narrow activations (BF16, F16) ------------------------------------------------ */

/* The elementwise kernels on every pair of input and output dtypes the
 * contract allows (engine/backend.h): against the reference of
 * issue 14 (the narrow inputs widened to F32, the CPU backend's F32 op, the
 * result rounded once to the output's dtype), to TOL_EW before the
 * rounding plus 1 ulp of the output's dtype (the kernel's FP32 result and
 * the CPU's may straddle a rounding boundary); the cases also count the
 * elements not bit-exact. transpose: bit for bit. */

static const enum bs_dtype act_dts[] = {BS_TYPE_F32, BS_TYPE_BF16, BS_TYPE_F16};

/* A host buffer of activations in dtype dt, from F32 values (rounded). */
struct abuf {
    enum bs_dtype dt;
    std::vector<float> f;
    std::vector<uint16_t> h;
    abuf(enum bs_dtype d, const std::vector<float> &v) : dt(d)
    {
        if (d == BS_TYPE_F32) {
            f = v;
            return;
        }
        h.resize(v.size());
        bs_convert_from_f32(h.data(), d, v.data(), (int64_t)v.size());
    }
    void *data()
    {
        return dt == BS_TYPE_F32 ? (void *)f.data() : (void *)h.data();
    }
    std::vector<float> widen() const
    {
        if (dt == BS_TYPE_F32)
            return f;
        std::vector<float> w(h.size());
        bs_convert_to_f32(w.data(), h.data(), dt, (int64_t)h.size());
        return w;
    }
};

static std::vector<float> rand_vec(size_t n, float lo, float hi)
{
    std::vector<float> v(n);
    for (float &x : v)
        x = frand(lo, hi);
    return v;
}

/* v as dtype dt holds it (F32: v). */
static std::vector<float> round_dt(const std::vector<float> &v, enum bs_dtype dt)
{
    return abuf(dt, v).widen();
}

/* got (the kernel's output, widened) against want (the F32 reference
 * rounded to dt), per element within TOL_EW (1 + |want|) + 1 ulp. */
static void expect_narrow(emu_env *env, tally *t, const char *what, const std::vector<float> &got,
                          const std::vector<float> &want, enum bs_dtype dt)
{
    double err = 0, share = 0;
    size_t inexact = 0;
    for (size_t i = 0; i < want.size(); i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        inexact += got[i] != want[i] && !(isnan(got[i]) && isnan(want[i]));
        double sh =
            d == 0 ? 0 : d / (TOL_EW + TOL_EW * fabs((double)want[i]) + ulp_dt(dt, want[i]));
        err = d > err || isnan(d) ? d : err;
        share = sh > share || isnan(sh) ? sh : share;
    }
    char name[200];
    snprintf(name, sizeof(name), "%s (%zu of %zu not bit-exact)", what, inexact, want.size());
    expect_value(env, t, name, err, share);
}

static struct bs_tensor f32_rows(std::vector<float> *v, int64_t rows, int64_t ld)
{
    int64_t ne[2] = {rows, ld};
    return bs_tensor_make(BS_TYPE_F32, 2, ne, v->data());
}

void emu_act_convert(void *y, enum bs_dtype ty, int64_t ldy, const float *x, int64_t ldx,
                     int64_t rows, int64_t cols)
{
    act_type(ty, [&](auto *yt) {
        using TY = ACT_T(yt);
        emu_launch(act_kernel<TY, float>, ew_grid(rows, cols), dim3(EW_THREADS), 0, (TY *)y, ldy, x,
                   ldx, rows, cols, (int)BS_ACT_NONE);
    });
}

/* act and its dtype conversion (BS_ACT_NONE): x [3, 300] in rows of 320,
 * y [3, 300] in rows of 310, every (x, y) dtype pair. */
static void run_act_narrow(emu_env *env)
{
    tally t;
    t.kernel = "act_kernel";
    t.note = "narrow: x, y of F32/BF16/F16, every pair";
    const int64_t rows = 3, n = 300, ldx = 320, ldy = 310;
    int k = 0;
    for (enum bs_dtype tx : act_dts)
        for (enum bs_dtype ty : act_dts) {
            for (int act : {(int)BS_ACT_NONE, 1 + k % (BS_ACT_COUNT - 1)}) {
                if (tx == BS_TYPE_F32 && ty == BS_TYPE_F32)
                    continue;
                std::vector<float> xv = round_dt(rand_vec((size_t)(rows * ldx), -8, 8), tx);
                std::vector<float> yv = rand_vec((size_t)(rows * ldy), -1, 1);
                abuf xb(tx, xv), yb(ty, yv);
                std::vector<float> ref = yb.widen(); /* untouched columns stay */
                struct bs_tensor xc = f32_rows(&xv, rows, ldx), yc = f32_rows(&ref, rows, ldy);
                struct bs_tensor xcv = bs_tensor_view_cols(&xc, 0, n),
                                 ycv = bs_tensor_view_cols(&yc, 0, n);
                struct bs_err err = {};
                check_cpu(CPU->act(CC, &ycv, &xcv, (enum bs_act)act, &err), &err, "act");
                ref = round_dt(ref, ty);
                dim3 grid = k % 3 == 2 ? small_grid : ew_grid(rows, n);
                act_type(ty, [&](auto *yt) {
                    act_type(tx, [&](auto *xt) {
                        using TY = ACT_T(yt);
                        using TX = ACT_T(xt);
                        emu_launch(act_kernel<TY, TX>, grid, dim3(EW_THREADS), 0, (TY *)yb.data(),
                                   ldy, (const TX *)xb.data(), ldx, rows, n, act);
                    });
                });
                char name[128];
                snprintf(name, sizeof(name), "act %s %s -> %s [3,300]%s", act_names[act],
                         bs_dtype_name(tx), bs_dtype_name(ty), k % 3 == 2 ? ", grid-stride" : "");
                expect_narrow(env, &t, name, yb.widen(), ref, ty);
            }
            k++;
        }
    /* in place on a narrow view */
    for (enum bs_dtype dt : {BS_TYPE_BF16, BS_TYPE_F16}) {
        std::vector<float> xv = round_dt(rand_vec((size_t)(rows * ldx), -6, 6), dt);
        abuf xb(dt, xv);
        struct bs_tensor xc = f32_rows(&xv, rows, ldx), xcv = bs_tensor_view_cols(&xc, 10, n);
        struct bs_err err = {};
        check_cpu(CPU->act(CC, &xcv, &xcv, BS_ACT_SILU, &err), &err, "act");
        std::vector<float> ref = round_dt(xv, dt);
        act_type(dt, [&](auto *tp) {
            using T = ACT_T(tp);
            T *p = (T *)xb.data() + 10;
            emu_launch(act_kernel<T, T>, ew_grid(rows, n), dim3(EW_THREADS), 0, p, ldx,
                       (const T *)p, ldx, rows, n, (int)BS_ACT_SILU);
        });
        char name[96];
        snprintf(name, sizeof(name), "act silu %s in place, view", bs_dtype_name(dt));
        expect_narrow(env, &t, name, xb.widen(), ref, dt);
    }
    tally_report(env, t);
}

/* glu: x [3, 2 x 260] and y [3, 260] of each dtype pair; y the first half
 * of a narrow x. */
static void run_glu_narrow(emu_env *env)
{
    tally t;
    t.kernel = "glu_kernel";
    t.note = "narrow: x, y of F32/BF16/F16, every pair";
    const int64_t rows = 3, n = 260;
    int k = 0;
    for (enum bs_dtype tx : act_dts)
        for (enum bs_dtype ty : act_dts) {
            if (tx == BS_TYPE_F32 && ty == BS_TYPE_F32)
                continue;
            int act = k++ % BS_ACT_COUNT;
            std::vector<float> xv = round_dt(rand_vec((size_t)(rows * 2 * n), -6, 6), tx);
            std::vector<float> ref((size_t)(rows * n));
            abuf xb(tx, xv), yb(ty, ref);
            struct bs_tensor xc = f32_rows(&xv, rows, 2 * n), yc = f32_rows(&ref, rows, n);
            struct bs_err err = {};
            check_cpu(CPU->glu(CC, &yc, &xc, (enum bs_act)act, &err), &err, "glu");
            ref = round_dt(ref, ty);
            act_type(ty, [&](auto *yt) {
                act_type(tx, [&](auto *xt) {
                    using TY = ACT_T(yt);
                    using TX = ACT_T(xt);
                    emu_launch(glu_kernel<TY, TX>, k % 3 ? ew_grid(rows, n) : small_grid,
                               dim3(EW_THREADS), 0, (TY *)yb.data(), n, (const TX *)xb.data(),
                               2 * n, rows, n, act);
                });
            });
            char name[128];
            snprintf(name, sizeof(name), "glu %s %s -> %s [3,520]", act_names[act],
                     bs_dtype_name(tx), bs_dtype_name(ty));
            expect_narrow(env, &t, name, yb.widen(), ref, ty);
        }
    /* y is the first half of x (BF16) */
    std::vector<float> xv = round_dt(rand_vec((size_t)(rows * 2 * n), -6, 6), BS_TYPE_BF16);
    abuf xb(BS_TYPE_BF16, xv);
    struct bs_tensor xc = f32_rows(&xv, rows, 2 * n), yc = bs_tensor_view_cols(&xc, 0, n);
    struct bs_err err = {};
    check_cpu(CPU->glu(CC, &yc, &xc, BS_ACT_GELU, &err), &err, "glu");
    std::vector<float> ref = round_dt(xv, BS_TYPE_BF16);
    emu_launch(glu_kernel<__nv_bfloat16, __nv_bfloat16>, small_grid, dim3(EW_THREADS), 0,
               (__nv_bfloat16 *)xb.data(), 2 * n, (const __nv_bfloat16 *)xb.data(), 2 * n, rows, n,
               (int)BS_ACT_GELU);
    expect_narrow(env, &t, "glu gelu BF16 into its own input", xb.widen(), ref, BS_TYPE_BF16);
    tally_report(env, t);
}

/* add: y (read and written) and x of each dtype pair, with and without a
 * gate, y a view of rows of 310. */
static void run_add_narrow(emu_env *env)
{
    tally t;
    t.kernel = "add_kernel";
    t.note = "narrow: y, x of F32/BF16/F16, every pair";
    const int64_t rows = 6, n = 300, ldy = 310;
    int k = 0;
    for (enum bs_dtype tx : act_dts)
        for (enum bs_dtype ty : act_dts) {
            if (tx == BS_TYPE_F32 && ty == BS_TYPE_F32)
                continue;
            bool gated = k % 2 == 0;
            float alpha = k % 3 == 1 ? 0.5f : 1.0f;
            std::vector<float> xv = round_dt(rand_vec((size_t)(rows * n), -1, 1), tx);
            std::vector<float> ref = round_dt(rand_vec((size_t)(rows * ldy), -1, 1), ty);
            std::vector<float> gv = rand_vec((size_t)(3 * n), -2, 2);
            abuf xb(tx, xv), yb(ty, ref);
            struct bs_tensor xc = f32_rows(&xv, rows, n), yw = f32_rows(&ref, rows, ldy),
                             yc = bs_tensor_view_cols(&yw, 0, n), gc = f32_rows(&gv, 3, n);
            struct bs_err err = {};
            check_cpu(CPU->add(CC, &yc, &xc, gated ? &gc : NULL, 2, alpha, &err), &err, "add");
            ref = round_dt(ref, ty);
            struct add_args a = {yb.data(), xb.data(), gated ? gv.data() : NULL, ldy, n, n, rows, n,
                                 2,         alpha};
            act_type(ty, [&](auto *yt) {
                act_type(tx, [&](auto *xt) {
                    emu_launch(add_kernel<ACT_T(yt), ACT_T(xt)>,
                               k % 3 == 2 ? small_grid : ew_grid(rows, n), dim3(EW_THREADS), 0, a);
                });
            });
            char name[128];
            snprintf(name, sizeof(name), "add %s -> %s [6,300]%s, alpha %g", bs_dtype_name(tx),
                     bs_dtype_name(ty), gated ? ", gate per 2 rows" : "", (double)alpha);
            expect_narrow(env, &t, name, yb.widen(), ref, ty);
            k++;
        }
    tally_report(env, t);
}

/* transpose of BF16 and F16, partial tiles: bit for bit. */
static void run_transpose_narrow(emu_env *env)
{
    tally t;
    t.kernel = "transpose_kernel";
    t.note = "narrow: BF16, F16 bit for bit";
    static const int64_t shapes[][3] = {{3, 70, 45}, {1, 33, 65}};
    for (enum bs_dtype dt : {BS_TYPE_BF16, BS_TYPE_F16})
        for (const int64_t *s : shapes) {
            size_t n = (size_t)(s[0] * s[1] * s[2]);
            std::vector<float> xv = round_dt(rand_vec(n, -3, 3), dt), ref(n);
            for (int64_t b = 0; b < s[0]; b++)
                for (int64_t i = 0; i < s[1]; i++)
                    for (int64_t j = 0; j < s[2]; j++)
                        ref[(size_t)((b * s[2] + j) * s[1] + i)] =
                            xv[(size_t)((b * s[1] + i) * s[2] + j)];
            abuf xb(dt, xv), yb(dt, std::vector<float>(n, NAN));
            dim3 grid((unsigned)((s[2] + TR_TILE - 1) / TR_TILE),
                      (unsigned)((s[1] + TR_TILE - 1) / TR_TILE), (unsigned)s[0]);
            act_type(dt, [&](auto *tp) {
                using T = ACT_T(tp);
                emu_launch(transpose_kernel<T>, grid, dim3(TR_TILE, 8), 0, (T *)yb.data(),
                           (const T *)xb.data(), s[1], s[2]);
            });
            std::vector<float> got = yb.widen();
            size_t bad = 0;
            for (size_t i = 0; i < n; i++)
                bad += memcmp(&got[i], &ref[i], sizeof(float)) != 0;
            char name[96];
            snprintf(name, sizeof(name), "transpose %s [%lld,%lld,%lld]: %zu wrong",
                     bs_dtype_name(dt), (long long)s[0], (long long)s[1], (long long)s[2], bad);
            expect_value(env, &t, name, (double)bad, bad ? INFINITY : 0.0);
        }
    tally_report(env, t);
}

/* ---- row gather (graph_rows) ------------------------------------------------------ */

/* gather_rows_kernel against the CPU's get_rows with the same indices: a
 * copy, so bit for bit (tolerance 0), on whole tensors and on column views
 * (the columns left alone stay equal), on the entry's grid and a smaller
 * one; indices changed in place between launches (as a graph's are); an
 * index outside the table gives a row of zeros and leaves the rest. */
static void gather_case(emu_env *env, tally *t, const char *name, pair *y, const pair &yv,
                        const pair &tv, const std::vector<int64_t> &idx, dim3 grid)
{
    struct bs_err err = {};
    int64_t n = (int64_t)idx.size(), d = tv.e.ne[tv.e.n_dims - 1];
    check_cpu(CPU->get_rows(CC, (struct bs_tensor *)&yv.c, &tv.c, idx.data(), n, &err), &err, name);
    std::vector<int64_t> dev(idx); /* the device copy the graph's H2D node writes */
    emu_launch(gather_rows_kernel, grid, dim3(EW_THREADS), 0, (float *)yv.e.data,
               bs_tensor_ld(&yv.e), (const float *)tv.e.data, bs_tensor_ld(&tv.e),
               (const int64_t *)dev.data(), n, d, bs_tensor_nrows(&tv.e));
    expect_close(env, t, name, *y, 0.0, 0.0, false);
}

static void run_gather(emu_env *env)
{
    tally t;
    t.kernel = "gather_rows_kernel";
    pair table, y, tw, yw;
    pair_init(&table, {10, 300}, -3, 3);
    pair_init(&y, {4, 300}, -1, 1);
    gather_case(env, &t, "gather [4 of 10, 300]", &y, y, table, {3, 0, 9, 3}, ew_grid(4, 300));
    gather_case(env, &t, "gather, new indices in place", &y, y, table, {9, 8, 1, 0},
                ew_grid(4, 300));
    gather_case(env, &t, "gather, grid-stride", &y, y, table, {2, 2, 7, 5}, small_grid);
    pair_init(&tw, {7, 400}, -3, 3);
    pair_init(&yw, {5, 310}, -1, 1);
    pair tv = pair_cols(tw, 50, 257), yv = pair_cols(yw, 3, 257);
    gather_case(env, &t, "gather, column views (strides 400, 310)", &yw, yv, tv, {6, 0, 6, 1, 4},
                ew_grid(5, 257));
    gather_case(env, &t, "gather, views, grid-stride", &yw, yv, tv, {0, 1, 2, 3, 4}, small_grid);
    pair y1;
    pair_init(&y1, {1, 300}, -1, 1);
    gather_case(env, &t, "gather, one row", &y1, y1, table, {5}, ew_grid(1, 300));
    /* out of range (-1, 10): zero rows, the other rows gathered, no read outside */
    std::vector<float> before(y.ebuf);
    const int64_t bad[3] = {-1, 4, 10};
    emu_launch(gather_rows_kernel, ew_grid(3, 300), dim3(EW_THREADS), 0, (float *)y.e.data,
               (int64_t)300, (const float *)table.e.data, (int64_t)300, bad, (int64_t)3,
               (int64_t)300, (int64_t)10);
    double worst = 0;
    for (int64_t r = 0; r < 4; r++)
        for (int64_t i = 0; i < 300; i++) {
            float want = r == 0 || r == 2 ? 0.0f
                         : r == 1         ? table.ebuf[(size_t)(4 * 300 + i)]
                                          : before[(size_t)(r * 300 + i)];
            float got = y.ebuf[(size_t)(r * 300 + i)];
            if (memcmp(&got, &want, sizeof(got)) != 0)
                worst = 2; /* any difference fails (the share above 1) */
        }
    expect_value(env, &t, "gather, indices -1 and 10 of 10: zero rows", worst, worst);
    t.note = "bit for bit; views, grid-stride, bad indices";
    tally_report(env, t);
}

void run_ops(emu_env *env)
{
    run_gather(env);
    run_act(env);
    run_glu(env);
    run_add(env);
    run_transpose(env);
    run_bias(env);
    run_to_half(env);
    run_act_narrow(env);
    run_glu_narrow(env);
    run_add_narrow(env);
    run_transpose_narrow(env);
}
