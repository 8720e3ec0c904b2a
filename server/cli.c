/* forward and bench: load a model directory, read inputs from safetensors,
 * run the engine. */
#include "cli.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "arena.h"
#include "backend.h"
#include "builtin.h"
#include "model.h"
#include "safetensors.h"

#define MAX_INPUTS 16

struct cli_args {
    const char *cmd;
    const char *model_dir;
    const char *inputs;
    const char *output;
    const char *device;
    const char *dtype; /* NULL: the backend's default */
    bool tf32;
    int threads;
    int reps;
};

static int parse_int_arg(const char *flag, const char *s, int lo, int hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || end == s || v < lo || v > hi) {
        fprintf(stderr, "blockserve: %s: expected an integer in [%d, %d], got \"%s\"\n", flag, lo,
                hi, s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* Parse "MODEL_DIR --flag value ..."; argv[0] is the subcommand. */
static int parse_args(int argc, char **argv, struct cli_args *a, bool want_output)
{
    memset(a, 0, sizeof(*a));
    a->cmd = argv[0];
    a->device = "auto";
    a->reps = 10;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        bool has_value = i + 1 < argc;
        if (strcmp(arg, "--tf32") == 0) {
            a->tf32 = true;
        } else if (arg[0] != '-') {
            if (a->model_dir != NULL) {
                fprintf(stderr, "blockserve %s: unexpected argument \"%s\"\n", argv[0], arg);
                return -1;
            }
            a->model_dir = arg;
        } else if (!has_value) {
            fprintf(stderr, "blockserve %s: %s needs a value\n", argv[0], arg);
            return -1;
        } else if (strcmp(arg, "--inputs") == 0) {
            a->inputs = argv[++i];
        } else if (strcmp(arg, "--output") == 0 && want_output) {
            a->output = argv[++i];
        } else if (strcmp(arg, "--device") == 0) {
            a->device = argv[++i];
        } else if (strcmp(arg, "--dtype") == 0) {
            a->dtype = argv[++i];
        } else if (strcmp(arg, "--threads") == 0) {
            if (parse_int_arg(arg, argv[++i], 0, 1024, &a->threads) != 0)
                return -1;
        } else if (strcmp(arg, "--reps") == 0 && !want_output) {
            if (parse_int_arg(arg, argv[++i], 1, 1000000, &a->reps) != 0)
                return -1;
        } else {
            fprintf(stderr, "blockserve %s: unknown option \"%s\"\n", argv[0], arg);
            return -1;
        }
    }
    const char *missing = a->model_dir == NULL        ? "MODEL_DIR"
                          : a->inputs == NULL         ? "--inputs"
                          : want_output && !a->output ? "--output"
                                                      : NULL;
    if (missing != NULL) {
        fprintf(stderr, "blockserve %s: missing %s (see blockserve --help)\n", argv[0], missing);
        return -1;
    }
    return 0;
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

static int session_open(struct session *s, const struct cli_args *a, struct bs_err *err)
{
    memset(s, 0, sizeof(*s));
    bs_arena_init(&s->arena, &s->be);
    struct bs_backend_opts bo = {a->device, a->threads, a->dtype, a->tf32};
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

int bs_cli_forward(int argc, char **argv)
{
    struct cli_args a;
    struct session s;
    struct bs_err err = {0};
    if (parse_args(argc, argv, &a, true) != 0)
        return 2;
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

int bs_cli_bench(int argc, char **argv)
{
    struct cli_args a;
    struct session s;
    struct bs_err err = {0};
    double *ms = NULL;
    if (parse_args(argc, argv, &a, false) != 0)
        return 2;
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
        printf("model=%s class=%s backend=%s reps=%d min_ms=%.3f max_ms=%.3f weights_mb=%.1f "
               "scratch_mb=%.1f\n",
               a.model_dir, bs_config_class_name(bs_model_config(s.model)->cls), s.be.iface->name,
               a.reps, ms[0], ms[a.reps - 1], (double)bs_model_weight_bytes(s.model) / 1048576.0,
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

int bs_cli_example(int argc, char **argv)
{
    struct bs_err err = {0};
    if (argc == 1) {
        for (int i = 0; i < bs_builtin_count(); i++)
            printf("%-20s %s\n", bs_builtin_get(i)->name, bs_builtin_get(i)->summary);
        return 0;
    }
    if (argc != 4 || strcmp(argv[2], "--out") != 0) {
        fprintf(stderr, "usage: blockserve example [NAME --out DIR]\n");
        return 2;
    }
    const struct bs_builtin *b = bs_builtin_find(argv[1]);
    if (b == NULL) {
        fprintf(stderr,
                "blockserve example: unknown model \"%s\" (run blockserve example for "
                "the list)\n",
                argv[1]);
        return 1;
    }
    if (bs_builtin_write(b, argv[3], &err) != 0) {
        fprintf(stderr, "blockserve example: %s\n", err.msg);
        return 1;
    }
    printf("wrote %s to %s (generated weights; example inputs in inputs.safetensors)\n", b->name,
           argv[3]);
    return 0;
}
