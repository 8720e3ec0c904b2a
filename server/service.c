/* inference.GRPCInferenceService over the gRPC transport: the front end that
 * speaks protobuf. It decodes each call (codec.c), answers the metadata
 * methods from the repository, and hands inferences to the inference core
 * (core.c), which routes, admits, batches and counts them; what the core
 * answers is encoded back here, stream framing included (codec.c). Errors
 * become gRPC statuses through the status table (status_of).
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
#include "model_config.pb-c.h"
#include "pbcheck.h"
#include "version.h"

#define BS_SERVER_NAME "blockserve"
#define MODEL_VERSION  BS_MODEL_VERSION

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

#define UNPACK_OR_FAIL(type, var, data, len, call)                                                 \
    type *var = (type *)unpack_checked(&type##_descriptor_ptr, data, len, call);                   \
    if (var == NULL)                                                                               \
        return;

static struct bs_repo_model *lookup(bs_service_t *svc, const char *name, const char *version,
                                    bool need_ready, struct bs_err *err)
{
    return bs_core_lookup(svc->core, name, version, need_ready, err);
}

/* ---- health and metadata --------------------------------------------------- */

#define Inference__ModelReadyRequest_descriptor_ptr    inference__model_ready_request__descriptor
#define Inference__ModelMetadataRequest_descriptor_ptr inference__model_metadata_request__descriptor
#define Inference__ModelConfigRequest_descriptor_ptr   inference__model_config_request__descriptor
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
    r.ready = bs_core_accepting(svc->core);
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
        r.ready = rm->model != NULL && bs_core_accepting(svc->core);
        reply_msg(call, &r.base);
    }
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void on_server_metadata(bs_service_t *svc, bs_rpc_call_t *call)
{
    static char *extensions[] = {
        "model_configuration", "statistics", "parameters", "model_repository(index)",
        "streaming",           "health",     "reflection"};
    Inference__ServerMetadataResponse r = INFERENCE__SERVER_METADATA_RESPONSE__INIT;
    r.name = BS_SERVER_NAME;
    r.version = BS_VERSION;
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
    Inference__ModelMetadataResponse__TensorMetadata in[BS_MAX_INPUTS], out;
    Inference__ModelMetadataResponse__TensorMetadata *inp[BS_MAX_INPUTS], *outp = &out;
    struct bs_input_spec out_spec = bs_model_output(rm->model);
    char *versions[] = {MODEL_VERSION};
    int n_in = bs_model_n_inputs(rm->model);
    for (int i = 0; i < n_in && i < BS_MAX_INPUTS; i++) {
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
    case BS_TYPE_F32:
        return INFERENCE__DATA_TYPE__TYPE_FP32;
    case BS_TYPE_F16:
        return INFERENCE__DATA_TYPE__TYPE_FP16;
    case BS_TYPE_BF16:
        return INFERENCE__DATA_TYPE__TYPE_BF16;
    case BS_TYPE_I64:
        return INFERENCE__DATA_TYPE__TYPE_INT64;
    case BS_TYPE_BOOL:
        return INFERENCE__DATA_TYPE__TYPE_BOOL;
    default:
        return INFERENCE__DATA_TYPE__TYPE_INVALID;
    }
}

/* Storage for ModelConfig's dynamic_batching: the default queue policy and
 * one policy per level that has a priority_queue_policy entry. */
struct batching_msg {
    Inference__ModelDynamicBatching db;
    Inference__ModelQueuePolicy dflt, level[BS_MAX_PRIORITY_LEVELS];
    Inference__ModelDynamicBatching__PriorityQueuePolicyEntry entry[BS_MAX_PRIORITY_LEVELS];
    Inference__ModelDynamicBatching__PriorityQueuePolicyEntry *entryp[BS_MAX_PRIORITY_LEVELS];
};

static void queue_policy_msg(Inference__ModelQueuePolicy *m, const struct bs_queue_policy *p)
{
    inference__model_queue_policy__init(m);
    m->timeout_action = p->timeout_action == BS_TIMEOUT_DELAY
                            ? INFERENCE__MODEL_QUEUE_POLICY__TIMEOUT_ACTION__DELAY
                            : INFERENCE__MODEL_QUEUE_POLICY__TIMEOUT_ACTION__REJECT;
    m->default_timeout_microseconds = (uint64_t)p->default_timeout_us;
    m->allow_timeout_override = p->allow_timeout_override;
    m->max_queue_size = (uint32_t)p->max_queue_size;
}

/* The batcher's settings as configured; a level's policy is reported whole
 * (its entry over the default policy), as the batcher applies it. */
static void batching_msg_fill(struct batching_msg *b, const struct bs_serving_config *sc)
{
    Inference__ModelDynamicBatching *db = &b->db;
    struct bs_queue_policy p = bs_serving_policy(sc, 0);
    inference__model_dynamic_batching__init(db);
    db->n_preferred_batch_size = (size_t)sc->n_preferred;
    db->preferred_batch_size = (int32_t *)sc->preferred_batch_size;
    db->max_queue_delay_microseconds = (uint64_t)sc->max_queue_delay_us;
    db->priority_levels = (uint64_t)sc->priority_levels;
    db->default_priority_level = (uint64_t)sc->default_priority_level;
    queue_policy_msg(&b->dflt, &p);
    db->default_queue_policy = &b->dflt;
    for (int i = 0; i < sc->priority_levels && i < BS_MAX_PRIORITY_LEVELS; i++) {
        if (sc->level_policy[i].given == 0)
            continue;
        size_t k = db->n_priority_queue_policy++;
        p = bs_serving_policy(sc, i + 1);
        queue_policy_msg(&b->level[k], &p);
        inference__model_dynamic_batching__priority_queue_policy_entry__init(&b->entry[k]);
        b->entry[k].key = (uint64_t)i + 1;
        b->entry[k].value = &b->level[k];
        b->entryp[k] = &b->entry[k];
    }
    db->priority_queue_policy = b->entryp;
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
    Inference__ModelInput in[BS_MAX_INPUTS], *inp[BS_MAX_INPUTS];
    Inference__ModelOutput out = INFERENCE__MODEL_OUTPUT__INIT, *outp = &out;
    struct bs_input_spec out_spec = bs_model_output(rm->model);
    int n_in = bs_model_n_inputs(rm->model);
    for (int i = 0; i < n_in && i < BS_MAX_INPUTS; i++) {
        const struct bs_input_spec *s = bs_model_input(rm->model, i);
        inference__model_input__init(&in[i]);
        in[i].name = (char *)s->name;
        in[i].data_type = data_type_of(s->dtype);
        in[i].n_dims = s->n_dims > 0 ? (size_t)s->n_dims - 1 : 0; /* Triton: without batch */
        in[i].dims = (int64_t *)s->dims + 1;
        in[i].optional = !s->required;
        /* Triton's flag: requests that differ in its variable dims may
         * share a batch (ragged batching) */
        for (int k = 1; k < s->n_dims && !sc->ragged_off; k++)
            in[i].allow_ragged_batch |= s->dims[k] == -1;
        inp[i] = &in[i];
    }
    out.name = "output";
    out.data_type = INFERENCE__DATA_TYPE__TYPE_FP32;
    out.n_dims = (size_t)out_spec.n_dims - 1;
    out.dims = out_spec.dims + 1;
    struct batching_msg db;
    batching_msg_fill(&db, sc);
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
    c.dynamic_batching = &db.db;
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

static void on_model_statistics(bs_service_t *svc, bs_rpc_call_t *call, const uint8_t *d, size_t n)
{
    struct bs_err err;
    UNPACK_OR_FAIL(Inference__ModelStatisticsRequest, q, d, n, call);
    int count = bs_repository_count(bs_core_repository(svc->core)), k = 0, rc = 0;
    struct bs_repo_model *only = NULL;
    if (q->name[0] != '\0' && (only = lookup(svc, q->name, q->version, true, &err)) == NULL) {
        bs_rpc_fail(call, status_of(err.code), err.msg);
        protobuf_c_message_free_unpacked(&q->base, NULL);
        return;
    }
    struct stats_msg *sm = calloc((size_t)count + 1, sizeof(*sm));
    Inference__ModelStatistics **list = calloc((size_t)count + 1, sizeof(*list));
    for (int i = 0; sm && list && i < count && rc == 0; i++) {
        struct bs_repo_model *rm = bs_repository_get(bs_core_repository(svc->core), i);
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

static void on_repository_index(bs_service_t *svc, bs_rpc_call_t *call, const uint8_t *d, size_t n)
{
    UNPACK_OR_FAIL(Inference__RepositoryIndexRequest, q, d, n, call);
    int count = bs_repository_count(bs_core_repository(svc->core)), k = 0;
    Inference__RepositoryIndexResponse__ModelIndex *idx = calloc((size_t)count + 1, sizeof(*idx));
    Inference__RepositoryIndexResponse__ModelIndex **list =
        calloc((size_t)count + 1, sizeof(*list));
    if (idx == NULL || list == NULL) {
        bs_rpc_fail(call, BS_RPC_RESOURCE_EXHAUSTED, "out of memory");
    } else {
        for (int i = 0; i < count; i++) {
            struct bs_repo_model *rm = bs_repository_get(bs_core_repository(svc->core), i);
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

static void reply_block(void *arg, const struct bs_tensor *out)
{
    struct infer *in = arg;
    struct bs_err err;
    uint8_t *buf = NULL;
    size_t len = 0;
    if (in->stream != NULL && encode(in, out, 0, &buf, &len, &err) == 0)
        stream_send(in->stream, buf, len, NULL, NULL, NULL);
    free(buf);
}

static int reply_output(void *arg, const struct bs_tensor *out, struct bs_err *err)
{
    struct infer *in = arg;
    in->req.block_cache = bs_core_block_cache(in->creq);
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
    } else {
        struct bs_core_request cr = {
            .model_name = in->req.model_name,
            .model_version = in->req.model_version,
            .inputs = in->req.inputs,
            .n_inputs = in->req.n_inputs,
            .intermediate = in->req.stream_intermediate,
            .priority = in->req.priority,
            .timeout_us = in->req.timeout_us,
            .deadline_ns = bs_rpc_call_deadline(call),
            .sender_full = bs_rpc_unsent_full(call),
            .seq = in->req.seq,
        };
        rc = bs_core_submit(svc->core, &cr, &core_reply, in, &in->creq, err); /* counted */
    }
    if (rc != 0) {
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

static void on_call(void *arg, bs_rpc_call_t *call, int m, const uint8_t *d, size_t n)
{
    bs_service_t *svc = arg;
    switch ((enum bs_service_method)m) {
    case BS_SVC_SERVER_LIVE:
        on_server_live(svc, call);
        break;
    case BS_SVC_SERVER_READY:
        on_server_ready(svc, call);
        break;
    case BS_SVC_MODEL_READY:
        on_model_ready(svc, call, d, n);
        break;
    case BS_SVC_SERVER_METADATA:
        on_server_metadata(svc, call);
        break;
    case BS_SVC_MODEL_METADATA:
        on_model_metadata(svc, call, d, n);
        break;
    case BS_SVC_MODEL_INFER:
        on_model_infer(svc, call, d, n);
        break;
    case BS_SVC_MODEL_CONFIG:
        on_model_config(svc, call, d, n);
        break;
    case BS_SVC_MODEL_STATISTICS:
        on_model_statistics(svc, call, d, n);
        break;
    case BS_SVC_REPOSITORY_INDEX:
        on_repository_index(svc, call, d, n);
        break;
    default:
        bs_rpc_fail(call, BS_RPC_UNIMPLEMENTED, "not a unary method");
        break;
    }
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
    free(svc);
}
