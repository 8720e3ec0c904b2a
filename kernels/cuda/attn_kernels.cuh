/* The attention kernels, written once for nvcc (attn_cuda.cu launches them)
 * and for the host emulation of tests/gpu_emu (device.cuh says how).
 *
 * FlashAttention-2 style: each block owns a tile of queries of one (sample,
 * head), walks the keys in tiles through shared memory, keeps the running
 * max and sum of the softmax per row (online softmax) and the output
 * accumulator in registers or shared memory. No Lq x Lk matrix is ever
 * written to global memory.
 *
 * Two kernels:
 * - attn_mma<T, DP, WARPS>: BF16 or FP16 operands on tensor cores (mma.sync
 *   m16n8k16, FP32 accumulation), 4 or 8 warps x 16 query rows (8 from
 *   2048 queries, head dims up to 80), 64-key tiles, float4 loads when
 *   aligned,
 *   head dims padded with zeros to DP (32, 48, 64, 80, 128, 160: 40 -> 48,
 *   72 -> 80). Q, K and V are read as F32 (the backend contract) and rounded
 *   to T as they enter shared memory; V is stored transposed so that its
 *   mma fragments are single 32-bit loads.
 * - attn_f32: FP32 on CUDA cores for the fp32 compute dtype (exact to the
 *   CPU within rounding) and for head dims above 160; 16 x 16 tiles.
 *
 * Blocks: grid.x holds (sample, head) x query tile, the query tile fastest
 * (attn_grid), so batch x heads is not bound by grid.y's 65,535.
 *
 * Ragged batches (bs_attn_params.q_off, as FlashAttention's cu_seqlens):
 * samples of different lengths packed without padding. The grid is the same,
 * with the query tiles of the longest sample (lq); each block reads its
 * sample's row offsets from the device copy the entry made (attn_sample)
 * and a block past its sample's queries exits at once. Sample b's queries
 * are rows [q_off[b], q_off[b+1]) of q and o, its keys rows [k_off[b],
 * k_off[b+1]) of k and v, and its mask part starts at element m_off[b] of
 * the flat mask, one row of its keys per query or one for them all. A
 * sample without keys gives 0, as Lk = 0 does. Each kernel has an instance
 * for ragged batches and one for uniform ones (template argument RAGGED),
 * which compiles as it did before ragged batches (registers: attn_cuda.cu,
 * launch_mma_w).
 *
 * Masks (additive F32 [B, 1 or Lq, Lk]), one rule for every kernel here and
 * the CPU (kernels/cpu/attn_cpu.c; README.md, "Inputs and semantics"): each
 * mask row is shifted by its own maximum M before it is added to the scores
 * (mask_shift, mask_term), so a row at -10000 everywhere adds exactly 0 and
 * gives the softmax of the raw scores, nothing lost; a mask value <= -FLT_MAX
 * (finfo.min or -inf) masks its key (weight 0). A row whose keys are all
 * masked: with at least one key at -FLT_MAX (M = -FLT_MAX), the keys at
 * -FLT_MAX share the weight evenly (what diffusers computes: s + finfo.min
 * rounds to finfo.min for every key), so its scores are multiplied by 0
 * (score_keep); with every key at -inf, or Lk = 0, output 0. Kernels find M
 * in a first pass over the row, before the key loop. Keys past Lk are -inf.
 *
 * attn_mma rounds Q, K and V to T; a finite value that becomes inf (FP16
 * beyond 65504) sets the overflow flag (overflow.cuh) instead of returning
 * NaN unnoticed.
 *
 * Also here: softmax_rows, the softmax of the unfused baseline (the same
 * mask rule). */
#ifndef BS_CUDA_ATTN_KERNELS_CUH
#define BS_CUDA_ATTN_KERNELS_CUH

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

extern "C" {
#include "backend.h"
}

#include "device.cuh"
#include "overflow.cuh"

#define LOG2E 1.4426950408889634f

#define MMA_BK       64
#define MMA_PAD      8    /* elements of row padding: conflict-free fragment loads (gpu_static) */
#define MMA_LONG_SEQ 2048 /* from this many queries, 8 warps (128 queries) a block */

#define F32_BQ      16
#define F32_BK      16
#define F32_THREADS 128 /* 8 threads per query row */
#define F32_MAX_D   512

struct attn_args {
    const float *q, *k, *v, *mask;
    float *o;
    int64_t ldq, ldk, ldv, ldo;
    int64_t lq, lk, mask_nb0, mask_nb1, mq;
    int heads, head_dim;
    float scale;
    int vec;       /* q, k, v rows and head offsets are 16-byte aligned: float4 loads */
    int *overflow; /* attn_mma: the thread's overflow flag (overflow.cuh); set by the entry */
    /* A ragged batch (else NULL): device copies of bs_attn_params' q_off and
     * k_off (batch + 1 each) and m_off (batch, with a mask); lq and lk are
     * the largest lengths, mq is 1 or lq (mask_per_query). Set by the entry. */
    const int64_t *q_off, *k_off, *m_off;
};

/* Where one sample's rows are (attn_sample). */
struct attn_seq {
    int64_t q_row, k_row; /* its first row of q and o, and of k and v */
    int64_t lq, lk;       /* its queries and keys */
    const float *mask;    /* its first mask row, or NULL */
    int64_t mask_ld;      /* elements from one of its mask rows to the next; 0: one row */
};

/* Blocks of a launch with bq queries a block: one per (sample, head) and
 * query tile. */
static inline int64_t attn_blocks(int64_t lq, int64_t batch_heads, int bq)
{
    return (lq + bq - 1) / bq * batch_heads;
}

/* The grid of attn_mma and attn_f32 (the entry checks attn_blocks against
 * INT32_MAX first): all blocks in x, the query tile fastest. */
static inline dim3 attn_grid(int64_t lq, int64_t batch_heads, int bq)
{
    return dim3((unsigned)attn_blocks(lq, batch_heads, bq));
}

/* This block's (sample x heads + head) and first query (attn_grid's order). */
__device__ __forceinline__ void attn_block(const struct attn_args &a, int bq, int64_t *bh,
                                           int64_t *q0)
{
    int64_t q_tiles = (a.lq + bq - 1) / bq, blk = blockIdx.x;
    *bh = blk / q_tiles;
    *q0 = blk % q_tiles * bq;
}

/* Sample b's rows and mask: from the offsets in a ragged batch (the
 * kernels' template argument: their uniform instances compile without the
 * offsets), else b times the lengths and the mask's strides. */
__device__ __forceinline__ struct attn_seq attn_sample(const struct attn_args &a, int64_t b,
                                                       bool ragged)
{
    struct attn_seq s;
    if (ragged) {
        s.q_row = a.q_off[b];
        s.lq = a.q_off[b + 1] - s.q_row;
        s.k_row = a.k_off[b];
        s.lk = a.k_off[b + 1] - s.k_row;
#if defined(BS_CUDA_EMU) && defined(BS_ATTN_EMU_MUTANT)
        s.lk -= s.lk > 1; /* tests/gpu_emu's mutant build: a sample's last key lost */
#endif
        s.mask = a.mask ? a.mask + a.m_off[b] : NULL;
        s.mask_ld = a.mq == 1 ? 0 : s.lk;
    } else {
        s.q_row = b * a.lq;
        s.lq = a.lq;
        s.k_row = b * a.lk;
        s.lk = a.lk;
        s.mask = a.mask ? a.mask + b * a.mask_nb0 : NULL;
        s.mask_ld = a.mq == 1 ? 0 : a.mask_nb1;
    }
    return s;
}

/* ---- the mask rule (top of the file) -------------------------------------- */

/* The shift of a mask row whose maximum is row_max: row_max where finite
 * (-FLT_MAX included), else 0 (a row of -inf: every key masked anyway). */
__device__ __forceinline__ float mask_shift(float row_max)
{
    return fabsf(row_max) <= FLT_MAX ? row_max : 0.0f;
}

/* What mask value m adds to its key's score in a row of shift sh: m - sh, or
 * -inf for a masked key (m <= -FLT_MAX, or NaN), except in a row all masked
 * with keys at -FLT_MAX (sh = -FLT_MAX), where those give 0 and -inf keys
 * -inf. */
__device__ __forceinline__ float mask_term(float m, float sh)
{
    return m > -FLT_MAX || m == sh ? m - sh : -INFINITY; /* m == sh: -FLT_MAX in such a row */
}

/* The factor of a row's scores: 0 in a row all masked with keys at -FLT_MAX
 * (uniform weights over them), else 1. */
__device__ __forceinline__ float score_keep(float sh)
{
    return sh == -FLT_MAX ? 0.0f : 1.0f;
}

/* The kernels' arguments for an attention call the entry has checked
 * (attn_cuda.cu; the emulated tests fill theirs here too). A ragged batch's
 * offsets are p's host arrays here: the entry points them at its device
 * copies (under emulation host memory is device memory). */
static inline void attn_args_fill(struct attn_args *a, struct bs_tensor *o,
                                  const struct bs_tensor *q, const struct bs_tensor *k,
                                  const struct bs_tensor *v, const struct bs_attn_params *p)
{
    memset(a, 0, sizeof(*a));
    a->q = (const float *)q->data;
    a->k = (const float *)k->data;
    a->v = (const float *)v->data;
    a->o = (float *)o->data;
    a->ldq = bs_tensor_ld(q);
    a->ldk = bs_tensor_ld(k);
    a->ldv = bs_tensor_ld(v);
    a->ldo = bs_tensor_ld(o);
    a->lq = p->lq;
    a->lk = p->lk;
    a->heads = p->heads;
    a->head_dim = p->head_dim;
    a->scale = p->scale;
    a->vec = p->head_dim % 4 == 0 && a->ldq % 4 == 0 && a->ldk % 4 == 0 && a->ldv % 4 == 0 &&
             (uintptr_t)a->q % 16 == 0 && (uintptr_t)a->k % 16 == 0 && (uintptr_t)a->v % 16 == 0;
    if (p->q_off != NULL) {
        a->q_off = p->q_off;
        a->k_off = p->k_off;
        if (p->mask != NULL) {
            a->mask = (const float *)p->mask->data;
            a->m_off = p->m_off;
            a->mq = p->mask_per_query ? p->lq : 1;
        }
    } else if (p->mask != NULL) {
        a->mask = (const float *)p->mask->data;
        a->mq = p->mask->ne[1] == 1 ? 1 : p->lq;
        a->mask_nb0 = p->mask->nb[0] / 4;
        a->mask_nb1 = p->mask->nb[1] / 4;
    }
}

/* ---- tensor-core kernel -------------------------------------------------- */

/* Two floats rounded to T and packed in 32 bits, the lower column first (the
 * register layout of mma fragments). */
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi)
{
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

template <typename T> __device__ __forceinline__ T to_t(float x);
template <> __device__ __forceinline__ __nv_bfloat16 to_t<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half to_t<__half>(float x)
{
    return __float2half_rn(x);
}

/* d += a b: one m16n8k16 tensor-core product, FP32 accumulators. Fragment
 * layout (g = lane / 4, t = lane % 4): a0 (g, 2t..2t+1), a1 (g+8, 2t..),
 * a2 (g, 2t+8..), a3 (g+8, 2t+8..); b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g);
 * d0,d1 (g, 2t..2t+1), d2,d3 (g+8, 2t..2t+1). */
template <typename T>
__device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float d[4], const uint32_t a[4],
                                                        uint32_t b0, uint32_t b1)
{
    ptx_mma_m16n8k16_f32_bf16(d, a, b0, b1);
}
template <>
__device__ __forceinline__ void mma16816<__half>(float d[4], const uint32_t a[4], uint32_t b0,
                                                 uint32_t b1)
{
    ptx_mma_m16n8k16_f32_f16(d, a, b0, b1);
}

__device__ __forceinline__ uint32_t ld32(const void *p)
{
    return *reinterpret_cast<const uint32_t *>(p);
}

template <int DP, int WARPS> struct mma_smem {
    static constexpr int BQ = 16 * WARPS; /* queries per block */
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int QK_LD = DP + MMA_PAD;     /* row stride of Qs and Ks */
    static constexpr int VT_LD = MMA_BK + MMA_PAD; /* row stride of Vt */
    static constexpr int elems = BQ * QK_LD + MMA_BK * QK_LD + DP * VT_LD;
    static_assert(DP % 16 == 0, "padded head dim must be a multiple of 16");
    static_assert((QK_LD * 2) % 16 == 0 && (VT_LD * 2) % 16 == 0, "rows must stay 16-byte aligned");
    static_assert(MMA_BK % 16 == 0, "key tile must be a multiple of 16");
};

/* rows x DP tile of F32 rows src (row stride ld, rows_valid rows, hd columns
 * valid) into T dst (row stride dst_ld), zero-padded; transposed when TR.
 * With vec (src, ld and hd multiples of 4 floats), float4 loads: a group of 4
 * columns is either all below hd or all above.
 * The shared-memory stores are not conflict-free (tests/gpu_static's bank
 * model, worst request of a warp): with vec, the 8-byte row stores are 2-way
 * at DP 32, 48, 80 and 160 (a half-warp's stores span two rows), and the
 * transposed 16-bit stores 4-, 6-, 8-, 10-, 16- and 16-way at DP 32, 48,
 * 64, 80, 128 and 160 (a warp's stores into one column of Vt go to rows 4
 * apart, 144 words: 2 banks); without, row stores are conflict-free and
 * transposed ones 4-way. */
template <typename T, int DP, int ROWS, int THREADS, bool TR>
__device__ __forceinline__ bool load_tile(T *dst, int dst_ld, const float *src, int64_t ld,
                                          int64_t rows_valid, int hd, bool vec)
{
    bool ovf = false; /* returned: a finite value became inf in T (overflow.cuh) */
    if (vec) {
        constexpr int DV = DP / 4;
        for (int e = threadIdx.x; e < ROWS * DV; e += THREADS) {
            int r = e / DV, d = (e % DV) * 4;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (r < rows_valid && d < hd)
                v = *reinterpret_cast<const float4 *>(src + r * ld + d);
            ovf |= rounds_to_inf<T>(v.x) | rounds_to_inf<T>(v.y) | rounds_to_inf<T>(v.z) |
                   rounds_to_inf<T>(v.w);
            if (TR) {
                dst[(d + 0) * dst_ld + r] = to_t<T>(v.x);
                dst[(d + 1) * dst_ld + r] = to_t<T>(v.y);
                dst[(d + 2) * dst_ld + r] = to_t<T>(v.z);
                dst[(d + 3) * dst_ld + r] = to_t<T>(v.w);
            } else {
                uint2 u = make_uint2(pack2<T>(v.x, v.y), pack2<T>(v.z, v.w));
                *reinterpret_cast<uint2 *>(dst + r * dst_ld + d) = u;
            }
        }
        return ovf;
    }
    for (int e = threadIdx.x; e < ROWS * DP; e += THREADS) {
        int r = e / DP, d = e % DP;
        float v = r < rows_valid && d < hd ? src[r * ld + d] : 0.0f;
        ovf |= rounds_to_inf<T>(v);
        if (TR)
            dst[d * dst_ld + r] = to_t<T>(v);
        else
            dst[r * dst_ld + d] = to_t<T>(v);
    }
    return ovf;
}

template <typename T, int DP, int WARPS, bool RAGGED>
__global__ void __launch_bounds__(32 * WARPS) attn_mma(struct attn_args a)
{
    using S = mma_smem<DP, WARPS>;
    constexpr int KS = DP / 16;    /* k-steps of q.k */
    constexpr int NT = MMA_BK / 8; /* n-tiles of scores */
    constexpr int DT = DP / 8;     /* n-tiles of the output */
    BS_DYNAMIC_SMEM(unsigned char, smem_raw);
    T *qs = reinterpret_cast<T *>(smem_raw);
    T *ks = qs + S::BQ * S::QK_LD;
    T *vt = ks + MMA_BK * S::QK_LD;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int64_t bh, q0;
    attn_block(a, S::BQ, &bh, &q0);
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const struct attn_seq sq = attn_sample(a, b, RAGGED);
    if (RAGGED && q0 >= sq.lq) /* past this sample's queries */
        return;
    const int hd = a.head_dim;
    const float *qg = a.q + (sq.q_row + q0) * a.ldq + h * hd;
    bool ovf =
        load_tile<T, DP, S::BQ, S::THREADS, false>(qs, S::QK_LD, qg, a.ldq, sq.lq - q0, hd, a.vec);

    /* This thread's two query rows, their mask rows and the rows' shifts:
     * the 4 lanes of a row take every 4th key for its maximum. */
    const int r0 = warp * 16 + g;
    int64_t qa = q0 + r0, qb = qa + 8;
    const float *mrow0 = NULL, *mrow1 = NULL;
    float sh0 = 0.0f, sh1 = 0.0f;
    if (a.mask) {
        mrow0 = sq.mask + (qa < sq.lq ? qa : sq.lq - 1) * sq.mask_ld;
        mrow1 = sq.mask + (qb < sq.lq ? qb : sq.lq - 1) * sq.mask_ld;
        float mm0 = -INFINITY, mm1 = -INFINITY;
        for (int64_t key = t; key < sq.lk; key += 4) {
            mm0 = fmaxf(mm0, mrow0[key]);
            mm1 = fmaxf(mm1, mrow1[key]);
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            mm0 = fmaxf(mm0, __shfl_xor_sync(0xffffffffu, mm0, off));
            mm1 = fmaxf(mm1, __shfl_xor_sync(0xffffffffu, mm1, off));
        }
        sh0 = mask_shift(mm0);
        sh1 = mask_shift(mm1);
    }
    const float sl2_0 = a.scale * LOG2E * score_keep(sh0),
                sl2_1 = a.scale * LOG2E * score_keep(sh1);

    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++)
        o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f; /* log2 domain */

    for (int64_t k0 = 0; k0 < sq.lk; k0 += MMA_BK) {
        __syncthreads(); /* the previous tile is consumed (and Qs is written) */
        const float *kg = a.k + (sq.k_row + k0) * a.ldk + h * hd;
        const float *vg = a.v + (sq.k_row + k0) * a.ldv + h * hd;
        ovf |= load_tile<T, DP, MMA_BK, S::THREADS, false>(ks, S::QK_LD, kg, a.ldk, sq.lk - k0, hd,
                                                           a.vec);
        ovf |= load_tile<T, DP, MMA_BK, S::THREADS, true>(vt, S::VT_LD, vg, a.ldv, sq.lk - k0, hd,
                                                          a.vec);
        __syncthreads();

        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++)
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            const T *qr = qs + r0 * S::QK_LD + kk * 16 + 2 * t;
            uint32_t fa[4] = {ld32(qr), ld32(qr + 8 * S::QK_LD), ld32(qr + 8),
                              ld32(qr + 8 * S::QK_LD + 8)};
#pragma unroll
            for (int n = 0; n < NT; n++) {
                const T *kr = ks + (n * 8 + g) * S::QK_LD + kk * 16 + 2 * t;
                mma16816<T>(s[n], fa, ld32(kr), ld32(kr + 8));
            }
        }

        /* Scores in the log2 domain, masked; the new row maxima. */
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int64_t key = k0 + n * 8 + 2 * t + (e & 1);
                float v = -INFINITY;
                if (key < sq.lk) {
                    v = s[n][e] * (e < 2 ? sl2_0 : sl2_1);
                    if (a.mask)
                        v += mask_term((e < 2 ? mrow0 : mrow1)[key], e < 2 ? sh0 : sh1) * LOG2E;
                }
                s[n][e] = v;
                if (e < 2)
                    mx0 = fmaxf(mx0, v);
                else
                    mx1 = fmaxf(mx1, v);
            }
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        float ref0 = mx0 == -INFINITY ? 0.0f : mx0, ref1 = mx1 == -INFINITY ? 0.0f : mx1;
        float c0 = exp2f(m0 - ref0), c1 = exp2f(m1 - ref1); /* 0 while m is -inf */
        m0 = mx0;
        m1 = mx1;
        float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
        for (int n = 0; n < NT; n++) {
            s[n][0] = exp2f(s[n][0] - ref0);
            s[n][1] = exp2f(s[n][1] - ref0);
            s[n][2] = exp2f(s[n][2] - ref1);
            s[n][3] = exp2f(s[n][3] - ref1);
            sum0 += s[n][0] + s[n][1];
            sum1 += s[n][2] + s[n][3];
        }
        l0 = l0 * c0 + sum0; /* per-thread partial sums, reduced at the end */
        l1 = l1 * c1 + sum1;
#pragma unroll
        for (int i = 0; i < DT; i++) {
            o[i][0] *= c0;
            o[i][1] *= c0;
            o[i][2] *= c1;
            o[i][3] *= c1;
        }

        /* o += P V: the score accumulators of n-tiles 2j, 2j+1 are exactly
         * the A fragment of k-step j. */
#pragma unroll
        for (int j = 0; j < MMA_BK / 16; j++) {
            uint32_t pa[4] = {pack2<T>(s[2 * j][0], s[2 * j][1]),
                              pack2<T>(s[2 * j][2], s[2 * j][3]),
                              pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]),
                              pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
            for (int i = 0; i < DT; i++) {
                const T *vr = vt + (i * 8 + g) * S::VT_LD + j * 16 + 2 * t;
                mma16816<T>(o[i], pa, ld32(vr), ld32(vr + 8));
            }
        }
    }

#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    if (ovf)
        *(volatile int *)a.overflow = BS_OVF_ATTENTION;
    float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    float *og = a.o + sq.q_row * a.ldo + h * hd;
#pragma unroll
    for (int i = 0; i < DT; i++) {
        int d = i * 8 + 2 * t;
#pragma unroll
        for (int e = 0; e < 2; e++) {
            if (d + e >= hd)
                continue;
            if (qa < sq.lq)
                og[qa * a.ldo + d + e] = o[i][e] * inv0;
            if (qb < sq.lq)
                og[qb * a.ldo + d + e] = o[i][2 + e] * inv1;
        }
    }
}

/* The instantiated padded head dims; 0 when hd is above them all. */
static inline int mma_dp(int hd)
{
    static const int dps[] = {32, 48, 64, 80, 128, 160};
    for (int i = 0; i < (int)(sizeof(dps) / sizeof(dps[0])); i++)
        if (hd <= dps[i])
            return dps[i];
    return 0;
}

/* ---- FP32 kernel ---------------------------------------------------------- */

/* Dynamic shared memory of attn_f32 for head dim hd. */
static inline size_t attn_f32_smem(int hd)
{
    return ((size_t)(2 * F32_BQ + 2 * F32_BK) * hd + F32_BQ * F32_BK) * sizeof(float);
}

/* 16 query rows per block, 8 threads per row; shared memory holds the Q, K,
 * V tiles, the output accumulator and the probabilities: 256 hd + 1 KiB. */
template <bool RAGGED> __global__ void __launch_bounds__(F32_THREADS) attn_f32(struct attn_args a)
{
    BS_DYNAMIC_SMEM(float, sm);
    const int hd = a.head_dim;
    float *qs = sm, *ks = qs + F32_BQ * hd, *vs = ks + F32_BK * hd, *os = vs + F32_BK * hd;
    float *ps = os + F32_BQ * hd; /* [F32_BQ][F32_BK] */
    const int row = threadIdx.x >> 3, sub = threadIdx.x & 7;
    int64_t bh, q0;
    attn_block(a, F32_BQ, &bh, &q0);
    const int64_t b = bh / a.heads, h = bh % a.heads, qi = q0 + row;
    const struct attn_seq sq = attn_sample(a, b, RAGGED);
    if (RAGGED && q0 >= sq.lq) /* past this sample's queries */
        return;
    for (int e = threadIdx.x; e < F32_BQ * hd; e += F32_THREADS) {
        int r = e / hd, d = e % hd;
        qs[e] = q0 + r < sq.lq ? a.q[(sq.q_row + q0 + r) * a.ldq + h * hd + d] : 0.0f;
        os[e] = 0.0f;
    }
    const float *mrow = NULL;
    float sh = 0.0f; /* the mask row's shift: its 8 lanes take every 8th key for the maximum */
    if (a.mask) {
        mrow = sq.mask + (qi < sq.lq ? qi : sq.lq - 1) * sq.mask_ld;
        float mm = -INFINITY;
        for (int64_t key = sub; key < sq.lk; key += 8)
            mm = fmaxf(mm, mrow[key]);
        for (int off = 1; off < 8; off <<= 1)
            mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, off));
        sh = mask_shift(mm);
    }
    const float scale = a.scale * score_keep(sh);
    float m = -INFINITY, l = 0.0f;
    for (int64_t k0 = 0; k0 < sq.lk; k0 += F32_BK) {
        __syncthreads();
        for (int e = threadIdx.x; e < F32_BK * hd; e += F32_THREADS) {
            int r = e / hd, d = e % hd;
            bool ok = k0 + r < sq.lk;
            ks[e] = ok ? a.k[(sq.k_row + k0 + r) * a.ldk + h * hd + d] : 0.0f;
            vs[e] = ok ? a.v[(sq.k_row + k0 + r) * a.ldv + h * hd + d] : 0.0f;
        }
        __syncthreads();
        float sc[2], mx = m;
        for (int jj = 0; jj < 2; jj++) {
            int j = sub + 8 * jj;
            float v = -INFINITY;
            if (k0 + j < sq.lk) {
                float dot = 0.0f;
                for (int d = 0; d < hd; d++)
                    dot = fmaf(qs[row * hd + d], ks[j * hd + d], dot);
                v = dot * scale + (mrow ? mask_term(mrow[k0 + j], sh) : 0.0f);
            }
            sc[jj] = v;
            mx = fmaxf(mx, v);
        }
        for (int off = 1; off < 8; off <<= 1)
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        float ref = mx == -INFINITY ? 0.0f : mx, corr = expf(m - ref), sum = 0.0f;
        m = mx;
        for (int jj = 0; jj < 2; jj++) {
            float p = expf(sc[jj] - ref);
            ps[row * F32_BK + sub + 8 * jj] = p;
            sum += p;
        }
        for (int off = 1; off < 8; off <<= 1)
            sum += __shfl_xor_sync(0xffffffffu, sum, off);
        l = l * corr + sum;
        __syncwarp(); /* the row's probabilities come from its own 8 lanes */
        for (int d = sub; d < hd; d += 8) {
            float acc = os[row * hd + d] * corr;
            for (int j = 0; j < F32_BK; j++)
                acc = fmaf(ps[row * F32_BK + j], vs[j * hd + d], acc);
            os[row * hd + d] = acc;
        }
    }
    __syncthreads(); /* with no keys, os was zeroed by other threads */
    if (qi >= sq.lq)
        return;
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int d = sub; d < hd; d += 8)
        a.o[(sq.q_row + qi) * a.ldo + h * hd + d] = os[row * hd + d] * inv;
}

/* ---- unfused baseline's softmax ------------------------------------------ */

/* The max (MAX) or sum of v over the block (blockDim.x a multiple of 32);
 * every thread gets it. red: 32 floats of shared memory. */
template <bool MAX> __device__ __forceinline__ float block_reduce(float v, float *red)
{
    for (int o = 16; o > 0; o >>= 1) {
        float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = MAX ? fmaxf(v, u) : v + u;
    }
    __syncthreads(); /* red may still be read from a previous call */
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = MAX ? -INFINITY : 0.0f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++)
        v = MAX ? fmaxf(v, red[i]) : v + red[i];
    return v;
}

/* Row softmax of S (rows of lk, T = compute type) in place, with the mask
 * added first by the rule at the top (a first pass finds the mask row's
 * shift); one block per row of (head, query). */
template <typename T>
__global__ void softmax_rows(T *s, int64_t lk, int64_t lq, const float *mask, int64_t mask_nb1,
                             int64_t mq)
{
    __shared__ float red[32];
    int64_t row = blockIdx.x, qi = row % lq;
    T *sr = s + row * lk;
    const float *mr = mask ? mask + (mq == 1 ? 0 : qi) * mask_nb1 : NULL;
    float sh = 0.0f;
    if (mr) {
        float mm = -INFINITY;
        for (int64_t i = threadIdx.x; i < lk; i += blockDim.x)
            mm = fmaxf(mm, mr[i]);
        sh = mask_shift(block_reduce<true>(mm, red));
    }
    const float keep = score_keep(sh);
#define SCORE(i) ((float)sr[i] * keep + (mr ? mask_term(mr[i], sh) : 0.0f))
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < lk; i += blockDim.x)
        mx = fmaxf(mx, SCORE(i));
    mx = block_reduce<true>(mx, red);
    float ref = mx == -INFINITY ? 0.0f : mx, sum = 0.0f;
    for (int64_t i = threadIdx.x; i < lk; i += blockDim.x)
        sum += expf(SCORE(i) - ref);
    sum = block_reduce<false>(sum, red);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int64_t i = threadIdx.x; i < lk; i += blockDim.x)
        sr[i] = (T)(expf(SCORE(i) - ref) * inv);
#undef SCORE
}

#endif
