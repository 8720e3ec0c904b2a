/* bs_pb_check_strings (server/pbcheck.c): messages are packed with the
 * generated protobuf-c code, then a marker byte '#' inside a string is turned
 * into a NUL in the packed bytes (protobuf-c itself cannot pack one: it packs
 * strings with strlen). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "grpc/health/v1/health.pb-c.h"
#include "grpc_service.pb-c.h"
#include "pbcheck.h"

typedef Inference__ModelInferRequest req_t;
typedef Inference__ModelInferRequest__InferInputTensor in_t;
typedef Inference__ModelInferRequest__ParametersEntry param_t;
typedef Inference__ModelInferRequest__InferRequestedOutputTensor out_t;

/* ---- building messages ----------------------------------------------------------------------- */

/* A request with two inputs (the second with typed contents, bytes included),
 * two parameters (a bool and a string), an output and raw contents full of
 * NUL bytes; the strings may be replaced before packing. */
struct sample {
    req_t req;
    in_t in[2];
    in_t *in_ptrs[2];
    Inference__InferTensorContents contents;
    ProtobufCBinaryData bytes_contents[1];
    ProtobufCBinaryData raw[2];
    Inference__InferParameter values[2];
    param_t params[2];
    param_t *param_ptrs[2];
    out_t out;
    out_t *out_ptrs[1];
    int64_t shape[2];
};

static const uint8_t zeros[16];

static void sample_init(struct sample *s)
{
    memset(s, 0, sizeof(*s));
    s->req = (req_t)INFERENCE__MODEL_INFER_REQUEST__INIT;
    s->req.model_name = "vae_mid_attention";
    s->req.model_version = "1";
    s->req.id = "req-7";
    s->shape[0] = 2;
    s->shape[1] = 2;
    for (int i = 0; i < 2; i++) {
        s->in[i] = (in_t)INFERENCE__MODEL_INFER_REQUEST__INFER_INPUT_TENSOR__INIT;
        s->in[i].n_shape = 2;
        s->in[i].shape = s->shape;
        s->in_ptrs[i] = &s->in[i];
        s->raw[i] = (ProtobufCBinaryData){sizeof(zeros), (uint8_t *)zeros};
    }
    s->in[0].name = "hidden_states";
    s->in[0].datatype = "FP32";
    s->in[1].name = "mask";
    s->in[1].datatype = "BOOL";
    s->contents = (Inference__InferTensorContents)INFERENCE__INFER_TENSOR_CONTENTS__INIT;
    s->bytes_contents[0] = (ProtobufCBinaryData){5, (uint8_t *)"a\0b\0c"};
    s->contents.n_bytes_contents = 1;
    s->contents.bytes_contents = s->bytes_contents;
    s->in[1].contents = &s->contents;
    s->req.n_inputs = 2;
    s->req.inputs = s->in_ptrs;
    s->req.n_raw_input_contents = 2;
    s->req.raw_input_contents = s->raw;
    for (int i = 0; i < 2; i++) {
        s->values[i] = (Inference__InferParameter)INFERENCE__INFER_PARAMETER__INIT;
        s->params[i] = (param_t)INFERENCE__MODEL_INFER_REQUEST__PARAMETERS_ENTRY__INIT;
        s->params[i].value = &s->values[i];
        s->param_ptrs[i] = &s->params[i];
    }
    s->params[0].key = "stream_intermediate";
    s->values[0].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM;
    s->values[0].bool_param = 1;
    s->params[1].key = "note";
    s->values[1].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    s->values[1].string_param = "hello";
    s->req.n_parameters = 2;
    s->req.parameters = s->param_ptrs;
    s->out = (out_t)INFERENCE__MODEL_INFER_REQUEST__INFER_REQUESTED_OUTPUT_TENSOR__INIT;
    s->out.name = "output";
    s->out_ptrs[0] = &s->out;
    s->req.n_outputs = 1;
    s->req.outputs = s->out_ptrs;
}

/* Pack into an exactly sized buffer (ASan sees any over-read). */
static uint8_t *pack(const req_t *req, size_t *len)
{
    size_t n = inference__model_infer_request__get_packed_size(req);
    uint8_t *buf = malloc(n ? n : 1);
    assert_non_null(buf);
    *len = inference__model_infer_request__pack(req, buf);
    assert_int_equal(*len, n);
    return buf;
}

/* Turn the '#' of the one occurrence of marked (a string holding one '#') into a NUL. */
static void put_nul(uint8_t *buf, size_t len, const char *marked)
{
    size_t n = strlen(marked);
    const char *hash = strchr(marked, '#');
    assert_non_null(hash);
    uint8_t *at = memmem(buf, len, marked, n);
    assert_non_null(at);
    assert_null(memmem(at + 1, len - (size_t)(at + 1 - buf), marked, n));
    at[hash - marked] = '\0';
}

static int check(const uint8_t *buf, size_t len, struct bs_err *err)
{
    memset(err, 0, sizeof(*err));
    return bs_pb_check_strings(&inference__model_infer_request__descriptor, buf, len, err);
}

/* Pack s, put the NUL at marked, and expect the error naming path. */
static void expect_nul(const struct sample *s, const char *marked, const char *path)
{
    size_t len;
    uint8_t *buf = pack(&s->req, &len);
    struct bs_err err;
    assert_int_equal(check(buf, len, &err), 0);
    put_nul(buf, len, marked);
    char want[256];
    snprintf(want, sizeof(want), "field \"%s\" contains a NUL byte (strings must not contain NUL)",
             path);
    int rc = check(buf, len, &err);
    if (rc != BS_EINVAL || strcmp(err.msg, want) != 0)
        fail_msg("%s: got %d \"%s\", want \"%s\"", marked, rc, err.msg, want);
    assert_int_equal(err.code, BS_EINVAL);
    free(buf);
}

static void expect_malformed(const void *data, size_t len, const char *why)
{
    uint8_t *buf = malloc(len ? len : 1);
    assert_non_null(buf);
    memcpy(buf, data, len);
    struct bs_err err;
    int rc = check(buf, len, &err);
    if (rc != BS_EINVAL || strstr(err.msg, "malformed ModelInferRequest") == NULL ||
        strstr(err.msg, why) == NULL)
        fail_msg("case %s: got %d \"%s\"", why, rc, err.msg);
    free(buf);
}

/* ---- the checks ------------------------------------------------------------------------------ */

static void test_clean_messages(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    size_t len;
    uint8_t *buf = pack(&s.req, &len);
    struct bs_err err;
    assert_int_equal(check(buf, len, &err), 0); /* bytes fields full of NULs are fine */
    req_t *q = inference__model_infer_request__unpack(NULL, len, buf);
    assert_non_null(q);
    assert_string_equal(q->inputs[1]->datatype, "BOOL");
    inference__model_infer_request__free_unpacked(q, NULL);
    free(buf);

    assert_int_equal(check(NULL, 0, &err), 0);
    assert_int_equal(check(zeros, 0, &err), 0);
    assert_int_equal(check(NULL, 1, &err), BS_EINVAL);

    Grpc__Health__V1__HealthCheckRequest h = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    h.service = "inference#GRPCInferenceService";
    uint8_t hb[64];
    size_t hn = grpc__health__v1__health_check_request__pack(&h, hb);
    const ProtobufCMessageDescriptor *hd = &grpc__health__v1__health_check_request__descriptor;
    assert_int_equal(bs_pb_check_strings(hd, hb, hn, &err), 0);
    put_nul(hb, hn, h.service);
    assert_int_equal(bs_pb_check_strings(hd, hb, hn, &err), BS_EINVAL);
    assert_string_equal(err.msg,
                        "field \"service\" contains a NUL byte (strings must not contain NUL)");
}

static void test_nul_top_level(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    s.req.model_name = "vae_mid_attention#evil";
    expect_nul(&s, "vae_mid_attention#evil", "model_name");
    sample_init(&s);
    s.req.model_version = "1#junk";
    expect_nul(&s, "1#junk", "model_version");
    sample_init(&s);
    s.req.id = "#";
    expect_nul(&s, "\x1a\x01#", "id"); /* field 3, length 1: the byte alone is not unique */
}

static void test_nul_nested(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    s.in[1].datatype = "FP32#junk";
    expect_nul(&s, "FP32#junk", "inputs[1].datatype");
    sample_init(&s);
    s.in[0].name = "hidden#states";
    expect_nul(&s, "hidden#states", "inputs[0].name");
    sample_init(&s);
    s.out.name = "out#put";
    expect_nul(&s, "out#put", "outputs[0].name");
}

static void test_nul_in_maps(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    s.params[0].key = "stream#intermediate";
    expect_nul(&s, "stream#intermediate", "parameters[0].key");
    sample_init(&s);
    s.values[1].string_param = "hel#lo";
    expect_nul(&s, "hel#lo", "parameters[1].value.string_param");

    /* A map inside a repeated message. */
    Inference__InferParameter v = INFERENCE__INFER_PARAMETER__INIT;
    Inference__ModelInferRequest__InferInputTensor__ParametersEntry e =
        INFERENCE__MODEL_INFER_REQUEST__INFER_INPUT_TENSOR__PARAMETERS_ENTRY__INIT;
    Inference__ModelInferRequest__InferInputTensor__ParametersEntry *ep = &e;
    v.parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    v.string_param = "x";
    e.key = "binary#data_size";
    e.value = &v;
    sample_init(&s);
    s.in[1].n_parameters = 1;
    s.in[1].parameters = &ep;
    expect_nul(&s, "binary#data_size", "inputs[1].parameters[0].key");
}

/* Repeated fields need not be contiguous: the index counts every earlier
 * occurrence (two packed requests concatenated merge into one). */
static void test_index_across_fields(void **state)
{
    (void)state;
    struct sample a, b;
    sample_init(&a);
    sample_init(&b);
    b.req.n_inputs = 1;
    b.in[0].datatype = "FP#6";
    size_t na, nb;
    uint8_t *pa = pack(&a.req, &na), *pb = pack(&b.req, &nb);
    uint8_t *both = malloc(na + nb);
    assert_non_null(both);
    memcpy(both, pa, na);
    memcpy(both + na, pb, nb);
    put_nul(both, na + nb, "FP#6");
    struct bs_err err;
    assert_int_equal(check(both, na + nb, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "field \"inputs[2].datatype\""));
    free(both);
    free(pa);
    free(pb);
}

static void test_unknown_fields(void **state)
{
    (void)state;
    /* model_name "m", unknown varint 15, unknown length-delimited 20 holding
     * NULs, unknown fixed32 16 and fixed64 17: skipped. */
    static const uint8_t msg[] = {0x0a, 0x01, 'm',  0x78, 0x96, 0x01, 0xa2, 0x01, 0x03, 0,
                                  0,    0,    0x85, 0x01, 1,    2,    3,    4,    0x89, 0x01,
                                  1,    2,    3,    4,    5,    6,    7,    8};
    struct bs_err err;
    assert_int_equal(check(msg, sizeof(msg), &err), 0);
    /* A known string field with another wire type is not a string: left to protobuf-c. */
    static const uint8_t varint_name[] = {0x08, 0x00};
    assert_int_equal(check(varint_name, sizeof(varint_name), &err), 0);
}

static void test_malformed(void **state)
{
    (void)state;
    expect_malformed("\x0a", 1, "bad field at byte 0");             /* no length */
    expect_malformed("\x0a\x05\x61\x62", 4, "bad field at byte 0"); /* length past the end */
    expect_malformed("\x0a\x01m\x0a\x80", 5, "at byte 3");          /* length varint cut */
    expect_malformed("\x0a\xff\xff\xff\xff\xff\xff\xff\xff\x7f", 10, "bad field"); /* huge */
    expect_malformed("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 11, "bad field");
    expect_malformed("\x0b", 1, "bad field");                     /* group start */
    expect_malformed("\x0c", 1, "bad field");                     /* group end */
    expect_malformed("\x0e\x00", 2, "bad field");                 /* wire type 6 */
    expect_malformed("\x0f\x00", 2, "bad field");                 /* wire type 7 */
    expect_malformed("\x02\x00", 2, "bad field");                 /* field number 0 */
    expect_malformed("\x82\x80\x80\x80\x10\x00", 6, "bad field"); /* field number 2^29 */
    expect_malformed("\x79\x01\x02", 3, "bad field");             /* fixed64 cut */
    expect_malformed("\x7d\x01", 2, "bad field");                 /* fixed32 cut */
    expect_malformed("\x78\x80", 2, "bad field");                 /* varint value cut */
    expect_malformed("\x2a\x03\x0a\x05\x61", 5, "at byte 2");     /* inside inputs[0] */
    expect_malformed("\x22\x04\x12\x02\x1a\x09", 6, "at byte 4"); /* inside a map value */
}

/* Every prefix of a valid request: accepted exactly when protobuf-c unpacks it. */
static void test_prefixes(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    size_t len;
    uint8_t *buf = pack(&s.req, &len);
    int refused = 0;
    for (size_t n = 0; n <= len; n++) {
        uint8_t *cut = malloc(n ? n : 1);
        assert_non_null(cut);
        memcpy(cut, buf, n);
        struct bs_err err;
        int rc = check(cut, n, &err);
        req_t *q = inference__model_infer_request__unpack(NULL, n, cut);
        if ((rc == 0) != (q != NULL))
            fail_msg("prefix %zu of %zu: check %d \"%s\", protobuf-c %s", n, len, rc, err.msg,
                     q ? "unpacks it" : "refuses it");
        refused += rc != 0;
        if (q != NULL)
            inference__model_infer_request__free_unpacked(q, NULL);
        free(cut);
    }
    assert_true(refused > 0);
    free(buf);
}

/* Random bytes after a valid start: never a crash, always 0 or BS_EINVAL. */
static void test_random(void **state)
{
    (void)state;
    struct sample s;
    sample_init(&s);
    size_t len;
    uint8_t *buf = pack(&s.req, &len);
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (int iter = 0; iter < 20000; iter++) {
        size_t n = (size_t)(iter % 131);
        uint8_t *junk = malloc(n + 1);
        assert_non_null(junk);
        memcpy(junk, buf, n < len ? n : len);
        for (size_t k = (size_t)iter % 7; k < n; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            junk[k] = (uint8_t)x;
        }
        struct bs_err err;
        int rc = check(junk, n, &err);
        assert_true(rc == 0 || (rc == BS_EINVAL && err.msg[0] != '\0'));
        free(junk);
    }
    free(buf);
}

/* ---- nesting depth, on a message that contains itself ---------------------------------------- */

extern const ProtobufCMessageDescriptor node_descriptor;
static const ProtobufCFieldDescriptor node_fields[] = {
    {"child", 1, PROTOBUF_C_LABEL_NONE, PROTOBUF_C_TYPE_MESSAGE, 0, 0, &node_descriptor, NULL, 0, 0,
     NULL, NULL},
    {"s", 2, PROTOBUF_C_LABEL_NONE, PROTOBUF_C_TYPE_STRING, 0, 0, NULL, NULL, 0, 0, NULL, NULL},
};
static const unsigned node_by_name[] = {0, 1};
static const ProtobufCIntRange node_ranges[] = {{1, 0}, {0, 2}};
const ProtobufCMessageDescriptor node_descriptor = {
    .magic = PROTOBUF_C__MESSAGE_DESCRIPTOR_MAGIC,
    .name = "t.Node",
    .short_name = "Node",
    .c_name = "Node",
    .package_name = "t",
    .n_fields = 2,
    .fields = node_fields,
    .fields_sorted_by_name = node_by_name,
    .n_field_ranges = 1,
    .field_ranges = node_ranges,
};

/* levels Nodes, each the child of the one before, the innermost holding the
 * string s of len bytes; returns the length written into buf. */
static size_t nest(uint8_t *buf, int levels, const char *s, size_t len)
{
    size_t total = 2 + len + 2 * (size_t)(levels - 1);
    assert_true(total < 128); /* every length fits one varint byte */
    size_t o = 0;
    for (int i = 1; i < levels; i++) { /* field 1 (child), outermost first */
        buf[o] = 0x0a;
        buf[o + 1] = (uint8_t)(total - o - 2);
        o += 2;
    }
    buf[o] = 0x12; /* field 2 (s) */
    buf[o + 1] = (uint8_t)len;
    memcpy(buf + o + 2, s, len);
    return o + 2 + len;
}

static void test_depth(void **state)
{
    (void)state;
    uint8_t buf[256];
    struct bs_err err = {0};
    size_t n = nest(buf, BS_PB_MAX_DEPTH + 1, "ok", 2); /* 32 levels below the top */
    assert_int_equal(bs_pb_check_strings(&node_descriptor, buf, n, &err), 0);
    n = nest(buf, BS_PB_MAX_DEPTH + 2, "ok", 2);
    assert_int_equal(bs_pb_check_strings(&node_descriptor, buf, n, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "malformed Node: messages nested too deeply"));
    n = nest(buf, 4, "a\0b", 3);
    assert_int_equal(bs_pb_check_strings(&node_descriptor, buf, n, &err), BS_EINVAL);
    assert_string_equal(err.msg, "field \"child.child.child.s\" contains a NUL byte (strings "
                                 "must not contain NUL)");
    n = nest(buf, BS_PB_MAX_DEPTH + 1, "\0", 1);
    assert_int_equal(bs_pb_check_strings(&node_descriptor, buf, n, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "child.child.child.child.child.child.child.child.child"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_clean_messages),
        cmocka_unit_test(test_nul_top_level),
        cmocka_unit_test(test_nul_nested),
        cmocka_unit_test(test_nul_in_maps),
        cmocka_unit_test(test_index_across_fields),
        cmocka_unit_test(test_unknown_fields),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_prefixes),
        cmocka_unit_test(test_random),
        cmocka_unit_test(test_depth),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
