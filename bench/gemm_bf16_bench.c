/* The CPU backend's BF16 GEMM against the alternatives, on the GEMM shapes of
 * the diffusion blocks we serve:
 *   bf16      pack_weight once, then linear (x F32 rounded to BF16 per call,
 *             bias fused), on the backend's pool
 *   f32       the backend's F32 linear: OpenBLAS sgemm in blocks on the same
 *             pool (what an FP32 model runs)
 *   onednn    oneDNN's matmul, BF16 src and weights (weights reordered once
 *             into its own layout, src already BF16: the conversion of x that
 *             our time includes is not in this one), F32 dst and bias; on its
 *             own OpenMP threads (OMP_NUM_THREADS, default one per core).
 *             Only when built with oneDNN (bench/CMakeLists.txt).
 * Each figure is the best of repeated runs (at least --min-time seconds of
 * them), in GFLOP/s (2 M N K / time). Then the cost of the separate GEGLU pass
 * (glu op) after the SD down0 feed-forward GEMM, next to that GEMM.
 *
 * Usage: bs_gemm_bf16_bench [--threads N] [--min-time S] [--no-onednn] [--cpu-time]
 *                           [MxNxK ...]
 * (BS_CPU_ISA=avx2 times the fallback path.) */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "ops_cpu.h"
#include "tensor.h"

#ifdef BS_HAVE_DNNL
#include <dnnl.h>
#endif

struct shape {
    const char *name;
    int64_t m, n, k;
};

/* clang-format off: one shape a line */
static const struct shape shapes[] = {
    {"sd15 mid B8 qkv", 512, 3840, 1280},   {"sd15 mid B8 proj", 512, 1280, 1280},
    {"sd15 mid B8 ctx-kv", 616, 2560, 768}, {"sd15 mid B8 ff1", 512, 10240, 1280},
    {"sd15 mid B8 ff2", 512, 1280, 5120},   {"dit-xl B4 qkv", 1024, 3456, 1152},
    {"dit-xl B4 proj", 1024, 1152, 1152},   {"dit-xl B4 mlp1", 1024, 4608, 1152},
    {"dit-xl B4 mlp2", 1024, 1152, 4608},   {"dit-xl B4 adaln", 4, 6912, 1152},
    {"vae attn qkv", 1024, 1536, 512},      {"vae attn proj", 1024, 512, 512},
    {"sd down0 qkv", 4096, 960, 320},       {"sd down0 ff1", 4096, 2560, 320},
    {"sd down0 ff2", 4096, 320, 1280},      {"sd ctx kv", 77, 640, 768},
};
/* clang-format on */

/* CLOCK_PROCESS_CPUTIME_ID with --cpu-time: on a shared machine, time that
 * other processes take from us does not count (for tuning on one thread; it
 * also hides idle threads, and oneDNN's spinning ones count). */
static clockid_t clock_id = CLOCK_MONOTONIC;

static double now(void)
{
    struct timespec t;
    clock_gettime(clock_id, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static float *alloc_rand(int64_t n)
{
    float *p = malloc((size_t)n * sizeof(float));
    if (p == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (int64_t i = 0; i < n; i++)
        p[i] = frand();
    return p;
}

typedef int (*run_fn)(void *arg);

/* Best time of fn over at least min_time seconds (and 3 runs) after a warm-up
 * run; a negative value when fn fails. */
static double best_time(run_fn fn, void *arg, double min_time)
{
    if (fn(arg) != 0)
        return -1;
    double best = 1e30, start = now();
    for (int i = 0; i < 3 || now() - start < min_time; i++) {
        double t0 = now();
        if (fn(arg) != 0)
            return -1;
        double t = now() - t0;
        best = t < best ? t : best;
    }
    return best;
}

/* ---- the backend's linear ---------------------------------------------- */

struct lin_arg {
    struct bs_backend *be;
    struct bs_tensor y, x, w, b;
};

static int run_linear(void *p)
{
    struct lin_arg *a = p;
    struct bs_err err = {0};
    int rc = a->be->iface->linear(a->be->ctx, &a->y, &a->x, &a->w, &a->b, 0.0f, &err);
    if (rc != 0)
        fprintf(stderr, "linear: %s\n", err.msg);
    return rc;
}

struct glu_arg {
    struct bs_backend *be;
    struct bs_tensor y, x;
};

static int run_glu(void *p)
{
    struct glu_arg *a = p;
    struct bs_err err = {0};
    int rc = a->be->iface->glu(a->be->ctx, &a->y, &a->x, BS_ACT_GELU, &err);
    if (rc != 0)
        fprintf(stderr, "glu: %s\n", err.msg);
    return rc;
}

static struct bs_tensor mat(float *data, int64_t rows, int64_t cols)
{
    int64_t ne[2] = {rows, cols};
    return bs_tensor_make(BS_TYPE_F32, 2, ne, data);
}

/* ---- oneDNN ------------------------------------------------------------ */

#ifdef BS_HAVE_DNNL
struct dnnl_arg {
    dnnl_primitive_t prim;
    dnnl_stream_t stream;
    dnnl_exec_arg_t args[4];
};

static int run_dnnl(void *p)
{
    struct dnnl_arg *a = p;
    if (dnnl_primitive_execute(a->prim, a->stream, 4, a->args) != dnnl_success)
        return -1;
    return dnnl_stream_wait(a->stream) == dnnl_success ? 0 : -1;
}

#define DNNL_TRY(call)                                                                             \
    do {                                                                                           \
        dnnl_status_t st_ = (call);                                                                \
        if (st_ != dnnl_success) {                                                                 \
            fprintf(stderr, "oneDNN: %s: status %d\n", #call, (int)st_);                           \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

/* oneDNN bf16 matmul time of y = x w^T + b, or -1. */
static double time_dnnl(const struct shape *s, const float *x, const float *w, const float *b,
                        float *y, double min_time)
{
    double t = -1;
    int64_t m = s->m, n = s->n, k = s->k;
    uint16_t *xh = malloc((size_t)(m * k) * 2), *wh = malloc((size_t)(n * k) * 2);
    for (int64_t i = 0; i < m * k; i++)
        xh[i] = bs_f32_to_bf16(x[i]);
    for (int64_t i = 0; i < n * k; i++)
        wh[i] = bs_f32_to_bf16(w[i]);
    dnnl_engine_t eng = NULL;
    dnnl_stream_t stream = NULL;
    dnnl_primitive_desc_t pd = NULL, rpd = NULL;
    dnnl_primitive_t prim = NULL, reorder = NULL;
    dnnl_memory_t msrc = NULL, mwu = NULL, mw = NULL, mb = NULL, mdst = NULL;
    dnnl_memory_desc_t src_md, wu_md, w_md, b_md, dst_md;
    dnnl_dims_t src_d = {m, k}, w_d = {k, n}, b_d = {1, n}, dst_d = {m, n};
    DNNL_TRY(dnnl_engine_create(&eng, dnnl_cpu, 0));
    DNNL_TRY(dnnl_stream_create(&stream, eng, dnnl_stream_default_flags));
    DNNL_TRY(dnnl_memory_desc_init_by_tag(&src_md, 2, src_d, dnnl_bf16, dnnl_ab));
    DNNL_TRY(dnnl_memory_desc_init_by_tag(&wu_md, 2, w_d, dnnl_bf16, dnnl_ba)); /* w is [N, K] */
    DNNL_TRY(dnnl_memory_desc_init_by_tag(&w_md, 2, w_d, dnnl_bf16, dnnl_format_tag_any));
    DNNL_TRY(dnnl_memory_desc_init_by_tag(&b_md, 2, b_d, dnnl_f32, dnnl_ab));
    DNNL_TRY(dnnl_memory_desc_init_by_tag(&dst_md, 2, dst_d, dnnl_f32, dnnl_ab));
    dnnl_matmul_desc_t md;
    DNNL_TRY(dnnl_matmul_desc_init(&md, &src_md, &w_md, &b_md, &dst_md));
    DNNL_TRY(dnnl_primitive_desc_create(&pd, &md, NULL, eng, NULL));
    DNNL_TRY(dnnl_primitive_create(&prim, pd));
    const dnnl_memory_desc_t *w_best = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    DNNL_TRY(dnnl_memory_create(&msrc, &src_md, eng, xh));
    DNNL_TRY(dnnl_memory_create(&mwu, &wu_md, eng, wh));
    DNNL_TRY(dnnl_memory_create(&mw, w_best, eng, DNNL_MEMORY_ALLOCATE));
    DNNL_TRY(dnnl_memory_create(&mb, &b_md, eng, (void *)b));
    DNNL_TRY(dnnl_memory_create(&mdst, &dst_md, eng, y));
    DNNL_TRY(dnnl_reorder_primitive_desc_create(&rpd, &wu_md, eng, w_best, eng, NULL));
    DNNL_TRY(dnnl_primitive_create(&reorder, rpd));
    dnnl_exec_arg_t rargs[2] = {{DNNL_ARG_FROM, mwu}, {DNNL_ARG_TO, mw}};
    DNNL_TRY(dnnl_primitive_execute(reorder, stream, 2, rargs));
    DNNL_TRY(dnnl_stream_wait(stream));
    struct dnnl_arg a = {
        prim,
        stream,
        {{DNNL_ARG_SRC, msrc}, {DNNL_ARG_WEIGHTS, mw}, {DNNL_ARG_BIAS, mb}, {DNNL_ARG_DST, mdst}}};
    t = best_time(run_dnnl, &a, min_time);
out:
    dnnl_memory_destroy(msrc);
    dnnl_memory_destroy(mwu);
    dnnl_memory_destroy(mw);
    dnnl_memory_destroy(mb);
    dnnl_memory_destroy(mdst);
    dnnl_primitive_destroy(reorder);
    dnnl_primitive_destroy(prim);
    dnnl_primitive_desc_destroy(rpd);
    dnnl_primitive_desc_destroy(pd);
    dnnl_stream_destroy(stream);
    dnnl_engine_destroy(eng);
    free(xh), free(wh);
    return t;
}
#endif

/* ---- main -------------------------------------------------------------- */

/* Max |a - b| over n. */
static double max_diff(const float *a, const float *b, int64_t n)
{
    double d = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = a[i] > b[i] ? a[i] - b[i] : b[i] - a[i];
        d = e > d ? e : d;
    }
    return d;
}

struct totals {
    double flop, t_bf16, t_f32, t_dnnl;
    int n_dnnl;
};

static void bench_shape(struct bs_backend *be, const struct shape *s, double min_time,
                        bool use_dnnl, struct totals *tot)
{
    struct bs_err err = {0};
    int64_t m = s->m, n = s->n, k = s->k;
    float *x = alloc_rand(m * k), *w = alloc_rand(n * k), *b = alloc_rand(n);
    float *y = alloc_rand(m * n), *y32 = alloc_rand(m * n), *yd = alloc_rand(m * n);
    double flop = 2.0 * (double)m * (double)n * (double)k;
    struct bs_tensor tw = mat(w, n, k), packed;
    if (be->iface->pack_weight(be->ctx, &packed, &tw, BS_TYPE_BF16, &err) != 0) {
        fprintf(stderr, "pack_weight: %s\n", err.msg);
        exit(1);
    }
    int64_t nb = n;
    struct lin_arg lb = {be, mat(y, m, n), mat(x, m, k), packed,
                         bs_tensor_make(BS_TYPE_F32, 1, &nb, b)};
    struct lin_arg lf = lb;
    lf.y = mat(y32, m, n);
    lf.w = tw;
    double t_bf16 = best_time(run_linear, &lb, min_time);
    double t_f32 = best_time(run_linear, &lf, min_time);
    double t_dnnl = -1;
#ifdef BS_HAVE_DNNL
    if (use_dnnl)
        t_dnnl = time_dnnl(s, x, w, b, yd, min_time);
#endif
    printf("%-20s %5lld %6lld %5lld | %8.1f %8.1f", s->name, (long long)m, (long long)n,
           (long long)k, flop / t_bf16 * 1e-9, flop / t_f32 * 1e-9);
    if (t_dnnl > 0)
        printf(" %8.1f | %6.2f %6.2f", flop / t_dnnl * 1e-9, t_f32 / t_bf16, t_dnnl / t_bf16);
    else
        printf(" %8s | %6.2f %6s", "-", t_f32 / t_bf16, "-");
    printf(" | %.1e", max_diff(y, y32, m * n));
    if (t_dnnl > 0)
        printf(" %.1e", max_diff(y, yd, m * n));
    printf("\n");
    tot->flop += flop;
    tot->t_bf16 += t_bf16;
    tot->t_f32 += t_f32;
    if (t_dnnl > 0) {
        tot->t_dnnl += t_dnnl;
        tot->n_dnnl++;
    }
    be->iface->buf_free(be->ctx, packed.data);
    free(x), free(w), free(b), free(y), free(y32), free(yd);
}

/* The GEGLU after the SD down0 feed-forward GEMM (4096 x 2560 x 320): glu
 * over its [4096, 2560] output, next to the GEMM's own time. */
static void bench_geglu(struct bs_backend *be, double min_time)
{
    struct bs_err err = {0};
    int64_t m = 4096, n = 2560, k = 320;
    float *x = alloc_rand(m * k), *w = alloc_rand(n * k), *b = alloc_rand(n);
    float *h = alloc_rand(m * n), *g = alloc_rand(m * n / 2);
    struct bs_tensor tw = mat(w, n, k), packed;
    if (be->iface->pack_weight(be->ctx, &packed, &tw, BS_TYPE_BF16, &err) != 0) {
        fprintf(stderr, "pack_weight: %s\n", err.msg);
        exit(1);
    }
    int64_t nb = n;
    struct lin_arg l = {be, mat(h, m, n), mat(x, m, k), packed,
                        bs_tensor_make(BS_TYPE_F32, 1, &nb, b)};
    struct glu_arg ga = {be, mat(g, m, n / 2), mat(h, m, n)};
    double t_gemm = best_time(run_linear, &l, min_time);
    double t_glu = best_time(run_glu, &ga, min_time);
    printf("\nGEGLU after sd down0 ff1 (%lldx%lldx%lld, bf16 GEMM): GEMM %.3f ms, glu (gelu) "
           "%.3f ms = %.1f%% of the GEMM (%.1f GB/s moved by glu)\n",
           (long long)m, (long long)n, (long long)k, t_gemm * 1e3, t_glu * 1e3,
           100.0 * t_glu / t_gemm, (double)(m * n + m * n / 2) * 4 / t_glu * 1e-9);
    be->iface->buf_free(be->ctx, packed.data);
    free(x), free(w), free(b), free(h), free(g);
}

int main(int argc, char **argv)
{
    int threads = 2;
    double min_time = 0.5;
    bool use_dnnl = true;
    struct shape picked[64];
    int n_picked = 0;
    for (int i = 1; i < argc; i++) {
        long long m, n, k;
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--min-time") == 0 && i + 1 < argc)
            min_time = atof(argv[++i]);
        else if (strcmp(argv[i], "--no-onednn") == 0)
            use_dnnl = false;
        else if (strcmp(argv[i], "--cpu-time") == 0)
            clock_id = CLOCK_PROCESS_CPUTIME_ID;
        else if (sscanf(argv[i], "%lldx%lldx%lld", &m, &n, &k) == 3 && n_picked < 64)
            picked[n_picked++] = (struct shape){argv[i], m, n, k};
        else {
            fprintf(stderr,
                    "usage: %s [--threads N] [--min-time S] [--no-onednn] [--cpu-time] "
                    "[MxNxK ...]\n",
                    argv[0]);
            return 2;
        }
    }
    struct bs_backend be;
    struct bs_err err = {0};
    if (bs_backend_cpu_init(&be, threads, &err) != 0) {
        fprintf(stderr, "cpu backend: %s\n", err.msg);
        return 1;
    }
    const struct bs__cpu *c = be.ctx;
    printf("bf16 GEMM on the %s path, %d threads; best of >= %.2f s per figure; GFLOP/s\n",
           bs__cpu_isa_name(c->isa), threads, min_time);
#ifndef BS_HAVE_DNNL
    use_dnnl = false;
    printf("(built without oneDNN: no onednn column)\n");
#endif
    printf("%-20s %5s %6s %5s | %8s %8s %8s | %6s %6s | %s\n", "shape", "M", "N", "K", "bf16",
           "f32", "onednn", "x f32", "x 1dnn", "max |bf16 - f32|, |bf16 - onednn|");
    struct totals tot = {0};
    int count = n_picked ? n_picked : (int)(sizeof(shapes) / sizeof(shapes[0]));
    for (int i = 0; i < count; i++)
        bench_shape(&be, n_picked ? &picked[i] : &shapes[i], min_time, use_dnnl, &tot);
    printf("%-20s %18s | %8.1f %8.1f", "all (time-weighted)", "", tot.flop / tot.t_bf16 * 1e-9,
           tot.flop / tot.t_f32 * 1e-9);
    if (tot.n_dnnl == count)
        printf(" %8.1f", tot.flop / tot.t_dnnl * 1e-9);
    printf("\n");
    if (!n_picked)
        bench_geglu(&be, min_time);
    bs_backend_free(&be);
    return 0;
}
