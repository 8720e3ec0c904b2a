/* GPU benchmark: the CPU benchmark's workloads (the built-in models, at batch
 * 1 and 8) on the CUDA backend, and the fused attention kernel against the
 * unfused cuBLAS baseline (S = q k^T GEMM, softmax kernel, P v GEMM) in the
 * same run, with FlashAttention-2's published figures beside it. Prints one
 * line per measurement and a summary against the targets (H200, BF16):
 * fused attention >= 300 TFLOP/s and >= 3x the baseline at 4096 tokens,
 * head dim 64; SD-1.5 down-block-0 at batch 8 >= 40% of dense BF16 peak
 * (989.4 TFLOP/s, H200 SXM; --peak overrides) GPU-only.
 *
 * usage: gpu_bench [--dtype bf16|fp16|fp32] [--reps N] [--peak TFLOPS] [--smoke 1]
 * Exits 77 when no usable GPU is there. --smoke 1 checks the benchmark itself
 * on the CPU backend (every model but the trunk, batch 1, one rep, attention
 * at 128 tokens without the baseline), on machines without a GPU; its GPU
 * columns read "n/a (cpu)".
 *
 * Two times per measurement:
 * - end to end: wall clock around whole forwards (inputs up, output down,
 *   as the server runs them);
 * - GPU-only: CUDA events (the backend's BS_PROC_GPU_TIMER) on the
 *   forward's stream around the whole forward, less the spans of its
 *   copy_in / copy_out on the stream (each from the point the stream reached
 *   the copy to its last DMA): the GPU time of the forward's kernels and
 *   of the gaps between them; the transfers are printed apart.
 * The attention kernels run N launches between the two events (no copies),
 * and wall time around the same launches and one synchronising copy.
 *
 * Launch graphs (issue 14 item 6): each model runs on two backends, made
 * with bs_backend_opts.graphs "off" and "on" (the CPU smoke run: "off" and
 * "emulate"), three warm-up forwards each (the first grows the arena,
 * whose chunks then become one: the blocks' addresses settle; the engine
 * then runs a block eagerly once and captures it the next time), and both
 * times are printed for each, with the saving of on against off: the
 * launch overhead the graphs remove (GPU-only: gaps where the stream ran
 * dry; end to end: also the host's launch calls). "graphs/fwd" is how many
 * graphs each timed forward launched (bs_graph_stats): one per block of a
 * transformer stack or attention block; 0 means the engine ran everything
 * eagerly (parts it would not capture, or captures that failed), so on
 * equals off there. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "arena.h"
#include "backend.h"
#include "builtin.h"
#include "graph.h"
#include "model.h"

#define EXIT_SKIP 77
#define MAX_ROWS  16

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        if ((rc = (expr)) != 0)                                                                    \
            return rc;                                                                             \
    } while (0)

/* FlashAttention-2's forward speed (TFLOP/s, FP16) on an H100 80GB SXM5 at
 * sequence length 4k, as the FlashAttention-3 paper (Shah et al. 2024,
 * arXiv:2407.08608, its "Attention forward speed, head dim 64 / 128 (H100
 * 80GB SXM5)" bar charts) reports its FA2 baseline; read from the charts'
 * transcription at subtext.edge.nugit.net, not checked against the PDF, and
 * the transcription does not say which of the paper's causal / non-causal
 * panels it is. The same charts give standard (PyTorch) attention 18 and
 * 133 TFLOP/s. H200 has H100's SMs and clocks (more HBM bandwidth), so these
 * are the nearest published yardstick. The FA2 paper itself (Dao 2023,
 * arXiv:2307.08691) states in its abstract 50-73% of the A100's theoretical
 * maximum (312 TFLOP/s dense FP16/BF16), i.e. about 156-228 TFLOP/s across
 * its forward and backward benchmarks; its per-head-dim figures were not
 * found in the references searched. */
#define FA2_H100_HD64_4K  284.0
#define FA2_H100_HD128_4K 368.0
#define FA2_SOURCE                                                                                 \
    "FA3 paper (arXiv:2407.08608) FA2 baseline, H100 SXM5, FP16, 4k, transcribed from its "        \
    "charts, "                                                                                     \
    "unverified; FA2 paper: 50-73% of A100 peak"

/* One model at one batch: medians in ms (gpu and xfer < 0: not measured),
 * graphs off and on (_g); graphs: graphs launched per timed forward with
 * graphs on. */
struct row {
    const char *name;
    int64_t batch;
    double flops, wall, gpu, xfer, wall_g, gpu_g, graphs;
};

/* One attention case: per launch, ms (< 0: not measured). */
struct attn_res {
    int64_t batch, l;
    int heads, hd;
    double flops, fused_gpu, fused_wall, unf_gpu, unf_wall, fa2;
};

struct bench {
    struct bs_backend be;                     /* graphs off */
    struct bs_backend be_g;                   /* graphs on (the CPU: emulate) */
    const char *gmode;                        /* be_g's bs_backend_opts.graphs */
    const struct bs_backend_gpu_timer *timer; /* NULL: no GPU timing (the CPU) */
    const char *dtype;
    int reps;
    double peak; /* TFLOP/s */
    bool smoke;
    struct row rows[MAX_ROWS];
    int n_rows;
    struct attn_res attn[2]; /* head dim 64 and 128 at 4096 tokens */
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

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return v[n / 2];
}

static double tflops(double flops, double ms)
{
    return ms > 0 ? flops / (ms * 1e-3) / 1e12 : 0;
}

/* "12.345 ms  67.8 TFLOP/s (6.9% of peak)" or "n/a (cpu)" into buf. */
static const char *fmt_time(char *buf, size_t size, const struct bench *bn, double flops, double ms)
{
    if (ms < 0)
        snprintf(buf, size, "%-38s", "n/a (cpu)");
    else
        snprintf(buf, size, "%9.3f ms %7.1f TFLOP/s (%5.1f%%)", ms, tflops(flops, ms),
                 100.0 * tflops(flops, ms) / bn->peak);
    return buf;
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

/* Graphs launched so far in the process. */
static double graphs_launched(void)
{
    struct bs_graph_stats st;
    bs_graph_stats(&st);
    return (double)st.launched;
}

/* reps timed forwards of m (loaded on be) after three warm-ups (the
 * arena's size; a graph's eager run and capture): wall, GPU-only and transfer
 * times into the three arrays (the last two left alone without a timer);
 * *graphs: graphs launched per timed forward. */
static int time_forwards(struct bench *bn, struct bs_backend *be, bs_model_t *m,
                         struct bs_arena *arena, const struct bs_named_tensor *in, int n_in,
                         struct bs_tensor *out, double *wall, double *gpu, double *xfer,
                         double *graphs, struct bs_err *err)
{
    int rc = 0;
    for (int w = 0; rc == 0 && w < 3; w++)
        rc = bs_model_forward(m, arena, in, n_in, out, NULL, err);
    double g0 = graphs_launched();
    for (int r = 0; rc == 0 && r < bn->reps; r++) {
        struct bs_gpu_time gt;
        if (bn->timer != NULL && (rc = bn->timer->start(be, err)) != 0)
            break;
        double t0 = now_s();
        rc = bs_model_forward(m, arena, in, n_in, out, NULL, err);
        wall[r] = (now_s() - t0) * 1e3;
        if (rc == 0 && bn->timer != NULL && (rc = bn->timer->stop(be, &gt, err)) == 0) {
            gpu[r] = gt.total_ms - gt.transfer_ms;
            xfer[r] = gt.transfer_ms;
        }
    }
    *graphs = (graphs_launched() - g0) / bn->reps;
    return rc;
}

/* "  0.123 ms (  9.8%)": off - on, as a share of off; or n/a. */
static const char *fmt_saving(char *buf, size_t size, double off, double on)
{
    if (off <= 0 || on < 0)
        snprintf(buf, size, "%-18s", "n/a");
    else
        snprintf(buf, size, "%7.3f ms (%5.1f%%)", off - on, 100.0 * (off - on) / off);
    return buf;
}

static const char *fmt_graphs(char *buf, size_t size, double graphs)
{
    snprintf(buf, size, "%.1f", graphs);
    return buf;
}

/* m on bn->be (graphs off) and mg, the same model on bn->be_g (on). */
static int bench_batch(struct bench *bn, bs_model_t *m, bs_model_t *mg, const struct bs_builtin *b,
                       int64_t batch, struct bs_err *err)
{
    struct bs_named_tensor in[8];
    struct bs_tensor out = {0};
    struct bs_arena arena, arena_g;
    double *ms = calloc(6 * (size_t)bn->reps, sizeof(double)), graphs_off = 0, graphs = -1;
    int n_in = 0, rc = 0, n = bn->reps;
    bs_arena_init(&arena, &bn->be);
    bs_arena_init(&arena_g, &bn->be_g);
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
    rc = time_forwards(bn, &bn->be, m, &arena, in, n_in, &out, ms, ms + n, ms + 2 * n, &graphs_off,
                       err);
    if (rc == 0)
        rc = time_forwards(bn, &bn->be_g, mg, &arena_g, in, n_in, &out, ms + 3 * n, ms + 4 * n,
                           ms + 5 * n, &graphs, err);
    if (rc == 0 && bn->n_rows < MAX_ROWS) {
        struct row *w = &bn->rows[bn->n_rows++];
        *w = (struct row){.name = b->name,
                          .batch = batch,
                          .flops = bs_model_flops(m, in, n_in),
                          .wall = median(ms, n),
                          .gpu = -1,
                          .xfer = -1,
                          .wall_g = median(ms + 3 * n, n),
                          .gpu_g = -1,
                          .graphs = graphs};
        if (bn->timer != NULL) {
            w->gpu = median(ms + n, n);
            w->xfer = median(ms + 2 * n, n);
            w->gpu_g = median(ms + 4 * n, n);
        }
        char t0[64], t1[64], t2[64], t3[64], s0[32], s1[32], gr[16];
        printf("model %-18s batch %lld %s: GPU-only off %s | %s %s (saves %s) | end-to-end off %s "
               "| %s %s (saves %s) | transfers ",
               w->name, (long long)batch, bn->dtype, fmt_time(t0, sizeof(t0), bn, w->flops, w->gpu),
               bn->gmode, fmt_time(t1, sizeof(t1), bn, w->flops, w->gpu_g),
               fmt_saving(s0, sizeof(s0), w->gpu, w->gpu_g),
               fmt_time(t2, sizeof(t2), bn, w->flops, w->wall), bn->gmode,
               fmt_time(t3, sizeof(t3), bn, w->flops, w->wall_g),
               fmt_saving(s1, sizeof(s1), w->wall, w->wall_g));
        if (w->xfer < 0)
            printf("n/a (cpu)");
        else
            printf("%.3f ms", w->xfer);
        printf(" | graphs/fwd %s (off: %s)\n", fmt_graphs(gr, sizeof(gr), w->graphs),
               fmt_graphs(s0, sizeof(s0), graphs_off));
    }
done:
    for (int i = 0; i < n_in; i++)
        free(in[i].t.data);
    free(out.data);
    free(ms);
    bs_arena_free(&arena);
    bs_arena_free(&arena_g);
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
        bs_model_t *m = NULL, *mg = NULL;
        int rc = b ? bs_builtin_load(b, &bn->be, &m, err)
                   : bs_err_set(err, BS_ENOTFOUND, "no built-in %s", names[i]);
        if (rc == 0)
            rc = bs_builtin_load(b, &bn->be_g, &mg, err);
        for (size_t j = 0; rc == 0 && j < n_batches; j++)
            rc = bench_batch(bn, m, mg, b, batches[j], err);
        bs_model_free(m);
        bs_model_free(mg);
        if (rc != 0)
            return bs_err_wrap(err, "%s", names[i]);
    }
    return 0;
}

/* ---- attention kernel ------------------------------------------------------ */

/* A [rows, cols] F32 tensor in backend memory filled with small values. */
/* A [rows, cols] tensor in backend memory filled with values in [-1, 1),
 * in the activation dtype a model on this backend would have (the compute
 * dtype with narrow activations, else F32): what attention reads in
 * serving. */
static int dev_tensor(struct bench *bn, struct bs_tensor *t, int64_t rows, int64_t cols,
                      struct bs_err *err)
{
    const struct bs_backend *be = &bn->be;
    enum bs_dtype dt =
        !be->act_f32 && ((be->iface->act_dtypes >> be->dtype) & 1u) ? be->dtype : BS_TYPE_F32;
    *t = bs_tensor_make(dt, 2, (int64_t[]){rows, cols}, NULL);
    size_t n = (size_t)(rows * cols), bytes = bs_tensor_nbytes(t);
    float *h = malloc(n * sizeof(float));
    t->data = be->iface->buf_alloc(be->ctx, bytes);
    if (h == NULL || t->data == NULL) {
        free(h);
        if (t->data != NULL)
            be->iface->buf_free(be->ctx, t->data);
        t->data = NULL;
        return bs_err_set(err, BS_ENOMEM, "attention bench: out of memory");
    }
    for (size_t i = 0; i < n; i++)
        h[i] = (float)((i * 2654435761u) % 2000) / 1000.0f - 1.0f;
    bs_convert_from_f32(h, dt, h, (int64_t)n); /* in place: the narrow bytes first */
    int rc = be->iface->copy_in(be->ctx, t->data, h, bytes, err);
    free(h);
    return rc;
}

/* Milliseconds per call of the fused kernel (fn NULL) or the baseline:
 * wall clock (reps launches and one synchronising copy) and, with a timer,
 * GPU time between events around the same launches (else -1). */
static int time_attention(struct bench *bn, bs_proc_attention_unfused_fn fn, struct bs_tensor *o,
                          const struct bs_tensor *q, const struct bs_tensor *k,
                          const struct bs_tensor *v, const struct bs_attn_params *p, int reps,
                          double *wall, double *gpu, struct bs_err *err)
{
    float sink;
    struct bs_gpu_time gt = {0};
    int rc = 0;
    double t0 = 0;
    *gpu = -1;
    for (int r = -1; rc == 0 && r < reps; r++) { /* r = -1: warm-up */
        if (r == 0) {
            rc = bn->be.iface->copy_out(bn->be.ctx, &sink, o->data, sizeof(sink), err);
            if (rc == 0 && bn->timer != NULL)
                rc = bn->timer->start(&bn->be, err);
            t0 = now_s();
        }
        if (rc == 0)
            rc = fn ? fn(&bn->be, o, q, k, v, p, err)
                    : bn->be.iface->attention(bn->be.ctx, o, q, k, v, p, err);
    }
    if (rc == 0 && bn->timer != NULL && (rc = bn->timer->stop(&bn->be, &gt, err)) == 0)
        *gpu = gt.total_ms / reps;
    if (rc == 0)
        rc = bn->be.iface->copy_out(bn->be.ctx, &sink, o->data, sizeof(sink), err);
    *wall = (now_s() - t0) * 1e3 / reps;
    return rc;
}

static void print_attention(const struct bench *bn, const struct attn_res *a)
{
    char f[64], fw[64], u[64];
    printf("attention B%lld x %d heads x %lld tokens, head dim %d, %s:\n", (long long)a->batch,
           a->heads, (long long)a->l, a->hd, bn->dtype);
    printf("  fused   GPU %s | end-to-end %s\n", fmt_time(f, sizeof(f), bn, a->flops, a->fused_gpu),
           fmt_time(fw, sizeof(fw), bn, a->flops, a->fused_wall));
    if (a->unf_wall < 0)
        printf("  unfused cuBLAS baseline: n/a (cpu)\n");
    else
        printf("  unfused GPU %s | speedup %.2fx\n",
               fmt_time(u, sizeof(u), bn, a->flops, a->unf_gpu >= 0 ? a->unf_gpu : a->unf_wall),
               a->fused_gpu > 0 && a->unf_gpu > 0 ? a->unf_gpu / a->fused_gpu
                                                  : a->unf_wall / a->fused_wall);
    if (a->fa2 > 0)
        printf("  FlashAttention-2 reference: %.0f TFLOP/s (%s)\n", a->fa2, FA2_SOURCE);
}

static void attn_free(struct bench *bn, struct bs_tensor *all, int n)
{
    for (int i = 0; i < n; i++)
        if (all[i].data != NULL)
            bn->be.iface->buf_free(bn->be.ctx, all[i].data);
}

/* res: where to keep the result for the summary, or NULL. */
static int bench_attention(struct bench *bn, int64_t batch, int heads, int hd, int64_t l,
                           double fa2, struct attn_res *res, struct bs_err *err)
{
    struct bs_tensor t[4] = {{0}}; /* q, k, v, o */
    int64_t inner = (int64_t)heads * hd;
    struct bs_attn_params p = {.batch = batch,
                               .lq = l,
                               .lk = l,
                               .heads = heads,
                               .head_dim = hd,
                               .scale = 1.0f / sqrtf((float)hd),
                               .compute = bn->be.dtype};
    struct attn_res a = {
        batch, l,  heads, hd, 4.0 * (double)batch * heads * (double)l * (double)l * hd,
        -1,    -1, -1,    -1, fa2};
    int rc = 0;
    for (int i = 0; rc == 0 && i < 4; i++)
        rc = dev_tensor(bn, &t[i], batch * l, inner, err);
    bs_proc_attention_unfused_fn fn;
    *(void **)&fn = bs_backend_get_proc_address(&bn->be, BS_PROC_ATTENTION_UNFUSED);
    if (rc == 0 && fn == NULL && !bn->smoke)
        rc = bs_err_set(err, BS_ENOTFOUND,
                        "the backend has no entry point " BS_PROC_ATTENTION_UNFUSED);
    if (rc == 0)
        rc = time_attention(bn, NULL, &t[3], &t[0], &t[1], &t[2], &p, 4 * bn->reps, &a.fused_wall,
                            &a.fused_gpu, err);
    if (rc == 0 && fn != NULL)
        rc = time_attention(bn, fn, &t[3], &t[0], &t[1], &t[2], &p, bn->reps, &a.unf_wall,
                            &a.unf_gpu, err);
    if (rc == 0) {
        print_attention(bn, &a);
        if (res != NULL)
            *res = a;
    }
    attn_free(bn, t, 4);
    return rc;
}

/* The attention cases: the two of the summary, at 4096 tokens: batch 4 x
 * 16 heads at head dim 64 and 4 x 8 heads at 128 (the same 0.27 TFLOP a
 * call: 1024 query tiles of 64 over 132 SMs, several waves), then two odd
 * head dims. The smoke run takes 128 tokens and fewer heads on the CPU. */
static int bench_attentions(struct bench *bn, struct bs_err *err)
{
    int64_t l = bn->smoke ? 128 : 4096, b = bn->smoke ? 1 : 4;
    int rc;
    TRY(bench_attention(bn, b, bn->smoke ? 2 : 16, 64, l, FA2_H100_HD64_4K, &bn->attn[0], err));
    TRY(bench_attention(bn, b, bn->smoke ? 1 : 8, 128, l, FA2_H100_HD128_4K, &bn->attn[1], err));
    if (bn->smoke)
        return 0;
    TRY(bench_attention(bn, 2, 8, 40, 4096, 0, NULL, err));
    return bench_attention(bn, 8, 16, 72, 256, 0, NULL, err);
}

/* ---- summary ----------------------------------------------------------------- */

/* "met", "NOT met", or "n/a (cpu)" when not measured. */
static const char *verdict(bool measured, bool ok)
{
    return !measured ? "n/a (cpu)" : ok ? "met" : "NOT met";
}

/* The launch graphs' saving: GPU-only (or, on the CPU, end-to-end) time
 * off against on per model and batch, on one line. */
static void graphs_line(const struct bench *bn)
{
    bool gpu = bn->timer != NULL;
    printf("launch graphs (%s vs off), %s saving:", bn->gmode, gpu ? "GPU-only" : "end-to-end");
    for (int i = 0; i < bn->n_rows; i++) {
        const struct row *r = &bn->rows[i];
        double off = gpu ? r->gpu : r->wall, on = gpu ? r->gpu_g : r->wall_g;
        char s[32], gr[16];
        printf("%s %s b%lld %s [graphs/fwd %s]", i ? ";" : "", r->name, (long long)r->batch,
               fmt_saving(s, sizeof(s), off, on), fmt_graphs(gr, sizeof(gr), r->graphs));
    }
    printf("\n");
}

static void summary(const struct bench *bn)
{
    char g[64], w[64], gg[64], wg[64], s0[32], s1[32], gr[16];
    printf("\n== summary (%s, peak %.1f TFLOP/s; graphs off, then %s) ==\n", bn->dtype, bn->peak,
           bn->gmode);
    printf("workload                  batch  GPU-only off                           "
           "GPU-only %-7s                        saving              end-to-end off          "
           "               end-to-end %-7s                      saving              transfers  "
           "graphs/fwd\n",
           bn->gmode, bn->gmode);
    for (int i = 0; i < bn->n_rows; i++) {
        const struct row *r = &bn->rows[i];
        printf("%-24s %6lld  %s  %s  %s  %s  %s  %s  ", r->name, (long long)r->batch,
               fmt_time(g, sizeof(g), bn, r->flops, r->gpu),
               fmt_time(gg, sizeof(gg), bn, r->flops, r->gpu_g),
               fmt_saving(s0, sizeof(s0), r->gpu, r->gpu_g),
               fmt_time(w, sizeof(w), bn, r->flops, r->wall),
               fmt_time(wg, sizeof(wg), bn, r->flops, r->wall_g),
               fmt_saving(s1, sizeof(s1), r->wall, r->wall_g));
        if (r->xfer < 0)
            printf("n/a (cpu)  ");
        else
            printf("%.3f ms  ", r->xfer);
        printf("%s\n", fmt_graphs(gr, sizeof(gr), r->graphs));
    }
    graphs_line(bn);
    for (int i = 0; i < 2; i++) {
        const struct attn_res *a = &bn->attn[i];
        double ms = a->fused_gpu, ums = a->unf_gpu;
        printf("attention %lld tokens, head dim %d (B%lld x %d heads), GPU: fused ",
               (long long)a->l, a->hd, (long long)a->batch, a->heads);
        if (ms < 0)
            printf("n/a (cpu)");
        else
            printf("%.1f TFLOP/s (%.1f%%)", tflops(a->flops, ms),
                   100 * tflops(a->flops, ms) / bn->peak);
        if (ums < 0)
            printf("; unfused cuBLAS n/a (cpu)");
        else
            printf("; unfused cuBLAS %.1f TFLOP/s (fused %.2fx)", tflops(a->flops, ums),
                   ms > 0 ? ums / ms : 0);
        printf("; FA2 reference %.0f TFLOP/s [%s]\n", a->fa2, FA2_SOURCE);
    }
    const struct attn_res *a = &bn->attn[0];
    bool gpu = a->fused_gpu > 0 && a->unf_gpu > 0;
    double tf = gpu ? tflops(a->flops, a->fused_gpu) : 0, sp = gpu ? a->unf_gpu / a->fused_gpu : 0;
    printf("target: fused attention 4096 tokens, head dim 64 >= 300 TFLOP/s (GPU): %.1f: %s\n", tf,
           verdict(gpu, tf >= 300));
    printf("target: fused >= 3x the unfused cuBLAS baseline there (GPU): %.2fx: %s\n", sp,
           verdict(gpu, sp >= 3));
    const struct row *d = NULL;
    for (int i = 0; i < bn->n_rows; i++)
        if (strcmp(bn->rows[i].name, "sd15_down0_block") == 0 && bn->rows[i].batch == 8)
            d = &bn->rows[i];
    bool dm = d != NULL && d->gpu > 0;
    double pct = dm ? 100 * tflops(d->flops, d->gpu) / bn->peak : 0;
    printf("target: sd15_down0_block batch 8 GPU-only >= 40%% of peak: %.1f%%: %s\n", pct,
           verdict(dm, pct >= 40));
}

static void usage(void)
{
    fprintf(stderr, "usage: gpu_bench [--dtype bf16|fp16|fp32] [--reps N] [--peak TFLOPS] "
                    "[--smoke 1]\n");
}

int main(int argc, char **argv)
{
    struct bench bn = {.dtype = "bf16", .reps = 10, .peak = 989.4};
    struct bs_err err = {0};
    if ((argc - 1) % 2 != 0) {
        usage();
        return 2;
    }
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
            usage();
            return 2;
        }
    }
    if (bn.smoke) {
        bn.reps = 1;
        bn.dtype = "fp32";
    }
    /* graphs on the GPU: off and on; on the CPU (no graph ops): off and
     * the engine's emulation, which runs the same bookkeeping */
    bn.gmode = bn.smoke ? "emulate" : "on";
    struct bs_backend_opts o = {
        .device = bn.smoke ? "cpu" : "cuda", .dtype = bn.dtype, .graphs = "off"};
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
    o.graphs = bn.gmode;
    if ((rc = bs_backend_init_opts(&bn.be_g, &o, &err)) != 0) {
        fprintf(stderr, "gpu_bench: graphs %s: %s\n", bn.gmode, err.msg);
        bs_backend_free(&bn.be);
        return 1;
    }
    bs_proc_gpu_timer_fn timer;
    *(void **)&timer = bs_backend_get_proc_address(&bn.be, BS_PROC_GPU_TIMER);
    bn.timer = timer != NULL ? timer() : NULL;
    if (bn.timer == NULL && !bn.smoke) {
        fprintf(stderr, "gpu_bench: the backend has no entry point " BS_PROC_GPU_TIMER "\n");
        bs_backend_free(&bn.be);
        return 1;
    }
    if ((rc = bench_attentions(&bn, &err)) == 0)
        rc = bench_models(&bn, &err);
    if (rc != 0)
        fprintf(stderr, "gpu_bench: %s\n", err.msg);
    else
        summary(&bn);
    bs_backend_free(&bn.be);
    bs_backend_free(&bn.be_g);
    return rc == 0 ? 0 : 1;
}
