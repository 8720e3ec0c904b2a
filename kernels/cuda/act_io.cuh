/* Activations in device memory are F32, BF16 or F16 (engine/backend.h, the
 * conventions): kernels read them widened to F32 and round each result once
 * to the output's dtype (to nearest even), with these overloads, so that a
 * kernel templated on its input and output types reads and writes all three
 * alike. A launcher picks the instance with a switch on the tensors'
 * enum bs_dtype. */ 
#ifndef BS_CUDA_ACT_IO_CUH
#define BS_CUDA_ACT_IO_CUH

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

#endif
