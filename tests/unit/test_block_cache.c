/* Step-level block caching in the engine (model.h, bs_block_cache): a part
 * without caching is the exact forward bit for bit; a refresh equals the
 * exact forward and fills the cache; a reuse takes the stored attn1, attn2
 * and ff outputs and computes the rest from its own inputs. Checked against
 * the rule itself where it can be written in closed form (a LayerNorm block:
 * out' = x' + (out - x) for a reuse of the refresh's stored outputs); refresh,
 * reuse and uncached parts sharing one batch equal each alone; bad use gets
 * clear errors.
 *
 * usage: test_block_cache [GOLDEN_DIR] (default: the source tree's tests/golden) */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define TEST_RNG_SEED 0x51afd7ed558ccd25ull
#include "test_rand.h"

#include "backend.h"
#include "model.h"
#include "safetensors.h"

#ifndef BS_GOLDEN_DIR
#define BS_GOLDEN_DIR "tests/golden"
#endif

static const char *golden_dir = BS_GOLDEN_DIR;
static struct bs_backend be;

struct fx {
    bs_model_t *model;
    bs_st_file_t *st;
    struct bs_named_tensor in[BS_MAX_INPUTS]; /* the golden inputs, sample 0 */
    int n_in;
    struct bs_arena arena;
};

static void fx_open(struct fx *f, const char *name)
{
    char dir[4096], path[4200];
    struct bs_err err = {0};
    memset(f, 0, sizeof(*f));
    snprintf(dir, sizeof(dir), "%s/%s", golden_dir, name);
    snprintf(path, sizeof(path), "%s/inputs.safetensors", dir);
    if (bs_model_load(&f->model, dir, &be, &err) != 0 || bs_st_open(&f->st, path, &err) != 0)
        fail_msg("%s: %s", name, err.msg);
    f->n_in = bs_st_count(f->st);
    for (int i = 0; i < f->n_in; i++) {
        f->in[i].name = bs_st_name(f->st, i);
        assert_int_equal(bs_st_get(f->st, f->in[i].name, &f->in[i].t), 0);
        f->in[i].t.ne[0] = 1; /* sample 0 (scalars and [B] conditioning too) */
        if (f->in[i].t.n_dims == 0)
            f->in[i].t.ne[0] = 1;
    }
    bs_arena_init(&f->arena, &be);
}

static void fx_close(struct fx *f)
{
    bs_arena_free(&f->arena);
    bs_st_close(f->st);
    bs_model_free(f->model);
}

/* A copy of the inputs with hidden_states (and timestep, when float)
 * perturbed: the next step of a denoising loop. buf holds the copies. */
static void next_step(const struct fx *f, struct bs_named_tensor *in, float **bufs, float amount)
{
    for (int i = 0; i < f->n_in; i++) {
        in[i] = f->in[i];
        bufs[i] = NULL;
        bool hs = strcmp(in[i].name, "hidden_states") == 0;
        bool ts = strcmp(in[i].name, "timestep") == 0 && in[i].t.type == BS_TYPE_F32;
        if (!hs && !ts)
            continue;
        int64_t n = bs_tensor_nelements(&in[i].t);
        bufs[i] = malloc((size_t)n * sizeof(float));
        assert_non_null(bufs[i]);
        for (int64_t e = 0; e < n; e++)
            bufs[i][e] = ((const float *)in[i].t.data)[e] + (ts ? -37.0f : amount * frand());
        in[i].t.data = bufs[i];
    }
}

static float *run_parts(struct fx *f, struct bs_model_part *parts, int n, int64_t *total)
{
    struct bs_err err = {0};
    *total = 0;
    for (int k = 0; k < n; k++) {
        struct bs_tensor shape;
        assert_int_equal(bs_model_check(f->model, parts[k].in, parts[k].n_in, &shape, &err), 0);
        *total += bs_tensor_nelements(&shape);
    }
    struct bs_tensor out = bs_tensor_make(BS_TYPE_F32, 1, total, malloc((size_t)*total * 4));
    assert_non_null(out.data);
    if (bs_model_forward_parts(f->model, &f->arena, parts, n, &out, NULL, &err) != 0)
        fail_msg("forward_parts: %s", err.msg);
    return out.data;
}

static float *run_alone(struct fx *f, const struct bs_named_tensor *in, int n_in, int64_t *count)
{
    struct bs_err err = {0};
    struct bs_tensor out;
    assert_int_equal(bs_model_check(f->model, in, n_in, &out, &err), 0);
    out.data = malloc(bs_tensor_nbytes(&out));
    assert_non_null(out.data);
    if (bs_model_forward(f->model, &f->arena, in, n_in, &out, NULL, &err) != 0)
        fail_msg("forward: %s", err.msg);
    *count = bs_tensor_nelements(&out);
    return out.data;
}

static double max_rel(const float *a, const float *b, int64_t n)
{
    double worst = 0, scale = 1;
    for (int64_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(b[i]));
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        worst = isnan(d) ? INFINITY : fmax(worst, d);
    }
    return worst / scale;
}

/* Off: bit for bit the exact forward. Refresh: the exact forward (the
 * stored products may be added after their GEMM rather than inside it).
 * Reuse of the same inputs: the refresh's output. */
static void check_modes(const char *name)
{
    struct fx f;
    struct bs_err err = {0};
    bs_block_cache_t *cache;
    int64_t n, total;
    fx_open(&f, name);
    float *exact = run_alone(&f, f.in, f.n_in, &n);
    assert_int_equal(bs_block_cache_new(&cache, f.model, &err), 0);
    assert_int_equal(bs_block_cache_bytes(cache), 0);
    struct bs_model_part p = {.in = f.in, .n_in = f.n_in};
    float *off = run_parts(&f, &p, 1, &total);
    assert_int_equal(total, n);
    assert_memory_equal(off, exact, (size_t)n * sizeof(float));
    p.cache = cache;
    p.mode = BS_CACHE_REFRESH;
    float *refresh = run_parts(&f, &p, 1, &total);
    if (!(max_rel(refresh, exact, n) <= 1e-6))
        fail_msg("%s: refresh differs from the exact forward by %g", name,
                 max_rel(refresh, exact, n));
    assert_int_equal(bs_block_cache_bytes(cache),
                     bs_block_cache_bytes_for(f.model, bs_model_tokens(f.model, f.in, f.n_in)));
    assert_true(bs_block_cache_bytes(cache) > 0);
    p.mode = BS_CACHE_REUSE;
    float *reuse = run_parts(&f, &p, 1, &total);
    if (!(max_rel(reuse, refresh, n) <= 1e-6))
        fail_msg("%s: reuse of the same inputs differs from its refresh by %g", name,
                 max_rel(reuse, refresh, n));
    free(exact);
    free(off);
    free(refresh);
    free(reuse);
    bs_block_cache_free(cache);
    fx_close(&f);
}

static void test_modes(void **state)
{
    (void)state;
    static const char *const cases[] = {
        "btb_geglu_cross",
        "btb_ada_norm_zero_dit",
        "btb_ada_norm_per_sample_t",
        "btb_stack3",
        "btb_stack3_dit",
        "btb_only_cross_attention_masks",
        "btb_ada_norm_zero_cross",
        "btb_self_only",
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_modes(cases[i]);
}

/* The rule in closed form: a LayerNorm block adds its three outputs to its
 * input without gates, so a reuse of the outputs stored by a refresh on x
 * gives out' = x' + (out(x) - x) for any x'. */
static void test_rule_layer_norm_block(void **state)
{
    (void)state;
    struct fx f;
    struct bs_err err = {0};
    bs_block_cache_t *cache;
    int64_t n, total;
    float *bufs[BS_MAX_INPUTS];
    struct bs_named_tensor next[BS_MAX_INPUTS];
    fx_open(&f, "btb_geglu_cross");
    assert_int_equal(bs_block_cache_new(&cache, f.model, &err), 0);
    struct bs_model_part p = {.in = f.in, .n_in = f.n_in, .cache = cache, .mode = BS_CACHE_REFRESH};
    float *refresh = run_parts(&f, &p, 1, &total);
    next_step(&f, next, bufs, 0.5f);
    p.in = next;
    p.mode = BS_CACHE_REUSE;
    float *reuse = run_parts(&f, &p, 1, &n);
    const float *x = NULL, *x2 = NULL;
    for (int i = 0; i < f.n_in; i++)
        if (strcmp(f.in[i].name, "hidden_states") == 0) {
            x = f.in[i].t.data;
            x2 = next[i].t.data;
        }
    float *want = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++)
        want[i] = x2[i] + (refresh[i] - x[i]);
    if (!(max_rel(reuse, want, n) <= 1e-5))
        fail_msg("reuse differs from x' + (out - x) by %g", max_rel(reuse, want, n));
    /* and it is not simply the exact forward of the new input */
    float *exact = run_alone(&f, next, f.n_in, &n);
    assert_true(max_rel(reuse, exact, n) > 1e-3);
    free(want);
    free(exact);
    free(refresh);
    free(reuse);
    for (int i = 0; i < f.n_in; i++)
        free(bufs[i]);
    bs_block_cache_free(cache);
    fx_close(&f);
}

/* Refresh, reuse and uncached parts in one batch: each equals its run
 * alone with the same cache state. */
static void test_mixed_batch(void **state)
{
    (void)state;
    struct fx f;
    struct bs_err err = {0};
    bs_block_cache_t *a, *b, *a2, *b2;
    int64_t n, total;
    float *bufs[BS_MAX_INPUTS];
    struct bs_named_tensor next[BS_MAX_INPUTS];
    fx_open(&f, "btb_ada_norm_zero_dit");
    assert_int_equal(bs_block_cache_new(&a, f.model, &err), 0);
    assert_int_equal(bs_block_cache_new(&b, f.model, &err), 0);
    assert_int_equal(bs_block_cache_new(&a2, f.model, &err), 0);
    assert_int_equal(bs_block_cache_new(&b2, f.model, &err), 0);
    /* fill b and b2 alike */
    struct bs_model_part p = {.in = f.in, .n_in = f.n_in, .cache = b, .mode = BS_CACHE_REFRESH};
    free(run_parts(&f, &p, 1, &total));
    p.cache = b2;
    free(run_parts(&f, &p, 1, &total));
    next_step(&f, next, bufs, 0.3f);
    /* alone: a refresh on a, an uncached run, a reuse of b */
    struct bs_model_part alone[3] = {
        {.in = next, .n_in = f.n_in, .cache = a, .mode = BS_CACHE_REFRESH},
        {.in = f.in, .n_in = f.n_in},
        {.in = next, .n_in = f.n_in, .cache = b, .mode = BS_CACHE_REUSE},
    };
    float *want[3];
    for (int k = 0; k < 3; k++)
        want[k] = run_parts(&f, &alone[k], 1, &n);
    /* together, on the twin caches */
    struct bs_model_part together[3] = {alone[0], alone[1], alone[2]};
    together[0].cache = a2;
    together[2].cache = b2;
    float *got = run_parts(&f, together, 3, &total);
    assert_int_equal(total, 3 * n);
    for (int k = 0; k < 3; k++)
        if (!(max_rel(got + k * n, want[k], n) <= 1e-5))
            fail_msg("part %d of the mixed batch differs by %g", k,
                     max_rel(got + k * n, want[k], n));
    /* the refreshes stored the same: reusing a and a2 agrees */
    alone[0].mode = BS_CACHE_REUSE;
    float *ra = run_parts(&f, &alone[0], 1, &n);
    alone[0].cache = a2;
    float *ra2 = run_parts(&f, &alone[0], 1, &n);
    assert_true(max_rel(ra, ra2, n) <= 1e-5);
    free(ra);
    free(ra2);
    free(got);
    for (int k = 0; k < 3; k++)
        free(want[k]);
    for (int i = 0; i < f.n_in; i++)
        free(bufs[i]);
    bs_block_cache_free(a);
    bs_block_cache_free(b);
    bs_block_cache_free(a2);
    bs_block_cache_free(b2);
    fx_close(&f);
}

/* Bad use: a reuse before any refresh, of another shape, ahead of a
 * computing part; a class without blocks. */
static void test_errors(void **state)
{
    (void)state;
    struct fx f;
    struct bs_err err = {0};
    bs_block_cache_t *c, *c2;
    int64_t total;
    fx_open(&f, "btb_geglu_cross");
    assert_int_equal(bs_block_cache_new(&c, f.model, &err), 0);
    assert_int_equal(bs_block_cache_new(&c2, f.model, &err), 0);
    float out[8192];
    int64_t cap = 8192;
    struct bs_tensor ot = bs_tensor_make(BS_TYPE_F32, 1, &cap, out);
    struct bs_model_part p = {.in = f.in, .n_in = f.n_in, .cache = c, .mode = BS_CACHE_REUSE};
    struct bs_tensor shape;
    assert_int_equal(bs_model_check(f.model, f.in, f.n_in, &shape, &err), 0);
    ot.ne[0] = bs_tensor_nelements(&shape);
    assert_int_equal(bs_model_forward_parts(f.model, &f.arena, &p, 1, &ot, NULL, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "holds no outputs"));
    p.mode = BS_CACHE_REFRESH;
    free(run_parts(&f, &p, 1, &total));
    /* another length */
    struct bs_named_tensor shorter[BS_MAX_INPUTS];
    memcpy(shorter, f.in, sizeof(shorter));
    for (int i = 0; i < f.n_in; i++)
        if (strcmp(shorter[i].name, "hidden_states") == 0)
            shorter[i].t.ne[1] -= 3;
    p.in = shorter;
    p.mode = BS_CACHE_REUSE;
    assert_int_equal(bs_model_check(f.model, shorter, f.n_in, &shape, &err), 0);
    ot.ne[0] = bs_tensor_nelements(&shape);
    assert_int_equal(bs_model_forward_parts(f.model, &f.arena, &p, 1, &ot, NULL, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "shape must stay fixed"));
    /* a reuse ahead of a part that computes */
    struct bs_model_part two[2] = {
        {.in = f.in, .n_in = f.n_in, .cache = c, .mode = BS_CACHE_REUSE},
        {.in = f.in, .n_in = f.n_in, .cache = c2, .mode = BS_CACHE_REFRESH},
    };
    ot.ne[0] = 2 * bs_tensor_nelements(&shape) + 2 * 3 * 32;
    assert_int_equal(bs_model_forward_parts(f.model, &f.arena, two, 2, &ot, NULL, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "must come after"));
    /* a mode without a cache */
    two[0].cache = NULL;
    two[0].mode = BS_CACHE_REFRESH;
    assert_int_equal(bs_model_forward_parts(f.model, &f.arena, two, 1, &ot, NULL, &err), BS_EINVAL);
    bs_block_cache_free(c);
    bs_block_cache_free(c2);
    fx_close(&f);
    /* a class without transformer blocks */
    fx_open(&f, "attnblock_4heads");
    assert_false(bs_model_cacheable(f.model));
    assert_int_equal(bs_block_cache_new(&c, f.model, &err), BS_EINVAL);
    assert_null(c);
    assert_non_null(strstr(err.msg, "BasicTransformerBlock"));
    fx_close(&f);
}

static int setup(void **state)
{
    struct bs_err err = {0};
    (void)state;
    return bs_backend_cpu_init(&be, 2, &err);
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
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_modes),
        cmocka_unit_test(test_rule_layer_norm_block),
        cmocka_unit_test(test_mixed_batch),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
