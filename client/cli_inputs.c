/* Request inputs from files, shapes or model metadata. */
#include "cli_inputs.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensor.h"
#include "ctensor.h"

bool cli_inputs_need_server(const struct cli *a)
{
    if (a->n_inputs == 0 && a->n_shapes == 0)
        return true;
    for (int i = 0; i < a->n_shapes; i++)
        if (strchr(a->shapes[i], ':') == NULL)
            return true;
    return false;
}

void cli_inputs_free(struct cli_inputs *in)
{
    for (int i = 0; i < in->n; i++)
        bs_ct_free(&in->t[i]);
    in->n = 0;
}

static int add(struct cli_inputs *in, struct bs_ctensor *t, struct bs_client_err *err)
{
    for (int i = 0; i < in->n; i++)
        if (strcmp(in->t[i].name, t->name) == 0) {
            int rc = bs_client_err_set(err, BS_EINVAL, "input '%s' is given twice", t->name);
            bs_ct_free(t);
            return rc;
        }
    if (in->n == CLI_MAX_TENSORS) {
        bs_ct_free(t);
        return bs_client_err_set(err, BS_EINVAL, "too many inputs (at most %d)", CLI_MAX_TENSORS);
    }
    in->t[in->n++] = *t;
    return 0;
}

/* --input NAME=FILE or --input FILE.safetensors. */
static int load_file(const char *spec, struct cli_inputs *in, struct bs_client_err *err)
{
    const char *eq = strchr(spec, '=');
    char name[BS_CT_MAX_NAME] = "";
    const char *path = spec;
    if (eq != NULL) {
        if ((size_t)(eq - spec) >= sizeof(name) || eq == spec)
            return bs_client_err_set(err, BS_EINVAL, "--input %s: bad NAME", spec);
        memcpy(name, spec, (size_t)(eq - spec));
        name[eq - spec] = '\0';
        path = eq + 1;
    }
    struct bs_ctensor t[BS_CT_MAX_FILE_TENSORS];
    struct bs_err e = {0};
    int n;
    if (eq == NULL && strstr(path, ".safetensors") == NULL)
        return bs_client_err_set(err, BS_EINVAL,
                                 "--input %s: give the input's name, --input NAME=%s", spec, spec);
    if (bs_ct_read_file(path, name, t, BS_CT_MAX_FILE_TENSORS, &n, &e) != 0)
        return bs_client_err_set(err, e.code, "--input %s", e.msg);
    int rc = 0, pick = -1;
    if (name[0] != '\0' && n > 1) {
        for (int i = 0; i < n; i++)
            if (strcmp(t[i].name, name) == 0)
                pick = i;
        if (pick < 0)
            rc = bs_client_err_set(err, BS_ENOTFOUND, "--input %s: %s holds no tensor '%s'", spec,
                                   path, name);
    } else if (name[0] != '\0') {
        pick = 0;
        snprintf(t[0].name, sizeof(t[0].name), "%s", name);
    }
    for (int i = 0; i < n; i++) {
        if (rc == 0 && (pick < 0 || pick == i))
            rc = add(in, &t[i], err);
        else
            bs_ct_free(&t[i]);
    }
    return rc;
}

static uint64_t next_u64(uint64_t *s)
{
    uint64_t x = *s += 0x9e3779b97f4a7c15ull; /* splitmix64 */
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Uniform floats in [-1, 1), integers in [0, 10), random booleans. */
static int fill_random(struct bs_ctensor *t, uint64_t *seed, struct bs_client_err *err)
{
    struct bs_err e = {0};
    if (bs_ct_alloc(t, &e) != 0)
        return bs_client_err_set(err, e.code, "input '%s': %s", t->name, e.msg);
    int64_t n = bs_ct_nelements(t);
    for (int64_t i = 0; i < n; i++) {
        uint64_t r = next_u64(seed);
        float f = (float)((double)(r >> 11) * 0x1.0p-53 * 2.0 - 1.0);
        if (!strcmp(t->datatype, "FP32")) {
            ((float *)t->data)[i] = f;
        } else if (!strcmp(t->datatype, "FP16") || !strcmp(t->datatype, "BF16")) {
            ((uint16_t *)t->data)[i] =
                !strcmp(t->datatype, "FP16") ? bs_f32_to_fp16(f) : bs_f32_to_bf16(f);
        } else if (!strcmp(t->datatype, "INT64")) {
            ((int64_t *)t->data)[i] = (int64_t)(r % 10);
        } else if (!strcmp(t->datatype, "BOOL")) {
            ((uint8_t *)t->data)[i] = (uint8_t)(r & 1);
        } else {
            return bs_client_err_set(err, BS_EUNSUPP, "input '%s': no random data for %s", t->name,
                                     t->datatype);
        }
    }
    return 0;
}

static const Inference__ModelMetadataResponse__TensorMetadata *
meta_input(const Inference__ModelMetadataResponse *m, const char *name)
{
    for (size_t i = 0; m != NULL && i < m->n_inputs; i++)
        if (m->inputs[i]->name && strcmp(m->inputs[i]->name, name) == 0)
            return m->inputs[i];
    return NULL;
}

/* --shape NAME=d1,d2,...[:DATATYPE]. */
static int parse_shape(const char *spec, const Inference__ModelMetadataResponse *m,
                       struct bs_ctensor *t, struct bs_client_err *err)
{
    memset(t, 0, sizeof(*t));
    const char *eq = strchr(spec, '='), *colon = strchr(spec, ':');
    if (eq == NULL || eq == spec || (size_t)(eq - spec) >= sizeof(t->name))
        return bs_client_err_set(err, BS_EINVAL, "--shape %s: expected NAME=d1,d2,...[:DATATYPE]",
                                 spec);
    memcpy(t->name, spec, (size_t)(eq - spec));
    const char *p = eq + 1;
    while (*p && *p != ':') {
        char *end;
        long long d = strtoll(p, &end, 10);
        if (end == p || d < 0 || t->n_dims == BS_CT_MAX_DIMS ||
            (*end && *end != ',' && *end != ':'))
            return bs_client_err_set(err, BS_EINVAL,
                                     "--shape %s: expected NAME=d1,d2,...[:DATATYPE]", spec);
        t->shape[t->n_dims++] = d;
        p = *end == ',' ? end + 1 : end;
    }
    const Inference__ModelMetadataResponse__TensorMetadata *mi = meta_input(m, t->name);
    const char *dt = colon ? colon + 1 : mi ? mi->datatype : NULL;
    if (dt == NULL)
        return bs_client_err_set(err, BS_ENOTFOUND, "--shape %s: the model has no input '%s'", spec,
                                 t->name);
    snprintf(t->datatype, sizeof(t->datatype), "%s", dt);
    if (bs_ct_datatype_size(t->datatype) == 0)
        return bs_client_err_set(err, BS_EINVAL, "--shape %s: unknown datatype '%s'", spec, dt);
    return 0;
}

#define MAX_OPTIONAL 16

/* The names of a model's optional inputs (ModelConfig's, or HTTP's /config). */
struct optional_inputs {
    char names[MAX_OPTIONAL][BS_CT_MAX_NAME];
    int n;
};

static bool is_optional(const struct optional_inputs *opt, const char *name)
{
    for (int i = 0; i < opt->n; i++)
        if (!strcmp(opt->names[i], name))
            return true;
    return false;
}

/* Random tensors for every required input of m, variable dims set to 1. */
static int from_metadata(const Inference__ModelMetadataResponse *m,
                         const struct optional_inputs *cfg, uint64_t *seed, struct cli_inputs *in,
                         struct bs_client_err *err)
{
    for (size_t i = 0; i < m->n_inputs; i++) {
        const Inference__ModelMetadataResponse__TensorMetadata *mi = m->inputs[i];
        if (is_optional(cfg, mi->name))
            continue;
        struct bs_ctensor t = {0};
        snprintf(t.name, sizeof(t.name), "%s", mi->name);
        snprintf(t.datatype, sizeof(t.datatype), "%s", mi->datatype);
        if (mi->n_shape > BS_CT_MAX_DIMS)
            return bs_client_err_set(err, BS_EINVAL, "input '%s': %zu dims", t.name, mi->n_shape);
        t.n_dims = (int)mi->n_shape;
        for (int k = 0; k < t.n_dims; k++)
            t.shape[k] = mi->shape[k] < 0 ? 1 : mi->shape[k];
        int rc = fill_random(&t, seed, err);
        if (rc == 0)
            rc = add(in, &t, err);
        if (rc != 0) {
            bs_ct_free(&t);
            return rc;
        }
    }
    return 0;
}

int cli_model_metadata(const struct cli *a, const struct cli_conn *conn,
                       Inference__ModelMetadataResponse **m, struct bs_client_err *err)
{
    if (conn == NULL || (conn->grpc == NULL && conn->http == NULL))
        return bs_client_err_set(err, BS_EINVAL,
                                 "the inputs need the model's metadata: give a server (-u)");
    if (conn->http)
        return bs_http_model_metadata(conn->http, a->model, m, err);
    return bs_client_model_metadata(conn->grpc, a->model, m, err);
}

/* The optional inputs: without them (no config) every input counts as required. */
static void fetch_optional(const struct cli *a, const struct cli_conn *conn,
                           struct optional_inputs *opt)
{
    struct bs_client_err e = {0};
    Inference__ModelConfigResponse *cfg = NULL;
    opt->n = 0;
    if (conn->http) {
        if (bs_http_optional_inputs(conn->http, a->model, opt->names, MAX_OPTIONAL, &opt->n, &e))
            opt->n = 0;
        return;
    }
    if (bs_client_model_config(conn->grpc, a->model, &cfg, &e) != 0)
        return;
    for (size_t i = 0; cfg->config && i < cfg->config->n_input && opt->n < MAX_OPTIONAL; i++)
        if (cfg->config->input[i]->name && cfg->config->input[i]->optional)
            snprintf(opt->names[opt->n++], BS_CT_MAX_NAME, "%s", cfg->config->input[i]->name);
    bs_client_msg_free(cfg);
}

int cli_inputs_load(const struct cli *a, const struct cli_conn *conn, struct cli_inputs *in,
                    struct bs_client_err *err)
{
    Inference__ModelMetadataResponse *m = NULL;
    struct optional_inputs cfg = {0};
    uint64_t seed = a->seed;
    int rc = 0;
    memset(in, 0, sizeof(*in));
    if (cli_inputs_need_server(a))
        rc = cli_model_metadata(a, conn, &m, err);
    if (rc == 0 && m != NULL)
        fetch_optional(a, conn, &cfg);
    for (int i = 0; rc == 0 && i < a->n_inputs; i++)
        rc = load_file(a->inputs[i], in, err);
    for (int i = 0; rc == 0 && i < a->n_shapes; i++) {
        struct bs_ctensor t;
        rc = parse_shape(a->shapes[i], m, &t, err);
        if (rc == 0)
            rc = fill_random(&t, &seed, err);
        if (rc == 0)
            rc = add(in, &t, err);
        else
            bs_ct_free(&t);
    }
    if (rc == 0 && a->n_inputs == 0 && a->n_shapes == 0)
        rc = from_metadata(m, &cfg, &seed, in, err);
    bs_client_msg_free(m);
    if (rc != 0)
        cli_inputs_free(in);
    return rc;
}
