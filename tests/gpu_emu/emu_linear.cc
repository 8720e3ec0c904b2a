/* The kernels of linear_kernels.cuh (linear and linear_act on the GPU)
 * under emulation: the conversion of x to the compute dtype from each other
 * activation dtype (its twin: bs_convert_from_f32 of the widened values, bit
 * for bit) with its overflow flag; the fallback's accumulator seed (b +
 * beta y), exactly. Strided rows and a grid smaller than the work (the
 * loops). The fallback's store (act_kernel<T, float>, BS_ACT_NONE) and the
 * act and glu after a GEMM are the ops' own kernels, tested with them
 * (emu_ops.cc: every dtype pair). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "emu_common.h"
#include "linear_kernels.cuh"

static const dim3 small_grid(1, 2);

template <typename T> struct lt;
template <> struct lt<float> {
    static constexpr enum bs_dtype dt = BS_TYPE_F32;
    static constexpr const char *name = "float";
};
template <> struct lt<__nv_bfloat16> {
    static constexpr enum bs_dtype dt = BS_TYPE_BF16;
    static constexpr const char *name = "__nv_bfloat16";
};
template <> struct lt<__half> {
    static constexpr enum bs_dtype dt = BS_TYPE_F16;
    static constexpr const char *name = "__half";
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
        emu_launch(lin_convert_kernel<TO, TI>, g ? small_grid : ew_grid(rows, cols),
                   dim3(EW_THREADS), 0, dst.data(), (const TI *)src.data(), rows, cols, ld, &flag,
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

/* ---- the fallback's seed and store --------------------------------------------- */

template <typename T> static void fallback_cases(emu_env *env, tally *ts)
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
        emu_launch(lin_seed_kernel<T>, c == 2 ? small_grid : ew_grid(rows, n), dim3(EW_THREADS), 0,
                   acc.data(), (const T *)y.data() + 2, ld,
                   bias ? (const float *)b.data() : (const float *)NULL, rows, n, beta);
        char name[128];
        snprintf(name, sizeof(name), "lin_seed %s%s, beta %g", lt<T>::name, bias ? ", bias" : "",
                 (double)beta);
        std::vector<float> acc_raw = acc; /* F32: compare exactly */
        expect_t<float>(env, ts, name, acc_raw, want, 0, 0);
    }
}

void run_linear(emu_env *env)
{
    run_convert(env);
    tally ts;
    ts.kernel = "lin_seed_kernel";
    fallback_cases<__nv_bfloat16>(env, &ts);
    fallback_cases<__half>(env, &ts);
    ts.note = "the fallback for a BF16/FP16 y: bias or none, beta 0 or 1, strided rows";
    tally_report(env, ts);
}
