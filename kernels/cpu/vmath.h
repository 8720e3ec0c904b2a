/* Branch-free float math for the CPU kernels: exp, erf, tanh, sigmoid and the
 * activations built on them.
 *
 * Every function is plain C with no data-dependent branches (only selects that
 * compile to blends), so a loop that calls one is auto-vectorised by gcc -O3
 * with -march=x86-64-v3 (AVX2 + FMA) and still gives the same results, one
 * element at a time, on any other target. No errno, no libm calls except fmaf
 * where the target has a fused multiply-add instruction.
 *
 * Accuracy over the whole float range (measured in tests/unit/test_cpu_ops.c
 * against double-precision libm):
 *   bs_expf      relative error < 2e-7 for normal results; exactly 0 below
 *                -87 (no subnormals), +inf above 88.73 (the float overflow
 *                point), NaN stays NaN.
 *   bs_erff      absolute error < 3e-7.
 *   bs_tanhf     absolute error < 3e-7.
 *   activations  absolute error < 1e-6 * max(1, |x|), no NaN or inf for
 *                finite inputs. */
#ifndef BS_VMATH_H
#define BS_VMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__FMA__) || defined(__FP_FAST_FMAF)
#define BS_FMAF(a, b, c) fmaf((a), (b), (c))
#else
#define BS_FMAF(a, b, c) ((a) * (b) + (c))
#endif

static inline uint32_t bs__f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float bs__u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* e^x. x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), e^r by its
 * degree-7 Taylor polynomial, then scaled by 2^n as two factors 2^(n/2) and
 * 2^(n - n/2) so that n = 128 (x up to the overflow point) works.
 * Results below FLT_MIN are flushed to 0 (x < -87): subnormal arithmetic costs
 * a microcode assist per vector on x86, and softmax over masked scores hits
 * that range all the time. Relies on arithmetic right shift of negative ints
 * (gcc, clang). */
static inline float bs_expf(float x)
{
    float flush = x < -87.0f ? 0.0f : 1.0f;
    x = x < -87.0f ? -87.0f : x; /* comparisons are false for NaN: it passes */
    x = x > 89.0f ? 89.0f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = BS_FMAF(x, 1.44269504088896341f, magic);
    float n = t - magic;
    int32_t ni = (int32_t)(bs__f2u(t) - bs__f2u(magic));
    float r = BS_FMAF(n, -0.693145751953125f, x); /* ln2 high part: exact product */
    r = BS_FMAF(n, -1.42860682030941723212e-6f, r);
    float p = 1.0f / 5040.0f;
    p = BS_FMAF(p, r, 1.0f / 720.0f);
    p = BS_FMAF(p, r, 1.0f / 120.0f);
    p = BS_FMAF(p, r, 1.0f / 24.0f);
    p = BS_FMAF(p, r, 1.0f / 6.0f);
    p = BS_FMAF(p, r, 0.5f);
    p = BS_FMAF(p, r, 1.0f);
    p = BS_FMAF(p, r, 1.0f);
    int32_t n1 = ni >> 1, n2 = ni - n1; /* both in [-63, 65] */
    float s1 = bs__u2f((uint32_t)(n1 + 127) << 23);
    float s2 = bs__u2f((uint32_t)(n2 + 127) << 23);
    return p * s1 * s2 * flush;
}

/* erfc(z) for z >= 0: Chebyshev fit with relative error < 1.2e-7 (the
 * classic erfc approximation of Numerical Recipes, section 6.2). */
static inline float bs__erfcf_pos(float z)
{
    float t = 1.0f / BS_FMAF(0.5f, z, 1.0f);
    float p = 0.17087277f;
    p = BS_FMAF(p, t, -0.82215223f);
    p = BS_FMAF(p, t, 1.48851587f);
    p = BS_FMAF(p, t, -1.13520398f);
    p = BS_FMAF(p, t, 0.27886807f);
    p = BS_FMAF(p, t, -0.18628806f);
    p = BS_FMAF(p, t, 0.09678418f);
    p = BS_FMAF(p, t, 0.37409196f);
    p = BS_FMAF(p, t, 1.00002368f);
    p = BS_FMAF(p, t, -1.26551223f);
    z = z > 12.0f ? 12.0f : z; /* erfc(12) is 0 in float; keeps -z*z finite */
    return t * bs_expf(BS_FMAF(-z, z, p));
}

static inline float bs_erff(float x)
{
    float v = 1.0f - bs__erfcf_pos(fabsf(x));
    return x < 0.0f ? -v : v; /* a select of +-v: gcc if-converts it */
}

/* tanh(x) = (1 - e^-2|x|) / (1 + e^-2|x|) with the sign of x. */
static inline float bs_tanhf(float x)
{
    float e = bs_expf(-2.0f * fabsf(x));
    float t = (1.0f - e) / (1.0f + e);
    return x < 0.0f ? -t : t;
}

static inline float bs_sigmoidf(float x)
{
    return 1.0f / (1.0f + bs_expf(-x));
}

/* x Phi(x), Phi the normal CDF = erfc(-x/sqrt2)/2: for x < 0 it is computed
 * from erfc directly, without cancellation. */
static inline float bs_geluf(float x)
{
    float h = 0.5f * bs__erfcf_pos(fabsf(x) * 0.70710678118654752f);
    /* Phi = h for x < 0, else 1 - h; written as two selects between values
     * computed unconditionally, which gcc if-converts (a select of h and
     * 1 - h is not, because 1 - h would be computed under a condition). */
    float hs = x < 0.0f ? h : -h;
    float base = x < 0.0f ? 0.0f : 1.0f;
    return x * (base + hs);
}

/* 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3). */
static inline float bs_gelu_tanhf(float x)
{
    float u = 0.7978845608028654f * BS_FMAF(0.044715f * x, x * x, x);
    return x / (1.0f + bs_expf(-2.0f * u));
}

static inline float bs_quick_geluf(float x)
{
    return x / (1.0f + bs_expf(-1.702f * x));
}

static inline float bs_siluf(float x)
{
    return x / (1.0f + bs_expf(-x));
}

/* x tanh(log(1 + e^x)) = x n / (n + 2) with n = e^x (e^x + 2); for x > 20 the
 * ratio is 1 in float, so e^x is capped there to keep n finite. */
static inline float bs_mishf(float x)
{
    float u = bs_expf(x > 20.0f ? 20.0f : x);
    float n = u * (u + 2.0f);
    return x * (n / (n + 2.0f));
}

#endif
