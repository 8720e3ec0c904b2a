/* The KServe v2 HTTP inference request and answer (http_codec.h).
 *
 * Every input becomes raw contents (raw_input_contents), whether it came as
 * binary data (pointed at in the body, no copy) or as JSON `data` (converted
 * to its datatype's little-endian bytes here): the gRPC codec takes either
 * raw contents for all inputs or typed contents for all, and an HTTP request
 * may mix both kinds. JSON data may be flat or nested (row-major); its
 * number of values must match the shape (checked here, so that the message
 * speaks of values rather than bytes); BF16 only as binary data (Triton
 * too). Request, input and output parameters are passed through as
 * InferParameters (bool, integer: int64_param, other numbers: double_param,
 * string) but for HTTP's own: binary_data_output, binary_data_size,
 * binary_data. shared_memory_* are passed on (the codec reads them) and also
 * kept in hi; an input in shared memory has no raw_input_contents entry (the
 * entries are those of the other inputs, in order, as the codec expects). */
#include "http_codec.h"

#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#include "grpc_service.pb-c.h"

typedef Inference__ModelInferRequest req_msg_t;
typedef Inference__ModelInferRequest__InferInputTensor input_msg_t;
typedef Inference__ModelInferRequest__InferRequestedOutputTensor output_msg_t;
typedef Inference__ModelInferRequest__ParametersEntry param_entry_t;

#define JSON_MAX_DEPTH 16
#define SHOW_MAX       64

struct chunk {
    struct chunk *next;
    _Alignas(16) unsigned char mem[];
};

/* A zeroed allocation that hi owns. */
static void *hc_alloc(struct bs_http_infer *hi, size_t n)
{
    struct chunk *c = calloc(1, sizeof(*c) + (n ? n : 1));
    if (c == NULL)
        return NULL;
    c->next = hi->arena;
    hi->arena = c;
    return c->mem;
}

void bs_http_infer_free(struct bs_http_infer *hi)
{
    if (hi == NULL)
        return;
    for (struct chunk *c = hi->arena, *next; c != NULL; c = next) {
        next = c->next;
        free(c);
    }
    bs_json_doc_free(hi->doc);
    memset(hi, 0, sizeof(*hi));
}

static const char *show(char *buf, const char *s)
{
    size_t n = strnlen(s, SHOW_MAX + 1);
    bool cut = n > SHOW_MAX;
    if (cut)
        for (n = SHOW_MAX; n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80;)
            n--;
    for (size_t i = 0; i < n; i++)
        buf[i] = (unsigned char)s[i] < 0x20 || s[i] == 0x7f ? '?' : s[i];
    memcpy(buf + n, cut ? "..." : "", cut ? 4 : 1);
    return buf;
}

#define OOM(err) bs_err_set(err, BS_ENOMEM, "out of memory")

/* ---- parameters ---------------------------------------------------------------- */

static int make_param(struct bs_http_infer *hi, const struct bs_json *v, const char *where,
                      Inference__InferParameter **out, struct bs_err *err)
{
    Inference__InferParameter *p = hc_alloc(hi, sizeof(*p));
    char kb[SHOW_MAX + 4];
    if (p == NULL)
        return OOM(err);
    *p = (Inference__InferParameter)INFERENCE__INFER_PARAMETER__INIT;
    switch (v->type) {
    case BS_JSON_BOOL:
        p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM;
        p->bool_param = v->boolean;
        break;
    case BS_JSON_NUMBER:
        if (v->is_integer) {
            p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
            p->int64_param = v->integer;
        } else {
            p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_DOUBLE_PARAM;
            p->double_param = v->number;
        }
        break;
    case BS_JSON_STRING:
        p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
        p->string_param = (char *)v->string;
        break;
    default:
        return bs_err_set(err, BS_EINVAL, "%sparameter '%s' must be a bool, a number or a string",
                          where, show(kb, v->key));
    }
    *out = p;
    return 0;
}

/* A non-negative integer parameter (binary_data_size, shared_memory_*). */
static int uint_param(const struct bs_json *v, const char *where, uint64_t *out, struct bs_err *err)
{
    if (v->type != BS_JSON_NUMBER || !v->is_integer || v->integer < 0)
        return bs_err_set(err, BS_EINVAL, "%sparameter '%s' must be an integer >= 0", where,
                          v->key);
    *out = (uint64_t)v->integer;
    return 0;
}

/* shared_memory_region, _offset, _byte_size: 1 when key is none of them. */
static int shm_param(const struct bs_json *v, const char *where, struct bs_shm_ref *ref,
                     struct bs_err *err)
{
    if (strcmp(v->key, "shared_memory_region") == 0) {
        if (v->type != BS_JSON_STRING || v->len == 0 || v->len >= BS_SHM_NAME_MAX)
            return bs_err_set(err, BS_EINVAL,
                              "%sparameter 'shared_memory_region' must be a name of 1 to %d bytes",
                              where, BS_SHM_NAME_MAX - 1);
        memcpy(ref->region, v->string, v->len + 1);
        ref->given = true;
        return 0;
    }
    if (strcmp(v->key, "shared_memory_offset") == 0)
        return uint_param(v, where, &ref->offset, err);
    if (strcmp(v->key, "shared_memory_byte_size") == 0)
        return uint_param(v, where, &ref->byte_size, err);
    return 1;
}

static int request_params(struct bs_http_infer *hi, const struct bs_json *obj, req_msg_t *m,
                          struct bs_err *err)
{
    if (obj == NULL)
        return 0;
    if (obj->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EINVAL, "'parameters' must be an object");
    m->parameters = hc_alloc(hi, obj->len * sizeof(*m->parameters));
    if (m->parameters == NULL)
        return OOM(err);
    for (const struct bs_json *v = obj->child; v != NULL; v = v->next) {
        if (strcmp(v->key, "binary_data_output") == 0) {
            if (v->type != BS_JSON_BOOL)
                return bs_err_set(err, BS_EINVAL, "parameter 'binary_data_output' must be a bool");
            hi->binary_output = v->boolean;
            continue;
        }
        param_entry_t *e = hc_alloc(hi, sizeof(*e));
        if (e == NULL)
            return OOM(err);
        *e = (param_entry_t)INFERENCE__MODEL_INFER_REQUEST__PARAMETERS_ENTRY__INIT;
        e->key = (char *)v->key;
        int rc = make_param(hi, v, "", &e->value, err);
        if (rc != 0)
            return rc;
        m->parameters[m->n_parameters++] = e;
    }
    return 0;
}

/* ---- JSON data ------------------------------------------------------------------ */

enum kind { K_F32, K_F16, K_I64, K_BOOL, K_BINARY_ONLY, K_UNKNOWN };

static enum kind kind_of(const char *dt)
{
    if (strcmp(dt, "FP32") == 0)
        return K_F32;
    if (strcmp(dt, "FP16") == 0)
        return K_F16;
    if (strcmp(dt, "INT64") == 0)
        return K_I64;
    if (strcmp(dt, "BOOL") == 0)
        return K_BOOL;
    if (strcmp(dt, "BF16") == 0)
        return K_BINARY_ONLY;
    return K_UNKNOWN;
}

static const size_t kind_size[] = {4, 2, 8, 1, 0, 0};

/* Count the leaf values of data (nested arrays flattened). */
static int count_values(const struct bs_json *v, const char *name, size_t *n, struct bs_err *err)
{
    char nb[SHOW_MAX + 4];
    if (v->type != BS_JSON_ARRAY) {
        (*n)++;
        return 0;
    }
    for (const struct bs_json *c = v->child; c != NULL; c = c->next) {
        if (c->type == BS_JSON_OBJECT || c->type == BS_JSON_NULL || c->type == BS_JSON_STRING)
            return bs_err_set(err, BS_EINVAL,
                              "input '%s': data holds a %s (numbers or bools expected)",
                              show(nb, name),
                              c->type == BS_JSON_OBJECT ? "object"
                              : c->type == BS_JSON_NULL ? "null"
                                                        : "string");
        int rc = count_values(c, name, n, err);
        if (rc != 0)
            return rc;
    }
    return 0;
}

struct fill {
    enum kind k;
    const char *name, *dt;
    unsigned char *out;
    size_t i;
};

static int fill_one(struct fill *f, const struct bs_json *v, struct bs_err *err)
{
    char nb[SHOW_MAX + 4];
    unsigned char *p = f->out + f->i * kind_size[f->k];
    bool num = v->type == BS_JSON_NUMBER;
    if (f->k == K_BOOL ? v->type != BS_JSON_BOOL : !num || (f->k == K_I64 && !v->is_integer))
        return bs_err_set(err, BS_EINVAL, "input '%s': data[%zu] is not %s (%s)", show(nb, f->name),
                          f->i,
                          f->k == K_BOOL  ? "a bool"
                          : f->k == K_I64 ? "an integer within int64"
                                          : "a number",
                          f->dt);
    if (f->k == K_F32) {
        float x = (float)v->number;
        memcpy(p, &x, 4);
    } else if (f->k == K_F16) {
        uint16_t h = bs_f32_to_fp16((float)v->number);
        memcpy(p, &h, 2);
    } else if (f->k == K_I64) {
        memcpy(p, &v->integer, 8);
    } else {
        *p = v->boolean;
    }
    f->i++;
    return 0;
}

static int fill_values(struct fill *f, const struct bs_json *v, struct bs_err *err)
{
    if (v->type != BS_JSON_ARRAY)
        return fill_one(f, v, err);
    for (const struct bs_json *c = v->child; c != NULL; c = c->next) {
        int rc = fill_values(f, c, err);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* The element count of a valid shape, or -1 (the codec then names the problem). */
static int64_t shape_numel(const input_msg_t *in)
{
    int64_t n = 1;
    if (in->n_shape > BS_MAX_DIMS)
        return -1;
    for (size_t i = 0; i < in->n_shape; i++)
        if (in->shape[i] < 0 || __builtin_mul_overflow(n, in->shape[i], &n))
            return -1;
    return n;
}

static int json_data(struct bs_http_infer *hi, const struct bs_json *data, input_msg_t *in,
                     ProtobufCBinaryData *raw, struct bs_err *err)
{
    char nb[SHOW_MAX + 4];
    enum kind k = kind_of(in->datatype);
    if (k == K_UNKNOWN) /* the codec names the datatype */
        return 0;
    if (k == K_BINARY_ONLY)
        return bs_err_set(err, BS_EINVAL,
                          "input '%s': %s data must be sent as binary data (binary_data_size)",
                          show(nb, in->name), in->datatype);
    size_t n = 0;
    int rc = count_values(data, in->name, &n, err);
    if (rc != 0)
        return rc;
    int64_t want = shape_numel(in);
    if (want >= 0 && (uint64_t)want != n)
        return bs_err_set(err, BS_EINVAL, "input '%s': data holds %zu values, shape needs %" PRId64,
                          show(nb, in->name), n, want);
    if (want < 0) /* a bad shape: the codec says why */
        return 0;
    struct fill f = {k, in->name, in->datatype, hc_alloc(hi, n * kind_size[k]), 0};
    if (f.out == NULL)
        return OOM(err);
    if ((rc = fill_values(&f, data, err)) != 0)
        return rc;
    raw->data = f.out;
    raw->len = n * kind_size[k];
    return 0;
}

/* ---- inputs and outputs ------------------------------------------------------------ */

static int input_params(struct bs_http_infer *hi, const struct bs_json *obj, int idx,
                        input_msg_t *in, int64_t *binary_size, struct bs_err *err)
{
    char where[SHOW_MAX + 16], nb[SHOW_MAX + 4];
    snprintf(where, sizeof(where), "input '%s': ", show(nb, in->name));
    if (obj == NULL)
        return 0;
    if (obj->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EINVAL, "%s'parameters' must be an object", where);
    in->parameters = hc_alloc(hi, obj->len * sizeof(*in->parameters));
    if (in->parameters == NULL)
        return OOM(err);
    for (const struct bs_json *v = obj->child; v != NULL; v = v->next) {
        int rc;
        if (strcmp(v->key, "binary_data_size") == 0) {
            uint64_t n = 0;
            if ((rc = uint_param(v, where, &n, err)) != 0)
                return rc;
            *binary_size = (int64_t)n;
            continue;
        }
        if ((rc = shm_param(v, where, &hi->in_shm[idx], err)) < 0)
            return rc; /* shared_memory_*: kept here and passed on for the codec */
        Inference__ModelInferRequest__InferInputTensor__ParametersEntry *e =
            hc_alloc(hi, sizeof(*e));
        if (e == NULL)
            return OOM(err);
        *e = (Inference__ModelInferRequest__InferInputTensor__ParametersEntry)
            INFERENCE__MODEL_INFER_REQUEST__INFER_INPUT_TENSOR__PARAMETERS_ENTRY__INIT;
        e->key = (char *)v->key;
        if ((rc = make_param(hi, v, where, &e->value, err)) != 0)
            return rc;
        in->parameters[in->n_parameters++] = e;
    }
    return 0;
}

static int input_shape(struct bs_http_infer *hi, const struct bs_json *shape, input_msg_t *in,
                       struct bs_err *err)
{
    char nb[SHOW_MAX + 4];
    if (shape == NULL || shape->type != BS_JSON_ARRAY)
        return bs_err_set(err, BS_EINVAL, "input '%s': 'shape' must be an array of integers",
                          show(nb, in->name));
    in->shape = hc_alloc(hi, shape->len * sizeof(int64_t));
    if (in->shape == NULL)
        return OOM(err);
    for (const struct bs_json *d = shape->child; d != NULL; d = d->next) {
        if (d->type != BS_JSON_NUMBER || !d->is_integer)
            return bs_err_set(err, BS_EINVAL, "input '%s': shape[%zu] is not an integer",
                              show(nb, in->name), in->n_shape);
        in->shape[in->n_shape++] = d->integer;
    }
    return 0;
}

/* Binary data still unread: [*at, end). */
struct binary {
    uint8_t *at, *end;
};

static int decode_input(struct bs_http_infer *hi, const struct bs_json *j, int idx,
                        struct binary *bin, input_msg_t *in, ProtobufCBinaryData *raw,
                        struct bs_err *err)
{
    char nb[SHOW_MAX + 4];
    const struct bs_json *name = bs_json_get(j, "name"), *dt = bs_json_get(j, "datatype");
    if (j->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EINVAL, "inputs[%d] is not an object", idx);
    if (name == NULL || name->type != BS_JSON_STRING)
        return bs_err_set(err, BS_EINVAL, "inputs[%d]: 'name' (a string) is required", idx);
    in->name = (char *)name->string;
    if (dt == NULL || dt->type != BS_JSON_STRING)
        return bs_err_set(err, BS_EINVAL, "input '%s': 'datatype' (a string) is required",
                          show(nb, in->name));
    in->datatype = (char *)dt->string;
    int64_t binary_size = -1;
    int rc = input_shape(hi, bs_json_get(j, "shape"), in, err);
    if (rc == 0)
        rc = input_params(hi, bs_json_get(j, "parameters"), idx, in, &binary_size, err);
    if (rc != 0)
        return rc;
    const struct bs_json *data = bs_json_get(j, "data");
    if (hi->in_shm[idx].given && (data != NULL || binary_size >= 0)) /* as gRPC's contents */
        return bs_err_set(err, BS_EINVAL,
                          "input '%s': %s must not be given for an input in shared memory",
                          show(nb, in->name), data != NULL ? "'data'" : "binary_data_size");
    if (binary_size >= 0) {
        if (data != NULL)
            return bs_err_set(err, BS_EINVAL, "input '%s': both 'data' and binary_data_size",
                              show(nb, in->name));
        if ((uint64_t)binary_size > (uint64_t)(bin->end - bin->at))
            return bs_err_set(err, BS_EINVAL,
                              "input '%s': binary_data_size %" PRId64
                              " runs past the end of the body (%zu bytes of binary data left)",
                              show(nb, in->name), binary_size, (size_t)(bin->end - bin->at));
        raw->data = bin->at;
        raw->len = (size_t)binary_size;
        bin->at += binary_size;
        return 0;
    }
    if (hi->in_shm[idx].given)
        return 0; /* bound to its region after decoding */
    if (data == NULL)
        return bs_err_set(err, BS_EINVAL,
                          "input '%s': no 'data', binary_data_size or shared_memory_region",
                          show(nb, in->name));
    return json_data(hi, data, in, raw, err);
}

static int decode_inputs(struct bs_http_infer *hi, const struct bs_json *inputs, struct binary *bin,
                         req_msg_t *m, struct bs_err *err)
{
    if (inputs == NULL || inputs->type != BS_JSON_ARRAY)
        return bs_err_set(err, BS_EINVAL, "'inputs' (an array) is required");
    if (inputs->len > BS_CODEC_MAX_INPUTS)
        return bs_err_set(err, BS_ERANGE, "too many inputs: %zu (the limit is %d)", inputs->len,
                          BS_CODEC_MAX_INPUTS);
    size_t n = inputs->len;
    m->inputs = hc_alloc(hi, n * sizeof(*m->inputs));
    m->raw_input_contents = hc_alloc(hi, n * sizeof(*m->raw_input_contents));
    if (m->inputs == NULL || m->raw_input_contents == NULL)
        return OOM(err);
    int i = 0;
    for (const struct bs_json *j = inputs->child; j != NULL; j = j->next, i++) {
        input_msg_t *in = hc_alloc(hi, sizeof(*in));
        if (in == NULL)
            return OOM(err);
        *in = (input_msg_t)INFERENCE__MODEL_INFER_REQUEST__INFER_INPUT_TENSOR__INIT;
        m->inputs[i] = in;
        m->n_inputs = (size_t)i + 1;
        int rc =
            decode_input(hi, j, i, bin, in, &m->raw_input_contents[m->n_raw_input_contents], err);
        if (rc != 0)
            return rc;
        if (!hi->in_shm[i].given) /* as in Triton: shared memory inputs have no entry */
            m->n_raw_input_contents++;
    }
    if (bin->at != bin->end)
        return bs_err_set(err, BS_EINVAL,
                          "%zu bytes of binary data after the last input's (binary_data_size "
                          "must account for all of it)",
                          (size_t)(bin->end - bin->at));
    return 0;
}

static int decode_outputs(struct bs_http_infer *hi, const struct bs_json *outputs, req_msg_t *m,
                          struct bs_err *err)
{
    if (outputs == NULL)
        return 0;
    if (outputs->type != BS_JSON_ARRAY)
        return bs_err_set(err, BS_EINVAL, "'outputs' must be an array");
    m->outputs = hc_alloc(hi, outputs->len * sizeof(*m->outputs));
    if (m->outputs == NULL)
        return OOM(err);
    for (const struct bs_json *j = outputs->child; j != NULL; j = j->next) {
        const struct bs_json *name = bs_json_get(j, "name"), *p = bs_json_get(j, "parameters");
        if (name == NULL || name->type != BS_JSON_STRING)
            return bs_err_set(err, BS_EINVAL, "outputs[%zu]: 'name' (a string) is required",
                              m->n_outputs);
        output_msg_t *o = hc_alloc(hi, sizeof(*o));
        if (o == NULL)
            return OOM(err);
        *o = (output_msg_t)INFERENCE__MODEL_INFER_REQUEST__INFER_REQUESTED_OUTPUT_TENSOR__INIT;
        o->name = (char *)name->string;
        m->outputs[m->n_outputs++] = o;
        if (p != NULL && p->type != BS_JSON_OBJECT)
            return bs_err_set(err, BS_EINVAL, "output '%s': 'parameters' must be an object",
                              o->name);
        if (p != NULL && (o->parameters = hc_alloc(hi, p->len * sizeof(*o->parameters))) == NULL)
            return OOM(err);
        for (const struct bs_json *v = p ? p->child : NULL; v != NULL; v = v->next) {
            int rc;
            if (strcmp(v->key, "binary_data") == 0) {
                if (v->type != BS_JSON_BOOL)
                    return bs_err_set(err, BS_EINVAL,
                                      "output parameter 'binary_data' must be a bool");
                hi->binary_output = v->boolean;
                continue;
            }
            if ((rc = shm_param(v, "output: ", &hi->out_shm, err)) < 0)
                return rc;
            /* shared_memory_* and the rest (classification, ...) go on to the codec */
            Inference__ModelInferRequest__InferRequestedOutputTensor__ParametersEntry *e =
                hc_alloc(hi, sizeof(*e));
            if (e == NULL)
                return OOM(err);
            *e = (Inference__ModelInferRequest__InferRequestedOutputTensor__ParametersEntry)
                INFERENCE__MODEL_INFER_REQUEST__INFER_REQUESTED_OUTPUT_TENSOR__PARAMETERS_ENTRY__INIT;
            e->key = (char *)v->key;
            if ((rc = make_param(hi, v, "output: ", &e->value, err)) != 0)
                return rc;
            o->parameters[o->n_parameters++] = e;
        }
    }
    return 0;
}

/* An upper bound on the values a JSON text holds: one per ',' '[' '{' ':' plus one. */
static size_t max_values(const uint8_t *s, size_t n)
{
    size_t k = 1;
    for (size_t i = 0; i < n; i++)
        k += s[i] == ',' || s[i] == '[' || s[i] == '{';
    return k;
}

int bs_http_decode_infer(const char *model, const char *version, uint8_t *body, size_t len,
                         int64_t header_len, struct bs_http_infer *hi, struct bs_err *err)
{
    memset(hi, 0, sizeof(*hi));
    if (header_len > (int64_t)len)
        return bs_err_set(err, BS_EINVAL,
                          "Inference-Header-Content-Length %" PRId64
                          " exceeds the body of %zu bytes",
                          header_len, len);
    size_t json_len = header_len >= 0 ? (size_t)header_len : len;
    struct binary bin = {body + json_len, body + len};
    size_t nv = max_values(body, json_len);
    if (nv > BS_HTTP_MAX_JSON_VALUES)
        return bs_err_set(err, BS_ERANGE,
                          "the JSON request holds up to %zu values (the limit is %d): send large "
                          "tensors as binary data (binary_data_size)",
                          nv, BS_HTTP_MAX_JSON_VALUES);
    int rc = bs_json_parse(&hi->doc, (const char *)body, json_len, JSON_MAX_DEPTH, err);
    if (rc != 0) {
        char msg[sizeof(err->msg)];
        snprintf(msg, sizeof(msg), "%s", err->msg);
        bs_http_infer_free(hi);
        return bs_err_set(err, BS_EINVAL, "malformed JSON request: %s", msg);
    }
    const struct bs_json *root = bs_json_doc_root(hi->doc), *id = bs_json_get(root, "id");
    req_msg_t *m = hc_alloc(hi, sizeof(*m));
    if (m == NULL)
        rc = OOM(err);
    else if (root->type != BS_JSON_OBJECT)
        rc = bs_err_set(err, BS_EINVAL, "the request must be a JSON object");
    else if (id != NULL && id->type != BS_JSON_STRING)
        rc = bs_err_set(err, BS_EINVAL, "'id' must be a string");
    if (rc == 0) {
        *m = (req_msg_t)INFERENCE__MODEL_INFER_REQUEST__INIT;
        m->model_name = (char *)model;
        m->model_version = (char *)(version ? version : "");
        m->id = (char *)(id ? id->string : "");
        hi->msg = m;
        rc = request_params(hi, bs_json_get(root, "parameters"), m, err);
    }
    if (rc == 0)
        rc = decode_inputs(hi, bs_json_get(root, "inputs"), &bin, m, err);
    if (rc == 0)
        rc = decode_outputs(hi, bs_json_get(root, "outputs"), m, err);
    if (rc != 0)
        bs_http_infer_free(hi);
    return rc;
}

/* ---- the answer ------------------------------------------------------------------ */

static void put_key_str(struct bs_jbuf *b, const char *key, const char *v)
{
    bs_jbuf_printf(b, "\"%s\":", key);
    bs_jbuf_str(b, v, strlen(v));
}

/* Is out answered as binary data? When asked, and always for BF16 (JSON
 * has no BF16 numbers: Triton's rule, binary data only); FP16 goes as JSON
 * numbers (each value widened to F32 exactly). */
static bool binary_out(const struct bs_http_answer *a, const struct bs_tensor *out)
{
    return a->binary_output || out->type == BS_TYPE_BF16;
}

/* Output value i as a float. */
static float out_value(const struct bs_tensor *out, int64_t i)
{
    if (out->type == BS_TYPE_F16)
        return bs_fp16_to_f32(((const uint16_t *)out->data)[i]);
    return ((const float *)out->data)[i];
}

static void put_output(struct bs_jbuf *b, const struct bs_http_answer *a,
                       const struct bs_tensor *out, size_t nbytes)
{
    bs_jbuf_printf(b, "{\"name\":\"output\",\"datatype\":\"%s\",\"shape\":[",
                   bs_codec_datatype(out->type));
    for (int d = 0; d < out->n_dims; d++)
        bs_jbuf_printf(b, "%s%" PRId64, d ? "," : "", out->ne[d]);
    bs_jbuf_puts(b, "]");
    if (a->out_shm != NULL && a->out_shm->given) {
        bs_jbuf_puts(b, ",\"parameters\":{");
        put_key_str(b, "shared_memory_region", a->out_shm->region);
        bs_jbuf_printf(
            b, ",\"shared_memory_offset\":%" PRIu64 ",\"shared_memory_byte_size\":%" PRIu64 "}",
            a->out_shm->offset, a->out_shm->byte_size); /* as asked, as gRPC answers */
    } else if (binary_out(a, out)) {
        bs_jbuf_printf(b, ",\"parameters\":{\"binary_data_size\":%zu}", nbytes);
    } else {
        int64_t n = bs_tensor_nelements(out);
        bs_jbuf_puts(b, ",\"data\":[");
        for (int64_t i = 0; i < n; i++) {
            if (i > 0)
                bs_jbuf_put(b, ",", 1);
            bs_jbuf_float(b, out_value(out, i));
        }
        bs_jbuf_puts(b, "]");
    }
    bs_jbuf_puts(b, "}");
}

int bs_http_encode_infer(const struct bs_http_answer *a, const struct bs_tensor *out,
                         struct bs_jbuf *b, size_t *json_len, struct bs_err *err)
{
    bool in_shm = a->out_shm != NULL && a->out_shm->given; /* its bytes are in the region */
    if (out != NULL &&
        ((out->type != BS_TYPE_F32 && out->type != BS_TYPE_BF16 && out->type != BS_TYPE_F16) ||
         !bs_tensor_is_contiguous(out) ||
         (bs_tensor_nelements(out) > 0 && out->data == NULL && !in_shm)))
        return bs_err_set(err, BS_EINTERNAL,
                          "output: expected a contiguous FP32, BF16 or FP16 tensor");
    const char *version = a->model_version && a->model_version[0] ? a->model_version : "1";
    size_t nbytes = out ? bs_tensor_nbytes(out) : 0, start = b->len;
    bs_jbuf_puts(b, "{");
    put_key_str(b, "model_name", a->model_name ? a->model_name : "");
    bs_jbuf_puts(b, ",");
    put_key_str(b, "model_version", version);
    if (a->id != NULL && a->id[0]) {
        bs_jbuf_puts(b, ",");
        put_key_str(b, "id", a->id);
    }
    if (a->block_cache != NULL) {
        bs_jbuf_puts(b, ",\"parameters\":{");
        put_key_str(b, "block_cache", a->block_cache);
        bs_jbuf_puts(b, "}");
    }
    if (out != NULL) {
        bs_jbuf_puts(b, ",\"outputs\":[");
        put_output(b, a, out, nbytes);
        bs_jbuf_puts(b, "]");
    }
    bs_jbuf_puts(b, "}");
    *json_len = b->len - start;
    bool raw = out != NULL && binary_out(a, out) && !in_shm;
    if (raw && nbytes > 0)
        bs_jbuf_put(b, out->data, nbytes);
    if (b->oom)
        return bs_err_set(err, BS_ENOMEM, "out of memory for a %zu-byte answer", b->len);
    return 0;
}

/* ---- Content-Encoding ------------------------------------------------------------ */

int bs_http_inflate(const uint8_t *data, size_t len, bool gzip, size_t max, uint8_t **outp,
                    size_t *out_len, struct bs_err *err)
{
    z_stream z = {0};
    *outp = NULL;
    *out_len = 0;
    if (len > UINT_MAX)
        return bs_err_set(err, BS_ERANGE, "a compressed body of %zu bytes is too large", len);
    if (inflateInit2(&z, gzip ? 15 + 16 : 15) != Z_OK)
        return OOM(err);
    size_t cap = len < (max + 1) / 4 ? len * 4 + 1024 : max + 1, n = 0;
    if (cap > max + 1)
        cap = max + 1;
    uint8_t *out = malloc(cap);
    int zrc = Z_OK;
    z.next_in = (Bytef *)data;
    z.avail_in = (uInt)len;
    while (out != NULL && zrc == Z_OK && n <= max) {
        if (n == cap) { /* grow, up to max + 1 bytes: one more than allowed tells */
            size_t ncap = cap > (max + 1) / 2 ? max + 1 : cap * 2;
            uint8_t *bigger = realloc(out, ncap);
            if (bigger == NULL) {
                free(out);
                out = NULL;
                break;
            }
            out = bigger;
            cap = ncap;
        }
        size_t room = cap - n > UINT_MAX ? UINT_MAX : cap - n;
        z.next_out = out + n;
        z.avail_out = (uInt)room;
        zrc = inflate(&z, Z_NO_FLUSH);
        n += room - z.avail_out;
        if (zrc == Z_BUF_ERROR && z.avail_in > 0 && n == cap)
            zrc = Z_OK; /* only the output was full */
    }
    inflateEnd(&z);
    int rc = 0;
    if (out == NULL)
        rc = bs_err_set(err, BS_ENOMEM, "out of memory inflating the body");
    else if (n > max)
        rc = bs_err_set(err, BS_ERANGE,
                        "the body inflates to more than %zu bytes (the limit, --max-message-bytes)",
                        max);
    else if (zrc != Z_STREAM_END)
        rc = bs_err_set(err, BS_EINVAL, "the body is not valid %s data (%s)",
                        gzip ? "gzip" : "deflate", zrc == Z_BUF_ERROR ? "cut short" : "corrupt");
    if (rc != 0) {
        free(out);
        return rc;
    }
    *outp = out;
    *out_len = n;
    return 0;
}

uint8_t *bs_http_deflate(const uint8_t *data, size_t len, bool gzip, size_t *out_len)
{
    z_stream z = {0};
    if (len > UINT_MAX ||
        deflateInit2(&z, 1, Z_DEFLATED, gzip ? 15 + 16 : 15, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        return NULL;
    size_t cap = deflateBound(&z, (uLong)len);
    uint8_t *out = cap <= UINT_MAX ? malloc(cap) : NULL;
    z.next_in = (Bytef *)data;
    z.avail_in = (uInt)len;
    z.next_out = out;
    z.avail_out = (uInt)cap;
    if (out == NULL || deflate(&z, Z_FINISH) != Z_STREAM_END) {
        free(out);
        out = NULL;
    }
    *out_len = cap - z.avail_out;
    deflateEnd(&z);
    return out;
}
