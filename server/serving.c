/* A model's serving settings: the "serving" object of its config.json or
 * serving.json (see serving.h). */
#include "serving.h"

#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "codec.h"

#define MAX_QUEUE_SIZE 1000000
#define MAX_TIMEOUT_US (INT64_MAX / 1000)

static int serving_int(const struct bs_json *v, const char *key, int64_t lo, int64_t hi,
                       int64_t *out, struct bs_err *err)
{
    if (v->type != BS_JSON_NUMBER || !v->is_integer || v->integer < lo || v->integer > hi)
        return bs_err_set(err, BS_EINVAL, "serving.%s: expected an integer in [%lld, %lld]", key,
                          (long long)lo, (long long)hi);
    *out = v->integer;
    return 0;
}

/* ---- queue policies ------------------------------------------------------ */

/* One field of a ModelQueuePolicy object; path names the object ("default_queue_policy",
 * "priority_queue_policy.2"). Sets the field's BS_POLICY_* bit in *given. */
static int policy_member(struct bs_queue_policy *p, const struct bs_json *m, const char *path,
                         unsigned *given, struct bs_err *err)
{
    char key[128];
    int64_t v = 0;
    int rc = 0;
    snprintf(key, sizeof(key), "%s.%s", path, m->key);
    if (strcmp(m->key, "timeout_action") == 0) {
        const char *a = m->type == BS_JSON_STRING ? m->string : "";
        if (strcmp(a, "REJECT") != 0 && strcmp(a, "DELAY") != 0)
            return bs_err_set(err, BS_EINVAL, "serving.%s: expected \"REJECT\" or \"DELAY\"", key);
        p->timeout_action = a[0] == 'D' ? BS_TIMEOUT_DELAY : BS_TIMEOUT_REJECT;
        *given |= BS_POLICY_ACTION;
    } else if (strcmp(m->key, "default_timeout_microseconds") == 0) {
        if ((rc = serving_int(m, key, 0, MAX_TIMEOUT_US, &v, err)) == 0)
            p->default_timeout_us = v;
        *given |= BS_POLICY_TIMEOUT;
    } else if (strcmp(m->key, "allow_timeout_override") == 0) {
        if (m->type != BS_JSON_BOOL)
            return bs_err_set(err, BS_EINVAL, "serving.%s: expected true or false", key);
        p->allow_timeout_override = m->boolean;
        *given |= BS_POLICY_OVERRIDE;
    } else if (strcmp(m->key, "max_queue_size") == 0) {
        if ((rc = serving_int(m, key, 0, MAX_QUEUE_SIZE, &v, err)) == 0)
            p->max_queue_size = (int)v;
        *given |= BS_POLICY_QUEUE_SIZE;
    } else {
        return bs_err_set(err, BS_EINVAL,
                          "serving.%s: unknown key \"%s\" (known: timeout_action, "
                          "default_timeout_microseconds, allow_timeout_override, max_queue_size)",
                          path, m->key);
    }
    return rc;
}

static int policy_parse(struct bs_queue_policy *p, const struct bs_json *obj, const char *path,
                        unsigned *given, struct bs_err *err)
{
    if (obj->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EINVAL, "serving.%s: expected an object (a queue policy)", path);
    for (const struct bs_json *m = obj->child; m; m = m->next)
        if (policy_member(p, m, path, given, err) != 0)
            return err->code;
    return 0;
}

static struct bs_queue_policy default_policy(const struct bs_serving_config *c)
{
    return (struct bs_queue_policy){.timeout_action = c->timeout_action,
                                    .default_timeout_us = c->default_timeout_us,
                                    .allow_timeout_override = !c->timeout_override_off,
                                    .max_queue_size = c->max_queue_size};
}

/* "default_queue_policy": over the default policy's fields; *given says which it names. */
static int default_policy_parse(struct bs_serving_config *c, const struct bs_json *obj,
                                unsigned *given, struct bs_err *err)
{
    struct bs_queue_policy p = default_policy(c);
    int rc = policy_parse(&p, obj, "default_queue_policy", given, err);
    if (rc != 0)
        return rc;
    c->timeout_action = p.timeout_action;
    c->default_timeout_us = p.default_timeout_us;
    c->timeout_override_off = !p.allow_timeout_override;
    c->max_queue_size = p.max_queue_size;
    return 0;
}

/* A priority_queue_policy key: a level number, decimal without sign or
 * leading zeros; 0 when it is none. Its range is bs_serving_check's. */
static int level_key(const char *key)
{
    long v = 0;
    if (key[0] < '1' || key[0] > '9' || strlen(key) > 6)
        return 0;
    for (const char *p = key; *p; p++) {
        if (*p < '0' || *p > '9')
            return 0;
        v = v * 10 + (*p - '0');
    }
    return (int)v;
}

/* "priority_queue_policy": level number (a string) -> queue policy; replaces
 * every entry. */
static int level_policies_parse(struct bs_serving_config *c, const struct bs_json *obj,
                                struct bs_err *err)
{
    char path[64];
    if (obj->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EINVAL,
                          "serving.priority_queue_policy: expected an object mapping a level "
                          "(\"1\", \"2\", ...) to a queue policy");
    memset(c->level_policy, 0, sizeof(c->level_policy));
    for (const struct bs_json *m = obj->child; m; m = m->next) {
        int level = level_key(m->key);
        if (level < 1 || level > BS_MAX_PRIORITY_LEVELS)
            return bs_err_set(err, BS_EINVAL,
                              "serving.priority_queue_policy: key \"%.32s\" is not a priority "
                              "level (an integer in [1, priority_levels], at most %d)",
                              m->key, BS_MAX_PRIORITY_LEVELS);
        struct bs_level_policy *lp = &c->level_policy[level - 1];
        if (lp->given != 0)
            return bs_err_set(err, BS_EINVAL, "serving.priority_queue_policy: level %d given twice",
                              level);
        snprintf(path, sizeof(path), "priority_queue_policy.%d", level);
        lp->given = BS_POLICY_GIVEN;
        if (policy_parse(&lp->p, m, path, &lp->given, err) != 0)
            return err->code;
    }
    return 0;
}

int bs_serving_check(const struct bs_serving_config *c, struct bs_err *err)
{
    int n = c->priority_levels, d = c->default_priority_level;
    if (c->max_queue_size < 0 || c->default_timeout_us < 0)
        return bs_err_set(err, BS_EINVAL,
                          "serving: negative max_queue_size or default_timeout_microseconds");
    if (n < 0 || n > BS_MAX_PRIORITY_LEVELS)
        return bs_err_set(err, BS_EINVAL, "serving.priority_levels: expected an integer in [0, %d]",
                          BS_MAX_PRIORITY_LEVELS);
    if (n == 0 && d != 0)
        return bs_err_set(err, BS_EINVAL,
                          "serving.default_priority_level %d: the model has no priority levels "
                          "(set priority_levels)",
                          d);
    if (n > 0 && d == 0)
        return bs_err_set(err, BS_EINVAL,
                          "serving.default_priority_level: required with priority_levels %d "
                          "(a level in [1, %d])",
                          n, n);
    if (n > 0 && (d < 1 || d > n))
        return bs_err_set(err, BS_EINVAL,
                          "serving.default_priority_level %d: not a level in [1, %d] "
                          "(priority_levels)",
                          d, n);
    for (int i = 0; i < BS_MAX_PRIORITY_LEVELS; i++) {
        const struct bs_level_policy *lp = &c->level_policy[i];
        if (lp->given == 0)
            continue;
        if (n == 0)
            return bs_err_set(err, BS_EINVAL,
                              "serving.priority_queue_policy: the model has no priority levels "
                              "(set priority_levels)");
        if (i + 1 > n)
            return bs_err_set(err, BS_EINVAL,
                              "serving.priority_queue_policy: level %d is not in [1, %d] "
                              "(priority_levels)",
                              i + 1, n);
        if (lp->p.max_queue_size < 0 || lp->p.default_timeout_us < 0)
            return bs_err_set(err, BS_EINVAL,
                              "serving.priority_queue_policy.%d: negative max_queue_size or "
                              "default_timeout_microseconds",
                              i + 1);
    }
    return 0;
}

struct bs_queue_policy bs_serving_policy(const struct bs_serving_config *c, int level)
{
    struct bs_queue_policy p = default_policy(c);
    if (level < 1 || level > c->priority_levels || level > BS_MAX_PRIORITY_LEVELS)
        return p;
    const struct bs_level_policy *lp = &c->level_policy[level - 1];
    if (lp->given & BS_POLICY_ACTION)
        p.timeout_action = lp->p.timeout_action;
    if (lp->given & BS_POLICY_TIMEOUT)
        p.default_timeout_us = lp->p.default_timeout_us;
    if (lp->given & BS_POLICY_OVERRIDE)
        p.allow_timeout_override = lp->p.allow_timeout_override;
    if (lp->given & BS_POLICY_QUEUE_SIZE)
        p.max_queue_size = lp->p.max_queue_size;
    return p;
}

/* ---- the serving object -------------------------------------------------- */

/* What one object gave of the default queue policy, at its top level (the
 * older keys max_queue_size, default_timeout_microseconds) and in
 * default_queue_policy: a field given in both is an error. */
struct given {
    unsigned top, dflt;
};

/* The keys of the queue policies and priority levels; *known is false when m
 * is none of them. */
static int queue_member(struct bs_serving_config *c, const struct bs_json *m, struct given *g,
                        bool *known, struct bs_err *err)
{
    int64_t v = 0;
    int rc = 0;
    *known = true;
    if (strcmp(m->key, "max_queue_size") == 0) {
        if ((rc = serving_int(m, m->key, 1, MAX_QUEUE_SIZE, &v, err)) == 0)
            c->max_queue_size = (int)v;
        g->top |= BS_POLICY_QUEUE_SIZE;
    } else if (strcmp(m->key, "default_timeout_microseconds") == 0) {
        if ((rc = serving_int(m, m->key, 0, MAX_TIMEOUT_US, &v, err)) == 0)
            c->default_timeout_us = v;
        g->top |= BS_POLICY_TIMEOUT;
    } else if (strcmp(m->key, "default_queue_policy") == 0) {
        rc = default_policy_parse(c, m, &g->dflt, err);
    } else if (strcmp(m->key, "priority_queue_policy") == 0) {
        rc = level_policies_parse(c, m, err);
    } else if (strcmp(m->key, "priority_levels") == 0) {
        if ((rc = serving_int(m, m->key, 0, BS_MAX_PRIORITY_LEVELS, &v, err)) == 0)
            c->priority_levels = (int)v;
    } else if (strcmp(m->key, "default_priority_level") == 0) {
        if ((rc = serving_int(m, m->key, 0, INT32_MAX, &v, err)) == 0)
            c->default_priority_level = (int)v;
    } else {
        *known = false;
    }
    return rc;
}

static int serving_member(struct bs_serving_config *c, const struct bs_json *m, struct given *g,
                          struct bs_err *err)
{
    int64_t v = 0;
    bool known;
    int rc = queue_member(c, m, g, &known, err);
    if (known)
        return rc;
    if (strcmp(m->key, "max_batch_size") == 0) {
        if ((rc = serving_int(m, m->key, 1, 1024, &v, err)) == 0)
            c->max_batch_size = (int)v;
    } else if (strcmp(m->key, "max_queue_delay_microseconds") == 0) {
        if ((rc = serving_int(m, m->key, 0, 60000000, &v, err)) == 0)
            c->max_queue_delay_us = v;
    } else if (strcmp(m->key, "preferred_batch_size") == 0) {
        if (m->type != BS_JSON_ARRAY || m->len > BS_MAX_PREFERRED)
            return bs_err_set(err, BS_EINVAL,
                              "serving.preferred_batch_size: expected an array "
                              "of at most %d integers",
                              BS_MAX_PREFERRED);
        c->n_preferred = 0;
        for (const struct bs_json *e = m->child; e && rc == 0; e = e->next)
            if ((rc = serving_int(e, m->key, 1, 1024, &v, err)) == 0)
                c->preferred_batch_size[c->n_preferred++] = (int)v;
    } else if (strcmp(m->key, "device") == 0) {
        if (m->type != BS_JSON_STRING ||
            (strcmp(m->string, "auto") && strcmp(m->string, "cpu") && strcmp(m->string, "cuda")))
            return bs_err_set(err, BS_EINVAL,
                              "serving.device: expected \"auto\", \"cpu\" or \"cuda\"");
        if (strcmp(m->string, "cuda") == 0)
            return bs_err_set(err, BS_EUNSUPP,
                              "serving.device \"cuda\": this server runs on the "
                              "CPU backend");
    } else if (strcmp(m->key, "dtype") == 0) {
        /* what the backend can compute is checked when the model loads */
        const char *name = m->type == BS_JSON_STRING ? m->string : NULL;
        if (name != NULL && strcmp(name, "float32") == 0)
            name = "fp32";
        if (name != NULL && strcmp(name, "bfloat16") == 0)
            name = "bf16";
        if (name != NULL && strcmp(name, "float16") == 0)
            name = "fp16";
        if (name == NULL || bs_compute_dtype_parse(name, &c->dtype, err) != 0)
            return bs_err_set(err, BS_EINVAL,
                              "serving.dtype: expected \"fp32\", \"bf16\" or \"fp16\"");
        c->has_dtype = true;
    } else if (strcmp(m->key, "output_datatype") == 0) {
        if (m->type != BS_JSON_STRING || bs_codec_output_dtype(m->string, &c->out_dtype) != 0)
            return bs_err_set(err, BS_EINVAL,
                              "serving.output_datatype: expected \"FP32\", \"BF16\" or \"FP16\"");
    } else if (strcmp(m->key, "ragged_batching") == 0) {
        if (m->type != BS_JSON_BOOL)
            return bs_err_set(err, BS_EINVAL, "serving.ragged_batching: expected true or false");
        c->ragged_off = !m->boolean;
    } else if (strcmp(m->key, "max_sequence_idle_microseconds") == 0) {
        if ((rc = serving_int(m, m->key, 1, INT64_MAX / 1000, &v, err)) == 0)
            c->max_sequence_idle_us = v;
    } else if (strcmp(m->key, "block_cache_bytes") == 0) {
        if ((rc = serving_int(m, m->key, 0, INT64_MAX / 2, &v, err)) == 0)
            c->block_cache_bytes = v;
    } else if (strcmp(m->key, "max_batch_tokens") == 0) {
        if ((rc = serving_int(m, m->key, 0, INT64_MAX / 2, &v, err)) == 0)
            c->max_batch_tokens = v;
    } else if (strcmp(m->key, "version_policy") == 0) {
        /* the repository reads it (server/repository.c: which versions serve) */
    } else {
        return bs_err_set(err, BS_EINVAL,
                          "serving: unknown key \"%s\" (known: max_batch_size, "
                          "max_queue_delay_microseconds, preferred_batch_size, max_queue_size, "
                          "default_timeout_microseconds, priority_levels, "
                          "default_priority_level, default_queue_policy, priority_queue_policy, "
                          "device, dtype, output_datatype, ragged_batching, max_batch_tokens, "
                          "max_sequence_idle_microseconds, block_cache_bytes, version_policy)",
                          m->key);
    }
    return rc;
}

int bs_serving_parse_json(struct bs_serving_config *c, const struct bs_json *obj,
                          struct bs_err *err)
{
    struct given g = {0, 0};
    if (obj->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EINVAL, "serving: expected an object");
    for (const struct bs_json *m = obj->child; m; m = m->next)
        if (serving_member(c, m, &g, err) != 0)
            return err->code;
    if (g.top & g.dflt & BS_POLICY_QUEUE_SIZE)
        return bs_err_set(err, BS_EINVAL,
                          "serving.default_queue_policy.max_queue_size: also given as "
                          "serving.max_queue_size (give one)");
    if (g.top & g.dflt & BS_POLICY_TIMEOUT)
        return bs_err_set(err, BS_EINVAL,
                          "serving.default_queue_policy.default_timeout_microseconds: also given "
                          "as serving.default_timeout_microseconds (give one)");
    for (int i = 0; i < c->n_preferred; i++)
        if (c->preferred_batch_size[i] > c->max_batch_size)
            return bs_err_set(err, BS_EINVAL,
                              "serving.preferred_batch_size %d exceeds "
                              "max_batch_size %d",
                              c->preferred_batch_size[i], c->max_batch_size);
    return bs_serving_check(c, err);
}

int bs_serving_parse(struct bs_serving_config *cfg, const char *json, size_t len,
                     struct bs_err *err)
{
    bs_json_doc_t *doc;
    if (bs_json_parse(&doc, json, len, 8, err) != 0)
        return err->code;
    int rc = bs_serving_parse_json(cfg, bs_json_doc_root(doc), err);
    bs_json_doc_free(doc);
    return rc;
}
