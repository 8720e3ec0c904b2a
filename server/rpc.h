/* The gRPC transport: gRPC core's completion queue runs on its own thread and
 * every event is handed to the libuv loop thread (uv_async_send, drained as a
 * list). All bs_rpc_* functions below are called on the loop thread only.
 *
 * The transport owns grpc.health.v1.Health (Check, Watch) and server
 * reflection (grpc.reflection.v1 and v1alpha); unknown methods answer
 * UNIMPLEMENTED at once. Calls of inference.GRPCInferenceService are handed
 * to the application through struct bs_rpc_handlers. It also terminates TLS
 * and checks the optional bearer token (struct bs_rpc_options). */
#ifndef BS_RPC_H
#define BS_RPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "common.h"

typedef struct bs_rpc_server bs_rpc_server_t;
typedef struct bs_rpc_call bs_rpc_call_t;

/* inference.GRPCInferenceService methods, in this order. */
enum bs_rpc_method {
    BS_RPC_SERVER_LIVE,
    BS_RPC_SERVER_READY,
    BS_RPC_MODEL_READY,
    BS_RPC_SERVER_METADATA,
    BS_RPC_MODEL_METADATA,
    BS_RPC_MODEL_INFER,
    BS_RPC_MODEL_STREAM_INFER, /* bidirectional streaming */
    BS_RPC_MODEL_CONFIG,
    BS_RPC_MODEL_STATISTICS,
    BS_RPC_REPOSITORY_INDEX,
    BS_RPC_METHOD_COUNT,
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

/* What the application hears, always on the loop thread. */
struct bs_rpc_handlers {
    /* A unary call of method m with its request bytes (valid during the
     * callback only). The application answers exactly once, now or later,
     * with bs_rpc_reply or bs_rpc_fail. */
    void (*on_unary)(void *arg, bs_rpc_call_t *call, enum bs_rpc_method m, const uint8_t *data,
                     size_t len);
    /* A ModelStreamInfer stream opened. */
    void (*on_stream_open)(void *arg, bs_rpc_call_t *call);
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
    void (*on_lost)(void *arg, enum bs_rpc_method m, bool cancelled);
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
    /* Bearer token (NULL: none). When set, every call except
     * grpc.health.v1.Health/{Check,Watch} must carry the metadata
     * "authorization: Bearer <token>"; others are answered UNAUTHENTICATED
     * before any handler runs. The transport keeps a copy. */
    const char *auth_token;
};

/* Create the server on loop, bind and start it. *port receives the bound port. */
int bs_rpc_server_init(bs_rpc_server_t **server, uv_loop_t *loop, const struct bs_rpc_options *opts,
                       const struct bs_rpc_handlers *handlers, int *port, struct bs_err *err);

/* Stop accepting calls and cancel every live call at once (any grace period
 * is the caller's: drain first), except those already answered, whose answer
 * is still being sent: they get up to 5 s to deliver it. Then call done(arg)
 * on the loop thread once every call is gone and the completion-queue thread
 * has been joined. A second call is ignored. */
void bs_rpc_server_shutdown(bs_rpc_server_t *server, void (*done)(void *arg), void *arg);

/* Free a server whose shutdown has completed; NULL is a no-op. */
void bs_rpc_server_free(bs_rpc_server_t *server);

/* Health status for a service name ("" = the whole server); Watch streams
 * see changes. */
void bs_rpc_set_serving(bs_rpc_server_t *server, const char *service, bool serving);

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

/* Value of request metadata key (e.g. "authorization"), or NULL. */
const char *bs_rpc_call_metadata(const bs_rpc_call_t *call, const char *key);

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

/* Bytes of answers queued or being sent, over all calls. */
size_t bs_rpc_unsent_bytes(const bs_rpc_server_t *server);

#endif
