/* Argument checks of the backend ops, shared by the CPU and CUDA backends
 * (the CUDA module compiles its own copy of this file). */
#include "opcheck.h"

/* ---- primitives -------------------------------------------------------- */

int bs_opcheck_rows(const struct bs_tensor *t, const char *op, const char *name, struct bs_err *err)
{
    if (t == NULL || t->data == NULL)
        return bs_err_set(err, BS_EINVAL, "%s: %s is missing", op, name);
    if (t->type != BS_TYPE_F32)
        return bs_err_set(err, BS_EINVAL, "%s: %s must be F32 (got %s)", op, name,
                          bs_dtype_name(t->type));
    if (!bs_tensor_is_rows(t))
        return bs_err_set(err, BS_EINVAL,
                          "%s: %s must be a rows tensor (dense last dim, one row stride)", op,
                          name);
    return 0;
}

bool bs_opcheck_is_act_dtype(enum bs_dtype t)
{
    return t == BS_TYPE_F32 || t == BS_TYPE_BF16 || t == BS_TYPE_F16;
}

int bs_opcheck_act_rows(const struct bs_tensor *t, const char *op, const char *name,
                        struct bs_err *err)
{
    if (t == NULL || t->data == NULL)
        return bs_err_set(err, BS_EINVAL, "%s: %s is missing", op, name);
    if (!bs_opcheck_is_act_dtype(t->type))
        return bs_err_set(err, BS_EINVAL, "%s: %s must be F32, BF16 or F16 (got %s)", op, name,
                          bs_dtype_name(t->type));
    if (!bs_tensor_is_rows(t))
        return bs_err_set(err, BS_EINVAL,
                          "%s: %s must be a rows tensor (dense last dim, one row stride)", op,
                          name);
    return 0;
}

int bs_opcheck_same_rows(const struct bs_tensor *y, const struct bs_tensor *x, const char *op,
                         struct bs_err *err)
{
    int rc;
    if ((rc = bs_opcheck_act_rows(x, op, "x", err)) || (rc = bs_opcheck_act_rows(y, op, "y", err)))
        return rc;
    if (bs_tensor_nrows(x) != bs_tensor_nrows(y) || bs_opcheck_ncols(x) != bs_opcheck_ncols(y)) {
        char xs[64], ys[64];
        return bs_err_set(err, BS_EINVAL, "%s: x %s and y %s differ in shape", op,
                          bs_tensor_shape_str(x, xs, sizeof(xs)),
                          bs_tensor_shape_str(y, ys, sizeof(ys)));
    }
    return 0;
}

int bs_opcheck_vec(const struct bs_tensor *t, int64_t n, const char *op, const char *name,
                   struct bs_err *err)
{
    if (t == NULL)
        return 0;
    if (t->data == NULL || t->type != BS_TYPE_F32 || !bs_tensor_is_contiguous(t) ||
        bs_tensor_nelements(t) != n)
        return bs_err_set(err, BS_EINVAL, "%s: %s must be a contiguous F32 vector of %lld", op,
                          name, (long long)n);
    return 0;
}

int bs_opcheck_mod(const struct bs_tensor *t, int64_t d, int64_t samples, const char *op,
                   const char *name, struct bs_err *err)
{
    if (t == NULL)
        return 0;
    int rc = bs_opcheck_rows(t, op, name, err);
    if (rc != 0)
        return rc;
    if (bs_opcheck_ncols(t) != d || bs_tensor_nrows(t) < samples)
        return bs_err_set(err, BS_EINVAL, "%s: %s needs %lld rows of %lld (got %lld of %lld)", op,
                          name, (long long)samples, (long long)d, (long long)bs_tensor_nrows(t),
                          (long long)bs_opcheck_ncols(t));
    return 0;
}

int bs_opcheck_act_valid(enum bs_act act, const char *op, struct bs_err *err)
{
    if ((unsigned)act >= BS_ACT_COUNT)
        return bs_err_set(err, BS_EINVAL, "%s: unknown activation %d", op, (int)act);
    return 0;
}

/* gamma and beta [d], scale and shift with d columns and samples rows. */
static int check_norm_vectors(const struct bs_norm_params *p, int64_t d, int64_t samples,
                              const char *op, struct bs_err *err)
{
    int rc;
    if ((rc = bs_opcheck_vec(p->gamma, d, op, "gamma", err)) ||
        (rc = bs_opcheck_vec(p->beta, d, op, "beta", err)) ||
        (rc = bs_opcheck_mod(p->scale, d, samples, op, "scale", err)) ||
        (rc = bs_opcheck_mod(p->shift, d, samples, op, "shift", err)))
        return rc;
    return 0;
}

/* ---- per op ------------------------------------------------------------ */

int bs_opcheck_linear(const struct bs_tensor *y, const struct bs_tensor *x,
                      const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                      struct bs_err *err)
{
    int rc;
    if ((rc = bs_opcheck_act_rows(x, "linear", "x", err)) ||
        (rc = bs_opcheck_act_rows(y, "linear", "y", err)))
        return rc;
    /* BF16: a weight the backend packed (pack_weight), or rows of one; the
     * backend checks that it is one. */
    if ((w->type != BS_TYPE_F32 && w->type != BS_TYPE_BF16) || w->n_dims != 2 ||
        !bs_tensor_is_contiguous(w))
        return bs_err_set(err, BS_EINVAL,
                          "linear: w must be a contiguous F32 (or packed BF16) [N, K] matrix");
    int64_t m = bs_tensor_nrows(x), k = bs_opcheck_ncols(x), n = w->ne[0];
    if (w->ne[1] != k || bs_tensor_nrows(y) != m || bs_opcheck_ncols(y) != n)
        return bs_err_set(
            err, BS_EINVAL,
            "linear: shapes do not match (x %lld x %lld, w %lld x %lld, y %lld x %lld)",
            (long long)m, (long long)k, (long long)w->ne[0], (long long)w->ne[1],
            (long long)bs_tensor_nrows(y), (long long)bs_opcheck_ncols(y));
    if (b != NULL &&
        (b->type != BS_TYPE_F32 || bs_tensor_nelements(b) != n || !bs_tensor_is_contiguous(b)))
        return bs_err_set(err, BS_EINVAL, "linear: bias must be a contiguous F32 [%lld]",
                          (long long)n);
    if (beta != 0.0f && beta != 1.0f)
        return bs_err_set(err, BS_EINVAL, "linear: beta must be 0 or 1 (got %g)", (double)beta);
    return 0;
}

int bs_opcheck_layer_norm(const struct bs_tensor *y, const struct bs_tensor *x,
                          const struct bs_norm_params *p, struct bs_err *err)
{
    const char *op = "layer_norm";
    int rc = bs_opcheck_same_rows(y, x, op, err);
    if (rc != 0)
        return rc;
    int64_t rows = bs_tensor_nrows(x), rps = p->rows_per_sample;
    if ((p->scale || p->shift) && rps < 1)
        return bs_err_set(err, BS_EINVAL, "%s: rows_per_sample must be >= 1", op);
    int64_t samples = rows ? (rows - 1) / (rps < 1 ? 1 : rps) + 1 : 0;
    return check_norm_vectors(p, bs_opcheck_ncols(x), samples, op, err);
}

int bs_opcheck_group_norm(const struct bs_tensor *y, const struct bs_tensor *x,
                          const struct bs_norm_params *p, struct bs_err *err)
{
    const char *op = "group_norm";
    if (!bs_opcheck_is_act_dtype(x->type) || !bs_opcheck_is_act_dtype(y->type) || x->n_dims < 2 ||
        !bs_tensor_is_contiguous(x) || !bs_tensor_is_contiguous(y) ||
        bs_tensor_nelements(x) != bs_tensor_nelements(y))
        return bs_err_set(err, BS_EINVAL,
                          "%s: x and y must be contiguous F32 (or BF16, F16) [B, C, ...] tensors "
                          "of the same size",
                          op);
    int64_t bsz = x->ne[0], ch = x->ne[1];
    if (p->groups < 1 || ch % p->groups != 0)
        return bs_err_set(err, BS_EINVAL, "%s: %lld channels do not split into %d groups", op,
                          (long long)ch, p->groups);
    return check_norm_vectors(p, ch, bsz, op, err);
}

int bs_opcheck_act(const struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                   struct bs_err *err)
{
    int rc;
    if ((rc = bs_opcheck_act_valid(act, "act", err)) ||
        (rc = bs_opcheck_same_rows(y, x, "act", err)))
        return rc;
    return 0;
}

int bs_opcheck_glu(const struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                   struct bs_err *err)
{
    int rc;
    if ((rc = bs_opcheck_act_valid(act, "glu", err)) ||
        (rc = bs_opcheck_act_rows(x, "glu", "x", err)) ||
        (rc = bs_opcheck_act_rows(y, "glu", "y", err)))
        return rc;
    int64_t n = bs_opcheck_ncols(y), rows = bs_tensor_nrows(y);
    if (bs_tensor_nrows(x) != rows || bs_opcheck_ncols(x) != 2 * n)
        return bs_err_set(err, BS_EINVAL,
                          "glu: x must be [M, 2N] for y [M, N] (x has %lld rows of %lld, y %lld "
                          "of %lld)",
                          (long long)bs_tensor_nrows(x), (long long)bs_opcheck_ncols(x),
                          (long long)rows, (long long)n);
    return 0;
}

int bs_opcheck_add(const struct bs_tensor *y, const struct bs_tensor *x,
                   const struct bs_tensor *gate, int64_t rows_per_sample, struct bs_err *err)
{
    int rc = bs_opcheck_same_rows(y, x, "add", err);
    if (rc != 0 || gate == NULL)
        return rc;
    if (rows_per_sample < 1)
        return bs_err_set(err, BS_EINVAL, "add: rows_per_sample must be >= 1");
    int64_t rows = bs_tensor_nrows(x);
    return bs_opcheck_mod(gate, bs_opcheck_ncols(x), rows ? (rows - 1) / rows_per_sample + 1 : 0,
                          "add", "gate", err);
}

int bs_opcheck_transpose(const struct bs_tensor *y, const struct bs_tensor *x, struct bs_err *err)
{
    if (!bs_opcheck_is_act_dtype(x->type) || y->type != x->type || x->n_dims < 2 || x->n_dims > 3 ||
        y->n_dims != x->n_dims || !bs_tensor_is_contiguous(x) || !bs_tensor_is_contiguous(y))
        return bs_err_set(err, BS_EINVAL,
                          "transpose: x and y must be contiguous [B, R, C] and [B, C, R] (or "
                          "2-d) of one dtype, F32, BF16 or F16");
    int nd = x->n_dims;
    int64_t bsz = nd == 3 ? x->ne[0] : 1, r = x->ne[nd - 2], c = x->ne[nd - 1];
    if ((nd == 3 && y->ne[0] != bsz) || y->ne[nd - 2] != c || y->ne[nd - 1] != r) {
        char xs[64], ys[64];
        return bs_err_set(
            err, BS_EINVAL, "transpose: y %s is not x %s with the last two dims swapped",
            bs_tensor_shape_str(y, ys, sizeof(ys)), bs_tensor_shape_str(x, xs, sizeof(xs)));
    }
    return 0;
}

int bs_opcheck_get_rows(const struct bs_tensor *y, const struct bs_tensor *table,
                        const int64_t *idx, int64_t n, struct bs_err *err)
{
    int rc;
    if ((rc = bs_opcheck_rows(table, "get_rows", "table", err)) ||
        (rc = bs_opcheck_rows(y, "get_rows", "y", err)))
        return rc;
    int64_t d = bs_opcheck_ncols(table), rows = bs_tensor_nrows(table);
    if (bs_opcheck_ncols(y) != d || bs_tensor_nrows(y) != n)
        return bs_err_set(err, BS_EINVAL, "get_rows: y must be [%lld, %lld]", (long long)n,
                          (long long)d);
    for (int64_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= rows)
            return bs_err_set(err, BS_EINVAL, "get_rows: index %lld out of [0, %lld)",
                              (long long)idx[i], (long long)rows);
    return 0;
}

/* ---- attention --------------------------------------------------------- */

int bs_opcheck_attention_mask(const struct bs_attn_params *p, struct bs_err *err)
{
    const struct bs_tensor *m = p->mask;
    if (m == NULL)
        return 0;
    if (m->data == NULL || m->type != BS_TYPE_F32 || m->n_dims != 3 || m->ne[0] != p->batch ||
        (m->ne[1] != 1 && m->ne[1] != p->lq) || m->ne[2] != p->lk ||
        (p->lk > 1 && m->nb[2] != (int64_t)sizeof(float)) || m->nb[0] % 4 || m->nb[1] % 4) {
        char ms[64];
        return bs_err_set(err, BS_EINVAL,
                          "attention: mask %s must be F32 [%lld, 1 or %lld, %lld] with a dense "
                          "last dim",
                          bs_tensor_shape_str(m, ms, sizeof(ms)), (long long)p->batch,
                          (long long)p->lq, (long long)p->lk);
    }
    return 0;
}

/* q, k, v and o rows tensors of heads x head_dim columns, and sane sizes in p:
 * what a uniform and a ragged batch share. */
static int attention_tensors(const struct bs_tensor *const ts[4], const char *const names[4],
                             const struct bs_attn_params *p, struct bs_err *err)
{
    int rc;
    for (int i = 0; i < 4; i++)
        if ((rc = bs_opcheck_act_rows(ts[i], "attention", names[i], err)))
            return rc;
    if (ts[1]->type != ts[0]->type || ts[2]->type != ts[0]->type)
        return bs_err_set(err, BS_EINVAL, "attention: q, k and v must share one dtype (%s, %s, %s)",
                          bs_dtype_name(ts[0]->type), bs_dtype_name(ts[1]->type),
                          bs_dtype_name(ts[2]->type));
    if (p->batch < 0 || p->lq < 0 || p->lk < 0 || p->heads < 1 || p->head_dim < 1)
        return bs_err_set(err, BS_EINVAL,
                          "attention: bad sizes (batch %lld, lq %lld, lk %lld, heads %d, head_dim "
                          "%d)",
                          (long long)p->batch, (long long)p->lq, (long long)p->lk, p->heads,
                          p->head_dim);
    return 0;
}

int bs_opcheck_attention(const struct bs_tensor *o, const struct bs_tensor *q,
                         const struct bs_tensor *k, const struct bs_tensor *v,
                         const struct bs_attn_params *p, struct bs_err *err)
{
    const struct bs_tensor *const ts[4] = {q, k, v, o};
    const char *const names[4] = {"q", "k", "v", "o"};
    int rc;
    if (p->q_off != NULL)
        return bs_err_set(err, BS_EINVAL,
                          "attention: this backend takes no ragged batches (q_off set)");
    if (p->k_off != NULL || p->m_off != NULL || p->mask_per_query)
        return bs_err_set(err, BS_EINVAL,
                          "attention: k_off, m_off and mask_per_query describe a ragged batch, "
                          "but q_off is not set");
    if ((rc = attention_tensors(ts, names, p, err)))
        return rc;
    int64_t inner = (int64_t)p->heads * p->head_dim;
    for (int i = 0; i < 4; i++) {
        int64_t rows = i == 1 || i == 2 ? p->batch * p->lk : p->batch * p->lq;
        if (bs_tensor_nrows(ts[i]) != rows || bs_opcheck_ncols(ts[i]) != inner)
            return bs_err_set(
                err, BS_EINVAL, "attention: %s must have %lld rows of %lld (got %lld of %lld)",
                names[i], (long long)rows, (long long)inner, (long long)bs_tensor_nrows(ts[i]),
                (long long)bs_opcheck_ncols(ts[i]));
    }
    return 0;
}

/* The offsets off[0, batch] of a ragged batch (name "q_off" or "k_off", of
 * rows that are "queries" or "keys"): from 0, never decreasing, each
 * sample's count in [least, most] (most is p->lq or p->lk, named most_name). */
static int attention_offsets(const int64_t *off, const char *name, const char *what, int64_t batch,
                             int64_t least, int64_t most, const char *most_name, struct bs_err *err)
{
    if (off == NULL)
        return bs_err_set(err, BS_EINVAL, "attention: a ragged batch needs %s", name);
    if (off[0] != 0)
        return bs_err_set(err, BS_EINVAL, "attention: %s[0] must be 0 (got %lld)", name,
                          (long long)off[0]);
    for (int64_t b = 0; b < batch; b++) {
        if (off[b + 1] < off[b])
            return bs_err_set(err, BS_EINVAL,
                              "attention: %s decreases (%s[%lld] = %lld, %s[%lld] = %lld)", name,
                              name, (long long)b, (long long)off[b], name, (long long)(b + 1),
                              (long long)off[b + 1]);
        int64_t n = off[b + 1] - off[b]; /* no overflow: both are >= 0 */
        if (n < least || n > most)
            return bs_err_set(err, BS_EINVAL,
                              "attention: sample %lld has %lld %s (%s[%lld] = %lld, %s[%lld] = "
                              "%lld); allowed: %lld to %s = %lld",
                              (long long)b, (long long)n, what, name, (long long)b,
                              (long long)off[b], name, (long long)(b + 1), (long long)off[b + 1],
                              (long long)least, most_name, (long long)most);
    }
    return 0;
}

/* The mask of a ragged batch: contiguous F32, m_off given, and each sample's
 * part (lk_b values, or lq_b rows of them with mask_per_query) inside it. */
static int attention_ragged_mask(const struct bs_attn_params *p, struct bs_err *err)
{
    const struct bs_tensor *m = p->mask;
    if (m == NULL)
        return 0;
    if (m->data == NULL || m->type != BS_TYPE_F32 || !bs_tensor_is_contiguous(m)) {
        char ms[64];
        return bs_err_set(err, BS_EINVAL,
                          "attention: the mask of a ragged batch must be contiguous F32 (got %s "
                          "%s%s)",
                          bs_dtype_name(m->type), bs_tensor_shape_str(m, ms, sizeof(ms)),
                          bs_tensor_is_contiguous(m) ? "" : ", not contiguous");
    }
    if (p->m_off == NULL)
        return bs_err_set(err, BS_EINVAL, "attention: a ragged batch with a mask needs m_off");
    int64_t total = bs_tensor_nelements(m);
    for (int64_t b = 0; b < p->batch; b++) {
        int64_t lq = p->q_off[b + 1] - p->q_off[b], lk = p->k_off[b + 1] - p->k_off[b];
        int64_t n = bs_mul_sat(lk, p->mask_per_query ? lq : 1), at = p->m_off[b];
        if (at < 0 || at > total || n > total - at)
            return bs_err_set(err, BS_EINVAL,
                              "attention: the mask of sample %lld (%lld values from m_off[%lld] = "
                              "%lld) lies outside the mask's %lld elements",
                              (long long)b, (long long)n, (long long)b, (long long)at,
                              (long long)total);
    }
    return 0;
}

int bs_opcheck_attention_ragged(const struct bs_tensor *o, const struct bs_tensor *q,
                                const struct bs_tensor *k, const struct bs_tensor *v,
                                const struct bs_attn_params *p, struct bs_err *err)
{
    const struct bs_tensor *const ts[4] = {q, k, v, o};
    const char *const names[4] = {"q", "k", "v", "o"};
    int rc;
    if (p->q_off == NULL)
        return bs_err_set(err, BS_EINVAL, "attention: a ragged batch needs q_off");
    if ((rc = attention_tensors(ts, names, p, err)) ||
        (rc = attention_offsets(p->q_off, "q_off", "queries", p->batch, 1, p->lq, "lq", err)) ||
        (rc = attention_offsets(p->k_off, "k_off", "keys", p->batch, 0, p->lk, "lk", err)))
        return rc;
    for (int i = 0; i < 4; i++) {
        const int64_t *off = i == 1 || i == 2 ? p->k_off : p->q_off;
        if (bs_tensor_nrows(ts[i]) != off[p->batch] ||
            bs_opcheck_ncols(ts[i]) != (int64_t)p->heads * p->head_dim)
            return bs_err_set(err, BS_EINVAL,
                              "attention: %s must have %s[%lld] = %lld rows of %lld (got %lld of "
                              "%lld)",
                              names[i], i == 1 || i == 2 ? "k_off" : "q_off", (long long)p->batch,
                              (long long)off[p->batch], (long long)p->heads * p->head_dim,
                              (long long)bs_tensor_nrows(ts[i]),
                              (long long)bs_opcheck_ncols(ts[i]));
    }
    return attention_ragged_mask(p, err);
}
