/* inference.GRPCInferenceService over the gRPC transport: the front end that
 * speaks protobuf. It decodes each inference (codec.c) and hands it to the
 * inference core (core.c), which routes, admits, batches and counts them;
 * what the core answers is encoded back here, stream framing included
 * (codec.c). Every other method belongs to the control plane (control.c):
 * unpacked here, answered there, packed here. Errors become gRPC statuses
 * through the status table (status_of).
 *
 * Thread ownership: everything here runs on the loop thread. An inference
 * (struct infer) holds a reference on its call until the core has answered
 * it; a stream (struct stream) lives until the client has half-closed or
 * cancelled or the service has finished it, and every inference on it is
 * answered.
 *
 * Shutdown (bs_service_shutdown): the core answers every inference still in
 * flight (UNAVAILABLE; each stream message its own error message); every
 * stream is then finished UNAVAILABLE, after its queued answers. */
#include "service.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "grpc_service.pb-c.h"
#include "log.h"
#include "pbcheck.h"

struct stream;

/* What a call's data points at. */
enum call_kind {
    CALL_INFER,
    CALL_STREAM,
};

/* One inference in flight: a unary ModelInfer or one message of a stream. */
struct infer {
    enum call_kind kind; /* CALL_INFER: first, as in struct stream */
    bs_service_t *svc;
    bs_rpc_call_t *call;
    struct stream *stream; /* NULL for unary calls, and once answered */
    bool unary;
    struct bs_infer_request req;
    bs_core_req_t *creq;
    uint8_t *resp; /* the encoded answer, between reply_output and reply_done */
    size_t resp_len;
    /* Shared memory held until the core releases the request: the inputs'
     * ranges (NULL: from the message) and the output's. */
    bs_shm_region_t *holds[BS_CODEC_MAX_INPUTS];
    bs_shm_region_t *out_hold;
    void *out_ptr;
    struct infer *prev, *next; /* the stream's in-flight list */
};

struct stream {
    enum call_kind kind; /* CALL_STREAM */
    bs_service_t *svc;
    bs_rpc_call_t *call;
    struct infer *head;
    int n_infer;                /* inferences in flight on it (the transport's flow control) */
    bool ended;                 /* the client half-closed */
    bool cancelled;             /* the call is gone */
    bool finished;              /* the service finished it (shutdown) */
    int busy;                   /* > 0 while a walk over the list runs: no freeing */
    struct stream *prev, *next; /* the service's streams */
};

struct bs_service {
    bs_core_t *core;
    bs_control_t *control;
    bool own_control; /* created here (no control in the options) */
    struct bs_service_options o;
    struct bs_rpc_handlers handlers;
    struct bs_rpc_method rows[BS_SVC_METHOD_COUNT];
    struct stream *streams; /* open streams */
};

/* ---- status and replies ---------------------------------------------------- */

/* The gRPC status of a failure code: the status table's (engine/common.h). */
static enum bs_rpc_status status_of(int rc)
{
    return (enum bs_rpc_status)bs_status_grpc(rc);
}

static void reply_msg(bs_rpc_call_t *call, const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(len ? len : 1);
    if (buf == NULL) {
        bs_rpc_fail(call, BS_RPC_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    protobuf_c_message_pack(m, buf);
    bs_rpc_reply(call, buf, len);
    free(buf);
}

/* Unpack a request, refusing strings with a NUL byte (protobuf-c would cut
 * them there: "model\0evil" would be read as "model"). */
static ProtobufCMessage *unpack_checked(const ProtobufCMessageDescriptor *desc, const uint8_t *d,
                                        size_t n, bs_rpc_call_t *call)
{
    static const uint8_t nothing[1];
    struct bs_err err = {0};
    if (bs_pb_check_strings(desc, d ? d : nothing, n, &err) != 0) {
        bs_rpc_fail(call, BS_RPC_INVALID_ARGUMENT, err.msg);
        return NULL;
    }
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, NULL, n, d ? d : nothing);
    if (m == NULL)
        bs_rpc_fail(call, BS_RPC_INVALID_ARGUMENT, "malformed request message");
    return m;
}

/* ---- inference ---------------------------------------------------------------- */

/* Let go of the shared memory ranges the request holds. */
static void infer_release_shm(struct infer *in)
{
    for (int i = 0; i < BS_CODEC_MAX_INPUTS; i++) {
        bs_shm_release(in->holds[i]);
        in->holds[i] = NULL;
    }
    bs_shm_release(in->out_hold);
    in->out_hold = NULL;
    in->out_ptr = NULL;
}

/* After decoding: point the inputs that name shared memory at their bytes
 * and hold the output's range, so that an unregister while the request runs
 * unmaps nothing it uses. On error nothing is held. */
static int infer_bind_shm(struct infer *in, struct bs_err *err)
{
    struct bs_infer_request *r = &in->req;
    bool any = r->out_shm.given;
    for (int i = 0; i < r->n_inputs; i++)
        any |= r->in_shm[i].given;
    if (!any)
        return 0;
    bs_shm_t *shm = in->svc->o.shm;
    if (shm == NULL)
        return bs_err_set(err, BS_ENOTIMPL, "this server has no system shared memory");
    int rc = bs_shm_bind_inputs(shm, r->in_shm, r->inputs, r->n_inputs, in->holds, err);
    if (rc == 0 && r->out_shm.given &&
        (rc = bs_shm_acquire(shm, &r->out_shm, &in->out_hold, &in->out_ptr, err)) != 0) {
        bs_err_wrap(err, "output 'output'");
        infer_release_shm(in);
    }
    return rc;
}

static void infer_free(struct infer *in)
{
    infer_release_shm(in);
    bs_codec_request_free(&in->req);
    free(in->resp);
    if (in->call != NULL)
        bs_rpc_call_unref(in->call);
    free(in);
}

/* Queue one ModelStreamInferResponse: resp (an encoded ModelInferResponse)
 * or, with error, an error_message labelled with the request's model and id. */
static void stream_send(struct stream *s, const uint8_t *resp, size_t resp_len, const char *error,
                        const char *model_name, const char *id)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    struct bs_err err = {0};
    int rc;
    if (s->cancelled || s->finished)
        return;
    rc = error != NULL ? bs_codec_encode_stream_error(model_name, id, error, &buf, &len, &err)
                       : bs_codec_encode_stream(resp, resp_len, &buf, &len, &err);
    if (rc == 0)
        bs_rpc_stream_send(s->call, buf, len);
    free(buf);
}

static void stream_unlink(struct stream *s)
{
    bs_service_t *svc = s->svc;
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        svc->streams = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
}

/* Free the stream once it is over (half-closed, cancelled or finished by the
 * service) and nothing on it is in flight; a half-closed one is finished OK. */
static void stream_maybe_finish(struct stream *s)
{
    if (!(s->ended || s->cancelled || s->finished) || s->head != NULL || s->busy)
        return;
    if (!s->cancelled && !s->finished)
        bs_rpc_stream_finish(s->call, BS_RPC_OK, NULL);
    stream_unlink(s);
    bs_rpc_call_set_data(s->call, NULL);
    bs_rpc_call_unref(s->call);
    free(s);
}

/* A stream message in flight: on its stream's list, counted for the
 * transport's flow control (unary inferences need no list: the core keeps
 * every request in flight). */
static void infer_link(struct infer *in)
{
    struct stream *s = in->stream;
    if (s == NULL)
        return;
    in->prev = NULL;
    in->next = s->head;
    if (s->head != NULL)
        s->head->prev = in;
    s->head = in;
    bs_rpc_stream_set_busy(s->call, ++s->n_infer);
}

static void infer_unlink(struct infer *in)
{
    struct stream *s = in->stream;
    if (s == NULL)
        return;
    if (in->prev != NULL)
        in->prev->next = in->next;
    else
        s->head = in->next;
    if (in->next != NULL)
        in->next->prev = in->prev;
    bs_rpc_stream_set_busy(s->call, --s->n_infer);
}

/* Encode out for in (final: -1 none, 0 intermediate, 1 last of a stream);
 * an answer over the message limit fails here, before it is counted. */
static int encode(struct infer *in, const struct bs_tensor *out, int final, uint8_t **buf,
                  size_t *len, struct bs_err *err)
{
    int rc = bs_codec_encode_infer(&in->req, out, final, buf, len, err);
    size_t max = in->svc->o.max_response_bytes;
    if (rc == 0 && max > 0 && *len + (in->stream ? 11 : 0) > max) {
        free(*buf);
        *buf = NULL;
        return bs_err_set(err, BS_ERANGE,
                          "the response of %zu bytes exceeds the message limit of %zu bytes "
                          "(--max-message-bytes)",
                          *len, max);
    }
    return rc;
}

/* An intermediate block's output (stream_intermediate): it travels in the
 * message even when the output names shared memory, which receives only
 * the final output (the region holds one answer, and a client reading it
 * after the last message reads the last block's). */
static void reply_block(void *arg, const struct bs_tensor *out)
{
    struct infer *in = arg;
    struct bs_err err;
    uint8_t *buf = NULL;
    size_t len = 0;
    bool shm = in->req.out_shm.given;
    in->req.out_shm.given = false;
    in->req.model_version = bs_core_version(in->creq); /* the version that serves it */
    if (in->stream != NULL && encode(in, out, 0, &buf, &len, &err) == 0)
        stream_send(in->stream, buf, len, NULL, NULL, NULL);
    in->req.out_shm.given = shm;
    free(buf);
}

static int reply_output(void *arg, const struct bs_tensor *out, struct bs_err *err)
{
    struct infer *in = arg;
    in->req.block_cache = bs_core_block_cache(in->creq);
    in->req.model_version = bs_core_version(in->creq); /* the version that serves it */
    if (in->req.out_shm.given) {
        int rc = bs_shm_write_held(in->out_ptr, &in->req.out_shm, out, err);
        if (rc != 0)
            return rc;
    }
    return encode(in, out, in->stream && in->req.stream_intermediate ? 1 : -1, &in->resp,
                  &in->resp_len, err);
}

/* The answer: sent now. The infer lives on until reply_release (the core
 * may still read its inputs: an early answer at shutdown). */
static void reply_done(void *arg, int rc, const char *msg)
{
    struct infer *in = arg;
    struct stream *s = in->stream;
    infer_unlink(in);
    in->stream = NULL;
    bs_log(BS_LOG_VERBOSE, in->req.id[0] ? in->req.id : NULL, "model %s: %s", in->req.model_name,
           rc == 0 ? "ok" : msg);
    if (s == NULL && rc == 0)
        bs_rpc_reply(in->call, in->resp, in->resp_len);
    else if (s == NULL)
        bs_rpc_fail(in->call, status_of(rc), msg);
    else if (rc == 0)
        stream_send(s, in->resp, in->resp_len, NULL, NULL, NULL);
    else
        stream_send(s, NULL, 0, msg, in->req.model_name, in->req.id);
    if (s != NULL)
        stream_maybe_finish(s);
}

static void reply_release(void *arg)
{
    struct infer *in = arg;
    if (in->unary)
        bs_rpc_call_set_data(in->call, NULL);
    infer_free(in);
}

static const struct bs_core_reply core_reply = {.on_block = reply_block,
                                                .on_output = reply_output,
                                                .on_done = reply_done,
                                                .on_release = reply_release};

/* Decode one inference and hand it to the core; on error nothing is kept,
 * the failure is counted, and *label_model / *label_id name the request for
 * a stream's error message (valid until the next call). */
static int start_infer(bs_service_t *svc, bs_rpc_call_t *call, struct stream *s, const uint8_t *d,
                       size_t n, struct bs_infer_request *label, struct bs_err *err)
{
    struct infer *in = calloc(1, sizeof(*in));
    int rc;
    if (in == NULL) {
        bs_core_count_failure(svc->core, NULL, NULL, BS_ENOMEM);
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    }
    in->kind = CALL_INFER;
    in->svc = svc;
    in->stream = s;
    in->unary = s == NULL;
    if ((rc = bs_codec_decode_infer_labeled(d, n, &svc->o.limits, &in->req, err)) != 0) {
        bs_core_count_failure(svc->core, in->req.model_name, in->req.model_version, rc);
    } else if (in->req.stream_intermediate && s == NULL) {
        rc = bs_err_set(err, BS_EINVAL, "stream_intermediate needs ModelStreamInfer");
        bs_core_count_failure(svc->core, in->req.model_name, in->req.model_version, rc);
    } else if ((rc = infer_bind_shm(in, err)) != 0) {
        bs_core_count_failure(svc->core, in->req.model_name, in->req.model_version, rc);
    } else {
        struct bs_core_request cr = {
            .model_name = in->req.model_name,
            .model_version = in->req.model_version,
            .inputs = in->req.inputs,
            .n_inputs = in->req.n_inputs,
            .intermediate = in->req.stream_intermediate,
            .has_out_dtype = in->req.has_out_dtype,
            .out_dtype = in->req.out_dtype,
            .priority = in->req.priority,
            .timeout_us = in->req.timeout_us,
            .deadline_ns = bs_rpc_call_deadline(call),
            .sender_full = bs_rpc_unsent_full(call),
            .seq = in->req.seq,
        };
        rc = bs_core_submit(svc->core, &cr, &core_reply, in, &in->creq, err); /* counted */
    }
    if (rc != 0) {
        infer_release_shm(in);
        *label = in->req; /* the caller frees it */
        free(in);
        return rc;
    }
    in->call = call;
    bs_rpc_call_ref(call);
    infer_link(in);
    if (s == NULL)
        bs_rpc_call_set_data(call, in);
    return 0;
}

static void on_model_infer(bs_service_t *svc, bs_rpc_call_t *call, const uint8_t *d, size_t n)
{
    struct bs_err err = {0};
    struct bs_infer_request label;
    if (start_infer(svc, call, NULL, d, n, &label, &err) != 0) {
        bs_log(BS_LOG_VERBOSE, NULL, "ModelInfer rejected: %s", err.msg);
        bs_rpc_fail(call, status_of(err.code), err.msg);
        bs_codec_request_free(&label);
    }
}

/* ---- transport callbacks ---------------------------------------------------- */

/* The control method behind each unary row but ModelInfer. */
static const int control_of[BS_SVC_METHOD_COUNT] = {
    [BS_SVC_SERVER_LIVE] = BS_CTL_SERVER_LIVE,
    [BS_SVC_SERVER_READY] = BS_CTL_SERVER_READY,
    [BS_SVC_MODEL_READY] = BS_CTL_MODEL_READY,
    [BS_SVC_SERVER_METADATA] = BS_CTL_SERVER_METADATA,
    [BS_SVC_MODEL_METADATA] = BS_CTL_MODEL_METADATA,
    [BS_SVC_MODEL_INFER] = -1,
    [BS_SVC_MODEL_STREAM_INFER] = -1,
    [BS_SVC_MODEL_CONFIG] = BS_CTL_MODEL_CONFIG,
    [BS_SVC_MODEL_STATISTICS] = BS_CTL_MODEL_STATISTICS,
    [BS_SVC_REPOSITORY_INDEX] = BS_CTL_REPOSITORY_INDEX,
    [BS_SVC_REPOSITORY_MODEL_LOAD] = BS_CTL_REPOSITORY_LOAD,
    [BS_SVC_REPOSITORY_MODEL_UNLOAD] = BS_CTL_REPOSITORY_UNLOAD,
    [BS_SVC_SYSTEM_SHM_STATUS] = BS_CTL_SHM_STATUS,
    [BS_SVC_SYSTEM_SHM_REGISTER] = BS_CTL_SHM_REGISTER,
    [BS_SVC_SYSTEM_SHM_UNREGISTER] = BS_CTL_SHM_UNREGISTER,
    [BS_SVC_CUDA_SHM_STATUS] = BS_CTL_CUDA_SHM_STATUS,
    [BS_SVC_CUDA_SHM_REGISTER] = BS_CTL_CUDA_SHM_REGISTER,
    [BS_SVC_CUDA_SHM_UNREGISTER] = BS_CTL_CUDA_SHM_UNREGISTER,
};

/* A control method answered (now or later): pack its response. */
static void control_done(void *arg, int rc, const char *msg, const ProtobufCMessage *resp)
{
    bs_rpc_call_t *call = arg;
    if (rc != 0)
        bs_rpc_fail(call, status_of(rc), msg);
    else
        reply_msg(call, resp);
    bs_rpc_call_unref(call);
}

static void on_control(bs_service_t *svc, bs_rpc_call_t *call, enum bs_control_method m,
                       const uint8_t *d, size_t n)
{
    ProtobufCMessage *q = unpack_checked(bs_control_request_desc(m), d, n, call);
    if (q == NULL)
        return;
    bs_rpc_call_ref(call); /* control_done's, however late it comes */
    bs_control_call(svc->control, m, q, control_done, call);
    protobuf_c_message_free_unpacked(q, NULL);
}

static void on_call(void *arg, bs_rpc_call_t *call, int m, const uint8_t *d, size_t n)
{
    bs_service_t *svc = arg;
    if (m == BS_SVC_MODEL_INFER)
        on_model_infer(svc, call, d, n);
    else if (m >= 0 && m < BS_SVC_METHOD_COUNT && control_of[m] >= 0)
        on_control(svc, call, (enum bs_control_method)control_of[m], d, n);
    else
        bs_rpc_fail(call, BS_RPC_UNIMPLEMENTED, "not a unary method");
}

static void on_stream_open(void *arg, bs_rpc_call_t *call, int m)
{
    bs_service_t *svc = arg;
    (void)m; /* ModelStreamInfer, the one bidirectional method */
    if (!bs_core_accepting(svc->core)) {
        bs_rpc_stream_finish(call, BS_RPC_UNAVAILABLE, "the server is shutting down");
        return;
    }
    struct stream *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        bs_rpc_stream_finish(call, BS_RPC_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    s->kind = CALL_STREAM;
    s->svc = svc;
    s->call = call;
    s->next = svc->streams;
    if (svc->streams != NULL)
        svc->streams->prev = s;
    svc->streams = s;
    bs_rpc_call_ref(call);
    bs_rpc_call_set_data(call, s);
}

static void on_stream_msg(void *arg, bs_rpc_call_t *call, const uint8_t *d, size_t n)
{
    struct stream *s = bs_rpc_call_data(call);
    struct bs_err err = {0};
    struct bs_infer_request label;
    if (s == NULL || start_infer(arg, call, s, d, n, &label, &err) == 0)
        return;
    stream_send(s, NULL, 0, err.msg, label.model_name, label.id); /* labelled when readable */
    bs_codec_request_free(&label);
}

static void on_stream_end(void *arg, bs_rpc_call_t *call)
{
    struct stream *s = bs_rpc_call_data(call);
    if (s == NULL)
        return;
    s->ended = true;
    stream_maybe_finish(s);
}

static void on_cancel(void *arg, bs_rpc_call_t *call)
{
    bs_service_t *svc = arg;
    enum call_kind *kind = bs_rpc_call_data(call);
    if (kind == NULL)
        return;
    if (*kind == CALL_INFER) {
        bs_core_cancel(svc->core, ((struct infer *)kind)->creq); /* reply_done follows */
        return;
    }
    struct stream *s = (struct stream *)kind;
    s->cancelled = true;
    s->busy++; /* a queued request's reply_done runs inside bs_core_cancel */
    for (struct infer *in = s->head, *next; in != NULL; in = next) {
        next = in->next;
        bs_core_cancel(svc->core, in->creq);
    }
    s->busy--;
    stream_maybe_finish(s);
}

/* A ModelInfer call that ended before its request arrived whole. */
static void on_lost(void *arg, int m, bool cancelled)
{
    bs_service_t *svc = arg;
    if (m == BS_SVC_MODEL_INFER)
        bs_core_count_lost(svc->core, cancelled);
}

/* ---- lifecycle ---------------------------------------------------------------- */

int bs_service_init(bs_service_t **svc, bs_core_t *core, const struct bs_service_options *opts,
                    struct bs_err *err)
{
    bs_service_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    s->core = core;
    s->o = *opts;
    s->control = opts->control;
    if (s->control == NULL) {
        struct bs_control_options co = {.core = core, .shm = opts->shm};
        int rc = bs_control_init(&s->control, &co, err);
        if (rc != 0) {
            free(s);
            return rc;
        }
        s->own_control = true;
    }
    *svc = s;
    return 0;
}

void bs_service_handlers(bs_service_t *svc, struct bs_rpc_handlers *h)
{
    memset(h, 0, sizeof(*h));
    h->on_call = on_call;
    h->on_stream_open = on_stream_open;
    h->on_stream_msg = on_stream_msg;
    h->on_stream_end = on_stream_end;
    h->on_cancel = on_cancel;
    h->on_lost = on_lost;
    h->arg = svc;
}

/* inference.GRPCInferenceService's methods, by enum bs_service_method.
 * ModelInfer keeps many calls armed, so that arriving calls are admitted or
 * refused at once instead of waiting unseen inside gRPC core. */
static const struct {
    const char *path;
    enum bs_rpc_kind kind;
    int slots;
} service_methods[BS_SVC_METHOD_COUNT] = {
    [BS_SVC_SERVER_LIVE] = {"/inference.GRPCInferenceService/ServerLive", BS_RPC_UNARY, 4},
    [BS_SVC_SERVER_READY] = {"/inference.GRPCInferenceService/ServerReady", BS_RPC_UNARY, 4},
    [BS_SVC_MODEL_READY] = {"/inference.GRPCInferenceService/ModelReady", BS_RPC_UNARY, 4},
    [BS_SVC_SERVER_METADATA] = {"/inference.GRPCInferenceService/ServerMetadata", BS_RPC_UNARY, 2},
    [BS_SVC_MODEL_METADATA] = {"/inference.GRPCInferenceService/ModelMetadata", BS_RPC_UNARY, 2},
    [BS_SVC_MODEL_INFER] = {"/inference.GRPCInferenceService/ModelInfer", BS_RPC_UNARY, 128},
    [BS_SVC_MODEL_STREAM_INFER] = {"/inference.GRPCInferenceService/ModelStreamInfer", BS_RPC_BIDI,
                                   16},
    [BS_SVC_MODEL_CONFIG] = {"/inference.GRPCInferenceService/ModelConfig", BS_RPC_UNARY, 2},
    [BS_SVC_MODEL_STATISTICS] = {"/inference.GRPCInferenceService/ModelStatistics", BS_RPC_UNARY,
                                 2},
    [BS_SVC_REPOSITORY_INDEX] = {"/inference.GRPCInferenceService/RepositoryIndex", BS_RPC_UNARY,
                                 2},
    [BS_SVC_REPOSITORY_MODEL_LOAD] = {"/inference.GRPCInferenceService/RepositoryModelLoad",
                                      BS_RPC_UNARY, 2},
    [BS_SVC_REPOSITORY_MODEL_UNLOAD] = {"/inference.GRPCInferenceService/RepositoryModelUnload",
                                        BS_RPC_UNARY, 2},
    [BS_SVC_SYSTEM_SHM_STATUS] = {"/inference.GRPCInferenceService/SystemSharedMemoryStatus",
                                  BS_RPC_UNARY, 2},
    [BS_SVC_SYSTEM_SHM_REGISTER] = {"/inference.GRPCInferenceService/SystemSharedMemoryRegister",
                                    BS_RPC_UNARY, 2},
    [BS_SVC_SYSTEM_SHM_UNREGISTER] =
        {"/inference.GRPCInferenceService/SystemSharedMemoryUnregister", BS_RPC_UNARY, 2},
    [BS_SVC_CUDA_SHM_STATUS] = {"/inference.GRPCInferenceService/CudaSharedMemoryStatus",
                                BS_RPC_UNARY, 2},
    [BS_SVC_CUDA_SHM_REGISTER] = {"/inference.GRPCInferenceService/CudaSharedMemoryRegister",
                                  BS_RPC_UNARY, 2},
    [BS_SVC_CUDA_SHM_UNREGISTER] = {"/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
                                    BS_RPC_UNARY, 2},
};

int bs_service_methods(bs_service_t *svc, const struct bs_rpc_method **rows)
{
    bs_service_handlers(svc, &svc->handlers);
    for (int i = 0; i < BS_SVC_METHOD_COUNT; i++)
        svc->rows[i] = (struct bs_rpc_method){.path = service_methods[i].path,
                                              .kind = service_methods[i].kind,
                                              .id = i,
                                              .slots = service_methods[i].slots,
                                              .h = &svc->handlers};
    *rows = svc->rows;
    return BS_SVC_METHOD_COUNT;
}

void bs_service_shutdown(bs_service_t *svc)
{
    bs_core_shutdown(svc->core); /* every request in flight hears reply_done now */
    for (struct stream *s = svc->streams, *next; s != NULL; s = next) {
        s->busy++;
        if (!s->cancelled && !s->finished)
            bs_rpc_stream_finish(s->call, BS_RPC_UNAVAILABLE, "the server is shutting down");
        s->finished = true;
        s->busy--;
        next = s->next;
        stream_maybe_finish(s);
    }
}

void bs_service_free(bs_service_t *svc)
{
    if (svc != NULL && svc->own_control)
        bs_control_free(svc->control);
    free(svc);
}
