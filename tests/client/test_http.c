/* The HTTP/REST half of the client without a network: infer request bodies
 * (binary tensor data, JSON "data" for every datatype, shared memory
 * parameters), response parsing (the Inference-Header-Content-Length split,
 * JSON data, shared memory outputs, malformed answers), Triton's error
 * bodies, gzip/deflate round trips, the metadata / index / shm status JSON,
 * paths; and blockserve-cli's new options (cli_args.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cli_args.h"
#include "http_client.h"
#include "tensor.h"

static struct bs_ctensor make(const char *name, const char *dt, int64_t d0, int64_t d1)
{
    struct bs_ctensor t = {0};
    struct bs_err e = {0};
    snprintf(t.name, sizeof(t.name), "%s", name);
    snprintf(t.datatype, sizeof(t.datatype), "%s", dt);
    t.n_dims = 2;
    t.shape[0] = d0;
    t.shape[1] = d1;
    assert_int_equal(bs_ct_alloc(&t, &e), 0);
    return t;
}

/* The body as a string: the JSON header, then hl.. as raw bytes. */
static void test_pack_binary(void **state)
{
    (void)state;
    struct bs_ctensor in[2] = {make("x", "FP32", 1, 2), make("ids", "INT64", 1, 1)};
    ((float *)in[0].data)[0] = 1.5f;
    ((float *)in[0].data)[1] = -2.0f;
    ((int64_t *)in[1].data)[0] = 7;
    const char *outs[] = {"output"};
    struct bs_client_infer_opts o = {.id = "q\"1", .outputs = outs, .n_outputs = 1};
    struct bs_client_err err = {0};
    uint8_t *body;
    size_t len, hl;
    assert_int_equal(bs_http_pack_infer(in, 2, &o, false, &body, &len, &hl, &err), 0);
    const char *want =
        "{\"id\":\"q\\\"1\",\"inputs\":[{\"name\":\"x\",\"shape\":[1,2],\"datatype\":\"FP32\","
        "\"parameters\":{\"binary_data_size\":8}},{\"name\":\"ids\",\"shape\":[1,1],"
        "\"datatype\":\"INT64\",\"parameters\":{\"binary_data_size\":8}}],"
        "\"outputs\":[{\"name\":\"output\",\"parameters\":{\"binary_data\":true}}]}";
    assert_int_equal(hl, strlen(want));
    assert_memory_equal(body, want, hl);
    assert_int_equal(len, hl + 16);
    assert_memory_equal(body + hl, in[0].data, 8);
    assert_memory_equal(body + hl + 8, in[1].data, 8);
    free(body);
    /* no named outputs: every output as binary data */
    o.outputs = NULL;
    o.n_outputs = 0;
    o.id = NULL;
    assert_int_equal(bs_http_pack_infer(in, 1, &o, false, &body, &len, &hl, &err), 0);
    assert_non_null(strstr((char *)body, "{\"parameters\":{\"binary_data_output\":true},"));
    free(body);
    bs_ct_free(&in[0]);
    bs_ct_free(&in[1]);
}

/* Every datatype as JSON data: what the body holds, and back through a response. */
static void test_json_datatypes(void **state)
{
    (void)state;
    static const struct {
        const char *dt, *data;
    } rows[] = {
        {"FP32", "[0.5,-3,1e+20,0.1]"},
        {"FP16", "[0.5,-3,65504,0]"},
        {"FP64", "[0.5,-3,1e+300,0.1]"},
        {"INT8", "[-128,127,0,1]"},
        {"INT16", "[-32768,32767,0,1]"},
        {"INT32", "[-2147483648,2147483647,0,1]"},
        {"INT64", "[-9223372036854775808,9223372036854775807,0,1]"},
        {"UINT8", "[255,0,1,2]"},
        {"UINT16", "[65535,0,1,2]"},
        {"UINT32", "[4294967295,0,1,2]"},
        {"UINT64", "[18446744073709551615,0,1,2]"},
        {"BOOL", "[true,false,true,false]"},
    };
    for (size_t r = 0; r < sizeof(rows) / sizeof(rows[0]); r++) {
        /* parse the data from a response, then pack it again: the same text */
        char resp[512];
        snprintf(resp, sizeof(resp),
                 "{\"outputs\":[{\"name\":\"y\",\"datatype\":\"%s\",\"shape\":[2,2],"
                 "\"data\":%s}]}",
                 rows[r].dt, rows[r].data);
        struct bs_ctensor out[2];
        int n;
        struct bs_client_err err = {0};
        assert_int_equal(bs_http_parse_infer((uint8_t *)resp, strlen(resp), 0, out, 2, &n, &err),
                         0);
        assert_int_equal(n, 1);
        assert_string_equal(out[0].datatype, rows[r].dt);
        struct bs_client_infer_opts o = {0};
        uint8_t *body;
        size_t len, hl;
        assert_int_equal(bs_http_pack_infer(out, 1, &o, true, &body, &len, &hl, &err), 0);
        assert_int_equal(hl, 0);
        char want[256];
        snprintf(want, sizeof(want), "\"data\":%s}", rows[r].data);
        if (strstr((char *)body, want) == NULL)
            fail_msg("%s: %s has no %s", rows[r].dt, (char *)body, want);
        assert_null(strstr((char *)body, "binary_data"));
        free(body);
        bs_ct_free(&out[0]);
    }
}

static void test_json_refusals(void **state)
{
    (void)state;
    struct bs_ctensor t = make("lat", "BF16", 1, 1);
    struct bs_client_infer_opts o = {0};
    struct bs_client_err err = {0};
    uint8_t *body = NULL;
    size_t len, hl;
    assert_int_equal(bs_http_pack_infer(&t, 1, &o, true, &body, &len, &hl, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "input 'lat': BF16 has no JSON form"));
    assert_null(body);
    /* binary data carries BF16 fine */
    assert_int_equal(bs_http_pack_infer(&t, 1, &o, false, &body, &len, &hl, &err), 0);
    free(body);
    bs_ct_free(&t);
    t = make("x", "FP32", 1, 2);
    ((float *)t.data)[1] = 1.0f / 0.0f;
    assert_int_equal(bs_http_pack_infer(&t, 1, &o, true, &body, &len, &hl, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "element 1 is inf"));
    bs_ct_free(&t);
}

static void test_pack_shm(void **state)
{
    (void)state;
    struct bs_ctensor t = make("x", "FP32", 2, 4);
    struct bs_client_shm_ref in_ref = {"reg", 0, 32}, out_ref = {"reg", 64, 32};
    const char *outs[] = {"output"};
    struct bs_client_infer_opts o = {
        .in_shm = &in_ref, .outputs = outs, .n_outputs = 1, .out_shm = &out_ref};
    struct bs_client_err err = {0};
    uint8_t *body;
    size_t len, hl;
    for (int json = 0; json < 2; json++) {
        assert_int_equal(bs_http_pack_infer(&t, 1, &o, json, &body, &len, &hl, &err), 0);
        const char *want =
            "{\"inputs\":[{\"name\":\"x\",\"shape\":[2,4],\"datatype\":\"FP32\",\"parameters\":"
            "{\"shared_memory_region\":\"reg\",\"shared_memory_byte_size\":32,"
            "\"shared_memory_offset\":0}}],\"outputs\":[{\"name\":\"output\",\"parameters\":"
            "{\"shared_memory_region\":\"reg\",\"shared_memory_byte_size\":32,"
            "\"shared_memory_offset\":64}}]}";
        assert_int_equal(len, strlen(want)); /* no tensor bytes follow */
        assert_memory_equal(body, want, len);
        assert_int_equal(hl, json ? 0 : len);
        free(body);
    }
    /* the gRPC request carries the same three parameters and no raw contents */
    assert_int_equal(bs_client_pack_infer_request_ex("m", &t, 1, &o, &body, &len, &err), 0);
    Inference__ModelInferRequest *q = inference__model_infer_request__unpack(NULL, len, body);
    assert_non_null(q);
    assert_int_equal(q->n_raw_input_contents, 0);
    assert_int_equal(q->inputs[0]->n_parameters, 3);
    assert_string_equal(q->inputs[0]->parameters[0]->key, "shared_memory_region");
    assert_string_equal(q->inputs[0]->parameters[0]->value->string_param, "reg");
    assert_int_equal(q->inputs[0]->parameters[1]->value->int64_param, 32);
    assert_string_equal(q->outputs[0]->parameters[2]->key, "shared_memory_offset");
    assert_int_equal(q->outputs[0]->parameters[2]->value->int64_param, 64);
    inference__model_infer_request__free_unpacked(q, NULL);
    free(body);
    bs_ct_free(&t);
}

/* A binary response: JSON header, then each output's bytes in order. */
static void test_parse_binary(void **state)
{
    (void)state;
    const char *head = "{\"model_name\":\"m\",\"outputs\":["
                       "{\"name\":\"a\",\"datatype\":\"FP32\",\"shape\":[1,2],"
                       "\"parameters\":{\"binary_data_size\":8}},"
                       "{\"name\":\"b\",\"datatype\":\"UINT8\",\"shape\":[3],"
                       "\"parameters\":{\"binary_data_size\":3}},"
                       "{\"name\":\"c\",\"datatype\":\"INT32\",\"shape\":[2],\"data\":[[5],[6]]},"
                       "{\"name\":\"d\",\"datatype\":\"FP16\",\"shape\":[2,2]}]}";
    size_t hl = strlen(head);
    uint8_t body[1024];
    float a[2] = {1.25f, -7.0f};
    memcpy(body, head, hl);
    memcpy(body + hl, a, 8);
    memcpy(body + hl + 8, "\x01\x02\x03", 3);
    struct bs_ctensor out[4];
    int n;
    struct bs_client_err err = {0};
    assert_int_equal(bs_http_parse_infer(body, hl + 11, hl, out, 4, &n, &err), 0);
    assert_int_equal(n, 4);
    assert_string_equal(out[0].name, "a");
    assert_memory_equal(out[0].data, a, 8);
    assert_memory_equal(out[1].data, "\x01\x02\x03", 3);
    assert_int_equal(((int32_t *)out[2].data)[1], 6); /* nested data arrays flatten */
    assert_null(out[3].data);                         /* in shared memory */
    assert_int_equal(out[3].nbytes, 8);
    for (int i = 0; i < n; i++)
        bs_ct_free(&out[i]);
    /* truncated, extra, mismatched and impossible */
    assert_int_equal(bs_http_parse_infer(body, hl + 10, hl, out, 4, &n, &err), BS_EFORMAT);
    assert_non_null(strstr(err.msg, "output 'b': the body ends 2 bytes into its 3 bytes"));
    assert_int_equal(n, 0);
    assert_int_equal(bs_http_parse_infer(body, hl + 12, hl, out, 4, &n, &err), BS_EFORMAT);
    assert_non_null(strstr(err.msg, "1 bytes of binary data follow"));
    assert_int_equal(bs_http_parse_infer(body, hl, hl + 1, out, 4, &n, &err), BS_EFORMAT);
    assert_non_null(strstr(err.msg, "past the body"));
    assert_int_equal(bs_http_parse_infer(body, hl + 11, hl - 1, out, 4, &n, &err), BS_EFORMAT);
    assert_int_equal(bs_http_parse_infer(body, hl + 11, hl, out, 3, &n, &err), BS_EINVAL);
    const char *bad = "{\"outputs\":[{\"name\":\"a\",\"datatype\":\"FP32\",\"shape\":[2],"
                      "\"parameters\":{\"binary_data_size\":4}}]}";
    assert_int_equal(
        bs_http_parse_infer((const uint8_t *)bad, strlen(bad), strlen(bad), out, 4, &n, &err),
        BS_EFORMAT);
    assert_non_null(strstr(err.msg, "binary_data_size 4, expected 8"));
    const char *few = "{\"outputs\":[{\"name\":\"a\",\"datatype\":\"INT64\",\"shape\":[3],"
                      "\"data\":[1,2]}]}";
    assert_int_equal(bs_http_parse_infer((const uint8_t *)few, strlen(few), 0, out, 4, &n, &err),
                     BS_EFORMAT);
    assert_non_null(strstr(err.msg, "2 values for 3 elements"));
    const char *frac = "{\"outputs\":[{\"name\":\"a\",\"datatype\":\"INT64\",\"shape\":[1],"
                       "\"data\":[1.5]}]}";
    assert_int_equal(bs_http_parse_infer((const uint8_t *)frac, strlen(frac), 0, out, 4, &n, &err),
                     BS_EFORMAT);
}

static void test_errors(void **state)
{
    (void)state;
    struct bs_client_err err = {0};
    const char *b = "{\"error\":\"unknown model \\\"x\\\"\"}";
    assert_int_equal(bs_http_error_from_body(404, (const uint8_t *)b, strlen(b), &err),
                     BS_ENOTFOUND);
    assert_string_equal(err.msg, "HTTP 404: unknown model \"x\"");
    assert_int_equal(err.grpc_status, 5);
    b = "<html>Bad Gateway</html>\r\nmore";
    assert_int_equal(bs_http_error_from_body(502, (const uint8_t *)b, strlen(b), &err), BS_EIO);
    assert_string_equal(err.msg, "HTTP 502: <html>Bad Gateway</html>");
    bs_http_error_from_body(429, NULL, 0, &err);
    assert_string_equal(err.msg, "HTTP 429 (no body)");
    assert_int_equal(err.code, BS_EBUSY);
    assert_int_equal(err.grpc_status, 8);
    assert_int_equal(bs_http_status_to_grpc(401), 16);
    assert_int_equal(bs_http_status_to_grpc(503), 14);
    assert_int_equal(bs_http_status_to_grpc(400), 3);
    assert_int_equal(bs_http_status_to_grpc(204), 0);
}

static void test_compression(void **state)
{
    (void)state;
    char text[4096];
    for (size_t i = 0; i < sizeof(text); i++)
        text[i] = "{\"data\":[0.5,1,2]}"[i % 18];
    for (int enc = BS_HTTP_GZIP; enc <= BS_HTTP_DEFLATE; enc++) {
        struct bs_client_err err = {0};
        uint8_t *z, *back;
        size_t zn, bn;
        assert_int_equal(bs_http_compress(enc, text, sizeof(text), &z, &zn, &err), 0);
        assert_true(zn < sizeof(text) / 4);
        if (enc == BS_HTTP_GZIP)
            assert_memory_equal(z, "\x1f\x8b", 2); /* gzip's magic */
        else
            assert_int_equal(z[0] & 0x0f, 8); /* zlib: CM = deflate */
        assert_int_equal(bs_http_decompress(enc, z, zn, sizeof(text), &back, &bn, &err), 0);
        assert_int_equal(bn, sizeof(text));
        assert_memory_equal(back, text, bn);
        free(back);
        z[zn / 2] ^= 0x55;
        assert_int_not_equal(bs_http_decompress(enc, z, zn, sizeof(text), &back, &bn, &err), 0);
        free(z);
    }
}

static void test_metadata_index_status(void **state)
{
    (void)state;
    struct bs_client_err err = {0};
    const char *j = "{\"name\":\"m\",\"versions\":[\"1\",\"2\"],\"platform\":\"bs\","
                    "\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[-1,4096,1152]}],"
                    "\"outputs\":[{\"name\":\"output\",\"datatype\":\"BF16\",\"shape\":[-1,8]}]}";
    Inference__ModelMetadataResponse *m;
    assert_int_equal(bs_http_parse_model_metadata(j, strlen(j), &m, &err), 0);
    assert_string_equal(m->name, "m");
    assert_int_equal(m->n_versions, 2);
    assert_int_equal(m->n_inputs, 1);
    assert_int_equal(m->inputs[0]->n_shape, 3);
    assert_int_equal(m->inputs[0]->shape[0], -1);
    assert_int_equal(m->inputs[0]->shape[2], 1152);
    assert_string_equal(m->outputs[0]->datatype, "BF16");
    bs_client_msg_free(m);
    assert_int_equal(bs_http_parse_model_metadata("{\"inputs\":[{\"shape\":[1.5]}]}", 27, &m, &err),
                     BS_EFORMAT);
    j = "[{\"name\":\"a\",\"version\":\"1\",\"state\":\"READY\"},{\"name\":\"b\",\"state\":"
        "\"UNAVAILABLE\",\"reason\":\"why\"}]";
    Inference__RepositoryIndexResponse *r;
    assert_int_equal(bs_http_parse_repository_index(j, strlen(j), &r, &err), 0);
    assert_int_equal(r->n_models, 2);
    assert_string_equal(r->models[1]->reason, "why");
    assert_string_equal(r->models[1]->version, "");
    bs_client_msg_free(r);
    j = "[{\"name\":\"z\",\"key\":\"/k\",\"offset\":16,\"byte_size\":\"1024\"},"
        "{\"name\":\"a\",\"key\":\"/j\",\"offset\":0,\"byte_size\":64}]";
    struct bs_client_shm_region g[4];
    int n;
    assert_int_equal(bs_http_parse_shm_status(j, strlen(j), g, 4, &n, &err), 0);
    assert_int_equal(n, 2);
    assert_string_equal(g[0].name, "a"); /* sorted */
    assert_string_equal(g[1].key, "/k");
    assert_int_equal(g[1].offset, 16);
    assert_int_equal(g[1].byte_size, 1024);
    assert_int_equal(bs_http_parse_shm_status("{}", 2, g, 4, &n, &err), BS_EFORMAT);
}

static void test_paths(void **state)
{
    (void)state;
    char p[64];
    assert_int_equal(bs_http_model_path(p, sizeof(p), "my model/1", "2", "/infer"), 0);
    assert_string_equal(p, "/v2/models/my%20model%2F1/versions/2/infer");
    assert_int_equal(bs_http_model_path(p, sizeof(p), "m", NULL, ""), 0);
    assert_string_equal(p, "/v2/models/m");
    assert_int_equal(bs_http_model_path(p, 16, "a-very-long-model", NULL, ""), BS_ERANGE);
    assert_true(bs_http_url_is_http("http://h:1"));
    assert_true(bs_http_url_is_http("https://h"));
    assert_false(bs_http_url_is_http("grpcs://h"));
    assert_false(bs_http_url_is_http("localhost:8000"));
}

/* A client's base URL from the options (nothing is connected). */
static void test_base_url(void **state)
{
    (void)state;
    static const struct {
        struct bs_client_options o;
        const char *want;
    } rows[] = {
        {{.url = NULL}, "http://localhost:8000"},
        {{.url = "http://h:9/"}, "http://h:9"},
        {{.url = "https://h:9"}, "https://h:9"},
        {{.url = "h:9", .tls_ca = "ca.pem"}, "https://h:9"},
        {{.url = "h:9", .tls = true}, "https://h:9"},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        bs_http_t *h;
        struct bs_client_err err = {0};
        assert_int_equal(bs_http_init(&h, &rows[i].o, BS_HTTP_IDENTITY, &err), 0);
        assert_string_equal(bs_http_base(h), rows[i].want);
        bs_http_free(h);
    }
}

static int parse(struct cli *a, ...)
{
    char *argv[16];
    int argc = 0;
    va_list ap;
    va_start(ap, a);
    for (char *s; (s = va_arg(ap, char *)) != NULL;)
        argv[argc++] = s;
    va_end(ap);
    return cli_parse(argc, argv, a);
}

static void test_cli_args(void **state)
{
    (void)state;
    struct cli a;
    assert_int_equal(parse(&a, "infer", "m", "--http-json", NULL), 0);
    assert_true(a.http && a.http_json);
    assert_int_equal(parse(&a, "infer", "m", "-u", "https://h:1", NULL), 0);
    assert_true(a.http);
    assert_int_equal(parse(&a, "infer", "m", "-u", "h:1", NULL), 0);
    assert_false(a.http);
    assert_int_equal(parse(&a, "bench", "m", "--http", "--compress", "deflate", "--shm", NULL), 0);
    assert_int_equal(a.compress, BS_HTTP_DEFLATE);
    assert_true(a.shm);
    assert_int_equal(parse(&a, "models", "--compress", "gzip", NULL), -1); /* gRPC */
    assert_int_equal(parse(&a, "models", "--http", "--compress", "br", NULL), -1);
    assert_int_equal(parse(&a, "shm", "register", "r", "/k", "64", "--offset", "8", "--http", NULL),
                     0);
    assert_string_equal(a.cmd, "shm");
    assert_int_equal(a.n_args, 4);
    assert_string_equal(a.args[0], "register");
    assert_string_equal(a.args[3], "64");
    assert_int_equal(a.offset, 8);
    assert_null(a.model);
    assert_int_equal(parse(&a, "shm", "status", NULL), 0);
    assert_int_equal(a.n_args, 1);
    assert_int_equal(parse(&a, "shm", "--http", NULL), -1);
    assert_int_equal(parse(&a, "unload", "m", NULL), 0);
    assert_string_equal(a.model, "m");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pack_binary),   cmocka_unit_test(test_json_datatypes),
        cmocka_unit_test(test_json_refusals), cmocka_unit_test(test_pack_shm),
        cmocka_unit_test(test_parse_binary),  cmocka_unit_test(test_errors),
        cmocka_unit_test(test_compression),   cmocka_unit_test(test_metadata_index_status),
        cmocka_unit_test(test_paths),         cmocka_unit_test(test_base_url),
        cmocka_unit_test(test_cli_args),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
