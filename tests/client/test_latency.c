/* Unit tests for latency percentiles and the histogram (client/latency.c),
 * against values worked out by hand and a brute-force nearest-rank count. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "latency.h"

static void test_empty(void **state)
{
    struct bs_latency l;
    struct bs_latency_summary s;
    struct bs_latency_bucket b[4];
    bs_latency_init(&l);
    bs_latency_summarize(&l, &s);
    assert_int_equal(s.count, 0);
    assert_true(s.p99_us == 0);
    assert_int_equal(bs_latency_histogram(&l, b, 4), 0);
    bs_latency_free(&l);
}

static void test_percentiles_by_hand(void **state)
{
    struct bs_latency l;
    bs_latency_init(&l);
    for (int i = 10; i >= 1; i--) /* 10, 9, ..., 1: sorting is the module's job */
        assert_int_equal(bs_latency_add(&l, i), 0);
    struct bs_latency_summary s;
    bs_latency_summarize(&l, &s);
    assert_int_equal(s.count, 10);
    assert_true(s.min_us == 1 && s.max_us == 10 && s.mean_us == 5.5);
    assert_true(s.p50_us == 5);  /* ceil(0.5 * 10) = 5th */
    assert_true(s.p90_us == 9);  /* 9th */
    assert_true(s.p95_us == 10); /* ceil(9.5) = 10th */
    assert_true(s.p99_us == 10);
    assert_true(bs_latency_percentile(&l, 100) == 10);
    assert_true(bs_latency_percentile(&l, 10) == 1);
    assert_true(bs_latency_percentile(&l, 11) == 2);
    bs_latency_free(&l);
}

/* Nearest rank by counting: the smallest sample v with count(<= v) >= p% of n. */
static double brute_percentile(const double *v, size_t n, double p)
{
    double best = 0;
    int found = 0;
    for (size_t i = 0; i < n; i++) {
        size_t le = 0;
        for (size_t j = 0; j < n; j++)
            le += v[j] <= v[i];
        if ((double)le * 100.0 >= p * (double)n && (!found || v[i] < best)) {
            best = v[i];
            found = 1;
        }
    }
    return best;
}

static void test_percentiles_random_and_merge(void **state)
{
    enum { N = 997 };
    double v[N];
    struct bs_latency a, b;
    bs_latency_init(&a);
    bs_latency_init(&b);
    uint64_t x = 12345;
    for (int i = 0; i < N; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = (double)(x >> 40) / 1000.0;
        if (i % 13 == 0 && i > 0)
            v[i] = v[i - 1];
        assert_int_equal(bs_latency_add(i % 2 ? &a : &b, v[i]), 0);
    }
    assert_int_equal(bs_latency_merge(&a, &b), 0);
    assert_int_equal(a.n, N);
    const double ps[] = {1, 50, 90, 95, 99, 99.9, 100};
    for (size_t k = 0; k < sizeof(ps) / sizeof(ps[0]); k++)
        assert_true(bs_latency_percentile(&a, ps[k]) == brute_percentile(v, N, ps[k]));
    bs_latency_free(&a);
    bs_latency_free(&b);
}

static void test_histogram(void **state)
{
    struct bs_latency l;
    struct bs_latency_bucket b[5];
    bs_latency_init(&l);
    const double v[] = {100, 110, 120, 150, 200, 200, 300, 500};
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
        bs_latency_add(&l, v[i]);
    assert_int_equal(bs_latency_histogram(&l, b, 4), 4);
    /* [100, 200], (200, 300], (300, 400], (400, 500] */
    assert_true(b[0].upper_us == 200 && b[1].upper_us == 300 && b[2].upper_us == 400 &&
                b[3].upper_us == 500);
    assert_int_equal(b[0].count, 6);
    assert_int_equal(b[1].count, 1);
    assert_int_equal(b[2].count, 0);
    assert_int_equal(b[3].count, 1);
    bs_latency_free(&l);

    /* all equal: one bucket holding everything */
    bs_latency_init(&l);
    for (int i = 0; i < 7; i++)
        bs_latency_add(&l, 42);
    assert_int_equal(bs_latency_histogram(&l, b, 5), 1);
    assert_int_equal(b[0].count, 7);
    assert_true(b[0].upper_us == 42);
    bs_latency_free(&l);

    /* counts always add up, whatever the spread */
    bs_latency_init(&l);
    uint64_t x = 7;
    for (int i = 0; i < 5000; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        bs_latency_add(&l, 1.0 + (double)(x >> 33) * 1e-3);
    }
    struct bs_latency_bucket h[10];
    int n = bs_latency_histogram(&l, h, 10);
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += h[i].count;
    assert_int_equal(n, 10);
    assert_int_equal(total, 5000);
    bs_latency_free(&l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_percentiles_by_hand),
        cmocka_unit_test(test_percentiles_random_and_merge),
        cmocka_unit_test(test_histogram),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
