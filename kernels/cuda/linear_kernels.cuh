/* The small kernels around linear's GEMM (linear_cuda.cu): operand
 * conversion to the compute dtype from any activation dtype, and the seed
 * of the fallback's F32 accumulator for a narrow y (bias + beta y; the
 * accumulator is rounded into y by act_kernel, as are the activation and
 * gated unit after a GEMM whose epilogue does not do them: ops_kernels.cuh).
 * Templated on the activation types (act_io.cuh); arithmetic is FP32. */
#ifndef BS_CUDA_LINEAR_KERNELS_CUH
#define BS_CUDA_LINEAR_KERNELS_CUH

#include <stdint.h>

#include "act_io.cuh"
#include "device.cuh"
#include "overflow.cuh"

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
    EW_ROWS(r, rows)
    EW_COLS(i, cols)
    {
        float v = act_ld(src + r * ld + i);
        ovf |= lin_overflows<TO>(v);
        act_st(dst + r * cols + i, v);
    }
    if (ovf)
        *(volatile int *)overflow = code;
}

/* acc (dense F32 rows of n) = b + beta y (b may be NULL). */
template <typename T>
__global__ void lin_seed_kernel(float *acc, const T *y, int64_t ldy, const float *b, int64_t rows,
                                int64_t n, float beta)
{
    EW_ROWS(r, rows)
    EW_COLS(i, n)
    {
        float v = b ? b[i] : 0.0f;
        acc[r * n + i] = beta != 0.0f ? v + act_ld(y + r * ldy + i) : v;
    }
}

#endif
