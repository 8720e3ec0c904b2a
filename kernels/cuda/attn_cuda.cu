/* Fused attention on the GPU, FlashAttention-2 style: each block owns a tile
 * of queries of one (sample, head), walks the keys in tiles through shared
 * memory, keeps the running max and sum of the softmax per row (online
 * softmax) and the output accumulator in registers or shared memory. No
 * Lq x Lk matrix is ever written to global memory.
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
 * Scores are s = scale * q.k + mask (additive F32 [B, 1 or Lq, Lk]); keys
 * past Lk are -inf; a row whose scores are all -inf gets weights 0 and output
 * 0, as on the CPU (kernels/cpu/attn_cpu.c).
 *
 * Also here: the unfused baseline the benchmark compares against (cuBLAS
 * GEMM for S, a softmax kernel, cuBLAS GEMM for O). */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "cuda_common.cuh"

#define LOG2E 1.4426950408889634f

#define MMA_BK       64
#define MMA_PAD      8    /* elements of row padding: conflict-free fragment loads */
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
    int vec; /* q, k, v rows and head offsets are 16-byte aligned: float4 loads */
};

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
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float d[4], const uint32_t a[4], uint32_t b0,
                                                 uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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
 * columns is either all below hd or all above. */
template <typename T, int DP, int ROWS, int THREADS, bool TR>
__device__ __forceinline__ void load_tile(T *dst, int dst_ld, const float *src, int64_t ld,
                                          int64_t rows_valid, int hd, bool vec)
{
    if (vec) {
        constexpr int DV = DP / 4;
        for (int e = threadIdx.x; e < ROWS * DV; e += THREADS) {
            int r = e / DV, d = (e % DV) * 4;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (r < rows_valid && d < hd)
                v = *reinterpret_cast<const float4 *>(src + r * ld + d);
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
        return;
    }
    for (int e = threadIdx.x; e < ROWS * DP; e += THREADS) {
        int r = e / DP, d = e % DP;
        float v = r < rows_valid && d < hd ? src[r * ld + d] : 0.0f;
        if (TR)
            dst[d * dst_ld + r] = to_t<T>(v);
        else
            dst[r * dst_ld + d] = to_t<T>(v);
    }
}

template <typename T, int DP, int WARPS>
__global__ void __launch_bounds__(32 * WARPS) attn_mma(struct attn_args a)
{
    using S = mma_smem<DP, WARPS>;
    constexpr int KS = DP / 16;    /* k-steps of q.k */
    constexpr int NT = MMA_BK / 8; /* n-tiles of scores */
    constexpr int DT = DP / 8;     /* n-tiles of the output */
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *qs = reinterpret_cast<T *>(smem_raw);
    T *ks = qs + S::BQ * S::QK_LD;
    T *vt = ks + MMA_BK * S::QK_LD;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int64_t bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads;
    const int64_t q0 = (int64_t)blockIdx.x * S::BQ;
    const int hd = a.head_dim;
    const float *qg = a.q + (b * a.lq + q0) * a.ldq + h * hd;
    load_tile<T, DP, S::BQ, S::THREADS, false>(qs, S::QK_LD, qg, a.ldq, a.lq - q0, hd, a.vec);

    /* This thread's two query rows and their mask rows. */
    const int r0 = warp * 16 + g;
    int64_t qa = q0 + r0, qb = qa + 8;
    const float *mrow0 = NULL, *mrow1 = NULL;
    if (a.mask) {
        int64_t qa_c = a.mq == 1 ? 0 : (qa < a.lq ? qa : a.lq - 1);
        int64_t qb_c = a.mq == 1 ? 0 : (qb < a.lq ? qb : a.lq - 1);
        mrow0 = a.mask + b * a.mask_nb0 + qa_c * a.mask_nb1;
        mrow1 = a.mask + b * a.mask_nb0 + qb_c * a.mask_nb1;
    }
    const float sl2 = a.scale * LOG2E;

    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++)
        o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f; /* log2 domain */

    for (int64_t k0 = 0; k0 < a.lk; k0 += MMA_BK) {
        __syncthreads(); /* the previous tile is consumed (and Qs is written) */
        const float *kg = a.k + (b * a.lk + k0) * a.ldk + h * hd;
        const float *vg = a.v + (b * a.lk + k0) * a.ldv + h * hd;
        load_tile<T, DP, MMA_BK, S::THREADS, false>(ks, S::QK_LD, kg, a.ldk, a.lk - k0, hd, a.vec);
        load_tile<T, DP, MMA_BK, S::THREADS, true>(vt, S::VT_LD, vg, a.ldv, a.lk - k0, hd, a.vec);
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
                if (key < a.lk) {
                    v = s[n][e] * sl2;
                    if (a.mask)
                        v += (e < 2 ? mrow0 : mrow1)[key] * LOG2E;
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
    float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    float *og = a.o + (b * a.lq) * a.ldo + h * hd;
#pragma unroll
    for (int i = 0; i < DT; i++) {
        int d = i * 8 + 2 * t;
#pragma unroll
        for (int e = 0; e < 2; e++) {
            if (d + e >= hd)
                continue;
            if (qa < a.lq)
                og[qa * a.ldo + d + e] = o[i][e] * inv0;
            if (qb < a.lq)
                og[qb * a.ldo + d + e] = o[i][2 + e] * inv1;
        }
    }
}

template <typename T, int DP, int WARPS>
static int launch_mma_w(const struct attn_args *a, int64_t batch, cudaStream_t st,
                        struct bs_err *err)
{
    using S = mma_smem<DP, WARPS>;
    size_t smem = (size_t)S::elems * sizeof(T);
    int rc =
        bs__cuda_check(cudaFuncSetAttribute(attn_mma<T, DP, WARPS>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                       "attention", "cudaFuncSetAttribute", err);
    if (rc != 0)
        return rc;
    dim3 grid((unsigned)bs__cdiv(a->lq, S::BQ), (unsigned)(batch * a->heads));
    attn_mma<T, DP, WARPS><<<grid, S::THREADS, smem, st>>>(*a);
    return bs__cuda_check_launch("attention", err);
}

/* Long sequences take 128 queries a block (half the K/V traffic per flop);
 * short ones 64 (more blocks to fill the GPU). 8 warps only for DP <= 80,
 * where the shared memory and registers allow two blocks per SM. */
template <typename T, int DP>
static int launch_mma(const struct attn_args *a, int64_t batch, cudaStream_t st, struct bs_err *err)
{
    if constexpr (DP <= 80) {
        if (a->lq >= MMA_LONG_SEQ)
            return launch_mma_w<T, DP, 8>(a, batch, st, err);
    }
    return launch_mma_w<T, DP, 4>(a, batch, st, err);
}

/* The instantiated padded head dims; 0 when hd is above them all. */
static int mma_dp(int hd)
{
    static const int dps[] = {32, 48, 64, 80, 128, 160};
    for (int i = 0; i < (int)(sizeof(dps) / sizeof(dps[0])); i++)
        if (hd <= dps[i])
            return dps[i];
    return 0;
}

template <typename T>
static int launch_mma_t(const struct attn_args *a, int64_t batch, cudaStream_t st,
                        struct bs_err *err)
{
    switch (mma_dp(a->head_dim)) {
    case 32:
        return launch_mma<T, 32>(a, batch, st, err);
    case 48:
        return launch_mma<T, 48>(a, batch, st, err);
    case 64:
        return launch_mma<T, 64>(a, batch, st, err);
    case 80:
        return launch_mma<T, 80>(a, batch, st, err);
    case 128:
        return launch_mma<T, 128>(a, batch, st, err);
    default:
        return launch_mma<T, 160>(a, batch, st, err);
    }
}

/* ---- FP32 kernel ---------------------------------------------------------- */

/* 16 query rows per block, 8 threads per row; shared memory holds the Q, K,
 * V tiles, the output accumulator and the probabilities: 256 hd + 1 KiB. */
__global__ void __launch_bounds__(F32_THREADS) attn_f32(struct attn_args a)
{
    extern __shared__ float sm[];
    const int hd = a.head_dim;
    float *qs = sm, *ks = qs + F32_BQ * hd, *vs = ks + F32_BK * hd, *os = vs + F32_BK * hd;
    float *ps = os + F32_BQ * hd; /* [F32_BQ][F32_BK] */
    const int row = threadIdx.x >> 3, sub = threadIdx.x & 7;
    const int64_t bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads;
    const int64_t q0 = (int64_t)blockIdx.x * F32_BQ, qi = q0 + row;
    for (int e = threadIdx.x; e < F32_BQ * hd; e += F32_THREADS) {
        int r = e / hd, d = e % hd;
        qs[e] = q0 + r < a.lq ? a.q[(b * a.lq + q0 + r) * a.ldq + h * hd + d] : 0.0f;
        os[e] = 0.0f;
    }
    const float *mrow = NULL;
    if (a.mask)
        mrow = a.mask + b * a.mask_nb0 + (a.mq == 1 ? 0 : (qi < a.lq ? qi : a.lq - 1)) * a.mask_nb1;
    float m = -INFINITY, l = 0.0f;
    for (int64_t k0 = 0; k0 < a.lk; k0 += F32_BK) {
        __syncthreads();
        for (int e = threadIdx.x; e < F32_BK * hd; e += F32_THREADS) {
            int r = e / hd, d = e % hd;
            bool ok = k0 + r < a.lk;
            ks[e] = ok ? a.k[(b * a.lk + k0 + r) * a.ldk + h * hd + d] : 0.0f;
            vs[e] = ok ? a.v[(b * a.lk + k0 + r) * a.ldv + h * hd + d] : 0.0f;
        }
        __syncthreads();
        float sc[2], mx = m;
        for (int jj = 0; jj < 2; jj++) {
            int j = sub + 8 * jj;
            float v = -INFINITY;
            if (k0 + j < a.lk) {
                float dot = 0.0f;
                for (int d = 0; d < hd; d++)
                    dot = fmaf(qs[row * hd + d], ks[j * hd + d], dot);
                v = dot * a.scale + (mrow ? mrow[k0 + j] : 0.0f);
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
    if (qi >= a.lq)
        return;
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int d = sub; d < hd; d += 8)
        a.o[(b * a.lq + qi) * a.ldo + h * hd + d] = os[row * hd + d] * inv;
}

static int launch_f32(const struct attn_args *a, int64_t batch, cudaStream_t st, struct bs_err *err)
{
    size_t smem =
        ((size_t)(2 * F32_BQ + 2 * F32_BK) * a->head_dim + F32_BQ * F32_BK) * sizeof(float);
    int rc = bs__cuda_check(
        cudaFuncSetAttribute(attn_f32, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
        "attention", "cudaFuncSetAttribute", err);
    if (rc != 0)
        return rc;
    dim3 grid((unsigned)bs__cdiv(a->lq, F32_BQ), (unsigned)(batch * a->heads));
    attn_f32<<<grid, F32_THREADS, smem, st>>>(*a);
    return bs__cuda_check_launch("attention", err);
}

/* ---- entry ---------------------------------------------------------------- */

static int check_attn(struct bs_tensor *o, const struct bs_tensor *q, const struct bs_tensor *k,
                      const struct bs_tensor *v, const struct bs_attn_params *p, struct bs_err *err)
{
    int rc = bs_opcheck_attention(o, q, k, v, p, err);
    if (rc != 0)
        return rc;
    if (p->batch * p->heads > 65535 || bs__cdiv(p->lq, F32_BQ) > INT32_MAX)
        return bs_err_set(err, BS_ERANGE, "attention: batch x heads %lld exceeds the grid (65535)",
                          (long long)(p->batch * p->heads));
    if (p->head_dim > F32_MAX_D)
        return bs_err_set(err, BS_EUNSUPP, "attention: head_dim %d above %d on the GPU",
                          p->head_dim, F32_MAX_D);
    return bs_opcheck_attention_mask(p, err);
}

/* Checks the arguments (check_attn) and fills a from them. */
static int attn_args_init(struct attn_args *a, struct bs_tensor *o, const struct bs_tensor *q,
                          const struct bs_tensor *k, const struct bs_tensor *v,
                          const struct bs_attn_params *p, struct bs_err *err)
{
    memset(a, 0, sizeof(*a));
    int rc = check_attn(o, q, k, v, p, err);
    if (rc != 0)
        return rc;
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
    if (p->mask != NULL) {
        a->mask = (const float *)p->mask->data;
        a->mq = p->mask->ne[1] == 1 ? 1 : p->lq;
        a->mask_nb0 = p->mask->nb[0] / 4;
        a->mask_nb1 = p->mask->nb[1] / 4;
    }
    return 0;
}

int bs__cuda_attention(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                       const struct bs_tensor *k, const struct bs_tensor *v,
                       const struct bs_attn_params *p, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    struct attn_args a;
    int rc = attn_args_init(&a, o, q, k, v, p, err);
    if (rc != 0)
        return rc;
    if (p->batch == 0 || p->lq == 0)
        return 0;
    bs__cuda_guard g(c);
    if (c->dtype == BS_TYPE_F32 || mma_dp(p->head_dim) == 0)
        return launch_f32(&a, p->batch, c->stream, err);
    if (c->dtype == BS_TYPE_BF16)
        return launch_mma_t<__nv_bfloat16>(&a, p->batch, c->stream, err);
    return launch_mma_t<__half>(&a, p->batch, c->stream, err);
}

/* ---- unfused baseline (benchmark only) ------------------------------------ */

/* Row softmax of S (rows of lk, T = compute type) in place, with the mask
 * added first; one block per row of (head, query). */
template <typename T>
__global__ void softmax_rows(T *s, int64_t lk, int64_t lq, const float *mask, int64_t mask_nb1,
                             int64_t mq)
{
    __shared__ float red[32];
    int64_t row = blockIdx.x, qi = row % lq;
    T *sr = s + row * lk;
    const float *mr = mask ? mask + (mq == 1 ? 0 : qi) * mask_nb1 : NULL;
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < lk; i += blockDim.x)
        mx = fmaxf(mx, (float)sr[i] + (mr ? mr[i] : 0.0f));
    for (int o = 16; o > 0; o >>= 1)
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = mx;
    __syncthreads();
    mx = -INFINITY;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++)
        mx = fmaxf(mx, red[i]);
    float ref = mx == -INFINITY ? 0.0f : mx, sum = 0.0f;
    for (int64_t i = threadIdx.x; i < lk; i += blockDim.x)
        sum += expf((float)sr[i] + (mr ? mr[i] : 0.0f) - ref);
    for (int o = 16; o > 0; o >>= 1)
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = sum;
    __syncthreads();
    sum = 0.0f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++)
        sum += red[i];
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int64_t i = threadIdx.x; i < lk; i += blockDim.x)
        sr[i] = (T)(expf((float)sr[i] + (mr ? mr[i] : 0.0f) - ref) * inv);
}

static int blas_ok(cublasStatus_t s, const char *what, struct bs_err *err)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return 0;
    return bs_err_set(err, BS_EINTERNAL, "cuda attention (unfused): %s: %s", what,
                      cublasGetStatusString(s));
}

/* One sample: S_h = scale q_h k_h^T for all heads (strided batched GEMM), the
 * softmax, then o_h = P_h v_h. q, k, v are dense [L, inner] in type t. */
template <typename T>
static int unfused_sample(struct bs__cuda *c, float *o, int64_t ldo, const void *q, const void *k,
                          const void *v, T *s, const struct bs_attn_params *p,
                          const struct attn_args *a, int64_t b, struct bs_err *err)
{
    cudaDataType_t t = c->dtype == BS_TYPE_F32    ? CUDA_R_32F
                       : c->dtype == BS_TYPE_BF16 ? CUDA_R_16BF
                                                  : CUDA_R_16F;
    int hd = p->head_dim, inner = p->heads * hd, lq = (int)p->lq, lk = (int)p->lk;
    size_t es = c->dtype == BS_TYPE_F32 ? 4 : 2;
    float zero = 0.0f, one = 1.0f;
    int rc;
    /* column-major: S^T (lk x lq) = K^T(op T on hd x lk) Q (hd x lq) */
    TRY_RC(rc, blas_ok(cublasGemmStridedBatchedEx(
                           c->blas, CUBLAS_OP_T, CUBLAS_OP_N, lk, lq, hd, &p->scale, k, t, inner,
                           (long long)hd, q, t, inner, (long long)hd, &zero, s, t, lk,
                           (long long)lq * lk, p->heads, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "S GEMM", err));
    const float *mask = a->mask ? a->mask + b * a->mask_nb0 : NULL;
    softmax_rows<T><<<(unsigned)(p->heads * p->lq), 256, 0, c->stream>>>(s, p->lk, p->lq, mask,
                                                                         a->mask_nb1, a->mq);
    TRY_RC(rc, bs__cuda_check_launch("attention (unfused) softmax", err));
    /* column-major: O^T (hd x lq) = V (hd x lk) P^T... i.e. P as lk x lq */
    (void)es;
    return blas_ok(cublasGemmStridedBatchedEx(
                       c->blas, CUBLAS_OP_N, CUBLAS_OP_N, hd, lq, lk, &one, v, t, inner,
                       (long long)hd, s, t, lk, (long long)lq * lk, &zero, o, CUDA_R_32F, (int)ldo,
                       (long long)hd, p->heads, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "O GEMM", err);
}

template <typename T>
static int unfused(struct bs__cuda *c, struct bs_tensor *o, const struct bs_tensor *q,
                   const struct bs_tensor *k, const struct bs_tensor *v,
                   const struct bs_attn_params *p, const struct attn_args *a, struct bs_err *err)
{
    int64_t inner = (int64_t)p->heads * p->head_dim, es = sizeof(T);
    size_t nq = (size_t)(p->lq * inner * es), nk = (size_t)(p->lk * inner * es);
    size_t ns = (size_t)(p->heads * p->lq * p->lk * es);
    nq = (nq + 255) & ~(size_t)255;
    nk = (nk + 255) & ~(size_t)255;
    char *base = (char *)bs__cuda_scratch(c, nq + 2 * nk + ns, err);
    if (base == NULL)
        return err->code;
    char *qh = base, *kh = qh + nq, *vh = kh + nk;
    T *s = (T *)(vh + nk);
    int rc;
    for (int64_t b = 0; b < p->batch; b++) {
        const float *qb = (const float *)q->data + b * p->lq * bs_tensor_ld(q);
        const float *kb = (const float *)k->data + b * p->lk * bs_tensor_ld(k);
        const float *vb = (const float *)v->data + b * p->lk * bs_tensor_ld(v);
        if (c->dtype == BS_TYPE_F32) {
            TRY_RC(rc, bs__cuda_check(cudaMemcpy2DAsync(qh, inner * 4, qb, bs_tensor_ld(q) * 4,
                                                        inner * 4, p->lq, cudaMemcpyDeviceToDevice,
                                                        c->stream),
                                      "attention (unfused)", "copy q", err));
            TRY_RC(rc, bs__cuda_check(cudaMemcpy2DAsync(kh, inner * 4, kb, bs_tensor_ld(k) * 4,
                                                        inner * 4, p->lk, cudaMemcpyDeviceToDevice,
                                                        c->stream),
                                      "attention (unfused)", "copy k", err));
            TRY_RC(rc, bs__cuda_check(cudaMemcpy2DAsync(vh, inner * 4, vb, bs_tensor_ld(v) * 4,
                                                        inner * 4, p->lk, cudaMemcpyDeviceToDevice,
                                                        c->stream),
                                      "attention (unfused)", "copy v", err));
        } else {
            TRY_RC(rc, bs__cuda_to_half(c, qh, qb, p->lq, inner, bs_tensor_ld(q), err));
            TRY_RC(rc, bs__cuda_to_half(c, kh, kb, p->lk, inner, bs_tensor_ld(k), err));
            TRY_RC(rc, bs__cuda_to_half(c, vh, vb, p->lk, inner, bs_tensor_ld(v), err));
        }
        float *ob = (float *)o->data + b * p->lq * bs_tensor_ld(o);
        TRY_RC(rc, unfused_sample<T>(c, ob, bs_tensor_ld(o), qh, kh, vh, s, p, a, b, err));
    }
    return 0;
}

int bs__cuda_attention_unfused(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                               const struct bs_tensor *k, const struct bs_tensor *v,
                               const struct bs_attn_params *p, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    struct attn_args a;
    int rc = attn_args_init(&a, o, q, k, v, p, err);
    if (rc != 0)
        return rc;
    if (p->batch == 0 || p->lq == 0 || p->lk == 0)
        return bs_err_set(err, BS_EINVAL, "attention (unfused): empty sizes");
    if (p->lq > INT32_MAX || p->lk > INT32_MAX || (int64_t)p->heads * p->lq > INT32_MAX)
        return bs_err_set(err, BS_ERANGE, "attention (unfused): sizes exceed int range");
    bs__cuda_guard g(c);
    if (c->dtype == BS_TYPE_F32)
        return unfused<float>(c, o, q, k, v, p, &a, err);
    if (c->dtype == BS_TYPE_BF16)
        return unfused<__nv_bfloat16>(c, o, q, k, v, p, &a, err);
    return unfused<__half>(c, o, q, k, v, p, &a, err);
}
