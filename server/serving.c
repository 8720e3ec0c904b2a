/* A model's serving settings: the "serving" object of its config.json or
 * serving.json (see serving.h). */
#include "serving.h"

#include <string.h>

#include "backend.h"

static int serving_int(const struct bs_json *v, const char *key, int64_t lo, int64_t hi,
                       int64_t *out, struct bs_err *err)
{
    if (v->type != BS_JSON_NUMBER || !v->is_integer || v->integer < lo || v->integer > hi)
        return bs_err_set(err, BS_EINVAL, "serving.%s: expected an integer in [%lld, %lld]", key,
                          (long long)lo, (long long)hi);
    *out = v->integer;
    return 0;
}

static int serving_member(struct bs_serving_config *c, const struct bs_json *m, struct bs_err *err)
{
    int64_t v = 0;
    int rc = 0;
    if (strcmp(m->key, "max_batch_size") == 0) {
        if ((rc = serving_int(m, m->key, 1, 1024, &v, err)) == 0)
            c->max_batch_size = (int)v;
    } else if (strcmp(m->key, "max_queue_delay_microseconds") == 0) {
        if ((rc = serving_int(m, m->key, 0, 60000000, &v, err)) == 0)
            c->max_queue_delay_us = v;
    } else if (strcmp(m->key, "max_queue_size") == 0) {
        if ((rc = serving_int(m, m->key, 1, 1000000, &v, err)) == 0)
            c->max_queue_size = (int)v;
    } else if (strcmp(m->key, "default_timeout_microseconds") == 0) {
        if ((rc = serving_int(m, m->key, 0, INT64_MAX / 1000, &v, err)) == 0)
            c->default_timeout_us = v;
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
    } else if (strcmp(m->key, "ragged_batching") == 0) {
        if (m->type != BS_JSON_BOOL)
            return bs_err_set(err, BS_EINVAL, "serving.ragged_batching: expected true or false");
        c->ragged_off = !m->boolean;
    } else if (strcmp(m->key, "max_batch_tokens") == 0) {
        if ((rc = serving_int(m, m->key, 0, INT64_MAX / 2, &v, err)) == 0)
            c->max_batch_tokens = v;
    } else {
        return bs_err_set(err, BS_EINVAL,
                          "serving: unknown key \"%s\" (known: max_batch_size, "
                          "max_queue_delay_microseconds, preferred_batch_size, max_queue_size, "
                          "default_timeout_microseconds, device, dtype, ragged_batching, "
                          "max_batch_tokens)",
                          m->key);
    }
    return rc;
}

int bs_serving_parse_json(struct bs_serving_config *c, const struct bs_json *obj,
                          struct bs_err *err)
{
    if (obj->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EINVAL, "serving: expected an object");
    for (const struct bs_json *m = obj->child; m; m = m->next)
        if (serving_member(c, m, err) != 0)
            return err->code;
    for (int i = 0; i < c->n_preferred; i++)
        if (c->preferred_batch_size[i] > c->max_batch_size)
            return bs_err_set(err, BS_EINVAL,
                              "serving.preferred_batch_size %d exceeds "
                              "max_batch_size %d",
                              c->preferred_batch_size[i], c->max_batch_size);
    return 0;
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
