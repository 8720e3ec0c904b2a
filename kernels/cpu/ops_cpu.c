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
#if defined(__x86_64__) && defined(__AVX2__)
#include <immintrin.h>
#endif

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

/* ---- narrow activations ------------------------------------------------ */

/* Narrow rows go through float buffers of this many values (stack arrays). */
#define CHUNK 256

void bs__cpu_widen(float *dst, const void *src, enum bs_dtype t, int64_t n)
{
    const uint16_t *h = src;
    int64_t i = 0;
    if (t == BS_TYPE_BF16) {
#if defined(__x86_64__) && defined(__AVX2__)
        for (; i + 8 <= n; i += 8) {
            __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + i)));
            _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(u, 16));
        }
#endif
        for (; i < n; i++)
            dst[i] = bs_bf16_to_f32(h[i]);
    } else if (t == BS_TYPE_F16) {
#ifdef __F16C__
        for (; i + 8 <= n; i += 8) /* exact, as bs_fp16_to_f32 (but for signalling NaNs) */
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
        for (; i < n; i++)
            dst[i] = bs_fp16_to_f32(h[i]);
    } else if (dst != src) {
        memmove(dst, src, (size_t)n * sizeof(float));
    }
}

void bs__cpu_narrow(void *dst, enum bs_dtype t, const float *src, int64_t n)
{
    uint16_t *h = dst;
    int64_t i = 0;
    if (t == BS_TYPE_BF16) {
#if defined(__x86_64__) && defined(__AVX2__)
        /* bs_f32_to_bf16 on 8 lanes: u + 0x7fff + (u >> 16 & 1), NaNs quietened. */
        const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
        const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
        const __m256i quiet = _mm256_set1_epi32(0x40);
        for (; i + 8 <= n; i += 8) {
            __m256i u = _mm256_loadu_si256((const __m256i *)(src + i));
            __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
            __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, odd)), 16);
            __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);
            __m256i qn = _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet);
            r = _mm256_blendv_epi8(r, qn, nan);
            r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
            _mm_storeu_si128((__m128i *)(h + i), _mm256_castsi256_si128(r));
        }
#endif
        for (; i < n; i++)
            h[i] = bs_f32_to_bf16(src[i]);
    } else if (t == BS_TYPE_F16) {
#ifdef __F16C__
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_loadu_ps(src + i);
            if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)))
                break; /* a NaN: bs_f32_to_fp16's quiet NaN from here on */
            __m128i r = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_storeu_si128((__m128i *)(h + i), r);
        }
#endif
        for (; i < n; i++)
            h[i] = bs_f32_to_fp16(src[i]);
    } else if (dst != src) {
        memmove(dst, src, (size_t)n * sizeof(float));
    }
}

struct conv_job {
    float *f; /* contiguous F32 rows */
    char *t;  /* the tensor's rows */
    int64_t cols, ld_bytes;
    enum bs_dtype type;
    bool widen;
};

static void conv_rows(void *arg, int64_t r0, int64_t r1)
{
    const struct conv_job *j = arg;
    for (int64_t r = r0; r < r1; r++) {
        if (j->widen)
            bs__cpu_widen(j->f + r * j->cols, j->t + r * j->ld_bytes, j->type, j->cols);
        else
            bs__cpu_narrow(j->t + r * j->ld_bytes, j->type, j->f + r * j->cols, j->cols);
    }
}

static void conv_run(struct bs__cpu *c, float *f, const struct bs_tensor *t, bool widen)
{
    struct conv_job j = {
        .f = f,
        .t = t->data,
        .cols = bs_opcheck_ncols(t),
        .ld_bytes = bs_tensor_ld(t) * (int64_t)bs_dtype_size(t->type),
        .type = t->type,
        .widen = widen,
    };
    bs__cpu_parallel_for(c, bs_tensor_nrows(t), j.cols, conv_rows, &j);
}

void bs__cpu_rows_widen(struct bs__cpu *c, float *dst, const struct bs_tensor *t)
{
    conv_run(c, dst, t, true);
}

void bs__cpu_rows_narrow(struct bs__cpu *c, struct bs_tensor *t, const float *src)
{
    conv_run(c, (float *)src, t, false);
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
    const void *x;
    void *y;
    enum bs_dtype tx, ty;
    int64_t d, ldx, ldy; /* row strides in elements */
    float eps;
    const float *gamma, *beta, *scale, *shift;
    int64_t ld_scale, ld_shift, rows_per_sample;
};

/* Row r: y = the normalised x (F32 rows; y may be x). */
static inline __attribute__((always_inline)) void ln_row(const struct ln_job *j, int64_t r,
                                                         const float *x, float *y)
{
    int64_t d = j->d;
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

static void ln_rows(void *arg, int64_t r0, int64_t r1)
{
    const struct ln_job *j = arg;
    for (int64_t r = r0; r < r1; r++)
        ln_row(j, r, (const float *)j->x + r * j->ldx, (float *)j->y + r * j->ldy);
}

/* A narrow x or y (d <= BS__CPU_ROW_MAX): each row widened into a stack
 * buffer, normalised in F32 and rounded into y once. */
static void ln_rows_narrow(void *arg, int64_t r0, int64_t r1)
{
    const struct ln_job *j = arg;
    float xb[BS__CPU_ROW_MAX], yb[BS__CPU_ROW_MAX];
    size_t sx = bs_dtype_size(j->tx), sy = bs_dtype_size(j->ty);
    for (int64_t r = r0; r < r1; r++) {
        const char *x = (const char *)j->x + (size_t)(r * j->ldx) * sx;
        char *y = (char *)j->y + (size_t)(r * j->ldy) * sy;
        const float *xf = (const float *)x;
        if (j->tx != BS_TYPE_F32) {
            bs__cpu_widen(xb, x, j->tx, j->d);
            xf = xb;
        }
        float *yf = j->ty == BS_TYPE_F32 ? (float *)y : yb;
        ln_row(j, r, xf, yf);
        if (j->ty != BS_TYPE_F32)
            bs__cpu_narrow(y, j->ty, yb, j->d);
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
    bool narrow = x->type != BS_TYPE_F32 || y->type != BS_TYPE_F32;
    if (narrow && d > BS__CPU_ROW_MAX)
        return bs_err_set(err, BS_EINVAL,
                          "layer_norm: rows of %lld narrow values exceed the kernel's %d",
                          (long long)d, BS__CPU_ROW_MAX);
    struct ln_job j = {
        .x = x->data,
        .y = y->data,
        .tx = x->type,
        .ty = y->type,
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
    bs__cpu_parallel_for(ctx, rows, 3 * d, narrow ? ln_rows_narrow : ln_rows, &j);
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
    const void *x;
    void *y;
    int64_t n, ldx, ldy; /* in elements */
    enum bs_act act;
    enum bs_dtype tx, ty;
};

static void act_rows(void *arg, int64_t r0, int64_t r1)
{
    const struct act_job *j = arg;
    for (int64_t r = r0; r < r1; r++)
        act_vec((float *)j->y + r * j->ldy, (const float *)j->x + r * j->ldx, j->n, j->act);
}

/* A narrow x or y: CHUNK values at a time widened, act'ed in F32 and rounded
 * into y (y may be x: each chunk is read before it is written). */
static void act_rows_narrow(void *arg, int64_t r0, int64_t r1)
{
    const struct act_job *j = arg;
    size_t sx = bs_dtype_size(j->tx), sy = bs_dtype_size(j->ty);
    float tmp[CHUNK];
    for (int64_t r = r0; r < r1; r++) {
        const char *x = (const char *)j->x + (size_t)(r * j->ldx) * sx;
        char *y = (char *)j->y + (size_t)(r * j->ldy) * sy;
        for (int64_t i0 = 0; i0 < j->n; i0 += CHUNK) {
            int64_t len = j->n - i0 < CHUNK ? j->n - i0 : CHUNK;
            bs__cpu_widen(tmp, x + (size_t)i0 * sx, j->tx, len);
            act_vec(tmp, tmp, len, j->act);
            bs__cpu_narrow(y + (size_t)i0 * sy, j->ty, tmp, len);
        }
    }
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
        .tx = x->type,
        .ty = y->type,
    };
    bool narrow = x->type != BS_TYPE_F32 || y->type != BS_TYPE_F32;
    /* Contiguous on both sides (the common case): one long row, split evenly. */
    if (j.ldx == j.n && j.ldy == j.n) {
        struct act_job flat = j;
        flat.n = 1024;
        flat.ldx = flat.ldy = 1024;
        int64_t total = bs_tensor_nrows(x) * j.n, whole = total / 1024;
        bs__cpu_parallel_for(ctx, whole, 8 * 1024, narrow ? act_rows_narrow : act_rows, &flat);
        if (narrow) {
            flat.n = total - whole * 1024;
            flat.x = (const char *)x->data + (size_t)(whole * 1024) * bs_dtype_size(x->type);
            flat.y = (char *)y->data + (size_t)(whole * 1024) * bs_dtype_size(y->type);
            act_rows_narrow(&flat, 0, 1);
        } else {
            act_vec((float *)j.y + whole * 1024, (const float *)j.x + whole * 1024,
                    total - whole * 1024, act);
        }
        return 0;
    }
    bs__cpu_parallel_for(ctx, bs_tensor_nrows(x), 8 * j.n, narrow ? act_rows_narrow : act_rows, &j);
    return 0;
}

struct glu_job {
    const void *x;
    void *y;
    int64_t n, ldx, ldy; /* in elements */
    enum bs_act act;
    enum bs_dtype tx, ty;
};

/* y = x[:, :n] * act(x[:, n:]) through a stack buffer, so y may alias x. */
static void glu_rows(void *arg, int64_t r0, int64_t r1)
{
    const struct glu_job *j = arg;
    float tmp[256];
    for (int64_t r = r0; r < r1; r++) {
        const float *a = (const float *)j->x + r * j->ldx, *g = a + j->n;
        float *y = (float *)j->y + r * j->ldy;
        for (int64_t i0 = 0; i0 < j->n; i0 += 256) {
            int64_t len = j->n - i0 < 256 ? j->n - i0 : 256;
            act_vec(tmp, g + i0, len, j->act);
            for (int64_t i = 0; i < len; i++)
                y[i0 + i] = a[i0 + i] * tmp[i];
        }
    }
}

/* The same with a narrow x or y: both halves of a chunk widened first. */
static void glu_rows_narrow(void *arg, int64_t r0, int64_t r1)
{
    const struct glu_job *j = arg;
    size_t sx = bs_dtype_size(j->tx), sy = bs_dtype_size(j->ty);
    float ta[CHUNK], tg[CHUNK];
    for (int64_t r = r0; r < r1; r++) {
        const char *a = (const char *)j->x + (size_t)(r * j->ldx) * sx;
        const char *g = a + (size_t)j->n * sx;
        char *y = (char *)j->y + (size_t)(r * j->ldy) * sy;
        for (int64_t i0 = 0; i0 < j->n; i0 += CHUNK) {
            int64_t len = j->n - i0 < CHUNK ? j->n - i0 : CHUNK;
            bs__cpu_widen(ta, a + (size_t)i0 * sx, j->tx, len);
            bs__cpu_widen(tg, g + (size_t)i0 * sx, j->tx, len);
            act_vec(tg, tg, len, j->act);
            for (int64_t i = 0; i < len; i++)
                ta[i] *= tg[i];
            bs__cpu_narrow(y + (size_t)i0 * sy, j->ty, ta, len);
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
        .tx = x->type,
        .ty = y->type,
    };
    bool narrow = x->type != BS_TYPE_F32 || y->type != BS_TYPE_F32;
    bs__cpu_parallel_for(ctx, bs_tensor_nrows(y), 8 * n, narrow ? glu_rows_narrow : glu_rows, &j);
    return 0;
}

/* ---- add --------------------------------------------------------------- */

struct add_job {
    const void *x;
    const float *gate;
    void *y;
    int64_t n, ldx, ldy, ld_gate, rows_per_sample; /* strides in elements */
    float alpha;
    enum bs_dtype tx, ty;
};

static void add_rows(void *arg, int64_t r0, int64_t r1)
{
    const struct add_job *j = arg;
    float alpha = j->alpha;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = (const float *)j->x + r * j->ldx;
        float *y = (float *)j->y + r * j->ldy;
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

/* A narrow x or y: chunks of both widened, added as add_rows adds, y
 * rounded once. */
static void add_rows_narrow(void *arg, int64_t r0, int64_t r1)
{
    const struct add_job *j = arg;
    size_t sx = bs_dtype_size(j->tx), sy = bs_dtype_size(j->ty);
    float alpha = j->alpha, tx[CHUNK], ty[CHUNK];
    for (int64_t r = r0; r < r1; r++) {
        const char *x = (const char *)j->x + (size_t)(r * j->ldx) * sx;
        char *y = (char *)j->y + (size_t)(r * j->ldy) * sy;
        const float *g = j->gate ? j->gate + (r / j->rows_per_sample) * j->ld_gate : NULL;
        for (int64_t i0 = 0; i0 < j->n; i0 += CHUNK) {
            int64_t len = j->n - i0 < CHUNK ? j->n - i0 : CHUNK;
            bs__cpu_widen(tx, x + (size_t)i0 * sx, j->tx, len);
            bs__cpu_widen(ty, y + (size_t)i0 * sy, j->ty, len);
            if (g != NULL)
                for (int64_t i = 0; i < len; i++)
                    ty[i] = alpha * (ty[i] + g[i0 + i] * tx[i]);
            else
                for (int64_t i = 0; i < len; i++)
                    ty[i] = alpha * (ty[i] + tx[i]);
            bs__cpu_narrow(y + (size_t)i0 * sy, j->ty, ty, len);
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
        .tx = x->type,
        .ty = y->type,
    };
    bool narrow = x->type != BS_TYPE_F32 || y->type != BS_TYPE_F32;
    bs__cpu_parallel_for(ctx, rows, 3 * n, narrow ? add_rows_narrow : add_rows, &j);
    return 0;
}

/* ---- transpose --------------------------------------------------------- */

#define TR_BLOCK 32

struct tr_job {
    const void *x;
    void *y;
    int64_t r, c, row_blocks;
};

/* Blocks of TR_BLOCK rows of one matrix, TR_BLOCK x TR_BLOCK tiles at a time
 * so both the reads and the writes stay within a few cache lines per row;
 * elements of type T (float, or uint16_t for BF16 and F16: a transpose moves
 * values, so narrow ones move as they are). */
#define TR_BLOCKS(name, T)                                                                         \
    static void name(void *arg, int64_t t0, int64_t t1)                                            \
    {                                                                                              \
        const struct tr_job *j = arg;                                                              \
        for (int64_t t = t0; t < t1; t++) {                                                        \
            int64_t b = t / j->row_blocks, r0 = (t % j->row_blocks) * TR_BLOCK;                    \
            int64_t r1 = r0 + TR_BLOCK < j->r ? r0 + TR_BLOCK : j->r;                              \
            const T *x = (const T *)j->x + b * j->r * j->c;                                        \
            T *y = (T *)j->y + b * j->r * j->c;                                                    \
            for (int64_t c0 = 0; c0 < j->c; c0 += TR_BLOCK) {                                      \
                int64_t c1 = c0 + TR_BLOCK < j->c ? c0 + TR_BLOCK : j->c;                          \
                for (int64_t c = c0; c < c1; c++)                                                  \
                    for (int64_t r = r0; r < r1; r++)                                              \
                        y[c * j->r + r] = x[r * j->c + c];                                         \
            }                                                                                      \
        }                                                                                          \
    }
TR_BLOCKS(tr_blocks, float)
TR_BLOCKS(tr_blocks16, uint16_t)

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
    bs__cpu_parallel_for(ctx, bsz * j.row_blocks, 2 * TR_BLOCK * c,
                         x->type == BS_TYPE_F32 ? tr_blocks : tr_blocks16, &j);
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
