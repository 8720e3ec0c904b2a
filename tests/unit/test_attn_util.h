/* Helpers shared by the CPU attention tests (test_cpu_ops, test_attn_bf16,
 * test_attn_ragged): scaled random data, BF16 rounding as the kernels
 * round, and the mask rule's row kinds. Include after test_rand.h. */
#ifndef BS_TEST_ATTN_UTIL_H
#define BS_TEST_ATTN_UTIL_H

#include <float.h>
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

#endif
