/* The HTTP/REST inference codec (server/http_codec.c): JSON and binary
 * requests built into ModelInferRequest messages and validated by the gRPC
 * codec (bs_codec_decode_infer_msg), the answers, and Content-Encoding. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <zlib.h>

#include "grpc_service.pb-c.h"
#include "http_codec.h"

static const struct bs_codec_limits limits = {.max_elements = 1 << 20, .max_inputs = 8};

struct decoded {
    uint8_t *body;
    struct bs_http_infer hi;
    struct bs_infer_request req;
};

/* Decode text (+ bin, with its header length) through both codecs; returns
 * the first failure's code (0: both passed) with its message in err. */
static int decode(struct decoded *d, const char *text, const void *bin, size_t bin_len,
                  struct bs_err *err)
{
    size_t n = strlen(text);
    memset(d, 0, sizeof(*d));
    d->body = malloc(n + bin_len + 1);
    memcpy(d->body, text, n);
    if (bin_len > 0)
        memcpy(d->body + n, bin, bin_len);
    int rc =
        bs_http_decode_infer("m", "", d->body, n + bin_len, bin ? (int64_t)n : -1, &d->hi, err);
    if (rc == 0)
        rc = bs_codec_decode_infer_msg(d->hi.msg, &limits, &d->req, err);
    return rc;
}

static void release(struct decoded *d)
{
    bs_codec_request_free(&d->req);
    bs_http_infer_free(&d->hi);
    free(d->body);
}

static void expect_error(const char *text, const void *bin, size_t bin_len, int code,
                         const char *fragment)
{
    struct decoded d;
    struct bs_err err = {0};
    int rc = decode(&d, text, bin, bin_len, &err);
    if (rc != code || strstr(err.msg, fragment) == NULL)
        fail_msg("%s\n  got %d \"%s\", expected %d with \"%s\"", text, rc, err.msg, code, fragment);
    release(&d);
}

static void test_every_datatype_as_json(void **state)
{
    (void)state;
    struct decoded d;
    struct bs_err err = {0};
    const char *text =
        "{\"id\":\"r7\",\"inputs\":["
        "{\"name\":\"a\",\"datatype\":\"FP32\",\"shape\":[2,2],\"data\":[[1.5,-2],[3e-3,4]]},"
        "{\"name\":\"b\",\"datatype\":\"FP16\",\"shape\":[3],\"data\":[1,0.5,-65504]},"
        "{\"name\":\"c\",\"datatype\":\"INT64\",\"shape\":[2],\"data\":[9007199254740993,-1]},"
        "{\"name\":\"d\",\"datatype\":\"BOOL\",\"shape\":[1,3],\"data\":[true,false,true]},"
        "{\"name\":\"e\",\"datatype\":\"FP32\",\"shape\":[0,4],\"data\":[]}]}";
    assert_int_equal(decode(&d, text, NULL, 0, &err), 0);
    assert_string_equal(d.req.id, "r7");
    assert_string_equal(d.req.model_name, "m");
    assert_int_equal(d.req.n_inputs, 5);
    const float *a = d.req.inputs[0].t.data;
    assert_true(a[0] == 1.5f && a[1] == -2.0f && a[2] == 3e-3f && a[3] == 4.0f);
    assert_int_equal(d.req.inputs[0].t.ne[0], 2);
    const uint16_t *b = d.req.inputs[1].t.data;
    assert_int_equal(b[0], 0x3c00);
    assert_int_equal(b[1], 0x3800);
    assert_int_equal(b[2], 0xfbff);
    const int64_t *c = d.req.inputs[2].t.data;
    assert_true(c[0] == INT64_C(9007199254740993)); /* exact, not through a double */
    assert_true(c[1] == -1);
    const uint8_t *bo = d.req.inputs[3].t.data;
    assert_true(bo[0] == 1 && bo[1] == 0 && bo[2] == 1);
    assert_int_equal(bs_tensor_nelements(&d.req.inputs[4].t), 0);
    assert_false(d.hi.binary_output);
    release(&d);
}

static void test_json_data_errors(void **state)
{
    (void)state;
#define IN(dt, shape, data)                                                                        \
    "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"" dt "\",\"shape\":" shape ",\"data\":" data "}]" \
                                                                                              "}"
    expect_error(IN("FP32", "[2,3]", "[1,2,3,4,5]"), NULL, 0, BS_EINVAL,
                 "data holds 5 values, shape needs 6");
    expect_error(IN("FP32", "[2]", "[[1],[2],[3]]"), NULL, 0, BS_EINVAL, "holds 3 values");
    expect_error(IN("FP32", "[2]", "[1,\"2\"]"), NULL, 0, BS_EINVAL, "string");
    expect_error(IN("FP32", "[2]", "[1,null]"), NULL, 0, BS_EINVAL, "null");
    expect_error(IN("FP32", "[2]", "[1,{}]"), NULL, 0, BS_EINVAL, "object");
    expect_error(IN("FP32", "[2]", "[1,true]"), NULL, 0, BS_EINVAL, "data[1] is not a number");
    expect_error(IN("INT64", "[2]", "[1,2.5]"), NULL, 0, BS_EINVAL, "an integer within int64");
    expect_error(IN("INT64", "[1]", "[9223372036854775808]"), NULL, 0, BS_EINVAL, "int64");
    expect_error(IN("BOOL", "[2]", "[1,0]"), NULL, 0, BS_EINVAL, "not a bool");
    expect_error(IN("BF16", "[1]", "[1]"), NULL, 0, BS_EINVAL, "binary data");
    expect_error(IN("FP64", "[1]", "[1]"), NULL, 0, BS_EINVAL, "datatype 'FP64'");
    expect_error(IN("FP32", "[-1]", "[1]"), NULL, 0, BS_EINVAL, "dims must be >= 0");
    expect_error(IN("FP32", "[1,1,1,1,1]", "[1]"), NULL, 0, BS_EINVAL, "dims (at most");
    expect_error(IN("FP32", "[4096,4096]", "[1]"), NULL, 0, BS_EINVAL, "holds 1 values");
    expect_error(IN("FP32", "[1.5]", "[1]"), NULL, 0, BS_EINVAL, "shape[0] is not an integer");
    expect_error(IN("FP32", "3", "[1]"), NULL, 0, BS_EINVAL, "'shape'");
    expect_error("{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1]}]}", NULL, 0,
                 BS_EINVAL, "no 'data'");
    expect_error("{\"inputs\":[{\"datatype\":\"FP32\",\"shape\":[1],\"data\":[1]}]}", NULL, 0,
                 BS_EINVAL, "'name'");
    expect_error("{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"data\":[1]}]}", NULL, 0, BS_EINVAL,
                 "'datatype'");
    expect_error("{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1],\"data\":[1]},"
                 "{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1],\"data\":[1]}]}",
                 NULL, 0, BS_EINVAL, "name given twice");
    expect_error("{\"outputs\":[]}", NULL, 0, BS_EINVAL, "'inputs'");
    expect_error("[]", NULL, 0, BS_EINVAL, "JSON object");
    expect_error("{\"inputs\":[", NULL, 0, BS_EINVAL, "malformed JSON");
    expect_error("{\"id\":5,\"inputs\":[]}", NULL, 0, BS_EINVAL, "'id'");
    expect_error("{\"inputs\":[],\"outputs\":[{\"name\":\"y\"}]}", NULL, 0, BS_EINVAL,
                 "unknown output 'y'");
    expect_error("{\"inputs\":[],\"parameters\":{\"priority\":-2}}", NULL, 0, BS_EINVAL,
                 "'priority' is -2");
    expect_error("{\"inputs\":[],\"parameters\":{\"timeout\":1.5}}", NULL, 0, BS_EINVAL,
                 "'timeout'");
    expect_error("{\"inputs\":[],\"parameters\":{\"x\":[1]}}", NULL, 0, BS_EINVAL,
                 "a bool, a number or a string");
    expect_error("{\"inputs\":[],\"parameters\":{\"binary_data_output\":1}}", NULL, 0, BS_EINVAL,
                 "binary_data_output");
    /* nesting deeper than the parser allows */
    expect_error(IN("FP32", "[1]", "[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]"), NULL, 0, BS_EINVAL,
                 "malformed JSON");
#undef IN
}

static void test_parameters_pass_through(void **state)
{
    (void)state;
    struct decoded d;
    struct bs_err err = {0};
    const char *text =
        "{\"parameters\":{\"priority\":2,\"timeout\":1000,\"sequence_id\":\"s-1\","
        "\"sequence_start\":true,\"binary_data_output\":true,\"other\":0.5},"
        "\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1],\"data\":[1],"
        "\"parameters\":{\"custom\":\"v\"}}],"
        "\"outputs\":[{\"name\":\"output\",\"parameters\":{\"classification\":2}}]}";
    assert_int_equal(decode(&d, text, NULL, 0, &err), 0);
    assert_int_equal(d.req.priority, 2);
    assert_int_equal(d.req.timeout_us, 1000);
    assert_true(d.req.seq.given && d.req.seq.start);
    assert_true(d.hi.binary_output);
    const Inference__ModelInferRequest *m = d.hi.msg;
    assert_int_equal(m->n_parameters, 5); /* binary_data_output is HTTP's */
    assert_int_equal(m->inputs[0]->n_parameters, 1);
    release(&d);
}

static void test_binary_data(void **state)
{
    (void)state;
    struct decoded d;
    struct bs_err err = {0};
    const float x[3] = {1, 2, 3};
    const uint8_t bools[2] = {0, 7};
    uint8_t bin[14];
    memcpy(bin, x, 12);
    memcpy(bin + 12, bools, 2);
    const char *mixed =
        "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[3],"
        "\"parameters\":{\"binary_data_size\":12}},"
        "{\"name\":\"j\",\"datatype\":\"INT64\",\"shape\":[1],\"data\":[5]},"
        "{\"name\":\"b\",\"datatype\":\"BOOL\",\"shape\":[2],"
        "\"parameters\":{\"binary_data_size\":2}},"
        "{\"name\":\"z\",\"datatype\":\"BF16\",\"shape\":[0],"
        "\"parameters\":{\"binary_data_size\":0}}],"
        "\"outputs\":[{\"name\":\"output\",\"parameters\":{\"binary_data\":true}}]}";
    assert_int_equal(decode(&d, mixed, bin, sizeof(bin), &err), 0);
    assert_int_equal(d.req.n_inputs, 4);
    assert_memory_equal(d.req.inputs[0].t.data, x, 12);
    assert_true(d.req.inputs[0].t.data == d.body + strlen(mixed)); /* not copied */
    assert_int_equal(*(const int64_t *)d.req.inputs[1].t.data, 5);
    assert_int_equal(((const uint8_t *)d.req.inputs[2].t.data)[1], 1); /* canonicalised */
    assert_true(d.hi.binary_output);
    release(&d);

    const char *one = "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[3],"
                      "\"parameters\":{\"binary_data_size\":12}}]}";
    expect_error(one, bin, 11, BS_EINVAL, "runs past the end of the body (11 bytes");
    expect_error(one, bin, 13, BS_EINVAL, "1 bytes of binary data after the last input");
    const char *small = "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[3],"
                        "\"parameters\":{\"binary_data_size\":8}}]}";
    expect_error(small, bin, 8, BS_EINVAL, "holds 8 bytes, expected 12");
    expect_error("{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1],\"data\":[1],"
                 "\"parameters\":{\"binary_data_size\":4}}]}",
                 bin, 4, BS_EINVAL, "both 'data' and binary_data_size");
    expect_error("{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1],"
                 "\"parameters\":{\"binary_data_size\":-4}}]}",
                 bin, 4, BS_EINVAL, "integer >= 0");
    /* data after the JSON without a header length: not JSON */
    expect_error(one, NULL, 0, BS_EINVAL, "runs past the end of the body (0 bytes");

    /* a header length past the body, and a cut one */
    uint8_t body[] = "{\"inputs\":[]}";
    struct bs_http_infer hi;
    assert_int_equal(bs_http_decode_infer("m", "", body, sizeof(body) - 1, 1000, &hi, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "Inference-Header-Content-Length 1000 exceeds"));
    assert_int_equal(bs_http_decode_infer("m", "", body, sizeof(body) - 1, 5, &hi, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "malformed JSON"));
    assert_null(hi.msg);
}

static void test_shared_memory_parameters(void **state)
{
    (void)state;
    struct bs_err err = {0};
    uint8_t body[] = "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[4],"
                     "\"parameters\":{\"shared_memory_region\":\"r0\",\"shared_memory_offset\":16,"
                     "\"shared_memory_byte_size\":16}}],\"outputs\":[{\"name\":\"output\","
                     "\"parameters\":{\"shared_memory_region\":\"out\",\"shared_memory_byte_size\":"
                     "64}}]}";
    struct bs_http_infer hi;
    assert_int_equal(bs_http_decode_infer("m", "", body, sizeof(body) - 1, -1, &hi, &err), 0);
    assert_true(hi.in_shm[0].given);
    assert_string_equal(hi.in_shm[0].region, "r0");
    assert_int_equal(hi.in_shm[0].offset, 16);
    assert_int_equal(hi.in_shm[0].byte_size, 16);
    assert_true(hi.out_shm.given);
    assert_string_equal(hi.out_shm.region, "out");
    assert_int_equal(hi.out_shm.byte_size, 64);
    /* passed on for the codec, without a raw entry for the input */
    const Inference__ModelInferRequest *m = hi.msg;
    assert_int_equal(m->n_raw_input_contents, 0);
    assert_int_equal(m->inputs[0]->n_parameters, 3);
    assert_int_equal(m->outputs[0]->n_parameters, 2);
    bs_http_infer_free(&hi);
    /* a shared memory input between two others: entries for those two only */
    uint8_t mixed[] = "{\"inputs\":[{\"name\":\"a\",\"datatype\":\"FP32\",\"shape\":[1],"
                      "\"data\":[1]},{\"name\":\"s\",\"datatype\":\"FP32\",\"shape\":[4],"
                      "\"parameters\":{\"shared_memory_region\":\"r0\",\"shared_memory_byte_size\":"
                      "16}},{\"name\":\"b\",\"datatype\":\"INT64\",\"shape\":[1],\"data\":[7]}]}";
    assert_int_equal(bs_http_decode_infer("m", "", mixed, sizeof(mixed) - 1, -1, &hi, &err), 0);
    m = hi.msg;
    assert_int_equal(m->n_inputs, 3);
    assert_int_equal(m->n_raw_input_contents, 2);
    assert_int_equal(m->raw_input_contents[1].len, 8);
    assert_int_equal(*(const int64_t *)m->raw_input_contents[1].data, 7);
    assert_false(hi.in_shm[0].given || hi.in_shm[2].given);
    bs_http_infer_free(&hi);
    uint8_t bad[] = "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[4],"
                    "\"parameters\":{\"shared_memory_region\":\"\"}}]}";
    assert_int_equal(bs_http_decode_infer("m", "", bad, sizeof(bad) - 1, -1, &hi, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "shared_memory_region"));
}

static void test_too_many_values(void **state)
{
    (void)state;
    size_t n = (size_t)BS_HTTP_MAX_JSON_VALUES + 10;
    char *text = malloc(n * 2 + 100);
    size_t o = (size_t)sprintf(text,
                               "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\","
                               "\"shape\":[%zu],\"data\":[",
                               n);
    for (size_t i = 0; i < n; i++) {
        text[o++] = '0';
        text[o++] = ',';
    }
    strcpy(text + o - 1, "]}]}");
    struct bs_http_infer hi;
    struct bs_err err = {0};
    assert_int_equal(bs_http_decode_infer("m", "", (uint8_t *)text, strlen(text), -1, &hi, &err),
                     BS_ERANGE);
    assert_non_null(strstr(err.msg, "binary data"));
    free(text);
}

static void test_encode_answers(void **state)
{
    (void)state;
    float v[4] = {0.1f, -2.5f, 1e-40f, 3.0f};
    int64_t ne[2] = {2, 2};
    struct bs_tensor out = bs_tensor_make(BS_TYPE_F32, 2, ne, v);
    struct bs_http_answer a = {
        .model_name = "m", .model_version = "", .id = "q\"1", .block_cache = "reuse"};
    struct bs_jbuf b = {0};
    size_t json_len;
    struct bs_err err = {0};
    assert_int_equal(bs_http_encode_infer(&a, &out, &b, &json_len, &err), 0);
    assert_int_equal(json_len, b.len);
    bs_json_doc_t *doc;
    assert_int_equal(bs_json_parse(&doc, b.data, b.len, 0, &err), 0);
    const struct bs_json *root = bs_json_doc_root(doc);
    assert_string_equal(bs_json_get(root, "model_version")->string, "1");
    assert_string_equal(bs_json_get(root, "id")->string, "q\"1");
    assert_string_equal(bs_json_get(bs_json_get(root, "parameters"), "block_cache")->string,
                        "reuse");
    const struct bs_json *o = bs_json_get(root, "outputs")->child;
    assert_string_equal(bs_json_get(o, "datatype")->string, "FP32");
    int i = 0;
    for (const struct bs_json *x = bs_json_get(o, "data")->child; x; x = x->next, i++) {
        float f = (float)x->number;
        assert_memory_equal(&f, &v[i], 4); /* bit for bit, denormals too */
    }
    assert_int_equal(i, 4);
    bs_json_doc_free(doc);
    free(b.data);

    a.binary_output = true;
    a.id = "";
    b = (struct bs_jbuf){0};
    assert_int_equal(bs_http_encode_infer(&a, &out, &b, &json_len, &err), 0);
    assert_int_equal(b.len, json_len + sizeof(v));
    assert_memory_equal(b.data + json_len, v, sizeof(v));
    assert_int_equal(bs_json_parse(&doc, b.data, json_len, 0, &err), 0);
    root = bs_json_doc_root(doc);
    assert_null(bs_json_get(root, "id"));
    o = bs_json_get(root, "outputs")->child;
    assert_null(bs_json_get(o, "data"));
    assert_int_equal(bs_json_get(bs_json_get(o, "parameters"), "binary_data_size")->integer, 16);
    bs_json_doc_free(doc);
    free(b.data);

    struct bs_tensor bad = bs_tensor_make(BS_TYPE_I64, 2, ne, v);
    b = (struct bs_jbuf){0};
    assert_int_equal(bs_http_encode_infer(&a, &bad, &b, &json_len, &err), BS_EINTERNAL);
    free(b.data);
}

/* output_datatype in the request's parameters (passed through to the
 * codec, which checks it), and the answers in BF16 (binary data, asked or
 * not) and FP16 (JSON numbers, each the 16-bit value; or binary data). */
static void test_output_datatype(void **state)
{
    (void)state;
    struct decoded d;
    struct bs_err err = {0};
    const char *text = "{\"parameters\":{\"output_datatype\":\"BF16\"},\"inputs\":[{\"name\":\"x\","
                       "\"datatype\":\"FP32\",\"shape\":[1],\"data\":[1]}]}";
    assert_int_equal(decode(&d, text, NULL, 0, &err), 0);
    assert_true(d.req.has_out_dtype);
    assert_int_equal(d.req.out_dtype, BS_TYPE_BF16);
    assert_false(d.hi.binary_output);
    release(&d);
    expect_error("{\"parameters\":{\"output_datatype\":\"FP8\"},\"inputs\":[]}", NULL, 0, BS_EINVAL,
                 "parameter 'output_datatype' is 'FP8' (accepted: FP32, BF16, FP16)");
    expect_error("{\"parameters\":{\"output_datatype\":32},\"inputs\":[]}", NULL, 0, BS_EINVAL,
                 "parameter 'output_datatype' must be a string_param");

    int64_t ne[2] = {1, 3};
    uint16_t h[3] = {0x3c00, 0xc100, 0x0001}; /* FP16 1, -2.5, the smallest subnormal */
    struct bs_tensor out = bs_tensor_make(BS_TYPE_F16, 2, ne, h);
    struct bs_http_answer a = {.model_name = "m"};
    struct bs_jbuf b = {0};
    size_t json_len;
    bs_json_doc_t *doc;
    assert_int_equal(bs_http_encode_infer(&a, &out, &b, &json_len, &err), 0);
    assert_int_equal(json_len, b.len);
    assert_int_equal(bs_json_parse(&doc, b.data, b.len, 0, &err), 0);
    const struct bs_json *o = bs_json_get(bs_json_doc_root(doc), "outputs")->child;
    assert_string_equal(bs_json_get(o, "datatype")->string, "FP16");
    int i = 0;
    for (const struct bs_json *x = bs_json_get(o, "data")->child; x; x = x->next, i++)
        assert_true((float)x->number == bs_fp16_to_f32(h[i]));
    assert_int_equal(i, 3);
    bs_json_doc_free(doc);
    free(b.data);

    /* BF16: binary data although JSON was asked for; its datatype, its bytes */
    out.type = BS_TYPE_BF16;
    b = (struct bs_jbuf){0};
    assert_int_equal(bs_http_encode_infer(&a, &out, &b, &json_len, &err), 0);
    assert_int_equal(b.len, json_len + sizeof(h));
    assert_memory_equal(b.data + json_len, h, sizeof(h));
    assert_int_equal(bs_json_parse(&doc, b.data, json_len, 0, &err), 0);
    o = bs_json_get(bs_json_doc_root(doc), "outputs")->child;
    assert_string_equal(bs_json_get(o, "datatype")->string, "BF16");
    assert_null(bs_json_get(o, "data"));
    assert_int_equal(bs_json_get(bs_json_get(o, "parameters"), "binary_data_size")->integer, 6);
    bs_json_doc_free(doc);
    free(b.data);

    /* in shared memory: neither data nor bytes */
    struct bs_shm_ref ref = {.given = true, .region = "r", .byte_size = 6};
    a.out_shm = &ref;
    b = (struct bs_jbuf){0};
    assert_int_equal(bs_http_encode_infer(&a, &out, &b, &json_len, &err), 0);
    assert_int_equal(b.len, json_len);
    bs_jbuf_put(&b, "", 1); /* a C string, for strstr */
    assert_non_null(strstr(b.data, "\"datatype\":\"BF16\""));
    assert_null(strstr(b.data, "binary_data_size"));
    free(b.data);
}

static void test_inflate(void **state)
{
    (void)state;
    const char msg[] = "{\"inputs\": []} and some more text to compress";
    for (int gz = 0; gz < 2; gz++) {
        size_t zl, n;
        uint8_t *z = bs_http_deflate((const uint8_t *)msg, sizeof(msg), gz, &zl);
        assert_non_null(z);
        uint8_t *out;
        struct bs_err err = {0};
        assert_int_equal(bs_http_inflate(z, zl, gz, 1024, &out, &n, &err), 0);
        assert_int_equal(n, sizeof(msg));
        assert_memory_equal(out, msg, n);
        free(out);
        /* exactly at the limit passes, one byte less fails */
        assert_int_equal(bs_http_inflate(z, zl, gz, sizeof(msg), &out, &n, &err), 0);
        free(out);
        assert_int_equal(bs_http_inflate(z, zl, gz, sizeof(msg) - 1, &out, &n, &err), BS_ERANGE);
        assert_non_null(strstr(err.msg, "inflates to more than"));
        assert_null(out);
        /* cut short, corrupt, the other format */
        assert_int_equal(bs_http_inflate(z, zl - 3, gz, 1024, &out, &n, &err), BS_EINVAL);
        assert_non_null(strstr(err.msg, "cut short"));
        assert_int_equal(bs_http_inflate(z, zl, !gz, 1024, &out, &n, &err), BS_EINVAL);
        z[zl / 2] ^= 0x55;
        z[zl / 2 + 1] ^= 0xaa;
        assert_int_not_equal(bs_http_inflate(z, zl, gz, 1024, &out, &n, &err), 0);
        assert_int_equal(bs_http_inflate((const uint8_t *)"", 0, gz, 1024, &out, &n, &err),
                         BS_EINVAL);
        free(z);
    }
}

static void test_gzip_bomb(void **state)
{
    (void)state;
    size_t big = (size_t)256 << 20; /* 256 MiB of zeros, about 250 KiB compressed */
    z_stream z = {0};
    assert_int_equal(deflateInit2(&z, 9, Z_DEFLATED, 15 + 16, 9, Z_DEFAULT_STRATEGY), Z_OK);
    size_t cap = (size_t)2 << 20, zl = 0;
    uint8_t *bomb = malloc(cap), *zeros = calloc(1, (size_t)1 << 20);
    for (size_t fed = 0; fed < big; fed += (size_t)1 << 20) {
        z.next_in = zeros;
        z.avail_in = 1u << 20;
        z.next_out = bomb + zl;
        z.avail_out = (uInt)(cap - zl);
        assert_int_equal(deflate(&z, fed + (1u << 20) >= big ? Z_FINISH : Z_NO_FLUSH) >= 0, 1);
        zl = cap - z.avail_out;
    }
    deflateEnd(&z);
    free(zeros);
    printf("  a %zu-byte gzip body inflating to %zu bytes\n", zl, big);
    uint8_t *out;
    size_t n;
    struct bs_err err = {0};
    size_t limit = (size_t)64 << 20;
    assert_int_equal(bs_http_inflate(bomb, zl, true, limit, &out, &n, &err), BS_ERANGE);
    assert_non_null(strstr(err.msg, "--max-message-bytes"));
    assert_null(out);
    free(bomb);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_datatype_as_json),
        cmocka_unit_test(test_json_data_errors),
        cmocka_unit_test(test_parameters_pass_through),
        cmocka_unit_test(test_binary_data),
        cmocka_unit_test(test_shared_memory_parameters),
        cmocka_unit_test(test_too_many_values),
        cmocka_unit_test(test_encode_answers),
        cmocka_unit_test(test_output_datatype),
        cmocka_unit_test(test_inflate),
        cmocka_unit_test(test_gzip_bomb),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
