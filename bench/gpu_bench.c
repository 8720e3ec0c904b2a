/* GPU benchmark: the CPU benchmark's workloads (the built-in models, at batch
 * 1 and 8) on the CUDA backend, and the fused attention kernel against the
 * unfused cuBLAS baseline (S = q k^T GEMM, softmax kernel, P v GEMM) in the
 * same run. Prints one line per measurement and a summary against the
 * targets (H200, BF16): fused attention >= 300 TFLOP/s and >= 3x the
 * baseline at 4096 tokens, head dim 64; SD-1.5 down-block-0 at batch 8 >= 40%
 * of dense BF16 peak (989 TFLOP/s).
 *
 * usage: gpu_bench [--dtype bf16|fp16|fp32] [--reps N] [--peak TFLOPS] [--smoke 1]
 * Exits 77 when no usable GPU is there. --smoke 1 checks the benchmark itself
 * on the CPU backend (every model but the trunk, batch 1, one rep, no
 * attention kernels), on machines without a GPU. Times are wall clock around whole
 * forwards (inputs up, output down, as the server runs them); the attention
 * loop times N launches and one synchronising copy. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "arena.h"
#include "backend.h"
#include "builtin.h"
#include "model.h"

#define EXIT_SKIP 77

struct bench {
    struct bs_backend be;
    const char *dtype;
    int reps;
    double peak; /* TFLOP/s */
    double attn_fused, attn_unfused, down0_b8;
    bool smoke;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ---- whole models ------------------------------------------------------- */

/* Inputs for model m at this batch, following its input specs: floats in
 * [-1, 1), timesteps and labels small integers; optional inputs left out. */
static int make_inputs(const bs_model_t *m, const struct bs_builtin *b, int64_t batch,
                       struct bs_named_tensor *in, int *n_in)
{
    *n_in = 0;
    for (int i = 0; i < bs_model_n_inputs(m); i++) {
        const struct bs_input_spec *s = bs_model_input(m, i);
        if (!s->required)
            continue;
        int64_t ne[BS_MAX_DIMS];
        bool is_enc = strcmp(s->name, "encoder_hidden_states") == 0;
        for (int d = 0; d < s->n_dims; d++)
            ne[d] = s->dims[d] != -1 ? s->dims[d]
                    : d == 0         ? batch
                    : s->n_dims == 4 ? (d == 2 ? b->height : b->width)
                    : is_enc         ? b->enc_tokens
                                     : b->tokens;
        bool ints = strcmp(s->name, "timestep") == 0 || strcmp(s->name, "class_labels") == 0;
        struct bs_tensor t = bs_tensor_make(ints ? BS_TYPE_I64 : BS_TYPE_F32, s->n_dims, ne, NULL);
        if ((t.data = malloc(bs_tensor_nbytes(&t))) == NULL)
            return -1;
        for (int64_t j = 0; j < bs_tensor_nelements(&t); j++) {
            if (ints)
                ((int64_t *)t.data)[j] = 1 + j % 7;
            else
                ((float *)t.data)[j] = (float)((j * 2654435761u) % 2000) / 1000.0f - 1.0f;
        }
        in[*n_in].name = s->name;
        in[(*n_in)++].t = t;
    }
    return 0;
}

static int bench_batch(struct bench *bn, bs_model_t *m, const struct bs_builtin *b, int64_t batch,
                       struct bs_err *err)
{
    struct bs_named_tensor in[8];
    struct bs_tensor out = {0};
    struct bs_arena arena;
    double *ms = calloc((size_t)bn->reps, sizeof(double));
    int n_in = 0, rc = 0;
    bs_arena_init(&arena, &bn->be);
    if (ms == NULL || make_inputs(m, b, batch, in, &n_in) != 0) {
        rc = bs_err_set(err, BS_ENOMEM, "out of memory");
        goto done;
    }
    if ((rc = bs_model_check(m, in, n_in, &out, err)) != 0)
        goto done;
    if ((out.data = malloc(bs_tensor_nbytes(&out))) == NULL) {
        rc = bs_err_set(err, BS_ENOMEM, "out of memory");
        goto done;
    }
    rc = bs_model_forward(m, &arena, in, n_in, &out, NULL, err); /* warm-up: sizes the arena */
    for (int r = 0; rc == 0 && r < bn->reps; r++) {
        double t0 = now_s();
        rc = bs_model_forward(m, &arena, in, n_in, &out, NULL, err);
        ms[r] = (now_s() - t0) * 1e3;
    }
    if (rc == 0) {
        qsort(ms, (size_t)bn->reps, sizeof(double), cmp_double);
        double med = ms[bn->reps / 2], tf = bs_model_flops(m, in, n_in) / (med * 1e-3) / 1e12;
        printf("model %-18s batch %lld %s: median %8.3f ms  min %8.3f ms  %7.1f TFLOP/s  (%.1f%% "
               "of peak)\n",
               b->name, (long long)batch, bn->dtype, med, ms[0], tf, 100.0 * tf / bn->peak);
        if (strcmp(b->name, "sd15_down0_block") == 0 && batch == 8)
            bn->down0_b8 = tf;
    }
done:
    for (int i = 0; i < n_in; i++)
        free(in[i].t.data);
    free(out.data);
    free(ms);
    bs_arena_free(&arena);
    return rc;
}

static int bench_models(struct bench *bn, struct bs_err *err)
{
    static const char *const names[] = {"sd15_down0_block", "sd15_mid_block", "dit_xl_block",
                                        "vae_mid_attention", "dit_xl_trunk"};
    static const int64_t batches[] = {1, 8};
    size_t n_models = bn->smoke ? BS_ARRAY_LEN(names) - 1 : BS_ARRAY_LEN(names);
    size_t n_batches = bn->smoke ? 1 : BS_ARRAY_LEN(batches);
    for (size_t i = 0; i < n_models; i++) {
        const struct bs_builtin *b = bs_builtin_find(names[i]);
        bs_model_t *m = NULL;
        int rc = b ? bs_builtin_load(b, &bn->be, &m, err)
                   : bs_err_set(err, BS_ENOTFOUND, "no built-in %s", names[i]);
        for (size_t j = 0; rc == 0 && j < n_batches; j++)
            rc = bench_batch(bn, m, b, batches[j], err);
        bs_model_free(m);
        if (rc != 0)
            return bs_err_wrap(err, "%s", names[i]);
    }
    return 0;
}

/* ---- attention kernel ------------------------------------------------------ */

/* A [rows, cols] F32 tensor in backend memory filled with small values. */
static int dev_tensor(struct bench *bn, struct bs_tensor *t, int64_t rows, int64_t cols,
                      struct bs_err *err)
{
    *t = bs_tensor_make(BS_TYPE_F32, 2, (int64_t[]){rows, cols}, NULL);
    size_t n = (size_t)(rows * cols);
    float *h = malloc(n * sizeof(float));
    t->data = bn->be.iface->buf_alloc(bn->be.ctx, n * sizeof(float));
    if (h == NULL || t->data == NULL) {
        free(h);
        return bs_err_set(err, BS_ENOMEM, "attention bench: out of memory");
    }
    for (size_t i = 0; i < n; i++)
        h[i] = (float)((i * 2654435761u) % 2000) / 1000.0f - 1.0f;
    int rc = bn->be.iface->copy_in(bn->be.ctx, t->data, h, n * sizeof(float), err);
    free(h);
    return rc;
}

/* Seconds per call of the fused kernel (fn NULL) or the baseline. */
static int time_attention(struct bench *bn, bs_proc_attention_unfused_fn fn, struct bs_tensor *o,
                          const struct bs_tensor *q, const struct bs_tensor *k,
                          const struct bs_tensor *v, const struct bs_attn_params *p, int reps,
                          double *sec, struct bs_err *err)
{
    float sink;
    int rc = 0;
    double t0 = 0;
    for (int r = -1; rc == 0 && r < reps; r++) { /* r = -1: warm-up */
        if (r == 0) {
            rc = bn->be.iface->copy_out(bn->be.ctx, &sink, o->data, sizeof(sink), err);
            t0 = now_s();
        }
        if (rc == 0)
            rc = fn ? fn(&bn->be, o, q, k, v, p, err)
                    : bn->be.iface->attention(bn->be.ctx, o, q, k, v, p, err);
    }
    if (rc == 0)
        rc = bn->be.iface->copy_out(bn->be.ctx, &sink, o->data, sizeof(sink), err);
    *sec = (now_s() - t0) / reps;
    return rc;
}

static int bench_attention(struct bench *bn, int64_t batch, int heads, int hd, int64_t l,
                           bool main_case, struct bs_err *err)
{
    struct bs_tensor q, k, v, o;
    int64_t inner = (int64_t)heads * hd;
    struct bs_attn_params p = {.batch = batch,
                               .lq = l,
                               .lk = l,
                               .heads = heads,
                               .head_dim = hd,
                               .scale = 1.0f / sqrtf((float)hd),
                               .compute = BS_TYPE_F32};
    double flops = 4.0 * (double)batch * heads * (double)l * (double)l * hd, fused, unf;
    int rc;
    if ((rc = dev_tensor(bn, &q, batch * l, inner, err)) ||
        (rc = dev_tensor(bn, &k, batch * l, inner, err)) ||
        (rc = dev_tensor(bn, &v, batch * l, inner, err)) ||
        (rc = dev_tensor(bn, &o, batch * l, inner, err)))
        return rc;
    bs_proc_attention_unfused_fn fn;
    *(void **)&fn = bs_backend_get_proc_address(&bn->be, BS_PROC_ATTENTION_UNFUSED);
    if (fn == NULL)
        return bs_err_set(err, BS_ENOTFOUND,
                          "the backend has no entry point " BS_PROC_ATTENTION_UNFUSED);
    if ((rc = time_attention(bn, NULL, &o, &q, &k, &v, &p, 4 * bn->reps, &fused, err)) ||
        (rc = time_attention(bn, fn, &o, &q, &k, &v, &p, bn->reps, &unf, err)))
        return rc;
    double tf = flops / fused / 1e12, tu = flops / unf / 1e12;
    printf("attention B%lld x %d heads x %lld tokens, head dim %d, %s: fused %.3f ms %6.1f TFLOP/s;"
           " unfused %.3f ms %6.1f TFLOP/s; speedup %.2fx\n",
           (long long)batch, heads, (long long)l, hd, bn->dtype, fused * 1e3, tf, unf * 1e3, tu,
           tf / tu);
    if (main_case) {
        bn->attn_fused = tf;
        bn->attn_unfused = tu;
    }
    struct bs_tensor *all[] = {&q, &k, &v, &o};
    for (int i = 0; i < 4; i++)
        bn->be.iface->buf_free(bn->be.ctx, all[i]->data);
    return 0;
}

static void summary(const struct bench *bn)
{
    printf("\n== summary (%s, peak %.0f TFLOP/s) ==\n", bn->dtype, bn->peak);
    printf("fused attention 4096 tokens, head dim 64: %.1f TFLOP/s (target >= 300): %s\n",
           bn->attn_fused, bn->attn_fused >= 300 ? "met" : "NOT met");
    double sp = bn->attn_unfused > 0 ? bn->attn_fused / bn->attn_unfused : 0;
    printf("fused vs unfused cuBLAS baseline: %.2fx (target >= 3x): %s\n", sp,
           sp >= 3 ? "met" : "NOT met");
    printf("sd15_down0_block batch 8: %.1f TFLOP/s = %.1f%% of peak (target >= 40%%): %s\n",
           bn->down0_b8, 100 * bn->down0_b8 / bn->peak,
           bn->down0_b8 >= 0.4 * bn->peak ? "met" : "NOT met");
}

int main(int argc, char **argv)
{
    struct bench bn = {.dtype = "bf16", .reps = 10, .peak = 989};
    struct bs_err err = {0};
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--dtype") == 0)
            bn.dtype = argv[i + 1];
        else if (strcmp(argv[i], "--reps") == 0 && atoi(argv[i + 1]) > 0)
            bn.reps = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--peak") == 0 && atof(argv[i + 1]) > 0)
            bn.peak = atof(argv[i + 1]);
        else if (strcmp(argv[i], "--smoke") == 0)
            bn.smoke = atoi(argv[i + 1]) != 0;
        else {
            fprintf(
                stderr,
                "usage: gpu_bench [--dtype bf16|fp16|fp32] [--reps N] [--peak T] [--smoke 1]\n");
            return 2;
        }
    }
    if ((argc - 1) % 2 != 0) {
        fprintf(stderr, "usage: gpu_bench [--dtype bf16|fp16|fp32] [--reps N] [--peak T]\n");
        return 2;
    }
    if (bn.smoke) {
        bn.reps = 1;
        bn.dtype = "fp32";
    }
    struct bs_backend_opts o = {.device = bn.smoke ? "cpu" : "cuda", .dtype = bn.dtype};
    int rc = bs_backend_init_opts(&bn.be, &o, &err);
    if (rc == BS_EUNSUPP) {
        printf("SKIP: %s\n", err.msg);
        return EXIT_SKIP;
    }
    if (rc != 0) {
        fprintf(stderr, "gpu_bench: %s\n", err.msg);
        return 1;
    }
    printf("%s\n", err.msg);
    if (bn.smoke)
        rc = bench_models(&bn, &err);
    else if ((rc = bench_attention(&bn, 4, 8, 64, 4096, true, &err)) == 0 &&
             (rc = bench_attention(&bn, 2, 8, 40, 4096, false, &err)) == 0 &&
             (rc = bench_attention(&bn, 8, 16, 72, 256, false, &err)) == 0)
        rc = bench_models(&bn, &err);
    if (rc != 0)
        fprintf(stderr, "gpu_bench: %s\n", err.msg);
    else if (!bn.smoke)
        summary(&bn);
    bs_backend_free(&bn.be);
    return rc == 0 ? 0 : 1;
}
