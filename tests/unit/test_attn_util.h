/* Helpers shared by the CPU attention tests (test_cpu_ops, test_attn_bf16,
 * test_attn_ragged): scaled random data, BF16 rounding as the kernels
 * round, the mask rule's row kinds, and one row of attention by that rule
 * in double. Include after test_rand.h. */
#ifndef BS_TEST_ATTN_UTIL_H
#define BS_TEST_ATTN_UTIL_H

#include <float.h>
#include <stdbool.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float *alloc_scaled(int64_t n, float scale)
{
    float *p = alloc_rand(n);
    for (int64_t i = 0; i < n; i++)
        p[i] *= scale;
    return p;
}

/* x rounded to BF16 as vcvtne2ps2bf16 rounds it: to nearest even, subnormal
 * inputs and results to 0 (no test value is subnormal, NaN or inf). */
static inline float bf16_round(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0)
        u &= 0x80000000u;
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    if ((u & 0x7f800000u) == 0)
        u &= 0x80000000u;
    memcpy(&x, &u, 4);
    return x;
}

/* Mask row r of FILL_RULE, key j of lk (u uniform in [-1, 1)): row r % 8 is
 * all -FLT_MAX (torch.finfo(float32).min), all -inf, -inf then -FLT_MAX on
 * odd keys of the second half (and the last key), -FLT_MAX among finite
 * values, all -10000, -inf among finite values, -FLT_MAX, -inf and 0 mixed,
 * all 30000. */
static inline float rule_value(int64_t r, int64_t j, int64_t lk, float u)
{
    switch (r % 8) {
    case 0:
        return -FLT_MAX;
    case 1:
        return -INFINITY;
    case 2:
        return j == lk - 1 || (j >= lk / 2 && j % 2) ? -FLT_MAX : -INFINITY;
    case 3:
        return u < -0.4f ? -FLT_MAX : 0.5f * frand();
    case 4:
        return -10000.0f;
    case 5:
        return u < -0.4f ? -INFINITY : 0.5f * frand();
    case 6:
        return u < -0.3f ? -FLT_MAX : u < 0.3f ? -INFINITY : 0.0f;
    default:
        return 30000.0f;
    }
}

/* One query row of one head by the mask rule, in double: q (head_dim
 * values, scaled here in FP32 as the kernels scale), key j at k + j * ldk,
 * value j at v + j * ldv, mr the row's mask (NULL: none) over lk keys;
 * bf16: q, k and v rounded as the BF16 kernels round them. out gets the
 * row, bnd P's rounding bound per element (sum of |p v|); s (lk doubles)
 * and qr (hd floats) are scratch. Returns false where the row has nothing
 * to attend to (out is then 0). */
static inline bool ref_attend_row(const float *q, float scale, const float *k, int64_t ldk,
                                  const float *v, int64_t ldv, int64_t lk, int hd, const float *mr,
                                  bool bf16, double *s, float *qr, double *out, double *bnd)
{
    double mx = -INFINITY, sum = 0.0, mm = -INFINITY;
    for (int d = 0; d < hd; d++) {
        float sq = scale * q[d]; /* FP32, as the kernels scale */
        qr[d] = bf16 ? bf16_round(sq) : sq;
    }
    /* the mask rule: its row's maximum mm, masked keys, uniform rows */
    for (int64_t j = 0; mr && j < lk; j++)
        mm = fmax(mm, mr[j]);
    for (int64_t j = 0; j < lk; j++) {
        const float *kj = k + j * ldk;
        double d = 0.0;
        for (int e = 0; e < hd; e++)
            d += (double)qr[e] * (bf16 ? bf16_round(kj[e]) : kj[e]);
        if (mr && mm == -FLT_MAX) /* all masked, some at -FLT_MAX: uniform */
            d = mr[j] == -FLT_MAX ? 0.0 : -INFINITY;
        else if (mr)
            d = mr[j] <= -FLT_MAX ? -INFINITY : d + ((double)mr[j] - mm);
        s[j] = d;
        mx = fmax(mx, d);
    }
    for (int d = 0; d < hd; d++)
        out[d] = bnd[d] = 0.0;
    if (mx == -INFINITY)
        return false;
    for (int64_t j = 0; j < lk; j++)
        sum += s[j] = exp(s[j] - mx);
    for (int64_t j = 0; j < lk; j++) {
        const float *vj = v + j * ldv;
        for (int d = 0; d < hd; d++) {
            double vv = bf16 ? bf16_round(vj[d]) : vj[d];
            out[d] += s[j] / sum * vv;
            bnd[d] += s[j] / sum * fabs(vv);
        }
    }
    return true;
}

#endif
