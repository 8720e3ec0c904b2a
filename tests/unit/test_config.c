/* config.json parsing: defaults, every class, the blockserve section, and the
 * errors a bad file must give. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "config.h"

static int parse(struct bs_model_config *c, const char *text, struct bs_err *err)
{
    memset(err, 0, sizeof(*err));
    return bs_config_parse(c, text, strlen(text), "config.json", err);
}

static void expect_error(const char *text, int code, const char *needle)
{
    struct bs_model_config c;
    struct bs_err err;
    int rc = parse(&c, text, &err);
    if (rc != code || strstr(err.msg, needle) == NULL)
        fail_msg("config %s: got rc %d \"%s\", expected rc %d with \"%s\"", text, rc, err.msg, code,
                 needle);
    assert_non_null(strstr(err.msg, "config.json"));
}

static void test_btb_defaults(void **state)
{
    (void)state;
    struct bs_model_config c;
    struct bs_err err;
    assert_int_equal(parse(&c,
                           "{\"_class_name\": \"BasicTransformerBlock\", \"_diffusers_version\": "
                           "\"0.14.0\", \"dim\": 320, \"num_attention_heads\": 8, "
                           "\"attention_head_dim\": 40, \"cross_attention_dim\": 768}",
                           &err),
                     0);
    assert_string_equal(bs_config_class_name(c.cls), "BasicTransformerBlock");
    assert_int_equal(c.btb.dim, 320);
    assert_int_equal(c.btb.cross_attention_dim, 768);
    assert_int_equal(c.btb.activation_fn, BS_FF_GEGLU);
    assert_int_equal(c.btb.norm_type, BS_NORM_LAYER_NORM);
    assert_true(c.btb.norm_elementwise_affine);
    assert_false(c.btb.attention_bias);
    assert_int_equal(c.btb.num_embeds_ada_norm, 0);
    assert_int_equal(c.num_blocks, 1);
    assert_string_equal(c.weights_prefix, "");
}

static void test_btb_dit(void **state)
{
    (void)state;
    struct bs_model_config c;
    struct bs_err err;
    assert_int_equal(parse(&c,
                           "{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 1152, "
                           "\"num_attention_heads\": 16, \"attention_head_dim\": 72, "
                           "\"activation_fn\": \"gelu-approximate\", \"num_embeds_ada_norm\": 1000,"
                           " \"attention_bias\": true, \"norm_type\": \"ada_norm_zero\", "
                           "\"norm_elementwise_affine\": false, \"cross_attention_dim\": null, "
                           "\"dropout\": 0.0, \"final_dropout\": false, "
                           "\"blockserve\": {\"num_blocks\": 28}, \"serving\": {\"x\": 1}}",
                           &err),
                     0);
    assert_int_equal(c.btb.activation_fn, BS_FF_GELU_APPROXIMATE);
    assert_int_equal(c.btb.norm_type, BS_NORM_ADA_NORM_ZERO);
    assert_int_equal(c.btb.num_embeds_ada_norm, 1000);
    assert_int_equal(c.btb.cross_attention_dim, 0);
    assert_false(c.btb.norm_elementwise_affine);
    assert_int_equal(c.num_blocks, 28);
    assert_string_equal(c.weights_prefix, "transformer_blocks.{i}."); /* default for stacks */
}

static void test_other_classes(void **state)
{
    (void)state;
    struct bs_model_config c;
    struct bs_err err;
    assert_int_equal(parse(&c, "{\"_class_name\": \"AttentionBlock\", \"channels\": 512, "
                               "\"num_head_channels\": null, \"eps\": 1e-6}", &err), 0);
    assert_string_equal(bs_config_class_name(c.cls), "AttentionBlock");
    assert_int_equal(c.attention_block.norm_num_groups, 32);
    assert_true(c.attention_block.eps == 1e-6);
    assert_true(c.attention_block.rescale_output_factor == 1.0);
    assert_int_equal(parse(&c, "{\"_class_name\": \"FeedForward\", \"dim\": 24, \"mult\": 2, "
                               "\"dim_out\": 16, \"activation_fn\": \"geglu\"}", &err), 0);
    assert_int_equal(bs_config_ff_inner(&c), 48);
    assert_int_equal(parse(&c, "{\"_class_name\": \"GELU\", \"dim_in\": 8, \"dim_out\": 16, "
                               "\"approximate\": \"tanh\"}", &err), 0);
    assert_true(c.activation.approximate_tanh);
    assert_int_equal(parse(&c, "{\"_class_name\": \"AdaGroupNorm\", \"embedding_dim\": 12, "
                               "\"out_dim\": 16, \"num_groups\": 4, \"act_fn\": \"swish\"}", &err), 0);
    assert_int_equal(c.ada_group_norm.act_fn, BS_ACT_SILU);
    assert_int_equal(parse(&c, "{\"_class_name\": \"AdaGroupNorm\", \"embedding_dim\": 12, "
                               "\"out_dim\": 16, \"num_groups\": 4, \"act_fn\": null}", &err), 0);
    assert_int_equal(c.ada_group_norm.act_fn, BS_ACT_NONE);
    assert_int_equal(parse(&c, "{\"_class_name\": \"AdaLayerNorm\", \"embedding_dim\": 12, "
                               "\"num_embeddings\": 5, \"blockserve\": {\"weights_prefix\": "
                               "\"norm1.\", \"weights_file\": \"w.safetensors\"}}", &err), 0);
    assert_string_equal(c.weights_prefix, "norm1.");
    assert_string_equal(c.weights_file, "w.safetensors");
}

static void test_errors(void **state)
{
    (void)state;
    expect_error("{\"dim\": 3", BS_EFORMAT, "byte");
    /* Not read as "BasicTransformerBlock": a NUL would cut the string there. */
    expect_error("{\"_class_name\": \"BasicTransformerBlock\\u0000evil\", \"dim\": 32, "
                 "\"num_attention_heads\": 4, \"attention_head_dim\": 8}", BS_EFORMAT,
                 "config.json: byte 38: \\u0000 is not allowed in JSON strings");
    expect_error("[1, 2]", BS_EINVAL, "expected a JSON object");
    expect_error("{\"dim\": 3}", BS_EINVAL, "missing \"_class_name\"");
    expect_error("{\"_class_name\": \"UNet2DConditionModel\"}", BS_EUNSUPP,
                 "unknown \"_class_name\" \"UNet2DConditionModel\"");
    expect_error("{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 32, "
                 "\"num_attention_heads\": 4}", BS_EINVAL, "missing required key "
                 "\"attention_head_dim\"");
    expect_error("{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 32, "
                 "\"num_attention_heads\": 4, \"attention_head_dim\": 8, \"activation_fn\": "
                 "\"relu\"}", BS_EINVAL, "unknown value \"relu\"");
    expect_error("{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 32, "
                 "\"num_attention_heads\": 4, \"attention_head_dim\": 8, \"norm_type\": "
                 "\"ada_norm\"}", BS_EINVAL, "num_embeds_ada_norm");
    expect_error("{\"_class_name\": \"BasicTransformerBlock\", \"dim\": -32, "
                 "\"num_attention_heads\": 4, \"attention_head_dim\": 8}", BS_EINVAL, "out of range");
    expect_error("{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 32.5, "
                 "\"num_attention_heads\": 4, \"attention_head_dim\": 8}", BS_EINVAL,
                 "expected an integer");
    expect_error("{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 32, "
                 "\"num_attention_heads\": 4, \"attention_head_dim\": 8, \"num_heads\": 3}",
                 BS_EINVAL, "unknown key \"num_heads\"");
    expect_error("{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 32, "
                 "\"num_attention_heads\": 4, \"attention_head_dim\": 8, \"attention_bias\": 1}",
                 BS_EINVAL, "expected true or false");
    expect_error("{\"_class_name\": \"AttentionBlock\", \"channels\": 30}", BS_EINVAL,
                 "not divisible by norm_num_groups");
    expect_error("{\"_class_name\": \"FeedForward\", \"dim\": 4, \"blockserve\": "
                 "{\"num_blocks\": 2}}", BS_EINVAL, "only BasicTransformerBlock");
    expect_error("{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 32, "
                 "\"num_attention_heads\": 4, \"attention_head_dim\": 8, \"blockserve\": "
                 "{\"num_blocks\": 2, \"weights_prefix\": \"blocks.\"}}", BS_EINVAL, "{i}");
    expect_error("{\"_class_name\": \"FeedForward\", \"dim\": 4, \"blockserve\": "
                 "{\"weights_file\": \"../../etc/passwd\"}}", BS_EINVAL, "inside the model");
    expect_error("{\"_class_name\": \"FeedForward\", \"dim\": 4, \"blockserve\": "
                 "{\"prefix\": \"a\"}}", BS_EINVAL, "unknown key \"prefix\"");
}

static void test_load_missing(void **state)
{
    (void)state;
    struct bs_model_config c;
    struct bs_err err = {0};
    assert_int_equal(bs_config_load(&c, "/nonexistent/config.json", &err), BS_EIO);
    assert_non_null(strstr(err.msg, "/nonexistent/config.json"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_btb_defaults),  cmocka_unit_test(test_btb_dit),
        cmocka_unit_test(test_other_classes), cmocka_unit_test(test_errors),
        cmocka_unit_test(test_load_missing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
