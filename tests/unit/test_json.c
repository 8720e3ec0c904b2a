/* Unit tests for the strict JSON parser (engine/json.c). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "json.h"

/* a == b to within a few ulps. */
static bool close_to(double a, double b)
{
    return fabs(a - b) <= 1e-15 * fabs(b);
}

/* Parse a NUL-terminated text that must be valid. */
static bs_json_doc_t *parse_ok(const char *text)
{
    bs_json_doc_t *doc = NULL;
    struct bs_err err = {0};
    int rc = bs_json_parse(&doc, text, strlen(text), 0, &err);
    if (rc != 0)
        print_error("unexpected failure on %s: %s\n", text, err.msg);
    assert_int_equal(rc, 0);
    assert_non_null(doc);
    return doc;
}

/* Parse len bytes that must be rejected as BS_EFORMAT with a message naming
 * the byte offset and containing want (when not NULL). */
static void parse_bad_n(const char *text, size_t len, int max_depth, const char *want)
{
    bs_json_doc_t *doc = (bs_json_doc_t *)&doc; /* must be reset to NULL */
    struct bs_err err = {0};
    int rc = bs_json_parse(&doc, text, len, max_depth, &err);
    if (rc != BS_EFORMAT || strstr(err.msg, "byte ") == NULL ||
        (want != NULL && strstr(err.msg, want) == NULL))
        print_error("input [%.*s]: rc %d, message \"%s\" (wanted \"%s\")\n", (int)len, text, rc,
                    err.msg, want ? want : "");
    assert_int_equal(rc, BS_EFORMAT);
    assert_int_equal(err.code, BS_EFORMAT);
    assert_null(doc);
    assert_non_null(strstr(err.msg, "byte "));
    if (want != NULL)
        assert_non_null(strstr(err.msg, want));
}

static void parse_bad(const char *text, const char *want)
{
    parse_bad_n(text, strlen(text), 0, want);
}

static void test_scalars(void **state)
{
    static const struct {
        const char *text;
        enum bs_json_type type;
        bool boolean;
    } cases[] = {
        {"null", BS_JSON_NULL, false}, {"true", BS_JSON_BOOL, true},
        {"false", BS_JSON_BOOL, false}, {" \t\r\n true \n", BS_JSON_BOOL, true},
    };
    for (size_t i = 0; i < BS_ARRAY_LEN(cases); i++) {
        bs_json_doc_t *doc = parse_ok(cases[i].text);
        const struct bs_json *v = bs_json_doc_root(doc);
        assert_int_equal(v->type, cases[i].type);
        assert_int_equal(v->boolean, cases[i].boolean);
        assert_null(v->child);
        bs_json_doc_free(doc);
    }
}

static void test_string(void **state)
{
    bs_json_doc_t *doc = parse_ok("\"hello\"");
    const struct bs_json *v = bs_json_doc_root(doc);
    assert_int_equal(v->type, BS_JSON_STRING);
    assert_string_equal(v->string, "hello");
    assert_int_equal(v->len, 5);
    bs_json_doc_free(doc);

    doc = parse_ok("\"\"");
    v = bs_json_doc_root(doc);
    assert_string_equal(v->string, "");
    assert_int_equal(v->len, 0);
    bs_json_doc_free(doc);
}

static void test_escapes(void **state)
{
    bs_json_doc_t *doc = parse_ok("\"a\\\"b\\\\c\\/d\\be\\ff\\ng\\rh\\ti\"");
    const struct bs_json *v = bs_json_doc_root(doc);
    assert_string_equal(v->string, "a\"b\\c/d\be\ff\ng\rh\ti");
    assert_int_equal(v->len, 17);
    bs_json_doc_free(doc);
}

static void test_unicode(void **state)
{
    static const struct {
        const char *text, *want;
    } cases[] = {
        {"\"\\u0041\"", "A"},
        {"\"\\u00e9\"", "\xc3\xa9"},                 /* 2-byte UTF-8 */
        {"\"\\u20AC\"", "\xe2\x82\xac"},             /* 3-byte, upper-case hex */
        {"\"\\uD83D\\uDE00\"", "\xf0\x9f\x98\x80"},  /* surrogate pair */
        {"\"\\udbff\\udfff\"", "\xf4\x8f\xbf\xbf"},  /* U+10FFFF */
        {"\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"", /* raw UTF-8 passes through */
         "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"},
    };
    for (size_t i = 0; i < BS_ARRAY_LEN(cases); i++) {
        bs_json_doc_t *doc = parse_ok(cases[i].text);
        const struct bs_json *v = bs_json_doc_root(doc);
        assert_int_equal(v->type, BS_JSON_STRING);
        assert_string_equal(v->string, cases[i].want);
        assert_int_equal(v->len, strlen(cases[i].want));
        bs_json_doc_free(doc);
    }
    /* Other control characters may be escaped: only U+0000 would cut the C string. */
    bs_json_doc_t *doc = parse_ok("\"a\\u0001b\"");
    const struct bs_json *v = bs_json_doc_root(doc);
    assert_int_equal(v->len, 3);
    assert_memory_equal(v->string, "a\x01" "b", 4);
    bs_json_doc_free(doc);
}

/* A NUL inside a string, escaped or raw, is refused: strings are handed out
 * NUL-terminated and would be cut at it. */
static void test_nul_in_strings(void **state)
{
    parse_bad("\"a\\u0000b\"", "byte 2: \\u0000 is not allowed in JSON strings");
    parse_bad("\"\\u0000\"", "byte 1: \\u0000 is not allowed in JSON strings");
    parse_bad("{\"_class_name\": \"BasicTransformerBlock\\u0000evil\"}",
              "byte 38: \\u0000 is not allowed in JSON strings");
    parse_bad("{\"k\\u0000ey\": 1}", "byte 3: \\u0000 is not allowed"); /* keys too */
    parse_bad("[\"ok\", \"\\u00000\"]", "byte 8: \\u0000 is not allowed");
    parse_bad_n("{\"a\0b\": 1}", 10, 0, "byte 3: NUL byte in string");
    parse_bad_n("\"\0\"", 3, 0, "byte 1: NUL byte in string");
}

static void test_integers(void **state)
{
    static const struct {
        const char *text;
        int64_t want;
    } cases[] = {
        {"0", 0},
        {"-0", 0},
        {"7", 7},
        {"-42", -42},
        {"1234567890123", 1234567890123LL},
        {"9223372036854775807", INT64_MAX},
        {"-9223372036854775808", INT64_MIN},
    };
    for (size_t i = 0; i < BS_ARRAY_LEN(cases); i++) {
        bs_json_doc_t *doc = parse_ok(cases[i].text);
        const struct bs_json *v = bs_json_doc_root(doc);
        assert_int_equal(v->type, BS_JSON_NUMBER);
        assert_true(v->is_integer);
        assert_true(v->integer == cases[i].want);
        assert_true(v->number == (double)cases[i].want);
        bs_json_doc_free(doc);
    }
}

static void test_non_integers(void **state)
{
    static const struct {
        const char *text;
        double want;
    } cases[] = {
        {"9223372036854775808", 9223372036854775808.0},   /* INT64_MAX + 1 */
        {"-9223372036854775809", -9223372036854775808.0}, /* INT64_MIN - 1 */
        {"123456789012345678901234567890", 1.2345678901234568e29},
        {"1.5", 1.5},
        {"-0.25", -0.25},
        {"0.0", 0.0},
        {"1e3", 1000.0},
        {"1E3", 1000.0},
        {"2e+2", 200.0},
        {"25e-2", 0.25},
        {"-1.5E-3", -0.0015},
        {"1.0", 1.0}, /* integral value, but written with a fraction */
        {"1e-400", 0.0}, /* underflow rounds to zero */
    };
    for (size_t i = 0; i < BS_ARRAY_LEN(cases); i++) {
        bs_json_doc_t *doc = parse_ok(cases[i].text);
        const struct bs_json *v = bs_json_doc_root(doc);
        assert_int_equal(v->type, BS_JSON_NUMBER);
        assert_false(v->is_integer);
        assert_true(close_to(v->number, cases[i].want));
        bs_json_doc_free(doc);
    }
}

static void test_long_number(void **state)
{
    /* Longer than the parser's stack buffer. */
    char text[300];
    memset(text, '1', sizeof(text) - 1);
    text[sizeof(text) - 1] = '\0';
    text[1] = '.';
    bs_json_doc_t *doc = parse_ok(text);
    const struct bs_json *v = bs_json_doc_root(doc);
    assert_false(v->is_integer);
    assert_true(close_to(v->number, 1.1111111111111111));
    bs_json_doc_free(doc);
}

static void test_array(void **state)
{
    bs_json_doc_t *doc = parse_ok(" [ 1 , \"two\" , [ ] , { } , null , [[3]] ] ");
    const struct bs_json *a = bs_json_doc_root(doc);
    assert_int_equal(a->type, BS_JSON_ARRAY);
    assert_int_equal(a->len, 6);
    const struct bs_json *v = a->child;
    assert_int_equal(v->type, BS_JSON_NUMBER);
    assert_int_equal(v->integer, 1);
    assert_null(v->key);
    v = v->next;
    assert_string_equal(v->string, "two");
    v = v->next;
    assert_int_equal(v->type, BS_JSON_ARRAY);
    assert_int_equal(v->len, 0);
    assert_null(v->child);
    v = v->next;
    assert_int_equal(v->type, BS_JSON_OBJECT);
    assert_int_equal(v->len, 0);
    v = v->next;
    assert_int_equal(v->type, BS_JSON_NULL);
    v = v->next;
    assert_int_equal(v->type, BS_JSON_ARRAY);
    assert_int_equal(v->child->type, BS_JSON_ARRAY);
    assert_int_equal(v->child->child->integer, 3);
    assert_null(v->next);
    assert_null(bs_json_get(a, "x")); /* not an object */
    bs_json_doc_free(doc);

    doc = parse_ok("[]");
    assert_int_equal(bs_json_doc_root(doc)->len, 0);
    bs_json_doc_free(doc);
}

static void test_object(void **state)
{
    bs_json_doc_t *doc = parse_ok("{\"a\": 1, \"b\": {\"c\": [true, false]}, \"\\u00e9\": \"x\", "
                                  "\"a\": 2}");
    const struct bs_json *o = bs_json_doc_root(doc);
    assert_int_equal(o->type, BS_JSON_OBJECT);
    assert_int_equal(o->len, 4);
    assert_string_equal(o->child->key, "a");
    assert_int_equal(bs_json_get(o, "a")->integer, 1); /* first match */
    const struct bs_json *b = bs_json_get(o, "b");
    assert_non_null(b);
    assert_int_equal(b->type, BS_JSON_OBJECT);
    const struct bs_json *c = bs_json_get(b, "c");
    assert_int_equal(c->type, BS_JSON_ARRAY);
    assert_int_equal(c->len, 2);
    assert_true(c->child->boolean);
    assert_false(c->child->next->boolean);
    assert_string_equal(bs_json_get(o, "\xc3\xa9")->string, "x");
    assert_null(bs_json_get(o, "missing"));
    assert_null(bs_json_get(NULL, "a"));
    const struct bs_json *last = o->child->next->next->next;
    assert_string_equal(last->key, "a");
    assert_int_equal(last->integer, 2);
    assert_null(last->next);
    bs_json_doc_free(doc);
}

static void test_big_document(void **state)
{
    /* Enough nodes and long strings to span several arena chunks. */
    size_t n = 5000, cap = n * 40 + 20000;
    char *text = malloc(cap);
    assert_non_null(text);
    size_t off = (size_t)snprintf(text, cap, "{\"long\": \"");
    memset(text + off, 'x', 10000);
    off += 10000;
    off += (size_t)snprintf(text + off, cap - off, "\", \"list\": [");
    for (size_t i = 0; i < n; i++)
        off += (size_t)snprintf(text + off, cap - off, "%s{\"k%zu\": %zu}", i ? "," : "", i, i);
    off += (size_t)snprintf(text + off, cap - off, "]}");
    bs_json_doc_t *doc = parse_ok(text);
    const struct bs_json *root = bs_json_doc_root(doc);
    assert_int_equal(bs_json_get(root, "long")->len, 10000);
    const struct bs_json *list = bs_json_get(root, "list");
    assert_int_equal(list->len, n);
    size_t i = 0;
    for (const struct bs_json *v = list->child; v; v = v->next, i++)
        assert_int_equal(v->child->integer, (int64_t)i);
    assert_int_equal(i, n);
    bs_json_doc_free(doc);
    free(text);
}

static char *nested(int depth, char open, char close)
{
    char *s = malloc((size_t)depth * 2 + 1);
    memset(s, open, (size_t)depth);
    memset(s + depth, close, (size_t)depth);
    s[depth * 2] = '\0';
    return s;
}

static void test_depth(void **state)
{
    bs_json_doc_t *doc = NULL;
    struct bs_err err = {0};
    char *s = nested(64, '[', ']'); /* default limit: 64 is fine */
    assert_int_equal(bs_json_parse(&doc, s, strlen(s), 0, &err), 0);
    bs_json_doc_free(doc);
    free(s);

    s = nested(65, '[', ']');
    parse_bad_n(s, strlen(s), 0, "nesting deeper than 64");
    free(s);

    s = nested(3, '[', ']');
    assert_int_equal(bs_json_parse(&doc, s, strlen(s), 3, &err), 0);
    bs_json_doc_free(doc);
    parse_bad_n(s, strlen(s), 2, "byte 2: nesting deeper than 2");
    free(s);

    parse_bad_n("{\"a\":{\"b\":{}}}", 13, 2, "nesting deeper than 2");
    parse_bad_n("[1, [2]]", 8, 1, "nesting deeper than 1");

    /* Far deeper than any C stack would take with recursion. */
    s = nested(1000000, '[', ']');
    parse_bad_n(s, strlen(s), 0, "nesting deeper than 64");
    assert_int_equal(bs_json_parse(&doc, s, strlen(s), 1000000, &err), 0);
    bs_json_doc_free(doc);
    free(s);
}

static void test_malformed(void **state)
{
    static const struct {
        const char *text, *want;
    } cases[] = {
        /* empty and truncated */
        {"", "byte 0: expected a value, found end of input"},
        {"   ", "byte 3: expected a value"},
        {"[", "byte 1: expected a value, found end of input"},
        {"[1", "byte 2: expected ',' or ']', found end of input"},
        {"[1,", "expected a value"},
        {"{", "byte 1: expected '\"' or '}'"},
        {"{\"a\"", "byte 4: expected ':'"},
        {"{\"a\":", "byte 5: expected a value"},
        {"{\"a\":1", "byte 6: expected ',' or '}'"},
        {"tru", "expected a value"},
        {"nul", "expected a value"},
        /* separators */
        {"[1,]", "byte 3: expected a value, found ']'"},
        {"{\"a\":1,}", "byte 7: expected '\"', found '}'"},
        {"[1 2]", "byte 3: expected ',' or ']', found '2'"},
        {"{\"a\" 1}", "expected ':'"},
        {"{\"a\":1 \"b\":2}", "expected ',' or '}'"},
        {"{1:2}", "expected '\"' or '}'"},
        {"{'a':1}", "expected '\"' or '}', found byte 0x27"},
        {"[}", "expected a value"},
        {"{]", "expected '\"' or '}'"},
        {"[1}", "expected ',' or ']'"},
        {"{\"a\":1]", "expected ',' or '}'"},
        /* strings */
        {"\"abc", "byte 0: unterminated string"},
        {"\"abc\\\"", "unterminated string"},
        {"[\"a\\x\"]", "byte 3: invalid escape"},
        {"\"\\u12\"", "expected 4 hex digits"},
        {"\"\\u12G4\"", "expected 4 hex digits"},
        {"\"\\uD800\"", "byte 1: high surrogate not followed by a \\u low surrogate"},
        {"\"\\uD800\\u0041\"", "high surrogate"},
        {"\"\\uD800x\"", "high surrogate"},
        {"\"\\uDC00\"", "lone low surrogate"},
        {"\"a\tb\"", "byte 2: control character in string"},
        {"\"a\nb\"", "control character"},
        {"\"\x1f\"", "control character"},
        {"\"\xff\"", "invalid UTF-8"},
        {"\"\xc3\"", "invalid UTF-8"},          /* truncated sequence */
        {"\"\xc0\xaf\"", "invalid UTF-8"},      /* overlong */
        {"\"\xed\xa0\x80\"", "invalid UTF-8"},  /* encoded surrogate */
        {"\"\xf4\x90\x80\x80\"", "invalid UTF-8"}, /* above U+10FFFF */
        /* numbers */
        {"01", "byte 0: leading zeros"},
        {"-012", "byte 1: leading zeros"},
        {"[00]", "leading zeros"},
        {"+1", "byte 0: expected a value, found '+'"},
        {"-", "byte 1: expected a digit, found end of input"},
        {"-a", "expected a digit"},
        {"1.", "byte 2: expected a digit after '.'"},
        {"1.e5", "expected a digit after '.'"},
        {".5", "expected a value"},
        {"1e", "expected a digit in the exponent"},
        {"1e+", "expected a digit in the exponent"},
        {"NaN", "expected a value"},
        {"Infinity", "expected a value"},
        {"-Infinity", "expected a digit"},
        {"1e400", "byte 0: number out of range"},
        {"0x10", "byte 1: expected end of input after the value, found 'x'"},
        /* garbage after the root */
        {"1 2", "byte 2: expected end of input"},
        {"{} x", "byte 3: expected end of input"},
        {"[]]", "byte 2: expected end of input"},
        {"truex", "byte 4: expected end of input"},
        {"nulll", "expected end of input"},
        {"\"a\"\"b\"", "expected end of input"},
        /* not JSON at all */
        {"True", "expected a value"},
        {"undefined", "expected a value"},
        {"[1,,2]", "expected a value"},
        {"{\"a\"::1}", "expected a value"},
        {"// c\n1", "expected a value"},
        {"\xef\xbb\xbf{}", "expected a value"}, /* byte order mark */
    };
    for (size_t i = 0; i < BS_ARRAY_LEN(cases); i++)
        parse_bad(cases[i].text, cases[i].want);
}

static void test_embedded_nul(void **state)
{
    parse_bad_n("[1]\0", 4, 0, "byte 3: expected end of input after the value, found byte 0x00");
    parse_bad_n("\"a\0b\"", 5, 0, "byte 2: NUL byte in string (not allowed in JSON strings)");
    /* Only len bytes count: the closing bracket is past it. */
    parse_bad_n("[1]", 2, 0, "expected ',' or ']'");
}

static void test_null_err(void **state)
{
    bs_json_doc_t *doc = NULL;
    assert_int_equal(bs_json_parse(&doc, "[1,", 3, 0, NULL), BS_EFORMAT);
    assert_null(doc);
    assert_int_equal(bs_json_parse(&doc, "[1]", 3, 0, NULL), 0);
    bs_json_doc_free(doc);
    assert_int_equal(bs_json_parse(&doc, NULL, 0, 0, NULL), BS_EFORMAT);
    bs_json_doc_free(NULL);
    assert_null(bs_json_doc_root(NULL));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scalars),      cmocka_unit_test(test_string),
        cmocka_unit_test(test_escapes),      cmocka_unit_test(test_unicode),
        cmocka_unit_test(test_integers),     cmocka_unit_test(test_non_integers),
        cmocka_unit_test(test_long_number),  cmocka_unit_test(test_array),
        cmocka_unit_test(test_object),       cmocka_unit_test(test_big_document),
        cmocka_unit_test(test_depth),        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_embedded_nul), cmocka_unit_test(test_null_err),
        cmocka_unit_test(test_nul_in_strings),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
