/* FlashAttention-style multi-head attention on the CPU.
 *
 * One pool task per (batch, head, tile of ATT_TQ queries). A task walks the
 * keys in tiles of ATT_TK: S = scale Q K^T by one sgemm on strided views of q
 * and k (row stride ld, column offset h * head_dim: fused QKV buffers are read
 * in place), adds the mask, and folds the tile into an online softmax: per
 * query row a running max m and sum l, the accumulator O rescaled by
 * exp(m_old - m_new) and O += P V by a second sgemm. At the end o = O / l.
 * Scratch is per thread: S (ATT_TQ x ATT_TK), O (ATT_TQ x head_dim) and three
 * ATT_TQ vectors, about 110 KB at head_dim 160, whatever Lq and Lk are.
 *
 * Masks. Softmax is invariant under adding a constant to a row, so each mask
 * row is shifted by its own maximum before it is added: a row masked
 * uniformly (-10000 everywhere) then adds exactly 0 and gives softmax of the
 * raw scores, as exact arithmetic would, instead of losing the scores' low
 * bits in s + (-10000) (float spacing at 10000 is 1e-3).
 * -inf entries give weight 0. A query whose mask row is -inf everywhere has no
 * key to attend to: its output row is 0 (a choice: PyTorch's softmax would
 * give NaN; 0 keeps a batch with one empty row usable). Lk = 0 also gives 0.
 *
 * Thread ownership: the job is read-only during the run; each task writes its
 * own rows of o and the scratch slice of the thread running it. The entry
 * holds the context's scratch_lock from reserving the scratch until the pool
 * run returns. */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "ops_cpu.h"
#include "vmath.h"

/* Tile sizes (override with -D to tune): 64 x 256 measured as fast as larger
 * tiles for 8 heads x 40 at 4096 tokens, and gives more tasks to balance. */
#ifndef ATT_TQ
#define ATT_TQ 64 /* queries per task */
#endif
#ifndef ATT_TK
#define ATT_TK 256 /* keys per tile */
#endif

struct attn_job {
    const float *q, *k, *v, *mask;
    float *o;
    int64_t ldq, ldk, ldv, ldo;
    int64_t lq, lk;
    int64_t mq;                 /* mask rows per sample: 1 or lq (0: no mask) */
    int64_t mask_nb0, mask_nb1; /* mask strides in floats: sample, query row */
    int heads, head_dim;
    float scale;
    int64_t q_tiles;
    float *scratch;
    size_t scratch_floats; /* per thread */
};

/* Per-thread scratch layout. */
struct attn_tile {
    float *s;     /* [ATT_TQ][ATT_TK] scores, then probabilities */
    float *acc;   /* [ATT_TQ][head_dim] output accumulator */
    float *m;     /* [ATT_TQ] running max */
    float *l;     /* [ATT_TQ] running sum */
    float *shift; /* [ATT_TQ] mask row maximum subtracted from the mask */
};

static size_t attn_scratch_floats(int head_dim)
{
    size_t hd = ((size_t)head_dim + 15) & ~(size_t)15;
    return (size_t)ATT_TQ * ATT_TK + (size_t)ATT_TQ * hd + 3 * (size_t)ATT_TQ;
}

static struct attn_tile attn_tile_at(const struct attn_job *j, int thread)
{
    struct attn_tile t;
    size_t hd = ((size_t)j->head_dim + 15) & ~(size_t)15;
    t.s = j->scratch + (size_t)thread * j->scratch_floats;
    t.acc = t.s + (size_t)ATT_TQ * ATT_TK;
    t.m = t.acc + (size_t)ATT_TQ * hd;
    t.l = t.m + ATT_TQ;
    t.shift = t.l + ATT_TQ;
    return t;
}

#define LANES 16

/* Max of n floats in LANES lanes (vectorised without reassociation flags). */
static float max_f32(const float *x, int64_t n)
{
    float acc[LANES];
    for (int l = 0; l < LANES; l++)
        acc[l] = -INFINITY;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] = x[i + l] > acc[l] ? x[i + l] : acc[l];
    for (; i < n; i++)
        acc[0] = x[i] > acc[0] ? x[i] : acc[0];
    float m = acc[0];
    for (int l = 1; l < LANES; l++)
        m = acc[l] > m ? acc[l] : m;
    return m;
}

/* x[i] = exp(x[i] - ref); returns the sum. */
static float exp_sum_f32(float *x, int64_t n, float ref)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = bs_expf(x[i] - ref);
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] += x[i + l];
    for (; i < n; i++)
        acc[0] += x[i];
    float s = 0.0f;
    for (int l = 0; l < LANES; l++)
        s += acc[l];
    return s;
}

static const float *mask_row(const struct attn_job *j, int64_t b, int64_t qi)
{
    return j->mask + b * j->mask_nb0 + (j->mq == 1 ? 0 : qi) * j->mask_nb1;
}

/* Fold one key tile's scores (already in t->s, rows of ATT_TK) into the
 * running softmax of tq query rows; leaves probabilities in t->s and rescales
 * the accumulator rows (unless this is the first tile). */
static void attn_softmax_tile(const struct attn_job *j, const struct attn_tile *t, int64_t b,
                              int64_t q0, int64_t tq, int64_t k0, int64_t tk, int first)
{
    int hd = j->head_dim;
    for (int64_t i = 0; i < tq; i++) {
        float *s = t->s + i * ATT_TK;
        if (j->mask) {
            const float *mr = mask_row(j, b, q0 + i) + k0;
            float sh = t->shift[i];
            for (int64_t c = 0; c < tk; c++)
                s[c] += mr[c] - sh;
        }
        float m_old = t->m[i], mx = max_f32(s, tk);
        float m_new = mx > m_old ? mx : m_old;
        float ref = m_new == -INFINITY ? 0.0f : m_new; /* all -inf so far: weights 0 */
        float corr = bs_expf(m_old - ref);             /* 0 while m_old is -inf */
        t->l[i] = t->l[i] * corr + exp_sum_f32(s, tk, ref);
        t->m[i] = m_new;
        if (!first && corr != 1.0f) {
            float *a = t->acc + i * hd;
            for (int c = 0; c < hd; c++)
                a[c] *= corr;
        }
    }
}

/* Mask row maxima (0 where a row is -inf everywhere, or without a mask). */
static void attn_mask_shift(const struct attn_job *j, const struct attn_tile *t, int64_t b,
                            int64_t q0, int64_t tq)
{
    for (int64_t i = 0; i < tq; i++) {
        if (j->mask == NULL || (i > 0 && j->mq == 1)) {
            t->shift[i] = j->mask ? t->shift[0] : 0.0f;
            continue;
        }
        float mx = max_f32(mask_row(j, b, q0 + i), j->lk);
        t->shift[i] = isfinite(mx) ? mx : 0.0f;
    }
}

static void attn_task(void *arg, int64_t task, int thread)
{
    const struct attn_job *j = arg;
    int64_t qt = task % j->q_tiles, bh = task / j->q_tiles;
    int64_t b = bh / j->heads, h = bh % j->heads;
    int64_t q0 = qt * ATT_TQ, tq = j->lq - q0 < ATT_TQ ? j->lq - q0 : ATT_TQ;
    int hd = j->head_dim;
    struct attn_tile t = attn_tile_at(j, thread);
    const float *q = j->q + (b * j->lq + q0) * j->ldq + h * hd;

    for (int64_t i = 0; i < tq; i++) {
        t.m[i] = -INFINITY;
        t.l[i] = 0.0f;
    }
    attn_mask_shift(j, &t, b, q0, tq);
    if (j->lk == 0)
        memset(t.acc, 0, (size_t)tq * (size_t)hd * sizeof(float));
    for (int64_t k0 = 0; k0 < j->lk; k0 += ATT_TK) {
        int64_t tk = j->lk - k0 < ATT_TK ? j->lk - k0 : ATT_TK;
        const float *k = j->k + (b * j->lk + k0) * j->ldk + h * hd;
        const float *v = j->v + (b * j->lk + k0) * j->ldv + h * hd;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)tq, (blasint)tk, hd, j->scale,
                    q, (blasint)j->ldq, k, (blasint)j->ldk, 0.0f, t.s, ATT_TK);
        attn_softmax_tile(j, &t, b, q0, tq, k0, tk, k0 == 0);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)tq, hd, (blasint)tk, 1.0f,
                    t.s, ATT_TK, v, (blasint)j->ldv, k0 == 0 ? 0.0f : 1.0f, t.acc, hd);
    }
    for (int64_t i = 0; i < tq; i++) {
        float inv = t.l[i] > 0.0f ? 1.0f / t.l[i] : 0.0f;
        const float *a = t.acc + i * hd;
        float *o = j->o + (b * j->lq + q0 + i) * j->ldo + h * hd;
        for (int c = 0; c < hd; c++)
            o[c] = a[c] * inv;
    }
}

static int attn_check_mask(const struct bs_attn_params *p, struct attn_job *j, struct bs_err *err)
{
    const struct bs_tensor *m = p->mask;
    if (m == NULL)
        return 0;
    if (m->type != BS_TYPE_F32 || m->n_dims != 3 || m->ne[0] != p->batch ||
        (m->ne[1] != 1 && m->ne[1] != p->lq) || m->ne[2] != p->lk ||
        (p->lk > 1 && m->nb[2] != (int64_t)sizeof(float)) || m->nb[0] % 4 || m->nb[1] % 4) {
        char ms[64];
        return bs_err_set(err, BS_EINVAL,
                          "attention: mask %s must be F32 [%lld, 1 or %lld, %lld] "
                          "with a dense last dim",
                          bs_tensor_shape_str(m, ms, sizeof(ms)), (long long)p->batch,
                          (long long)p->lq, (long long)p->lk);
    }
    j->mask = m->data;
    j->mq = m->ne[1] == 1 ? 1 : p->lq;
    j->mask_nb0 = m->nb[0] / 4;
    j->mask_nb1 = m->nb[1] / 4;
    return 0;
}

/* q, k, v, o: F32 rows tensors with the right row counts and heads x head_dim
 * columns. */
static int attn_check(struct bs_tensor *o, const struct bs_tensor *q, const struct bs_tensor *k,
                      const struct bs_tensor *v, const struct bs_attn_params *p, struct bs_err *err)
{
    const char *op = "attention";
    int rc;
    if ((rc = bs__check_f32_rows(q, op, "q", err)) || (rc = bs__check_f32_rows(k, op, "k", err)) ||
        (rc = bs__check_f32_rows(v, op, "v", err)) || (rc = bs__check_f32_rows(o, op, "o", err)))
        return rc;
    if (p->batch < 0 || p->lq < 0 || p->lk < 0 || p->heads < 1 || p->head_dim < 1)
        return bs_err_set(err, BS_EINVAL,
                          "attention: bad sizes (batch %lld, lq %lld, lk %lld, "
                          "heads %d, head_dim %d)",
                          (long long)p->batch, (long long)p->lq, (long long)p->lk, p->heads,
                          p->head_dim);
    int64_t inner = (int64_t)p->heads * p->head_dim;
    const struct bs_tensor *ts[4] = {q, k, v, o};
    const char *names[4] = {"q", "k", "v", "o"};
    for (int i = 0; i < 4; i++) {
        int64_t rows = i == 1 || i == 2 ? p->batch * p->lk : p->batch * p->lq;
        const struct bs_tensor *t = ts[i];
        if (bs_tensor_nrows(t) != rows || t->ne[t->n_dims - 1] != inner)
            return bs_err_set(err, BS_EINVAL,
                              "attention: %s must have %lld rows of %lld (got %lld "
                              "of %lld)",
                              names[i], (long long)rows, (long long)inner,
                              (long long)bs_tensor_nrows(t), (long long)t->ne[t->n_dims - 1]);
        if (bs_tensor_ld(t) > INT32_MAX)
            return bs_err_set(err, BS_ERANGE, "attention: %s row stride exceeds the BLAS range",
                              names[i]);
    }
    return 0;
}

int bs__cpu_attention(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                      const struct bs_tensor *k, const struct bs_tensor *v,
                      const struct bs_attn_params *p, struct bs_err *err)
{
    struct bs__cpu *c = ctx;
    struct attn_job j = {0};
    int rc;
    if ((rc = attn_check(o, q, k, v, p, err)) || (rc = attn_check_mask(p, &j, err)))
        return rc;
    if (p->batch == 0 || p->lq == 0)
        return 0;
    j.q = q->data;
    j.k = k->data;
    j.v = v->data;
    j.o = o->data;
    j.ldq = bs_tensor_ld(q);
    j.ldk = bs_tensor_ld(k);
    j.ldv = bs_tensor_ld(v);
    j.ldo = bs_tensor_ld(o);
    j.lq = p->lq;
    j.lk = p->lk;
    j.heads = p->heads;
    j.head_dim = p->head_dim;
    j.scale = p->scale;
    j.q_tiles = (p->lq + ATT_TQ - 1) / ATT_TQ;

    pthread_mutex_lock(&c->scratch_lock);
    rc = bs__cpu_scratch_reserve(c, attn_scratch_floats(p->head_dim), err);
    if (rc == 0) {
        j.scratch = c->scratch;
        j.scratch_floats = c->scratch_floats;
        bs_pool_run(c->pool, p->batch * p->heads * j.q_tiles, attn_task, &j);
    }
    pthread_mutex_unlock(&c->scratch_lock);
    return rc;
}
