/* Backend selection and the CPU fallback (runs on any machine): --device cpu
 * takes fp32 and bf16 (fp16 is refused); a missing or broken CUDA module fails --device cuda with a
 * clear message and lets --device auto fall back to the CPU, saying why; with
 * the real module (argv[1], when the build has one), --device cuda either
 * works (a GPU is there) or fails with "no usable CUDA GPU", never with a
 * load error, and auto then falls back. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"

static const char *module_path; /* the built libbs_cuda.so, or NULL */

static int init(struct bs_backend *be, const char *device, const char *dtype, struct bs_err *err)
{
    struct bs_backend_opts o = {.device = device, .n_threads = 1, .dtype = dtype};
    memset(err, 0, sizeof(*err));
    return bs_backend_init_opts(be, &o, err);
}

static void assert_msg_has(const struct bs_err *err, const char *needle)
{
    if (strstr(err->msg, needle) == NULL)
        fail_msg("message \"%s\" lacks \"%s\"", err->msg, needle);
}

static void test_cpu(void **state)
{
    struct bs_backend be;
    struct bs_err err;
    assert_int_equal(init(&be, "cpu", NULL, &err), 0);
    assert_string_equal(be.iface->name, "cpu");
    assert_int_equal(err.code, 0);
    assert_msg_has(&err, "cpu backend, fp32");
    assert_null(bs_backend_get_proc_address(&be, BS_PROC_ATTENTION_UNFUSED)); /* none */
    bs_backend_free(&be);
    assert_int_equal(init(&be, "cpu", "fp32", &err), 0);
    bs_backend_free(&be);
    assert_null(be.iface);
    bs_backend_free(&be); /* freeing twice is a no-op */
}

static void test_cpu_dtypes(void **state)
{
    struct bs_backend be;
    struct bs_err err;
    assert_int_equal(init(&be, "cpu", "bf16", &err), 0);
    assert_msg_has(&err, "cpu backend, bf16");
    assert_msg_has(&err, "bf16 models:");
    assert_int_equal(be.dtype, BS_TYPE_BF16);
    bs_backend_free(&be);
    assert_int_equal(init(&be, "cpu", "fp16", &err), BS_EUNSUPP);
    assert_msg_has(&err, "fp16 is for cuda");
    assert_null(be.iface);
    assert_int_equal(init(&be, "cpu", "int8", &err), BS_EINVAL);
    assert_msg_has(&err, "unknown dtype");
    assert_int_equal(init(&be, "tpu", NULL, &err), BS_EINVAL);
    assert_msg_has(&err, "unknown device");
}

static void test_module_missing(void **state)
{
    struct bs_backend be;
    struct bs_err err;
    setenv("BS_CUDA_MODULE", "/nonexistent/libbs_cuda.so", 1);
    assert_int_equal(init(&be, "cuda", NULL, &err), BS_EUNSUPP);
    assert_msg_has(&err, "--device cuda: CUDA backend module not available");
    assert_msg_has(&err, "/nonexistent/libbs_cuda.so");
    assert_null(be.iface);
    assert_null(bs_backend_module_get_proc_address("cuda", BS_PROC_TEST_BACKEND, &err));
    assert_int_equal(err.code, BS_EUNSUPP);
    assert_msg_has(&err, "module not available");
    assert_null(bs_backend_module_get_proc_address("cpu", BS_PROC_TEST_BACKEND, &err));
    assert_int_equal(err.code, BS_EINVAL);

    assert_int_equal(init(&be, "auto", NULL, &err), 0);
    assert_string_equal(be.iface->name, "cpu");
    assert_msg_has(&err, "auto: GPU not used");
    assert_msg_has(&err, "module not available");
    bs_backend_free(&be);
    assert_int_equal(init(&be, NULL, NULL, &err), 0); /* NULL device is auto */
    assert_string_equal(be.iface->name, "cpu");
    bs_backend_free(&be);

    /* auto with a GPU-only dtype cannot fall back silently; bf16 falls back
     * to the CPU's bf16 and says so */
    assert_int_equal(init(&be, "auto", "fp16", &err), BS_EUNSUPP);
    assert_msg_has(&err, "fp16 is for cuda");
    assert_msg_has(&err, "GPU not used");
    assert_int_equal(init(&be, "auto", "bf16", &err), 0);
    assert_msg_has(&err, "cpu backend, bf16");
    assert_msg_has(&err, "auto: GPU not used");
    bs_backend_free(&be);
    assert_int_equal(init(&be, "auto", "fp32", &err), 0);
    bs_backend_free(&be);
}

/* A library that is not a backend module (no entry point). */
static void test_module_without_entry(void **state)
{
    struct bs_backend be;
    struct bs_err err;
    setenv("BS_CUDA_MODULE", "libm.so.6", 1);
    assert_int_equal(init(&be, "cuda", NULL, &err), BS_EUNSUPP);
    assert_msg_has(&err, "has no " BS_CUDA_MODULE_ENTRY);
    assert_int_equal(init(&be, "auto", NULL, &err), 0);
    assert_string_equal(be.iface->name, "cpu");
    bs_backend_free(&be);
}

static void test_real_module(void **state)
{
    struct bs_backend be;
    struct bs_err err;
    if (module_path == NULL) {
        print_message("no CUDA module in this build: real-module checks not run\n");
        skip();
    }
    setenv("BS_CUDA_MODULE", module_path, 1);
    assert_int_equal(init(&be, "cuda", "int8", &err), BS_EINVAL);

    /* its extra entry points, by name, without a GPU */
    memset(&err, 0, sizeof(err));
    bs_proc_test_backend_fn test_backend;
    *(void **)&test_backend =
        bs_backend_module_get_proc_address("cuda", BS_PROC_TEST_BACKEND, &err);
    void *unfused = bs_backend_module_get_proc_address("cuda", BS_PROC_ATTENTION_UNFUSED, &err);
    assert_non_null(test_backend);
    assert_non_null(unfused);
    assert_null(bs_backend_module_get_proc_address("cuda", "no_such_entry", &err));
    assert_int_equal(err.code, BS_ENOTFOUND);
    assert_msg_has(&err, "has no entry point \"no_such_entry\"");
    assert_int_equal(test_backend(&be, "fp32", &err), 0);
    assert_string_equal(be.iface->name, "cuda");
    assert_ptr_equal(bs_backend_get_proc_address(&be, BS_PROC_ATTENTION_UNFUSED), unfused);
    bs_backend_free(&be);

    int rc = init(&be, "cuda", NULL, &err);
    if (rc == 0) { /* a working GPU: the note names it and the dtype */
        assert_string_equal(be.iface->name, "cuda");
        assert_msg_has(&err, "compute bf16");
        bs_backend_free(&be);
        assert_int_equal(init(&be, "auto", NULL, &err), 0);
        assert_string_equal(be.iface->name, "cuda");
        bs_backend_free(&be);
        return;
    }
    /* no GPU: the module loaded (no load error) and said so */
    assert_int_equal(rc, BS_EUNSUPP);
    assert_null(strstr(err.msg, "module not available"));
    assert_msg_has(&err, "--device cuda: no usable CUDA GPU");
    assert_int_equal(init(&be, "auto", NULL, &err), 0);
    assert_string_equal(be.iface->name, "cpu");
    assert_msg_has(&err, "no usable CUDA GPU");
    bs_backend_free(&be);
}

int main(int argc, char **argv)
{
    module_path = argc > 1 ? argv[1] : NULL;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpu),
        cmocka_unit_test(test_cpu_dtypes),
        cmocka_unit_test(test_module_missing),
        cmocka_unit_test(test_module_without_entry),
        cmocka_unit_test(test_real_module), /* last: a loaded module stays loaded */
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
