/* Activations in device memory are F32, BF16 or F16 (engine/backend.h, the
 * conventions): kernels read them widened to F32 and round each result once
 * to the output's dtype (to nearest even), with these overloads, so that a
 * kernel templated on its input and output types reads and writes all three
 * alike. A launcher picks the instance with a switch on the tensors'
 * enum bs_dtype. Also the grid every 2-d elementwise kernel (ops, linear's)
 * runs on. */
#ifndef BS_CUDA_ACT_IO_CUH
#define BS_CUDA_ACT_IO_CUH

#include <stdint.h>

#include <type_traits>

extern "C" {
#include "tensor.h"
}

#include "device.cuh"

__device__ __forceinline__ float act_ld(const float *p)
{
    return *p;
}
__device__ __forceinline__ float act_ld(const __nv_bfloat16 *p)
{
    return __bfloat162float(*p);
}
__device__ __forceinline__ float act_ld(const __half *p)
{
    return __half2float(*p);
}

__device__ __forceinline__ void act_st(float *p, float v)
{
    *p = v;
}
__device__ __forceinline__ void act_st(__nv_bfloat16 *p, float v)
{
    *p = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void act_st(__half *p, float v)
{
    *p = __float2half_rn(v);
}

/* The C++ type of activation dtype t for a launcher's switch: calls f with a
 * null pointer of it (float for F32, and for any other dtype: the entries
 * check dtypes first), as in
 *   act_type(x->type, [&](auto *xt) { using TX = ACT_T(xt); ... });
 * nested once per tensor whose type the kernel is templated on. */
template <typename F> static inline void act_type(enum bs_dtype t, F &&f)
{
    switch (t) {
    case BS_TYPE_BF16:
        f((__nv_bfloat16 *)nullptr);
        return;
    case BS_TYPE_F16:
        f((__half *)nullptr);
        return;
    default:
        f((float *)nullptr);
        return;
    }
}
#define ACT_T(p) std::remove_pointer_t<decltype(p)>

/* ---- the elementwise grid --------------------------------------------------- */

#define EW_THREADS 256   /* elementwise kernels: threads per block (x) */
#define EW_MAX_Y   65535 /* grid y limit: rows beyond it loop */

/* The grid of the 2-d elementwise kernels: columns over x, rows over y
 * (capped at EW_MAX_Y, the kernels loop over the rest). */
static inline dim3 ew_grid(int64_t rows, int64_t cols)
{
    int64_t gx = (cols + EW_THREADS - 1) / EW_THREADS;
    return dim3((unsigned)(gx > INT32_MAX ? INT32_MAX : gx),
                (unsigned)(rows > EW_MAX_Y ? EW_MAX_Y : rows));
}

/* Loop macros for the 2-d elementwise kernels: rows over grid y, columns over
 * grid x, both grid-strided. */
#define EW_ROWS(r, rows) for (int64_t r = blockIdx.y; r < (rows); r += gridDim.y)
#define EW_COLS(i, cols)                                                                           \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (cols);                   \
         i += (int64_t)gridDim.x * blockDim.x)

#endif
