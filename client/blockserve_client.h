/* A small client for blockserve (and any KServe v2 / Triton gRPC server)
 * over gRPC's C core and our protobuf-c messages: connect (insecure, TLS,
 * mTLS, bearer token), health, metadata, repository index, unary inference,
 * ModelStreamInfer streams, and asynchronous unary calls on a queue for load
 * generation. Every call has a deadline; every error carries the gRPC status
 * code and message.
 *
 * Threads: a bs_client_t may be shared by threads (gRPC channels are
 * thread-safe). A bs_client_stream_t and a bs_client_queue_t belong to one
 * thread at a time. */
#ifndef BS_BLOCKSERVE_CLIENT_H
#define BS_BLOCKSERVE_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "grpc_service.pb-c.h"
#include "ctensor.h"

#define BS_CLIENT_DEFAULT_URL "localhost:8001"

#define BS_CLIENT_METHOD(m) "/inference.GRPCInferenceService/" m

typedef struct bs_client bs_client_t;
typedef struct bs_client_stream bs_client_stream_t;
typedef struct bs_client_queue bs_client_queue_t;

struct bs_client_options {
    const char *url;      /* HOST:PORT (grpc:// or grpcs:// prefix allowed); NULL: localhost:8001 */
    bool tls;             /* use TLS (implied by grpcs://, tls_ca and tls_cert) */
    const char *tls_ca;   /* PEM root certificates; NULL: the system's roots */
    const char *tls_cert; /* PEM client certificate chain (mTLS), with tls_key */
    const char *tls_key;  /* PEM private key of tls_cert */
    const char *tls_server_name; /* name to check in the server's certificate instead of HOST */
    const char *token;           /* sent on every call as "authorization: Bearer <token>" */
    double connect_timeout_s;    /* how long connect waits for the channel; 0: 5 s */
    double call_timeout_s;       /* default deadline of each call; 0: 60 s */
    int max_message_bytes;       /* send and receive limit; 0: 64 MiB */
    bool own_connection;         /* a connection of its own, not shared with other clients */
};

/* An error: what failed, and the gRPC status when a call reached a status. */
struct bs_client_err {
    int code;        /* 0 or a negative BS_E* code */
    int grpc_status; /* the call's gRPC status code; -1 when the failure was local */
    char msg[640];
};

/* Record a local failure (grpc_status -1) in err: code and a printf-style
 * message; returns code. err may be NULL. */
int bs_client_err_set(struct bs_client_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The upper-case name of a gRPC status code ("NOT_FOUND"), "UNKNOWN" when out of range. */
const char *bs_client_status_name(int grpc_status);

/* Create a channel to o->url and wait up to o->connect_timeout_s for it to be
 * ready; an unreachable server, a refused connection or a TLS mismatch fails
 * with a message that tells them apart as far as TCP can. */
int bs_client_connect(bs_client_t **c, const struct bs_client_options *o,
                      struct bs_client_err *err);

/* Close the channel and release the client; NULL is a no-op. Streams and
 * queues made from it must be freed first. */
void bs_client_free(bs_client_t *c);

/* The target the client connected to ("localhost:8001"). */
const char *bs_client_target(const bs_client_t *c);

/* One unary call with serialized bytes: *resp (malloc'ed, *resp_len bytes)
 * on status OK; timeout_s <= 0 takes the client's default. */
int bs_client_call_raw(bs_client_t *c, const char *method, const void *req, size_t req_len,
                       double timeout_s, uint8_t **resp, size_t *resp_len,
                       struct bs_client_err *err);

/* One unary call with protobuf-c messages: *resp is unpacked with resp_desc
 * and freed with bs_client_msg_free. */
int bs_client_call(bs_client_t *c, const char *method, const ProtobufCMessage *req,
                   const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **resp,
                   struct bs_client_err *err);

/* Free a message returned by this library; NULL is a no-op. */
void bs_client_msg_free(void *msg);

/* grpc.health.v1.Health/Check for service ("" for the server): *status is
 * the ServingStatus (1 SERVING, 2 NOT_SERVING, 3 SERVICE_UNKNOWN). */
int bs_client_health_check(bs_client_t *c, const char *service, int *status,
                           struct bs_client_err *err);

/* ServerLive and ServerReady. */
int bs_client_server_live(bs_client_t *c, bool *live, struct bs_client_err *err);
int bs_client_server_ready(bs_client_t *c, bool *ready, struct bs_client_err *err);

/* ModelReady for model (version "" for the default). */
int bs_client_model_ready(bs_client_t *c, const char *model, bool *ready,
                          struct bs_client_err *err);

/* ServerMetadata, ModelMetadata, ModelConfig and RepositoryIndex; free the
 * response with bs_client_msg_free. */
int bs_client_server_metadata(bs_client_t *c, Inference__ServerMetadataResponse **r,
                              struct bs_client_err *err);
int bs_client_model_metadata(bs_client_t *c, const char *model,
                             Inference__ModelMetadataResponse **r, struct bs_client_err *err);
int bs_client_model_config(bs_client_t *c, const char *model, Inference__ModelConfigResponse **r,
                           struct bs_client_err *err);
int bs_client_repository_index(bs_client_t *c, Inference__RepositoryIndexResponse **r,
                               struct bs_client_err *err);

/* ModelInfer: *r on status OK (free with bs_client_msg_free). */
int bs_client_infer(bs_client_t *c, const Inference__ModelInferRequest *req,
                    Inference__ModelInferResponse **r, struct bs_client_err *err);

/* Serialize a ModelInferRequest for model with inputs in raw_input_contents
 * (id may be NULL) into a malloc'ed buffer; the bytes ghz -B and ModelInfer take. */
int bs_client_pack_infer_request(const char *model, const char *id, const struct bs_ctensor *in,
                                 int n, uint8_t **buf, size_t *len, struct bs_client_err *err);

/* A part of a registered system shared memory region (Triton's
 * shared_memory_region, shared_memory_offset, shared_memory_byte_size). */
struct bs_client_shm_ref {
    const char *region;
    uint64_t offset;
    uint64_t byte_size;
};

/* What a request carries besides its inputs. */
struct bs_client_infer_opts {
    const char *id;                          /* request id; NULL: none */
    const struct bs_client_shm_ref *in_shm;  /* NULL, or one per input: its data is there */
    const char *const *outputs;              /* requested outputs; NULL: every output */
    int n_outputs;                           /* length of outputs */
    const struct bs_client_shm_ref *out_shm; /* NULL, or one per requested output */
    const char *output_datatype;             /* request parameter output_datatype ("FP32", "BF16",
                                                "FP16"); NULL: not sent (the model's default) */
};

/* As bs_client_pack_infer_request, with shared memory: an input with an
 * in_shm entry carries no bytes in raw_input_contents (then none does: the
 * request names every input's region), and requested outputs may name where
 * the server writes them. */
int bs_client_pack_infer_request_ex(const char *model, const struct bs_ctensor *in, int n,
                                    const struct bs_client_infer_opts *o, uint8_t **buf,
                                    size_t *len, struct bs_client_err *err);

/* The outputs' names, datatypes and shapes of a response whose data the
 * server wrote to shared memory: out[i].data stays NULL, nbytes is the size. */
int bs_client_response_output_meta(const Inference__ModelInferResponse *r, struct bs_ctensor *out,
                                   int max, int *n, struct bs_client_err *err);

/* RepositoryModelLoad and RepositoryModelUnload of model. */
int bs_client_model_load(bs_client_t *c, const char *model, struct bs_client_err *err);
int bs_client_model_unload(bs_client_t *c, const char *model, struct bs_client_err *err);

/* One registered system shared memory region, as the status lists it. */
struct bs_client_shm_region {
    char name[128];
    char key[256];
    uint64_t offset;
    uint64_t byte_size;
};

/* SystemSharedMemoryRegister: region name over key's bytes [offset, offset + byte_size). */
int bs_client_shm_register(bs_client_t *c, const char *name, const char *key, uint64_t offset,
                           uint64_t byte_size, struct bs_client_err *err);

/* SystemSharedMemoryStatus of name (NULL or "": every region) into
 * regions[0..*n) (at most max, sorted by name). */
int bs_client_shm_status(bs_client_t *c, const char *name, struct bs_client_shm_region *regions,
                         int max, int *n, struct bs_client_err *err);

/* SystemSharedMemoryUnregister of name (NULL or "": every region). */
int bs_client_shm_unregister(bs_client_t *c, const char *name, struct bs_client_err *err);

/* The outputs of a response (raw_output_contents or typed contents) as
 * tensors in out[0..*n); free each with bs_ct_free. */
int bs_client_response_outputs(const Inference__ModelInferResponse *r, struct bs_ctensor *out,
                               int max, int *n, struct bs_client_err *err);

/* Open a ModelStreamInfer stream whose deadline is timeout_s from now (<= 0: the client default).
 */
int bs_client_stream_open(bs_client_t *c, double timeout_s, bs_client_stream_t **s,
                          struct bs_client_err *err);

/* Send one serialized ModelInferRequest on the stream; returns once gRPC has taken it. */
int bs_client_stream_write(bs_client_stream_t *s, const void *req, size_t len,
                           struct bs_client_err *err);

/* Wait for the next response: 0 and *r, or 1 when the server ended the
 * stream (then bs_client_stream_finish reports why). */
int bs_client_stream_read(bs_client_stream_t *s, Inference__ModelStreamInferResponse **r,
                          struct bs_client_err *err);

/* Half-close, then wait for the stream's final status: 0 when it was OK. */
int bs_client_stream_finish(bs_client_stream_t *s, struct bs_client_err *err);

/* Cancel the stream if it is still open and release it; NULL is a no-op. */
void bs_client_stream_free(bs_client_stream_t *s);

/* A completion queue for asynchronous unary calls. */
int bs_client_queue_create(bs_client_queue_t **q, struct bs_client_err *err);

/* Cancel the calls still running on q, wait for them, and release q; NULL is a no-op. */
void bs_client_queue_free(bs_client_queue_t *q);

/* The completion of one asynchronous call. */
struct bs_client_event {
    void *tag;         /* as given to bs_client_call_start */
    int grpc_status;   /* the call's status (0 OK) */
    char message[256]; /* the status message, cut to fit */
    size_t resp_len;   /* bytes of the response message (0 when none) */
};

/* Start a unary call on q that completes through bs_client_queue_next; req
 * must stay valid until then (it is sent without a copy). */
int bs_client_call_start(bs_client_t *c, bs_client_queue_t *q, const char *method, const void *req,
                         size_t req_len, double timeout_s, void *tag, struct bs_client_err *err);

/* Wait up to timeout_s for the next completed call: 1 and *ev, or 0 when
 * the time passed first. */
int bs_client_queue_next(bs_client_queue_t *q, double timeout_s, struct bs_client_event *ev);

#endif
