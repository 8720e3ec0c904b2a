/* A model's "serving" settings (server/serving.c): the queue policies and
 * Triton's priority levels parsed over the server's defaults, each level's
 * effective policy, and every bad setting refused with a message that names
 * its key. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "serving.h"

/* The server's defaults for a model (--max-batch-size, --max-queue-size). */
static struct bs_serving_config defaults(void)
{
    struct bs_serving_config c = {0};
    c.max_batch_size = 8;
    c.max_queue_delay_us = 2000;
    c.max_queue_size = 256;
    return c;
}

static struct bs_serving_config parse_ok(const char *json)
{
    struct bs_serving_config c = defaults();
    struct bs_err err = {0};
    if (bs_serving_parse(&c, json, strlen(json), &err) != 0)
        fail_msg("%s: %s", json, err.msg);
    return c;
}

/* json is refused with BS_EINVAL and a message that holds want. */
static void parse_bad(const char *json, const char *want)
{
    struct bs_serving_config c = defaults();
    struct bs_err err = {0};
    int rc = bs_serving_parse(&c, json, strlen(json), &err);
    if (rc != BS_EINVAL || strstr(err.msg, want) == NULL)
        fail_msg("%s: got %d \"%s\", want BS_EINVAL and \"%s\"", json, rc, err.msg, want);
}

static void assert_policy(const struct bs_queue_policy *p, enum bs_timeout_action action,
                          int64_t timeout_us, bool override, int max_queue)
{
    assert_int_equal(p->timeout_action, action);
    assert_int_equal(p->default_timeout_us, timeout_us);
    assert_int_equal(p->allow_timeout_override, override);
    assert_int_equal(p->max_queue_size, max_queue);
}

/* Without levels: the default policy is the server's (REJECT, no timeout,
 * overrides allowed, --max-queue-size); the older top-level keys set it. */
static void test_defaults_and_top_level_keys(void **state)
{
    struct bs_serving_config c = parse_ok("{}");
    struct bs_queue_policy p = bs_serving_policy(&c, 0);
    assert_int_equal(c.priority_levels, 0);
    assert_policy(&p, BS_TIMEOUT_REJECT, 0, true, 256);
    c = parse_ok("{\"max_queue_size\": 4, \"default_timeout_microseconds\": 5000}");
    p = bs_serving_policy(&c, 0);
    assert_policy(&p, BS_TIMEOUT_REJECT, 5000, true, 4);
    c = parse_ok("{\"default_queue_policy\": {\"timeout_action\": \"DELAY\", "
                 "\"default_timeout_microseconds\": 100, \"allow_timeout_override\": false, "
                 "\"max_queue_size\": 0}}");
    p = bs_serving_policy(&c, 0);
    assert_policy(&p, BS_TIMEOUT_DELAY, 100, false, 0); /* 0: no bound, as in Triton */
    /* one policy field at the top level, another in default_queue_policy */
    c = parse_ok("{\"max_queue_size\": 9, \"default_queue_policy\": {\"timeout_action\": "
                 "\"REJECT\"}}");
    p = bs_serving_policy(&c, 0);
    assert_policy(&p, BS_TIMEOUT_REJECT, 0, true, 9);
}

/* With levels: each level's entry over the default policy, whatever the
 * order of the keys; levels without an entry have the default policy. */
static void test_levels(void **state)
{
    struct bs_serving_config c =
        parse_ok("{\"priority_queue_policy\": {\"3\": {\"max_queue_size\": 2}, \"1\": "
                 "{\"timeout_action\": \"DELAY\", \"default_timeout_microseconds\": 1000}}, "
                 "\"priority_levels\": 3, \"default_priority_level\": 2, "
                 "\"default_queue_policy\": {\"default_timeout_microseconds\": 7, "
                 "\"allow_timeout_override\": false}}");
    assert_int_equal(c.priority_levels, 3);
    assert_int_equal(c.default_priority_level, 2);
    struct bs_queue_policy p = bs_serving_policy(&c, 1);
    assert_policy(&p, BS_TIMEOUT_DELAY, 1000, false, 256);
    p = bs_serving_policy(&c, 2); /* no entry */
    assert_policy(&p, BS_TIMEOUT_REJECT, 7, false, 256);
    p = bs_serving_policy(&c, 3);
    assert_policy(&p, BS_TIMEOUT_REJECT, 7, false, 2);
    assert_int_equal(c.level_policy[1].given, 0);
    assert_int_equal(c.level_policy[2].given, BS_POLICY_GIVEN | BS_POLICY_QUEUE_SIZE);
    /* a later serving.json replaces the whole map and may drop the levels */
    struct bs_err err = {0};
    const char *later = "{\"priority_levels\": 0, \"default_priority_level\": 0, "
                        "\"priority_queue_policy\": {}}";
    assert_int_equal(bs_serving_parse(&c, later, strlen(later), &err), 0);
    assert_int_equal(c.priority_levels, 0);
    for (int i = 0; i < BS_MAX_PRIORITY_LEVELS; i++)
        assert_int_equal(c.level_policy[i].given, 0);
}

/* Each bad setting is an error that names its key. */
static void test_bad_settings(void **state)
{
    /* the default level */
    parse_bad("{\"priority_levels\": 2}",
              "serving.default_priority_level: required with priority_levels 2");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 0}",
              "serving.default_priority_level: required with priority_levels 2");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 3}",
              "serving.default_priority_level 3: not a level in [1, 2]");
    parse_bad("{\"default_priority_level\": 1}",
              "serving.default_priority_level 1: the model has no priority levels");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": -1}",
              "serving.default_priority_level: expected an integer");
    /* the number of levels */
    parse_bad("{\"priority_levels\": -1}",
              "serving.priority_levels: expected an integer in [0, 64]");
    parse_bad("{\"priority_levels\": 65}",
              "serving.priority_levels: expected an integer in [0, 64]");
    parse_bad("{\"priority_levels\": 1.5}", "serving.priority_levels: expected an integer");
    parse_bad("{\"priority_levels\": \"2\"}", "serving.priority_levels: expected an integer");
    /* the levels' policies */
    parse_bad("{\"priority_queue_policy\": {\"1\": {}}}",
              "serving.priority_queue_policy: the model has no priority levels");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 1, "
              "\"priority_queue_policy\": {\"3\": {}}}",
              "serving.priority_queue_policy: level 3 is not in [1, 2]");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 1, "
              "\"priority_queue_policy\": {\"0\": {}}}",
              "serving.priority_queue_policy: key \"0\" is not a priority level");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 1, "
              "\"priority_queue_policy\": {\"01\": {}}}",
              "serving.priority_queue_policy: key \"01\" is not a priority level");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 1, "
              "\"priority_queue_policy\": {\"high\": {}}}",
              "serving.priority_queue_policy: key \"high\" is not a priority level");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 1, "
              "\"priority_queue_policy\": {\"1\": {}, \"1\": {}}}",
              "serving.priority_queue_policy: level 1 given twice");
    parse_bad("{\"priority_queue_policy\": [1]}",
              "serving.priority_queue_policy: expected an object");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 1, "
              "\"priority_queue_policy\": {\"2\": 5}}",
              "serving.priority_queue_policy.2: expected an object");
    parse_bad(
        "{\"priority_levels\": 2, \"default_priority_level\": 1, "
        "\"priority_queue_policy\": {\"2\": {\"max_queue_size\": -1}}}",
        "serving.priority_queue_policy.2.max_queue_size: expected an integer in [0, 1000000]");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 1, "
              "\"priority_queue_policy\": {\"2\": {\"default_timeout_microseconds\": 0.5}}}",
              "serving.priority_queue_policy.2.default_timeout_microseconds: expected an integer");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 1, "
              "\"priority_queue_policy\": {\"2\": {\"timeout_action\": \"DROP\"}}}",
              "serving.priority_queue_policy.2.timeout_action: expected \"REJECT\" or \"DELAY\"");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 1, "
              "\"priority_queue_policy\": {\"2\": {\"allow_timeout_override\": 1}}}",
              "serving.priority_queue_policy.2.allow_timeout_override: expected true or false");
    parse_bad("{\"priority_levels\": 2, \"default_priority_level\": 1, "
              "\"priority_queue_policy\": {\"2\": {\"timeout\": 1}}}",
              "serving.priority_queue_policy.2: unknown key \"timeout\"");
    /* the default policy */
    parse_bad("{\"default_queue_policy\": {\"max_queue_size\": -5}}",
              "serving.default_queue_policy.max_queue_size: expected an integer in [0, 1000000]");
    parse_bad("{\"default_queue_policy\": {\"default_timeout_microseconds\": -1}}",
              "serving.default_queue_policy.default_timeout_microseconds: expected an integer");
    parse_bad("{\"default_queue_policy\": {\"timeout_action\": 1}}",
              "serving.default_queue_policy.timeout_action: expected \"REJECT\" or \"DELAY\"");
    parse_bad("{\"default_queue_policy\": true}",
              "serving.default_queue_policy: expected an object");
    parse_bad("{\"max_queue_size\": 4, \"default_queue_policy\": {\"max_queue_size\": 8}}",
              "serving.default_queue_policy.max_queue_size: also given as serving.max_queue_size");
    parse_bad("{\"default_queue_policy\": {\"default_timeout_microseconds\": 8}, "
              "\"default_timeout_microseconds\": 4}",
              "serving.default_queue_policy.default_timeout_microseconds: also given");
    parse_bad("{\"max_queue_size\": 0}",
              "serving.max_queue_size: expected an integer in [1, 1000000]");
    parse_bad("{\"default_timeout_microseconds\": -1}",
              "serving.default_timeout_microseconds: expected an integer");
}

/* bs_serving_check on settings made in code (the batcher checks them too). */
static void test_check(void **state)
{
    struct bs_serving_config c = defaults();
    struct bs_err err = {0};
    assert_int_equal(bs_serving_check(&c, &err), 0);
    c.priority_levels = 2;
    c.default_priority_level = 2;
    c.level_policy[1] =
        (struct bs_level_policy){BS_POLICY_GIVEN | BS_POLICY_TIMEOUT, {.default_timeout_us = -1}};
    assert_int_equal(bs_serving_check(&c, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "serving.priority_queue_policy.2: negative"));
    c.level_policy[1].p.default_timeout_us = 1;
    assert_int_equal(bs_serving_check(&c, &err), 0);
    c.max_queue_size = -1;
    assert_int_equal(bs_serving_check(&c, &err), BS_EINVAL);
    /* out-of-range levels have the default policy */
    c.max_queue_size = 3;
    struct bs_queue_policy p = bs_serving_policy(&c, 7);
    assert_policy(&p, BS_TIMEOUT_REJECT, 0, true, 3);
}

/* output_datatype: FP32 (the zero value) unless set; Triton's names only. */
static void test_output_datatype(void **state)
{
    (void)state;
    assert_int_equal(parse_ok("{}").out_dtype, BS_TYPE_F32);
    assert_int_equal(parse_ok("{\"output_datatype\": \"BF16\"}").out_dtype, BS_TYPE_BF16);
    assert_int_equal(parse_ok("{\"output_datatype\": \"FP16\"}").out_dtype, BS_TYPE_F16);
    assert_int_equal(parse_ok("{\"output_datatype\": \"FP32\"}").out_dtype, BS_TYPE_F32);
    const char *want = "serving.output_datatype: expected \"FP32\", \"BF16\" or \"FP16\"";
    parse_bad("{\"output_datatype\": \"bf16\"}", want);
    parse_bad("{\"output_datatype\": \"FP64\"}", want);
    parse_bad("{\"output_datatype\": \"INT64\"}", want);
    parse_bad("{\"output_datatype\": 16}", want);
    parse_bad("{\"output_datatype\": null}", want);
    parse_bad("{\"output_dtype\": \"BF16\"}", "output_datatype"); /* the known keys list it */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_and_top_level_keys),
        cmocka_unit_test(test_levels),
        cmocka_unit_test(test_bad_settings),
        cmocka_unit_test(test_check),
        cmocka_unit_test(test_output_datatype),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
