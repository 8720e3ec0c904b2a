/* The inference core without any transport: requests go in as decoded
 * structs, answers come back through the reply callbacks, and every outcome
 * is counted once (statistics, metrics, unrouted). A repository of one
 * golden model (btb_geglu_cross) on the CPU backend.
 *
 *     test_core GOLDEN_DIR */
#include <setjmp.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "batcher.h"
#include "core.h"
#include "metrics.h"
#include "repository.h"

static const char *golden_dir;
static struct bs_backend be;
/* The fixture's model control (test_model_control: explicit, "m" loaded). */
static enum bs_repo_control fx_control = BS_REPO_CONTROL_NONE;

struct fx {
    uv_loop_t loop;
    char root[256];
    bs_metrics_t *metrics;
    bs_repository_t *repo;
    bs_core_t *core;
};

/* One request and what it heard. */
struct req {
    float hs[20 * 32], ehs[7 * 24];
    struct bs_named_tensor in[2];
    bs_core_req_t *handle;
    int outputs, done;
    int rc;
    char msg[256];
    int64_t out_ne0;
    bool fail_output;  /* on_output refuses (as an answer over the message limit) */
    const char *cache; /* bs_core_block_cache, seen by on_output */
    /* on_done looks for this line in the metrics (metrics_seen) */
    const char *metric;
    bs_metrics_t *metrics;
    bool metric_seen;
};

/* The metrics text has this line. */
static bool text_has(bs_metrics_t *m, const char *line)
{
    char *text;
    size_t len;
    struct bs_err err = {0};
    assert_int_equal(bs_metrics_render(m, &text, &len, &err), 0);
    bool found = strstr(text, line) != NULL;
    free(text);
    return found;
}

static int on_output(void *arg, const struct bs_tensor *out, struct bs_err *err)
{
    struct req *r = arg;
    r->outputs++;
    r->out_ne0 = out->ne[0];
    r->cache = bs_core_block_cache(r->handle);
    if (r->fail_output)
        return bs_err_set(err, BS_ERANGE, "answer too large");
    return 0;
}

static void on_done(void *arg, int rc, const char *msg)
{
    struct req *r = arg;
    r->done++;
    r->rc = rc;
    snprintf(r->msg, sizeof(r->msg), "%s", msg ? msg : "");
    if (r->metric != NULL)
        r->metric_seen = text_has(r->metrics, r->metric);
}

static const struct bs_core_reply reply = {.on_output = on_output, .on_done = on_done};

static void req_init(struct req *r)
{
    memset(r, 0, sizeof(*r));
    for (size_t i = 0; i < BS_ARRAY_LEN(r->hs); i++)
        r->hs[i] = (float)((i * 37) % 17) / 17.0f - 0.5f;
    for (size_t i = 0; i < BS_ARRAY_LEN(r->ehs); i++)
        r->ehs[i] = (float)((i * 11) % 13) / 13.0f - 0.5f;
    r->in[0] = (struct bs_named_tensor){
        "hidden_states", bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, 20, 32}, r->hs)};
    r->in[1] = (struct bs_named_tensor){
        "encoder_hidden_states", bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, 7, 24}, r->ehs)};
}

static struct bs_core_request request(struct req *r, const char *model)
{
    return (struct bs_core_request){.model_name = model,
                                    .model_version = "",
                                    .inputs = r->in,
                                    .n_inputs = 2,
                                    .deadline_ns = INT64_MAX};
}

/* A core over a repository of one model, "m", served with sc. */
static void fx_init_serving(struct fx *f, int max_inflight, const struct bs_serving_config *sc)
{
    struct bs_err err = {0};
    char link[512], target[512];
    memset(f, 0, sizeof(*f));
    assert_int_equal(uv_loop_init(&f->loop), 0);
    snprintf(f->root, sizeof(f->root), "/tmp/bs_test_core_XXXXXX");
    assert_non_null(mkdtemp(f->root));
    snprintf(link, sizeof(link), "%s/m", f->root);
    snprintf(target, sizeof(target), "%s/btb_geglu_cross", golden_dir);
    assert_int_equal(symlink(target, link), 0);
    assert_int_equal(bs_metrics_init(&f->metrics, NULL, &err), 0);
    const char *dirs[] = {f->root};
    const char *load[] = {"m"};
    struct bs_repo_options ro = {.dirs = dirs,
                                 .n_dirs = 1,
                                 .defaults = *sc,
                                 .metrics = f->metrics,
                                 .control = fx_control,
                                 .load_models = load,
                                 .n_load_models = fx_control == BS_REPO_CONTROL_EXPLICIT};
    if (bs_repository_init(&f->repo, &f->loop, &be, &ro, &err) != 0)
        fail_msg("repository: %s", err.msg);
    struct bs_core_options co = {
        .max_inflight = max_inflight, .metrics = f->metrics, .block_cache_bytes = 1 << 20};
    assert_int_equal(bs_core_init(&f->core, f->repo, &co, &err), 0);
}

static void fx_init(struct fx *f, int max_inflight, int max_queue)
{
    struct bs_serving_config sc = {
        .max_batch_size = 4, .max_queue_delay_us = 1000, .max_queue_size = max_queue};
    fx_init_serving(f, max_inflight, &sc);
}

static void fx_finish(struct fx *f)
{
    char link[512];
    assert_int_equal(bs_core_in_flight(f->core), 0);
    bs_core_free(f->core);
    bs_repository_free(f->repo);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    bs_metrics_free(f->metrics);
    snprintf(link, sizeof(link), "%s/m", f->root);
    unlink(link);
    rmdir(f->root);
}

static const struct bs_model_stats *stats(struct fx *f)
{
    return bs_batcher_stats(bs_repository_find(f->repo, "m")->batcher);
}

/* ... the fixture's metrics. */
static bool metrics_has(struct fx *f, const char *line)
{
    return text_has(f->metrics, line);
}

/* Requests run, are answered through the callbacks, and are counted. */
static void test_answers(void **state)
{
    struct fx f;
    struct req r[3];
    struct bs_err err = {0};
    fx_init(&f, 0, 16);
    for (int i = 0; i < 3; i++) {
        req_init(&r[i]);
        struct bs_core_request cr = request(&r[i], "m");
        assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r[i], &r[i].handle, &err), 0);
        assert_int_equal(r[i].done, 0); /* never inside submit */
    }
    assert_int_equal(bs_core_in_flight(f.core), 3);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(r[i].outputs, 1);
        assert_int_equal(r[i].done, 1);
        assert_int_equal(r[i].rc, 0);
        assert_int_equal(r[i].out_ne0, 1);
    }
    assert_int_equal(stats(&f)->success.count, 3);
    assert_int_equal(stats(&f)->inference_count, 3);
    fx_finish(&f);
}

/* Failures before the batcher are counted under the model they name, or as
 * unrouted; a failing on_output is a failure too. */
static void test_counting(void **state)
{
    struct fx f;
    struct req r;
    struct bs_err err = {0};
    fx_init(&f, 0, 16);
    req_init(&r);
    struct bs_core_request cr = request(&r, "nope");
    assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r, &r.handle, &err), BS_ENOTFOUND);
    assert_non_null(strstr(err.msg, "unknown model \"nope\""));
    cr = request(&r, "m");
    cr.model_version = "2";
    assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r, &r.handle, &err), BS_ENOTFOUND);
    bs_core_count_failure(f.core, "m", "", BS_EINVAL); /* a front end's decode failure */
    bs_core_count_failure(f.core, NULL, NULL, BS_EINVAL);
    bs_core_count_lost(f.core, true);
    assert_true(metrics_has(&f, "blockserve_unrouted_request_failure_total{reason=\"OTHER\"} 3"));
    assert_true(
        metrics_has(&f, "blockserve_unrouted_request_failure_total{reason=\"CANCELED\"} 1"));
    assert_int_equal(stats(&f)->fail.count, 1);

    r.fail_output = true;
    cr = request(&r, "m");
    assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r, &r.handle, &err), 0);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(r.done, 1);
    assert_int_equal(r.rc, BS_ERANGE);
    assert_string_equal(r.msg, "answer too large");
    assert_int_equal(stats(&f)->fail.count, 2);
    assert_int_equal(stats(&f)->success.count, 0);
    assert_int_equal(stats(&f)->inference_count, 0); /* Triton: successful samples only */
    assert_true(metrics_has(&f, "nv_inference_request_failure{model=\"m\",version=\"1\","
                                "reason=\"OTHER\"} 2"));
    fx_finish(&f);
}

/* Admission: the in-flight bound and a full sender refuse at once (BS_EBUSY,
 * counted REJECTED); a huge timeout means no deadline. */
static void test_admission(void **state)
{
    struct fx f;
    struct req r[3];
    struct bs_err err = {0};
    fx_init(&f, 1, 16);
    for (int i = 0; i < 3; i++)
        req_init(&r[i]);
    struct bs_core_request cr = request(&r[0], "m");
    cr.timeout_us = INT64_MAX; /* saturates: no deadline */
    assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r[0], &r[0].handle, &err), 0);
    cr = request(&r[1], "m");
    assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r[1], &r[1].handle, &err), BS_EBUSY);
    assert_non_null(strstr(err.msg, "--max-inflight"));
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(r[0].rc, 0);
    cr = request(&r[2], "m");
    cr.sender_full = true;
    assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r[2], &r[2].handle, &err), BS_EBUSY);
    assert_int_equal(stats(&f)->fail.count, 2);
    assert_true(metrics_has(&f, "nv_inference_request_failure{model=\"m\",version=\"1\","
                                "reason=\"REJECTED\"} 2"));
    fx_finish(&f);
}

/* Cancel and shutdown: a cancelled request hears BS_ECANCELED; at shutdown
 * every request in flight is answered at once (BS_EUNSUPP) and later ones
 * are refused. */
static void test_cancel_and_shutdown(void **state)
{
    struct fx f;
    struct req r[4];
    struct bs_err err = {0};
    fx_init(&f, 0, 16);
    for (int i = 0; i < 4; i++) {
        req_init(&r[i]);
        if (i == 3)
            break;
        struct bs_core_request cr = request(&r[i], "m");
        assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r[i], &r[i].handle, &err), 0);
    }
    bs_core_cancel(f.core, r[0].handle);
    assert_int_equal(r[0].done, 1); /* queued: at once */
    assert_int_equal(r[0].rc, BS_ECANCELED);
    bs_core_shutdown(f.core);
    for (int i = 1; i < 3; i++) {
        assert_int_equal(r[i].done, 1);
        assert_int_equal(r[i].rc, BS_EUNSUPP);
        assert_non_null(strstr(r[i].msg, "shutting down"));
    }
    assert_false(bs_core_accepting(f.core));
    struct bs_core_request cr = request(&r[3], "m");
    assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r[3], &r[3].handle, &err), BS_EUNSUPP);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(r[i].done, 1); /* answered once */
    fx_finish(&f);
}

/* The request's priority and timeout reach the batcher, whose queue policy
 * decides them: level 1 takes overrides (a 1 us timeout expires in the
 * queue), level 2 refuses them (the same timeout is ignored). Requests are
 * counted by level. */
static void test_priority_and_timeout(void **state)
{
    struct fx f;
    struct req r[4];
    struct bs_err err = {0};
    struct bs_serving_config sc = {.max_batch_size = 4,
                                   .max_queue_delay_us = 1000,
                                   .max_queue_size = 16,
                                   .priority_levels = 2,
                                   .default_priority_level = 2};
    sc.level_policy[1] = (struct bs_level_policy){BS_POLICY_GIVEN | BS_POLICY_OVERRIDE,
                                                  {.allow_timeout_override = false}};
    fx_init_serving(&f, 0, &sc);
    uint64_t priority[4] = {1, 2, 0, 5}; /* 0 and 5: the default level, 2 */
    for (int i = 0; i < 4; i++) {
        req_init(&r[i]);
        struct bs_core_request cr = request(&r[i], "m");
        cr.priority = priority[i];
        cr.timeout_us = 1;
        assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r[i], &r[i].handle, &err), 0);
    }
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(r[0].rc, BS_ETIMEDOUT);
    assert_non_null(strstr(r[0].msg, "timeout exceeded in the queue"));
    for (int i = 1; i < 4; i++) {
        assert_int_equal(r[i].rc, 0);
        assert_int_equal(r[i].outputs, 1);
    }
    assert_true(metrics_has(
        &f, "blockserve_inference_requests_total{model=\"m\",version=\"1\",priority=\"1\"} 1"));
    assert_true(metrics_has(
        &f, "blockserve_inference_requests_total{model=\"m\",version=\"1\",priority=\"2\"} 3"));
    assert_true(metrics_has(&f, "nv_inference_request_failure{model=\"m\",version=\"1\","
                                "reason=\"REJECTED\"} 1"));
    fx_finish(&f);
}

/* A load or unload's answer. */
struct ctl_done {
    int calls, rc;
    char msg[512];
};

static void on_ctl_done(void *arg, int rc, const char *msg)
{
    struct ctl_done *d = arg;
    d->calls++;
    d->rc = rc;
    snprintf(d->msg, sizeof(d->msg), "%s", msg ? msg : "");
}

/* Model control under requests: a reload swaps the model while requests
 * of the old one run (they finish normally, holding the old entry); an
 * unload answers the queued requests, then refuses new ones (NOT_FOUND);
 * a load brings it back. Every request holds a reference on its entry. */
static void test_model_control(void **state)
{
    struct fx f;
    struct req r[6];
    struct bs_err err = {0};
    struct ctl_done load = {0}, unload = {0};
    fx_control = BS_REPO_CONTROL_EXPLICIT;
    fx_init(&f, 0, 16);
    fx_control = BS_REPO_CONTROL_NONE;
    struct bs_repo_model *old = bs_repository_find(f.repo, "m");
    assert_non_null(old);
    assert_non_null(old->model);
    for (int i = 0; i < 3; i++) {
        req_init(&r[i]);
        struct bs_core_request cr = request(&r[i], "m");
        assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r[i], &r[i].handle, &err), 0);
    }
    assert_int_equal(old->refs, 3);
    assert_int_equal(bs_repository_load(f.repo, "m", on_ctl_done, &load, &err), 0);
    assert_int_equal(load.calls, 0); /* never inside the call */
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(load.calls, 1);
    assert_int_equal(load.rc, 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(r[i].rc, 0); /* the old entry answered them */
    struct bs_repo_model *now = bs_repository_find(f.repo, "m");
    assert_non_null(now);
    assert_ptr_not_equal(now, old); /* swapped (the old one is freed: ASan watches) */
    assert_int_equal(now->refs, 0);
    assert_string_equal(now->version_str, "1");

    /* unload while two requests are queued: they finish, then it is gone */
    for (int i = 3; i < 5; i++) {
        req_init(&r[i]);
        struct bs_core_request cr = request(&r[i], "m");
        assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r[i], &r[i].handle, &err), 0);
    }
    assert_int_equal(bs_repository_unload(f.repo, "m", on_ctl_done, &unload, &err), 0);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(unload.calls, 1);
    assert_int_equal(unload.rc, 0);
    assert_int_equal(r[3].rc, 0);
    assert_int_equal(r[4].rc, 0);
    req_init(&r[5]);
    struct bs_core_request cr = request(&r[5], "m");
    assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r[5], &r[5].handle, &err), BS_ENOTFOUND);
    assert_non_null(strstr(err.msg, "unloaded"));
    assert_null(bs_core_lookup(f.core, "m", "", true, &err));
    struct bs_repo_model *marker = bs_core_lookup(f.core, "m", "", false, &err);
    assert_non_null(marker); /* ModelReady: known, not ready */
    assert_null(marker->model);

    /* and back */
    load.calls = 0;
    assert_int_equal(bs_repository_load(f.repo, "m", on_ctl_done, &load, &err), 0);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(load.rc, 0);
    req_init(&r[5]);
    cr = request(&r[5], "m");
    assert_int_equal(bs_core_submit(f.core, &cr, &reply, &r[5], &r[5].handle, &err), 0);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(r[5].rc, 0);
    assert_int_equal(r[5].outputs, 1);
    fx_finish(&f);
}

/* Submit r as a call of sequence id (its main input [1, tokens, 32]). */
static int seq_submit(struct fx *f, struct req *r, uint64_t id, bool start, bool end,
                      int64_t tokens)
{
    struct bs_err err = {0};
    struct bs_core_request cr = request(r, "m");
    r->in[0].t = bs_tensor_make(BS_TYPE_F32, 3, (int64_t[]){1, tokens, 32}, r->hs);
    cr.seq = (struct bs_seq_params){
        .given = true, .id = id, .start = start, .end = end, .cache_interval = 2};
    int rc = bs_core_submit(f->core, &cr, &reply, r, &r->handle, &err);
    if (rc != 0)
        snprintf(r->msg, sizeof(r->msg), "%.200s", err.msg);
    return rc;
}

/* Calls of a sequence sent while one runs wait in the core and run in
 * order; one of them failing as it begins (a shape change) does not strand
 * those behind it. A sequence_end's answer goes out after the metrics
 * show its cache gone. */
static void test_sequence_waiters(void **state)
{
    struct fx f;
    struct req r[5];
    struct bs_serving_config sc = {.max_batch_size = 4,
                                   .max_queue_delay_us = 1000,
                                   .max_queue_size = 16,
                                   .max_sequence_idle_us = 60000000};
    fx_init_serving(&f, 0, &sc);
    for (int i = 0; i < 5; i++)
        req_init(&r[i]);
    assert_int_equal(seq_submit(&f, &r[0], 1, true, false, 20), 0);
    assert_int_equal(seq_submit(&f, &r[1], 1, false, false, 10), 0); /* waits, then fails */
    assert_int_equal(seq_submit(&f, &r[2], 1, false, false, 20), 0);
    assert_int_equal(seq_submit(&f, &r[3], 1, false, false, 10), 0); /* waits, then fails */
    r[4].metric = "blockserve_block_cache_bytes{model=\"m\",version=\"1\"} 0";
    r[4].metrics = f.metrics;
    assert_int_equal(seq_submit(&f, &r[4], 1, false, true, 20), 0);
    assert_int_equal(bs_core_in_flight(f.core), 5);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    for (int i = 0; i < 5; i++)
        assert_int_equal(r[i].done, 1);
    assert_int_equal(r[0].rc, 0);
    assert_string_equal(r[0].cache, "refresh");
    for (int i = 1; i < 4; i += 2) {
        assert_int_equal(r[i].rc, BS_EINVAL);
        assert_non_null(strstr(r[i].msg, "sequence 1: hidden_states of shape [1, 10, 32]"));
    }
    assert_int_equal(r[2].rc, 0);
    assert_string_equal(r[2].cache, "reuse"); /* call 1 */
    assert_int_equal(r[4].rc, 0);
    assert_string_equal(r[4].cache, "refresh"); /* call 2 */
    assert_true(r[4].metric_seen);
    assert_true(metrics_has(&f, "blockserve_sequences{model=\"m\",version=\"1\"} 0"));
    fx_finish(&f);
}

/* Without the idle timer (no loop given to the core), a sequence idle past
 * its time is gone for the next call that looks for it. */
static void test_sequence_idle_without_timer(void **state)
{
    struct fx f;
    struct req r[2];
    struct bs_serving_config sc = {.max_batch_size = 4,
                                   .max_queue_delay_us = 1000,
                                   .max_queue_size = 16,
                                   .max_sequence_idle_us = 1000};
    fx_init_serving(&f, 0, &sc);
    req_init(&r[0]);
    req_init(&r[1]);
    assert_int_equal(seq_submit(&f, &r[0], 9, true, false, 20), 0);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(r[0].rc, 0);
    usleep(20000);
    assert_int_equal(seq_submit(&f, &r[1], 9, false, false, 20), BS_EINVAL);
    assert_non_null(strstr(r[1].msg, "sequence 9 is not known"));
    assert_true(metrics_has(&f, "blockserve_sequence_expired_count{model=\"m\",version=\"1\"} 1"));
    fx_finish(&f);
}

int main(int argc, char **argv)
{
    struct bs_err err = {0};
    if (argc != 2) {
        fprintf(stderr, "usage: test_core GOLDEN_DIR\n");
        return 2;
    }
    static char golden[4096];
    if (realpath(argv[1], golden) == NULL) { /* symlinks in a temporary folder point here */
        fprintf(stderr, "test_core: %s: not found\n", argv[1]);
        return 2;
    }
    golden_dir = golden;
    if (bs_backend_cpu_init(&be, 1, &err) != 0) {
        fprintf(stderr, "cpu backend: %s\n", err.msg);
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_answers),
        cmocka_unit_test(test_counting),
        cmocka_unit_test(test_admission),
        cmocka_unit_test(test_cancel_and_shutdown),
        cmocka_unit_test(test_priority_and_timeout),
        cmocka_unit_test(test_sequence_waiters),
        cmocka_unit_test(test_sequence_idle_without_timer),
        cmocka_unit_test(test_model_control),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    bs_backend_free(&be);
    return rc;
}
