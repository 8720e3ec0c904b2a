/* forward, bench and example: the engine from the command line, without the
 * server. forward and bench load a model directory, read inputs from
 * safetensors and run the engine; example lists or writes the built-ins. */
#include "tools.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "arena.h"
#include "backend.h"
#include "builtin.h"
#include "model.h"
#include "opts.h"
#include "safetensors.h"

#define MAX_INPUTS 16

struct tool_args {
    const char *cmd;
    const char *model_dir;
    const char *inputs;
    const char *output;
    const char *device;
    const char *dtype; /* NULL: the backend's default */
    bool tf32;
    const char *activations;
    const char *graphs;
    int threads;
    int reps;
};

#define AT(kind, field) BS_OPTS_AT(kind, struct tool_args, field)

/* The options forward and bench share, then each one's own. */
static const struct bs_opt common_rows[] = {
    {"--inputs", AT(STR, inputs), .required = true, .metavar = "IN.safetensors",
     .help = "the forward's inputs, by argument name"},
    {"--device", AT(STR, device), .def = "auto", .metavar = "auto|cpu|cuda",
     .help = "compute device"},
    {"--threads", AT(INT, threads), .lo = 0, .hi = 1024, .metavar = "N",
     .help = "compute threads (default: one per core)"},
    {"--dtype", AT(STR, dtype), .metavar = "fp32|bf16|fp16",
     .help = "compute dtype (default: cpu fp32, cuda bf16)"},
    {"--tf32", AT(FLAG, tf32), .help = "let FP32 GEMMs use TF32 tensor cores (cuda)"},
    {"--activations", AT(STR, activations), .def = "auto", .metavar = "auto|fp32|compute",
     .help = "activation dtype between ops (default: cpu fp32, cuda compute)"},
    {"--graphs", AT(STR, graphs), .def = "auto", .metavar = "auto|on|off|emulate",
     .help = "run transformer and attention blocks through launch graphs (default: cuda on, cpu off)"},
    BS_OPTS_NULL,
};
static const struct bs_opt forward_rows[] = {
    {"--output", AT(STR, output), .required = true, .metavar = "OUT.safetensors",
     .help = "the output: one F32 tensor named \"output\""},
    BS_OPTS_NULL,
};
static const struct bs_opt bench_rows[] = {
    {"--reps", AT(INT, reps), .lo = 1, .hi = 1000000, .def = "10", .metavar = "N",
     .help = "timed forwards, after one warm-up"},
    BS_OPTS_NULL,
};
static const struct bs_opt help_rows[] = {
    {"--help", .kind = BS_OPT_HELP, .alias = "-h", .help = "this help"},
    BS_OPTS_NULL,
};
static const struct bs_opt *const forward_tables[] = {common_rows, forward_rows, help_rows, NULL};
static const struct bs_opt *const bench_tables[] = {common_rows, bench_rows, help_rows, NULL};
static const struct bs_opts_cmd forward_cmd = {forward_tables, "MODEL_DIR",
                                               offsetof(struct tool_args, model_dir), true};
static const struct bs_opts_cmd bench_cmd = {bench_tables, "MODEL_DIR",
                                             offsetof(struct tool_args, model_dir), true};

struct example_args {
    const char *name;
    const char *out;
};

static const struct bs_opt example_rows[] = {
    {"--out", BS_OPTS_AT(STR, struct example_args, out), .metavar = "DIR",
     .help = "write NAME there as a model directory"},
    BS_OPTS_NULL,
};
static const struct bs_opt *const example_tables[] = {example_rows, help_rows, NULL};
static const struct bs_opts_cmd example_cmd = {example_tables, "NAME",
                                               offsetof(struct example_args, name), false};

/* The entries of blockserve --help, each command's synopsis from its rows. */
static const struct {
    const char *lead;
    const struct bs_opts_cmd *cmd;
    const char *summary;
} tools[] = {
    {"  forward", &forward_cmd, "run one forward pass; writes one F32 tensor named \"output\""},
    {"  bench", &bench_cmd,
     "one warm-up then N timed forwards; last line: median_ms=... gflops=..."},
};

void bs_tools_usage(FILE *f)
{
    for (size_t i = 0; i < sizeof(tools) / sizeof(tools[0]); i++) {
        bs_opts_synopsis(f, tools[i].lead, tools[i].cmd, 10, 80);
        fprintf(f, "      %s\n", tools[i].summary);
    }
    fprintf(f, "  example [NAME --out DIR]\n"
               "      list the built-in example models, or write one (generated weights and\n"
               "      example inputs) as a model directory\n");
}

/* blockserve forward --help, bench --help. */
static void tool_help(const char *lead, const struct bs_opts_cmd *cmd)
{
    bs_opts_synopsis(stdout, lead, cmd, 10, 80);
    for (const struct bs_opt *const *t = cmd->tables; *t != NULL; t++)
        bs_opts_help(stdout, *t, 26);
}

/* Parse "MODEL_DIR --flag value ..." (argv[0] is the subcommand): 0, 1 after
 * --help (printed), or -1 after printing the problem. */
static int parse_args(int argc, char **argv, struct tool_args *a, const struct bs_opts_cmd *cmd)
{
    struct bs_opts_err e;
    char lead[64];
    memset(a, 0, sizeof(*a));
    a->cmd = argv[0];
    int rc = bs_opts_parse(cmd, a, argc, argv, &e);
    if (rc == BS_OPTS_HELP) {
        snprintf(lead, sizeof(lead), "usage: blockserve %s", a->cmd);
        tool_help(lead, cmd);
        return 1;
    }
    if (rc == BS_OPTS_EVALUE)
        fprintf(stderr, "blockserve: %s\n", e.msg);
    else if (rc == BS_OPTS_EMISSING)
        fprintf(stderr, "blockserve %s: %s (see blockserve --help)\n", a->cmd, e.msg);
    else if (rc != BS_OPTS_OK)
        fprintf(stderr, "blockserve %s: %s\n", a->cmd, e.msg);
    return rc == BS_OPTS_OK ? 0 : -1;
}

/* Everything one command holds, released by session_free. */
struct session {
    struct bs_backend be;
    bs_model_t *model;
    bs_st_file_t *inputs;
    struct bs_named_tensor in[MAX_INPUTS];
    int n_in;
    struct bs_arena arena;
    struct bs_tensor out;
};

static int session_open(struct session *s, const struct tool_args *a, struct bs_err *err)
{
    memset(s, 0, sizeof(*s));
    bs_arena_init(&s->arena, &s->be);
    struct bs_backend_opts bo = {a->device, a->threads, a->dtype, a->tf32, a->activations,
                                 a->graphs};
    if (bs_backend_init_opts(&s->be, &bo, err) != 0)
        return err->code;
    fprintf(stderr, "blockserve %s: compute: %s\n", a->cmd, err->msg);
    if (bs_model_load(&s->model, a->model_dir, &s->be, err) != 0)
        return bs_err_wrap(err, "loading model %s", a->model_dir);
    if (bs_st_open(&s->inputs, a->inputs, err) != 0)
        return bs_err_wrap(err, "reading inputs");
    s->n_in = bs_st_count(s->inputs);
    if (s->n_in > MAX_INPUTS)
        return bs_err_set(err, BS_EINVAL, "%s: %d tensors, at most %d inputs", a->inputs, s->n_in,
                          MAX_INPUTS);
    for (int i = 0; i < s->n_in; i++) {
        s->in[i].name = bs_st_name(s->inputs, i);
        bs_st_get(s->inputs, s->in[i].name, &s->in[i].t);
    }
    if (bs_model_check(s->model, s->in, s->n_in, &s->out, err) != 0)
        return bs_err_wrap(err, "%s", a->inputs);
    s->out.data = malloc(bs_tensor_nbytes(&s->out));
    if (s->out.data == NULL)
        return bs_err_set(err, BS_ENOMEM, "cannot allocate %zu bytes for the output",
                          bs_tensor_nbytes(&s->out));
    return 0;
}

static void session_free(struct session *s)
{
    free(s->out.data);
    bs_arena_free(&s->arena);
    bs_st_close(s->inputs);
    bs_model_free(s->model);
    bs_backend_free(&s->be);
}

static int run_forward(struct session *s, struct bs_err *err)
{
    return bs_model_forward(s->model, &s->arena, s->in, s->n_in, &s->out, NULL, err);
}

int bs_tools_forward(int argc, char **argv)
{
    struct tool_args a;
    struct session s;
    struct bs_err err = {0};
    int parsed = parse_args(argc, argv, &a, &forward_cmd);
    if (parsed != 0)
        return parsed > 0 ? 0 : 2;
    int rc = session_open(&s, &a, &err);
    if (rc == 0)
        rc = run_forward(&s, &err);
    if (rc == 0) {
        const char *name = "output";
        rc = bs_st_write(a.output, &name, &s.out, 1, &err);
    }
    if (rc != 0)
        fprintf(stderr, "blockserve forward: %s\n", err.msg);
    session_free(&s);
    return rc == 0 ? 0 : 1;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* A field of /proc/self/status in MiB ("VmRSS", "VmHWM"), or -1 where the
 * file or the field is missing (not Linux). */
static double proc_status_mb(const char *field)
{
    char line[256];
    double mb = -1.0;
    size_t n = strlen(field);
    FILE *f = fopen("/proc/self/status", "r");
    if (f == NULL)
        return -1.0;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, field, n) == 0 && line[n] == ':') {
            mb = strtod(line + n + 1, NULL) / 1024.0; /* the kernel prints kB */
            break;
        }
    }
    fclose(f);
    return mb;
}

/* Reset the process's peak RSS to its current RSS (Linux >= 4.0); false
 * where that is not possible. */
static bool reset_peak_rss(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f == NULL)
        return false;
    bool ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int bs_tools_bench(int argc, char **argv)
{
    struct tool_args a;
    struct session s;
    struct bs_err err = {0};
    double *ms = NULL;
    int parsed = parse_args(argc, argv, &a, &bench_cmd);
    if (parsed != 0)
        return parsed > 0 ? 0 : 2;
    /* Memory is reported over the start-up footprint, and the peak is taken
     * over the forwards only (loading may briefly hold a file and its copy). */
    double base_mb = proc_status_mb("VmRSS");
    int rc = session_open(&s, &a, &err);
    bool peak_ok = rc == 0 && reset_peak_rss();
    if (rc == 0 && (ms = malloc((size_t)a.reps * sizeof(double))) == NULL)
        rc = bs_err_set(&err, BS_ENOMEM, "out of memory");
    if (rc == 0)
        rc = run_forward(&s, &err); /* warm-up: sizes the arena, touches the weights */
    for (int i = 0; rc == 0 && i < a.reps; i++) {
        double t0 = now_ms();
        rc = run_forward(&s, &err);
        ms[i] = now_ms() - t0;
    }
    if (rc == 0) {
        qsort(ms, (size_t)a.reps, sizeof(double), cmp_double);
        double med = a.reps % 2 ? ms[a.reps / 2] : 0.5 * (ms[a.reps / 2 - 1] + ms[a.reps / 2]);
        double flops = bs_model_flops(s.model, s.in, s.n_in);
        printf("model=%s class=%s backend=%s dtype=%s reps=%d min_ms=%.3f max_ms=%.3f "
               "weights_mb=%.1f scratch_mb=%.1f\n",
               a.model_dir, bs_config_class_name(bs_model_config(s.model)->cls), s.be.iface->name,
               bs_compute_dtype_name(bs_model_dtype(s.model)), a.reps, ms[0], ms[a.reps - 1],
               (double)bs_model_weight_bytes(s.model) / 1048576.0,
               (double)bs_arena_capacity(&s.arena) / 1048576.0);
        double hwm = proc_status_mb("VmHWM");
        if (peak_ok && hwm >= 0 && base_mb >= 0)
            printf("peak_mb=%.1f base_mb=%.1f (peak RSS during the forwards, over the "
                   "start-up RSS)\n",
                   hwm - base_mb, base_mb);
        printf("median_ms=%.3f gflops=%.2f\n", med, med > 0 ? flops / (med * 1e6) : 0.0);
    } else {
        fprintf(stderr, "blockserve bench: %s\n", err.msg);
    }
    free(ms);
    session_free(&s);
    return rc == 0 ? 0 : 1;
}

int bs_tools_example(int argc, char **argv)
{
    static const char usage[] = "usage: blockserve example [NAME --out DIR]\n";
    struct example_args x = {0};
    struct bs_opts_err e;
    struct bs_err err = {0};
    int rc = bs_opts_parse(&example_cmd, &x, argc, argv, &e);
    if (rc == BS_OPTS_HELP) {
        fputs(usage, stdout);
        for (const struct bs_opt *const *t = example_tables; *t != NULL; t++)
            bs_opts_help(stdout, *t, 26);
        return 0;
    }
    if (rc == BS_OPTS_OK && x.name == NULL && x.out == NULL) {
        for (int i = 0; i < bs_builtin_count(); i++)
            printf("%-20s %s\n", bs_builtin_get(i)->name, bs_builtin_get(i)->summary);
        return 0;
    }
    if (rc != BS_OPTS_OK || x.name == NULL || x.out == NULL) {
        fputs(usage, stderr);
        return 2;
    }
    const struct bs_builtin *b = bs_builtin_find(x.name);
    if (b == NULL) {
        fprintf(stderr,
                "blockserve example: unknown model \"%s\" (run blockserve example for "
                "the list)\n",
                x.name);
        return 1;
    }
    if (bs_builtin_write(b, x.out, &err) != 0) {
        fprintf(stderr, "blockserve example: %s\n", err.msg);
        return 1;
    }
    printf("wrote %s to %s (generated weights; example inputs in inputs.safetensors)\n", b->name,
           x.out);
    return 0;
}
