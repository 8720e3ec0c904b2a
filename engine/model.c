/* Model loading (config + weights onto a backend), input checking and the
 * forward pass of every supported class. */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "modules.h"
#include "safetensors.h"

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        int rc_ = (expr);                                                                          \
        if (rc_ != 0)                                                                              \
            return rc_;                                                                            \
    } while (0)

#define FLOATS ((1u << BS_TYPE_F32) | (1u << BS_TYPE_F16) | (1u << BS_TYPE_BF16))
#define MASKS (FLOATS | (1u << BS_TYPE_BOOL))
#define NUMBERS (FLOATS | (1u << BS_TYPE_I64))
#define TPROJ_DIM 256
#define MASK_DROP -10000.0f /* a false keep-mask entry, as diffusers' additive masks use */

/* Every forward argument name the engine knows. */
enum input_id {
    IN_HIDDEN_STATES,
    IN_ENCODER_HIDDEN_STATES,
    IN_ATTENTION_MASK,
    IN_ENCODER_ATTENTION_MASK,
    IN_TIMESTEP,
    IN_CLASS_LABELS,
    IN_X,
    IN_EMB,
    IN_COUNT,
};

static const char *const input_names[IN_COUNT] = {
    "hidden_states", "encoder_hidden_states", "attention_mask", "encoder_attention_mask",
    "timestep",      "class_labels",          "x",              "emb",
};

struct bs_model {
    struct bs_model_config cfg;
    struct bs_backend *be;
    void *weights; /* one backend buffer holding every parameter */
    size_t weight_bytes;
    struct bs_input_spec inputs[IN_COUNT];
    enum input_id input_ids[IN_COUNT];
    int n_inputs;
    struct bs__block *blocks; /* BasicTransformerBlock: num_blocks of them */
    struct bs__attention_block ab;
    struct bs__ff ff;
    struct bs__norm ada_ln;
    struct bs__ada_group_norm agn;
};

/* Inputs of one forward, by id (NULL: absent). */
struct inputs {
    const struct bs_tensor *t[IN_COUNT];
};

/* ---- loading ----------------------------------------------------------- */

static void expand_prefix(char *dst, const char *pattern, int i)
{
    const char *at = strstr(pattern, "{i}");
    if (at == NULL)
        snprintf(dst, BS_PREFIX_MAX, "%s", pattern);
    else
        snprintf(dst, BS_PREFIX_MAX, "%.*s%d%s", (int)(at - pattern), pattern, i, at + 3);
}

static void bind_model(struct bs__loader *ld, bs_model_t *m)
{
    const struct bs_model_config *c = &m->cfg;
    expand_prefix(ld->prefix, c->weights_prefix, 0);
    switch (c->cls) {
    case BS_CLASS_BASIC_TRANSFORMER_BLOCK:
        for (int i = 0; i < c->num_blocks && ld->rc == 0; i++) {
            expand_prefix(ld->prefix, c->weights_prefix, i);
            bs__bind_block(ld, &m->blocks[i], c);
        }
        break;
    case BS_CLASS_ATTENTION_BLOCK:
        bs__bind_attention_block(ld, &m->ab, c);
        break;
    case BS_CLASS_FEED_FORWARD:
        bs__bind_ff(ld, &m->ff, "net.0.proj", "net.2", c->dim, bs_config_ff_inner(c),
                    c->dim_out ? c->dim_out : c->dim, c->activation_fn);
        break;
    case BS_CLASS_GELU:
        bs__bind_ff(ld, &m->ff, "proj", NULL, c->dim_in, c->dim_out, 0,
                    c->approximate_tanh ? BS_FF_GELU_APPROXIMATE : BS_FF_GELU);
        break;
    case BS_CLASS_GEGLU:
        bs__bind_ff(ld, &m->ff, "proj", NULL, c->dim_in, c->dim_out, 0, BS_FF_GEGLU);
        break;
    case BS_CLASS_APPROXIMATE_GELU:
        bs__bind_ff(ld, &m->ff, "proj", NULL, c->dim_in, c->dim_out, 0, BS_FF_GEGLU_APPROXIMATE);
        break;
    case BS_CLASS_ADA_LAYER_NORM:
        bs__bind_ada_norm(ld, &m->ada_ln, "", c->embedding_dim, c->num_embeddings);
        break;
    case BS_CLASS_ADA_GROUP_NORM:
        bs__bind_ada_group_norm(ld, &m->agn, c);
        break;
    case BS_CLASS_COUNT:
        break;
    }
}

/* Does key belong to this model's part of the file (so that leaving it unused
 * is an error)? With "{i}" in the prefix, keys of blocks past num_blocks do
 * not: a model may serve the first blocks of a larger trunk. */
static bool key_is_ours(const struct bs_model_config *c, const char *key)
{
    const char *p = c->weights_prefix, *at = strstr(p, "{i}");
    if (at == NULL)
        return strncmp(key, p, strlen(p)) == 0;
    size_t head = (size_t)(at - p);
    if (strncmp(key, p, head) != 0)
        return false;
    char *end;
    long i = strtol(key + head, &end, 10);
    if (end == key + head || i < 0 || i >= c->num_blocks)
        return false;
    return strncmp(end, at + 3, strlen(at + 3)) == 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int check_unused(const bs_model_t *m, struct bs__loader *ld, struct bs_err *err)
{
    const char *unused = NULL;
    int n_unused = 0;
    qsort(ld->names, (size_t)ld->n_names, sizeof(char *), cmp_str);
    for (int i = 0; i < bs_st_count(ld->st); i++) {
        const char *key = bs_st_name(ld->st, i);
        if (!key_is_ours(&m->cfg, key) ||
            bsearch(&key, ld->names, (size_t)ld->n_names, sizeof(char *), cmp_str) != NULL)
            continue;
        if (n_unused++ == 0)
            unused = key;
    }
    if (n_unused != 0)
        return bs_err_set(err, BS_EFORMAT, "%s: unexpected tensor \"%s\"%s (not a parameter of %s "
                          "with this config)", ld->file, unused, n_unused > 1 ? " and others" : "",
                          bs_config_class_name(m->cfg.cls));
    return 0;
}

static void loader_free(struct bs__loader *ld)
{
    for (int i = 0; i < ld->n_names; i++)
        free(ld->names[i]);
    free(ld->names);
}

/* Two binding passes: size, then convert into staging and copy to the
 * backend. A backend whose buffers are host memory is its own staging. */
static int load_weights(bs_model_t *m, const bs_st_file_t *st, const char *path,
                        const struct bs_weight_gen *gen, struct bs_err *err)
{
    struct bs__loader ld = {.st = st, .file = path, .err = err};
    if (gen != NULL) {
        ld.generate = gen->fn;
        ld.generate_arg = gen->arg;
    }
    const struct bs_backend_i *be = m->be->iface;
    bind_model(&ld, m);
    m->weight_bytes = ld.off;
    m->weights = be->buf_alloc(m->be->ctx, ld.off ? ld.off : 64);
    ld.host = be->host_memory ? m->weights : malloc(ld.off ? ld.off : 64);
    if (m->weights == NULL || ld.host == NULL) {
        if (!be->host_memory)
            free(ld.host);
        return bs_err_set(err, BS_ENOMEM, "%s: cannot allocate %zu bytes of weights", path, ld.off);
    }
    ld.base = m->weights;
    ld.off = 0;
    bind_model(&ld, m);
    int rc = ld.rc;
    if (rc == 0 && st != NULL)
        rc = check_unused(m, &ld, err);
    if (rc == 0 && !be->host_memory)
        rc = be->copy_in(m->be->ctx, m->weights, ld.host, m->weight_bytes, err);
    if (rc == 0 && be->weights_ready != NULL)
        rc = be->weights_ready(m->be->ctx, m->weights, m->weight_bytes, err);
    if (!be->host_memory)
        free(ld.host);
    loader_free(&ld);
    return rc;
}

void bs_model_params(const struct bs_model_config *cfg,
                     void (*fn)(void *arg, const char *key, int n_dims, const int64_t *ne),
                     void *arg)
{
    struct bs__block block;
    bs_model_t m = {.cfg = *cfg};
    struct bs__loader ld = {.describe = fn, .describe_arg = arg};
    if (cfg->cls == BS_CLASS_BASIC_TRANSFORMER_BLOCK) {
        /* Binding only writes the block structs: one scratch block serves all. */
        for (int i = 0; i < cfg->num_blocks; i++) {
            expand_prefix(ld.prefix, cfg->weights_prefix, i);
            bs__bind_block(&ld, &block, &m.cfg);
        }
        return;
    }
    bind_model(&ld, &m);
}

static void add_input(bs_model_t *m, enum input_id id, bool required, int n_dims,
                      const int64_t *dims, unsigned dtypes, enum bs_dtype preferred)
{
    struct bs_input_spec *s = &m->inputs[m->n_inputs];
    s->name = input_names[id];
    s->required = required;
    s->n_dims = n_dims;
    /* masks may drop the query dim; timesteps and labels may be scalars */
    s->min_dims = id == IN_ATTENTION_MASK || id == IN_ENCODER_ATTENTION_MASK ? 2
                  : id == IN_TIMESTEP || id == IN_CLASS_LABELS               ? 0
                                                                             : n_dims;
    for (int i = 0; i < n_dims; i++)
        s->dims[i] = dims[i];
    s->dtypes = dtypes;
    s->dtype = preferred;
    m->input_ids[m->n_inputs++] = id;
}

static void describe_btb_inputs(bs_model_t *m)
{
    const struct bs_model_config *c = &m->cfg;
    int64_t enc_dim = c->cross_attention_dim ? c->cross_attention_dim : c->dim;
    bool uses_enc = c->cross_attention_dim != 0 || c->only_cross_attention;
    bool needs_enc = uses_enc && enc_dim != c->dim;
    add_input(m, IN_HIDDEN_STATES, true, 3, (int64_t[]){-1, -1, c->dim}, FLOATS, BS_TYPE_F32);
    if (uses_enc)
        add_input(m, IN_ENCODER_HIDDEN_STATES, needs_enc, 3, (int64_t[]){-1, -1, enc_dim}, FLOATS,
                  BS_TYPE_F32);
    add_input(m, IN_ATTENTION_MASK, false, 3, (int64_t[]){-1, -1, -1}, MASKS, BS_TYPE_F32);
    if (c->cross_attention_dim)
        add_input(m, IN_ENCODER_ATTENTION_MASK, false, 3, (int64_t[]){-1, -1, -1}, MASKS,
                  BS_TYPE_F32);
    if (c->norm_type != BS_NORM_LAYER_NORM)
        add_input(m, IN_TIMESTEP, true, 1, (int64_t[]){-1}, NUMBERS, BS_TYPE_I64);
    if (c->norm_type == BS_NORM_ADA_NORM_ZERO)
        add_input(m, IN_CLASS_LABELS, true, 1, (int64_t[]){-1}, NUMBERS, BS_TYPE_I64);
}

static void describe_inputs(bs_model_t *m)
{
    const struct bs_model_config *c = &m->cfg;
    switch (c->cls) {
    case BS_CLASS_BASIC_TRANSFORMER_BLOCK:
        describe_btb_inputs(m);
        break;
    case BS_CLASS_ATTENTION_BLOCK:
        add_input(m, IN_HIDDEN_STATES, true, 4, (int64_t[]){-1, c->channels, -1, -1}, FLOATS,
                  BS_TYPE_F32);
        break;
    case BS_CLASS_FEED_FORWARD:
        add_input(m, IN_HIDDEN_STATES, true, 3, (int64_t[]){-1, -1, c->dim}, FLOATS, BS_TYPE_F32);
        break;
    case BS_CLASS_GELU:
    case BS_CLASS_GEGLU:
    case BS_CLASS_APPROXIMATE_GELU:
        add_input(m, IN_HIDDEN_STATES, true, 3, (int64_t[]){-1, -1, c->dim_in}, FLOATS,
                  BS_TYPE_F32);
        break;
    case BS_CLASS_ADA_LAYER_NORM:
        add_input(m, IN_HIDDEN_STATES, true, 3, (int64_t[]){-1, -1, c->embedding_dim}, FLOATS,
                  BS_TYPE_F32);
        add_input(m, IN_TIMESTEP, true, 1, (int64_t[]){-1}, NUMBERS, BS_TYPE_I64);
        break;
    case BS_CLASS_ADA_GROUP_NORM:
        add_input(m, IN_X, true, 4, (int64_t[]){-1, c->out_dim, -1, -1}, FLOATS, BS_TYPE_F32);
        add_input(m, IN_EMB, true, 2, (int64_t[]){-1, c->embedding_dim}, FLOATS, BS_TYPE_F32);
        break;
    case BS_CLASS_COUNT:
        break;
    }
}

/* Load weights from the file at weights_path, or from gen when it is set. */
static int load_common(bs_model_t **model, const struct bs_model_config *cfg,
                       const char *weights_path, const struct bs_weight_gen *gen,
                       struct bs_backend *be, struct bs_err *err)
{
    bs_model_t *m = calloc(1, sizeof(*m));
    bs_st_file_t *st = NULL;
    int rc;
    *model = NULL;
    if (m == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    m->cfg = *cfg;
    m->be = be;
    if (cfg->cls == BS_CLASS_BASIC_TRANSFORMER_BLOCK &&
        (m->blocks = calloc((size_t)cfg->num_blocks, sizeof(*m->blocks))) == NULL) {
        rc = bs_err_set(err, BS_ENOMEM, "out of memory");
        goto fail;
    }
    if (gen == NULL && (rc = bs_st_open(&st, weights_path, err)) != 0)
        goto fail;
    if ((rc = load_weights(m, st, gen ? "generated weights" : weights_path, gen, err)) != 0)
        goto fail;
    bs_st_close(st);
    describe_inputs(m);
    *model = m;
    return 0;
fail:
    bs_st_close(st);
    bs_model_free(m);
    return rc;
}

int bs_model_load_config(bs_model_t **model, const struct bs_model_config *cfg,
                         const char *weights_path, struct bs_backend *be, struct bs_err *err)
{
    return load_common(model, cfg, weights_path, NULL, be, err);
}

int bs_model_load_generated(bs_model_t **model, const struct bs_model_config *cfg,
                            const struct bs_weight_gen *gen, struct bs_backend *be,
                            struct bs_err *err)
{
    return load_common(model, cfg, NULL, gen, be, err);
}

int bs_model_load(bs_model_t **model, const char *dir, struct bs_backend *be, struct bs_err *err)
{
    struct bs_model_config cfg;
    char path[4096];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    TRY(bs_config_load(&cfg, path, err));
    snprintf(path, sizeof(path), "%s/%s", dir,
             cfg.weights_file[0] ? cfg.weights_file : "diffusion_pytorch_model.safetensors");
    return bs_model_load_config(model, &cfg, path, be, err);
}

void bs_model_free(bs_model_t *m)
{
    if (m == NULL)
        return;
    if (m->weights != NULL)
        m->be->iface->buf_free(m->be->ctx, m->weights);
    free(m->blocks);
    free(m);
}

const struct bs_model_config *bs_model_config(const bs_model_t *m)
{
    return &m->cfg;
}

int bs_model_n_inputs(const bs_model_t *m)
{
    return m->n_inputs;
}

const struct bs_input_spec *bs_model_input(const bs_model_t *m, int i)
{
    return i >= 0 && i < m->n_inputs ? &m->inputs[i] : NULL;
}

struct bs_input_spec bs_model_output(const bs_model_t *m)
{
    const struct bs_model_config *c = &m->cfg;
    struct bs_input_spec s = {.name = "output", .required = true, .n_dims = 3, .min_dims = 3,
                              .dims = {-1, -1, -1, -1}, .dtypes = 1u << BS_TYPE_F32,
                              .dtype = BS_TYPE_F32};
    switch (c->cls) {
    case BS_CLASS_BASIC_TRANSFORMER_BLOCK:
        s.dims[2] = c->dim;
        break;
    case BS_CLASS_FEED_FORWARD:
        s.dims[2] = c->dim_out ? c->dim_out : c->dim;
        break;
    case BS_CLASS_GELU:
    case BS_CLASS_GEGLU:
    case BS_CLASS_APPROXIMATE_GELU:
        s.dims[2] = c->dim_out;
        break;
    case BS_CLASS_ADA_LAYER_NORM:
        s.dims[2] = c->embedding_dim;
        break;
    case BS_CLASS_ATTENTION_BLOCK:
    case BS_CLASS_ADA_GROUP_NORM:
        s.n_dims = s.min_dims = 4;
        s.dims[1] = c->cls == BS_CLASS_ATTENTION_BLOCK ? c->channels : c->out_dim;
        break;
    case BS_CLASS_COUNT:
        break;
    }
    return s;
}

size_t bs_model_weight_bytes(const bs_model_t *m)
{
    return m->weight_bytes;
}

/* ---- input checking ---------------------------------------------------- */

static int spec_index(const bs_model_t *m, const char *name)
{
    for (int i = 0; i < m->n_inputs; i++)
        if (strcmp(m->inputs[i].name, name) == 0)
            return i;
    return -1;
}

static int unknown_input(const bs_model_t *m, const char *name, struct bs_err *err)
{
    char list[256] = "";
    size_t off = 0;
    for (int i = 0; i < m->n_inputs && off < sizeof(list); i++)
        off += (size_t)snprintf(list + off, sizeof(list) - off, "%s%s", i ? ", " : "",
                                m->inputs[i].name);
    for (int i = 0; i < IN_COUNT; i++)
        if (strcmp(input_names[i], name) == 0)
            return bs_err_set(err, BS_EINVAL, "input \"%s\" is not used by this %s (it takes: %s)",
                              name, bs_config_class_name(m->cfg.cls), list);
    return bs_err_set(err, BS_EINVAL, "unknown input \"%s\" (this %s takes: %s)", name,
                      bs_config_class_name(m->cfg.cls), list);
}

static int check_one(const struct bs_input_spec *s, const struct bs_tensor *t, struct bs_err *err)
{
    char shape[96];
    int64_t n = 1;
    if (((1u << t->type) & s->dtypes) == 0 || (unsigned)t->type >= BS_TYPE_COUNT)
        return bs_err_set(err, BS_EINVAL, "input \"%s\": datatype %s is not accepted", s->name,
                          bs_dtype_name(t->type));
    bool full_rank = t->n_dims == s->n_dims;
    if (t->n_dims > s->n_dims || t->n_dims < s->min_dims)
        return bs_err_set(err, BS_EINVAL, "input \"%s\": expected %s%d dims, got shape %s",
                          s->name, s->min_dims < s->n_dims ? "at most " : "", s->n_dims,
                          bs_tensor_shape_str(t, shape, sizeof(shape)));
    for (int i = 0; i < t->n_dims; i++) {
        if (t->ne[i] < 1 || __builtin_mul_overflow(n, t->ne[i], &n) || n > ((int64_t)1 << 31))
            return bs_err_set(err, t->ne[i] < 1 ? BS_EINVAL : BS_ERANGE,
                              "input \"%s\": shape %s is empty or too large", s->name,
                              bs_tensor_shape_str(t, shape, sizeof(shape)));
        if (full_rank && s->dims[i] != -1 && t->ne[i] != s->dims[i])
            return bs_err_set(err, BS_EINVAL, "input \"%s\": dim %d is %lld, expected %lld (shape %s)",
                              s->name, i, (long long)t->ne[i], (long long)s->dims[i],
                              bs_tensor_shape_str(t, shape, sizeof(shape)));
    }
    if (!bs_tensor_is_contiguous(t) || t->data == NULL)
        return bs_err_set(err, BS_EINVAL, "input \"%s\": not a contiguous host tensor", s->name);
    return 0;
}

/* Names, dtypes, ranks and fixed dims of every input; fills r by id. */
static int resolve(const bs_model_t *m, const struct bs_named_tensor *in, int n_in,
                   struct inputs *r, struct bs_err *err)
{
    memset(r, 0, sizeof(*r));
    for (int i = 0; i < n_in; i++) {
        int j = spec_index(m, in[i].name);
        if (j < 0)
            return unknown_input(m, in[i].name, err);
        if (r->t[m->input_ids[j]] != NULL)
            return bs_err_set(err, BS_EINVAL, "input \"%s\" given twice", in[i].name);
        TRY(check_one(&m->inputs[j], &in[i].t, err));
        r->t[m->input_ids[j]] = &in[i].t;
    }
    for (int j = 0; j < m->n_inputs; j++)
        if (m->inputs[j].required && r->t[m->input_ids[j]] == NULL)
            return bs_err_set(err, BS_EINVAL, "missing input \"%s\"", m->inputs[j].name);
    return 0;
}

static int batch_of(const struct bs_tensor *t, int64_t batch, const char *name,
                    struct bs_err *err)
{
    if (t->ne[0] != batch)
        return bs_err_set(err, BS_EINVAL, "input \"%s\": batch %lld does not match "
                          "hidden_states' batch %lld", name, (long long)t->ne[0], (long long)batch);
    return 0;
}

/* A mask for lq queries over lk keys: [B|1, lk], [B|1, 1, lk] or [B|1, lq, lk]. */
static int check_mask(const struct bs_tensor *t, int64_t batch, int64_t lq, int64_t lk,
                      const char *name, struct bs_err *err)
{
    char shape[96];
    if (t == NULL)
        return 0;
    bool ok = (t->n_dims == 2 || t->n_dims == 3) && (t->ne[0] == batch || t->ne[0] == 1) &&
              t->ne[t->n_dims - 1] == lk &&
              (t->n_dims == 2 || t->ne[1] == 1 || t->ne[1] == lq);
    if (!ok)
        return bs_err_set(err, BS_EINVAL, "input \"%s\": shape %s does not fit %lld queries over "
                          "%lld keys (expected [%lld, %lld], [%lld, 1, %lld] or [%lld, %lld, %lld])",
                          name, bs_tensor_shape_str(t, shape, sizeof(shape)), (long long)lq,
                          (long long)lk, (long long)batch, (long long)lk, (long long)batch,
                          (long long)lk, (long long)batch, (long long)lq, (long long)lk);
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

/* timestep / class_labels: one value or one per sample; integral values in
 * [0, limit) when limit > 0, finite otherwise. */
static int check_cond(const struct bs_tensor *t, int64_t batch, int64_t limit, const char *name,
                      struct bs_err *err)
{
    if (t == NULL)
        return 0;
    int64_t n = bs_tensor_nelements(t);
    if (n != 1 && n != batch)
        return bs_err_set(err, BS_EINVAL, "input \"%s\": %lld values for a batch of %lld (give one "
                          "value, or one per sample)", name, (long long)n, (long long)batch);
    for (int64_t i = 0; i < n; i++) {
        double v = value_at(t, i);
        if (!isfinite(v))
            return bs_err_set(err, BS_EINVAL, "input \"%s\": value %lld is not finite", name,
                              (long long)i);
        if (limit > 0 && (v != floor(v) || v < 0 || v >= (double)limit))
            return bs_err_set(err, BS_EINVAL, "input \"%s\": value %g is not an integer in [0, "
                              "%lld)", name, v, (long long)limit);
    }
    return 0;
}

static int check_btb(const bs_model_t *m, const struct inputs *r, struct bs_err *err)
{
    const struct bs_model_config *c = &m->cfg;
    const struct bs_tensor *hs = r->t[IN_HIDDEN_STATES], *enc = r->t[IN_ENCODER_HIDDEN_STATES];
    int64_t batch = hs->ne[0], lq = hs->ne[1], lk = enc ? enc->ne[1] : lq;
    if (enc != NULL)
        TRY(batch_of(enc, batch, "encoder_hidden_states", err));
    TRY(check_mask(r->t[IN_ATTENTION_MASK], batch, lq, c->only_cross_attention ? lk : lq,
                   "attention_mask", err));
    TRY(check_mask(r->t[IN_ENCODER_ATTENTION_MASK], batch, lq, lk, "encoder_attention_mask", err));
    int64_t t_limit = c->norm_type == BS_NORM_ADA_NORM ? c->num_embeds_ada_norm : 0;
    TRY(check_cond(r->t[IN_TIMESTEP], batch, t_limit, "timestep", err));
    return check_cond(r->t[IN_CLASS_LABELS], batch, c->num_embeds_ada_norm + 1, "class_labels",
                      err);
}

static int check_inputs(const bs_model_t *m, const struct bs_named_tensor *in, int n_in,
                        struct inputs *rp, struct bs_tensor *out, struct bs_err *err)
{
    TRY(resolve(m, in, n_in, rp, err));
    const struct inputs r = *rp;
    const struct bs_tensor *main_in = r.t[m->input_ids[0]];
    *out = bs_tensor_make(BS_TYPE_F32, main_in->n_dims, main_in->ne, NULL);
    switch (m->cfg.cls) {
    case BS_CLASS_BASIC_TRANSFORMER_BLOCK:
        return check_btb(m, &r, err);
    case BS_CLASS_FEED_FORWARD:
        out->ne[2] = m->cfg.dim_out ? m->cfg.dim_out : m->cfg.dim;
        break;
    case BS_CLASS_GELU:
    case BS_CLASS_GEGLU:
    case BS_CLASS_APPROXIMATE_GELU:
        out->ne[2] = m->cfg.dim_out;
        break;
    case BS_CLASS_ADA_LAYER_NORM:
        return check_cond(r.t[IN_TIMESTEP], main_in->ne[0], m->cfg.num_embeddings, "timestep",
                          err);
    case BS_CLASS_ADA_GROUP_NORM:
        return batch_of(r.t[IN_EMB], main_in->ne[0], "emb", err);
    default:
        break;
    }
    *out = bs_tensor_make(BS_TYPE_F32, out->n_dims, out->ne, NULL);
    return 0;
}

int bs_model_check(const bs_model_t *m, const struct bs_named_tensor *in, int n_in,
                   struct bs_tensor *out, struct bs_err *err)
{
    struct inputs r;
    return check_inputs(m, in, n_in, &r, out, err);
}

/* ---- forward ----------------------------------------------------------- */

/* Scratch [rows, cols] filled with src converted to F32 (masks: converted to
 * additive F32 by the caller first). */
static int upload_f32(struct bs__fwd *f, struct bs_tensor *dst, const float *src, int64_t rows,
                      int64_t cols)
{
    TRY(bs__scratch(f, dst, rows, cols));
    return f->be->iface->copy_in(f->be->ctx, dst->data, src, (size_t)(rows * cols) * 4, f->err);
}

static int upload(struct bs__fwd *f, struct bs_tensor *dst, const struct bs_tensor *src,
                  int64_t rows, int64_t cols)
{
    int64_t n = rows * cols;
    if (f->be->iface->host_memory) {
        TRY(bs__scratch(f, dst, rows, cols));
        return bs_convert_to_f32(dst->data, src->data, src->type, n);
    }
    float *tmp = malloc((size_t)n * sizeof(float));
    if (tmp == NULL)
        return bs_err_set(f->err, BS_ENOMEM, "out of memory staging an input");
    bs_convert_to_f32(tmp, src->data, src->type, n);
    int rc = upload_f32(f, dst, tmp, rows, cols);
    free(tmp);
    return rc;
}

/* An accepted mask as additive F32 [batch, mq, lk] in backend memory. */
static int upload_mask(struct bs__fwd *f, struct bs_tensor *dst, const struct bs_tensor *m)
{
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

/* Host conditioning rows (n = 1 when every given value is shared, else the
 * batch) in one allocation returned in *storage; with tproj, the sinusoidal
 * projection uploaded too. */
static int make_cond(struct bs__fwd *f, const struct inputs *r, bool tproj, struct bs__cond *c,
                     void **storage)
{
    const struct bs_tensor *ts = r->t[IN_TIMESTEP], *lab = r->t[IN_CLASS_LABELS];
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

static int download(struct bs__fwd *f, struct bs_tensor *out, const struct bs_tensor *x)
{
    return f->be->iface->copy_out(f->be->ctx, out->data, x->data, bs_tensor_nbytes(out), f->err);
}

static int run_btb(bs_model_t *m, struct bs__fwd *f, const struct inputs *r,
                   struct bs_tensor *out, const struct bs_forward_opts *opts)
{
    const struct bs_model_config *c = &m->cfg;
    const struct bs_tensor *hs = r->t[IN_HIDDEN_STATES], *enc = r->t[IN_ENCODER_HIDDEN_STATES];
    struct bs_tensor x;
    struct bs__cond cond;
    void *storage = NULL;
    int rc;
    f->batch = hs->ne[0];
    f->lq = hs->ne[1];
    f->lk = enc ? enc->ne[1] : 0;
    TRY(upload(f, &x, hs, f->batch * f->lq, c->dim));
    if (enc != NULL)
        TRY(upload(f, &f->enc, enc, f->batch * f->lk, enc->ne[2]));
    if (r->t[IN_ATTENTION_MASK] != NULL)
        TRY(upload_mask(f, &f->mask1, r->t[IN_ATTENTION_MASK]));
    if (r->t[IN_ENCODER_ATTENTION_MASK] != NULL)
        TRY(upload_mask(f, &f->mask2, r->t[IN_ENCODER_ATTENTION_MASK]));
    rc = make_cond(f, r, c->norm_type == BS_NORM_ADA_NORM_ZERO, &cond, &storage);
    f->cond = &cond;
    for (int i = 0; rc == 0 && i < c->num_blocks; i++) {
        rc = bs__block_forward(f, &m->blocks[i], &x);
        if (rc == 0 && opts != NULL && opts->on_block != NULL &&
            (rc = download(f, out, &x)) == 0)
            rc = opts->on_block(opts->cb_arg, i, c->num_blocks, out);
    }
    if (rc == 0 && (opts == NULL || opts->on_block == NULL))
        rc = download(f, out, &x);
    free(storage);
    return rc;
}

static int run_other(bs_model_t *m, struct bs__fwd *f, const struct inputs *r,
                     struct bs_tensor *out)
{
    const struct bs_model_config *c = &m->cfg;
    const struct bs_tensor *hs = r->t[m->input_ids[0]];
    struct bs_tensor x, y, emb;
    struct bs__cond cond;
    void *storage = NULL;
    int64_t cols = hs->ne[hs->n_dims - 1], rows = bs_tensor_nelements(hs) / cols;
    int rc;
    f->batch = hs->ne[0];
    f->lq = hs->n_dims == 3 ? hs->ne[1] : 1;
    TRY(upload(f, &x, hs, rows, cols));
    switch (c->cls) {
    case BS_CLASS_ATTENTION_BLOCK:
        x = bs_tensor_reshape(&x, 3, (int64_t[]){hs->ne[0], hs->ne[1], hs->ne[2] * hs->ne[3]});
        TRY(bs__attention_block_forward(f, &m->ab, &x, &y));
        break;
    case BS_CLASS_ADA_GROUP_NORM:
        x = bs_tensor_reshape(&x, 3, (int64_t[]){hs->ne[0], hs->ne[1], hs->ne[2] * hs->ne[3]});
        TRY(upload(f, &emb, r->t[IN_EMB], r->t[IN_EMB]->ne[0], r->t[IN_EMB]->ne[1]));
        TRY(bs__ada_group_norm_forward(f, &m->agn, &x, &emb, &y));
        break;
    case BS_CLASS_ADA_LAYER_NORM:
        TRY(make_cond(f, r, false, &cond, &storage));
        f->cond = &cond;
        rc = bs__scratch(f, &y, rows, cols);
        if (rc == 0)
            rc = bs__ada_norm_forward(f, &m->ada_ln, &x, &y);
        free(storage);
        TRY(rc);
        break;
    default: /* FeedForward, GELU, GEGLU, ApproximateGELU */
        if (m->ff.has_out)
            TRY(bs__scratch(f, &y, rows, out->ne[out->n_dims - 1]));
        TRY(bs__ff_forward(f, &m->ff, &x, &y, 0.0f));
        break;
    }
    return download(f, out, &y);
}

int bs_model_forward(bs_model_t *m, struct bs_arena *arena, const struct bs_named_tensor *in,
                     int n_in, struct bs_tensor *out, const struct bs_forward_opts *opts,
                     struct bs_err *err)
{
    struct inputs r;
    struct bs_tensor shape;
    TRY(check_inputs(m, in, n_in, &r, &shape, err));
    if (out->type != BS_TYPE_F32 || out->n_dims != shape.n_dims || out->data == NULL ||
        memcmp(out->ne, shape.ne, sizeof(int64_t) * (size_t)shape.n_dims) != 0 ||
        !bs_tensor_is_contiguous(out))
        return bs_err_set(err, BS_EINVAL, "output buffer does not match the output shape");
    struct bs__fwd f = {.be = m->be, .arena = arena, .err = err};
    int rc = m->cfg.cls == BS_CLASS_BASIC_TRANSFORMER_BLOCK ? run_btb(m, &f, &r, out, opts)
                                                            : run_other(m, &f, &r, out);
    bs_arena_reset(arena);
    return rc;
}

double bs_model_flops(const bs_model_t *m, const struct bs_named_tensor *in, int n_in)
{
    struct inputs r;
    struct bs_err err;
    const struct bs_model_config *c = &m->cfg;
    if (resolve(m, in, n_in, &r, &err) != 0)
        return 0;
    const struct bs_tensor *hs = r.t[m->input_ids[0]], *enc = r.t[IN_ENCODER_HIDDEN_STATES];
    double rows = (double)bs_tensor_nelements(hs) / (double)hs->ne[hs->n_dims - 1];
    double b = (double)hs->ne[0];
    switch (c->cls) {
    case BS_CLASS_BASIC_TRANSFORMER_BLOCK: {
        double d = (double)c->dim, inner = (double)(c->num_attention_heads * c->attention_head_dim);
        double lq = (double)hs->ne[1], lk = enc ? (double)enc->ne[1] : lq;
        double kvd = enc ? (double)enc->ne[2] : d;
        double l1 = c->only_cross_attention && enc ? lk : lq, d1 = c->only_cross_attention && enc ? kvd : d;
        double ff_in = c->activation_fn == BS_FF_GEGLU ? 8 * d : 4 * d;
        double per = 2 * rows * d * inner + 2 * b * l1 * d1 * 2 * inner + 4 * b * lq * l1 * inner +
                     2 * rows * inner * d + 2 * rows * d * ff_in + 2 * rows * 4 * d * d;
        if (c->cross_attention_dim)
            per += 2 * rows * d * inner + 2 * b * lk * kvd * 2 * inner + 4 * b * lq * lk * inner +
                   2 * rows * inner * d;
        return per * c->num_blocks;
    }
    case BS_CLASS_ATTENTION_BLOCK: {
        double ch = (double)c->channels, s = (double)(hs->ne[2] * hs->ne[3]);
        return 2 * b * s * ch * ch * 4 + 4 * b * s * s * ch;
    }
    default:
        return 2 * rows * (double)(bs_tensor_nelements(&m->ff.proj.w) +
                                   (m->ff.has_out ? bs_tensor_nelements(&m->ff.out.w) : 0));
    }
}
