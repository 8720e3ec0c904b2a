/* The compute dtype's overflow flag, shared by the conversion kernels
 * (to_half_kernel in ops_kernels.cuh, attn_to16 in
 * attn_kernels.cuh), the backend that reads it (backend_cuda.cu) and the
 * emulated tests (tests/gpu_emu).
 *
 * FP16 tops out at 65504: a finite F32 operand beyond it rounds to inf, and
 * the GEMM or attention then returns inf or NaN. BF16 has F32's exponent,
 * but values from 0x1.ffp127 (3.3962e38) up still round to inf. A kernel
 * that rounds a finite F32 value to inf stores its op's bit (BS_OVF_*) in
 * the calling thread's flag (a plain store: any nonzero value means
 * "overflow"; the flag is host memory mapped for the device). The backend
 * reads the flag where it synchronises the thread's stream (copy_in,
 * copy_out, weights_ready), fails that batch (or load) with
 * bs__cuda_overflow_error's message and clears it. Values that are already
 * inf or NaN in F32 are not flagged: they are the input's, not the dtype's. */
#ifndef BS_CUDA_OVERFLOW_CUH
#define BS_CUDA_OVERFLOW_CUH

#include <float.h>
#include <math.h>

extern "C" {
#include "backend.h"
}

#include "device.cuh"

#define BS_OVF_LINEAR    1 /* to_half_kernel: an operand of linear (or of the unfused attention) */
#define BS_OVF_ATTENTION 2 /* attn_to16: Q, K or V of attn_mma */
#define BS_OVF_WEIGHTS   4 /* to_half_kernel: a model's weights (weights_ready, at load) */

/* True when the finite x rounds to +-inf in T (round to nearest even). */
template <typename T> __device__ __forceinline__ bool rounds_to_inf(float x);
template <> __device__ __forceinline__ bool rounds_to_inf<__half>(float x)
{
    float ax = fabsf(x);
    return ax >= 65520.0f && ax <= FLT_MAX; /* 65504 + half an ulp (16) ties to even: inf */
}
template <> __device__ __forceinline__ bool rounds_to_inf<__nv_bfloat16>(float x)
{
    float ax = fabsf(x);
    return ax >= 0x1.ffp127f && ax <= FLT_MAX; /* 0x7f7f8000: the tie above 0x7f7f */
}

/* 0 when flags is 0; else BS_ERANGE and a message naming the dtype, what
 * overflowed (the weights, or the operands of which ops) and the dtype to
 * use instead. */
static inline int bs__cuda_overflow_error(int flags, enum bs_dtype dtype, struct bs_err *err)
{
    if (flags == 0)
        return 0;
    bool f16 = dtype == BS_TYPE_F16;
    const char *what = flags & BS_OVF_WEIGHTS ? "a weight of the model"
                       : (flags & BS_OVF_LINEAR) && (flags & BS_OVF_ATTENTION)
                           ? "an operand of linear and attention in this batch"
                       : flags & BS_OVF_ATTENTION ? "an operand of attention in this batch"
                                                  : "an operand of linear in this batch";
    return bs_err_set(err, BS_ERANGE,
                      "%s overflow: %s has a value beyond the %s range (+-%s), which would have "
                      "become inf or NaN; use --dtype %s",
                      f16 ? "fp16" : "bf16", what, f16 ? "fp16" : "bf16", f16 ? "65504" : "3.39e38",
                      f16 ? "bf16" : "fp32");
}

#endif
