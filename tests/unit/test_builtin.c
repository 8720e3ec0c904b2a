/* Built-in example models: the written model directory loads (every key
 * expected, none missing), the in-memory generated model computes the same
 * output as the written one, and the output is finite. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "arena.h"
#include "builtin.h"
#include "safetensors.h"

static void run_file_and_memory(const char *name)
{
    char dir[] = "/tmp/bs_builtin_XXXXXX", path[256];
    struct bs_err err = {0};
    struct bs_backend be;
    bs_model_t *from_file = NULL, *in_memory = NULL;
    bs_st_file_t *inputs = NULL;
    struct bs_named_tensor in[8];
    struct bs_tensor out[2];
    struct bs_arena arena;
    const struct bs_builtin *b = bs_builtin_find(name);
    assert_non_null(b);
    assert_non_null(mkdtemp(dir));
    assert_int_equal(bs_backend_init(&be, "cpu", 0, &err), 0);
    bs_arena_init(&arena, &be);
    if (bs_builtin_write(b, dir, &err) != 0 || bs_model_load(&from_file, dir, &be, &err) != 0 ||
        bs_builtin_load(b, &be, &in_memory, &err) != 0)
        fail_msg("%s: %s", name, err.msg);
    snprintf(path, sizeof(path), "%s/inputs.safetensors", dir);
    assert_int_equal(bs_st_open(&inputs, path, &err), 0);
    int n = bs_st_count(inputs);
    for (int i = 0; i < n; i++) {
        in[i].name = bs_st_name(inputs, i);
        assert_int_equal(bs_st_get(inputs, in[i].name, &in[i].t), 0);
    }
    bs_model_t *models[2] = {from_file, in_memory};
    for (int k = 0; k < 2; k++) {
        assert_int_equal(bs_model_check(models[k], in, n, &out[k], &err), 0);
        out[k].data = malloc(bs_tensor_nbytes(&out[k]));
        if (bs_model_forward(models[k], &arena, in, n, &out[k], NULL, &err) != 0)
            fail_msg("%s: %s", name, err.msg);
    }
    assert_memory_equal(out[0].data, out[1].data, bs_tensor_nbytes(&out[0]));
    for (int64_t i = 0; i < bs_tensor_nelements(&out[0]); i++)
        assert_true(isfinite(((float *)out[0].data)[i]));
    free(out[0].data);
    free(out[1].data);
    bs_st_close(inputs);
    bs_model_free(from_file);
    bs_model_free(in_memory);
    bs_arena_free(&arena);
    bs_backend_free(&be);
    static const char *const files[] = {"config.json", "diffusion_pytorch_model.safetensors",
                                        "inputs.safetensors"};
    for (size_t i = 0; i < 3; i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
        remove(path);
    }
    remove(dir);
}

static void test_vae(void **state)
{
    (void)state;
    run_file_and_memory("vae_mid_attention");
}

static void test_sd15_down0(void **state)
{
    (void)state;
    run_file_and_memory("sd15_down0_block");
}

static void test_catalogue(void **state)
{
    (void)state;
    struct bs_err err;
    assert_true(bs_builtin_count() >= 5);
    assert_null(bs_builtin_find("nope"));
    for (int i = 0; i < bs_builtin_count(); i++) {
        struct bs_model_config c;
        const struct bs_builtin *b = bs_builtin_get(i);
        if (bs_config_parse(&c, b->config, strlen(b->config), b->name, &err) != 0)
            fail_msg("%s: %s", b->name, err.msg);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_catalogue),
        cmocka_unit_test(test_vae),
        cmocka_unit_test(test_sd15_down0),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
