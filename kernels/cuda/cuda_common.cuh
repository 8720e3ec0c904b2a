/* Internal to the CUDA backend (kernels/cuda): the backend context shared by
 * backend_cuda.cu, ops_cuda.cu and attn_cuda.cu, the per-thread state, error
 * helpers, and the op entries that backend_cuda.cu puts in its function
 * table.
 *
 * Thread ownership (STYLE rule 12): device, dtype, tf32, bare and key are
 * set at init and read-only afterwards. Each host thread that calls the
 * backend (a batcher's libuv worker, the loop thread while models load) gets
 * its own struct bs__cuda_thread on first use (bs__cuda_thread_get): a
 * stream, a cuBLAS handle with its workspace, conversion scratch, pinned
 * staging, the upload ring (small host arrays such as a ragged batch's
 * offsets) and an overflow flag, which only that thread touches, so an op
 * takes no lock while it enqueues, a copy none while it waits for the
 * device, and a fault shows in the copy of the batch whose kernels caused it
 * (the same thread, the same stream). The states are made once per thread
 * and kept until the backend is freed (a thread that exits leaves its state
 * to cuda_free; libuv's workers live as long as the process). lock guards
 * only the list of states (threads) and the weight copies (shadows): held
 * for a lookup or an update, never while waiting on the device.
 *
 * Memory that several threads' streams use one after another (the arena of
 * a batcher whose batches run on different workers, model weights) is
 * handed over at a synchronisation: a forward ends with copy_out, which
 * waits for the thread's stream, and the engine drains it after a failed
 * forward (copy_out of 0 bytes); buf_free waits for the whole device.
 *
 * Launch graphs (graph_*, backend_cuda.cu) are the thread's too: a thread
 * captures on its own stream (bs__cuda_thread.cap while it does), and what
 * would allocate, free or wait on it then fails with BS_EUNSUPP
 * (bs__cuda_refuse_capture); its graphs are listed in its state and go
 * with it. The context's epoch (graph_epoch) is an atomic any thread
 * bumps. */
#ifndef BS_CUDA_COMMON_CUH
#define BS_CUDA_COMMON_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "backend.h"
#include "opcheck.h"
}

#define BS_CUDA_MAX_SHADOWS   64
#define BS_CUDA_UP_SLOTS      8           /* pinned slots of the upload ring (bs__cuda_upload) */
#define BS_CUDA_BLAS_WS_BYTES (32u << 20) /* a thread's cuBLAS (and cuBLASLt) workspace */
#define BS_CUDA_LT_CACHE      64          /* linear's GEMM plans kept per thread */
#define BS_CUDA_LT_KEY        8           /* int64 values of a plan's key (linear_cuda.cu) */
#define BS_CUDA_GRAPH_IDX     2048        /* indices a graph's graph_rows take in all (16 KiB) */

/* Return rc from the enclosing function when expr fails. */
#define TRY_RC(rc, expr)                                                                           \
    do {                                                                                           \
        if (((rc) = (expr)) != 0)                                                                  \
            return (rc);                                                                           \
    } while (0)

/* A model weight buffer and its copy in the compute dtype (2 bytes a value). */
struct bs__cuda_shadow {
    const char *base;
    size_t bytes; /* of F32 */
    void *half;
};

/* One GEMM plan of linear (linear_cuda.cu): cuBLASLt's descriptors and the
 * algorithm its heuristic chose for one key (shape, strides, dtypes,
 * epilogue, beta, pointer alignments), or fallback when cuBLASLt declined
 * the key (then linear runs cublasGemmEx for it). used: the cache's clock
 * at the entry's last use, 0 for an empty entry. */
struct bs__cuda_lt_plan {
    int64_t key[BS_CUDA_LT_KEY];
    uint64_t used;
    bool fallback;
    bool bias_d; /* the bias goes in D's dtype (cuBLASLt took no F32 bias) */
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, cd;
    cublasLtMatmulAlgo_t algo;
};

/* A thread's plans, the least recently used replaced when full. */
struct bs__cuda_lt_cache {
    struct bs__cuda_lt_plan plan[BS_CUDA_LT_CACHE];
    uint64_t clock;
};

/* A launch graph (engine/backend.h, graph_*; backend_cuda.cu): the
 * instantiated capture of the ops one thread called between graph_begin
 * and graph_end, on that thread's stream. Only the owner thread touches
 * it; the backend's free releases the graphs still listed. */
struct bs_backend_graph {
    struct bs_backend_graph *next, *prev; /* the owner's list (bs__cuda_thread.graphs) */
    struct bs__cuda_thread *owner;
    cudaGraphExec_t exec;
    cudaEvent_t done; /* recorded after each launch: graph_wait, graph_free */
    bool launched;    /* done has been recorded */
    bool dead;        /* graph_free while its thread captured: released at graph_end */
    /* graph_rows' indices: BS_CUDA_GRAPH_IDX int64 of pinned host memory
     * (the engine fills its slots before each launch) and their device
     * copy, which the graph's H2D copies fill and its gathers read;
     * idx_used taken so far by the capture's graph_rows. */
    int64_t *idx_host, *idx_dev;
    int64_t idx_used;
};

/* One host thread's resources (top of the file); only that thread uses them. */
struct bs__cuda_thread {
    struct bs__cuda_thread *next; /* the context's list, under its lock */
    struct bs__cuda *c;           /* the backend it belongs to */
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws;
    void *scratch; /* device memory for operand conversions, grown to the high-water mark */
    size_t scratch_bytes;
    void *pinned; /* pinned host staging for copy_in / copy_out (two buffers: xfer_done) */
    size_t pinned_bytes;
    int *overflow;     /* the overflow flag (overflow.cuh), host memory mapped for the device, */
    int *overflow_dev; /* and its device address, which the conversion kernels get */
    /* The upload ring (bs__cuda_upload), made on first use and grown to the
     * largest upload: BS_CUDA_UP_SLOTS pinned slots of up_bytes, each
     * reused once the copy from it has run (up_done[i] recorded after it),
     * and one device buffer the copies go to (in stream order). */
    void *up_host, *up_dev;
    size_t up_bytes;
    cudaEvent_t up_done[BS_CUDA_UP_SLOTS];
    int up_next;
    /* copy_in / copy_out: pinned holds two staging buffers of pinned_bytes
     * each, used in turn (the schedule of xfer.h); xfer_done[b] is recorded
     * after the last DMA queued from or into buffer b, so the host refills
     * or reads it only once that DMA has run. */
    cudaEvent_t xfer_done[2];
    /* BS_PROC_GPU_TIMER (backend.h), made on the thread's first start:
     * tm_start and tm_stop around the timed work; tm_copy0 and tm_copy1
     * around each copy while tm_on, whose spans add up in tm_copy_ms. */
    cudaEvent_t tm_start, tm_stop, tm_copy0, tm_copy1;
    bool tm_on;
    double tm_copy_ms;
    uint64_t tm_copy_bytes;
    int tm_copies;
    /* linear's cuBLASLt handle and plan cache (linear_cuda.cu), made on
     * first use; it shares blas_ws (the same stream runs one GEMM at a
     * time). */
    cublasLtHandle_t lt;
    struct bs__cuda_lt_cache *lt_cache;
    /* Launch graphs (backend_cuda.cu): cap is the graph being captured
     * (graph_begin .. graph_end; NULL otherwise: bs__cuda_capturing), and
     * while it is, buf_free's pointers wait in cap_frees (n_cap_frees of
     * cap_frees_max) for graph_end. graphs: the graphs made and not freed.
     * spare_host / spare_dev: param memory of a released graph, kept for
     * the next graph_begin (one set). */
    struct bs_backend_graph *cap;
    void **cap_frees;
    int n_cap_frees, cap_frees_max;
    struct bs_backend_graph *graphs;
    int64_t *spare_host, *spare_dev;
};

struct bs__cuda {
    int device;
    int sms;             /* the device's SMs (attention's choice of block size) */
    enum bs_dtype dtype; /* F32, BF16 or F16 */
    bool tf32;
    bool bare; /* a test backend (BS_PROC_TEST_BACKEND): thread states hold no CUDA resources */
    pthread_key_t key; /* the calling thread's struct bs__cuda_thread */
    char desc[256];

    pthread_mutex_t lock; /* guards threads and shadows */
    struct bs__cuda_thread *threads;
    int n_threads;
    struct bs__cuda_shadow shadows[BS_CUDA_MAX_SHADOWS];
    int n_shadows;
    /* graph_epoch: bumped (atomically, any thread: bs__cuda_epoch_bump)
     * whenever memory a graph may hold without the engine having passed
     * it moves or goes: a thread's scratch grows, its upload ring grows, a
     * weights copy (shadow) is made, replaced or freed, and by
     * weights_ready (a model load). */
    uint64_t epoch;
};

/* Holds c's lock for the life of the object (a short lookup or update). */
struct bs__cuda_lock {
    struct bs__cuda *c;
    explicit bs__cuda_lock(struct bs__cuda *cc) : c(cc)
    {
        pthread_mutex_lock(&c->lock);
    }
    ~bs__cuda_lock()
    {
        pthread_mutex_unlock(&c->lock);
    }
    bs__cuda_lock(const bs__cuda_lock &) = delete;
    bs__cuda_lock &operator=(const bs__cuda_lock &) = delete;
};

/* The calling thread's state, made on first use (stream, cuBLAS handle and
 * workspace, pinned staging, overflow flag; none of them on a bare test
 * backend), with the thread's current device set to c's. NULL with err set
 * ("cuda <op>: ...") when a resource cannot be made. */
struct bs__cuda_thread *bs__cuda_thread_get(struct bs__cuda *c, const char *op, struct bs_err *err);

/* Whether thread t is capturing a launch graph (graph_begin .. graph_end). */
static inline bool bs__cuda_capturing(const struct bs__cuda_thread *t)
{
    return t->cap != NULL;
}

/* BS_EUNSUPP for what (an op or a step of one) on a thread that is
 * capturing: "cuda <what> cannot run while a graph is being captured
 * (<why>)"; nothing was queued, and the capture goes on. */
int bs__cuda_refuse_capture(const char *what, const char *why, struct bs_err *err);

/* graph_epoch's counter, bumped (memory a graph may hold moved). */
static inline void bs__cuda_epoch_bump(struct bs__cuda *c)
{
    __atomic_fetch_add(&c->epoch, 1, __ATOMIC_ACQ_REL);
}

/* BS_EINTERNAL with "op: what: CUDA error text" when e is not cudaSuccess. */
int bs__cuda_check(cudaError_t e, const char *op, const char *what, struct bs_err *err);

/* The same for the last launch on this thread (cudaGetLastError). */
int bs__cuda_check_launch(const char *op, struct bs_err *err);

/* The thread's scratch, at least bytes (256-byte aligned), kept for its
 * later ops. NULL with err set when out of memory. */
void *bs__cuda_scratch(struct bs__cuda_thread *t, size_t bytes, struct bs_err *err);

/* Copies n host arrays (srcs[i], sizes[i] bytes, each a multiple of 8)
 * one after another into device memory for the kernels the thread queues
 * next, asynchronously on its stream, and returns their device address
 * (NULL with err set, "cuda <op>: ..."). The copy is valid for every
 * kernel queued before the thread's next upload; the sources may change
 * on return. The host waits only when the upload BS_CUDA_UP_SLOTS before
 * this one has not been copied yet, or when the ring grows. */
void *bs__cuda_upload(struct bs__cuda_thread *t, int n, const void *const *srcs,
                      const size_t *sizes, const char *op, struct bs_err *err);

static inline int64_t bs__cdiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

/* An optional F32 operand's data (gamma, beta, modulation rows, gates), or
 * NULL without one; and its row stride, or 0. */
static inline const float *bs__cuda_f32_or_null(const struct bs_tensor *t)
{
    return t ? (const float *)t->data : NULL;
}

static inline int64_t bs__cuda_ld_or_zero(const struct bs_tensor *t)
{
    return t ? bs_tensor_ld(t) : 0;
}

/* Convert rows of cols floats (stride ld) into dense rows of the compute
 * dtype at dst, on the thread's stream; a value beyond the dtype's range
 * sets the thread's overflow flag to code (BS_OVF_*, overflow.cuh). Returns
 * 0 or an error. */
int bs__cuda_to_half(const struct bs__cuda *c, struct bs__cuda_thread *t, void *dst,
                     const float *src, int64_t rows, int64_t cols, int64_t ld, int code,
                     struct bs_err *err);

/* The compute-dtype copy of F32 weights at w (weights_ready), or NULL when
 * w is not in a registered buffer. */
const void *bs__cuda_shadow_of(struct bs__cuda *c, const void *w);

/* The thread's cuBLASLt plan cache, made on first use (with its handle,
 * except on a bare backend; no handle: every plan falls back); NULL with
 * err set when out of memory. */
struct bs__cuda_lt_cache *bs__cuda_lt_cache_get(const struct bs__cuda *c, struct bs__cuda_thread *t,
                                                struct bs_err *err);

/* The plan for key in cache: *hit when it is there; else a slot is taken
 * (an empty one, or the least recently used, whose descriptors are
 * destroyed: *evicted), its key set and the rest cleared for the caller to
 * fill. Marks the plan used. Returns its index. */
int bs__cuda_lt_lookup(struct bs__cuda_lt_cache *cache, const int64_t key[BS_CUDA_LT_KEY],
                       bool *hit, bool *evicted);

/* The thread's cuBLASLt handle and plans go (thread_free). */
void bs__cuda_lt_free(struct bs__cuda_thread *t);

/* act's kernel on the thread's stream without the entry's checks: rows x
 * cols of x (dtype tx, row stride ldx) through act into y (ty, ldy); with
 * BS_ACT_NONE a dtype conversion (attention's output in a dtype its kernel
 * has no instance for). */
int bs__cuda_act_rows(struct bs__cuda_thread *t, void *y, enum bs_dtype ty, int64_t ldy,
                      const void *x, enum bs_dtype tx, int64_t ldx, int64_t rows, int64_t cols,
                      enum bs_act act, struct bs_err *err);

/* glu's kernel the same way: y [rows, n] = x[:, :n] * act(x[:, n:]) (x of
 * rows x 2n, dtype tx, stride ldx; y of ty, ldy). */
int bs__cuda_glu_rows(struct bs__cuda_thread *t, void *y, enum bs_dtype ty, int64_t ldy,
                      const void *x, enum bs_dtype tx, int64_t ldx, int64_t rows, int64_t n,
                      enum bs_act act, struct bs_err *err);

/* Op entries of the function table (contracts in engine/backend.h, argument
 * checks shared with the CPU backend in engine/opcheck.h). */
int bs__cuda_linear(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                    const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                    struct bs_err *err);
int bs__cuda_linear_act(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                        const struct bs_tensor *w, const struct bs_tensor *b, enum bs_act act,
                        bool gated, struct bs_err *err);
int bs__cuda_layer_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                        const struct bs_norm_params *p, struct bs_err *err);
int bs__cuda_group_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                        const struct bs_norm_params *p, struct bs_err *err);
int bs__cuda_act(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                 struct bs_err *err);
int bs__cuda_glu(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                 struct bs_err *err);
int bs__cuda_add(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                 const struct bs_tensor *gate, int64_t rows_per_sample, float alpha,
                 struct bs_err *err);
int bs__cuda_transpose(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                       struct bs_err *err);
int bs__cuda_get_rows(void *ctx, struct bs_tensor *y, const struct bs_tensor *table,
                      const int64_t *idx, int64_t n, struct bs_err *err);
int bs__cuda_attention(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                       const struct bs_tensor *k, const struct bs_tensor *v,
                       const struct bs_attn_params *p, struct bs_err *err);

/* graph_rows' work on the capturing thread's stream: the n indices at
 * idx_host (pinned) copied to idx_dev, then the gather kernel y[i] =
 * table[idx_dev[i]] (F32 rows of d values; ldy, ldt row strides; an index
 * outside [0, nrows) gives a row of zeros). */
int bs__cuda_gather_rows(struct bs__cuda_thread *t, float *y, int64_t ldy, const float *table,
                         int64_t ldt, int64_t nrows, const int64_t *idx_host, int64_t *idx_dev,
                         int64_t n, int64_t d, struct bs_err *err);

/* Bias rows on the thread's stream: y[r] = b (beta 0) or y[r] += b (beta 1)
 * for m rows of n. */
int bs__cuda_bias_rows(struct bs__cuda_thread *t, float *y, int64_t ldy, const float *b, int64_t m,
                       int64_t n, float beta, struct bs_err *err);

/* The unfused attention baseline (for the benchmark): per (sample, head),
 * S = q k^T by cuBLAS into scratch, softmax kernel, o = P v by cuBLAS. */
int bs__cuda_attention_unfused(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                               const struct bs_tensor *k, const struct bs_tensor *v,
                               const struct bs_attn_params *p, struct bs_err *err);

#endif
