/* Latency samples, percentiles and histogram. */
#include "latency.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

void bs_latency_init(struct bs_latency *l)
{
    memset(l, 0, sizeof(*l));
}

void bs_latency_free(struct bs_latency *l)
{
    free(l->us);
    bs_latency_init(l);
}

static int reserve(struct bs_latency *l, size_t extra)
{
    if (l->n + extra <= l->cap)
        return 0;
    size_t cap = l->cap ? l->cap : 1024;
    while (cap < l->n + extra)
        cap *= 2;
    double *p = realloc(l->us, cap * sizeof(*p));
    if (p == NULL)
        return BS_ENOMEM;
    l->us = p;
    l->cap = cap;
    return 0;
}

int bs_latency_add(struct bs_latency *l, double us)
{
    if (reserve(l, 1) != 0)
        return BS_ENOMEM;
    l->us[l->n++] = us;
    l->sorted = false;
    return 0;
}

int bs_latency_merge(struct bs_latency *dst, const struct bs_latency *src)
{
    if (src->n == 0)
        return 0;
    if (reserve(dst, src->n) != 0)
        return BS_ENOMEM;
    memcpy(dst->us + dst->n, src->us, src->n * sizeof(*src->us));
    dst->n += src->n;
    dst->sorted = false;
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void sort(struct bs_latency *l)
{
    if (!l->sorted && l->n > 1)
        qsort(l->us, l->n, sizeof(*l->us), cmp_double);
    l->sorted = true;
}

double bs_latency_percentile(struct bs_latency *l, double p)
{
    if (l->n == 0)
        return 0;
    sort(l);
    double rank = ceil(p / 100.0 * (double)l->n); /* 1-based */
    size_t i = rank < 1 ? 0 : (size_t)rank - 1;
    return l->us[i < l->n ? i : l->n - 1];
}

void bs_latency_summarize(struct bs_latency *l, struct bs_latency_summary *s)
{
    memset(s, 0, sizeof(*s));
    if (l->n == 0)
        return;
    sort(l);
    double sum = 0;
    for (size_t i = 0; i < l->n; i++)
        sum += l->us[i];
    s->count = l->n;
    s->min_us = l->us[0];
    s->max_us = l->us[l->n - 1];
    s->mean_us = sum / (double)l->n;
    s->p50_us = bs_latency_percentile(l, 50);
    s->p90_us = bs_latency_percentile(l, 90);
    s->p95_us = bs_latency_percentile(l, 95);
    s->p99_us = bs_latency_percentile(l, 99);
}

int bs_latency_histogram(struct bs_latency *l, struct bs_latency_bucket *b, int n)
{
    if (l->n == 0 || n < 1)
        return 0;
    sort(l);
    double lo = l->us[0], hi = l->us[l->n - 1];
    if (hi <= lo)
        n = 1;
    size_t j = 0;
    for (int i = 0; i < n; i++) {
        b[i].upper_us = i == n - 1 ? hi : lo + (hi - lo) * (double)(i + 1) / (double)n;
        b[i].count = 0;
        while (j < l->n && (l->us[j] <= b[i].upper_us || i == n - 1)) {
            b[i].count++;
            j++;
        }
    }
    return n;
}
