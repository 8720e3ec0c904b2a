/* The compute backend: a table of function pointers plus an opaque context
 * (STYLE rule 4). Module code calls only these; the CPU backend implements them
 * in kernels/cpu, a CUDA backend later in kernels/cuda.
 *
 * Conventions shared by every op:
 * - Activations and weights are F32 tensors in the backend's memory. A
 *   backend may compute in a narrower dtype (bs_backend_opts.dtype): it then
 *   converts operands itself and may keep weight copies (weights_ready).
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
 * [B, Mq, Lk] with Mq 1 (broadcast over queries) or Lq. */
struct bs_attn_params {
    int64_t batch, lq, lk;
    int heads, head_dim;
    float scale;
    const struct bs_tensor *mask;
};

/* Device memory as a backend reports it (memory_info). */
struct bs_backend_memory {
    char device[64];      /* a stable device id, e.g. the GPU's UUID */
    uint64_t used_bytes;  /* in use on the device, by any process */
    uint64_t total_bytes; /* the device's capacity */
};

struct bs_backend_i {
    const char *name;

    /* True when buf_alloc returns plain host memory, which the engine may then
     * fill directly instead of staging and calling copy_in. */
    bool host_memory;

    /* Release the backend context. */
    void (*free)(void *ctx);

    /* Backend memory: size bytes aligned for any op, or NULL. */
    void *(*buf_alloc)(void *ctx, size_t size);
    void (*buf_free)(void *ctx, void *ptr);

    /* Copy size bytes between host memory and backend memory. */
    int (*copy_in)(void *ctx, void *dst, const void *src, size_t size, struct bs_err *err);
    int (*copy_out)(void *ctx, void *dst, const void *src, size_t size, struct bs_err *err);

    /* Optional (NULL: not available). Device memory for monitoring; called
     * from the metrics thread while ops run, so it must be thread-safe.
     * Returns 0, or BS_EUNSUPP where there is no device memory to report. */
    int (*memory_info)(void *ctx, struct bs_backend_memory *mem, struct bs_err *err);

    /* y = x w^T + b + beta * y. x: [M, K] rows, w: [N, K] contiguous, b: [N] or
     * NULL, y: [M, N] rows; beta is 0 or 1 (1 accumulates into y, a residual). */
    int (*linear)(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                  const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                  struct bs_err *err);

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
     * index has been checked against the table's row count. */
    int (*get_rows)(void *ctx, struct bs_tensor *y, const struct bs_tensor *table,
                    const int64_t *idx, int64_t n, struct bs_err *err);

    /* Optional (NULL: nothing to do). Called once after a model's weights are
     * in buf (from buf_alloc, size bytes of F32): the backend may keep a copy
     * in its compute dtype that linear then uses for w tensors inside buf;
     * buf_free(buf) releases it. */
    int (*weights_ready)(void *ctx, void *buf, size_t size, struct bs_err *err);
};

/* A backend instance. */
struct bs_backend {
    const struct bs_backend_i *iface;
    void *ctx;
};

/* Options of bs_backend_init_opts. */
struct bs_backend_opts {
    const char *device; /* "auto" (also NULL), "cpu" or "cuda" */
    int n_threads;      /* CPU threads, 0 for one per core */
    const char *dtype;  /* compute dtype "fp32", "bf16" or "fp16"; NULL: the
                           backend's default (cpu: fp32, cuda: bf16) */
    bool tf32;          /* FP32 GEMMs may use TF32 tensor cores (cuda) */
};

/* Version of struct bs_backend_i and bs_backend_opts that a backend module
 * must have been built against. */
#define BS_BACKEND_ABI 2 /* 2: memory_info */

/* The entry point a backend module (libbs_cuda.so) exports under the name
 * BS_CUDA_MODULE_ENTRY: create a backend or fail with a message. */
typedef int (*bs_backend_module_init_fn)(struct bs_backend *be, const struct bs_backend_opts *o,
                                         int abi, struct bs_err *err);
#define BS_CUDA_MODULE_ENTRY "bs_cuda_module_init"
#define BS_CUDA_MODULE_FILE  "libbs_cuda.so"

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

/* Device memory through the backend's memory_info hook; BS_EUNSUPP when the
 * backend has none (the CPU backend). Safe from any thread. */
int bs_backend_memory_info(const struct bs_backend *be, struct bs_backend_memory *mem,
                           struct bs_err *err);

/* Release a backend created by an *_init function (NULL iface: no-op). */
void bs_backend_free(struct bs_backend *be);

#endif
