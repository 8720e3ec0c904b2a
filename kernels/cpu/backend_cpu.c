/* The CPU backend: host memory, a thread pool sized to the cores, OpenBLAS
 * for the GEMMs (single-threaded inside; we split each GEMM into blocks on our
 * own pool so that one set of threads does all the work, with no
 * oversubscription), and the kernels of ops_cpu.c and attn_cpu.c.
 *
 * Thread ownership: see ops_cpu.h (the context) and threadpool.c. Every op may
 * be called from several threads at once: ops keep their state on the stack,
 * pool runs are serialised by the pool, and the attention scratch by
 * scratch_lock. */
#include <cblas.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "gemm_bf16.h"
#include "opcheck.h"
#include "ops_cpu.h"
#include "threadpool.h"

#define CPU_ALIGN       64
#define CPU_MAX_THREADS 256

/* GEMMs below this many flops run as one call on the calling thread: waking
 * the pool costs more than it saves. */
#define LINEAR_SERIAL_FLOPS (2.0 * 1024 * 1024)
/* Smallest block edge (rows of x, rows of w) a GEMM task gets. */
#define LINEAR_MIN_BLOCK 64

static pthread_once_t blas_once = PTHREAD_ONCE_INIT;

static void blas_single_thread(void)
{
    openblas_set_num_threads(1);
}

/* ---- memory ------------------------------------------------------------ */

/* Every buffer starts CPU_ALIGN bytes after a header that says how to free
 * it. Buffers of at least BIG_MIN bytes (weights, arena chunks) are mapped
 * directly, so munmap gives them back to the system at once (through malloc,
 * freeing a large block raises glibc's mmap threshold and the next ones
 * linger in the heap). From HUGE_MIN bytes they are 2 MiB aligned and offered
 * to transparent huge pages, because attention walks K and V rows a
 * fused-QKV stride apart (3840 bytes at dim 320), which with 4 KiB pages
 * touches a new page every row and overflows the TLB. Where THP is off the
 * advice is ignored. */
#define PAGE      ((size_t)4096)
#define HUGE_PAGE ((size_t)2 << 20)
#define HUGE_MIN  ((size_t)4 << 20)
#define BIG_MIN   ((size_t)256 << 10)

struct buf_hdr {
    void *map;  /* mmap base, or NULL: the block came from posix_memalign at hdr */
    size_t len; /* mapped length */
};

static void *cpu_buf_alloc(void *ctx, size_t size)
{
    size = (size + CPU_ALIGN - 1) & ~(size_t)(CPU_ALIGN - 1);
    if (size < BIG_MIN) {
        void *base = NULL;
        if (posix_memalign(&base, CPU_ALIGN, CPU_ALIGN + (size ? size : CPU_ALIGN)) != 0)
            return NULL;
        ((struct buf_hdr *)base)->map = NULL;
        return (char *)base + CPU_ALIGN;
    }
    bool huge = size >= HUGE_MIN;
    size_t align = huge ? HUGE_PAGE : PAGE;
    size = (size + PAGE - 1) & ~(PAGE - 1);
    size_t len = size + align + PAGE; /* room to align, with the header's page before */
    char *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED)
        return NULL;
    char *p = (char *)(((uintptr_t)map + PAGE + align - 1) & ~(uintptr_t)(align - 1));
    /* Unmap the slack on both sides, so that the mapping ends with the
     * buffer: a huge page never covers a tail the buffer does not use (with
     * THP "always", a 2 MiB-rounded buffer wasted up to 2 MiB each, 84 MB
     * over the packed weights of a 28-block DiT). */
    char *head = p - PAGE, *end = p + size;
    if (head > map)
        munmap(map, (size_t)(head - map));
    if (end < map + len)
        munmap(end, (size_t)(map + len - end));
    struct buf_hdr *h = (struct buf_hdr *)(p - CPU_ALIGN);
    h->map = head;
    h->len = PAGE + size;
#ifdef MADV_HUGEPAGE
    if (huge)
        (void)madvise(p, size, MADV_HUGEPAGE);
#endif
    return p;
}

/* A weight packed by cpu_pack_weight. Views of it (bs_tensor_view_outer)
 * point into [base, base + bytes) as if it were plain BF16 rows: row r at
 * base + r * k * 2. The registry (ctx->packed) is sorted by base. */
struct bs__cpu_packed {
    const char *base;   /* the packed tensor's data */
    size_t bytes;       /* n * k * 2 */
    const void *layout; /* the panels (gemm_bf16.h); base itself here */
    int64_t n, k;
};

/* Index of the first entry whose base is above p; the caller holds packed_lock. */
static size_t packed_upper(const struct bs__cpu *c, const void *p)
{
    size_t lo = 0, hi = c->n_packed;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if ((uintptr_t)c->packed[mid].base <= (uintptr_t)p)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Register the packed weight at base, and make sure the GEMM's per-thread
 * scratch exists. Returns 0 or BS_ENOMEM. */
static int packed_add(struct bs__cpu *c, void *base, int64_t n, int64_t k, struct bs_err *err)
{
    int rc = 0;
    pthread_rwlock_wrlock(&c->packed_lock);
    if (c->gemm_scratch == NULL) {
        size_t bytes = bs__gemm_bf16_scratch_bytes() * (size_t)c->n_threads;
        if (posix_memalign(&c->gemm_scratch, CPU_ALIGN, bytes) != 0) {
            c->gemm_scratch = NULL;
            rc = bs_err_set(err, BS_ENOMEM, "pack_weight: cannot allocate %zu bytes of scratch",
                            bytes);
            goto out;
        }
    }
    if (c->n_packed == c->cap_packed) {
        size_t cap = c->cap_packed ? 2 * c->cap_packed : 64;
        struct bs__cpu_packed *p = realloc(c->packed, cap * sizeof(*p));
        if (p == NULL) {
            rc = bs_err_set(err, BS_ENOMEM, "pack_weight: out of memory");
            goto out;
        }
        c->packed = p;
        c->cap_packed = cap;
    }
    size_t i = packed_upper(c, base);
    memmove(c->packed + i + 1, c->packed + i, (c->n_packed - i) * sizeof(*c->packed));
    c->packed[i] = (struct bs__cpu_packed){
        .base = base, .bytes = (size_t)n * (size_t)k * 2, .layout = base, .n = n, .k = k};
    c->n_packed++;
out:
    pthread_rwlock_unlock(&c->packed_lock);
    return rc;
}

/* Forget the packed weight at ptr, if ptr is one. */
static void packed_forget(struct bs__cpu *c, const void *ptr)
{
    pthread_rwlock_wrlock(&c->packed_lock);
    size_t i = packed_upper(c, ptr);
    if (i > 0 && c->packed[i - 1].base == ptr) {
        memmove(c->packed + i - 1, c->packed + i, (c->n_packed - i) * sizeof(*c->packed));
        c->n_packed--;
    }
    pthread_rwlock_unlock(&c->packed_lock);
}

static void cpu_buf_free(void *ctx, void *ptr)
{
    if (ptr == NULL)
        return;
    packed_forget(ctx, ptr);
    struct buf_hdr *h = (struct buf_hdr *)((char *)ptr - CPU_ALIGN);
    if (h->map != NULL)
        munmap(h->map, h->len);
    else
        free(h);
}

static int cpu_copy(void *ctx, void *dst, const void *src, size_t size, struct bs_err *err)
{
    if (size)
        memcpy(dst, src, size);
    return 0;
}

/* pack_weight: BF16 panels (gemm_bf16.h) in a buffer of our own, registered
 * so that linear finds the layout behind w->data and views of it. */
static int cpu_pack_weight(void *ctx, struct bs_tensor *packed, const struct bs_tensor *w,
                           enum bs_dtype dtype, struct bs_err *err)
{
    struct bs__cpu *c = ctx;
    if (dtype != BS_TYPE_BF16)
        return bs_err_set(err, BS_EUNSUPP,
                          "pack_weight: the cpu backend packs weights in BF16 only (asked for %s)",
                          bs_dtype_name(dtype));
    if (w == NULL || w->data == NULL || w->type != BS_TYPE_F32 || w->n_dims != 2 ||
        !bs_tensor_is_contiguous(w))
        return bs_err_set(err, BS_EINVAL, "pack_weight: w must be a contiguous F32 [N, K] matrix");
    int64_t n = w->ne[0], k = w->ne[1];
    size_t bytes = bs__gemm_bf16_packed_bytes(n, k);
    void *buf = cpu_buf_alloc(ctx, bytes);
    if (buf == NULL)
        return bs_err_set(err, BS_ENOMEM, "pack_weight: cannot allocate %zu bytes", bytes);
    bs__gemm_bf16_pack(c, buf, w->data, n, k);
    int rc = packed_add(c, buf, n, k, err);
    if (rc != 0) {
        cpu_buf_free(ctx, buf);
        return rc;
    }
    int64_t ne[2] = {n, k};
    *packed = bs_tensor_make(BS_TYPE_BF16, 2, ne, buf);
    return 0;
}

size_t bs__cpu_scratch_bytes(void *ctx)
{
    struct bs__cpu *c = ctx;
    pthread_mutex_lock(&c->scratch_lock);
    size_t n = c->scratch_bytes;
    pthread_mutex_unlock(&c->scratch_lock);
    return n;
}

int bs__cpu_scratch_reserve(struct bs__cpu *c, size_t floats, struct bs_err *err)
{
    floats = (floats + 15) & ~(size_t)15; /* 64-byte aligned slices */
    if (floats <= c->scratch_floats)
        return 0;
    size_t bytes = floats * sizeof(float) * (size_t)c->n_threads;
    void *p = NULL;
    if (posix_memalign(&p, CPU_ALIGN, bytes) != 0)
        return bs_err_set(err, BS_ENOMEM, "cpu backend: cannot allocate %zu bytes of scratch",
                          bytes);
    free(c->scratch);
    c->scratch = p;
    c->scratch_floats = floats;
    c->scratch_bytes = bytes;
    return 0;
}

/* ---- narrow activations: the generic path ------------------------------ */

/* Ops without a narrow kernel of their own (engine/backend.h, ABI 6) run as
 * the contract reads: the narrow operands widened into F32 copies, the F32
 * op on those, each narrow output rounded once from its F32 copy. Operands
 * are copied whole before the op runs and outputs rounded back after, so
 * aliasing between narrow operands is harmless (y == x in place).
 *
 * The copies of one op share one block: the context's cached one
 * (wide_buf, grown to the largest op's need and kept, as an arena keeps its
 * high-water size: mapping and faulting in tens of MB per call cost a
 * quarter of a large GEMM), or, while another thread's op holds it, one
 * malloc'ed for the call. */

#define WIDE_MAX 4

struct wides {
    struct bs_tensor f[WIDE_MAX]; /* operand i as the F32 op sees it */
    bool copied[WIDE_MAX];        /* f[i] is an F32 copy of a narrow operand */
    float *mem;                   /* the copies */
    bool cached;                  /* mem is c->wide_buf, held through wide_lock */
};

static bool is_narrow(const struct bs_tensor *t)
{
    return t != NULL && t->type != BS_TYPE_F32;
}

/* floats of memory for the copies, or NULL. */
static float *wides_mem(struct bs__cpu *c, size_t floats, bool *cached)
{
    void *p = NULL;
    size_t bytes = floats * sizeof(float);
    *cached = false;
    if (pthread_mutex_trylock(&c->wide_lock) == 0) {
        if (c->wide_floats >= floats) {
            *cached = true;
            return c->wide_buf;
        }
        if (posix_memalign(&p, CPU_ALIGN, bytes) == 0) {
            free(c->wide_buf);
            c->wide_buf = p;
            c->wide_floats = floats;
            *cached = true;
            return p;
        }
        pthread_mutex_unlock(&c->wide_lock);
    }
    return posix_memalign(&p, CPU_ALIGN, bytes) == 0 ? p : NULL;
}

/* F32 copies of the narrow ones among ts[0, n) (NULL: an operand the caller
 * passes as it is), widened where bit i of load is set (inputs, and outputs
 * the op also reads); F32 operands are used in place. Returns 0, or
 * BS_ENOMEM with nothing held. */
static int wides_init(struct bs__cpu *c, struct wides *w, int n, const struct bs_tensor *const *ts,
                      unsigned load, const char *op, struct bs_err *err)
{
    size_t floats = 0, at[WIDE_MAX] = {0}, size[WIDE_MAX] = {0};
    memset(w, 0, sizeof(*w));
    for (int i = 0; i < n; i++) {
        if (ts[i] != NULL)
            w->f[i] = *ts[i];
        if (!is_narrow(ts[i]))
            continue;
        at[i] = floats;
        size[i] = (size_t)bs_tensor_nrows(ts[i]) * (size_t)bs_opcheck_ncols(ts[i]);
        floats += (size[i] + 15) & ~(size_t)15; /* 64-byte aligned copies */
    }
    if (floats != 0 && (w->mem = wides_mem(c, floats, &w->cached)) == NULL)
        return bs_err_set(err, BS_ENOMEM,
                          "%s: cannot allocate %zu bytes for F32 copies of narrow operands", op,
                          floats * sizeof(float));
    for (int i = 0; i < n; i++) {
        if (!is_narrow(ts[i]))
            continue;
        /* an empty operand: an F32 one over the same (untouched) data */
        void *data = size[i] ? (void *)(w->mem + at[i]) : ts[i]->data;
        w->f[i] = bs_tensor_make(BS_TYPE_F32, ts[i]->n_dims, ts[i]->ne, data);
        w->copied[i] = size[i] != 0;
        if (size[i] && (load >> i & 1))
            bs__cpu_rows_widen(c, w->mem + at[i], ts[i]);
    }
    return 0;
}

/* Round operand i's F32 copy into t (when it has one). */
static void wides_store(struct bs__cpu *c, const struct wides *w, int i, struct bs_tensor *t)
{
    if (w->copied[i])
        bs__cpu_rows_narrow(c, t, w->f[i].data);
}

static void wides_free(struct bs__cpu *c, struct wides *w)
{
    if (w->cached)
        pthread_mutex_unlock(&c->wide_lock);
    else
        free(w->mem);
    w->mem = NULL;
}

/* ---- linear ------------------------------------------------------------ */

struct linear_job {
    const float *x, *w, *b;
    float *y;
    int64_t m, n, k, ldx, ldy;
    float beta;
    int64_t mb, nb; /* block edges */
    int64_t nt;     /* blocks along n */
};

/* y[m0:m1, n0:n1] = x[m0:m1] w[n0:n1]^T + b[n0:n1] + beta y[m0:m1, n0:n1]. The
 * bias goes into y first, then one GEMM accumulates onto it. */
static void linear_block(const struct linear_job *j, int64_t m0, int64_t m1, int64_t n0, int64_t n1)
{
    float beta = j->beta;
    int64_t nn = n1 - n0;
    if (j->b != NULL) {
        const float *b = j->b + n0;
        for (int64_t r = m0; r < m1; r++) {
            float *y = j->y + r * j->ldy + n0;
            if (beta == 0.0f)
                memcpy(y, b, (size_t)nn * sizeof(float));
            else
                for (int64_t i = 0; i < nn; i++)
                    y[i] += b[i];
        }
        beta = 1.0f;
    }
    if (j->k == 0) { /* x w^T is 0 (and cblas would reject lda = 0) */
        if (beta == 0.0f)
            for (int64_t r = m0; r < m1; r++)
                memset(j->y + r * j->ldy + n0, 0, (size_t)nn * sizeof(float));
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)(m1 - m0), (blasint)nn,
                (blasint)j->k, 1.0f, j->x + m0 * j->ldx, (blasint)j->ldx, j->w + n0 * j->k,
                (blasint)j->k, beta, j->y + m0 * j->ldy + n0, (blasint)j->ldy);
}

static void linear_task(void *arg, int64_t task, int thread)
{
    const struct linear_job *j = arg;
    int64_t m0 = (task / j->nt) * j->mb, n0 = (task % j->nt) * j->nb;
    int64_t m1 = m0 + j->mb < j->m ? m0 + j->mb : j->m;
    int64_t n1 = n0 + j->nb < j->n ? n0 + j->nb : j->n;
    linear_block(j, m0, m1, n0, n1);
}

static int64_t cdiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

/* Split into about 4 blocks per thread: along M while blocks keep at least
 * LINEAR_MIN_BLOCK rows, then along N (small M: conditioning, short encoder
 * sequences). */
static void linear_run(struct bs__cpu *c, struct linear_job *j)
{
    int64_t target = 4 * (int64_t)c->n_threads;
    if (c->n_threads == 1 ||
        2.0 * (double)j->m * (double)j->n * (double)j->k < LINEAR_SERIAL_FLOPS) {
        linear_block(j, 0, j->m, 0, j->n);
        return;
    }
    int64_t mt = cdiv(j->m, LINEAR_MIN_BLOCK);
    mt = mt < target ? mt : target;
    j->mb = cdiv(j->m, mt);
    mt = cdiv(j->m, j->mb);
    int64_t nt = cdiv(target, mt), nt_max = cdiv(j->n, LINEAR_MIN_BLOCK);
    nt = nt < nt_max ? nt : nt_max;
    j->nb = (cdiv(j->n, nt) + 15) & ~(int64_t)15; /* 64-byte aligned column blocks */
    j->nt = cdiv(j->n, j->nb);
    bs_pool_run(c->pool, mt * j->nt, linear_task, j);
}

/* linear with a BF16 w: a packed weight, or rows [n0, n0 + n) of one; x
 * F32 or BF16 (read as it is), y F32. */
static int linear_bf16(struct bs__cpu *c, struct bs_tensor *y, const struct bs_tensor *x,
                       const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                       struct bs_err *err)
{
    struct bs__gemm_bf16_args g = {
        .x = x->data,
        .x_bf16 = x->type == BS_TYPE_BF16,
        .m = bs_tensor_nrows(x),
        .k = bs_opcheck_ncols(x),
        .ldx = bs_tensor_ld(x),
        .n = w->ne[0],
        .b = b ? b->data : NULL,
        .y = y->data,
        .ldy = bs_tensor_ld(y),
        .beta = beta,
    };
    const char *why = "not packed by this backend";
    pthread_rwlock_rdlock(&c->packed_lock);
    size_t i = packed_upper(c, w->data);
    const struct bs__cpu_packed *e = i > 0 ? &c->packed[i - 1] : NULL;
    size_t off = e ? (size_t)((uintptr_t)w->data - (uintptr_t)e->base) : 0;
    if (e != NULL && off > e->bytes)
        e = NULL; /* past the end of the nearest weight below */
    if (e != NULL) {
        size_t row = (size_t)e->k * 2;
        g.n0 = row ? (int64_t)(off / row) : 0;
        if (e->k != g.k || (row && off % row != 0) || g.n0 + g.n > e->n)
            why = "not whole rows of a weight packed by this backend";
        else
            why = NULL;
        g.w = e->layout;
        g.wn = e->n;
    }
    void *scratch = c->gemm_scratch;
    pthread_rwlock_unlock(&c->packed_lock);
    if (why != NULL)
        return bs_err_set(err, BS_EINVAL, "linear: BF16 weight %s", why);
    return bs__gemm_bf16_run(c, &g, scratch, err);
}

/* linear on F32 x and y (x BF16 too with a packed w). */
static int linear_f32(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                      const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                      struct bs_err *err)
{
    if (w->type == BS_TYPE_BF16)
        return linear_bf16(ctx, y, x, w, b, beta, err);
    int64_t m = bs_tensor_nrows(x), k = bs_opcheck_ncols(x), n = w->ne[0];
    if (m == 0 || n == 0)
        return 0;
    if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || bs_tensor_ld(x) > INT32_MAX ||
        bs_tensor_ld(y) > INT32_MAX)
        return bs_err_set(err, BS_ERANGE, "linear: dimensions exceed the BLAS integer range");
    struct linear_job j = {
        .x = x->data,
        .w = w->data,
        .b = b ? b->data : NULL,
        .y = y->data,
        .m = m,
        .n = n,
        .k = k,
        .ldx = bs_tensor_ld(x),
        .ldy = bs_tensor_ld(y),
        .beta = beta,
    };
    linear_run(ctx, &j);
    return 0;
}

/* A BF16 x meets a packed w as it is (the GEMM would round an F32 x to those
 * very values); any other narrow x is widened, and a narrow y is computed in
 * an F32 copy (holding y's values when beta is 1) and rounded once. */
static int cpu_linear(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                      const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                      struct bs_err *err)
{
    int rc = bs_opcheck_linear(y, x, w, b, beta, err);
    if (rc != 0)
        return rc;
    if (!is_narrow(x) && !is_narrow(y))
        return linear_f32(ctx, y, x, w, b, beta, err);
    bool x_direct = x->type == BS_TYPE_BF16 && w->type == BS_TYPE_BF16;
    const struct bs_tensor *ts[2] = {x_direct ? NULL : x, y};
    struct wides cp;
    if ((rc = wides_init(ctx, &cp, 2, ts, beta != 0.0f ? 3u : 1u, "linear", err)) != 0)
        return rc;
    if ((rc = linear_f32(ctx, &cp.f[1], x_direct ? x : &cp.f[0], w, b, beta, err)) == 0)
        wides_store(ctx, &cp, 1, y);
    wides_free(ctx, &cp);
    return rc;
}

/* ---- the other ops' entries -------------------------------------------- */

/* layer_norm: narrow rows up to BS__CPU_ROW_MAX in ops_cpu.c, longer ones
 * through F32 copies. */
static int cpu_layer_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                          const struct bs_norm_params *p, struct bs_err *err)
{
    if ((!is_narrow(x) && !is_narrow(y)) || bs_opcheck_ncols(x) <= BS__CPU_ROW_MAX)
        return bs__cpu_layer_norm(ctx, y, x, p, err);
    int rc = bs_opcheck_layer_norm(y, x, p, err);
    if (rc != 0)
        return rc;
    const struct bs_tensor *ts[2] = {x, y};
    struct wides cp;
    if ((rc = wides_init(ctx, &cp, 2, ts, 1u, "layer_norm", err)) != 0)
        return rc;
    if ((rc = bs__cpu_layer_norm(ctx, &cp.f[1], &cp.f[0], p, err)) == 0)
        wides_store(ctx, &cp, 1, y);
    wides_free(ctx, &cp);
    return rc;
}

/* group_norm: narrow x and y through F32 copies. */
static int cpu_group_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                          const struct bs_norm_params *p, struct bs_err *err)
{
    if (!is_narrow(x) && !is_narrow(y))
        return bs__cpu_group_norm(ctx, y, x, p, err);
    int rc = bs_opcheck_group_norm(y, x, p, err);
    if (rc != 0)
        return rc;
    const struct bs_tensor *ts[2] = {x, y};
    struct wides cp;
    if ((rc = wides_init(ctx, &cp, 2, ts, 1u, "group_norm", err)) != 0)
        return rc;
    if ((rc = bs__cpu_group_norm(ctx, &cp.f[1], &cp.f[0], p, err)) == 0)
        wides_store(ctx, &cp, 1, y);
    wides_free(ctx, &cp);
    return rc;
}

/* attention: narrow q, k, v (one dtype) and o through F32 copies. */
static int cpu_attention(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                         const struct bs_tensor *k, const struct bs_tensor *v,
                         const struct bs_attn_params *p, struct bs_err *err)
{
    if (!is_narrow(q) && !is_narrow(k) && !is_narrow(v) && !is_narrow(o))
        return bs__cpu_attention(ctx, o, q, k, v, p, err);
    int rc = p->q_off ? bs_opcheck_attention_ragged(o, q, k, v, p, err)
                      : bs_opcheck_attention(o, q, k, v, p, err);
    if (rc == 0 && p->q_off == NULL)
        rc = bs_opcheck_attention_mask(p, err);
    if (rc != 0)
        return rc;
    const struct bs_tensor *ts[4] = {q, k, v, o};
    struct wides cp;
    if ((rc = wides_init(ctx, &cp, 4, ts, 7u, "attention", err)) != 0)
        return rc;
    if ((rc = bs__cpu_attention(ctx, &cp.f[3], &cp.f[0], &cp.f[1], &cp.f[2], p, err)) == 0)
        wides_store(ctx, &cp, 3, o);
    wides_free(ctx, &cp);
    return rc;
}

/* ---- instruction sets -------------------------------------------------- */

static const char *const isa_names[] = {
    [BS__ISA_GENERIC] = "generic",
    [BS__ISA_AVX2] = "avx2",
    [BS__ISA_AVX512] = "avx512",
    [BS__ISA_AVX512_BF16] = "avx512bf16",
};

const char *bs__cpu_isa_name(enum bs__cpu_isa isa)
{
    return (unsigned)isa <= BS__ISA_AVX512_BF16 ? isa_names[isa] : "?";
}

enum bs__cpu_isa bs__cpu_isa_detect(void)
{
    enum bs__cpu_isa isa = BS__ISA_GENERIC;
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        isa = BS__ISA_AVX2;
    if (isa == BS__ISA_AVX2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl"))
        isa = BS__ISA_AVX512;
    if (isa == BS__ISA_AVX512 && __builtin_cpu_supports("avx512bf16"))
        isa = BS__ISA_AVX512_BF16;
#endif
    const char *want = getenv("BS_CPU_ISA");
    for (int i = 0; want != NULL && i <= BS__ISA_AVX512_BF16; i++)
        if (strcmp(want, isa_names[i]) == 0 && (enum bs__cpu_isa)i < isa)
            isa = (enum bs__cpu_isa)i;
    return isa;
}

/* ---- the backend ------------------------------------------------------- */

static void cpu_free(void *ctx)
{
    struct bs__cpu *c = ctx;
    if (c == NULL)
        return;
    bs_pool_free(c->pool);
    pthread_mutex_destroy(&c->scratch_lock);
    free(c->scratch);
    pthread_rwlock_destroy(&c->packed_lock);
    free(c->packed);
    pthread_mutex_destroy(&c->wide_lock);
    free(c->wide_buf);
    free(c->gemm_scratch);
    free(c);
}

/* Host memory is not device memory: nothing to report (metrics omit it). */
static int cpu_memory_info(void *ctx, struct bs_backend_memory *mem, struct bs_err *err)
{
    return bs_err_set(err, BS_EUNSUPP, "cpu backend: no device memory");
}

static const struct bs_backend_i cpu_iface = {
    .name = "cpu",
    .host_memory = true,
    .act_dtypes = (1u << BS_TYPE_BF16) | (1u << BS_TYPE_F16),
    .free = cpu_free,
    .buf_alloc = cpu_buf_alloc,
    .buf_free = cpu_buf_free,
    .copy_in = cpu_copy,
    .copy_out = cpu_copy,
    .linear = cpu_linear,
    .pack_weight = cpu_pack_weight,
    .layer_norm = cpu_layer_norm,
    .group_norm = cpu_group_norm,
    .act = bs__cpu_act,
    .glu = bs__cpu_glu,
    .attention = cpu_attention,
    .add = bs__cpu_add,
    .transpose = bs__cpu_transpose,
    .get_rows = bs__cpu_get_rows,
    .memory_info = cpu_memory_info,
    .get_proc_address = NULL, /* no extra entry points */
};

int bs_backend_cpu_init(struct bs_backend *be, int n_threads, struct bs_err *err)
{
    int rc;
    memset(be, 0, sizeof(*be));
    if (n_threads < 0 || n_threads > CPU_MAX_THREADS)
        return bs_err_set(err, BS_EINVAL, "cpu backend: n_threads must be in [0, %d] (got %d)",
                          CPU_MAX_THREADS, n_threads);
    if (n_threads == 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = cores < 1 ? 1 : cores > CPU_MAX_THREADS ? CPU_MAX_THREADS : (int)cores;
    }
    struct bs__cpu *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        rc = bs_err_set(err, BS_ENOMEM, "cpu backend: out of memory");
        goto fail_ctx;
    }
    c->n_threads = n_threads;
    c->isa = bs__cpu_isa_detect();
    c->dtype = BS_TYPE_F32;
    if ((rc = bs_pool_init(&c->pool, n_threads, err)) != 0)
        goto fail_pool;
    pthread_mutex_init(&c->scratch_lock, NULL);
    pthread_rwlock_init(&c->packed_lock, NULL);
    pthread_mutex_init(&c->wide_lock, NULL);
    pthread_once(&blas_once, blas_single_thread);
    be->iface = &cpu_iface;
    be->ctx = c;
    return 0;

fail_pool:
    free(c);
fail_ctx:
    return rc;
}

int bs_backend_cpu_init_dtype(struct bs_backend *be, int n_threads, enum bs_dtype dtype,
                              struct bs_err *err)
{
    if (dtype == BS_TYPE_F16)
        return bs_err_set(err, BS_EUNSUPP,
                          "--dtype fp16: the cpu backend computes in fp32 or bf16 (fp16 is for "
                          "cuda)");
    if (dtype != BS_TYPE_F32 && dtype != BS_TYPE_BF16)
        return bs_err_set(err, BS_EINVAL, "cpu backend: compute dtype %s is not fp32 or bf16",
                          bs_dtype_name(dtype));
    int rc = bs_backend_cpu_init(be, n_threads, err);
    if (rc != 0)
        return rc;
    struct bs__cpu *c = be->ctx;
    c->dtype = dtype;
    be->dtype = dtype;
    /* The one line that says how bf16 models compute here (a model may ask
     * for bf16 on an fp32 backend too). */
    if (c->isa >= BS__ISA_AVX512_BF16)
        return bs_err_set(err, 0, "bf16 models: avx512bf16 products (vdpbf16ps)");
    return bs_err_set(err, 0,
                      "bf16 models: no AVX512_BF16 %s, so they run on the %s path (bf16 weights, "
                      "fp32 arithmetic)",
                      getenv("BS_CPU_ISA") ? "(BS_CPU_ISA caps the instruction set)"
                                           : "on this CPU",
                      bs__cpu_isa_name(c->isa));
}
