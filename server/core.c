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
};

struct bs_core {
    bs_repository_t *repo;
    struct bs_core_options o;
    bool accepting;
    int in_flight;
    struct bs_core_req *head;
};

/* ---- routing ----------------------------------------------------------------- */

struct bs_repo_model *bs_core_lookup(bs_core_t *core, const char *name, const char *version,
                                     bool need_ready, struct bs_err *err)
{
    name = name ? name : "";
    version = version ? version : "";
    struct bs_repo_model *rm = bs_repository_find(core->repo, name);
    if (rm == NULL) {
        bs_err_set(err, BS_ENOTFOUND, "unknown model \"%s\"", name);
        return NULL;
    }
    if (version[0] != '\0' && strcmp(version, BS_MODEL_VERSION) != 0) {
        bs_err_set(err, BS_ENOTFOUND, "model \"%s\" has no version \"%s\" (only \"1\")", name,
                   version);
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

static void job_done(void *arg, int rc, const char *msg, const struct bs_tensor *out)
{
    bs_core_req_t *r = arg;
    (void)out;
    req_unlink(r);
    if (!r->answered)
        r->reply.on_done(r->arg, rc, msg);
    if (r->reply.on_release != NULL)
        r->reply.on_release(r->arg); /* the batcher is done with the inputs */
    free(r);
}

static const struct bs_job_ops job_ops = {
    .on_block = job_block, .on_done = job_done, .on_output = job_output};

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
    /* the batcher counts its own refusals, and applies the timeout as the
     * queue policy of the request's priority level says */
    struct bs_batcher_request br = {.in = req->inputs,
                                    .n_in = req->n_inputs,
                                    .intermediate = req->intermediate,
                                    .priority = req->priority,
                                    .timeout_us = req->timeout_us,
                                    .deadline_ns = req->deadline_ns};
    rc = bs_batcher_submit(rm->batcher, &br, &job_ops, r, &r->job, err);
    if (rc != 0) {
        free(r);
        return rc;
    }
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
    if (r != NULL)
        bs_batcher_cancel(r->rm->batcher, r->job); /* job_done follows */
}

/* ---- lifecycle ------------------------------------------------------------------ */

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
    *core = c;
    return 0;
}

void bs_core_free(bs_core_t *core)
{
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
    /* A queued job's job_done runs (and frees it) inside bs_batcher_cancel. */
    for (bs_core_req_t *r = core->head, *next; r != NULL; r = next) {
        next = r->next;
        bs_batcher_cancel(r->rm->batcher, r->job);
    }
}
