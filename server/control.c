/* The control plane (control.h): the v2 methods that are not inferences,
 * answered from the inference core and its repository as protobuf-c
 * messages that each front end renders its own way.
 *
 * Thread ownership: everything here runs on the loop thread. */
#include "control.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "grpc_service.pb-c.h"
#include "model_config.pb-c.h"
#include "version.h"

#define BS_SERVER_NAME "blockserve"

struct bs_control {
    bs_core_t *core;
    bs_shm_t *shm;
    const char *device;
};

static struct bs_repo_model *lookup(bs_control_t *ctl, const char *name, const char *version,
                                    bool need_ready, struct bs_err *err)
{
    return bs_core_lookup(ctl->core, name, version, need_ready, err);
}

/* ---- health and metadata --------------------------------------------------- */

static void on_server_live(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                           void *arg)
{
    Inference__ServerLiveResponse r = INFERENCE__SERVER_LIVE_RESPONSE__INIT;
    r.live = true;
    done(arg, 0, NULL, &r.base);
}

static void on_server_ready(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                            void *arg)
{
    Inference__ServerReadyResponse r = INFERENCE__SERVER_READY_RESPONSE__INIT;
    r.ready = bs_core_accepting(ctl->core);
    done(arg, 0, NULL, &r.base);
}

static void on_model_ready(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                           void *arg)
{
    struct bs_err err;
    const Inference__ModelReadyRequest *q = (const Inference__ModelReadyRequest *)req;
    struct bs_repo_model *rm = lookup(ctl, q->name, q->version, false, &err);
    if (rm == NULL) {
        done(arg, err.code, err.msg, NULL);
    } else {
        Inference__ModelReadyResponse r = INFERENCE__MODEL_READY_RESPONSE__INIT;
        r.ready = rm->model != NULL && bs_core_accepting(ctl->core);
        done(arg, 0, NULL, &r.base);
    }
}

static void on_server_metadata(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                               void *arg)
{
    /* Triton's names where Triton has one; binary_tensor_data: the HTTP
     * front end's binary tensors (raw_*_contents on gRPC), as Triton lists it */
    static char *extensions[] = {"model_configuration",
                                 "statistics",
                                 "parameters",
                                 "model_repository",
                                 "sequence",
                                 "streaming",
                                 "schedule_policy",
                                 "health",
                                 "reflection",
                                 "binary_tensor_data",
                                 "system_shared_memory"};
    Inference__ServerMetadataResponse r = INFERENCE__SERVER_METADATA_RESPONSE__INIT;
    r.name = BS_SERVER_NAME;
    r.version = BS_VERSION;
    r.n_extensions = BS_ARRAY_LEN(extensions) - (ctl->shm == NULL); /* the last: shm */
    r.extensions = extensions;
    done(arg, 0, NULL, &r.base);
}

/* The ready versions of model name, lowest first (ModelMetadata's list). */
static size_t ready_versions(bs_control_t *ctl, const char *name, char **out, size_t max)
{
    bs_repository_t *repo = bs_core_repository(ctl->core);
    struct bs_repo_model *v[64];
    size_t n = 0;
    for (int i = 0; i < bs_repository_count(repo) && n < max && n < BS_ARRAY_LEN(v); i++) {
        struct bs_repo_model *rm = bs_repository_get(repo, i);
        if (rm->model != NULL && strcmp(rm->name, name) == 0)
            v[n++] = rm;
    }
    for (size_t i = 1; i < n; i++) /* insertion sort by version */
        for (size_t k = i; k > 0 && v[k - 1]->version > v[k]->version; k--) {
            struct bs_repo_model *t = v[k];
            v[k] = v[k - 1];
            v[k - 1] = t;
        }
    for (size_t i = 0; i < n; i++)
        out[i] = v[i]->version_str;
    return n;
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

static void on_model_metadata(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                              void *arg)
{
    struct bs_err err;
    const Inference__ModelMetadataRequest *q = (const Inference__ModelMetadataRequest *)req;
    struct bs_repo_model *rm = lookup(ctl, q->name, q->version, true, &err);
    if (rm == NULL) {
        done(arg, err.code, err.msg, NULL);
        return;
    }
    Inference__ModelMetadataResponse__TensorMetadata in[BS_MAX_INPUTS], out;
    Inference__ModelMetadataResponse__TensorMetadata *inp[BS_MAX_INPUTS], *outp = &out;
    struct bs_input_spec out_spec = bs_model_output(rm->model);
    out_spec.dtype = rm->serving.out_dtype; /* what requests that do not ask get */
    char *versions[64];
    size_t n_versions = ready_versions(ctl, rm->name, versions, BS_ARRAY_LEN(versions));
    int n_in = bs_model_n_inputs(rm->model);
    for (int i = 0; i < n_in && i < BS_MAX_INPUTS; i++) {
        fill_tensor_meta(&in[i], bs_model_input(rm->model, i));
        inp[i] = &in[i];
    }
    fill_tensor_meta(&out, &out_spec);
    Inference__ModelMetadataResponse r = INFERENCE__MODEL_METADATA_RESPONSE__INIT;
    r.name = rm->name;
    r.n_versions = n_versions;
    r.versions = versions;
    r.platform = "blockserve";
    r.n_inputs = (size_t)n_in;
    r.inputs = inp;
    r.n_outputs = 1;
    r.outputs = &outp;
    done(arg, 0, NULL, &r.base);
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

static void on_model_config(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                            void *arg)
{
    struct bs_err err;
    const Inference__ModelConfigRequest *q = (const Inference__ModelConfigRequest *)req;
    struct bs_repo_model *rm = lookup(ctl, q->name, q->version, true, &err);
    if (rm == NULL) {
        done(arg, err.code, err.msg, NULL);
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
    out.data_type = data_type_of(sc->out_dtype); /* serving output_datatype (FP32 unless set) */
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
    done(arg, 0, NULL, &r.base);
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
    s->ms.version = (char *)rm->version_str;
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

static void on_model_statistics(bs_control_t *ctl, const ProtobufCMessage *req,
                                bs_control_done done, void *arg)
{
    struct bs_err err;
    const Inference__ModelStatisticsRequest *q = (const Inference__ModelStatisticsRequest *)req;
    int count = bs_repository_count(bs_core_repository(ctl->core)), k = 0, rc = 0;
    struct bs_repo_model *only = NULL;
    if (q->name[0] != '\0' && (only = lookup(ctl, q->name, q->version, true, &err)) == NULL) {
        done(arg, err.code, err.msg, NULL);
        return;
    }
    bool all_versions = only != NULL && q->version[0] == '\0'; /* every version of the model */
    struct stats_msg *sm = calloc((size_t)count + 1, sizeof(*sm));
    Inference__ModelStatistics **list = calloc((size_t)count + 1, sizeof(*list));
    for (int i = 0; sm && list && i < count && rc == 0; i++) {
        struct bs_repo_model *rm = bs_repository_get(bs_core_repository(ctl->core), i);
        if (rm->batcher == NULL ||
            (only != NULL && (all_versions ? strcmp(rm->name, only->name) != 0 : rm != only)))
            continue;
        rc = fill_stats(&sm[k], rm);
        list[k] = &sm[k].ms;
        k++;
    }
    if (sm == NULL || list == NULL || rc != 0) {
        done(arg, BS_ENOMEM, "out of memory", NULL);
    } else {
        Inference__ModelStatisticsResponse r = INFERENCE__MODEL_STATISTICS_RESPONSE__INIT;
        r.n_model_stats = (size_t)k;
        r.model_stats = list;
        done(arg, 0, NULL, &r.base);
    }
    for (int i = 0; sm && i < k; i++)
        free_stats(&sm[i]);
    free(sm);
    free(list);
}

static void on_repository_index(bs_control_t *ctl, const ProtobufCMessage *req,
                                bs_control_done done, void *arg)
{
    const Inference__RepositoryIndexRequest *q = (const Inference__RepositoryIndexRequest *)req;
    bs_repository_t *repo = bs_core_repository(ctl->core);
    int count = bs_repository_index(repo, NULL, 0), k = 0;
    struct bs_repo_row *rows = calloc((size_t)count + 1, sizeof(*rows));
    Inference__RepositoryIndexResponse__ModelIndex *idx = calloc((size_t)count + 1, sizeof(*idx));
    Inference__RepositoryIndexResponse__ModelIndex **list =
        calloc((size_t)count + 1, sizeof(*list));
    if (rows == NULL || idx == NULL || list == NULL) {
        done(arg, BS_ENOMEM, "out of memory", NULL);
    } else {
        count = bs_repository_index(repo, rows, count);
        for (int i = 0; i < count; i++) {
            if (q->ready && strcmp(rows[i].state, "READY") != 0)
                continue;
            inference__repository_index_response__model_index__init(&idx[k]);
            idx[k].name = (char *)rows[i].name;
            idx[k].version = (char *)rows[i].version;
            idx[k].state = (char *)rows[i].state;
            idx[k].reason = (char *)rows[i].reason;
            list[k] = &idx[k];
            k++;
        }
        Inference__RepositoryIndexResponse r = INFERENCE__REPOSITORY_INDEX_RESPONSE__INIT;
        r.n_models = (size_t)k;
        r.models = list;
        done(arg, 0, NULL, &r.base);
    }
    free(rows);
    free(idx);
    free(list);
}

/* ---- system shared memory ---------------------------------------------------- */

/* Storage for SystemSharedMemoryStatus's map, one entry per region. */
struct shm_status_msg {
    Inference__SystemSharedMemoryStatusResponse__RegionStatus *st;
    Inference__SystemSharedMemoryStatusResponse__RegionsEntry *ent, **list;
    size_t n;
};

static void shm_status_add(void *arg, const struct bs_shm_status *st)
{
    struct shm_status_msg *m = arg;
    size_t k = m->n++;
    inference__system_shared_memory_status_response__region_status__init(&m->st[k]);
    m->st[k].name = (char *)st->name; /* valid until shm_status returns: packed before */
    m->st[k].key = (char *)st->key;
    m->st[k].offset = st->offset;
    m->st[k].byte_size = st->byte_size;
    inference__system_shared_memory_status_response__regions_entry__init(&m->ent[k]);
    m->ent[k].key = (char *)st->name;
    m->ent[k].value = &m->st[k];
    m->list[k] = &m->ent[k];
}

static bool shm_served(bs_control_t *ctl, bs_control_done done, void *arg)
{
    if (ctl->shm == NULL)
        done(arg, BS_ENOTIMPL, "system shared memory is not available on this server", NULL);
    return ctl->shm != NULL;
}

static void on_shm_status(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                          void *arg)
{
    const Inference__SystemSharedMemoryStatusRequest *q =
        (const Inference__SystemSharedMemoryStatusRequest *)req;
    if (!shm_served(ctl, done, arg))
        return;
    size_t n = (size_t)bs_shm_count(ctl->shm) + 1;
    struct shm_status_msg m = {.st = calloc(n, sizeof(*m.st)),
                               .ent = calloc(n, sizeof(*m.ent)),
                               .list = calloc(n, sizeof(*m.list))};
    struct bs_err err;
    if (m.st == NULL || m.ent == NULL || m.list == NULL) {
        done(arg, BS_ENOMEM, "out of memory", NULL);
    } else if (bs_shm_status(ctl->shm, q->name, shm_status_add, &m, &err) != 0) {
        done(arg, err.code, err.msg, NULL);
    } else {
        Inference__SystemSharedMemoryStatusResponse r =
            INFERENCE__SYSTEM_SHARED_MEMORY_STATUS_RESPONSE__INIT;
        r.n_regions = m.n;
        r.regions = m.list;
        done(arg, 0, NULL, &r.base);
    }
    free(m.st);
    free(m.ent);
    free(m.list);
}

static void on_shm_register(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                            void *arg)
{
    const Inference__SystemSharedMemoryRegisterRequest *q =
        (const Inference__SystemSharedMemoryRegisterRequest *)req;
    struct bs_err err;
    if (!shm_served(ctl, done, arg))
        return;
    if (bs_shm_register(ctl->shm, q->name, q->key, q->offset, q->byte_size, &err) != 0) {
        done(arg, err.code, err.msg, NULL);
        return;
    }
    Inference__SystemSharedMemoryRegisterResponse r =
        INFERENCE__SYSTEM_SHARED_MEMORY_REGISTER_RESPONSE__INIT;
    done(arg, 0, NULL, &r.base);
}

static void on_shm_unregister(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                              void *arg)
{
    const Inference__SystemSharedMemoryUnregisterRequest *q =
        (const Inference__SystemSharedMemoryUnregisterRequest *)req;
    struct bs_err err;
    if (!shm_served(ctl, done, arg))
        return;
    if (bs_shm_unregister(ctl->shm, q->name, &err) != 0) {
        done(arg, err.code, err.msg, NULL);
        return;
    }
    Inference__SystemSharedMemoryUnregisterResponse r =
        INFERENCE__SYSTEM_SHARED_MEMORY_UNREGISTER_RESPONSE__INIT;
    done(arg, 0, NULL, &r.base);
}

/* CUDA shared memory (Register, Status, Unregister alike): not served. On
 * the CPU backend there is no device memory to read; with the CUDA backend
 * it would need cudaIpcOpenMemHandle behind a backend hook, not built yet.
 * Status answers the same error rather than an empty map, so that a client
 * learns at once that registering cannot work. */
static void on_cuda_shm(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                        void *arg)
{
    char msg[160];
    (void)req;
    if (strcmp(ctl->device, "cuda") != 0)
        snprintf(msg, sizeof(msg),
                 "CUDA shared memory needs the cuda backend; this server computes on %s (use "
                 "system shared memory)",
                 ctl->device);
    else
        snprintf(msg, sizeof(msg),
                 "CUDA shared memory is not implemented by this server yet (it computes on cuda; "
                 "use system shared memory)");
    done(arg, BS_ENOTIMPL, msg, NULL);
}

/* ---- model control ------------------------------------------------------------------ */

/* A load or unload waiting for the repository. */
struct control_wait {
    bs_control_done done;
    void *arg;
    bool unload;
};

static void on_control_done(void *arg, int rc, const char *msg)
{
    struct control_wait *w = arg;
    Inference__RepositoryModelLoadResponse lr = INFERENCE__REPOSITORY_MODEL_LOAD_RESPONSE__INIT;
    Inference__RepositoryModelUnloadResponse ur = INFERENCE__REPOSITORY_MODEL_UNLOAD_RESPONSE__INIT;
    if (rc != 0)
        w->done(w->arg, rc, msg, NULL);
    else
        w->done(w->arg, 0, NULL, w->unload ? &ur.base : &lr.base);
    free(w);
}

/* Triton's load parameters: "config" and "file:<path>" override the
 * model's files, which this server does not do; other keys are ignored. */
static int check_load_parameters(const Inference__RepositoryModelLoadRequest *q, struct bs_err *err)
{
    for (size_t i = 0; i < q->n_parameters; i++) {
        const char *key = q->parameters[i]->key;
        if (strcmp(key, "config") == 0)
            return bs_err_set(err, BS_EINVAL,
                              "load parameter \"config\": overriding the model configuration "
                              "is not supported (edit the model folder's config.json and "
                              "serving.json, then load)");
        if (strncmp(key, "file:", 5) == 0)
            return bs_err_set(err, BS_EINVAL,
                              "load parameter \"file:...\": model files sent with the load "
                              "request are not supported (put them in the model folder)");
    }
    return 0;
}

/* RepositoryModelLoad / Unload: answered once the repository has swapped
 * the model in (or failed to), or unloaded it and freed its memory. */
static void on_repository_control(bs_control_t *ctl, const char *name, bool unload,
                                  bs_control_done done, void *arg)
{
    struct bs_err err = {0};
    bs_repository_t *repo = bs_core_repository(ctl->core);
    struct control_wait *w = calloc(1, sizeof(*w));
    if (w == NULL) {
        done(arg, BS_ENOMEM, "out of memory", NULL);
        return;
    }
    *w = (struct control_wait){done, arg, unload};
    int rc = unload ? bs_repository_unload(repo, name, on_control_done, w, &err)
                    : bs_repository_load(repo, name, on_control_done, w, &err);
    if (rc != 0) {
        free(w);
        done(arg, rc, err.msg, NULL);
    }
}

static void on_repository_load(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                               void *arg)
{
    struct bs_err err = {0};
    const Inference__RepositoryModelLoadRequest *q =
        (const Inference__RepositoryModelLoadRequest *)req;
    if (check_load_parameters(q, &err) != 0)
        done(arg, err.code, err.msg, NULL);
    else
        on_repository_control(ctl, q->model_name, false, done, arg);
}

static void on_repository_unload(bs_control_t *ctl, const ProtobufCMessage *req,
                                 bs_control_done done, void *arg)
{
    const Inference__RepositoryModelUnloadRequest *q =
        (const Inference__RepositoryModelUnloadRequest *)req;
    on_repository_control(ctl, q->model_name, true, done, arg);
}

/* ---- the method table ------------------------------------------------------------ */

typedef void (*method_fn)(bs_control_t *ctl, const ProtobufCMessage *req, bs_control_done done,
                          void *arg);

static const struct {
    const ProtobufCMessageDescriptor *req;
    method_fn fn;
} methods[BS_CTL_METHOD_COUNT] = {
    [BS_CTL_SERVER_LIVE] = {&inference__server_live_request__descriptor, on_server_live},
    [BS_CTL_SERVER_READY] = {&inference__server_ready_request__descriptor, on_server_ready},
    [BS_CTL_MODEL_READY] = {&inference__model_ready_request__descriptor, on_model_ready},
    [BS_CTL_SERVER_METADATA] = {&inference__server_metadata_request__descriptor,
                                on_server_metadata},
    [BS_CTL_MODEL_METADATA] = {&inference__model_metadata_request__descriptor, on_model_metadata},
    [BS_CTL_MODEL_CONFIG] = {&inference__model_config_request__descriptor, on_model_config},
    [BS_CTL_MODEL_STATISTICS] = {&inference__model_statistics_request__descriptor,
                                 on_model_statistics},
    [BS_CTL_REPOSITORY_INDEX] = {&inference__repository_index_request__descriptor,
                                 on_repository_index},
    [BS_CTL_REPOSITORY_LOAD] = {&inference__repository_model_load_request__descriptor,
                                on_repository_load},
    [BS_CTL_REPOSITORY_UNLOAD] = {&inference__repository_model_unload_request__descriptor,
                                  on_repository_unload},
    [BS_CTL_SHM_STATUS] = {&inference__system_shared_memory_status_request__descriptor,
                           on_shm_status},
    [BS_CTL_SHM_REGISTER] = {&inference__system_shared_memory_register_request__descriptor,
                             on_shm_register},
    [BS_CTL_SHM_UNREGISTER] = {&inference__system_shared_memory_unregister_request__descriptor,
                               on_shm_unregister},
    [BS_CTL_CUDA_SHM_STATUS] = {&inference__cuda_shared_memory_status_request__descriptor,
                                on_cuda_shm},
    [BS_CTL_CUDA_SHM_REGISTER] = {&inference__cuda_shared_memory_register_request__descriptor,
                                  on_cuda_shm},
    [BS_CTL_CUDA_SHM_UNREGISTER] = {&inference__cuda_shared_memory_unregister_request__descriptor,
                                    on_cuda_shm},
};

const ProtobufCMessageDescriptor *bs_control_request_desc(enum bs_control_method m)
{
    return (unsigned)m < BS_CTL_METHOD_COUNT ? methods[m].req : NULL;
}

void bs_control_call(bs_control_t *ctl, enum bs_control_method m, const ProtobufCMessage *req,
                     bs_control_done done, void *arg)
{
    if ((unsigned)m >= BS_CTL_METHOD_COUNT || req == NULL || req->descriptor != methods[m].req) {
        done(arg, BS_EINTERNAL, "control method called with a wrong request", NULL);
        return;
    }
    methods[m].fn(ctl, req, done, arg);
}

int bs_control_init(bs_control_t **ctl, const struct bs_control_options *opts, struct bs_err *err)
{
    bs_control_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    c->core = opts->core;
    c->shm = opts->shm;
    c->device = opts->device ? opts->device : "cpu";
    *ctl = c;
    return 0;
}

void bs_control_free(bs_control_t *ctl)
{
    free(ctl);
}
