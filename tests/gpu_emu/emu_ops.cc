/* The kernels of ops_kernels.cuh under emulation against the CPU backend's
 * ops (the norms: emu_norm.cc): every
 * activation and gated unit; gated adds; transposes with partial tiles; the
 * bias rows of linear (its CPU twin: linear with K = 0); the F32 to BF16/FP16
 * conversion (its twin: bs_convert_from_f32, bit for bit) and its overflow
 * flag (overflow.cuh), with the message the backend turns it into. The elementwise
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
        emu_launch(act_kernel, ew_grid(3, 257), dim3(EW_THREADS), 0, (float *)y.e.data,
                   (int64_t)257, (const float *)xs.e.data, (int64_t)400, (int64_t)3, (int64_t)257,
                   act);
        snprintf(name, sizeof(name), "act %s [3,257]", act_names[act]);
        expect_close(env, &t, name, y, TOL_EW, TOL_EW, false);
        pair xv = pair_cols(x, 50, 300); /* in place on a view, on the small grid */
        check_cpu(CPU->act(CC, &xv.c, &xv.c, (enum bs_act)act, &err), &err, "act");
        emu_launch(act_kernel, small_grid, dim3(EW_THREADS), 0, (float *)xv.e.data, (int64_t)400,
                   (const float *)xv.e.data, (int64_t)400, (int64_t)3, (int64_t)300, act);
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
        emu_launch(glu_kernel, ew_grid(3, 300), dim3(EW_THREADS), 0, (float *)h.e.data,
                   (int64_t)300, (const float *)g.e.data, (int64_t)600, (int64_t)3, (int64_t)300,
                   act);
        snprintf(name, sizeof(name), "glu %s [3,600]", act_names[act]);
        expect_close(env, &t, name, h, TOL_EW, TOL_EW, false);
        pair gv = pair_cols(g, 0, 300); /* y is the first half of x */
        check_cpu(CPU->glu(CC, &gv.c, &g.c, (enum bs_act)act, &err), &err, "glu");
        emu_launch(glu_kernel, small_grid, dim3(EW_THREADS), 0, (float *)g.e.data, (int64_t)600,
                   (const float *)g.e.data, (int64_t)600, (int64_t)3, (int64_t)300, act);
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
    struct add_args a = {(float *)y->e.data,
                         (const float *)x->e.data,
                         edata(gate),
                         bs_tensor_ld(&y->e),
                         bs_tensor_ld(&x->e),
                         eld(gate),
                         rows,
                         n,
                         rps < 1 ? 1 : rps,
                         alpha};
    emu_launch(add_kernel, grid, dim3(EW_THREADS), 0, a);
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
        emu_launch(transpose_kernel, grid, dim3(TR_TILE, 8), 0, (float *)y.e.data,
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

void run_ops(emu_env *env)
{
    run_act(env);
    run_glu(env);
    run_add(env);
    run_transpose(env);
    run_bias(env);
    run_to_half(env);
}
