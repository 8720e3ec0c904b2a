/* The small kernels around linear's GEMM (linear_cuda.cu): operand
 * conversion to the compute dtype from any activation dtype, the
 * activation and gated unit after a GEMM whose epilogue does not do them
 * (linear_act), and the two halves of the fallback for a narrow y (an F32
 * accumulator seeded with bias + beta y, then rounded once into y). Each is
 * templated on the activation types (act_io.cuh); arithmetic is FP32. */
#ifndef BS_CUDA_LINEAR_KERNELS_CUH
#define BS_CUDA_LINEAR_KERNELS_CUH

#include <stdint.h>

#include "act_fn.cuh"
#include "act_io.cuh"
#include "device.cuh"
#include "overflow.cuh"

#define LIN_THREADS 256
#define LIN_MAX_Y   65535

/* Columns over grid x, rows over grid y (capped; the kernels loop). */
static inline dim3 lin_grid(int64_t rows, int64_t cols)
{
    int64_t gx = (cols + LIN_THREADS - 1) / LIN_THREADS;
    return dim3((unsigned)(gx > INT32_MAX ? INT32_MAX : gx),
                (unsigned)(rows > LIN_MAX_Y ? LIN_MAX_Y : rows));
}

#define LIN_ROWS(r, rows) for (int64_t r = blockIdx.y; r < (rows); r += gridDim.y)
#define LIN_COLS(i, cols)                                                                          \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (cols);                   \
         i += (int64_t)gridDim.x * blockDim.x)

/* Whether v becomes inf in T (never for F32). */
template <typename T> __device__ __forceinline__ bool lin_overflows(float v)
{
    return rounds_to_inf<T>(v);
}
template <> __device__ __forceinline__ bool lin_overflows<float>(float v)
{
    return false;
}

/* dst (dense rows of TO) = src (rows of TI, stride ld) rounded once; a
 * finite value that becomes inf stores code in *overflow. */
template <typename TO, typename TI>
__global__ void lin_convert_kernel(TO *dst, const TI *src, int64_t rows, int64_t cols, int64_t ld,
                                   int *overflow, int code)
{
    bool ovf = false;
    LIN_ROWS(r, rows)
    LIN_COLS(i, cols)
    {
        float v = act_ld(src + r * ld + i);
        ovf |= lin_overflows<TO>(v);
        act_st(dst + r * cols + i, v);
    }
    if (ovf)
        *(volatile int *)overflow = code;
}

/* y = act(y) in place. */
template <typename T>
__global__ void lin_act_kernel(T *y, int64_t ldy, int64_t rows, int64_t cols, int act)
{
    LIN_ROWS(r, rows)
    LIN_COLS(i, cols)
    act_st(y + r * ldy + i, act_f(act_ld(y + r * ldy + i), act));
}

/* y = h[:, :n] * act(h[:, n:]), h and y of one type. */
template <typename T>
__global__ void lin_glu_kernel(T *y, int64_t ldy, const T *h, int64_t ldh, int64_t rows, int64_t n,
                               int act)
{
    LIN_ROWS(r, rows)
    LIN_COLS(i, n)
    {
        const T *hr = h + r * ldh;
        act_st(y + r * ldy + i, act_ld(hr + i) * act_f(act_ld(hr + n + i), act));
    }
}

/* acc (dense F32 rows of n) = b + beta y (b may be NULL). */
template <typename T>
__global__ void lin_seed_kernel(float *acc, const T *y, int64_t ldy, const float *b, int64_t rows,
                                int64_t n, float beta)
{
    LIN_ROWS(r, rows)
    LIN_COLS(i, n)
    {
        float v = b ? b[i] : 0.0f;
        acc[r * n + i] = beta != 0.0f ? v + act_ld(y + r * ldy + i) : v;
    }
}

/* y = acc rounded once to T. */
template <typename T>
__global__ void lin_store_kernel(T *y, int64_t ldy, const float *acc, int64_t rows, int64_t n)
{
    LIN_ROWS(r, rows)
    LIN_COLS(i, n)
    act_st(y + r * ldy + i, acc[r * n + i]);
}

#endif
