/* Denoising sequences (server/sequences.c): call k of a sequence with
 * block_cache_interval N refreshes when k mod N = 0 and reuses otherwise;
 * sequence_end and idling free the state (the cached bytes return to their
 * value before); a small budget evicts the least recently used idle cache
 * and the evicted sequence refreshes and says so; calls of one sequence run
 * in order; every bad use is a clear error, naming the sequence as the
 * client did.
 *
 * usage: test_sequences [GOLDEN_DIR] */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"
#include "sequences.h"

static const char *golden_dir = "tests/golden";
static struct bs_backend be;
static bs_model_t *model, *other;

#define MS     1000000ull
#define TOKENS 20

/* A request's main input of b samples of l tokens (shape only). */
#define MAIN(b, l)                                                                                 \
    (&(struct bs_named_tensor){"hidden_states",                                                    \
                               bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){(b), (l), 32}, NULL)})

static const struct bs_seq_model settings = {.max_idle_us = 50000};

static struct bs_seq_params seq(uint64_t id, bool start, bool end, int64_t n)
{
    return (struct bs_seq_params){
        .given = true, .id = id, .start = start, .end = end, .cache_interval = n};
}

/* Begin and finish one call; its mode. */
static enum bs_cache_mode step(bs_seqs_t *s, struct bs_seq_params p, uint64_t now,
                               struct bs_seq_call *call)
{
    struct bs_err err = {0};
    bs_seq_t *q;
    int rc = bs_seqs_begin(s, model, &settings, &p, MAIN(1, TOKENS), now, &q, call, &err);
    if (rc != 0)
        fail_msg("begin: %d %s", rc, err.msg);
    bs_seqs_finish(s, q, 0, now);
    return call->mode;
}

static void test_interval_and_end(void **state)
{
    (void)state;
    bs_seqs_t *s;
    struct bs_err err = {0};
    struct bs_seq_call c;
    struct bs_seq_stats st;
    assert_int_equal(bs_seqs_init(&s, 64 << 20, &err), 0);
    size_t bytes = bs_block_cache_bytes_for(model, TOKENS);
    assert_true(bytes > 0);
    static const enum bs_cache_mode want[7] = {BS_CACHE_REFRESH, BS_CACHE_REUSE, BS_CACHE_REUSE,
                                               BS_CACHE_REFRESH, BS_CACHE_REUSE, BS_CACHE_REUSE,
                                               BS_CACHE_REFRESH};
    for (int k = 0; k < 7; k++) {
        assert_int_equal(step(s, seq(7, k == 0, false, 3), 0, &c), want[k]);
        assert_int_equal(c.index, k);
        assert_true(c.cached);
        assert_false(c.evicted);
        assert_non_null(c.cache);
    }
    bs_seqs_stats(s, model, &st);
    assert_int_equal(st.sequences, 1);
    assert_int_equal(st.bytes, bytes);
    assert_int_equal(st.hits, 4);
    assert_int_equal(st.refreshes, 3);
    /* N = 1 (or none): exact, nothing stored, the sequence goes on */
    assert_int_equal(step(s, seq(8, true, false, 1), 0, &c), BS_CACHE_OFF);
    assert_null(c.cache);
    assert_int_equal(step(s, seq(8, false, false, 0), 0, &c), BS_CACHE_OFF);
    assert_int_equal(c.index, 1);
    /* sequence_end frees the state: the bytes return to their value before */
    assert_int_equal(step(s, seq(7, false, true, 3), 0, &c), BS_CACHE_REUSE);
    bs_seqs_stats(s, model, &st);
    assert_int_equal(st.bytes, 0);
    assert_int_equal(st.sequences, 1); /* 8 */
    bs_seq_t *q;
    struct bs_seq_params p = seq(7, false, false, 3);
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(1, TOKENS), 0, &q, &c, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "start it with sequence_start"));
    bs_seqs_free(s);
}

static void test_bad_use(void **state)
{
    (void)state;
    bs_seqs_t *s;
    bs_seq_t *q;
    struct bs_err err = {0};
    struct bs_seq_call c;
    assert_int_equal(bs_seqs_init(&s, 64 << 20, &err), 0);
    struct bs_seq_params p = seq(0, true, false, 0);
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(1, TOKENS), 0, &q, &c, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "needs a sequence_id"));
    p = seq(0, false, false, 0);
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(1, TOKENS), 0, &q, &c, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "sequence_id 0"));
    p = (struct bs_seq_params){.cache_interval = 4}; /* no sequence at all */
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(1, TOKENS), 0, &q, &c, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "needs a sequence"));
    p = seq(3, true, false, -2);
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(1, TOKENS), 0, &q, &c, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "must be 1 or more"));
    p = seq(3, true, false, 2);
    assert_int_equal(bs_seqs_begin(s, other, &settings, &p, MAIN(1, TOKENS), 0, &q, &c, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "no transformer blocks"));
    /* a shape change while caching */
    assert_int_equal(step(s, seq(3, true, false, 2), 0, &c), BS_CACHE_REFRESH);
    p = seq(3, false, false, 2);
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(1, TOKENS + 1), 0, &q, &c, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "must stay fixed"));
    /* calls of a sequence run in order: a second while one runs waits */
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(1, TOKENS), 0, &q, &c, &err), 0);
    assert_int_equal(c.mode, BS_CACHE_REUSE);
    bs_seq_t *q2;
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(1, TOKENS), 0, &q2, &c, &err), 1);
    assert_ptr_equal(q2, q);
    bs_seqs_finish(s, q, 0, 0);
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(1, TOKENS), 0, &q2, &c, &err), 0);
    assert_int_equal(c.mode, BS_CACHE_REFRESH);
    assert_int_equal(c.index, 2);
    /* a failed refresh leaves nothing to reuse: the next call refreshes */
    bs_seqs_finish(s, q2, BS_ENOMEM, 0);
    assert_int_equal(step(s, seq(3, false, false, 2), 0, &c), BS_CACHE_REFRESH);
    assert_true(c.evicted);
    bs_seqs_free(s);
}

static void test_budget_and_idle(void **state)
{
    (void)state;
    bs_seqs_t *s;
    struct bs_err err = {0};
    struct bs_seq_call c;
    struct bs_seq_stats st;
    size_t bytes = bs_block_cache_bytes_for(model, TOKENS);
    assert_int_equal(bs_seqs_init(&s, 2 * bytes, &err), 0); /* room for two caches */
    assert_int_equal(step(s, seq(1, true, false, 2), 1 * MS, &c), BS_CACHE_REFRESH);
    assert_int_equal(step(s, seq(2, true, false, 2), 2 * MS, &c), BS_CACHE_REFRESH);
    assert_int_equal(step(s, seq(1, false, false, 2), 3 * MS, &c), BS_CACHE_REUSE);
    /* a third evicts the least recently used: sequence 2 */
    assert_int_equal(step(s, seq(3, true, false, 2), 4 * MS, &c), BS_CACHE_REFRESH);
    bs_seqs_stats(s, NULL, &st);
    assert_int_equal(st.evictions, 1);
    assert_int_equal(st.bytes, 2 * bytes);
    /* sequence 2 refreshes where it would have reused, and says so */
    assert_int_equal(step(s, seq(2, false, false, 2), 5 * MS, &c), BS_CACHE_REFRESH);
    assert_true(c.evicted);
    /* the model's own cap: one cache */
    struct bs_seq_model capped = {.max_idle_us = 50000, .cache_bytes = bytes};
    bs_seq_t *q;
    struct bs_seq_params p = seq(9, true, false, 2);
    assert_int_equal(bs_seqs_begin(s, model, &capped, &p, MAIN(1, TOKENS), 6 * MS, &q, &c, &err),
                     0);
    assert_int_equal(c.mode, BS_CACHE_REFRESH);
    bs_seqs_finish(s, q, 0, 6 * MS);
    bs_seqs_stats(s, model, &st);
    assert_true(st.bytes <= 2 * bytes);
    /* a cache larger than the whole budget: exact, nothing stored */
    p = seq(10, true, false, 2);
    assert_int_equal(
        bs_seqs_begin(s, model, &settings, &p, MAIN(1, 100 * TOKENS), 6 * MS, &q, &c, &err), 0);
    assert_int_equal(c.mode, BS_CACHE_OFF);
    assert_true(c.cached);
    bs_seqs_finish(s, q, 0, 6 * MS);
    /* idling past max_sequence_idle_microseconds ends them all */
    bs_seqs_stats(s, NULL, &st);
    uint64_t live = st.sequences;
    assert_true(live >= 4);
    assert_int_equal(bs_seqs_expire(s, 7 * MS), 53 * (int64_t)MS); /* sequence 1: 3 ms + 50 */
    assert_int_equal(bs_seqs_expire(s, 100 * MS), INT64_MAX);
    bs_seqs_stats(s, NULL, &st);
    assert_int_equal(st.sequences, 0);
    assert_int_equal(st.bytes, 0);
    assert_int_equal(st.expired, live);
    p = seq(1, false, false, 2);
    assert_int_equal(
        bs_seqs_begin(s, model, &settings, &p, MAIN(1, TOKENS), 101 * MS, &q, &c, &err), BS_EINVAL);
    /* a model being unloaded takes its sequences with it */
    assert_int_equal(step(s, seq(4, true, false, 2), 200 * MS, &c), BS_CACHE_REFRESH);
    bs_seqs_drop_model(s, model);
    bs_seqs_stats(s, NULL, &st);
    assert_int_equal(st.sequences, 0);
    assert_int_equal(st.bytes, 0);
    bs_seqs_free(s);
}

/* A shape change that keeps the token count ([1, 40] after [2, 20]) is a
 * shape change too: the cache's rows would be reused for other tokens.
 * Messages name a sequence as the client did. */
static void test_shape_and_names(void **state)
{
    (void)state;
    bs_seqs_t *s;
    bs_seq_t *q;
    struct bs_err err = {0};
    struct bs_seq_call c;
    assert_int_equal(bs_seqs_init(&s, 64 << 20, &err), 0);
    struct bs_seq_params p = seq(5, true, false, 2);
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(2, 20), 0, &q, &c, &err), 0);
    assert_int_equal(c.mode, BS_CACHE_REFRESH);
    bs_seqs_finish(s, q, 0, 0);
    p = seq(5, false, false, 2);
    static const int64_t shapes[][2] = {{1, 40}, {4, 10}, {2, 21}, {1, 20}};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(shapes[i][0], shapes[i][1]), 0,
                                       &q, &c, &err),
                         BS_EINVAL);
        assert_non_null(strstr(err.msg, "sequence 5: hidden_states of shape ["));
        assert_non_null(strstr(err.msg, "where its earlier calls had [2, 20, 32]"));
    }
    /* the refused calls were no calls: the next is call 1, a reuse */
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(2, 20), 0, &q, &c, &err), 0);
    assert_int_equal(c.mode, BS_CACHE_REUSE);
    assert_int_equal(c.index, 1);
    bs_seqs_finish(s, q, 0, 0);
    /* a string id: named by its text */
    p = seq(0x8000000000000123ull, false, false, 2);
    snprintf(p.name, sizeof(p.name), "\"denoise-a\"");
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(2, 20), 0, &q, &c, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "sequence \"denoise-a\" is not known"));
    /* sequence_id 0 is refused whatever the interval */
    p = seq(0, false, false, 1);
    assert_int_equal(bs_seqs_begin(s, model, &settings, &p, MAIN(2, 20), 0, &q, &c, &err),
                     BS_EINVAL);
    assert_non_null(strstr(err.msg, "sequence_id 0"));
    bs_seqs_free(s);
}

/* A huge max_sequence_idle_microseconds means never, not a time in the past
 * (it overflowed into one). */
static void test_huge_idle_time(void **state)
{
    (void)state;
    bs_seqs_t *s;
    bs_seq_t *q;
    struct bs_err err = {0};
    struct bs_seq_call c;
    struct bs_seq_stats st;
    const struct bs_seq_model forever = {.max_idle_us = INT64_MAX / 1000}; /* serving's bound */
    uint64_t now = 5000 * MS;
    assert_int_equal(bs_seqs_init(&s, 64 << 20, &err), 0);
    struct bs_seq_params p = seq(6, true, false, 2);
    assert_int_equal(bs_seqs_begin(s, model, &forever, &p, MAIN(1, TOKENS), now, &q, &c, &err), 0);
    bs_seqs_finish(s, q, 0, now);
    assert_int_equal(bs_seqs_expire(s, now + MS), INT64_MAX);
    bs_seqs_stats(s, NULL, &st);
    assert_int_equal(st.sequences, 1);
    assert_int_equal(st.expired, 0);
    bs_seqs_free(s);
}

static int released;

static void release(void *arg, bs_block_cache_t *cache)
{
    (void)arg;
    released++;
    bs_block_cache_free(cache);
}

/* Dropped caches go to the release hook (the core frees them off the loop);
 * bs_seqs_free frees what is left itself. */
static void test_release_hook(void **state)
{
    (void)state;
    bs_seqs_t *s;
    struct bs_err err = {0};
    struct bs_seq_call c;
    size_t bytes = bs_block_cache_bytes_for(model, TOKENS);
    assert_int_equal(bs_seqs_init(&s, 2 * bytes, &err), 0);
    bs_seqs_set_release(s, release, NULL);
    released = 0;
    assert_int_equal(step(s, seq(1, true, false, 2), 0, &c), BS_CACHE_REFRESH);
    assert_int_equal(step(s, seq(2, true, false, 2), 0, &c), BS_CACHE_REFRESH);
    assert_int_equal(step(s, seq(3, true, false, 2), 0, &c), BS_CACHE_REFRESH); /* evicts 1 */
    assert_int_equal(released, 1);
    assert_int_equal(step(s, seq(2, false, true, 2), 0, &c), BS_CACHE_REUSE); /* ends 2 */
    assert_int_equal(released, 2);
    assert_int_equal(step(s, seq(4, true, false, 2), 0, &c), BS_CACHE_REFRESH);
    bs_seqs_free(s); /* 3 and 4: freed here */
    assert_int_equal(released, 2);
}

static int setup(void **state)
{
    struct bs_err err = {0};
    char path[4096];
    (void)state;
    if (bs_backend_cpu_init(&be, 1, &err) != 0)
        return -1;
    snprintf(path, sizeof(path), "%s/btb_geglu_cross", golden_dir);
    if (bs_model_load(&model, path, &be, &err) != 0)
        return -1;
    snprintf(path, sizeof(path), "%s/attnblock_4heads", golden_dir);
    return bs_model_load(&other, path, &be, &err);
}

static int teardown(void **state)
{
    (void)state;
    bs_model_free(model);
    bs_model_free(other);
    bs_backend_free(&be);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1)
        golden_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_interval_and_end), cmocka_unit_test(test_bad_use),
        cmocka_unit_test(test_budget_and_idle),  cmocka_unit_test(test_shape_and_names),
        cmocka_unit_test(test_huge_idle_time),   cmocka_unit_test(test_release_hook),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
