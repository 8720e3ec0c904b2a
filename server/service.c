/* The inference service: decodes each call, answers the metadata methods from
 * the repository, and runs inferences through the model's batcher. Errors
 * become gRPC statuses in one place (status_of).
 *
 * Thread ownership: everything here runs on the loop thread. An inference
 * (struct infer) holds a reference on its call until its job is done; a
 * stream (struct stream) lives until the client has half-closed or cancelled
 * or the service has finished it, and every inference on it is done.
 *
 * Admission: an inference is decoded and routed first, so that every call
 * that reaches the service is counted once under the model it names (or,
 * naming none, as unrouted); then it is refused at once (RESOURCE_EXHAUSTED)
 * past the server-wide bound on inferences in flight, while answers waiting
 * to be sent fill their server-wide bound, or past the model's queue bound.
 *
 * Shutdown (bs_service_shutdown): every inference still in flight is
 * answered UNAVAILABLE at once (each stream message with its own error
 * message) and its job cancelled; every stream is then finished UNAVAILABLE,
 * after its queued answers. */
#include "service.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "grpc_service.pb-c.h"
#include "log.h"
#include "model_config.pb-c.h"
#include "pbcheck.h"

#define BS_SERVER_NAME "blockserve"
#define BS_SERVER_VERSION "0.1.0"
#define MODEL_VERSION "1"

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
    struct stream *stream; /* NULL for unary calls */
    struct bs_repo_model *rm;
    struct bs_infer_request req;
    bs_job_t *job;
    uint8_t *resp; /* the encoded answer, between on_output and on_done */
    size_t resp_len;
    bool answered;             /* answered early (shutdown): on_done only frees */
    struct infer *prev, *next; /* the stream's in-flight list, or the unary list */
};

struct stream {
    enum call_kind kind; /* CALL_STREAM */
    bs_service_t *svc;
    bs_rpc_call_t *call;
    struct infer *head;
    int n_infer;    /* inferences in flight on it (the transport's flow control) */
    bool ended;     /* the client half-closed */
    bool cancelled; /* the call is gone */
    bool finished;  /* the service finished it (shutdown) */
    int busy;       /* > 0 while a walk over the list runs: no freeing */
    struct stream *prev, *next; /* the service's streams */
};

struct bs_service {
    bs_repository_t *repo;
    struct bs_service_options o;
    bool accepting;
    int in_flight;
    struct infer *unary;     /* unary inferences in flight */
    struct stream *streams;  /* open streams */
};

/* ---- status and replies ---------------------------------------------------- */

static enum bs_rpc_status status_of(int rc)
{
    switch (rc) {
    case BS_EINVAL:
    case BS_EFORMAT: return BS_RPC_INVALID_ARGUMENT;
    case BS_ENOTFOUND: return BS_RPC_NOT_FOUND;
    case BS_ERANGE:
    case BS_EBUSY:
    case BS_ENOMEM: return BS_RPC_RESOURCE_EXHAUSTED;
    case BS_ETIMEDOUT: return BS_RPC_DEADLINE_EXCEEDED;
    case BS_ECANCELED: return BS_RPC_CANCELLED;
    case BS_EUNSUPP: return BS_RPC_UNAVAILABLE;
    default: return BS_RPC_INTERNAL;
    }
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

#define UNPACK_OR_FAIL(type, var, data, len, call)                                                  \
    type *var = (type *)unpack_checked(&type##_descriptor_ptr, data, len, call);                   \
    if (var == NULL)                                                                               \
        return;

/* The model of a request: known, version "" or "1", and loaded. */
static struct bs_repo_model *lookup(bs_service_t *svc, const char *name, const char *version,
                                    bool need_ready, struct bs_err *err)
{
    struct bs_repo_model *rm = bs_repository_find(svc->repo, name);
    if (rm == NULL) {
        bs_err_set(err, BS_ENOTFOUND, "unknown model \"%s\"", name);
        return NULL;
    }
    if (version[0] != '\0' && strcmp(version, MODEL_VERSION) != 0) {
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

/* ---- health and metadata --------------------------------------------------- */

#define Inference__ModelReadyRequest_descriptor_ptr inference__model_ready_request__descriptor
#define Inference__ModelMetadataRequest_descriptor_ptr inference__model_metadata_request__descriptor
#define Inference__ModelConfigRequest_descriptor_ptr inference__model_config_request__descriptor
#define Inference__ModelStatisticsRequest_descriptor_ptr                                           \
    inference__model_statistics_request__descriptor
#define Inference__RepositoryIndexRequest_descriptor_ptr                                           \
    inference__repository_index_request__descriptor

static void on_server_live(bs_service_t *svc, bs_rpc_call_t *call)
{
    Inference__ServerLiveResponse r = INFERENCE__SERVER_LIVE_RESPONSE__INIT;
    r.live = true;
    reply_msg(call, &r.base);
}

static void on_server_ready(bs_service_t *svc, bs_rpc_call_t *call)
{
    Inference__ServerReadyResponse r = INFERENCE__SERVER_READY_RESPONSE__INIT;
    r.ready = svc->accepting;
    reply_msg(call, &r.base);
}

static void on_model_ready(bs_service_t *svc, bs_rpc_call_t *call, const uint8_t *d, size_t n)
{
    struct bs_err err;
    UNPACK_OR_FAIL(Inference__ModelReadyRequest, q, d, n, call);
    struct bs_repo_model *rm = lookup(svc, q->name, q->version, false, &err);
    if (rm == NULL) {
        bs_rpc_fail(call, status_of(err.code), err.msg);
    } else {
        Inference__ModelReadyResponse r = INFERENCE__MODEL_READY_RESPONSE__INIT;
        r.ready = rm->model != NULL && svc->accepting;
        reply_msg(call, &r.base);
    }
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void on_server_metadata(bs_service_t *svc, bs_rpc_call_t *call)
{
    static char *extensions[] = {"model_configuration", "statistics", "parameters",
                                 "model_repository(index)", "streaming", "health", "reflection"};
    Inference__ServerMetadataResponse r = INFERENCE__SERVER_METADATA_RESPONSE__INIT;
    r.name = BS_SERVER_NAME;
    r.version = BS_SERVER_VERSION;
    r.n_extensions = BS_ARRAY_LEN(extensions);
    r.extensions = extensions;
    reply_msg(call, &r.base);
}

/* Tensor metadata for ModelMetadata: every dim of the spec, batch dim -1. */
static void fill_tensor_meta(Inference__ModelMetadataResponse__TensorMetadata *t,
                             const struct bs_input_spec *s)
{
    inference__model_metadata_response__tensor_metadata__init(t);
    t->name = (char *)s->name;
    t->datatype = (char *)bs_codec_datatype(s->dtype);
    t->n_shape = (size_t)s->n_dims;
    t->shape = (int64_t *)s->dims;
}

static void on_model_metadata(bs_service_t *svc, bs_rpc_call_t *call, const uint8_t *d, size_t n)
{
    struct bs_err err;
    UNPACK_OR_FAIL(Inference__ModelMetadataRequest, q, d, n, call);
    struct bs_repo_model *rm = lookup(svc, q->name, q->version, true, &err);
    if (rm == NULL) {
        bs_rpc_fail(call, status_of(err.code), err.msg);
        protobuf_c_message_free_unpacked(&q->base, NULL);
        return;
    }
    Inference__ModelMetadataResponse__TensorMetadata in[8], out;
    Inference__ModelMetadataResponse__TensorMetadata *inp[8], *outp = &out;
    struct bs_input_spec out_spec = bs_model_output(rm->model);
    char *versions[] = {MODEL_VERSION};
    int n_in = bs_model_n_inputs(rm->model);
    for (int i = 0; i < n_in && i < 8; i++) {
        fill_tensor_meta(&in[i], bs_model_input(rm->model, i));
        inp[i] = &in[i];
    }
    fill_tensor_meta(&out, &out_spec);
    Inference__ModelMetadataResponse r = INFERENCE__MODEL_METADATA_RESPONSE__INIT;
    r.name = rm->name;
    r.n_versions = 1;
    r.versions = versions;
    r.platform = "blockserve";
    r.n_inputs = (size_t)n_in;
    r.inputs = inp;
    r.n_outputs = 1;
    r.outputs = &outp;
    reply_msg(call, &r.base);
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

static Inference__DataType data_type_of(enum bs_dtype t)
{
    switch (t) {
    case BS_TYPE_F32: return INFERENCE__DATA_TYPE__TYPE_FP32;
    case BS_TYPE_F16: return INFERENCE__DATA_TYPE__TYPE_FP16;
    case BS_TYPE_BF16: return INFERENCE__DATA_TYPE__TYPE_BF16;
    case BS_TYPE_I64: return INFERENCE__DATA_TYPE__TYPE_INT64;
    case BS_TYPE_BOOL: return INFERENCE__DATA_TYPE__TYPE_BOOL;
    default: return INFERENCE__DATA_TYPE__TYPE_INVALID;
    }
}

static void on_model_config(bs_service_t *svc, bs_rpc_call_t *call, const uint8_t *d, size_t n)
{
    struct bs_err err;
    UNPACK_OR_FAIL(Inference__ModelConfigRequest, q, d, n, call);
    struct bs_repo_model *rm = lookup(svc, q->name, q->version, true, &err);
    if (rm == NULL) {
        bs_rpc_fail(call, status_of(err.code), err.msg);
        protobuf_c_message_free_unpacked(&q->base, NULL);
        return;
    }
    const struct bs_serving_config *sc = &rm->serving;
    Inference__ModelInput in[8], *inp[8];
    Inference__ModelOutput out = INFERENCE__MODEL_OUTPUT__INIT, *outp = &out;
    struct bs_input_spec out_spec = bs_model_output(rm->model);
    int n_in = bs_model_n_inputs(rm->model);
    for (int i = 0; i < n_in && i < 8; i++) {
        const struct bs_input_spec *s = bs_model_input(rm->model, i);
        inference__model_input__init(&in[i]);
        in[i].name = (char *)s->name;
        in[i].data_type = data_type_of(s->dtype);
        in[i].n_dims = s->n_dims > 0 ? (size_t)s->n_dims - 1 : 0; /* Triton: without batch */
        in[i].dims = (int64_t *)s->dims + 1;
        in[i].optional = !s->required;
        inp[i] = &in[i];
    }
    out.name = "output";
    out.data_type = INFERENCE__DATA_TYPE__TYPE_FP32;
    out.n_dims = (size_t)out_spec.n_dims - 1;
    out.dims = out_spec.dims + 1;
    Inference__ModelQueuePolicy policy = INFERENCE__MODEL_QUEUE_POLICY__INIT;
    policy.default_timeout_microseconds = (uint64_t)sc->default_timeout_us;
    policy.allow_timeout_override = true;
    policy.max_queue_size = (uint32_t)sc->max_queue_size;
    Inference__ModelDynamicBatching db = INFERENCE__MODEL_DYNAMIC_BATCHING__INIT;
    db.n_preferred_batch_size = (size_t)sc->n_preferred;
    db.preferred_batch_size = (int32_t *)sc->preferred_batch_size;
    db.max_queue_delay_microseconds = (uint64_t)sc->max_queue_delay_us;
    db.default_queue_policy = &policy;
    Inference__ModelInstanceGroup group = INFERENCE__MODEL_INSTANCE_GROUP__INIT, *groupp = &group;
    group.name = rm->name;
    group.count = 1;
    group.kind = INFERENCE__MODEL_INSTANCE_GROUP__KIND__KIND_CPU;
    Inference__ModelParameter cls = INFERENCE__MODEL_PARAMETER__INIT;
    cls.string_value = (char *)bs_config_class_name(bs_model_config(rm->model)->cls);
    Inference__ModelConfig__ParametersEntry pe = INFERENCE__MODEL_CONFIG__PARAMETERS_ENTRY__INIT;
    Inference__ModelConfig__ParametersEntry *pep = &pe;
    pe.key = "_class_name";
    pe.value = &cls;
    Inference__ModelConfig c = INFERENCE__MODEL_CONFIG__INIT;
    c.name = rm->name;
    c.platform = "blockserve";
    c.backend = "blockserve";
    c.max_batch_size = sc->max_batch_size;
    c.n_input = (size_t)n_in;
    c.input = inp;
    c.n_output = 1;
    c.output = &outp;
    c.n_instance_group = 1;
    c.instance_group = &groupp;
    c.n_parameters = 1;
    c.parameters = &pep;
    c.scheduling_choice_case = INFERENCE__MODEL_CONFIG__SCHEDULING_CHOICE_DYNAMIC_BATCHING;
    c.dynamic_batching = &db;
    Inference__ModelConfigResponse r = INFERENCE__MODEL_CONFIG_RESPONSE__INIT;
    r.config = &c;
    reply_msg(call, &r.base);
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

/* ---- statistics and the repository index ---------------------------------- */

/* Storage for one model's statistics message. */
struct stats_msg {
    Inference__ModelStatistics ms;
    Inference__InferStatistics is;
    Inference__StatisticDuration d[6];
    Inference__InferBatchStatistics **bp;
    Inference__InferBatchStatistics *b;
    Inference__StatisticDuration *bd;
};

static void duration(Inference__StatisticDuration *m, const struct bs_duration *d)
{
    inference__statistic_duration__init(m);
    m->count = d->count;
    m->ns = d->ns;
}

static int fill_stats(struct stats_msg *s, const struct bs_repo_model *rm)
{
    const struct bs_model_stats *st = bs_batcher_stats(rm->batcher);
    int nb = 0;
    memset(s, 0, sizeof(*s));
    inference__model_statistics__init(&s->ms);
    inference__infer_statistics__init(&s->is);
    s->ms.name = (char *)rm->name;
    s->ms.version = MODEL_VERSION;
    s->ms.last_inference = st->last_inference_ms;
    s->ms.inference_count = st->inference_count;
    s->ms.execution_count = st->execution_count;
    duration(&s->d[0], &st->success);
    duration(&s->d[1], &st->fail);
    duration(&s->d[2], &st->queue);
    duration(&s->d[3], &st->compute_input);
    duration(&s->d[4], &st->compute_infer);
    duration(&s->d[5], &st->compute_output);
    s->is.success = &s->d[0];
    s->is.fail = &s->d[1];
    s->is.queue = &s->d[2];
    s->is.compute_input = &s->d[3];
    s->is.compute_infer = &s->d[4];
    s->is.compute_output = &s->d[5];
    s->ms.inference_stats = &s->is;
    for (int i = 0; i < st->n_batch; i++)
        nb += st->batch[i].compute_infer.count > 0;
    s->b = calloc((size_t)nb + 1, sizeof(*s->b));
    s->bp = calloc((size_t)nb + 1, sizeof(*s->bp));
    s->bd = calloc(3 * (size_t)nb + 1, sizeof(*s->bd));
    if (s->b == NULL || s->bp == NULL || s->bd == NULL)
        return BS_ENOMEM;
    for (int i = 0, k = 0; i < st->n_batch; i++) {
        const struct bs_batch_stats *bs = &st->batch[i];
        if (bs->compute_infer.count == 0)
            continue;
        inference__infer_batch_statistics__init(&s->b[k]);
        s->b[k].batch_size = bs->batch_size;
        duration(&s->bd[3 * k], &bs->compute_input);
        duration(&s->bd[3 * k + 1], &bs->compute_infer);
        duration(&s->bd[3 * k + 2], &bs->compute_output);
        s->b[k].compute_input = &s->bd[3 * k];
        s->b[k].compute_infer = &s->bd[3 * k + 1];
        s->b[k].compute_output = &s->bd[3 * k + 2];
        s->bp[k] = &s->b[k];
        k++;
    }
    s->ms.n_batch_stats = (size_t)nb;
    s->ms.batch_stats = s->bp;
    return 0;
}

static void free_stats(struct stats_msg *s)
{
    free(s->b);
    free(s->bp);
    free(s->bd);
}

static void on_model_statistics(bs_service_t *svc, bs_rpc_call_t *call, const uint8_t *d,
                                size_t n)
{
    struct bs_err err;
    UNPACK_OR_FAIL(Inference__ModelStatisticsRequest, q, d, n, call);
    int count = bs_repository_count(svc->repo), k = 0, rc = 0;
    struct bs_repo_model *only = NULL;
    if (q->name[0] != '\0' && (only = lookup(svc, q->name, q->version, true, &err)) == NULL) {
        bs_rpc_fail(call, status_of(err.code), err.msg);
        protobuf_c_message_free_unpacked(&q->base, NULL);
        return;
    }
    struct stats_msg *sm = calloc((size_t)count + 1, sizeof(*sm));
    Inference__ModelStatistics **list = calloc((size_t)count + 1, sizeof(*list));
    for (int i = 0; sm && list && i < count && rc == 0; i++) {
        struct bs_repo_model *rm = bs_repository_get(svc->repo, i);
        if (rm->batcher == NULL || (only != NULL && rm != only))
            continue;
        rc = fill_stats(&sm[k], rm);
        list[k] = &sm[k].ms;
        k++;
    }
    if (sm == NULL || list == NULL || rc != 0) {
        bs_rpc_fail(call, BS_RPC_RESOURCE_EXHAUSTED, "out of memory");
    } else {
        Inference__ModelStatisticsResponse r = INFERENCE__MODEL_STATISTICS_RESPONSE__INIT;
        r.n_model_stats = (size_t)k;
        r.model_stats = list;
        reply_msg(call, &r.base);
    }
    for (int i = 0; sm && i < k; i++)
        free_stats(&sm[i]);
    free(sm);
    free(list);
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void on_repository_index(bs_service_t *svc, bs_rpc_call_t *call, const uint8_t *d,
                                size_t n)
{
    UNPACK_OR_FAIL(Inference__RepositoryIndexRequest, q, d, n, call);
    int count = bs_repository_count(svc->repo), k = 0;
    Inference__RepositoryIndexResponse__ModelIndex *idx = calloc((size_t)count + 1, sizeof(*idx));
    Inference__RepositoryIndexResponse__ModelIndex **list = calloc((size_t)count + 1, sizeof(*list));
    if (idx == NULL || list == NULL) {
        bs_rpc_fail(call, BS_RPC_RESOURCE_EXHAUSTED, "out of memory");
    } else {
        for (int i = 0; i < count; i++) {
            struct bs_repo_model *rm = bs_repository_get(svc->repo, i);
            if (q->ready && rm->model == NULL)
                continue;
            inference__repository_index_response__model_index__init(&idx[k]);
            idx[k].name = rm->name;
            idx[k].version = MODEL_VERSION;
            idx[k].state = rm->model ? "READY" : "UNAVAILABLE";
            idx[k].reason = rm->model ? "" : rm->reason;
            list[k] = &idx[k];
            k++;
        }
        Inference__RepositoryIndexResponse r = INFERENCE__REPOSITORY_INDEX_RESPONSE__INIT;
        r.n_models = (size_t)k;
        r.models = list;
        reply_msg(call, &r.base);
    }
    free(idx);
    free(list);
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

/* ---- inference ---------------------------------------------------------------- */

static void infer_free(struct infer *in)
{
    bs_codec_request_free(&in->req);
    free(in->resp);
    if (in->call != NULL)
        bs_rpc_call_unref(in->call);
    free(in);
}

/* Send one ModelStreamInferResponse: infer_response (already packed) or an
 * error_message, which still carries the request's model name and id. */
static void stream_send(struct stream *s, const uint8_t *resp, size_t resp_len, const char *error,
                        const char *model_name, const char *id)
{
    Inference__ModelInferResponse ir = INFERENCE__MODEL_INFER_RESPONSE__INIT;
    Inference__ModelStreamInferResponse r = INFERENCE__MODEL_STREAM_INFER_RESPONSE__INIT;
    if (s->cancelled || s->finished)
        return;
    if (error != NULL) {
        ir.model_name = (char *)(model_name ? model_name : "");
        ir.model_version = MODEL_VERSION;
        ir.id = (char *)(id ? id : "");
        r.error_message = (char *)error;
        r.infer_response = &ir;
        size_t len = protobuf_c_message_get_packed_size(&r.base);
        uint8_t *buf = malloc(len ? len : 1);
        if (buf != NULL) {
            protobuf_c_message_pack(&r.base, buf);
            bs_rpc_stream_send(s->call, buf, len);
        }
        free(buf);
        return;
    }
    /* ModelStreamInferResponse { infer_response = 2 }: tag 0x12, varint length, bytes. */
    uint8_t *buf = malloc(resp_len + 11);
    if (buf == NULL)
        return;
    size_t o = 0;
    buf[o++] = 0x12;
    for (uint64_t v = resp_len; ; v >>= 7) {
        buf[o++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        if (v <= 0x7f)
            break;
    }
    memcpy(buf + o, resp, resp_len);
    bs_rpc_stream_send(s->call, buf, o + resp_len);
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

/* Link in as in flight: on its stream's list, or the service's unary list. */
static void infer_link(struct infer *in)
{
    struct infer **head = in->stream != NULL ? &in->stream->head : &in->svc->unary;
    in->prev = NULL;
    in->next = *head;
    if (*head != NULL)
        (*head)->prev = in;
    *head = in;
    in->svc->in_flight++;
    if (in->stream != NULL)
        bs_rpc_stream_set_busy(in->stream->call, ++in->stream->n_infer);
}

static void infer_unlink(struct infer *in)
{
    struct infer **head = in->stream != NULL ? &in->stream->head : &in->svc->unary;
    if (in->prev != NULL)
        in->prev->next = in->next;
    else
        *head = in->next;
    if (in->next != NULL)
        in->next->prev = in->prev;
    in->svc->in_flight--;
    if (in->stream != NULL)
        bs_rpc_stream_set_busy(in->stream->call, --in->stream->n_infer);
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

static void job_block(void *arg, int block, int n_blocks, const struct bs_tensor *out)
{
    struct infer *in = arg;
    struct bs_err err;
    uint8_t *buf = NULL;
    size_t len = 0;
    if (in->stream == NULL || block >= n_blocks - 1) /* the last comes with on_done */
        return;
    if (encode(in, out, 0, &buf, &len, &err) == 0)
        stream_send(in->stream, buf, len, NULL, NULL, NULL);
    free(buf);
}

static int job_output(void *arg, const struct bs_tensor *out, struct bs_err *err)
{
    struct infer *in = arg;
    if (in->answered)
        return 0;
    return encode(in, out, in->stream && in->req.stream_intermediate ? 1 : -1, &in->resp,
                  &in->resp_len, err);
}

static void job_done(void *arg, int rc, const char *msg, const struct bs_tensor *out)
{
    struct infer *in = arg;
    struct stream *s = in->stream;
    infer_unlink(in);
    bs_log(BS_LOG_VERBOSE, in->req.id[0] ? in->req.id : NULL, "model %s: %s", in->rm->name,
           rc == 0 ? "ok" : msg);
    if (!in->answered && s == NULL) {
        if (rc == 0)
            bs_rpc_reply(in->call, in->resp, in->resp_len);
        else
            bs_rpc_fail(in->call, status_of(rc), msg);
    } else if (!in->answered) {
        if (rc == 0)
            stream_send(s, in->resp, in->resp_len, NULL, NULL, NULL);
        else
            stream_send(s, NULL, 0, msg, in->req.model_name, in->req.id);
    }
    if (s == NULL)
        bs_rpc_call_set_data(in->call, NULL);
    infer_free(in);
    if (s != NULL)
        stream_maybe_finish(s);
}

static const struct bs_job_ops job_ops = {
    .on_block = job_block, .on_done = job_done, .on_output = job_output};

/* Count a request that failed before its model's batcher took it: under the
 * model it names when that is a served one (rm, or read again from the
 * message when decoding failed), else as unrouted. */
static void count_failure(bs_service_t *svc, struct bs_repo_model *rm, const uint8_t *d, size_t n,
                          int rc)
{
    static const uint8_t nothing[1];
    if (rm == NULL && bs_pb_check_strings(&inference__model_infer_request__descriptor,
                                          d ? d : nothing, n, NULL) == 0) {
        Inference__ModelInferRequest *q =
            inference__model_infer_request__unpack(NULL, n, d ? d : nothing);
        struct bs_err err;
        if (q != NULL)
            rm = lookup(svc, q->model_name, q->model_version, true, &err);
        if (q != NULL)
            protobuf_c_message_free_unpacked(&q->base, NULL);
    }
    if (rm != NULL && rm->batcher != NULL)
        bs_batcher_count_failure(rm->batcher, rc);
    else
        bs_metrics_unrouted(svc->o.metrics, bs_batcher_reason(rc));
}

/* Server-wide admission: shutting down, inferences in flight, unsent answers. */
static int admit(bs_service_t *svc, bs_rpc_call_t *call, struct bs_err *err)
{
    if (!svc->accepting)
        return bs_err_set(err, BS_EUNSUPP, "the server is shutting down");
    if (svc->o.max_inflight > 0 && svc->in_flight >= svc->o.max_inflight)
        return bs_err_set(err, BS_EBUSY, "server busy: %d inferences in flight (--max-inflight)",
                          svc->in_flight);
    if (bs_rpc_unsent_full(call))
        return bs_err_set(err, BS_EBUSY,
                          "server busy: answers waiting for their clients fill the server's "
                          "bound (--max-unsent-bytes)");
    return 0;
}

/* The request's deadline: the call's, or its "timeout" parameter's if
 * sooner (saturating: a huge timeout means none). */
static int64_t infer_deadline(const struct infer *in, bs_rpc_call_t *call)
{
    int64_t deadline = bs_rpc_call_deadline(call);
    int64_t t = bs_deadline_after_us((int64_t)uv_hrtime(), in->req.timeout_us);
    return t < deadline ? t : deadline;
}

/* Decode, route and admit one inference (in->rm set when routed). */
static int route(bs_service_t *svc, bs_rpc_call_t *call, struct infer *in, const uint8_t *d,
                 size_t n, struct bs_err *err)
{
    int rc;
    if ((rc = bs_codec_decode_infer(d, n, &svc->o.limits, &in->req, err)) != 0)
        return rc;
    if ((in->rm = lookup(svc, in->req.model_name, in->req.model_version, true, err)) == NULL)
        return err->code;
    if (in->req.stream_intermediate && in->stream == NULL)
        return bs_err_set(err, BS_EINVAL, "stream_intermediate needs ModelStreamInfer");
    return admit(svc, call, err);
}

/* Decode, route, admit and queue one inference; on error nothing is kept
 * and the failure is counted. */
static int start_infer(bs_service_t *svc, bs_rpc_call_t *call, struct stream *s, const uint8_t *d,
                       size_t n, struct bs_err *err)
{
    struct infer *in = calloc(1, sizeof(*in));
    int rc;
    if (in == NULL) {
        bs_metrics_unrouted(svc->o.metrics, BS_METRICS_BACKEND);
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    }
    in->kind = CALL_INFER;
    in->svc = svc;
    in->stream = s;
    if ((rc = route(svc, call, in, d, n, err)) != 0)
        count_failure(svc, in->rm, d, n, rc);
    else /* the batcher counts its own refusals */
        rc = bs_batcher_submit(in->rm->batcher, in->req.inputs, in->req.n_inputs,
                               infer_deadline(in, call), in->req.stream_intermediate, &job_ops, in,
                               &in->job, err);
    if (rc != 0) {
        infer_free(in);
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
    if (start_infer(svc, call, NULL, d, n, &err) != 0) {
        bs_log(BS_LOG_VERBOSE, NULL, "ModelInfer rejected: %s", err.msg);
        bs_rpc_fail(call, status_of(err.code), err.msg);
    }
}

/* ---- transport callbacks ---------------------------------------------------- */

static void on_unary(void *arg, bs_rpc_call_t *call, enum bs_rpc_method m, const uint8_t *d,
                     size_t n)
{
    bs_service_t *svc = arg;
    switch (m) {
    case BS_RPC_SERVER_LIVE: on_server_live(svc, call); break;
    case BS_RPC_SERVER_READY: on_server_ready(svc, call); break;
    case BS_RPC_MODEL_READY: on_model_ready(svc, call, d, n); break;
    case BS_RPC_SERVER_METADATA: on_server_metadata(svc, call); break;
    case BS_RPC_MODEL_METADATA: on_model_metadata(svc, call, d, n); break;
    case BS_RPC_MODEL_INFER: on_model_infer(svc, call, d, n); break;
    case BS_RPC_MODEL_CONFIG: on_model_config(svc, call, d, n); break;
    case BS_RPC_MODEL_STATISTICS: on_model_statistics(svc, call, d, n); break;
    case BS_RPC_REPOSITORY_INDEX: on_repository_index(svc, call, d, n); break;
    default: bs_rpc_fail(call, BS_RPC_UNIMPLEMENTED, "not a unary method"); break;
    }
}

static void on_stream_open(void *arg, bs_rpc_call_t *call)
{
    bs_service_t *svc = arg;
    if (!svc->accepting) {
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
    static const uint8_t nothing[1];
    if (s == NULL || start_infer(arg, call, s, d, n, &err) == 0)
        return;
    /* Name the request in the error when the message can be read at all. */
    Inference__ModelInferRequest *q = NULL;
    if (bs_pb_check_strings(&inference__model_infer_request__descriptor, d ? d : nothing, n,
                            NULL) == 0)
        q = inference__model_infer_request__unpack(NULL, n, d ? d : nothing);
    stream_send(s, NULL, 0, err.msg, q ? q->model_name : NULL, q ? q->id : NULL);
    if (q != NULL)
        protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void on_stream_end(void *arg, bs_rpc_call_t *call)
{
    struct stream *s = bs_rpc_call_data(call);
    if (s == NULL)
        return;
    s->ended = true;
    stream_maybe_finish(s);
}

/* Cancel the jobs of every inference on list (each hears job_done, at once
 * when queued, when its batch returns when running). */
static void cancel_list(struct infer *head)
{
    for (struct infer *in = head, *next; in != NULL; in = next) {
        next = in->next; /* in may be freed by a queued job's job_done */
        bs_batcher_cancel(in->rm->batcher, in->job);
    }
}

static void on_cancel(void *arg, bs_rpc_call_t *call)
{
    enum call_kind *kind = bs_rpc_call_data(call);
    if (kind == NULL)
        return;
    if (*kind == CALL_INFER) {
        struct infer *in = (struct infer *)kind;
        bs_batcher_cancel(in->rm->batcher, in->job); /* job_done follows */
        return;
    }
    struct stream *s = (struct stream *)kind;
    s->cancelled = true;
    s->busy++; /* a queued job's job_done runs inside bs_batcher_cancel */
    cancel_list(s->head);
    s->busy--;
    stream_maybe_finish(s);
}

/* A ModelInfer call that ended before its request arrived whole: it names
 * no model, so it is counted as unrouted. */
static void on_lost(void *arg, enum bs_rpc_method m, bool cancelled)
{
    bs_service_t *svc = arg;
    if (m == BS_RPC_MODEL_INFER)
        bs_metrics_unrouted(svc->o.metrics, cancelled ? BS_METRICS_CANCELED : BS_METRICS_OTHER);
}

/* ---- lifecycle ---------------------------------------------------------------- */

int bs_service_init(bs_service_t **svc, bs_repository_t *repo,
                    const struct bs_service_options *opts, struct bs_err *err)
{
    bs_service_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    s->repo = repo;
    s->o = *opts;
    s->accepting = true;
    *svc = s;
    return 0;
}

void bs_service_handlers(bs_service_t *svc, struct bs_rpc_handlers *h)
{
    h->on_unary = on_unary;
    h->on_stream_open = on_stream_open;
    h->on_stream_msg = on_stream_msg;
    h->on_stream_end = on_stream_end;
    h->on_cancel = on_cancel;
    h->on_lost = on_lost;
    h->arg = svc;
}

void bs_service_stop_accepting(bs_service_t *svc)
{
    svc->accepting = false;
}

/* Answer every inference on list UNAVAILABLE now (stream messages with an
 * error message each), then cancel their jobs. */
static void answer_unavailable(struct infer *head, const char *msg)
{
    for (struct infer *in = head; in != NULL; in = in->next) {
        if (in->answered)
            continue;
        in->answered = true;
        if (in->stream == NULL)
            bs_rpc_fail(in->call, BS_RPC_UNAVAILABLE, msg);
        else
            stream_send(in->stream, NULL, 0, msg, in->req.model_name, in->req.id);
    }
    cancel_list(head);
}

void bs_service_shutdown(bs_service_t *svc)
{
    static const char msg[] = "the server is shutting down: this request did not run in time";
    svc->accepting = false;
    answer_unavailable(svc->unary, msg);
    for (struct stream *s = svc->streams, *next; s != NULL; s = next) {
        s->busy++;
        answer_unavailable(s->head, msg);
        if (!s->cancelled && !s->finished)
            bs_rpc_stream_finish(s->call, BS_RPC_UNAVAILABLE, "the server is shutting down");
        s->finished = true;
        s->busy--;
        next = s->next;
        stream_maybe_finish(s);
    }
}

int bs_service_in_flight(const bs_service_t *svc)
{
    return svc->in_flight;
}

void bs_service_free(bs_service_t *svc)
{
    free(svc);
}
