/* The CUDA backend's host side, without a GPU (argv[1]: libbs_cuda.so):
 * every op entry rejects bad arguments with the same code and message as its
 * CPU twin, before touching the device; and on a machine without a GPU, a
 * valid call reaches CUDA and fails cleanly with BS_EINTERNAL and CUDA's
 * message (the path by which a CUDA error fails a batch with INTERNAL).
 * Uses the module's test backend (a context bound to no device). With a GPU
 * present the second part is skipped (tests/gpu covers the real thing). */
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

static const char *module_path;

struct fixture {
    struct bs_backend cpu, cuda;
    bool gpu_present;
    float buf[4096]; /* host data standing in for both backends' tensors */
};

static int setup_dtype(void **state, const char *dtype)
{
    struct fixture *f = calloc(1, sizeof(*f));
    struct bs_err err = {0};
    if (f == NULL)
        return -1;
    setenv("BS_CUDA_MODULE", module_path, 1);
    struct bs_backend_opts o = {.device = "cuda", .dtype = dtype};
    if (bs_backend_init_opts(&f->cuda, &o, &err) == 0) {
        f->gpu_present = true;
        bs_backend_free(&f->cuda);
    }
    bs_proc_test_backend_fn fn;
    *(void **)&fn = bs_backend_module_get_proc_address("cuda", BS_PROC_TEST_BACKEND, &err);
    if (fn == NULL || fn(&f->cuda, dtype, &err) != 0 ||
        bs_backend_cpu_init(&f->cpu, 1, &err) != 0) {
        fprintf(stderr, "setup (%s): %s\n", dtype, err.msg);
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static int setup_fp32(void **state)
{
    return setup_dtype(state, "fp32");
}

static int setup_bf16(void **state)
{
    return setup_dtype(state, "bf16");
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    bs_backend_free(&f->cpu);
    bs_backend_free(&f->cuda);
    free(f);
    return 0;
}

static struct bs_tensor t2(struct fixture *f, int64_t r, int64_t c)
{
    return bs_tensor_make(BS_TYPE_F32, 2, (int64_t[]){r, c}, f->buf);
}

static struct bs_tensor t1(struct fixture *f, int64_t n)
{
    return bs_tensor_make(BS_TYPE_F32, 1, &n, f->buf);
}

/* Run call on both backends (be: the backend) and require the same failure. */
#define SAME_ERROR(call)                                                                           \
    do {                                                                                           \
        struct bs_err ec = {0}, eg = {0}, *err;                                                    \
        const struct bs_backend *be = &f->cpu;                                                     \
        err = &ec;                                                                                 \
        int rc_c = (call);                                                                         \
        be = &f->cuda;                                                                             \
        err = &eg;                                                                                 \
        int rc_g = (call);                                                                         \
        assert_true(rc_c < 0);                                                                     \
        assert_int_equal(rc_c, rc_g);                                                              \
        assert_string_equal(ec.msg, eg.msg);                                                       \
    } while (0)

static void test_checks_match_cpu(void **state)
{
    struct fixture *f = *state;
    struct bs_tensor x = t2(f, 4, 8), w = t2(f, 6, 8), y = t2(f, 4, 6), wbad = t2(f, 6, 7);
    struct bs_tensor b5 = t1(f, 5), v8 = t1(f, 8), v7 = t1(f, 7);
    SAME_ERROR(be->iface->linear(be->ctx, &y, &x, &wbad, NULL, 0.0f, err));
    SAME_ERROR(be->iface->linear(be->ctx, &y, &x, &w, &b5, 0.0f, err));
    SAME_ERROR(be->iface->linear(be->ctx, &y, &x, &w, NULL, 2.0f, err));

    struct bs_tensor x48 = t2(f, 4, 8), y46 = t2(f, 4, 6), s1 = t2(f, 1, 8);
    struct bs_norm_params np = {1e-5f, &v7, NULL, NULL, NULL, 1, 0};
    SAME_ERROR(be->iface->layer_norm(be->ctx, &y46, &x48, &np, err));
    SAME_ERROR(be->iface->layer_norm(be->ctx, &x48, &x48, &np, err));
    np = (struct bs_norm_params){1e-5f, NULL, NULL, &s1, NULL, 0, 0};
    SAME_ERROR(be->iface->layer_norm(be->ctx, &x48, &x48, &np, err));
    np.rows_per_sample = 2; /* 4 rows: 2 samples, scale has 1 */
    SAME_ERROR(be->iface->layer_norm(be->ctx, &x48, &x48, &np, err));

    struct bs_tensor g = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){2, 6, 5}, f->buf);
    struct bs_norm_params gp = {1e-5f, NULL, NULL, NULL, NULL, 0, 4};
    SAME_ERROR(be->iface->group_norm(be->ctx, &g, &g, &gp, err));
    gp = (struct bs_norm_params){1e-5f, &v8, NULL, NULL, NULL, 0, 3};
    SAME_ERROR(be->iface->group_norm(be->ctx, &g, &g, &gp, err));

    SAME_ERROR(be->iface->act(be->ctx, &y46, &x48, BS_ACT_GELU, err));
    SAME_ERROR(be->iface->act(be->ctx, &x48, &x48, (enum bs_act)99, err));
    struct bs_tensor h = t2(f, 4, 3);
    SAME_ERROR(be->iface->glu(be->ctx, &h, &x48, BS_ACT_GELU, err));
    struct bs_tensor x48i = x48;
    x48i.type = BS_TYPE_I64;
    SAME_ERROR(be->iface->glu(be->ctx, &h, &x48i, BS_ACT_GELU, err));

    SAME_ERROR(be->iface->add(be->ctx, &x48, &x48, &s1, 2, 1.0f, err));
    SAME_ERROR(be->iface->add(be->ctx, &x48, &x48, &s1, 0, 1.0f, err));
    SAME_ERROR(be->iface->add(be->ctx, &y46, &x48, NULL, 1, 1.0f, err));

    struct bs_tensor tr = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){2, 3, 5}, f->buf);
    struct bs_tensor trbad = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){2, 3, 5}, f->buf);
    SAME_ERROR(be->iface->transpose(be->ctx, &trbad, &tr, err));

    struct bs_tensor table = t2(f, 10, 8), rows = t2(f, 2, 8);
    const int64_t bad_idx[2] = {1, 10};
    SAME_ERROR(be->iface->get_rows(be->ctx, &rows, &table, bad_idx, 2, err));
    SAME_ERROR(be->iface->get_rows(be->ctx, &rows, &table, bad_idx, 3, err));

    /* attention: wrong column count, then a mask of the wrong shape */
    struct bs_tensor q = t2(f, 2 * 5, 16), k = t2(f, 2 * 7, 16), o = t2(f, 2 * 5, 16);
    struct bs_attn_params ap = {2, 5, 7, 2, 6, 0.5f, NULL};
    SAME_ERROR(be->iface->attention(be->ctx, &o, &q, &k, &k, &ap, err));
    struct bs_tensor mask = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){2, 3, 7}, f->buf);
    ap = (struct bs_attn_params){2, 5, 7, 2, 8, 0.5f, &mask};
    SAME_ERROR(be->iface->attention(be->ctx, &o, &q, &k, &k, &ap, err));
    ap.mask = NULL;
    ap.head_dim = -1;
    SAME_ERROR(be->iface->attention(be->ctx, &o, &q, &k, &k, &ap, err));
}

/* Valid calls reach CUDA, which has no device here: BS_EINTERNAL, and the
 * message names the op and CUDA's error. */
static void expect_internal(int rc, const struct bs_err *err, const char *op)
{
    assert_int_equal(rc, BS_EINTERNAL);
    if (strstr(err->msg, "cuda") == NULL || strstr(err->msg, op) == NULL)
        fail_msg("message \"%s\" should name cuda and %s", err->msg, op);
}

static void test_valid_calls_fail_cleanly(void **state)
{
    struct fixture *f = *state;
    if (f->gpu_present) {
        print_message("a GPU is present: tests/gpu covers valid calls\n");
        skip();
    }
    const struct bs_backend_i *g = f->cuda.iface;
    void *c = f->cuda.ctx;
    struct bs_err err = {0};
    struct bs_tensor x = t2(f, 4, 8), w = t2(f, 6, 8), y = t2(f, 4, 6), b = t1(f, 6);
    expect_internal(g->linear(c, &y, &x, &w, &b, 0.0f, &err), &err, "linear");
    expect_internal(g->linear(c, &y, &x, &w, NULL, 1.0f, &err), &err, "linear");
    struct bs_norm_params np = {1e-5f, NULL, NULL, NULL, NULL, 1, 0};
    expect_internal(g->layer_norm(c, &x, &x, &np, &err), &err, "layer_norm");
    struct bs_tensor gn = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){2, 4, 5}, f->buf);
    struct bs_norm_params gp = {1e-5f, NULL, NULL, NULL, NULL, 0, 2};
    expect_internal(g->group_norm(c, &gn, &gn, &gp, &err), &err, "group_norm");
    expect_internal(g->act(c, &x, &x, BS_ACT_MISH, &err), &err, "act");
    struct bs_tensor h = t2(f, 4, 4);
    expect_internal(g->glu(c, &h, &x, BS_ACT_GELU, &err), &err, "glu");
    expect_internal(g->add(c, &x, &x, NULL, 1, 1.0f, &err), &err, "add");
    struct bs_tensor tr = t2(f, 8, 4);
    expect_internal(g->transpose(c, &tr, &x, &err), &err, "transpose");
    const int64_t idx[2] = {0, 3};
    struct bs_tensor rows = t2(f, 2, 8);
    expect_internal(g->get_rows(c, &rows, &x, idx, 2, &err), &err, "get_rows");
    struct bs_tensor q = t2(f, 2 * 5, 128), k = t2(f, 2 * 7, 128), o = t2(f, 2 * 5, 128);
    struct bs_attn_params ap = {2, 5, 7, 2, 64, 0.125f, NULL};
    expect_internal(g->attention(c, &o, &q, &k, &k, &ap, &err), &err, "attention");
    struct bs_backend_memory mem;
    expect_internal(g->memory_info(c, &mem, &err), &err, "memory_info");
    /* empty work launches nothing and succeeds, as on the CPU */
    struct bs_tensor e0 = t2(f, 0, 8);
    assert_int_equal(g->act(c, &e0, &e0, BS_ACT_GELU, &err), 0);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: test_cuda_host LIBBS_CUDA_SO\n");
        return 2;
    }
    module_path = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_checks_match_cpu, setup_fp32, teardown),
        cmocka_unit_test_setup_teardown(test_checks_match_cpu, setup_bf16, teardown),
        cmocka_unit_test_setup_teardown(test_valid_calls_fail_cleanly, setup_fp32, teardown),
        cmocka_unit_test_setup_teardown(test_valid_calls_fail_cleanly, setup_bf16, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
