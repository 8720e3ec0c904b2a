/* Launch graphs for parts of a forward: the per-thread caches, the proxy
 * backend that records or compares a part's ops, and the emulation that
 * replays a recording through the backend's ops (graph.h says what a part
 * goes through; docs/design.md, "Launch graphs", why results cannot change).
 *
 * Threads (STYLE rule 12): everything here but the stats belongs to the
 * calling thread: its caches (a pthread key, freed at thread exit without
 * backend calls), and the proxy of the part it runs (on its stack). The
 * stats are process-wide atomics. */
#include "graph.h"

#include "modules.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Keys per backend per thread, least recently used out first: room for a
 * 28-block trunk at several batch shapes (a cyclic run of more keys than
 * this would miss every time). */
#define GRAPH_ENTRIES 256
#define GRAPH_CACHES  4  /* backends a thread keeps caches of */
/* Eager runs of a BROKEN key before its capture is tried again: a capture
 * can break for a passing reason (another thread's device-wide wait, a
 * scratch growth) that moves no epoch. */
#define GRAPH_RETRY 64

enum entry_state {
    ST_NEW,    /* not seen (or forgotten) */
    ST_WARM,   /* ran eagerly once: capture next */
    ST_READY,  /* a graph (a recording, emulating) is made */
    ST_BROKEN, /* runs eagerly until the backend's epoch changes, or GRAPH_RETRY runs */
};

enum op_code {
    OP_LINEAR = 1,
    OP_LINEAR_ACT,
    OP_LAYER_NORM,
    OP_GROUP_NORM,
    OP_ACT,
    OP_GLU,
    OP_ATTENTION,
    OP_ADD,
    OP_TRANSPOSE,
    OP_GET_ROWS,
};

/* One recorded op to replay (BS_GRAPHS_EMULATE): its tensors by value and
 * its scalars; pointers are rebuilt from these at replay. */
struct eop {
    enum op_code op;
    struct bs_tensor t[6]; /* y/o, x/q, then w, b | gamma, beta, scale, shift | k, v, mask | gate */
    unsigned has;          /* which of t are present (bit i: t[i]) */
    float f;               /* beta, alpha, eps or attention scale */
    int64_t n;             /* rows_per_sample, get_rows' n */
    enum bs_act act;
    bool gated;
    int groups, slot;
    struct bs_attn_params ap; /* scalars only: mask rebuilt, offsets NULL */
};

/* An index slot of get_rows: n int64_t the graph reads when it runs (the
 * backend's with ON, the engine's own emulating). */
struct slot {
    int64_t *idx;
    int64_t n;
};

struct entry {
    unsigned char key[BS_GRAPH_KEY_MAX];
    size_t key_bytes;
    uint64_t hash; /* of key: the lookup compares it first */
    enum entry_state state;
    uint64_t epoch; /* graph_epoch() at capture (READY) or break (BROKEN) */
    uint64_t used;  /* LRU tick */
    int broken_runs; /* BROKEN: eager runs since */
    struct bs_backend_graph *g;
    unsigned char *rec; /* the ops' serialised arguments, in order */
    size_t rec_len, rec_cap;
    int n_ops;
    struct slot *slots;
    int n_slots, cap_slots;
    struct eop *eops;
    int n_eops, cap_eops;
};

struct gcache {
    uint64_t serial;
    uint64_t used;
    struct entry *e[GRAPH_ENTRIES];
    int n;
};

struct tls {
    struct gcache c[GRAPH_CACHES];
    int n;
    uint64_t tick;
    bool busy; /* inside bs__graph_run: a nested part runs directly */
};

enum proxy_mode { P_RECORD, P_COMPARE };

/* The backend a part sees while its ops are recorded or compared. */
struct proxy {
    struct bs_backend be; /* a copy of the real one, iface and ctx ours */
    struct bs_backend_i iface;
    const struct bs_backend *real;
    struct entry *e;
    enum proxy_mode mode;
    bool emulate;
    size_t pos;    /* P_COMPARE: bytes of the recording matched */
    int op, slot;  /* ops and slots so far */
    int rc;        /* the first failure (an op refused, failed or differing) */
    bool mismatch; /* P_COMPARE: an op differed from the recording */
};

static atomic_uint_least64_t st_eager, st_captured, st_launched, st_reran, st_freed;

void bs_graph_stats(struct bs_graph_stats *s)
{
    s->eager = atomic_load(&st_eager);
    s->captured = atomic_load(&st_captured);
    s->launched = atomic_load(&st_launched);
    s->reran = atomic_load(&st_reran);
    s->freed = atomic_load(&st_freed);
}

/* ---- caches ------------------------------------------------------------- */

static pthread_key_t tls_key;
static pthread_once_t tls_once = PTHREAD_ONCE_INIT;

/* Forget the recording and slots (host memory only: the backend's slots
 * belong to its graph). */
static void entry_clear(struct entry *e, bool emulate_slots)
{
    if (emulate_slots)
        for (int i = 0; i < e->n_slots; i++)
            free(e->slots[i].idx);
    e->rec_len = 0;
    e->n_ops = 0;
    e->n_slots = 0;
    e->n_eops = 0;
}

static void entry_free(struct entry *e)
{
    /* an emulated graph's slots are the engine's; a backend's are its own */
    entry_clear(e, e->g == NULL);
    free(e->rec);
    free(e->slots);
    free(e->eops);
    free(e);
}

static void cache_clear(struct gcache *c)
{
    for (int i = 0; i < c->n; i++)
        entry_free(c->e[i]);
    c->n = 0;
}

static void tls_destroy(void *arg)
{
    struct tls *t = arg;
    for (int i = 0; i < t->n; i++)
        cache_clear(&t->c[i]);
    free(t);
}

static void tls_make_key(void)
{
    (void)pthread_key_create(&tls_key, tls_destroy);
}

static struct tls *tls_get(void)
{
    pthread_once(&tls_once, tls_make_key);
    struct tls *t = pthread_getspecific(tls_key);
    if (t == NULL && (t = calloc(1, sizeof(*t))) != NULL && pthread_setspecific(tls_key, t) != 0) {
        free(t);
        t = NULL;
    }
    return t;
}

/* The thread's cache for backend serial (made, pushing out the least
 * recently used one's host memory when all are taken). */
static struct gcache *cache_get(struct tls *t, uint64_t serial)
{
    struct gcache *c = NULL;
    for (int i = 0; i < t->n && c == NULL; i++)
        if (t->c[i].serial == serial)
            c = &t->c[i];
    if (c == NULL && t->n < GRAPH_CACHES) {
        c = &t->c[t->n++];
    } else if (c == NULL) {
        c = &t->c[0];
        for (int i = 1; i < t->n; i++)
            if (t->c[i].used < c->used)
                c = &t->c[i];
        cache_clear(c); /* another backend's: no graph_free (its free does that) */
    }
    if (c->serial != serial) {
        c->serial = serial;
        c->n = 0;
    }
    c->used = ++t->tick;
    return c;
}

/* Release an entry's graph (the backend's, or the recording emulating). */
static void entry_drop_graph(struct entry *e, const struct bs_backend *be)
{
    if (e->g != NULL) {
        be->iface->graph_free(be->ctx, e->g);
        e->g = NULL;
        entry_clear(e, false);
    } else {
        entry_clear(e, true);
    }
}

/* The entry of key in c, made NEW when missing (the least recently used
 * one evicted when the cache is full: be is its backend, alive). */
/* FNV-1a of the key's bytes. */
static uint64_t key_hash(const void *key, size_t n)
{
    const unsigned char *p = key;
    uint64_t h = 0xcbf29ce484222325u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3u;
    return h;
}

static struct entry *entry_get(struct tls *t, struct gcache *c, const struct bs_backend *be,
                               const void *key, size_t key_bytes)
{
    struct entry *e = NULL;
    uint64_t h = key_hash(key, key_bytes);
    for (int i = 0; i < c->n && e == NULL; i++)
        if (c->e[i]->hash == h && c->e[i]->key_bytes == key_bytes &&
            memcmp(c->e[i]->key, key, key_bytes) == 0)
            e = c->e[i];
    if (e == NULL && c->n == GRAPH_ENTRIES) {
        int old = 0;
        for (int i = 1; i < c->n; i++)
            if (c->e[i]->used < c->e[old]->used)
                old = i;
        e = c->e[old];
        if (e->state == ST_READY)
            atomic_fetch_add(&st_freed, 1);
        entry_drop_graph(e, be);
        e->state = ST_NEW;
    } else if (e == NULL) {
        if ((e = calloc(1, sizeof(*e))) == NULL)
            return NULL;
        c->e[c->n++] = e;
    }
    if (e->key_bytes != key_bytes || memcmp(e->key, key, key_bytes) != 0) {
        memcpy(e->key, key, key_bytes);
        e->key_bytes = key_bytes;
        e->hash = h;
        e->state = ST_NEW;
    }
    e->used = ++t->tick;
    return e;
}

/* ---- recording and comparing ------------------------------------------ */

static void put(struct proxy *p, const void *v, size_t n)
{
    struct entry *e = p->e;
    if (p->rc != 0)
        return;
    if (p->mode == P_COMPARE) {
        if (p->pos + n > e->rec_len || memcmp(e->rec + p->pos, v, n) != 0)
            p->mismatch = true;
        p->pos += n;
        return;
    }
    if (e->rec_len + n > e->rec_cap) {
        size_t cap = e->rec_cap ? 2 * e->rec_cap : 1024;
        while (cap < e->rec_len + n)
            cap *= 2;
        unsigned char *r = realloc(e->rec, cap);
        if (r == NULL) {
            p->rc = BS_ENOMEM;
            return;
        }
        e->rec = r;
        e->rec_cap = cap;
    }
    memcpy(e->rec + e->rec_len, v, n);
    e->rec_len += n;
}

static void put_i32(struct proxy *p, int32_t v)
{
    put(p, &v, sizeof(v));
}

static void put_i64(struct proxy *p, int64_t v)
{
    put(p, &v, sizeof(v));
}

static void put_f32(struct proxy *p, float v)
{
    put(p, &v, sizeof(v));
}

/* A tensor field by field (no padding bytes), or a "none" marker. */
static void put_tensor(struct proxy *p, const struct bs_tensor *t)
{
    unsigned char present = t != NULL;
    put(p, &present, 1);
    if (t == NULL)
        return;
    put_i32(p, (int32_t)t->type);
    put_i32(p, (int32_t)t->n_dims);
    for (int i = 0; i < t->n_dims && i < BS_MAX_DIMS; i++) {
        put_i64(p, t->ne[i]);
        put_i64(p, t->nb[i]);
    }
    uintptr_t a = (uintptr_t)t->data;
    put(p, &a, sizeof(a));
}

static void put_norm(struct proxy *p, const struct bs_norm_params *np)
{
    put_f32(p, np->eps);
    put_tensor(p, np->gamma);
    put_tensor(p, np->beta);
    put_tensor(p, np->scale);
    put_tensor(p, np->shift);
    put_i64(p, np->rows_per_sample);
    put_i32(p, np->groups);
}

static void put_attn(struct proxy *p, const struct bs_attn_params *ap)
{
    put_i64(p, ap->batch);
    put_i64(p, ap->lq);
    put_i64(p, ap->lk);
    put_i32(p, ap->heads);
    put_i32(p, ap->head_dim);
    put_f32(p, ap->scale);
    put_tensor(p, ap->mask);
    put_i32(p, (int32_t)ap->compute);
    unsigned char pq = ap->mask_per_query;
    put(p, &pq, 1);
}

static const char *const op_names[] = {
    [OP_LINEAR] = "linear",
    [OP_LINEAR_ACT] = "linear_act",
    [OP_LAYER_NORM] = "layer_norm",
    [OP_GROUP_NORM] = "group_norm",
    [OP_ACT] = "act",
    [OP_GLU] = "glu",
    [OP_ATTENTION] = "attention",
    [OP_ADD] = "add",
    [OP_TRANSPOSE] = "transpose",
    [OP_GET_ROWS] = "get_rows",
};

/* After an op's arguments were put: 0 where the op may go on (record it,
 * or it matched), else its failure (with a message in err). */
static int op_checked(struct proxy *p, enum op_code op, struct bs_err *err)
{
    p->op++;
    if (p->rc == BS_ENOMEM)
        return bs_err_set(err, BS_ENOMEM, "launch graph: out of memory recording op %d (%s)", p->op,
                          op_names[op]);
    if (p->rc != 0)
        return p->rc; /* an op before failed: the part should have stopped */
    if (p->mismatch)
        return p->rc = bs_err_set(err, BS_EUNSUPP,
                                  "launch graph: op %d (%s) differs from the recording", p->op,
                                  op_names[op]);
    return 0;
}

/* An op the recording cannot hold: the part runs eagerly instead. */
static int refuse(struct proxy *p, const char *what, struct bs_err *err)
{
    if (p->mode == P_COMPARE)
        p->mismatch = true;
    p->rc = bs_err_set(err, BS_EUNSUPP, "launch graph: %s cannot run inside a graph", what);
    return p->rc;
}

/* Emulating: the next op to replay (NULL with p->rc set when out of memory). */
static struct eop *eop_push(struct proxy *p, enum op_code op)
{
    struct entry *e = p->e;
    if (e->n_eops == e->cap_eops) {
        int cap = e->cap_eops ? 2 * e->cap_eops : 32;
        struct eop *n = realloc(e->eops, (size_t)cap * sizeof(*n));
        if (n == NULL) {
            p->rc = BS_ENOMEM;
            return NULL;
        }
        e->eops = n;
        e->cap_eops = cap;
    }
    struct eop *o = &e->eops[e->n_eops++];
    memset(o, 0, sizeof(*o));
    o->op = op;
    return o;
}

static void eop_tensor(struct eop *o, int i, const struct bs_tensor *t)
{
    if (t != NULL) {
        o->t[i] = *t;
        o->has |= 1u << i;
    }
}

static const struct bs_tensor *eop_get(const struct eop *o, int i)
{
    return o->has & (1u << i) ? &o->t[i] : NULL;
}

/* A recorded op's end: P_RECORD runs it through the real backend (which
 * captures it) or keeps it for the replay; P_COMPARE queues nothing. op_rc
 * is the real op's result where it ran. */
static int op_done(struct proxy *p, int op_rc)
{
    if (op_rc != 0 && p->rc == 0)
        p->rc = op_rc;
    return op_rc;
}

#define PROXY(ctx) ((struct proxy *)(ctx))
#define REAL(p)    ((p)->real->iface)
#define RCTX(p)    ((p)->real->ctx)

static int px_linear(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                     const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                     struct bs_err *err)
{
    struct proxy *p = PROXY(ctx);
    put_i32(p, OP_LINEAR);
    put_tensor(p, y), put_tensor(p, x), put_tensor(p, w), put_tensor(p, b), put_f32(p, beta);
    int rc = op_checked(p, OP_LINEAR, err);
    if (rc != 0 || p->mode == P_COMPARE)
        return rc;
    if (!p->emulate)
        return op_done(p, REAL(p)->linear(RCTX(p), y, x, w, b, beta, err));
    struct eop *o = eop_push(p, OP_LINEAR);
    if (o == NULL)
        return bs_err_set(err, BS_ENOMEM, "launch graph: out of memory");
    eop_tensor(o, 0, y), eop_tensor(o, 1, x), eop_tensor(o, 2, w), eop_tensor(o, 3, b);
    o->f = beta;
    return 0;
}

static int px_linear_act(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                         const struct bs_tensor *w, const struct bs_tensor *b, enum bs_act a,
                         bool gated, struct bs_err *err)
{
    struct proxy *p = PROXY(ctx);
    put_i32(p, OP_LINEAR_ACT);
    put_tensor(p, y), put_tensor(p, x), put_tensor(p, w), put_tensor(p, b);
    put_i32(p, (int32_t)a), put_i32(p, gated);
    int rc = op_checked(p, OP_LINEAR_ACT, err);
    if (rc != 0 || p->mode == P_COMPARE)
        return rc;
    if (!p->emulate)
        return op_done(p, REAL(p)->linear_act(RCTX(p), y, x, w, b, a, gated, err));
    struct eop *o = eop_push(p, OP_LINEAR_ACT);
    if (o == NULL)
        return bs_err_set(err, BS_ENOMEM, "launch graph: out of memory");
    eop_tensor(o, 0, y), eop_tensor(o, 1, x), eop_tensor(o, 2, w), eop_tensor(o, 3, b);
    o->act = a;
    o->gated = gated;
    return 0;
}

static int px_norm(struct proxy *p, enum op_code op, struct bs_tensor *y, const struct bs_tensor *x,
                   const struct bs_norm_params *np, struct bs_err *err)
{
    put_i32(p, op);
    put_tensor(p, y), put_tensor(p, x), put_norm(p, np);
    int rc = op_checked(p, op, err);
    if (rc != 0 || p->mode == P_COMPARE)
        return rc;
    if (!p->emulate) {
        if (op == OP_LAYER_NORM)
            return op_done(p, REAL(p)->layer_norm(RCTX(p), y, x, np, err));
        return op_done(p, REAL(p)->group_norm(RCTX(p), y, x, np, err));
    }
    struct eop *o = eop_push(p, op);
    if (o == NULL)
        return bs_err_set(err, BS_ENOMEM, "launch graph: out of memory");
    eop_tensor(o, 0, y), eop_tensor(o, 1, x), eop_tensor(o, 2, np->gamma);
    eop_tensor(o, 3, np->beta), eop_tensor(o, 4, np->scale), eop_tensor(o, 5, np->shift);
    o->f = np->eps;
    o->n = np->rows_per_sample;
    o->groups = np->groups;
    return 0;
}

static int px_layer_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                         const struct bs_norm_params *np, struct bs_err *err)
{
    return px_norm(PROXY(ctx), OP_LAYER_NORM, y, x, np, err);
}

static int px_group_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                         const struct bs_norm_params *np, struct bs_err *err)
{
    return px_norm(PROXY(ctx), OP_GROUP_NORM, y, x, np, err);
}

/* act and glu: y, x and an activation. */
static int px_unary(struct proxy *p, enum op_code op, struct bs_tensor *y,
                    const struct bs_tensor *x, enum bs_act a, struct bs_err *err)
{
    put_i32(p, op);
    put_tensor(p, y), put_tensor(p, x), put_i32(p, (int32_t)a);
    int rc = op_checked(p, op, err);
    if (rc != 0 || p->mode == P_COMPARE)
        return rc;
    if (!p->emulate) {
        if (op == OP_ACT)
            return op_done(p, REAL(p)->act(RCTX(p), y, x, a, err));
        return op_done(p, REAL(p)->glu(RCTX(p), y, x, a, err));
    }
    struct eop *o = eop_push(p, op);
    if (o == NULL)
        return bs_err_set(err, BS_ENOMEM, "launch graph: out of memory");
    eop_tensor(o, 0, y), eop_tensor(o, 1, x);
    o->act = a;
    return 0;
}

static int px_act(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act a,
                  struct bs_err *err)
{
    return px_unary(PROXY(ctx), OP_ACT, y, x, a, err);
}

static int px_glu(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act a,
                  struct bs_err *err)
{
    return px_unary(PROXY(ctx), OP_GLU, y, x, a, err);
}

static int px_attention(void *ctx, struct bs_tensor *o_, const struct bs_tensor *q,
                        const struct bs_tensor *k, const struct bs_tensor *v,
                        const struct bs_attn_params *ap, struct bs_err *err)
{
    struct proxy *p = PROXY(ctx);
    if (ap->q_off != NULL || ap->k_off != NULL || ap->m_off != NULL)
        return refuse(p, "ragged attention", err);
    put_i32(p, OP_ATTENTION);
    put_tensor(p, o_), put_tensor(p, q), put_tensor(p, k), put_tensor(p, v), put_attn(p, ap);
    int rc = op_checked(p, OP_ATTENTION, err);
    if (rc != 0 || p->mode == P_COMPARE)
        return rc;
    if (!p->emulate)
        return op_done(p, REAL(p)->attention(RCTX(p), o_, q, k, v, ap, err));
    struct eop *o = eop_push(p, OP_ATTENTION);
    if (o == NULL)
        return bs_err_set(err, BS_ENOMEM, "launch graph: out of memory");
    eop_tensor(o, 0, o_), eop_tensor(o, 1, q), eop_tensor(o, 2, k), eop_tensor(o, 3, v);
    eop_tensor(o, 4, ap->mask);
    o->ap = *ap;
    o->ap.mask = NULL;
    return 0;
}

static int px_add(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                  const struct bs_tensor *gate, int64_t rows_per_sample, float alpha,
                  struct bs_err *err)
{
    struct proxy *p = PROXY(ctx);
    put_i32(p, OP_ADD);
    put_tensor(p, y), put_tensor(p, x), put_tensor(p, gate);
    put_i64(p, rows_per_sample), put_f32(p, alpha);
    int rc = op_checked(p, OP_ADD, err);
    if (rc != 0 || p->mode == P_COMPARE)
        return rc;
    if (!p->emulate)
        return op_done(p, REAL(p)->add(RCTX(p), y, x, gate, rows_per_sample, alpha, err));
    struct eop *o = eop_push(p, OP_ADD);
    if (o == NULL)
        return bs_err_set(err, BS_ENOMEM, "launch graph: out of memory");
    eop_tensor(o, 0, y), eop_tensor(o, 1, x), eop_tensor(o, 2, gate);
    o->n = rows_per_sample;
    o->f = alpha;
    return 0;
}

static int px_transpose(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                        struct bs_err *err)
{
    struct proxy *p = PROXY(ctx);
    put_i32(p, OP_TRANSPOSE);
    put_tensor(p, y), put_tensor(p, x);
    int rc = op_checked(p, OP_TRANSPOSE, err);
    if (rc != 0 || p->mode == P_COMPARE)
        return rc;
    if (!p->emulate)
        return op_done(p, REAL(p)->transpose(RCTX(p), y, x, err));
    struct eop *o = eop_push(p, OP_TRANSPOSE);
    if (o == NULL)
        return bs_err_set(err, BS_ENOMEM, "launch graph: out of memory");
    eop_tensor(o, 0, y), eop_tensor(o, 1, x);
    return 0;
}

/* A new slot of n indices for the recording: the backend's (graph_rows,
 * which captures the gather) or, emulating, the engine's. */
static int slot_add(struct proxy *p, struct bs_tensor *y, const struct bs_tensor *table, int64_t n,
                    struct bs_err *err)
{
    struct entry *e = p->e;
    if (e->n_slots == e->cap_slots) {
        int cap = e->cap_slots ? 2 * e->cap_slots : 4;
        struct slot *s = realloc(e->slots, (size_t)cap * sizeof(*s));
        if (s == NULL)
            return op_done(p, bs_err_set(err, BS_ENOMEM, "launch graph: out of memory"));
        e->slots = s;
        e->cap_slots = cap;
    }
    int64_t *idx = NULL;
    if (!p->emulate) {
        int rc = REAL(p)->graph_rows(RCTX(p), y, table, n, &idx, err);
        if (rc != 0)
            return op_done(p, rc);
    } else if ((idx = malloc((size_t)(n > 0 ? n : 1) * sizeof(*idx))) == NULL) {
        return op_done(p, bs_err_set(err, BS_ENOMEM, "launch graph: out of memory"));
    }
    e->slots[e->n_slots++] = (struct slot){idx, n};
    return 0;
}

static int px_get_rows(void *ctx, struct bs_tensor *y, const struct bs_tensor *table,
                       const int64_t *idx, int64_t n, struct bs_err *err)
{
    struct proxy *p = PROXY(ctx);
    struct entry *e = p->e;
    put_i32(p, OP_GET_ROWS);
    put_tensor(p, y), put_tensor(p, table), put_i64(p, n); /* not the indices */
    int rc = op_checked(p, OP_GET_ROWS, err);
    if (rc != 0)
        return rc;
    if (p->mode == P_RECORD) {
        if ((rc = slot_add(p, y, table, n, err)) != 0)
            return rc;
        if (p->emulate) {
            struct eop *o = eop_push(p, OP_GET_ROWS);
            if (o == NULL)
                return bs_err_set(err, BS_ENOMEM, "launch graph: out of memory");
            eop_tensor(o, 0, y), eop_tensor(o, 1, table);
            o->n = n;
            o->slot = e->n_slots - 1;
        }
    } else if (p->slot >= e->n_slots || e->slots[p->slot].n != n) {
        p->mismatch = true; /* cannot be with equal recordings; kept as a guard */
        return p->rc = bs_err_set(err, BS_EINTERNAL, "launch graph: get_rows slot mismatch");
    }
    /* the slot's graph is not running (graph_wait): the current indices */
    memcpy(e->slots[p->slot++].idx, idx, (size_t)n * sizeof(*idx));
    return 0;
}

static int px_copy(void *ctx, void *dst, const void *src, size_t size, struct bs_err *err)
{
    return refuse(PROXY(ctx), "a copy between host and backend memory", err);
}

static int px_weights_ready(void *ctx, void *buf, size_t size, struct bs_err *err)
{
    return refuse(PROXY(ctx), "weights_ready", err);
}

static int px_pack_weight(void *ctx, struct bs_tensor *packed, const struct bs_tensor *w,
                          enum bs_dtype dtype, struct bs_err *err)
{
    return refuse(PROXY(ctx), "pack_weight", err);
}

/* Makes p the proxy of real: every field of the real table, its ops ours
 * (optional ones only where the real backend has them). */
static void proxy_init(struct proxy *p, const struct bs_backend *real, struct entry *e,
                       enum proxy_mode mode)
{
    const struct bs_backend_i *ri = real->iface;
    memset(p, 0, sizeof(*p));
    p->iface = *ri;
    p->iface.linear = px_linear;
    p->iface.linear_act = ri->linear_act != NULL ? px_linear_act : NULL;
    p->iface.layer_norm = px_layer_norm;
    p->iface.group_norm = px_group_norm;
    p->iface.act = px_act;
    p->iface.glu = px_glu;
    p->iface.attention = px_attention;
    p->iface.add = px_add;
    p->iface.transpose = px_transpose;
    p->iface.get_rows = px_get_rows;
    p->iface.copy_in = px_copy;
    p->iface.copy_out = px_copy;
    p->iface.weights_ready = ri->weights_ready != NULL ? px_weights_ready : NULL;
    p->iface.pack_weight = ri->pack_weight != NULL ? px_pack_weight : NULL;
    p->be = *real;
    p->be.iface = &p->iface;
    p->be.ctx = p;
    p->real = real;
    p->e = e;
    p->mode = mode;
    p->emulate = real->graphs == BS_GRAPHS_EMULATE;
}

/* ---- replay (emulating) ------------------------------------------------- */

static int replay_op(const struct bs_backend *be, const struct entry *e, struct eop *o,
                     struct bs_err *err)
{
    const struct bs_backend_i *i = be->iface;
    void *c = be->ctx;
    struct bs_tensor *t = o->t;
    switch (o->op) {
    case OP_LINEAR:
        return i->linear(c, &t[0], &t[1], &t[2], eop_get(o, 3), o->f, err);
    case OP_LINEAR_ACT:
        return i->linear_act(c, &t[0], &t[1], &t[2], eop_get(o, 3), o->act, o->gated, err);
    case OP_LAYER_NORM:
    case OP_GROUP_NORM: {
        struct bs_norm_params np = {o->f,          eop_get(o, 2), eop_get(o, 3), eop_get(o, 4),
                                    eop_get(o, 5), o->n,          o->groups};
        if (o->op == OP_LAYER_NORM)
            return i->layer_norm(c, &t[0], &t[1], &np, err);
        return i->group_norm(c, &t[0], &t[1], &np, err);
    }
    case OP_ACT:
        return i->act(c, &t[0], &t[1], o->act, err);
    case OP_GLU:
        return i->glu(c, &t[0], &t[1], o->act, err);
    case OP_ATTENTION: {
        struct bs_attn_params ap = o->ap;
        ap.mask = eop_get(o, 4);
        return i->attention(c, &t[0], &t[1], &t[2], &t[3], &ap, err);
    }
    case OP_ADD:
        return i->add(c, &t[0], &t[1], eop_get(o, 2), o->n, o->f, err);
    case OP_TRANSPOSE:
        return i->transpose(c, &t[0], &t[1], err);
    case OP_GET_ROWS:
        return i->get_rows(c, &t[0], &t[1], e->slots[o->slot].idx, o->n, err);
    }
    return bs_err_set(err, BS_EINTERNAL, "launch graph: bad recorded op %d", (int)o->op);
}

/* "Launch": the recorded ops through the real backend, in order. */
static int replay(const struct bs_backend *be, struct entry *e, struct bs_err *err)
{
    for (int k = 0; k < e->n_eops; k++) {
        int rc = replay_op(be, e, &e->eops[k], err);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* ---- the states ------------------------------------------------------- */

/* The part on the real backend, whole: no stop between its ops (a stop was
 * asked before it; once it queues ops, it finishes). */
static int run_eager(struct bs__fwd *f, int (*part)(struct bs__fwd *f, void *arg), void *arg)
{
    bool (*stop)(void *) = f->should_stop;
    f->should_stop = NULL;
    int rc = part(f, arg);
    f->should_stop = stop;
    return rc;
}

static uint64_t epoch_of(const struct bs_backend *be)
{
    return be->graphs == BS_GRAPHS_ON ? be->iface->graph_epoch(be->ctx) : 0;
}

/* The part through the proxy; f->be and the stop are restored after. */
static int run_proxied(struct bs__fwd *f, struct proxy *p,
                       int (*part)(struct bs__fwd *f, void *arg), void *arg)
{
    struct bs_backend *real = f->be;
    f->be = &p->be;
    int rc = part(f, arg);
    f->be = real;
    return rc;
}

/* A capture or replay abandoned: the part eagerly, the message of the
 * abandoned one gone where it succeeds. */
static int rerun(struct bs__fwd *f, const struct bs_err *saved,
                 int (*part)(struct bs__fwd *f, void *arg), void *arg)
{
    atomic_fetch_add(&st_reran, 1);
    *f->err = *saved;
    int rc = run_eager(f, part, arg);
    if (rc == 0)
        *f->err = *saved;
    return rc;
}

/* Graph the backend made from a capture (or emulating, the recording) run
 * once; READY on success. */
static int capture_finish(struct bs__fwd *f, struct entry *e, uint64_t epoch, bool *abandon)
{
    const struct bs_backend *be = f->be;
    *abandon = false;
    if (be->graphs == BS_GRAPHS_EMULATE) {
        e->state = ST_READY;
        atomic_fetch_add(&st_captured, 1);
        return replay(be, e, f->err);
    }
    struct bs_backend_graph *g = NULL;
    if (be->iface->graph_end(be->ctx, true, &g, f->err) != 0) {
        *abandon = true;
        e->state = ST_BROKEN;
        e->broken_runs = 0;
        e->epoch = epoch;
        entry_clear(e, false);
        return 0;
    }
    if (epoch_of(be) != epoch) { /* memory the graph may hold moved meanwhile */
        be->iface->graph_free(be->ctx, g);
        atomic_fetch_add(&st_freed, 1);
        entry_clear(e, false);
        e->state = ST_WARM;
        *abandon = true;
        return 0;
    }
    e->g = g;
    e->epoch = epoch;
    e->state = ST_READY;
    atomic_fetch_add(&st_captured, 1);
    int rc = be->iface->graph_launch(be->ctx, g, f->err);
    if (rc != 0) {
        entry_drop_graph(e, be);
        e->state = ST_BROKEN;
        e->broken_runs = 0;
    }
    return rc;
}

/* WARM: record the part (the backend capturing it), then launch. */
static int run_warm(struct bs__fwd *f, struct entry *e, int (*part)(struct bs__fwd *f, void *arg),
                    void *arg)
{
    const struct bs_backend *be = f->be;
    struct bs_err saved = *f->err;
    struct proxy p;
    bool on = be->graphs == BS_GRAPHS_ON, abandon;
    uint64_t epoch = epoch_of(be);
    entry_clear(e, !on); /* nothing there: a WARM entry has no recording */
    if (on && be->iface->graph_begin(be->ctx, f->err) != 0) {
        e->state = ST_BROKEN;
        e->broken_runs = 0;
        e->epoch = epoch;
        return rerun(f, &saved, part, arg);
    }
    proxy_init(&p, be, e, P_RECORD);
    int rc = run_proxied(f, &p, part, arg);
    if (rc == 0 && p.rc == 0) {
        rc = capture_finish(f, e, epoch, &abandon);
        return abandon ? rerun(f, &saved, part, arg) : rc;
    }
    if (on) {
        struct bs_err ignored = {0};
        struct bs_backend_graph *none = NULL;
        (void)be->iface->graph_end(be->ctx, false, &none, &ignored);
    }
    entry_clear(e, !on);
    if (rc == BS_ECANCELED && p.rc == 0)
        return rc; /* nothing ran; capture next time */
    e->state = ST_BROKEN;
    e->broken_runs = 0;
    e->epoch = epoch;
    return rerun(f, &saved, part, arg);
}

/* READY: compare the part's ops with the recording, then launch. */
static int run_ready(struct bs__fwd *f, struct entry *e, int (*part)(struct bs__fwd *f, void *arg),
                     void *arg)
{
    const struct bs_backend *be = f->be;
    struct bs_err saved = *f->err;
    struct proxy p;
    int rc;
    if (e->g != NULL && e->n_slots > 0 &&
        (rc = be->iface->graph_wait(be->ctx, e->g, f->err)) != 0) {
        entry_drop_graph(e, be);
        atomic_fetch_add(&st_freed, 1);
        e->state = ST_BROKEN;
        e->broken_runs = 0;
        return rc;
    }
    proxy_init(&p, be, e, P_COMPARE);
    rc = run_proxied(f, &p, part, arg);
    if (rc == 0 && !p.mismatch && p.pos == e->rec_len && epoch_of(be) != e->epoch) {
        /* memory the graph may hold moved meanwhile: the rerun is a
         * warm-up, capture next time */
        entry_drop_graph(e, be);
        atomic_fetch_add(&st_freed, 1);
        e->state = ST_WARM;
        return rerun(f, &saved, part, arg);
    }
    if (rc == 0 && !p.mismatch && p.pos == e->rec_len) {
        atomic_fetch_add(&st_launched, 1);
        if (e->g == NULL)
            return replay(be, e, f->err);
        if ((rc = be->iface->graph_launch(be->ctx, e->g, f->err)) != 0) {
            entry_drop_graph(e, be);
            atomic_fetch_add(&st_freed, 1);
            e->state = ST_BROKEN;
            e->broken_runs = 0;
        }
        return rc;
    }
    if (!p.mismatch && p.rc == 0 && rc != 0)
        return rc; /* stopped (BS_ECANCELED) or failed before queueing anything */
    /* different ops: this time eagerly, capture again next time */
    entry_drop_graph(e, be);
    atomic_fetch_add(&st_freed, 1);
    e->state = ST_WARM;
    return rerun(f, &saved, part, arg);
}

int bs__graph_run(struct bs__fwd *f, const void *key, size_t key_bytes,
                  int (*part)(struct bs__fwd *f, void *arg), void *arg)
{
    struct bs_backend *be = f->be;
    if (be->graphs == BS_GRAPHS_OFF)
        return part(f, arg);
    if (f->should_stop != NULL && f->should_stop(f->stop_arg))
        return bs_err_set(f->err, BS_ECANCELED,
                          "stopped: no request of the batch is waiting for it");
    struct tls *t = tls_get();
    struct entry *e = NULL;
    if (t != NULL && !t->busy && key_bytes <= BS_GRAPH_KEY_MAX &&
        (be->graphs == BS_GRAPHS_EMULATE || be->iface->graph_begin != NULL))
        e = entry_get(t, cache_get(t, be->serial), be, key, key_bytes);
    if (e == NULL) { /* no memory for the cache, a nested part, a key too long */
        atomic_fetch_add(&st_eager, 1);
        return run_eager(f, part, arg);
    }
    if (e->state == ST_READY && epoch_of(be) != e->epoch) {
        entry_drop_graph(e, be);
        atomic_fetch_add(&st_freed, 1);
        e->state = ST_NEW;
    } else if (e->state == ST_BROKEN && epoch_of(be) != e->epoch) {
        e->state = ST_NEW;
    }
    int rc;
    t->busy = true;
    switch (e->state) {
    case ST_WARM:
        rc = run_warm(f, e, part, arg);
        break;
    case ST_READY:
        rc = run_ready(f, e, part, arg);
        break;
    default: /* NEW: a warm-up; BROKEN: no graph (for GRAPH_RETRY runs) */
        atomic_fetch_add(&st_eager, 1);
        if ((rc = run_eager(f, part, arg)) == 0 &&
            (e->state == ST_NEW || ++e->broken_runs >= GRAPH_RETRY))
            e->state = ST_WARM;
        break;
    }
    t->busy = false;
    return rc;
}
