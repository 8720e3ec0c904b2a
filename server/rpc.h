/* The gRPC transport: gRPC core's completion queue runs on its own thread and
 * every event is handed to the libuv loop thread (uv_async_send, drained as a
 * list). All bs_rpc_* functions below are called on the loop thread only.
 *
 * The transport knows no service: each service hands it a table of methods
 * (struct bs_rpc_method: path, kind, handlers) at creation — the inference
 * service (service.c), health (health_service.c) and reflection
 * (reflection_service.c) alike; unknown methods answer UNIMPLEMENTED at once.
 * It terminates TLS and runs an optional authentication hook (auth.c: the
 * bearer token) before any handler sees a call. */
#ifndef BS_RPC_H
#define BS_RPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "common.h"

typedef struct bs_rpc_server bs_rpc_server_t;
typedef struct bs_rpc_call bs_rpc_call_t;

/* How a method exchanges messages. UNARY and SERVER_STREAM take exactly one
 * request message: the transport reads it and the end of the client's
 * stream before on_call (a call with none or two is answered UNIMPLEMENTED
 * and never handed over). */
enum bs_rpc_kind {
    BS_RPC_UNARY,         /* one request, one answer (bs_rpc_reply / bs_rpc_fail) */
    BS_RPC_SERVER_STREAM, /* one request, answers with bs_rpc_stream_send, then finish */
    BS_RPC_BIDI,          /* messages both ways (on_stream_open / msg / end) */
};

/* gRPC status codes we answer with (values as in grpc/status.h). */
enum bs_rpc_status {
    BS_RPC_OK = 0,
    BS_RPC_CANCELLED = 1,
    BS_RPC_INVALID_ARGUMENT = 3,
    BS_RPC_DEADLINE_EXCEEDED = 4,
    BS_RPC_NOT_FOUND = 5,
    BS_RPC_RESOURCE_EXHAUSTED = 8,
    BS_RPC_FAILED_PRECONDITION = 9,
    BS_RPC_UNIMPLEMENTED = 12,
    BS_RPC_INTERNAL = 13,
    BS_RPC_UNAVAILABLE = 14,
    BS_RPC_UNAUTHENTICATED = 16,
};

/* What a service hears about the calls of its methods, always on the loop
 * thread; id is the method's id from its table row. */
struct bs_rpc_handlers {
    /* A UNARY or SERVER_STREAM call with its request bytes (valid during the
     * callback only). The service answers exactly once, now or later: a
     * unary call with bs_rpc_reply or bs_rpc_fail, a server stream with
     * bs_rpc_stream_send as often as it likes, then bs_rpc_stream_finish. */
    void (*on_call)(void *arg, bs_rpc_call_t *call, int id, const uint8_t *data, size_t len);
    /* A BIDI call opened. */
    void (*on_stream_open)(void *arg, bs_rpc_call_t *call, int id);
    /* One request message on a stream (bytes valid during the callback). */
    void (*on_stream_msg)(void *arg, bs_rpc_call_t *call, const uint8_t *data, size_t len);
    /* The client half-closed the stream: no more messages will come; the
     * application finishes it with bs_rpc_stream_finish once its responses
     * are queued. */
    void (*on_stream_end)(void *arg, bs_rpc_call_t *call);
    /* The call was cancelled by the client, its deadline passed, or the
     * server is shutting down. Delivered once to every call handed to the
     * application that ends cancelled, which can be after the application
     * answered (a cancelled stream first looks like a half-close). Replies
     * after this return 0 and are dropped; the application releases its
     * references with bs_rpc_call_unref. */
    void (*on_cancel)(void *arg, bs_rpc_call_t *call);
    /* Optional: a unary call of method m ended without a whole request
     * message (cancelled: the call was cancelled or its deadline passed;
     * otherwise the client sent none, cut it short, or sent two). The
     * transport has answered it (UNIMPLEMENTED); the application only
     * counts it.
     * The call was never handed to the application. */
    void (*on_lost)(void *arg, int id, bool cancelled);
    void *arg;
};

/* One method a service offers. */
struct bs_rpc_method {
    const char *path; /* "/package.Service/Method" */
    enum bs_rpc_kind kind;
    int id;     /* handed back to the handlers */
    int slots;  /* calls kept armed in gRPC core for it (0: 2); a call that arrives while
                   all are taken waits unseen inside core until one is re-armed */
    bool open;  /* reachable without authentication (health probes) */
    const struct bs_rpc_handlers *h;
};

/* Authentication, run before a call of a method that is not open (unknown
 * methods included) reaches any handler: false answers UNAUTHENTICATED with
 * *why. */
struct bs_rpc_auth {
    bool (*check)(void *arg, const bs_rpc_call_t *call, const char **why);
    void *arg;
};

struct bs_rpc_options {
    const char *address;      /* e.g. "0.0.0.0:8001"; port 0 picks a free port */
    int max_recv_bytes;       /* message size limits */
    int max_send_bytes;
    int max_concurrent_streams;
    /* Stream flow control (0: the defaults 16, 64 MiB, 512 MiB). A
     * ModelStreamInfer stream stops reading request messages while its
     * requests in progress (bs_rpc_stream_set_busy) plus its queued unsent
     * answers reach max_stream_pending, while those answers hold
     * max_stream_unsent_bytes, or while every call's unsent answers
     * together hold max_unsent_bytes; it resumes as they drain. */
    int max_stream_pending;
    size_t max_stream_unsent_bytes;
    size_t max_unsent_bytes;
    /* TLS: PEM text of the server's certificate chain and private key (both
     * or neither; NULL: plaintext) and, for mutual TLS, of the CA that
     * client certificates must chain to (required and verified). */
    const char *tls_cert_chain, *tls_key, *tls_client_ca;
    const struct bs_rpc_auth *auth; /* NULL: no authentication */
    /* The services' methods (copied; the handlers must outlive the server). */
    const struct bs_rpc_method *methods;
    int n_methods;
};

/* Create the server on loop with opts' methods, bind and start it. *port
 * receives the bound port. */
int bs_rpc_server_init(bs_rpc_server_t **server, uv_loop_t *loop, const struct bs_rpc_options *opts,
                       int *port, struct bs_err *err);

/* Stop accepting calls and cancel every live call at once (any grace period
 * is the caller's: drain first), except those already answered, whose answer
 * is still being sent: they get up to 5 s to deliver it. Then call done(arg)
 * on the loop thread once every call is gone and the completion-queue thread
 * has been joined. A second call is ignored. */
void bs_rpc_server_shutdown(bs_rpc_server_t *server, void (*done)(void *arg), void *arg);

/* Free a server whose shutdown has completed; NULL is a no-op. */
void bs_rpc_server_free(bs_rpc_server_t *server);

/* Keep a call alive across asynchronous work; every ref needs an unref. The
 * transport holds its own reference until the call is finished or cancelled. */
void bs_rpc_call_ref(bs_rpc_call_t *call);
void bs_rpc_call_unref(bs_rpc_call_t *call);

/* Application data attached to a call (NULL until set). */
void bs_rpc_call_set_data(bs_rpc_call_t *call, void *data);
void *bs_rpc_call_data(const bs_rpc_call_t *call);

/* The call's deadline on uv_hrtime()'s clock, in ns (INT64_MAX: none). */
int64_t bs_rpc_call_deadline(const bs_rpc_call_t *call);

/* True once on_cancel has been (or is about to be) delivered. */
bool bs_rpc_call_cancelled(const bs_rpc_call_t *call);

/* Value of request metadata key (e.g. "authorization"), or NULL; NULL too
 * when the value holds a NUL byte (see bs_rpc_call_metadata_bytes). */
const char *bs_rpc_call_metadata(const bs_rpc_call_t *call, const char *key);

/* Value of request metadata key with its length (it may hold NUL bytes),
 * or NULL. */
const char *bs_rpc_call_metadata_bytes(const bs_rpc_call_t *call, const char *key, size_t *len);

/* Unary answers: the serialized response with status OK, or an error status
 * and message. The transport copies what it needs. Answering twice, reply on
 * a stream or stream_send on a unary call return BS_EINVAL. */
int bs_rpc_reply(bs_rpc_call_t *call, const uint8_t *data, size_t len);
int bs_rpc_fail(bs_rpc_call_t *call, enum bs_rpc_status status, const char *msg);

/* Streams: queue one response message (sent in order, one in flight at a
 * time), then finish with a status once everything is queued. */
int bs_rpc_stream_send(bs_rpc_call_t *call, const uint8_t *data, size_t len);
int bs_rpc_stream_finish(bs_rpc_call_t *call, enum bs_rpc_status status, const char *msg);

/* Streams: the application has n requests of this stream read and not yet
 * answered (the flow-control bound counts them with the unsent answers). */
void bs_rpc_stream_set_busy(bs_rpc_call_t *call, int n);

/* True while the unsent answers of all calls hold max_unsent_bytes or more:
 * the application should not admit new work that would add to them. */
bool bs_rpc_unsent_full(const bs_rpc_call_t *call);

#endif
