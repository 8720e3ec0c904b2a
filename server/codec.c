/* ModelInferRequest / ModelInferResponse <-> engine tensors.
 *
 * Decoding unpacks the whole message with protobuf-c (which copies every bytes
 * field once) and then only validates: raw tensors, FP32 and INT64 typed
 * tensors point into the unpacked message; BOOL typed contents are converted
 * (protobuf-c stores them as int) into buffers the request owns.
 *
 * Choices the protocol leaves open:
 * - A parameter key given twice: every value must be valid and the last one
 *   wins, as protobuf maps do in the C++ and Python runtimes (Triton sees the
 *   same request the same way).
 * - Unknown request, input and output parameters are ignored (Triton clients
 *   send some of their own, e.g. "binary_data_size", "sequence_id").
 * - Raw BOOL bytes are canonicalised to 0/1 in place.
 * - The parameter output_datatype (a string_param: "FP32", "BF16" or
 *   "FP16") asks for the output in that dtype; BF16 and FP16 answers are
 *   always raw (raw_output_contents), since InferTensorContents has no
 *   16-bit float field.
 * - A tensor with zero elements gets a non-NULL data pointer to an empty,
 *   never-written static buffer.
 * - A string field (at any depth) with an embedded NUL byte fails the whole
 *   request before unpacking (bs_pb_check_strings): protobuf-c would hand it
 *   out cut at the NUL, "m\0evil" served as "m".
 * - Names in error messages are cut to 64 bytes (at a UTF-8 boundary) with
 *   control characters shown as '?'.
 *
 * Unpacking can amplify memory: protobuf-c allocates a struct per repeated
 * message, map entry and unknown field, so 2-byte wire fields become about
 * 100 bytes each (an empty input, an empty parameter, an unknown varint). All
 * allocations of one unpack therefore come out of a budget of
 * UNPACK_BUDGET_FACTOR times the message size plus UNPACK_BUDGET_SLACK (packed
 * INT64 contents, the densest legitimate case, need 8x); beyond it the
 * request fails with BS_ERANGE before any tensor is looked at. */
#include "codec.h"

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grpc_service.pb-c.h"
#include "pbcheck.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "raw tensor contents are little-endian and used in place: little-endian hosts only"
#endif

typedef Inference__ModelInferRequest req_msg_t;
typedef Inference__ModelInferRequest__InferInputTensor input_msg_t;
typedef Inference__InferTensorContents contents_msg_t;

#define UNPACK_BUDGET_FACTOR 8
#define UNPACK_BUDGET_SLACK  (1u << 20)

/* Data pointer for zero-element tensors: never read or written. */
static _Alignas(16) unsigned char empty_data[16];

static const char *const datatype_names[BS_TYPE_COUNT] = {
    [BS_TYPE_F32] = "FP32",  [BS_TYPE_F16] = "FP16",  [BS_TYPE_BF16] = "BF16",
    [BS_TYPE_I64] = "INT64", [BS_TYPE_BOOL] = "BOOL",
};

int bs_codec_output_dtype(const char *name, enum bs_dtype *type)
{
    static const enum bs_dtype ok[] = {BS_TYPE_F32, BS_TYPE_BF16, BS_TYPE_F16};
    for (size_t i = 0; name != NULL && i < sizeof(ok) / sizeof(ok[0]); i++)
        if (strcmp(name, datatype_names[ok[i]]) == 0) {
            *type = ok[i];
            return 0;
        }
    return -1;
}

const char *bs_codec_datatype(enum bs_dtype type)
{
    return (unsigned)type < BS_TYPE_COUNT ? datatype_names[type] : "";
}

static const char *str_or_empty(const char *s)
{
    return s ? s : "";
}

/* ---- decoding ------------------------------------------------------------ */

static int parse_datatype(const input_msg_t *in, const char *name, enum bs_dtype *type,
                          struct bs_err *err)
{
    const char *dt = str_or_empty(in->datatype);
    for (int i = 0; i < BS_TYPE_COUNT; i++) {
        if (strcmp(dt, datatype_names[i]) == 0) {
            *type = (enum bs_dtype)i;
            return 0;
        }
    }
    char nb[BS_SHOW_MAX + 4], db[BS_SHOW_MAX + 4];
    return bs_err_set(err, BS_EINVAL,
                      "input '%s': datatype '%s' is not supported (FP32, FP16, BF16, INT64, BOOL)",
                      bs_show(nb, name), bs_show(db, dt));
}

/* Check the shape and count its elements. The product of the non-zero dims
 * must stay within the limit too, so that strides and byte sizes of an empty
 * tensor cannot overflow either. */
static int parse_shape(const input_msg_t *in, const char *name, enum bs_dtype type,
                       const struct bs_codec_limits *lim, int64_t *ne, int64_t *numel,
                       struct bs_err *err)
{
    char nb[BS_SHOW_MAX + 4];
    if (in->n_shape > BS_MAX_DIMS)
        return bs_err_set(err, BS_EINVAL, "input '%s': shape has %zu dims (at most %d)",
                          bs_show(nb, name), in->n_shape, BS_MAX_DIMS);
    int64_t span = 1; /* product of max(dim, 1) */
    bool overflow = false, empty = false;
    for (size_t i = 0; i < in->n_shape; i++) {
        int64_t d = in->shape[i];
        if (d < 0)
            return bs_err_set(err, BS_EINVAL, "input '%s': shape[%zu] is %lld (dims must be >= 0)",
                              bs_show(nb, name), i, (long long)d);
        ne[i] = d;
        empty |= d == 0;
        overflow |= __builtin_mul_overflow(span, d > 0 ? d : 1, &span);
    }
    int64_t bytes;
    overflow |= __builtin_mul_overflow(span, (int64_t)bs_dtype_size(type), &bytes);
    if (overflow || span > lim->max_elements || (uint64_t)bytes > SIZE_MAX) {
        char sb[96];
        struct bs_tensor shape = {.n_dims = (int)in->n_shape};
        memcpy(shape.ne, ne, in->n_shape * sizeof(*ne));
        return bs_err_set(
            err, BS_ERANGE,
            "input '%s': shape %s is too large (the limit is %lld elements per tensor)",
            bs_show(nb, name), bs_tensor_shape_str(&shape, sb, sizeof(sb)),
            (long long)lim->max_elements);
    }
    *numel = empty ? 0 : span;
    return 0;
}

/* The typed contents fields, in InferTensorContents order. */
enum typed_field {
    FIELD_BOOL,
    FIELD_INT,
    FIELD_INT64,
    FIELD_UINT,
    FIELD_UINT64,
    FIELD_FP32,
    FIELD_FP64,
    FIELD_BYTES,
    FIELD_NONE,
};

static const char *const typed_field_names[FIELD_NONE] = {
    "bool_contents",   "int_contents",  "int64_contents", "uint_contents",
    "uint64_contents", "fp32_contents", "fp64_contents",  "bytes_contents",
};

/* The first filled field other than allowed, or FIELD_NONE. */
static enum typed_field other_typed_field(const contents_msg_t *c, enum typed_field allowed)
{
    const size_t n[FIELD_NONE] = {
        c->n_bool_contents,   c->n_int_contents,  c->n_int64_contents, c->n_uint_contents,
        c->n_uint64_contents, c->n_fp32_contents, c->n_fp64_contents,  c->n_bytes_contents,
    };
    for (int i = 0; i < FIELD_NONE; i++)
        if (n[i] > 0 && i != (int)allowed)
            return (enum typed_field)i;
    return FIELD_NONE;
}

static int raw_data(const req_msg_t *m, size_t i, size_t k, const char *name,
                    const struct bs_tensor *t, void **data, struct bs_err *err)
{
    const input_msg_t *in = m->inputs[i];
    ProtobufCBinaryData *b = &m->raw_input_contents[k]; /* k: i less the inputs in shm before */
    char nb[BS_SHOW_MAX + 4], sb[96];
    if (in->contents != NULL && other_typed_field(in->contents, FIELD_NONE) != FIELD_NONE)
        return bs_err_set(err, BS_EINVAL,
                          "input '%s': contents must be empty when raw_input_contents is used",
                          bs_show(nb, name));
    size_t want = bs_tensor_nbytes(t);
    if (b->len != want)
        return bs_err_set(
            err, BS_EINVAL,
            "input '%s': raw_input_contents[%zu] holds %zu bytes, expected %zu (%s %s)",
            bs_show(nb, name), k, b->len, want, datatype_names[t->type],
            bs_tensor_shape_str(t, sb, sizeof(sb)));
    if (t->type == BS_TYPE_BOOL)
        for (size_t j = 0; j < b->len; j++)
            b->data[j] = b->data[j] != 0;
    *data = want > 0 ? b->data : empty_data;
    return 0;
}

/* protobuf_c_boolean is an int: narrow BOOL contents to one byte each. */
static int own_bools(const contents_msg_t *c, const char *name, void **data, void **owned,
                     struct bs_err *err)
{
    uint8_t *bools = malloc(c->n_bool_contents);
    if (bools == NULL) {
        char nb[BS_SHOW_MAX + 4];
        return bs_err_set(err, BS_ENOMEM, "input '%s': out of memory for %zu BOOL values",
                          bs_show(nb, name), c->n_bool_contents);
    }
    for (size_t k = 0; k < c->n_bool_contents; k++)
        bools[k] = c->bool_contents[k] != 0;
    *owned = *data = bools;
    return 0;
}

/* Typed contents: the one field the datatype uses, with one value per element. */
static int typed_data(const input_msg_t *in, const char *name, const struct bs_tensor *t,
                      void **data, void **owned, struct bs_err *err)
{
    static const contents_msg_t none = INFERENCE__INFER_TENSOR_CONTENTS__INIT;
    const contents_msg_t *c = in->contents ? in->contents : &none;
    const char *dt = datatype_names[t->type];
    char nb[BS_SHOW_MAX + 4], sb[96];
    int64_t numel = bs_tensor_nelements(t);
    enum typed_field field = FIELD_NONE;
    size_t n = 0;
    void *values = NULL;
    switch (t->type) {
    case BS_TYPE_F32:
        field = FIELD_FP32;
        n = c->n_fp32_contents;
        values = c->fp32_contents;
        break;
    case BS_TYPE_I64:
        field = FIELD_INT64;
        n = c->n_int64_contents;
        values = c->int64_contents;
        break;
    case BS_TYPE_BOOL: /* converted below */
        field = FIELD_BOOL;
        n = c->n_bool_contents;
        break;
    default: /* FP16, BF16: no typed field carries them */
        if (numel > 0 || other_typed_field(c, FIELD_NONE) != FIELD_NONE)
            return bs_err_set(err, BS_EINVAL,
                              "input '%s': %s data must be sent in raw_input_contents",
                              bs_show(nb, name), dt);
        *data = empty_data;
        return 0;
    }
    enum typed_field other = other_typed_field(c, field);
    if (other != FIELD_NONE)
        return bs_err_set(
            err, BS_EINVAL, "input '%s': %s data goes in contents.%s, not contents.%s",
            bs_show(nb, name), dt, typed_field_names[field], typed_field_names[other]);
    if (n != (uint64_t)numel)
        return bs_err_set(err, BS_EINVAL,
                          "input '%s': contents.%s holds %zu values, expected %lld (%s %s)",
                          bs_show(nb, name), typed_field_names[field], n, (long long)numel, dt,
                          bs_tensor_shape_str(t, sb, sizeof(sb)));
    if (n == 0) {
        *data = empty_data;
        return 0;
    }
    if (t->type == BS_TYPE_BOOL)
        return own_bools(c, name, data, owned, err);
    *data = values;
    return 0;
}

/* ---- shared memory parameters ----------------------------------------- */

/* A uint64 parameter: an int64_param >= 0 (what Triton and its clients
 * send) or a uint64_param. */
static int shm_u64(const Inference__InferParameter *v, const char *what, const char *name,
                   const char *key, uint64_t *out, struct bs_err *err)
{
    int which = v ? (int)v->parameter_choice_case : 0;
    char nb[BS_SHOW_MAX + 4];
    if (which == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM) {
        *out = v->uint64_param;
        return 0;
    }
    if (which != INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM)
        return bs_err_set(err, BS_EINVAL, "%s '%s': parameter '%s' must be an int64_param", what,
                          bs_show(nb, name), key);
    if (v->int64_param < 0)
        return bs_err_set(err, BS_EINVAL, "%s '%s': parameter '%s' is %lld (must be >= 0)", what,
                          bs_show(nb, name), key, (long long)v->int64_param);
    *out = (uint64_t)v->int64_param;
    return 0;
}

/* One parameter of a tensor into ref (what: "input" or "output"); other keys
 * are ignored. *size_given records shared_memory_byte_size, *off_given the
 * offset. */
static int shm_param(const char *key, const Inference__InferParameter *v, const char *what,
                     const char *name, struct bs_shm_ref *ref, bool *size_given, bool *off_given,
                     struct bs_err *err)
{
    char nb[BS_SHOW_MAX + 4], rb[BS_SHOW_MAX + 4];
    if (strcmp(key, "shared_memory_offset") == 0) {
        *off_given = true;
        return shm_u64(v, what, name, key, &ref->offset, err);
    }
    if (strcmp(key, "shared_memory_byte_size") == 0) {
        *size_given = true;
        return shm_u64(v, what, name, key, &ref->byte_size, err);
    }
    if (strcmp(key, "shared_memory_region") != 0)
        return 0;
    if (v == NULL ||
        v->parameter_choice_case != INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM)
        return bs_err_set(err, BS_EINVAL,
                          "%s '%s': parameter 'shared_memory_region' must be a string_param", what,
                          bs_show(nb, name));
    const char *r = str_or_empty(v->string_param);
    size_t n = strlen(r);
    if (n == 0 || n >= sizeof(ref->region))
        return bs_err_set(err, BS_EINVAL,
                          "%s '%s': parameter 'shared_memory_region' '%s' is %s (1 to %zu bytes)",
                          what, bs_show(nb, name), bs_show(rb, r), n ? "too long" : "empty",
                          sizeof(ref->region) - 1);
    memcpy(ref->region, r, n + 1);
    ref->given = true;
    return 0;
}

/* Triton's rules: shared_memory_byte_size is required with a region, and
 * neither it nor an offset goes without one. */
static int shm_finish(const char *what, const char *name, struct bs_shm_ref *ref, bool size_given,
                      bool off_given, struct bs_err *err)
{
    char nb[BS_SHOW_MAX + 4];
    if (ref->given && !size_given)
        return bs_err_set(err, BS_EINVAL,
                          "%s '%s': parameter 'shared_memory_byte_size' must be given with "
                          "'shared_memory_region'",
                          what, bs_show(nb, name));
    if (!ref->given && (size_given || off_given))
        return bs_err_set(err, BS_EINVAL, "%s '%s': parameter '%s' needs 'shared_memory_region'",
                          what, bs_show(nb, name),
                          size_given ? "shared_memory_byte_size" : "shared_memory_offset");
    return 0;
}

/* The shared memory parameters of input i into req->in_shm[i]. */
static int decode_input_shm(const input_msg_t *in, struct bs_shm_ref *ref, struct bs_err *err)
{
    const char *name = str_or_empty(in->name);
    bool size_given = false, off_given = false;
    memset(ref, 0, sizeof(*ref));
    for (size_t k = 0; k < in->n_parameters; k++) {
        int rc = shm_param(str_or_empty(in->parameters[k]->key), in->parameters[k]->value, "input",
                           name, ref, &size_given, &off_given, err);
        if (rc != 0)
            return rc;
    }
    return shm_finish("input", name, ref, size_given, off_given, err);
}

static int decode_input(const req_msg_t *m, size_t i, size_t k, bool raw,
                        const struct bs_codec_limits *lim, struct bs_infer_request *req,
                        struct bs_err *err)
{
    const input_msg_t *in = m->inputs[i];
    const char *name = str_or_empty(in->name);
    char nb[BS_SHOW_MAX + 4];
    if (name[0] == '\0')
        return bs_err_set(err, BS_EINVAL, "input %zu: name is required", i);
    for (size_t j = 0; j < i; j++)
        if (strcmp(req->inputs[j].name, name) == 0)
            return bs_err_set(err, BS_EINVAL, "input '%s': name given twice", bs_show(nb, name));
    enum bs_dtype type = BS_TYPE_F32;
    int64_t ne[BS_MAX_DIMS] = {0}, numel;
    int rc = parse_datatype(in, name, &type, err);
    if (rc == 0)
        rc = parse_shape(in, name, type, lim, ne, &numel, err);
    if (rc != 0)
        return rc;
    struct bs_tensor t = bs_tensor_make(type, (int)in->n_shape, ne, NULL);
    if (req->in_shm[i].given) { /* bound by the front end */
        if (in->contents != NULL && other_typed_field(in->contents, FIELD_NONE) != FIELD_NONE)
            return bs_err_set(err, BS_EINVAL,
                              "input '%s': contents must be empty for an input in shared memory",
                              bs_show(nb, name));
    } else {
        rc = raw ? raw_data(m, i, k, name, &t, &t.data, err)
                 : typed_data(in, name, &t, &t.data, &req->owned[i], err);
    }
    if (rc != 0)
        return rc;
    req->inputs[i] = (struct bs_named_tensor){.name = name, .t = t};
    req->n_inputs = (int)i + 1;
    return 0;
}

static int decode_inputs(const req_msg_t *m, const struct bs_codec_limits *lim,
                         struct bs_infer_request *req, struct bs_err *err)
{
    int max = lim->max_inputs < BS_CODEC_MAX_INPUTS ? lim->max_inputs : BS_CODEC_MAX_INPUTS;
    if (max < 0)
        max = 0;
    if (m->n_inputs > (size_t)max)
        return bs_err_set(err, BS_ERANGE, "too many inputs: %zu (the limit is %d)", m->n_inputs,
                          max);
    size_t n_plain = 0; /* inputs not in shared memory: one raw entry each */
    bool any_shm = false;
    for (size_t i = 0; i < m->n_inputs; i++) {
        int rc = decode_input_shm(m->inputs[i], &req->in_shm[i], err);
        if (rc != 0)
            return rc;
        n_plain += !req->in_shm[i].given;
        any_shm |= req->in_shm[i].given;
    }
    bool raw = m->n_raw_input_contents > 0;
    if (raw && m->n_raw_input_contents < n_plain) {
        char nb[BS_SHOW_MAX + 4];
        size_t i = 0;
        for (size_t k = 0; i < m->n_inputs; i++) /* the first input without an entry */
            if (!req->in_shm[i].given && k++ == m->n_raw_input_contents)
                break;
        return bs_err_set(err, BS_EINVAL,
                          "input '%s': no raw_input_contents entry (%zu entries for %zu inputs%s; "
                          "raw data needs one per input, in order)",
                          bs_show(nb, str_or_empty(m->inputs[i]->name)), m->n_raw_input_contents,
                          n_plain, any_shm ? " not in shared memory" : "");
    }
    if (raw && m->n_raw_input_contents > n_plain)
        return bs_err_set(err, BS_EINVAL,
                          "raw_input_contents has %zu entries for %zu inputs%s (one per input)",
                          m->n_raw_input_contents, n_plain, any_shm ? " not in shared memory" : "");
    for (size_t i = 0, k = 0; i < m->n_inputs; i++) {
        int rc = decode_input(m, i, k, raw, lim, req, err);
        if (rc != 0)
            return rc;
        k += !req->in_shm[i].given;
    }
    req->raw_output = raw || any_shm;
    return 0;
}

/* Triton's "priority": a uint64_param, or an int64_param (what tritonclient
 * sends) that is not negative; the batcher maps it onto the model's levels. */
static int decode_priority(const Inference__InferParameter *v, struct bs_infer_request *req,
                           struct bs_err *err)
{
    int which = v ? (int)v->parameter_choice_case : 0;
    if (which == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM) {
        req->priority = v->uint64_param;
        return 0;
    }
    if (which != INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM)
        return bs_err_set(err, BS_EINVAL,
                          "parameter 'priority' must be a uint64_param or an int64_param");
    if (v->int64_param < 0)
        return bs_err_set(err, BS_EINVAL, "parameter 'priority' is %lld (must be >= 0)",
                          (long long)v->int64_param);
    req->priority = (uint64_t)v->int64_param;
    return 0;
}

/* A sequence_id as Triton takes it: a uint64_param, an int64_param >= 0,
 * or a string_param (Triton's string correlation ids): digits are that
 * number (up to 2^64 - 1), any other string names the sequence by its
 * 64-bit FNV-1a hash with the top bit set (so it never collides with a
 * number below 2^63), and messages name it by its text (p->name). */
static int decode_sequence_id(const Inference__InferParameter *v, struct bs_seq_params *p,
                              struct bs_err *err)
{
    int which = v ? (int)v->parameter_choice_case : 0;
    p->name[0] = '\0'; /* a repeated key: the last one wins */
    if (which == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM) {
        p->id = v->uint64_param;
        return 0;
    }
    if (which == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM && v->int64_param >= 0) {
        p->id = (uint64_t)v->int64_param;
        return 0;
    }
    if (which != INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM)
        return bs_err_set(err, BS_EINVAL,
                          "parameter 'sequence_id' must be a uint64_param, a "
                          "non-negative int64_param or a string_param");
    const char *s = str_or_empty(v->string_param);
    size_t n = strlen(s);
    if (n == 0)
        return bs_err_set(err, BS_EINVAL, "parameter 'sequence_id' is an empty string");
    if (n <= 20 && strspn(s, "0123456789") == n) {
        errno = 0;
        unsigned long long x = strtoull(s, NULL, 10);
        if (errno == 0) {
            p->id = x;
            return 0;
        }
    }
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 0x100000001b3ull;
    p->id = h | (1ull << 63);
    char nb[BS_SHOW_MAX + 4];
    _Static_assert(BS_SHOW_MAX + 4 + 2 <= BS_SEQ_NAME_BYTES, "a shown name and its quotes fit");
    snprintf(p->name, sizeof(p->name), "\"%s\"", bs_show(nb, s));
    return 0;
}

static int decode_bool(const Inference__InferParameter *v, const char *key, bool *out,
                       struct bs_err *err)
{
    if (v == NULL ||
        v->parameter_choice_case != INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM)
        return bs_err_set(err, BS_EINVAL, "parameter '%s' must be a bool_param", key);
    *out = v->bool_param != 0;
    return 0;
}

/* sequence_id, sequence_start, sequence_end, block_cache_interval: 1 when
 * key is none of them. */
static int decode_seq_param(const char *key, const Inference__InferParameter *v,
                            struct bs_seq_params *p, struct bs_err *err)
{
    int which = v ? (int)v->parameter_choice_case : 0;
    if (strcmp(key, "sequence_id") == 0) {
        p->given = true;
        return decode_sequence_id(v, p, err);
    }
    if (strcmp(key, "sequence_start") == 0) {
        p->given = true;
        return decode_bool(v, key, &p->start, err);
    }
    if (strcmp(key, "sequence_end") == 0) {
        p->given = true;
        return decode_bool(v, key, &p->end, err);
    }
    if (strcmp(key, "block_cache_interval") != 0)
        return 1;
    int64_t n;
    if (which == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM)
        n = v->int64_param;
    else if (which == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM)
        n = v->uint64_param > INT64_MAX ? INT64_MAX : (int64_t)v->uint64_param;
    else
        return bs_err_set(err, BS_EINVAL,
                          "parameter 'block_cache_interval' must be an int64_param (or a "
                          "uint64_param)");
    if (n < 1 || n > INT32_MAX)
        return bs_err_set(err, BS_EINVAL,
                          "parameter 'block_cache_interval' is %s%lld (must be in [1, 2^31))",
                          n == INT64_MAX ? "at least " : "", (long long)n);
    p->cache_interval = n;
    return 0;
}

/* "output_datatype": a string_param naming FP32, BF16 or FP16. */
static int decode_out_dtype(const Inference__InferParameter *v, struct bs_infer_request *req,
                            struct bs_err *err)
{
    char nb[BS_SHOW_MAX + 4];
    if (v == NULL ||
        v->parameter_choice_case != INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM)
        return bs_err_set(err, BS_EINVAL,
                          "parameter 'output_datatype' must be a string_param (\"FP32\", "
                          "\"BF16\" or \"FP16\")");
    if (bs_codec_output_dtype(str_or_empty(v->string_param), &req->out_dtype) != 0)
        return bs_err_set(err, BS_EINVAL,
                          "parameter 'output_datatype' is '%s' (accepted: FP32, BF16, FP16)",
                          bs_show(nb, str_or_empty(v->string_param)));
    req->has_out_dtype = true;
    return 0;
}

static int decode_params(const req_msg_t *m, struct bs_infer_request *req, struct bs_err *err)
{
    int rc;
    for (size_t i = 0; i < m->n_parameters; i++) {
        const char *key = str_or_empty(m->parameters[i]->key);
        const Inference__InferParameter *v = m->parameters[i]->value;
        int which = v ? (int)v->parameter_choice_case : 0;
        if (strcmp(key, "stream_intermediate") == 0) {
            if (which != INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM)
                return bs_err_set(err, BS_EINVAL,
                                  "parameter 'stream_intermediate' must be a bool_param");
            req->stream_intermediate = v->bool_param != 0;
        } else if (strcmp(key, "timeout") == 0) {
            if (which != INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM)
                return bs_err_set(err, BS_EINVAL,
                                  "parameter 'timeout' must be an int64_param (microseconds)");
            if (v->int64_param < 0)
                return bs_err_set(err, BS_EINVAL,
                                  "parameter 'timeout' is %lld (microseconds, must be >= 0)",
                                  (long long)v->int64_param);
            req->timeout_us = v->int64_param;
        } else if (strcmp(key, "priority") == 0) {
            if ((rc = decode_priority(v, req, err)) != 0)
                return rc;
        } else if (strcmp(key, "output_datatype") == 0) {
            if ((rc = decode_out_dtype(v, req, err)) != 0)
                return rc;
        } else if ((rc = decode_seq_param(key, v, &req->seq, err)) < 0) {
            return rc;
        }
    }
    return 0;
}

static int decode_outputs(const req_msg_t *m, struct bs_infer_request *req, struct bs_err *err)
{
    for (size_t i = 0; i < m->n_outputs; i++) {
        const char *name = str_or_empty(m->outputs[i]->name);
        char nb[BS_SHOW_MAX + 4];
        if (strcmp(name, "output") != 0)
            return bs_err_set(err, BS_EINVAL, "unknown output '%s' (the model has 'output')",
                              bs_show(nb, name));
        if (i > 0)
            return bs_err_set(err, BS_EINVAL, "output 'output' requested twice");
        const Inference__ModelInferRequest__InferRequestedOutputTensor *o = m->outputs[i];
        bool size_given = false, off_given = false;
        for (size_t k = 0; k < o->n_parameters; k++) {
            int rc = shm_param(str_or_empty(o->parameters[k]->key), o->parameters[k]->value,
                               "output", name, &req->out_shm, &size_given, &off_given, err);
            if (rc != 0)
                return rc;
        }
        int rc = shm_finish("output", name, &req->out_shm, size_given, off_given, err);
        if (rc != 0)
            return rc;
    }
    req->want_output = true; /* empty list: every output; otherwise "output" was named */
    return 0;
}

/* A protobuf-c allocator that fails once a budget of bytes is spent. Blocks
 * come from malloc, so the message is freed with the default allocator. */
struct unpack_budget {
    size_t left;
    bool exceeded;
};

static void *budget_alloc(void *data, size_t size)
{
    struct unpack_budget *b = data;
    if (size > b->left) {
        b->exceeded = true;
        return NULL;
    }
    b->left -= size;
    return malloc(size);
}

static void budget_free(void *data, void *p)
{
    free(p);
}

static int unpack(const uint8_t *data, size_t len, req_msg_t **msg, struct bs_err *err)
{
    static const uint8_t nothing[1];
    *msg = NULL;
    int rc = bs_pb_check_strings(&inference__model_infer_request__descriptor, data, len, err);
    if (rc != 0)
        return rc;
    size_t budget = UNPACK_BUDGET_SLACK;
    if (len > (SIZE_MAX - budget) / UNPACK_BUDGET_FACTOR)
        budget = SIZE_MAX;
    else
        budget += len * UNPACK_BUDGET_FACTOR;
    struct unpack_budget b = {.left = budget};
    ProtobufCAllocator alloc = {.alloc = budget_alloc, .free = budget_free, .allocator_data = &b};
    *msg = inference__model_infer_request__unpack(&alloc, len, data ? data : nothing);
    if (*msg == NULL && b.exceeded)
        return bs_err_set(err, BS_ERANGE,
                          "ModelInferRequest of %zu bytes needs more than %zu bytes to unpack "
                          "(send tensors in raw_input_contents or packed contents)",
                          len, budget);
    if (*msg == NULL)
        return bs_err_set(err, BS_EINVAL, "malformed ModelInferRequest");
    return 0;
}

/* Validate an unpacked (or built) message into req, keeping the labels on error. */
static int validate(req_msg_t *m, const struct bs_codec_limits *lim, struct bs_infer_request *req,
                    struct bs_err *err)
{
    int rc = 0;
    req->model_name = str_or_empty(m->model_name);
    req->model_version = str_or_empty(m->model_version);
    req->id = str_or_empty(m->id);
    if (req->model_name[0] == '\0')
        rc = bs_err_set(err, BS_EINVAL, "model_name is required");
    if (rc == 0)
        rc = decode_params(m, req, err);
    if (rc == 0)
        rc = decode_inputs(m, lim, req, err);
    if (rc == 0)
        rc = decode_outputs(m, req, err);
    if (rc != 0) { /* keep the labels only */
        for (int i = 0; i < BS_CODEC_MAX_INPUTS; i++)
            free(req->owned[i]);
        memset(req->owned, 0, sizeof(req->owned));
        memset(req->inputs, 0, sizeof(req->inputs));
        memset(req->in_shm, 0, sizeof(req->in_shm));
        memset(&req->out_shm, 0, sizeof(req->out_shm));
        req->n_inputs = 0;
    }
    return rc;
}

int bs_codec_decode_infer_labeled(const uint8_t *data, size_t len,
                                  const struct bs_codec_limits *lim, struct bs_infer_request *req,
                                  struct bs_err *err)
{
    assert(lim != NULL && req != NULL);
    memset(req, 0, sizeof(*req));
    req_msg_t *m;
    int rc = unpack(data, len, &m, err);
    if (rc != 0)
        return rc;
    req->msg = m;
    return validate(m, lim, req, err);
}

int bs_codec_decode_infer_msg(void *msg, const struct bs_codec_limits *lim,
                              struct bs_infer_request *req, struct bs_err *err)
{
    assert(msg != NULL && lim != NULL && req != NULL);
    memset(req, 0, sizeof(*req)); /* req->msg stays NULL: the caller owns msg */
    return validate(msg, lim, req, err);
}

int bs_codec_decode_infer(const uint8_t *data, size_t len, const struct bs_codec_limits *lim,
                          struct bs_infer_request *req, struct bs_err *err)
{
    int rc = bs_codec_decode_infer_labeled(data, len, lim, req, err);
    if (rc != 0)
        bs_codec_request_free(req);
    return rc;
}

/* ---- streams ------------------------------------------------------------- */

int bs_codec_encode_stream(const uint8_t *resp, size_t resp_len, uint8_t **data, size_t *len,
                           struct bs_err *err)
{
    /* ModelStreamInferResponse { infer_response = 2 }: tag 0x12, varint length, bytes. */
    uint8_t *buf = resp_len <= SIZE_MAX - 11 ? malloc(resp_len + 11) : NULL;
    *data = NULL;
    *len = 0;
    if (buf == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory for a %zu-byte stream response", resp_len);
    size_t o = 0;
    buf[o++] = 0x12;
    for (uint64_t v = resp_len;; v >>= 7) {
        buf[o++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        if (v <= 0x7f)
            break;
    }
    if (resp_len > 0)
        memcpy(buf + o, resp, resp_len);
    *data = buf;
    *len = o + resp_len;
    return 0;
}

int bs_codec_encode_stream_error(const char *model_name, const char *id, const char *error,
                                 uint8_t **data, size_t *len, struct bs_err *err)
{
    Inference__ModelInferResponse ir = INFERENCE__MODEL_INFER_RESPONSE__INIT;
    Inference__ModelStreamInferResponse r = INFERENCE__MODEL_STREAM_INFER_RESPONSE__INIT;
    ir.model_name = (char *)str_or_empty(model_name);
    ir.model_version = "1";
    ir.id = (char *)str_or_empty(id);
    r.error_message = (char *)str_or_empty(error);
    r.infer_response = &ir;
    size_t size = inference__model_stream_infer_response__get_packed_size(&r);
    uint8_t *buf = malloc(size > 0 ? size : 1);
    *data = NULL;
    *len = 0;
    if (buf == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory for a %zu-byte stream error", size);
    *len = inference__model_stream_infer_response__pack(&r, buf);
    *data = buf;
    return 0;
}

void bs_codec_request_free(struct bs_infer_request *req)
{
    if (req == NULL)
        return;
    for (int i = 0; i < BS_CODEC_MAX_INPUTS; i++)
        free(req->owned[i]);
    if (req->msg != NULL)
        inference__model_infer_request__free_unpacked(req->msg, NULL);
    memset(req, 0, sizeof(*req));
}

/* ---- encoding ------------------------------------------------------------ */

/* Everything one response needs, on the caller's stack: protobuf-c packs from
 * pointers, so the tensor data is referenced, not copied, until pack. */
struct response {
    Inference__ModelInferResponse msg;
    Inference__ModelInferResponse__InferOutputTensor out;
    Inference__ModelInferResponse__InferOutputTensor *outs[1];
    Inference__InferTensorContents contents;
    ProtobufCBinaryData raw;
    Inference__InferParameter final, cache;
    Inference__ModelInferResponse__ParametersEntry final_entry, cache_entry;
    Inference__ModelInferResponse__ParametersEntry *params[2];
    Inference__InferParameter shm[3]; /* the output's shared_memory_* parameters */
    Inference__ModelInferResponse__InferOutputTensor__ParametersEntry shm_entry[3];
    Inference__ModelInferResponse__InferOutputTensor__ParametersEntry *shm_params[3];
};

/* Echo the output's shared memory parameters on its tensor (region, byte
 * size, offset), in the types Triton's clients send them. */
static void encode_output_shm(struct response *r, const struct bs_shm_ref *ref)
{
    static const char *const keys[3] = {"shared_memory_region", "shared_memory_byte_size",
                                        "shared_memory_offset"};
    for (int i = 0; i < 3; i++) {
        Inference__InferParameter *p = &r->shm[i];
        *p = (Inference__InferParameter)INFERENCE__INFER_PARAMETER__INIT;
        if (i == 0) {
            p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
            p->string_param = (char *)ref->region;
        } else {
            uint64_t v = i == 1 ? ref->byte_size : ref->offset;
            p->parameter_choice_case =
                v <= INT64_MAX ? INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM
                               : INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM;
            p->int64_param = (int64_t)v;
            if (v > INT64_MAX)
                p->uint64_param = v;
        }
        r->shm_entry[i] = (Inference__ModelInferResponse__InferOutputTensor__ParametersEntry)
            INFERENCE__MODEL_INFER_RESPONSE__INFER_OUTPUT_TENSOR__PARAMETERS_ENTRY__INIT;
        r->shm_entry[i].key = (char *)keys[i];
        r->shm_entry[i].value = p;
        r->shm_params[i] = &r->shm_entry[i];
    }
    r->out.n_parameters = 3;
    r->out.parameters = r->shm_params;
}

static int encode_output(struct response *r, const struct bs_tensor *out, bool raw,
                         const struct bs_shm_ref *shm, struct bs_err *err)
{
    if (out == NULL ||
        (out->type != BS_TYPE_F32 && out->type != BS_TYPE_BF16 && out->type != BS_TYPE_F16) ||
        out->n_dims < 0 || out->n_dims > BS_MAX_DIMS || !bs_tensor_is_contiguous(out))
        return bs_err_set(err, BS_EINTERNAL,
                          "output: expected a contiguous FP32, BF16 or FP16 tensor");
    int64_t numel = bs_tensor_nelements(out);
    if (numel > 0 && out->data == NULL)
        return bs_err_set(err, BS_EINTERNAL, "output: no data");
    r->out = (Inference__ModelInferResponse__InferOutputTensor)
        INFERENCE__MODEL_INFER_RESPONSE__INFER_OUTPUT_TENSOR__INIT;
    r->out.name = "output";
    r->out.datatype = (char *)datatype_names[out->type];
    raw |= out->type != BS_TYPE_F32; /* no typed field for 16-bit floats */
    r->out.n_shape = (size_t)out->n_dims;
    r->out.shape = (int64_t *)out->ne;
    void *data = numel > 0 ? out->data : empty_data;
    if (shm->given) { /* the bytes are in shared memory */
        encode_output_shm(r, shm);
        numel = 0;
    }
    if (raw) {
        r->raw =
            (ProtobufCBinaryData){.len = (size_t)numel * bs_dtype_size(out->type), .data = data};
        r->msg.n_raw_output_contents = 1;
        r->msg.raw_output_contents = &r->raw;
    } else {
        r->contents = (Inference__InferTensorContents)INFERENCE__INFER_TENSOR_CONTENTS__INIT;
        r->contents.n_fp32_contents = (size_t)numel;
        r->contents.fp32_contents = data;
        r->out.contents = shm->given ? NULL : &r->contents;
    }
    r->outs[0] = &r->out;
    r->msg.n_outputs = 1;
    r->msg.outputs = r->outs;
    return 0;
}

int bs_codec_encode_infer(const struct bs_infer_request *req, const struct bs_tensor *out,
                          int final, uint8_t **data, size_t *len, struct bs_err *err)
{
    assert(req != NULL && data != NULL && len != NULL);
    *data = NULL;
    *len = 0;
    struct response r = {.msg = INFERENCE__MODEL_INFER_RESPONSE__INIT};
    const char *version = str_or_empty(req->model_version);
    r.msg.model_name = (char *)str_or_empty(req->model_name);
    r.msg.model_version = (char *)(version[0] ? version : "1");
    r.msg.id = (char *)str_or_empty(req->id);
    if (req->want_output) {
        int rc = encode_output(&r, out, req->raw_output, &req->out_shm, err);
        if (rc != 0)
            return rc;
    }
    if (final >= 0) {
        r.final = (Inference__InferParameter)INFERENCE__INFER_PARAMETER__INIT;
        r.final.parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM;
        r.final.bool_param = final != 0;
        r.final_entry = (Inference__ModelInferResponse__ParametersEntry)
            INFERENCE__MODEL_INFER_RESPONSE__PARAMETERS_ENTRY__INIT;
        r.final_entry.key = "triton_final_response";
        r.final_entry.value = &r.final;
        r.params[r.msg.n_parameters++] = &r.final_entry;
        r.msg.parameters = r.params;
    }
    if (req->block_cache != NULL) {
        r.cache = (Inference__InferParameter)INFERENCE__INFER_PARAMETER__INIT;
        r.cache.parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
        r.cache.string_param = (char *)req->block_cache;
        r.cache_entry = (Inference__ModelInferResponse__ParametersEntry)
            INFERENCE__MODEL_INFER_RESPONSE__PARAMETERS_ENTRY__INIT;
        r.cache_entry.key = "block_cache";
        r.cache_entry.value = &r.cache;
        r.params[r.msg.n_parameters++] = &r.cache_entry;
        r.msg.parameters = r.params;
    }
    size_t size = inference__model_infer_response__get_packed_size(&r.msg);
    uint8_t *buf = malloc(size > 0 ? size : 1);
    if (buf == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory for a %zu-byte response", size);
    *len = inference__model_infer_response__pack(&r.msg, buf);
    *data = buf;
    return 0;
}
