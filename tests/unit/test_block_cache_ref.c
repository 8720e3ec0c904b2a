/* Step-level block caching (model.h, bs_block_cache) against the PyTorch
 * reference of its rule (tests/reference/block_cache.py): for each sequence in
 * tests/golden_cache (written by tests/reference/gen_golden_cache.py from the
 * golden cases), the engine runs the golden case's model through the calls
 * with one block cache and the file's modes (refresh, reuse, refresh, reuse),
 * each call one part of bs_model_forward_parts, and every output must match
 * the reference's: max |got - want| <= 1e-4 x max |want|. The same calls
 * without caching must match the reference's exact outputs, and each reuse
 * must stay at least 1e-2 x max |exact| away from the exact output, so that a
 * cache that is ignored cannot pass. Prints each case's worst errors and
 * their share of the tolerance.
 *
 * usage: test_block_cache_ref [GOLDEN_DIR [GOLDEN_CACHE_DIR]] (default: the
 * source tree's tests/golden and tests/golden_cache) */
#include <dirent.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"
#include "model.h"
#include "safetensors.h"

#ifndef BS_GOLDEN_DIR
#define BS_GOLDEN_DIR "tests/golden"
#endif
#ifndef BS_GOLDEN_CACHE_DIR
#define BS_GOLDEN_CACHE_DIR "tests/golden_cache"
#endif

/* FP32 against the float64 reference, relative to max |output| (4.3 to 8.7
 * in these sequences): about the golden tests' absolute 1e-4 scaled by the
 * output. Worst measured: 8e-6 on btb_ada_norm_zero_dit, whose timesteps
 * near 1000 make the float32 timestep sinusoid's rounding show (a float64
 * sinusoid moves the reference itself by up to 9e-6 there). */
#define TOL 1e-4
/* A reuse must move the output this far from the exact one (the generator
 * makes sure the reference's do: MIN_REUSE_EFFECT in gen_golden_cache.py). */
#define MIN_REUSE_EFFECT 1e-2
#define MAX_STEPS        8

static const char *golden_dir = BS_GOLDEN_DIR;
static const char *cache_dir = BS_GOLDEN_CACHE_DIR;
static struct bs_backend be;

/* The sequences the test knows; test_all_listed keeps this in step with the
 * directories of tests/golden_cache. */
static const char *const cases[] = {
    "btb_geglu_cross",
    "btb_self_only",
    "btb_only_cross_attention_masks",
    "btb_ada_norm_per_sample_t",
    "btb_ada_norm_zero_dit",
    "btb_ada_norm_zero_scalar",
    "btb_ada_norm_zero_cross",
    "btb_stack3",
    "btb_stack3_dit",
};
#define N_CASES (sizeof(cases) / sizeof(cases[0]))

/* One sequence: each call's inputs (views into the file), mode and outputs. */
struct seq {
    bs_st_file_t *st;
    int n_steps;
    enum bs_cache_mode modes[MAX_STEPS];
    struct bs_named_tensor in[MAX_STEPS][BS_MAX_INPUTS];
    int n_in[MAX_STEPS];
    float *expected[MAX_STEPS], *exact[MAX_STEPS]; /* copies (the file need not align them) */
    int64_t n_out;
};

static void parse_modes(struct seq *s, const char *name, const char *modes)
{
    if (modes == NULL)
        fail_msg("%s: steps.safetensors has no \"modes\" metadata", name);
    s->n_steps = 0;
    for (const char *p = modes; *p != '\0';) {
        size_t len = strcspn(p, ",");
        assert_true(s->n_steps < MAX_STEPS);
        if (len == 7 && strncmp(p, "refresh", len) == 0)
            s->modes[s->n_steps++] = BS_CACHE_REFRESH;
        else if (len == 5 && strncmp(p, "reuse", len) == 0)
            s->modes[s->n_steps++] = BS_CACHE_REUSE;
        else if (len == 3 && strncmp(p, "off", len) == 0)
            s->modes[s->n_steps++] = BS_CACHE_OFF;
        else
            fail_msg("%s: unknown mode in \"%s\"", name, modes);
        p += len + (p[len] == ',');
    }
}

static float *copy_output(const struct bs_tensor *t, int64_t n, const char *what)
{
    if (t->type != BS_TYPE_F32 || bs_tensor_nelements(t) != n)
        fail_msg("%s: not F32 of %lld elements", what, (long long)n);
    float *p = malloc((size_t)n * sizeof(float));
    assert_non_null(p);
    memcpy(p, t->data, (size_t)n * sizeof(float));
    return p;
}

/* An entry "step<k>.<rest>": k and rest, or -1 for an input every call shares. */
static int step_of(const char *name, const char **rest)
{
    char *end;
    if (strncmp(name, "step", 4) != 0)
        return -1;
    long k = strtol(name + 4, &end, 10);
    if (end == name + 4 || *end != '.' || k < 0 || k >= MAX_STEPS)
        return -1;
    *rest = end + 1;
    return (int)k;
}

/* Read <cache_dir>/<name>/steps.safetensors: an input without a step<k>.
 * prefix goes to every call, step<k>.<input> to call k; the calls' inputs
 * are checked against the model, which gives the outputs' size. */
static void seq_open(struct seq *s, const char *name, const bs_model_t *model)
{
    char path[4200];
    struct bs_err err = {0};
    memset(s, 0, sizeof(*s));
    snprintf(path, sizeof(path), "%s/%s/steps.safetensors", cache_dir, name);
    if (bs_st_open(&s->st, path, &err) != 0)
        fail_msg("%s: %s", name, err.msg);
    parse_modes(s, name, bs_st_metadata(s->st, "modes"));
    int n = bs_st_count(s->st);
    for (int i = 0; i < n; i++) {
        const char *key = bs_st_name(s->st, i), *rest = key;
        int k = step_of(key, &rest);
        if (k >= s->n_steps)
            fail_msg("%s: %s is past the %d calls of \"modes\"", name, key, s->n_steps);
        if (k >= 0 && (strcmp(rest, "expected") == 0 || strcmp(rest, "exact") == 0))
            continue;
        for (int j = k < 0 ? 0 : k; j < (k < 0 ? s->n_steps : k + 1); j++) {
            assert_true(s->n_in[j] < BS_MAX_INPUTS);
            struct bs_named_tensor *t = &s->in[j][s->n_in[j]++];
            t->name = rest;
            assert_int_equal(bs_st_get(s->st, key, &t->t), 0);
        }
    }
    for (int k = 0; k < s->n_steps; k++) {
        struct bs_tensor shape, t;
        char key[64];
        if (bs_model_check(model, s->in[k], s->n_in[k], &shape, &err) != 0)
            fail_msg("%s step %d: %s", name, k, err.msg);
        s->n_out = bs_tensor_nelements(&shape);
        snprintf(key, sizeof(key), "step%d.expected", k);
        assert_int_equal(bs_st_get(s->st, key, &t), 0);
        s->expected[k] = copy_output(&t, s->n_out, key);
        snprintf(key, sizeof(key), "step%d.exact", k);
        assert_int_equal(bs_st_get(s->st, key, &t), 0);
        s->exact[k] = copy_output(&t, s->n_out, key);
    }
}

static void seq_close(struct seq *s)
{
    for (int k = 0; k < s->n_steps; k++) {
        free(s->expected[k]);
        free(s->exact[k]);
    }
    bs_st_close(s->st);
}

/* max |a - b| / max |b| (infinite for a NaN). */
static double max_rel(const float *a, const float *b, int64_t n)
{
    double worst = 0, scale = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        scale = fmax(scale, fabs(b[i]));
        worst = isnan(d) ? INFINITY : fmax(worst, d);
    }
    return scale > 0 ? worst / scale : worst;
}

static const char *mode_name(enum bs_cache_mode m)
{
    return m == BS_CACHE_REFRESH ? "refresh" : m == BS_CACHE_REUSE ? "reuse" : "off";
}

/* One case's test: what it holds is released by case_teardown, also
 * when the test fails half way. */
struct fx {
    const char *name;
    bs_model_t *model;
    struct bs_arena arena;
    struct seq s;
    bs_block_cache_t *cache;
    float *got; /* one call's output */
};

static int case_setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    f->name = *state;
    bs_arena_init(&f->arena, &be);
    *state = f;
    return 0;
}

static int case_teardown(void **state)
{
    struct fx *f = *state;
    free(f->got);
    bs_block_cache_free(f->cache);
    seq_close(&f->s);
    bs_arena_free(&f->arena);
    bs_model_free(f->model);
    free(f);
    return 0;
}

/* Call k of the sequence as one part of a ragged batch, into f->got. */
static void run_step(struct fx *f, int k, bs_block_cache_t *cache, enum bs_cache_mode mode)
{
    struct bs_err err = {0};
    int64_t n = f->s.n_out;
    struct bs_model_part p = {.in = f->s.in[k], .n_in = f->s.n_in[k], .cache = cache, .mode = mode};
    struct bs_tensor out = bs_tensor_make(BS_TYPE_F32, 1, &n, f->got);
    if (bs_model_forward_parts(f->model, &f->arena, &p, 1, &out, NULL, &err) != 0)
        fail_msg("%s step %d (%s): %s", f->name, k, mode_name(mode), err.msg);
}

/* The worst errors of one run of the sequence, by mode, and the smallest
 * distance of a reuse from the exact output. */
struct figures {
    double worst[3]; /* by enum bs_cache_mode */
    double reuse_effect;
};

static void check_step(const struct fx *f, int k, enum bs_cache_mode mode, const float *want,
                       struct figures *fig)
{
    double e = max_rel(f->got, want, f->s.n_out);
    fig->worst[mode] = fmax(fig->worst[mode], e);
    if (!(e <= TOL))
        fail_msg("%s step %d (%s): max |got - want| = %.3g x max |want| (tolerance %g)", f->name, k,
                 mode_name(mode), e, TOL);
}

static void test_sequence(void **state)
{
    struct fx *f = *state;
    struct seq *s = &f->s;
    char dir[4096];
    struct bs_err err = {0};
    struct figures exact = {{0}, 0}, cached = {{0}, INFINITY};
    snprintf(dir, sizeof(dir), "%s/%s", golden_dir, f->name);
    if (bs_model_load(&f->model, dir, &be, &err) != 0)
        fail_msg("%s: %s", f->name, err.msg);
    seq_open(s, f->name, f->model);
    assert_true(s->n_steps >= 2 && s->modes[0] == BS_CACHE_REFRESH);
    f->got = malloc((size_t)s->n_out * sizeof(float));
    assert_non_null(f->got);
    /* every mode off: the exact outputs */
    for (int k = 0; k < s->n_steps; k++) {
        run_step(f, k, NULL, BS_CACHE_OFF);
        check_step(f, k, BS_CACHE_OFF, s->exact[k], &exact);
    }
    /* the file's modes with one cache: the rule's outputs */
    assert_int_equal(bs_block_cache_new(&f->cache, f->model, &err), 0);
    for (int k = 0; k < s->n_steps; k++) {
        run_step(f, k, f->cache, s->modes[k]);
        check_step(f, k, s->modes[k], s->expected[k], &cached);
        if (s->modes[k] != BS_CACHE_REUSE)
            continue;
        double moved = max_rel(f->got, s->exact[k], s->n_out);
        cached.reuse_effect = fmin(cached.reuse_effect, moved);
        if (!(moved >= MIN_REUSE_EFFECT))
            fail_msg("%s step %d: the reuse is only %.3g x max |exact| from the exact output "
                     "(at least %g expected)",
                     f->name, k, moved, MIN_REUSE_EFFECT);
    }
    assert_true(bs_block_cache_bytes(f->cache) > 0);
    printf("  %-32s off %.2e (%4.1f%% of tol), refresh %.2e (%4.1f%%), reuse %.2e (%4.1f%%); "
           "reuse vs exact >= %.3f\n",
           f->name, exact.worst[BS_CACHE_OFF], 100 * exact.worst[BS_CACHE_OFF] / TOL,
           cached.worst[BS_CACHE_REFRESH], 100 * cached.worst[BS_CACHE_REFRESH] / TOL,
           cached.worst[BS_CACHE_REUSE], 100 * cached.worst[BS_CACHE_REUSE] / TOL,
           cached.reuse_effect);
}

/* Every directory of tests/golden_cache is in cases[], and the reverse. */
static void test_all_listed(void **state)
{
    (void)state;
    DIR *d = opendir(cache_dir);
    size_t found = 0;
    if (d == NULL)
        fail_msg("%s: cannot open", cache_dir);
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        char path[4200];
        snprintf(path, sizeof(path), "%s/%s/steps.safetensors", cache_dir, e->d_name);
        FILE *f = fopen(path, "rb");
        if (f == NULL)
            continue;
        fclose(f);
        size_t i = 0;
        while (i < N_CASES && strcmp(cases[i], e->d_name) != 0)
            i++;
        if (i == N_CASES) {
            closedir(d);
            fail_msg("%s/%s is not in this test's cases[]", cache_dir, e->d_name);
        }
        found++;
    }
    closedir(d);
    assert_int_equal(found, N_CASES);
}

static int setup(void **state)
{
    struct bs_err err = {0};
    (void)state;
    return bs_backend_cpu_init_dtype(&be, 2, BS_TYPE_F32, &err);
}

static int teardown(void **state)
{
    (void)state;
    bs_backend_free(&be);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1)
        golden_dir = argv[1];
    if (argc > 2)
        cache_dir = argv[2];
    struct CMUnitTest tests[N_CASES + 1];
    tests[0] = (struct CMUnitTest){.name = "all_listed", .test_func = test_all_listed};
    for (size_t i = 0; i < N_CASES; i++)
        tests[i + 1] = (struct CMUnitTest){.name = cases[i],
                                           .test_func = test_sequence,
                                           .setup_func = case_setup,
                                           .teardown_func = case_teardown,
                                           .initial_state = (void *)cases[i]};
    return cmocka_run_group_tests(tests, setup, teardown);
}
