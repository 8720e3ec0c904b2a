/* The kernels of linear_kernels.cuh (linear and linear_act on the GPU)
 * under emulation: the conversion of x to the compute dtype from each other
 * activation dtype (its twin: bs_convert_from_f32 of the widened values, bit
 * for bit) with its overflow flag; act in place and glu after the GEMM in
 * F32, BF16 and FP16 against the CPU backend's act and glu on the widened
 * values, rounded (at most 1 ulp of the dtype apart, or the F32
 * tolerance); the fallback's accumulator seed (b + beta y) and its store
 * (rounded once), exactly. Strided rows (the columns beyond a view must stay
 * as they were) and a grid smaller than the work (the loops). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "emu_common.h"
#include "linear_kernels.cuh"

#define CPU env->cpu.iface
#define CC  env->cpu.ctx

static const dim3 small_grid(1, 2);

static const char *const act_names[BS_ACT_COUNT] = {"none",       "gelu", "gelu_tanh",
                                                    "quick_gelu", "silu", "mish"};

template <typename T> struct lt;
template <> struct lt<float> {
    static constexpr enum bs_dtype dt = BS_TYPE_F32;
    static constexpr const char *name = "float";
    static constexpr double ulp = 0; /* relative, at most */
};
template <> struct lt<__nv_bfloat16> {
    static constexpr enum bs_dtype dt = BS_TYPE_BF16;
    static constexpr const char *name = "__nv_bfloat16";
    static constexpr double ulp = 1.0 / 128;
};
template <> struct lt<__half> {
    static constexpr enum bs_dtype dt = BS_TYPE_F16;
    static constexpr const char *name = "__half";
    static constexpr double ulp = 1.0 / 1024;
};

/* n random values in [lo, hi) as T holds them: the T storage and the F32 values. */
template <typename T>
static void rand_t(std::vector<T> *raw, std::vector<float> *f, size_t n, float lo, float hi)
{
    f->resize(n);
    raw->resize(n);
    for (size_t i = 0; i < n; i++)
        (*f)[i] = frand(lo, hi);
    bs_convert_from_f32(raw->data(), lt<T>::dt, f->data(), (int64_t)n);
    bs_convert_to_f32(f->data(), raw->data(), lt<T>::dt, (int64_t)n);
}

template <typename T> static std::vector<float> widen(const std::vector<T> &raw)
{
    std::vector<float> f(raw.size());
    bs_convert_to_f32(f.data(), raw.data(), lt<T>::dt, (int64_t)raw.size());
    return f;
}

/* got against want rounded to T: |d| <= atol + rtol |want|. */
template <typename T>
static void expect_t(emu_env *env, tally *t, const char *name, const std::vector<T> &got_raw,
                     std::vector<float> want, double atol, double rtol)
{
    std::vector<T> tmp(want.size());
    bs_convert_from_f32(tmp.data(), lt<T>::dt, want.data(), (int64_t)want.size());
    want = widen(tmp);
    std::vector<float> got = widen(got_raw);
    double worst = 0, max_abs = 0;
    for (size_t i = 0; i < want.size(); i++) {
        /* equal values (an overflow's inf too) differ by nothing */
        double d = got[i] == want[i] ? 0 : fabs((double)got[i] - (double)want[i]);
        double r = d == 0 ? 0 : d / (atol + rtol * fabs((double)want[i]));
        if (!(r <= worst))
            worst = isnan(r) ? INFINITY : r;
        if (d > max_abs || isnan(d))
            max_abs = d;
    }
    expect_value(env, t, name, max_abs, worst);
}

/* ---- lin_convert_kernel ------------------------------------------------------- */

template <typename TO, typename TI> static void convert_case(emu_env *env, tally *t, bool ovf)
{
    const int64_t rows = 5, cols = 300, ld = 333;
    std::vector<TI> src;
    std::vector<float> f;
    rand_t(&src, &f, (size_t)(rows * ld), -3, 3);
    if (ovf) { /* beyond FP16's range, held by BF16 */
        f[ld + 7] = 70000.0f;
        bs_convert_from_f32(&src[ld + 7], lt<TI>::dt, &f[ld + 7], 1);
    }
    std::vector<float> want((size_t)(rows * cols));
    for (int64_t r = 0; r < rows; r++)
        memcpy(&want[r * cols], &f[r * ld], (size_t)cols * sizeof(float));
    for (int g = 0; g < 2; g++) {
        std::vector<TO> dst((size_t)(rows * cols));
        int flag = 0;
        emu_launch(lin_convert_kernel<TO, TI>, g ? small_grid : lin_grid(rows, cols),
                   dim3(LIN_THREADS), 0, dst.data(), (const TI *)src.data(), rows, cols, ld, &flag,
                   4);
        char name[128];
        snprintf(name, sizeof(name), "lin_convert %s -> %s%s%s", lt<TI>::name, lt<TO>::name,
                 ovf ? ", overflow" : "", g ? ", small grid" : "");
        expect_t(env, t, name, dst, want, 0, 0); /* bit for bit */
        expect_value(env, t, "overflow flag", fabs((double)flag - (ovf ? 4 : 0)),
                     flag == (ovf ? 4 : 0) ? 0 : INFINITY);
    }
}

static void run_convert(emu_env *env)
{
    tally t;
    t.kernel = "lin_convert_kernel";
    convert_case<__nv_bfloat16, float>(env, &t, false);
    convert_case<__nv_bfloat16, __half>(env, &t, false);
    convert_case<__half, float>(env, &t, false);
    convert_case<__half, __nv_bfloat16>(env, &t, false);
    convert_case<__half, __nv_bfloat16>(env, &t, true);
    convert_case<float, __nv_bfloat16>(env, &t, false);
    convert_case<float, __half>(env, &t, false);
    t.note = "every (compute, x) dtype pair, strided x, the fp16 overflow flag";
    tally_report(env, t);
}

/* ---- lin_act_kernel and lin_glu_kernel ------------------------------------------- */

template <typename T> static void act_cases(emu_env *env, tally *ta, tally *tg)
{
    const int64_t rows = 3, cols = 257, ld = 300, n = 140;
    double rtol = lt<T>::ulp > TOL_EW ? lt<T>::ulp : TOL_EW;
    for (int a = 0; a < BS_ACT_COUNT; a++)
        for (int g = 0; g < 2; g++) {
            char name[128];
            struct bs_err err = {};
            /* act in place on a column view [0, cols) of rows of ld */
            std::vector<T> y;
            std::vector<float> yf;
            rand_t(&y, &yf, (size_t)(rows * ld), -8, 8);
            int64_t ne[2] = {rows, ld};
            struct bs_tensor whole = bs_tensor_make(BS_TYPE_F32, 2, ne, yf.data());
            struct bs_tensor v = bs_tensor_view_cols(&whole, 0, cols);
            check_cpu(CPU->act(CC, &v, &v, (enum bs_act)a, &err), &err, "act");
            emu_launch(lin_act_kernel<T>, g ? small_grid : lin_grid(rows, cols), dim3(LIN_THREADS),
                       0, y.data(), ld, rows, cols, a);
            snprintf(name, sizeof(name), "lin_act %s %s%s", lt<T>::name, act_names[a],
                     g ? ", small grid" : "");
            expect_t(env, ta, name, y, yf, TOL_EW, rtol);

            /* glu: h [rows, 2n] into y, a view of rows of ld */
            std::vector<T> h, yo;
            std::vector<float> hf, yof;
            rand_t(&h, &hf, (size_t)(rows * 2 * n), -6, 6);
            rand_t(&yo, &yof, (size_t)(rows * ld), -1, 1);
            int64_t hne[2] = {rows, 2 * n}, yne[2] = {rows, ld};
            struct bs_tensor ht = bs_tensor_make(BS_TYPE_F32, 2, hne, hf.data());
            struct bs_tensor yw = bs_tensor_make(BS_TYPE_F32, 2, yne, yof.data());
            struct bs_tensor yv = bs_tensor_view_cols(&yw, 3, n);
            check_cpu(CPU->glu(CC, &yv, &ht, (enum bs_act)a, &err), &err, "glu");
            emu_launch(lin_glu_kernel<T>, g ? small_grid : lin_grid(rows, n), dim3(LIN_THREADS), 0,
                       yo.data() + 3, ld, (const T *)h.data(), 2 * n, rows, n, a);
            snprintf(name, sizeof(name), "lin_glu %s %s%s", lt<T>::name, act_names[a],
                     g ? ", small grid" : "");
            expect_t(env, tg, name, yo, yof, TOL_EW, rtol);
        }
}

/* ---- the fallback's seed and store --------------------------------------------- */

template <typename T> static void fallback_cases(emu_env *env, tally *ts, tally *tt)
{
    const int64_t rows = 4, n = 270, ld = 301;
    for (int c = 0; c < 3; c++) { /* bias and beta 1, bias and beta 0, beta 1 alone */
        bool bias = c < 2;
        float beta = c == 1 ? 0.0f : 1.0f;
        std::vector<T> y;
        std::vector<float> yf, b((size_t)n);
        rand_t(&y, &yf, (size_t)(rows * ld), -1, 1);
        for (auto &v : b)
            v = frand(-1, 1);
        std::vector<float> acc((size_t)(rows * n), NAN), want((size_t)(rows * n));
        for (int64_t r = 0; r < rows; r++)
            for (int64_t i = 0; i < n; i++) {
                float v = bias ? b[i] : 0.0f;
                want[r * n + i] = beta != 0.0f ? v + yf[r * ld + 2 + i] : v;
            }
        emu_launch(lin_seed_kernel<T>, c == 2 ? small_grid : lin_grid(rows, n), dim3(LIN_THREADS),
                   0, acc.data(), (const T *)y.data() + 2, ld,
                   bias ? (const float *)b.data() : (const float *)NULL, rows, n, beta);
        char name[128];
        snprintf(name, sizeof(name), "lin_seed %s%s, beta %g", lt<T>::name, bias ? ", bias" : "",
                 (double)beta);
        std::vector<float> acc_raw = acc; /* F32: compare exactly */
        expect_t<float>(env, ts, name, acc_raw, want, 0, 0);

        /* store: y's view [2, 2 + n) = acc rounded once; the rest unchanged */
        std::vector<float> yw = yf;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t i = 0; i < n; i++)
                yw[r * ld + 2 + i] = want[r * n + i] * 3.0f;
        for (auto &v : want)
            v *= 3.0f;
        emu_launch(lin_store_kernel<T>, c == 2 ? small_grid : lin_grid(rows, n), dim3(LIN_THREADS),
                   0, y.data() + 2, ld, (const float *)want.data(), rows, n);
        snprintf(name, sizeof(name), "lin_store %s, case %d", lt<T>::name, c);
        expect_t(env, tt, name, y, yw, 0, 0);
    }
}

void run_linear(emu_env *env)
{
    run_convert(env);
    tally ta, tg, ts, tt;
    ta.kernel = "lin_act_kernel", tg.kernel = "lin_glu_kernel";
    ts.kernel = "lin_seed_kernel", tt.kernel = "lin_store_kernel";
    act_cases<float>(env, &ta, &tg);
    act_cases<__nv_bfloat16>(env, &ta, &tg);
    act_cases<__half>(env, &ta, &tg);
    fallback_cases<__nv_bfloat16>(env, &ts, &tt);
    fallback_cases<__half>(env, &ts, &tt);
    ta.note = tg.note = "every act, F32/BF16/FP16, strided rows, small grid";
    ts.note = tt.note = "BF16/FP16 y, bias or none, beta 0 or 1, strided rows";
    tally_report(env, ta);
    tally_report(env, tg);
    tally_report(env, ts);
    tally_report(env, tt);
}
