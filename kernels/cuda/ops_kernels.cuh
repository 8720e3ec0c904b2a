/* The kernels of the row-wise and elementwise ops, written once for nvcc
 * (ops_cuda.cu launches them) and for the host emulation of tests/gpu_emu
 * (device.cuh says how):
 * activations, gated units, gated residual adds, transpose, bias rows,
 * the row gather of launch graphs (indices read on the device) and
 * the F32 to BF16/FP16 operand conversion (which flags values the dtype
 * cannot hold: overflow.cuh). All arithmetic is FP32 (these ops
 * are memory-bound; the compute dtype only narrows GEMM and attention
 * operands). */
#ifndef BS_CUDA_OPS_KERNELS_CUH
#define BS_CUDA_OPS_KERNELS_CUH

#include <stdint.h>

extern "C" {
#include "backend.h"
}

#include "act_fn.cuh"
#include "act_io.cuh"
#include "device.cuh"
#include "overflow.cuh"

#define TR_TILE 32

/* ---- device helpers ---------------------------------------------------- */

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x)
{
    return __float2half_rn(x);
}

/* ---- conversion and bias ------------------------------------------------ */

/* dst = src rounded to T; a finite value that becomes inf stores code in
 * *overflow (overflow.cuh). */
template <typename T>
__global__ void to_half_kernel(T *dst, const float *src, int64_t rows, int64_t cols, int64_t ld,
                               int *overflow, int code)
{
    bool ovf = false;
    EW_ROWS(r, rows)
    EW_COLS(i, cols)
    {
        float x = src[r * ld + i];
        ovf |= rounds_to_inf<T>(x);
        dst[r * cols + i] = from_f32<T>(x);
    }
    if (ovf)
        *(volatile int *)overflow = code;
}

__global__ void bias_kernel(float *y, int64_t ldy, const float *b, int64_t rows, int64_t cols,
                            float beta)
{
    EW_ROWS(r, rows)
    EW_COLS(i, cols)
    {
        float v = b ? b[i] : 0.0f;
        y[r * ldy + i] = beta != 0.0f ? y[r * ldy + i] + v : v;
    }
}

/* ---- activations, gated units, residual adds ---------------------------- */

/* The activation kernels read x as TX and write y as TY (F32, BF16 or F16:
 * act_io.cuh), computing in FP32; y may be x (same type: each element is
 * read and written by one thread). */
template <typename TY, typename TX>
__global__ void act_kernel(TY *y, int64_t ldy, const TX *x, int64_t ldx, int64_t rows, int64_t cols,
                           int act)
{
    EW_ROWS(r, rows)
    EW_COLS(i, cols)
    act_st(y + r * ldy + i, act_f(act_ld(x + r * ldx + i), act));
}

/* y = x[:, :n] * act(x[:, n:]); each element is read and written by one
 * thread, so y may be the first half of x (same type). */
template <typename TY, typename TX>
__global__ void glu_kernel(TY *y, int64_t ldy, const TX *x, int64_t ldx, int64_t rows, int64_t n,
                           int act)
{
    EW_ROWS(r, rows)
    EW_COLS(i, n)
    {
        const TX *xr = x + r * ldx;
        float a = act_ld(xr + i), gv = act_f(act_ld(xr + n + i), act);
        act_st(y + r * ldy + i, a * gv);
    }
}

/* y (TY) and x (TX) as the kernel's instance reads them; gate F32. */
struct add_args {
    void *y;
    const void *x;
    const float *gate;
    int64_t ldy, ldx, ld_gate, rows, n, rows_per_sample;
    float alpha;
};

/* y = alpha (y + x gate), read widened and rounded once to TY. */
template <typename TY, typename TX> __global__ void add_kernel(struct add_args a)
{
    TY *y = (TY *)a.y;
    const TX *x = (const TX *)a.x;
    EW_ROWS(r, a.rows)
    EW_COLS(i, a.n)
    {
        float xv = act_ld(x + r * a.ldx + i);
        if (a.gate)
            xv *= a.gate[(r / a.rows_per_sample) * a.ld_gate + i];
        TY *yp = y + r * a.ldy + i;
        act_st(yp, a.alpha * (act_ld(yp) + xv));
    }
}

/* ---- row gather (graph_rows) --------------------------------------------- */

/* y[r] = table[idx[r]] for r < n, rows of d floats (strides ldy, ldt), the
 * indices read on the device (a launch graph's, written before each
 * launch). An index outside [0, nrows) gives a row of zeros instead of a
 * read outside the table (the engine checks indices before each launch:
 * this only keeps a bad one contained). Bit for bit a copy. */
__global__ void gather_rows_kernel(float *y, int64_t ldy, const float *table, int64_t ldt,
                                   const int64_t *idx, int64_t n, int64_t d, int64_t nrows)
{
    EW_ROWS(r, n)
    {
        int64_t s = idx[r];
        bool ok = s >= 0 && s < nrows;
        EW_COLS(i, d)
        y[r * ldy + i] = ok ? table[s * ldt + i] : 0.0f;
    }
}

/* ---- transpose ---------------------------------------------------------- */

/* One 32 x 32 tile per block through shared memory (padded: its stores and
 * loads are conflict-free, tests/gpu_static checks), so reads and writes are
 * both coalesced. T is x's and y's one type; the tile holds the values
 * widened to F32 (exact: a 16-bit value goes back bit for bit). */
template <typename T> __global__ void transpose_kernel(T *y, const T *x, int64_t r, int64_t c)
{
    __shared__ float tile[TR_TILE][TR_TILE + 1];
    const T *xb = x + (int64_t)blockIdx.z * r * c;
    T *yb = y + (int64_t)blockIdx.z * r * c;
    int64_t c0 = (int64_t)blockIdx.x * TR_TILE, r0 = (int64_t)blockIdx.y * TR_TILE;
    for (int i = threadIdx.y; i < TR_TILE; i += blockDim.y)
        if (r0 + i < r && c0 + threadIdx.x < c)
            tile[i][threadIdx.x] = act_ld(xb + (r0 + i) * c + c0 + threadIdx.x);
    __syncthreads();
    for (int i = threadIdx.y; i < TR_TILE; i += blockDim.y)
        if (c0 + i < c && r0 + threadIdx.x < r)
            act_st(yb + (c0 + i) * r + r0 + threadIdx.x, tile[threadIdx.x][i]);
}

#endif
