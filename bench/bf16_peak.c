/* The machine's BF16 dot-product limit: independent AVX512_BF16 `vdpbf16ps`
 * zmm instructions on registers, no memory traffic, on T threads (each its
 * own loop), the yardstick the CPU benchmark's --dtype bf16 measures each
 * workload's efficiency against. One zmm vdpbf16ps is 16 lanes x 2 BF16
 * multiply-adds = 64 FLOPs; 16 independent accumulators per thread cover the
 * instruction's latency.
 *
 *   bs_bf16_peak [--threads T] [--iters N] [--reps R]
 *
 * Prints one line: bf16_peak threads=T iters=N reps=R median_ms=... gflops=...
 * (gflops from the median of R timed runs, after one warm-up run). Exits 77,
 * with a message on stderr, when the CPU lacks AVX512_BF16 (or is not x86,
 * where the program is built without the kernel). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

#define ACCS         16 /* independent accumulators per thread */
#define FLOPS_PER_OP 64 /* one zmm vdpbf16ps: 32 multiply-adds */

struct worker {
    pthread_t tid;
    long iters;
    pthread_barrier_t *start, *done;
    int reps;
    float sink; /* keeps the accumulators live */
};

#if HAVE_X86
__attribute__((target("avx512f,avx512bf16"))) static float dp_loop(long iters, float seed)
{
    /* 2^-8 in every BF16 half: products are 2^-16, the sums stay finite. */
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3b80), b = a;
    /* Distinct starting values, or the compiler merges the 16 chains into one. */
#define ACC(k) _mm512_set1_ps(seed + (float)(k))
    __m512 c0 = ACC(0), c1 = ACC(1), c2 = ACC(2), c3 = ACC(3);
    __m512 c4 = ACC(4), c5 = ACC(5), c6 = ACC(6), c7 = ACC(7);
    __m512 c8 = ACC(8), c9 = ACC(9), c10 = ACC(10), c11 = ACC(11);
    __m512 c12 = ACC(12), c13 = ACC(13), c14 = ACC(14), c15 = ACC(15);
#undef ACC
    for (long i = 0; i < iters; i++) {
        c0 = _mm512_dpbf16_ps(c0, a, b);
        c1 = _mm512_dpbf16_ps(c1, a, b);
        c2 = _mm512_dpbf16_ps(c2, a, b);
        c3 = _mm512_dpbf16_ps(c3, a, b);
        c4 = _mm512_dpbf16_ps(c4, a, b);
        c5 = _mm512_dpbf16_ps(c5, a, b);
        c6 = _mm512_dpbf16_ps(c6, a, b);
        c7 = _mm512_dpbf16_ps(c7, a, b);
        c8 = _mm512_dpbf16_ps(c8, a, b);
        c9 = _mm512_dpbf16_ps(c9, a, b);
        c10 = _mm512_dpbf16_ps(c10, a, b);
        c11 = _mm512_dpbf16_ps(c11, a, b);
        c12 = _mm512_dpbf16_ps(c12, a, b);
        c13 = _mm512_dpbf16_ps(c13, a, b);
        c14 = _mm512_dpbf16_ps(c14, a, b);
        c15 = _mm512_dpbf16_ps(c15, a, b);
        /* An empty asm that claims to change a and b: the compiler cannot
         * fold the chain or hoist anything out of the loop. */
        __asm__ volatile("" : "+v"(a), "+v"(b));
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                             _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)));
    s = _mm512_add_ps(
        s, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)),
                         _mm512_add_ps(_mm512_add_ps(c12, c13), _mm512_add_ps(c14, c15))));
    return _mm512_reduce_add_ps(s);
}
#else
static float dp_loop(long iters, float seed)
{
    return seed + (float)iters; /* never called: main exits 77 first */
}
#endif

static void *worker_main(void *p)
{
    struct worker *w = p;
    float sink = 0.0f;
    for (int r = 0; r <= w->reps; r++) { /* rep 0 is the warm-up */
        pthread_barrier_wait(w->start);
        sink += dp_loop(w->iters, (float)r);
        pthread_barrier_wait(w->done);
    }
    w->sink = sink;
    return NULL;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static long arg_long(int argc, char **argv, const char *flag, long dflt)
{
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], flag) == 0)
            return atol(argv[i + 1]);
    return dflt;
}

int main(int argc, char **argv)
{
    int threads = (int)arg_long(argc, argv, "--threads", 2);
    long iters = arg_long(argc, argv, "--iters", 10000000);
    int reps = (int)arg_long(argc, argv, "--reps", 7);
    if (threads < 1 || threads > 1024 || iters < 1000 || iters > 1000000000L || reps < 1 ||
        reps > 1000) {
        fprintf(stderr,
                "usage: bs_bf16_peak [--threads 1..1024] [--iters 1000..1e9] [--reps 1..1000]\n");
        return 2;
    }
#if HAVE_X86
    __builtin_cpu_init();
    int have_bf16 = __builtin_cpu_supports("avx512bf16");
#else
    int have_bf16 = 0;
#endif
    if (!have_bf16) {
        fprintf(stderr,
                "bs_bf16_peak: this CPU has no AVX512_BF16 (vdpbf16ps); no BF16 peak to measure\n");
        return 77;
    }
    pthread_barrier_t start, done;
    struct worker *ws = calloc((size_t)threads, sizeof(*ws));
    double *ms = malloc((size_t)reps * sizeof(double));
    if (ws == NULL || ms == NULL ||
        pthread_barrier_init(&start, NULL, (unsigned)threads + 1) != 0 ||
        pthread_barrier_init(&done, NULL, (unsigned)threads + 1) != 0) {
        fprintf(stderr, "bs_bf16_peak: cannot set up %d threads\n", threads);
        return 1;
    }
    for (int t = 0; t < threads; t++) {
        ws[t] = (struct worker){.iters = iters, .start = &start, .done = &done, .reps = reps};
        if (pthread_create(&ws[t].tid, NULL, worker_main, &ws[t]) != 0) {
            fprintf(stderr, "bs_bf16_peak: pthread_create failed for thread %d\n", t);
            return 1;
        }
    }
    for (int r = 0; r <= reps; r++) {
        double t0 = now_ms();
        pthread_barrier_wait(&start);
        pthread_barrier_wait(&done);
        if (r > 0)
            ms[r - 1] = now_ms() - t0;
    }
    float sink = 0.0f;
    for (int t = 0; t < threads; t++) {
        pthread_join(ws[t].tid, NULL);
        sink += ws[t].sink;
    }
    qsort(ms, (size_t)reps, sizeof(double), cmp_double);
    double med = ms[reps / 2];
    double flops = (double)FLOPS_PER_OP * ACCS * (double)iters * threads;
    printf("bf16_peak threads=%d iters=%ld reps=%d median_ms=%.3f gflops=%.2f best_gflops=%.2f "
           "checksum=%.4g\n",
           threads, iters, reps, med, flops / (med * 1e6), flops / (ms[0] * 1e6), (double)sink);
    pthread_barrier_destroy(&start);
    pthread_barrier_destroy(&done);
    free(ws);
    free(ms);
    return 0;
}
