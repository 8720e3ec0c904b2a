/* The per-model dynamic batcher (Triton's dynamic batcher semantics).
 *
 * Requests queue in FIFO order per priority level (one level, 0, without
 * priority_levels). Candidates are taken in priority order (queue_first,
 * queue_next): level 1's requests within their queue timeout, oldest first,
 * then level 1's delayed ones (timeout_action DELAY: past their timeout, in
 * the order they timed out), then level 2's, and so on, as Triton's priority
 * queue hands them out. The first candidate, the head, decides the batch's
 * signature (its inputs, and its output dtype); compatible jobs behind it
 * (skipping incompatible ones, which wait for a later batch) join until the
 * batch is full, reaches the largest preferred size it can, or its oldest
 * job has waited max_queue_delay. One batch runs at a time (instance count
 * 1) on the uv threadpool: the worker concatenates the inputs along dim 0,
 * runs the forward in the batcher's arena (the output in the batch's output
 * dtype), and the after-work callback splits the output per job.
 *
 * Each level has its queue policy (bs_serving_policy): a bound on its
 * queued jobs, a queue timeout (the level's default, or the request's own
 * when the policy allows and it is shorter) after which a job is answered
 * BS_ETIMEDOUT (REJECT) or moved behind the level's other jobs (DELAY). The
 * transport's deadline is apart: past it a queued job is always answered.
 *
 * Scheduling never runs inside bs_batcher_submit: a submit (or cancel, or
 * drain) kicks the timer with timeout 0, and the timer callback expires
 * deadlines and timeouts, dispatches, re-arms the timer for the next event
 * (the waiting batch's queue delay, the earliest deadline or queue timeout)
 * and reports a finished drain. So jobs submitted in one loop iteration can
 * share a batch even with a delay of 0, and no on_done runs re-entrantly
 * inside submit.
 *
 * Thread ownership (STYLE rule 12):
 * - Loop thread: every field of bs_batcher and bs_job, except as below, and
 *   every callback to the owner (on_block, on_done, drain's done).
 * - Worker (between uv_queue_work and batch_after): run.in, run.bufs,
 *   run.parts, run.out, run.rc, run.err, run.t_*, run.blocks_run, the
 *   running jobs' out_off and the arena. The loop does not touch them while
 *   `running` (block messages, under lock, carry out_off's writes to it);
 *   the loop only writes job->state, which the worker never reads, and
 *   job->cancelled, an atomic the worker's stop hook reads. Job inputs,
 *   n_in, batch, stop_ns and the cache and its mode are immutable after
 *   submit, so the worker reads them freely.
 * - msgs, msgs_tail: guarded by lock; the worker appends block outputs
 *   (on_block of the forward) and uv_async_send's; the loop drains them.
 *
 * Shutdown: bs_batcher_free is asynchronous. It cancels queued jobs, and
 * once no batch runs (at once, or in the after-work callback) it frees the
 * arena and uv_close's the timer and the async handle; the struct is freed
 * in the last close callback. Drain's done is called before any handle is
 * closed, from a loop callback, and may call bs_batcher_free. */
#include "batcher.h"

#include <assert.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

_Static_assert(BS_MAX_PRIORITY_LEVELS <= BS_METRICS_MAX_PRIORITY,
               "every priority level has its request counter");

enum job_state {
    JOB_QUEUED,    /* in the queue */
    JOB_RUNNING,   /* in the running batch */
    JOB_FINISHING, /* on_done is being called; cancel is a no-op */
};

struct bs_job {
    bs_job_t *prev, *next; /* links in its level's list, or the next of a local list */
    enum job_state state;
    int level;          /* index into the batcher's levels */
    bool late;          /* in its level's delayed list (timed out, DELAY) */
    int64_t timeout_ns; /* queue timeout, uv_hrtime()'s clock (INT64_MAX: none, or delayed) */
    /* running: drop the result, answer BS_ECANCELED; the worker reads it
     * (batch_should_stop) */
    atomic_bool cancelled;
    bool intermediate;
    enum bs_dtype out_dtype; /* F32, BF16 or F16: only equal ones share a batch */
    bool solo;               /* inputs of a layout the batcher does not concatenate */
    int64_t batch;           /* samples: dim 0 of the model's main input */
    int64_t tokens;          /* the main input's tokens (bs_model_tokens) */
    int64_t out_off;         /* running: where its output starts in the batch's (elements) */
    int64_t deadline_ns;     /* the transport's (INT64_MAX: none) */
    int64_t stop_ns;         /* running: nobody waits past this (deadline, or its own timeout) */
    bs_block_cache_t *cache; /* its sequence's block cache, or NULL */
    enum bs_cache_mode cache_mode;
    uint64_t enqueue_ns;
    uint64_t queue_ns;          /* time in the queue, once dispatched */
    struct bs_tensor out_shape; /* this request's output shape (data NULL) */
    struct bs_job_ops ops;
    void *arg;
    int n_in;
    struct bs_named_tensor in[]; /* the request's inputs (structs copied, data not owned) */
};

/* A block output of the running batch, on its way from worker to loop. */
struct block_msg {
    struct block_msg *next;
    int block, n_blocks;
    struct bs_tensor out; /* the batch's shape and output dtype; data points at data[] */
    float data[];         /* its bytes (F32, BF16 or F16 values) */
};

/* The batch in flight (one per batcher). */
struct bs_batch {
    uv_work_t work;
    bs_job_t **jobs; /* max_batch_size slots; NULL once answered */
    int n_jobs;
    int64_t size; /* samples */
    bool want_blocks;
    bool ragged;                 /* shapes differ: packed (bs_model_forward_parts) */
    struct bs_model_part *parts; /* ragged: max_batch_size slots */
    int blocks_run;              /* blocks of a stack that ran (stopped early: fewer) */
    struct bs_named_tensor *in;  /* batched inputs (bs_model_n_inputs slots) */
    void **bufs;                 /* their buffers (NULL: a job's own tensor) */
    int n_in;
    struct bs_tensor out;
    int rc;
    struct bs_err err;
    uint64_t t_start, t_input, t_infer;
};

/* A list of queued jobs, oldest first. */
struct jobq {
    bs_job_t *head, *tail;
};

/* One priority level's queue (Triton's PolicyQueue): jobs within their queue
 * timeout, then (DELAY) those past it. */
struct level {
    struct bs_queue_policy policy;
    struct jobq live, late;
    int n; /* jobs in both lists: what max_queue_size bounds */
};

struct bs_batcher {
    uv_loop_t *loop;
    bs_model_t *model;
    struct bs_serving_config cfg;
    bs_metrics_model_t *metrics; /* NULL: none */
    const char *main_input;      /* hidden_states or x: its dim 0 is the batch */
    uv_timer_t timer;            /* kicks, the head's queue delay, the earliest deadline */
    uv_async_t async;            /* block outputs are waiting in msgs */
    int n_open;                  /* handles not yet closed */
    struct bs_arena arena;
    struct level *levels;        /* [level - 1], or one (level 0) without priority levels */
    int n_levels, default_level; /* default_level: the index of default_priority_level */
    int n_queued;
    bool running;
    struct bs_batch run;
    uv_mutex_t lock;
    struct block_msg *msgs, **msgs_tail;
    struct bs_model_stats stats;
    bool draining, freeing, closing;
    void (*drain_cb)(void *arg);
    void *drain_arg;
};

static void on_timer(uv_timer_t *t);

/* ---- helpers ------------------------------------------------------------ */

/* How input name is concatenated along dim 0: the model says (its role). */
static enum bs_input_role input_role(const bs_model_t *model, const char *name)
{
    return bs_model_input_role(model, name);
}

static const struct bs_tensor *job_input(const bs_job_t *j, const char *name)
{
    for (int i = 0; i < j->n_in; i++)
        if (strcmp(j->in[i].name, name) == 0)
            return &j->in[i].t;
    return NULL;
}

/* Can every input be concatenated along dim 0 for a job of `batch` samples? */
static bool job_is_batchable(const bs_model_t *model, const bs_job_t *j)
{
    for (int i = 0; i < j->n_in; i++) {
        const struct bs_tensor *t = &j->in[i].t;
        switch (input_role(model, j->in[i].name)) {
        case BS_ROLE_COND:
            if (bs_tensor_nelements(t) != 1 && !(t->n_dims == 1 && t->ne[0] == j->batch))
                return false;
            break;
        case BS_ROLE_MASK:
            if (t->n_dims < 1 || (t->ne[0] != j->batch && t->ne[0] != 1))
                return false;
            break;
        case BS_ROLE_BATCHED:
            if (t->n_dims < 1 || t->ne[0] != j->batch)
                return false;
            break;
        }
    }
    return true;
}

/* Equal signatures: the same inputs, each of one dtype, rank and dims beyond
 * dim 0 (timesteps and labels: per-sample values of one dtype). */
static bool sig_equal(const bs_model_t *model, const bs_job_t *a, const bs_job_t *c)
{
    if (a->solo || c->solo || a->n_in != c->n_in)
        return false;
    for (int i = 0; i < a->n_in; i++) {
        const struct bs_tensor *x = &a->in[i].t, *y = job_input(c, a->in[i].name);
        if (y == NULL || x->type != y->type)
            return false;
        if (input_role(model, a->in[i].name) == BS_ROLE_COND)
            continue;
        if (x->n_dims != y->n_dims ||
            memcmp(x->ne + 1, y->ne + 1, sizeof(int64_t) * (size_t)(x->n_dims - 1)) != 0)
            return false;
    }
    return true;
}

/* May job c join a batch whose head is h? Equal shapes always; with ragged
 * batching, shapes that differ only in their sequence dims too. */
static bool can_join(const bs_batcher_t *b, const bs_job_t *h, const bs_job_t *c)
{
    if (h->out_dtype != c->out_dtype) /* one output buffer, of one dtype */
        return false;
    if (sig_equal(b->model, h, c))
        return true;
    return !b->cfg.ragged_off && !h->solo && !c->solo &&
           bs_model_ragged_compatible(b->model, h->in, h->n_in, c->in, c->n_in);
}

/* ---- the queues --------------------------------------------------------- */

/* The lists in priority order: 2 * level + late (level 1's live jobs, its
 * delayed ones, level 2's live jobs, ...). */
static struct jobq *list_at(const bs_batcher_t *b, int k)
{
    struct level *lv = &b->levels[k / 2];
    return k % 2 ? &lv->late : &lv->live;
}

static struct jobq *job_list(const bs_batcher_t *b, const bs_job_t *j)
{
    return list_at(b, 2 * j->level + j->late);
}

/* The first job of list k or of a list after it, in priority order. */
static bs_job_t *first_from(const bs_batcher_t *b, int k)
{
    for (; k < 2 * b->n_levels; k++)
        if (list_at(b, k)->head != NULL)
            return list_at(b, k)->head;
    return NULL;
}

/* The head: the oldest job of the highest level that has any. */
static bs_job_t *queue_first(const bs_batcher_t *b)
{
    return first_from(b, 0);
}

/* The next candidate after j in priority order (NULL after the last). */
static bs_job_t *queue_next(const bs_batcher_t *b, const bs_job_t *j)
{
    return j->next != NULL ? j->next : first_from(b, 2 * j->level + j->late + 1);
}

static void queue_push(bs_batcher_t *b, bs_job_t *j)
{
    struct jobq *q = job_list(b, j);
    j->prev = q->tail;
    j->next = NULL;
    if (q->tail != NULL)
        q->tail->next = j;
    else
        q->head = j;
    q->tail = j;
    b->levels[j->level].n++;
    b->n_queued++;
    bs_metrics_pending(b->metrics, b->n_queued);
}

static void queue_unlink(bs_batcher_t *b, bs_job_t *j)
{
    struct jobq *q = job_list(b, j);
    if (j->prev != NULL)
        j->prev->next = j->next;
    else
        q->head = j->next;
    if (j->next != NULL)
        j->next->prev = j->prev;
    else
        q->tail = j->prev;
    j->prev = j->next = NULL;
    b->levels[j->level].n--;
    b->n_queued--;
    bs_metrics_pending(b->metrics, b->n_queued);
}

/* DELAY: a job past its queue timeout goes behind its level's live jobs. */
static void queue_delay(bs_batcher_t *b, bs_job_t *j)
{
    queue_unlink(b, j);
    j->late = true;
    j->timeout_ns = INT64_MAX;
    queue_push(b, j);
}

/* The level number of a level index, as configured and shown (0: no levels). */
static int level_number(const bs_batcher_t *b, int index)
{
    return b->cfg.priority_levels > 0 ? index + 1 : 0;
}

/* The level index of a request's priority: 1..priority_levels, or the default
 * level for 0 and for numbers above them (Triton's InferenceRequest::SetPriority). */
static int level_of(const bs_batcher_t *b, uint64_t priority)
{
    if (priority == 0 || priority > (uint64_t)b->cfg.priority_levels)
        return b->default_level;
    return (int)priority - 1;
}

/* us in ns, saturating (a delay or deadline of "never"). */
static int64_t us_to_ns(int64_t us)
{
    return bs_mul_sat(us, 1000);
}

static void duration_add(struct bs_duration *d, uint64_t ns)
{
    d->count++;
    d->ns += ns;
}

enum bs_metrics_reason bs_batcher_reason(int rc)
{
    enum bs_reason r = bs_status_reason(rc);
    return r == BS_REASON_NONE ? BS_METRICS_OTHER : (enum bs_metrics_reason)r;
}

void bs_batcher_count_failure(bs_batcher_t *b, int rc)
{
    duration_add(&b->stats.fail, 0);
    bs_metrics_failure(b->metrics, bs_batcher_reason(rc));
}

/* Count a finished job: a success with its times (its batch's, for compute;
 * output: from the forward's end to its answer) and its samples, or a
 * failure by reason. ModelStatistics and the metrics count the same events. */
static void job_count(bs_batcher_t *b, const bs_job_t *j, int rc, uint64_t now)
{
    const struct bs_batch *r = &b->run;
    duration_add(rc == 0 ? &b->stats.success : &b->stats.fail, now - j->enqueue_ns);
    if (rc != 0) {
        bs_metrics_failure(b->metrics, bs_batcher_reason(rc));
        return;
    }
    b->stats.inference_count += (uint64_t)j->batch; /* Triton: samples of successful requests */
    struct bs_metrics_request m = {now - j->enqueue_ns,     j->queue_ns,
                                   r->t_input - r->t_start, r->t_infer - r->t_input,
                                   now - r->t_infer,        (uint64_t)j->batch};
    bs_metrics_success(b->metrics, &m);
}

/* Answer a job that is out of the queue, count it, and free it. A successful
 * job's owner prepares its answer first (on_output), which may still fail it;
 * the count is taken before the answer goes out, so that a client that has
 * its answer sees it counted. */
static void job_finish(bs_batcher_t *b, bs_job_t *j, int rc, const char *msg,
                       const struct bs_tensor *out)
{
    struct bs_err err = {0};
    j->state = JOB_FINISHING;
    if (rc == 0 && j->ops.on_output != NULL && (rc = j->ops.on_output(j->arg, out, &err)) != 0)
        msg = err.msg;
    job_count(b, j, rc, uv_hrtime());
    j->ops.on_done(j->arg, rc, msg, rc == 0 ? out : NULL);
    free(j);
}

/* Run schedule() from the next loop iteration. */
static void kick(bs_batcher_t *b)
{
    if (!b->closing)
        uv_timer_start(&b->timer, on_timer, 0, 0);
}

/* ---- the worker --------------------------------------------------------- */

/* Concatenate input i of the head job over every job of the batch. */
static int concat_input(const bs_model_t *model, struct bs_batch *r, int i)
{
    const struct bs_named_tensor *h = &r->jobs[0]->in[i];
    enum bs_input_role role = input_role(model, h->name);
    struct bs_tensor t = h->t;
    size_t per;
    if (role == BS_ROLE_COND) {
        t.n_dims = 1;
        per = bs_dtype_size(t.type);
    } else {
        per = bs_tensor_nbytes(&h->t) / (size_t)h->t.ne[0];
    }
    t.ne[0] = r->size;
    t = bs_tensor_make(t.type, t.n_dims, t.ne, NULL);
    char *buf = malloc(per * (size_t)r->size);
    if (buf == NULL)
        return bs_err_set(&r->err, BS_ENOMEM,
                          "out of memory concatenating \"%s\" for a batch of %lld", h->name,
                          (long long)r->size);
    size_t off = 0;
    for (int k = 0; k < r->n_jobs; k++) {
        const bs_job_t *j = r->jobs[k];
        const struct bs_tensor *s = job_input(j, h->name);
        int64_t n = role == BS_ROLE_COND ? bs_tensor_nelements(s) : s->ne[0];
        if (n == j->batch) {
            memcpy(buf + off, s->data, per * (size_t)j->batch);
        } else { /* one value, or a batch-1 mask: one copy per sample */
            for (int64_t m = 0; m < j->batch; m++)
                memcpy(buf + off + per * (size_t)m, s->data, per);
        }
        off += per * (size_t)j->batch;
    }
    t.data = buf;
    r->in[i].name = h->name;
    r->in[i].t = t;
    r->bufs[i] = buf;
    return 0;
}

/* The forward's per-block callback, on the worker: hand a copy to the loop. */
static int batch_on_block(void *arg, int block, int n_blocks, const struct bs_tensor *out)
{
    bs_batcher_t *b = arg;
    size_t bytes = bs_tensor_nbytes(out);
    struct block_msg *m = malloc(sizeof(*m) + bytes);
    if (m == NULL)
        return bs_err_set(&b->run.err, BS_ENOMEM, "out of memory streaming block %d", block);
    m->next = NULL;
    m->block = block;
    m->n_blocks = n_blocks;
    m->out = bs_tensor_make(out->type, out->n_dims, out->ne, m->data);
    memcpy(m->data, out->data, bytes);
    uv_mutex_lock(&b->lock);
    *b->msgs_tail = m;
    b->msgs_tail = &m->next;
    uv_mutex_unlock(&b->lock);
    uv_async_send(&b->async);
    return 0;
}

/* The forward's stop hook, on the worker: true once no request of the
 * batch waits for it (each cancelled, or past its deadline). */
static bool batch_should_stop(void *arg)
{
    const struct bs_batch *r = arg;
    int64_t now = (int64_t)uv_hrtime();
    for (int k = 0; k < r->n_jobs; k++)
        if (!atomic_load(&r->jobs[k]->cancelled) && r->jobs[k]->stop_ns > now)
            return false;
    return true;
}

static void batch_work(uv_work_t *req)
{
    bs_batcher_t *b = req->data;
    struct bs_batch *r = &b->run;
    bs_job_t *head = r->jobs[0];
    const struct bs_named_tensor *in = head->in;
    r->t_start = uv_hrtime();
    r->rc = 0;
    r->n_in = head->n_in;
    if (r->ragged) {
        for (int k = 0; k < r->n_jobs; k++)
            r->parts[k] = (struct bs_model_part){.in = r->jobs[k]->in,
                                                 .n_in = r->jobs[k]->n_in,
                                                 .cache = r->jobs[k]->cache,
                                                 .mode = r->jobs[k]->cache_mode};
    } else if (r->n_jobs > 1) {
        for (int i = 0; i < r->n_in && r->rc == 0; i++)
            r->rc = concat_input(b->model, r, i);
        in = r->in;
    }
    r->t_input = uv_hrtime();
    if (r->rc != 0)
        return;
    /* The jobs' outputs one after another: a uniform batch's output is the
     * concatenation along dim 0, a ragged one's is flat. */
    int64_t total = 0;
    for (int k = 0; k < r->n_jobs; k++) {
        r->jobs[k]->out_off = total;
        total += bs_tensor_nelements(&r->jobs[k]->out_shape);
    }
    r->out = head->out_shape;
    r->out.ne[0] = r->size;
    r->out = r->ragged ? bs_tensor_make(head->out_dtype, 1, &total, NULL)
                       : bs_tensor_make(head->out_dtype, r->out.n_dims, r->out.ne, NULL);
    r->out.data = malloc(bs_tensor_nbytes(&r->out));
    if (r->out.data == NULL) {
        r->rc = bs_err_set(&r->err, BS_ENOMEM, "out of memory for a batch output of %zu bytes",
                           bs_tensor_nbytes(&r->out));
        return;
    }
    r->blocks_run = 0;
    struct bs_forward_opts opts = {
        .on_block = r->want_blocks ? batch_on_block : NULL,
        .cb_arg = b,
        .should_stop = batch_should_stop,
        .stop_arg = r,
        .blocks_run = &r->blocks_run,
    };
    if (r->ragged)
        r->rc = bs_model_forward_parts(b->model, &b->arena, r->parts, r->n_jobs, &r->out, &opts,
                                       &r->err);
    else
        r->rc = bs_model_forward(b->model, &b->arena, in, r->n_in, &r->out, &opts, &r->err);
    r->t_infer = uv_hrtime();
}

/* Job j's part of a batch output whose data is base (of j's output dtype). */
static struct bs_tensor job_view(const bs_job_t *j, void *base)
{
    const struct bs_tensor *s = &j->out_shape;
    size_t off = (size_t)j->out_off * bs_dtype_size(j->out_dtype);
    return bs_tensor_make(j->out_dtype, s->n_dims, s->ne, (char *)base + off);
}

/* ---- back on the loop --------------------------------------------------- */

/* Deliver the block outputs the worker has posted, in block order. */
static void deliver_blocks(bs_batcher_t *b)
{
    struct block_msg *m;
    uv_mutex_lock(&b->lock);
    m = b->msgs;
    b->msgs = NULL;
    b->msgs_tail = &b->msgs;
    uv_mutex_unlock(&b->lock);
    while (m != NULL) {
        struct block_msg *next = m->next;
        for (int k = 0; k < b->run.n_jobs; k++) {
            bs_job_t *j = b->run.jobs[k];
            struct bs_tensor view = job_view(j, m->data);
            if (j->intermediate && j->ops.on_block != NULL && !j->cancelled && !b->freeing)
                j->ops.on_block(j->arg, m->block, m->n_blocks, &view);
        }
        free(m);
        m = next;
    }
}

static void on_async(uv_async_t *a)
{
    bs_batcher_t *b = a->data;
    if (b->running)
        deliver_blocks(b);
}

static void batch_stats(bs_batcher_t *b, uint64_t t_out_ns)
{
    struct bs_batch *r = &b->run;
    struct bs_model_stats *s = &b->stats;
    struct bs_batch_stats *bs = &s->batch[r->size - 1];
    uint64_t t_in = r->t_input - r->t_start, t_inf = r->t_infer - r->t_input;
    uv_timeval64_t tv;
    s->execution_count++;
    duration_add(&s->compute_input, t_in);
    duration_add(&s->compute_infer, t_inf);
    duration_add(&s->compute_output, t_out_ns);
    duration_add(&bs->compute_input, t_in);
    duration_add(&bs->compute_infer, t_inf);
    duration_add(&bs->compute_output, t_out_ns);
    if (uv_gettimeofday(&tv) == 0)
        s->last_inference_ms = (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
}

static void release(bs_batcher_t *b);
static void schedule(bs_batcher_t *b);

static void batch_after(uv_work_t *req, int status)
{
    bs_batcher_t *b = req->data;
    struct bs_batch *r = &b->run;
    if (status != 0 && r->rc == 0)
        r->rc = bs_err_set(&r->err, BS_ECANCELED, "the batch was cancelled");
    deliver_blocks(b); /* the worker is done: everything it posted is there */
    if (r->rc == 0) {  /* before any answer goes out, so a scrape never lags the answers */
        bs_metrics_execution(b->metrics, (uint64_t)r->size);
        if (r->ragged) {
            bs_metrics_ragged(b->metrics);
            b->stats.ragged_count++;
        }
    }
    int n_blocks = bs_model_config(b->model)->num_blocks;
    bool stopped = r->rc == BS_ECANCELED && batch_should_stop(r);
    if (stopped) {
        uint64_t skipped = (uint64_t)(n_blocks - r->blocks_run);
        bs_metrics_stopped(b->metrics, skipped);
        b->stats.stopped_count++;
        b->stats.blocks_skipped += skipped;
    }
    uint64_t t0 = uv_hrtime();
    for (int k = 0; k < r->n_jobs; k++) {
        bs_job_t *j = r->jobs[k];
        struct bs_tensor view = {0};
        if (r->rc == 0)
            view = job_view(j, r->out.data);
        if (j->cancelled || b->freeing) {
            job_finish(b, j, BS_ECANCELED, "cancelled", NULL);
        } else if (stopped) { /* not cancelled: its deadline passed */
            char msg[128];
            snprintf(msg, sizeof(msg),
                     "deadline exceeded while running; the batch stopped after %d of %d blocks",
                     r->blocks_run, n_blocks);
            job_finish(b, j, BS_ETIMEDOUT, msg, NULL);
        } else {
            job_finish(b, j, r->rc, r->rc == 0 ? "" : r->err.msg, &view);
        }
    }
    uint64_t t1 = uv_hrtime();
    if (r->rc == 0)
        batch_stats(b, t1 - t0);
    for (int i = 0; i < r->n_in; i++) {
        free(r->bufs[i]);
        r->bufs[i] = NULL;
    }
    free(r->out.data);
    r->out.data = NULL;
    r->n_jobs = 0;
    b->running = false;
    if (b->freeing)
        release(b);
    else
        schedule(b);
}

/* ---- scheduling --------------------------------------------------------- */

static bool is_preferred(const bs_batcher_t *b, int64_t size)
{
    for (int i = 0; i < b->cfg.n_preferred; i++)
        if (b->cfg.preferred_batch_size[i] == size)
            return true;
    return false;
}

/* Apply the deadlines and queue timeouts: answer BS_ETIMEDOUT to every
 * queued job past its deadline, or past its queue timeout where its level
 * rejects; move those past their timeout where it delays. */
static void expire(bs_batcher_t *b, uint64_t now)
{
    bs_job_t *list = NULL, **tail = &list;
    for (bs_job_t *j = queue_first(b), *next; j != NULL; j = next) {
        next = queue_next(b, j);
        bool deadline = j->deadline_ns <= (int64_t)now;
        if (!deadline && j->timeout_ns > (int64_t)now)
            continue;
        if (!deadline && b->levels[j->level].policy.timeout_action == BS_TIMEOUT_DELAY) {
            queue_delay(b, j); /* its new place comes later in this walk: it is skipped there */
            continue;
        }
        queue_unlink(b, j);
        j->state = JOB_FINISHING;
        *tail = j;
        tail = &j->next;
    }
    while (list != NULL) {
        bs_job_t *j = list;
        char msg[96];
        list = j->next;
        snprintf(msg, sizeof(msg), "%s exceeded in the queue after %.1f ms",
                 j->deadline_ns <= (int64_t)now ? "deadline" : "timeout",
                 (double)(now - j->enqueue_ns) / 1e6);
        job_finish(b, j, BS_ETIMEDOUT, msg, NULL);
    }
}

/* Take jobs[0..n) out of the queue and start them on the threadpool. */
static void dispatch(bs_batcher_t *b, int n, int64_t size, uint64_t now)
{
    struct bs_batch *r = &b->run;
    r->n_jobs = n;
    r->size = size;
    r->want_blocks = false;
    r->ragged = false;
    for (int k = 0; k < n; k++) /* block caching runs through the packed path */
        r->ragged |= (k > 0 && !sig_equal(b->model, r->jobs[0], r->jobs[k])) ||
                     r->jobs[k]->cache_mode != BS_CACHE_OFF;
    /* jobs that reuse their caches after those that compute (the engine's
     * rule), otherwise in queue order */
    for (int k = 1; k < n; k++)
        for (int i = k; i > 0 && r->jobs[i - 1]->cache_mode == BS_CACHE_REUSE &&
                        r->jobs[i]->cache_mode != BS_CACHE_REUSE;
             i--) {
            bs_job_t *t = r->jobs[i];
            r->jobs[i] = r->jobs[i - 1];
            r->jobs[i - 1] = t;
        }
    r->err.code = 0;
    r->err.msg[0] = '\0';
    for (int k = 0; k < n; k++) {
        bs_job_t *j = r->jobs[k];
        queue_unlink(b, j);
        j->state = JOB_RUNNING;
        r->want_blocks |= j->intermediate && j->ops.on_block != NULL;
        j->queue_ns = now - j->enqueue_ns;
        duration_add(&b->stats.queue, j->queue_ns);
    }
    r->work.data = b;
    b->running = true;
    int rc = uv_queue_work(b->loop, &r->work, batch_work, batch_after);
    assert(rc == 0 && "uv_queue_work fails only without a work callback");
    (void)rc;
}

/* When the batch jobs[0..n) may leave without growing: once its oldest job
 * has waited max_queue_delay (Triton: the pending batch's oldest request). */
static int64_t batch_ready_ns(const bs_batcher_t *b, bs_job_t *const *jobs, int n)
{
    uint64_t oldest = UINT64_MAX;
    for (int k = 0; k < n; k++)
        if (jobs[k]->enqueue_ns < oldest)
            oldest = jobs[k]->enqueue_ns;
    return bs_add_sat((int64_t)oldest, us_to_ns(b->cfg.max_queue_delay_us));
}

/* Form the head's batch, candidates in priority order, and start it when it
 * is full, reaches a preferred size, or has waited long enough; returns
 * whether it started, else sets *ready_ns to when it may. */
static bool try_dispatch(bs_batcher_t *b, uint64_t now, int64_t *ready_ns)
{
    struct bs_batch *r = &b->run;
    const bs_job_t *h = queue_first(b);
    int64_t max = b->cfg.max_batch_size, size = 0, size_pref = 0;
    int64_t cap = b->cfg.max_batch_tokens, tokens = 0;
    int n = 0, n_pref = 0;
    bool full = false;
    for (bs_job_t *j = queue_first(b); j != NULL; j = queue_next(b, j)) {
        if (j != h && !can_join(b, h, j))
            continue; /* waits for a batch of its own */
        if (size + j->batch > max || (n > 0 && cap > 0 && tokens + j->tokens > cap)) {
            full = true; /* a request over the cap alone still runs, alone */
            break;
        }
        r->jobs[n++] = j;
        size += j->batch;
        tokens += j->tokens;
        if (is_preferred(b, size)) {
            n_pref = n;
            size_pref = size;
        }
        if (size == max) {
            full = true;
            break;
        }
    }
    int64_t ready = batch_ready_ns(b, r->jobs, n);
    bool waited = b->draining || (int64_t)now >= ready;
    if (!full && !waited) {
        if (n_pref == 0) {
            *ready_ns = ready;
            return false;
        }
        n = n_pref; /* the largest preferred size reachable now */
        size = size_pref;
    }
    dispatch(b, n, size, now);
    return true;
}

/* Arm the timer for the next event: ready_ns (when the waiting batch may
 * start) and the earliest deadline or queue timeout of a queued job. */
static void arm_timer(bs_batcher_t *b, uint64_t now, int64_t ready_ns)
{
    int64_t next = ready_ns;
    for (const bs_job_t *j = queue_first(b); j != NULL; j = queue_next(b, j)) {
        if (j->deadline_ns < next)
            next = j->deadline_ns;
        if (j->timeout_ns < next)
            next = j->timeout_ns;
    }
    if (next == INT64_MAX) {
        uv_timer_stop(&b->timer);
        return;
    }
    int64_t wait_ns = next - (int64_t)now;
    uint64_t ms = wait_ns <= 0 ? 0 : (uint64_t)((wait_ns + 999999) / 1000000);
    uv_update_time(b->loop); /* timeouts count from now, not the iteration's start */
    uv_timer_start(&b->timer, on_timer, ms, 0);
}

static void schedule(bs_batcher_t *b)
{
    if (b->closing)
        return;
    uint64_t now = uv_hrtime();
    int64_t ready_ns = INT64_MAX;
    expire(b, now);
    if (b->freeing)
        return; /* an on_done freed the batcher */
    if (!b->running && b->n_queued > 0)
        try_dispatch(b, now, &ready_ns);
    if (b->freeing)
        return;
    arm_timer(b, now, ready_ns);
    if (b->draining && b->drain_cb != NULL && b->n_queued == 0 && !b->running) {
        void (*done)(void *) = b->drain_cb;
        b->drain_cb = NULL;
        done(b->drain_arg); /* may free b: nothing after this */
    }
}

static void on_timer(uv_timer_t *t)
{
    schedule(t->data);
}

/* ---- public API --------------------------------------------------------- */

static int check_config(const bs_model_t *model, const struct bs_serving_config *cfg,
                        const struct bs_batcher_deps *deps, struct bs_err *err)
{
    if (model == NULL || deps == NULL || deps->be == NULL)
        return bs_err_set(err, BS_EINVAL, "batcher: a model and its backend are required");
    if (cfg->max_batch_size < 1)
        return bs_err_set(err, BS_EINVAL, "max_batch_size %d: must be at least 1",
                          cfg->max_batch_size);
    if (cfg->max_queue_delay_us < 0)
        return bs_err_set(err, BS_EINVAL, "negative queue delay");
    int rc = bs_serving_check(cfg, err); /* queue policies and priority levels */
    if (rc != 0)
        return rc;
    if (cfg->max_batch_tokens < 0)
        return bs_err_set(err, BS_EINVAL, "max_batch_tokens %lld: must be 0 (no cap) or more",
                          (long long)cfg->max_batch_tokens);
    if (cfg->n_preferred < 0 || cfg->n_preferred > BS_MAX_PREFERRED)
        return bs_err_set(err, BS_EINVAL, "%d preferred batch sizes: at most %d", cfg->n_preferred,
                          BS_MAX_PREFERRED);
    for (int i = 0; i < cfg->n_preferred; i++)
        if (cfg->preferred_batch_size[i] < 1 || cfg->preferred_batch_size[i] > cfg->max_batch_size)
            return bs_err_set(err, BS_EINVAL, "preferred_batch_size %d: not in [1, %d]",
                              cfg->preferred_batch_size[i], cfg->max_batch_size);
    return 0;
}

static void free_memory(bs_batcher_t *b)
{
    free(b->levels);
    free(b->stats.batch);
    free(b->run.jobs);
    free(b->run.parts);
    free(b->run.in);
    free(b->run.bufs);
    free(b);
}

int bs_batcher_init(bs_batcher_t **bp, uv_loop_t *loop, bs_model_t *model,
                    const struct bs_serving_config *cfg, const struct bs_batcher_deps *deps,
                    struct bs_err *err)
{
    int rc, n_model_in = model ? bs_model_n_inputs(model) : 0;
    *bp = NULL;
    if ((rc = check_config(model, cfg, deps, err)) != 0)
        return rc;
    bs_batcher_t *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    b->loop = loop;
    b->model = model;
    b->cfg = *cfg;
    b->metrics = deps->metrics;
    b->main_input = bs_model_input(model, 0)->name;
    b->msgs_tail = &b->msgs;
    b->n_levels = cfg->priority_levels > 0 ? cfg->priority_levels : 1;
    b->default_level = cfg->priority_levels > 0 ? cfg->default_priority_level - 1 : 0;
    b->levels = calloc((size_t)b->n_levels, sizeof(*b->levels));
    b->stats.n_batch = cfg->max_batch_size;
    b->stats.batch = calloc((size_t)cfg->max_batch_size, sizeof(*b->stats.batch));
    b->run.jobs = calloc((size_t)cfg->max_batch_size, sizeof(*b->run.jobs));
    b->run.parts = calloc((size_t)cfg->max_batch_size, sizeof(*b->run.parts));
    b->run.in = calloc((size_t)n_model_in + 1, sizeof(*b->run.in));
    b->run.bufs = calloc((size_t)n_model_in + 1, sizeof(*b->run.bufs));
    if (b->levels == NULL || b->stats.batch == NULL || b->run.jobs == NULL ||
        b->run.parts == NULL || b->run.in == NULL || b->run.bufs == NULL) {
        rc = bs_err_set(err, BS_ENOMEM, "out of memory");
        goto fail_alloc;
    }
    for (int i = 0; i < b->n_levels; i++)
        b->levels[i].policy = bs_serving_policy(cfg, level_number(b, i));
    for (int i = 0; i < cfg->max_batch_size; i++)
        b->stats.batch[i].batch_size = (uint64_t)i + 1;
    if ((rc = uv_mutex_init(&b->lock)) != 0) {
        rc = bs_err_set(err, BS_EINTERNAL, "uv_mutex_init: %s", uv_strerror(rc));
        goto fail_alloc;
    }
    if ((rc = uv_async_init(loop, &b->async, on_async)) != 0) {
        rc = bs_err_set(err, BS_EINTERNAL, "uv_async_init: %s", uv_strerror(rc));
        goto fail_mutex;
    }
    uv_unref((uv_handle_t *)&b->async); /* only a running batch (a uv_work_t) keeps the loop */
    uv_timer_init(loop, &b->timer);     /* cannot fail */
    b->async.data = b->timer.data = b;
    b->n_open = 2;
    bs_arena_init(&b->arena, deps->be);
    *bp = b;
    return 0;
fail_mutex:
    uv_mutex_destroy(&b->lock);
fail_alloc:
    free_memory(b);
    return rc;
}

/* Can this request join the queue of its level (an index)? The main input
 * and its batch size. */
static int submit_check(bs_batcher_t *b, const struct bs_named_tensor *in, int n_in, int level,
                        struct bs_tensor *out, int64_t *batch, struct bs_err *err)
{
    const struct level *lv = &b->levels[level];
    int rc;
    if (b->draining)
        return bs_err_set(err, BS_EUNSUPP, "shutting down");
    if ((rc = bs_model_check(b->model, in, n_in, out, err)) != 0)
        return rc;
    const struct bs_tensor *main_t = NULL;
    for (int i = 0; i < n_in; i++)
        if (strcmp(in[i].name, b->main_input) == 0)
            main_t = &in[i].t;
    if (main_t == NULL || main_t->n_dims < 1) /* the engine's check rules this out */
        return bs_err_set(err, BS_EINVAL, "missing input \"%s\"", b->main_input);
    if (main_t->ne[0] > b->cfg.max_batch_size)
        return bs_err_set(err, BS_EINVAL, "batch %lld exceeds max_batch_size %d",
                          (long long)main_t->ne[0], b->cfg.max_batch_size);
    if (lv->policy.max_queue_size > 0 && lv->n >= lv->policy.max_queue_size) {
        if (b->cfg.priority_levels == 0)
            return bs_err_set(err, BS_EBUSY, "queue full (%d requests)", lv->n);
        return bs_err_set(err, BS_EBUSY, "queue full at priority level %d (%d requests)",
                          level_number(b, level), lv->n);
    }
    *batch = main_t->ne[0];
    return 0;
}

/* The queue timeout of a job of level lv queued at now_ns: the level's
 * default, or the request's own timeout where the policy allows it and it is
 * shorter (Triton's PolicyQueue::Enqueue; a default of 0 is no timeout, so
 * then any request timeout is shorter). */
static int64_t queue_timeout_ns(const struct level *lv, int64_t timeout_us, uint64_t now_ns)
{
    int64_t t = lv->policy.default_timeout_us;
    if (lv->policy.allow_timeout_override && timeout_us > 0 && (t == 0 || timeout_us < t))
        t = timeout_us;
    return bs_deadline_after_us((int64_t)now_ns, t);
}

int bs_batcher_submit(bs_batcher_t *b, const struct bs_batcher_request *req,
                      const struct bs_job_ops *ops, void *arg, bs_job_t **job, struct bs_err *err)
{
    struct bs_tensor out;
    int64_t batch = 0;
    int rc, n_in = req ? req->n_in : 0;
    *job = NULL;
    if (req == NULL || ops == NULL || ops->on_done == NULL || n_in < 0 ||
        (n_in > 0 && req->in == NULL) ||
        (req->out_dtype != BS_TYPE_F32 && req->out_dtype != BS_TYPE_BF16 &&
         req->out_dtype != BS_TYPE_F16))
        return bs_err_set(err, BS_EINVAL, "batcher: bad submit arguments");
    int level = level_of(b, req->priority);
    bs_metrics_priority(b->metrics, level_number(b, level));
    bs_job_t *j = NULL;
    if ((rc = submit_check(b, req->in, n_in, level, &out, &batch, err)) == 0 &&
        (j = calloc(1, sizeof(*j) + sizeof(j->in[0]) * (size_t)n_in)) == NULL)
        rc = bs_err_set(err, BS_ENOMEM, "out of memory");
    if (rc != 0) {
        bs_batcher_count_failure(b, rc);
        return rc;
    }
    memcpy(j->in, req->in, sizeof(j->in[0]) * (size_t)n_in);
    j->n_in = n_in;
    j->batch = batch;
    j->tokens = bs_model_tokens(b->model, req->in, n_in);
    j->out_shape = out;
    j->ops = *ops;
    j->arg = arg;
    j->intermediate = req->intermediate;
    j->out_dtype = req->out_dtype;
    j->solo = !job_is_batchable(b->model, j);
    j->level = level;
    j->enqueue_ns = uv_hrtime();
    j->deadline_ns = req->deadline_ns;
    j->timeout_ns = queue_timeout_ns(&b->levels[level], req->timeout_us, j->enqueue_ns);
    j->stop_ns = j->deadline_ns;
    j->cache = req->cache;
    j->cache_mode = req->cache_mode;
    /* its own timeout, where its level honours it, also ends the wait for
     * it while it runs */
    if (req->timeout_us > 0 && b->levels[level].policy.allow_timeout_override) {
        int64_t t = bs_deadline_after_us((int64_t)j->enqueue_ns, req->timeout_us);
        j->stop_ns = t < j->stop_ns ? t : j->stop_ns;
    }
    j->state = JOB_QUEUED;
    queue_push(b, j);
    kick(b);
    *job = j;
    return 0;
}

void bs_batcher_cancel(bs_batcher_t *b, bs_job_t *j)
{
    if (j == NULL)
        return;
    switch (j->state) {
    case JOB_QUEUED:
        queue_unlink(b, j);
        job_finish(b, j, BS_ECANCELED, "cancelled", NULL);
        kick(b); /* the head, its delay or a drain may have changed */
        break;
    case JOB_RUNNING:
        atomic_store(&j->cancelled, true);
        break;
    case JOB_FINISHING:
        break;
    }
}

int bs_batcher_queued(const bs_batcher_t *b)
{
    return b->n_queued;
}

int bs_batcher_running(const bs_batcher_t *b)
{
    return b->running ? 1 : 0;
}

const struct bs_model_stats *bs_batcher_stats(const bs_batcher_t *b)
{
    return &b->stats;
}

void bs_batcher_drain(bs_batcher_t *b, void (*done)(void *arg), void *arg)
{
    b->draining = true;
    b->drain_cb = done;
    b->drain_arg = arg;
    kick(b);
}

static void on_close(uv_handle_t *h)
{
    bs_batcher_t *b = h->data;
    if (--b->n_open > 0)
        return;
    uv_mutex_destroy(&b->lock);
    free_memory(b);
}

/* Nothing runs any more: release the arena and close the handles. */
static void release(bs_batcher_t *b)
{
    b->closing = true;
    bs_arena_free(&b->arena);
    uv_close((uv_handle_t *)&b->timer, on_close);
    uv_close((uv_handle_t *)&b->async, on_close);
}

void bs_batcher_free(bs_batcher_t *b)
{
    if (b == NULL || b->freeing)
        return;
    b->freeing = true;
    b->draining = true;
    b->drain_cb = NULL;
    bs_job_t *j;
    while ((j = queue_first(b)) != NULL) { /* one at a time: an on_done may cancel another */
        queue_unlink(b, j);
        job_finish(b, j, BS_ECANCELED, "the model is being unloaded", NULL);
    }
    for (int k = 0; b->running && k < b->run.n_jobs; k++) /* the running batch stops early */
        atomic_store(&b->run.jobs[k]->cancelled, true);
    if (!b->running)
        release(b);
}
