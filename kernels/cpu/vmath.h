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
 *   bs_erff      absolute error < 1.5e-7.
 *   bs_tanhf     absolute error < 2e-7.
 *   activations  absolute error < 3e-7 * max(1, |x|), no NaN or inf for
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

/* c ? a : b on the bits. gcc does not if-convert a select between two
 * computed floats (it sinks their computation into the branches, which
 * -ftrapping-math then forbids to speculate); an integer select it does. */
static inline float bs__selectf(int c, float a, float b)
{
    uint32_t m = 0u - (uint32_t)(c != 0);
    return bs__u2f((bs__f2u(a) & m) | (bs__f2u(b) & ~m));
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

/* erf: for |x| < 0.8 its Taylor series to x^21 (truncation < 2e-10), where
 * 1 - erfc would lose bits to cancellation; above, 1 - erfc(|x|) with the
 * sign of x. Both are computed and one is selected (no branch). */
static inline float bs_erff(float x)
{
    float x2 = x * x;
    float p = 1.480719282e-08f;
    p = BS_FMAF(p, x2, -1.636584469e-07f);
    p = BS_FMAF(p, x2, 1.646211437e-06f);
    p = BS_FMAF(p, x2, -1.492565036e-05f);
    p = BS_FMAF(p, x2, 1.205533298e-04f);
    p = BS_FMAF(p, x2, -8.548327023e-04f);
    p = BS_FMAF(p, x2, 5.223977625e-03f);
    p = BS_FMAF(p, x2, -2.686617065e-02f);
    p = BS_FMAF(p, x2, 1.128379167e-01f);
    p = BS_FMAF(p, x2, -3.761263890e-01f);
    p = BS_FMAF(p, x2, 1.128379167e+00f);
    float small = x * p;
    float big = copysignf(1.0f - bs__erfcf_pos(fabsf(x)), x);
    return bs__selectf(x2 < 0.64f, small, big);
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
    return x * bs__selectf(x < 0.0f, h, 1.0f - h);
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
