/* Command lines from tables: parsing and help (opts.h). */
#include "opts.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

static void *field(void *dst, size_t off)
{
    return (char *)dst + off;
}

static bool takes_value(const struct bs_opt *o)
{
    return o->kind != BS_OPT_FLAG && o->kind != BS_OPT_SET && o->kind != BS_OPT_HELP;
}

/* An argument that is an option (not "-" alone, which names a file). */
static bool is_option(const char *arg)
{
    return arg[0] == '-' && arg[1] != '\0';
}

static const struct bs_opt *find(const struct bs_opts_cmd *cmd, const char *arg)
{
    for (const struct bs_opt *const *t = cmd->tables; *t != NULL; t++)
        for (const struct bs_opt *o = *t; o->name != NULL; o++)
            if (strcmp(arg, o->name) == 0 || (o->alias != NULL && strcmp(arg, o->alias) == 0))
                return o;
    return NULL;
}

__attribute__((format(printf, 6, 7))) static int fail(struct bs_opts_err *err, int code,
                                                      const struct bs_opt *o, const char *arg,
                                                      const char *value, const char *fmt, ...)
{
    va_list ap;
    err->code = code;
    err->opt = o;
    err->arg = arg;
    err->value = value;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    return code;
}

static bool parse_int64(const char *v, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0' || x < lo || x > hi)
        return false;
    *out = x;
    return true;
}

static bool parse_double(const char *v, double *out)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno != 0 || end == v || *end != '\0' || !isfinite(x) || x <= 0)
        return false;
    *out = x;
    return true;
}

/* "2.5", "10s", "500ms", "2m", "1h" as seconds. */
static bool parse_seconds(const char *v, double *out)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    double unit = !strcmp(end, "") || !strcmp(end, "s") ? 1
                  : !strcmp(end, "ms")                  ? 1e-3
                  : !strcmp(end, "m")                   ? 60
                  : !strcmp(end, "h")                   ? 3600
                                                        : -1;
    if (errno != 0 || end == v || unit < 0 || !isfinite(x) || x <= 0)
        return false;
    *out = x * unit;
    return true;
}

static bool parse_choice(const struct bs_opt *o, const char *v, int *out)
{
    for (int i = 0; o->choices[i] != NULL; i++) {
        if (strcmp(v, o->choices[i]) == 0) {
            *out = i;
            return true;
        }
    }
    return false;
}

/* choices into buf, separated by sep and the last one by last_sep. */
static void join(char *buf, size_t size, const char *const *choices, const char *sep,
                 const char *last_sep)
{
    size_t n = 0;
    buf[0] = '\0';
    for (int i = 0; choices[i] != NULL; i++) {
        const char *s = i == 0 ? "" : choices[i + 1] != NULL ? sep : last_sep;
        int k = snprintf(buf + n, size - n, "%s%s", s, choices[i]);
        if (k < 0 || (size_t)k >= size - n)
            return; /* truncated */
        n += (size_t)k;
    }
}

/* What a bad value of o was expected to be: "an integer in [0, 65535]". */
static const char *want(const struct bs_opt *o, char *buf, size_t size)
{
    if (o->want != NULL)
        return o->want;
    switch (o->kind) {
    case BS_OPT_INT:
    case BS_OPT_INT64:
        snprintf(buf, size, "an integer in [%lld, %lld]", (long long)o->lo, (long long)o->hi);
        return buf;
    case BS_OPT_DOUBLE:
        return "a positive number";
    case BS_OPT_SECONDS:
        return "a positive duration (10, 10s, 500ms, 2m)";
    case BS_OPT_ENUM: /* "bin or json", "a, b or c" */
        join(buf, size, o->choices, ", ", " or ");
        return buf;
    default:
        return "a value";
    }
}

/* Store value v of o (as given by arg) into dst. */
static int set_value(const struct bs_opt *o, void *dst, const char *arg, const char *v,
                     struct bs_opts_err *err)
{
    void *p = field(dst, o->off);
    int64_t x = 0;
    bool ok = true;
    switch (o->kind) {
    case BS_OPT_INT:
        if ((ok = parse_int64(v, o->lo, o->hi, &x)))
            *(int *)p = (int)x;
        break;
    case BS_OPT_INT64:
        ok = parse_int64(v, o->lo, o->hi, (int64_t *)p);
        break;
    case BS_OPT_DOUBLE:
        ok = parse_double(v, (double *)p);
        break;
    case BS_OPT_SECONDS:
        ok = parse_seconds(v, (double *)p);
        break;
    case BS_OPT_STR:
        *(const char **)p = v;
        break;
    case BS_OPT_ENUM:
        ok = parse_choice(o, v, (int *)p);
        break;
    case BS_OPT_LIST: {
        int *n = field(dst, o->count_off);
        if (*n >= o->hi)
            return fail(err, BS_OPTS_ETOOMANY, o, arg, v, "at most %lld %s options",
                        (long long)o->hi, arg);
        ((const char **)p)[(*n)++] = v;
        break;
    }
    default:
        ok = false;
        break; /* no value: not reached */
    }
    if (!ok) {
        char buf[200];
        return fail(err, BS_OPTS_EVALUE, o, arg, v, "%s: expected %s, got \"%s\"", arg,
                    want(o, buf, sizeof(buf)), v);
    }
    return 0;
}

static int set_defaults(const struct bs_opts_cmd *cmd, void *dst, struct bs_opts_err *err)
{
    for (const struct bs_opt *const *t = cmd->tables; *t != NULL; t++) {
        for (const struct bs_opt *o = *t; o->name != NULL; o++) {
            if (o->def != NULL && set_value(o, dst, o->name, o->def, err) != 0) {
                char why[sizeof(err->msg)];
                memcpy(why, err->msg, sizeof(why));
                return fail(err, BS_OPTS_EVALUE, o, o->name, o->def, "default of %.200s", why);
            }
        }
    }
    return 0;
}

static int check_required(const struct bs_opts_cmd *cmd, void *dst, bool have_positional,
                          struct bs_opts_err *err)
{
    if (cmd->positional != NULL && cmd->positional_required && !have_positional)
        return fail(err, BS_OPTS_EMISSING, NULL, cmd->positional, NULL, "missing %s",
                    cmd->positional);
    for (const struct bs_opt *const *t = cmd->tables; *t != NULL; t++) {
        for (const struct bs_opt *o = *t; o->name != NULL; o++) {
            bool given = o->kind == BS_OPT_LIST  ? *(int *)field(dst, o->count_off) > 0
                         : o->kind == BS_OPT_STR ? *(const char **)field(dst, o->off) != NULL
                                                 : true;
            if (o->required && !given)
                return fail(err, BS_OPTS_EMISSING, o, o->name, NULL, "missing %s", o->name);
        }
    }
    return 0;
}

int bs_opts_parse(const struct bs_opts_cmd *cmd, void *dst, int argc, char **argv,
                  struct bs_opts_err *err)
{
    bool have_positional = false;
    memset(err, 0, sizeof(*err));
    if (set_defaults(cmd, dst, err) != 0)
        return err->code;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (cmd->positional != NULL && !is_option(arg)) {
            if (have_positional)
                return fail(err, BS_OPTS_EEXTRA, NULL, arg, NULL, "unexpected argument \"%s\"",
                            arg);
            *(const char **)field(dst, cmd->positional_off) = arg;
            have_positional = true;
            continue;
        }
        const struct bs_opt *o = find(cmd, arg);
        if (o != NULL && o->kind == BS_OPT_HELP)
            return BS_OPTS_HELP;
        if (o != NULL && o->kind == BS_OPT_FLAG)
            *(bool *)field(dst, o->off) = true;
        else if (o != NULL && o->kind == BS_OPT_SET)
            *(int *)field(dst, o->off) = (int)o->lo;
        else if (i + 1 >= argc) /* checked first, as for an unknown option */
            return fail(err, BS_OPTS_ENOVALUE, o, arg, NULL, "%s needs a value", arg);
        else if (o == NULL)
            return fail(err, BS_OPTS_EUNKNOWN, NULL, arg, argv[i + 1], "unknown option \"%s\"",
                        arg);
        else if (set_value(o, dst, arg, argv[++i], err) != 0)
            return err->code;
        if (o->mark)
            *(bool *)field(dst, o->given_off) = true;
    }
    return check_required(cmd, dst, have_positional, err);
}

/* ---- help ------------------------------------------------------------------ */

/* "-u, --url HOST:PORT" (or without the alias) into buf; its length. */
static int left_column(const struct bs_opt *o, bool alias, char *buf, size_t size)
{
    char choices[200];
    const char *metavar = o->metavar;
    if (metavar == NULL && o->kind == BS_OPT_ENUM) {
        join(choices, sizeof(choices), o->choices, "|", "|");
        metavar = choices;
    }
    if (metavar == NULL && takes_value(o))
        metavar = "VALUE";
    alias = alias && o->alias != NULL;
    int n = snprintf(buf, size, "%s%s%s%s%s", alias ? o->alias : "", alias ? ", " : "", o->name,
                     metavar ? " " : "", metavar ? metavar : "");
    return n < (int)size ? n : (int)size - 1;
}

void bs_opts_help(FILE *f, const struct bs_opt *rows, int width)
{
    for (const struct bs_opt *o = rows; o->name != NULL; o++) {
        char left[256];
        if (o->help == NULL)
            continue;
        int n = left_column(o, true, left, sizeof(left));
        fprintf(f, "  %s%*s", left, n < width ? width - n : 2, "");
        bool substituted = false;
        for (const char *h = o->help; *h != '\0'; h++) {
            if (h[0] == '%' && h[1] == 'D') {
                fputs(o->def ? o->def : "", f);
                substituted = true;
                h++;
            } else if (*h == '\n') {
                fprintf(f, "\n%*s", width + 2, "");
            } else {
                fputc(*h, f);
            }
        }
        if (o->def != NULL && !substituted)
            fprintf(f, " (default %s)", o->def);
        fputc('\n', f);
    }
}

/* One synopsis item, wrapped before width; *col is the current column. */
static void synopsis_item(FILE *f, const char *item, int indent, int width, int *col)
{
    int n = (int)strlen(item);
    if (*col > indent && *col + 1 + n > width) {
        fprintf(f, "\n%*s", indent, "");
        *col = indent;
    } else {
        fputc(' ', f);
        (*col)++;
    }
    fputs(item, f);
    *col += n;
}

void bs_opts_synopsis(FILE *f, const char *lead, const struct bs_opts_cmd *cmd, int indent,
                      int width)
{
    char item[300];
    int col = (int)strlen(lead);
    fputs(lead, f);
    if (cmd->positional != NULL) {
        snprintf(item, sizeof(item), cmd->positional_required ? "%s" : "[%s]", cmd->positional);
        synopsis_item(f, item, indent, width, &col);
    }
    for (int pass = 0; pass < 2; pass++) { /* the required options, then the others */
        for (const struct bs_opt *const *t = cmd->tables; *t != NULL; t++) {
            for (const struct bs_opt *o = *t; o->name != NULL; o++) {
                char left[256];
                if (o->help == NULL || o->kind == BS_OPT_HELP || o->required != (pass == 0))
                    continue;
                left_column(o, false, left, sizeof(left));
                snprintf(item, sizeof(item), pass == 0 ? "%s" : "[%s]", left);
                synopsis_item(f, item, indent, width, &col);
            }
        }
    }
    fputc('\n', f);
}
