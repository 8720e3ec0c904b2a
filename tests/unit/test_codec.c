/* The ModelInferRequest/ModelInferResponse codec: requests are built with the
 * generated protobuf-c API and packed to bytes, as a client would send them. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "codec.h"
#include "grpc_service.pb-c.h"

/* ---- building requests --------------------------------------------------- */

#define B_MAX 12

struct builder {
    Inference__ModelInferRequest msg;
    Inference__ModelInferRequest__InferInputTensor in[B_MAX];
    Inference__ModelInferRequest__InferInputTensor *in_ptrs[B_MAX];
    Inference__InferTensorContents contents[B_MAX];
    int64_t shapes[B_MAX][8];
    ProtobufCBinaryData raw[B_MAX];
    Inference__InferParameter values[B_MAX];
    Inference__ModelInferRequest__ParametersEntry params[B_MAX];
    Inference__ModelInferRequest__ParametersEntry *param_ptrs[B_MAX];
    Inference__ModelInferRequest__InferRequestedOutputTensor outs[B_MAX];
    Inference__ModelInferRequest__InferRequestedOutputTensor *out_ptrs[B_MAX];
};

static const struct bs_codec_limits limits = {.max_elements = 1 << 20, .max_inputs = 4};

static void b_init(struct builder *b, const char *model)
{
    memset(b, 0, sizeof(*b));
    b->msg = (Inference__ModelInferRequest)INFERENCE__MODEL_INFER_REQUEST__INIT;
    b->msg.model_name = (char *)model;
    b->msg.inputs = b->in_ptrs;
    b->msg.raw_input_contents = b->raw;
    b->msg.parameters = b->param_ptrs;
    b->msg.outputs = b->out_ptrs;
}

/* Add an input; its contents message is attached on first use of b_contents. */
static int b_input(struct builder *b, const char *name, const char *datatype, int n_dims,
                   const int64_t *shape)
{
    int i = (int)b->msg.n_inputs++;
    assert_true(i < B_MAX && n_dims <= 8);
    Inference__ModelInferRequest__InferInputTensor *in = &b->in[i];
    *in = (Inference__ModelInferRequest__InferInputTensor)
        INFERENCE__MODEL_INFER_REQUEST__INFER_INPUT_TENSOR__INIT;
    in->name = (char *)name;
    in->datatype = (char *)datatype;
    if (n_dims > 0)
        memcpy(b->shapes[i], shape, (size_t)n_dims * sizeof(*shape));
    in->n_shape = (size_t)n_dims;
    in->shape = b->shapes[i];
    b->in_ptrs[i] = in;
    return i;
}

static Inference__InferTensorContents *b_contents(struct builder *b, int i)
{
    if (b->in[i].contents == NULL) {
        b->contents[i] = (Inference__InferTensorContents)INFERENCE__INFER_TENSOR_CONTENTS__INIT;
        b->in[i].contents = &b->contents[i];
    }
    return b->in[i].contents;
}

static void b_raw(struct builder *b, const void *data, size_t len)
{
    size_t i = b->msg.n_raw_input_contents++;
    b->raw[i] = (ProtobufCBinaryData){.len = len, .data = (uint8_t *)data};
}

static Inference__InferParameter *b_param(struct builder *b, const char *key)
{
    size_t i = b->msg.n_parameters++;
    b->values[i] = (Inference__InferParameter)INFERENCE__INFER_PARAMETER__INIT;
    b->params[i] = (Inference__ModelInferRequest__ParametersEntry)
        INFERENCE__MODEL_INFER_REQUEST__PARAMETERS_ENTRY__INIT;
    b->params[i].key = (char *)key;
    b->params[i].value = &b->values[i];
    b->param_ptrs[i] = &b->params[i];
    return &b->values[i];
}

static void b_output(struct builder *b, const char *name)
{
    size_t i = b->msg.n_outputs++;
    b->outs[i] = (Inference__ModelInferRequest__InferRequestedOutputTensor)
        INFERENCE__MODEL_INFER_REQUEST__INFER_REQUESTED_OUTPUT_TENSOR__INIT;
    b->outs[i].name = (char *)name;
    b->out_ptrs[i] = &b->outs[i];
}

static uint8_t *b_pack(const struct builder *b, size_t *len)
{
    size_t size = inference__model_infer_request__get_packed_size(&b->msg);
    uint8_t *buf = malloc(size + 1);
    assert_non_null(buf);
    *len = inference__model_infer_request__pack(&b->msg, buf);
    assert_int_equal(*len, size);
    return buf;
}

/* Pack and decode; the packed bytes are freed at once, so decoded tensors
 * must not point into them (ASan checks). */
static int b_decode(const struct builder *b, const struct bs_codec_limits *lim,
                    struct bs_infer_request *req, struct bs_err *err)
{
    size_t len;
    uint8_t *buf = b_pack(b, &len);
    memset(err, 0, sizeof(*err));
    int rc = bs_codec_decode_infer(buf, len, lim, req, err);
    free(buf);
    return rc;
}

static void assert_empty(const struct bs_infer_request *req)
{
    static const struct bs_infer_request zero;
    assert_memory_equal(req, &zero, sizeof(zero));
}

/* Decoding fails with code, a message containing want, and an empty request. */
static void expect_error_lim(const struct builder *b, const struct bs_codec_limits *lim, int code,
                             const char *want)
{
    struct bs_infer_request req;
    struct bs_err err;
    int rc = b_decode(b, lim, &req, &err);
    if (rc != code || strstr(err.msg, want) == NULL)
        fail_msg("got %d \"%s\", want %d \"%s\"", rc, err.msg, code, want);
    assert_int_equal(err.code, code);
    assert_empty(&req);
    bs_codec_request_free(&req);
}

static void expect_error(const struct builder *b, int code, const char *want)
{
    expect_error_lim(b, &limits, code, want);
}

static const int64_t shape23[] = {2, 3};
static const float vals6[] = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e30f};

/* ---- decoding ------------------------------------------------------------ */

static void test_decode_raw_fp32(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "dit_block");
    b.msg.model_version = "3";
    b.msg.id = "req-42";
    b_input(&b, "hidden_states", "FP32", 2, shape23);
    b_raw(&b, vals6, sizeof(vals6));
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_string_equal(req.model_name, "dit_block");
    assert_string_equal(req.model_version, "3");
    assert_string_equal(req.id, "req-42");
    assert_int_equal(req.n_inputs, 1);
    assert_string_equal(req.inputs[0].name, "hidden_states");
    const struct bs_tensor *t = &req.inputs[0].t;
    assert_int_equal(t->type, BS_TYPE_F32);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 2);
    assert_int_equal(t->ne[1], 3);
    assert_int_equal(t->nb[1], 4);
    assert_int_equal(t->nb[0], 12);
    assert_memory_equal(t->data, vals6, sizeof(vals6));
    /* Zero copy: the tensor is the unpacked message's bytes field. */
    const Inference__ModelInferRequest *m = req.msg;
    assert_ptr_equal(t->data, m->raw_input_contents[0].data);
    assert_null(req.owned[0]);
    assert_true(req.raw_output);
    assert_true(req.want_output);
    assert_false(req.stream_intermediate);
    assert_int_equal(req.timeout_us, 0);
    bs_codec_request_free(&req);
    assert_empty(&req);
}

static void test_decode_defaults(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "m");
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_string_equal(req.model_version, "");
    assert_string_equal(req.id, "");
    assert_int_equal(req.n_inputs, 0);
    assert_false(req.raw_output);
    assert_true(req.want_output);
    bs_codec_request_free(&req);
}

static void test_decode_typed_fp32(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "m");
    int i = b_input(&b, "x", "FP32", 2, shape23);
    b_contents(&b, i)->n_fp32_contents = 6;
    b_contents(&b, i)->fp32_contents = (float *)vals6;
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    const struct bs_tensor *t = &req.inputs[0].t;
    assert_int_equal(t->type, BS_TYPE_F32);
    assert_memory_equal(t->data, vals6, sizeof(vals6));
    const Inference__ModelInferRequest *m = req.msg;
    assert_ptr_equal(t->data, m->inputs[0]->contents->fp32_contents);
    assert_false(req.raw_output);
    bs_codec_request_free(&req);
}

static void test_decode_typed_int64(void **state)
{
    (void)state;
    static const int64_t ts[] = {999, -1, INT64_MAX};
    static const int64_t shape[] = {3};
    struct builder b;
    b_init(&b, "m");
    int i = b_input(&b, "timestep", "INT64", 1, shape);
    b_contents(&b, i)->n_int64_contents = 3;
    b_contents(&b, i)->int64_contents = (int64_t *)ts;
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    const struct bs_tensor *t = &req.inputs[0].t;
    assert_int_equal(t->type, BS_TYPE_I64);
    assert_int_equal(t->nb[0], 8);
    assert_memory_equal(t->data, ts, sizeof(ts));
    bs_codec_request_free(&req);
}

static void test_decode_typed_bool(void **state)
{
    (void)state;
    static const protobuf_c_boolean v[] = {0, 1, 1, 0};
    static const int64_t shape[] = {1, 4};
    struct builder b;
    b_init(&b, "m");
    int i = b_input(&b, "mask", "BOOL", 2, shape);
    b_contents(&b, i)->n_bool_contents = 4;
    b_contents(&b, i)->bool_contents = (protobuf_c_boolean *)v;
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    const struct bs_tensor *t = &req.inputs[0].t;
    assert_int_equal(t->type, BS_TYPE_BOOL);
    assert_int_equal(t->nb[1], 1);
    assert_int_equal(t->nb[0], 4);
    static const uint8_t want[] = {0, 1, 1, 0};
    assert_memory_equal(t->data, want, 4);
    assert_ptr_equal(req.owned[0], t->data); /* converted into a buffer the request owns */
    bs_codec_request_free(&req);
    bs_codec_request_free(&req); /* idempotent */
}

/* Raw contents of every datatype, in one request, in order. */
static void test_decode_raw_all_types(void **state)
{
    (void)state;
    static const uint16_t f16[] = {0x3c00, 0xc000}, b16[] = {0x3f80, 0x4000};
    static const int64_t i64[] = {7, -8};
    static const uint8_t bools[] = {0, 1, 2, 255}; /* canonicalised to 0/1 */
    static const int64_t s2[] = {2}, s4[] = {2, 2};
    struct builder b;
    b_init(&b, "m");
    b_input(&b, "a", "FP16", 1, s2);
    b_input(&b, "b", "BF16", 1, s2);
    b_input(&b, "c", "INT64", 1, s2);
    b_input(&b, "d", "BOOL", 2, s4);
    b_raw(&b, f16, sizeof(f16));
    b_raw(&b, b16, sizeof(b16));
    b_raw(&b, i64, sizeof(i64));
    b_raw(&b, bools, sizeof(bools));
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_int_equal(req.n_inputs, 4);
    static const enum bs_dtype types[] = {BS_TYPE_F16, BS_TYPE_BF16, BS_TYPE_I64, BS_TYPE_BOOL};
    for (int i = 0; i < 4; i++)
        assert_int_equal(req.inputs[i].t.type, types[i]);
    assert_string_equal(req.inputs[3].name, "d");
    assert_memory_equal(req.inputs[0].t.data, f16, sizeof(f16));
    assert_memory_equal(req.inputs[1].t.data, b16, sizeof(b16));
    assert_memory_equal(req.inputs[2].t.data, i64, sizeof(i64));
    static const uint8_t want[] = {0, 1, 1, 1};
    assert_memory_equal(req.inputs[3].t.data, want, 4);
    assert_true(req.raw_output);
    bs_codec_request_free(&req);
}

/* Scalars and empty tensors decode, and their data pointer is not NULL. */
static void test_decode_scalar_and_empty(void **state)
{
    (void)state;
    static const float one = 1.0f;
    static const int64_t empty[] = {0, 3};
    struct builder b;
    b_init(&b, "m");
    int i = b_input(&b, "s", "FP32", 0, NULL);
    b_contents(&b, i)->n_fp32_contents = 1;
    b_contents(&b, i)->fp32_contents = (float *)&one;
    b_input(&b, "e", "FP32", 2, empty);
    b_input(&b, "h", "FP16", 2, empty); /* empty FP16 needs no contents at all */
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_int_equal(req.inputs[0].t.n_dims, 0);
    assert_true(*(const float *)req.inputs[0].t.data == 1.0f);
    assert_int_equal(bs_tensor_nelements(&req.inputs[1].t), 0);
    assert_non_null(req.inputs[1].t.data);
    assert_non_null(req.inputs[2].t.data);
    bs_codec_request_free(&req);

    b_init(&b, "m");
    b_input(&b, "e", "FP32", 2, empty);
    b_raw(&b, NULL, 0);
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_non_null(req.inputs[0].t.data);
    assert_true(req.raw_output);
    bs_codec_request_free(&req);
}

static void test_decode_parameters(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "m");
    Inference__InferParameter *p = b_param(&b, "stream_intermediate");
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM;
    p->bool_param = 1;
    p = b_param(&b, "timeout");
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    p->int64_param = 1000;
    p = b_param(&b, "sequence_id"); /* decoded, test_decode_sequence_parameters */
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    p->string_param = "abc";
    p = b_param(&b, "timeout"); /* a repeated key: the last one wins */
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    p->int64_param = 2500000;
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_true(req.stream_intermediate);
    assert_int_equal(req.timeout_us, 2500000);
    assert_int_equal(req.priority, 0); /* absent */
    bs_codec_request_free(&req);

    /* Triton's "priority": uint64_param, or int64_param as tritonclient sends it */
    b_init(&b, "m");
    p = b_param(&b, "priority");
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM;
    p->uint64_param = UINT64_MAX; /* above any model's levels: the batcher's default level */
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_true(req.priority == UINT64_MAX);
    bs_codec_request_free(&req);
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    p->int64_param = 3;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_int_equal(req.priority, 3);
    bs_codec_request_free(&req);
}

static void test_decode_parameter_errors(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "m");
    Inference__InferParameter *p = b_param(&b, "timeout");
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    p->int64_param = -1;
    expect_error(&b, BS_EINVAL, "parameter 'timeout' is -1");
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_DOUBLE_PARAM;
    p->double_param = 1.0;
    expect_error(&b, BS_EINVAL, "parameter 'timeout' must be an int64_param");

    b_init(&b, "m");
    p = b_param(&b, "stream_intermediate");
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    p->int64_param = 1;
    expect_error(&b, BS_EINVAL, "parameter 'stream_intermediate' must be a bool_param");
    b.params[0].value = NULL; /* an entry without a value */
    expect_error(&b, BS_EINVAL, "parameter 'stream_intermediate' must be a bool_param");

    b_init(&b, "m");
    p = b_param(&b, "priority");
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    p->int64_param = -1;
    expect_error(&b, BS_EINVAL, "parameter 'priority' is -1 (must be >= 0)");
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    p->string_param = "1";
    expect_error(&b, BS_EINVAL, "parameter 'priority' must be a uint64_param or an int64_param");
    b.params[0].value = NULL;
    expect_error(&b, BS_EINVAL, "parameter 'priority' must be a uint64_param or an int64_param");
}

/* Decode one parameter of the given kind into req (0) or fail. */
static int seq_param(const char *key, int kind, int64_t i, uint64_t u, const char *str,
                     struct bs_infer_request *req, struct bs_err *err)
{
    struct builder b;
    b_init(&b, "m");
    Inference__InferParameter *p = b_param(&b, key);
    p->parameter_choice_case = kind;
    p->int64_param = i;
    if (kind == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM)
        p->uint64_param = u;
    if (kind == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM)
        p->bool_param = i != 0;
    if (kind == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM)
        p->string_param = (char *)str;
    if (kind == INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_DOUBLE_PARAM)
        p->double_param = 1.0;
    return b_decode(&b, &limits, req, err);
}

#define K_I64  INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM
#define K_U64  INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM
#define K_STR  INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM
#define K_BOOL INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM
#define K_DBL  INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_DOUBLE_PARAM

/* Triton's sequence_id (uint64, int64 >= 0, or string), sequence_start and
 * sequence_end (bools), and block_cache_interval (int64 in [1, 2^31)). A
 * string id of digits is that number; another string is a hash with the top
 * bit set, and messages name it by its text. */
static void test_decode_sequence_parameters(void **state)
{
    (void)state;
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(seq_param("sequence_id", K_U64, 0, 7, NULL, &req, &err), 0);
    assert_true(req.seq.given);
    assert_true(req.seq.id == 7);
    assert_string_equal(req.seq.name, "");
    bs_codec_request_free(&req);
    assert_int_equal(seq_param("sequence_id", K_I64, 9, 0, NULL, &req, &err), 0);
    assert_true(req.seq.id == 9);
    bs_codec_request_free(&req);
    assert_int_equal(seq_param("sequence_id", K_STR, 0, 0, "123", &req, &err), 0);
    assert_true(req.seq.id == 123);
    assert_string_equal(req.seq.name, "");
    bs_codec_request_free(&req);
    assert_int_equal(seq_param("sequence_id", K_STR, 0, 0, "18446744073709551615", &req, &err), 0);
    assert_true(req.seq.id == UINT64_MAX);
    bs_codec_request_free(&req);
    /* past 2^64 - 1, or not digits: a name */
    static const char *names[][2] = {{"18446744073709551616", "\"18446744073709551616\""},
                                     {"denoise\t7", "\"denoise?7\""},
                                     {"abc", "\"abc\""}};
    uint64_t ids[3];
    for (int i = 0; i < 3; i++) {
        assert_int_equal(seq_param("sequence_id", K_STR, 0, 0, names[i][0], &req, &err), 0);
        assert_true(req.seq.id >> 63 == 1);
        assert_string_equal(req.seq.name, names[i][1]);
        ids[i] = req.seq.id;
        bs_codec_request_free(&req);
    }
    assert_true(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    char long_name[200];
    memset(long_name, 'n', sizeof(long_name) - 1);
    long_name[sizeof(long_name) - 1] = '\0';
    assert_int_equal(seq_param("sequence_id", K_STR, 0, 0, long_name, &req, &err), 0);
    assert_int_equal(strlen(req.seq.name), 1 + 64 + 3 + 1); /* cut: "nnn...nnn..." */
    bs_codec_request_free(&req);
    /* wrong types */
    assert_int_equal(seq_param("sequence_id", K_I64, -1, 0, NULL, &req, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "parameter 'sequence_id' must be a uint64_param"));
    assert_int_equal(seq_param("sequence_id", K_BOOL, 1, 0, NULL, &req, &err), BS_EINVAL);
    assert_int_equal(seq_param("sequence_id", K_DBL, 0, 0, NULL, &req, &err), BS_EINVAL);
    assert_int_equal(seq_param("sequence_id", K_STR, 0, 0, "", &req, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "'sequence_id' is an empty string"));
    /* flags */
    assert_int_equal(seq_param("sequence_start", K_BOOL, 1, 0, NULL, &req, &err), 0);
    assert_true(req.seq.given && req.seq.start && !req.seq.end);
    bs_codec_request_free(&req);
    assert_int_equal(seq_param("sequence_end", K_I64, 1, 0, NULL, &req, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "parameter 'sequence_end' must be a bool_param"));
    /* block_cache_interval */
    assert_int_equal(seq_param("block_cache_interval", K_I64, 3, 0, NULL, &req, &err), 0);
    assert_int_equal(req.seq.cache_interval, 3);
    assert_false(req.seq.given); /* no sequence parameter */
    bs_codec_request_free(&req);
    assert_int_equal(seq_param("block_cache_interval", K_U64, 0, 4, NULL, &req, &err), 0);
    assert_int_equal(req.seq.cache_interval, 4);
    bs_codec_request_free(&req);
    assert_int_equal(seq_param("block_cache_interval", K_I64, 0, 0, NULL, &req, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "'block_cache_interval' is 0 (must be in [1, 2^31))"));
    assert_int_equal(seq_param("block_cache_interval", K_I64, -2, 0, NULL, &req, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "is -2"));
    assert_int_equal(seq_param("block_cache_interval", K_U64, 0, UINT64_MAX, NULL, &req, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "is at least 9223372036854775807"));
    assert_int_equal(seq_param("block_cache_interval", K_STR, 0, 0, "2", &req, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "'block_cache_interval' must be an int64_param"));
}

static void test_decode_outputs(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "m");
    b_output(&b, "output");
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_true(req.want_output);
    bs_codec_request_free(&req);

    b_output(&b, "output");
    expect_error(&b, BS_EINVAL, "output 'output' requested twice");
    b_init(&b, "m");
    b_output(&b, "sample");
    expect_error(&b, BS_EINVAL, "unknown output 'sample' (the model has 'output')");
    b_init(&b, "m");
    b_output(&b, "");
    expect_error(&b, BS_EINVAL, "unknown output ''");
}

static void test_decode_request_errors(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "");
    expect_error(&b, BS_EINVAL, "model_name is required");

    b_init(&b, "m");
    b_input(&b, "", "FP32", 0, NULL);
    expect_error(&b, BS_EINVAL, "input 0: name is required");

    b_init(&b, "m");
    static const int64_t none[] = {0};
    b_input(&b, "x", "FP32", 1, none);
    b_input(&b, "x", "FP32", 1, none);
    expect_error(&b, BS_EINVAL, "input 'x': name given twice");

    b_init(&b, "m");
    b_input(&b, "x", "FP64", 2, shape23);
    expect_error(&b, BS_EINVAL,
                 "input 'x': datatype 'FP64' is not supported (FP32, FP16, BF16, INT64, BOOL)");
    b.in[0].datatype = "fp32"; /* names are case-sensitive, as in Triton */
    expect_error(&b, BS_EINVAL, "datatype 'fp32' is not supported");
    b.in[0].datatype = "";
    expect_error(&b, BS_EINVAL, "input 'x': datatype '' is not supported");

    static const int64_t five[] = {1, 1, 1, 1, 1}, neg[] = {2, -3};
    b_init(&b, "m");
    b_input(&b, "x", "FP32", 5, five);
    expect_error(&b, BS_EINVAL, "input 'x': shape has 5 dims (at most 4)");
    b_init(&b, "m");
    b_input(&b, "x", "FP32", 2, neg);
    expect_error(&b, BS_EINVAL, "input 'x': shape[1] is -3");
}

static void test_decode_limits(void **state)
{
    (void)state;
    struct builder b;
    static const int64_t big[] = {1024, 1025};
    b_init(&b, "m");
    b_input(&b, "x", "FP32", 2, big);
    expect_error(&b, BS_ERANGE,
                 "input 'x': shape [1024, 1025] is too large (the limit is 1048576 elements");

    static const int64_t huge[] = {1LL << 40, 1LL << 40};
    b_init(&b, "m");
    b_input(&b, "y", "FP32", 2, huge);
    expect_error(&b, BS_ERANGE, "input 'y': shape [1099511627776, 1099511627776] is too large");
    static const struct bs_codec_limits unlimited = {.max_elements = INT64_MAX, .max_inputs = 8};
    expect_error_lim(&b, &unlimited, BS_ERANGE, "input 'y'"); /* overflows int64 */
    static const int64_t bytes_overflow[] = {1LL << 62};
    b_init(&b, "m");
    b_input(&b, "z", "INT64", 1, bytes_overflow); /* 2^62 elements fit, 2^65 bytes do not */
    expect_error_lim(&b, &unlimited, BS_ERANGE, "input 'z'");

    /* An empty tensor's other dims still count: strides must not overflow. */
    static const int64_t empty_huge[] = {0, 1LL << 40, 1LL << 40};
    b_init(&b, "m");
    b_input(&b, "e", "FP32", 3, empty_huge);
    expect_error(&b, BS_ERANGE, "input 'e'");

    b_init(&b, "m");
    for (int i = 0; i < 5; i++)
        b_input(&b, (const char *[]){"a", "b", "c", "d", "e"}[i], "FP32", 0, NULL);
    expect_error(&b, BS_ERANGE, "too many inputs: 5 (the limit is 4)");
    static const struct bs_codec_limits wide = {.max_elements = 16, .max_inputs = 100};
    for (int i = 5; i < BS_CODEC_MAX_INPUTS + 1; i++)
        b_input(&b, (const char *[]){"f", "g", "h", "i"}[i - 5], "FP32", 0, NULL);
    expect_error_lim(&b, &wide, BS_ERANGE, "too many inputs: 9 (the limit is 8)");

    /* Exactly at the limits is fine. */
    static const int64_t at[] = {4, 4};
    b_init(&b, "m");
    for (int i = 0; i < BS_CODEC_MAX_INPUTS; i++)
        b_input(&b, (const char *[]){"a", "b", "c", "d", "e", "f", "g", "h"}[i], "BOOL", 2, at);
    static const uint8_t sixteen[16];
    for (int i = 0; i < BS_CODEC_MAX_INPUTS; i++)
        b_raw(&b, sixteen, 16);
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &wide, &req, &err), 0);
    assert_int_equal(req.n_inputs, BS_CODEC_MAX_INPUTS);
    bs_codec_request_free(&req);
}

static void test_decode_raw_errors(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "m");
    b_input(&b, "x", "FP32", 2, shape23);
    b_raw(&b, vals6, 8);
    expect_error(&b, BS_EINVAL,
                 "input 'x': raw_input_contents[0] holds 8 bytes, expected 24 (FP32 [2, 3])");

    b_init(&b, "m");
    b_input(&b, "x", "FP32", 1, shape23);
    b_input(&b, "y", "FP32", 1, shape23);
    b_raw(&b, vals6, 8);
    expect_error(&b, BS_EINVAL, "input 'y': no raw_input_contents entry (1 entries for 2 inputs");
    b_raw(&b, vals6, 8);
    b_raw(&b, vals6, 8);
    expect_error(&b, BS_EINVAL, "raw_input_contents has 3 entries for 2 inputs");

    /* Raw for one input and typed for another. */
    b_init(&b, "m");
    b_input(&b, "x", "FP32", 1, shape23);
    b_input(&b, "y", "FP32", 1, shape23);
    b_raw(&b, vals6, 8);
    b_raw(&b, vals6, 8);
    b_contents(&b, 1)->n_fp32_contents = 2;
    b_contents(&b, 1)->fp32_contents = (float *)vals6;
    expect_error(&b, BS_EINVAL,
                 "input 'y': contents must be empty when raw_input_contents is used");
}

static void test_decode_typed_errors(void **state)
{
    (void)state;
    static const int64_t i64[6];
    struct builder b;
    b_init(&b, "m");
    int i = b_input(&b, "x", "FP32", 2, shape23);
    b_contents(&b, i)->n_int64_contents = 6;
    b_contents(&b, i)->int64_contents = (int64_t *)i64;
    expect_error(
        &b, BS_EINVAL,
        "input 'x': FP32 data goes in contents.fp32_contents, not contents.int64_contents");
    b.in[0].datatype = "BOOL";
    expect_error(&b, BS_EINVAL, "input 'x': BOOL data goes in contents.bool_contents");
    b.in[0].datatype = "INT64";
    b_contents(&b, i)->n_int64_contents = 5;
    expect_error(&b, BS_EINVAL,
                 "input 'x': contents.int64_contents holds 5 values, expected 6 (INT64 [2, 3])");

    b_init(&b, "m");
    b_input(&b, "x", "FP32", 2, shape23);
    expect_error(&b, BS_EINVAL, "input 'x': contents.fp32_contents holds 0 values, expected 6");

    b_init(&b, "m");
    i = b_input(&b, "h", "FP16", 2, shape23);
    expect_error(&b, BS_EINVAL, "input 'h': FP16 data must be sent in raw_input_contents");
    b_contents(&b, i)->n_fp32_contents = 6;
    b_contents(&b, i)->fp32_contents = (float *)vals6;
    expect_error(&b, BS_EINVAL, "input 'h': FP16 data must be sent in raw_input_contents");
    b.in[0].datatype = "BF16";
    expect_error(&b, BS_EINVAL, "input 'h': BF16 data must be sent in raw_input_contents");
}

/* Client-chosen names are cut and cleaned in messages. */
static void test_decode_long_name(void **state)
{
    (void)state;
    char name[300];
    memset(name, 'n', sizeof(name) - 1);
    name[sizeof(name) - 1] = '\0';
    name[3] = '\n';
    struct builder b;
    b_init(&b, "m");
    b_input(&b, name, "FP64", 0, NULL);
    expect_error(&b, BS_EINVAL, "input 'nnn?nnnn");
    expect_error(&b, BS_EINVAL, "nnnn...': datatype 'FP64'");

    /* A cut never splits a UTF-8 character: byte 64 continues the 'é' at 63. */
    memset(name, 'a', 63);
    strcpy(name + 63, "\xc3\xa9zzz");
    b.in[0].name = name;
    char want[96];
    snprintf(want, sizeof(want), "input '%.63s...': datatype", name);
    expect_error(&b, BS_EINVAL, want);
}

/* A string with an embedded NUL byte is refused, not served cut at the NUL
 * (protobuf-c packs strings with strlen: the NUL goes into the packed bytes). */
static void test_decode_nul_in_string(void **state)
{
    (void)state;
    static const char *const marked[] = {"vae_mid_attention#evil", "x#y", "FP32#junk"};
    static const char *const paths[] = {"model_name", "inputs[0].name", "inputs[0].datatype"};
    for (size_t f = 0; f < BS_ARRAY_LEN(marked); f++) {
        struct builder b;
        b_init(&b, f == 0 ? marked[0] : "vae_mid_attention");
        b_input(&b, f == 1 ? marked[1] : "x", f == 2 ? marked[2] : "FP32", 2, shape23);
        b_raw(&b, vals6, sizeof(vals6));
        size_t len;
        uint8_t *buf = b_pack(&b, &len);
        uint8_t *at = memmem(buf, len, marked[f], strlen(marked[f]));
        assert_non_null(at);
        at[strchr(marked[f], '#') - marked[f]] = '\0';
        struct bs_infer_request req;
        struct bs_err err = {0};
        char want[128];
        snprintf(want, sizeof(want), "field \"%s\" contains a NUL byte", paths[f]);
        int rc = bs_codec_decode_infer(buf, len, &limits, &req, &err);
        if (rc != BS_EINVAL || strstr(err.msg, want) == NULL || strstr(err.msg, "NUL") == NULL)
            fail_msg("%s: got %d \"%s\", want \"%s\"", marked[f], rc, err.msg, want);
        assert_int_equal(err.code, BS_EINVAL);
        assert_empty(&req);
        bs_codec_request_free(&req);
        free(buf);
    }
}

/* Every prefix of a valid request and many random byte strings decode or
 * fail cleanly. */
static void test_decode_garbage(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "m");
    b_input(&b, "x", "FP32", 2, shape23);
    b_raw(&b, vals6, sizeof(vals6));
    Inference__InferParameter *p = b_param(&b, "timeout");
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    p->int64_param = 5;
    size_t len;
    uint8_t *buf = b_pack(&b, &len);
    struct bs_infer_request req;
    struct bs_err err;
    int malformed = 0;
    for (size_t n = 0; n < len; n++) {
        uint8_t *cut = malloc(n + 1); /* exact size: ASan sees any over-read */
        memcpy(cut, buf, n);
        int rc = bs_codec_decode_infer(cut, n, &limits, &req, &err);
        if (rc != 0) {
            assert_empty(&req);
            malformed += strstr(err.msg, "malformed ModelInferRequest") != NULL;
        }
        bs_codec_request_free(&req);
        free(cut);
    }
    assert_true(malformed > 0);
    assert_int_equal(bs_codec_decode_infer(NULL, 0, &limits, &req, &err), BS_EINVAL);
    assert_string_equal(err.msg, "model_name is required");

    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (int iter = 0; iter < 20000; iter++) {
        size_t n = (size_t)(iter % 97);
        uint8_t *junk = malloc(n + 1);
        memcpy(junk, buf, n < len ? n : len); /* a valid start, then noise */
        for (size_t k = (size_t)iter % 5; k < n; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            junk[k] = (uint8_t)x;
        }
        if (bs_codec_decode_infer(junk, n, &limits, &req, &err) != 0)
            assert_empty(&req);
        bs_codec_request_free(&req);
        free(junk);
    }
    free(buf);

    struct bs_infer_request zero = {0};
    bs_codec_request_free(&zero);
    bs_codec_request_free(NULL);
}

/* Wire fields that protobuf-c turns into a struct each (empty inputs, unknown
 * fields) cannot make one request allocate much more than its size. */
static void test_decode_amplification(void **state)
{
    (void)state;
    enum { N = 100000 };
    static const uint8_t field[][2] = {
        {0x2a, 0x00}, /* inputs: an empty InferInputTensor */
        {0x22, 0x00}, /* parameters: an empty map entry */
        {0x78, 0x00}, /* unknown field 15, varint 0 */
    };
    uint8_t *buf = malloc(3 + 2 * N);
    assert_non_null(buf);
    memcpy(buf, "\x0a\x01m", 3); /* model_name "m" */
    struct bs_infer_request req;
    struct bs_err err;
    for (size_t f = 0; f < BS_ARRAY_LEN(field); f++) {
        for (int i = 0; i < N; i++)
            memcpy(buf + 3 + 2 * i, field[f], 2);
        int rc = bs_codec_decode_infer(buf, 3 + 2 * N, &limits, &req, &err);
        if (rc != BS_ERANGE || strstr(err.msg, "needs more than") == NULL)
            fail_msg("field %zu: %d %s", f, rc, err.msg);
        assert_empty(&req);
    }
    free(buf);

    /* Dense legitimate contents still decode: 1-byte INT64 values take 8x. */
    struct builder b;
    b_init(&b, "m");
    int64_t shape[] = {N * 4};
    int i = b_input(&b, "t", "INT64", 1, shape);
    int64_t *v = calloc(N * 4, sizeof(int64_t));
    b_contents(&b, i)->n_int64_contents = N * 4;
    b_contents(&b, i)->int64_contents = v;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_int_equal(req.inputs[0].t.ne[0], N * 4);
    bs_codec_request_free(&req);
    free(v);
}

/* ---- encoding ------------------------------------------------------------ */

/* The parameter output_datatype: a string_param naming FP32, BF16 or FP16
 * exactly; absent, the request leaves the choice to the model. */
static void test_decode_output_datatype(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        enum bs_dtype type;
    } ok[] = {{"FP32", BS_TYPE_F32}, {"BF16", BS_TYPE_BF16}, {"FP16", BS_TYPE_F16}};
    struct builder b;
    struct bs_infer_request req;
    struct bs_err err;
    b_init(&b, "m");
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_false(req.has_out_dtype);
    bs_codec_request_free(&req);
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        b_init(&b, "m");
        Inference__InferParameter *p = b_param(&b, "output_datatype");
        p->parameter_choice_case = K_STR;
        p->string_param = (char *)ok[i].name;
        assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
        assert_true(req.has_out_dtype);
        assert_int_equal(req.out_dtype, ok[i].type);
        bs_codec_request_free(&req);
        enum bs_dtype t = BS_TYPE_COUNT;
        assert_int_equal(bs_codec_output_dtype(ok[i].name, &t), 0);
        assert_int_equal(t, ok[i].type);
    }
    /* a repeated key: the last one wins */
    b_init(&b, "m");
    Inference__InferParameter *p = b_param(&b, "output_datatype");
    p->parameter_choice_case = K_STR;
    p->string_param = "BF16";
    p = b_param(&b, "output_datatype");
    p->parameter_choice_case = K_STR;
    p->string_param = "FP16";
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_int_equal(req.out_dtype, BS_TYPE_F16);
    bs_codec_request_free(&req);

    static const char *const bad[] = {"fp16", "FP64", "INT64", "BOOL", "", "BF16 ", "F32"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        enum bs_dtype t = BS_TYPE_I64;
        assert_int_equal(bs_codec_output_dtype(bad[i], &t), -1);
        assert_int_equal(t, BS_TYPE_I64); /* untouched */
        b_init(&b, "m");
        p = b_param(&b, "output_datatype");
        p->parameter_choice_case = K_STR;
        p->string_param = (char *)bad[i];
        expect_error(&b, BS_EINVAL, "(accepted: FP32, BF16, FP16)");
    }
    assert_int_equal(bs_codec_output_dtype(NULL, &(enum bs_dtype){0}), -1);
    b_init(&b, "m");
    p = b_param(&b, "output_datatype");
    p->parameter_choice_case = K_STR;
    p->string_param = "FP\x01\x7f";
    expect_error(&b, BS_EINVAL, "parameter 'output_datatype' is 'FP\?\?'");
    p->parameter_choice_case = K_I64;
    p->int64_param = 16;
    expect_error(&b, BS_EINVAL, "parameter 'output_datatype' must be a string_param");
    p->parameter_choice_case = K_BOOL;
    expect_error(&b, BS_EINVAL, "parameter 'output_datatype' must be a string_param");
    b.params[0].value = NULL;
    expect_error(&b, BS_EINVAL, "parameter 'output_datatype' must be a string_param");
}

static Inference__ModelInferResponse *encode_and_unpack(const struct bs_infer_request *req,
                                                        const struct bs_tensor *out, int final)
{
    uint8_t *data;
    size_t len;
    struct bs_err err;
    assert_int_equal(bs_codec_encode_infer(req, out, final, &data, &len, &err), 0);
    Inference__ModelInferResponse *res = inference__model_infer_response__unpack(NULL, len, data);
    free(data);
    assert_non_null(res);
    return res;
}

static const Inference__InferParameter *find_param(const Inference__ModelInferResponse *res,
                                                   const char *key)
{
    for (size_t i = 0; i < res->n_parameters; i++)
        if (strcmp(res->parameters[i]->key, key) == 0)
            return res->parameters[i]->value;
    return NULL;
}

static void test_encode_raw(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "dit_block");
    b.msg.id = "abc";
    b_input(&b, "x", "FP32", 2, shape23);
    b_raw(&b, vals6, sizeof(vals6));
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);

    float out_data[6] = {1, 2, 3, 4, 5, 6};
    struct bs_tensor out = bs_tensor_make(BS_TYPE_F32, 2, shape23, out_data);
    Inference__ModelInferResponse *res = encode_and_unpack(&req, &out, -1);
    assert_string_equal(res->model_name, "dit_block");
    assert_string_equal(res->model_version, "1"); /* not given: "1" */
    assert_string_equal(res->id, "abc");
    assert_int_equal(res->n_parameters, 0);
    assert_int_equal(res->n_outputs, 1);
    const Inference__ModelInferResponse__InferOutputTensor *o = res->outputs[0];
    assert_string_equal(o->name, "output");
    assert_string_equal(o->datatype, "FP32");
    assert_int_equal(o->n_shape, 2);
    assert_int_equal(o->shape[0], 2);
    assert_int_equal(o->shape[1], 3);
    assert_null(o->contents);
    assert_int_equal(res->n_raw_output_contents, 1);
    assert_int_equal(res->raw_output_contents[0].len, sizeof(out_data));
    assert_memory_equal(res->raw_output_contents[0].data, out_data, sizeof(out_data));
    inference__model_infer_response__free_unpacked(res, NULL);

    /* A stream's last response. */
    res = encode_and_unpack(&req, &out, 1);
    const Inference__InferParameter *p = find_param(res, "triton_final_response");
    assert_non_null(p);
    assert_int_equal(p->parameter_choice_case,
                     INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM);
    assert_true(p->bool_param);
    assert_null(find_param(res, "block_cache"));
    inference__model_infer_response__free_unpacked(res, NULL);

    /* A call of a caching sequence says what it did, next to the final flag. */
    req.block_cache = "reuse";
    res = encode_and_unpack(&req, &out, 1);
    assert_int_equal(res->n_parameters, 2);
    assert_non_null(find_param(res, "triton_final_response"));
    p = find_param(res, "block_cache");
    assert_non_null(p);
    assert_int_equal(p->parameter_choice_case,
                     INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM);
    assert_string_equal(p->string_param, "reuse");
    inference__model_infer_response__free_unpacked(res, NULL);
    bs_codec_request_free(&req);
}

static void test_encode_typed(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "m");
    b.msg.model_version = "7";
    int i = b_input(&b, "x", "FP32", 2, shape23);
    b_contents(&b, i)->n_fp32_contents = 6;
    b_contents(&b, i)->fp32_contents = (float *)vals6;
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);

    static const int64_t shape[] = {1, 2, 2, 1};
    float out_data[4] = {0.5f, -1, 2, 1e-3f};
    struct bs_tensor out = bs_tensor_make(BS_TYPE_F32, 4, shape, out_data);
    Inference__ModelInferResponse *res = encode_and_unpack(&req, &out, 0);
    assert_string_equal(res->model_version, "7");
    assert_string_equal(res->id, "");
    assert_int_equal(res->n_raw_output_contents, 0);
    assert_int_equal(res->n_outputs, 1);
    const Inference__ModelInferResponse__InferOutputTensor *o = res->outputs[0];
    assert_int_equal(o->n_shape, 4);
    assert_memory_equal(o->shape, shape, sizeof(shape));
    assert_non_null(o->contents);
    assert_int_equal(o->contents->n_fp32_contents, 4);
    assert_memory_equal(o->contents->fp32_contents, out_data, sizeof(out_data));
    const Inference__InferParameter *p = find_param(res, "triton_final_response");
    assert_non_null(p);
    assert_false(p->bool_param);
    inference__model_infer_response__free_unpacked(res, NULL);

    /* An intermediate result nobody asked for as an output: no outputs. */
    req.want_output = false;
    res = encode_and_unpack(&req, NULL, 0);
    assert_int_equal(res->n_outputs, 0);
    assert_int_equal(res->n_raw_output_contents, 0);
    assert_int_equal(res->n_parameters, 1);
    inference__model_infer_response__free_unpacked(res, NULL);
    bs_codec_request_free(&req);
}

/* BF16 and FP16 outputs: their datatype, their bytes, always raw (no typed
 * field holds them), also for a request with typed inputs. */
static void test_encode_narrow(void **state)
{
    (void)state;
    struct builder b;
    b_init(&b, "m");
    int i = b_input(&b, "x", "FP32", 2, shape23);
    b_contents(&b, i)->n_fp32_contents = 6;
    b_contents(&b, i)->fp32_contents = (float *)vals6;
    struct bs_infer_request req;
    struct bs_err err;
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_false(req.raw_output);
    static const enum bs_dtype types[] = {BS_TYPE_BF16, BS_TYPE_F16};
    for (int k = 0; k < 2; k++) {
        uint16_t bits[6] = {0x3f80, 0xc000, 0x4050, 0, 0x8000, 0x7149};
        struct bs_tensor out = bs_tensor_make(types[k], 2, shape23, bits);
        Inference__ModelInferResponse *res = encode_and_unpack(&req, &out, -1);
        const Inference__ModelInferResponse__InferOutputTensor *o = res->outputs[0];
        assert_string_equal(o->datatype, k == 0 ? "BF16" : "FP16");
        assert_int_equal(o->n_shape, 2);
        assert_null(o->contents);
        assert_int_equal(res->n_raw_output_contents, 1);
        assert_int_equal(res->raw_output_contents[0].len, sizeof(bits));
        assert_memory_equal(res->raw_output_contents[0].data, bits, sizeof(bits));
        inference__model_infer_response__free_unpacked(res, NULL);
    }
    /* in shared memory: the datatype, no bytes */
    req.out_shm = (struct bs_shm_ref){.given = true, .region = "r", .byte_size = 12};
    uint16_t bits[6] = {0};
    struct bs_tensor out = bs_tensor_make(BS_TYPE_BF16, 2, shape23, bits);
    Inference__ModelInferResponse *res = encode_and_unpack(&req, &out, -1);
    assert_string_equal(res->outputs[0]->datatype, "BF16");
    assert_int_equal(res->n_raw_output_contents, 1);
    assert_int_equal(res->raw_output_contents[0].len, 0);
    inference__model_infer_response__free_unpacked(res, NULL);
    req.out_shm = (struct bs_shm_ref){0};
    bs_codec_request_free(&req);
}

static void test_encode_errors(void **state)
{
    (void)state;
    struct bs_infer_request req = {.model_name = "m", .want_output = true};
    uint8_t *data = (uint8_t *)&req;
    size_t len = 1;
    struct bs_err err;
    int64_t ne[] = {2};
    int64_t i64[2];
    struct bs_tensor out = bs_tensor_make(BS_TYPE_I64, 1, ne, i64);
    assert_int_equal(bs_codec_encode_infer(&req, &out, -1, &data, &len, &err), BS_EINTERNAL);
    assert_null(data);
    assert_int_equal(len, 0);
    out = bs_tensor_make(BS_TYPE_F32, 1, ne, NULL);
    assert_int_equal(bs_codec_encode_infer(&req, &out, -1, &data, &len, &err), BS_EINTERNAL);
    assert_int_equal(bs_codec_encode_infer(&req, NULL, -1, &data, &len, &err), BS_EINTERNAL);

    /* Zero elements and a zeroed request encode fine. */
    ne[0] = 0;
    out = bs_tensor_make(BS_TYPE_F32, 1, ne, NULL);
    req.raw_output = true;
    Inference__ModelInferResponse *res = encode_and_unpack(&req, &out, -1);
    assert_int_equal(res->outputs[0]->shape[0], 0);
    inference__model_infer_response__free_unpacked(res, NULL);
    struct bs_infer_request zero = {0};
    res = encode_and_unpack(&zero, NULL, -1);
    assert_string_equal(res->model_name, "");
    inference__model_infer_response__free_unpacked(res, NULL);
}

/* ---- shared memory parameters ------------------------------------------------ */

typedef Inference__ModelInferRequest__InferInputTensor__ParametersEntry in_param_t;
typedef Inference__ModelInferRequest__InferRequestedOutputTensor__ParametersEntry out_param_t;

/* Up to 4 parameters on each of 3 inputs and on the output. */
struct shm_params {
    Inference__InferParameter v[4][4];
    in_param_t in[3][4];
    in_param_t *in_ptrs[3][4];
    out_param_t out[4];
    out_param_t *out_ptrs[4];
};

static Inference__InferParameter *in_param(struct builder *b, struct shm_params *sp, int i,
                                           const char *key)
{
    size_t k = b->in[i].n_parameters++;
    sp->v[i][k] = (Inference__InferParameter)INFERENCE__INFER_PARAMETER__INIT;
    sp->in[i][k] =
        (in_param_t)INFERENCE__MODEL_INFER_REQUEST__INFER_INPUT_TENSOR__PARAMETERS_ENTRY__INIT;
    sp->in[i][k].key = (char *)key;
    sp->in[i][k].value = &sp->v[i][k];
    sp->in_ptrs[i][k] = &sp->in[i][k];
    b->in[i].parameters = sp->in_ptrs[i];
    return &sp->v[i][k];
}

static Inference__InferParameter *out_param(struct builder *b, struct shm_params *sp,
                                            const char *key)
{
    size_t k = b->outs[0].n_parameters++;
    sp->v[3][k] = (Inference__InferParameter)INFERENCE__INFER_PARAMETER__INIT;
    sp->out[k] = (out_param_t)
        INFERENCE__MODEL_INFER_REQUEST__INFER_REQUESTED_OUTPUT_TENSOR__PARAMETERS_ENTRY__INIT;
    sp->out[k].key = (char *)key;
    sp->out[k].value = &sp->v[3][k];
    sp->out_ptrs[k] = &sp->out[k];
    b->outs[0].parameters = sp->out_ptrs;
    return &sp->v[3][k];
}

static void set_str(Inference__InferParameter *p, const char *s)
{
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    p->string_param = (char *)s;
}

static void set_i64(Inference__InferParameter *p, int64_t v)
{
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    p->int64_param = v;
}

static void set_u64(Inference__InferParameter *p, uint64_t v)
{
    p->parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM;
    p->uint64_param = v;
}

/* Input "x" in region "reg" at offset 8, "y" in the message (raw), "z" in
 * "reg2" (uint64 byte size, no offset); the output in "out" at offset 16. */
static void shm_request(struct builder *b, struct shm_params *sp)
{
    memset(sp, 0, sizeof(*sp));
    b_init(b, "m");
    b_input(b, "x", "FP32", 2, shape23);
    set_str(in_param(b, sp, 0, "shared_memory_region"), "reg");
    set_i64(in_param(b, sp, 0, "shared_memory_byte_size"), 24);
    set_i64(in_param(b, sp, 0, "shared_memory_offset"), 8);
    b_input(b, "y", "FP32", 2, shape23);
    b_raw(b, vals6, sizeof(vals6));
    b_input(b, "z", "BF16", 2, shape23);
    set_str(in_param(b, sp, 2, "shared_memory_region"), "reg2");
    set_u64(in_param(b, sp, 2, "shared_memory_byte_size"), 12);
    b_output(b, "output");
    set_str(out_param(b, sp, "shared_memory_region"), "out");
    set_i64(out_param(b, sp, "shared_memory_byte_size"), 4096);
    set_i64(out_param(b, sp, "shared_memory_offset"), 16);
}

static void test_decode_shm(void **state)
{
    (void)state;
    struct builder b;
    struct shm_params sp;
    struct bs_infer_request req;
    struct bs_err err;
    shm_request(&b, &sp);
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_int_equal(req.n_inputs, 3);
    assert_true(req.in_shm[0].given);
    assert_string_equal(req.in_shm[0].region, "reg");
    assert_int_equal(req.in_shm[0].offset, 8);
    assert_int_equal(req.in_shm[0].byte_size, 24);
    assert_null(req.inputs[0].t.data); /* bound by the front end */
    assert_false(req.in_shm[1].given);
    assert_memory_equal(req.inputs[1].t.data, vals6, sizeof(vals6)); /* raw entry 0 */
    assert_true(req.in_shm[2].given);
    assert_int_equal(req.in_shm[2].offset, 0);
    assert_int_equal(req.in_shm[2].byte_size, 12);
    assert_int_equal(req.inputs[2].t.type, BS_TYPE_BF16);
    assert_true(req.out_shm.given);
    assert_string_equal(req.out_shm.region, "out");
    assert_int_equal(req.out_shm.offset, 16);
    assert_int_equal(req.out_shm.byte_size, 4096);
    assert_true(req.raw_output);
    bs_codec_request_free(&req);

    /* every input in shared memory: no raw entries, and the answer is raw */
    b_init(&b, "m");
    memset(&sp, 0, sizeof(sp));
    b_input(&b, "x", "FP32", 2, shape23);
    set_str(in_param(&b, &sp, 0, "shared_memory_region"), "reg");
    set_i64(in_param(&b, &sp, 0, "shared_memory_byte_size"), 24);
    assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
    assert_true(req.raw_output);
    assert_false(req.out_shm.given);
    bs_codec_request_free(&req);
}

static void test_decode_shm_errors(void **state)
{
    (void)state;
    struct builder b;
    struct shm_params sp;
    /* the raw entries are those of the inputs not in shared memory */
    shm_request(&b, &sp);
    b_raw(&b, vals6, sizeof(vals6));
    expect_error(&b, BS_EINVAL,
                 "raw_input_contents has 2 entries for 1 inputs not in shared memory");
    shm_request(&b, &sp);
    b.msg.n_raw_input_contents = 0; /* y then has no data: typed, empty */
    expect_error(&b, BS_EINVAL, "input 'y': contents.fp32_contents holds 0 values, expected 6");
    shm_request(&b, &sp);
    b_contents(&b, 0)->n_fp32_contents = 6;
    b_contents(&b, 0)->fp32_contents = (float *)vals6;
    expect_error(&b, BS_EINVAL, "input 'x': contents must be empty for an input in shared memory");
    /* parameter types and values */
    shm_request(&b, &sp);
    set_i64(&sp.v[0][0], 5);
    expect_error(&b, BS_EINVAL,
                 "input 'x': parameter 'shared_memory_region' must be a string_param");
    shm_request(&b, &sp);
    set_str(&sp.v[0][0], "");
    expect_error(&b, BS_EINVAL, "parameter 'shared_memory_region' '' is empty");
    shm_request(&b, &sp);
    char long_region[BS_SHM_NAME_MAX + 1];
    memset(long_region, 'r', BS_SHM_NAME_MAX);
    long_region[BS_SHM_NAME_MAX] = '\0';
    set_str(&sp.v[0][0], long_region);
    expect_error(&b, BS_EINVAL, "is too long (1 to 127 bytes)");
    shm_request(&b, &sp);
    set_str(&sp.v[0][1], "24");
    expect_error(&b, BS_EINVAL,
                 "input 'x': parameter 'shared_memory_byte_size' must be an int64_param");
    shm_request(&b, &sp);
    set_i64(&sp.v[0][2], -1);
    expect_error(&b, BS_EINVAL, "input 'x': parameter 'shared_memory_offset' is -1 (must be >= 0)");
    shm_request(&b, &sp);
    b.in[0].n_parameters = 1; /* region without byte size */
    expect_error(&b, BS_EINVAL,
                 "input 'x': parameter 'shared_memory_byte_size' must be given with "
                 "'shared_memory_region'");
    shm_request(&b, &sp);
    sp.in[0][0].key = "region"; /* offset and size without a region */
    b_raw(&b, vals6, sizeof(vals6));
    expect_error(&b, BS_EINVAL,
                 "input 'x': parameter 'shared_memory_byte_size' needs "
                 "'shared_memory_region'");
    /* the output's */
    shm_request(&b, &sp);
    set_i64(&sp.v[3][0], 1);
    expect_error(&b, BS_EINVAL,
                 "output 'output': parameter 'shared_memory_region' must be a string_param");
    shm_request(&b, &sp);
    b.outs[0].n_parameters = 1;
    expect_error(&b, BS_EINVAL,
                 "output 'output': parameter 'shared_memory_byte_size' must be "
                 "given with 'shared_memory_region'");
    shm_request(&b, &sp);
    sp.out[0].key = "other";
    expect_error(&b, BS_EINVAL,
                 "output 'output': parameter 'shared_memory_byte_size' needs "
                 "'shared_memory_region'");
}

static void test_encode_shm_output(void **state)
{
    (void)state;
    struct builder b;
    struct shm_params sp;
    struct bs_infer_request req;
    struct bs_err err;
    float out_data[6] = {1, 2, 3, 4, 5, 6};
    struct bs_tensor out = bs_tensor_make(BS_TYPE_F32, 2, shape23, out_data);
    for (int typed = 0; typed < 2; typed++) {
        shm_request(&b, &sp);
        if (typed) { /* typed inputs only: a typed answer, without contents */
            b.msg.n_inputs = 2;
            b.msg.n_raw_input_contents = 0;
            b.in[0].n_parameters = 0;
            b_contents(&b, 0)->n_fp32_contents = 6;
            b_contents(&b, 0)->fp32_contents = (float *)vals6;
            b_contents(&b, 1)->n_fp32_contents = 6;
            b_contents(&b, 1)->fp32_contents = (float *)vals6;
        }
        assert_int_equal(b_decode(&b, &limits, &req, &err), 0);
        assert_int_equal(req.raw_output, !typed);
        Inference__ModelInferResponse *res = encode_and_unpack(&req, &out, -1);
        const Inference__ModelInferResponse__InferOutputTensor *o = res->outputs[0];
        assert_string_equal(o->datatype, "FP32");
        assert_int_equal(o->n_shape, 2);
        assert_int_equal(o->shape[1], 3);
        assert_null(o->contents);
        /* Triton's: one (empty) raw entry per output in raw answers */
        assert_int_equal(res->n_raw_output_contents, typed ? 0 : 1);
        if (!typed)
            assert_int_equal(res->raw_output_contents[0].len, 0);
        assert_int_equal(o->n_parameters, 3);
        for (size_t k = 0; k < o->n_parameters; k++) {
            const Inference__InferParameter *v = o->parameters[k]->value;
            if (strcmp(o->parameters[k]->key, "shared_memory_region") == 0)
                assert_string_equal(v->string_param, "out");
            else if (strcmp(o->parameters[k]->key, "shared_memory_byte_size") == 0)
                assert_int_equal(v->int64_param, 4096);
            else if (strcmp(o->parameters[k]->key, "shared_memory_offset") == 0)
                assert_int_equal(v->int64_param, 16);
            else
                fail_msg("unexpected parameter %s", o->parameters[k]->key);
        }
        inference__model_infer_response__free_unpacked(res, NULL);
        bs_codec_request_free(&req);
    }
}

static void test_datatype_names(void **state)
{
    (void)state;
    assert_string_equal(bs_codec_datatype(BS_TYPE_F32), "FP32");
    assert_string_equal(bs_codec_datatype(BS_TYPE_F16), "FP16");
    assert_string_equal(bs_codec_datatype(BS_TYPE_BF16), "BF16");
    assert_string_equal(bs_codec_datatype(BS_TYPE_I64), "INT64");
    assert_string_equal(bs_codec_datatype(BS_TYPE_BOOL), "BOOL");
    assert_string_equal(bs_codec_datatype(BS_TYPE_COUNT), "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_raw_fp32),
        cmocka_unit_test(test_decode_defaults),
        cmocka_unit_test(test_decode_typed_fp32),
        cmocka_unit_test(test_decode_typed_int64),
        cmocka_unit_test(test_decode_typed_bool),
        cmocka_unit_test(test_decode_raw_all_types),
        cmocka_unit_test(test_decode_scalar_and_empty),
        cmocka_unit_test(test_decode_parameters),
        cmocka_unit_test(test_decode_parameter_errors),
        cmocka_unit_test(test_decode_sequence_parameters),
        cmocka_unit_test(test_decode_outputs),
        cmocka_unit_test(test_decode_request_errors),
        cmocka_unit_test(test_decode_limits),
        cmocka_unit_test(test_decode_raw_errors),
        cmocka_unit_test(test_decode_typed_errors),
        cmocka_unit_test(test_decode_long_name),
        cmocka_unit_test(test_decode_nul_in_string),
        cmocka_unit_test(test_decode_garbage),
        cmocka_unit_test(test_decode_amplification),
        cmocka_unit_test(test_encode_raw),
        cmocka_unit_test(test_encode_typed),
        cmocka_unit_test(test_encode_errors),
        cmocka_unit_test(test_decode_output_datatype),
        cmocka_unit_test(test_encode_narrow),
        cmocka_unit_test(test_datatype_names),
        cmocka_unit_test(test_decode_shm),
        cmocka_unit_test(test_decode_shm_errors),
        cmocka_unit_test(test_encode_shm_output),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
