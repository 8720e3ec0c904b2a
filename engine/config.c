/* config.json parsing: the class comes from "_class_name" through the class
 * table (engine/class.h), its arguments are read against that class's option
 * rows, then the class's checks and the "blockserve" section's run. */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "class.h"
#include "json.h"

#define CONFIG_MAX_BYTES (1 << 20)
#define DIM_MAX BS_CONFIG_DIM_MAX

const char *bs_config_class_name(const struct bs_class *cls)
{
    return cls != NULL ? cls->name : "?";
}

int64_t bs_config_ff_inner(const struct bs_model_config *cfg)
{
    return (int64_t)((double)cfg->feed_forward.dim * cfg->feed_forward.mult);
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

static int parse_opt(struct bs_model_config *c, const struct bs_config_opt *o,
                     const struct bs_json *v, struct bs_err *err)
{
    char *field = (char *)c + o->off;
    int e = 0;
    switch (o->kind) {
    case BS_CONFIG_INT:
    case BS_CONFIG_INT_OR_NULL:
        return parse_int(v, o->key, o->kind == BS_CONFIG_INT_OR_NULL, (int64_t *)field, err);
    case BS_CONFIG_NUM:
        if (v->type != BS_JSON_NUMBER || !isfinite(v->number))
            return bs_err_set(err, BS_EINVAL, "\"%s\": expected a number", o->key);
        *(double *)field = v->number;
        return 0;
    case BS_CONFIG_BOOL:
        if (v->type != BS_JSON_BOOL)
            return bs_err_set(err, BS_EINVAL, "\"%s\": expected true or false", o->key);
        *(bool *)field = v->boolean;
        return 0;
    case BS_CONFIG_FF_ACT:
        if (parse_enum(v, ff_act_names, o->key, &e, err) != 0)
            return err->code;
        *(enum bs_ff_act *)field = (enum bs_ff_act)e;
        return 0;
    case BS_CONFIG_NORM_TYPE:
        if (parse_enum(v, norm_type_names, o->key, &e, err) != 0)
            return err->code;
        *(enum bs_norm_type *)field = (enum bs_norm_type)e;
        return 0;
    case BS_CONFIG_APPROX:
        if (parse_enum(v, approx_names, o->key, &e, err) != 0)
            return err->code;
        *(bool *)field = e != 0;
        return 0;
    case BS_CONFIG_ACT_FN:
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

/* "a, b, c": the names of the classes that match (all when stackable_only is
 * false), in table order. */
static void class_names(char *dst, size_t size, bool stackable_only)
{
    size_t off = 0;
    dst[0] = '\0';
    for (int i = 0; i < bs_class_count() && off < size; i++) {
        const struct bs_class *k = bs_class_get(i);
        if (!stackable_only || k->stackable)
            off += (size_t)snprintf(dst + off, size - off, "%s%s", off ? ", " : "", k->name);
    }
}

static int find_class(const struct bs_json *root, const struct bs_class **cls, struct bs_err *err)
{
    char names[512];
    const struct bs_json *v = bs_json_get(root, "_class_name");
    if (v == NULL)
        return bs_err_set(err, BS_EINVAL, "missing \"_class_name\"");
    if (v->type != BS_JSON_STRING)
        return bs_err_set(err, BS_EINVAL, "\"_class_name\": expected a string");
    if ((*cls = bs_class_find(v->string)) != NULL)
        return 0;
    class_names(names, sizeof(names), false);
    return bs_err_set(err, BS_EUNSUPP, "unknown \"_class_name\" \"%s\" (supported: %s)", v->string,
                      names);
}

/* The class's defaults (from its option rows) and the section's. */
static void set_defaults(struct bs_model_config *c, const struct bs_class *cls)
{
    memset(c, 0, sizeof(*c));
    c->cls = cls;
    c->num_blocks = 1;
    for (const struct bs_config_opt *o = cls->opts; o->key; o++) {
        char *field = (char *)c + o->off;
        switch (o->kind) {
        case BS_CONFIG_INT:
        case BS_CONFIG_INT_OR_NULL: *(int64_t *)field = (int64_t)o->def; break;
        case BS_CONFIG_NUM: *(double *)field = o->def; break;
        case BS_CONFIG_BOOL:
        case BS_CONFIG_APPROX: *(bool *)field = o->def != 0; break;
        case BS_CONFIG_FF_ACT: *(enum bs_ff_act *)field = (enum bs_ff_act)o->def; break;
        case BS_CONFIG_NORM_TYPE: *(enum bs_norm_type *)field = (enum bs_norm_type)o->def; break;
        case BS_CONFIG_ACT_FN: *(enum bs_act *)field = (enum bs_act)o->def; break;
        }
    }
}

static const struct bs_config_opt *find_opt(const struct bs_config_opt *opts, const char *key)
{
    for (const struct bs_config_opt *o = opts; o->key; o++)
        if (strcmp(o->key, key) == 0)
            return o;
    return NULL;
}

/* Members: diffusers' "_"-prefixed bookkeeping keys are ignored, "blockserve"
 * and "serving" are sections, anything else must be a constructor argument. */
static int parse_members(struct bs_model_config *c, const struct bs_json *root, struct bs_err *err)
{
    const struct bs_config_opt *opts = c->cls->opts;
    for (const struct bs_json *m = root->child; m; m = m->next) {
        if (m->key[0] == '_' || strcmp(m->key, "serving") == 0)
            continue;
        if (strcmp(m->key, "blockserve") == 0) {
            if (parse_section(c, m, err) != 0)
                return err->code;
            continue;
        }
        const struct bs_config_opt *o = find_opt(opts, m->key);
        if (o == NULL)
            return bs_err_set(err, BS_EINVAL, "unknown key \"%s\" for %s", m->key, c->cls->name);
        if (parse_opt(c, o, m, err) != 0)
            return err->code;
    }
    for (const struct bs_config_opt *o = opts; o->key; o++)
        if (o->required && bs_json_get(root, o->key) == NULL)
            return bs_err_set(err, BS_EINVAL, "missing required key \"%s\" for %s", o->key,
                              c->cls->name);
    return 0;
}

/* The "blockserve" section against the class: only stackable classes stack,
 * and a stack's prefix holds "{i}" (by default "transformer_blocks.{i}."). */
static int check_stack(struct bs_model_config *c, struct bs_err *err)
{
    char names[512];
    if (c->num_blocks > 1 && !c->cls->stackable) {
        class_names(names, sizeof(names), true);
        return bs_err_set(err, BS_EINVAL, "\"blockserve.num_blocks\": only %s models can be "
                          "stacked", names);
    }
    if (c->num_blocks > 1 && strstr(c->weights_prefix, "{i}") == NULL) {
        if (c->weights_prefix[0] != '\0')
            return bs_err_set(err, BS_EINVAL, "\"blockserve.weights_prefix\": a stack of %d "
                              "blocks needs \"{i}\" in the prefix", c->num_blocks);
        strcpy(c->weights_prefix, "transformer_blocks.{i}.");
    }
    return 0;
}

int bs_config_parse(struct bs_model_config *cfg, const char *text, size_t len, const char *name,
                    struct bs_err *err)
{
    bs_json_doc_t *doc = NULL;
    const struct bs_class *cls = NULL;
    int rc = bs_json_parse(&doc, text, len, 16, err);
    if (rc != 0)
        return bs_err_wrap(err, "%s", name);
    const struct bs_json *root = bs_json_doc_root(doc);
    memset(cfg, 0, sizeof(*cfg));
    if (root->type != BS_JSON_OBJECT)
        rc = bs_err_set(err, BS_EINVAL, "expected a JSON object");
    else if ((rc = find_class(root, &cls, err)) == 0) {
        set_defaults(cfg, cls);
        if ((rc = parse_members(cfg, root, err)) == 0 && cls->validate != NULL)
            rc = cls->validate(cfg, err);
        if (rc == 0)
            rc = check_stack(cfg, err);
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
