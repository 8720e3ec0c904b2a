/* The gRPC transport (see rpc.h): gRPC core on its own completion queue,
 * every completion handed to the libuv loop, where each call's state machine
 * runs.
 *
 * Threads and ownership
 * - The completion-queue thread (rpc_cq_main) only calls
 *   grpc_completion_queue_next, then appends the finished tag to
 *   server->ev_head/ev_tail and sets server->cq_exited, both under ev_lock,
 *   and calls uv_async_send. While a tag is queued to gRPC or sits in that
 *   list, its ok/next fields belong to that thread; the loop reads them only
 *   after taking the list under the lock.
 * - The loop thread owns everything else: the method table, the call
 *   objects and their queues, the accept slots, the flow-control counts, the
 *   shutdown state. Every grpc_call_start_batch and grpc_server_request_* is
 *   issued from it.
 *
 * Methods: the services' rows (struct bs_rpc_method) are copied at creation
 * and registered with gRPC core; each row's handlers hear its calls. The
 * transport itself answers only what no service can: unknown methods
 * (UNIMPLEMENTED), request-cardinality violations, authentication failures.
 *
 * Calls
 * - Each method keeps its row's number of grpc_server_request_registered_call
 *   armed (re-armed as each call arrives), plus a few generic
 *   grpc_server_request_call that answer UNIMPLEMENTED at once.
 * - A call's state is a set of flag bits (enum call_flag, call_has).
 * - A method of one request (UNARY, SERVER_STREAM) gets its request with the
 *   call; the transport reads on to the client's end of stream before the
 *   handler runs (call_await_eos, call_on_eos).
 * - Streams are flow-controlled: a BIDI call stops reading while its
 *   service's requests in progress plus its unsent answers, or the unsent
 *   bytes (its own or every call's), reach their bounds (call_may_read).
 * - Each call starts GRPC_OP_RECV_CLOSE_ON_SERVER alone at once: its
 *   completion says whether the call was cancelled. Sends are serialized
 *   (one send batch in flight, a queue behind it), receives too.
 * - A call holds references: one for the transport (dropped when recv_close
 *   completes), one per batch in flight, and those the application takes.
 *   The grpc_call is unreffed when the last goes.
 * - When the transport itself has to fail a call (allocation failure), it
 *   cancels it with a status; recv_close then reports the cancellation and
 *   the application hears on_cancel like for any other cancellation.
 * - on_cancel goes once to every call handed to the application whose
 *   recv_close reports a cancellation, even one it already answered: gRPC
 *   core completes the pending read of a cancelled stream like a half-close,
 *   so on_stream_end (and the application's finish) can come first.
 *
 * Authentication: with a hook configured (auth.c: the bearer token),
 * rpc_start_call runs it on every arriving call of a method whose row is not
 * open (unknown methods included) before dispatching: a call it refuses is
 * finished UNAUTHENTICATED there, so no handler ever sees it. The metadata
 * is copied into the call with each value's length (a NUL byte inside a
 * value cannot shorten it).
 *
 * Shutdown: grpc_server_shutdown_and_notify; calls whose answer is decided
 * (status set) finish sending it, every other call is cancelled at once, and
 * a timer cancels whatever is left after RPC_SHUTDOWN_FLUSH_MS
 * (grpc_server_cancel_all_calls). Once the shutdown tag is back, every armed
 * request has returned and no call object is left, the completion queue is
 * shut down (so no batch can ever start on a shut-down queue), its thread
 * joined, gRPC objects destroyed, the async handle and the timer closed, and
 * done() called from the last close callback. */
#include "rpc.h"

#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "log.h"

#define RPC_DEFAULT_MAX_MESSAGE    (64 << 20)
#define RPC_DEFAULT_ADDRESS        "0.0.0.0:8001"
#define RPC_SHUTDOWN_FLUSH_MS      5000       /* answers still sending at shutdown get this long */
#define RPC_TRIM_AFTER_BYTES       (8u << 20) /* a call that held this much unsent: trim on free */
#define RPC_DEFAULT_STREAM_PENDING 16
#define RPC_DEFAULT_STREAM_UNSENT  ((size_t)64 << 20)
#define RPC_DEFAULT_UNSENT         ((size_t)512 << 20)

/* ---- methods ------------------------------------------------------------------------------- */

#define RPC_GENERIC_SLOTS 4 /* unknown methods, answered UNIMPLEMENTED */
#define RPC_DEFAULT_SLOTS 2

/* A registered method: the service's row and gRPC core's handle. */
struct rpc_method {
    struct bs_rpc_method def;
    void *handle; /* grpc_server_register_method */
};

/* Methods of one request read their payload with the call (BIDI ones read
 * their messages themselves). */
static bool rpc_kind_reads_payload(enum bs_rpc_kind kind)
{
    return kind != BS_RPC_BIDI;
}

/* ---- objects -------------------------------------------------------------------------------- */

enum rpc_tag_kind {
    RPC_TAG_ACCEPT,   /* a requested call arrived (owner: struct rpc_accept) */
    RPC_TAG_SHUTDOWN, /* grpc_server_shutdown_and_notify (owner: the server) */
    RPC_TAG_CLOSE,    /* RECV_CLOSE_ON_SERVER (owner: the call) */
    RPC_TAG_RECV,     /* RECV_MESSAGE */
    RPC_TAG_SEND,     /* SEND_INITIAL_METADATA / SEND_MESSAGE / SEND_STATUS */
};

struct rpc_tag {
    enum rpc_tag_kind kind;
    void *owner;
    int ok;               /* set by the CQ thread */
    struct rpc_tag *next; /* the CQ-to-loop list */
};

/* One armed grpc_server_request_*call. */
struct rpc_accept {
    struct rpc_tag tag;
    bs_rpc_server_t *srv;
    int method; /* index in the server's methods; -1: the generic request */
    bool armed;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_call_details details; /* generic only */
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
};

/* A call's state, as flag bits (call->flags) with the predicates below. */
enum call_flag {
    CALL_MD_SENT = 1u << 0,       /* initial metadata went out */
    CALL_SEND_BUSY = 1u << 1,     /* a send batch is in flight */
    CALL_RECV_BUSY = 1u << 2,     /* a receive batch is in flight */
    CALL_RECV_BLOCKED = 1u << 3,  /* a read is due but waits for the bounds (call_may_read) */
    CALL_STATUS_SET = 1u << 4,    /* a status is decided: no more sends may be queued */
    CALL_STATUS_SENT = 1u << 5,   /* ... and its batch started */
    CALL_CLOSED = 1u << 6,        /* recv_close completed */
    CALL_CANCELLED = 1u << 7,     /* cancelled, or about to be (on_cancel follows) */
    CALL_CANCEL_HEARD = 1u << 8,  /* on_cancel delivered */
    CALL_APP_OWNED = 1u << 9,     /* handed to its service (on_call, on_stream_open) */
    CALL_APP_DONE = 1u << 10,     /* the service answered (reply, fail, finish) */
    CALL_LOST = 1u << 11,         /* its request never reached the service: on_lost at close */
    CALL_AWAITING_EOS = 1u << 12, /* one request read; the read after it must find the end */
    CALL_ENDED = 1u << 13,        /* the client half-closed */
};

/* A queued outgoing message; sent as a slice that frees the node (its
 * length is kept in the call's send_len while its batch is in flight). */
struct rpc_msg {
    struct rpc_msg *next;
    size_t len;
    uint8_t data[];
};

struct rpc_md {
    const char *key, *value;
    size_t value_len; /* the value's bytes (it may hold a NUL) */
};

struct bs_rpc_call {
    bs_rpc_server_t *srv;
    grpc_call *call;
    enum bs_rpc_kind kind;
    int method; /* index in the server's methods; -1: an unknown method */
    int refs;
    struct rpc_tag close_tag, recv_tag, send_tag;
    int close_cancelled; /* RECV_CLOSE_ON_SERVER's answer */
    grpc_byte_buffer *recv_buf;
    grpc_byte_buffer *send_buf;
    struct rpc_msg *sq_head, *sq_tail;
    size_t send_len;     /* bytes of the message in the send batch in flight */
    int unsent_msgs;     /* queued messages plus the one in flight */
    size_t unsent_bytes; /* their bytes */
    size_t unsent_peak;  /* the most unsent_bytes ever held (memory to give back) */
    int app_busy;        /* requests the application has read and not answered */
    enum bs_rpc_status status;
    grpc_slice details;
    unsigned flags;     /* enum call_flag bits: the call's state */
    grpc_slice request; /* that request, until the end of the client's stream is seen */
    int64_t deadline;
    struct rpc_md *md;
    size_t n_md;
    void *data;
    bs_rpc_call_t *prev, *next; /* the server's live calls */
};

struct bs_rpc_server {
    uv_loop_t *loop;
    uv_async_t async;
    uv_thread_t cq_thread;
    uv_mutex_t ev_lock;
    struct rpc_tag *ev_head, *ev_tail; /* ev_lock */
    bool cq_exited;                    /* ev_lock */

    grpc_server *server;
    grpc_completion_queue *cq;
    struct rpc_method *methods;
    int n_methods;
    struct rpc_accept *slots; /* every method's accept slots, then the generic ones */
    int n_slots;
    struct rpc_tag shutdown_tag;
    struct bs_rpc_auth auth; /* check NULL: none */

    bs_rpc_call_t *calls; /* every call object alive */
    int n_calls;
    /* Flow control of streams (see call_may_read). */
    int max_stream_pending;
    size_t max_stream_unsent, max_unsent;
    size_t unsent_bytes; /* every call's unsent_bytes */
    bool global_blocked; /* some stream waits for unsent_bytes to fall below max_unsent */
    uint64_t last_trim_ns;
    int n_armed;
    bool shutting_down, shutdown_notified, cq_down, joined, closed;
    uv_timer_t flush_timer; /* started by shutdown: cancels what is still sending */
    int n_open;             /* handles to close at the end: async (+ flush_timer) */
    void (*done)(void *arg);
    void *done_arg;
};

static void rpc_check_shutdown(bs_rpc_server_t *s);

static bool call_has(const bs_rpc_call_t *c, enum call_flag f)
{
    return (c->flags & f) != 0;
}

static void call_set(bs_rpc_call_t *c, enum call_flag f)
{
    c->flags |= f;
}

static void call_clear(bs_rpc_call_t *c, enum call_flag f)
{
    c->flags &= ~(unsigned)f;
}

static void call_put(bs_rpc_call_t *c, enum call_flag f, bool on)
{
    if (on)
        call_set(c, f);
    else
        call_clear(c, f);
}

static void call_pump(bs_rpc_call_t *c);
static void call_start_recv(bs_rpc_call_t *c);

/* ---- small helpers -------------------------------------------------------------------------- */

/* A gpr_timespec deadline (any clock) on uv_hrtime()'s clock, in ns. */
static int64_t rpc_deadline_ns(gpr_timespec d)
{
    int64_t now = (int64_t)uv_hrtime();
    if (d.tv_sec == INT64_MAX) /* gpr_inf_future */
        return INT64_MAX;
    gpr_timespec left =
        gpr_time_sub(gpr_convert_clock_type(d, GPR_CLOCK_MONOTONIC), gpr_now(GPR_CLOCK_MONOTONIC));
    if (left.tv_sec >= (INT64_MAX - now) / 1000000000 - 1)
        return INT64_MAX;
    if (left.tv_sec <= -(now / 1000000000) - 1)
        return 0; /* passed long ago */
    int64_t t = now + left.tv_sec * 1000000000 + left.tv_nsec;
    return t > 0 ? t : 0;
}

/* A status detail slice that owns a copy of msg (empty when msg is NULL or
 * the copy fails: the status code still goes out). */
static grpc_slice rpc_details(const char *msg)
{
    size_t n = msg != NULL ? strlen(msg) : 0;
    char *p = n > 0 ? malloc(n) : NULL;
    if (p == NULL)
        return grpc_empty_slice();
    memcpy(p, msg, n);
    return grpc_slice_new(p, n, free);
}

/* ---- the completion-queue thread ------------------------------------------------------------ */

static void rpc_cq_main(void *arg)
{
    bs_rpc_server_t *s = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        struct rpc_tag *t = ev.tag;
        t->ok = ev.success;
        t->next = NULL;
        uv_mutex_lock(&s->ev_lock);
        if (s->ev_tail != NULL)
            s->ev_tail->next = t;
        else
            s->ev_head = t;
        s->ev_tail = t;
        uv_mutex_unlock(&s->ev_lock);
        uv_async_send(&s->async);
    }
    uv_mutex_lock(&s->ev_lock);
    s->cq_exited = true;
    uv_mutex_unlock(&s->ev_lock);
    uv_async_send(&s->async);
}

/* ---- call objects --------------------------------------------------------------------------- */

/* Copy request metadata into one allocation of NUL-terminated strings. */
static int call_copy_md(bs_rpc_call_t *c, const grpc_metadata_array *md)
{
    size_t bytes = md->count * sizeof(struct rpc_md);
    if (md->count == 0)
        return 0;
    for (size_t i = 0; i < md->count; i++)
        bytes +=
            GRPC_SLICE_LENGTH(md->metadata[i].key) + GRPC_SLICE_LENGTH(md->metadata[i].value) + 2;
    c->md = malloc(bytes);
    if (c->md == NULL)
        return BS_ENOMEM;
    char *p = (char *)(c->md + md->count);
    for (size_t i = 0; i < md->count; i++) {
        const grpc_slice *kv[2] = {&md->metadata[i].key, &md->metadata[i].value};
        const char **dst[2] = {&c->md[i].key, &c->md[i].value};
        for (int j = 0; j < 2; j++) {
            size_t n = GRPC_SLICE_LENGTH(*kv[j]);
            memcpy(p, GRPC_SLICE_START_PTR(*kv[j]), n);
            p[n] = '\0';
            *dst[j] = p;
            p += n + 1;
        }
        c->md[i].value_len = GRPC_SLICE_LENGTH(md->metadata[i].value);
    }
    c->n_md = md->count;
    return 0;
}

static bs_rpc_call_t *call_new(bs_rpc_server_t *s, grpc_call *gc, enum bs_rpc_kind kind, int method,
                               gpr_timespec deadline, const grpc_metadata_array *md)
{
    bs_rpc_call_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    if (call_copy_md(c, md) != 0) {
        free(c);
        return NULL;
    }
    c->srv = s;
    c->call = gc;
    c->kind = kind;
    c->method = method;
    c->refs = 1; /* the transport's */
    c->close_tag = (struct rpc_tag){.kind = RPC_TAG_CLOSE, .owner = c};
    c->recv_tag = (struct rpc_tag){.kind = RPC_TAG_RECV, .owner = c};
    c->send_tag = (struct rpc_tag){.kind = RPC_TAG_SEND, .owner = c};
    c->details = grpc_empty_slice();
    c->request = grpc_empty_slice();
    c->deadline = rpc_deadline_ns(deadline);
    c->next = s->calls;
    if (s->calls != NULL)
        s->calls->prev = c;
    s->calls = c;
    s->n_calls++;
    return c;
}

/* May this stream read its next message? Not while its requests in
 * progress plus its unsent answers reach max_stream_pending, nor while its
 * unsent answers hold max_stream_unsent bytes, nor while all calls' unsent
 * answers hold max_unsent bytes: a client that does not read its answers
 * stops being read (HTTP/2 flow control then stops it sending). */
static bool call_may_read(const bs_rpc_call_t *c)
{
    const bs_rpc_server_t *s = c->srv;
    return c->app_busy + c->unsent_msgs < s->max_stream_pending &&
           c->unsent_bytes < s->max_stream_unsent && s->unsent_bytes < s->max_unsent;
}

static void rpc_unblock_reads(bs_rpc_server_t *s);

/* Give memory back to the system after a large backlog was freed (glibc
 * keeps freed heap for reuse otherwise); at most once a second. */
static void rpc_trim_memory(bs_rpc_server_t *s)
{
    uint64_t now = uv_hrtime();
    if (now - s->last_trim_ns < 1000000000ull)
        return;
    s->last_trim_ns = now;
    malloc_trim(0);
}

/* len bytes of one message leave the call's unsent answers. */
static void call_unsent_sub(bs_rpc_call_t *c, size_t len)
{
    bs_rpc_server_t *s = c->srv;
    c->unsent_msgs--;
    c->unsent_bytes -= len;
    s->unsent_bytes -= len;
    if (call_has(c, CALL_RECV_BLOCKED) && call_may_read(c))
        call_start_recv(c);
    if (s->global_blocked && s->unsent_bytes < s->max_unsent)
        rpc_unblock_reads(s);
}

static void call_drop_queue(bs_rpc_call_t *c)
{
    struct rpc_msg *m = c->sq_head;
    c->sq_head = c->sq_tail = NULL;
    while (m != NULL) {
        struct rpc_msg *next = m->next;
        call_unsent_sub(c, m->len);
        free(m);
        m = next;
    }
}

static void call_free(bs_rpc_call_t *c)
{
    bs_rpc_server_t *s = c->srv;
    grpc_call_unref(c->call);
    call_clear(c, CALL_RECV_BLOCKED);
    call_drop_queue(c);
    if (c->unsent_peak >= RPC_TRIM_AFTER_BYTES)
        rpc_trim_memory(s);
    grpc_slice_unref(c->details);
    grpc_slice_unref(c->request);
    free(c->md);
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        s->calls = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    s->n_calls--;
    free(c);
    rpc_check_shutdown(s);
}

static void call_unref(bs_rpc_call_t *c)
{
    if (--c->refs == 0)
        call_free(c);
}

/* Start one batch; the batch holds a reference until its tag comes back. */
static int call_batch(bs_rpc_call_t *c, const grpc_op *ops, size_t n, struct rpc_tag *tag)
{
    if (c->srv->cq_down) /* cannot happen while the call object lives: checked anyway */
        return BS_EINTERNAL;
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag, NULL);
    if (e != GRPC_CALL_OK) {
        bs_log(BS_LOG_ERROR, NULL, "rpc: grpc_call_start_batch: %s", grpc_call_error_to_string(e));
        return BS_EINTERNAL;
    }
    c->refs++;
    return 0;
}

/* The transport fails the call: the client gets status; recv_close then
 * reports a cancellation, which the application hears as on_cancel. */
static void call_abort(bs_rpc_call_t *c, enum bs_rpc_status status, const char *msg)
{
    if (call_has(c, CALL_CANCELLED) || call_has(c, CALL_CLOSED))
        return;
    call_set(c, CALL_CANCELLED);
    call_drop_queue(c);
    grpc_call_cancel_with_status(c->call, (grpc_status_code)status, msg, NULL);
}

/* Queue a copy of data behind the messages already waiting. */
static int call_queue(bs_rpc_call_t *c, const uint8_t *data, size_t len)
{
    struct rpc_msg *m = malloc(sizeof(*m) + len);
    if (m == NULL)
        return BS_ENOMEM;
    m->next = NULL;
    m->len = len;
    c->unsent_msgs++;
    c->unsent_bytes += len;
    c->srv->unsent_bytes += len;
    if (c->unsent_bytes > c->unsent_peak)
        c->unsent_peak = c->unsent_bytes;
    if (len > 0)
        memcpy(m->data, data, len);
    if (c->sq_tail != NULL)
        c->sq_tail->next = m;
    else
        c->sq_head = m;
    c->sq_tail = m;
    return 0;
}

static void call_set_status(bs_rpc_call_t *c, enum bs_rpc_status status, const char *msg)
{
    call_set(c, CALL_STATUS_SET);
    c->status = status;
    grpc_slice_unref(c->details);
    c->details = rpc_details(msg);
}

static void call_finish(bs_rpc_call_t *c, enum bs_rpc_status status, const char *msg)
{
    if (call_has(c, CALL_CANCELLED) || call_has(c, CALL_STATUS_SET))
        return;
    call_set_status(c, status, msg);
    call_pump(c);
}

/* Start the next send batch: initial metadata once, the next queued
 * message, and the status once nothing else is queued. */
static void call_pump(bs_rpc_call_t *c)
{
    grpc_op ops[3];
    size_t n = 0;
    struct rpc_msg *m = c->sq_head;
    if (call_has(c, CALL_SEND_BUSY) || call_has(c, CALL_CANCELLED) || call_has(c, CALL_CLOSED) ||
        call_has(c, CALL_STATUS_SENT))
        return;
    if (m == NULL && !call_has(c, CALL_STATUS_SET))
        return;
    memset(ops, 0, sizeof(ops));
    if (!call_has(c, CALL_MD_SENT))
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (m != NULL) {
        grpc_slice sl = grpc_slice_new_with_user_data(m->data, m->len, free, m);
        c->send_len = m->len;
        c->sq_head = m->next;
        if (c->sq_head == NULL)
            c->sq_tail = NULL;
        c->send_buf = grpc_raw_byte_buffer_create(&sl, 1);
        grpc_slice_unref(sl); /* the buffer holds its own reference */
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = c->send_buf;
    }
    if (call_has(c, CALL_STATUS_SET) && c->sq_head == NULL) {
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = (grpc_status_code)c->status;
        ops[n++].data.send_status_from_server.status_details = &c->details;
    }
    if (call_batch(c, ops, n, &c->send_tag) != 0) {
        if (c->send_buf != NULL) {
            grpc_byte_buffer_destroy(c->send_buf);
            call_unsent_sub(c, c->send_len);
        }
        c->send_buf = NULL;
        call_abort(c, BS_RPC_INTERNAL, "cannot send");
        return;
    }
    call_set(c, CALL_SEND_BUSY);
    call_set(c, CALL_MD_SENT);
    call_put(c, CALL_STATUS_SENT, call_has(c, CALL_STATUS_SET) && c->sq_head == NULL);
}

static void call_on_sent(bs_rpc_call_t *c, int ok)
{
    call_clear(c, CALL_SEND_BUSY);
    if (c->send_buf != NULL) {
        grpc_byte_buffer_destroy(c->send_buf);
        call_unsent_sub(c, c->send_len);
    }
    c->send_buf = NULL;
    if (ok)
        call_pump(c);
    else
        call_drop_queue(c); /* the call is going away; recv_close says how */
    call_unref(c);
}

/* The handlers of the call's method (NULL for an unknown method). */
static const struct bs_rpc_handlers *call_handlers(const bs_rpc_call_t *c)
{
    return c->method >= 0 ? c->srv->methods[c->method].def.h : NULL;
}

static int call_id(const bs_rpc_call_t *c)
{
    return c->method >= 0 ? c->srv->methods[c->method].def.id : -1;
}

/* Deliver on_cancel once for a call the application was given, even when it
 * has already answered: gRPC core completes a pending read of a cancelled
 * stream like a half-close, so on_stream_end (and the application's finish)
 * may come first, and only recv_close tells the two apart. */
static void call_notify_cancel(bs_rpc_call_t *c)
{
    bs_rpc_server_t *s = c->srv;
    call_set(c, CALL_CANCELLED);
    call_drop_queue(c);
    const struct bs_rpc_handlers *h = call_handlers(c);
    (void)s;
    if (!call_has(c, CALL_APP_OWNED) || call_has(c, CALL_CANCEL_HEARD) || h == NULL ||
        h->on_cancel == NULL)
        return;
    call_set(c, CALL_CANCEL_HEARD);
    c->refs++;
    h->on_cancel(h->arg, c);
    call_unref(c);
}

/* Tell the application once about a unary call whose request never reached
 * it (see on_lost). */
static void call_report_lost(bs_rpc_call_t *c, bool cancelled)
{
    const struct bs_rpc_handlers *h = call_handlers(c);
    if (call_has(c, CALL_LOST) && h != NULL && h->on_lost != NULL)
        h->on_lost(h->arg, call_id(c), cancelled);
    call_clear(c, CALL_LOST);
}

static void call_on_close(bs_rpc_call_t *c, int ok)
{
    call_set(c, CALL_CLOSED);
    call_report_lost(c, !ok || c->close_cancelled || call_has(c, CALL_CANCELLED));
    if (!ok || c->close_cancelled || call_has(c, CALL_CANCELLED))
        call_notify_cancel(c);
    call_unref(c); /* the transport's reference */
    call_unref(c); /* the batch's */
}

static int call_start_close(bs_rpc_call_t *c)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    return call_batch(c, &op, 1, &c->close_tag);
}

/* ---- receiving ------------------------------------------------------------------------------ */

/* The bytes of bb as one slice (NULL bb: empty). */
static int rpc_read(grpc_byte_buffer *bb, grpc_slice *out)
{
    grpc_byte_buffer_reader r;
    if (bb == NULL) {
        *out = grpc_empty_slice();
        return 0;
    }
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return BS_EFORMAT;
    *out = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    return 0;
}

static void call_start_recv(bs_rpc_call_t *c)
{
    grpc_op op;
    if (call_has(c, CALL_RECV_BUSY) || call_has(c, CALL_CANCELLED) || call_has(c, CALL_CLOSED) ||
        call_has(c, CALL_STATUS_SET) || call_has(c, CALL_ENDED))
        return;
    call_put(c, CALL_RECV_BLOCKED, !call_may_read(c));
    if (call_has(c, CALL_RECV_BLOCKED)) {
        c->srv->global_blocked |= c->srv->unsent_bytes >= c->srv->max_unsent;
        return;
    }
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_buf;
    if (call_batch(c, &op, 1, &c->recv_tag) != 0) {
        call_abort(c, BS_RPC_INTERNAL, "cannot receive");
        return;
    }
    call_set(c, CALL_RECV_BUSY);
}

/* One message, or the half-close (bb NULL), on a bidirectional call. */
static void call_on_stream_input(bs_rpc_call_t *c, grpc_byte_buffer *bb)
{
    const struct bs_rpc_handlers *h = call_handlers(c);
    grpc_slice sl;
    if (bb == NULL) {
        call_set(c, CALL_ENDED);
        if (h->on_stream_end != NULL)
            h->on_stream_end(h->arg, c);
        else
            call_finish(c, BS_RPC_OK, NULL);
        return;
    }
    if (rpc_read(bb, &sl) != 0) {
        call_abort(c, BS_RPC_INTERNAL, "cannot read the request message");
        return;
    }
    if (h->on_stream_msg != NULL)
        h->on_stream_msg(h->arg, c, GRPC_SLICE_START_PTR(sl), GRPC_SLICE_LENGTH(sl));
    grpc_slice_unref(sl);
    call_start_recv(c);
}

static void rpc_dispatch_call(bs_rpc_call_t *c, const uint8_t *data, size_t len);

/* The read after a one-request method's request: the end of the client's
 * stream lets the request through; a second message is a cardinality
 * violation (UNIMPLEMENTED, gRPC's status codes); a failed read means the
 * call is going away (recv_close says how). */
static void call_on_eos(bs_rpc_call_t *c, int ok, grpc_byte_buffer *bb)
{
    call_clear(c, CALL_AWAITING_EOS);
    if (!ok || call_has(c, CALL_CANCELLED) || call_has(c, CALL_STATUS_SET)) {
        call_put(c, CALL_LOST, c->kind == BS_RPC_UNARY);
        if (call_has(c, CALL_CLOSED)) /* recv_close came first: it was cancelled */
            call_report_lost(c, true);
    } else if (bb != NULL) {
        call_put(c, CALL_LOST, c->kind == BS_RPC_UNARY);
        call_finish(c, BS_RPC_UNIMPLEMENTED,
                    "this method takes one request message; the call sent more");
    } else {
        call_set(c, CALL_ENDED);
        rpc_dispatch_call(c, GRPC_SLICE_START_PTR(c->request), GRPC_SLICE_LENGTH(c->request));
    }
    grpc_slice_unref(c->request);
    c->request = grpc_empty_slice();
}

/* Keep the one request of a unary or server-streaming method and read on
 * until the client's end of stream before dispatching it. */
static void call_await_eos(bs_rpc_call_t *c, grpc_slice request)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_buf;
    c->request = request;
    if (call_batch(c, &op, 1, &c->recv_tag) != 0) {
        call_abort(c, BS_RPC_INTERNAL, "cannot receive");
        return;
    }
    call_set(c, CALL_RECV_BUSY);
    call_set(c, CALL_AWAITING_EOS);
}

static void call_on_recv(bs_rpc_call_t *c, int ok)
{
    grpc_byte_buffer *bb = c->recv_buf;
    c->recv_buf = NULL;
    call_clear(c, CALL_RECV_BUSY);
    if (call_has(c, CALL_AWAITING_EOS))
        call_on_eos(c, ok, bb);
    else if (ok && !call_has(c, CALL_CANCELLED) && !call_has(c, CALL_STATUS_SET))
        call_on_stream_input(c, bb);
    if (bb != NULL)
        grpc_byte_buffer_destroy(bb);
    call_unref(c);
}

/* Server-wide unsent answers fell below the bound: resume the streams that
 * waited for it (those still over their own bounds stay blocked). */
static void rpc_unblock_reads(bs_rpc_server_t *s)
{
    s->global_blocked = false;
    for (bs_rpc_call_t *c = s->calls; c != NULL; c = c->next)
        if (call_has(c, CALL_RECV_BLOCKED))
            call_start_recv(c);
}

/* ---- arriving calls ------------------------------------------------------------------------- */

static const struct rpc_md *call_find_md(const bs_rpc_call_t *call, const char *key)
{
    for (size_t i = 0; i < call->n_md; i++)
        if (strcasecmp(call->md[i].key, key) == 0)
            return &call->md[i];
    return NULL;
}

static void rpc_arm(bs_rpc_server_t *s, struct rpc_accept *a)
{
    grpc_call_error e;
    if (s->shutting_down || a->armed)
        return;
    a->call = NULL;
    a->payload = NULL;
    if (a->method >= 0) {
        const struct rpc_method *m = &s->methods[a->method];
        bool payload = rpc_kind_reads_payload(m->def.kind);
        e = grpc_server_request_registered_call(s->server, m->handle, &a->call, &a->deadline,
                                                &a->md, payload ? &a->payload : NULL, s->cq, s->cq,
                                                &a->tag);
    } else {
        e = grpc_server_request_call(s->server, &a->call, &a->details, &a->md, s->cq, s->cq,
                                     &a->tag);
    }
    if (e != GRPC_CALL_OK) {
        bs_log(BS_LOG_ERROR, NULL, "rpc: cannot request calls of %s: %s",
               a->method >= 0 ? s->methods[a->method].def.path : "other methods",
               grpc_call_error_to_string(e));
        return;
    }
    a->armed = true;
    s->n_armed++;
}

/* Hand a new call to its method's handlers; data is the request of a
 * method of one request. */
static void rpc_dispatch_call(bs_rpc_call_t *c, const uint8_t *data, size_t len)
{
    const struct bs_rpc_handlers *h = call_handlers(c);
    if (c->kind != BS_RPC_BIDI && h->on_call != NULL) {
        call_set(c, CALL_APP_OWNED);
        h->on_call(h->arg, c, call_id(c), data, len);
    } else if (c->kind == BS_RPC_BIDI && h->on_stream_open != NULL) {
        call_set(c, CALL_APP_OWNED);
        h->on_stream_open(h->arg, c, call_id(c));
        call_start_recv(c);
    } else {
        call_finish(c, BS_RPC_UNIMPLEMENTED, "method not implemented");
    }
}

/* gRPC core hands over a call of a method that takes one request message
 * but has none: the client half-closed without sending one, cut it short
 * (core drops a partial message silently), or the call was cancelled
 * before it arrived. Never an empty request: a request cardinality
 * violation is UNIMPLEMENTED (gRPC's status codes); the application hears
 * on_lost when recv_close tells which case it was. */
static void call_lost(bs_rpc_call_t *c)
{
    call_put(c, CALL_LOST, c->kind == BS_RPC_UNARY);
    call_finish(c, BS_RPC_UNIMPLEMENTED,
                "this method takes one request message; the call ended without a whole one");
}

/* Take a new call out of an accept slot and start its state machine. */
static void rpc_start_call(bs_rpc_server_t *s, struct rpc_accept *a, grpc_call *gc,
                           grpc_byte_buffer *payload)
{
    const struct rpc_method *m = a->method >= 0 ? &s->methods[a->method] : NULL;
    enum bs_rpc_kind kind = m != NULL ? m->def.kind : BS_RPC_UNARY;
    gpr_timespec deadline = m != NULL ? a->deadline : a->details.deadline;
    char unknown[300] = "";
    const char *why = NULL;
    grpc_slice sl;
    bs_rpc_call_t *c = call_new(s, gc, kind, a->method, deadline, &a->md);
    if (a->method < 0)
        snprintf(unknown, sizeof(unknown), "unknown method %.*s",
                 (int)GRPC_SLICE_LENGTH(a->details.method),
                 (const char *)GRPC_SLICE_START_PTR(a->details.method));
    if (c == NULL) {
        grpc_call_cancel_with_status(gc, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL);
        grpc_call_unref(gc);
        return;
    }
    if (call_start_close(c) != 0) {
        call_abort(c, BS_RPC_INTERNAL, "cannot start the call");
        call_unref(c);
        return;
    }
    c->refs++; /* across the handlers */
    if ((m == NULL || !m->def.open) && s->auth.check != NULL &&
        !s->auth.check(s->auth.arg, c, &why))
        call_finish(c, BS_RPC_UNAUTHENTICATED, why ? why : "not authenticated");
    else if (m == NULL)
        call_finish(c, BS_RPC_UNIMPLEMENTED, unknown);
    else if (payload == NULL && rpc_kind_reads_payload(kind))
        call_lost(c);
    else if (rpc_read(payload, &sl) != 0)
        call_abort(c, BS_RPC_INTERNAL, "cannot read the request message");
    else if (rpc_kind_reads_payload(kind))
        call_await_eos(c, sl); /* dispatched once the client's stream ends */
    else {
        rpc_dispatch_call(c, GRPC_SLICE_START_PTR(sl), GRPC_SLICE_LENGTH(sl));
        grpc_slice_unref(sl);
    }
    call_unref(c);
}

static void rpc_on_accept(bs_rpc_server_t *s, struct rpc_accept *a, int ok)
{
    grpc_call *gc = a->call;
    grpc_byte_buffer *payload = a->payload;
    a->armed = false;
    s->n_armed--;
    a->call = NULL;
    a->payload = NULL;
    if (ok && gc != NULL && s->shutting_down) {
        grpc_call_cancel_with_status(gc, GRPC_STATUS_UNAVAILABLE, "the server is shutting down",
                                     NULL);
        grpc_call_unref(gc);
    } else if (ok && gc != NULL) {
        rpc_start_call(s, a, gc, payload);
    }
    if (payload != NULL)
        grpc_byte_buffer_destroy(payload);
    grpc_metadata_array_destroy(&a->md);
    grpc_metadata_array_init(&a->md);
    if (a->method < 0) {
        grpc_call_details_destroy(&a->details);
        grpc_call_details_init(&a->details);
    }
    rpc_arm(s, a);
    rpc_check_shutdown(s);
}

/* ---- the loop side of the completion queue -------------------------------------------------- */

static void rpc_on_tag(bs_rpc_server_t *s, struct rpc_tag *t)
{
    switch (t->kind) {
    case RPC_TAG_ACCEPT:
        rpc_on_accept(s, t->owner, t->ok);
        break;
    case RPC_TAG_SHUTDOWN:
        s->shutdown_notified = true;
        rpc_check_shutdown(s);
        break;
    case RPC_TAG_CLOSE:
        call_on_close(t->owner, t->ok);
        break;
    case RPC_TAG_RECV:
        call_on_recv(t->owner, t->ok);
        break;
    case RPC_TAG_SEND:
        call_on_sent(t->owner, t->ok);
        break;
    }
}

static void rpc_on_closed(uv_handle_t *h)
{
    bs_rpc_server_t *s = h->data;
    if (--s->n_open > 0)
        return;
    s->closed = true;
    if (s->done != NULL)
        s->done(s->done_arg);
}

/* The CQ thread has seen the queue shut down: join it and let go of gRPC. */
static void rpc_finish_shutdown(bs_rpc_server_t *s)
{
    s->joined = true;
    uv_thread_join(&s->cq_thread);
    grpc_server_destroy(s->server);
    grpc_completion_queue_destroy(s->cq);
    s->server = NULL;
    s->cq = NULL;
    s->n_open = 2;
    uv_close((uv_handle_t *)&s->async, rpc_on_closed);
    uv_close((uv_handle_t *)&s->flush_timer, rpc_on_closed);
}

static void rpc_on_async(uv_async_t *async)
{
    bs_rpc_server_t *s = async->data;
    uv_mutex_lock(&s->ev_lock);
    struct rpc_tag *t = s->ev_head;
    bool exited = s->cq_exited;
    s->ev_head = s->ev_tail = NULL;
    uv_mutex_unlock(&s->ev_lock);
    while (t != NULL) {
        struct rpc_tag *next = t->next; /* t may be freed by its handler */
        rpc_on_tag(s, t);
        t = next;
    }
    if (exited && !s->joined)
        rpc_finish_shutdown(s);
}

static void rpc_check_shutdown(bs_rpc_server_t *s)
{
    if (!s->shutting_down || !s->shutdown_notified || s->n_armed > 0 || s->n_calls > 0 ||
        s->cq_down)
        return;
    s->cq_down = true;
    grpc_completion_queue_shutdown(s->cq);
}

static void rpc_on_flush_timeout(uv_timer_t *t)
{
    bs_rpc_server_t *s = t->data;
    if (s->server != NULL)
        grpc_server_cancel_all_calls(s->server);
}

void bs_rpc_server_shutdown(bs_rpc_server_t *server, void (*done)(void *arg), void *arg)
{
    if (server->shutting_down)
        return;
    server->shutting_down = true;
    server->done = done;
    server->done_arg = arg;
    grpc_server_shutdown_and_notify(server->server, server->cq, &server->shutdown_tag);
    /* Answers already decided are still being sent: let them go out (a
     * client that does not read them is cut off by the timer); every other
     * call is cancelled now. */
    for (bs_rpc_call_t *c = server->calls; c != NULL; c = c->next)
        if (!call_has(c, CALL_STATUS_SET))
            call_abort(c, BS_RPC_UNAVAILABLE, "the server is shutting down");
    uv_timer_start(&server->flush_timer, rpc_on_flush_timeout, RPC_SHUTDOWN_FLUSH_MS, 0);
}

/* ---- creation ------------------------------------------------------------------------------- */

static grpc_server *rpc_create_grpc_server(const struct bs_rpc_options *opts)
{
    grpc_arg args[3];
    size_t n = 0;
    int recv = opts->max_recv_bytes != 0 ? opts->max_recv_bytes : RPC_DEFAULT_MAX_MESSAGE;
    int send = opts->max_send_bytes != 0 ? opts->max_send_bytes : RPC_DEFAULT_MAX_MESSAGE;
    memset(args, 0, sizeof(args));
    args[n].type = GRPC_ARG_INTEGER;
    args[n].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[n++].value.integer = recv < 0 ? -1 : recv; /* -1: unlimited */
    args[n].type = GRPC_ARG_INTEGER;
    args[n].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[n++].value.integer = send < 0 ? -1 : send;
    if (opts->max_concurrent_streams > 0) {
        args[n].type = GRPC_ARG_INTEGER;
        args[n].key = (char *)GRPC_ARG_MAX_CONCURRENT_STREAMS;
        args[n++].value.integer = opts->max_concurrent_streams;
    }
    grpc_channel_args ca = {n, args};
    return grpc_server_create(&ca, NULL);
}

static int rpc_register_methods(bs_rpc_server_t *s, struct bs_err *err)
{
    for (int i = 0; i < s->n_methods; i++) {
        struct rpc_method *m = &s->methods[i];
        grpc_server_register_method_payload_handling ph =
            rpc_kind_reads_payload(m->def.kind) ? GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER
                                                : GRPC_SRM_PAYLOAD_NONE;
        m->handle = grpc_server_register_method(s->server, m->def.path, NULL, ph, 0);
        if (m->handle == NULL)
            return bs_err_set(err, BS_EINTERNAL, "cannot register %s", m->def.path);
    }
    return 0;
}

static void rpc_init_accept(bs_rpc_server_t *s, struct rpc_accept *a, int method)
{
    a->tag = (struct rpc_tag){.kind = RPC_TAG_ACCEPT, .owner = a};
    a->srv = s;
    a->method = method;
    grpc_metadata_array_init(&a->md);
    grpc_call_details_init(&a->details);
}

/* Tear down a server that never reached the loop (init failure). */
static void rpc_destroy_grpc_sync(bs_rpc_server_t *s)
{
    if (s->server != NULL) {
        grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
        for (;;) {
            grpc_event ev =
                grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
            if (ev.type == GRPC_OP_COMPLETE && ev.tag == &s->shutdown_tag)
                break;
        }
        grpc_server_destroy(s->server);
    }
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(s->cq);
}

/* The accept slots' buffers, then gRPC itself (pairs with rpc_create_grpc). */
static void rpc_release_grpc(bs_rpc_server_t *s)
{
    for (int i = 0; i < s->n_slots; i++) {
        grpc_metadata_array_destroy(&s->slots[i].md);
        grpc_call_details_destroy(&s->slots[i].details);
    }
    free(s->slots);
    s->slots = NULL;
    s->n_slots = 0;
    grpc_shutdown();
}

/* Every method's accept slots, then the generic ones. */
static int rpc_init_slots(bs_rpc_server_t *s)
{
    int n = RPC_GENERIC_SLOTS;
    for (int i = 0; i < s->n_methods; i++)
        n += s->methods[i].def.slots;
    s->slots = calloc((size_t)n, sizeof(*s->slots));
    if (s->slots == NULL)
        return BS_ENOMEM;
    for (int i = 0; i < s->n_methods; i++)
        for (int k = 0; k < s->methods[i].def.slots; k++)
            rpc_init_accept(s, &s->slots[s->n_slots++], i);
    while (s->n_slots < n)
        rpc_init_accept(s, &s->slots[s->n_slots++], -1);
    return 0;
}

static void rpc_free_on_close(uv_handle_t *h)
{
    free(h->data);
}

/* Plaintext, TLS, or mutual TLS (a client CA: client certificates are
 * required and verified). */
static grpc_server_credentials *rpc_credentials(const struct bs_rpc_options *opts)
{
    if (opts->tls_cert_chain == NULL || opts->tls_key == NULL)
        return grpc_insecure_server_credentials_create();
    grpc_ssl_pem_key_cert_pair pair = {opts->tls_key, opts->tls_cert_chain};
    return grpc_ssl_server_credentials_create_ex(
        opts->tls_client_ca, &pair, 1,
        opts->tls_client_ca != NULL ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                    : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
        NULL);
}

/* Copy the services' method rows (paths are static strings of theirs). */
static int rpc_copy_methods(bs_rpc_server_t *s, const struct bs_rpc_options *opts,
                            struct bs_err *err)
{
    if (opts->n_methods < 0 || (opts->n_methods > 0 && opts->methods == NULL))
        return bs_err_set(err, BS_EINVAL, "rpc: bad method table");
    s->methods = calloc((size_t)opts->n_methods + 1, sizeof(*s->methods));
    if (s->methods == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    for (int i = 0; i < opts->n_methods; i++) {
        const struct bs_rpc_method *d = &opts->methods[i];
        if (d->path == NULL || d->h == NULL)
            return bs_err_set(err, BS_EINVAL, "rpc: method %d has no path or handlers", i);
        s->methods[i].def = *d;
        if (s->methods[i].def.slots <= 0)
            s->methods[i].def.slots = RPC_DEFAULT_SLOTS;
    }
    s->n_methods = opts->n_methods;
    return 0;
}

/* gRPC server, methods and port; on failure nothing gRPC is left. */
static int rpc_create_grpc(bs_rpc_server_t *s, const struct bs_rpc_options *opts, int *port,
                           struct bs_err *err)
{
    const char *address = opts->address != NULL ? opts->address : RPC_DEFAULT_ADDRESS;
    int rc;
    grpc_init();
    if (rpc_init_slots(s) != 0) {
        rpc_release_grpc(s);
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    }
    s->cq = grpc_completion_queue_create_for_next(NULL);
    s->server = rpc_create_grpc_server(opts);
    if (s->cq == NULL || s->server == NULL) {
        rc = bs_err_set(err, BS_EINTERNAL, "cannot create the gRPC server");
        goto fail;
    }
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    if ((rc = rpc_register_methods(s, err)) != 0)
        goto fail;
    grpc_server_credentials *creds = rpc_credentials(opts);
    if (creds == NULL) {
        rc = bs_err_set(err, BS_EINVAL, "cannot create the TLS credentials");
        goto fail;
    }
    *port = grpc_server_add_http2_port(s->server, address, creds);
    grpc_server_credentials_release(creds);
    if (*port == 0) {
        rc = bs_err_set(err, BS_EIO, "cannot listen on %s%s", address,
                        opts->tls_cert_chain ? " with TLS" : "");
        goto fail;
    }
    return 0;
fail:
    if (s->cq != NULL)
        rpc_destroy_grpc_sync(s);
    else if (s->server != NULL)
        grpc_server_destroy(s->server);
    s->server = NULL;
    s->cq = NULL;
    rpc_release_grpc(s);
    return rc;
}

int bs_rpc_server_init(bs_rpc_server_t **server, uv_loop_t *loop, const struct bs_rpc_options *opts,
                       int *port, struct bs_err *err)
{
    static const struct bs_rpc_options defaults = {0};
    bs_rpc_server_t *s = calloc(1, sizeof(*s));
    int rc, bound = 0;
    *server = NULL;
    if (opts == NULL)
        opts = &defaults;
    if (s == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    s->loop = loop;
    if (opts->auth != NULL)
        s->auth = *opts->auth;
    s->max_stream_pending =
        opts->max_stream_pending > 0 ? opts->max_stream_pending : RPC_DEFAULT_STREAM_PENDING;
    s->max_stream_unsent = opts->max_stream_unsent_bytes > 0 ? opts->max_stream_unsent_bytes
                                                             : RPC_DEFAULT_STREAM_UNSENT;
    s->max_unsent = opts->max_unsent_bytes > 0 ? opts->max_unsent_bytes : RPC_DEFAULT_UNSENT;
    s->shutdown_tag = (struct rpc_tag){.kind = RPC_TAG_SHUTDOWN, .owner = s};
    if ((rc = rpc_copy_methods(s, opts, err)) != 0)
        goto fail_parts;
    if ((rc = rpc_create_grpc(s, opts, &bound, err)) != 0)
        goto fail_parts;
    if (uv_mutex_init(&s->ev_lock) != 0) {
        rc = bs_err_set(err, BS_EINTERNAL, "cannot create a mutex");
        goto fail_grpc;
    }
    if (uv_async_init(loop, &s->async, rpc_on_async) != 0) {
        rc = bs_err_set(err, BS_EINTERNAL, "cannot create the loop wakeup");
        goto fail_mutex;
    }
    s->async.data = s;
    if (uv_thread_create(&s->cq_thread, rpc_cq_main, s) != 0) {
        rc = bs_err_set(err, BS_EINTERNAL, "cannot start the completion-queue thread");
        goto fail_async;
    }
    uv_timer_init(loop, &s->flush_timer); /* cannot fail */
    s->flush_timer.data = s;
    grpc_server_start(s->server);
    for (int i = 0; i < s->n_slots; i++)
        rpc_arm(s, &s->slots[i]);
    *port = bound;
    *server = s;
    return 0;

fail_async:
    /* The handle is the loop's until its close callback, which frees s. */
    uv_mutex_destroy(&s->ev_lock);
    rpc_destroy_grpc_sync(s);
    rpc_release_grpc(s);
    free(s->methods);
    uv_close((uv_handle_t *)&s->async, rpc_free_on_close);
    return rc;
fail_mutex:
    uv_mutex_destroy(&s->ev_lock);
fail_grpc:
    rpc_destroy_grpc_sync(s);
    rpc_release_grpc(s);
fail_parts:
    free(s->methods);
    free(s);
    return rc;
}

void bs_rpc_server_free(bs_rpc_server_t *server)
{
    if (server == NULL)
        return;
    if (!server->closed) {
        bs_log(BS_LOG_ERROR, NULL, "rpc: server freed before its shutdown completed; leaking it");
        return;
    }
    uv_mutex_destroy(&server->ev_lock);
    rpc_release_grpc(server);
    free(server->methods);
    free(server);
}

/* ---- per-call API --------------------------------------------------------------------------- */

void bs_rpc_call_ref(bs_rpc_call_t *call)
{
    call->refs++;
}

void bs_rpc_call_unref(bs_rpc_call_t *call)
{
    call_unref(call);
}

void bs_rpc_call_set_data(bs_rpc_call_t *call, void *data)
{
    call->data = data;
}

void *bs_rpc_call_data(const bs_rpc_call_t *call)
{
    return call->data;
}

int64_t bs_rpc_call_deadline(const bs_rpc_call_t *call)
{
    return call->deadline;
}

bool bs_rpc_call_cancelled(const bs_rpc_call_t *call)
{
    return call_has(call, CALL_CANCELLED);
}

const char *bs_rpc_call_metadata_bytes(const bs_rpc_call_t *call, const char *key, size_t *len)
{
    const struct rpc_md *md = call_find_md(call, key);
    if (md == NULL)
        return NULL;
    *len = md->value_len;
    return md->value;
}

const char *bs_rpc_call_metadata(const bs_rpc_call_t *call, const char *key)
{
    const struct rpc_md *md = call_find_md(call, key);
    return md != NULL && strlen(md->value) == md->value_len ? md->value : NULL;
}

enum rpc_answer_check {
    RPC_ANSWER_GO,
    RPC_ANSWER_DROP,   /* cancelled: accepted and dropped, returns 0 */
    RPC_ANSWER_MISUSE, /* not the application's to answer (again): BS_EINVAL */
};

/* want: the kind the answer fits (-1: any). */
static enum rpc_answer_check call_answer_check(const bs_rpc_call_t *call, int want)
{
    if (call_has(call, CALL_CANCELLED) || call_has(call, CALL_CLOSED))
        return RPC_ANSWER_DROP;
    if (!call_has(call, CALL_APP_OWNED) || call_has(call, CALL_APP_DONE) ||
        call_has(call, CALL_STATUS_SET) || (want >= 0 && (int)call->kind != want))
        return RPC_ANSWER_MISUSE;
    return RPC_ANSWER_GO;
}

#define RPC_ANSWER_RC(check) ((check) == RPC_ANSWER_DROP ? 0 : BS_EINVAL)

int bs_rpc_reply(bs_rpc_call_t *call, const uint8_t *data, size_t len)
{
    enum rpc_answer_check check = call_answer_check(call, BS_RPC_UNARY);
    if (check != RPC_ANSWER_GO)
        return RPC_ANSWER_RC(check);
    call_set(call, CALL_APP_DONE);
    if (call_queue(call, data, len) != 0) {
        call_abort(call, BS_RPC_RESOURCE_EXHAUSTED, "out of memory");
        return BS_ENOMEM;
    }
    call_set_status(call, BS_RPC_OK, NULL);
    call_pump(call);
    return 0;
}

/* Any application call, unary or stream. */
int bs_rpc_fail(bs_rpc_call_t *call, enum bs_rpc_status status, const char *msg)
{
    enum rpc_answer_check check = call_answer_check(call, -1);
    if (check != RPC_ANSWER_GO)
        return RPC_ANSWER_RC(check);
    call_set(call, CALL_APP_DONE);
    call_set_status(call, status, msg);
    call_pump(call);
    return 0;
}

int bs_rpc_stream_send(bs_rpc_call_t *call, const uint8_t *data, size_t len)
{
    enum rpc_answer_check check =
        call_answer_check(call, call->kind == BS_RPC_UNARY ? BS_RPC_BIDI : (int)call->kind);
    if (check != RPC_ANSWER_GO)
        return RPC_ANSWER_RC(check);
    if (call_queue(call, data, len) != 0) {
        call_abort(call, BS_RPC_RESOURCE_EXHAUSTED, "out of memory"); /* on_cancel follows */
        return BS_ENOMEM;
    }
    call_pump(call);
    return 0;
}

int bs_rpc_stream_finish(bs_rpc_call_t *call, enum bs_rpc_status status, const char *msg)
{
    return bs_rpc_fail(call, status, msg);
}

void bs_rpc_stream_set_busy(bs_rpc_call_t *call, int n)
{
    call->app_busy = n > 0 ? n : 0;
    if (call_has(call, CALL_RECV_BLOCKED) && call_may_read(call))
        call_start_recv(call);
}

bool bs_rpc_unsent_full(const bs_rpc_call_t *call)
{
    return call->srv->unsent_bytes >= call->srv->max_unsent;
}
