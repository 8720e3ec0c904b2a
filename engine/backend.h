/* The compute backend: a table of function pointers plus an opaque context
 * (STYLE rule 4). Module code calls only these; the CPU backend implements them
 * in kernels/cpu, a CUDA backend later in kernels/cuda.
 *
 * Conventions shared by every op:
 * - Weights are F32 tensors in the backend's memory. A backend may compute
 *   in a narrower dtype (bs_backend_opts.dtype, or a model's own): it then
 *   converts operands itself and may keep weight copies (weights_ready) or
 *   packed weights of its own layout (pack_weight).
 * - Activations (x, y of linear, the norms, act, glu, add, transpose; q, k,
 *   v, o of attention) are F32, or a narrow activation dtype the backend
 *   lists in act_dtypes (BF16, F16). An op reads narrow operands widened to
 *   F32, computes as it does in F32 (with its compute dtype's operand
 *   rounding), and rounds each result once to its output's dtype (to
 *   nearest even; a value beyond a narrow dtype's range becomes inf). The
 *   dtypes of one op's inputs and output may differ (act with BS_ACT_NONE
 *   converts), except where an op says otherwise: attention's q, k and v
 *   share one dtype; transpose's x and y too. Always F32: weights, biases,
 *   gamma and beta, modulation rows (scale, shift, gate), masks, get_rows'
 *   table rows and y.
 * - "Rows" tensors (bs_tensor_is_rows) are matrices: nrows x last-dim, with a
 *   row stride that may exceed the last dim (column views of a fused QKV).
 * - Modulation vectors (scale, shift, gate) are [B, D] rows tensors; row r of
 *   the operand belongs to sample r / rows_per_sample.
 * - Ops return 0 or a negative BS_E* code with a message in err. */
#ifndef BS_BACKEND_H
#define BS_BACKEND_H

#include <stdbool.h>

#include "common.h"
#include "tensor.h"

enum bs_act {
    BS_ACT_NONE,
    BS_ACT_GELU,       /* 0.5 x (1 + erf(x / sqrt 2)) */
    BS_ACT_GELU_TANH,  /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
    BS_ACT_QUICK_GELU, /* x sigmoid(1.702 x) */
    BS_ACT_SILU,       /* x sigmoid(x) */
    BS_ACT_MISH,       /* x tanh(softplus(x)) */
    BS_ACT_COUNT,
};

/* Parameters of a layer or group normalisation with optional affine and
 * adaptive modulation: y = ((x - mean) / sqrt(var + eps)) * gamma + beta, then
 * y = y * (1 + scale[b]) + shift[b]. */
struct bs_norm_params {
    float eps;
    const struct bs_tensor *gamma;   /* [D] or NULL */
    const struct bs_tensor *beta;    /* [D] or NULL */
    const struct bs_tensor *scale;   /* [B, D] or NULL */
    const struct bs_tensor *shift;   /* [B, D] or NULL */
    int64_t rows_per_sample;         /* layer norm: rows of x per sample */
    int groups;                      /* group norm: number of groups */
};

/* Multi-head attention over row tensors. q: [B*Lq rows], k and v: [B*Lk rows];
 * head h reads columns [h*head_dim, (h+1)*head_dim) of each; o: [B*Lq rows]
 * with heads*head_dim columns. mask (optional) is an additive F32 tensor
 * [B, Mq, Lk] with Mq 1 (broadcast over queries) or Lq.
 *
 * A ragged batch (q_off set) packs samples of different lengths without
 * padding, as FlashAttention's cu_seqlens: sample b's queries are rows
 * [q_off[b], q_off[b+1]) of q and o, its keys rows [k_off[b], k_off[b+1]) of
 * k and v (host arrays of batch + 1 offsets from 0; lq and lk are then the
 * largest lengths, for sizing). A sample may have no keys (its rows of o are
 * 0, the all-masked rule) but has at least one query. The mask is then a
 * contiguous F32 tensor of any shape read as flat: sample b's part starts at
 * element m_off[b] and holds one row of its keys for each of its queries
 * (mask_per_query) or one row shared by them. */
struct bs_attn_params {
    int64_t batch, lq, lk;
    int heads, head_dim;
    float scale;
    const struct bs_tensor *mask;
    /* The products' operand dtype: F32 (0, the default) or BF16 (Q K^T and
     * P V from BF16 operands with F32 accumulation; softmax in F32). A
     * backend without a BF16 kernel computes in F32. */
    enum bs_dtype compute;
    const int64_t *q_off, *k_off; /* ragged batch: batch + 1 row offsets each, or NULL */
    const int64_t *m_off;         /* ragged batch with a mask: batch offsets (elements) */
    bool mask_per_query;          /* ragged mask rows: one per query (else one per sample) */
};

/* Device memory as a backend reports it (memory_info). */
struct bs_backend_memory {
    char device[64];      /* a stable device id, e.g. the GPU's UUID */
    uint64_t used_bytes;  /* in use on the device, by any process */
    uint64_t total_bytes; /* the device's capacity */
};

/* An executable launch graph of a backend (graph_* below). */
struct bs_backend_graph;

struct bs_backend_i {
    const char *name;

    /* True when buf_alloc returns plain host memory, which the engine may then
     * fill directly instead of staging and calling copy_in. */
    bool host_memory;

    /* The narrow activation dtypes every op takes (see the conventions
     * above): 1u << BS_TYPE_BF16, 1u << BS_TYPE_F16, or 0 (F32 only). */
    unsigned act_dtypes;

    /* Release the backend context. */
    void (*free)(void *ctx);

    /* Backend memory: size bytes aligned for any op, or NULL. */
    void *(*buf_alloc)(void *ctx, size_t size);
    void (*buf_free)(void *ctx, void *ptr);

    /* Copy size bytes between host memory and backend memory. A backend
     * whose memory is not host memory (host_memory false) may queue ops and
     * run them later: copy_in and copy_out return once every op the calling
     * thread queued before them has finished, and fail with its error if one
     * failed; copy_out with size 0 copies nothing and only waits (the engine
     * calls it at the end of every forward, so that a failed forward leaves
     * no queued op on the arena that the next batch, maybe on another
     * thread, reuses). */
    int (*copy_in)(void *ctx, void *dst, const void *src, size_t size, struct bs_err *err);
    int (*copy_out)(void *ctx, void *dst, const void *src, size_t size, struct bs_err *err);

    /* Optional (NULL: not available). Device memory for monitoring; called
     * from the metrics thread while ops run, so it must be thread-safe.
     * Returns 0, or BS_EUNSUPP where there is no device memory to report. */
    int (*memory_info)(void *ctx, struct bs_backend_memory *mem, struct bs_err *err);

    /* y = x w^T + b + beta * y. x: [M, K] rows, w: [N, K] contiguous, b: [N] or
     * NULL, y: [M, N] rows; beta is 0 or 1 (1 accumulates into y, a residual).
     * w may also be a weight this backend packed (pack_weight), or a view of
     * whole rows of one (bs_tensor_view_outer): then its products run in the
     * packed dtype with F32 accumulation. */
    int (*linear)(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                  const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                  struct bs_err *err);

    /* Optional (NULL: the engine calls linear, then act, or glu for gated).
     * y = act(x w^T + b) with beta 0; x, w and b as in linear. gated false:
     * w is [N, K], y [M, N], the same result as linear into y then act on y
     * in place. gated true (GEGLU, SwiGLU): w is [2N, K] and b [2N], y is
     * [M, N]; the same result as linear into an [M, 2N] h of y's dtype,
     * then glu(y, h, act). A backend fuses what it can (kernels/cuda/
     * README.md says what the CUDA backend fuses). */
    int (*linear_act)(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                      const struct bs_tensor *w, const struct bs_tensor *b, enum bs_act act,
                      bool gated, struct bs_err *err);

    /* Layer norm over the last dim of rows tensor x into y (y may be x). */
    int (*layer_norm)(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                      const struct bs_norm_params *p, struct bs_err *err);

    /* Group norm of contiguous x [B, C, S] (S spatial, may be 1) into y of the
     * same shape; gamma/beta are [C]; scale/shift are [B, C]. */
    int (*group_norm)(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                      const struct bs_norm_params *p, struct bs_err *err);

    /* y = act(x) elementwise over rows tensors of one shape (y may be x). */
    int (*act)(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
               struct bs_err *err);

    /* Gated unit: x is [M, 2N] rows, y is [M, N] rows; y = x[:, :N] * act(x[:, N:]). */
    int (*glu)(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
               struct bs_err *err);

    /* Tiled attention with online softmax; scratch grows with L * head_dim, never
     * with Lq * Lk. */
    int (*attention)(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                     const struct bs_tensor *k, const struct bs_tensor *v,
                     const struct bs_attn_params *p, struct bs_err *err);

    /* y = alpha * (y + gate[b] * x) over rows tensors of one shape; gate is
     * [B, D] or NULL (then y = alpha * (y + x)). */
    int (*add)(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
               const struct bs_tensor *gate, int64_t rows_per_sample, float alpha,
               struct bs_err *err);

    /* Batched transpose of contiguous x [B, R, C] into contiguous y [B, C, R]. */
    int (*transpose)(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                     struct bs_err *err);

    /* Row gather: y[i] = table[idx[i]] for i < n; idx is host memory and every
     * index has been checked against the table's row count. A backend with
     * pack_weight also takes a contiguous BF16 table (a BF16 model's
     * embeddings) and widens its rows into the F32 y. */
    int (*get_rows)(void *ctx, struct bs_tensor *y, const struct bs_tensor *table,
                    const int64_t *idx, int64_t n, struct bs_err *err);

    /* Optional (NULL: nothing to do). Called once after a model's weights are
     * in buf (from buf_alloc, size bytes of F32): the backend may keep a copy
     * in its compute dtype that linear then uses for w tensors inside buf;
     * buf_free(buf) releases it. */
    int (*weights_ready)(void *ctx, void *buf, size_t size, struct bs_err *err);

    /* Optional (NULL: weights stay F32 and linear converts them as it needs).
     * Pack w, an F32 [N, K] contiguous host tensor (a weight being loaded),
     * into the layout this backend's linear reads in compute dtype dtype
     * (BF16): *packed is then a [N, K] tensor of that dtype whose data is
     * backend memory in that layout, not plain rows: only linear reads it
     * (and row views of it), and buf_free(packed->data) releases it. w may be
     * freed on return. */
    int (*pack_weight)(void *ctx, struct bs_tensor *packed, const struct bs_tensor *w,
                       enum bs_dtype dtype, struct bs_err *err);

    /* Optional (NULL: none). The backend's extra entry points by name, as
     * ggml's get_proc_address: the function (cast to void *) or NULL when the
     * backend has no entry of that name. Names and types: BS_PROC_* below. */
    void *(*get_proc_address)(const char *name);

    /* Optional launch graphs (CUDA graphs): all of graph_begin ..
     * graph_epoch, or all NULL. The engine (engine/graph.c) records the ops
     * of a part of a forward (a transformer block) with their arguments,
     * has the backend capture them into a graph once, and later launches
     * that graph in place of the same ops, having checked that the ops and
     * every argument are the same; so a backend only captures and launches.
     * A graph belongs to the thread that captured it: only that thread
     * launches, waits for and frees it.
     *
     * graph_begin: the ops the calling thread calls until graph_end are
     * captured, not run (nothing runs before graph_launch). An op that
     * cannot be captured (memory of the backend's own it would have to
     * grow, host data it would have to upload) fails (BS_EUNSUPP), and the
     * engine then runs the part without a graph.
     * graph_end: ends the capture. keep: *g is the captured graph, not yet
     * run; a capture that broke fails (nothing kept). !keep: discarded.
     * graph_rows: during a capture, get_rows of y from table for n indices
     * that the graph reads from *idx when it runs: host memory for n
     * int64_t that the graph owns until graph_free, which the caller fills
     * (indices checked against the table) before each launch, after
     * graph_wait.
     * graph_launch: queues g's work on the calling thread's queue, as ops
     * are queued (copy_out waits for it).
     * graph_wait: returns once no launch of g reads its idx memory.
     * graph_free: releases g (waiting for its launches first); free (the
     * backend's) releases the graphs not freed yet.
     * graph_epoch: a counter the backend bumps whenever memory a graph may
     * hold without the engine having passed it (the backend's own scratch,
     * its copies of weights) moves or is freed; a graph captured at another
     * epoch is freed, never launched. Thread-safe. */
    int (*graph_begin)(void *ctx, struct bs_err *err);
    int (*graph_end)(void *ctx, bool keep, struct bs_backend_graph **g, struct bs_err *err);
    int (*graph_rows)(void *ctx, struct bs_tensor *y, const struct bs_tensor *table, int64_t n,
                      int64_t **idx, struct bs_err *err);
    int (*graph_launch)(void *ctx, struct bs_backend_graph *g, struct bs_err *err);
    int (*graph_wait)(void *ctx, struct bs_backend_graph *g, struct bs_err *err);
    void (*graph_free)(void *ctx, struct bs_backend_graph *g);
    uint64_t (*graph_epoch)(void *ctx);
};

/* Whether the engine runs transformer and attention blocks through launch graphs
 * (bs_backend_opts.graphs): off; on (the backend's graph_* ops); emulate
 * (the engine records and replays the ops itself, on any backend: the
 * same checks and bookkeeping as on, for testing them without a GPU). */
enum bs_graph_mode {
    BS_GRAPHS_OFF,
    BS_GRAPHS_ON,
    BS_GRAPHS_EMULATE,
};

/* A backend instance. */
struct bs_backend {
    const struct bs_backend_i *iface;
    void *ctx;
    enum bs_dtype dtype; /* compute dtype of models that name none (set by
                            bs_backend_init_opts): F32, BF16 or F16 */
    /* Activations of a model computing in a narrow dtype: true keeps them
     * F32; false has them in the model's compute dtype where act_dtypes
     * lists it (the engine's choice of which stay F32: engine/modules.c). */
    bool act_f32;
    /* Launch graphs for transformer blocks (bs_backend_opts.graphs). */
    enum bs_graph_mode graphs;
    /* Unique per backend made in this process (from 1; set by
     * bs_backend_init_opts): what the engine's per-thread graph caches are
     * keyed on, since a freed backend's address can come back. */
    uint64_t serial;
};

/* Options of bs_backend_init_opts. */
struct bs_backend_opts {
    const char *device; /* "auto" (also NULL), "cpu" or "cuda" */
    int n_threads;      /* CPU threads, 0 for one per core */
    const char *dtype;  /* compute dtype "fp32", "bf16" or "fp16"; NULL: the
                           backend's default (cpu: fp32, cuda: bf16) */
    bool tf32;          /* FP32 GEMMs may use TF32 tensor cores (cuda) */
    /* Activation dtype: "compute" (the compute dtype where the backend takes
     * it as activations), "fp32", or NULL/"auto": compute on cuda, fp32 on
     * cpu. */
    const char *activations;
    /* Launch graphs: "on" (the backend must have them), "off", "emulate"
     * (enum bs_graph_mode), or NULL/"auto": on where the backend has them
     * (cuda), else off. */
    const char *graphs;
};

/* Version of struct bs_backend_i, bs_backend_opts and bs_backend_module that a
 * backend module must have been built against. */
#define BS_BACKEND_ABI 7 /* 2: memory_info; 3: get_proc_address, bs_backend_module;
                            4: pack_weight, bs_attn_params.compute, bs_backend.dtype;
                            5: ragged attention (bs_attn_params.q_off, k_off, m_off);
                            6: narrow activations (act_dtypes, bs_backend.act_f32,
                               bs_backend_opts.activations), linear_act;
                            7: launch graphs (graph_*, bs_backend_opts.graphs) */

/* What a backend module (libbs_cuda.so) exports: one function, named
 * BS_CUDA_MODULE_ENTRY, of type bs_backend_module_fn. The engine reads abi
 * first and uses nothing else when it differs from BS_BACKEND_ABI. */
struct bs_backend_module {
    int abi;          /* BS_BACKEND_ABI of the module's build */
    const char *name; /* the device it provides, e.g. "cuda" */
    /* Create a backend or fail with a message. */
    int (*init)(struct bs_backend *be, const struct bs_backend_opts *o, struct bs_err *err);
    /* The module's extra entry points by name (BS_PROC_*), or NULL; the
     * same as its backends' iface->get_proc_address. */
    void *(*get_proc_address)(const char *name);
};
typedef const struct bs_backend_module *(*bs_backend_module_fn)(void);
#define BS_CUDA_MODULE_ENTRY "bs_cuda_backend_module"
#define BS_CUDA_MODULE_FILE  "libbs_cuda.so"

/* Extra entry points that get_proc_address hands out, for tests and the
 * benchmark (never for serving): each name with its function type. */

/* The unfused attention baseline (cuda): o = softmax(q k^T * scale + mask) v
 * as separate GEMM and softmax launches, on a backend of this module. */
#define BS_PROC_ATTENTION_UNFUSED "attention_unfused"
typedef int (*bs_proc_attention_unfused_fn)(struct bs_backend *be, struct bs_tensor *o,
                                            const struct bs_tensor *q, const struct bs_tensor *k,
                                            const struct bs_tensor *v,
                                            const struct bs_attn_params *p, struct bs_err *err);

/* GPU time of the calling thread's work (cuda), for the benchmark and
 * tests, never for serving. start records a CUDA event on the thread's
 * stream and, until stop, has each copy_in and copy_out of that thread
 * (size > 0) measure its own span on the stream: from the point the stream
 * reaches the copy (every op queued before it done) to the end of its last
 * DMA, staging waits included. stop records a second event, waits for it
 * (not for the overflow flag: the next copy takes that) and fills t. So
 * around a whole forward, total_ms - transfer_ms is the GPU time of its
 * kernels and of the gaps between them (host launch overhead where the
 * stream ran dry), without its uploads and downloads. One timer per
 * thread; start again restarts it. Errors: BS_EINVAL for stop without
 * start or a backend of another module, BS_EUNSUPP on a test backend (no
 * device), BS_EINTERNAL for a CUDA failure. */
#define BS_PROC_GPU_TIMER "gpu_timer"
struct bs_gpu_time {
    double total_ms;         /* start to stop, on the GPU (cudaEventElapsedTime) */
    double transfer_ms;      /* the copies' spans within it */
    uint64_t transfer_bytes; /* bytes those copies moved */
    int transfers;           /* how many copies */
};
struct bs_backend_gpu_timer {
    int (*start)(struct bs_backend *be, struct bs_err *err);
    int (*stop)(struct bs_backend *be, struct bs_gpu_time *t, struct bs_err *err);
};
typedef const struct bs_backend_gpu_timer *(*bs_proc_gpu_timer_fn)(void);

/* A backend of this module bound to no device (cuda), so that a machine
 * without a GPU can check the ops' argument checks; valid calls fail with
 * BS_EINTERNAL. No copy ops; never for use with a GPU. Free with
 * bs_backend_free. */
#define BS_PROC_TEST_BACKEND "test_backend"
typedef int (*bs_proc_test_backend_fn)(struct bs_backend *be, const char *dtype,
                                       struct bs_err *err);

/* The host-side internals of a backend of this module (cuda), for
 * tests/unit/test_cuda_host.c on a BS_PROC_TEST_BACKEND backend, where no
 * device is touched. */
#define BS_PROC_TEST_HOOKS "test_hooks"
struct bs_backend_test_hooks {
    /* The calling thread's state (stream, cuBLAS handle, staging, overflow
     * flag: cuda_common.cuh), made on its first call: an opaque id, the
     * same for every call of one thread, or NULL with err set. */
    const void *(*thread_state)(struct bs_backend *be, struct bs_err *err);
    /* Thread states made so far, and weight copies registered. */
    int (*counts)(const struct bs_backend *be, int *threads, int *shadows);
    /* weights_ready's bookkeeping: half becomes the copy of the buffer
     * [base, base + bytes); *replaced is the copy it replaces (a buffer
     * registered again), which weights_ready frees, else NULL. */
    int (*shadow_register)(struct bs_backend *be, const void *base, size_t bytes, void *half,
                           void **replaced, struct bs_err *err);
    /* Sets the calling thread's overflow flag to flags as a conversion
     * kernel would, then takes it as copy_out does after its wait: 0, or
     * the error copy_out fails with; the flag is clear afterwards. */
    int (*overflow_take)(struct bs_backend *be, int flags, struct bs_err *err);
    /* linear's GEMM plan cache (the calling thread's, bounded, least
     * recently used out first) looked up with key (its fields: m, n, k,
     * ldx, ldy, dtypes, epilogue, beta, alignments, packed in 8 values) as
     * linear does, with no descriptor made: *slot is the entry's index,
     * *hit whether it was there, *evicted whether an entry was pushed out
     * for it; returns 0 or an error. */
    int (*lt_cache_probe)(struct bs_backend *be, const int64_t key[8], int *slot, bool *hit,
                          bool *evicted, struct bs_err *err);
};
typedef const struct bs_backend_test_hooks *(*bs_proc_test_hooks_fn)(void);

/* Create the backend for device "auto", "cpu" or "cuda" (n_threads: CPU
 * threads, 0 for one per core); "auto" takes the GPU when one works. */
int bs_backend_init(struct bs_backend *be, const char *device, int n_threads, struct bs_err *err);

/* Create a backend from options. "cuda" loads the CUDA module (BS_CUDA_MODULE,
 * else libbs_cuda.so next to the executable, else ../lib/blockserve/ from it)
 * and fails when no GPU works; "auto" falls back to the CPU then. On success
 * err holds code 0 and a one-line note of what was chosen (and why). */
int bs_backend_init_opts(struct bs_backend *be, const struct bs_backend_opts *o,
                         struct bs_err *err);

/* Create the CPU backend running on n_threads threads (0: one per core). */
int bs_backend_cpu_init(struct bs_backend *be, int n_threads, struct bs_err *err);

/* The same with a default compute dtype: BS_TYPE_F32 or BS_TYPE_BF16 (FP16
 * is refused with a message). On success err holds code 0 and a note of the
 * instruction set the BF16 kernels use (empty for F32). */
int bs_backend_cpu_init_dtype(struct bs_backend *be, int n_threads, enum bs_dtype dtype,
                              struct bs_err *err);

/* Parse a compute dtype name: "fp32", "bf16" or "fp16". */
int bs_compute_dtype_parse(const char *name, enum bs_dtype *dtype, struct bs_err *err);

/* "fp32", "bf16" or "fp16". */
const char *bs_compute_dtype_name(enum bs_dtype dtype);

/* Device memory through the backend's memory_info hook; BS_EUNSUPP when the
 * backend has none (the CPU backend). Safe from any thread. */
int bs_backend_memory_info(const struct bs_backend *be, struct bs_backend_memory *mem,
                           struct bs_err *err);

/* Extra entry point name of be's backend (see BS_PROC_*), or NULL when it
 * has none of that name. */
void *bs_backend_get_proc_address(const struct bs_backend *be, const char *name);

/* Extra entry point name of the backend module for device ("cuda"), loading
 * the module as bs_backend_init_opts would; NULL with a message in err when
 * the module is not available, was built for another ABI, or has no entry
 * of that name. Needs no GPU. */
void *bs_backend_module_get_proc_address(const char *device, const char *name, struct bs_err *err);

/* Release a backend created by an *_init function (NULL iface: no-op). */
void bs_backend_free(struct bs_backend *be);

#endif
