/* The machine's GEMM peak as OpenBLAS reaches it: cblas_sgemm on a large
 * square FP32 problem with OpenBLAS's own threading, the yardstick the CPU
 * benchmark measures each workload's efficiency against.
 *
 *   bs_sgemm_peak [--n N] [--threads T] [--reps R]
 *
 * Prints one line: sgemm n=N threads=T reps=R median_ms=... gflops=... */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

static int arg_int(int argc, char **argv, const char *flag, int dflt)
{
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], flag) == 0)
            return atoi(argv[i + 1]);
    return dflt;
}

int main(int argc, char **argv)
{
    int n = arg_int(argc, argv, "--n", 2048);
    int threads = arg_int(argc, argv, "--threads", 2);
    int reps = arg_int(argc, argv, "--reps", 7);
    if (n < 64 || n > 16384 || threads < 1 || reps < 1 || reps > 1000) {
        fprintf(stderr, "usage: bs_sgemm_peak [--n 64..16384] [--threads T>=1] [--reps 1..1000]\n");
        return 2;
    }
    size_t nn = (size_t)n * (size_t)n;
    float *a = malloc(nn * sizeof(float)), *b = malloc(nn * sizeof(float));
    float *c = malloc(nn * sizeof(float));
    double *ms = malloc((size_t)reps * sizeof(double));
    if (a == NULL || b == NULL || c == NULL || ms == NULL) {
        fprintf(stderr, "bs_sgemm_peak: out of memory for n=%d\n", n);
        return 1;
    }
    for (size_t i = 0; i < nn; i++) {
        a[i] = (float)((i * 7919u) % 1000u) * 1e-3f - 0.5f;
        b[i] = (float)((i * 104729u) % 1000u) * 1e-3f - 0.5f;
        c[i] = 0.0f;
    }
    openblas_set_num_threads(threads);
    /* Same orientation as a linear layer: C = A B^T. One warm-up call. */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
    for (int r = 0; r < reps; r++) {
        double t0 = now_ms();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        ms[r] = now_ms() - t0;
    }
    qsort(ms, (size_t)reps, sizeof(double), cmp_double);
    double med = ms[reps / 2];
    double gflops = 2.0 * n * (double)n * n / (med * 1e6);
    printf("sgemm n=%d threads=%d reps=%d median_ms=%.3f gflops=%.2f checksum=%.4g\n", n, threads,
           reps, med, gflops, (double)c[nn / 2]);
    free(a);
    free(b);
    free(c);
    free(ms);
    return 0;
}
