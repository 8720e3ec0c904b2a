/* diffusers' modules (attention.py at the seed's version) as backend-op
 * sequences: parameter binding from state_dict keys, then forwards. */
#include "modules.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "graph.h"

#define PARAM_ALIGN 64
/* Largest F32 projection buffer of a BF16 model's GEGLU (bs__ff_forward). */
#define GEGLU_CHUNK_BYTES ((int64_t)8 << 20)
#define TRY(expr)                                                                                  \
    do {                                                                                           \
        int rc_ = (expr);                                                                          \
        if (rc_ != 0)                                                                              \
            return rc_;                                                                            \
    } while (0)

/* ---- binding ---------------------------------------------------------- */

/* Format a state_dict key; keys are short, and one that does not fit is cut
 * and then simply not found in the file. */
__attribute__((format(printf, 3, 4))) static void keyf(char *dst, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dst, size, fmt, ap);
    va_end(ap);
}

static int record_name(struct bs__loader *ld, const char *key)
{
    if (ld->n_names == ld->cap_names) {
        int cap = ld->cap_names ? 2 * ld->cap_names : 64;
        char **names = realloc(ld->names, (size_t)cap * sizeof(*names));
        if (names == NULL)
            return bs_err_set(ld->err, BS_ENOMEM, "out of memory");
        ld->names = names;
        ld->cap_names = cap;
    }
    if ((ld->names[ld->n_names] = strdup(key)) == NULL)
        return bs_err_set(ld->err, BS_ENOMEM, "out of memory");
    ld->n_names++;
    return 0;
}

/* Convert key (expected shape rows x cols, or [rows] when cols is 0) into
 * dst. */
static int load_key(struct bs__loader *ld, const char *name, int64_t rows, int64_t cols, float *dst)
{
    char key[2 * BS_PREFIX_MAX];
    struct bs_tensor src;
    int n_dims = cols ? 2 : 1;
    keyf(key, sizeof(key), "%s%s", ld->prefix, name);
    if (ld->generate != NULL) {
        int64_t ne[2] = {rows, cols};
        ld->generate(ld->generate_arg, key, n_dims, ne, dst);
        return 0;
    }
    if (bs_st_get(ld->st, key, &src) != 0)
        return bs_err_set(ld->err, BS_ENOTFOUND, "%s: missing tensor \"%s\"", ld->file, key);
    if (src.type != BS_TYPE_F32 && src.type != BS_TYPE_F16 && src.type != BS_TYPE_BF16)
        return bs_err_set(ld->err, BS_EFORMAT,
                          "%s: tensor \"%s\" has dtype %s (expected F32, F16 "
                          "or BF16)",
                          ld->file, key, bs_dtype_name(src.type));
    if (src.n_dims != n_dims || src.ne[0] != rows || (cols && src.ne[1] != cols)) {
        char found[64];
        bs_tensor_shape_str(&src, found, sizeof(found));
        if (cols)
            return bs_err_set(ld->err, BS_EFORMAT,
                              "%s: tensor \"%s\": expected shape [%lld, %lld]"
                              ", found %s",
                              ld->file, key, (long long)rows, (long long)cols, found);
        return bs_err_set(ld->err, BS_EFORMAT, "%s: tensor \"%s\": expected shape [%lld], found %s",
                          ld->file, key, (long long)rows, found);
    }
    TRY(record_name(ld, key));
    return bs_convert_to_f32(dst, src.data, src.type, bs_tensor_nelements(&src));
}

/* Reserve an F32 tensor of n stacked parameters names[0..n), each rows x cols
 * (cols 0: vectors of rows), and load them. */
static void bind_stacked(struct bs__loader *ld, struct bs_tensor *t, const char *const *names,
                         int n, int64_t rows, int64_t cols)
{
    int64_t ne[2] = {n * rows, cols};
    int n_dims = cols ? 2 : 1;
    size_t each = (size_t)(rows * (cols ? cols : 1)) * sizeof(float);
    if (ld->rc != 0)
        return;
    *t = bs_tensor_make(BS_TYPE_F32, n_dims, ne, ld->base ? ld->base + ld->off : NULL);
    for (int i = 0; ld->describe != NULL && i < n; i++) {
        char key[2 * BS_PREFIX_MAX];
        int64_t shape[2] = {rows, cols};
        keyf(key, sizeof(key), "%s%s", ld->prefix, names[i]);
        ld->describe(ld->describe_arg, key, n_dims, shape);
    }
    for (int i = 0; ld->base != NULL && i < n; i++) {
        float *dst = (float *)((char *)ld->host + ld->off + (size_t)i * each);
        if ((ld->rc = load_key(ld, names[i], rows, cols, dst)) != 0)
            return;
    }
    ld->off += ((size_t)n * each + PARAM_ALIGN - 1) & ~(size_t)(PARAM_ALIGN - 1);
}

/* Does this load pack linear weights (a narrower compute dtype on a
 * backend with pack_weight)? */
static bool packing(const struct bs__loader *ld)
{
    return ld->pack != BS_TYPE_F32 && ld->be != NULL && ld->be->iface->pack_weight != NULL;
}

/* Host staging for one weight, mapped rather than malloc'd: freed blocks
 * of this size would stay in the heap (glibc raises its mmap threshold
 * after such a free) and count in the process's memory for good. */
static float *stage_alloc(struct bs__loader *ld, size_t floats)
{
    void *p = mmap(NULL, floats * sizeof(float) + sizeof(float), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED)
        return p;
    ld->rc =
        bs_err_set(ld->err, BS_ENOMEM, "%s: cannot stage %zu floats of weights", ld->file, floats);
    return NULL;
}

static void stage_free(float *p, size_t floats)
{
    if (p != NULL)
        munmap(p, floats * sizeof(float) + sizeof(float));
}

static int note_packed(struct bs__loader *ld, void *data)
{
    if (ld->n_packed == ld->cap_packed) {
        int cap = ld->cap_packed ? 2 * ld->cap_packed : 32;
        void **p = realloc(ld->packed, (size_t)cap * sizeof(*p));
        if (p == NULL)
            return bs_err_set(ld->err, BS_ENOMEM, "out of memory");
        ld->packed = p;
        ld->cap_packed = cap;
    }
    ld->packed[ld->n_packed++] = data;
    return 0;
}

/* A linear layer's weight of n stacked matrices names[0..n), each rows x
 * cols: like bind_stacked, or, when the loader packs, staged, packed by the
 * backend and left out of the F32 buffer. */
static void bind_weight(struct bs__loader *ld, struct bs_tensor *t, const char *const *names, int n,
                        int64_t rows, int64_t cols)
{
    if (!packing(ld)) {
        bind_stacked(ld, t, names, n, rows, cols);
        return;
    }
    int64_t ne[2] = {n * rows, cols};
    if (ld->rc != 0)
        return;
    *t = bs_tensor_make(BS_TYPE_F32, 2, ne, NULL);
    if (ld->base == NULL) /* sizing: no room in the F32 buffer */
        return;
    size_t each = (size_t)(rows * cols);
    float *tmp = stage_alloc(ld, (size_t)n * each);
    if (tmp == NULL)
        return;
    for (int i = 0; i < n && ld->rc == 0; i++)
        ld->rc = load_key(ld, names[i], rows, cols, tmp + (size_t)i * each);
    struct bs_tensor w = bs_tensor_make(BS_TYPE_F32, 2, ne, tmp), packed;
    if (ld->rc == 0 &&
        (ld->rc = ld->be->iface->pack_weight(ld->be->ctx, &packed, &w, ld->pack, ld->err)) == 0) {
        if ((ld->rc = note_packed(ld, packed.data)) != 0)
            ld->be->iface->buf_free(ld->be->ctx, packed.data);
        else {
            *t = packed;
            ld->packed_bytes += bs_tensor_nbytes(&packed);
        }
    }
    stage_free(tmp, (size_t)n * each);
}

static void bind(struct bs__loader *ld, struct bs_tensor *t, const char *name, int64_t rows,
                 int64_t cols)
{
    bind_stacked(ld, t, &name, 1, rows, cols);
}

/* An embedding table (read by get_rows only): like bind, but kept in BF16
 * when the loader packs for a BF16 model (the backend's get_rows then takes
 * a BF16 table; see pack_weight in engine/backend.h). */
static void bind_table(struct bs__loader *ld, struct bs_tensor *t, const char *name, int64_t rows,
                       int64_t cols)
{
    if (!packing(ld) || ld->pack != BS_TYPE_BF16) {
        bind(ld, t, name, rows, cols);
        return;
    }
    int64_t ne[2] = {rows, cols};
    size_t n = (size_t)(rows * cols);
    if (ld->rc != 0)
        return;
    *t = bs_tensor_make(BS_TYPE_BF16, 2, ne, ld->base ? ld->base + ld->off : NULL);
    if (ld->base != NULL) {
        float *tmp = stage_alloc(ld, n);
        if (tmp != NULL && (ld->rc = load_key(ld, name, rows, cols, tmp)) == 0)
            bs_convert_from_f32((char *)ld->host + ld->off, BS_TYPE_BF16, tmp, (int64_t)n);
        stage_free(tmp, n);
    }
    ld->off += (n * 2 + PARAM_ALIGN - 1) & ~(size_t)(PARAM_ALIGN - 1);
}

static void no_tensor(struct bs_tensor *t)
{
    memset(t, 0, sizeof(*t));
}

void bs__bind_linear(struct bs__loader *ld, struct bs__linear *l, const char *name, int64_t out,
                     int64_t in, bool bias)
{
    char key[BS_PREFIX_MAX];
    const char *keys[1] = {key};
    keyf(key, sizeof(key), "%s.weight", name);
    bind_weight(ld, &l->w, keys, 1, out, in);
    no_tensor(&l->b);
    if (bias) {
        keyf(key, sizeof(key), "%s.bias", name);
        bind(ld, &l->b, key, out, 0);
    }
}

/* diffusers' Attention: to_q, to_k, to_v (bias only with attention_bias) and
 * to_out.0. q, k and v are stored stacked so self-attention runs one GEMM. */
static void bind_attn(struct bs__loader *ld, struct bs__attn *a, const char *name,
                      const struct bs_btb_config *c, int64_t kv_dim)
{
    char w[3][BS_PREFIX_MAX], b[3][BS_PREFIX_MAX], out[BS_PREFIX_MAX];
    const char *wn[3] = {w[0], w[1], w[2]}, *bn[3] = {b[0], b[1], b[2]};
    static const char *const proj[3] = {"to_q", "to_k", "to_v"};
    a->heads = (int)c->num_attention_heads;
    a->head_dim = (int)c->attention_head_dim;
    a->inner = c->num_attention_heads * c->attention_head_dim;
    a->query_dim = c->dim;
    a->kv_dim = kv_dim;
    a->scale = (float)(1.0 / sqrt((double)c->attention_head_dim));
    for (int i = 0; i < 3; i++) {
        keyf(w[i], sizeof(w[i]), "%s.%s.weight", name, proj[i]);
        keyf(b[i], sizeof(b[i]), "%s.%s.bias", name, proj[i]);
    }
    no_tensor(&a->qkv.w);
    no_tensor(&a->qkv.b);
    no_tensor(&a->kv.b);
    no_tensor(&a->q.b);
    if (kv_dim == c->dim) {
        bind_weight(ld, &a->qkv.w, wn, 3, a->inner, c->dim);
        if (c->attention_bias)
            bind_stacked(ld, &a->qkv.b, bn, 3, a->inner, 0);
        a->q.w = bs_tensor_view_outer(&a->qkv.w, 0, a->inner);
        a->kv.w = bs_tensor_view_outer(&a->qkv.w, a->inner, 2 * a->inner);
        if (c->attention_bias) {
            a->q.b = bs_tensor_view_outer(&a->qkv.b, 0, a->inner);
            a->kv.b = bs_tensor_view_outer(&a->qkv.b, a->inner, 2 * a->inner);
        }
    } else {
        bind_weight(ld, &a->q.w, wn, 1, a->inner, c->dim);
        bind_weight(ld, &a->kv.w, wn + 1, 2, a->inner, kv_dim);
        if (c->attention_bias) {
            bind(ld, &a->q.b, bn[0], a->inner, 0);
            bind_stacked(ld, &a->kv.b, bn + 1, 2, a->inner, 0);
        }
    }
    keyf(out, sizeof(out), "%s.to_out.0", name);
    bs__bind_linear(ld, &a->out, out, c->dim, a->inner, true);
}

static void bind_layer_norm(struct bs__loader *ld, struct bs__norm *n, const char *name,
                            int64_t dim, bool affine, float eps)
{
    char key[BS_PREFIX_MAX];
    memset(n, 0, sizeof(*n));
    n->eps = eps;
    if (!affine)
        return;
    keyf(key, sizeof(key), "%s.weight", name);
    bind(ld, &n->gamma, key, dim, 0);
    keyf(key, sizeof(key), "%s.bias", name);
    bind(ld, &n->beta, key, dim, 0);
}

void bs__bind_ada_norm(struct bs__loader *ld, struct bs__norm *n, const char *name, int64_t dim,
                       int64_t num_embeddings)
{
    char key[BS_PREFIX_MAX];
    const char *dot = name[0] ? "." : "";
    memset(n, 0, sizeof(*n));
    n->eps = 1e-5f;
    keyf(key, sizeof(key), "%s%semb.weight", name, dot);
    bind_table(ld, &n->emb, key, num_embeddings, dim);
    keyf(key, sizeof(key), "%s%slinear", name, dot);
    bs__bind_linear(ld, &n->lin, key, 2 * dim, dim, true);
}

static void bind_ada_zero(struct bs__loader *ld, struct bs__ada_zero *az, int64_t dim,
                          int64_t num_classes)
{
    bs__bind_linear(ld, &az->t1, "norm1.emb.timestep_embedder.linear_1", dim, 256, true);
    bs__bind_linear(ld, &az->t2, "norm1.emb.timestep_embedder.linear_2", dim, dim, true);
    bind_table(ld, &az->table, "norm1.emb.class_embedder.embedding_table.weight", num_classes + 1,
               dim);
    bs__bind_linear(ld, &az->lin, "norm1.linear", 6 * dim, dim, true);
}

void bs__bind_ff(struct bs__loader *ld, struct bs__ff *ff, const char *proj, const char *out,
                 int64_t dim, int64_t inner, int64_t dim_out, enum bs_ff_act act)
{
    ff->act = act;
    ff->inner = inner;
    ff->has_out = out != NULL;
    bs__bind_linear(ld, &ff->proj, proj, act == BS_FF_GEGLU ? 2 * inner : inner, dim, true);
    if (out != NULL)
        bs__bind_linear(ld, &ff->out, out, dim_out, inner, true);
}

void bs__bind_block(struct bs__loader *ld, struct bs__block *b, const struct bs_btb_config *c)
{
    int64_t d = c->dim;
    bool affine = c->norm_elementwise_affine;
    int64_t cross = c->cross_attention_dim;
    memset(b, 0, sizeof(*b));
    b->cfg = c;
    switch (c->norm_type) {
    case BS_NORM_LAYER_NORM:
        bind_layer_norm(ld, &b->norm1, "norm1", d, affine, 1e-5f);
        break;
    case BS_NORM_ADA_NORM:
        bs__bind_ada_norm(ld, &b->norm1, "norm1", d, c->num_embeds_ada_norm);
        break;
    case BS_NORM_ADA_NORM_ZERO:
        bind_ada_zero(ld, &b->az, d, c->num_embeds_ada_norm);
        b->norm1.eps = 1e-6f;
        break;
    }
    bind_attn(ld, &b->attn1, "attn1", c, c->only_cross_attention && cross ? cross : d);
    b->has_attn2 = cross != 0;
    if (b->has_attn2) {
        if (c->norm_type == BS_NORM_ADA_NORM)
            bs__bind_ada_norm(ld, &b->norm2, "norm2", d, c->num_embeds_ada_norm);
        else
            bind_layer_norm(ld, &b->norm2, "norm2", d, affine, 1e-5f);
        bind_attn(ld, &b->attn2, "attn2", c, cross);
    }
    bind_layer_norm(ld, &b->norm3, "norm3", d, affine, 1e-5f);
    bs__bind_ff(ld, &b->ff, "ff.net.0.proj", "ff.net.2", d, 4 * d, d, c->activation_fn);
}

void bs__bind_attention_block(struct bs__loader *ld, struct bs__attention_block *a,
                              const struct bs_attention_block_config *c)
{
    static const char *const w[3] = {"query.weight", "key.weight", "value.weight"};
    static const char *const b[3] = {"query.bias", "key.bias", "value.bias"};
    a->cfg = c;
    bind(ld, &a->gn_gamma, "group_norm.weight", c->channels, 0);
    bind(ld, &a->gn_beta, "group_norm.bias", c->channels, 0);
    bind_weight(ld, &a->qkv.w, w, 3, c->channels, c->channels);
    bind_stacked(ld, &a->qkv.b, b, 3, c->channels, 0);
    bs__bind_linear(ld, &a->proj, "proj_attn", c->channels, c->channels, true);
}

void bs__bind_ada_group_norm(struct bs__loader *ld, struct bs__ada_group_norm *a,
                             const struct bs_ada_group_norm_config *c)
{
    a->cfg = c;
    bs__bind_linear(ld, &a->lin, "linear", 2 * c->out_dim, c->embedding_dim, true);
}

/* ---- forwards ---------------------------------------------------------- */

int bs__scratch_type(struct bs__fwd *f, struct bs_tensor *t, enum bs_dtype type, int64_t rows,
                     int64_t cols)
{
    int64_t ne[2] = {rows, cols};
    void *p = bs_arena_alloc(f->arena, (size_t)(rows * cols) * bs_dtype_size(type), f->err);
    if (p == NULL)
        return f->err->code;
    *t = bs_tensor_make(type, 2, ne, p);
    return 0;
}

int bs__scratch(struct bs__fwd *f, struct bs_tensor *t, int64_t rows, int64_t cols)
{
    return bs__scratch_type(f, t, BS_TYPE_F32, rows, cols);
}

int bs__scratch_act(struct bs__fwd *f, struct bs_tensor *t, int64_t rows, int64_t cols)
{
    return bs__scratch_type(f, t, f->act, rows, cols);
}

static const struct bs_tensor *opt(const struct bs_tensor *t)
{
    return t->data != NULL ? t : NULL;
}

static int linear(struct bs__fwd *f, struct bs_tensor *y, const struct bs_tensor *x,
                  const struct bs__linear *l, float beta)
{
    return f->be->iface->linear(f->be->ctx, y, x, &l->w, opt(&l->b), beta, f->err);
}

static int act(struct bs__fwd *f, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act a)
{
    return f->be->iface->act(f->be->ctx, y, x, a, f->err);
}

/* Sample b's rows of t, a rows tensor over the tokens of a ragged batch. */
static struct bs_tensor sample_rows(const struct bs__fwd *f, const struct bs_tensor *t, int64_t b)
{
    return bs_tensor_view_outer(t, f->q_off[b], f->q_off[b + 1] - f->q_off[b]);
}

/* Row b of per-sample conditioning rows v (one row: shared). */
static struct bs_tensor cond_row(const struct bs_tensor *v, int64_t b)
{
    return bs_tensor_view_outer(v, v->ne[0] == 1 ? 0 : b, 1);
}

static int add(struct bs__fwd *f, struct bs_tensor *y, const struct bs_tensor *x,
               const struct bs_tensor *gate, int64_t rows_per_sample, float alpha)
{
    if (gate == NULL || f->q_off == NULL)
        return f->be->iface->add(f->be->ctx, y, x, gate, rows_per_sample, alpha, f->err);
    /* A ragged batch: each sample's rows with its own gate row. */
    for (int64_t b = 0; b < f->batch; b++) {
        struct bs_tensor yb = sample_rows(f, y, b), xb = sample_rows(f, x, b);
        struct bs_tensor gb = cond_row(gate, b);
        TRY(f->be->iface->add(f->be->ctx, &yb, &xb, &gb, yb.ne[0], alpha, f->err));
    }
    return 0;
}

/* Rows of x that share one row of conditioning (timestep, labels, emb). */
static int64_t rows_per_cond(const struct bs__fwd *f, int64_t n_cond)
{
    return n_cond == 1 ? f->batch * f->lq : f->lq;
}

static int layer_norm(struct bs__fwd *f, struct bs_tensor *y, const struct bs_tensor *x,
                      const struct bs__norm *n, const struct bs_tensor *scale,
                      const struct bs_tensor *shift, int64_t rows_per_sample)
{
    struct bs_norm_params p = {
        .eps = n->eps,
        .gamma = opt(&n->gamma),
        .beta = opt(&n->beta),
        .scale = scale,
        .shift = shift,
        .rows_per_sample = rows_per_sample,
    };
    if (scale == NULL || f->q_off == NULL)
        return f->be->iface->layer_norm(f->be->ctx, y, x, &p, f->err);
    /* A ragged batch: each sample's rows with its own modulation row. */
    for (int64_t b = 0; b < f->batch; b++) {
        struct bs_tensor yb = sample_rows(f, y, b), xb = sample_rows(f, x, b);
        struct bs_tensor sb = cond_row(scale, b), hb = cond_row(shift, b);
        p.scale = &sb;
        p.shift = &hb;
        p.rows_per_sample = xb.ne[0];
        TRY(f->be->iface->layer_norm(f->be->ctx, &yb, &xb, &p, f->err));
    }
    return 0;
}

int bs__ada_norm_forward(struct bs__fwd *f, const struct bs__norm *n, const struct bs_tensor *x,
                         struct bs_tensor *y)
{
    const struct bs__cond *c = f->cond;
    int64_t d = n->emb.ne[1];
    struct bs_tensor e, ss;
    TRY(bs__scratch(f, &e, c->n, d));
    TRY(f->be->iface->get_rows(f->be->ctx, &e, &n->emb, c->t_idx, c->n, f->err));
    TRY(act(f, &e, &e, BS_ACT_SILU));
    TRY(bs__scratch(f, &ss, c->n, 2 * d));
    TRY(linear(f, &ss, &e, &n->lin, 0.0f));
    /* emb.chunk(2): scale first, then shift. */
    struct bs_tensor scale = bs_tensor_view_cols(&ss, 0, d);
    struct bs_tensor shift = bs_tensor_view_cols(&ss, d, d);
    return layer_norm(f, y, x, n, &scale, &shift, rows_per_cond(f, c->n));
}

/* AdaLayerNormZero's six modulation vectors [n, 6 dim]: linear(silu(
 * timestep_embedder(proj(t)) + class_embedder(labels))). */
static int ada_zero_modulation(struct bs__fwd *f, const struct bs__ada_zero *az,
                               struct bs_tensor *mod)
{
    const struct bs__cond *c = f->cond;
    int64_t d = az->t2.w.ne[0];
    struct bs_tensor h1, h2, lab;
    TRY(bs__scratch(f, &h1, c->n, d));
    TRY(linear(f, &h1, &c->tproj, &az->t1, 0.0f));
    TRY(act(f, &h1, &h1, BS_ACT_SILU));
    TRY(bs__scratch(f, &h2, c->n, d));
    TRY(linear(f, &h2, &h1, &az->t2, 0.0f));
    TRY(bs__scratch(f, &lab, c->n, d));
    TRY(f->be->iface->get_rows(f->be->ctx, &lab, &az->table, c->labels, c->n, f->err));
    TRY(add(f, &h2, &lab, NULL, 1, 1.0f));
    TRY(act(f, &h2, &h2, BS_ACT_SILU));
    TRY(bs__scratch(f, mod, c->n, 6 * d));
    return linear(f, mod, &h2, &az->lin, 0.0f);
}

/* o = attention(to_q(x), to_k(src), to_v(src)) before to_out; src NULL is
 * self-attention (src = x). */
static int attn_core(struct bs__fwd *f, const struct bs__attn *a, const struct bs_tensor *x,
                     const struct bs_tensor *src, int64_t lkv, const struct bs__mask *mask,
                     struct bs_tensor *o)
{
    int64_t rows = bs_tensor_nrows(x), inner = a->inner;
    const int64_t *k_off = src != NULL ? f->k_off : f->q_off;
    struct bs_tensor q, k, v, buf;
    if (src == NULL && a->qkv.w.data != NULL) {
        TRY(bs__scratch_act(f, &buf, rows, 3 * inner));
        TRY(linear(f, &buf, x, &a->qkv, 0.0f));
        q = bs_tensor_view_cols(&buf, 0, inner);
        k = bs_tensor_view_cols(&buf, inner, inner);
        v = bs_tensor_view_cols(&buf, 2 * inner, inner);
    } else {
        if (src == NULL)
            src = x;
        TRY(bs__scratch_act(f, &q, rows, inner));
        TRY(linear(f, &q, x, &a->q, 0.0f));
        TRY(bs__scratch_act(f, &buf, bs_tensor_nrows(src), 2 * inner));
        TRY(linear(f, &buf, src, &a->kv, 0.0f));
        k = bs_tensor_view_cols(&buf, 0, inner);
        v = bs_tensor_view_cols(&buf, inner, inner);
    }
    struct bs_attn_params p = {
        .batch = f->batch,
        .lq = f->lq,
        .lk = lkv,
        .heads = a->heads,
        .head_dim = a->head_dim,
        .scale = a->scale,
        .mask = mask->t.data != NULL ? &mask->t : NULL,
        .compute = f->dtype,
        .q_off = f->q_off,
        .k_off = f->q_off != NULL ? k_off : NULL,
        .m_off = mask->off,
        .mask_per_query = mask->per_query,
    };
    TRY(bs__scratch_act(f, o, rows, inner));
    return f->be->iface->attention(f->be->ctx, o, &q, &k, &v, &p, f->err);
}

/* Copy n rows between backend memory (an op: act with no activation). */
static int copy_rows(struct bs__fwd *f, float *dst, const float *src, int64_t n, int64_t dim)
{
    struct bs_tensor d = bs_tensor_make(BS_TYPE_F32, 2, (int64_t[]){n, dim}, dst);
    struct bs_tensor s = bs_tensor_make(BS_TYPE_F32, 2, (int64_t[]){n, dim}, (void *)src);
    return act(f, &d, &s, BS_ACT_NONE);
}

/* t holds the fresh rows' outputs of cache slot `slot` of the current block:
 * store them for the parts that refresh, fill in the reusing parts' rows. */
static int cache_exchange(struct bs__fwd *f, int slot, struct bs_tensor *t)
{
    const struct bs__caching *c = f->cache;
    for (int k = 0; k < c->n_parts; k++) {
        const struct bs__cache_part *p = &c->parts[k];
        if (p->cache == NULL || p->mode == BS_CACHE_OFF)
            continue;
        struct bs_block_cache *bc = p->cache;
        float *region = bc->buf + ((int64_t)(f->block * bc->n_slots + slot) * bc->rows) * bc->dim;
        float *rows = (float *)t->data + p->row0 * bc->dim;
        if (p->mode == BS_CACHE_REFRESH)
            TRY(copy_rows(f, region, rows, p->rows, bc->dim));
        else
            TRY(copy_rows(f, rows, region, p->rows, bc->dim));
    }
    return 0;
}

/* h += gate * to_out(attention(to_q(x), to_k(src), to_v(src))); src NULL is
 * self-attention (src = x); gate NULL adds without gating. With block
 * caching, only the fresh rows attend; slot names the cache regions. */
static int attn_forward(struct bs__fwd *f, const struct bs__attn *a, const struct bs_tensor *x,
                        const struct bs_tensor *src, int64_t lkv, const struct bs__mask *mask,
                        struct bs_tensor *h, const struct bs_tensor *gate, int slot)
{
    int64_t rows = bs_tensor_nrows(x);
    struct bs_tensor o, t;
    if (f->cache == NULL) {
        TRY(attn_core(f, a, x, src, lkv, mask, &o));
        if (gate == NULL)
            return linear(f, h, &o, &a->out, 1.0f); /* residual fused into the GEMM */
        TRY(bs__scratch(f, &t, rows, a->query_dim));
        TRY(linear(f, &t, &o, &a->out, 0.0f));
        return add(f, h, &t, gate, rows_per_cond(f, f->cond->n), 1.0f);
    }
    int64_t fresh = f->cache->rows_fresh, batch = f->batch;
    TRY(bs__scratch(f, &t, rows, a->query_dim));
    if (fresh > 0) {
        struct bs_tensor xf = bs_tensor_view_outer(x, 0, fresh), sf, tf;
        if (src != NULL)
            sf = bs_tensor_view_outer(src, 0, f->k_off[f->cache->n_fresh]);
        tf = bs_tensor_view_outer(&t, 0, fresh);
        f->batch = f->cache->n_fresh; /* the offsets' prefix */
        int rc = attn_core(f, a, &xf, src ? &sf : NULL, lkv, mask, &o);
        f->batch = batch;
        TRY(rc);
        TRY(linear(f, &tf, &o, &a->out, 0.0f));
    }
    TRY(cache_exchange(f, slot, &t));
    return add(f, h, &t, gate, rows_per_cond(f, f->cond ? f->cond->n : 1), 1.0f);
}

/* h = act(x w^T + b) (gated: x w^T + b is [rows, 2N] and h its glu): one
 * fused op where the backend has linear_act, else linear then act or glu
 * through g, scratch of [rows, 2N] for gated. */
static int linear_act(struct bs__fwd *f, struct bs_tensor *h, const struct bs_tensor *x,
                      const struct bs__linear *l, enum bs_act a, bool gated, struct bs_tensor *g)
{
    const struct bs_backend_i *be = f->be->iface;
    if (be->linear_act != NULL)
        return be->linear_act(f->be->ctx, h, x, &l->w, opt(&l->b), a, gated, f->err);
    if (!gated) {
        TRY(linear(f, h, x, l, 0.0f));
        return act(f, h, h, a);
    }
    TRY(linear(f, g, x, l, 0.0f));
    return be->glu(f->be->ctx, h, g, a, f->err);
}

int bs__ff_forward(struct bs__fwd *f, const struct bs__ff *ff, const struct bs_tensor *x,
                   struct bs_tensor *y, float beta)
{
    int64_t rows = bs_tensor_nrows(x);
    struct bs_tensor h, g = {0};
    /* the hidden layer in the activation dtype; a bare activation module's
     * is its output, F32 */
    TRY(ff->has_out ? bs__scratch_act(f, &h, rows, ff->inner)
                    : bs__scratch(f, &h, rows, ff->inner));
    switch (ff->act) {
    case BS_FF_GELU:
    case BS_FF_GELU_APPROXIMATE:
        TRY(linear_act(f, &h, x, &ff->proj, ff->act == BS_FF_GELU ? BS_ACT_GELU : BS_ACT_GELU_TANH,
                       false, NULL));
        break;
    case BS_FF_GEGLU: {
        /* A BF16 model gates in row chunks, so that the projection's
         * [rows, 2 inner] output never exists whole (21 MB in F32 for the
         * SD-1.5 mid block at batch 8, the largest buffer of its forward);
         * FP32 models keep the single GEMM (and their exact results). */
        int64_t chunk = rows;
        if (f->dtype != BS_TYPE_F32) {
            chunk = GEGLU_CHUNK_BYTES / (2 * ff->inner * (int64_t)bs_dtype_size(f->act));
            chunk = chunk < 64 ? 64 : chunk / 16 * 16;
        }
        chunk = chunk < rows ? chunk : rows;
        if (f->be->iface->linear_act == NULL) /* the backend's own otherwise */
            TRY(bs__scratch_act(f, &g, chunk, 2 * ff->inner));
        for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
            int64_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
            struct bs_tensor xr = bs_tensor_view_outer(x, r0, r1 - r0);
            struct bs_tensor hr = bs_tensor_view_outer(&h, r0, r1 - r0);
            struct bs_tensor gr = bs_tensor_view_outer(&g, 0, r1 - r0);
            TRY(linear_act(f, &hr, &xr, &ff->proj, BS_ACT_GELU, true, &gr));
        }
        break;
    }
    case BS_FF_GEGLU_APPROXIMATE:
        TRY(linear_act(f, &h, x, &ff->proj, BS_ACT_QUICK_GELU, false, NULL));
        break;
    }
    if (!ff->has_out) {
        *y = h;
        return 0;
    }
    return linear(f, y, &h, &ff->out, beta);
}

/* norm2 + attn2, present only with cross_attention_dim. */
static int block_cross(struct bs__fwd *f, const struct bs__block *b, struct bs_tensor *x,
                       struct bs_tensor *nh)
{
    if (b->norm2.emb.data != NULL)
        TRY(bs__ada_norm_forward(f, &b->norm2, x, nh));
    else
        TRY(layer_norm(f, nh, x, &b->norm2, NULL, NULL, 1));
    const struct bs_tensor *src = opt(&f->enc);
    return attn_forward(f, &b->attn2, nh, src, src ? f->lk : f->lq, &f->mask2, x, NULL,
                        BS__SLOT_ATTN2);
}

/* x += gate * ff(nh) with block caching: the fresh rows run the
 * feed-forward, the others take their caches' outputs. */
static int ff_cached(struct bs__fwd *f, const struct bs__ff *ff, const struct bs_tensor *nh,
                     struct bs_tensor *x, const struct bs_tensor *gate, int64_t rps)
{
    int64_t fresh = f->cache->rows_fresh;
    struct bs_tensor t;
    TRY(bs__scratch(f, &t, bs_tensor_nrows(x), x->ne[1]));
    if (fresh > 0) {
        struct bs_tensor nf = bs_tensor_view_outer(nh, 0, fresh);
        struct bs_tensor tf = bs_tensor_view_outer(&t, 0, fresh);
        TRY(bs__ff_forward(f, ff, &nf, &tf, 0.0f));
    }
    TRY(cache_exchange(f, BS__SLOT_FF, &t));
    return add(f, x, &t, gate, rps, 1.0f);
}

/* BS_ECANCELED when the forward's owner no longer wants it. */
static int stop_check(struct bs__fwd *f)
{
    if (f->should_stop == NULL || !f->should_stop(f->stop_arg))
        return 0;
    return bs_err_set(f->err, BS_ECANCELED, "stopped: no request of the batch is waiting for it");
}

/* One BasicTransformerBlock on x in place; its scratch is released by the
 * caller (bs__block_forward), after a graph that reads it has been queued. */
static int block_body(struct bs__fwd *f, const struct bs__block *b, struct bs_tensor *x)
{
    const struct bs_btb_config *c = b->cfg;
    int64_t d = c->dim, rows = bs_tensor_nrows(x);
    struct bs_tensor nh, mod, col[6];
    const struct bs_tensor *gate_msa = NULL, *gate_mlp = NULL, *scale_mlp = NULL, *shift_mlp = NULL;
    int64_t rps = rows_per_cond(f, f->cond ? f->cond->n : 1);
    int rc;

    if ((rc = bs__scratch_act(f, &nh, rows, d)) != 0)
        goto out;
    /* 1. norm1 and self-attention (cross-attention with only_cross_attention) */
    if (c->norm_type == BS_NORM_ADA_NORM_ZERO) {
        if ((rc = ada_zero_modulation(f, &b->az, &mod)) != 0)
            goto out;
        /* shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp */
        for (int i = 0; i < 6; i++)
            col[i] = bs_tensor_view_cols(&mod, i * d, d);
        gate_msa = &col[2];
        shift_mlp = &col[3];
        scale_mlp = &col[4];
        gate_mlp = &col[5];
        rc = layer_norm(f, &nh, x, &b->norm1, &col[1], &col[0], rps);
    } else if (c->norm_type == BS_NORM_ADA_NORM) {
        rc = bs__ada_norm_forward(f, &b->norm1, x, &nh);
    } else {
        rc = layer_norm(f, &nh, x, &b->norm1, NULL, NULL, 1);
    }
    if (rc != 0)
        goto out;
    const struct bs_tensor *src = c->only_cross_attention ? opt(&f->enc) : NULL;
    rc = attn_forward(f, &b->attn1, &nh, src, src ? f->lk : f->lq, &f->mask1, x, gate_msa,
                      BS__SLOT_ATTN1);
    /* 2. norm2 and cross-attention */
    if (rc == 0 && b->has_attn2 && (rc = stop_check(f)) == 0)
        rc = block_cross(f, b, x, &nh);
    /* 3. norm3 (modulated with ada_norm_zero) and feed-forward */
    if (rc == 0 && (rc = stop_check(f)) == 0)
        rc = layer_norm(f, &nh, x, &b->norm3, scale_mlp, shift_mlp, rps);
    if (rc == 0 && f->cache != NULL) {
        rc = ff_cached(f, &b->ff, &nh, x, gate_mlp, rps);
    } else if (rc == 0 && gate_mlp == NULL) {
        rc = bs__ff_forward(f, &b->ff, &nh, x, 1.0f);
    } else if (rc == 0) {
        struct bs_tensor t;
        if ((rc = bs__scratch(f, &t, rows, d)) == 0 &&
            (rc = bs__ff_forward(f, &b->ff, &nh, &t, 0.0f)) == 0)
            rc = add(f, x, &t, gate_mlp, rps, 1.0f);
    }
out:
    return rc;
}

/* What a block's ops depend on besides their arguments (engine/graph.h):
 * zeroed first, so that its padding compares equal. */
struct block_key {
    const struct bs__block *b;
    const void *x, *enc, *mask1, *mask2, *tproj;
    int64_t rows, batch, lq, lk, cond_n;
    int32_t act;
};

struct block_arg {
    const struct bs__block *b;
    struct bs_tensor *x;
};

static int block_part(struct bs__fwd *f, void *arg)
{
    struct block_arg *a = arg;
    return block_body(f, a->b, a->x);
}

int bs__block_forward(struct bs__fwd *f, const struct bs__block *b, struct bs_tensor *x)
{
    struct bs_arena_mark mark = bs_arena_mark(f->arena);
    int rc;
    if (f->be->graphs == BS_GRAPHS_OFF || f->rg != NULL || f->cache != NULL) {
        rc = block_body(f, b, x);
    } else {
        struct block_key k;
        struct block_arg a = {b, x};
        memset(&k, 0, sizeof(k));
        k.b = b;
        k.x = x->data;
        k.enc = f->enc.data;
        k.mask1 = f->mask1.t.data;
        k.mask2 = f->mask2.t.data;
        k.tproj = f->cond != NULL ? f->cond->tproj.data : NULL;
        k.rows = bs_tensor_nrows(x);
        k.batch = f->batch;
        k.lq = f->lq;
        k.lk = f->lk;
        k.cond_n = f->cond != NULL ? f->cond->n : 0;
        k.act = (int32_t)f->act;
        rc = bs__graph_run(f, &k, sizeof(k), block_part, &a);
    }
    bs_arena_release(f->arena, mark);
    return rc;
}

static struct bs_tensor as3(const struct bs_tensor *t, int64_t a, int64_t b, int64_t c)
{
    int64_t ne[3] = {a, b, c};
    return bs_tensor_reshape(t, 3, ne);
}

/* Sample b of a ragged batch of channels-first tensors t packed: [1, C,
 * S_b], or [1, S_b, C] with tokens_last. */
static struct bs_tensor sample_cs(const struct bs__fwd *f, const struct bs_tensor *t, int64_t ch,
                                  int64_t b, bool tokens_last)
{
    int64_t s0 = f->q_off[b], s = f->q_off[b + 1] - s0;
    int64_t ne[3] = {1, tokens_last ? s : ch, tokens_last ? ch : s};
    return bs_tensor_make(t->type, 3, ne,
                          (char *)t->data + (size_t)(s0 * ch) * bs_dtype_size(t->type));
}

/* AttentionBlock on a ragged batch: x holds each sample's [C, S_b] in turn;
 * the norms and transposes go sample by sample, the projections over every
 * token, attention over each sample's own tokens. */
static int attention_block_ragged(struct bs__fwd *f, const struct bs__attention_block *a,
                                  const struct bs_tensor *x, struct bs_tensor *y,
                                  const struct bs_norm_params *np, int heads)
{
    const struct bs_attention_block_config *c = a->cfg;
    int64_t ch = c->channels, tok = f->q_off[f->batch];
    struct bs_tensor gn, t, qkv, o, p;
    TRY(bs__scratch_act(f, &gn, tok, ch));
    TRY(bs__scratch_act(f, &t, tok, ch));
    for (int64_t b = 0; b < f->batch; b++) {
        struct bs_tensor xb = sample_cs(f, x, ch, b, false);
        struct bs_tensor gb = sample_cs(f, &gn, ch, b, false);
        struct bs_tensor tb = sample_cs(f, &t, ch, b, true);
        TRY(f->be->iface->group_norm(f->be->ctx, &gb, &xb, np, f->err));
        TRY(f->be->iface->transpose(f->be->ctx, &tb, &gb, f->err));
    }
    TRY(bs__scratch_act(f, &qkv, tok, 3 * ch));
    TRY(linear(f, &qkv, &t, &a->qkv, 0.0f));
    struct bs_tensor q = bs_tensor_view_cols(&qkv, 0, ch);
    struct bs_tensor k = bs_tensor_view_cols(&qkv, ch, ch);
    struct bs_tensor v = bs_tensor_view_cols(&qkv, 2 * ch, ch);
    struct bs_attn_params ap = {
        .batch = f->batch,
        .lq = f->lq,
        .lk = f->lq,
        .heads = heads,
        .head_dim = (int)(ch / heads),
        .scale = (float)(1.0 / sqrt((double)ch / heads)),
        .compute = f->dtype,
        .q_off = f->q_off,
        .k_off = f->q_off,
    };
    TRY(bs__scratch_act(f, &o, tok, ch));
    TRY(f->be->iface->attention(f->be->ctx, &o, &q, &k, &v, &ap, f->err));
    TRY(bs__scratch(f, &p, tok, ch));
    TRY(linear(f, &p, &o, &a->proj, 0.0f));
    TRY(bs__scratch(f, y, tok, ch));
    for (int64_t b = 0; b < f->batch; b++) {
        struct bs_tensor yb = sample_cs(f, y, ch, b, false);
        struct bs_tensor pb = sample_cs(f, &p, ch, b, true);
        TRY(f->be->iface->transpose(f->be->ctx, &yb, &pb, f->err));
    }
    /* (hidden_states + residual) / rescale_output_factor, elementwise */
    struct bs_tensor xr = bs_tensor_reshape(x, 2, (int64_t[]){tok, ch});
    return add(f, y, &xr, NULL, 1, (float)(1.0 / c->rescale_output_factor));
}

static int attention_block_body(struct bs__fwd *f, const struct bs__attention_block *a,
                                const struct bs_tensor *x, struct bs_tensor *y)
{
    const struct bs_attention_block_config *c = a->cfg;
    int64_t bsz = x->ne[0], ch = c->channels, s = x->ne[x->n_dims - 1];
    int heads = c->num_head_channels ? (int)(ch / c->num_head_channels) : 1;
    struct bs_tensor gn, t, qkv, o, p;
    struct bs_norm_params np = {
        .eps = (float)c->eps,
        .gamma = &a->gn_gamma,
        .beta = &a->gn_beta,
        .groups = (int)c->norm_num_groups,
    };
    if (f->q_off != NULL)
        return attention_block_ragged(f, a, x, y, &np, heads);
    TRY(bs__scratch_act(f, &gn, bsz * ch, s));
    gn = as3(&gn, bsz, ch, s);
    TRY(f->be->iface->group_norm(f->be->ctx, &gn, x, &np, f->err));
    TRY(bs__scratch_act(f, &t, bsz * s, ch));
    struct bs_tensor t3 = as3(&t, bsz, s, ch);
    TRY(f->be->iface->transpose(f->be->ctx, &t3, &gn, f->err));
    TRY(bs__scratch_act(f, &qkv, bsz * s, 3 * ch));
    TRY(linear(f, &qkv, &t, &a->qkv, 0.0f));
    struct bs_tensor q = bs_tensor_view_cols(&qkv, 0, ch);
    struct bs_tensor k = bs_tensor_view_cols(&qkv, ch, ch);
    struct bs_tensor v = bs_tensor_view_cols(&qkv, 2 * ch, ch);
    struct bs_attn_params ap = {
        .batch = bsz,
        .lq = s,
        .lk = s,
        .heads = heads,
        .head_dim = (int)(ch / heads),
        .scale = (float)(1.0 / sqrt((double)ch / heads)),
        .compute = f->dtype,
    };
    TRY(bs__scratch_act(f, &o, bsz * s, ch));
    TRY(f->be->iface->attention(f->be->ctx, &o, &q, &k, &v, &ap, f->err));
    TRY(bs__scratch(f, &p, bsz * s, ch));
    TRY(linear(f, &p, &o, &a->proj, 0.0f));
    TRY(bs__scratch(f, y, bsz * ch, s));
    *y = as3(y, bsz, ch, s);
    struct bs_tensor p3 = as3(&p, bsz, s, ch);
    TRY(f->be->iface->transpose(f->be->ctx, y, &p3, f->err));
    /* (hidden_states + residual) / rescale_output_factor */
    return add(f, y, x, NULL, 1, (float)(1.0 / c->rescale_output_factor));
}

/* An attention block's key (engine/graph.h): zeroed first. */
struct attention_block_key {
    const struct bs__attention_block *a;
    const void *x;
    int64_t ne[3];
    int32_t act;
};

struct attention_block_arg {
    const struct bs__attention_block *a;
    const struct bs_tensor *x;
    struct bs_tensor *y;
};

static int attention_block_part(struct bs__fwd *f, void *arg)
{
    struct attention_block_arg *p = arg;
    return attention_block_body(f, p->a, p->x, p->y);
}

int bs__attention_block_forward(struct bs__fwd *f, const struct bs__attention_block *a,
                                const struct bs_tensor *x, struct bs_tensor *y)
{
    if (f->be->graphs == BS_GRAPHS_OFF || f->q_off != NULL || x->n_dims != 3)
        return attention_block_body(f, a, x, y);
    struct attention_block_key k;
    struct attention_block_arg p = {a, x, y};
    memset(&k, 0, sizeof(k));
    k.a = a;
    k.x = x->data;
    memcpy(k.ne, x->ne, sizeof(k.ne));
    k.act = (int32_t)f->act;
    return bs__graph_run(f, &k, sizeof(k), attention_block_part, &p);
}

int bs__ada_group_norm_forward(struct bs__fwd *f, const struct bs__ada_group_norm *a,
                               const struct bs_tensor *x, const struct bs_tensor *emb,
                               struct bs_tensor *y)
{
    const struct bs_ada_group_norm_config *c = a->cfg;
    int64_t bsz = emb->ne[0], e = emb->ne[1];
    struct bs_tensor ea = *emb, ss;
    if (c->act_fn != BS_ACT_NONE) {
        TRY(bs__scratch(f, &ea, bsz, e));
        TRY(act(f, &ea, emb, c->act_fn));
    }
    TRY(bs__scratch(f, &ss, bsz, 2 * c->out_dim));
    TRY(linear(f, &ss, &ea, &a->lin, 0.0f));
    struct bs_tensor scale = bs_tensor_view_cols(&ss, 0, c->out_dim);
    struct bs_tensor shift = bs_tensor_view_cols(&ss, c->out_dim, c->out_dim);
    struct bs_norm_params np = {
        .eps = (float)c->eps,
        .scale = &scale,
        .shift = &shift,
        .groups = (int)c->num_groups,
    };
    if (f->q_off != NULL) { /* ragged: each sample's [C, S_b] with its own row */
        int64_t ch = c->out_dim, tok = f->q_off[f->batch];
        TRY(bs__scratch(f, y, tok, ch));
        for (int64_t b = 0; b < f->batch; b++) {
            struct bs_tensor xb = sample_cs(f, x, ch, b, false);
            struct bs_tensor yb = sample_cs(f, y, ch, b, false);
            struct bs_tensor sb = cond_row(&scale, b), hb = cond_row(&shift, b);
            np.scale = &sb;
            np.shift = &hb;
            TRY(f->be->iface->group_norm(f->be->ctx, &yb, &xb, &np, f->err));
        }
        return 0;
    }
    TRY(bs__scratch(f, y, x->ne[0] * x->ne[1], x->ne[2]));
    *y = as3(y, x->ne[0], x->ne[1], x->ne[2]);
    return f->be->iface->group_norm(f->be->ctx, y, x, &np, f->err);
}
