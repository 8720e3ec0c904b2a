/* The dynamic batcher on a real libuv loop with small golden models
 * (tests/golden/<case>, weights only; inputs are generated). Every batched
 * result is compared with the same request run alone through
 * bs_model_forward: max abs difference <= 1e-5.
 *
 * usage: test_batcher [GOLDEN_DIR] (default tests/golden) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <math.h>
#include <uv.h>

#include "batcher.h"

#define TOLERANCE  1e-5
#define MAX_IN     4
#define MAX_BLOCKS 4
#define MS         1000000ull /* ns */

static const char *golden_dir = "tests/golden";
static struct bs_backend be;

/* ---- requests ---------------------------------------------------------- */

struct req {
    struct bs_named_tensor in[MAX_IN];
    void *bufs[MAX_IN];
    int n_in;
    bool intermediate;
    enum bs_dtype out_dtype; /* the output's (F32, the zero value; BF16, F16) */
    uint64_t priority;  /* the request's "priority" (0: the default level) */
    int64_t timeout_us; /* the request's "timeout" (0: none) */
    bs_job_t *job;
    /* what the batcher answered */
    int rc, done_calls, block_calls, bad_block_order;
    char msg[256];
    struct bs_tensor out;
    float *blocks[MAX_BLOCKS];
    uint64_t done_ns;
    /* hooks */
    bs_batcher_t *b;
    struct req *cancel_on_block; /* cancel this request from our first on_block */
    int *done_order, *n_done;    /* append our index to done_order */
    struct req **then;           /* submitted from our on_done (the batch still runs) */
    int n_then;
    int index;
};

static uint64_t rng_state = 12345;

static float rnd(void)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) & 0xffffff) / (float)0x800000 - 1.0f; /* [-1, 1) */
}

static void *req_add(struct req *r, const char *name, enum bs_dtype type, int n_dims,
                     const int64_t *ne)
{
    assert_true(r->n_in < MAX_IN);
    struct bs_tensor t = bs_tensor_make(type, n_dims, ne, NULL);
    t.data = malloc(bs_tensor_nbytes(&t));
    assert_non_null(t.data);
    r->bufs[r->n_in] = t.data;
    r->in[r->n_in].name = name;
    r->in[r->n_in].t = t;
    r->n_in++;
    return t.data;
}

static void req_add_random(struct req *r, const char *name, int n_dims, const int64_t *ne)
{
    float *p = req_add(r, name, BS_TYPE_F32, n_dims, ne);
    int64_t n = bs_tensor_nelements(&r->in[r->n_in - 1].t);
    for (int64_t i = 0; i < n; i++)
        p[i] = rnd();
}

/* hidden_states [batch, l, 32] and, when lk > 0, encoder_hidden_states [batch, lk, 24]. */
static void req_btb(struct req *r, int64_t batch, int64_t l, int64_t lk)
{
    req_add_random(r, "hidden_states", 3, (int64_t[]){batch, l, 32});
    if (lk > 0)
        req_add_random(r, "encoder_hidden_states", 3, (int64_t[]){batch, lk, 24});
}

static void req_free(struct req *r)
{
    for (int i = 0; i < r->n_in; i++)
        free(r->bufs[i]);
    free(r->out.data);
    for (int i = 0; i < MAX_BLOCKS; i++)
        free(r->blocks[i]);
    memset(r, 0, sizeof(*r));
}

static float *copy_floats(const struct bs_tensor *t)
{
    float *p = malloc(bs_tensor_nbytes(t));
    assert_non_null(p);
    memcpy(p, t->data, bs_tensor_nbytes(t));
    return p;
}

static void on_block(void *arg, int block, int n_blocks, const struct bs_tensor *out)
{
    struct req *r = arg;
    if (block != r->block_calls || r->done_calls != 0 || block >= MAX_BLOCKS)
        r->bad_block_order++;
    else
        r->blocks[block] = copy_floats(out);
    r->block_calls++;
    if (r->cancel_on_block != NULL) {
        bs_batcher_cancel(r->b, r->cancel_on_block->job);
        r->cancel_on_block = NULL;
    }
}

static void submit_ok(bs_batcher_t *b, struct req *r);

static void on_done(void *arg, int rc, const char *msg, const struct bs_tensor *out)
{
    struct req *r = arg;
    r->rc = rc;
    r->done_calls++;
    r->done_ns = uv_hrtime();
    snprintf(r->msg, sizeof(r->msg), "%s", msg ? msg : "");
    if (rc == 0) {
        assert_non_null(out);
        r->out = *out;
        r->out.data = copy_floats(out);
    }
    if (r->done_order != NULL)
        r->done_order[(*r->n_done)++] = r->index;
    r->job = NULL;
    for (int i = 0; i < r->n_then; i++)
        submit_ok(r->b, r->then[i]);
}

static const struct bs_job_ops ops = {.on_block = on_block, .on_done = on_done};

static int submit(bs_batcher_t *b, struct req *r, int64_t deadline_ns, struct bs_err *err)
{
    struct bs_batcher_request br = {.in = r->in,
                                    .n_in = r->n_in,
                                    .intermediate = r->intermediate,
                                    .out_dtype = r->out_dtype,
                                    .priority = r->priority,
                                    .timeout_us = r->timeout_us,
                                    .deadline_ns = deadline_ns};
    r->b = b;
    return bs_batcher_submit(b, &br, &ops, r, &r->job, err);
}

static void submit_ok(bs_batcher_t *b, struct req *r)
{
    struct bs_err err = {0};
    int rc = submit(b, r, INT64_MAX, &err);
    if (rc != 0)
        fail_msg("submit: %d %s", rc, err.msg);
}

/* ---- the reference: one request alone ---------------------------------- */

struct ref_blocks {
    float *blocks[MAX_BLOCKS];
    int n;
};

static int ref_on_block(void *arg, int block, int n_blocks, const struct bs_tensor *out)
{
    struct ref_blocks *rb = arg;
    if (block < MAX_BLOCKS)
        rb->blocks[block] = copy_floats(out);
    rb->n++;
    return 0;
}

static double max_diff(const float *a, const float *c, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)c[i]);
        if (!(d <= m))
            m = isnan(d) ? INFINITY : d;
    }
    return m;
}

/* Run r alone and compare its answer (and its block outputs, if it has any). */
static void check_against_alone(bs_model_t *model, const struct req *r)
{
    struct bs_err err = {0};
    struct bs_arena arena;
    struct bs_tensor out;
    struct ref_blocks rb = {{NULL}, 0};
    struct bs_forward_opts opts = {.on_block = ref_on_block, .cb_arg = &rb};
    assert_int_equal(r->done_calls, 1);
    if (r->rc != 0)
        fail_msg("request %d failed: %d %s", r->index, r->rc, r->msg);
    assert_int_equal(bs_model_check(model, r->in, r->n_in, &out, &err), 0);
    assert_int_equal(out.n_dims, r->out.n_dims);
    assert_memory_equal(out.ne, r->out.ne, sizeof(int64_t) * (size_t)out.n_dims);
    out.data = malloc(bs_tensor_nbytes(&out));
    bs_arena_init(&arena, &be);
    int rc =
        bs_model_forward(model, &arena, r->in, r->n_in, &out, r->block_calls ? &opts : NULL, &err);
    if (rc != 0)
        fail_msg("reference forward: %s", err.msg);
    double d = max_diff(out.data, r->out.data, bs_tensor_nelements(&out));
    if (!(d <= TOLERANCE))
        fail_msg("request %d: max abs diff %.3g against the unbatched forward", r->index, d);
    assert_int_equal(rb.n, r->block_calls);
    for (int i = 0; i < rb.n && i < MAX_BLOCKS; i++) {
        d = max_diff(rb.blocks[i], r->blocks[i], bs_tensor_nelements(&out));
        if (!(d <= TOLERANCE))
            fail_msg("request %d block %d: max abs diff %.3g", r->index, i, d);
        free(rb.blocks[i]);
    }
    bs_arena_free(&arena);
    free(out.data);
}

/* ---- fixture ------------------------------------------------------------ */

struct fx {
    uv_loop_t loop;
    bs_model_t *model;
    bs_batcher_t *b;
};

static struct bs_serving_config serving(int max_batch, int64_t delay_us)
{
    struct bs_serving_config c = {0};
    c.max_batch_size = max_batch;
    c.max_queue_delay_us = delay_us;
    return c;
}

/* The backend a fixture's batcher runs on (a test may swap in a failing one). */
static struct bs_backend *fx_be = &be;

static void fx_init(struct fx *f, const char *model_case, const struct bs_serving_config *cfg)
{
    struct bs_batcher_deps deps = {.be = fx_be};
    char path[4096];
    struct bs_err err = {0};
    memset(f, 0, sizeof(*f));
    assert_int_equal(uv_loop_init(&f->loop), 0);
    snprintf(path, sizeof(path), "%s/%s", golden_dir, model_case);
    if (bs_model_load(&f->model, path, &be, &err) != 0)
        fail_msg("load %s: %s", path, err.msg);
    if (bs_batcher_init(&f->b, &f->loop, f->model, cfg, &deps, &err) != 0)
        fail_msg("batcher: %s", err.msg);
}

/* Free the batcher (if the test has not), let the close callbacks run, and
 * check that nothing is left on the loop. */
static void fx_finish(struct fx *f)
{
    bs_batcher_free(f->b);
    f->b = NULL;
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    bs_model_free(f->model);
}

/* ---- tests -------------------------------------------------------------- */

/* (1) Eight one-sample requests submitted in one loop iteration form one batch. */
static void test_one_batch_matches_alone(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 50000);
    struct req r[8] = {0};
    fx_init(&f, "btb_geglu_cross", &cfg);
    for (int i = 0; i < 8; i++) {
        r[i].index = i;
        req_btb(&r[i], 1, 20, 7);
        submit_ok(f.b, &r[i]);
    }
    assert_int_equal(bs_batcher_queued(f.b), 8);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    const struct bs_model_stats *s = bs_batcher_stats(f.b);
    assert_int_equal(s->execution_count, 1);
    assert_int_equal(s->inference_count, 8);
    for (int i = 0; i < 8; i++) {
        check_against_alone(f.model, &r[i]);
        assert_int_equal(r[i].block_calls, 0);
    }
    fx_finish(&f);
    for (int i = 0; i < 8; i++)
        req_free(&r[i]);
}

/* (2) Per-sample timesteps and labels stay with their request: 0-d values,
 * [1] and per-sample vectors in one batch (ada_norm_zero), including one
 * value shared by a two-sample request (expanded to both samples). */
static void test_per_sample_conditioning(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 50000);
    struct req r[5] = {0};
    fx_init(&f, "btb_ada_norm_zero_dit", &cfg);
    for (int i = 0; i < 5; i++) {
        /* 0: 0-d t and label; 1: 0-d t, [1] label; 2: per-sample [3];
         * 3: batch 2 sharing a 0-d t and a [1] label; 4: [1] t and label */
        int64_t batch = i == 2 ? 3 : i == 3 ? 2 : 1, n_per = i == 2 ? 3 : 1;
        int t_dims = i == 2 || i == 4 ? 1 : 0, l_dims = i == 0 ? 0 : 1;
        r[i].index = i;
        req_add_random(&r[i], "hidden_states", 3, (int64_t[]){batch, 20, 32});
        float *t = req_add(&r[i], "timestep", BS_TYPE_F32, t_dims, (int64_t[]){n_per});
        int64_t *l = req_add(&r[i], "class_labels", BS_TYPE_I64, l_dims, (int64_t[]){n_per});
        for (int k = 0; k < n_per; k++) {
            t[k] = 100.0f * (float)i + 37.5f * (float)k;
            l[k] = (i * 3 + k) % 11;
        }
        submit_ok(f.b, &r[i]);
    }
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(bs_batcher_stats(f.b)->execution_count, 1);
    assert_int_equal(bs_batcher_stats(f.b)->inference_count, 8);
    for (int i = 0; i < 5; i++)
        check_against_alone(f.model, &r[i]);
    fx_finish(&f);
    for (int i = 0; i < 5; i++)
        req_free(&r[i]);
}

/* (3) A preferred batch size dispatches before the (10 s) delay. */
static void test_preferred_size(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 10 * 1000000);
    struct req r[2] = {0};
    cfg.preferred_batch_size[0] = 2;
    cfg.n_preferred = 1;
    fx_init(&f, "btb_geglu_cross", &cfg);
    uint64_t t0 = uv_hrtime();
    for (int i = 0; i < 2; i++) {
        r[i].index = i;
        req_btb(&r[i], 1, 20, 7);
        submit_ok(f.b, &r[i]);
    }
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    uint64_t ms = (uv_hrtime() - t0) / MS;
    if (ms > 2000)
        fail_msg("preferred batch took %llu ms", (unsigned long long)ms);
    assert_int_equal(bs_batcher_stats(f.b)->execution_count, 1);
    assert_int_equal(bs_batcher_stats(f.b)->batch[1].compute_infer.count, 1);
    for (int i = 0; i < 2; i++)
        check_against_alone(f.model, &r[i]);
    fx_finish(&f);
    for (int i = 0; i < 2; i++)
        req_free(&r[i]);
}

/* (4) Errors at submit: queue full, batch too large, bad inputs; no on_done. */
static void test_submit_errors(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(4, 10 * 1000000);
    struct req r[5] = {0};
    struct bs_err err = {0};
    cfg.max_queue_size = 2;
    fx_init(&f, "btb_geglu_cross", &cfg);
    for (int i = 0; i < 5; i++) {
        r[i].index = i;
        req_btb(&r[i], i == 3 ? 5 : 1, 20, i == 4 ? 0 : 7);
    }
    submit_ok(f.b, &r[0]);
    submit_ok(f.b, &r[1]);
    assert_int_equal(submit(f.b, &r[2], INT64_MAX, &err), BS_EBUSY);
    assert_string_equal(err.msg, "queue full (2 requests)");
    assert_null(r[2].job);
    assert_int_equal(submit(f.b, &r[3], INT64_MAX, &err), BS_EINVAL);
    assert_string_equal(err.msg, "batch 5 exceeds max_batch_size 4");
    assert_int_equal(submit(f.b, &r[4], INT64_MAX, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "encoder_hidden_states")); /* the engine's message */
    /* an unknown input */
    r[4].in[0].name = "hiden_states";
    assert_int_equal(submit(f.b, &r[4], INT64_MAX, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "hiden_states"));
    assert_int_equal(bs_batcher_queued(f.b), 2);
    bs_batcher_drain(f.b, NULL, NULL); /* runs the two without waiting 10 s */
    assert_int_equal(submit(f.b, &r[2], INT64_MAX, &err), BS_EUNSUPP);
    assert_string_equal(err.msg, "shutting down");
    /* every refused submit is counted as a failure (ModelStatistics and metrics agree) */
    assert_int_equal(bs_batcher_stats(f.b)->fail.count, 5);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    for (int i = 0; i < 2; i++)
        check_against_alone(f.model, &r[i]);
    for (int i = 2; i < 5; i++)
        assert_int_equal(r[i].done_calls, 0);
    fx_finish(&f);
    for (int i = 0; i < 5; i++)
        req_free(&r[i]);
}

/* (5) Deadlines: past at submit, from default_timeout_us, and one passing
 * while the job waits for a 10 s delay (the deadline timer fires, not the
 * delay). None is computed. */
static void test_deadlines(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 10 * 1000000);
    struct req r[3] = {0};
    struct bs_err err = {0};
    fx_init(&f, "btb_geglu_cross", &cfg);
    for (int i = 0; i < 3; i++) {
        r[i].index = i;
        req_btb(&r[i], 1, 20, 7);
    }
    uint64_t t0 = uv_hrtime();
    assert_int_equal(submit(f.b, &r[0], (int64_t)t0 - 1, &err), 0);
    assert_int_equal(submit(f.b, &r[1], (int64_t)(t0 + 30 * MS), &err), 0);
    assert_int_equal(r[0].done_calls, 0); /* never inside submit */
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    uint64_t ms = (uv_hrtime() - t0) / MS;
    for (int i = 0; i < 2; i++) {
        assert_int_equal(r[i].done_calls, 1);
        assert_int_equal(r[i].rc, BS_ETIMEDOUT);
        assert_non_null(strstr(r[i].msg, "deadline exceeded in the queue after"));
    }
    if (ms < 29 || ms > 2000)
        fail_msg("the 30 ms deadline answered after %llu ms", (unsigned long long)ms);
    if ((r[1].done_ns - t0) / MS < 29)
        fail_msg("timed out early: %s", r[1].msg);
    assert_int_equal(bs_batcher_stats(f.b)->execution_count, 0);
    assert_int_equal(bs_batcher_stats(f.b)->fail.count, 2);
    assert_int_equal(bs_batcher_stats(f.b)->queue.count, 0);
    fx_finish(&f);

    cfg.default_timeout_us = 1; /* INT64_MAX from the caller: the default applies */
    fx_init(&f, "btb_geglu_cross", &cfg);
    submit_ok(f.b, &r[2]);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(r[2].rc, BS_ETIMEDOUT);
    assert_int_equal(bs_batcher_stats(f.b)->execution_count, 0);
    fx_finish(&f);
    for (int i = 0; i < 3; i++)
        req_free(&r[i]);
}

/* (6) Cancel a queued job: it hears BS_ECANCELED at once; the others run. */
static void test_cancel_queued(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 20000);
    struct req r[3] = {0};
    fx_init(&f, "btb_geglu_cross", &cfg);
    for (int i = 0; i < 3; i++) {
        r[i].index = i;
        req_btb(&r[i], 1, 20, 7);
        submit_ok(f.b, &r[i]);
    }
    bs_batcher_cancel(f.b, r[0].job); /* the head */
    assert_int_equal(r[0].done_calls, 1);
    assert_int_equal(r[0].rc, BS_ECANCELED);
    assert_int_equal(bs_batcher_queued(f.b), 2);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(r[0].done_calls, 1);
    for (int i = 1; i < 3; i++)
        check_against_alone(f.model, &r[i]);
    const struct bs_model_stats *s = bs_batcher_stats(f.b);
    assert_int_equal(s->execution_count, 1);
    assert_int_equal(s->inference_count, 2);
    assert_int_equal(s->success.count, 2);
    assert_int_equal(s->fail.count, 1);
    fx_finish(&f);
    for (int i = 0; i < 3; i++)
        req_free(&r[i]);
}

/* (7) With ragged batching off, different sequence lengths run in separate
 * batches, the head's first; compatible jobs behind an incompatible one
 * join the head's batch. */
static void test_incompatible_signatures(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 20000);
    cfg.ragged_off = true;
    struct req r[5] = {0};
    int order[5], n_done = 0;
    fx_init(&f, "btb_geglu_cross", &cfg);
    for (int i = 0; i < 5; i++) {
        r[i].index = i;
        r[i].done_order = order;
        r[i].n_done = &n_done;
        req_btb(&r[i], 1, i % 2 ? 12 : 20, 7);
        submit_ok(f.b, &r[i]);
    }
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    const struct bs_model_stats *s = bs_batcher_stats(f.b);
    assert_int_equal(s->execution_count, 2);
    assert_int_equal(s->batch[2].compute_infer.count, 1); /* L=20: 0, 2, 4 */
    assert_int_equal(s->batch[1].compute_infer.count, 1); /* L=12: 1, 3 */
    int want[5] = {0, 2, 4, 1, 3};
    assert_int_equal(n_done, 5);
    assert_memory_equal(order, want, sizeof(want));
    for (int i = 0; i < 5; i++) {
        assert_int_equal(r[i].out.ne[1], i % 2 ? 12 : 20);
        check_against_alone(f.model, &r[i]);
    }
    fx_finish(&f);
    for (int i = 0; i < 5; i++)
        req_free(&r[i]);
}

/* (8) Intermediate streaming on a 3-block stack: the job that asks hears
 * blocks 0, 1, 2 in order before on_done, the last equal to the output; a job
 * in the same batch that does not ask hears none. Also: cancelling a running
 * job (from the first on_block) drops its result. */
static void test_intermediate_stack(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 20000);
    struct req r[3] = {0};
    fx_init(&f, "btb_stack3", &cfg);
    for (int i = 0; i < 3; i++) {
        r[i].index = i;
        req_btb(&r[i], i == 1 ? 2 : 1, 20, 7);
        req_add_random(&r[i], "encoder_attention_mask", 3, (int64_t[]){1, 1, 7}); /* broadcast */
    }
    r[1].intermediate = true; /* not first in the batch: its slice starts at sample 1 */
    r[1].cancel_on_block = &r[2];
    for (int i = 0; i < 3; i++)
        submit_ok(f.b, &r[i]);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(bs_batcher_stats(f.b)->execution_count, 1);
    assert_int_equal(r[1].block_calls, 3);
    assert_int_equal(r[1].bad_block_order, 0);
    assert_memory_equal(r[1].blocks[2], r[1].out.data, bs_tensor_nbytes(&r[1].out));
    check_against_alone(f.model, &r[1]); /* output and each block */
    assert_int_equal(r[0].block_calls, 0);
    check_against_alone(f.model, &r[0]);
    assert_int_equal(r[2].done_calls, 1);
    assert_int_equal(r[2].rc, BS_ECANCELED);
    assert_int_equal(r[2].block_calls, 0);
    assert_int_equal(bs_batcher_stats(f.b)->fail.count, 1);
    fx_finish(&f);
    for (int i = 0; i < 3; i++)
        req_free(&r[i]);
}

/* (8b) Output dtypes: requests asking F32, BF16 and F16 outputs of one
 * shape batch only with their own dtype (three executions of two); each
 * answer and each streamed block is in its dtype, within TOLERANCE of the
 * request alone in F32 plus half an ulp of its dtype (the F32 result rounded
 * to nearest even once). */
static void test_output_dtypes(void **state)
{
    static const enum bs_dtype types[3] = {BS_TYPE_F32, BS_TYPE_BF16, BS_TYPE_F16};
    static const double half_ulp[3] = {0, 0x1p-8, 0x1p-11}; /* x |value| at most */
    struct fx f;
    struct bs_serving_config cfg = serving(8, 20000);
    struct req r[6] = {0};
    fx_init(&f, "btb_stack3", &cfg);
    for (int i = 0; i < 6; i++) {
        r[i].index = i;
        r[i].out_dtype = types[i % 3];
        r[i].intermediate = true;
        req_btb(&r[i], 1, 20, 7);
        submit_ok(f.b, &r[i]);
    }
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(bs_batcher_stats(f.b)->execution_count, 3);
    assert_int_equal(bs_batcher_stats(f.b)->batch[1].compute_infer.count, 3);
    double worst = 0;
    for (int i = 0; i < 6; i++) {
        struct req *q = &r[i];
        assert_int_equal(q->rc, 0);
        assert_int_equal(q->out.type, types[i % 3]);
        assert_int_equal(q->block_calls, 3);
        int64_t n = bs_tensor_nelements(&q->out);
        float *got = malloc(sizeof(float) * (size_t)n), *want = malloc(sizeof(float) * (size_t)n);
        struct bs_tensor ref;
        struct bs_err err = {0};
        struct bs_arena arena;
        struct ref_blocks rb = {{NULL}, 0};
        struct bs_forward_opts opts = {.on_block = ref_on_block, .cb_arg = &rb};
        assert_int_equal(bs_model_check(f.model, q->in, q->n_in, &ref, &err), 0);
        ref.data = want;
        bs_arena_init(&arena, &be);
        assert_int_equal(bs_model_forward(f.model, &arena, q->in, q->n_in, &ref, &opts, &err), 0);
        assert_int_equal(rb.n, 3);
        for (int k = 0; k <= 3; k++) { /* blocks 0..2, then the output */
            const float *w = k < 3 ? rb.blocks[k] : want;
            assert_int_equal(
                bs_convert_to_f32(got, k < 3 ? q->blocks[k] : q->out.data, q->out.type, n), 0);
            for (int64_t e = 0; e < n; e++) {
                double d = fabs((double)got[e] - w[e]);
                double bound = TOLERANCE + half_ulp[i % 3] * fabs(w[e]) * 1.01;
                if (!(d <= bound))
                    fail_msg("request %d (%s) %s %d value %lld: %.9g, alone %.9g", i,
                             bs_dtype_name(q->out.type), k < 3 ? "block" : "output", k,
                             (long long)e, got[e], w[e]);
                worst = fmax(worst, d / bound);
            }
        }
        for (int k = 0; k < 3; k++)
            free(rb.blocks[k]);
        bs_arena_free(&arena);
        free(got);
        free(want);
    }
    printf("output dtypes: worst error %.2f of the bound\n", worst);
    fx_finish(&f);
    for (int i = 0; i < 6; i++)
        req_free(&r[i]);
}

/* (7b) Ragged batching: requests of different lengths (tokens and context,
 * a length of 1, two samples in one request) share one packed batch, each
 * answer equal to the request alone; a request with another set of inputs
 * (a mask) waits for a batch of its own. */
static void test_ragged_mixed_lengths(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 20000);
    struct req r[6] = {0};
    static const int64_t len[6][3] = {{1, 20, 7}, {2, 12, 3}, {1, 1, 1},
                                      {1, 33, 9}, {1, 20, 7}, {1, 5, 2}};
    (void)state;
    fx_init(&f, "btb_geglu_cross", &cfg);
    for (int i = 0; i < 6; i++) {
        r[i].index = i;
        req_btb(&r[i], len[i][0], len[i][1], len[i][2]);
    }
    req_add_random(&r[5], "encoder_attention_mask", 3, (int64_t[]){1, 5, 2});
    for (int i = 0; i < 6; i++)
        submit_ok(f.b, &r[i]);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    const struct bs_model_stats *s = bs_batcher_stats(f.b);
    assert_int_equal(s->execution_count, 2);
    assert_int_equal(s->ragged_count, 1);
    assert_int_equal(s->batch[5].compute_infer.count, 1); /* 6 samples of 5 requests */
    assert_int_equal(s->batch[0].compute_infer.count, 1); /* the masked one */
    for (int i = 0; i < 6; i++) {
        assert_int_equal(r[i].out.ne[1], len[i][1]);
        check_against_alone(f.model, &r[i]);
    }
    fx_finish(&f);
    for (int i = 0; i < 6; i++)
        req_free(&r[i]);
}

/* (7c) max_batch_tokens: a batch stops growing before the cap; a request
 * over the cap runs alone. */
static void test_ragged_token_cap(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 20000);
    struct req r[6] = {0};
    static const int64_t len[6] = {50, 20, 12, 20, 1, 5};
    (void)state;
    cfg.max_batch_tokens = 40;
    fx_init(&f, "btb_geglu_cross", &cfg);
    for (int i = 0; i < 6; i++) {
        r[i].index = i;
        req_btb(&r[i], 1, len[i], 7);
        submit_ok(f.b, &r[i]);
    }
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    const struct bs_model_stats *s = bs_batcher_stats(f.b);
    assert_int_equal(s->execution_count, 3); /* [50] [20 12] [20 1 5] */
    assert_int_equal(s->batch[0].compute_infer.count, 1);
    assert_int_equal(s->batch[1].compute_infer.count, 1);
    assert_int_equal(s->batch[2].compute_infer.count, 1);
    for (int i = 0; i < 6; i++)
        check_against_alone(f.model, &r[i]);
    fx_finish(&f);
    for (int i = 0; i < 6; i++)
        req_free(&r[i]);
}

/* A stack long enough that a cancel from its first block's output arrives
 * well before its last block: 24 blocks of dim 128 over 256 tokens. */
#define STOP_BLOCKS 24
static const char stop_config[] =
    "{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 128, \"num_attention_heads\": 4,"
    " \"attention_head_dim\": 32, \"activation_fn\": \"geglu\","
    " \"blockserve\": {\"num_blocks\": 24, \"weights_prefix\": \"blocks.{i}.\"}}";

static void gen_small(void *arg, const char *key, int n_dims, const int64_t *ne, float *dst)
{
    int64_t n = ne[0] * (n_dims > 1 ? ne[1] : 1);
    bool norm_weight = strstr(key, "norm") != NULL && strstr(key, "weight") != NULL;
    (void)arg;
    for (int64_t i = 0; i < n; i++)
        dst[i] = norm_weight ? 1.0f : 0.05f * rnd();
}

static void fx_init_stack(struct fx *f, const struct bs_serving_config *cfg)
{
    struct bs_batcher_deps deps = {.be = fx_be};
    struct bs_model_config mc;
    struct bs_weight_gen gen = {gen_small, NULL};
    struct bs_err err = {0};
    memset(f, 0, sizeof(*f));
    assert_int_equal(uv_loop_init(&f->loop), 0);
    if (bs_config_parse(&mc, stop_config, strlen(stop_config), "stack", &err) != 0 ||
        bs_model_load_generated(&f->model, &mc, &gen, &be, &err) != 0 ||
        bs_batcher_init(&f->b, &f->loop, f->model, cfg, &deps, &err) != 0)
        fail_msg("stack: %s", err.msg);
}

/* (7d) Work that stops when nobody waits: a stack whose only request is
 * cancelled (from its first block's output) stops at a block boundary, and
 * the blocks it skipped are counted; with another request still waiting it
 * runs to the end for that one. Measured by blocks, not time. */
static void test_stop_when_nobody_waits(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 1000);
    struct req r[3] = {0};
    (void)state;
    fx_init_stack(&f, &cfg);
    /* alone: cancelled at its first block */
    req_add_random(&r[0], "hidden_states", 3, (int64_t[]){1, 256, 128});
    r[0].intermediate = true;
    r[0].cancel_on_block = &r[0];
    submit_ok(f.b, &r[0]);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    const struct bs_model_stats *s = bs_batcher_stats(f.b);
    assert_int_equal(r[0].done_calls, 1);
    assert_int_equal(r[0].rc, BS_ECANCELED);
    assert_int_equal(s->stopped_count, 1);
    if (s->blocks_skipped < STOP_BLOCKS / 2)
        fail_msg("only %llu of %d blocks skipped", (unsigned long long)s->blocks_skipped,
                 STOP_BLOCKS);
    print_message("cancelled at its first block: %llu of %d blocks skipped\n",
                  (unsigned long long)s->blocks_skipped, STOP_BLOCKS);
    /* one of two cancelled: the batch goes on for the other */
    for (int i = 1; i < 3; i++) {
        r[i].index = i;
        req_add_random(&r[i], "hidden_states", 3, (int64_t[]){1, i == 1 ? 256 : 100, 128});
    }
    r[2].intermediate = true;
    r[2].cancel_on_block = &r[1];
    for (int i = 1; i < 3; i++)
        submit_ok(f.b, &r[i]);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(r[1].rc, BS_ECANCELED);
    assert_int_equal(r[2].rc, 0);
    assert_int_equal(r[2].block_calls, STOP_BLOCKS);
    assert_int_equal(s->stopped_count, 1);
    assert_int_equal(s->execution_count, 1); /* the stopped one does not count */
    fx_finish(&f);
    for (int i = 0; i < 3; i++)
        req_free(&r[i]);
}

/* (7e) A request whose deadline passes while its stack runs stops it too,
 * and hears DEADLINE_EXCEEDED. */
static void test_stop_at_deadline(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 0);
    struct req r = {0};
    struct bs_err err = {0};
    (void)state;
    fx_init_stack(&f, &cfg);
    req_add_random(&r, "hidden_states", 3, (int64_t[]){1, 256, 128});
    /* The deadline: a third of the stack's time alone (measured here), so
     * that it passes while the stack runs on any machine. */
    struct bs_arena arena;
    struct bs_tensor out;
    assert_int_equal(bs_model_check(f.model, r.in, r.n_in, &out, &err), 0);
    out.data = malloc(bs_tensor_nbytes(&out));
    bs_arena_init(&arena, &be);
    uint64_t t0 = uv_hrtime();
    assert_int_equal(bs_model_forward(f.model, &arena, r.in, r.n_in, &out, NULL, &err), 0);
    int64_t alone_ns = (int64_t)(uv_hrtime() - t0);
    bs_arena_free(&arena);
    free(out.data);
    assert_int_equal(submit(f.b, &r, (int64_t)uv_hrtime() + alone_ns / 3, &err), 0);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    const struct bs_model_stats *s = bs_batcher_stats(f.b);
    assert_int_equal(r.rc, BS_ETIMEDOUT);
    if (s->stopped_count == 1) {
        assert_non_null(strstr(r.msg, "stopped after"));
        assert_true(s->blocks_skipped > 0);
    } else { /* a machine so slow that it expired in the queue */
        assert_int_equal(r.block_calls, 0);
    }
    fx_finish(&f);
    req_free(&r);
}

struct drain_state {
    struct fx *f;
    struct req *r;
    int n;
    int calls;
    bool all_done_before;
};

static void on_drained(void *arg)
{
    struct drain_state *d = arg;
    d->calls++;
    d->all_done_before = true;
    for (int i = 0; i < d->n; i++)
        d->all_done_before &= d->r[i].done_calls == 1;
    assert_int_equal(bs_batcher_queued(d->f->b), 0);
    assert_int_equal(bs_batcher_running(d->f->b), 0);
    bs_batcher_free(d->f->b); /* allowed from done */
    d->f->b = NULL;
}

/* (9) Drain runs the queued work at once (no 10 s delay), then calls done,
 * which frees the batcher. */
static void test_drain(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(2, 10 * 1000000);
    struct req r[3] = {0};
    struct drain_state d = {&f, r, 3, 0, false};
    fx_init(&f, "btb_geglu_cross", &cfg);
    for (int i = 0; i < 3; i++) {
        r[i].index = i;
        req_btb(&r[i], 1, 20, 7);
        submit_ok(f.b, &r[i]);
    }
    uint64_t t0 = uv_hrtime();
    bs_batcher_drain(f.b, on_drained, &d);
    assert_int_equal(d.calls, 0); /* never inside drain */
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_true((uv_hrtime() - t0) / MS < 2000);
    assert_int_equal(d.calls, 1);
    assert_true(d.all_done_before);
    for (int i = 0; i < 3; i++)
        check_against_alone(f.model, &r[i]);
    fx_finish(&f); /* f.b is NULL: free already ran and its handles are closed */
    for (int i = 0; i < 3; i++)
        req_free(&r[i]);
}

/* Free with queued jobs (no drain): they hear BS_ECANCELED, memory is
 * released in the close callbacks. */
static void test_free_with_queued(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 10 * 1000000);
    struct req r[2] = {0};
    fx_init(&f, "btb_geglu_cross", &cfg);
    for (int i = 0; i < 2; i++) {
        req_btb(&r[i], 1, 20, 7);
        submit_ok(f.b, &r[i]);
    }
    bs_batcher_free(f.b);
    f.b = NULL;
    for (int i = 0; i < 2; i++) {
        assert_int_equal(r[i].done_calls, 1);
        assert_int_equal(r[i].rc, BS_ECANCELED);
    }
    fx_finish(&f);
    for (int i = 0; i < 2; i++)
        req_free(&r[i]);
}

/* (10) Statistics: samples, requests, batches, per-size entries. Batch sizes
 * 2, 1, 1, 2, 1 with max 4: one full batch of 4, then one of 3 after the
 * delay. */
static void test_stats(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(4, 20000);
    struct req r[5] = {0};
    int64_t sizes[5] = {2, 1, 1, 2, 1};
    uv_timeval64_t tv;
    fx_init(&f, "btb_geglu_cross", &cfg);
    for (int i = 0; i < 5; i++) {
        r[i].index = i;
        req_btb(&r[i], sizes[i], 20, 7);
        submit_ok(f.b, &r[i]);
    }
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    for (int i = 0; i < 5; i++)
        check_against_alone(f.model, &r[i]);
    const struct bs_model_stats *s = bs_batcher_stats(f.b);
    assert_int_equal(s->inference_count, 7);
    assert_int_equal(s->execution_count, 2);
    assert_int_equal(s->success.count, 5);
    assert_int_equal(s->fail.count, 0);
    assert_int_equal(s->queue.count, 5);
    assert_int_equal(s->compute_input.count, 2);
    assert_int_equal(s->compute_infer.count, 2);
    assert_int_equal(s->compute_output.count, 2);
    assert_true(s->compute_infer.ns > 0);
    assert_true(s->success.ns >= s->queue.ns);
    assert_int_equal(s->n_batch, 4);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(s->batch[i].batch_size, i + 1);
        uint64_t want = i == 3 || i == 2 ? 1 : 0;
        assert_int_equal(s->batch[i].compute_infer.count, want);
        assert_int_equal(s->batch[i].compute_input.count, want);
        assert_int_equal(s->batch[i].compute_output.count, want);
    }
    /* the second batch waited for the 20 ms delay */
    assert_true(s->queue.ns >= 2 * 20 * MS);
    assert_int_equal(uv_gettimeofday(&tv), 0);
    uint64_t now_ms = (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
    assert_true(s->last_inference_ms <= now_ms && s->last_inference_ms + 60000 > now_ms);
    fx_finish(&f);
    for (int i = 0; i < 5; i++)
        req_free(&r[i]);
}

/* A backend whose scratch allocations fail on demand (the arena's backend;
 * the weights stay on the real one). */
static struct bs_backend_i failing_iface;
static struct bs_backend failing_be;
static bool fail_allocs;

static void *failing_alloc(void *ctx, size_t size)
{
    return fail_allocs ? NULL : be.iface->buf_alloc(ctx, size);
}

/* A forward error fails every job of its batch with the engine's message;
 * the batcher keeps serving. */
static void test_forward_error(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 0);
    struct req r[3] = {0};
    failing_iface = *be.iface;
    failing_iface.buf_alloc = failing_alloc;
    failing_be.iface = &failing_iface;
    failing_be.ctx = be.ctx;
    fx_be = &failing_be;
    fx_init(&f, "btb_geglu_cross", &cfg);
    fx_be = &be;
    for (int i = 0; i < 3; i++) {
        r[i].index = i;
        req_btb(&r[i], 1, 20, 7);
    }
    fail_allocs = true;
    submit_ok(f.b, &r[0]);
    submit_ok(f.b, &r[1]);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(r[i].done_calls, 1);
        assert_int_equal(r[i].rc, BS_ENOMEM);
        assert_non_null(strstr(r[i].msg, "cannot allocate"));
    }
    fail_allocs = false;
    submit_ok(f.b, &r[2]);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    check_against_alone(f.model, &r[2]);
    const struct bs_model_stats *s = bs_batcher_stats(f.b);
    assert_int_equal(s->fail.count, 2);
    assert_int_equal(s->success.count, 1);
    assert_int_equal(s->execution_count, 1);
    assert_int_equal(s->inference_count, 1);
    fx_finish(&f);
    for (int i = 0; i < 3; i++)
        req_free(&r[i]);
}

static bool fail_attention;
static const struct bs_backend_i *real_iface;

/* What the CUDA backend returns when a kernel fails. */
static int failing_attention(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                             const struct bs_tensor *k, const struct bs_tensor *v,
                             const struct bs_attn_params *p, struct bs_err *err)
{
    if (fail_attention)
        return bs_err_set(err, BS_EINTERNAL,
                          "cuda attention: kernel launch: an illegal memory access");
    return real_iface->attention(ctx, o, q, k, v, p, err);
}

/* A backend failure (BS_EINTERNAL, a CUDA error) fails that batch's jobs with
 * its message; the next batch runs. The model's own backend fails (the test
 * backend's table is swapped for the test's duration). */
static void test_backend_internal_error(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving(8, 0);
    struct req r[3] = {0};
    real_iface = be.iface;
    failing_iface = *be.iface;
    failing_iface.attention = failing_attention;
    fx_init(&f, "btb_geglu_cross", &cfg);
    be.iface = &failing_iface;
    for (int i = 0; i < 3; i++) {
        r[i].index = i;
        req_btb(&r[i], 1, 20, 7);
    }
    fail_attention = true;
    submit_ok(f.b, &r[0]);
    submit_ok(f.b, &r[1]);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(r[i].done_calls, 1);
        assert_int_equal(r[i].rc, BS_EINTERNAL);
        assert_non_null(strstr(r[i].msg, "cuda attention"));
    }
    fail_attention = false;
    be.iface = real_iface;
    submit_ok(f.b, &r[2]);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    if (r[2].rc != 0)
        fail_msg("after the failed batch: %d %s", r[2].rc, r[2].msg);
    check_against_alone(f.model, &r[2]);
    fx_finish(&f);
    for (int i = 0; i < 3; i++)
        req_free(&r[i]);
}

/* ---- priority levels ----------------------------------------------------- */

static struct bs_serving_config serving_levels(int max_batch, int64_t delay_us, int levels,
                                               int default_level)
{
    struct bs_serving_config c = serving(max_batch, delay_us);
    c.priority_levels = levels;
    c.default_priority_level = default_level;
    return c;
}

/* Requests r[0..n) of one sample each, recording the order of their answers. */
static void reqs_init(struct req *r, int n, const uint64_t *priority, int *order, int *n_done)
{
    for (int i = 0; i < n; i++) {
        r[i].index = i;
        r[i].done_order = order;
        r[i].n_done = n_done;
        r[i].priority = priority[i];
        req_btb(&r[i], 1, 20, 7);
    }
}

static void reqs_free(struct req *r, int n)
{
    for (int i = 0; i < n; i++)
        req_free(&r[i]);
}

static void assert_order(const int *got, int n_got, const int *want, int n)
{
    if (n_got != n || memcmp(got, want, sizeof(int) * (size_t)n) != 0) {
        char g[64] = "", *p = g;
        for (int i = 0; i < n_got && i < 10; i++)
            p += snprintf(p, (size_t)(g + sizeof(g) - p), " %d", got[i]);
        fail_msg("answered in the order%s", g);
    }
}

/* (11) Priority under a busy worker: while r0's batch runs, two requests of
 * level 2 queue, then two of level 1. The next batch (max 3) takes level 1's
 * first and fills up with level 2's oldest; the last one runs after. */
static void test_priority_order(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving_levels(3, 0, 2, 2);
    struct req r[5] = {0}, *then[4] = {&r[1], &r[2], &r[3], &r[4]};
    int order[5], n_done = 0;
    reqs_init(r, 5, (uint64_t[]){0, 2, 2, 1, 1}, order, &n_done); /* r0: the default level, 2 */
    r[0].then = then; /* queued from r0's on_done: its batch still holds the worker */
    r[0].n_then = 4;
    fx_init(&f, "btb_geglu_cross", &cfg);
    submit_ok(f.b, &r[0]);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_order(order, n_done, (int[]){0, 3, 4, 1, 2}, 5);
    const struct bs_model_stats *s = bs_batcher_stats(f.b);
    assert_int_equal(s->execution_count, 3);
    assert_int_equal(s->batch[0].compute_infer.count, 2); /* r0, then r2 */
    assert_int_equal(s->batch[2].compute_infer.count, 1); /* r3, r4, r1 */
    for (int i = 0; i < 5; i++)
        check_against_alone(f.model, &r[i]);
    fx_finish(&f);
    reqs_free(r, 5);
}

/* (12) The default level: priority 0 and priorities above the levels go to
 * default_priority_level (Triton); one batch takes the levels in order. */
static void test_priority_default_level(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving_levels(8, 0, 3, 2);
    struct req r[5] = {0};
    int order[5], n_done = 0;
    reqs_init(r, 5, (uint64_t[]){0, 3, 2, 9, 1}, order, &n_done);
    fx_init(&f, "btb_geglu_cross", &cfg);
    for (int i = 0; i < 5; i++)
        submit_ok(f.b, &r[i]);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(bs_batcher_stats(f.b)->execution_count, 1);
    assert_order(order, n_done, (int[]){4, 0, 2, 3, 1}, 5);
    for (int i = 0; i < 5; i++)
        check_against_alone(f.model, &r[i]);
    fx_finish(&f);
    reqs_free(r, 5);
}

/* (13) max_queue_size per level: level 2's entry bounds it at 1, level 1
 * (no entry) has the default policy's 3. A full level refuses (BS_EBUSY,
 * counted) while the other still takes requests. */
static void test_priority_queue_size(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving_levels(8, 10 * 1000000, 2, 1);
    struct req r[6] = {0};
    struct bs_err err = {0};
    int order[6], n_done = 0;
    cfg.max_queue_size = 3;
    cfg.level_policy[1] =
        (struct bs_level_policy){BS_POLICY_GIVEN | BS_POLICY_QUEUE_SIZE, {.max_queue_size = 1}};
    reqs_init(r, 6, (uint64_t[]){2, 2, 1, 0, 7, 1}, order, &n_done);
    fx_init(&f, "btb_geglu_cross", &cfg);
    submit_ok(f.b, &r[0]);
    assert_int_equal(submit(f.b, &r[1], INT64_MAX, &err), BS_EBUSY);
    assert_string_equal(err.msg, "queue full at priority level 2 (1 requests)");
    for (int i = 2; i < 5; i++) /* level 1: 1, the default for 0, and for 7 */
        submit_ok(f.b, &r[i]);
    assert_int_equal(submit(f.b, &r[5], INT64_MAX, &err), BS_EBUSY);
    assert_string_equal(err.msg, "queue full at priority level 1 (3 requests)");
    assert_int_equal(bs_batcher_queued(f.b), 4);
    assert_int_equal(bs_batcher_stats(f.b)->fail.count, 2);
    bs_batcher_drain(f.b, NULL, NULL); /* now, not after 10 s */
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(bs_batcher_stats(f.b)->execution_count, 1);
    assert_order(order, n_done, (int[]){2, 3, 4, 0}, 4);
    for (int i = 0; i < 5; i++)
        if (i != 1)
            check_against_alone(f.model, &r[i]);
    fx_finish(&f);
    reqs_free(r, 6);
}

static void on_drain_timer(uv_timer_t *t)
{
    bs_batcher_drain(t->data, NULL, NULL);
    uv_close((uv_handle_t *)t, NULL);
}

/* Drain f's batcher ms from now (the jobs' timeouts pass first). */
static void drain_after(struct fx *f, uv_timer_t *t, uint64_t ms)
{
    uv_timer_init(&f->loop, t);
    t->data = f->b;
    uv_update_time(&f->loop);
    uv_timer_start(t, on_drain_timer, ms, 0);
}

/* (14) Queue timeouts by level, REJECT and DELAY, with a 10 s batching delay
 * and a drain at 60 ms:
 * - level 1 DELAYs: r1 (its own 10 ms timeout) goes behind r2, still runs,
 *   before level 3's r4; r3 (10 ms, and a 15 ms transport deadline) is
 *   delayed, then rejected at its deadline, which applies whatever the policy;
 * - level 2 REJECTs after its default 20 ms: r0. */
static void test_priority_timeouts(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving_levels(8, 10 * 1000000, 3, 3);
    struct req r[5] = {0};
    struct bs_err err = {0};
    uv_timer_t drain;
    int order[5], n_done = 0;
    cfg.level_policy[0] = (struct bs_level_policy){BS_POLICY_GIVEN | BS_POLICY_ACTION,
                                                   {.timeout_action = BS_TIMEOUT_DELAY}};
    cfg.level_policy[1] = (struct bs_level_policy){BS_POLICY_GIVEN | BS_POLICY_TIMEOUT,
                                                   {.default_timeout_us = 20000}};
    reqs_init(r, 5, (uint64_t[]){2, 1, 1, 1, 0}, order, &n_done);
    r[1].timeout_us = r[3].timeout_us = 10000;
    fx_init(&f, "btb_geglu_cross", &cfg);
    uint64_t t0 = uv_hrtime();
    for (int i = 0; i < 5; i++)
        assert_int_equal(submit(f.b, &r[i], i == 3 ? (int64_t)(t0 + 15 * MS) : INT64_MAX, &err), 0);
    drain_after(&f, &drain, 60);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_order(order, n_done, (int[]){3, 0, 2, 1, 4}, 5);
    assert_int_equal(r[3].rc, BS_ETIMEDOUT);
    assert_non_null(strstr(r[3].msg, "deadline exceeded in the queue after"));
    assert_int_equal(r[0].rc, BS_ETIMEDOUT);
    assert_non_null(strstr(r[0].msg, "timeout exceeded in the queue after"));
    if ((r[0].done_ns - t0) / MS < 19)
        fail_msg("level 2's 20 ms timeout passed early: %s", r[0].msg);
    if ((r[2].done_ns - t0) / MS < 59)
        fail_msg("the delayed job ran before the drain");
    for (int i = 1; i < 5; i++)
        if (i != 3)
            check_against_alone(f.model, &r[i]);
    const struct bs_model_stats *s = bs_batcher_stats(f.b);
    assert_int_equal(s->execution_count, 1);
    assert_int_equal(s->fail.count, 2);
    assert_int_equal(s->success.count, 3);
    fx_finish(&f);
    reqs_free(r, 5);
}

/* (15) The request's timeout overrides its level's only where the policy
 * allows, and only to shorten it: level 1 refuses overrides (r0's 10 ms is
 * ignored, it runs at the drain); level 2 (30 ms, overrides allowed) takes
 * r1's 10 ms but not r2's 10 s. */
static void test_priority_timeout_override(void **state)
{
    struct fx f;
    struct bs_serving_config cfg = serving_levels(8, 10 * 1000000, 2, 1);
    struct req r[3] = {0};
    uv_timer_t drain;
    int order[3], n_done = 0;
    cfg.level_policy[0] = (struct bs_level_policy){BS_POLICY_GIVEN | BS_POLICY_OVERRIDE,
                                                   {.allow_timeout_override = false}};
    cfg.level_policy[1] = (struct bs_level_policy){BS_POLICY_GIVEN | BS_POLICY_TIMEOUT,
                                                   {.default_timeout_us = 30000}};
    reqs_init(r, 3, (uint64_t[]){1, 2, 2}, order, &n_done);
    r[0].timeout_us = r[1].timeout_us = 10000;
    r[2].timeout_us = 10 * 1000000;
    fx_init(&f, "btb_geglu_cross", &cfg);
    uint64_t t0 = uv_hrtime();
    for (int i = 0; i < 3; i++)
        submit_ok(f.b, &r[i]);
    drain_after(&f, &drain, 80);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_order(order, n_done, (int[]){1, 2, 0}, 3);
    check_against_alone(f.model, &r[0]);
    for (int i = 1; i < 3; i++)
        assert_int_equal(r[i].rc, BS_ETIMEDOUT);
    uint64_t ms1 = (r[1].done_ns - t0) / MS, ms2 = (r[2].done_ns - t0) / MS;
    if (ms1 < 9 || ms2 < 29 || ms2 > 5000)
        fail_msg("timeouts after %llu and %llu ms (want 10 and 30)", (unsigned long long)ms1,
                 (unsigned long long)ms2);
    fx_finish(&f);
    reqs_free(r, 3);
}

/* Bad configurations are refused at init. */
static void test_bad_config(void **state)
{
    uv_loop_t loop;
    struct fx f;
    struct bs_serving_config cfg = serving(4, 0);
    struct bs_batcher_deps deps = {.be = &be};
    struct bs_err err = {0};
    bs_batcher_t *b = (bs_batcher_t *)&err;
    fx_init(&f, "btb_geglu_cross", &cfg);
    assert_int_equal(uv_loop_init(&loop), 0);
    cfg.max_batch_size = 0;
    assert_int_equal(bs_batcher_init(&b, &loop, f.model, &cfg, &deps, &err), BS_EINVAL);
    assert_null(b);
    cfg = serving(4, 0);
    cfg.preferred_batch_size[0] = 5;
    cfg.n_preferred = 1;
    assert_int_equal(bs_batcher_init(&b, &loop, f.model, &cfg, &deps, &err), BS_EINVAL);
    cfg = serving_levels(4, 0, 2, 0); /* levels need a default level */
    assert_int_equal(bs_batcher_init(&b, &loop, f.model, &cfg, &deps, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "serving.default_priority_level"));
    cfg = serving_levels(4, 0, 2, 3);
    assert_int_equal(bs_batcher_init(&b, &loop, f.model, &cfg, &deps, &err), BS_EINVAL);
    cfg = serving_levels(4, 0, 2, 1);
    cfg.level_policy[2].given = BS_POLICY_GIVEN; /* level 3 of 2 */
    assert_int_equal(bs_batcher_init(&b, &loop, f.model, &cfg, &deps, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "serving.priority_queue_policy"));
    cfg = serving(4, 0);
    deps.be = NULL;
    assert_int_equal(bs_batcher_init(&b, &loop, f.model, &cfg, &deps, &err), BS_EINVAL);
    assert_int_equal(uv_run(&loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
    fx_finish(&f);
}

static int setup(void **state)
{
    struct bs_err err = {0};
    if (bs_backend_init(&be, "cpu", 2, &err) != 0) {
        fprintf(stderr, "cpu backend: %s\n", err.msg);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    bs_backend_free(&be);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1)
        golden_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_batch_matches_alone),
        cmocka_unit_test(test_per_sample_conditioning),
        cmocka_unit_test(test_preferred_size),
        cmocka_unit_test(test_submit_errors),
        cmocka_unit_test(test_deadlines),
        cmocka_unit_test(test_cancel_queued),
        cmocka_unit_test(test_incompatible_signatures),
        cmocka_unit_test(test_output_dtypes),
        cmocka_unit_test(test_ragged_mixed_lengths),
        cmocka_unit_test(test_ragged_token_cap),
        cmocka_unit_test(test_stop_when_nobody_waits),
        cmocka_unit_test(test_stop_at_deadline),
        cmocka_unit_test(test_intermediate_stack),
        cmocka_unit_test(test_drain),
        cmocka_unit_test(test_free_with_queued),
        cmocka_unit_test(test_stats),
        cmocka_unit_test(test_forward_error),
        cmocka_unit_test(test_backend_internal_error),
        cmocka_unit_test(test_priority_order),
        cmocka_unit_test(test_priority_default_level),
        cmocka_unit_test(test_priority_queue_size),
        cmocka_unit_test(test_priority_timeouts),
        cmocka_unit_test(test_priority_timeout_override),
        cmocka_unit_test(test_bad_config),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
