/* Ragged batches (bs_model_forward_parts): requests of different sequence
 * lengths run as one packed batch, and each answer equals the request run
 * alone (1e-5 of its largest value, FP32; BF16 models too). Every class,
 * from the golden models: lengths of 1, several tiles, mixed masks of each
 * form, broadcast masks and shared conditioning; which requests may share a
 * batch; the stop hook of a stack.
 *
 * usage: test_ragged [GOLDEN_DIR] (default: the source tree's tests/golden) */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define TEST_RNG_SEED 0x9e3779b97f4a7c15ull
#include "test_rand.h"

#include "backend.h"
#include "model.h"
#include "safetensors.h"

#ifndef BS_GOLDEN_DIR
#define BS_GOLDEN_DIR "tests/golden"
#endif

static const char *golden_dir = BS_GOLDEN_DIR;

#define MAX_PARTS 5

/* Sequence lengths of one request: samples, tokens (or H, W), context. */
struct lens {
    int64_t batch, l, h, w, lk;
    bool shared_mask, shared_cond;
};

/* One request made up for a golden model: its tensors own their data. */
struct request {
    struct bs_named_tensor in[BS_MAX_INPUTS];
    int n_in;
    void *data[BS_MAX_INPUTS];
    struct bs_tensor out;
};

struct golden {
    bs_model_t *model;
    bs_st_file_t *inputs;
};

static void golden_open(struct golden *g, const char *name, struct bs_backend *be,
                        enum bs_dtype dtype)
{
    char dir[4096], path[4200];
    struct bs_err err = {0};
    struct bs_model_opts o = {.has_dtype = true, .dtype = dtype};
    snprintf(dir, sizeof(dir), "%s/%s", golden_dir, name);
    snprintf(path, sizeof(path), "%s/inputs.safetensors", dir);
    if (bs_model_load_opts(&g->model, dir, be, &o, &err) != 0 ||
        bs_st_open(&g->inputs, path, &err) != 0)
        fail_msg("%s: %s", name, err.msg);
}

static void golden_close(struct golden *g)
{
    bs_st_close(g->inputs);
    bs_model_free(g->model);
}

static void fill(struct bs_tensor *t, const char *name, int64_t i)
{
    float v = frand();
    bool is_mask = strstr(name, "mask") != NULL;
    if (is_mask && i % 5 == 3)
        v = -10000.0f; /* masked keys here and there */
    switch (t->type) {
    case BS_TYPE_F32:
        ((float *)t->data)[i] = is_mask && v > -10000.0f ? v * 3.0f : v;
        break;
    case BS_TYPE_F16:
    case BS_TYPE_BF16: {
        float f = is_mask && v > -10000.0f ? v * 3.0f : v;
        bs_convert_from_f32((char *)t->data + i * 2, t->type, &f, 1);
        break;
    }
    case BS_TYPE_BOOL:
        ((uint8_t *)t->data)[i] = (uint8_t)(i % 4 != 1);
        break;
    default:
        fail_msg("input %s: unexpected dtype", name);
    }
}

/* The request of lengths n modelled on the golden inputs of g: the same
 * inputs, dtypes and forms, with its own sequence lengths and values (the
 * golden conditioning values, which are valid for the model). */
static void make_request(const struct golden *g, const struct lens *n, bool only_cross,
                         struct request *r)
{
    memset(r, 0, sizeof(*r));
    r->n_in = bs_st_count(g->inputs);
    for (int i = 0; i < r->n_in; i++) {
        const char *name = bs_st_name(g->inputs, i);
        struct bs_tensor gt;
        assert_int_equal(bs_st_get(g->inputs, name, &gt), 0);
        int64_t ne[BS_MAX_DIMS];
        memcpy(ne, gt.ne, sizeof(ne));
        bool cond = strcmp(name, "timestep") == 0 || strcmp(name, "class_labels") == 0;
        if (cond) {
            ne[0] = n->shared_cond ? 1 : n->batch;
        } else if (strstr(name, "mask") != NULL) {
            bool enc_keys = strcmp(name, "encoder_attention_mask") == 0 || only_cross;
            ne[0] = n->shared_mask ? 1 : n->batch;
            ne[gt.n_dims - 1] = enc_keys ? n->lk : n->l;
            if (gt.n_dims == 3 && gt.ne[1] > 1)
                ne[1] = n->l;
        } else if (strcmp(name, "encoder_hidden_states") == 0) {
            ne[0] = n->batch;
            ne[1] = n->lk;
        } else if (gt.n_dims == 4) { /* spatial: [B, C, H, W] */
            ne[0] = n->batch;
            ne[2] = n->h;
            ne[3] = n->w;
        } else if (gt.n_dims == 3) {
            ne[0] = n->batch;
            ne[1] = n->l;
        } else {
            ne[0] = n->batch; /* AdaGroupNorm's emb */
        }
        struct bs_tensor t = bs_tensor_make(gt.type, gt.n_dims, ne, NULL);
        r->data[i] = malloc(bs_tensor_nbytes(&t) + 1);
        assert_non_null(r->data[i]);
        t.data = r->data[i];
        int64_t count = bs_tensor_nelements(&t);
        for (int64_t e = 0; e < count; e++) {
            if (cond) /* cycle through the golden values */
                memcpy((char *)t.data + e * (int64_t)bs_dtype_size(t.type),
                       (const char *)gt.data +
                           (e % bs_tensor_nelements(&gt)) * (int64_t)bs_dtype_size(t.type),
                       bs_dtype_size(t.type));
            else
                fill(&t, name, e);
        }
        r->in[i].name = name;
        r->in[i].t = t;
    }
}

static void free_request(struct request *r)
{
    for (int i = 0; i < r->n_in; i++)
        free(r->data[i]);
    free(r->out.data);
}

/* The packed answer of parts[0..n) against each part run alone. */
static void check_parts(struct golden *g, struct bs_backend *be, struct request *parts, int n,
                        const char *what)
{
    struct bs_arena arena;
    struct bs_err err = {0};
    struct bs_model_part mp[MAX_PARTS] = {{0}};
    int64_t total = 0;
    bs_arena_init(&arena, be);
    for (int k = 0; k < n; k++) {
        struct bs_tensor shape;
        if (bs_model_check(g->model, parts[k].in, parts[k].n_in, &shape, &err) != 0)
            fail_msg("%s: part %d: %s", what, k, err.msg);
        parts[k].out = shape;
        parts[k].out.data = malloc(bs_tensor_nbytes(&shape));
        assert_non_null(parts[k].out.data);
        if (bs_model_forward(g->model, &arena, parts[k].in, parts[k].n_in, &parts[k].out, NULL,
                             &err) != 0)
            fail_msg("%s: part %d alone: %s", what, k, err.msg);
        mp[k].in = parts[k].in;
        mp[k].n_in = parts[k].n_in;
        total += bs_tensor_nelements(&shape);
    }
    struct bs_tensor out = bs_tensor_make(BS_TYPE_F32, 1, &total, malloc((size_t)total * 4));
    assert_non_null(out.data);
    memset(out.data, 0xff, (size_t)total * 4); /* NaN: nothing left unwritten passes */
    if (bs_model_forward_parts(g->model, &arena, mp, n, &out, NULL, &err) != 0)
        fail_msg("%s: packed: %s", what, err.msg);
    const float *got = out.data;
    for (int k = 0; k < n; k++) {
        const float *want = parts[k].out.data;
        int64_t count = bs_tensor_nelements(&parts[k].out);
        double worst = 0, scale = 1;
        for (int64_t i = 0; i < count; i++)
            scale = fmax(scale, fabs(want[i]));
        for (int64_t i = 0; i < count; i++) {
            double d = fabs((double)got[i] - want[i]);
            worst = isnan(got[i]) || isnan(want[i]) ? INFINITY : fmax(worst, d);
        }
        if (!(worst <= 1e-5 * scale))
            fail_msg("%s: part %d of %d: max |packed - alone| %g (scale %g)", what, k, n, worst,
                     scale);
        got += count;
    }
    free(out.data);
    bs_arena_free(&arena);
}

/* Sets of lengths for rank-3 inputs: a length of 1, one shared with the
 * golden case, longer ones crossing the kernels' tiles. */
static const struct lens seq_sets[][MAX_PARTS] = {
    {{1, 1, 0, 0, 1, false, false},
     {2, 20, 0, 0, 7, false, false},
     {1, 45, 0, 0, 3, false, true},
     {1, 130, 0, 0, 19, true, false},
     {2, 3, 0, 0, 77, true, true}},
    {{1, 64, 0, 0, 8, false, false},
     {1, 65, 0, 0, 9, false, false},
     {1, 7, 0, 0, 1, false, false},
     {1, 1, 0, 0, 1, false, false},
     {1, 200, 0, 0, 40, false, false}},
};

/* Spatial inputs: H x W from 1 x 1 up. */
static const struct lens spatial_set[MAX_PARTS] = {
    {1, 0, 1, 1, 0, false, false},   {2, 0, 5, 5, 0, false, false}, {1, 0, 7, 3, 0, false, false},
    {1, 0, 12, 11, 0, false, false}, {1, 0, 2, 9, 0, false, false},
};

static void run_case(const char *name, enum bs_dtype dtype)
{
    struct bs_backend be;
    struct bs_err err = {0};
    struct golden g;
    assert_int_equal(bs_backend_cpu_init_dtype(&be, 2, dtype, &err), 0);
    golden_open(&g, name, &be, dtype);
    const struct bs_model_config *cfg = bs_model_config(g.model);
    bool only_cross = strcmp(bs_config_class_name(cfg->cls), "BasicTransformerBlock") == 0 &&
                      cfg->btb.only_cross_attention;
    bool spatial = bs_model_input(g.model, 0)->n_dims == 4;
    int n_sets = spatial ? 1 : (int)(sizeof(seq_sets) / sizeof(seq_sets[0]));
    for (int s = 0; s < n_sets; s++) {
        struct request parts[MAX_PARTS];
        const struct lens *set = spatial ? spatial_set : seq_sets[s];
        char what[160];
        for (int k = 0; k < MAX_PARTS; k++)
            make_request(&g, &set[k], only_cross, &parts[k]);
        snprintf(what, sizeof(what), "%s (%s, set %d)", name, bs_compute_dtype_name(dtype), s);
        check_parts(&g, &be, parts, MAX_PARTS, what);
        /* a batch of one request is the request */
        snprintf(what, sizeof(what), "%s (%s, set %d, alone)", name, bs_compute_dtype_name(dtype),
                 s);
        free(parts[0].out.data);
        parts[0].out.data = NULL;
        check_parts(&g, &be, parts, 1, what);
        for (int k = 0; k < MAX_PARTS; k++)
            free_request(&parts[k]);
    }
    golden_close(&g);
    bs_backend_free(&be);
}

/* Every class, both mask forms and both mask ranks, BOOL and F16 masks,
 * per-sample and shared conditioning, stacks. */
static const char *const cases[] = {
    "btb_geglu_cross",
    "btb_mask_2d",
    "btb_mask_3d",
    "btb_mask_bool",
    "btb_mask_bool_3d",
    "btb_mask_f16",
    "btb_only_cross_attention_masks",
    "btb_ada_norm_per_sample_t",
    "btb_ada_norm_zero_dit",
    "btb_ada_norm_zero_cross",
    "btb_stack3_dit",
    "btb_head_dim_24",
    "btb_input_f16",
    "attnblock_4heads",
    "attnblock_1head_rescale",
    "ada_group_norm_silu",
    "ada_layer_norm_per_sample_t",
    "ff_geglu",
    "geglu",
    "gelu_tanh",
    "approximate_gelu",
};

static void test_each_class_fp32(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_case(cases[i], BS_TYPE_F32);
}

static void test_each_class_bf16(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_case(cases[i], BS_TYPE_BF16);
}

static struct bs_named_tensor named(const char *name, enum bs_dtype type, int n_dims,
                                    const int64_t *ne, void *data)
{
    return (struct bs_named_tensor){name, bs_tensor_make(type, n_dims, ne, data)};
}

/* Who may share a batch, and the token count a batch cap counts. */
static void test_compatible_and_tokens(void **state)
{
    (void)state;
    struct bs_backend be;
    struct bs_err err = {0};
    struct golden g;
    static float buf[4096];
    assert_int_equal(bs_backend_cpu_init(&be, 1, &err), 0);
    golden_open(&g, "btb_mask_3d", &be, BS_TYPE_F32);
    /* hidden [B, L, 32], enc [B, Lk, 24], masks [B, L|1, L], [B, L|1, Lk] */
    struct bs_named_tensor a[4] = {
        named("hidden_states", BS_TYPE_F32, 3, (int64_t[]){2, 20, 32}, buf),
        named("encoder_hidden_states", BS_TYPE_F32, 3, (int64_t[]){2, 7, 24}, buf),
        named("attention_mask", BS_TYPE_F32, 3, (int64_t[]){2, 20, 20}, buf),
        named("encoder_attention_mask", BS_TYPE_F32, 3, (int64_t[]){2, 20, 7}, buf),
    };
    struct bs_named_tensor b[4];
    memcpy(b, a, sizeof(a));
    b[0].t = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, 9, 32}, buf);
    b[1].t = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, 3, 24}, buf);
    b[2].t = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, 9, 9}, buf);
    b[3].t = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, 9, 3}, buf);
    assert_true(bs_model_ragged_compatible(g.model, a, 4, b, 4));
    assert_int_equal(bs_model_tokens(g.model, a, 4), 40);
    assert_int_equal(bs_model_tokens(g.model, b, 4), 9);
    /* a mask with one row per sample does not join one with a row per query */
    b[3].t = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, 1, 3}, buf);
    assert_false(bs_model_ragged_compatible(g.model, a, 4, b, 4));
    b[3].t = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, 9, 3}, buf);
    /* nor another dtype, nor another set of inputs */
    b[1].t.type = BS_TYPE_F16;
    assert_false(bs_model_ragged_compatible(g.model, a, 4, b, 4));
    b[1].t.type = BS_TYPE_F32;
    assert_false(bs_model_ragged_compatible(g.model, a, 4, b, 3));
    /* the packed forward refuses parts that may not share a batch */
    struct request r[2];
    make_request(&g, &seq_sets[0][1], false, &r[0]);
    make_request(&g, &seq_sets[0][2], false, &r[1]);
    free(r[1].data[3]); /* encoder_attention_mask, rows per query -> one row */
    r[1].in[3].t = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, 1, 3}, NULL);
    r[1].data[3] = r[1].in[3].t.data = calloc(3, sizeof(float));
    struct bs_model_part mp[2] = {{.in = r[0].in, .n_in = r[0].n_in},
                                  {.in = r[1].in, .n_in = r[1].n_in}};
    int64_t total = 2 * 20 * 32 + 45 * 32;
    float *out = malloc((size_t)total * sizeof(float));
    struct bs_tensor ot = bs_tensor_make(BS_TYPE_F32, 1, &total, out);
    struct bs_arena arena;
    bs_arena_init(&arena, &be);
    assert_int_equal(bs_model_forward_parts(g.model, &arena, mp, 2, &ot, NULL, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "beyond its sequence lengths"));
    /* and an output buffer of the wrong size */
    mp[1] = mp[0];
    assert_int_equal(bs_model_forward_parts(g.model, &arena, mp, 2, &ot, NULL, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "output buffer"));
    bs_arena_free(&arena);
    free(out);
    free_request(&r[0]);
    free_request(&r[1]);
    golden_close(&g);
    bs_backend_free(&be);
}

struct stop_state {
    int asked, stop_after;
};

static bool stop_after(void *arg)
{
    struct stop_state *s = arg;
    return ++s->asked > s->stop_after;
}

/* A stack stops at the first boundary where its owner says so, and counts
 * the blocks it ran. */
static void test_stop_hook(void **state)
{
    (void)state;
    struct bs_backend be;
    struct bs_err err = {0};
    struct golden g;
    assert_int_equal(bs_backend_cpu_init(&be, 1, &err), 0);
    golden_open(&g, "btb_stack3_dit", &be, BS_TYPE_F32);
    struct request r;
    make_request(&g, &seq_sets[0][1], false, &r);
    struct bs_tensor shape;
    assert_int_equal(bs_model_check(g.model, r.in, r.n_in, &shape, &err), 0);
    shape.data = malloc(bs_tensor_nbytes(&shape));
    struct bs_arena arena;
    bs_arena_init(&arena, &be);
    for (int after = 0; after < 8; after++) {
        struct stop_state s = {0, after};
        int blocks = -1;
        struct bs_forward_opts o = {
            .should_stop = stop_after, .stop_arg = &s, .blocks_run = &blocks};
        int rc = bs_model_forward(g.model, &arena, r.in, r.n_in, &shape, &o, &err);
        /* asked before each block and before its cross-attention (none here)
         * and feed-forward: 2 questions per DiT block */
        if (after >= 6) {
            assert_int_equal(rc, 0);
            assert_int_equal(blocks, 3);
            continue;
        }
        assert_int_equal(rc, BS_ECANCELED);
        assert_non_null(strstr(err.msg, "stopped"));
        assert_int_equal(blocks == -1 ? 0 : blocks, after / 2);
    }
    bs_arena_free(&arena);
    free(shape.data);
    free_request(&r);
    golden_close(&g);
    bs_backend_free(&be);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        golden_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_compatible_and_tokens),
        cmocka_unit_test(test_stop_hook),
        cmocka_unit_test(test_each_class_fp32),
        cmocka_unit_test(test_each_class_bf16),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
