/* Metrics registry and its Prometheus text rendering (see metrics.h).
 *
 * Thread ownership (STYLE rule 12)
 * - lock guards every bs_metrics_model's values (struct metrics_values) and
 *   the model list. Writers: the loop thread (service, batchers). Reader:
 *   the metrics HTTP thread, which copies every model's values under the
 *   lock and formats the copy after releasing it.
 * - be is read-only after init; bs_backend_memory_info is thread-safe.
 * - Model names and versions are immutable once added. */
#include "metrics.h"

#include "graph.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

static const uint64_t batch_bounds[BS_METRICS_BATCH_BUCKETS] = {1,  2,   4,   8,   16,  32,
                                                                64, 128, 256, 512, 1024};

static const char *const reason_names[BS_METRICS_REASON_COUNT] = {"REJECTED", "CANCELED", "BACKEND",
                                                                  "OTHER"};

struct metrics_values {
    uint64_t success, failure[BS_METRICS_REASON_COUNT];
    uint64_t inferences, executions;
    int64_t pending;
    uint64_t request_ns, queue_ns, compute_input_ns, compute_infer_ns, compute_output_ns;
    uint64_t batch_bucket[BS_METRICS_BATCH_BUCKETS + 1]; /* non-cumulative; last: above all */
    uint64_t batch_sum;
    uint64_t ragged, stopped, blocks_skipped;
    struct bs_metrics_seq seq;
    uint64_t requests[BS_METRICS_MAX_PRIORITY + 1]; /* by priority level (0: no levels) */
};

struct bs_metrics_model {
    bs_metrics_t *m;
    char *name, *version;
    int priority_levels;     /* immutable */
    struct metrics_values v; /* lock */
};

struct bs_metrics {
    uv_mutex_t lock;
    const struct bs_backend *be;
    uint64_t unrouted[BS_METRICS_REASON_COUNT]; /* lock */
    bs_metrics_model_t **models;                /* lock */
    int n_models, cap;
};

int bs_metrics_init(bs_metrics_t **mp, const struct bs_backend *be, struct bs_err *err)
{
    bs_metrics_t *m = calloc(1, sizeof(*m));
    *mp = NULL;
    if (m == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    if (uv_mutex_init(&m->lock) != 0) {
        free(m);
        return bs_err_set(err, BS_EINTERNAL, "cannot create a mutex");
    }
    m->be = be;
    *mp = m;
    return 0;
}

/* The registered model of name and version, or NULL (under the lock). */
static bs_metrics_model_t *model_find(bs_metrics_t *m, const char *name, const char *version)
{
    for (int i = 0; i < m->n_models; i++)
        if (strcmp(m->models[i]->name, name) == 0 && strcmp(m->models[i]->version, version) == 0)
            return m->models[i];
    return NULL;
}

bs_metrics_model_t *bs_metrics_model_add(bs_metrics_t *m, const char *name, const char *version,
                                         int priority_levels)
{
    uv_mutex_lock(&m->lock);
    bs_metrics_model_t *old = model_find(m, name, version);
    uv_mutex_unlock(&m->lock);
    if (old != NULL) /* reloaded: its series go on (the levels it was added with) */
        return old;
    bs_metrics_model_t *mm = calloc(1, sizeof(*mm));
    if (mm == NULL)
        return NULL;
    mm->m = m;
    mm->priority_levels = priority_levels < 0                         ? 0
                          : priority_levels > BS_METRICS_MAX_PRIORITY ? BS_METRICS_MAX_PRIORITY
                                                                      : priority_levels;
    mm->name = strdup(name);
    mm->version = strdup(version);
    uv_mutex_lock(&m->lock);
    if (mm->name != NULL && mm->version != NULL && m->n_models == m->cap) {
        int cap = m->cap ? 2 * m->cap : 8;
        bs_metrics_model_t **p = realloc(m->models, (size_t)cap * sizeof(*p));
        if (p != NULL) {
            m->models = p;
            m->cap = cap;
        }
    }
    bool ok = mm->name != NULL && mm->version != NULL && m->n_models < m->cap;
    if (ok)
        m->models[m->n_models++] = mm;
    uv_mutex_unlock(&m->lock);
    if (!ok) {
        free(mm->name);
        free(mm->version);
        free(mm);
        return NULL;
    }
    return mm;
}

void bs_metrics_success(bs_metrics_model_t *mm, const struct bs_metrics_request *r)
{
    if (mm == NULL)
        return;
    uv_mutex_lock(&mm->m->lock);
    mm->v.success++;
    mm->v.inferences += r->inferences;
    mm->v.request_ns += r->request_ns;
    mm->v.queue_ns += r->queue_ns;
    mm->v.compute_input_ns += r->compute_input_ns;
    mm->v.compute_infer_ns += r->compute_infer_ns;
    mm->v.compute_output_ns += r->compute_output_ns;
    uv_mutex_unlock(&mm->m->lock);
}

void bs_metrics_failure(bs_metrics_model_t *mm, enum bs_metrics_reason reason)
{
    if (mm == NULL || (unsigned)reason >= BS_METRICS_REASON_COUNT)
        return;
    uv_mutex_lock(&mm->m->lock);
    mm->v.failure[reason]++;
    uv_mutex_unlock(&mm->m->lock);
}

void bs_metrics_unrouted(bs_metrics_t *m, enum bs_metrics_reason reason)
{
    if (m == NULL || (unsigned)reason >= BS_METRICS_REASON_COUNT)
        return;
    uv_mutex_lock(&m->lock);
    m->unrouted[reason]++;
    uv_mutex_unlock(&m->lock);
}

void bs_metrics_priority(bs_metrics_model_t *mm, int level)
{
    if (mm == NULL || level < 0 || level > mm->priority_levels)
        return;
    uv_mutex_lock(&mm->m->lock);
    mm->v.requests[level]++;
    uv_mutex_unlock(&mm->m->lock);
}

void bs_metrics_execution(bs_metrics_model_t *mm, uint64_t batch_size)
{
    int b = 0;
    if (mm == NULL)
        return;
    while (b < BS_METRICS_BATCH_BUCKETS && batch_size > batch_bounds[b])
        b++;
    uv_mutex_lock(&mm->m->lock);
    mm->v.executions++;
    mm->v.batch_bucket[b]++;
    mm->v.batch_sum += batch_size;
    uv_mutex_unlock(&mm->m->lock);
}

void bs_metrics_ragged(bs_metrics_model_t *mm)
{
    if (mm == NULL)
        return;
    uv_mutex_lock(&mm->m->lock);
    mm->v.ragged++;
    uv_mutex_unlock(&mm->m->lock);
}

void bs_metrics_stopped(bs_metrics_model_t *mm, uint64_t blocks_skipped)
{
    if (mm == NULL)
        return;
    uv_mutex_lock(&mm->m->lock);
    mm->v.stopped++;
    mm->v.blocks_skipped += blocks_skipped;
    uv_mutex_unlock(&mm->m->lock);
}

void bs_metrics_sequences(bs_metrics_model_t *mm, const struct bs_metrics_seq *s)
{
    if (mm == NULL)
        return;
    uv_mutex_lock(&mm->m->lock);
    mm->v.seq = *s;
    uv_mutex_unlock(&mm->m->lock);
}

void bs_metrics_pending(bs_metrics_model_t *mm, int64_t n)
{
    if (mm == NULL)
        return;
    uv_mutex_lock(&mm->m->lock);
    mm->v.pending = n;
    uv_mutex_unlock(&mm->m->lock);
}

/* ---- rendering ------------------------------------------------------------ */

struct buf {
    char *p;
    size_t len, cap;
    bool oom;
};

static void __attribute__((format(printf, 2, 3))) put(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        if (b->oom)
            return;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = 2 * b->cap + (size_t)n;
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

/* A label value with \, " and newline escaped, as the format requires. */
static void put_label(struct buf *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            put(b, "\\%c", *s);
        else if (*s == '\n')
            put(b, "\\n");
        else
            put(b, "%c", *s);
    }
}

static void put_family(struct buf *b, const char *name, const char *type, const char *help)
{
    put(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* name{model="..",version=".."[,extra]} */
static void put_series(struct buf *b, const char *name, const bs_metrics_model_t *mm,
                       const char *extra)
{
    put(b, "%s{model=\"", name);
    put_label(b, mm->name);
    put(b, "\",version=\"");
    put_label(b, mm->version);
    put(b, "\"%s%s}", extra ? "," : "", extra ? extra : "");
}

/* One value per model of a counter or gauge read from the snapshot. */
typedef uint64_t (*value_fn)(const struct metrics_values *v);

struct family {
    const char *name, *type, *help;
    value_fn get;
};

static uint64_t v_success(const struct metrics_values *v)
{
    return v->success;
}
static uint64_t v_inferences(const struct metrics_values *v)
{
    return v->inferences;
}
static uint64_t v_executions(const struct metrics_values *v)
{
    return v->executions;
}
static uint64_t v_pending(const struct metrics_values *v)
{
    return v->pending > 0 ? (uint64_t)v->pending : 0;
}
static uint64_t v_ragged(const struct metrics_values *v)
{
    return v->ragged;
}
static uint64_t v_stopped(const struct metrics_values *v)
{
    return v->stopped;
}
static uint64_t v_blocks_skipped(const struct metrics_values *v)
{
    return v->blocks_skipped;
}
static uint64_t v_seq_bytes(const struct metrics_values *v)
{
    return v->seq.bytes;
}
static uint64_t v_seq_live(const struct metrics_values *v)
{
    return v->seq.sequences;
}
static uint64_t v_seq_hits(const struct metrics_values *v)
{
    return v->seq.hits;
}
static uint64_t v_seq_refreshes(const struct metrics_values *v)
{
    return v->seq.refreshes;
}
static uint64_t v_seq_evictions(const struct metrics_values *v)
{
    return v->seq.evictions;
}
static uint64_t v_seq_expired(const struct metrics_values *v)
{
    return v->seq.expired;
}
static uint64_t v_request_us(const struct metrics_values *v)
{
    return v->request_ns / 1000;
}
static uint64_t v_queue_us(const struct metrics_values *v)
{
    return v->queue_ns / 1000;
}
static uint64_t v_input_us(const struct metrics_values *v)
{
    return v->compute_input_ns / 1000;
}
static uint64_t v_infer_us(const struct metrics_values *v)
{
    return v->compute_infer_ns / 1000;
}
static uint64_t v_output_us(const struct metrics_values *v)
{
    return v->compute_output_ns / 1000;
}

static const struct family families[] = {
    {"nv_inference_request_success", "counter",
     "Number of successful inference requests, all batch sizes", v_success},
    {"nv_inference_count", "counter",
     "Number of inferences performed by successful requests (samples: a request of batch size B "
     "counts B)",
     v_inferences},
    {"nv_inference_exec_count", "counter",
     "Number of model executions performed (batches; blockserve_batch_size counts their samples)",
     v_executions},
    {"nv_inference_pending_request_count", "gauge",
     "Instantaneous number of requests waiting in the model's queue", v_pending},
    {"nv_inference_request_duration_us", "counter",
     "Cumulative time successful requests took from arrival in the queue to their answer, "
     "in microseconds",
     v_request_us},
    {"nv_inference_queue_duration_us", "counter",
     "Cumulative time successful requests waited in the queue, in microseconds", v_queue_us},
    {"nv_inference_compute_input_duration_us", "counter",
     "Cumulative time successful requests' batches spent gathering inputs, in microseconds",
     v_input_us},
    {"nv_inference_compute_infer_duration_us", "counter",
     "Cumulative time successful requests' batches spent in the forward, in microseconds",
     v_infer_us},
    {"nv_inference_compute_output_duration_us", "counter",
     "Cumulative time successful requests' batches spent splitting outputs, in microseconds",
     v_output_us},
    {"blockserve_ragged_execution_count", "counter",
     "Executions whose requests differed in sequence lengths (packed without padding)", v_ragged},
    {"blockserve_stopped_execution_count", "counter",
     "Executions stopped early because none of their requests was still waiting "
     "(cancelled, or past its deadline)",
     v_stopped},
    {"blockserve_skipped_block_count", "counter",
     "Blocks of a stack left unrun by stopped executions", v_blocks_skipped},
    {"blockserve_block_cache_bytes", "gauge",
     "Bytes the model's denoising sequences hold in block caches now", v_seq_bytes},
    {"blockserve_sequences", "gauge", "Denoising sequences of the model alive now", v_seq_live},
    {"blockserve_block_cache_hit_count", "counter", "Sequence calls that reused their block caches",
     v_seq_hits},
    {"blockserve_block_cache_refresh_count", "counter",
     "Sequence calls with block caching that ran the blocks and stored their outputs",
     v_seq_refreshes},
    {"blockserve_block_cache_eviction_count", "counter",
     "Block caches evicted (least recently used) to make room for a refresh", v_seq_evictions},
    {"blockserve_sequence_expired_count", "counter",
     "Sequences ended by idling past max_sequence_idle_microseconds", v_seq_expired},
};

static void render_models(struct buf *b, bs_metrics_model_t *const *mm,
                          const struct metrics_values *v, int n)
{
    char extra[64];
    put_family(b, "nv_inference_request_failure", "counter",
               "Number of failed inference requests, all batch sizes, by reason (REJECTED, "
               "CANCELED, BACKEND, OTHER)");
    for (int i = 0; i < n; i++)
        for (int r = 0; r < BS_METRICS_REASON_COUNT; r++) {
            snprintf(extra, sizeof(extra), "reason=\"%s\"", reason_names[r]);
            put_series(b, "nv_inference_request_failure", mm[i], extra);
            put(b, " %llu\n", (unsigned long long)v[i].failure[r]);
        }
    for (size_t f = 0; f < BS_ARRAY_LEN(families); f++) {
        put_family(b, families[f].name, families[f].type, families[f].help);
        for (int i = 0; i < n; i++) {
            put_series(b, families[f].name, mm[i], NULL);
            put(b, " %llu\n", (unsigned long long)families[f].get(&v[i]));
        }
    }
    put_family(b, "blockserve_batch_size", "histogram",
               "Samples per execution: the batch sizes the dynamic batcher formed");
    for (int i = 0; i < n; i++) {
        uint64_t cum = 0;
        for (int k = 0; k <= BS_METRICS_BATCH_BUCKETS; k++) {
            cum += v[i].batch_bucket[k];
            if (k < BS_METRICS_BATCH_BUCKETS)
                snprintf(extra, sizeof(extra), "le=\"%llu\"", (unsigned long long)batch_bounds[k]);
            else
                snprintf(extra, sizeof(extra), "le=\"+Inf\"");
            put_series(b, "blockserve_batch_size_bucket", mm[i], extra);
            put(b, " %llu\n", (unsigned long long)cum);
        }
        put_series(b, "blockserve_batch_size_sum", mm[i], NULL);
        put(b, " %llu\n", (unsigned long long)v[i].batch_sum);
        put_series(b, "blockserve_batch_size_count", mm[i], NULL);
        put(b, " %llu\n", (unsigned long long)v[i].executions);
    }
}

/* Requests by priority level: levels 1..N, or one series "0" without levels. */
static void render_priorities(struct buf *b, bs_metrics_model_t *const *mm,
                              const struct metrics_values *v, int n)
{
    char extra[32];
    put_family(b, "blockserve_inference_requests_total", "counter",
               "Inference requests handed to the model's dynamic batcher (queued, or refused "
               "there), by priority level (0: the model has no priority levels)");
    for (int i = 0; i < n; i++)
        for (int lv = mm[i]->priority_levels > 0; lv <= mm[i]->priority_levels; lv++) {
            snprintf(extra, sizeof(extra), "priority=\"%d\"", lv);
            put_series(b, "blockserve_inference_requests_total", mm[i], extra);
            put(b, " %llu\n", (unsigned long long)v[i].requests[lv]);
        }
}

/* Failures of calls that name no served model. */
static void render_unrouted(struct buf *b, const uint64_t *unrouted)
{
    put_family(b, "blockserve_unrouted_request_failure_total", "counter",
               "Inference calls that failed before they could be attributed to a served model "
               "(unknown model or version, a model that failed to load, an unreadable message, "
               "a call cancelled before its message arrived), by reason");
    for (int r = 0; r < BS_METRICS_REASON_COUNT; r++)
        put(b, "blockserve_unrouted_request_failure_total{reason=\"%s\"} %llu\n", reason_names[r],
            (unsigned long long)unrouted[r]);
}

/* GPU memory, only where the backend reports it. */
static void render_memory(struct buf *b, const struct bs_backend *be)
{
    struct bs_backend_memory mem;
    struct bs_err err = {0};
    if (be == NULL || bs_backend_memory_info(be, &mem, &err) != 0)
        return;
    put_family(b, "nv_gpu_memory_total_bytes", "gauge", "GPU total memory, in bytes");
    put(b, "nv_gpu_memory_total_bytes{gpu_uuid=\"");
    put_label(b, mem.device);
    put(b, "\"} %llu\n", (unsigned long long)mem.total_bytes);
    put_family(b, "nv_gpu_memory_used_bytes", "gauge", "GPU used memory, in bytes");
    put(b, "nv_gpu_memory_used_bytes{gpu_uuid=\"");
    put_label(b, mem.device);
    put(b, "\"} %llu\n", (unsigned long long)mem.used_bytes);
}

/* Launch graphs (engine/graph.h), only where they are on: process-wide
 * counts, so an operator sees whether blocks replay graphs or keep running
 * eagerly. */
static void render_graphs(struct buf *b, const struct bs_backend *be)
{
    if (be == NULL || be->graphs == BS_GRAPHS_OFF)
        return;
    struct bs_graph_stats s;
    bs_graph_stats(&s);
    put_family(b, "blockserve_graph_block_runs_total", "counter",
               "Blocks run with launch graphs on, by how: eager (a warm-up, or a key whose "
               "capture failed), captured (captured, then launched), launched (a graph made "
               "earlier), reran (a capture or comparison abandoned, the block run eagerly)");
    const char *how[] = {"eager", "captured", "launched", "reran"};
    const uint64_t n[] = {s.eager, s.captured, s.launched, s.reran};
    for (int i = 0; i < 4; i++)
        put(b, "blockserve_graph_block_runs_total{how=\"%s\"} %llu\n", how[i],
            (unsigned long long)n[i]);
    put_family(b, "blockserve_graphs_freed_total", "counter",
               "Launch graphs released: evicted, made stale by moved memory, or their block's ops "
               "changed");
    put(b, "blockserve_graphs_freed_total %llu\n", (unsigned long long)s.freed);
}

int bs_metrics_render(bs_metrics_t *m, char **text, size_t *len, struct bs_err *err)
{
    struct buf b = {0};
    bs_metrics_model_t **mm = NULL;
    struct metrics_values *v = NULL;
    uint64_t unrouted[BS_METRICS_REASON_COUNT];
    int n;
    *text = NULL;
    *len = 0;
    uv_mutex_lock(&m->lock);
    n = m->n_models;
    mm = malloc(((size_t)n + 1) * sizeof(*mm));
    v = malloc(((size_t)n + 1) * sizeof(*v));
    for (int i = 0; mm != NULL && v != NULL && i < n; i++) {
        mm[i] = m->models[i];
        v[i] = m->models[i]->v;
    }
    memcpy(unrouted, m->unrouted, sizeof(unrouted));
    uv_mutex_unlock(&m->lock);
    b.cap = 4096;
    b.p = malloc(b.cap);
    b.oom = b.p == NULL || mm == NULL || v == NULL;
    if (!b.oom) {
        b.p[0] = '\0';
        render_models(&b, mm, v, n);
        render_priorities(&b, mm, v, n);
        render_unrouted(&b, unrouted);
        render_memory(&b, m->be);
        render_graphs(&b, m->be);
    }
    free(mm);
    free(v);
    if (b.oom) {
        free(b.p);
        return bs_err_set(err, BS_ENOMEM, "out of memory rendering metrics");
    }
    *text = b.p;
    *len = b.len;
    return 0;
}

void bs_metrics_free(bs_metrics_t *m)
{
    if (m == NULL)
        return;
    for (int i = 0; i < m->n_models; i++) {
        free(m->models[i]->name);
        free(m->models[i]->version);
        free(m->models[i]);
    }
    free(m->models);
    uv_mutex_destroy(&m->lock);
    free(m);
}
