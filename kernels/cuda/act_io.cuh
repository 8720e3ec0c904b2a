/* Activations in device memory are F32, BF16 or F16 (engine/backend.h, the
 * conventions): kernels read them widened to F32 and round each result once
 * to the output's dtype (to nearest even), with these overloads, so that a
 * kernel templated on its input and output types reads and writes all three
 * alike. A launcher picks the instance with a switch on the tensors'
 * enum bs_dtype. */
#ifndef BS_CUDA_ACT_IO_CUH
#define BS_CUDA_ACT_IO_CUH

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

#endif
