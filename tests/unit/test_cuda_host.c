/* The CUDA backend's host side, without a GPU (argv[1]: libbs_cuda.so):
 * every op entry rejects bad arguments with the same code and message as its
 * CPU twin, before touching the device; and on a machine without a GPU, a
 * valid call reaches CUDA and fails cleanly with BS_EINTERNAL and CUDA's
 * message (the path by which a CUDA error fails a batch with INTERNAL).
 * Uses the module's test backend (a context bound to no device). With a GPU
 * present the second part is skipped (tests/gpu covers the real thing).
 *
 * Through the module's test hooks (BS_PROC_TEST_HOOKS), the host-side state
 * that needs no device: each thread gets its own state (stream, cuBLAS
 * handle, staging, overflow flag), the same on every call, one per thread
 * and backend; weights_ready on a buffer registered before replaces its
 * copy instead of keeping two (the second leaked); a set overflow flag fails
 * the copy with "fp16 overflow ... use --dtype bf16" and is cleared. And the
 * attention entry takes batch x heads past 65,535 (the grid's y limit it
 * used to refuse), refusing only more than 2^31 - 1 blocks, with a message
 * about query tiles.
 *
 * linear_act (the fused activation) refuses what linear refuses and a
 * gated w or y of the wrong shape; linear's plan cache fills, hits and
 * pushes out its least recently used plan (lt_cache_probe); valid linear
 * calls with every (x, y) activation dtype pair, and linear_act with each
 * act, gated or not, reach CUDA.
 *
 * Ragged batches (bs_attn_params.q_off): the entry refuses bad offsets,
 * rows, mask parts and stray ragged fields with BS_EINVAL and a message
 * naming them, the unfused baseline refuses ragged batches with
 * BS_EUNSUPP, and valid ones (a sample without keys, both mask forms) pass
 * the checks and reach CUDA (BS_EINTERNAL without a GPU).
 *
 * copy_in / copy_out's double-buffered staging (kernels/cuda/xfer.h),
 * replayed against a model of the stream for sizes around the chunk
 * boundary: every byte arrives, no staging buffer is touched by the host
 * while a DMA may use it, and the host's memcpy of one chunk overlaps the
 * DMA of the next. And the GPU timer (BS_PROC_GPU_TIMER) refuses cleanly
 * where there is nothing to time: a stop without a start, a test backend,
 * the CPU backend (no entry).
 *
 * Launch graphs (graph_*, ABI 7) on the test backend, which keeps the
 * capture's bookkeeping without a device: misuse fails with BS_EINVAL and a
 * message (end without begin, begin twice, graph_rows outside a capture, a
 * NULL graph or idx); while a thread captures, what would allocate, free,
 * upload or wait fails with BS_EUNSUPP ("cannot run while a graph is being
 * captured": get_rows, copy_in/out, weights_ready, scratch growth, a ragged
 * batch's upload; buf_alloc gives NULL, buf_free waits for graph_end) and
 * the capture goes on; graph_end always ends it (keep or not, failed or
 * not); a capture is the calling thread's only; what needs the device
 * (keeping a graph, graph_rows' gather) fails with BS_EINTERNAL, as valid
 * calls do there; graph_epoch moves when a weights copy is registered,
 * replaced or freed, and at every buf_free. */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"
#include "xfer.h"

static const char *module_path;

struct fixture {
    struct bs_backend cpu, cuda;
    bool gpu_present;
    const struct bs_backend_test_hooks *hooks;
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
    bs_proc_test_hooks_fn hooks;
    *(void **)&hooks = bs_backend_get_proc_address(&f->cuda, BS_PROC_TEST_HOOKS);
    if (hooks == NULL) {
        fprintf(stderr, "setup (%s): no %s entry\n", dtype, BS_PROC_TEST_HOOKS);
        bs_backend_free(&f->cpu);
        bs_backend_free(&f->cuda);
        free(f);
        return -1;
    }
    f->hooks = hooks();
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

static int setup_fp16(void **state)
{
    return setup_dtype(state, "fp16");
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
    struct bs_attn_params ap = {.batch = 2,
                                .lq = 5,
                                .lk = 7,
                                .heads = 2,
                                .head_dim = 6,
                                .scale = 0.5f,
                                .compute = BS_TYPE_F32};
    SAME_ERROR(be->iface->attention(be->ctx, &o, &q, &k, &k, &ap, err));
    struct bs_tensor mask = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){2, 3, 7}, f->buf);
    ap = (struct bs_attn_params){.batch = 2,
                                 .lq = 5,
                                 .lk = 7,
                                 .heads = 2,
                                 .head_dim = 8,
                                 .scale = 0.5f,
                                 .mask = &mask,
                                 .compute = BS_TYPE_F32};
    SAME_ERROR(be->iface->attention(be->ctx, &o, &q, &k, &k, &ap, err));
    ap.mask = NULL;
    ap.head_dim = -1;
    SAME_ERROR(be->iface->attention(be->ctx, &o, &q, &k, &k, &ap, err));

    /* narrow activations: dtypes the contract does not allow (ABI 6) */
    ap.head_dim = 8;
    struct bs_tensor qb = bs_tensor_make(BS_TYPE_BF16, 2, (int64_t[]){2 * 5, 16}, f->buf);
    struct bs_tensor kh = bs_tensor_make(BS_TYPE_F16, 2, (int64_t[]){2 * 7, 16}, f->buf);
    SAME_ERROR(be->iface->attention(be->ctx, &o, &qb, &kh, &kh, &ap, err)); /* q, k, v differ */
    struct bs_tensor tr16 = bs_tensor_make(BS_TYPE_F16, 3, (int64_t[]){2, 3, 5}, f->buf);
    struct bs_tensor trb = bs_tensor_make(BS_TYPE_BF16, 3, (int64_t[]){2, 5, 3}, f->buf);
    SAME_ERROR(be->iface->transpose(be->ctx, &trb, &tr16, err));        /* x and y differ */
    SAME_ERROR(be->iface->act(be->ctx, &x48, &x48i, BS_ACT_GELU, err)); /* x I64 */
}

/* Valid calls reach CUDA, which has no device here: BS_EINTERNAL, and the
 * message names the op and CUDA's error. */
static void expect_internal(int rc, const struct bs_err *err, const char *op)
{
    assert_int_equal(rc, BS_EINTERNAL);
    if (strstr(err->msg, "cuda") == NULL || strstr(err->msg, op) == NULL)
        fail_msg("message \"%s\" should name cuda and %s", err->msg, op);
}

/* linear_act (the CPU backend has none: the engine runs linear then act
 * there) refuses what linear refuses, and a gated w or y of the wrong shape. */
static void test_linear_act_checks(void **state)
{
    struct fixture *f = *state;
    const struct bs_backend_i *g = f->cuda.iface;
    void *c = f->cuda.ctx;
    struct bs_err ea = {0};
    assert_null(f->cpu.iface->linear_act);
    assert_non_null(g->linear_act);
    struct bs_tensor x = t2(f, 4, 8), w = t2(f, 6, 8), w7 = t2(f, 7, 8), y = t2(f, 4, 6);
    struct bs_tensor y3 = t2(f, 4, 3), y4 = t2(f, 4, 4), wbad = t2(f, 6, 7), b5 = t1(f, 5);
    assert_int_equal(g->linear_act(c, &y, &x, &wbad, NULL, BS_ACT_GELU, false, &ea), BS_EINVAL);
    assert_non_null(strstr(ea.msg, "shapes do not match"));
    assert_int_equal(g->linear_act(c, &y, &x, &w, &b5, BS_ACT_GELU, false, &ea), BS_EINVAL);
    assert_int_equal(g->linear_act(c, &y, &x, &w, NULL, (enum bs_act)99, false, &ea), BS_EINVAL);
    assert_non_null(strstr(ea.msg, "unknown activation"));
    assert_int_equal(g->linear_act(c, &y3, &x, &w7, NULL, BS_ACT_GELU, true, &ea), BS_EINVAL);
    assert_non_null(strstr(ea.msg, "[2N, K]"));
    assert_int_equal(g->linear_act(c, &y4, &x, &w, NULL, BS_ACT_GELU, true, &ea), BS_EINVAL);
    assert_non_null(strstr(ea.msg, "3 columns"));
    struct bs_tensor b6 = t1(f, 6), b3 = t1(f, 3);
    assert_int_equal(g->linear_act(c, &y3, &x, &w, &b3, BS_ACT_GELU, true, &ea), BS_EINVAL);
    assert_non_null(strstr(ea.msg, "bias"));
    /* a dtype that is no activation's */
    struct bs_tensor xi = x;
    xi.type = BS_TYPE_I64;
    assert_int_equal(g->linear_act(c, &y3, &xi, &w, &b6, BS_ACT_GELU, true, &ea), BS_EINVAL);
    SAME_ERROR(be->iface->linear(be->ctx, &y, &xi, &w, NULL, 0.0f, err));
}

/* linear's plan cache (the calling thread's): 64 keys fill it without an
 * eviction, a key seen before is a hit in its slot, the 65th key pushes out
 * the least recently used (not one just used), which then misses. */
static void test_lt_cache(void **state)
{
    struct fixture *f = *state;
    struct bs_err err = {0};
    int slot, slot0 = -1, slot1 = -1;
    bool hit, evicted;
    int64_t key[8] = {0, 320, 1280, 1280, 1280, 0x0201, 0x104, 0};
    for (int i = 0; i < 64; i++) {
        key[0] = 4096 + i;
        assert_int_equal(f->hooks->lt_cache_probe(&f->cuda, key, &slot, &hit, &evicted, &err), 0);
        assert_false(hit);
        assert_false(evicted);
        if (i == 0)
            slot0 = slot;
        if (i == 1)
            slot1 = slot;
    }
    key[0] = 4096;
    assert_int_equal(f->hooks->lt_cache_probe(&f->cuda, key, &slot, &hit, &evicted, &err), 0);
    assert_true(hit);
    assert_int_equal(slot, slot0);
    key[7] = 1; /* another alignment: another plan, in the LRU slot (key 4097's) */
    assert_int_equal(f->hooks->lt_cache_probe(&f->cuda, key, &slot, &hit, &evicted, &err), 0);
    assert_false(hit);
    assert_true(evicted);
    assert_int_equal(slot, slot1);
    key[7] = 0;
    assert_int_equal(f->hooks->lt_cache_probe(&f->cuda, key, &slot, &hit, &evicted, &err), 0);
    assert_true(hit); /* 4096 survived: it was used after 4097 */
    key[0] = 4097;
    assert_int_equal(f->hooks->lt_cache_probe(&f->cuda, key, &slot, &hit, &evicted, &err), 0);
    assert_false(hit);
    assert_true(evicted);
    assert_int_not_equal(slot, slot0);
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
    /* narrow activations, each (x, y) pair; and linear_act, fused or not */
    static const enum bs_dtype dts[3] = {BS_TYPE_F32, BS_TYPE_BF16, BS_TYPE_F16};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            struct bs_tensor xn = bs_tensor_make(dts[i], 2, (int64_t[]){4, 8}, f->buf);
            struct bs_tensor yn = bs_tensor_make(dts[j], 2, (int64_t[]){4, 6}, f->buf);
            expect_internal(g->linear(c, &yn, &xn, &w, &b, 1.0f, &err), &err, "linear");
        }
    struct bs_tensor y3 = t2(f, 4, 3);
    for (int a = 0; a < BS_ACT_COUNT; a++) {
        expect_internal(g->linear_act(c, &y, &x, &w, &b, (enum bs_act)a, false, &err), &err,
                        "linear");
        expect_internal(g->linear_act(c, &y3, &x, &w, &b, (enum bs_act)a, true, &err), &err,
                        "linear");
    }
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
    struct bs_attn_params ap = {.batch = 2,
                                .lq = 5,
                                .lk = 7,
                                .heads = 2,
                                .head_dim = 64,
                                .scale = 0.125f,
                                .compute = BS_TYPE_F32};
    expect_internal(g->attention(c, &o, &q, &k, &k, &ap, &err), &err, "attention");
    struct bs_backend_memory mem;
    expect_internal(g->memory_info(c, &mem, &err), &err, "memory_info");
    /* narrow activations (ABI 6) pass the checks and reach CUDA: act and
     * add with x and y of different dtypes, transpose and attention of
     * 16-bit tensors (q, k, v BF16 with an F16 o: attn_mma's conversion of
     * o in a bf16 backend) */
    struct bs_tensor xb = bs_tensor_make(BS_TYPE_BF16, 2, (int64_t[]){4, 8}, f->buf);
    struct bs_tensor yh = bs_tensor_make(BS_TYPE_F16, 2, (int64_t[]){4, 8}, f->buf + 64);
    expect_internal(g->act(c, &yh, &xb, BS_ACT_NONE, &err), &err, "act");
    expect_internal(g->add(c, &x, &yh, NULL, 1, 1.0f, &err), &err, "add");
    struct bs_tensor trh = bs_tensor_make(BS_TYPE_F16, 2, (int64_t[]){8, 4}, f->buf + 128);
    expect_internal(g->transpose(c, &trh, &yh, &err), &err, "transpose");
    struct bs_tensor qb = bs_tensor_make(BS_TYPE_BF16, 2, (int64_t[]){2 * 5, 128}, f->buf);
    struct bs_tensor kb = bs_tensor_make(BS_TYPE_BF16, 2, (int64_t[]){2 * 7, 128}, f->buf);
    struct bs_tensor oh = bs_tensor_make(BS_TYPE_F16, 2, (int64_t[]){2 * 5, 128}, f->buf);
    expect_internal(g->attention(c, &oh, &qb, &kb, &kb, &ap, &err), &err, "attention");
    /* empty work launches nothing and succeeds, as on the CPU */
    struct bs_tensor e0 = t2(f, 0, 8);
    assert_int_equal(g->act(c, &e0, &e0, BS_ACT_GELU, &err), 0);
}

/* ---- per-thread state (defect: one stream for all threads) ------------- */

struct thread_arg {
    struct fixture *f;
    const void *state, *again;
    int rc;
};

static void *thread_main(void *arg)
{
    struct thread_arg *a = arg;
    struct bs_err err = {0};
    a->state = a->f->hooks->thread_state(&a->f->cuda, &err);
    a->again = a->f->hooks->thread_state(&a->f->cuda, &err);
    a->rc = err.code;
    return NULL;
}

/* Each thread its own state, the same on each of its calls; one per thread
 * and backend; counted by the backend (and freed with it: the sanitizer
 * builds do not build the module, so the count stands in for the leak
 * check). */
static void test_thread_states(void **state)
{
    struct fixture *f = *state;
    struct bs_err err = {0};
    enum { N = 4 };
    const void *mine = f->hooks->thread_state(&f->cuda, &err);
    assert_non_null(mine);
    assert_ptr_equal(mine, f->hooks->thread_state(&f->cuda, &err));
    struct thread_arg args[N];
    pthread_t tid[N];
    for (int i = 0; i < N; i++) {
        args[i] = (struct thread_arg){.f = f};
        assert_int_equal(pthread_create(&tid[i], NULL, thread_main, &args[i]), 0);
    }
    for (int i = 0; i < N; i++)
        pthread_join(tid[i], NULL);
    for (int i = 0; i < N; i++) {
        assert_int_equal(args[i].rc, 0);
        assert_non_null(args[i].state);
        assert_ptr_equal(args[i].state, args[i].again);
        assert_ptr_not_equal(args[i].state, mine);
        for (int j = 0; j < i; j++)
            assert_ptr_not_equal(args[i].state, args[j].state);
    }
    int threads = 0, shadows = 0;
    assert_int_equal(f->hooks->counts(&f->cuda, &threads, &shadows), 0);
    assert_int_equal(threads, N + 1);
    /* another backend: another state for this thread */
    struct bs_backend other;
    bs_proc_test_backend_fn fn;
    *(void **)&fn = bs_backend_get_proc_address(&f->cuda, BS_PROC_TEST_BACKEND);
    assert_int_equal(fn(&other, "bf16", &err), 0);
    const void *theirs = f->hooks->thread_state(&other, &err);
    assert_non_null(theirs);
    assert_ptr_not_equal(theirs, mine);
    assert_int_equal(f->hooks->counts(&other, &threads, &shadows), 0);
    assert_int_equal(threads, 1);
    bs_backend_free(&other);
    print_message("%d threads, %d states, each its own\n", N + 1, N + 1);
}

/* weights_ready twice on one buffer: the second copy replaces the first
 * (handed back to be freed), one entry stays, and buf_free removes it. */
static void test_weights_ready_twice(void **state)
{
    struct fixture *f = *state;
    struct bs_err err = {0};
    static char weights[1024], copy_a[512], copy_b[512];
    void *replaced = (void *)1;
    int threads = 0, shadows = -1;
    assert_int_equal(
        f->hooks->shadow_register(&f->cuda, weights, sizeof(weights), copy_a, &replaced, &err), 0);
    assert_null(replaced);
    assert_int_equal(
        f->hooks->shadow_register(&f->cuda, weights, sizeof(weights), copy_b, &replaced, &err), 0);
    assert_ptr_equal(replaced, copy_a); /* weights_ready frees it */
    assert_int_equal(f->hooks->counts(&f->cuda, &threads, &shadows), 0);
    assert_int_equal(shadows, 1);
    f->cuda.iface->buf_free(f->cuda.ctx, weights); /* a test backend frees nothing on a device */
    assert_int_equal(f->hooks->counts(&f->cuda, &threads, &shadows), 0);
    assert_int_equal(shadows, 0);
}

/* A set overflow flag fails the copy that synchronises (copy_out), naming
 * the dtype and what to use instead, and is cleared for the next batch. */
static void test_overflow_fails_copy(void **state)
{
    struct fixture *f = *state;
    struct bs_err err = {0};
    assert_int_equal(f->hooks->overflow_take(&f->cuda, 0, &err), 0);
    assert_int_equal(f->hooks->overflow_take(&f->cuda, 2, &err), BS_ERANGE);
    print_message("%s\n", err.msg);
    if (strstr(err.msg, "fp16 overflow") == NULL || strstr(err.msg, "attention") == NULL ||
        strstr(err.msg, "use --dtype bf16") == NULL)
        fail_msg("message \"%s\"", err.msg);
    err = (struct bs_err){0};
    assert_int_equal(f->hooks->overflow_take(&f->cuda, 0, &err), 0); /* cleared */
}

/* Batch x heads 65,536 passes the entry's checks (no device: INTERNAL, not
 * the old RANGE "exceeds the grid (65535)"); 2^31 query tiles are refused
 * with a message that says so. */
static void test_attention_grid_limits(void **state)
{
    struct fixture *f = *state;
    if (f->gpu_present) {
        print_message("a GPU is present: tests/gpu covers valid calls\n");
        skip();
    }
    struct bs_err err = {0};
    struct bs_tensor q = t2(f, 65536, 1), o = t2(f, 65536, 1);
    struct bs_attn_params ap = {.batch = 65536,
                                .lq = 1,
                                .lk = 1,
                                .heads = 1,
                                .head_dim = 1,
                                .scale = 1.0f,
                                .compute = BS_TYPE_F32};
    expect_internal(f->cuda.iface->attention(f->cuda.ctx, &o, &q, &q, &q, &ap, &err), &err,
                    "attention");
    q = t2(f, 2, 32768), o = t2(f, 2, 32768); /* B 2 x heads 32768 */
    ap = (struct bs_attn_params){.batch = 2,
                                 .lq = 1,
                                 .lk = 1,
                                 .heads = 32768,
                                 .head_dim = 1,
                                 .scale = 1.0f,
                                 .compute = BS_TYPE_F32};
    expect_internal(f->cuda.iface->attention(f->cuda.ctx, &o, &q, &q, &q, &ap, &err), &err,
                    "attention");
    int64_t lq = (int64_t)16 << 31; /* 2^31 tiles of 16 queries */
    q = t2(f, lq, 1), o = t2(f, lq, 1);
    ap = (struct bs_attn_params){.batch = 1,
                                 .lq = lq,
                                 .lk = 1,
                                 .heads = 1,
                                 .head_dim = 1,
                                 .scale = 1.0f,
                                 .compute = BS_TYPE_F32};
    struct bs_tensor k = t2(f, 1, 1);
    assert_int_equal(f->cuda.iface->attention(f->cuda.ctx, &o, &q, &k, &k, &ap, &err), BS_ERANGE);
    print_message("%s\n", err.msg);
    if (strstr(err.msg, "query tiles") == NULL)
        fail_msg("message \"%s\" should name the query tiles", err.msg);
}

/* ---- ragged batches ------------------------------------------------------ */

/* The call must fail with rc and a message containing want. */
static void expect_msg(int got, const struct bs_err *err, int rc, const char *want)
{
    if (got != rc || strstr(err->msg, want) == NULL)
        fail_msg("rc %d \"%s\", want %d and \"%s\"", got, err->msg, rc, want);
    print_message("%s\n", err->msg);
}

/* A ragged batch of 3 samples: 2, 1 and 3 queries (lq 3), 4, 0 and 2 keys
 * (lk 4), 2 heads x 4 columns; a mask of 14 elements, a row per query:
 * parts of 2 x 4, 1 x 0 and 3 x 2 at m_off 0, 8 and 8. */
struct ragged {
    int64_t q_off[4], k_off[4], m_off[3];
    struct bs_tensor q, k, o, mask;
    struct bs_attn_params p;
};

static void ragged_init(struct fixture *f, struct ragged *r)
{
    *r = (struct ragged){.q_off = {0, 2, 3, 6}, .k_off = {0, 4, 4, 6}, .m_off = {0, 8, 8}};
    r->q = t2(f, 6, 8);
    r->k = t2(f, 6, 8);
    r->o = t2(f, 6, 8);
    r->mask = t1(f, 14);
    r->p = (struct bs_attn_params){.batch = 3,
                                   .lq = 3,
                                   .lk = 4,
                                   .heads = 2,
                                   .head_dim = 4,
                                   .scale = 0.5f,
                                   .mask = &r->mask,
                                   .compute = BS_TYPE_F32,
                                   .q_off = r->q_off,
                                   .k_off = r->k_off,
                                   .m_off = r->m_off,
                                   .mask_per_query = true};
}

static int ragged_call(struct fixture *f, struct ragged *r, struct bs_err *err)
{
    *err = (struct bs_err){0};
    return f->cuda.iface->attention(f->cuda.ctx, &r->o, &r->q, &r->k, &r->k, &r->p, err);
}

/* The CPU backend refuses the same call with the same message (both ask
 * engine/opcheck.c). */
static void expect_cpu_same(struct fixture *f, struct ragged *r, const struct bs_err *cuda)
{
    struct bs_err err = {0};
    int rc = f->cpu.iface->attention(f->cpu.ctx, &r->o, &r->q, &r->k, &r->k, &r->p, &err);
    if (rc != cuda->code || strcmp(err.msg, cuda->msg) != 0)
        fail_msg("cpu: rc %d \"%s\"; cuda: rc %d \"%s\"", rc, err.msg, cuda->code, cuda->msg);
}

/* Each bad argument of a ragged batch, one at a time. */
static void test_attention_ragged_checks(void **state)
{
    struct fixture *f = *state;
    struct bs_err err;
    struct ragged r;
#define BAD(change, want)                                                                          \
    do {                                                                                           \
        ragged_init(f, &r);                                                                        \
        change;                                                                                    \
        expect_msg(ragged_call(f, &r, &err), &err, BS_EINVAL, want);                               \
        expect_cpu_same(f, &r, &err);                                                              \
    } while (0)
    BAD(r.p.k_off = NULL, "a ragged batch needs k_off");
    BAD(r.q_off[0] = 1, "q_off[0] must be 0 (got 1)");
    BAD(r.k_off[0] = -1, "k_off[0] must be 0 (got -1)");
    BAD(r.k_off[2] = 3, "k_off decreases (k_off[1] = 4, k_off[2] = 3)");
    BAD(r.q_off[1] = 0,
        "sample 0 has 0 queries (q_off[0] = 0, q_off[1] = 0); allowed: 1 to lq = 3");
    BAD(r.p.lq = 2, "sample 2 has 3 queries (q_off[2] = 3, q_off[3] = 6); allowed: 1 to lq = 2");
    BAD(r.p.lk = 3, "sample 0 has 4 keys (k_off[0] = 0, k_off[1] = 4); allowed: 0 to lk = 3");
    BAD(r.q = t2(f, 7, 8), "q must have q_off[3] = 6 rows of 8 (got 7 of 8)");
    BAD(r.o = t2(f, 5, 8), "o must have q_off[3] = 6 rows of 8 (got 5 of 8)");
    BAD(r.k = t2(f, 6, 6), "k must have k_off[3] = 6 rows of 8 (got 6 of 6)");
    BAD((r.k_off[3] = 7, r.k_off[2] = 5), "k must have k_off[3] = 7 rows of 8 (got 6 of 8)");
    BAD(r.p.m_off = NULL, "a ragged batch with a mask needs m_off");
    BAD(r.m_off[2] = 9,
        "the mask of sample 2 (6 values from m_off[2] = 9) lies outside the mask's 14");
    BAD(r.m_off[0] = -1, "the mask of sample 0 (8 values from m_off[0] = -1) lies outside");
    BAD(r.mask.type = BS_TYPE_BF16, "the mask of a ragged batch must be contiguous F32 (got BF16");
    struct bs_tensor wide = t2(f, 7, 3);
    BAD(r.mask = bs_tensor_view_cols(&wide, 0, 2),
        "the mask of a ragged batch must be contiguous F32 (got F32 [7, 2], not contiguous)");
    BAD((r.p.q_off = NULL, r.p.k_off = NULL, r.p.m_off = NULL),
        "k_off, m_off and mask_per_query describe a ragged batch, but q_off is not set");
    BAD((r.p.q_off = NULL, r.p.mask = NULL, r.p.m_off = NULL, r.p.mask_per_query = false),
        "k_off, m_off and mask_per_query describe a ragged batch, but q_off is not set");
#undef BAD
    /* the unfused baseline takes no ragged batch */
    bs_proc_attention_unfused_fn unfused;
    *(void **)&unfused = bs_backend_get_proc_address(&f->cuda, BS_PROC_ATTENTION_UNFUSED);
    assert_non_null(unfused);
    ragged_init(f, &r);
    err = (struct bs_err){0};
    expect_msg(unfused(&f->cuda, &r.o, &r.q, &r.k, &r.k, &r.p, &err), &err, BS_EUNSUPP,
               "attention (unfused): ragged batches (q_off) are not supported");
}

/* Valid ragged batches pass the checks and reach CUDA: without a GPU,
 * BS_EINTERNAL naming cuda and attention (also with no mask, and with a
 * batch of none). */
static void test_attention_ragged_valid(void **state)
{
    struct fixture *f = *state;
    if (f->gpu_present) {
        print_message("a GPU is present: tests/gpu covers valid calls\n");
        skip();
    }
    struct bs_err err;
    struct ragged r;
    ragged_init(f, &r);
    expect_internal(ragged_call(f, &r, &err), &err, "attention");
    print_message("%s\n", err.msg);
    ragged_init(f, &r); /* one row per sample: 4, 0 and 2 elements */
    r.p.mask_per_query = false;
    r.m_off[0] = 8, r.m_off[1] = 14, r.m_off[2] = 12;
    expect_internal(ragged_call(f, &r, &err), &err, "attention");
    ragged_init(f, &r);
    r.p.mask = NULL, r.p.m_off = NULL, r.p.mask_per_query = false;
    expect_internal(ragged_call(f, &r, &err), &err, "attention");
    ragged_init(f, &r); /* no samples: nothing to launch */
    r.p.batch = 0, r.p.mask = NULL, r.p.m_off = NULL, r.p.mask_per_query = false;
    r.q = r.k = r.o = t2(f, 0, 8);
    assert_int_equal(ragged_call(f, &r, &err), 0);
}

/* ---- launch graphs (graph_*) -------------------------------------------- */

struct other_thread {
    struct fixture *f;
    int end_rc, rows_rc;
    struct bs_err end_err;
};

/* Another thread: no capture of its own (graph_end fails), and its
 * get_rows is not refused as a capture's would be. */
static void *other_thread_main(void *arg)
{
    struct other_thread *a = arg;
    struct bs_err err = {0};
    const struct bs_backend_i *g = a->f->cuda.iface;
    struct bs_backend_graph *gr = (void *)1;
    a->end_rc = g->graph_end(a->f->cuda.ctx, true, &gr, &a->end_err);
    struct bs_tensor table = t2(a->f, 10, 8), rows = t2(a->f, 2, 8);
    const int64_t idx[2] = {1, 2};
    a->rows_rc = g->get_rows(a->f->cuda.ctx, &rows, &table, idx, 2, &err);
    return NULL;
}

/* Misuse of the graph ops: BS_EINVAL with a message, nothing changed. */
static void test_graph_misuse(void **state)
{
    struct fixture *f = *state;
    const struct bs_backend_i *g = f->cuda.iface;
    void *c = f->cuda.ctx;
    struct bs_err err = {0};
    struct bs_backend_graph *gr = (void *)1;
    assert_non_null(g->graph_begin);
    assert_non_null(g->graph_end);
    assert_non_null(g->graph_rows);
    assert_non_null(g->graph_launch);
    assert_non_null(g->graph_wait);
    assert_non_null(g->graph_free);
    assert_non_null(g->graph_epoch);
    assert_null(f->cpu.iface->graph_begin); /* the CPU has none: the engine emulates there */
    expect_msg(g->graph_end(c, true, &gr, &err), &err, BS_EINVAL, "no graph_begin");
    assert_null(gr);
    struct bs_tensor table = t2(f, 10, 8), rows = t2(f, 2, 8);
    int64_t *idx = (int64_t *)1;
    expect_msg(g->graph_rows(c, &rows, &table, 2, &idx, &err), &err, BS_EINVAL,
               "outside a capture");
    assert_null(idx);
    expect_msg(g->graph_rows(c, &rows, &table, 2, NULL, &err), &err, BS_EINVAL, "idx is NULL");
    expect_msg(g->graph_launch(c, NULL, &err), &err, BS_EINVAL, "NULL graph");
    expect_msg(g->graph_wait(c, NULL, &err), &err, BS_EINVAL, "NULL graph");
    g->graph_free(c, NULL); /* nothing */

    assert_int_equal(g->graph_begin(c, &err), 0);
    expect_msg(g->graph_begin(c, &err), &err, BS_EINVAL, "already capturing");
    /* graph_rows' own checks, in a capture */
    expect_msg(g->graph_rows(c, &rows, &table, -1, &idx, &err), &err, BS_EINVAL, "-1 indices");
    expect_msg(g->graph_rows(c, &rows, &table, 3, &idx, &err), &err, BS_EINVAL, "[3, 8]");
    expect_msg(g->graph_rows(c, &rows, &table, 100000, &idx, &err), &err, BS_EUNSUPP, "0 to 2048");
    struct bs_tensor table_i = table;
    table_i.type = BS_TYPE_I64;
    assert_int_equal(g->graph_rows(c, &rows, &table_i, 2, &idx, &err), BS_EINVAL);
    struct bs_tensor table16 = bs_tensor_make(BS_TYPE_BF16, 2, (int64_t[]){10, 8}, f->buf);
    struct bs_tensor rows16 = bs_tensor_make(BS_TYPE_BF16, 2, (int64_t[]){2, 8}, f->buf);
    assert_int_equal(g->graph_rows(c, &rows16, &table16, 2, &idx, &err), BS_EINVAL);
    /* no rows: nothing to gather, a slot all the same */
    struct bs_tensor rows0 = t2(f, 0, 8);
    idx = NULL;
    assert_int_equal(g->graph_rows(c, &rows0, &table, 0, &idx, &err), 0);
    assert_non_null(idx);
    /* valid: needs the device */
    expect_msg(g->graph_rows(c, &rows, &table, 2, &idx, &err), &err, BS_EINTERNAL, "no device");
    /* keep without a place for the graph: refused, and the capture is over */
    expect_msg(g->graph_end(c, true, NULL, &err), &err, BS_EINVAL, "keep without");
    expect_msg(g->graph_end(c, false, &gr, &err), &err, BS_EINVAL, "no graph_begin");

    /* begin, end without keep: fine, no graph */
    assert_int_equal(g->graph_begin(c, &err), 0);
    gr = (void *)1;
    assert_int_equal(g->graph_end(c, false, &gr, &err), 0);
    assert_null(gr);
    /* keep: there is no device to make it on; the capture ends all the same */
    assert_int_equal(g->graph_begin(c, &err), 0);
    gr = (void *)1;
    expect_msg(g->graph_end(c, true, &gr, &err), &err, BS_EINTERNAL, "no device");
    assert_null(gr);
    expect_msg(g->graph_end(c, true, &gr, &err), &err, BS_EINVAL, "no graph_begin");

    /* a capture is its thread's: another thread has none, and runs ops */
    assert_int_equal(g->graph_begin(c, &err), 0);
    struct other_thread ot = {.f = f};
    pthread_t tid;
    assert_int_equal(pthread_create(&tid, NULL, other_thread_main, &ot), 0);
    pthread_join(tid, NULL);
    expect_msg(ot.end_rc, &ot.end_err, BS_EINVAL, "no graph_begin");
    assert_int_not_equal(ot.rows_rc, BS_EUNSUPP);
    assert_int_equal(g->graph_end(c, false, &gr, &err), 0);
    /* a capture left open: the backend's free ends it (teardown) */
    assert_int_equal(g->graph_begin(c, &err), 0);
}

/* While a thread captures, what would allocate, free, upload or wait on it
 * fails cleanly (BS_EUNSUPP) and the capture goes on; afterwards the same
 * calls are not refused. */
static void test_graph_capture_refusals(void **state)
{
    struct fixture *f = *state;
    const struct bs_backend_i *g = f->cuda.iface;
    void *c = f->cuda.ctx;
    struct bs_err err = {0};
    struct bs_backend_graph *gr = NULL;
    static char weights[1024], copy_a[512];
    void *replaced = NULL;
    int threads = 0, shadows = -1;
    assert_int_equal(
        f->hooks->shadow_register(&f->cuda, weights, sizeof(weights), copy_a, &replaced, &err), 0);

    assert_int_equal(g->graph_begin(c, &err), 0);
    const char *busy = "cannot run while a graph is being captured";
    struct bs_tensor table = t2(f, 10, 8), rows = t2(f, 2, 8);
    const int64_t idx[2] = {1, 2};
    expect_msg(g->get_rows(c, &rows, &table, idx, 2, &err), &err, BS_EUNSUPP, busy);
    assert_non_null(strstr(err.msg, "graph_rows"));
    char host[64];
    expect_msg(g->copy_in(c, f->buf, host, sizeof(host), &err), &err, BS_EUNSUPP, busy);
    expect_msg(g->copy_out(c, host, f->buf, sizeof(host), &err), &err, BS_EUNSUPP, busy);
    expect_msg(g->copy_out(c, NULL, NULL, 0, &err), &err, BS_EUNSUPP, busy);
    expect_msg(g->weights_ready(c, f->buf, 64, &err), &err, BS_EUNSUPP, busy);
    /* linear of an F32 x in bf16 converts x into scratch, which would grow */
    struct bs_tensor x = t2(f, 4, 8), w = t2(f, 6, 8), y = t2(f, 4, 6);
    expect_msg(g->linear(c, &y, &x, &w, NULL, 0.0f, &err), &err, BS_EUNSUPP, busy);
    assert_non_null(strstr(err.msg, "scratch"));
    /* a ragged batch uploads its offsets */
    struct ragged r;
    ragged_init(f, &r);
    expect_msg(g->attention(c, &r.o, &r.q, &r.k, &r.k, &r.p, &err), &err, BS_EUNSUPP, busy);
    assert_non_null(strstr(err.msg, "upload"));
    assert_null(g->buf_alloc(c, 256));
    /* buf_free waits for graph_end: the weights' copy is still registered */
    g->buf_free(c, weights);
    assert_int_equal(f->hooks->counts(&f->cuda, &threads, &shadows), 0);
    assert_int_equal(shadows, 1);
    /* argument errors are still argument errors */
    const int64_t bad[2] = {1, 10};
    struct bs_err ec = {0};
    assert_int_equal(f->cpu.iface->get_rows(f->cpu.ctx, &rows, &table, bad, 2, &ec), BS_EINVAL);
    expect_msg(g->get_rows(c, &rows, &table, bad, 2, &err), &err, BS_EINVAL, ec.msg);

    uint64_t before = g->graph_epoch(c);
    assert_int_equal(g->graph_end(c, false, &gr, &err), 0);
    assert_int_equal(f->hooks->counts(&f->cuda, &threads, &shadows), 0);
    assert_int_equal(shadows, 0);            /* freed at graph_end */
    assert_true(g->graph_epoch(c) > before); /* and its copy with it */

    /* no capture: the same calls are not refused (no device: INTERNAL) */
    err = (struct bs_err){0};
    assert_int_not_equal(g->get_rows(c, &rows, &table, idx, 2, &err), BS_EUNSUPP);
    err = (struct bs_err){0};
    assert_int_not_equal(g->linear(c, &y, &x, &w, NULL, 0.0f, &err), BS_EUNSUPP);
    err = (struct bs_err){0};
    assert_int_not_equal(g->attention(c, &r.o, &r.q, &r.k, &r.k, &r.p, &err), BS_EUNSUPP);
}

/* graph_epoch moves whenever a weights copy is registered, replaced or
 * freed; not for other buffers' frees, a capture or a thread's state. */
static void test_graph_epoch(void **state)
{
    struct fixture *f = *state;
    const struct bs_backend_i *g = f->cuda.iface;
    void *c = f->cuda.ctx;
    struct bs_err err = {0};
    static char weights[1024], copy_a[512], copy_b[512];
    void *replaced = NULL;
    uint64_t e0 = g->graph_epoch(c);
    assert_int_equal(g->graph_epoch(c), e0);
    assert_int_equal(
        f->hooks->shadow_register(&f->cuda, weights, sizeof(weights), copy_a, &replaced, &err), 0);
    uint64_t e1 = g->graph_epoch(c);
    assert_true(e1 > e0);
    assert_int_equal(
        f->hooks->shadow_register(&f->cuda, weights, sizeof(weights), copy_b, &replaced, &err), 0);
    uint64_t e2 = g->graph_epoch(c);
    assert_true(e2 > e1);
    g->buf_free(c, weights);
    uint64_t e3 = g->graph_epoch(c);
    assert_true(e3 > e2);
    /* a buffer without a copy: the engine compares its address itself */
    g->buf_free(c, f->buf);
    assert_int_equal(g->graph_epoch(c), e3);
    /* a thread's state, the capture bookkeeping and the lookups do not move it */
    assert_non_null(f->hooks->thread_state(&f->cuda, &err));
    uint64_t e4 = g->graph_epoch(c);
    struct bs_backend_graph *gr = NULL;
    assert_int_equal(g->graph_begin(c, &err), 0);
    assert_int_equal(g->graph_end(c, false, &gr, &err), 0);
    assert_int_equal(g->graph_epoch(c), e4);
}

/* ---- the staging schedule (xfer.h) ------------------------------------- */

/* The model of the stream: queued DMAs run in order, each as late as the
 * schedule lets it (at a WAIT that needs it, or at the end), so a buffer the
 * host refills or reads too early holds the wrong bytes. */
struct xfer_model {
    unsigned char *dev, *host, *buf[2];
    bool out;
    struct bs__xfer_step q[8]; /* queued DMAs, oldest first */
    int nq;
    size_t *hosted, *retired; /* per chunk: HOST steps, DMAs run */
};

static void model_run_dma(struct xfer_model *m, const struct bs__xfer_step *s, size_t chunk)
{
    if (m->out)
        memcpy(m->buf[s->buf], m->dev + s->off, s->len);
    else
        memcpy(m->dev + s->off, m->buf[s->buf], s->len);
    m->retired[s->off / chunk]++;
}

/* Runs the queue up to and including the last DMA on buffer b (b < 0: all). */
static void model_wait(struct xfer_model *m, int b, size_t chunk)
{
    int last = -1;
    for (int i = 0; i < m->nq; i++)
        if (b < 0 || m->q[i].buf == b)
            last = i;
    for (int i = 0; i <= last; i++)
        model_run_dma(m, &m->q[i], chunk);
    memmove(m->q, m->q + last + 1, (size_t)(m->nq - last - 1) * sizeof(m->q[0]));
    m->nq -= last + 1;
}

/* One copy of size bytes in chunks of chunk, one direction. */
static void replay_xfer(size_t size, size_t chunk, bool out)
{
    size_t n = bs__xfer_chunks(size, chunk), steps = 0;
    unsigned char *src = malloc(size + 1), *dst = malloc(size + 1);
    struct xfer_model m = {.out = out, .buf = {malloc(chunk), malloc(chunk)}};
    m.hosted = calloc(n + 1, sizeof(size_t));
    m.retired = calloc(n + 1, sizeof(size_t));
    assert_non_null(src && dst && m.buf[0] && m.buf[1] && m.hosted && m.retired);
    for (size_t i = 0; i < size; i++)
        src[i] = (unsigned char)(i * 131 + 7);
    memset(dst, 0xee, size + 1);
    m.dev = out ? src : dst;
    m.host = out ? dst : src;
    struct bs__xfer x;
    bs__xfer_init(&x, size, chunk, out);
    for (struct bs__xfer_step s = bs__xfer_next(&x); s.op != BS_XFER_DONE; s = bs__xfer_next(&x)) {
        assert_true(++steps <= 4 * n + 4);
        assert_true(s.buf == 0 || s.buf == 1);
        size_t i = s.off / chunk;
        switch (s.op) {
        case BS_XFER_WAIT:
            model_wait(&m, s.buf, chunk);
            break;
        case BS_XFER_HOST:
            assert_true(s.len > 0 && s.len <= chunk && s.off + s.len <= size);
            assert_int_equal(s.buf, (int)(i % 2));
            for (int j = 0; j < m.nq; j++) /* no DMA on this buffer may be pending */
                assert_int_not_equal(m.q[j].buf, s.buf);
            if (out)
                memcpy(m.host + s.off, m.buf[s.buf], s.len);
            else
                memcpy(m.buf[s.buf], m.host + s.off, s.len);
            m.hosted[i]++;
            break;
        case BS_XFER_DMA:
            assert_true(s.len > 0 && s.len <= chunk && s.off + s.len <= size);
            assert_true(m.nq < 8);
            /* the overlap: in, chunk i's DMA is queued while the host still
             * has chunk i + 1 to stage (nothing waited for it); out, chunk
             * i + 1's DMA is queued before the host empties chunk i */
            if (out && i >= 1)
                assert_int_equal(m.hosted[i - 1], 0);
            m.q[m.nq++] = s;
            break;
        case BS_XFER_DONE:
            break;
        }
        /* in: chunk i + 1 is staged before chunk i's DMA has to have run */
        if (!out && s.op == BS_XFER_HOST && i >= 1)
            assert_int_equal(m.retired[i - 1], 0);
    }
    model_wait(&m, -1, chunk); /* the stream's final wait */
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(m.hosted[i], 1);
        assert_int_equal(m.retired[i], 1);
    }
    assert_memory_equal(dst, src, size);
    assert_int_equal(dst[size], 0xee); /* nothing past the end */
    free(src);
    free(dst);
    free(m.buf[0]);
    free(m.buf[1]);
    free(m.hosted);
    free(m.retired);
}

static void test_xfer_schedule(void **state)
{
    (void)state;
    const size_t chunks[] = {1, 7, 64};
    assert_int_equal(bs__xfer_chunks(0, 64), 0);
    assert_int_equal(bs__xfer_chunks(64, 64), 1);
    assert_int_equal(bs__xfer_chunks(65, 64), 2);
    assert_int_equal(bs__xfer_chunks(10, 0), 0);
    for (size_t c = 0; c < BS_ARRAY_LEN(chunks); c++) {
        size_t k = chunks[c];
        const size_t sizes[] = {0, 1, k - 1, k, k + 1, 2 * k, 3 * k + 5, 10 * k + 1};
        for (size_t i = 0; i < BS_ARRAY_LEN(sizes); i++) {
            replay_xfer(sizes[i], k, false);
            replay_xfer(sizes[i], k, true);
        }
    }
}

/* The timer's refusals where nothing can be timed. */
static void test_gpu_timer_refusals(void **state)
{
    struct fixture *f = *state;
    struct bs_err err = {0};
    bs_proc_gpu_timer_fn fn;
    assert_null(bs_backend_get_proc_address(&f->cpu, BS_PROC_GPU_TIMER));
    *(void **)&fn = bs_backend_get_proc_address(&f->cuda, BS_PROC_GPU_TIMER);
    assert_non_null(fn);
    const struct bs_backend_gpu_timer *t = fn();
    struct bs_gpu_time gt = {.total_ms = 5};
    assert_int_equal(t->stop(&f->cuda, &gt, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "stop without start"));
    assert_true(gt.total_ms == 0);
    err = (struct bs_err){0};
    assert_int_equal(t->start(&f->cuda, &err), BS_EUNSUPP);
    assert_non_null(strstr(err.msg, "no device"));
    err = (struct bs_err){0};
    assert_int_equal(t->start(&f->cpu, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "not a cuda backend"));
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
        cmocka_unit_test_setup_teardown(test_linear_act_checks, setup_fp32, teardown),
        cmocka_unit_test_setup_teardown(test_linear_act_checks, setup_bf16, teardown),
        cmocka_unit_test_setup_teardown(test_lt_cache, setup_bf16, teardown),
        cmocka_unit_test_setup_teardown(test_valid_calls_fail_cleanly, setup_fp32, teardown),
        cmocka_unit_test_setup_teardown(test_valid_calls_fail_cleanly, setup_bf16, teardown),
        cmocka_unit_test_setup_teardown(test_thread_states, setup_bf16, teardown),
        cmocka_unit_test_setup_teardown(test_weights_ready_twice, setup_bf16, teardown),
        cmocka_unit_test_setup_teardown(test_overflow_fails_copy, setup_fp16, teardown),
        cmocka_unit_test_setup_teardown(test_attention_grid_limits, setup_fp32, teardown),
        cmocka_unit_test_setup_teardown(test_attention_ragged_checks, setup_fp32, teardown),
        cmocka_unit_test_setup_teardown(test_attention_ragged_checks, setup_bf16, teardown),
        cmocka_unit_test_setup_teardown(test_attention_ragged_valid, setup_fp32, teardown),
        cmocka_unit_test_setup_teardown(test_attention_ragged_valid, setup_bf16, teardown),
        cmocka_unit_test(test_xfer_schedule),
        cmocka_unit_test_setup_teardown(test_gpu_timer_refusals, setup_bf16, teardown),
        cmocka_unit_test_setup_teardown(test_graph_misuse, setup_bf16, teardown),
        cmocka_unit_test_setup_teardown(test_graph_capture_refusals, setup_bf16, teardown),
        cmocka_unit_test_setup_teardown(test_graph_epoch, setup_fp32, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
