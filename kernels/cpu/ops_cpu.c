/* CPU kernels for the row-wise and elementwise ops: layer norm, group norm,
 * activations, gated units, residual adds, transpose and row gathers.
 *
 * Each op has three layers (STYLE rule 5): the entry (bs__cpu_*) checks shapes
 * and dtypes (engine/opcheck.h, shared with the CUDA twin) and fills a job; a
 * range task runs the kernel over rows (or groups, or row blocks) [i0, i1);
 * bs__cpu_parallel_for splits the range on the pool when the op is big
 * enough. Kernels are plain loops over contiguous rows, written so that gcc
 * -O3 -march=x86-64-v3 vectorises them (vmath.h for the transcendental
 * functions). */
#include "ops_cpu.h"

#include <math.h>
#include <string.h>

#include "opcheck.h"
#include "vmath.h"

/* Ops touching fewer floats than this run on the calling thread. */
#define PAR_MIN_WORK 32768
/* Smallest chunk of work (floats) a pool task gets. */
#define PAR_MIN_CHUNK 8192

static int64_t cdiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

/* ---- parallel for ------------------------------------------------------ */

struct par_job {
    bs__range_fn fn;
    void *arg;
    int64_t n, chunk;
};

static void par_task(void *arg, int64_t task, int thread)
{
    const struct par_job *j = arg;
    int64_t i0 = task * j->chunk;
    int64_t i1 = i0 + j->chunk < j->n ? i0 + j->chunk : j->n;
    j->fn(j->arg, i0, i1);
}

void bs__cpu_parallel_for(struct bs__cpu *c, int64_t n, int64_t cost, bs__range_fn fn, void *arg)
{
    if (n <= 0)
        return;
    cost = cost < 1 ? 1 : cost;
    if (c->n_threads == 1 || n == 1 || (double)n * (double)cost < PAR_MIN_WORK) {
        fn(arg, 0, n);
        return;
    }
    /* About 4 chunks per thread so the atomic counter can balance them. */
    int64_t chunk = cdiv(n, 4 * (int64_t)c->n_threads);
    int64_t min_chunk = cdiv(PAR_MIN_CHUNK, cost);
    struct par_job j = {
        .fn = fn, .arg = arg, .n = n, .chunk = chunk > min_chunk ? chunk : min_chunk};
    bs_pool_run(c->pool, cdiv(n, j.chunk), par_task, &j);
}

/* ---- operand helpers ------------------------------------------------- */

static const float *data_or_null(const struct bs_tensor *t)
{
    return t ? t->data : NULL;
}

static int64_t ld_or_zero(const struct bs_tensor *t)
{
    return t ? bs_tensor_ld(t) : 0;
}

/* ---- reductions -------------------------------------------------------- */

/* Sums run in 16 float lanes (two AVX vectors, vectorised without
 * reassociation flags) over blocks of 1024 values, and add the blocks in
 * double: accurate for groups of millions of values, and fast. */
#define RED_LANES 16
#define RED_BLOCK 1024

/* Sum of (x - pivot). */
static double sum_dev_f32(const float *x, int64_t n, float pivot)
{
    double total = 0.0;
    for (int64_t i0 = 0; i0 < n; i0 += RED_BLOCK) {
        int64_t len = n - i0 < RED_BLOCK ? n - i0 : RED_BLOCK, i = 0;
        const float *p = x + i0;
        float acc[RED_LANES] = {0};
        for (; i + RED_LANES <= len; i += RED_LANES)
            for (int l = 0; l < RED_LANES; l++)
                acc[l] += p[i + l] - pivot;
        for (; i < len; i++)
            acc[0] += p[i] - pivot;
        double s = 0.0;
        for (int l = 0; l < RED_LANES; l++)
            s += acc[l];
        total += s;
    }
    return total;
}

/* Sum of (x - mean)^2, mean = hi + lo given as two floats. */
static double sumsq_dev_f32(const float *x, int64_t n, float hi, float lo)
{
    double total = 0.0;
    for (int64_t i0 = 0; i0 < n; i0 += RED_BLOCK) {
        int64_t len = n - i0 < RED_BLOCK ? n - i0 : RED_BLOCK, i = 0;
        const float *p = x + i0;
        float acc[RED_LANES] = {0};
        for (; i + RED_LANES <= len; i += RED_LANES)
            for (int l = 0; l < RED_LANES; l++) {
                float d = (p[i + l] - hi) - lo;
                acc[l] += d * d;
            }
        for (; i < len; i++) {
            float d = (p[i] - hi) - lo;
            acc[0] += d * d;
        }
        double s = 0.0;
        for (int l = 0; l < RED_LANES; l++)
            s += acc[l];
        total += s;
    }
    return total;
}

/* Statistics of a row or group: the mean as a float pair hi + lo and
 * 1/sqrt(var + eps) of the biased variance, in two passes. Both passes work
 * on deviations that are small next to a large mean: the first sums x - x[0],
 * the second (x - hi) - lo (x - hi is exact for x near the mean), so the
 * result stays accurate for rows like 1000 + noise. */
struct moments {
    float hi, lo, rstd;
};

static struct moments moments(const float *x, int64_t n, float eps)
{
    struct moments m;
    double mean = (double)x[0] + sum_dev_f32(x, n, x[0]) / (double)n;
    m.hi = (float)mean;
    m.lo = (float)(mean - (double)m.hi);
    double var = sumsq_dev_f32(x, n, m.hi, m.lo) / (double)n;
    m.rstd = (float)(1.0 / sqrt(var + (double)eps));
    return m;
}

/* ---- layer norm -------------------------------------------------------- */

struct ln_job {
    const float *x;
    float *y;
    int64_t d, ldx, ldy;
    float eps;
    const float *gamma, *beta, *scale, *shift;
    int64_t ld_scale, ld_shift, rows_per_sample;
};

static void ln_rows(void *arg, int64_t r0, int64_t r1)
{
    const struct ln_job *j = arg;
    int64_t d = j->d;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * j->ldx;
        float *y = j->y + r * j->ldy;
        struct moments mo = moments(x, d, j->eps);
        for (int64_t i = 0; i < d; i++)
            y[i] = ((x[i] - mo.hi) - mo.lo) * mo.rstd;
        if (j->gamma)
            for (int64_t i = 0; i < d; i++)
                y[i] *= j->gamma[i];
        if (j->beta)
            for (int64_t i = 0; i < d; i++)
                y[i] += j->beta[i];
        int64_t b = r / j->rows_per_sample;
        if (j->scale) {
            const float *s = j->scale + b * j->ld_scale;
            for (int64_t i = 0; i < d; i++)
                y[i] *= 1.0f + s[i];
        }
        if (j->shift) {
            const float *s = j->shift + b * j->ld_shift;
            for (int64_t i = 0; i < d; i++)
                y[i] += s[i];
        }
    }
}

int bs__cpu_layer_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                       const struct bs_norm_params *p, struct bs_err *err)
{
    int rc = bs_opcheck_layer_norm(y, x, p, err);
    if (rc != 0)
        return rc;
    int64_t rows = bs_tensor_nrows(x), d = bs_opcheck_ncols(x), rps = p->rows_per_sample;
    if (d == 0)
        return 0;
    struct ln_job j = {
        .x = x->data,
        .y = y->data,
        .d = d,
        .ldx = bs_tensor_ld(x),
        .ldy = bs_tensor_ld(y),
        .eps = p->eps,
        .gamma = data_or_null(p->gamma),
        .beta = data_or_null(p->beta),
        .scale = data_or_null(p->scale),
        .shift = data_or_null(p->shift),
        .ld_scale = ld_or_zero(p->scale),
        .ld_shift = ld_or_zero(p->shift),
        .rows_per_sample = rps < 1 ? 1 : rps,
    };
    bs__cpu_parallel_for(ctx, rows, 3 * d, ln_rows, &j);
    return 0;
}

/* ---- group norm -------------------------------------------------------- */

struct gn_job {
    const float *x;
    float *y;
    int64_t channels, spatial, groups;
    float eps;
    const float *gamma, *beta, *scale, *shift;
    int64_t ld_scale, ld_shift;
};

/* Groups [t0, t1) of the flattened (sample, group) index. Per channel the
 * affine and modulation fold into y = (x - mean) * a + c. */
static void gn_groups(void *arg, int64_t t0, int64_t t1)
{
    const struct gn_job *j = arg;
    int64_t cpg = j->channels / j->groups, s = j->spatial;
    for (int64_t t = t0; t < t1; t++) {
        int64_t b = t / j->groups, c0 = (t % j->groups) * cpg;
        int64_t base = (b * j->channels + c0) * s;
        struct moments mo = moments(j->x + base, cpg * s, j->eps);
        for (int64_t c = c0; c < c0 + cpg; c++) {
            float a = j->gamma ? mo.rstd * j->gamma[c] : mo.rstd;
            float off = j->beta ? j->beta[c] : 0.0f;
            if (j->scale) {
                float s1 = 1.0f + j->scale[b * j->ld_scale + c];
                a *= s1;
                off *= s1;
            }
            if (j->shift)
                off += j->shift[b * j->ld_shift + c];
            const float *x = j->x + (b * j->channels + c) * s;
            float *y = j->y + (b * j->channels + c) * s;
            for (int64_t i = 0; i < s; i++)
                y[i] = ((x[i] - mo.hi) - mo.lo) * a + off;
        }
    }
}

int bs__cpu_group_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                       const struct bs_norm_params *p, struct bs_err *err)
{
    int rc = bs_opcheck_group_norm(y, x, p, err);
    if (rc != 0)
        return rc;
    int64_t bsz = x->ne[0], ch = x->ne[1];
    int64_t s = bsz > 0 && ch > 0 ? bs_tensor_nelements(x) / (bsz * ch) : 0;
    if (s == 0)
        return 0;
    struct gn_job j = {
        .x = x->data,
        .y = y->data,
        .channels = ch,
        .spatial = s,
        .groups = p->groups,
        .eps = p->eps,
        .gamma = data_or_null(p->gamma),
        .beta = data_or_null(p->beta),
        .scale = data_or_null(p->scale),
        .shift = data_or_null(p->shift),
        .ld_scale = ld_or_zero(p->scale),
        .ld_shift = ld_or_zero(p->shift),
    };
    bs__cpu_parallel_for(ctx, bsz * p->groups, 3 * (ch / p->groups) * s, gn_groups, &j);
    return 0;
}

/* ---- activations and gated units --------------------------------------- */

/* y = act(x) over n values; y may be x. One loop per activation, each
 * vectorised. */
static void act_vec(float *y, const float *x, int64_t n, enum bs_act act)
{
    switch (act) {
    case BS_ACT_NONE:
        if (y != x)
            memmove(y, x, (size_t)n * sizeof(float));
        break;
    case BS_ACT_GELU:
        for (int64_t i = 0; i < n; i++)
            y[i] = bs_geluf(x[i]);
        break;
    case BS_ACT_GELU_TANH:
        for (int64_t i = 0; i < n; i++)
            y[i] = bs_gelu_tanhf(x[i]);
        break;
    case BS_ACT_QUICK_GELU:
        for (int64_t i = 0; i < n; i++)
            y[i] = bs_quick_geluf(x[i]);
        break;
    case BS_ACT_SILU:
        for (int64_t i = 0; i < n; i++)
            y[i] = bs_siluf(x[i]);
        break;
    case BS_ACT_MISH:
        for (int64_t i = 0; i < n; i++)
            y[i] = bs_mishf(x[i]);
        break;
    case BS_ACT_COUNT:
        break;
    }
}

struct act_job {
    const float *x;
    float *y;
    int64_t n, ldx, ldy;
    enum bs_act act;
};

static void act_rows(void *arg, int64_t r0, int64_t r1)
{
    const struct act_job *j = arg;
    for (int64_t r = r0; r < r1; r++)
        act_vec(j->y + r * j->ldy, j->x + r * j->ldx, j->n, j->act);
}

int bs__cpu_act(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                struct bs_err *err)
{
    int rc = bs_opcheck_act(y, x, act, err);
    if (rc != 0)
        return rc;
    struct act_job j = {
        .x = x->data,
        .y = y->data,
        .n = bs_opcheck_ncols(x),
        .ldx = bs_tensor_ld(x),
        .ldy = bs_tensor_ld(y),
        .act = act,
    };
    /* Contiguous on both sides (the common case): one long row, split evenly. */
    if (j.ldx == j.n && j.ldy == j.n) {
        struct act_job flat = j;
        flat.n = 1024;
        flat.ldx = flat.ldy = 1024;
        int64_t total = bs_tensor_nrows(x) * j.n, whole = total / 1024;
        bs__cpu_parallel_for(ctx, whole, 8 * 1024, act_rows, &flat);
        act_vec(j.y + whole * 1024, j.x + whole * 1024, total - whole * 1024, act);
        return 0;
    }
    bs__cpu_parallel_for(ctx, bs_tensor_nrows(x), 8 * j.n, act_rows, &j);
    return 0;
}

struct glu_job {
    const float *x;
    float *y;
    int64_t n, ldx, ldy;
    enum bs_act act;
};

/* y = x[:, :n] * act(x[:, n:]) through a stack buffer, so y may alias x. */
static void glu_rows(void *arg, int64_t r0, int64_t r1)
{
    const struct glu_job *j = arg;
    float tmp[256];
    for (int64_t r = r0; r < r1; r++) {
        const float *a = j->x + r * j->ldx, *g = a + j->n;
        float *y = j->y + r * j->ldy;
        for (int64_t i0 = 0; i0 < j->n; i0 += 256) {
            int64_t len = j->n - i0 < 256 ? j->n - i0 : 256;
            act_vec(tmp, g + i0, len, j->act);
            for (int64_t i = 0; i < len; i++)
                y[i0 + i] = a[i0 + i] * tmp[i];
        }
    }
}

int bs__cpu_glu(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                struct bs_err *err)
{
    int rc = bs_opcheck_glu(y, x, act, err);
    if (rc != 0)
        return rc;
    int64_t n = bs_opcheck_ncols(y);
    struct glu_job j = {
        .x = x->data,
        .y = y->data,
        .n = n,
        .ldx = bs_tensor_ld(x),
        .ldy = bs_tensor_ld(y),
        .act = act,
    };
    bs__cpu_parallel_for(ctx, bs_tensor_nrows(y), 8 * n, glu_rows, &j);
    return 0;
}

/* ---- add --------------------------------------------------------------- */

struct add_job {
    const float *x, *gate;
    float *y;
    int64_t n, ldx, ldy, ld_gate, rows_per_sample;
    float alpha;
};

static void add_rows(void *arg, int64_t r0, int64_t r1)
{
    const struct add_job *j = arg;
    float alpha = j->alpha;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * j->ldx;
        float *y = j->y + r * j->ldy;
        if (j->gate) {
            const float *g = j->gate + (r / j->rows_per_sample) * j->ld_gate;
            for (int64_t i = 0; i < j->n; i++)
                y[i] = alpha * (y[i] + g[i] * x[i]);
        } else {
            for (int64_t i = 0; i < j->n; i++)
                y[i] = alpha * (y[i] + x[i]);
        }
    }
}

int bs__cpu_add(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                const struct bs_tensor *gate, int64_t rows_per_sample, float alpha,
                struct bs_err *err)
{
    int rc = bs_opcheck_add(y, x, gate, rows_per_sample, err);
    if (rc != 0)
        return rc;
    int64_t rows = bs_tensor_nrows(x), n = bs_opcheck_ncols(x);
    struct add_job j = {
        .x = x->data,
        .gate = data_or_null(gate),
        .y = y->data,
        .n = n,
        .ldx = bs_tensor_ld(x),
        .ldy = bs_tensor_ld(y),
        .ld_gate = ld_or_zero(gate),
        .rows_per_sample = rows_per_sample < 1 ? 1 : rows_per_sample,
        .alpha = alpha,
    };
    bs__cpu_parallel_for(ctx, rows, 3 * n, add_rows, &j);
    return 0;
}

/* ---- transpose --------------------------------------------------------- */

#define TR_BLOCK 32

struct tr_job {
    const float *x;
    float *y;
    int64_t r, c, row_blocks;
};

/* Blocks of TR_BLOCK rows of one matrix, TR_BLOCK x TR_BLOCK tiles at a time
 * so both the reads and the writes stay within a few cache lines per row. */
static void tr_blocks(void *arg, int64_t t0, int64_t t1)
{
    const struct tr_job *j = arg;
    for (int64_t t = t0; t < t1; t++) {
        int64_t b = t / j->row_blocks, r0 = (t % j->row_blocks) * TR_BLOCK;
        int64_t r1 = r0 + TR_BLOCK < j->r ? r0 + TR_BLOCK : j->r;
        const float *x = j->x + b * j->r * j->c;
        float *y = j->y + b * j->r * j->c;
        for (int64_t c0 = 0; c0 < j->c; c0 += TR_BLOCK) {
            int64_t c1 = c0 + TR_BLOCK < j->c ? c0 + TR_BLOCK : j->c;
            for (int64_t c = c0; c < c1; c++)
                for (int64_t r = r0; r < r1; r++)
                    y[c * j->r + r] = x[r * j->c + c];
        }
    }
}

int bs__cpu_transpose(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, struct bs_err *err)
{
    int rc = bs_opcheck_transpose(y, x, err);
    if (rc != 0)
        return rc;
    int nd = x->n_dims;
    int64_t bsz = nd == 3 ? x->ne[0] : 1, r = x->ne[nd - 2], c = x->ne[nd - 1];
    if (r == 0 || c == 0)
        return 0;
    struct tr_job j = {.x = x->data, .y = y->data, .r = r, .c = c, .row_blocks = cdiv(r, TR_BLOCK)};
    bs__cpu_parallel_for(ctx, bsz * j.row_blocks, 2 * TR_BLOCK * c, tr_blocks, &j);
    return 0;
}

/* ---- get_rows ---------------------------------------------------------- */

int bs__cpu_get_rows(void *ctx, struct bs_tensor *y, const struct bs_tensor *table,
                     const int64_t *idx, int64_t n, struct bs_err *err)
{
    int rc;
    struct bs_tensor t = *table;
    if (table->type == BS_TYPE_BF16 && bs_tensor_is_contiguous(table)) /* a BF16 model's table */
        t = bs_tensor_make(BS_TYPE_F32, table->n_dims, table->ne, table->data);
    if ((rc = bs_opcheck_get_rows(y, &t, idx, n, err)))
        return rc;
    int64_t d = bs_opcheck_ncols(&t), ldt = bs_tensor_ld(&t), ldy = bs_tensor_ld(y);
    for (int64_t i = 0; i < n; i++) {
        float *dst = (float *)y->data + i * ldy;
        if (table->type == BS_TYPE_BF16)
            bs_convert_to_f32(dst, (const uint16_t *)table->data + idx[i] * ldt, BS_TYPE_BF16, d);
        else
            memcpy(dst, (const float *)table->data + idx[i] * ldt, (size_t)d * sizeof(float));
    }
    return 0;
}
