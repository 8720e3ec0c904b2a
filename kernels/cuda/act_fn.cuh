/* The activation functions of enum bs_act in F32, shared by the kernels of
 * ops_kernels.cuh (act, glu) and linear_kernels.cuh (linear_act), each
 * compiled into its own translation unit; the CPU twins are in kernels/cpu. */
#ifndef BS_CUDA_ACT_FN_CUH
#define BS_CUDA_ACT_FN_CUH

extern "C" {
#include "backend.h"
}

#include "device.cuh"

__device__ __forceinline__ float act_f(float x, int act)
{
    switch (act) {
    case BS_ACT_GELU:
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case BS_ACT_GELU_TANH: {
        float u = 0.7978845608028654f * fmaf(0.044715f * x, x * x, x);
        return x / (1.0f + expf(-2.0f * u));
    }
    case BS_ACT_QUICK_GELU:
        return x / (1.0f + expf(-1.702f * x));
    case BS_ACT_SILU:
        return x / (1.0f + expf(-x));
    case BS_ACT_MISH: {
        float u = expf(x > 20.0f ? 20.0f : x);
        float n = u * (u + 2.0f);
        return x * (n / (n + 2.0f));
    }
    default:
        return x;
    }
}

#endif
