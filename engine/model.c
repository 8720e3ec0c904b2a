/* Model loading (config + weights onto a backend), input checking and the
 * forward pass. What differs between classes is asked of the model's class
 * (engine/class.h); nothing here names a class. */
#include "model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "class.h"
#include "safetensors.h"

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        int rc_ = (expr);                                                                          \
        if (rc_ != 0)                                                                              \
            return rc_;                                                                            \
    } while (0)

struct bs_model {
    struct bs_model_config cfg;
    const struct bs_class *cls; /* cfg.cls */
    struct bs_backend *be;
    void *weights; /* one backend buffer holding every F32 parameter */
    size_t weight_bytes;
    enum bs_dtype dtype; /* compute dtype */
    enum bs_dtype act;   /* activation dtype (modules.h, bs__scratch_act) */
    void **packed;       /* linear weights the backend packed (buf_free each) */
    int n_packed;
    size_t packed_bytes;
    struct bs_class_io io; /* inputs and output */
    void *state;           /* the class's bound modules */
};

/* Inputs of one forward by the class's slots (NULL: absent). */
struct inputs {
    const struct bs_tensor *t[BS_MAX_INPUTS];
};

/* ---- loading ----------------------------------------------------------- */

static void bind_model(struct bs__loader *ld, const struct bs_model_config *c, void *state)
{
    bs__expand_prefix(ld->prefix, c->weights_prefix, 0);
    c->cls->bind(ld, state, c);
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
        return bs_err_set(err, BS_EFORMAT,
                          "%s: unexpected tensor \"%s\"%s (not a parameter of %s "
                          "with this config)",
                          ld->file, unused, n_unused > 1 ? " and others" : "", m->cls->name);
    return 0;
}

static void loader_free(struct bs__loader *ld)
{
    for (int i = 0; i < ld->n_names; i++)
        free(ld->names[i]);
    free(ld->names);
    for (int i = 0; i < ld->n_packed; i++)
        ld->be->iface->buf_free(ld->be->ctx, ld->packed[i]);
    free(ld->packed);
}

/* Two binding passes: size, then convert into staging and copy to the
 * backend. A backend whose buffers are host memory is its own staging. */
static int load_weights(bs_model_t *m, const bs_st_file_t *st, const char *path,
                        const struct bs_weight_gen *gen, struct bs_err *err)
{
    struct bs__loader ld = {.st = st, .file = path, .err = err, .be = m->be, .pack = m->dtype};
    if (gen != NULL) {
        ld.generate = gen->fn;
        ld.generate_arg = gen->arg;
    }
    const struct bs_backend_i *be = m->be->iface;
    bind_model(&ld, &m->cfg, m->state);
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
    bind_model(&ld, &m->cfg, m->state);
    int rc = ld.rc;
    if (rc == 0 && st != NULL)
        rc = check_unused(m, &ld, err);
    if (rc == 0 && !be->host_memory)
        rc = be->copy_in(m->be->ctx, m->weights, ld.host, m->weight_bytes, err);
    if (rc == 0 && be->weights_ready != NULL)
        rc = be->weights_ready(m->be->ctx, m->weights, m->weight_bytes, err);
    if (!be->host_memory)
        free(ld.host);
    if (rc == 0) { /* the model owns the packed weights now */
        m->packed = ld.packed;
        m->n_packed = ld.n_packed;
        m->packed_bytes = ld.packed_bytes;
        ld.packed = NULL;
        ld.n_packed = 0;
    }
    loader_free(&ld);
    return rc;
}

int bs_model_params(const struct bs_model_config *cfg,
                    void (*fn)(void *arg, const char *key, int n_dims, const int64_t *ne),
                    void *arg)
{
    struct bs__loader ld = {.describe = fn, .describe_arg = arg};
    void *state = calloc(1, cfg->cls->state_size(cfg));
    if (state == NULL)
        return BS_ENOMEM;
    bind_model(&ld, cfg, state);
    free(state);
    return 0;
}

/* The compute dtype of a model on be: opts' when given, else the backend's;
 * one the backend cannot compute in is an error. */
static int model_dtype(const struct bs_backend *be, const struct bs_model_opts *o,
                       enum bs_dtype *dtype, struct bs_err *err)
{
    *dtype = o != NULL && o->has_dtype ? o->dtype : be->dtype;
    if (*dtype == be->dtype)
        return 0;
    if (!be->iface->host_memory) /* a device backend computes in its own dtype */
        return bs_err_set(
            err, BS_EUNSUPP, "dtype %s: the %s backend computes every model in %s (its --dtype)",
            bs_compute_dtype_name(*dtype), be->iface->name, bs_compute_dtype_name(be->dtype));
    if (*dtype == BS_TYPE_F16)
        return bs_err_set(err, BS_EUNSUPP,
                          "dtype fp16: the %s backend computes in fp32 or bf16 (fp16 is for cuda)",
                          be->iface->name);
    if (*dtype != BS_TYPE_F32 && be->iface->pack_weight == NULL)
        return bs_err_set(err, BS_EUNSUPP, "dtype %s: the %s backend computes in %s only",
                          bs_compute_dtype_name(*dtype), be->iface->name,
                          bs_compute_dtype_name(be->dtype));
    return 0;
}

/* Load weights from the file at weights_path, or from gen when it is set. */
static int load_common(bs_model_t **model, const struct bs_model_config *cfg,
                       const char *weights_path, const struct bs_weight_gen *gen,
                       struct bs_backend *be, const struct bs_model_opts *o, struct bs_err *err)
{
    bs_model_t *m = calloc(1, sizeof(*m));
    bs_st_file_t *st = NULL;
    int rc;
    *model = NULL;
    if (m == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    m->cfg = *cfg;
    m->cls = cfg->cls;
    m->be = be;
    if ((rc = model_dtype(be, o, &m->dtype, err)) != 0)
        goto fail;
    m->act = !be->act_f32 && m->dtype != BS_TYPE_F32 && (be->iface->act_dtypes >> m->dtype) & 1u
                 ? m->dtype
                 : BS_TYPE_F32;
    if ((m->state = calloc(1, m->cls->state_size(cfg))) == NULL) {
        rc = bs_err_set(err, BS_ENOMEM, "out of memory");
        goto fail;
    }
    if (gen == NULL && (rc = bs_st_open(&st, weights_path, err)) != 0)
        goto fail;
    if ((rc = load_weights(m, st, gen ? "generated weights" : weights_path, gen, err)) != 0)
        goto fail;
    bs_st_close(st);
    m->io.cls = m->cls;
    m->cls->describe(&m->cfg, &m->io);
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
    return load_common(model, cfg, weights_path, NULL, be, NULL, err);
}

int bs_model_load_generated(bs_model_t **model, const struct bs_model_config *cfg,
                            const struct bs_weight_gen *gen, struct bs_backend *be,
                            struct bs_err *err)
{
    return load_common(model, cfg, NULL, gen, be, NULL, err);
}

int bs_model_load(bs_model_t **model, const char *dir, struct bs_backend *be, struct bs_err *err)
{
    return bs_model_load_opts(model, dir, be, NULL, err);
}

int bs_model_load_opts(bs_model_t **model, const char *dir, struct bs_backend *be,
                       const struct bs_model_opts *o, struct bs_err *err)
{
    struct bs_model_config cfg;
    char path[4096];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    TRY(bs_config_load(&cfg, path, err));
    snprintf(path, sizeof(path), "%s/%s", dir,
             cfg.weights_file[0] ? cfg.weights_file : "diffusion_pytorch_model.safetensors");
    return load_common(model, &cfg, path, NULL, be, o, err);
}

void bs_model_free(bs_model_t *m)
{
    if (m == NULL)
        return;
    if (m->weights != NULL)
        m->be->iface->buf_free(m->be->ctx, m->weights);
    for (int i = 0; i < m->n_packed; i++)
        m->be->iface->buf_free(m->be->ctx, m->packed[i]);
    free(m->packed);
    free(m->state);
    free(m);
}

const struct bs_model_config *bs_model_config(const bs_model_t *m)
{
    return &m->cfg;
}

int bs_model_n_inputs(const bs_model_t *m)
{
    return m->io.n_in;
}

const struct bs_input_spec *bs_model_input(const bs_model_t *m, int i)
{
    return i >= 0 && i < m->io.n_in ? &m->io.in[i] : NULL;
}

static int spec_index(const bs_model_t *m, const char *name)
{
    for (int i = 0; i < m->io.n_in; i++)
        if (strcmp(m->io.in[i].name, name) == 0)
            return i;
    return -1;
}

enum bs_input_role bs_model_input_role(const bs_model_t *m, const char *name)
{
    int i = spec_index(m, name);
    return i < 0 ? BS_ROLE_BATCHED : m->io.in[i].role;
}

struct bs_input_spec bs_model_output(const bs_model_t *m)
{
    return m->io.out;
}

size_t bs_model_weight_bytes(const bs_model_t *m)
{
    return m->weight_bytes + m->packed_bytes;
}

enum bs_dtype bs_model_dtype(const bs_model_t *m)
{
    return m->dtype;
}

enum bs_dtype bs_model_act_dtype(const bs_model_t *m)
{
    return m->act;
}

/* ---- input checking ---------------------------------------------------- */

static int unknown_input(const bs_model_t *m, const char *name, struct bs_err *err)
{
    char list[256] = "";
    size_t off = 0;
    for (int i = 0; i < m->io.n_in && off < sizeof(list); i++)
        off += (size_t)snprintf(list + off, sizeof(list) - off, "%s%s", i ? ", " : "",
                                m->io.in[i].name);
    if (bs_class_knows_input(name))
        return bs_err_set(err, BS_EINVAL, "input \"%s\" is not used by this %s (it takes: %s)",
                          name, m->cls->name, list);
    return bs_err_set(err, BS_EINVAL, "unknown input \"%s\" (this %s takes: %s)", name,
                      m->cls->name, list);
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
        return bs_err_set(err, BS_EINVAL, "input \"%s\": expected %s%d dims, got shape %s", s->name,
                          s->min_dims < s->n_dims ? "at most " : "", s->n_dims,
                          bs_tensor_shape_str(t, shape, sizeof(shape)));
    for (int i = 0; i < t->n_dims; i++) {
        if (t->ne[i] < 1 || __builtin_mul_overflow(n, t->ne[i], &n) || n > ((int64_t)1 << 31))
            return bs_err_set(err, t->ne[i] < 1 ? BS_EINVAL : BS_ERANGE,
                              "input \"%s\": shape %s is empty or too large", s->name,
                              bs_tensor_shape_str(t, shape, sizeof(shape)));
        if (full_rank && s->dims[i] != -1 && t->ne[i] != s->dims[i])
            return bs_err_set(err, BS_EINVAL,
                              "input \"%s\": dim %d is %lld, expected %lld (shape %s)", s->name, i,
                              (long long)t->ne[i], (long long)s->dims[i],
                              bs_tensor_shape_str(t, shape, sizeof(shape)));
    }
    if (!bs_tensor_is_contiguous(t) || t->data == NULL)
        return bs_err_set(err, BS_EINVAL, "input \"%s\": not a contiguous host tensor", s->name);
    return 0;
}

/* Names, dtypes, ranks and fixed dims of every input; fills r by slot. */
static int resolve(const bs_model_t *m, const struct bs_named_tensor *in, int n_in,
                   struct inputs *r, struct bs_err *err)
{
    memset(r, 0, sizeof(*r));
    for (int i = 0; i < n_in; i++) {
        int j = spec_index(m, in[i].name);
        if (j < 0)
            return unknown_input(m, in[i].name, err);
        if (r->t[m->io.slot[j]] != NULL)
            return bs_err_set(err, BS_EINVAL, "input \"%s\" given twice", in[i].name);
        TRY(check_one(&m->io.in[j], &in[i].t, err));
        r->t[m->io.slot[j]] = &in[i].t;
    }
    for (int j = 0; j < m->io.n_in; j++)
        if (m->io.in[j].required && r->t[m->io.slot[j]] == NULL)
            return bs_err_set(err, BS_EINVAL, "missing input \"%s\"", m->io.in[j].name);
    return 0;
}

/* resolve, the class's checks across inputs, and the output shape: the main
 * input's, with the output spec's fixed dims. */
static int check_inputs(const bs_model_t *m, const struct bs_named_tensor *in, int n_in,
                        struct inputs *r, struct bs_tensor *out, struct bs_err *err)
{
    TRY(resolve(m, in, n_in, r, err));
    const struct bs_tensor *main_in = r->t[0];
    int64_t ne[BS_MAX_DIMS];
    for (int i = 0; i < main_in->n_dims; i++)
        ne[i] = m->io.out.dims[i] != -1 ? m->io.out.dims[i] : main_in->ne[i];
    *out = bs_tensor_make(BS_TYPE_F32, main_in->n_dims, ne, NULL);
    return m->cls->check != NULL ? m->cls->check(&m->cfg, r->t, err) : 0;
}

int bs_model_check(const bs_model_t *m, const struct bs_named_tensor *in, int n_in,
                   struct bs_tensor *out, struct bs_err *err)
{
    struct inputs r;
    return check_inputs(m, in, n_in, &r, out, err);
}

/* ---- forward ----------------------------------------------------------- */

/* An output dtype the forward writes: F32, or a 16-bit float (narrowed
 * from F32 once: on the device where the backend takes it, else on the
 * host: bs__download). */
static bool out_dtype_ok(enum bs_dtype t)
{
    return t == BS_TYPE_F32 || t == BS_TYPE_BF16 || t == BS_TYPE_F16;
}

/* The class's forward on inputs by slot (packed when rg is set), then the
 * device drained and the arena reset. */
static int run_forward(bs_model_t *m, struct bs_arena *arena, const struct bs__ragged *rg,
                       const struct bs__caching *cache, const struct bs_tensor *const *in,
                       struct bs_tensor *out, const struct bs_forward_opts *opts,
                       struct bs_err *err)
{
    struct bs__fwd f = {.be = m->be,
                        .dtype = m->dtype,
                        .act = m->act,
                        .arena = arena,
                        .err = err,
                        .rg = rg,
                        .cache = cache};
    if (opts != NULL) {
        f.should_stop = opts->should_stop;
        f.stop_arg = opts->stop_arg;
    }
    int rc = m->cls->forward(&m->cfg, m->state, &f, in, out, opts);
    if (!m->be->iface->host_memory) {
        /* No op of this forward may still be queued when the arena is reused,
         * maybe by a batch on another thread (backend.h, copy_out): after a
         * failure the message stays the failure's. */
        struct bs_err drain_err = {0};
        int drc = m->be->iface->copy_out(m->be->ctx, NULL, NULL, 0, rc ? &drain_err : err);
        rc = rc ? rc : drc;
    }
    bs_arena_reset(arena);
    return rc;
}

int bs_model_forward(bs_model_t *m, struct bs_arena *arena, const struct bs_named_tensor *in,
                     int n_in, struct bs_tensor *out, const struct bs_forward_opts *opts,
                     struct bs_err *err)
{
    struct inputs r;
    struct bs_tensor shape;
    TRY(check_inputs(m, in, n_in, &r, &shape, err));
    if (!out_dtype_ok(out->type) || out->n_dims != shape.n_dims || out->data == NULL ||
        memcmp(out->ne, shape.ne, sizeof(int64_t) * (size_t)shape.n_dims) != 0 ||
        !bs_tensor_is_contiguous(out))
        return bs_err_set(err, BS_EINVAL, "output buffer does not match the output shape");
    return run_forward(m, arena, NULL, NULL, r.t, out, opts, err);
}

double bs_model_flops(const bs_model_t *m, const struct bs_named_tensor *in, int n_in)
{
    struct inputs r;
    struct bs_err err;
    if (resolve(m, in, n_in, &r, &err) != 0)
        return 0;
    return m->cls->flops(&m->cfg, m->state, r.t);
}

/* ---- ragged batches ---------------------------------------------------- */

static const struct bs_class_input *class_input(const bs_model_t *m, int slot)
{
    return &m->cls->inputs[slot];
}

static const struct bs_tensor *find_input(const struct bs_named_tensor *in, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(in[i].name, name) == 0)
            return &in[i].t;
    return NULL;
}

/* Tokens of one sample of t (input slot): the product of its ragged dims. */
static int64_t sample_tokens(const bs_model_t *m, int slot, const struct bs_tensor *t)
{
    unsigned dims = class_input(m, slot)->ragged_dims;
    int64_t n = 1;
    for (int i = 1; i < t->n_dims; i++)
        if (dims & BS_RAGGED(i))
            n *= t->ne[i];
    return n;
}

/* A mask's form: a row per query (rank 3 with more than one row), one row
 * per sample, or either (a request with one query). */
enum mask_form { MASK_PER_SAMPLE = 1, MASK_PER_QUERY = 2, MASK_EITHER = 3 };

static enum mask_form mask_form(const bs_model_t *m, const struct bs_tensor *t,
                                const struct bs_named_tensor *in, int n_in)
{
    const struct bs_tensor *x = find_input(in, n_in, m->io.in[0].name);
    if (x != NULL && x->n_dims == 3 && x->ne[1] == 1)
        return MASK_EITHER;
    return t->n_dims == 3 && t->ne[1] > 1 ? MASK_PER_QUERY : MASK_PER_SAMPLE;
}

int64_t bs_model_tokens(const bs_model_t *m, const struct bs_named_tensor *in, int n_in)
{
    const char *main_name = m->io.in[0].name;
    for (int i = 0; i < n_in; i++)
        if (strcmp(in[i].name, main_name) == 0 && in[i].t.n_dims >= 1)
            return in[i].t.ne[0] * sample_tokens(m, m->io.slot[0], &in[i].t);
    return 0;
}

bool bs_model_ragged_compatible(const bs_model_t *m, const struct bs_named_tensor *a, int n_a,
                                const struct bs_named_tensor *b, int n_b)
{
    if (n_a != n_b)
        return false;
    for (int i = 0; i < n_a; i++) {
        const struct bs_tensor *x = &a[i].t, *y = find_input(b, n_b, a[i].name);
        int j = spec_index(m, a[i].name);
        if (y == NULL || j < 0 || x->type != y->type)
            return false;
        const struct bs_class_input *ci = class_input(m, m->io.slot[j]);
        switch (ci->role) {
        case BS_ROLE_COND:
            break;
        case BS_ROLE_MASK:
            if ((mask_form(m, x, a, n_a) & mask_form(m, y, b, n_b)) == 0)
                return false;
            break;
        case BS_ROLE_BATCHED:
            if (x->n_dims != y->n_dims)
                return false;
            for (int d = 1; d < x->n_dims; d++)
                if (!(ci->ragged_dims & BS_RAGGED(d)) && x->ne[d] != y->ne[d])
                    return false;
            break;
        }
    }
    return true;
}

/* The packed inputs of a ragged batch and their layout (host memory). */
struct packed {
    struct bs__ragged rg;
    struct bs_tensor t[BS_MAX_INPUTS];
    const struct bs_tensor *in[BS_MAX_INPUTS]; /* by slot: &t[slot] or NULL */
    void *mem;                                 /* one allocation for everything */
};

/* Bytes of slot s packed over the parts, and the offsets it needs. */
static size_t packed_bytes(const bs_model_t *m, int s, struct inputs *r, int n_parts, int64_t n,
                           size_t *n_off)
{
    const struct bs_class_input *ci = class_input(m, s);
    size_t bytes = 0;
    for (int k = 0; k < n_parts; k++) {
        const struct bs_tensor *t = r[k].t[s];
        int64_t samples = r[k].t[0]->ne[0];
        if (ci->role == BS_ROLE_BATCHED)
            bytes += bs_tensor_nbytes(t);
        else if (ci->role == BS_ROLE_MASK)
            bytes += bs_tensor_nbytes(t) / (size_t)t->ne[0] * (size_t)samples;
        else
            bytes += bs_dtype_size(t->type) * (size_t)samples;
    }
    *n_off = ci->role == BS_ROLE_MASK                              ? (size_t)n
             : ci->role == BS_ROLE_BATCHED && ci->ragged_dims != 0 ? (size_t)n + 1
                                                                   : 0;
    return (bytes + 63) & ~(size_t)63;
}

/* Concatenate slot s of every part into dst, one sample after another
 * (a mask or a value shared by a part's samples repeated for each), and
 * record its layout. */
static void pack_slot(const bs_model_t *m, const struct bs_model_part *parts, int s,
                      struct inputs *r, int n_parts, char *dst, int64_t *off, struct packed *p)
{
    const struct bs_class_input *ci = class_input(m, s);
    const struct bs_tensor *t0 = r[0].t[s];
    size_t esize = bs_dtype_size(t0->type), at = 0;
    int64_t sample = 0, tok = 0, elems = 0, longest = 0;
    for (int k = 0; k < n_parts; k++) {
        const struct bs_tensor *t = r[k].t[s];
        int64_t samples = r[k].t[0]->ne[0];
        size_t per = ci->role == BS_ROLE_COND ? esize : bs_tensor_nbytes(t) / (size_t)t->ne[0];
        bool shared = ci->role == BS_ROLE_COND ? bs_tensor_nelements(t) == 1 : t->ne[0] == 1;
        int64_t ntok = ci->role == BS_ROLE_BATCHED ? sample_tokens(m, s, t) : 0;
        for (int64_t b = 0; b < samples; b++, sample++) {
            memcpy(dst + at, (const char *)t->data + (shared ? 0 : per * (size_t)b), per);
            at += per;
            if (ci->role == BS_ROLE_MASK) {
                off[sample] = elems;
                elems += (int64_t)(per / esize);
            } else if (off != NULL) {
                off[sample] = tok;
                tok += ntok;
            }
        }
        longest = ntok > longest ? ntok : longest;
    }
    int64_t n_el = (int64_t)(at / esize);
    if (ci->role == BS_ROLE_BATCHED) { /* rank >= 1: conditioning may be 0-d */
        int64_t last = t0->ne[t0->n_dims - 1];
        if (off != NULL)
            off[sample] = tok;
        p->t[s] = bs_tensor_make(t0->type, 2, (int64_t[]){n_el / last, last}, dst);
        p->rg.off[s] = off;
        p->rg.max[s] = longest;
    } else {
        p->t[s] = bs_tensor_make(t0->type, 1, &n_el, dst);
        if (ci->role == BS_ROLE_MASK) { /* a row per query when any request has one */
            p->rg.m_off[s] = off;
            for (int k = 0; k < n_parts; k++)
                p->rg.m_per_query[s] |=
                    mask_form(m, r[k].t[s], parts[k].in, parts[k].n_in) == MASK_PER_QUERY;
        }
    }
    p->in[s] = &p->t[s];
}

static int pack_parts(const bs_model_t *m, const struct bs_model_part *parts, struct inputs *r,
                      int n_parts, int64_t n, struct packed *p, struct bs_err *err)
{
    size_t bytes[BS_MAX_INPUTS] = {0}, n_off[BS_MAX_INPUTS] = {0}, total = 0;
    memset(p, 0, sizeof(*p));
    p->rg.n = n;
    for (int s = 0; s < m->cls->n_inputs; s++)
        if (r[0].t[s] != NULL) {
            bytes[s] = packed_bytes(m, s, r, n_parts, n, &n_off[s]);
            total += bytes[s] + n_off[s] * sizeof(int64_t);
        }
    if ((p->mem = malloc(total ? total : 1)) == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory packing a batch of %lld samples",
                          (long long)n);
    char *at = p->mem;
    for (int s = 0; s < m->cls->n_inputs; s++) {
        if (r[0].t[s] == NULL)
            continue;
        int64_t *off = n_off[s] ? (int64_t *)(at + bytes[s]) : NULL;
        pack_slot(m, parts, s, r, n_parts, at, off, p);
        at += bytes[s] + n_off[s] * sizeof(int64_t);
    }
    return 0;
}

/* ---- block caches ------------------------------------------------------ */

static int cache_slots(const bs_model_t *m)
{
    return m->cfg.btb.cross_attention_dim != 0 ? 3 : 2;
}

bool bs_model_cacheable(const bs_model_t *m)
{
    return m->cls->cacheable;
}

size_t bs_block_cache_bytes_for(const bs_model_t *m, int64_t tokens)
{
    if (!m->cls->cacheable || tokens < 0)
        return 0;
    return (size_t)m->cfg.num_blocks * (size_t)cache_slots(m) * (size_t)tokens *
           (size_t)m->cfg.btb.dim * sizeof(float);
}

int bs_block_cache_new(bs_block_cache_t **cp, const bs_model_t *m, struct bs_err *err)
{
    *cp = NULL;
    if (!m->cls->cacheable)
        return bs_err_set(err, BS_EINVAL,
                          "block caching applies to BasicTransformerBlock models, "
                          "not %s",
                          m->cls->name);
    bs_block_cache_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    c->be = m->be;
    c->dim = m->cfg.btb.dim;
    c->n_blocks = m->cfg.num_blocks;
    c->n_slots = cache_slots(m);
    *cp = c;
    return 0;
}

void bs_block_cache_free(bs_block_cache_t *c)
{
    if (c == NULL)
        return;
    if (c->buf != NULL)
        c->be->iface->buf_free(c->be->ctx, c->buf);
    free(c);
}

size_t bs_block_cache_bytes(const bs_block_cache_t *c)
{
    return c != NULL && c->buf != NULL ? c->bytes : 0;
}

/* Make part k's cache ready for its mode, for a request of `rows` tokens. */
static int cache_prepare(const bs_model_t *m, const struct bs_model_part *p, int k, int64_t rows,
                         struct bs_err *err)
{
    bs_block_cache_t *c = p->cache;
    if (p->mode == BS_CACHE_OFF)
        return 0;
    if (c == NULL || c->be != m->be || c->dim != m->cfg.btb.dim || c->n_blocks != m->cfg.num_blocks)
        return bs_err_set(err, BS_EINVAL, "request %d of the batch: no block cache of this model",
                          k);
    if (p->mode == BS_CACHE_REUSE) {
        if (!c->valid || c->rows != rows)
            return bs_err_set(err, BS_EINVAL,
                              "request %d of the batch: its block cache holds no outputs for "
                              "%lld tokens (a sequence's shape must stay fixed)",
                              k, (long long)rows);
        return 0;
    }
    c->valid = false; /* until this refresh succeeds */
    if (c->buf != NULL && c->rows == rows)
        return 0;
    if (c->buf != NULL)
        m->be->iface->buf_free(m->be->ctx, c->buf);
    c->rows = rows;
    c->bytes = bs_block_cache_bytes_for(m, rows);
    if ((c->buf = m->be->iface->buf_alloc(m->be->ctx, c->bytes)) == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory for a block cache of %zu bytes", c->bytes);
    return 0;
}

/* The caching plan of a batch (NULL in *plan when no part caches): parts
 * that reuse must follow every part that computes. */
static int cache_plan(const bs_model_t *m, const struct bs_model_part *parts, int n_parts,
                      struct inputs *r, const struct packed *p, struct bs__cache_part *cp,
                      struct bs__caching *plan, struct bs_err *err)
{
    int64_t sample = 0, n_fresh = 0;
    bool any = false, reusing = false;
    memset(plan, 0, sizeof(*plan));
    for (int k = 0; k < n_parts; k++) {
        const struct bs_tensor *t = r[k].t[0];
        int64_t samples = t->ne[0];
        const int64_t *off = p->rg.off[0]; /* NULL: a main input without sequence dims */
        int64_t row0 = off ? off[sample] : 0, rows = off ? off[sample + samples] - row0 : 0;
        any |= parts[k].mode != BS_CACHE_OFF;
        if (parts[k].mode != BS_CACHE_OFF && !m->cls->cacheable)
            return bs_err_set(err, BS_EINVAL,
                              "block caching applies to BasicTransformerBlock models, not %s",
                              m->cls->name);
        if (parts[k].mode == BS_CACHE_REUSE)
            reusing = true;
        else if (reusing)
            return bs_err_set(err, BS_EINVAL,
                              "requests that reuse their block caches must come "
                              "after those that compute");
        else
            n_fresh += samples;
        TRY(cache_prepare(m, &parts[k], k, rows, err));
        cp[k] = (struct bs__cache_part){parts[k].cache, parts[k].mode, row0, rows};
        sample += samples;
    }
    if (any) {
        plan->n_fresh = n_fresh;
        plan->rows_fresh = p->rg.off[0] ? p->rg.off[0][n_fresh] : 0;
        plan->parts = cp;
        plan->n_parts = n_parts;
    }
    return 0;
}

int bs_model_forward_parts(bs_model_t *m, struct bs_arena *arena, const struct bs_model_part *parts,
                           int n_parts, struct bs_tensor *out, const struct bs_forward_opts *opts,
                           struct bs_err *err)
{
    if (n_parts < 1 || parts == NULL)
        return bs_err_set(err, BS_EINVAL, "a ragged batch needs at least one request");
    struct inputs *r = calloc((size_t)n_parts, sizeof(*r));
    if (r == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    int64_t n = 0, out_elems = 0;
    int rc = 0;
    for (int k = 0; k < n_parts && rc == 0; k++) {
        struct bs_tensor shape;
        if ((rc = check_inputs(m, parts[k].in, parts[k].n_in, &r[k], &shape, err)) != 0)
            break;
        if (!bs_model_ragged_compatible(m, parts[0].in, parts[0].n_in, parts[k].in, parts[k].n_in))
            rc = bs_err_set(err, BS_EINVAL,
                            "request %d of the batch differs from the first beyond its "
                            "sequence lengths",
                            k);
        n += r[k].t[0]->ne[0];
        out_elems += bs_tensor_nelements(&shape);
    }
    if (rc == 0 && (!out_dtype_ok(out->type) || out->data == NULL ||
                    !bs_tensor_is_contiguous(out) || bs_tensor_nelements(out) != out_elems))
        rc = bs_err_set(err, BS_EINVAL, "output buffer does not hold the batch's %lld values",
                        (long long)out_elems);
    struct packed p = {0};
    struct bs__caching plan = {0};
    struct bs__cache_part *cp = calloc((size_t)n_parts, sizeof(*cp));
    if (rc == 0 && cp == NULL)
        rc = bs_err_set(err, BS_ENOMEM, "out of memory");
    if (rc == 0 && (rc = pack_parts(m, parts, r, n_parts, n, &p, err)) == 0 &&
        (rc = cache_plan(m, parts, n_parts, r, &p, cp, &plan, err)) == 0) {
        rc = run_forward(m, arena, &p.rg, plan.parts ? &plan : NULL, p.in, out, opts, err);
        for (int k = 0; plan.parts != NULL && k < n_parts; k++)
            if (parts[k].mode == BS_CACHE_REFRESH && rc == 0)
                parts[k].cache->valid = true;
    }
    free(cp);
    free(p.mem);
    free(r);
    return rc;
}
