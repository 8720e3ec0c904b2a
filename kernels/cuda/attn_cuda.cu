/* Fused attention on the GPU: the launchers and the entry of the attention
 * op for the kernels of attn_kernels.cuh (attn_mma on tensor cores, attn_f32
 * for fp32 and head dims above 160; how they work is said there), and the
 * unfused baseline the benchmark compares against (cuBLAS GEMM for S, the
 * softmax_rows kernel, cuBLAS GEMM for O).
 *
 * A ragged batch (bs_attn_params.q_off): the entry checks the offsets on the
 * host (check_ragged) and copies them to the device through the thread's
 * upload ring, on its stream before the kernel (upload_offsets); the grid
 * is the uniform one of the longest sample. The unfused baseline refuses
 * it (BS_EUNSUPP). */
#include <math.h>

#include <type_traits>

#include "cuda_common.cuh"

#include "attn_kernels.cuh"

/* ---- tensor-core kernel ----------------------------------------------------- */

template <typename T, typename TO, int DP, int WARPS, bool RAGGED>
static int launch_mma_r(const struct attn_args *a, int64_t batch, cudaStream_t st,
                        struct bs_err *err)
{
    using S = mma_smem<DP, WARPS>;
    int mrows = a->mask == NULL ? 0 : a->mq == 1 ? 1 : S::BQ;
    size_t smem = S::bytes(sizeof(T), mrows);
    int rc =
        bs__cuda_check(cudaFuncSetAttribute(attn_mma<T, DP, WARPS, RAGGED, TO>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                       "attention", "cudaFuncSetAttribute", err);
    if (rc != 0)
        return rc;
    attn_mma<T, DP, WARPS, RAGGED, TO>
        <<<attn_grid(a->lq, batch * a->heads, S::BQ), S::THREADS, smem, st>>>(*a);
    return bs__cuda_check_launch("attention", err);
}

/* A ragged batch (a->q_off) has instances of its own, so that the uniform
 * ones need no offsets (blocks per SM of each: tests/gpu_static). */
template <typename T, typename TO, int DP, int WARPS>
static int launch_mma_w(const struct attn_args *a, int64_t batch, cudaStream_t st,
                        struct bs_err *err)
{
    if (a->q_off != NULL)
        return launch_mma_r<T, TO, DP, WARPS, true>(a, batch, st, err);
    return launch_mma_r<T, TO, DP, WARPS, false>(a, batch, st, err);
}

/* 4 or 8 warps a block by mma_warps (attn_kernels.cuh): 8 only for DP <= 80,
 * a mask of one row (or none), and enough blocks to fill the SMs' slots. */
template <typename T, typename TO, int DP>
static int launch_mma(const struct attn_args *a, int64_t batch, int sms, cudaStream_t st,
                      struct bs_err *err)
{
    if constexpr (DP <= 80) {
        if (mma_warps(DP, a->lq, batch * a->heads, sms, a->mask != NULL && a->mq != 1) == 8)
            return launch_mma_w<T, TO, DP, 8>(a, batch, st, err);
    }
    return launch_mma_w<T, TO, DP, 4>(a, batch, st, err);
}

/* The instance of a's padded head dim (mma_dp). */
template <typename T, typename TO>
static int launch_mma_dp(const struct attn_args *a, int64_t batch, int sms, cudaStream_t st,
                         struct bs_err *err)
{
    switch (mma_dp(a->head_dim)) {
    case 32:
        return launch_mma<T, TO, 32>(a, batch, sms, st, err);
    case 48:
        return launch_mma<T, TO, 48>(a, batch, sms, st, err);
    case 64:
        return launch_mma<T, TO, 64>(a, batch, sms, st, err);
    case 80:
        return launch_mma<T, TO, 80>(a, batch, sms, st, err);
    case 128:
        return launch_mma<T, TO, 128>(a, batch, sms, st, err);
    default:
        return launch_mma<T, TO, 160>(a, batch, sms, st, err);
    }
}

/* attn_mma in T on q, k, v of dtype qt and into o of dtype ot (a's).
 *
 * Operands: q, k and v of dtype T whose rows and heads are 16-byte aligned
 * (attn_src16_ok) go to the kernel as they are (struct attn_src16). Any
 * others (F32, the other 16-bit dtype, or unaligned) are converted first:
 * attn_to16, three launches into the thread's scratch (heads padded to
 * multiples of 8 elements). That pass reads 4 (or 2) and writes 2 bytes an
 * element of Q, K and V once, where the kernel then reads 2 bytes an
 * element per query block (every K and V element ceil(lq / BQ) times):
 * about 6 (lq + 2 lk) x heads x head_dim bytes of extra traffic a call, a
 * few percent of the kernel's K and V traffic from lq = 256 on.
 *
 * Output: attn_mma stores F32 or T (its TO); o of the other 16-bit dtype
 * gets F32 rows in scratch, then act's kernel converts them (a rare
 * combination: the engine's o has the compute dtype or F32). */
template <typename T>
static int launch_mma_t(struct attn_args *a, const struct bs_attn_params *p, enum bs_dtype qt,
                        enum bs_dtype ot, int sms, struct bs__cuda_thread *th, struct bs_err *err)
{
    const enum bs_dtype tt = std::is_same<T, __half>::value ? BS_TYPE_F16 : BS_TYPE_BF16;
    int64_t rq, rk;
    attn_rows(p, &rq, &rk);
    const int hs = attn_hs(p->head_dim);
    const int64_t inner = (int64_t)p->heads * p->head_dim;
    const bool direct =
        qt == tt && attn_src16_ok(a->q, a->ldq, a->k, a->ldk, a->v, a->ldv, p->head_dim);
    const bool o_tmp = ot != BS_TYPE_F32 && ot != tt;
    size_t conv_bytes = direct ? 0 : attn16_bytes(rq, rk, p->heads, hs, sizeof(T));
    size_t o_bytes = o_tmp ? (size_t)(rq * inner) * sizeof(float) : 0;
    char *buf = NULL;
    if (conv_bytes + o_bytes > 0) {
        buf = (char *)bs__cuda_scratch(th, conv_bytes + o_bytes, err);
        if (buf == NULL)
            return bs_err_wrap(err, "attention");
    }
    struct attn_src16 src;
    if (direct) {
        src = {a->q, a->k, a->v, a->ldq, a->ldk, a->ldv, p->head_dim};
    } else {
        src = attn16_layout(buf, rq, rk, p->heads, hs, sizeof(T));
        const void *srcs[3] = {a->q, a->k, a->v};
        const void *dsts[3] = {src.q, src.k, src.v};
        int64_t lds[3] = {a->ldq, a->ldk, a->ldv}, rows[3] = {rq, rk, rk};
        for (int i = 0; i < 3; i++) {
            if (rows[i] == 0)
                continue;
            act_type(qt, [&](auto *st) {
                using TS = ACT_T(st);
                attn_to16<T, TS>
                    <<<attn_to16_grid(rows[i], p->heads, hs), ATTN_TO16_THREADS, 0, th->stream>>>(
                        (T *)dsts[i], (const TS *)srcs[i], rows[i], lds[i], p->heads, p->head_dim,
                        hs, a->overflow);
            });
            int rc = bs__cuda_check_launch("attention (conversion)", err);
            if (rc != 0)
                return rc;
        }
    }
    attn_src16_set(a, &src);
    void *o = a->o;
    const int64_t ldo = a->ldo;
    if (o_tmp) {
        a->o = buf + conv_bytes;
        a->ldo = inner;
    }
    int rc = ot == tt ? launch_mma_dp<T, T>(a, p->batch, sms, th->stream, err)
                      : launch_mma_dp<T, float>(a, p->batch, sms, th->stream, err);
    if (rc != 0 || !o_tmp)
        return rc;
    return bs__cuda_act_rows(th, o, ot, ldo, buf + conv_bytes, BS_TYPE_F32, inner, rq, inner,
                             BS_ACT_NONE, err);
}

/* ---- FP32 kernel ---------------------------------------------------------- */

template <typename TI, typename TO, bool RAGGED>
static int launch_f32_r(const struct attn_args *a, int64_t batch, cudaStream_t st,
                        struct bs_err *err)
{
    size_t smem = attn_f32_smem(a->head_dim);
    int rc =
        bs__cuda_check(cudaFuncSetAttribute(attn_f32<TI, TO, RAGGED>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                       "attention", "cudaFuncSetAttribute", err);
    if (rc != 0)
        return rc;
    attn_f32<TI, TO, RAGGED>
        <<<attn_grid(a->lq, batch * a->heads, F32_BQ), F32_THREADS, smem, st>>>(*a);
    return bs__cuda_check_launch("attention", err);
}

/* Uniform and ragged instances, as launch_mma_w's: one instance for both
 * took 64 registers on sm_80, where the uniform one has 56. q, k, v of
 * dtype qt, o of ot (read and written as they are). */
static int launch_f32(const struct attn_args *a, int64_t batch, enum bs_dtype qt, enum bs_dtype ot,
                      cudaStream_t st, struct bs_err *err)
{
    int rc = 0;
    act_type(qt, [&](auto *it) {
        act_type(ot, [&](auto *ut) {
            using TI = ACT_T(it);
            using TO = ACT_T(ut);
            rc = a->q_off != NULL ? launch_f32_r<TI, TO, true>(a, batch, st, err)
                                  : launch_f32_r<TI, TO, false>(a, batch, st, err);
        });
    });
    return rc;
}

/* ---- argument checks ------------------------------------------------------- */

/* What the kernels can launch: the blocks in grid.x (attn_grid; F32_BQ is
 * the smallest tile, and a ragged batch has the longest sample's tiles for
 * every sample) and the head dim. */
static int check_launch(const struct bs_attn_params *p, struct bs_err *err)
{
    int64_t bh = p->batch * p->heads, tiles = bs__cdiv(p->lq, F32_BQ);
    if (bh > 0 && tiles > INT32_MAX / bh)
        return bs_err_set(err, BS_ERANGE,
                          "attention: %lld query tiles of %d x batch x heads %lld exceed the grid "
                          "(2^31 - 1 blocks)",
                          (long long)tiles, F32_BQ, (long long)bh);
    if (p->head_dim > F32_MAX_D)
        return bs_err_set(err, BS_EUNSUPP, "attention: head_dim %d above %d on the GPU",
                          p->head_dim, F32_MAX_D);
    return 0;
}

static int check_attn(struct bs_tensor *o, const struct bs_tensor *q, const struct bs_tensor *k,
                      const struct bs_tensor *v, const struct bs_attn_params *p, struct bs_err *err)
{
    int rc;
    if (p->q_off != NULL) { /* the checks the CPU backend makes, with its messages */
        TRY_RC(rc, bs_opcheck_attention_ragged(o, q, k, v, p, err));
        return check_launch(p, err);
    }
    TRY_RC(rc, bs_opcheck_attention(o, q, k, v, p, err));
    TRY_RC(rc, check_launch(p, err));
    return bs_opcheck_attention_mask(p, err);
}

/* ---- entry ---------------------------------------------------------------- */

/* Checks the arguments (check_attn) and fills a from them. */
static int attn_args_init(struct attn_args *a, struct bs_tensor *o, const struct bs_tensor *q,
                          const struct bs_tensor *k, const struct bs_tensor *v,
                          const struct bs_attn_params *p, struct bs_err *err)
{
    memset(a, 0, sizeof(*a));
    int rc = check_attn(o, q, k, v, p, err);
    if (rc != 0)
        return rc;
    attn_args_fill(a, o, q, k, v, p);
    return 0;
}

/* A ragged batch's offsets into device memory (the thread's upload ring, on
 * its stream, before the kernel), where a's point from then on. */
static int upload_offsets(struct attn_args *a, struct bs__cuda_thread *t,
                          const struct bs_attn_params *p, struct bs_err *err)
{
    size_t n = (size_t)(p->batch + 1) * sizeof(int64_t);
    const void *srcs[3] = {p->q_off, p->k_off, p->m_off};
    size_t sizes[3] = {n, n, (size_t)p->batch * sizeof(int64_t)};
    int64_t *dev = (int64_t *)bs__cuda_upload(t, a->mask ? 3 : 2, srcs, sizes, "attention", err);
    if (dev == NULL)
        return err->code;
    a->q_off = dev;
    a->k_off = dev + p->batch + 1;
    a->m_off = a->mask ? dev + 2 * (p->batch + 1) : NULL;
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
    if (p->batch == 0 || p->lq == 0 || p->heads == 0)
        return 0;
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "attention", err);
    if (t == NULL)
        return err->code;
    a.overflow = t->overflow_dev;
    if (p->q_off != NULL && (rc = upload_offsets(&a, t, p, err)) != 0)
        return rc;
    if (c->dtype == BS_TYPE_F32 || mma_dp(p->head_dim) == 0)
        return launch_f32(&a, p->batch, q->type, o->type, t->stream, err);
    if (c->dtype == BS_TYPE_BF16)
        return launch_mma_t<__nv_bfloat16>(&a, p, q->type, o->type, c->sms, t, err);
    return launch_mma_t<__half>(&a, p, q->type, o->type, c->sms, t, err);
}

/* ---- unfused baseline (benchmark only) ------------------------------------ */

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
static int unfused_sample(const struct bs__cuda *c, struct bs__cuda_thread *th, float *o,
                          int64_t ldo, const void *q, const void *k, const void *v, T *s,
                          const struct bs_attn_params *p, const struct attn_args *a, int64_t b,
                          struct bs_err *err)
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
                           th->blas, CUBLAS_OP_T, CUBLAS_OP_N, lk, lq, hd, &p->scale, k, t, inner,
                           (long long)hd, q, t, inner, (long long)hd, &zero, s, t, lk,
                           (long long)lq * lk, p->heads, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "S GEMM", err));
    const float *mask = a->mask ? a->mask + b * a->mask_nb0 : NULL;
    softmax_rows<T><<<(unsigned)(p->heads * p->lq), 256, 0, th->stream>>>(s, p->lk, p->lq, mask,
                                                                          a->mask_nb1, a->mq);
    TRY_RC(rc, bs__cuda_check_launch("attention (unfused) softmax", err));
    /* column-major: O^T (hd x lq) = V (hd x lk) P^T... i.e. P as lk x lq */
    (void)es;
    return blas_ok(cublasGemmStridedBatchedEx(
                       th->blas, CUBLAS_OP_N, CUBLAS_OP_N, hd, lq, lk, &one, v, t, inner,
                       (long long)hd, s, t, lk, (long long)lq * lk, &zero, o, CUDA_R_32F, (int)ldo,
                       (long long)hd, p->heads, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "O GEMM", err);
}

/* Sample b's first row of t (rows of len rows a sample). */
static const void *sample_rows(const struct bs_tensor *t, int64_t b, int64_t rows)
{
    return (const char *)t->data + (size_t)(b * rows * bs_tensor_ld(t)) * bs_dtype_size(t->type);
}

/* Narrow activations: q, k and v of BF16 or F16 are converted to the
 * compute dtype by act's kernel (BS_ACT_NONE; F32 ones as before: a copy,
 * or bs__cuda_to_half with its overflow flag); a narrow o gets the O GEMM's
 * F32 rows in scratch, then act's kernel rounds them into o. */
template <typename T>
static int unfused(const struct bs__cuda *c, struct bs__cuda_thread *th, struct bs_tensor *o,
                   const struct bs_tensor *q, const struct bs_tensor *k, const struct bs_tensor *v,
                   const struct bs_attn_params *p, const struct attn_args *a, struct bs_err *err)
{
    int64_t inner = (int64_t)p->heads * p->head_dim, es = sizeof(T);
    size_t nq = (size_t)(p->lq * inner * es), nk = (size_t)(p->lk * inner * es);
    size_t ns = (size_t)(p->heads * p->lq * p->lk * es);
    size_t no = o->type == BS_TYPE_F32 ? 0 : (size_t)(p->lq * inner) * sizeof(float);
    nq = (nq + 255) & ~(size_t)255;
    nk = (nk + 255) & ~(size_t)255;
    ns = (ns + 255) & ~(size_t)255;
    char *base = (char *)bs__cuda_scratch(th, nq + 2 * nk + ns + no, err);
    if (base == NULL)
        return err->code;
    char *qh = base, *kh = qh + nq, *vh = kh + nk;
    T *s = (T *)(vh + nk);
    float *otmp = no ? (float *)((char *)s + ns) : NULL;
    const struct bs_tensor *ts[3] = {q, k, v};
    char *dsts[3] = {qh, kh, vh};
    const int64_t lens[3] = {p->lq, p->lk, p->lk};
    int rc;
    for (int64_t b = 0; b < p->batch; b++) {
        for (int i = 0; i < 3; i++) {
            const struct bs_tensor *t = ts[i];
            const void *src = sample_rows(t, b, lens[i]);
            int64_t ld = bs_tensor_ld(t);
            if (t->type != BS_TYPE_F32)
                rc = bs__cuda_act_rows(th, dsts[i], c->dtype, inner, src, t->type, ld, lens[i],
                                       inner, BS_ACT_NONE, err);
            else if (c->dtype == BS_TYPE_F32)
                rc =
                    bs__cuda_check(cudaMemcpy2DAsync(dsts[i], inner * 4, src, ld * 4, inner * 4,
                                                     lens[i], cudaMemcpyDeviceToDevice, th->stream),
                                   "attention (unfused)", "copy q, k, v", err);
            else
                rc = bs__cuda_to_half(c, th, dsts[i], (const float *)src, lens[i], inner, ld,
                                      BS_OVF_ATTENTION, err);
            if (rc != 0)
                return rc;
        }
        float *ob = otmp ? otmp : (float *)sample_rows(o, b, p->lq);
        int64_t ldo = otmp ? inner : bs_tensor_ld(o);
        TRY_RC(rc, unfused_sample<T>(c, th, ob, ldo, qh, kh, vh, s, p, a, b, err));
        if (otmp)
            TRY_RC(rc,
                   bs__cuda_act_rows(th, (void *)sample_rows(o, b, p->lq), o->type, bs_tensor_ld(o),
                                     otmp, BS_TYPE_F32, inner, p->lq, inner, BS_ACT_NONE, err));
    }
    return 0;
}

int bs__cuda_attention_unfused(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                               const struct bs_tensor *k, const struct bs_tensor *v,
                               const struct bs_attn_params *p, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    struct attn_args a;
    if (p->q_off != NULL)
        return bs_err_set(err, BS_EUNSUPP,
                          "attention (unfused): ragged batches (q_off) are not supported; the "
                          "fused attention takes them");
    int rc = attn_args_init(&a, o, q, k, v, p, err);
    if (rc != 0)
        return rc;
    if (p->batch == 0 || p->lq == 0 || p->lk == 0)
        return bs_err_set(err, BS_EINVAL, "attention (unfused): empty sizes");
    if (p->lq > INT32_MAX || p->lk > INT32_MAX || (int64_t)p->heads * p->lq > INT32_MAX)
        return bs_err_set(err, BS_ERANGE, "attention (unfused): sizes exceed int range");
    struct bs__cuda_thread *th = bs__cuda_thread_get(c, "attention (unfused)", err);
    if (th == NULL)
        return err->code;
    if (c->dtype == BS_TYPE_F32)
        return unfused<float>(c, th, o, q, k, v, p, &a, err);
    if (c->dtype == BS_TYPE_BF16)
        return unfused<__nv_bfloat16>(c, th, o, q, k, v, p, &a, err);
    return unfused<__half>(c, th, o, q, k, v, p, &a, err);
}
