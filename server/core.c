/* The inference core (see core.h).
 *
 * Admission: a request is routed first (its model named, known and loaded),
 * so that every request the core hears of is counted once under the model
 * it names, or as unrouted when it names none; then it is refused at once
 * (BS_EBUSY) past the server-wide bound on requests in flight or while the
 * front end cannot take more answers, and the batcher refuses it past the
 * bound of the queue of the request's priority level. The batcher counts
 * whatever it is handed; the core counts what never reaches it. The
 * request's priority and timeout go to the batcher as they came: the queue
 * policy of its level decides what the timeout does.
 *
 * Shutdown: bs_core_shutdown answers each request in flight at once and
 * cancels its job; the job's own end is then swallowed (req->answered).
 *
 * Sequences: a request with sequence parameters begins a call of its
 * sequence (server/sequences.c), which decides whether it refreshes or
 * reuses its block cache, before it goes to the batcher. A call whose
 * sequence has one running waits in the core (no job yet) until that one
 * ends, so that the calls of a sequence run in order. Caches that
 * sequences drop are freed on a libuv worker (cache_release): a device
 * backend's free waits for the whole device, which the loop must not.
 *
 * Model control: each request holds a reference on its model's entry
 * (bs_repository_ref, from admission to req_end, after on_release), so a
 * replaced or unloaded model is freed only once its last request is done
 * with its inputs and outputs; the repository then calls on_model_freed,
 * which ends the model's sequences. References are taken and dropped on
 * the loop thread only: the batcher's workers never see them.
 *
 * Thread ownership: the loop thread owns everything here. */
#include "core.h"

#include <stdlib.h>
#include <string.h>

#include "batcher.h"
#include "log.h"

struct bs_core_req {
    bs_core_t *core;
    struct bs_repo_model *rm;
    bs_job_t *job;
    struct bs_core_reply reply;
    void *arg;
    bool answered;                   /* answered early (shutdown): the job's end only frees */
    struct bs_core_req *prev, *next; /* the core's requests in flight */
    /* sequences */
    struct bs_core_request req; /* kept while it waits for its sequence */
    bool waiting;               /* waits for its sequence's running call (no job) */
    bs_seq_t *seq;              /* its call's sequence, once begun */
    struct bs_seq_call call;
};

struct bs_core {
    bs_repository_t *repo;
    struct bs_core_options o;
    bool accepting;
    int in_flight;
    struct bs_core_req *head;
    bs_seqs_t *seqs;
    uv_timer_t seq_timer; /* ends idle sequences (with o.loop) */
    bool timer_open;
};

/* ---- routing ----------------------------------------------------------------- */

/* The ready versions of name, "1, 2" (or "none"), into buf. */
static const char *served_versions(bs_core_t *core, const char *name, char *buf, size_t cap)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < bs_repository_count(core->repo) && used < cap; i++) {
        const struct bs_repo_model *rm = bs_repository_get(core->repo, i);
        if (rm->model != NULL && strcmp(rm->name, name) == 0)
            used +=
                (size_t)snprintf(buf + used, cap - used, "%s%s", used ? ", " : "", rm->version_str);
    }
    return buf[0] != '\0' ? buf : "none";
}

struct bs_repo_model *bs_core_lookup(bs_core_t *core, const char *name, const char *version,
                                     bool need_ready, struct bs_err *err)
{
    char served[128];
    name = name ? name : "";
    version = version ? version : "";
    struct bs_repo_model *rm = bs_repository_find(core->repo, name);
    if (rm == NULL) {
        bs_err_set(err, BS_ENOTFOUND, "unknown model \"%s\"", name);
        return NULL;
    }
    if (version[0] != '\0') {
        rm = bs_repository_find_version(core->repo, name, version);
        if (rm == NULL || (need_ready && rm->unloaded)) {
            bs_err_set(err, BS_ENOTFOUND,
                       "model \"%s\" has no version \"%s\" (versions served: %s)", name, version,
                       served_versions(core, name, served, sizeof(served)));
            return NULL;
        }
    }
    if (need_ready && rm->unloaded) {
        bs_err_set(err, BS_ENOTFOUND, "unknown model \"%s\" (not loaded: unloaded)", name);
        return NULL;
    }
    if (need_ready && rm->model == NULL) {
        bs_err_set(err, BS_EUNSUPP, "model \"%s\" is not ready: %s", name, rm->reason);
        return NULL;
    }
    return rm;
}

void bs_core_count_failure(bs_core_t *core, const char *model_name, const char *model_version,
                           int rc)
{
    struct bs_repo_model *rm = NULL;
    if (model_name != NULL)
        rm = bs_core_lookup(core, model_name, model_version, true, NULL);
    if (rm != NULL && rm->batcher != NULL)
        bs_batcher_count_failure(rm->batcher, rc);
    else
        bs_metrics_unrouted(core->o.metrics, bs_batcher_reason(rc));
}

void bs_core_count_lost(bs_core_t *core, bool cancelled)
{
    bs_metrics_unrouted(core->o.metrics, cancelled ? BS_METRICS_CANCELED : BS_METRICS_OTHER);
}

/* Server-wide admission: shutting down, requests in flight, the sender. */
static int admit(bs_core_t *core, const struct bs_core_request *req, struct bs_err *err)
{
    if (!core->accepting)
        return bs_err_set(err, BS_EUNSUPP, "the server is shutting down");
    if (core->o.max_inflight > 0 && core->in_flight >= core->o.max_inflight)
        return bs_err_set(err, BS_EBUSY, "server busy: %d inferences in flight (--max-inflight)",
                          core->in_flight);
    if (req->sender_full)
        return bs_err_set(err, BS_EBUSY,
                          "server busy: answers waiting for their clients fill the server's "
                          "bound (--max-unsent-bytes)");
    return 0;
}

/* ---- the batcher's callbacks -------------------------------------------------- */

static void req_unlink(bs_core_req_t *r)
{
    bs_core_t *core = r->core;
    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        core->head = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    core->in_flight--;
}

static void job_block(void *arg, int block, int n_blocks, const struct bs_tensor *out)
{
    bs_core_req_t *r = arg;
    if (block < n_blocks - 1 && !r->answered && r->reply.on_block != NULL)
        r->reply.on_block(r->arg, out); /* the last block is the output */
}

static int job_output(void *arg, const struct bs_tensor *out, struct bs_err *err)
{
    bs_core_req_t *r = arg;
    if (r->answered || r->reply.on_output == NULL)
        return 0;
    return r->reply.on_output(r->arg, out, err);
}

static void seq_wake(bs_core_t *core, const struct bs_repo_model *rm, uint64_t id);
static void seq_arm(bs_core_t *core);

/* Answer r, release it and free it (its job, if any, is over). */
static void req_end(bs_core_req_t *r, int rc, const char *msg)
{
    req_unlink(r);
    if (!r->answered)
        r->reply.on_done(r->arg, rc, msg);
    if (r->reply.on_release != NULL)
        r->reply.on_release(r->arg);           /* the batcher is done with the inputs */
    bs_repository_unref(r->core->repo, r->rm); /* an unloaded model may go now */
    free(r);
}

static void job_done(void *arg, int rc, const char *msg, const struct bs_tensor *out)
{
    bs_core_req_t *r = arg;
    bs_core_t *core = r->core;
    const struct bs_repo_model *rm = r->rm;
    uint64_t id = r->req.seq.id;
    bool in_seq = r->seq != NULL;
    (void)out;
    /* The sequence's counters are published before the answer goes out: a
     * scrape after a sequence_end's answer sees its cache gone. */
    if (in_seq) {
        bs_seqs_finish(core->seqs, r->seq, rc, uv_hrtime());
        seq_arm(core);
    }
    req_end(r, rc, msg);
    if (in_seq) /* the sequence's next call may run now */
        seq_wake(core, rm, id);
}

static const struct bs_job_ops job_ops = {
    .on_block = job_block, .on_done = job_done, .on_output = job_output};

/* ---- sequences ---------------------------------------------------------------- */

/* Publish every served model's sequence counters. */
static void seq_metrics(bs_core_t *core)
{
    for (int i = 0; i < bs_repository_count(core->repo); i++) {
        struct bs_repo_model *rm = bs_repository_get(core->repo, i);
        struct bs_seq_stats st;
        if (rm == NULL || rm->model == NULL || rm->metrics == NULL)
            continue;
        bs_seqs_stats(core->seqs, rm->model, &st);
        struct bs_metrics_seq ms = {st.bytes,     st.sequences, st.hits,
                                    st.refreshes, st.evictions, st.expired};
        bs_metrics_sequences(rm->metrics, &ms);
    }
}

/* A dropped block cache on its way to a worker, to be freed there. */
struct cache_free {
    uv_work_t work;
    bs_block_cache_t *cache;
};

static void cache_free_work(uv_work_t *w)
{
    struct cache_free *f = w->data;
    bs_block_cache_free(f->cache);
}

static void cache_free_after(uv_work_t *w, int status)
{
    struct cache_free *f = w->data;
    if (status != 0) /* cancelled: it never ran */
        bs_block_cache_free(f->cache);
    free(f);
}

/* bs_seqs_set_release's hook: free cache off the loop (at once, out of
 * memory). */
static void cache_release(void *arg, bs_block_cache_t *cache)
{
    bs_core_t *core = arg;
    struct cache_free *f = malloc(sizeof(*f));
    if (f != NULL) {
        f->cache = cache;
        f->work.data = f;
    }
    if (f == NULL ||
        uv_queue_work(core->o.loop, &f->work, cache_free_work, cache_free_after) != 0) {
        free(f);
        bs_block_cache_free(cache);
    }
}

static void on_seq_timer(uv_timer_t *t)
{
    bs_core_t *core = t->data;
    bs_seqs_expire(core->seqs, uv_hrtime());
    seq_arm(core);
}

/* End idle sequences now, and arm the timer for the next one to idle out. */
static void seq_arm(bs_core_t *core)
{
    int64_t next = bs_seqs_expire(core->seqs, uv_hrtime());
    seq_metrics(core);
    if (!core->timer_open)
        return;
    if (next == INT64_MAX) {
        uv_timer_stop(&core->seq_timer);
        return;
    }
    int64_t wait_ns = next - (int64_t)uv_hrtime();
    uv_timer_start(&core->seq_timer, on_seq_timer,
                   wait_ns <= 0 ? 0 : (uint64_t)((wait_ns + 999999) / 1000000), 0);
}

/* The request's main input (bs_model_check found it). */
static const struct bs_named_tensor *main_input(const bs_model_t *model,
                                                const struct bs_core_request *req)
{
    const char *name = bs_model_input(model, 0)->name;
    for (int i = 0; i < req->n_inputs; i++)
        if (strcmp(req->inputs[i].name, name) == 0)
            return &req->inputs[i];
    return NULL;
}

/* Begin r's call of its sequence and hand it to the batcher: 0 (queued,
 * or waiting for the sequence: r->waiting), or a failure code, counted,
 * with nothing kept of the call. */
static int seq_start(bs_core_t *core, bs_core_req_t *r, struct bs_err *err)
{
    struct bs_repo_model *rm = r->rm;
    const struct bs_core_request *req = &r->req;
    struct bs_seq_model sm = {.max_idle_us = rm->serving.max_sequence_idle_us,
                              .cache_bytes = (size_t)rm->serving.block_cache_bytes};
    struct bs_tensor shape;
    int rc;
    r->seq = NULL;
    memset(&r->call, 0, sizeof(r->call));
    if (req->seq.given || req->seq.cache_interval > 0) {
        /* a request the model refuses is no call of its sequence */
        if ((rc = bs_model_check(rm->model, req->inputs, req->n_inputs, &shape, err)) != 0) {
            bs_batcher_count_failure(rm->batcher, rc);
            return rc;
        }
        const struct bs_named_tensor *main = main_input(rm->model, req);
        /* sequences idle past their time end before this call looks for its
         * own, whether or not the timer has run yet */
        seq_arm(core);
        rc = main == NULL ? bs_err_set(err, BS_EINTERNAL, "the model's main input is missing")
                          : bs_seqs_begin(core->seqs, rm->model, &sm, &req->seq, main, uv_hrtime(),
                                          &r->seq, &r->call, err);
        seq_arm(core); /* counters, and the idle timer */
        if (rc < 0) {
            bs_batcher_count_failure(rm->batcher, rc);
            return rc;
        }
        r->waiting = rc == 1;
        if (r->waiting) {
            r->seq = NULL; /* begun again when the running call ends */
            return 0;
        }
    }
    /* the batcher counts its own refusals, and applies the timeout as the
     * queue policy of the request's priority level says */
    struct bs_batcher_request br = {.in = req->inputs,
                                    .n_in = req->n_inputs,
                                    .intermediate = req->intermediate,
                                    .out_dtype =
                                        req->has_out_dtype ? req->out_dtype : rm->serving.out_dtype,
                                    .priority = req->priority,
                                    .timeout_us = req->timeout_us,
                                    .cache = r->call.cache,
                                    .cache_mode = r->call.mode,
                                    .deadline_ns = req->deadline_ns};
    rc = bs_batcher_submit(rm->batcher, &br, &job_ops, r, &r->job, err);
    if (rc != 0 && r->seq != NULL) {
        bs_seqs_finish(core->seqs, r->seq, rc, uv_hrtime());
        r->seq = NULL;
    }
    return rc;
}

/* The sequence (rm, id) has no call running: start the oldest request that
 * waits for it. One that fails now is answered (and counted) at once, and
 * leaves the sequence idle: the next oldest is started, until one runs or
 * none waits. */
static void seq_wake(bs_core_t *core, const struct bs_repo_model *rm, uint64_t id)
{
    for (;;) {
        /* the oldest waiter is the last in the list (requests are pushed at the head) */
        bs_core_req_t *oldest = NULL;
        for (bs_core_req_t *r = core->head; r != NULL; r = r->next)
            if (r->waiting && !r->answered && r->rm == rm && r->req.seq.id == id)
                oldest = r;
        if (oldest == NULL)
            return;
        struct bs_err err = {0};
        oldest->waiting = false;
        int rc = seq_start(core, oldest, &err);
        if (rc == 0)
            return; /* it runs (or, begun by no one else, cannot wait again) */
        req_end(oldest, rc, err.msg);
    }
}

/* ---- requests ------------------------------------------------------------------ */

int bs_core_submit(bs_core_t *core, const struct bs_core_request *req,
                   const struct bs_core_reply *reply, void *arg, bs_core_req_t **handle,
                   struct bs_err *err)
{
    struct bs_repo_model *rm;
    int rc;
    *handle = NULL;
    if ((rm = bs_core_lookup(core, req->model_name, req->model_version, true, err)) == NULL ||
        (rc = admit(core, req, err)) != 0) {
        rc = err->code;
        bs_core_count_failure(core, req->model_name, req->model_version, rc);
        return rc;
    }
    bs_core_req_t *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        bs_batcher_count_failure(rm->batcher, BS_ENOMEM);
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    }
    r->core = core;
    r->rm = rm;
    r->reply = *reply;
    r->arg = arg;
    r->req = *req;
    if ((rc = seq_start(core, r, err)) != 0) {
        free(r);
        return rc;
    }
    bs_repository_ref(core->repo, rm); /* held until req_end */
    r->next = core->head;
    if (core->head != NULL)
        core->head->prev = r;
    core->head = r;
    core->in_flight++;
    *handle = r;
    return 0;
}

void bs_core_cancel(bs_core_t *core, bs_core_req_t *r)
{
    (void)core;
    if (r == NULL)
        return;
    if (r->waiting) { /* never reached the batcher */
        bs_batcher_count_failure(r->rm->batcher, BS_ECANCELED);
        req_end(r, BS_ECANCELED, "cancelled");
        return;
    }
    bs_batcher_cancel(r->rm->batcher, r->job); /* job_done follows */
}

const char *bs_core_block_cache(const bs_core_req_t *r)
{
    if (r == NULL || !r->call.cached)
        return NULL;
    return r->call.mode == BS_CACHE_REUSE ? "reuse" : "refresh";
}

const char *bs_core_version(const bs_core_req_t *r)
{
    return r != NULL && r->rm != NULL ? r->rm->version_str : "";
}

void bs_core_seq_stats(const bs_core_t *core, const bs_model_t *model, struct bs_seq_stats *st)
{
    bs_seqs_stats(core->seqs, model, st);
}

/* ---- lifecycle ------------------------------------------------------------------ */

/* The repository frees a replaced or unloaded model (no request holds it):
 * its sequences end and their caches go. */
static void on_model_freed(void *arg, struct bs_repo_model *rm)
{
    bs_core_t *core = arg;
    if (rm->model != NULL)
        bs_seqs_drop_model(core->seqs, rm->model);
    seq_arm(core);
}

int bs_core_init(bs_core_t **core, bs_repository_t *repo, const struct bs_core_options *opts,
                 struct bs_err *err)
{
    bs_core_t *c = calloc(1, sizeof(*c));
    *core = NULL;
    if (c == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    c->repo = repo;
    c->o = *opts;
    c->accepting = true;
    int rc = bs_seqs_init(&c->seqs, opts->block_cache_bytes, err);
    if (rc != 0) {
        free(c);
        return rc;
    }
    if (opts->loop != NULL) {
        uv_timer_init(opts->loop, &c->seq_timer); /* cannot fail */
        uv_unref((uv_handle_t *)&c->seq_timer);   /* idle sequences keep no loop alive */
        c->seq_timer.data = c;
        c->timer_open = true;
        bs_seqs_set_release(c->seqs, cache_release, c);
    }
    bs_repository_set_free_hook(repo, on_model_freed, c);
    *core = c;
    return 0;
}

static void on_timer_closed(uv_handle_t *h)
{
    free(h->data);
}

void bs_core_free(bs_core_t *core)
{
    if (core == NULL)
        return;
    bs_repository_set_free_hook(core->repo, NULL, NULL);
    bs_seqs_free(core->seqs);
    if (core->timer_open) /* the core goes with the timer's close callback */
        uv_close((uv_handle_t *)&core->seq_timer, on_timer_closed);
    else
        free(core);
}

bs_repository_t *bs_core_repository(bs_core_t *core)
{
    return core->repo;
}

void bs_core_stop_accepting(bs_core_t *core)
{
    core->accepting = false;
}

bool bs_core_accepting(const bs_core_t *core)
{
    return core->accepting;
}

int bs_core_in_flight(const bs_core_t *core)
{
    return core->in_flight;
}

void bs_core_shutdown(bs_core_t *core)
{
    static const char msg[] = "the server is shutting down: this request did not run in time";
    core->accepting = false;
    for (bs_core_req_t *r = core->head; r != NULL; r = r->next) {
        if (r->answered)
            continue;
        r->answered = true;
        r->reply.on_done(r->arg, BS_EUNSUPP, msg);
    }
    /* A queued job's job_done runs (and frees it) inside bs_batcher_cancel;
     * a request waiting for its sequence has no job. */
    for (bs_core_req_t *r = core->head, *next; r != NULL; r = next) {
        next = r->next;
        if (r->waiting) {
            bs_batcher_count_failure(r->rm->batcher, BS_ECANCELED);
            req_end(r, BS_ECANCELED, msg);
        } else {
            bs_batcher_cancel(r->rm->batcher, r->job);
        }
    }
}
