/* Internal to the CUDA backend (kernels/cuda): the backend context shared by
 * backend_cuda.cu, ops_cuda.cu and attn_cuda.cu, error helpers, and the op
 * entries that backend_cuda.cu puts in its function table.
 *
 * Thread ownership (STYLE rule 12): device, dtype and tf32 are set at init
 * and read-only afterwards. Everything else (stream, cuBLAS handle, scratch,
 * pinned staging, weight shadows) belongs to whoever holds lock: every op
 * entry takes it for the whole time it enqueues work, so the ops of several
 * worker threads interleave on the one stream whole, in stream order, and may
 * share the scratch buffer (a later op's kernels run after an earlier op's). */
#ifndef BS_CUDA_COMMON_CUH
#define BS_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "backend.h"
#include "opcheck.h"
}

#define BS_CUDA_MAX_SHADOWS 64

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

struct bs__cuda {
    int device;
    enum bs_dtype dtype; /* F32, BF16 or F16 */
    bool tf32;
    char desc[256];

    pthread_mutex_t lock;
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws;
    size_t blas_ws_bytes;
    void *scratch; /* device memory for operand conversions, grown to the high-water mark */
    size_t scratch_bytes;
    void *pinned; /* pinned host staging for copy_in / copy_out */
    size_t pinned_bytes;
    struct bs__cuda_shadow shadows[BS_CUDA_MAX_SHADOWS];
    int n_shadows;
};

/* Locks c for the life of the object (an op entry's scope). */
struct bs__cuda_guard {
    struct bs__cuda *c;
    explicit bs__cuda_guard(struct bs__cuda *cc) : c(cc)
    {
        pthread_mutex_lock(&c->lock);
        cudaSetDevice(c->device); /* the current device is per host thread */
    }
    ~bs__cuda_guard()
    {
        pthread_mutex_unlock(&c->lock);
    }
    bs__cuda_guard(const bs__cuda_guard &) = delete;
    bs__cuda_guard &operator=(const bs__cuda_guard &) = delete;
};

/* BS_EINTERNAL with "op: what: CUDA error text" when e is not cudaSuccess. */
int bs__cuda_check(cudaError_t e, const char *op, const char *what, struct bs_err *err);

/* The same for the last launch on this thread (cudaGetLastError). */
int bs__cuda_check_launch(const char *op, struct bs_err *err);

/* Scratch of at least bytes (256-byte aligned), kept for later ops; the
 * caller holds the lock. NULL with err set when out of memory. */
void *bs__cuda_scratch(struct bs__cuda *c, size_t bytes, struct bs_err *err);

static inline int64_t bs__cdiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

/* Convert n floats (rows of cols with stride ld) into dense rows of the
 * compute dtype at dst, on the stream; returns 0 or an error. */
int bs__cuda_to_half(struct bs__cuda *c, void *dst, const float *src, int64_t rows, int64_t cols,
                     int64_t ld, struct bs_err *err);

/* Op entries of the function table (contracts in engine/backend.h, argument
 * checks shared with the CPU backend in engine/opcheck.h). */
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

/* Bias rows: y[r] = b (beta 0) or y[r] += b (beta 1) for m rows of n. */
int bs__cuda_bias_rows(struct bs__cuda *c, float *y, int64_t ldy, const float *b, int64_t m,
                       int64_t n, float beta, struct bs_err *err);

/* The unfused attention baseline (for the benchmark): per (sample, head),
 * S = q k^T by cuBLAS into scratch, softmax kernel, o = P v by cuBLAS. Takes
 * the lock itself. */
int bs__cuda_attention_unfused(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                               const struct bs_tensor *k, const struct bs_tensor *v,
                               const struct bs_attn_params *p, struct bs_err *err);

#endif
