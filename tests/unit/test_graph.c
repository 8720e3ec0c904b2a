/* Launch graphs, the engine side (engine/graph.c): transformer blocks run
 * through emulated graphs (--graphs emulate) give the bytes of the eager
 * forward over several forwards whose timesteps, labels and hidden states
 * change, with one warm-up, one capture and then launches per block; a
 * part whose ops change is rerun eagerly and captured again; a stop leaves
 * a part's output untouched in every state; an op a graph cannot hold makes
 * its key run eagerly for good; the caches are per thread and least
 * recently used out first; ragged batches and block caching run without
 * graphs. The graph_* bookkeeping of --graphs on is checked on a fake
 * backend: the CPU's ops, which it captures as closures and runs at launch.
 *
 * usage: test_graph [GOLDEN_DIR] (default: the source tree's tests/golden) */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"
#include "graph.h"
#include "model.h"
#include "modules.h"
#include "safetensors.h"

#ifndef BS_GOLDEN_DIR
#define BS_GOLDEN_DIR "tests/golden"
#endif

#define FORWARDS 6
#define ENTRIES  256 /* engine/graph.c: GRAPH_ENTRIES */

static const char *golden_dir = BS_GOLDEN_DIR;

static void backend_make(struct bs_backend *be, const char *graphs)
{
    struct bs_err err = {0};
    struct bs_backend_opts o = {.device = "cpu", .n_threads = 2, .graphs = graphs};
    if (bs_backend_init_opts(be, &o, &err) != 0)
        fail_msg("backend: %s", err.msg);
}

static struct bs_graph_stats stats_since(const struct bs_graph_stats *s0)
{
    struct bs_graph_stats s;
    bs_graph_stats(&s);
    s.eager -= s0->eager;
    s.captured -= s0->captured;
    s.launched -= s0->launched;
    s.reran -= s0->reran;
    s.freed -= s0->freed;
    return s;
}

static void assert_stats(const struct bs_graph_stats *s0, uint64_t eager, uint64_t captured,
                         uint64_t launched, uint64_t reran, uint64_t freed)
{
    struct bs_graph_stats d = stats_since(s0);
    if (d.eager != eager || d.captured != captured || d.launched != launched || d.reran != reran ||
        d.freed != freed)
        fail_msg("graph stats: eager %llu captured %llu launched %llu reran %llu freed %llu; "
                 "expected %llu %llu %llu %llu %llu",
                 (unsigned long long)d.eager, (unsigned long long)d.captured,
                 (unsigned long long)d.launched, (unsigned long long)d.reran,
                 (unsigned long long)d.freed, (unsigned long long)eager,
                 (unsigned long long)captured, (unsigned long long)launched,
                 (unsigned long long)reran, (unsigned long long)freed);
}

/* ---- a backend with graphs: the CPU's ops captured as closures ---------- */

enum { F_LINEAR, F_LINEAR_ACT, F_LN, F_GN, F_ACT, F_GLU, F_ATTN, F_ADD, F_TRANSPOSE, F_ROWS };

struct fop {
    int op;
    struct bs_tensor t[6];
    unsigned has;
    float f;
    int64_t n;
    enum bs_act act;
    bool gated;
    int groups;
    struct bs_attn_params ap;
    int64_t *idx;
};

struct bs_backend_graph {
    struct fop ops[256];
    int n;
    int64_t *idx[8], *snap[8];
    int64_t idx_n[8];
    int n_idx;
    bool pending; /* launched, not waited for */
};

static struct fake {
    struct bs_backend cpu, be;
    struct bs_backend_i iface;
    struct bs_backend_graph *cur, *live[ENTRIES + 8];
    int n_live;
    int begin, end_keep, end_drop, rows, launch, wait, freed;
    int violations; /* idx written while a launch could read it; plain get_rows captured */
    uint64_t epoch;
    bool refuse_attention; /* capture fails on attention (as scratch growth would) */
} fk;

static struct fop *fk_push(struct fake *k)
{
    assert_true(k->cur->n < 256);
    struct fop *o = &k->cur->ops[k->cur->n++];
    memset(o, 0, sizeof(*o));
    return o;
}

static void fk_t(struct fop *o, int i, const struct bs_tensor *t)
{
    if (t != NULL) {
        o->t[i] = *t;
        o->has |= 1u << i;
    }
}

static const struct bs_tensor *fk_get(const struct fop *o, int i)
{
    return o->has & (1u << i) ? &o->t[i] : NULL;
}

#define CPU(k)  ((k)->cpu.iface)
#define CCTX(k) ((k)->cpu.ctx)

static void *fk_alloc(void *ctx, size_t size)
{
    return CPU(&fk)->buf_alloc(CCTX(&fk), size);
}

static void fk_bfree(void *ctx, void *p)
{
    CPU(&fk)->buf_free(CCTX(&fk), p);
}

static int fk_copy(void *ctx, void *dst, const void *src, size_t size, struct bs_err *err)
{
    if (fk.cur != NULL)
        return bs_err_set(err, BS_EUNSUPP, "fake: copy while capturing");
    return CPU(&fk)->copy_in(CCTX(&fk), dst, src, size, err);
}

static int fk_linear(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                     const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                     struct bs_err *err)
{
    if (fk.cur == NULL)
        return CPU(&fk)->linear(CCTX(&fk), y, x, w, b, beta, err);
    struct fop *o = fk_push(&fk);
    o->op = F_LINEAR;
    fk_t(o, 0, y), fk_t(o, 1, x), fk_t(o, 2, w), fk_t(o, 3, b);
    o->f = beta;
    return 0;
}

static int fk_norm(int op, struct bs_tensor *y, const struct bs_tensor *x,
                   const struct bs_norm_params *p, struct bs_err *err)
{
    if (fk.cur == NULL)
        return op == F_LN ? CPU(&fk)->layer_norm(CCTX(&fk), y, x, p, err)
                          : CPU(&fk)->group_norm(CCTX(&fk), y, x, p, err);
    struct fop *o = fk_push(&fk);
    o->op = op;
    fk_t(o, 0, y), fk_t(o, 1, x), fk_t(o, 2, p->gamma), fk_t(o, 3, p->beta);
    fk_t(o, 4, p->scale), fk_t(o, 5, p->shift);
    o->f = p->eps;
    o->n = p->rows_per_sample;
    o->groups = p->groups;
    return 0;
}

static int fk_ln(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                 const struct bs_norm_params *p, struct bs_err *err)
{
    return fk_norm(F_LN, y, x, p, err);
}

static int fk_gn(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                 const struct bs_norm_params *p, struct bs_err *err)
{
    return fk_norm(F_GN, y, x, p, err);
}

static int fk_unary(int op, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act a,
                    struct bs_err *err)
{
    if (fk.cur == NULL)
        return op == F_ACT ? CPU(&fk)->act(CCTX(&fk), y, x, a, err)
                           : CPU(&fk)->glu(CCTX(&fk), y, x, a, err);
    struct fop *o = fk_push(&fk);
    o->op = op;
    fk_t(o, 0, y), fk_t(o, 1, x);
    o->act = a;
    return 0;
}

static int fk_act(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act a,
                  struct bs_err *err)
{
    return fk_unary(F_ACT, y, x, a, err);
}

static int fk_glu(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act a,
                  struct bs_err *err)
{
    return fk_unary(F_GLU, y, x, a, err);
}

static int fk_attention(void *ctx, struct bs_tensor *o_, const struct bs_tensor *q,
                        const struct bs_tensor *k, const struct bs_tensor *v,
                        const struct bs_attn_params *p, struct bs_err *err)
{
    if (fk.cur == NULL)
        return CPU(&fk)->attention(CCTX(&fk), o_, q, k, v, p, err);
    if (fk.refuse_attention)
        return bs_err_set(err, BS_EUNSUPP, "fake: attention would grow its scratch");
    struct fop *o = fk_push(&fk);
    o->op = F_ATTN;
    fk_t(o, 0, o_), fk_t(o, 1, q), fk_t(o, 2, k), fk_t(o, 3, v), fk_t(o, 4, p->mask);
    o->ap = *p;
    return 0;
}

static int fk_add(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                  const struct bs_tensor *gate, int64_t rps, float alpha, struct bs_err *err)
{
    if (fk.cur == NULL)
        return CPU(&fk)->add(CCTX(&fk), y, x, gate, rps, alpha, err);
    struct fop *o = fk_push(&fk);
    o->op = F_ADD;
    fk_t(o, 0, y), fk_t(o, 1, x), fk_t(o, 2, gate);
    o->n = rps;
    o->f = alpha;
    return 0;
}

static int fk_transpose(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                        struct bs_err *err)
{
    if (fk.cur == NULL)
        return CPU(&fk)->transpose(CCTX(&fk), y, x, err);
    struct fop *o = fk_push(&fk);
    o->op = F_TRANSPOSE;
    fk_t(o, 0, y), fk_t(o, 1, x);
    return 0;
}

static int fk_get_rows(void *ctx, struct bs_tensor *y, const struct bs_tensor *table,
                       const int64_t *idx, int64_t n, struct bs_err *err)
{
    if (fk.cur == NULL)
        return CPU(&fk)->get_rows(CCTX(&fk), y, table, idx, n, err);
    fk.violations++; /* its host indices would be baked in */
    return bs_err_set(err, BS_EUNSUPP, "fake: get_rows while capturing");
}

static int fk_graph_begin(void *ctx, struct bs_err *err)
{
    assert_null(fk.cur);
    fk.cur = calloc(1, sizeof(*fk.cur));
    assert_non_null(fk.cur);
    fk.begin++;
    return 0;
}

static void fk_graph_release(struct bs_backend_graph *g)
{
    for (int i = 0; i < g->n_idx; i++) {
        free(g->idx[i]);
        free(g->snap[i]);
    }
    free(g);
}

static int fk_graph_end(void *ctx, bool keep, struct bs_backend_graph **g, struct bs_err *err)
{
    assert_non_null(fk.cur);
    if (!keep) {
        fk_graph_release(fk.cur);
        fk.cur = NULL;
        fk.end_drop++;
        return 0;
    }
    assert_true(fk.n_live < ENTRIES + 8);
    *g = fk.live[fk.n_live++] = fk.cur;
    fk.cur = NULL;
    fk.end_keep++;
    return 0;
}

static int fk_graph_rows(void *ctx, struct bs_tensor *y, const struct bs_tensor *table, int64_t n,
                         int64_t **idx, struct bs_err *err)
{
    struct bs_backend_graph *g = fk.cur;
    assert_non_null(g);
    assert_true(g->n_idx < 8);
    g->idx[g->n_idx] = calloc((size_t)n, sizeof(int64_t));
    g->snap[g->n_idx] = calloc((size_t)n, sizeof(int64_t));
    g->idx_n[g->n_idx] = n;
    struct fop *o = fk_push(&fk);
    o->op = F_ROWS;
    fk_t(o, 0, y), fk_t(o, 1, table);
    o->n = n;
    o->idx = *idx = g->idx[g->n_idx++];
    fk.rows++;
    return 0;
}

/* Were g's indices written since its last launch? */
static bool fk_idx_changed(const struct bs_backend_graph *g)
{
    for (int i = 0; i < g->n_idx; i++)
        if (memcmp(g->idx[i], g->snap[i], (size_t)g->idx_n[i] * sizeof(int64_t)) != 0)
            return true;
    return false;
}

static int fk_run(const struct fop *o, struct bs_err *err)
{
    const struct bs_backend_i *i = CPU(&fk);
    void *c = CCTX(&fk);
    struct bs_tensor t[6];
    memcpy(t, o->t, sizeof(t));
    struct bs_norm_params np = {o->f,         fk_get(o, 2), fk_get(o, 3), fk_get(o, 4),
                                fk_get(o, 5), o->n,         o->groups};
    struct bs_attn_params ap = o->ap;
    ap.mask = fk_get(o, 4);
    switch (o->op) {
    case F_LINEAR:
        return i->linear(c, &t[0], &t[1], &t[2], fk_get(o, 3), o->f, err);
    case F_LN:
        return i->layer_norm(c, &t[0], &t[1], &np, err);
    case F_GN:
        return i->group_norm(c, &t[0], &t[1], &np, err);
    case F_ACT:
        return i->act(c, &t[0], &t[1], o->act, err);
    case F_GLU:
        return i->glu(c, &t[0], &t[1], o->act, err);
    case F_ATTN:
        return i->attention(c, &t[0], &t[1], &t[2], &t[3], &ap, err);
    case F_ADD:
        return i->add(c, &t[0], &t[1], fk_get(o, 2), o->n, o->f, err);
    case F_TRANSPOSE:
        return i->transpose(c, &t[0], &t[1], err);
    case F_ROWS:
        return i->get_rows(c, &t[0], &t[1], o->idx, o->n, err);
    }
    return BS_EINTERNAL;
}

static int fk_graph_launch(void *ctx, struct bs_backend_graph *g, struct bs_err *err)
{
    if (g->pending && fk_idx_changed(g))
        fk.violations++; /* written without graph_wait */
    for (int k = 0; k < g->n; k++) {
        int rc = fk_run(&g->ops[k], err);
        if (rc != 0)
            return rc;
    }
    for (int i = 0; i < g->n_idx; i++)
        memcpy(g->snap[i], g->idx[i], (size_t)g->idx_n[i] * sizeof(int64_t));
    g->pending = true;
    fk.launch++;
    return 0;
}

static int fk_graph_wait(void *ctx, struct bs_backend_graph *g, struct bs_err *err)
{
    if (g->pending && fk_idx_changed(g))
        fk.violations++; /* written before graph_wait */
    g->pending = false;
    fk.wait++;
    return 0;
}

static void fk_graph_free(void *ctx, struct bs_backend_graph *g)
{
    int i = 0;
    while (i < fk.n_live && fk.live[i] != g)
        i++;
    assert_true(i < fk.n_live); /* a graph of ours, freed once */
    fk.live[i] = fk.live[--fk.n_live];
    fk_graph_release(g);
    fk.freed++;
}

static uint64_t fk_graph_epoch(void *ctx)
{
    return fk.epoch;
}

/* The fake on a fresh CPU backend (a new serial: fresh graph caches). */
static void fake_init(void)
{
    memset(&fk, 0, sizeof(fk));
    backend_make(&fk.cpu, "off");
    fk.iface = *fk.cpu.iface;
    fk.iface.name = "fake";
    fk.iface.buf_alloc = fk_alloc;
    fk.iface.buf_free = fk_bfree;
    fk.iface.copy_in = fk_copy;
    fk.iface.copy_out = fk_copy;
    fk.iface.linear = fk_linear;
    fk.iface.linear_act = NULL;
    fk.iface.layer_norm = fk_ln;
    fk.iface.group_norm = fk_gn;
    fk.iface.act = fk_act;
    fk.iface.glu = fk_glu;
    fk.iface.attention = fk_attention;
    fk.iface.add = fk_add;
    fk.iface.transpose = fk_transpose;
    fk.iface.get_rows = fk_get_rows;
    fk.iface.pack_weight = NULL;
    fk.iface.weights_ready = NULL;
    fk.iface.memory_info = NULL;
    fk.iface.graph_begin = fk_graph_begin;
    fk.iface.graph_end = fk_graph_end;
    fk.iface.graph_rows = fk_graph_rows;
    fk.iface.graph_launch = fk_graph_launch;
    fk.iface.graph_wait = fk_graph_wait;
    fk.iface.graph_free = fk_graph_free;
    fk.iface.graph_epoch = fk_graph_epoch;
    fk.be = fk.cpu;
    fk.be.iface = &fk.iface;
    fk.be.ctx = &fk;
    fk.be.graphs = BS_GRAPHS_ON;
}

/* The backend's free: the graphs the engine did not free. */
static void fake_free(void)
{
    assert_null(fk.cur);
    while (fk.n_live > 0)
        fk_graph_release(fk.live[--fk.n_live]);
    bs_backend_free(&fk.cpu);
}

/* ---- blocks of the golden models ---------------------------------------- */

struct run {
    bs_model_t *model;
    bs_st_file_t *st;
    struct bs_named_tensor in[BS_MAX_INPUTS];
    int n_in;
    int64_t out_n;
};

static void run_open(struct run *r, const char *name, struct bs_backend *be)
{
    char dir[4096], path[4200];
    struct bs_err err = {0};
    struct bs_tensor out;
    memset(r, 0, sizeof(*r));
    snprintf(dir, sizeof(dir), "%s/%s", golden_dir, name);
    snprintf(path, sizeof(path), "%s/inputs.safetensors", dir);
    if (bs_model_load(&r->model, dir, be, &err) != 0 || bs_st_open(&r->st, path, &err) != 0)
        fail_msg("%s: %s", name, err.msg);
    r->n_in = bs_st_count(r->st);
    for (int i = 0; i < r->n_in; i++) {
        r->in[i].name = bs_st_name(r->st, i);
        assert_int_equal(bs_st_get(r->st, r->in[i].name, &r->in[i].t), 0);
    }
    assert_int_equal(bs_model_check(r->model, r->in, r->n_in, &out, &err), 0);
    r->out_n = bs_tensor_nelements(&out);
}

static void run_close(struct run *r)
{
    bs_st_close(r->st);
    bs_model_free(r->model);
}

/* Forward `step`'s inputs: hidden_states moved, the timestep and the class
 * labels changed (within their ranges), the rest as in the case. */
static float *forward_step(struct run *r, struct bs_arena *arena, int step)
{
    const struct bs_model_config *c = bs_model_config(r->model);
    struct bs_named_tensor in[BS_MAX_INPUTS];
    void *bufs[BS_MAX_INPUTS] = {0};
    struct bs_err err = {0};
    for (int i = 0; i < r->n_in; i++) {
        in[i] = r->in[i];
        const char *name = in[i].name;
        bool hs = strcmp(name, "hidden_states") == 0, ts = strcmp(name, "timestep") == 0;
        bool lab = strcmp(name, "class_labels") == 0;
        if (!hs && !ts && !lab)
            continue;
        int64_t n = bs_tensor_nelements(&in[i].t);
        int64_t lim = lab                                    ? c->btb.num_embeds_ada_norm + 1
                      : c->btb.norm_type == BS_NORM_ADA_NORM ? c->btb.num_embeds_ada_norm
                                                             : 1000;
        bufs[i] = malloc(bs_tensor_nbytes(&in[i].t));
        assert_non_null(bufs[i]);
        for (int64_t e = 0; e < n; e++) {
            if (in[i].t.type == BS_TYPE_I64) {
                int64_t v = ((const int64_t *)in[i].t.data)[e];
                ((int64_t *)bufs[i])[e] = (v + step * (e + 1)) % lim;
            } else if (hs) {
                float v = ((const float *)in[i].t.data)[e];
                ((float *)bufs[i])[e] = v + 0.25f * step * sinf((float)e);
            } else {
                float v = ((const float *)in[i].t.data)[e];
                ((float *)bufs[i])[e] = fmodf(v + (float)(step * (e + 1)), (float)lim);
            }
        }
        in[i].t.data = bufs[i];
    }
    float *out = malloc((size_t)r->out_n * sizeof(float));
    struct bs_tensor o;
    assert_non_null(out);
    assert_int_equal(bs_model_check(r->model, in, r->n_in, &o, &err), 0);
    o.data = out;
    if (bs_model_forward(r->model, arena, in, r->n_in, &o, NULL, &err) != 0)
        fail_msg("forward %d: %s", step, err.msg);
    for (int i = 0; i < r->n_in; i++)
        free(bufs[i]);
    return out;
}

/* FORWARDS forwards of case name on a backend with graphs `graphs` equal the
 * eager ones bit for bit, with one warm-up, one capture, then launches per
 * block. */
static void check_case(const char *name, struct bs_backend *be)
{
    struct run r;
    struct bs_arena arena;
    struct bs_graph_stats s0;
    float *want[FORWARDS];
    run_open(&r, name, be);
    bs_arena_init(&arena, be);
    enum bs_graph_mode mode = be->graphs;
    be->graphs = BS_GRAPHS_OFF;
    for (int i = 0; i < FORWARDS; i++)
        want[i] = forward_step(&r, &arena, i);
    be->graphs = mode;
    bs_graph_stats(&s0);
    for (int i = 0; i < FORWARDS; i++) {
        float *got = forward_step(&r, &arena, i);
        if (memcmp(got, want[i], (size_t)r.out_n * sizeof(float)) != 0)
            fail_msg("%s: forward %d through graphs differs from the eager one", name, i);
        if (i > 0 && memcmp(want[i], want[i - 1], (size_t)r.out_n * sizeof(float)) == 0)
            fail_msg("%s: forwards %d and %d have one output (the inputs did not change)", name,
                     i - 1, i);
        free(got);
    }
    for (int i = 0; i < FORWARDS; i++)
        free(want[i]);
    uint64_t n = (uint64_t)bs_model_config(r.model)->num_blocks;
    assert_stats(&s0, n, n, (FORWARDS - 2) * n, 0, 0);
    printf("%s: %d forwards bit for bit, %llu blocks: 1 warm-up, 1 capture, %d launches each\n",
           name, FORWARDS, (unsigned long long)n, FORWARDS - 2);
    bs_arena_free(&arena);
    run_close(&r);
}

static const char *const cases[] = {
    "btb_geglu_cross",           /* LayerNorm, encoder states */
    "btb_ada_norm_per_sample_t", /* ada_norm: get_rows of the timesteps */
    "btb_ada_norm_float_t",      /* ada_norm, one float timestep */
    "btb_ada_norm_zero_dit",     /* ada_norm_zero: class labels, float timesteps */
    "btb_ada_norm_zero_cross",   /* ada_norm_zero with encoder states */
    "btb_stack3",                /* 3 blocks, encoder mask */
    "btb_stack3_dit",            /* 3 ada_norm_zero blocks */
    "btb_only_cross_attention_masks",
    "btb_mask_3d",
};

static void test_blocks_emulate(void **state)
{
    (void)state;
    struct bs_backend be;
    backend_make(&be, "emulate");
    assert_int_equal(be.graphs, BS_GRAPHS_EMULATE);
    for (size_t i = 0; i < BS_ARRAY_LEN(cases); i++)
        check_case(cases[i], &be);
    bs_backend_free(&be);
}

/* --graphs on: the same outputs, and the graph_* calls each state makes. */
static void test_blocks_on(void **state)
{
    (void)state;
    fake_init();
    check_case("btb_ada_norm_per_sample_t", &fk.be);
    /* 1 block: begin and end once, the timesteps' get_rows through
     * graph_rows (norm1 and norm2), a launch after the capture and each
     * later forward, a wait before each of those that writes indices */
    assert_int_equal(fk.begin, 1);
    assert_int_equal(fk.end_keep, 1);
    assert_int_equal(fk.end_drop, 0);
    assert_int_equal(fk.rows, 2);
    assert_int_equal(fk.launch, FORWARDS - 1);
    assert_int_equal(fk.wait, FORWARDS - 2);
    assert_int_equal(fk.freed, 0);
    assert_int_equal(fk.violations, 0);
    assert_int_equal(fk.n_live, 1);
    check_case("btb_stack3_dit", &fk.be); /* 3 more graphs */
    assert_int_equal(fk.begin, 4);
    assert_int_equal(fk.rows, 2 + 3);
    assert_int_equal(fk.launch, 4 * (FORWARDS - 1));
    assert_int_equal(fk.violations, 0);
    assert_int_equal(fk.n_live, 4);
    fake_free();
}

/* A new epoch (the backend's memory moved): the graphs are freed, never
 * launched, and the blocks warm up again. */
static void test_epoch_on(void **state)
{
    (void)state;
    struct run r;
    struct bs_arena arena;
    struct bs_graph_stats s0;
    fake_init();
    run_open(&r, "btb_stack3", &fk.be);
    bs_arena_init(&arena, &fk.be);
    fk.be.graphs = BS_GRAPHS_OFF;
    float *want = forward_step(&r, &arena, 0);
    fk.be.graphs = BS_GRAPHS_ON;
    bs_graph_stats(&s0);
    for (int i = 0; i < 3; i++)
        free(forward_step(&r, &arena, 0));
    assert_stats(&s0, 3, 3, 3, 0, 0);
    assert_int_equal(fk.n_live, 3);
    fk.epoch++;
    float *got = forward_step(&r, &arena, 0);
    assert_memory_equal(got, want, (size_t)r.out_n * sizeof(float));
    assert_stats(&s0, 6, 3, 3, 0, 3);
    assert_int_equal(fk.freed, 3);
    assert_int_equal(fk.n_live, 0);
    free(got);
    got = forward_step(&r, &arena, 0); /* captured again at the new epoch */
    assert_memory_equal(got, want, (size_t)r.out_n * sizeof(float));
    assert_stats(&s0, 6, 6, 3, 0, 3);
    assert_int_equal(fk.n_live, 3);
    free(got);
    free(want);
    bs_arena_free(&arena);
    run_close(&r);
    fake_free();
}

/* A capture the backend cannot make (an op fails while capturing): the
 * block reruns eagerly, the capture discarded, and stays eager. */
static void test_capture_fails_on(void **state)
{
    (void)state;
    struct run r;
    struct bs_arena arena;
    struct bs_graph_stats s0;
    fake_init();
    run_open(&r, "btb_geglu_cross", &fk.be);
    bs_arena_init(&arena, &fk.be);
    fk.be.graphs = BS_GRAPHS_OFF;
    float *want = forward_step(&r, &arena, 1);
    fk.be.graphs = BS_GRAPHS_ON;
    fk.refuse_attention = true;
    bs_graph_stats(&s0);
    for (int i = 0; i < 4; i++) {
        float *got = forward_step(&r, &arena, 1);
        assert_memory_equal(got, want, (size_t)r.out_n * sizeof(float));
        free(got);
    }
    /* warm-up, capture abandoned (rerun), then BROKEN: eager */
    assert_stats(&s0, 3, 0, 0, 1, 0);
    assert_int_equal(fk.begin, 1);
    assert_int_equal(fk.end_drop, 1);
    assert_int_equal(fk.end_keep, 0);
    assert_int_equal(fk.launch, 0);
    /* BROKEN: eager for 64 runs (two done), then a capture is tried again */
    struct bs_graph_stats s1;
    bs_graph_stats(&s1);
    for (int i = 0; i < 63; i++) {
        float *got = forward_step(&r, &arena, 1);
        assert_memory_equal(got, want, (size_t)r.out_n * sizeof(float));
        free(got);
        assert_int_equal(fk.begin, i < 62 ? 1 : 2);
    }
    assert_stats(&s1, 62, 0, 0, 1, 0); /* 62 eager, the retry abandoned and rerun */
    assert_int_equal(fk.end_drop, 2);
    /* and again BROKEN until the epoch changes */
    bs_graph_stats(&s0);
    fk.refuse_attention = false;
    fk.epoch++;
    for (int i = 0; i < 3; i++) {
        float *got = forward_step(&r, &arena, 1);
        assert_memory_equal(got, want, (size_t)r.out_n * sizeof(float));
        free(got);
    }
    assert_stats(&s0, 1, 1, 1, 0, 0);
    assert_int_equal(fk.end_keep, 1);
    free(want);
    bs_arena_free(&arena);
    run_close(&r);
    fake_free();
}

/* ---- parts of our own --------------------------------------------------- */

#define PR 4 /* rows */
#define PC 8 /* columns */

/* y = alpha * (x w^T + table[idx]); copy: a copy into backend memory
 * between the ops (which no graph holds); a stop check in the middle. */
struct part_arg {
    struct bs_tensor x, w, table, y, z;
    int64_t idx[PR];
    float alpha;
    bool copy;
    int bump; /* the fake's epoch moves in the next `bump` runs of the part */
};

static int stop_check(struct bs__fwd *f)
{
    if (f->should_stop != NULL && f->should_stop(f->stop_arg))
        return bs_err_set(f->err, BS_ECANCELED, "stopped");
    return 0;
}

static int part_fn(struct bs__fwd *f, void *arg)
{
    struct part_arg *a = arg;
    const struct bs_backend_i *i = f->be->iface;
    struct bs_tensor g;
    int rc;
    if ((rc = bs__scratch(f, &g, PR, PC)) != 0 ||
        (rc = i->get_rows(f->be->ctx, &g, &a->table, a->idx, PR, f->err)) != 0 ||
        (rc = i->linear(f->be->ctx, &a->y, &a->x, &a->w, NULL, 0.0f, f->err)) != 0 ||
        (rc = stop_check(f)) != 0)
        return rc;
    if (a->bump > 0) {
        a->bump--;
        fk.epoch++; /* as another thread's weights_ready would */
    }
    if (a->copy && (rc = i->copy_in(f->be->ctx, a->z.data, a->x.data, 16, f->err)) != 0)
        return rc;
    return i->add(f->be->ctx, &a->y, &g, NULL, 1, a->alpha, f->err);
}

static struct bs_tensor host_tensor(int64_t rows, int64_t cols, float seed)
{
    struct bs_tensor t = bs_tensor_make(BS_TYPE_F32, 2, (int64_t[]){rows, cols}, NULL);
    float *p = malloc((size_t)(rows * cols) * sizeof(float));
    assert_non_null(p);
    for (int64_t e = 0; e < rows * cols; e++)
        p[e] = sinf(seed + 0.37f * (float)e);
    t.data = p;
    return t;
}

struct bench {
    struct bs_backend *be;
    struct bs_arena arena;
    struct bs_err err;
    struct bs__fwd f;
    struct part_arg a;
    int stop_calls, stop_at; /* should_stop: true on call stop_at */
};

static bool stop_fn(void *arg)
{
    struct bench *b = arg;
    return ++b->stop_calls == b->stop_at;
}

static void bench_init(struct bench *b, struct bs_backend *be)
{
    memset(b, 0, sizeof(*b));
    b->be = be;
    bs_arena_init(&b->arena, be);
    /* one chunk kept between runs (as bs_model_forward's reset keeps it):
     * the part's scratch has one address each time */
    assert_int_equal(bs_arena_reserve(&b->arena, 1 << 16, &b->err), 0);
    b->f = (struct bs__fwd){.be = be,
                            .dtype = BS_TYPE_F32,
                            .act = BS_TYPE_F32,
                            .arena = &b->arena,
                            .err = &b->err,
                            .should_stop = stop_fn,
                            .stop_arg = b};
    b->a.x = host_tensor(PR, PC, 1.0f);
    b->a.w = host_tensor(PC, PC, 2.0f);
    b->a.table = host_tensor(10, PC, 3.0f);
    b->a.y = host_tensor(PR, PC, 4.0f);
    b->a.z = host_tensor(PR, PC, 5.0f);
    b->a.alpha = 1.0f;
    for (int i = 0; i < PR; i++)
        b->a.idx[i] = i;
}

static void bench_free(struct bench *b)
{
    free(b->a.x.data);
    free(b->a.w.data);
    free(b->a.table.data);
    free(b->a.y.data);
    free(b->a.z.data);
    bs_arena_free(&b->arena);
}

/* One run of the part under key; returns its rc; y compared with the
 * part run eagerly on the same arguments when it succeeds. */
static int bench_run(struct bench *b, int key)
{
    struct bs_arena_mark m = bs_arena_mark(&b->arena);
    int rc = bs__graph_run(&b->f, &key, sizeof(key), part_fn, &b->a);
    bs_arena_release(&b->arena, m);
    if (rc != 0)
        return rc;
    float got[PR * PC];
    memcpy(got, b->a.y.data, sizeof(got));
    enum bs_graph_mode mode = b->be->graphs;
    b->be->graphs = BS_GRAPHS_OFF;
    bool (*stop)(void *) = b->f.should_stop;
    b->f.should_stop = NULL;
    memset(b->a.y.data, 0, sizeof(got));
    m = bs_arena_mark(&b->arena);
    assert_int_equal(bs__graph_run(&b->f, &key, sizeof(key), part_fn, &b->a), 0);
    bs_arena_release(&b->arena, m);
    b->f.should_stop = stop;
    b->be->graphs = mode;
    assert_memory_equal(got, b->a.y.data, sizeof(got));
    return 0;
}

/* The same key with other op arguments (alpha) or other indices: indices
 * are data (the launch reads them), alpha is not (rerun, captured again). */
static void check_mismatch(struct bs_backend *be)
{
    struct bench b;
    struct bs_graph_stats s0;
    bench_init(&b, be);
    b.f.should_stop = NULL;
    bs_graph_stats(&s0);
    for (int i = 0; i < 3; i++) {
        b.a.idx[0] = i; /* the indices change freely */
        assert_int_equal(bench_run(&b, 7), 0);
    }
    assert_stats(&s0, 1, 1, 1, 0, 0);
    b.a.alpha = 0.5f;
    assert_int_equal(bench_run(&b, 7), 0);
    assert_stats(&s0, 1, 1, 1, 1, 1);
    assert_int_equal(bench_run(&b, 7), 0);
    assert_int_equal(bench_run(&b, 7), 0);
    assert_stats(&s0, 1, 2, 2, 1, 1);
    /* a message of an abandoned replay does not stay behind */
    assert_int_equal(b.err.code, 0);
    bench_free(&b);
}

static void test_mismatch(void **state)
{
    (void)state;
    struct bs_backend be;
    backend_make(&be, "emulate");
    check_mismatch(&be);
    bs_backend_free(&be);
    fake_init();
    check_mismatch(&fk.be);
    assert_int_equal(fk.freed, 1); /* the graph of alpha 1 */
    assert_int_equal(fk.end_keep, 2);
    assert_int_equal(fk.violations, 0);
    fake_free();
}

/* A stop in each state: BS_ECANCELED with y untouched, and the state kept
 * (the next runs go on from where they were). */
static void check_stop(struct bs_backend *be)
{
    struct bench b;
    struct bs_graph_stats s0;
    float before[PR * PC];
    bench_init(&b, be);
    bs_graph_stats(&s0);
    for (int state = 0; state < 3; state++) { /* NEW, WARM, READY */
        for (int at = 1; at <= 2; at++) {     /* before the part, inside it */
            memcpy(before, b.a.y.data, sizeof(before));
            b.stop_calls = 0;
            b.stop_at = at;
            int rc = bench_run(&b, 3);
            if (state == 0 && at == 2) {
                /* eagerly, a part runs whole once it has started */
                assert_int_equal(rc, 0);
                break;
            }
            assert_int_equal(rc, BS_ECANCELED);
            assert_memory_equal(before, b.a.y.data, sizeof(before));
        }
        if (state > 0) {
            b.stop_at = 0;
            assert_int_equal(bench_run(&b, 3), 0);
        }
    }
    /* NEW: 1 eager; WARM: captured; READY: launched */
    assert_stats(&s0, 1, 1, 1, 0, 0);
    bench_free(&b);
}

static void test_stop(void **state)
{
    (void)state;
    struct bs_backend be;
    backend_make(&be, "emulate");
    check_stop(&be);
    bs_backend_free(&be);
    fake_init();
    check_stop(&fk.be);
    assert_int_equal(fk.end_drop, 1); /* the capture stopped inside */
    assert_int_equal(fk.end_keep, 1);
    assert_int_equal(fk.launch, 2); /* after the capture, and READY once */
    fake_free();
}

/* The epoch moves while a part is captured or compared: the graph is
 * freed, never launched, and the part reruns eagerly. */
static void test_epoch_moves_on(void **state)
{
    (void)state;
    struct bench b;
    struct bs_graph_stats s0;
    fake_init();
    bench_init(&b, &fk.be);
    b.f.should_stop = NULL;
    bs_graph_stats(&s0);
    assert_int_equal(bench_run(&b, 5), 0); /* warm-up */
    b.a.bump = 1;
    assert_int_equal(bench_run(&b, 5), 0); /* captured, then stale */
    assert_stats(&s0, 1, 0, 0, 1, 1);
    assert_int_equal(fk.end_keep, 1);
    assert_int_equal(fk.freed, 1);
    assert_int_equal(fk.launch, 0);
    assert_int_equal(bench_run(&b, 5), 0); /* captured again */
    assert_int_equal(bench_run(&b, 5), 0); /* launched */
    assert_stats(&s0, 1, 1, 1, 1, 1);
    b.a.bump = 1;
    assert_int_equal(bench_run(&b, 5), 0); /* compared, then stale */
    assert_stats(&s0, 1, 1, 1, 2, 2);
    assert_int_equal(fk.launch, 2);
    assert_int_equal(fk.freed, 2);
    assert_int_equal(bench_run(&b, 5), 0); /* captured again */
    assert_stats(&s0, 1, 2, 1, 2, 2);
    assert_int_equal(fk.n_live, 1);
    assert_int_equal(fk.violations, 0);
    bench_free(&b);
    fake_free();
}

/* An op no graph holds (a copy) in the part: the key runs eagerly. */
static void check_refused(struct bs_backend *be)
{
    struct bench b;
    struct bs_graph_stats s0;
    bench_init(&b, be);
    b.f.should_stop = NULL;
    b.a.copy = true;
    bs_graph_stats(&s0);
    for (int i = 0; i < 4; i++) {
        b.a.idx[1] = 9 - i;
        assert_int_equal(bench_run(&b, 11), 0);
    }
    assert_stats(&s0, 3, 0, 0, 1, 0);
    assert_int_equal(b.err.code, 0);
    bench_free(&b);
}

static void test_refused(void **state)
{
    (void)state;
    struct bs_backend be;
    backend_make(&be, "emulate");
    check_refused(&be);
    bs_backend_free(&be);
    fake_init();
    check_refused(&fk.be);
    assert_int_equal(fk.begin, 1);
    assert_int_equal(fk.end_drop, 1);
    assert_int_equal(fk.n_live, 0);
    fake_free();
}

/* ENTRIES keys made READY, one more pushes out the least recently used. */
static void check_lru(struct bs_backend *be)
{
    struct bench b;
    struct bs_graph_stats s0;
    bench_init(&b, be);
    b.f.should_stop = NULL;
    bs_graph_stats(&s0);
    for (int k = 0; k < ENTRIES; k++) {
        assert_int_equal(bench_run(&b, 100 + k), 0);
        assert_int_equal(bench_run(&b, 100 + k), 0);
    }
    assert_stats(&s0, ENTRIES, ENTRIES, 0, 0, 0);
    assert_int_equal(bench_run(&b, 100 + ENTRIES), 0); /* evicts key 100 */
    assert_stats(&s0, ENTRIES + 1, ENTRIES, 0, 0, 1);
    assert_int_equal(bench_run(&b, 101), 0); /* still there */
    assert_stats(&s0, ENTRIES + 1, ENTRIES, 1, 0, 1);
    assert_int_equal(bench_run(&b, 100), 0); /* forgotten: a warm-up again (evicts 102) */
    assert_stats(&s0, ENTRIES + 2, ENTRIES, 1, 0, 2);
    bench_free(&b);
}

static void test_lru(void **state)
{
    (void)state;
    struct bs_backend be;
    backend_make(&be, "emulate");
    check_lru(&be);
    bs_backend_free(&be);
    fake_init();
    check_lru(&fk.be);
    assert_int_equal(fk.freed, 2);
    assert_int_equal(fk.n_live, ENTRIES - 2);
    fake_free();
}

/* A thread keeps the caches of a few backends (GRAPH_CACHES, 4): a fifth
 * pushes out the least recently used one (its host memory; the backend
 * frees its graphs). A key longer than BS_GRAPH_KEY_MAX runs eagerly. */
static void test_backends(void **state)
{
    (void)state;
    struct bs_backend be[5];
    struct bench b[5];
    struct bs_graph_stats s0;
    for (int i = 0; i < 5; i++) {
        backend_make(&be[i], "emulate");
        bench_init(&b[i], &be[i]);
        b[i].f.should_stop = NULL;
    }
    bs_graph_stats(&s0);
    for (int i = 0; i < 4; i++)
        for (int k = 0; k < 2; k++)
            assert_int_equal(bench_run(&b[i], 1), 0);
    assert_stats(&s0, 4, 4, 0, 0, 0);
    assert_int_equal(bench_run(&b[1], 1), 0); /* backend 0 is now the oldest */
    assert_int_equal(bench_run(&b[4], 1), 0); /* pushes out backend 0's cache */
    assert_int_equal(bench_run(&b[1], 1), 0);
    assert_stats(&s0, 5, 4, 2, 0, 0);
    assert_int_equal(bench_run(&b[0], 1), 0); /* a warm-up again */
    assert_stats(&s0, 6, 4, 2, 0, 0);
    unsigned char key[BS_GRAPH_KEY_MAX + 1] = {0};
    for (int k = 0; k < 3; k++) {
        struct bs_arena_mark m = bs_arena_mark(&b[0].arena);
        assert_int_equal(bs__graph_run(&b[0].f, key, sizeof(key), part_fn, &b[0].a), 0);
        bs_arena_release(&b[0].arena, m);
    }
    assert_stats(&s0, 9, 4, 2, 0, 0);
    for (int i = 0; i < 5; i++) {
        bench_free(&b[i]);
        bs_backend_free(&be[i]);
    }
}

/* Two threads, each with its arena and graph cache, on one model. */
struct thread_arg {
    struct run *r;
    struct bs_backend *be;
    float **want;
    int bad;
};

static void *thread_main(void *arg)
{
    struct thread_arg *t = arg;
    struct bs_arena arena;
    bs_arena_init(&arena, t->be);
    for (int i = 0; i < FORWARDS; i++) {
        float *got = forward_step(t->r, &arena, i);
        t->bad += memcmp(got, t->want[i], (size_t)t->r->out_n * sizeof(float)) != 0;
        free(got);
    }
    bs_arena_free(&arena);
    return NULL;
}

static void test_threads(void **state)
{
    (void)state;
    struct bs_backend be;
    struct run r;
    struct bs_arena arena;
    struct bs_graph_stats s0;
    float *want[FORWARDS];
    backend_make(&be, "off");
    run_open(&r, "btb_stack3_dit", &be);
    bs_arena_init(&arena, &be);
    for (int i = 0; i < FORWARDS; i++)
        want[i] = forward_step(&r, &arena, i);
    bs_arena_free(&arena);
    be.graphs = BS_GRAPHS_EMULATE;
    bs_graph_stats(&s0);
    pthread_t th[2];
    struct thread_arg ta[2] = {{&r, &be, want, 0}, {&r, &be, want, 0}};
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&th[i], NULL, thread_main, &ta[i]), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);
    assert_int_equal(ta[0].bad + ta[1].bad, 0);
    uint64_t n = 2 * (uint64_t)bs_model_config(r.model)->num_blocks;
    assert_stats(&s0, n, n, (FORWARDS - 2) * n, 0, 0);
    for (int i = 0; i < FORWARDS; i++)
        free(want[i]);
    run_close(&r);
    bs_backend_free(&be);
}

/* Ragged batches and block caching run the blocks without graphs. */
static void test_bypass(void **state)
{
    (void)state;
    struct bs_backend be;
    struct run r;
    struct bs_arena arena;
    struct bs_graph_stats s0;
    struct bs_err err = {0};
    bs_block_cache_t *cache;
    backend_make(&be, "emulate");
    run_open(&r, "btb_self_only", &be);
    bs_arena_init(&arena, &be);
    struct bs_named_tensor a = r.in[0], b = r.in[0];
    a.t.ne[0] = b.t.ne[0] = 1;
    b.t.ne[1] = 13; /* another length: a ragged batch */
    b.t = bs_tensor_make(b.t.type, 3, b.t.ne, b.t.data);
    a.t = bs_tensor_make(a.t.type, 3, a.t.ne, a.t.data);
    struct bs_model_part parts[2] = {{.in = &a, .n_in = 1}, {.in = &b, .n_in = 1}};
    int64_t total = (20 + 13) * a.t.ne[2];
    float *out = malloc((size_t)total * sizeof(float));
    struct bs_tensor o = bs_tensor_make(BS_TYPE_F32, 1, &total, out);
    bs_graph_stats(&s0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(bs_model_forward_parts(r.model, &arena, parts, 2, &o, NULL, &err), 0);
    assert_int_equal(bs_block_cache_new(&cache, r.model, &err), 0);
    parts[0].cache = cache;
    parts[0].mode = BS_CACHE_REFRESH;
    total = 20 * a.t.ne[2];
    o = bs_tensor_make(BS_TYPE_F32, 1, &total, out);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(bs_model_forward_parts(r.model, &arena, parts, 1, &o, NULL, &err), 0);
        parts[0].mode = BS_CACHE_REUSE;
    }
    assert_stats(&s0, 0, 0, 0, 0, 0);
    /* and the same model through bs_model_forward does use them */
    free(forward_step(&r, &arena, 0));
    assert_stats(&s0, 1, 0, 0, 0, 0);
    bs_block_cache_free(cache);
    free(out);
    bs_arena_free(&arena);
    run_close(&r);
    bs_backend_free(&be);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        golden_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_blocks_emulate),
        cmocka_unit_test(test_blocks_on),
        cmocka_unit_test(test_epoch_on),
        cmocka_unit_test(test_capture_fails_on),
        cmocka_unit_test(test_mismatch),
        cmocka_unit_test(test_stop),
        cmocka_unit_test(test_epoch_moves_on),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_lru),
        cmocka_unit_test(test_backends),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_bypass),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
