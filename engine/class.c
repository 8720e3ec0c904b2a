/* The table of classes, and what class files share: input descriptions,
 * cross-input checks, and moving inputs and outputs between host and backend. */
#include "class.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TPROJ_DIM 256
#define MASK_DROP -10000.0f /* a false keep-mask entry, as diffusers' additive masks use */

/* Every class, in the order error messages list them. A new class is one file
 * in engine/classes/, its declaration in class.h and one line here. */
/* clang-format off */
static const struct bs_class *const bs_classes[] = {
    &bs_class_btb,
    &bs_class_attention_block,
    &bs_class_feed_forward,
    &bs_class_gelu,
    &bs_class_geglu,
    &bs_class_approximate_gelu,
    &bs_class_ada_layer_norm,
    &bs_class_ada_group_norm,
};
/* clang-format on */

int bs_class_count(void)
{
    return (int)BS_ARRAY_LEN(bs_classes);
}

const struct bs_class *bs_class_get(int i)
{
    return i >= 0 && i < bs_class_count() ? bs_classes[i] : NULL;
}

const struct bs_class *bs_class_find(const char *name)
{
    for (int i = 0; i < bs_class_count(); i++)
        if (strcmp(bs_classes[i]->name, name) == 0)
            return bs_classes[i];
    return NULL;
}

bool bs_class_knows_input(const char *name)
{
    for (int i = 0; i < bs_class_count(); i++)
        for (int j = 0; j < bs_classes[i]->n_inputs; j++)
            if (strcmp(bs_classes[i]->inputs[j].name, name) == 0)
                return true;
    return false;
}

/* ---- describing inputs ------------------------------------------------- */

void bs_class_io_add(struct bs_class_io *io, int slot, bool required, const int64_t *dims)
{
    const struct bs_class_input *ci = &io->cls->inputs[slot];
    struct bs_input_spec *s = &io->in[io->n_in];
    s->name = ci->name;
    s->required = required;
    s->n_dims = ci->n_dims;
    s->role = ci->role;
    /* masks may drop the query dim; conditioning may be a scalar */
    s->min_dims = ci->role == BS_ROLE_MASK ? 2 : ci->role == BS_ROLE_COND ? 0 : ci->n_dims;
    for (int i = 0; i < ci->n_dims; i++)
        s->dims[i] = dims[i];
    s->dtypes = ci->dtypes;
    s->dtype = ci->dtype;
    io->slot[io->n_in++] = slot;
}

void bs_class_io_output(struct bs_class_io *io, const int64_t *dims)
{
    struct bs_input_spec *s = &io->out;
    int n = io->cls->inputs[0].n_dims;
    *s = (struct bs_input_spec){.name = "output",
                                .required = true,
                                .n_dims = n,
                                .min_dims = n,
                                .dims = {-1, -1, -1, -1},
                                .dtypes = 1u << BS_TYPE_F32,
                                .dtype = BS_TYPE_F32,
                                .role = BS_ROLE_BATCHED};
    for (int i = 0; i < n; i++)
        s->dims[i] = dims[i];
}

void bs__expand_prefix(char *dst, const char *pattern, int i)
{
    const char *at = strstr(pattern, "{i}");
    if (at == NULL)
        snprintf(dst, BS_PREFIX_MAX, "%s", pattern);
    else
        snprintf(dst, BS_PREFIX_MAX, "%.*s%d%s", (int)(at - pattern), pattern, i, at + 3);
}

/* ---- checks across inputs ---------------------------------------------- */

int bs__check_batch(const struct bs_tensor *t, int64_t batch, const char *name, struct bs_err *err)
{
    if (t->ne[0] != batch)
        return bs_err_set(err, BS_EINVAL,
                          "input \"%s\": batch %lld does not match "
                          "hidden_states' batch %lld",
                          name, (long long)t->ne[0], (long long)batch);
    return 0;
}

int bs__check_mask(const struct bs_tensor *t, int64_t batch, int64_t lq, int64_t lk,
                   const char *name, struct bs_err *err)
{
    char shape[96];
    if (t == NULL)
        return 0;
    bool ok = (t->n_dims == 2 || t->n_dims == 3) && (t->ne[0] == batch || t->ne[0] == 1) &&
              t->ne[t->n_dims - 1] == lk && (t->n_dims == 2 || t->ne[1] == 1 || t->ne[1] == lq);
    if (!ok)
        return bs_err_set(
            err, BS_EINVAL,
            "input \"%s\": shape %s does not fit %lld queries over "
            "%lld keys (expected [%lld, %lld], [%lld, 1, %lld] or [%lld, %lld, %lld])",
            name, bs_tensor_shape_str(t, shape, sizeof(shape)), (long long)lq, (long long)lk,
            (long long)batch, (long long)lk, (long long)batch, (long long)lk, (long long)batch,
            (long long)lq, (long long)lk);
    return 0;
}

/* Element i of a numeric tensor as a double. */
static double value_at(const struct bs_tensor *t, int64_t i)
{
    float f;
    if (t->type == BS_TYPE_I64) {
        int64_t v;
        memcpy(&v, (const char *)t->data + 8 * i, 8);
        return (double)v;
    }
    bs_convert_to_f32(&f, (const char *)t->data + (int64_t)bs_dtype_size(t->type) * i, t->type, 1);
    return f;
}

int bs__check_cond(const struct bs_tensor *t, int64_t batch, int64_t limit, const char *name,
                   struct bs_err *err)
{
    if (t == NULL)
        return 0;
    int64_t n = bs_tensor_nelements(t);
    if (n != 1 && n != batch)
        return bs_err_set(err, BS_EINVAL,
                          "input \"%s\": %lld values for a batch of %lld (give one "
                          "value, or one per sample)",
                          name, (long long)n, (long long)batch);
    for (int64_t i = 0; i < n; i++) {
        double v = value_at(t, i);
        if (!isfinite(v))
            return bs_err_set(err, BS_EINVAL, "input \"%s\": value %lld is not finite", name,
                              (long long)i);
        if (limit > 0 && (v != floor(v) || v < 0 || v >= (double)limit))
            return bs_err_set(err, BS_EINVAL,
                              "input \"%s\": value %g is not an integer in [0, "
                              "%lld)",
                              name, v, (long long)limit);
    }
    return 0;
}

/* ---- host <-> backend -------------------------------------------------- */

/* Scratch [rows, cols] filled with src converted to F32 (masks: converted to
 * additive F32 by the caller first). */
static int upload_f32(struct bs__fwd *f, struct bs_tensor *dst, const float *src, int64_t rows,
                      int64_t cols)
{
    BS_TRY(bs__scratch(f, dst, rows, cols));
    return f->be->iface->copy_in(f->be->ctx, dst->data, src, (size_t)(rows * cols) * 4, f->err);
}

/* Whether src's bytes can go to the device as they are: a 16-bit float
 * dtype the backend takes as activations. */
static bool upload_raw(const struct bs__fwd *f, const struct bs_tensor *src)
{
    return !f->be->iface->host_memory && (src->type == BS_TYPE_BF16 || src->type == BS_TYPE_F16) &&
           ((f->be->iface->act_dtypes >> src->type) & 1u);
}

/* src [rows, cols] copied as it is into scratch *raw of its dtype. */
static int upload_as_is(struct bs__fwd *f, struct bs_tensor *raw, const struct bs_tensor *src,
                        int64_t rows, int64_t cols)
{
    BS_TRY(bs__scratch_type(f, raw, src->type, rows, cols));
    return f->be->iface->copy_in(f->be->ctx, raw->data, src->data, bs_tensor_nbytes(raw), f->err);
}

int bs__upload(struct bs__fwd *f, struct bs_tensor *dst, const struct bs_tensor *src, int64_t rows,
               int64_t cols)
{
    int64_t n = rows * cols;
    if (f->be->iface->host_memory) {
        BS_TRY(bs__scratch(f, dst, rows, cols));
        return bs_convert_to_f32(dst->data, src->data, src->type, n);
    }
    if (upload_raw(f, src)) { /* half the bytes over the bus, widened there (exact) */
        struct bs_tensor raw;
        BS_TRY(upload_as_is(f, &raw, src, rows, cols));
        BS_TRY(bs__scratch(f, dst, rows, cols));
        return f->be->iface->act(f->be->ctx, dst, &raw, BS_ACT_NONE, f->err);
    }
    float *tmp = malloc((size_t)n * sizeof(float));
    if (tmp == NULL)
        return bs_err_set(f->err, BS_ENOMEM, "out of memory staging an input");
    bs_convert_to_f32(tmp, src->data, src->type, n);
    int rc = upload_f32(f, dst, tmp, rows, cols);
    free(tmp);
    return rc;
}

int bs__upload_rows(struct bs__fwd *f, struct bs_tensor *dst, const struct bs_tensor *src)
{
    int64_t cols = src->ne[src->n_dims - 1], rows = bs_tensor_nelements(src) / cols;
    if (f->rg != NULL) { /* packed: the samples' tokens come from the layout */
        f->batch = f->rg->n;
        f->lq = f->rg->max[0];
        f->q_off = f->rg->off[0];
    } else {
        f->batch = src->ne[0];
        f->lq = src->n_dims == 3 ? src->ne[1] : 1;
    }
    return bs__upload(f, dst, src, rows, cols);
}

int bs__upload_keys(struct bs__fwd *f, const struct bs_tensor *src, int slot)
{
    int64_t cols = src->ne[src->n_dims - 1], rows = bs_tensor_nelements(src) / cols;
    if (f->rg != NULL) {
        f->lk = f->rg->max[slot];
        f->k_off = f->rg->off[slot];
    } else {
        f->lk = src->ne[1];
    }
    /* Encoder states only feed the K and V projections, which read a 16-bit
     * x as exactly as its F32 widening: they stay as they came. */
    if (upload_raw(f, src))
        return upload_as_is(f, &f->enc, src, rows, cols);
    return bs__upload(f, &f->enc, src, rows, cols);
}

/* A packed mask of a ragged batch: flat, each sample's part already whole. */
static int upload_mask_ragged(struct bs__fwd *f, struct bs__mask *dst, const struct bs_tensor *m,
                              int slot)
{
    int64_t n = bs_tensor_nelements(m);
    float *tmp = malloc((size_t)n * sizeof(float));
    if (tmp == NULL)
        return bs_err_set(f->err, BS_ENOMEM, "out of memory staging a mask");
    bs_convert_to_f32(tmp, m->data, m->type, n);
    if (m->type == BS_TYPE_BOOL)
        for (int64_t i = 0; i < n; i++)
            tmp[i] = tmp[i] != 0.0f ? 0.0f : MASK_DROP;
    int rc = upload_f32(f, &dst->t, tmp, 1, n);
    if (rc == 0)
        dst->t = bs_tensor_reshape(&dst->t, 1, &n);
    dst->off = f->rg->m_off[slot];
    dst->per_query = f->rg->m_per_query[slot];
    free(tmp);
    return rc;
}

int bs__upload_mask(struct bs__fwd *f, struct bs__mask *mask, const struct bs_tensor *m, int slot)
{
    if (f->rg != NULL)
        return upload_mask_ragged(f, mask, m, slot);
    struct bs_tensor *dst = &mask->t;
    int64_t bm = m->ne[0], lk = m->ne[m->n_dims - 1], mq = m->n_dims == 3 ? m->ne[1] : 1;
    int64_t per = mq * lk, n = f->batch * per;
    float *tmp = malloc((size_t)n * sizeof(float));
    if (tmp == NULL)
        return bs_err_set(f->err, BS_ENOMEM, "out of memory staging a mask");
    bs_convert_to_f32(tmp, m->data, m->type, bm * per);
    if (m->type == BS_TYPE_BOOL)
        for (int64_t i = 0; i < bm * per; i++)
            tmp[i] = tmp[i] != 0.0f ? 0.0f : MASK_DROP;
    for (int64_t b = bm; b < f->batch; b++) /* a batch-1 mask broadcasts */
        memcpy(tmp + b * per, tmp, (size_t)per * sizeof(float));
    int rc = upload_f32(f, dst, tmp, f->batch * mq, lk);
    if (rc == 0) {
        int64_t ne[3] = {f->batch, mq, lk};
        *dst = bs_tensor_reshape(dst, 3, ne);
    }
    free(tmp);
    return rc;
}

int bs__make_cond(struct bs__fwd *f, const struct bs_tensor *ts, const struct bs_tensor *lab,
                  bool tproj, struct bs__cond *c, void **storage)
{
    int64_t nt = ts ? bs_tensor_nelements(ts) : 1, nl = lab ? bs_tensor_nelements(lab) : 1;
    int64_t n = nt > nl ? nt : nl;
    size_t bytes = (size_t)n * (sizeof(float) + 2 * sizeof(int64_t)) +
                   (tproj ? (size_t)n * TPROJ_DIM * sizeof(float) : 0);
    char *p = malloc(bytes);
    if (p == NULL)
        return bs_err_set(f->err, BS_ENOMEM, "out of memory");
    int64_t *t_idx = (int64_t *)p, *labels = t_idx + n;
    float *t = (float *)(labels + n), *proj = t + n;
    for (int64_t i = 0; i < n; i++) {
        t[i] = ts ? (float)value_at(ts, nt == 1 ? 0 : i) : 0.0f;
        t_idx[i] = (int64_t)t[i];
        labels[i] = lab ? (int64_t)value_at(lab, nl == 1 ? 0 : i) : 0;
    }
    *storage = p;
    memset(c, 0, sizeof(*c));
    c->n = n;
    c->t = t;
    c->t_idx = t_idx;
    c->labels = labels;
    if (!tproj)
        return 0;
    /* Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1), in float
     * as PyTorch computes it: exp(-ln(10000) * i / 127), then [cos, sin]. */
    const int half = TPROJ_DIM / 2;
    for (int64_t row = 0; row < n; row++) {
        for (int i = 0; i < half; i++) {
            float e = (float)(-log(10000.0)) * (float)i;
            float arg = t[row] * expf(e / (float)(half - 1));
            proj[row * TPROJ_DIM + i] = cosf(arg);
            proj[row * TPROJ_DIM + half + i] = sinf(arg);
        }
    }
    return upload_f32(f, &c->tproj, proj, n, TPROJ_DIM);
}

int bs__download(struct bs__fwd *f, struct bs_tensor *out, const struct bs_tensor *x)
{
    const struct bs_backend_i *be = f->be->iface;
    if (out->type == x->type)
        return be->copy_out(f->be->ctx, out->data, x->data, bs_tensor_nbytes(out), f->err);
    int64_t n = bs_tensor_nelements(out);
    if (be->host_memory) { /* F32 rows in host memory: narrowed here */
        bs_convert_from_f32(out->data, out->type, x->data, n);
        return 0;
    }
    if (!((be->act_dtypes >> out->type) & 1u)) { /* F32 down, narrowed here */
        float *tmp = malloc((size_t)n * sizeof(float));
        if (tmp == NULL)
            return bs_err_set(f->err, BS_ENOMEM, "out of memory staging an output");
        int rc = be->copy_out(f->be->ctx, tmp, x->data, (size_t)n * sizeof(float), f->err);
        if (rc == 0)
            bs_convert_from_f32(out->data, out->type, tmp, n);
        free(tmp);
        return rc;
    }
    /* narrowed on the device: half the bytes over the bus */
    struct bs_tensor nx, xr = bs_tensor_reshape(x, 2, (int64_t[]){1, n});
    BS_TRY(bs__scratch_type(f, &nx, out->type, 1, n));
    BS_TRY(be->act(f->be->ctx, &nx, &xr, BS_ACT_NONE, f->err));
    return be->copy_out(f->be->ctx, out->data, nx.data, bs_tensor_nbytes(out), f->err);
}

/* ---- shared by FeedForward and the bare activation modules ------------- */

int bs__ff_run(struct bs__fwd *f, const struct bs__ff *ff, const struct bs_tensor *x,
               struct bs_tensor *out)
{
    struct bs_tensor xs, y;
    BS_TRY(bs__upload_rows(f, &xs, x));
    if (ff->has_out)
        BS_TRY(bs__scratch(f, &y, bs_tensor_nrows(&xs), ff->out.w.ne[0]));
    BS_TRY(bs__ff_forward(f, ff, &xs, &y, 0.0f));
    return bs__download(f, out, &y);
}

double bs__ff_flops(const struct bs__ff *ff, const struct bs_tensor *x)
{
    double rows = (double)bs_tensor_nelements(x) / (double)x->ne[x->n_dims - 1];
    return 2 * rows *
           (double)(bs_tensor_nelements(&ff->proj.w) +
                    (ff->has_out ? bs_tensor_nelements(&ff->out.w) : 0));
}
