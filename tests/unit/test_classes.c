/* The class table (engine/class.h): every entry is complete, inputs have the
 * roles batching relies on, every class loads from the golden cases, and the
 * FLOP counts are the ones the engine gave before the classes became a table.
 *
 * usage: test_classes [GOLDEN_DIR] (default: the source tree's tests/golden) */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "builtin.h"
#include "class.h"
#include "safetensors.h"

#ifndef BS_GOLDEN_DIR
#define BS_GOLDEN_DIR "tests/golden"
#endif

static const char *golden_dir = BS_GOLDEN_DIR;

/* Every input name the engine knows and its role. */
static const struct {
    const char *name;
    enum bs_input_role role;
} known_roles[] = {
    {"hidden_states", BS_ROLE_BATCHED},
    {"encoder_hidden_states", BS_ROLE_BATCHED},
    {"x", BS_ROLE_BATCHED},
    {"emb", BS_ROLE_BATCHED},
    {"attention_mask", BS_ROLE_MASK},
    {"encoder_attention_mask", BS_ROLE_MASK},
    {"timestep", BS_ROLE_COND},
    {"class_labels", BS_ROLE_COND},
};

static int expected_role(const char *name)
{
    for (size_t i = 0; i < BS_ARRAY_LEN(known_roles); i++)
        if (strcmp(known_roles[i].name, name) == 0)
            return (int)known_roles[i].role;
    return -1;
}

static void test_entries_complete(void **state)
{
    (void)state;
    assert_int_equal(bs_class_count(), 8);
    assert_null(bs_class_get(-1));
    assert_null(bs_class_get(bs_class_count()));
    for (int i = 0; i < bs_class_count(); i++) {
        const struct bs_class *k = bs_class_get(i);
        assert_non_null(k);
        assert_non_null(k->name);
        assert_ptr_equal(bs_class_find(k->name), k);
        for (int j = 0; j < i; j++)
            if (strcmp(bs_class_get(j)->name, k->name) == 0)
                fail_msg("class name %s listed twice", k->name);
        assert_non_null(k->opts);
        assert_non_null(k->opts[0].key);
        assert_non_null(k->describe);
        assert_non_null(k->state_size);
        assert_non_null(k->bind);
        assert_non_null(k->forward);
        assert_non_null(k->flops);
        assert_non_null(k->inputs);
        assert_in_range(k->n_inputs, 1, BS_MAX_INPUTS);
        assert_int_equal(k->inputs[0].role, BS_ROLE_BATCHED);
        for (int j = 0; j < k->n_inputs; j++) {
            const struct bs_class_input *in = &k->inputs[j];
            assert_non_null(in->name);
            assert_in_range(in->n_dims, 1, BS_MAX_DIMS);
            assert_true(in->dtypes & (1u << in->dtype));
            if (expected_role(in->name) != (int)in->role)
                fail_msg("%s input %s: role %d, expected %d", k->name, in->name, in->role,
                         expected_role(in->name));
            for (int l = 0; l < j; l++)
                assert_string_not_equal(k->inputs[l].name, in->name);
        }
    }
    assert_null(bs_class_find("UNet2DConditionModel"));
    assert_true(bs_class_knows_input("encoder_attention_mask"));
    assert_false(bs_class_knows_input("sample"));
    assert_string_equal(bs_config_class_name(NULL), "?");
    assert_string_equal(bs_config_class_name(&bs_class_btb), "BasicTransformerBlock");
}

/* The option rows: unique keys, offsets inside the config. */
static void test_option_rows(void **state)
{
    (void)state;
    for (int i = 0; i < bs_class_count(); i++) {
        const struct bs_class *k = bs_class_get(i);
        for (const struct bs_config_opt *o = k->opts; o->key; o++) {
            assert_true(o->off < offsetof(struct bs_model_config, num_blocks));
            for (const struct bs_config_opt *p = k->opts; p != o; p++)
                assert_string_not_equal(p->key, o->key);
        }
    }
}

struct golden_case {
    char name[128];
    bs_model_t *model;
    bs_st_file_t *inputs;
    struct bs_named_tensor in[BS_MAX_INPUTS];
    int n_in;
};

static int open_case(struct golden_case *gc, const char *name, struct bs_backend *be,
                     struct bs_err *err)
{
    char dir[4096], path[4200];
    memset(gc, 0, sizeof(*gc));
    snprintf(gc->name, sizeof(gc->name), "%s", name);
    snprintf(dir, sizeof(dir), "%s/%s", golden_dir, name);
    snprintf(path, sizeof(path), "%s/inputs.safetensors", dir);
    int rc = bs_model_load(&gc->model, dir, be, err);
    if (rc == 0)
        rc = bs_st_open(&gc->inputs, path, err);
    if (rc != 0)
        return rc;
    gc->n_in = bs_st_count(gc->inputs);
    assert_in_range(gc->n_in, 1, BS_MAX_INPUTS);
    for (int i = 0; i < gc->n_in; i++) {
        gc->in[i].name = bs_st_name(gc->inputs, i);
        assert_int_equal(bs_st_get(gc->inputs, gc->in[i].name, &gc->in[i].t), 0);
    }
    return 0;
}

static void close_case(struct golden_case *gc)
{
    bs_st_close(gc->inputs);
    bs_model_free(gc->model);
}

/* Every golden case loads; together they cover every class; the model's
 * inputs carry their roles, and so does every input a case gives. */
static void test_golden_configs(void **state)
{
    (void)state;
    struct bs_backend be;
    struct bs_err err = {0};
    int seen[16] = {0}, n_cases = 0;
    DIR *d = opendir(golden_dir);
    struct dirent *e;
    if (d == NULL)
        fail_msg("cannot open %s", golden_dir);
    assert_int_equal(bs_backend_init(&be, "cpu", 1, &err), 0);
    while ((e = readdir(d)) != NULL) {
        char path[4200];
        struct bs_model_config cfg;
        struct golden_case gc;
        snprintf(path, sizeof(path), "%s/%s/config.json", golden_dir, e->d_name);
        if (e->d_name[0] == '.' || access(path, R_OK) != 0)
            continue;
        if (bs_config_load(&cfg, path, &err) != 0 || open_case(&gc, e->d_name, &be, &err) != 0)
            fail_msg("%s: %s", e->d_name, err.msg);
        for (int i = 0; i < bs_class_count(); i++)
            seen[i] += cfg.cls == bs_class_get(i);
        const bs_model_t *m = gc.model;
        assert_ptr_equal(bs_model_config(m)->cls, cfg.cls);
        assert_in_range(bs_model_n_inputs(m), 1, BS_MAX_INPUTS);
        for (int i = 0; i < bs_model_n_inputs(m); i++) {
            const struct bs_input_spec *s = bs_model_input(m, i);
            assert_int_equal((int)s->role, expected_role(s->name));
            assert_int_equal(bs_model_input_role(m, s->name), s->role);
            assert_int_equal(s->min_dims, s->role == BS_ROLE_MASK   ? 2
                                          : s->role == BS_ROLE_COND ? 0
                                                                    : s->n_dims);
        }
        for (int i = 0; i < gc.n_in; i++)
            assert_int_equal((int)bs_model_input_role(m, gc.in[i].name),
                             expected_role(gc.in[i].name));
        assert_string_equal(bs_model_output(m).name, "output");
        close_case(&gc);
        n_cases++;
    }
    closedir(d);
    bs_backend_free(&be);
    assert_true(n_cases >= 40);
    for (int i = 0; i < bs_class_count(); i++)
        if (seen[i] == 0)
            fail_msg("no golden case of class %s", bs_class_get(i)->name);
}

/* Roles through the model: a BasicTransformerBlock with every input. */
static void test_roles_btb(void **state)
{
    (void)state;
    struct bs_backend be;
    struct bs_err err = {0};
    struct golden_case gc;
    assert_int_equal(bs_backend_init(&be, "cpu", 1, &err), 0);
    if (open_case(&gc, "btb_ada_norm_zero_cross", &be, &err) != 0)
        fail_msg("%s", err.msg);
    static const char *const names[] = {"hidden_states",  "encoder_hidden_states",
                                        "attention_mask", "encoder_attention_mask",
                                        "timestep",       "class_labels"};
    assert_int_equal(bs_model_n_inputs(gc.model), 6);
    for (int i = 0; i < 6; i++)
        assert_string_equal(bs_model_input(gc.model, i)->name, names[i]);
    assert_int_equal(bs_model_input_role(gc.model, "hidden_states"), BS_ROLE_BATCHED);
    assert_int_equal(bs_model_input_role(gc.model, "encoder_hidden_states"), BS_ROLE_BATCHED);
    assert_int_equal(bs_model_input_role(gc.model, "attention_mask"), BS_ROLE_MASK);
    assert_int_equal(bs_model_input_role(gc.model, "encoder_attention_mask"), BS_ROLE_MASK);
    assert_int_equal(bs_model_input_role(gc.model, "timestep"), BS_ROLE_COND);
    assert_int_equal(bs_model_input_role(gc.model, "class_labels"), BS_ROLE_COND);
    assert_int_equal(bs_model_input_role(gc.model, "x"), BS_ROLE_BATCHED); /* not taken */
    close_case(&gc);
    bs_backend_free(&be);
}

/* Expected values computed with the engine before the classes became a
 * table (engine/model.c's bs_model_flops at commit 34a0d88), on the golden
 * cases' inputs. AdaLayerNorm and AdaGroupNorm count 2 per row there. */
static void test_flops_golden(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        double flops;
    } cases[] = {
        {"btb_geglu_cross", 1655808},
        {"btb_stack3_dit", 2555904},
        {"btb_only_cross_attention", 1468416},
        {"btb_self_only", 1413120},
        {"btb_gelu_cross", 1328128},
        {"btb_long_seq", 10361088},
        {"attnblock_4heads", 569600},
        {"attnblock_1head_rescale", 540672},
        {"ff_geglu", 110592},
        {"ff_gelu_approximate", 165888},
        {"gelu_tanh", 10752},
        {"geglu", 21504},
        {"approximate_gelu", 10752},
        {"ada_layer_norm_per_sample_t", 24},
        {"ada_group_norm_silu", 192},
    };
    struct bs_backend be;
    struct bs_err err = {0};
    assert_int_equal(bs_backend_init(&be, "cpu", 1, &err), 0);
    for (size_t i = 0; i < BS_ARRAY_LEN(cases); i++) {
        struct golden_case gc;
        if (open_case(&gc, cases[i].name, &be, &err) != 0)
            fail_msg("%s: %s", cases[i].name, err.msg);
        double got = bs_model_flops(gc.model, gc.in, gc.n_in);
        if (got != cases[i].flops)
            fail_msg("%s: %.17g FLOPs, expected %.17g", cases[i].name, got, cases[i].flops);
        close_case(&gc);
    }
    bs_backend_free(&be);
}

/* Built-in models at real shapes (expected values as above, on the inputs
 * `blockserve example` writes; only shapes count). */
static void test_flops_builtin(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        double flops;
    } cases[] = {
        {"sd15_down0_block", 37053726720.0},
        {"vae_mid_attention", 4294967296.0},
    };
    struct bs_backend be;
    struct bs_err err = {0};
    assert_int_equal(bs_backend_init(&be, "cpu", 1, &err), 0);
    for (size_t i = 0; i < BS_ARRAY_LEN(cases); i++) {
        const struct bs_builtin *b = bs_builtin_find(cases[i].name);
        bs_model_t *m = NULL;
        struct bs_named_tensor in[2];
        int n = 0;
        assert_non_null(b);
        if (bs_builtin_load(b, &be, &m, &err) != 0)
            fail_msg("%s: %s", cases[i].name, err.msg);
        const struct bs_model_config *c = bs_model_config(m);
        if (c->cls == &bs_class_attention_block) {
            int64_t ne[4] = {b->batch, c->attention_block.channels, b->height, b->width};
            in[n++] =
                (struct bs_named_tensor){"hidden_states", bs_tensor_make(BS_TYPE_F32, 4, ne, NULL)};
        } else {
            int64_t hs[3] = {b->batch, b->tokens, c->btb.dim};
            int64_t enc[3] = {b->batch, b->enc_tokens, c->btb.cross_attention_dim};
            in[n++] =
                (struct bs_named_tensor){"hidden_states", bs_tensor_make(BS_TYPE_F32, 3, hs, NULL)};
            in[n++] = (struct bs_named_tensor){"encoder_hidden_states",
                                               bs_tensor_make(BS_TYPE_F32, 3, enc, NULL)};
        }
        for (int k = 0; k < n; k++)
            assert_non_null(in[k].t.data = calloc(1, bs_tensor_nbytes(&in[k].t)));
        double got = bs_model_flops(m, in, n);
        if (got != cases[i].flops)
            fail_msg("%s: %.17g FLOPs, expected %.17g", cases[i].name, got, cases[i].flops);
        for (int k = 0; k < n; k++)
            free(in[k].t.data);
        bs_model_free(m);
    }
    bs_backend_free(&be);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        golden_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_entries_complete), cmocka_unit_test(test_option_rows),
        cmocka_unit_test(test_golden_configs),   cmocka_unit_test(test_roles_btb),
        cmocka_unit_test(test_flops_golden),     cmocka_unit_test(test_flops_builtin),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
