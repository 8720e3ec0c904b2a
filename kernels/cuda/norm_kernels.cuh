/* The kernels of layer norm and group norm with their affine and modulation
 * parameters, written once for nvcc (norm_cuda.cu launches them) and for the
 * host emulation of tests/gpu_emu (device.cuh says how). x and y are each
 * F32, BF16 or F16 (act_io.cuh; the kernels are templated on both); gamma,
 * beta and the modulation rows are F32. Arithmetic is FP32 with statistics
 * merged in double, the CPU twin's formula (kernels/cpu/ops_cpu.c,
 * moments): the mean as a float pair hi + lo and deviations (x - hi) - lo,
 * so rows like 1000 + noise stay accurate.
 *
 * Layer norm (ln_kernel): a team of LN_TX threads per row (a warp for rows
 * up to 1024 values, up to the block's 256 threads for 8192), several rows a
 * block; each thread holds its part of the row in registers (LN_CHUNKS
 * chunks of 8 values, read with 16-byte loads where the row is aligned), so
 * x is read once: mean, variance of the deviations (two passes over the
 * registers) and the output. Longer rows take ln_wide_kernel (a block per
 * row, x read three times). y may be x (same dtype): every thread reads its
 * values before the row's first reduction and writes only those after it.
 *
 * Group norm: two kernels over groups x chunks blocks (gn_plan: enough
 * chunks that batch 1 fills the GPU). gn_stats_kernel holds one chunk of a
 * group in registers and writes its mean and sum of squared deviations
 * (double) to the partials; gn_norm_kernel merges the group's partials with
 * Chan's parallel formula (a warp, in double) and writes its chunk of y. y
 * may be x: gn_norm reads and writes each element in one thread, after
 * gn_stats (the stream orders them). */
#ifndef BS_CUDA_NORM_KERNELS_CUH
#define BS_CUDA_NORM_KERNELS_CUH

#include <stdint.h>
#include <string.h>

extern "C" {
#include "backend.h"
}

#include "act_io.cuh"
#include "device.cuh"

#define NORM_THREADS 256 /* threads a block, both norms */
#define NORM_VEC     8   /* values a chunk: 16 bytes of BF16/F16, 32 of F32 */
#define LN_CHUNKS    4   /* chunks a thread holds of a row */
#define LN_MAX_D     (NORM_THREADS * LN_CHUNKS * NORM_VEC) /* 8192: longer rows go wide */
#define GN_CHUNKS    2                                     /* chunks a thread holds in gn_stats */
#define GN_CHUNK_MAX (NORM_THREADS * GN_CHUNKS * NORM_VEC) /* 4096 values a block */
#define GN_CHUNK_MIN 512 /* no smaller chunks (2 values a thread) to fill the GPU */
#define GN_BLOCKS_SM 8   /* blocks of NORM_THREADS an SM holds (2048 threads) */

/* ---- loads and stores ------------------------------------------------- */

/* Whether rows at p with stride ld (elements of es bytes) take 16-byte
 * accesses of chunks starting at multiples of NORM_VEC. */
static inline bool norm_vec_ok(const void *p, int64_t ld, size_t es)
{
    return (uintptr_t)p % 16 == 0 && (ld * (int64_t)es) % 16 == 0;
}

/* o[0..7] = p[i..i+8), widened; one or two 16-byte loads when vec and the
 * chunk is whole, else scalar loads of the values below n (0 past it). */
template <typename T>
__device__ __forceinline__ void ld_chunk(float *o, const T *p, int64_t i, int64_t n, bool vec)
{
    constexpr int Q = NORM_VEC * (int)sizeof(T) / 16;
    if (vec && i + NORM_VEC <= n) {
        uint4 u[Q];
        for (int q = 0; q < Q; q++)
            u[q] = reinterpret_cast<const uint4 *>(p + i)[q];
        T e[NORM_VEC];
        memcpy(e, u, sizeof(e));
        for (int k = 0; k < NORM_VEC; k++)
            o[k] = act_ld(&e[k]);
    } else {
        for (int k = 0; k < NORM_VEC; k++)
            o[k] = i + k < n ? act_ld(p + i + k) : 0.0f;
    }
}

/* p[i..i+8) = v rounded to T, only the values below n. */
template <typename T>
__device__ __forceinline__ void st_chunk(T *p, const float *v, int64_t i, int64_t n, bool vec)
{
    constexpr int Q = NORM_VEC * (int)sizeof(T) / 16;
    if (vec && i + NORM_VEC <= n) {
        T e[NORM_VEC];
        for (int k = 0; k < NORM_VEC; k++)
            act_st(&e[k], v[k]);
        uint4 u[Q];
        memcpy(u, e, sizeof(e));
        for (int q = 0; q < Q; q++)
            reinterpret_cast<uint4 *>(p + i)[q] = u[q];
    } else {
        for (int k = 0; k < NORM_VEC; k++)
            if (i + k < n)
                act_st(p + i + k, v[k]);
    }
}

/* ---- reductions --------------------------------------------------------- */

__device__ __forceinline__ double warp_sum_d(double v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Sum over the team of threads with the caller's threadIdx.y (blockDim.x
 * threads, a multiple of 32); every member gets it, summed in a fixed order.
 * red holds a value per warp of the block; a team of one warp uses no
 * shared memory and no barrier (blockDim.x is uniform, so every thread of
 * the block takes the same branch). Each call site passes its own red, so
 * no barrier is needed before the writes. */
__device__ __forceinline__ double team_sum(double v, double *red)
{
    v = warp_sum_d(v);
    if (blockDim.x == 32)
        return v;
    int wpr = (int)(blockDim.x >> 5), w0 = (int)threadIdx.y * wpr;
    if ((threadIdx.x & 31) == 0)
        red[w0 + (int)(threadIdx.x >> 5)] = v;
    __syncthreads();
    double s = 0.0;
    for (int i = 0; i < wpr; i++)
        s += red[w0 + i];
    return s;
}

/* Mean as hi + lo and 1/sqrt(var + eps), from the sum and sum of squared
 * deviations (about hi + lo of the same mean) of n values. */
struct norm_stats {
    float hi, lo, rstd;
};

__device__ __forceinline__ void norm_split(norm_stats *st, double mean)
{
    st->hi = (float)mean;
    st->lo = (float)(mean - (double)st->hi);
}

/* ---- layer norm --------------------------------------------------------- */

struct ln_args {
    const void *x;
    void *y;
    int64_t rows, d, ldx, ldy, rows_per_sample;
    float eps;
    const float *gamma, *beta, *scale, *shift;
    int64_t ld_scale, ld_shift;
    bool vec_x, vec_y; /* norm_vec_ok of x and y */
};

/* The launch of ln_kernel for rows of d: threads a row (a multiple of 32
 * dividing NORM_THREADS, the fewest whose registers hold the row), rows a
 * block, blocks; wide when the row is longer than LN_MAX_D (ln_wide_kernel,
 * a block of NORM_THREADS per row). */
struct ln_plan {
    bool wide;
    dim3 grid, block;
};

static inline ln_plan ln_plan_make(int64_t rows, int64_t d)
{
    ln_plan p;
    p.wide = d > LN_MAX_D;
    if (p.wide) {
        p.grid = dim3((unsigned)rows);
        p.block = dim3(NORM_THREADS);
        return p;
    }
    int64_t chunks = (d + NORM_VEC - 1) / NORM_VEC;
    int tx = 32;
    while ((int64_t)tx * LN_CHUNKS < chunks)
        tx *= 2;
    int ty = NORM_THREADS / tx;
    p.grid = dim3((unsigned)((rows + ty - 1) / ty));
    p.block = dim3((unsigned)tx, (unsigned)ty);
    return p;
}

/* y = modulated affine of the normalised value v of column i, the CPU's
 * order of operations. */
__device__ __forceinline__ float ln_out(const ln_args &a, const float *sc, const float *sh, float v,
                                        int64_t i)
{
    if (a.gamma)
        v *= a.gamma[i];
    if (a.beta)
        v += a.beta[i];
    if (sc)
        v *= 1.0f + sc[i];
    if (sh)
        v += sh[i];
    return v;
}

/* Team threadIdx.y of block blockIdx.x normalises row blockIdx.x *
 * blockDim.y + threadIdx.y; thread t holds chunks t, t + blockDim.x, ...
 * (LN_CHUNKS of them). Threads past the last row take part in the
 * reductions' barriers only. */
template <typename TX, typename TY>
__global__ void __launch_bounds__(NORM_THREADS) ln_kernel(struct ln_args a)
{
    __shared__ double red_mean[NORM_THREADS / 32], red_var[NORM_THREADS / 32];
    int64_t r = (int64_t)blockIdx.x * blockDim.y + threadIdx.y, d = a.d;
    bool live = r < a.rows;
    const TX *x = (const TX *)a.x + (live ? r : 0) * a.ldx;
    TY *y = (TY *)a.y + (live ? r : 0) * a.ldy;
    int64_t stride = (int64_t)blockDim.x * NORM_VEC, j0 = (int64_t)threadIdx.x * NORM_VEC;
    float v[LN_CHUNKS][NORM_VEC];
    /* the sum: each thread's values about its first value, then in double */
    float piv = 0.0f, s = 0.0f;
    int cnt = 0;
#pragma unroll
    for (int c = 0; c < LN_CHUNKS; c++) {
        int64_t j = j0 + c * stride;
        if (live && j < d) {
            ld_chunk(v[c], x, j, d, a.vec_x);
            if (c == 0)
                piv = v[0][0];
            for (int k = 0; k < NORM_VEC; k++)
                if (j + k < d) {
                    s += v[c][k] - piv;
                    cnt++;
                }
        }
    }
    norm_stats st;
    norm_split(&st, team_sum((double)cnt * piv + (double)s, red_mean) / (double)d);
    float q = 0.0f;
#pragma unroll
    for (int c = 0; c < LN_CHUNKS; c++) {
        int64_t j = j0 + c * stride;
        if (live && j < d)
            for (int k = 0; k < NORM_VEC; k++)
                if (j + k < d) {
                    float dv = (v[c][k] - st.hi) - st.lo;
                    q += dv * dv;
                }
    }
    st.rstd = (float)(1.0 / sqrt(team_sum((double)q, red_var) / (double)d + (double)a.eps));
    if (!live)
        return;
    int64_t b = r / a.rows_per_sample;
    const float *sc = a.scale ? a.scale + b * a.ld_scale : NULL;
    const float *sh = a.shift ? a.shift + b * a.ld_shift : NULL;
#pragma unroll
    for (int c = 0; c < LN_CHUNKS; c++) {
        int64_t j = j0 + c * stride;
        if (j < d) {
            for (int k = 0; k < NORM_VEC; k++)
                v[c][k] = ln_out(a, sc, sh, ((v[c][k] - st.hi) - st.lo) * st.rstd, j + k);
            st_chunk(y, v[c], j, d, a.vec_y);
        }
    }
}

/* Rows longer than the registers hold (d > LN_MAX_D): one block per row,
 * x read three times (mean, variance, output), sums in double. */
template <typename TX, typename TY>
__global__ void __launch_bounds__(NORM_THREADS) ln_wide_kernel(struct ln_args a)
{
    __shared__ double red_mean[NORM_THREADS / 32], red_var[NORM_THREADS / 32];
    int64_t r = blockIdx.x, d = a.d;
    const TX *x = (const TX *)a.x + r * a.ldx;
    TY *y = (TY *)a.y + r * a.ldy;
    float piv = act_ld(x);
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
        s += (double)(act_ld(x + i) - piv);
    norm_stats st;
    norm_split(&st, (double)piv + team_sum(s, red_mean) / (double)d);
    s = 0.0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        float dv = (act_ld(x + i) - st.hi) - st.lo;
        s += (double)dv * dv;
    }
    st.rstd = (float)(1.0 / sqrt(team_sum(s, red_var) / (double)d + (double)a.eps));
    int64_t b = r / a.rows_per_sample;
    const float *sc = a.scale ? a.scale + b * a.ld_scale : NULL;
    const float *sh = a.shift ? a.shift + b * a.ld_shift : NULL;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
        act_st(y + i, ln_out(a, sc, sh, ((act_ld(x + i) - st.hi) - st.lo) * st.rstd, i));
}

/* ---- group norm --------------------------------------------------------- */

struct gn_args {
    const void *x;
    void *y;
    int64_t channels, spatial, groups; /* per sample */
    int64_t n, chunk, chunks; /* values a group, a chunk (a multiple of 8), chunks a group */
    float eps;
    const float *gamma, *beta, *scale, *shift;
    int64_t ld_scale, ld_shift;
    double *part; /* 2 per (sample, group, chunk): mean, sum of squared deviations */
    bool vec_x, vec_y;
};

/* Chunks a group for bsz x groups groups of n values on a GPU of sms SMs:
 * at least enough that every chunk fits gn_stats' registers, and enough
 * that the blocks fill every SM (GN_BLOCKS_SM each) when the chunks keep
 * GN_CHUNK_MIN values; sets chunk and chunks. */
static inline void gn_plan(gn_args *a, int64_t bsz, int sms)
{
    int64_t n = a->n, tot = bsz * a->groups;
    int64_t k = (n + GN_CHUNK_MAX - 1) / GN_CHUNK_MAX;
    int64_t want = ((int64_t)sms * GN_BLOCKS_SM + tot - 1) / tot;
    int64_t most = n / GN_CHUNK_MIN;
    if (want > most)
        want = most;
    if (k < want)
        k = want;
    if (k < 1)
        k = 1;
    int64_t len = (n + k - 1) / k;
    len = (len + NORM_VEC - 1) / NORM_VEC * NORM_VEC;
    a->chunk = len;
    a->chunks = (n + len - 1) / len;
}

/* Block (group, chunk) = blockIdx.x / chunks, % chunks: its chunk's mean and
 * sum of squared deviations, two passes over the registers. */
template <typename TX>
__global__ void __launch_bounds__(NORM_THREADS) gn_stats_kernel(struct gn_args a)
{
    __shared__ double red_mean[NORM_THREADS / 32], red_var[NORM_THREADS / 32];
    int64_t g = blockIdx.x / a.chunks, k = blockIdx.x % a.chunks;
    int64_t c0 = k * a.chunk, len = a.n - c0 < a.chunk ? a.n - c0 : a.chunk;
    const TX *x = (const TX *)a.x + g * a.n + c0;
    int64_t j0 = (int64_t)threadIdx.x * NORM_VEC, stride = (int64_t)NORM_THREADS * NORM_VEC;
    float v[GN_CHUNKS][NORM_VEC];
    float piv = 0.0f, s = 0.0f;
    int cnt = 0;
#pragma unroll
    for (int c = 0; c < GN_CHUNKS; c++) {
        int64_t j = j0 + c * stride;
        if (j < len) {
            ld_chunk(v[c], x, j, len, a.vec_x);
            if (c == 0)
                piv = v[0][0];
            for (int e = 0; e < NORM_VEC; e++)
                if (j + e < len) {
                    s += v[c][e] - piv;
                    cnt++;
                }
        }
    }
    double mean = team_sum((double)cnt * piv + (double)s, red_mean) / (double)len;
    norm_stats st;
    norm_split(&st, mean);
    float q = 0.0f;
#pragma unroll
    for (int c = 0; c < GN_CHUNKS; c++) {
        int64_t j = j0 + c * stride;
        if (j < len)
            for (int e = 0; e < NORM_VEC; e++)
                if (j + e < len) {
                    float dv = (v[c][e] - st.hi) - st.lo;
                    q += dv * dv;
                }
    }
    double m2 = team_sum((double)q, red_var);
    if (threadIdx.x == 0) {
        a.part[2 * blockIdx.x] = mean;
        a.part[2 * blockIdx.x + 1] = m2;
    }
}

/* The statistics of group g from its chunks' partials (Chan et al.: the
 * sums of squares about each chunk's mean plus n_k (mean_k - mean)^2),
 * merged by the warp in double; every lane gets them. */
__device__ __forceinline__ norm_stats gn_merge(const gn_args &a, int64_t g)
{
    const double *p = a.part + 2 * g * a.chunks;
    int lane = (int)(threadIdx.x & 31);
    double s = 0.0;
    for (int64_t k = lane; k < a.chunks; k += 32) {
        int64_t nk = a.n - k * a.chunk < a.chunk ? a.n - k * a.chunk : a.chunk;
        s += (double)nk * p[2 * k];
    }
    double mean = warp_sum_d(s) / (double)a.n;
    s = 0.0;
    for (int64_t k = lane; k < a.chunks; k += 32) {
        int64_t nk = a.n - k * a.chunk < a.chunk ? a.n - k * a.chunk : a.chunk;
        double dm = p[2 * k] - mean;
        s += p[2 * k + 1] + (double)nk * dm * dm;
    }
    norm_stats st;
    norm_split(&st, mean);
    st.rstd = (float)(1.0 / sqrt(warp_sum_d(s) / (double)a.n + (double)a.eps));
    return st;
}

/* Channel ch of sample b: y = ((x - hi) - lo) * mul + off folds the affine
 * and the modulation, as on the CPU. */
__device__ __forceinline__ void gn_coef(const gn_args &a, float rstd, int64_t b, int64_t ch,
                                        float *mul, float *off)
{
    float k = a.gamma ? rstd * a.gamma[ch] : rstd;
    float o = a.beta ? a.beta[ch] : 0.0f;
    if (a.scale) {
        float s1 = 1.0f + a.scale[b * a.ld_scale + ch];
        k *= s1;
        o *= s1;
    }
    if (a.shift)
        o += a.shift[b * a.ld_shift + ch];
    *mul = k;
    *off = o;
}

/* Block (group, chunk), as gn_stats_kernel: the chunk of y, a chunk of 8 a
 * thread at a time. Positions in the group are 32-bit (the entry refuses
 * groups of 2^32 values or more): 64-bit divisions cost registers. */
template <typename TX, typename TY>
__global__ void __launch_bounds__(NORM_THREADS) gn_norm_kernel(struct gn_args a)
{
    int64_t g = blockIdx.x / a.chunks, k = blockIdx.x % a.chunks;
    int64_t b = g / a.groups;
    uint32_t s = (uint32_t)a.spatial, cpg = (uint32_t)(a.channels / a.groups);
    uint32_t c0 = (uint32_t)(k * a.chunk);
    int len = (int)(a.n - c0 < a.chunk ? a.n - c0 : a.chunk);
    const TX *x = (const TX *)a.x + g * a.n + c0;
    TY *y = (TY *)a.y + g * a.n + c0;
    norm_stats st = gn_merge(a, g);
    int64_t ch_base = (g % a.groups) * cpg;
    for (int j = (int)threadIdx.x * NORM_VEC; j < len; j += NORM_THREADS * NORM_VEC) {
        float v[NORM_VEC], mul, off;
        ld_chunk(v, x, j, len, a.vec_x);
        uint32_t pos = c0 + (uint32_t)j, ch = pos / s, rem = pos - ch * s;
        gn_coef(a, st.rstd, b, ch_base + ch, &mul, &off);
        for (int e = 0; e < NORM_VEC; e++) {
            if (rem == s) { /* the chunk crosses into the next channel */
                ch++;
                rem = 0;
                if (ch < cpg)
                    gn_coef(a, st.rstd, b, ch_base + ch, &mul, &off);
            }
            v[e] = ((v[e] - st.hi) - st.lo) * mul + off;
            rem++;
        }
        st_chunk(y, v, j, len, a.vec_y);
    }
}

#endif
