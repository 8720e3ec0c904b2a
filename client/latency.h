/* Latency samples of a load test: exact percentiles (nearest rank over every
 * sample kept) and a linear histogram between the fastest and slowest call,
 * as ghz prints them. Not thread-safe: keep one per thread and merge. */
#ifndef BS_LATENCY_H
#define BS_LATENCY_H

#include <stdbool.h>
#include <stddef.h>

struct bs_latency {
    double *us; /* samples in microseconds */
    size_t n, cap;
    bool sorted;
};

struct bs_latency_summary {
    size_t count;
    double min_us, mean_us, max_us;
    double p50_us, p90_us, p95_us, p99_us;
};

struct bs_latency_bucket {
    double upper_us; /* samples in (previous upper, upper] land here (the first: [min, upper]) */
    size_t count;
};

/* An empty sample set. */
void bs_latency_init(struct bs_latency *l);

/* Release the samples; the set is empty again afterwards. */
void bs_latency_free(struct bs_latency *l);

/* Record one sample; returns 0, or BS_ENOMEM (the sample is then lost). */
int bs_latency_add(struct bs_latency *l, double us);

/* Append every sample of src to dst; returns 0 or BS_ENOMEM. */
int bs_latency_merge(struct bs_latency *dst, const struct bs_latency *src);

/* The p-th percentile (0 < p <= 100) by nearest rank: the smallest sample
 * with at least p% of all samples at or below it; 0 when empty. */
double bs_latency_percentile(struct bs_latency *l, double p);

/* Count, min, mean, max and p50/p90/p95/p99 (all 0 when empty). */
void bs_latency_summarize(struct bs_latency *l, struct bs_latency_summary *s);

/* Split [min, max] into n equal buckets and count the samples of each; the
 * counts add up to the sample count. Returns the number of buckets filled
 * (0 when empty, 1 when every sample is equal). */
int bs_latency_histogram(struct bs_latency *l, struct bs_latency_bucket *b, int n);

#endif
