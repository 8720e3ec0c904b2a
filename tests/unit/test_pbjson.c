/* protobuf-c messages as JSON (server/pbjson.c): every output is parsed back
 * with the project's strict JSON parser and checked field by field. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "grpc_service.pb-c.h"
#include "json.h"
#include "model_config.pb-c.h"
#include "pbjson.h"

/* Render m, parse it back (strictly), and return the document. */
static bs_json_doc_t *render(const ProtobufCMessage *m, const char *field, bool values_only,
                             char **text)
{
    struct bs_jbuf b = {0};
    if (field != NULL)
        assert_true(bs_pbjson_write_field(&b, m, field, values_only));
    else
        bs_pbjson_write(&b, m);
    assert_false(b.oom);
    bs_json_doc_t *doc = NULL;
    struct bs_err err = {0};
    if (bs_json_parse(&doc, b.data, b.len, 0, &err) != 0)
        fail_msg("not JSON: %s\n%s", err.msg, b.data);
    *text = b.data;
    return doc;
}

static void test_scalars_repeated_and_strings(void **state)
{
    (void)state;
    Inference__ServerMetadataResponse r = INFERENCE__SERVER_METADATA_RESPONSE__INIT;
    char *ext[] = {"a", "quote\" back\\slash\n\x01"};
    r.name = "blockserve";
    r.version = "";
    r.n_extensions = 2;
    r.extensions = ext;
    char *text;
    bs_json_doc_t *doc = render(&r.base, NULL, false, &text);
    const struct bs_json *root = bs_json_doc_root(doc);
    assert_string_equal(bs_json_get(root, "name")->string, "blockserve");
    assert_string_equal(bs_json_get(root, "version")->string, ""); /* defaults written */
    const struct bs_json *e = bs_json_get(root, "extensions");
    assert_int_equal(e->type, BS_JSON_ARRAY);
    assert_int_equal(e->len, 2);
    assert_string_equal(e->child->next->string, ext[1]); /* escaped and back */
    free(text);
    bs_json_doc_free(doc);
}

static void test_int64_numbers_and_nested(void **state)
{
    (void)state;
    Inference__StatisticDuration ok = INFERENCE__STATISTIC_DURATION__INIT;
    ok.count = 3;
    ok.ns = UINT64_C(18446744073709551615);
    Inference__InferStatistics is = INFERENCE__INFER_STATISTICS__INIT;
    is.success = &ok;
    Inference__ModelStatistics ms = INFERENCE__MODEL_STATISTICS__INIT;
    ms.name = "m";
    ms.version = "1";
    ms.inference_count = 42;
    ms.inference_stats = &is;
    Inference__ModelStatistics *list[] = {&ms};
    Inference__ModelStatisticsResponse r = INFERENCE__MODEL_STATISTICS_RESPONSE__INIT;
    r.n_model_stats = 1;
    r.model_stats = list;
    char *text;
    bs_json_doc_t *doc = render(&r.base, NULL, false, &text);
    const struct bs_json *s0 = bs_json_get(bs_json_doc_root(doc), "model_stats")->child;
    const struct bs_json *c = bs_json_get(s0, "inference_count");
    assert_int_equal(c->type, BS_JSON_NUMBER); /* a number, not a string */
    assert_true(c->is_integer);
    assert_int_equal(c->integer, 42);
    const struct bs_json *st = bs_json_get(s0, "inference_stats");
    assert_non_null(bs_json_get(st, "success"));
    assert_null(bs_json_get(st, "fail")); /* an unset submessage is left out */
    assert_non_null(strstr(text, "\"ns\":18446744073709551615"));
    assert_int_equal(bs_json_get(s0, "batch_stats")->type, BS_JSON_ARRAY);
    free(text);
    bs_json_doc_free(doc);
}

static void test_enums_maps_and_oneofs(void **state)
{
    (void)state;
    Inference__ModelInput in = INFERENCE__MODEL_INPUT__INIT;
    int64_t dims[] = {4, -1};
    in.name = "x";
    in.data_type = INFERENCE__DATA_TYPE__TYPE_FP16;
    in.n_dims = 2;
    in.dims = dims;
    Inference__ModelInput *ins[] = {&in};
    Inference__ModelParameter p = INFERENCE__MODEL_PARAMETER__INIT;
    p.string_value = "BasicTransformerBlock";
    Inference__ModelConfig__ParametersEntry pe = INFERENCE__MODEL_CONFIG__PARAMETERS_ENTRY__INIT;
    pe.key = "_class_name";
    pe.value = &p;
    Inference__ModelConfig__ParametersEntry *pes[] = {&pe};
    Inference__ModelConfig cfg = INFERENCE__MODEL_CONFIG__INIT;
    cfg.name = "m";
    cfg.max_batch_size = 8;
    cfg.n_input = 1;
    cfg.input = ins;
    cfg.n_parameters = 1;
    cfg.parameters = pes;
    char *text;
    bs_json_doc_t *doc = render(&cfg.base, NULL, false, &text);
    const struct bs_json *root = bs_json_doc_root(doc);
    const struct bs_json *x = bs_json_get(root, "input")->child;
    assert_string_equal(bs_json_get(x, "data_type")->string, "TYPE_FP16");
    assert_int_equal(bs_json_get(x, "dims")->child->next->integer, -1);
    const struct bs_json *params = bs_json_get(root, "parameters");
    assert_int_equal(params->type, BS_JSON_OBJECT); /* a map is an object */
    assert_string_equal(bs_json_get(bs_json_get(params, "_class_name"), "string_value")->string,
                        "BasicTransformerBlock");
    assert_int_equal(bs_json_get(root, "max_batch_size")->integer, 8);
    free(text);
    bs_json_doc_free(doc);

    /* oneof: only the member set */
    Inference__InferParameter ip = INFERENCE__INFER_PARAMETER__INIT;
    ip.parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    ip.int64_param = -7;
    doc = render(&ip.base, NULL, false, &text);
    assert_string_equal(text, "{\"int64_param\":-7}");
    free(text);
    bs_json_doc_free(doc);
}

static void test_map_values_and_fields(void **state)
{
    (void)state;
    Inference__SystemSharedMemoryStatusResponse__RegionStatus a =
        INFERENCE__SYSTEM_SHARED_MEMORY_STATUS_RESPONSE__REGION_STATUS__INIT;
    a.name = "r0";
    a.key = "/k";
    a.byte_size = 64;
    Inference__SystemSharedMemoryStatusResponse__RegionsEntry e =
        INFERENCE__SYSTEM_SHARED_MEMORY_STATUS_RESPONSE__REGIONS_ENTRY__INIT;
    e.key = "r0";
    e.value = &a;
    Inference__SystemSharedMemoryStatusResponse__RegionsEntry *es[] = {&e};
    Inference__SystemSharedMemoryStatusResponse r =
        INFERENCE__SYSTEM_SHARED_MEMORY_STATUS_RESPONSE__INIT;
    r.n_regions = 1;
    r.regions = es;
    char *text;
    bs_json_doc_t *doc = render(&r.base, "regions", true, &text);
    const struct bs_json *root = bs_json_doc_root(doc);
    assert_int_equal(root->type, BS_JSON_ARRAY);
    assert_int_equal(bs_json_get(root->child, "byte_size")->integer, 64);
    free(text);
    bs_json_doc_free(doc);
    doc = render(&r.base, "regions", false, &text);
    assert_string_equal(bs_json_get(bs_json_get(bs_json_doc_root(doc), "r0"), "key")->string, "/k");
    free(text);
    bs_json_doc_free(doc);
    struct bs_jbuf b = {0};
    assert_false(bs_pbjson_write_field(&b, &r.base, "nope", false));
    free(b.data);
}

static void test_bytes_base64(void **state)
{
    (void)state;
    Inference__CudaSharedMemoryRegisterRequest r =
        INFERENCE__CUDA_SHARED_MEMORY_REGISTER_REQUEST__INIT;
    uint8_t raw[] = {0, 1, 2, 3, 0xff};
    r.name = "c";
    r.raw_handle = (ProtobufCBinaryData){sizeof(raw), raw};
    char *text;
    bs_json_doc_t *doc = render(&r.base, NULL, false, &text);
    assert_string_equal(bs_json_get(bs_json_doc_root(doc), "raw_handle")->string, "AAECA/8=");
    free(text);
    bs_json_doc_free(doc);
}

static void test_floats_round_trip(void **state)
{
    (void)state;
    const float v[] = {0.1f, -1e-38f, 3.4028235e38f, 1.0f / 3.0f, 1e-45f, -0.0f, 16777217.0f};
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        struct bs_jbuf b = {0};
        bs_jbuf_float(&b, v[i]);
        float back = strtof(b.data, NULL);
        assert_memory_equal(&back, &v[i], sizeof(float));
        free(b.data);
    }
    struct bs_jbuf b = {0};
    bs_jbuf_float(&b, NAN);
    bs_jbuf_float(&b, -INFINITY);
    assert_string_equal(b.data, "NaN-Infinity");
    free(b.data);
}

static void test_buffer_growth(void **state)
{
    (void)state;
    struct bs_jbuf b = {0};
    for (int i = 0; i < 10000; i++)
        bs_jbuf_printf(&b, "%d,", i);
    bs_jbuf_printf(&b, "%0300d", 7); /* longer than the small buffer */
    assert_false(b.oom);
    assert_int_equal(strlen(b.data), b.len);
    assert_memory_equal(b.data, "0,1,2,", 6);
    free(b.data);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scalars_repeated_and_strings),
        cmocka_unit_test(test_int64_numbers_and_nested),
        cmocka_unit_test(test_enums_maps_and_oneofs),
        cmocka_unit_test(test_map_values_and_fields),
        cmocka_unit_test(test_bytes_base64),
        cmocka_unit_test(test_floats_round_trip),
        cmocka_unit_test(test_buffer_growth),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
