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
 * - attn_mma<T, DP, WARPS, RAGGED, TO>: BF16 or FP16 operands on tensor cores
 *   (mma.sync m16n8k16, FP32 accumulation), FlashAttention-2 class: 4 or 8
 *   warps x 16 query rows (mma_warps), Q fragments loaded once with
 *   ldmatrix and kept in registers, K and V (16-bit, from the conversion
 *   pass attn_to16 or from 16-bit activations: struct attn_src16) in
 *   64-key tiles through a 2-stage cp.async pipeline, fragments by
 *   ldmatrix.x4 (.trans for V) from padded rows (conflict-free copies and
 *   reads: tests/gpu_static), mask tiles staged in shared memory, bounds
 *   checks only on the last key tile; head dims padded with zeros to DP
 *   (32, 48, 64, 80, 128, 160: 40 -> 48, 72 -> 80). No GPU has run it:
 *   tests/gpu_emu runs it under emulation, tests/gpu_static models it.
 * - attn_f32<TI, TO, RAGGED>: FP32 on CUDA cores for the fp32 compute dtype
 *   (exact to the CPU within rounding) and for head dims above 160; 16 x 16
 *   tiles; reads q, k, v of TI and writes o of TO (F32, BF16 or F16 each).
 * Both round each output value once to o's type (act_io.cuh; attn_mma's
 * TO is F32 or T).
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
 * attn_to16 rounds Q, K and V to T for attn_mma; a finite value that
 * becomes inf (FP16 beyond 65504) sets the overflow flag (overflow.cuh)
 * instead of returning NaN unnoticed.
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

#include "act_io.cuh"
#include "device.cuh"
#include "overflow.cuh"

#define LOG2E 1.4426950408889634f

#define MMA_BK       64
#define MMA_PAD      8 /* elements of row padding: conflict-free copies and ldmatrix (gpu_static) */
#define MMA_SLOTS_8W 1 /* 8-warp blocks an SM holds at least (sm_80, sm_90: gpu_static) */

#define F32_BQ      16
#define F32_BK      16
#define F32_THREADS 128 /* 8 threads per query row */
#define F32_MAX_D   512

struct attn_args {
    /* q, k, v in one activation dtype, o in one too (F32, BF16 or F16: the
     * kernels' template arguments say which; engine/backend.h) */
    const void *q, *k, *v;
    const float *mask;
    void *o;
    int64_t ldq, ldk, ldv, ldo;
    int64_t lq, lk, mask_nb0, mask_nb1, mq;
    int heads, head_dim;
    float scale;
    int vec; /* q, k, v (F32) rows and head offsets 16-byte aligned (tests/gpu_emu's case names) */
    int *overflow; /* attn_to16: the thread's overflow flag (overflow.cuh); set by the entry */
    /* attn_mma's operands in its dtype (struct attn_src16): set by
     * attn_src16_set from the conversion pass's buffers or from 16-bit
     * activations; attn_f32 reads q, k, v. */
    const void *qh, *kh, *vh;
    int64_t ldqh, ldkh, ldvh;
    int hs;
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
    a->q = q->data;
    a->k = k->data;
    a->v = v->data;
    a->o = o->data;
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

/* d += a b: one m16n8k16 tensor-core product, FP32 accumulators (fragment
 * layouts: ptx.cuh). */
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

/* The 16-bit operands attn_mma reads: Q, K and V in T, rows 16-byte aligned
 * (row strides multiples of 8 elements), head h's columns from h * hs (hs a
 * multiple of 8, at least head_dim), zero from head_dim to the next multiple
 * of 8. attn_to16 makes them from the F32 activations; 16-bit activations
 * that already have this shape need no pass (attn_src16_ok). */
struct attn_src16 {
    const void *q, *k, *v;
    int64_t ldq, ldk, ldv;
    int hs;
};

/* Head dim hd rounded up to the 16-byte chunks of 8 elements. */
static inline int attn_hs(int hd)
{
    return (hd + 7) / 8 * 8;
}

/* Whether 16-bit tensors (element pointers and row strides in elements) can
 * be read as they are: 16-byte aligned rows and heads. */
static inline bool attn_src16_ok(const void *q, int64_t ldq, const void *k, int64_t ldk,
                                 const void *v, int64_t ldv, int hd)
{
    return hd % 8 == 0 && ldq % 8 == 0 && ldk % 8 == 0 && ldv % 8 == 0 && (uintptr_t)q % 16 == 0 &&
           (uintptr_t)k % 16 == 0 && (uintptr_t)v % 16 == 0;
}

/* The conversion pass (attn_src16): rows x (heads x hd) activations of TS
 * (F32, BF16 or F16; row stride ld) into rows x (heads x hs) T, zero-padded
 * from hd to hs, rows and heads grid-strided (grid: attn_to16_grid). A
 * finite value that becomes inf stores BS_OVF_ATTENTION in *overflow
 * (overflow.cuh), as to_half_kernel does for linear. TS == T: 16-bit
 * activations of the compute dtype whose rows or heads are not 16-byte
 * aligned (attn_src16_ok), copied as they are. */
template <typename T, typename TS>
__global__ void attn_to16(T *dst, const TS *src, int64_t rows, int64_t ld, int heads, int hd,
                          int hs, int *overflow)
{
    bool ovf = false;
    const int64_t cols = (int64_t)heads * hs;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
        for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < cols;
             i += (int64_t)gridDim.x * blockDim.x) {
            int64_t h = i / hs, d = i % hs;
            float x = d < hd ? act_ld(src + r * ld + h * hd + d) : 0.0f;
            ovf |= rounds_to_inf<T>(x);
            dst[r * cols + i] = to_t<T>(x);
        }
    if (ovf)
        *(volatile int *)overflow = BS_OVF_ATTENTION;
}

#define ATTN_TO16_THREADS 256

static inline dim3 attn_to16_grid(int64_t rows, int heads, int hs)
{
    int64_t cols = (int64_t)heads * hs, bx = (cols + ATTN_TO16_THREADS - 1) / ATTN_TO16_THREADS;
    return dim3((unsigned)(bx < 1024 ? bx : 1024), (unsigned)(rows < 65535 ? rows : 65535));
}

/* The conversion pass's buffer: Q, K and V of rows_q, rows_k and rows_k
 * rows of heads x hs elements of es bytes, each 256-byte aligned. */
static inline size_t attn16_bytes(int64_t rows_q, int64_t rows_k, int heads, int hs, size_t es)
{
    size_t row = (size_t)heads * hs * es, nq = ((size_t)rows_q * row + 255) & ~(size_t)255,
           nk = ((size_t)rows_k * row + 255) & ~(size_t)255;
    return nq + 2 * nk;
}

/* The operands of the conversion pass in buf (attn16_bytes). */
static inline struct attn_src16 attn16_layout(void *buf, int64_t rows_q, int64_t rows_k, int heads,
                                              int hs, size_t es)
{
    size_t row = (size_t)heads * hs * es, nq = ((size_t)rows_q * row + 255) & ~(size_t)255,
           nk = ((size_t)rows_k * row + 255) & ~(size_t)255;
    struct attn_src16 s;
    s.q = buf;
    s.k = (char *)buf + nq;
    s.v = (char *)buf + nq + nk;
    s.ldq = s.ldk = s.ldv = (int64_t)heads * hs;
    s.hs = hs;
    return s;
}

static inline void attn_src16_set(struct attn_args *a, const struct attn_src16 *s)
{
    a->qh = s->q;
    a->kh = s->k;
    a->vh = s->v;
    a->ldqh = s->ldq;
    a->ldkh = s->ldk;
    a->ldvh = s->ldv;
    a->hs = s->hs;
}

/* Rows of q and of k and v in an attention call (a ragged batch's last
 * offsets). */
static inline void attn_rows(const struct bs_attn_params *p, int64_t *rows_q, int64_t *rows_k)
{
    *rows_q = p->q_off ? p->q_off[p->batch] : p->batch * p->lq;
    *rows_k = p->q_off ? p->k_off[p->batch] : p->batch * p->lk;
}

/* attn_mma's shared memory, in elements of T, for padded head dim DP and
 * WARPS warps: two stages of a K and a V tile (MMA_BK x DP row-major, rows
 * MMA_PAD elements longer: LD = DP + 8, an odd number of 16-byte chunks, so
 * that 8 rows' same chunk fall in 8 distinct bank groups), the Q tile over
 * stage 1 (read into registers once, before stage 1 is first written), then
 * two stages of the mask tile (F32, mask rows of MASK_LD floats; 1 row for
 * [B, 1, Lk], BQ rows for [B, Lq, Lk]). */
#define MMA_MASK_LD 72 /* floats: 64 keys + 8 (conflict-free float2 reads) */

template <int DP, int WARPS> struct mma_smem {
    static constexpr int BQ = 16 * WARPS; /* queries per block */
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int LD = DP + MMA_PAD; /* row stride of the K, V and Q tiles */
    static constexpr int C = DP / 8;        /* 16-byte chunks of a row */
    static constexpr int TILE = MMA_BK * LD;
    static constexpr int STAGE = 2 * TILE; /* K then V */
    static constexpr int elems = 2 * STAGE;
    /* Bytes of dynamic shared memory for T of es bytes and mrows mask rows. */
    static constexpr size_t bytes(size_t es, int mrows)
    {
        return (size_t)elems * es + 2 * (size_t)mrows * MMA_MASK_LD * sizeof(float);
    }
    static_assert(DP % 16 == 0, "padded head dim must be a multiple of 16");
    static_assert(((LD * 2) / 16) % 2 == 1, "rows must be an odd number of 16-byte chunks");
    static_assert(BQ * LD <= STAGE, "the Q tile must fit in a stage");
    static_assert(MMA_BK == 64, "the tile copies assume 64-key tiles");
};

/* Issues the cp.async copies of a ROWS x DP tile of 16-bit rows (src: the
 * tile's first row, row stride ld elements; rows_left rows exist and hc
 * chunks of 8 elements of each, the rest are zero-filled) into dst (row
 * stride LD). A warp copies 16 rows x 2
 * chunks an instruction: lanes 8m..8m+7 rows 8 (m >> 1) + 0..7, chunk
 * 2 pair + (m & 1); each 8 lanes (a phase of 16-byte stores) write one chunk
 * of 8 consecutive rows, in 8 distinct bank groups (LD odd in chunks), and a
 * row's 32 bytes are one sector of global memory. Each thread has one row,
 * so its bounds check is one comparison a tile. */
template <typename T, int DP, int WARPS, int ROWS>
__device__ __forceinline__ void mma_copy_tile(T *dst, const T *src, int ld, int rows_left, int hc)
{
    using S = mma_smem<DP, WARPS>;
    constexpr int RB = ROWS / 16;  /* 16-row blocks */
    constexpr int CP = S::C / 2;   /* chunk pairs a row */
    constexpr int ITEMS = RB * CP; /* warp instructions a tile */
    constexpr int PER = (ITEMS + WARPS - 1) / WARPS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rsub = ((lane >> 4) << 3) + (lane & 7), csub = (lane >> 3) & 1;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const int item = warp + i * WARPS;
        if (ITEMS % WARPS != 0 && item >= ITEMS)
            break;
        const int r = (item % RB) * 16 + rsub, c = (item / RB) * 2 + csub;
        /* a row past the end reads nothing (0 bytes) from a row that exists */
        const T *s = src + (r < rows_left ? r : 0) * ld + c * 8;
        ptx_cp_async_cg16_zfill(dst + r * S::LD + c * 8, s, r < rows_left && c < hc ? 16 : 0);
    }
}

/* The mask tile of keys [k0, k0 + 64) for mrows rows (mask rows of this
 * block's queries from q0, clamped to the sample's last; mrows 1: the one
 * row) into ms (rows MMA_MASK_LD floats). With vec (the sample's mask and
 * its row stride 16-byte aligned) by cp.async, 4 keys a copy, keys past lk
 * zero-filled; else by plain loads and stores. Keys past lk are -inf in the
 * scores anyway (the last tile's bounds check). */
template <int THREADS>
__device__ __forceinline__ void mma_copy_mask(float *ms, const float *mask, int64_t mask_ld,
                                              int mrows, int64_t q0, int64_t lq, int64_t k0,
                                              int64_t lk, bool vec)
{
    if (vec) {
        for (int e = threadIdx.x; e < mrows * 16; e += THREADS) {
            const int r = e >> 4, c = (e & 15) * 4;
            const int64_t qr = q0 + r < lq ? q0 + r : lq - 1;
            const int64_t left = lk - (k0 + c);
            const int n = left >= 4 ? 16 : left > 0 ? (int)left * 4 : 0;
            ptx_cp_async_cg16_zfill(ms + r * MMA_MASK_LD + c,
                                    mask + qr * mask_ld + (n ? k0 + c : 0), n);
        }
        return;
    }
    for (int e = threadIdx.x; e < mrows * MMA_BK; e += THREADS) {
        const int r = e >> 6, c = e & 63;
        const int64_t qr = q0 + r < lq ? q0 + r : lq - 1;
        ms[r * MMA_MASK_LD + c] = k0 + c < lk ? mask[qr * mask_ld + k0 + c] : 0.0f;
    }
}

/* What a warp keeps from tile to tile: its Q fragments, the output
 * accumulators, the rows' running maxima and sums (log2 domain), and what
 * its two rows (g and g + 8 of its 16) need for the scores. */
template <int DP> struct mma_warp_state {
    uint32_t qf[DP / 16][4];
    float o[DP / 8][4];
    float m0, m1, l0, l1;
    float sl2_0, sl2_1, sh0, sh1;
};

/* One key tile (ks, vs: K and V of the stage; ms: its mask tile) for a
 * warp: S = Q K^T from ldmatrix fragments (K row-major: plain; V row-major:
 * .trans gives the P V B fragments), the mask from shared memory (MASK),
 * the keys past the sample's end at -inf (LAST: only the last tile has
 * any, keys_left of its 64 exist), the online softmax, O += P V. koff and
 * voff: this lane's ldmatrix row offsets (elements) in K and V; mr0, mr1:
 * its rows' mask rows in ms. */
template <typename T, int DP, bool LAST, bool MASK>
__device__ __forceinline__ void mma_tile(mma_warp_state<DP> &w, const T *ks, const T *vs, int koff,
                                         int voff, const float *mr0, const float *mr1,
                                         int keys_left)
{
    constexpr int LD = DP + MMA_PAD, KS = DP / 16, NT = MMA_BK / 8, DT = DP / 8;
    const int t = threadIdx.x & 3;
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            uint32_t kb[4]; /* b0, b1 of n-tiles 2np and 2np + 1 */
            ptx_ldmatrix_x4(kb, ks + koff + np * 16 * LD + kk * 16);
            mma16816<T>(s[2 * np], w.qf[kk], kb[0], kb[1]);
            mma16816<T>(s[2 * np + 1], w.qf[kk], kb[2], kb[3]);
        }

    /* Scores in the log2 domain, masked; the new row maxima. */
    float mx0 = w.m0, mx1 = w.m1;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        const int key = n * 8 + 2 * t;
        float v[4] = {s[n][0] * w.sl2_0, s[n][1] * w.sl2_0, s[n][2] * w.sl2_1, s[n][3] * w.sl2_1};
        if (MASK) {
            float2 a = *reinterpret_cast<const float2 *>(mr0 + key);
            float2 b = *reinterpret_cast<const float2 *>(mr1 + key);
            v[0] += mask_term(a.x, w.sh0) * LOG2E;
            v[1] += mask_term(a.y, w.sh0) * LOG2E;
            v[2] += mask_term(b.x, w.sh1) * LOG2E;
            v[3] += mask_term(b.y, w.sh1) * LOG2E;
        }
        if (LAST) {
            if (key >= keys_left)
                v[0] = v[2] = -INFINITY;
            if (key + 1 >= keys_left)
                v[1] = v[3] = -INFINITY;
        }
        s[n][0] = v[0];
        s[n][1] = v[1];
        s[n][2] = v[2];
        s[n][3] = v[3];
        mx0 = fmaxf(mx0, fmaxf(v[0], v[1]));
        mx1 = fmaxf(mx1, fmaxf(v[2], v[3]));
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    float ref0 = mx0 == -INFINITY ? 0.0f : mx0, ref1 = mx1 == -INFINITY ? 0.0f : mx1;
    float c0 = exp2f(w.m0 - ref0), c1 = exp2f(w.m1 - ref1); /* 0 while m is -inf */
    w.m0 = mx0;
    w.m1 = mx1;
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
    w.l0 = w.l0 * c0 + sum0; /* per-thread partial sums, reduced at the end */
    w.l1 = w.l1 * c1 + sum1;
#pragma unroll
    for (int i = 0; i < DT; i++) {
        w.o[i][0] *= c0;
        w.o[i][1] *= c0;
        w.o[i][2] *= c1;
        w.o[i][3] *= c1;
    }

    /* o += P V: the score accumulators of n-tiles 2j, 2j+1 are exactly the
     * A fragment of k-step j. */
#pragma unroll
    for (int j = 0; j < MMA_BK / 16; j++) {
        uint32_t pa[4] = {pack2<T>(s[2 * j][0], s[2 * j][1]), pack2<T>(s[2 * j][2], s[2 * j][3]),
                          pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]),
                          pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
        for (int ip = 0; ip < DT / 2; ip++) {
            uint32_t vb[4]; /* b0, b1 of output n-tiles 2ip and 2ip + 1 */
            ptx_ldmatrix_x4_trans(vb, vs + voff + j * 16 * LD + ip * 16);
            mma16816<T>(w.o[2 * ip], pa, vb[0], vb[1]);
            mma16816<T>(w.o[2 * ip + 1], pa, vb[2], vb[3]);
        }
    }
}

/* Everything the key loop needs besides the warp's state. */
struct mma_loop_args {
    const unsigned char *kg, *vg; /* key 0 of the sample and head in K and V (T) */
    int ldk, ldv;                 /* row strides of K and V (elements) */
    int64_t lk;
    const float *mask; /* the sample's first mask row, or NULL */
    int64_t mask_ld, q0, lq;
    int mrows, hc; /* mask rows of the tile; chunks of 8 elements of a head's head_dim */
    bool mvec;
};

/* The key loop: tile j + 1's copies (cp.async, one commit group a tile)
 * are in flight while tile j is computed; one barrier a tile (after it,
 * every warp is done with tile j - 1, whose stage tile j + 1 overwrites).
 * Full tiles run without bounds checks, the last one with. */
template <typename T, int DP, int WARPS, bool MASK>
__device__ __forceinline__ void mma_key_loop(mma_warp_state<DP> &w, T *smem, float *msm,
                                             const mma_loop_args &L, int koff, int voff,
                                             const float *mr0_base, const float *mr1_base)
{
    using S = mma_smem<DP, WARPS>;
    const int nt = (int)((L.lk + MMA_BK - 1) / MMA_BK);
    const int mstage = L.mrows * MMA_MASK_LD;
    for (int j = 0; j < nt - 1; j++) {
        ptx_cp_async_wait_group<0>();
        __syncthreads(); /* tile j is in; every warp is done with tile j - 1 (and Q) */
        const int nx = (j + 1) & 1;
        const int64_t k1 = (int64_t)(j + 1) * MMA_BK;
        const int left = (int)(L.lk - k1 < MMA_BK ? L.lk - k1 : MMA_BK);
        T *st = smem + nx * S::STAGE;
        mma_copy_tile<T, DP, WARPS, MMA_BK>(st, reinterpret_cast<const T *>(L.kg) + k1 * L.ldk,
                                            L.ldk, left, L.hc);
        mma_copy_tile<T, DP, WARPS, MMA_BK>(
            st + S::TILE, reinterpret_cast<const T *>(L.vg) + k1 * L.ldv, L.ldv, left, L.hc);
        if (MASK)
            mma_copy_mask<S::THREADS>(msm + nx * mstage, L.mask, L.mask_ld, L.mrows, L.q0, L.lq, k1,
                                      L.lk, L.mvec);
        ptx_cp_async_commit_group();
        const int cur = j & 1;
        const T *kt = smem + cur * S::STAGE;
        mma_tile<T, DP, false, MASK>(w, kt, kt + S::TILE, koff, voff, mr0_base + cur * mstage,
                                     mr1_base + cur * mstage, MMA_BK);
    }
    ptx_cp_async_wait_group<0>();
    __syncthreads();
    const int cur = (nt - 1) & 1;
    const T *kt = smem + cur * S::STAGE;
    mma_tile<T, DP, true, MASK>(w, kt, kt + S::TILE, koff, voff, mr0_base + cur * mstage,
                                mr1_base + cur * mstage, (int)(L.lk - (int64_t)(nt - 1) * MMA_BK));
}

/* TO: o's type (F32 or T; the entry converts to the other 16-bit type). */
template <typename T, int DP, int WARPS, bool RAGGED, typename TO>
__global__ void __launch_bounds__(32 * WARPS) attn_mma(struct attn_args a)
{
    using S = mma_smem<DP, WARPS>;
    constexpr int KS = DP / 16, DT = DP / 8;
    BS_DYNAMIC_SMEM(unsigned char, smem_raw);
    T *smem = reinterpret_cast<T *>(smem_raw);
    float *msm = reinterpret_cast<float *>(smem + S::elems);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int64_t bh, q0;
    attn_block(a, S::BQ, &bh, &q0);
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const struct attn_seq sq = attn_sample(a, b, RAGGED);
    if (RAGGED && q0 >= sq.lq) /* past this sample's queries */
        return;
    const int hd = a.head_dim;
    const int mrows = a.mask == NULL ? 0 : sq.mask_ld == 0 ? 1 : S::BQ;
    mma_loop_args L;
    L.kg = reinterpret_cast<const unsigned char *>(reinterpret_cast<const T *>(a.kh) +
                                                   sq.k_row * a.ldkh + h * a.hs);
    L.vg = reinterpret_cast<const unsigned char *>(reinterpret_cast<const T *>(a.vh) +
                                                   sq.k_row * a.ldvh + h * a.hs);
    L.ldk = (int)a.ldkh;
    L.ldv = (int)a.ldvh;
    L.lk = sq.lk;
    L.mask = sq.mask;
    L.mask_ld = sq.mask_ld;
    L.q0 = q0;
    L.lq = sq.lq;
    L.mrows = mrows;
    L.hc = (hd + 7) / 8;
    L.mvec = a.mask != NULL && (uintptr_t)sq.mask % 16 == 0 && sq.mask_ld % 4 == 0;

    /* The prologue: Q (over stage 1) and key tile 0 (stage 0) in one group. */
    const T *qg = reinterpret_cast<const T *>(a.qh) + (sq.q_row + q0) * a.ldqh + h * a.hs;
    T *qs = smem + S::STAGE;
    mma_copy_tile<T, DP, WARPS, S::BQ>(qs, qg, (int)a.ldqh,
                                       (int)(sq.lq - q0 < S::BQ ? sq.lq - q0 : S::BQ), L.hc);
    if (sq.lk > 0) {
        const int left = (int)(sq.lk < MMA_BK ? sq.lk : MMA_BK);
        mma_copy_tile<T, DP, WARPS, MMA_BK>(smem, reinterpret_cast<const T *>(L.kg), L.ldk, left,
                                            L.hc);
        mma_copy_tile<T, DP, WARPS, MMA_BK>(smem + S::TILE, reinterpret_cast<const T *>(L.vg),
                                            L.ldv, left, L.hc);
        if (mrows)
            mma_copy_mask<S::THREADS>(msm, L.mask, L.mask_ld, mrows, q0, sq.lq, 0, sq.lk, L.mvec);
    }
    ptx_cp_async_commit_group();

    /* This thread's two query rows and the shifts of their mask rows (the
     * 4 lanes of a row take every 4th key for its maximum), while the
     * copies run. */
    const int r0 = warp * 16 + g;
    const int64_t qa = q0 + r0, qb = qa + 8;
    mma_warp_state<DP> w;
    w.sh0 = w.sh1 = 0.0f;
    if (a.mask) {
        const float *mrow0 = sq.mask + (qa < sq.lq ? qa : sq.lq - 1) * sq.mask_ld;
        const float *mrow1 = sq.mask + (qb < sq.lq ? qb : sq.lq - 1) * sq.mask_ld;
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
        w.sh0 = mask_shift(mm0);
        w.sh1 = mask_shift(mm1);
    }
    w.sl2_0 = a.scale * LOG2E * score_keep(w.sh0);
    w.sl2_1 = a.scale * LOG2E * score_keep(w.sh1);
#pragma unroll
    for (int i = 0; i < DT; i++)
        w.o[i][0] = w.o[i][1] = w.o[i][2] = w.o[i][3] = 0.0f;
    w.m0 = w.m1 = -INFINITY;
    w.l0 = w.l1 = 0.0f;

    ptx_cp_async_wait_group<0>();
    __syncthreads();
    /* Q fragments into registers for the whole key loop: matrices (rows
     * 0-7, chunk 2kk), (8-15, 2kk), (0-7, 2kk+1), (8-15, 2kk+1) are a0..a3. */
    {
        const int m = lane >> 3;
        const T *qr = qs + (warp * 16 + (m & 1) * 8 + (lane & 7)) * S::LD + (m >> 1) * 8;
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
            ptx_ldmatrix_x4(w.qf[kk], qr + kk * 16);
    }
    /* This lane's ldmatrix rows: K, matrices (keys 0-7, chunk 2kk), (0-7,
     * 2kk+1), (8-15, 2kk), (8-15, 2kk+1) of a 16-key pair of n-tiles: b0, b1
     * of each; V (.trans), (keys 0-7, chunk 2ip), (8-15, 2ip), (0-7, 2ip+1),
     * (8-15, 2ip+1): b0, b1 of output n-tiles 2ip and 2ip + 1. */
    const int m = lane >> 3;
    const int koff = ((m >> 1) * 8 + (lane & 7)) * S::LD + (m & 1) * 8;
    const int voff = ((m & 1) * 8 + (lane & 7)) * S::LD + (m >> 1) * 8;
    if (sq.lk > 0) {
        if (mrows) {
            const float *mr0 = msm + (mrows == 1 ? 0 : r0) * MMA_MASK_LD;
            const float *mr1 = msm + (mrows == 1 ? 0 : r0 + 8) * MMA_MASK_LD;
            mma_key_loop<T, DP, WARPS, true>(w, smem, msm, L, koff, voff, mr0, mr1);
        } else {
            mma_key_loop<T, DP, WARPS, false>(w, smem, msm, L, koff, voff, msm, msm);
        }
    }

    float l0 = w.l0, l1 = w.l1;
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    TO *og = reinterpret_cast<TO *>(a.o) + sq.q_row * a.ldo + h * hd;
#pragma unroll
    for (int i = 0; i < DT; i++) {
        int d = i * 8 + 2 * t;
#pragma unroll
        for (int e = 0; e < 2; e++) {
            if (d + e >= hd)
                continue;
            if (qa < sq.lq)
                act_st(og + qa * a.ldo + d + e, w.o[i][e] * inv0);
            if (qb < sq.lq)
                act_st(og + qb * a.ldo + d + e, w.o[i][2 + e] * inv1);
        }
    }
}

/* attn_mma's warps a block: 8 (128 queries: half the K and V traffic per
 * flop) where the padded head dim is at most 80 (registers and shared
 * memory leave at least MMA_SLOTS_8W such blocks an SM), the mask has one
 * row for all queries (a mask row per query would take 2 x 36 KiB of
 * shared memory at 8 warps) and the 8-warp blocks still fill every SM's
 * slots at least once (batch_heads x query tiles of 128 >= sms x
 * MMA_SLOTS_8W); else 4 (64 queries: twice the blocks, for short
 * sequences or few heads). */
static inline int mma_warps(int dp, int64_t lq, int64_t batch_heads, int sms, bool mask_rows)
{
    if (dp > 80 || mask_rows)
        return 4;
    return attn_blocks(lq, batch_heads, 128) >= (int64_t)sms * MMA_SLOTS_8W ? 8 : 4;
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
 * V tiles (widened to F32 from TI), the output accumulator and the
 * probabilities: 256 hd + 1 KiB. o is TO, each value rounded once. */
template <typename TI, typename TO, bool RAGGED>
__global__ void __launch_bounds__(F32_THREADS) attn_f32(struct attn_args a)
{
    const TI *qg = reinterpret_cast<const TI *>(a.q), *kg = reinterpret_cast<const TI *>(a.k),
             *vg = reinterpret_cast<const TI *>(a.v);
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
        qs[e] = q0 + r < sq.lq ? act_ld(qg + (sq.q_row + q0 + r) * a.ldq + h * hd + d) : 0.0f;
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
            ks[e] = ok ? act_ld(kg + (sq.k_row + k0 + r) * a.ldk + h * hd + d) : 0.0f;
            vs[e] = ok ? act_ld(vg + (sq.k_row + k0 + r) * a.ldv + h * hd + d) : 0.0f;
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
        act_st(reinterpret_cast<TO *>(a.o) + (sq.q_row + qi) * a.ldo + h * hd + d,
               os[row * hd + d] * inv);
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
