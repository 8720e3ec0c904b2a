/* The fake transport of the service fuzz target (see fake_rpc.h): every
 * function of server/rpc.h that the service calls, over call objects the
 * harness creates, with the transport's contract checked on each call.
 *
 * When the service starts using another function of rpc.h, add it here: the
 * fuzz build (scripts/fuzz.sh) and the fuzz_service_corpus test link this
 * file instead of server/rpc.c.
 *
 * Threads: everything runs on the harness's thread (the loop thread); the
 * fake checks it. */
#include "fake_rpc.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "grpc_service.pb-c.h"

/* What the application holds: a call object, freed with its last reference. */
struct bs_rpc_call {
    int slot;
    int refs;
    void *data;
    int64_t deadline;
};

/* What the fake remembers of a call, including after its object is gone. */
struct fake_slot {
    bs_rpc_call_t *call; /* NULL once freed */
    bool stream;
    enum bs_service_method method;
    int answers;      /* unary: replies and fails */
    int sends;        /* stream: messages */
    bool finished;    /* stream: bs_rpc_stream_finish (or bs_rpc_fail) */
    bool half_closed; /* the client will write no more */
    bool cancelled;   /* on_cancel delivered */
    bool closed;      /* the transport dropped its reference */
    int busy;         /* stream: bs_rpc_stream_set_busy */
    enum bs_rpc_status status;
};

static struct {
    struct bs_rpc_handlers h;
    struct fake_slot slots[FAKE_RPC_MAX_CALLS];
    int n_slots;
    int live; /* call objects not yet freed */
    uv_thread_t thread;
    bool trace;
    bool unsent_full; /* what bs_rpc_unsent_full answers */
} fk;

static const char *const method_names[BS_SVC_METHOD_COUNT] = {
    "ServerLive", "ServerReady",      "ModelReady",  "ServerMetadata",  "ModelMetadata",
    "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex",
};

/* The response message each unary method answers with. */
static const ProtobufCMessageDescriptor *const responses[BS_SVC_METHOD_COUNT] = {
    &inference__server_live_response__descriptor,
    &inference__server_ready_response__descriptor,
    &inference__model_ready_response__descriptor,
    &inference__server_metadata_response__descriptor,
    &inference__model_metadata_response__descriptor,
    &inference__model_infer_response__descriptor,
    &inference__model_stream_infer_response__descriptor,
    &inference__model_config_response__descriptor,
    &inference__model_statistics_response__descriptor,
    &inference__repository_index_response__descriptor,
};

/* ---- reporting ------------------------------------------------------------------------------ */

__attribute__((format(printf, 1, 2), noreturn)) static void violation(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "fake_rpc: transport contract violated: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

__attribute__((format(printf, 1, 2))) static void trace(const char *fmt, ...)
{
    va_list ap;
    if (!fk.trace)
        return;
    fprintf(stderr, "fake_rpc: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static void check_thread(const char *fn)
{
    uv_thread_t self = uv_thread_self();
    if (!uv_thread_equal(&self, &fk.thread))
        violation("%s called off the loop thread", fn);
}

/* The slot of a call the application passes in (ASan reports a freed one). */
static struct fake_slot *slot_of(const bs_rpc_call_t *call, const char *fn)
{
    check_thread(fn);
    if (call == NULL)
        violation("%s(NULL)", fn);
    if (call->slot < 0 || call->slot >= fk.n_slots || fk.slots[call->slot].call != call)
        violation("%s on an object that is not a live call", fn);
    return &fk.slots[call->slot];
}

/* A live call object by slot, or NULL (unknown slot, or freed). */
static bs_rpc_call_t *call_at(int slot)
{
    return slot >= 0 && slot < fk.n_slots ? fk.slots[slot].call : NULL;
}

/* ---- call objects --------------------------------------------------------------------------- */

static int call_new(bool stream, enum bs_service_method m, int64_t deadline)
{
    if (fk.n_slots == FAKE_RPC_MAX_CALLS)
        return -1;
    bs_rpc_call_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        violation("out of memory"); /* not the service's fault, but nothing can go on */
    int slot = fk.n_slots++;
    c->slot = slot;
    c->refs = 1; /* the transport's, until closed */
    c->deadline = deadline;
    fk.slots[slot] = (struct fake_slot){.call = c, .stream = stream, .method = m};
    fk.live++;
    trace("call %d: %s opened", slot, method_names[m]);
    return slot;
}

static void call_unref(bs_rpc_call_t *c)
{
    struct fake_slot *s = &fk.slots[c->slot];
    if (--c->refs > 0)
        return;
    if (!s->closed)
        violation("call %d (%s): the application released a reference it did not hold "
                  "(the transport's own reference was still there)",
                  c->slot, method_names[s->method]);
    if (s->busy != 0)
        violation("stream %d freed with %d request(s) still marked busy", c->slot, s->busy);
    trace("call %d: freed", c->slot);
    s->call = NULL;
    fk.live--;
    free(c);
}

/* The transport is done with call slot: drop its reference. */
static void slot_close(int slot)
{
    struct fake_slot *s = &fk.slots[slot];
    if (s->call == NULL || s->closed)
        return;
    s->closed = true;
    trace("call %d: closed", slot);
    call_unref(s->call);
}

/* Is the answer decided (a unary reply or fail, a stream's finish)? */
static bool slot_answered(const struct fake_slot *s)
{
    return s->stream ? s->finished : s->answers > 0;
}

/* ---- the client's side ---------------------------------------------------------------------- */

void fake_rpc_begin(const struct bs_rpc_handlers *h)
{
    if (fk.live != 0)
        violation("a new round started with %d call objects alive", fk.live);
    memset(&fk, 0, sizeof(fk));
    fk.h = *h;
    fk.thread = uv_thread_self();
    const char *t = getenv("BS_FUZZ_TRACE");
    fk.trace = t != NULL && t[0] != '\0' && strcmp(t, "0") != 0;
}

int fake_rpc_unary(enum bs_service_method m, const uint8_t *d, size_t n, int64_t deadline)
{
    int slot = call_new(false, m, deadline);
    if (slot < 0)
        return -1;
    bs_rpc_call_t *c = fk.slots[slot].call;
    c->refs++; /* across the handler, as server/rpc.c does */
    fk.h.on_call(fk.h.arg, c, (int)m, d, n);
    call_unref(c);
    return slot;
}

int fake_rpc_stream_open(int64_t deadline)
{
    int slot = call_new(true, BS_SVC_MODEL_STREAM_INFER, deadline);
    if (slot < 0)
        return -1;
    bs_rpc_call_t *c = fk.slots[slot].call;
    c->refs++;
    fk.h.on_stream_open(fk.h.arg, c, BS_SVC_MODEL_STREAM_INFER);
    call_unref(c);
    return slot;
}

/* Can the client still write to slot? (server/rpc.c stops reading once the
 * stream is finished or cancelled.) */
static bs_rpc_call_t *writable_stream(int slot)
{
    bs_rpc_call_t *c = call_at(slot);
    if (c == NULL)
        return NULL;
    const struct fake_slot *s = &fk.slots[slot];
    if (!s->stream || s->half_closed || s->cancelled || s->closed || s->finished)
        return NULL;
    return c;
}

void fake_rpc_stream_msg(int slot, const uint8_t *d, size_t n)
{
    bs_rpc_call_t *c = writable_stream(slot);
    if (c == NULL)
        return;
    trace("call %d: stream message of %zu bytes", slot, n);
    c->refs++;
    fk.h.on_stream_msg(fk.h.arg, c, d, n);
    call_unref(c);
}

void fake_rpc_stream_end(int slot)
{
    bs_rpc_call_t *c = writable_stream(slot);
    if (c == NULL)
        return;
    trace("call %d: half-closed", slot);
    fk.slots[slot].half_closed = true;
    c->refs++;
    fk.h.on_stream_end(fk.h.arg, c);
    call_unref(c);
}

void fake_rpc_cancel(int slot, bool half_close_first)
{
    bs_rpc_call_t *c = call_at(slot);
    if (c == NULL || fk.slots[slot].closed || fk.slots[slot].cancelled)
        return;
    if (half_close_first)
        fake_rpc_stream_end(slot);   /* only where the client could still write */
    if ((c = call_at(slot)) == NULL) /* held by the transport: cannot be gone */
        violation("call %d freed while the transport held it", slot);
    trace("call %d: cancelled", slot);
    fk.slots[slot].cancelled = true;
    c->refs++;
    fk.h.on_cancel(fk.h.arg, c);
    call_unref(c); /* the handler's: the transport's is still there */
    slot_close(slot);
}

void fake_rpc_lost(enum bs_service_method m, bool cancelled)
{
    trace("a %s call lost its request (%s)", method_names[m],
          cancelled ? "cancelled" : "cut short");
    if (fk.h.on_lost != NULL)
        fk.h.on_lost(fk.h.arg, (int)m, cancelled);
}

void fake_rpc_set_unsent_full(bool full)
{
    trace("unsent answers %s", full ? "full" : "drained");
    fk.unsent_full = full;
}

bool fake_rpc_unsent_full(void)
{
    return fk.unsent_full;
}

void fake_rpc_pump(void)
{
    int64_t now = (int64_t)uv_hrtime();
    for (int i = 0; i < fk.n_slots; i++) {
        bs_rpc_call_t *c = fk.slots[i].call;
        if (c == NULL || fk.slots[i].closed)
            continue;
        if (slot_answered(&fk.slots[i]))
            slot_close(i); /* the status went out */
        else if (c->deadline <= now)
            fake_rpc_cancel(i, false); /* gRPC core cancels at the deadline */
    }
}

void fake_rpc_check_answered(void)
{
    for (int i = 0; i < fk.n_slots; i++) {
        const struct fake_slot *s = &fk.slots[i];
        if (s->cancelled || slot_answered(s))
            continue;
        if (!s->stream)
            violation("call %d (%s) was never answered", i, method_names[s->method]);
        if (s->half_closed)
            violation("stream %d was half-closed but never finished (%d messages sent)", i,
                      s->sends);
    }
}

void fake_rpc_cancel_open(void)
{
    for (int i = 0; i < fk.n_slots; i++)
        if (!slot_answered(&fk.slots[i]))
            fake_rpc_cancel(i, false);
}

void fake_rpc_end(void)
{
    fake_rpc_pump();
    if (fk.live == 0)
        return;
    for (int i = 0; i < fk.n_slots; i++)
        if (fk.slots[i].call != NULL)
            fprintf(stderr, "fake_rpc: call %d (%s) still holds %d reference(s)%s\n", i,
                    method_names[fk.slots[i].method], fk.slots[i].call->refs,
                    fk.slots[i].closed ? "" : ", unanswered and not cancelled");
    violation("%d call object(s) left at the end: a bs_rpc_call_ref without its unref", fk.live);
}

/* ---- server/rpc.h: what the application calls ----------------------------------------------- */

void bs_rpc_call_ref(bs_rpc_call_t *call)
{
    slot_of(call, "bs_rpc_call_ref");
    call->refs++;
}

void bs_rpc_call_unref(bs_rpc_call_t *call)
{
    slot_of(call, "bs_rpc_call_unref");
    call_unref(call);
}

void bs_rpc_call_set_data(bs_rpc_call_t *call, void *data)
{
    slot_of(call, "bs_rpc_call_set_data");
    call->data = data;
}

void *bs_rpc_call_data(const bs_rpc_call_t *call)
{
    slot_of(call, "bs_rpc_call_data");
    return call->data;
}

int64_t bs_rpc_call_deadline(const bs_rpc_call_t *call)
{
    slot_of(call, "bs_rpc_call_deadline");
    return call->deadline;
}

bool bs_rpc_call_cancelled(const bs_rpc_call_t *call)
{
    return slot_of(call, "bs_rpc_call_cancelled")->cancelled;
}

/* The fake client sends no metadata. */
const char *bs_rpc_call_metadata(const bs_rpc_call_t *call, const char *key)
{
    slot_of(call, "bs_rpc_call_metadata");
    if (key == NULL)
        violation("bs_rpc_call_metadata with a NULL key");
    return NULL;
}

static void check_status(int slot, enum bs_rpc_status status)
{
    if ((int)status < 0 || (int)status > 16)
        violation("call %d: status %d is not a gRPC status code", slot, (int)status);
}

/* data must unpack as message d. */
static void check_message(int slot, const ProtobufCMessageDescriptor *d, const uint8_t *data,
                          size_t len)
{
    if (data == NULL && len > 0)
        violation("call %d: NULL message of %zu bytes", slot, len);
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, len, data);
    if (m == NULL)
        violation("call %d: %zu bytes that are not a %s", slot, len, d->name);
    protobuf_c_message_free_unpacked(m, NULL);
}

int bs_rpc_reply(bs_rpc_call_t *call, const uint8_t *data, size_t len)
{
    struct fake_slot *s = slot_of(call, "bs_rpc_reply");
    if (s->stream)
        violation("call %d: bs_rpc_reply on a stream", call->slot);
    if (++s->answers > 1)
        violation("call %d (%s) answered twice (reply after %s)", call->slot,
                  method_names[s->method], s->status == BS_RPC_OK ? "a reply" : "a fail");
    s->status = BS_RPC_OK;
    check_message(call->slot, responses[s->method], data, len);
    trace("call %d: reply of %zu bytes%s", call->slot, len, s->cancelled ? " (dropped)" : "");
    return 0;
}

static int stream_finish(bs_rpc_call_t *call, struct fake_slot *s, enum bs_rpc_status status,
                         const char *msg)
{
    check_status(call->slot, status);
    if (s->finished)
        violation("stream %d finished twice", call->slot);
    s->finished = true;
    s->status = status;
    trace("stream %d: finished with %d %s%s", call->slot, (int)status, msg ? msg : "",
          s->cancelled ? " (dropped)" : "");
    return 0;
}

int bs_rpc_fail(bs_rpc_call_t *call, enum bs_rpc_status status, const char *msg)
{
    struct fake_slot *s = slot_of(call, "bs_rpc_fail");
    if (s->stream)
        return stream_finish(call, s, status, msg);
    check_status(call->slot, status);
    if (status == BS_RPC_OK)
        violation("call %d (%s): bs_rpc_fail with status OK (a unary OK needs a message)",
                  call->slot, method_names[s->method]);
    if (++s->answers > 1)
        violation("call %d (%s) answered twice (fail %d \"%s\" after %s)", call->slot,
                  method_names[s->method], (int)status, msg ? msg : "",
                  s->status == BS_RPC_OK ? "a reply" : "a fail");
    s->status = status;
    trace("call %d: fail %d %s%s", call->slot, (int)status, msg ? msg : "",
          s->cancelled ? " (dropped)" : "");
    return 0;
}

int bs_rpc_stream_send(bs_rpc_call_t *call, const uint8_t *data, size_t len)
{
    struct fake_slot *s = slot_of(call, "bs_rpc_stream_send");
    if (!s->stream)
        violation("call %d (%s): bs_rpc_stream_send on a unary call", call->slot,
                  method_names[s->method]);
    if (s->finished)
        violation("stream %d: a message sent after its finish", call->slot);
    check_message(call->slot, &inference__model_stream_infer_response__descriptor, data, len);
    s->sends++;
    trace("stream %d: message of %zu bytes%s", call->slot, len, s->cancelled ? " (dropped)" : "");
    return 0;
}

int bs_rpc_stream_finish(bs_rpc_call_t *call, enum bs_rpc_status status, const char *msg)
{
    struct fake_slot *s = slot_of(call, "bs_rpc_stream_finish");
    if (!s->stream)
        violation("call %d (%s): bs_rpc_stream_finish on a unary call", call->slot,
                  method_names[s->method]);
    return stream_finish(call, s, status, msg);
}

void bs_rpc_stream_set_busy(bs_rpc_call_t *call, int n)
{
    struct fake_slot *s = slot_of(call, "bs_rpc_stream_set_busy");
    if (!s->stream)
        violation("call %d (%s): bs_rpc_stream_set_busy on a unary call", call->slot,
                  method_names[s->method]);
    if (n < 0)
        violation("stream %d: bs_rpc_stream_set_busy(%d)", call->slot, n);
    s->busy = n;
}

bool bs_rpc_unsent_full(const bs_rpc_call_t *call)
{
    slot_of(call, "bs_rpc_unsent_full");
    return fk.unsent_full;
}
