/* Denoising sequences and their block caches (see sequences.h).
 *
 * Sequences sit in a hash table by (model, id) and in one list in order of
 * last use (least recent first), which is both the eviction order and the
 * order idle sequences expire in (per-model idle times differ, so expiry
 * walks the whole list; there are few sequences). Each holds at most one
 * cache; its reservation, bs_block_cache_bytes_for its tokens, counts
 * against the budget from the refresh that asks for it until it is evicted
 * or the sequence ends. */
#include "sequences.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_BUCKETS 256

struct bs_seq {
    bs_seq_t *hnext;       /* hash chain */
    bs_seq_t *prev, *next; /* use order */
    bs_model_t *model;
    uint64_t id;
    struct bs_seq_model settings;
    int64_t calls;  /* calls begun */
    int64_t tokens; /* the tokens its cache holds (-1: none yet) */
    int n_dims;     /* ... and the main input's shape they came in */
    int64_t ne[BS_MAX_DIMS];
    bs_block_cache_t *cache; /* NULL: none (or evicted) */
    size_t reserved;         /* bytes counted for cache */
    bool busy;               /* a call is running */
    bool end_after;          /* the running call carries sequence_end */
    enum bs_cache_mode mode; /* the running call's */
    uint64_t last_ns;
};

/* Counters of one model. */
struct model_stats {
    const bs_model_t *model;
    struct bs_seq_stats s;
};

struct bs_seqs {
    bs_seq_t *bucket[N_BUCKETS];
    bs_seq_t *lru, *lru_tail; /* least recently used first */
    size_t budget, used;
    struct model_stats *models;
    int n_models, cap_models;
    void (*release)(void *arg, bs_block_cache_t *cache); /* NULL: free at once */
    void *release_arg;
    bool freeing; /* bs_seqs_free: at once */
};

static size_t hash(const bs_model_t *model, uint64_t id)
{
    uint64_t h = (uint64_t)(uintptr_t)model * 0x9e3779b97f4a7c15ull ^ id * 0xff51afd7ed558ccdull;
    return (size_t)(h >> 32) % N_BUCKETS;
}

int bs_seqs_init(bs_seqs_t **sp, size_t budget, struct bs_err *err)
{
    *sp = calloc(1, sizeof(**sp));
    if (*sp == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    (*sp)->budget = budget;
    return 0;
}

static struct bs_seq_stats *stats_of(bs_seqs_t *s, const bs_model_t *model)
{
    for (int i = 0; i < s->n_models; i++)
        if (s->models[i].model == model)
            return &s->models[i].s;
    if (s->n_models == s->cap_models) {
        int cap = s->cap_models ? 2 * s->cap_models : 8;
        struct model_stats *m = realloc(s->models, (size_t)cap * sizeof(*m));
        if (m == NULL)
            return NULL;
        s->models = m;
        s->cap_models = cap;
    }
    struct model_stats *m = &s->models[s->n_models++];
    memset(m, 0, sizeof(*m));
    m->model = model;
    return &m->s;
}

/* Count into model's counters (silently not, out of memory). */
#define COUNT(s, model, field, delta)                                                              \
    do {                                                                                           \
        struct bs_seq_stats *st_ = stats_of((s), (model));                                         \
        if (st_ != NULL)                                                                           \
            st_->field += (delta);                                                                 \
    } while (0)

static void lru_unlink(bs_seqs_t *s, bs_seq_t *q)
{
    if (q->prev != NULL)
        q->prev->next = q->next;
    else
        s->lru = q->next;
    if (q->next != NULL)
        q->next->prev = q->prev;
    else
        s->lru_tail = q->prev;
    q->prev = q->next = NULL;
}

static void lru_push(bs_seqs_t *s, bs_seq_t *q)
{
    q->prev = s->lru_tail;
    q->next = NULL;
    if (s->lru_tail != NULL)
        s->lru_tail->next = q;
    else
        s->lru = q;
    s->lru_tail = q;
}

static bs_seq_t *find(const bs_seqs_t *s, const bs_model_t *model, uint64_t id)
{
    for (bs_seq_t *q = s->bucket[hash(model, id)]; q != NULL; q = q->hnext)
        if (q->model == model && q->id == id)
            return q;
    return NULL;
}

/* Give back q's cache and its reservation. */
static void drop_cache(bs_seqs_t *s, bs_seq_t *q)
{
    if (q->cache != NULL && s->release != NULL && !s->freeing)
        s->release(s->release_arg, q->cache);
    else
        bs_block_cache_free(q->cache);
    q->cache = NULL;
    s->used -= q->reserved;
    COUNT(s, q->model, bytes, -(uint64_t)q->reserved);
    q->reserved = 0;
}

static void seq_free(bs_seqs_t *s, bs_seq_t *q)
{
    bs_seq_t **pp = &s->bucket[hash(q->model, q->id)];
    while (*pp != q)
        pp = &(*pp)->hnext;
    *pp = q->hnext;
    lru_unlink(s, q);
    drop_cache(s, q);
    COUNT(s, q->model, sequences, -(uint64_t)1);
    free(q);
}

void bs_seqs_free(bs_seqs_t *s)
{
    if (s == NULL)
        return;
    s->freeing = true;
    while (s->lru != NULL)
        seq_free(s, s->lru);
    free(s->models);
    free(s);
}

void bs_seqs_set_release(bs_seqs_t *s, void (*fn)(void *arg, bs_block_cache_t *cache), void *arg)
{
    s->release = fn;
    s->release_arg = arg;
}

/* Bytes model's caches hold now. */
static size_t model_bytes(bs_seqs_t *s, const bs_model_t *model)
{
    struct bs_seq_stats *st = stats_of(s, model);
    return st != NULL ? (size_t)st->bytes : 0;
}

/* Make room for `need` more bytes for a cache of q's model, evicting the
 * least recently used idle caches (never q's); false when it cannot. */
static bool make_room(bs_seqs_t *s, bs_seq_t *q, size_t need)
{
    size_t cap = q->settings.cache_bytes;
    if (need > s->budget || (cap != 0 && need > cap))
        return false;
    for (bs_seq_t *v = s->lru, *next; v != NULL; v = next) {
        next = v->next;
        bool over_budget = s->used + need > s->budget;
        bool over_cap = cap != 0 && model_bytes(s, q->model) + need > cap;
        if (!over_budget && !over_cap)
            return true;
        if (v == q || v->busy || v->cache == NULL || (!over_budget && v->model != q->model))
            continue;
        drop_cache(s, v);
        COUNT(s, v->model, evictions, 1);
    }
    return s->used + need <= s->budget && (cap == 0 || model_bytes(s, q->model) + need <= cap);
}

/* How messages name sequence p: the client's string, or its number. */
static const char *seq_name(const struct bs_seq_params *p, char buf[BS_SEQ_NAME_BYTES])
{
    if (p->name[0] != '\0')
        return p->name;
    snprintf(buf, BS_SEQ_NAME_BYTES, "%llu", (unsigned long long)p->id);
    return buf;
}

static int check_params(const bs_model_t *model, const struct bs_seq_params *p, struct bs_err *err)
{
    if (p->cache_interval < 0)
        return bs_err_set(err, BS_EINVAL, "block_cache_interval %lld: must be 1 or more",
                          (long long)p->cache_interval);
    if (p->id == 0 && (p->start || p->end))
        return bs_err_set(err, BS_EINVAL,
                          "sequence_start or sequence_end needs a sequence_id (not 0)");
    if (p->id == 0 && p->cache_interval > 1)
        return bs_err_set(err, BS_EINVAL,
                          "block_cache_interval %lld needs a sequence: give a sequence_id",
                          (long long)p->cache_interval);
    if (p->id == 0 && p->given)
        return bs_err_set(err, BS_EINVAL, "sequence_id 0 is not a sequence (use 1 or more)");
    if (p->cache_interval > 1 && !bs_model_cacheable(model))
        return bs_err_set(err, BS_EINVAL,
                          "block_cache_interval: this model has no transformer blocks to cache");
    return 0;
}

static bool same_shape(const bs_seq_t *q, const struct bs_tensor *t)
{
    return q->n_dims == t->n_dims && memcmp(q->ne, t->ne, sizeof(int64_t) * (size_t)t->n_dims) == 0;
}

/* The error for a call whose main input shape differs from the sequence's
 * earlier calls'. */
static int shape_changed(const bs_seq_t *q, const struct bs_seq_params *p,
                         const struct bs_named_tensor *main, struct bs_err *err)
{
    char nb[BS_SEQ_NAME_BYTES], was[96], now[96];
    struct bs_tensor before = bs_tensor_make(BS_TYPE_F32, q->n_dims, q->ne, NULL);
    return bs_err_set(err, BS_EINVAL,
                      "sequence %s: %s of shape %s where its earlier calls had %s (a "
                      "sequence's shape must stay fixed while it caches blocks)",
                      seq_name(p, nb), main->name, bs_tensor_shape_str(&main->t, now, sizeof(now)),
                      bs_tensor_shape_str(&before, was, sizeof(was)));
}

/* Decide the call's mode and make its cache ready for it. */
static int plan_call(bs_seqs_t *s, bs_seq_t *q, bs_model_t *model, const struct bs_seq_params *p,
                     const struct bs_named_tensor *main, struct bs_seq_call *call,
                     struct bs_err *err)
{
    int64_t n = p->cache_interval, tokens = bs_model_tokens(model, main, 1);
    call->cached = n > 1;
    if (n <= 1)
        return 0; /* exact, nothing stored */
    /* the whole shape, not only the tokens: [2, 20, D] and [1, 40, D] hold
     * as many rows, which would be reused for other tokens */
    if (q->tokens >= 0 && !same_shape(q, &main->t))
        return shape_changed(q, p, main, err);
    bool due = call->index % n == 0;
    if (!due && q->cache != NULL) {
        call->mode = BS_CACHE_REUSE;
        call->cache = q->cache;
        return 0;
    }
    call->evicted = !due; /* a reuse was due: its cache is gone */
    size_t need = bs_block_cache_bytes_for(model, tokens);
    if (q->cache == NULL) {
        if (!make_room(s, q, need))
            return 0; /* no room even after evicting: exact, nothing stored */
        int rc = bs_block_cache_new(&q->cache, model, err);
        if (rc != 0)
            return rc;
        q->reserved = need;
        s->used += need;
        COUNT(s, model, bytes, need);
    }
    q->tokens = tokens;
    q->n_dims = main->t.n_dims;
    memcpy(q->ne, main->t.ne, sizeof(q->ne));
    call->mode = BS_CACHE_REFRESH;
    call->cache = q->cache;
    return 0;
}

int bs_seqs_begin(bs_seqs_t *s, bs_model_t *model, const struct bs_seq_model *sm,
                  const struct bs_seq_params *p, const struct bs_named_tensor *main, uint64_t now,
                  bs_seq_t **seqp, struct bs_seq_call *call, struct bs_err *err)
{
    char nb[BS_SEQ_NAME_BYTES];
    memset(call, 0, sizeof(*call));
    *seqp = NULL;
    int rc = check_params(model, p, err);
    if (rc != 0 || p->id == 0)
        return rc;
    bs_seq_t *q = find(s, model, p->id);
    if (q != NULL && q->busy) {
        *seqp = q;
        return 1;
    }
    if (q == NULL && !p->start)
        return bs_err_set(err, BS_EINVAL,
                          "sequence %s is not known (never started, ended, or idle past "
                          "max_sequence_idle_microseconds): start it with sequence_start",
                          seq_name(p, nb));
    if (q != NULL && p->start) { /* a new start: the old state goes */
        drop_cache(s, q);
        q->calls = 0;
        q->tokens = -1;
    }
    bool created = q == NULL;
    if (created) {
        if ((q = calloc(1, sizeof(*q))) == NULL)
            return bs_err_set(err, BS_ENOMEM, "out of memory");
        q->model = model;
        q->id = p->id;
        q->tokens = -1;
        size_t h = hash(model, p->id);
        q->hnext = s->bucket[h];
        s->bucket[h] = q;
        lru_push(s, q);
        COUNT(s, model, sequences, 1);
    }
    q->settings = *sm;
    call->index = q->calls;
    if ((rc = plan_call(s, q, model, p, main, call, err)) != 0) {
        if (created)
            seq_free(s, q);
        return rc;
    }
    if (call->mode == BS_CACHE_REUSE)
        COUNT(s, model, hits, 1);
    else if (call->mode == BS_CACHE_REFRESH)
        COUNT(s, model, refreshes, 1);
    q->calls++;
    q->busy = true;
    q->end_after = p->end;
    q->mode = call->mode;
    q->last_ns = now;
    lru_unlink(s, q);
    lru_push(s, q);
    *seqp = q;
    return 0;
}

void bs_seqs_finish(bs_seqs_t *s, bs_seq_t *q, int rc, uint64_t now)
{
    if (q == NULL)
        return;
    q->busy = false;
    q->last_ns = now;
    if (rc != 0 && q->mode == BS_CACHE_REFRESH)
        drop_cache(s, q); /* it holds nothing valid: the next call refreshes */
    if (q->end_after)
        seq_free(s, q);
}

int64_t bs_seqs_expire(bs_seqs_t *s, uint64_t now)
{
    int64_t next = INT64_MAX;
    for (bs_seq_t *q = s->lru, *n; q != NULL; q = n) {
        n = q->next;
        int64_t idle_us =
            q->settings.max_idle_us > 0 ? q->settings.max_idle_us : BS_SEQ_DEFAULT_IDLE_US;
        /* saturating: a huge idle time means never, not a time in the past */
        int64_t at = bs_deadline_after_us((int64_t)q->last_ns, idle_us);
        if (q->busy)
            continue;
        if (at <= (int64_t)now) {
            COUNT(s, q->model, expired, 1);
            seq_free(s, q);
        } else if (at < next) {
            next = at;
        }
    }
    return next;
}

void bs_seqs_drop_model(bs_seqs_t *s, const bs_model_t *model)
{
    for (bs_seq_t *q = s->lru, *n; q != NULL; q = n) {
        n = q->next;
        if (q->model == model)
            seq_free(s, q);
    }
}

void bs_seqs_stats(const bs_seqs_t *s, const bs_model_t *model, struct bs_seq_stats *st)
{
    memset(st, 0, sizeof(*st));
    for (int i = 0; i < s->n_models; i++) {
        const struct bs_seq_stats *m = &s->models[i].s;
        if (model != NULL && s->models[i].model != model)
            continue;
        st->bytes += m->bytes;
        st->sequences += m->sequences;
        st->hits += m->hits;
        st->refreshes += m->refreshes;
        st->evictions += m->evictions;
        st->expired += m->expired;
    }
}
