/* Command lines from tables. A program describes its options as rows (the
 * flag, the kind of value, where it goes in the program's options struct, the
 * default, one line of help), in the spirit of nginx's ngx_command_t, and the
 * same rows both parse argv and print --help. libc only: the server and
 * blockserve-cli compile this same file.
 *
 *     #define AT(kind, field) BS_OPTS_AT(kind, struct serve_opts, field)
 *     static const struct bs_opt rows[] = {
 *         {"--grpc-port", AT(INT, port), .lo = 0, .hi = 65535, .def = "8001",
 *          .metavar = "N", .help = "port (default %D; 0 picks a free one)"},
 *         {"--tf32", AT(FLAG, tf32), .help = "let FP32 GEMMs use TF32 tensor cores"},
 *         BS_OPTS_NULL,
 *     };
 */
#ifndef BS_OPTS_H
#define BS_OPTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum bs_opt_kind {
    BS_OPT_END,     /* no option: the row that ends a table */
    BS_OPT_INT,     /* int in [lo, hi] */
    BS_OPT_INT64,   /* int64_t in [lo, hi] */
    BS_OPT_DOUBLE,  /* double, finite and > 0 */
    BS_OPT_SECONDS, /* double seconds > 0, from "2.5", "10s", "500ms", "2m" or "1h" */
    BS_OPT_STR,     /* const char *, pointing into argv */
    BS_OPT_LIST,    /* repeatable string: const char *[hi] at off, its int count at count_off */
    BS_OPT_ENUM,    /* int: the index of the value in choices */
    BS_OPT_FLAG,    /* bool, set true; takes no value */
    BS_OPT_SET,     /* int, set to lo; takes no value (--no-metrics) */
    BS_OPT_HELP,    /* takes no value: bs_opts_parse stops and returns BS_OPTS_HELP */
};

/* One option. */
struct bs_opt {
    const char *name;           /* "--grpc-port"; NULL in the row that ends a table */
    enum bs_opt_kind kind;      /* with off: write BS_OPTS_AT(KIND, type, field) */
    size_t off;                 /* offset of the destination in the options struct */
    const char *alias;          /* another spelling ("-u"), or NULL */
    int64_t lo, hi;             /* INT, INT64: the range; LIST: hi is the most; SET: lo */
    const char *const *choices; /* ENUM: the accepted values, NULL-terminated */
    const char *def;            /* default, applied before argv and shown in help; NULL: none */
    const char *metavar;        /* the value in help ("N", "DIR"); NULL: "a|b" for ENUM */
    const char *help;           /* help; '\n' starts a continuation line; "%D" stands for
                                 * def, which is otherwise appended as " (default DEF)";
                                 * NULL: not listed */
    const char *want;           /* a bad value "expected <want>"; NULL: from the kind */
    bool required;              /* STR, LIST: must be given */
    size_t count_off;           /* LIST: BS_OPTS_COUNT(type, field), the int count */
    bool mark;                  /* set the bool at given_off when given: BS_OPTS_GIVEN */
    size_t given_off;
};

/* The row that ends a table (like nginx's ngx_null_command). */
#define BS_OPTS_NULL                                                                               \
    {                                                                                              \
        .name = NULL, .kind = BS_OPT_END                                                           \
    }

/* The C type each kind writes, checked at compile time by BS_OPTS_AT. */
#define BS__OPTS_CTYPE_INT            int
#define BS__OPTS_CTYPE_INT64          int64_t
#define BS__OPTS_CTYPE_DOUBLE         double
#define BS__OPTS_CTYPE_SECONDS        double
#define BS__OPTS_CTYPE_STR            const char *
#define BS__OPTS_CTYPE_LIST           const char **
#define BS__OPTS_CTYPE_ENUM           int
#define BS__OPTS_CTYPE_FLAG           bool
#define BS__OPTS_CTYPE_SET            int
#define BS__OPTS_OFF(T, field, ctype) _Generic(((T *)0)->field, ctype : offsetof(T, field))

/* .kind and .off of a row storing into field of struct type T; a field whose
 * type is not the one the kind writes does not compile. */
#define BS_OPTS_AT(KIND, T, field)                                                                 \
    .kind = BS_OPT_##KIND, .off = BS__OPTS_OFF(T, field, BS__OPTS_CTYPE_##KIND)
/* .count_off of a LIST row: the int that counts its values. */
#define BS_OPTS_COUNT(T, field) .count_off = BS__OPTS_OFF(T, field, int)
/* Also set the bool field of T when the option is given (not by its default). */
#define BS_OPTS_GIVEN(T, field) .mark = true, .given_off = BS__OPTS_OFF(T, field, bool)

/* A command line: its tables of options and at most one positional argument. */
struct bs_opts_cmd {
    const struct bs_opt *const *tables; /* NULL-terminated; each ends with BS_OPTS_NULL */
    const char *positional;             /* its name in help ("MODEL_DIR"); NULL: none, and
                                         * every argument is taken for an option */
    size_t positional_off;              /* where it goes (a const char *) */
    bool positional_required;
};

/* What bs_opts_parse returns. */
enum {
    BS_OPTS_OK = 0,
    BS_OPTS_HELP = 1,      /* a BS_OPT_HELP option was given */
    BS_OPTS_EUNKNOWN = -1, /* not an option of this command (its value was taken too) */
    BS_OPTS_ENOVALUE = -2, /* the last argument is an option that wants a value, or unknown */
    BS_OPTS_EVALUE = -3,   /* a value the option does not take (or a default that does not parse) */
    BS_OPTS_ETOOMANY = -4, /* a LIST option given more than hi times */
    BS_OPTS_EEXTRA = -5,   /* a second positional argument */
    BS_OPTS_EMISSING = -6, /* a required option or positional argument was not given */
};

/* Why parsing stopped. */
struct bs_opts_err {
    int code;                 /* a BS_OPTS_E* code */
    const struct bs_opt *opt; /* the row at fault; NULL for unknown options and positionals */
    const char *arg;   /* the argument as given ("-c", "--frob", "foo"), or the missing name */
    const char *value; /* its value, or NULL */
    char msg[256];     /* e.g. "-c: expected a small integer, got \"x\"", "unknown option
                        * \"--frob\"", "--inputs needs a value", "missing --inputs" */
};

/* Set every default of cmd's rows in dst, then parse argv[1..argc) into dst
 * (argv[0] is the program or subcommand). Returns BS_OPTS_OK, BS_OPTS_HELP
 * (parsing stopped there), or a BS_OPTS_E* code with err filled. dst is not
 * cleared first; options given twice keep the last value (a LIST gathers them). */
int bs_opts_parse(const struct bs_opts_cmd *cmd, void *dst, int argc, char **argv,
                  struct bs_opts_err *err);

/* Print rows' help, one option a line and its help from column width + 2:
 * "  --grpc-port N   port (default 8001; 0 picks a free one)". */
void bs_opts_help(FILE *f, const struct bs_opt *rows, int width);

/* Print lead, the positional argument, the required options and then the
 * others in brackets, wrapped before column width with continuation lines
 * indented by indent: "  forward MODEL_DIR --inputs IN [--threads N] ...". */
void bs_opts_synopsis(FILE *f, const char *lead, const struct bs_opts_cmd *cmd, int indent,
                      int width);

#endif
