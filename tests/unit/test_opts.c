/* Unit tests for command lines from tables (common/opts.c): every kind of
 * value, the error codes and messages the three programs print, defaults,
 * and the help and synopsis printed from the same rows. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "opts.h"

struct t_opts {
    int port;
    int64_t big;
    double rate, timeout;
    const char *name;
    const char *files[3];
    int n_files;
    int format;
    bool verbose;
    int metrics;
    bool metrics_given;
    const char *positional;
    const char *out;
};

#define AT(kind, field) BS_OPTS_AT(kind, struct t_opts, field)

static const char *const formats[] = {"bin", "json", "text", NULL};

static const struct bs_opt rows[] = {
    {"--port", AT(INT, port), .lo = 0, .hi = 65535, .def = "8001", .metavar = "N",
     .help = "port (default %D; 0 picks one)", BS_OPTS_GIVEN(struct t_opts, metrics_given)},
    {"--big", AT(INT64, big), .lo = 1, .hi = (int64_t)1 << 40, .def = "67108864", .metavar = "N",
     .help = "a big one\nover two lines"},
    {"--rate", AT(DOUBLE, rate), .metavar = "R", .help = "a rate"},
    {"--timeout", AT(SECONDS, timeout), .alias = "-t", .metavar = "SECONDS", .help = "a time"},
    {"--name", AT(STR, name), .def = "x", .metavar = "NAME", .help = "a name"},
    {"--file", AT(LIST, files), .hi = 3, BS_OPTS_COUNT(struct t_opts, n_files),
     .metavar = "A-VERY-LONG-METAVARIABLE", .help = "files"},
    {"--format", AT(ENUM, format), .choices = formats, .def = "json", .help = "format"},
    {"--verbose", AT(FLAG, verbose), .alias = "-v", .help = "say more"},
    {"--no-metrics", AT(SET, metrics), .lo = 0, BS_OPTS_GIVEN(struct t_opts, metrics_given),
     .help = "no metrics"},
    {"--hidden", AT(STR, out)},
    {"--help", .kind = BS_OPT_HELP, .alias = "-h", .help = "this help"},
    BS_OPTS_NULL,
};
static const struct bs_opt required_rows[] = {
    {"--out", AT(STR, out), .required = true, .metavar = "FILE", .help = "the output"},
    {"--count", AT(INT, metrics), .lo = 1, .hi = 10, .want = "a small integer", .metavar = "N",
     .help = "count"},
    BS_OPTS_NULL,
};
static const struct bs_opt *const tables[] = {rows, NULL};
static const struct bs_opt *const tables_req[] = {rows, required_rows, NULL};
static const struct bs_opts_cmd cmd = {.tables = tables}; /* no positional */
static const struct bs_opts_cmd cmd_pos = {tables_req, "MODEL", offsetof(struct t_opts, positional),
                                           true};

/* Parse a NULL-terminated argument list (without argv[0]). */
static int parse_v(const struct bs_opts_cmd *c, struct t_opts *o, struct bs_opts_err *e,
                   const char *first, va_list ap)
{
    char *argv[32] = {"prog"};
    int argc = 1;
    for (const char *a = first; a != NULL && argc < 32; a = va_arg(ap, const char *))
        argv[argc++] = (char *)a;
    memset(o, 0, sizeof(*o));
    return bs_opts_parse(c, o, argc, argv, e);
}

static int parse(const struct bs_opts_cmd *c, struct t_opts *o, struct bs_opts_err *e, ...)
{
    va_list ap;
    va_start(ap, e);
    const char *first = va_arg(ap, const char *);
    int rc = parse_v(c, o, e, first, ap);
    va_end(ap);
    return rc;
}

static void test_defaults_and_values(void **state)
{
    struct t_opts o;
    struct bs_opts_err e;
    assert_int_equal(parse(&cmd, &o, &e, NULL), BS_OPTS_OK);
    assert_int_equal(o.port, 8001);
    assert_int_equal(o.big, 67108864);
    assert_string_equal(o.name, "x");
    assert_int_equal(o.format, 1);
    assert_false(o.metrics_given); /* defaults do not count as given */
    assert_int_equal(parse(&cmd, &o, &e, "--port", "0", "--big", "1099511627776", "--rate", "2.5",
                           "-t", "500ms", "--name", "n", "--file", "a", "--file", "b", "--format",
                           "text", "-v", "--hidden", "h", NULL),
                     BS_OPTS_OK);
    assert_int_equal(o.port, 0);
    assert_true(o.metrics_given);
    assert_int_equal(o.big, (int64_t)1 << 40);
    assert_true(o.rate == 2.5);
    assert_true(o.timeout == 0.5);
    assert_string_equal(o.name, "n");
    assert_int_equal(o.n_files, 2);
    assert_string_equal(o.files[1], "b");
    assert_int_equal(o.format, 2);
    assert_true(o.verbose);
    assert_string_equal(o.out, "h");
    assert_int_equal(parse(&cmd, &o, &e, "--timeout", "2m", "--no-metrics", NULL), BS_OPTS_OK);
    assert_true(o.timeout == 120);
    assert_int_equal(o.metrics, 0);
    assert_true(o.metrics_given);
    assert_int_equal(parse(&cmd, &o, &e, "--timeout", "1h", NULL), BS_OPTS_OK);
    assert_true(o.timeout == 3600);
}

/* One bad value: code, message, and the argument as given. */
static void bad_value(const char *flag, const char *value, const char *msg)
{
    struct t_opts o;
    struct bs_opts_err e;
    assert_int_equal(parse(&cmd_pos, &o, &e, flag, value, NULL), BS_OPTS_EVALUE);
    assert_int_equal(e.code, BS_OPTS_EVALUE);
    assert_non_null(e.opt);
    assert_string_equal(e.arg, flag);
    assert_string_equal(e.value, value);
    assert_string_equal(e.msg, msg);
}

static void test_bad_values(void **state)
{
    bad_value("--port", "x", "--port: expected an integer in [0, 65535], got \"x\"");
    bad_value("--port", "65536", "--port: expected an integer in [0, 65535], got \"65536\"");
    bad_value("--port", "-1", "--port: expected an integer in [0, 65535], got \"-1\"");
    bad_value("--port", "1x", "--port: expected an integer in [0, 65535], got \"1x\"");
    bad_value("--port", "", "--port: expected an integer in [0, 65535], got \"\"");
    bad_value("--big", "99999999999999999999",
              "--big: expected an integer in [1, 1099511627776], got \"99999999999999999999\"");
    bad_value("--rate", "0", "--rate: expected a positive number, got \"0\"");
    bad_value("--rate", "inf", "--rate: expected a positive number, got \"inf\"");
    bad_value("-t", "5x", "-t: expected a positive duration (10, 10s, 500ms, 2m), got \"5x\"");
    bad_value("--timeout", "-1s",
              "--timeout: expected a positive duration (10, 10s, 500ms, 2m), got \"-1s\"");
    bad_value("--format", "xml", "--format: expected bin, json or text, got \"xml\"");
    bad_value("--count", "0", "--count: expected a small integer, got \"0\"");
}

static void test_structure_errors(void **state)
{
    struct t_opts o;
    struct bs_opts_err e;
    /* without a positional, every argument is taken for an option */
    assert_int_equal(parse(&cmd, &o, &e, "foo", NULL), BS_OPTS_ENOVALUE);
    assert_string_equal(e.msg, "foo needs a value");
    assert_null(e.value);
    assert_int_equal(parse(&cmd, &o, &e, "foo", "bar", NULL), BS_OPTS_EUNKNOWN);
    assert_string_equal(e.msg, "unknown option \"foo\"");
    assert_string_equal(e.value, "bar");
    /* an option wanting a value at the end, known or not */
    assert_int_equal(parse(&cmd, &o, &e, "--port", NULL), BS_OPTS_ENOVALUE);
    assert_ptr_equal(e.opt, &rows[0]);
    assert_int_equal(parse(&cmd, &o, &e, "--frob", NULL), BS_OPTS_ENOVALUE);
    assert_null(e.opt);
    /* a value-less option at the end is fine */
    assert_int_equal(parse(&cmd, &o, &e, "--port", "1", "--verbose", NULL), BS_OPTS_OK);
    /* a list past its bound */
    assert_int_equal(
        parse(&cmd, &o, &e, "--file", "a", "--file", "b", "--file", "c", "--file", "d", NULL),
        BS_OPTS_ETOOMANY);
    assert_string_equal(e.msg, "at most 3 --file options");
    assert_string_equal(e.value, "d");
    /* help stops at once, even before a bad value */
    assert_int_equal(parse(&cmd, &o, &e, "-h", "--port", "x", NULL), BS_OPTS_HELP);
    assert_int_equal(parse(&cmd, &o, &e, "--port", "x", "--help", NULL), BS_OPTS_EVALUE);
}

static void test_positional_and_required(void **state)
{
    struct t_opts o;
    struct bs_opts_err e;
    assert_int_equal(parse(&cmd_pos, &o, &e, NULL), BS_OPTS_EMISSING);
    assert_string_equal(e.msg, "missing MODEL");
    assert_int_equal(parse(&cmd_pos, &o, &e, "m", NULL), BS_OPTS_EMISSING);
    assert_string_equal(e.msg, "missing --out");
    assert_int_equal(parse(&cmd_pos, &o, &e, "--out", "-", "m", NULL), BS_OPTS_OK);
    assert_string_equal(o.positional, "m");
    assert_string_equal(o.out, "-"); /* a value may start with '-' */
    assert_int_equal(parse(&cmd_pos, &o, &e, "-", "--out", "f", NULL), BS_OPTS_OK);
    assert_string_equal(o.positional, "-"); /* "-" alone is an argument */
    assert_int_equal(parse(&cmd_pos, &o, &e, "m", "n", NULL), BS_OPTS_EEXTRA);
    assert_string_equal(e.msg, "unexpected argument \"n\"");
}

static char *capture_help(const struct bs_opt *r, int width)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    bs_opts_help(f, r, width);
    fclose(f);
    return buf;
}

static void test_help(void **state)
{
    char *text = capture_help(rows, 20);
    const char *want = "  --port N            port (default 8001; 0 picks one)\n"
                       "  --big N             a big one\n"
                       "                      over two lines (default 67108864)\n"
                       "  --rate R            a rate\n"
                       "  -t, --timeout SECONDS  a time\n"
                       "  --name NAME         a name (default x)\n"
                       "  --file A-VERY-LONG-METAVARIABLE  files\n"
                       "  --format bin|json|text  format (default json)\n"
                       "  -v, --verbose       say more\n"
                       "  --no-metrics        no metrics\n"
                       "  -h, --help          this help\n";
    assert_string_equal(text, want);
    free(text);
}

static void test_synopsis(void **state)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    bs_opts_synopsis(f, "  tool", &cmd_pos, 6, 60);
    fclose(f);
    assert_string_equal(buf, "  tool MODEL --out FILE [--port N] [--big N] [--rate R]\n"
                             "      [--timeout SECONDS] [--name NAME]\n"
                             "      [--file A-VERY-LONG-METAVARIABLE]\n"
                             "      [--format bin|json|text] [--verbose] [--no-metrics]\n"
                             "      [--count N]\n"); /* no line past column 60 */
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_and_values),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_structure_errors),
        cmocka_unit_test(test_positional_and_required),
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_synopsis),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
