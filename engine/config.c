#include "config.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

#define CONFIG_MAX_BYTES (1 << 20)
#define DIM_MAX ((int64_t)1 << 20) /* far above any real width; keeps products in range */

enum opt_kind {
    OPT_INT,         /* positive integer */
    OPT_INT_OR_NULL, /* positive integer or null (stored as 0) */
    OPT_NUM,         /* number */
    OPT_BOOL,
    OPT_FF_ACT,    /* "gelu" | "gelu-approximate" | "geglu" | "geglu-approximate" */
    OPT_NORM_TYPE, /* "layer_norm" | "ada_norm" | "ada_norm_zero" */
    OPT_APPROX,    /* "none" | "tanh" */
    OPT_ACT_FN,    /* null | "swish" | "silu" | "mish" | "gelu" */
};

struct opt {
    const char *key;
    enum opt_kind kind;
    size_t off;
    bool required;
};

#define F(field) offsetof(struct bs_model_config, field)

static const struct opt btb_opts[] = {
    {"dim", OPT_INT, F(dim), true},
    {"num_attention_heads", OPT_INT, F(num_attention_heads), true},
    {"attention_head_dim", OPT_INT, F(attention_head_dim), true},
    {"dropout", OPT_NUM, F(dropout), false},
    {"cross_attention_dim", OPT_INT_OR_NULL, F(cross_attention_dim), false},
    {"activation_fn", OPT_FF_ACT, F(activation_fn), false},
    {"num_embeds_ada_norm", OPT_INT_OR_NULL, F(num_embeds_ada_norm), false},
    {"attention_bias", OPT_BOOL, F(attention_bias), false},
    {"only_cross_attention", OPT_BOOL, F(only_cross_attention), false},
    {"upcast_attention", OPT_BOOL, F(upcast_attention), false},
    {"norm_elementwise_affine", OPT_BOOL, F(norm_elementwise_affine), false},
    {"norm_type", OPT_NORM_TYPE, F(norm_type), false},
    {"final_dropout", OPT_BOOL, F(final_dropout), false},
    {NULL, 0, 0, false},
};

static const struct opt attention_block_opts[] = {
    {"channels", OPT_INT, F(channels), true},
    {"num_head_channels", OPT_INT_OR_NULL, F(num_head_channels), false},
    {"norm_num_groups", OPT_INT, F(norm_num_groups), false},
    {"rescale_output_factor", OPT_NUM, F(rescale_output_factor), false},
    {"eps", OPT_NUM, F(eps), false},
    {NULL, 0, 0, false},
};

static const struct opt ff_opts[] = {
    {"dim", OPT_INT, F(dim), true},
    {"dim_out", OPT_INT_OR_NULL, F(dim_out), false},
    {"mult", OPT_NUM, F(mult), false},
    {"dropout", OPT_NUM, F(dropout), false},
    {"activation_fn", OPT_FF_ACT, F(activation_fn), false},
    {"final_dropout", OPT_BOOL, F(final_dropout), false},
    {NULL, 0, 0, false},
};

static const struct opt gelu_opts[] = {
    {"dim_in", OPT_INT, F(dim_in), true},
    {"dim_out", OPT_INT, F(dim_out), true},
    {"approximate", OPT_APPROX, F(approximate_tanh), false},
    {NULL, 0, 0, false},
};

static const struct opt proj_opts[] = {
    {"dim_in", OPT_INT, F(dim_in), true},
    {"dim_out", OPT_INT, F(dim_out), true},
    {NULL, 0, 0, false},
};

static const struct opt ada_ln_opts[] = {
    {"embedding_dim", OPT_INT, F(embedding_dim), true},
    {"num_embeddings", OPT_INT, F(num_embeddings), true},
    {NULL, 0, 0, false},
};

static const struct opt ada_gn_opts[] = {
    {"embedding_dim", OPT_INT, F(embedding_dim), true},
    {"out_dim", OPT_INT, F(out_dim), true},
    {"num_groups", OPT_INT, F(num_groups), true},
    {"act_fn", OPT_ACT_FN, F(act_fn), false},
    {"eps", OPT_NUM, F(eps), false},
    {NULL, 0, 0, false},
};

static int validate_btb(const struct bs_model_config *c, struct bs_err *err);
static int validate_attention_block(const struct bs_model_config *c, struct bs_err *err);
static int validate_ada_gn(const struct bs_model_config *c, struct bs_err *err);
static int validate_ff(const struct bs_model_config *c, struct bs_err *err);

static const struct {
    const char *name;
    const struct opt *opts;
    int (*validate)(const struct bs_model_config *c, struct bs_err *err);
} classes[BS_CLASS_COUNT] = {
    [BS_CLASS_BASIC_TRANSFORMER_BLOCK] = {"BasicTransformerBlock", btb_opts, validate_btb},
    [BS_CLASS_ATTENTION_BLOCK] = {"AttentionBlock", attention_block_opts, validate_attention_block},
    [BS_CLASS_FEED_FORWARD] = {"FeedForward", ff_opts, validate_ff},
    [BS_CLASS_GELU] = {"GELU", gelu_opts, NULL},
    [BS_CLASS_GEGLU] = {"GEGLU", proj_opts, NULL},
    [BS_CLASS_APPROXIMATE_GELU] = {"ApproximateGELU", proj_opts, NULL},
    [BS_CLASS_ADA_LAYER_NORM] = {"AdaLayerNorm", ada_ln_opts, NULL},
    [BS_CLASS_ADA_GROUP_NORM] = {"AdaGroupNorm", ada_gn_opts, validate_ada_gn},
};

const char *bs_config_class_name(enum bs_model_class cls)
{
    return (unsigned)cls < BS_CLASS_COUNT ? classes[cls].name : "?";
}

int64_t bs_config_ff_inner(const struct bs_model_config *cfg)
{
    return (int64_t)((double)cfg->dim * cfg->mult);
}

static void set_defaults(struct bs_model_config *c)
{
    memset(c, 0, sizeof(*c));
    c->activation_fn = BS_FF_GEGLU;
    c->norm_elementwise_affine = true;
    c->norm_type = BS_NORM_LAYER_NORM;
    c->mult = 4.0;
    c->norm_num_groups = 32;
    c->rescale_output_factor = 1.0;
    c->eps = 1e-5;
    c->act_fn = BS_ACT_NONE;
    c->num_blocks = 1;
}

struct name_value {
    const char *name;
    int value;
};

static const struct name_value ff_act_names[] = {
    {"gelu", BS_FF_GELU},
    {"gelu-approximate", BS_FF_GELU_APPROXIMATE},
    {"geglu", BS_FF_GEGLU},
    {"geglu-approximate", BS_FF_GEGLU_APPROXIMATE},
    {NULL, 0},
};
static const struct name_value norm_type_names[] = {
    {"layer_norm", BS_NORM_LAYER_NORM},
    {"ada_norm", BS_NORM_ADA_NORM},
    {"ada_norm_zero", BS_NORM_ADA_NORM_ZERO},
    {NULL, 0},
};
static const struct name_value approx_names[] = {{"none", 0}, {"tanh", 1}, {NULL, 0}};
static const struct name_value act_fn_names[] = {
    {"swish", BS_ACT_SILU}, {"silu", BS_ACT_SILU}, {"mish", BS_ACT_MISH},
    {"gelu", BS_ACT_GELU},  {NULL, 0},
};

static int parse_enum(const struct bs_json *v, const struct name_value *names, const char *key,
                      int *out, struct bs_err *err)
{
    char allowed[256] = "";
    size_t off = 0;
    if (v->type == BS_JSON_STRING) {
        for (const struct name_value *n = names; n->name; n++) {
            if (strcmp(v->string, n->name) == 0) {
                *out = n->value;
                return 0;
            }
        }
    }
    for (const struct name_value *n = names; n->name && off < sizeof(allowed); n++)
        off += (size_t)snprintf(allowed + off, sizeof(allowed) - off, "%s\"%s\"",
                                n == names ? "" : ", ", n->name);
    if (v->type == BS_JSON_STRING)
        return bs_err_set(err, BS_EINVAL, "\"%s\": unknown value \"%s\" (expected one of %s)", key,
                          v->string, allowed);
    return bs_err_set(err, BS_EINVAL, "\"%s\": expected a string, one of %s", key, allowed);
}

static int parse_int(const struct bs_json *v, const char *key, bool nullable, int64_t *out,
                     struct bs_err *err)
{
    if (nullable && v->type == BS_JSON_NULL) {
        *out = 0;
        return 0;
    }
    if (v->type != BS_JSON_NUMBER || !v->is_integer)
        return bs_err_set(err, BS_EINVAL, "\"%s\": expected an integer%s", key,
                          nullable ? " or null" : "");
    if (v->integer < 1 || v->integer > DIM_MAX)
        return bs_err_set(err, BS_EINVAL, "\"%s\": %lld is out of range [1, %lld]", key,
                          (long long)v->integer, (long long)DIM_MAX);
    *out = v->integer;
    return 0;
}

static int parse_opt(struct bs_model_config *c, const struct opt *o, const struct bs_json *v,
                     struct bs_err *err)
{
    char *field = (char *)c + o->off;
    int e = 0;
    switch (o->kind) {
    case OPT_INT:
    case OPT_INT_OR_NULL:
        return parse_int(v, o->key, o->kind == OPT_INT_OR_NULL, (int64_t *)field, err);
    case OPT_NUM:
        if (v->type != BS_JSON_NUMBER || !isfinite(v->number))
            return bs_err_set(err, BS_EINVAL, "\"%s\": expected a number", o->key);
        *(double *)field = v->number;
        return 0;
    case OPT_BOOL:
        if (v->type != BS_JSON_BOOL)
            return bs_err_set(err, BS_EINVAL, "\"%s\": expected true or false", o->key);
        *(bool *)field = v->boolean;
        return 0;
    case OPT_FF_ACT:
        if (parse_enum(v, ff_act_names, o->key, &e, err) != 0)
            return err->code;
        *(enum bs_ff_act *)field = (enum bs_ff_act)e;
        return 0;
    case OPT_NORM_TYPE:
        if (parse_enum(v, norm_type_names, o->key, &e, err) != 0)
            return err->code;
        *(enum bs_norm_type *)field = (enum bs_norm_type)e;
        return 0;
    case OPT_APPROX:
        if (parse_enum(v, approx_names, o->key, &e, err) != 0)
            return err->code;
        *(bool *)field = e != 0;
        return 0;
    case OPT_ACT_FN:
        if (v->type == BS_JSON_NULL) {
            *(enum bs_act *)field = BS_ACT_NONE;
            return 0;
        }
        if (parse_enum(v, act_fn_names, o->key, &e, err) != 0)
            return err->code;
        *(enum bs_act *)field = (enum bs_act)e;
        return 0;
    }
    return bs_err_set(err, BS_EINTERNAL, "unhandled option kind");
}

static int copy_string(char *dst, const struct bs_json *v, const char *key, struct bs_err *err)
{
    if (v->type != BS_JSON_STRING)
        return bs_err_set(err, BS_EINVAL, "\"blockserve.%s\": expected a string", key);
    if (v->len >= BS_PREFIX_MAX)
        return bs_err_set(err, BS_EINVAL, "\"blockserve.%s\": longer than %d bytes", key,
                          BS_PREFIX_MAX - 1);
    memcpy(dst, v->string, v->len + 1);
    return 0;
}

/* The "blockserve" section: {"num_blocks": N, "weights_prefix": "...{i}...",
 * "weights_file": "..."}; unknown keys are errors. */
static int parse_section(struct bs_model_config *c, const struct bs_json *sec, struct bs_err *err)
{
    if (sec->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EINVAL, "\"blockserve\": expected an object");
    for (const struct bs_json *m = sec->child; m; m = m->next) {
        if (strcmp(m->key, "num_blocks") == 0) {
            int64_t n = 0;
            if (parse_int(m, "blockserve.num_blocks", false, &n, err) != 0)
                return err->code;
            if (n > 4096)
                return bs_err_set(err, BS_EINVAL, "\"blockserve.num_blocks\": %lld > 4096",
                                  (long long)n);
            c->num_blocks = (int)n;
        } else if (strcmp(m->key, "weights_prefix") == 0) {
            if (copy_string(c->weights_prefix, m, m->key, err) != 0)
                return err->code;
        } else if (strcmp(m->key, "weights_file") == 0) {
            if (copy_string(c->weights_file, m, m->key, err) != 0)
                return err->code;
            if (strstr(c->weights_file, "..") != NULL || c->weights_file[0] == '/')
                return bs_err_set(err, BS_EINVAL,
                                  "\"blockserve.weights_file\": must name a file inside the "
                                  "model directory");
        } else {
            return bs_err_set(err, BS_EINVAL,
                              "\"blockserve\": unknown key \"%s\" (known: num_blocks, "
                              "weights_prefix, weights_file)",
                              m->key);
        }
    }
    return 0;
}

static int find_class(const struct bs_json *root, enum bs_model_class *cls, struct bs_err *err)
{
    const struct bs_json *v = bs_json_get(root, "_class_name");
    if (v == NULL)
        return bs_err_set(err, BS_EINVAL, "missing \"_class_name\"");
    if (v->type != BS_JSON_STRING)
        return bs_err_set(err, BS_EINVAL, "\"_class_name\": expected a string");
    for (int i = 0; i < BS_CLASS_COUNT; i++) {
        if (strcmp(v->string, classes[i].name) == 0) {
            *cls = (enum bs_model_class)i;
            return 0;
        }
    }
    return bs_err_set(err, BS_EUNSUPP,
                      "unknown \"_class_name\" \"%s\" (supported: BasicTransformerBlock, "
                      "AttentionBlock, FeedForward, GELU, GEGLU, ApproximateGELU, AdaLayerNorm, "
                      "AdaGroupNorm)",
                      v->string);
}

static const struct opt *find_opt(const struct opt *opts, const char *key)
{
    for (const struct opt *o = opts; o->key; o++)
        if (strcmp(o->key, key) == 0)
            return o;
    return NULL;
}

/* Members: diffusers' "_"-prefixed bookkeeping keys are ignored, "blockserve"
 * and "serving" are sections, anything else must be a constructor argument. */
static int parse_members(struct bs_model_config *c, const struct bs_json *root, struct bs_err *err)
{
    const struct opt *opts = classes[c->cls].opts;
    for (const struct bs_json *m = root->child; m; m = m->next) {
        if (m->key[0] == '_' || strcmp(m->key, "serving") == 0)
            continue;
        if (strcmp(m->key, "blockserve") == 0) {
            if (parse_section(c, m, err) != 0)
                return err->code;
            continue;
        }
        const struct opt *o = find_opt(opts, m->key);
        if (o == NULL)
            return bs_err_set(err, BS_EINVAL, "unknown key \"%s\" for %s", m->key,
                              classes[c->cls].name);
        if (parse_opt(c, o, m, err) != 0)
            return err->code;
    }
    for (const struct opt *o = opts; o->key; o++)
        if (o->required && bs_json_get(root, o->key) == NULL)
            return bs_err_set(err, BS_EINVAL, "missing required key \"%s\" for %s", o->key,
                              classes[c->cls].name);
    return 0;
}

int bs_config_parse(struct bs_model_config *cfg, const char *text, size_t len, const char *name,
                    struct bs_err *err)
{
    bs_json_doc_t *doc = NULL;
    int rc = bs_json_parse(&doc, text, len, 16, err);
    if (rc != 0)
        return bs_err_wrap(err, "%s", name);
    const struct bs_json *root = bs_json_doc_root(doc);
    set_defaults(cfg);
    if (root->type != BS_JSON_OBJECT)
        rc = bs_err_set(err, BS_EINVAL, "expected a JSON object");
    else if ((rc = find_class(root, &cfg->cls, err)) == 0 &&
             (rc = parse_members(cfg, root, err)) == 0 && classes[cfg->cls].validate)
        rc = classes[cfg->cls].validate(cfg, err);
    if (rc == 0 && cfg->num_blocks > 1 && cfg->cls != BS_CLASS_BASIC_TRANSFORMER_BLOCK)
        rc = bs_err_set(err, BS_EINVAL, "\"blockserve.num_blocks\": only BasicTransformerBlock "
                                        "models can be stacked");
    if (rc == 0 && cfg->num_blocks > 1 && strstr(cfg->weights_prefix, "{i}") == NULL) {
        if (cfg->weights_prefix[0] != '\0')
            rc = bs_err_set(err, BS_EINVAL, "\"blockserve.weights_prefix\": a stack of %d blocks "
                                            "needs \"{i}\" in the prefix",
                            cfg->num_blocks);
        else
            strcpy(cfg->weights_prefix, "transformer_blocks.{i}.");
    }
    bs_json_doc_free(doc);
    if (rc != 0)
        return bs_err_wrap(err, "%s", name);
    return 0;
}

int bs_config_load(struct bs_model_config *cfg, const char *path, struct bs_err *err)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return bs_err_set(err, BS_EIO, "%s: %s", path, strerror(errno));
    char *buf = malloc(CONFIG_MAX_BYTES + 1);
    if (buf == NULL) {
        fclose(f);
        return bs_err_set(err, BS_ENOMEM, "%s: out of memory", path);
    }
    size_t n = fread(buf, 1, CONFIG_MAX_BYTES + 1, f);
    int rc;
    if (ferror(f))
        rc = bs_err_set(err, BS_EIO, "%s: read error", path);
    else if (n > CONFIG_MAX_BYTES)
        rc = bs_err_set(err, BS_ERANGE, "%s: larger than %d bytes", path, CONFIG_MAX_BYTES);
    else
        rc = bs_config_parse(cfg, buf, n, path, err);
    free(buf);
    fclose(f);
    return rc;
}

static int validate_btb(const struct bs_model_config *c, struct bs_err *err)
{
    if (c->norm_type != BS_NORM_LAYER_NORM && c->num_embeds_ada_norm == 0)
        return bs_err_set(err, BS_EINVAL,
                          "`norm_type` is set to %s, but `num_embeds_ada_norm` is not defined",
                          c->norm_type == BS_NORM_ADA_NORM ? "ada_norm" : "ada_norm_zero");
    if (c->dropout < 0 || c->dropout > 1)
        return bs_err_set(err, BS_EINVAL, "\"dropout\": %g is not in [0, 1]", c->dropout);
    return 0;
}

static int validate_attention_block(const struct bs_model_config *c, struct bs_err *err)
{
    if (c->channels % c->norm_num_groups != 0)
        return bs_err_set(err, BS_EINVAL, "channels %lld is not divisible by norm_num_groups %lld",
                          (long long)c->channels, (long long)c->norm_num_groups);
    if (c->num_head_channels != 0 && c->channels % c->num_head_channels != 0)
        return bs_err_set(err, BS_EINVAL,
                          "channels %lld is not divisible by num_head_channels %lld",
                          (long long)c->channels, (long long)c->num_head_channels);
    if (c->rescale_output_factor == 0)
        return bs_err_set(err, BS_EINVAL, "\"rescale_output_factor\" must not be 0");
    if (c->eps <= 0)
        return bs_err_set(err, BS_EINVAL, "\"eps\" must be positive");
    return 0;
}

static int validate_ada_gn(const struct bs_model_config *c, struct bs_err *err)
{
    if (c->out_dim % c->num_groups != 0)
        return bs_err_set(err, BS_EINVAL, "out_dim %lld is not divisible by num_groups %lld",
                          (long long)c->out_dim, (long long)c->num_groups);
    if (c->eps <= 0)
        return bs_err_set(err, BS_EINVAL, "\"eps\" must be positive");
    return 0;
}

static int validate_ff(const struct bs_model_config *c, struct bs_err *err)
{
    /* Range-check the product in double first: converting a double beyond
     * int64's range (mult 1e300) is undefined. */
    double width = (double)c->dim * c->mult;
    int64_t inner = width >= 1 && width <= 16.0 * DIM_MAX ? bs_config_ff_inner(c) : 0;
    if (!(c->mult > 0) || inner < 1 || inner > 16 * DIM_MAX)
        return bs_err_set(err, BS_EINVAL, "\"mult\": %g gives an inner width of %lld", c->mult,
                          (long long)inner);
    return 0;
}
