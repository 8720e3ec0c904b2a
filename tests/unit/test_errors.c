/* The status table (engine/common.h): every code is distinct and named, and
 * maps to the gRPC status, HTTP status and metrics reason the server has
 * always answered with (the values below are the ones the service's and the
 * batcher's switches gave before the table existed). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "common.h"

struct expect {
    int code;
    const char *name;
    int grpc, http;
    enum bs_reason reason;
};

static const struct expect table[] = {
    {BS_OK, "BS_OK", 0, 200, BS_REASON_NONE},
    {BS_EINVAL, "BS_EINVAL", 3, 400, BS_REASON_OTHER},
    {BS_ENOMEM, "BS_ENOMEM", 8, 500, BS_REASON_BACKEND},
    {BS_EIO, "BS_EIO", 13, 500, BS_REASON_BACKEND},
    {BS_EFORMAT, "BS_EFORMAT", 3, 400, BS_REASON_OTHER},
    {BS_ENOTFOUND, "BS_ENOTFOUND", 5, 404, BS_REASON_OTHER},
    {BS_EUNSUPP, "BS_EUNSUPP", 14, 503, BS_REASON_REJECTED},
    {BS_EINTERNAL, "BS_EINTERNAL", 13, 500, BS_REASON_BACKEND},
    {BS_ERANGE, "BS_ERANGE", 8, 400, BS_REASON_OTHER},
    {BS_ETIMEDOUT, "BS_ETIMEDOUT", 4, 503, BS_REASON_REJECTED},
    {BS_ECANCELED, "BS_ECANCELED", 1, 499, BS_REASON_CANCELED},
    {BS_EBUSY, "BS_EBUSY", 8, 429, BS_REASON_REJECTED},
    {BS_ENOTIMPL, "BS_ENOTIMPL", 12, 501, BS_REASON_OTHER},
    {BS_EEXIST, "BS_EEXIST", 6, 409, BS_REASON_OTHER},
};

static void test_mapping(void **state)
{
    (void)state;
    for (size_t i = 0; i < BS_ARRAY_LEN(table); i++) {
        const struct expect *e = &table[i];
        assert_string_equal(bs_status_name(e->code), e->name);
        assert_int_equal(bs_status_grpc(e->code), e->grpc);
        assert_int_equal(bs_status_http(e->code), e->http);
        assert_int_equal(bs_status_reason(e->code), e->reason);
        assert_non_null(bs_status_str(e->code));
        assert_true(strlen(bs_status_str(e->code)) > 0);
    }
}

/* Codes are distinct, their messages too (a message names one code). */
static void test_distinct(void **state)
{
    (void)state;
    for (size_t i = 0; i < BS_ARRAY_LEN(table); i++)
        for (size_t j = i + 1; j < BS_ARRAY_LEN(table); j++) {
            assert_int_not_equal(table[i].code, table[j].code);
            assert_string_not_equal(bs_status_str(table[i].code), bs_status_str(table[j].code));
        }
}

/* "Queue full" has its own code, apart from "too large". */
static void test_busy_is_not_range(void **state)
{
    (void)state;
    assert_int_not_equal(BS_EBUSY, BS_ERANGE);
    assert_int_equal(bs_status_reason(BS_EBUSY), BS_REASON_REJECTED);
    assert_int_equal(bs_status_reason(BS_ERANGE), BS_REASON_OTHER);
}

/* A value outside the table is an internal error everywhere. */
static void test_unknown(void **state)
{
    (void)state;
    assert_string_equal(bs_status_name(-999), "BS_E?");
    assert_string_equal(bs_status_str(-999), "unknown error");
    assert_int_equal(bs_status_grpc(-999), 13);
    assert_int_equal(bs_status_http(-999), 500);
    assert_int_equal(bs_status_reason(-999), BS_REASON_BACKEND);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mapping),
        cmocka_unit_test(test_distinct),
        cmocka_unit_test(test_busy_is_not_range),
        cmocka_unit_test(test_unknown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
