/* Random test data for the CPU op tests: a xorshift64 sequence of uniform
 * floats. Include after cmocka.h; define TEST_RNG_SEED before including to
 * give a file its own sequence. */
#ifndef BS_TEST_RAND_H
#define BS_TEST_RAND_H

#include <stdint.h>
#include <stdlib.h>

#ifndef TEST_RNG_SEED
#define TEST_RNG_SEED 0x2545f4914f6cdd1dull
#endif

static uint64_t rng = TEST_RNG_SEED;

/* Uniform in [-1, 1). */
static inline float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* n values of frand (at least one float allocated); free with free. */
static inline float *alloc_rand(int64_t n)
{
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    assert_non_null(p);
    for (int64_t i = 0; i < n; i++)
        p[i] = frand();
    return p;
}

#endif
