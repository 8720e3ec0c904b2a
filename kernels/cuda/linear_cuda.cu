/* linear and linear_act on the GPU: cuBLASLt GEMMs with the bias (and, in a
 * narrow compute dtype, the tanh GELU) fused into the epilogue, the residual
 * through beta, the output written in y's dtype by the GEMM itself (FP32
 * accumulation), and plans (descriptors and the heuristic's algorithm)
 * cached per thread; cublasGemmEx where cuBLASLt declines a plan.
 * kernels/cuda/README.md (linear) says what is fused and what is not.
 *
 * Row-major y[M,N] = x[M,K] w[N,K]^T is column-major y^T = w^T(op T) x^T:
 * A = w (K x N, lda K, transposed), B = x (K x M, ldb = its row stride),
 * C = D = y (N x M, ldc = its row stride); the bias runs along D's rows (N),
 * which is cuBLASLt's bias vector. */
#include <string.h>

#include "cuda_common.cuh"
#include "linear_kernels.cuh"

#define LIN_ALIGN 256 /* scratch pieces, and the largest alignment a plan tells apart */

/* Key fields of a plan (struct bs__cuda_lt_plan.key). */
enum { K_M, K_N, K_K, K_LDX, K_LDY, K_TYPES, K_EPI, K_ALIGN };

/* Epilogues of a plan. */
enum { EPI_NONE, EPI_BIAS, EPI_GELU_BIAS, EPI_GELU };

static int lt_check(cublasStatus_t s, const char *op, const char *what, struct bs_err *err)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return 0;
    return bs_err_set(err, BS_EINTERNAL, "cuda %s: %s: %s (%s)", op, what, cublasGetStatusString(s),
                      cublasGetStatusName(s));
}

static cudaDataType_t cuda_type(enum bs_dtype t)
{
    return t == BS_TYPE_F32 ? CUDA_R_32F : t == BS_TYPE_BF16 ? CUDA_R_16BF : CUDA_R_16F;
}

static size_t dsize(enum bs_dtype t)
{
    return t == BS_TYPE_F32 ? 4 : 2;
}

static size_t align_up(size_t v)
{
    return (v + LIN_ALIGN - 1) & ~(size_t)(LIN_ALIGN - 1);
}

/* The largest power of two (up to LIN_ALIGN) that divides p's address. */
static int64_t align_of(const void *p)
{
    uintptr_t a = (uintptr_t)p;
    int64_t al = 1;
    while (al < LIN_ALIGN && (a & (uintptr_t)al) == 0)
        al <<= 1;
    return al;
}

/* ---- the plan cache --------------------------------------------------- */

static void plan_clear(struct bs__cuda_lt_plan *p)
{
    if (p->desc)
        cublasLtMatmulDescDestroy(p->desc);
    if (p->a)
        cublasLtMatrixLayoutDestroy(p->a);
    if (p->b)
        cublasLtMatrixLayoutDestroy(p->b);
    if (p->cd)
        cublasLtMatrixLayoutDestroy(p->cd);
    memset(p, 0, sizeof(*p));
}

/* p's descriptors destroyed, its key and use kept. */
static void plan_reset(struct bs__cuda_lt_plan *p)
{
    int64_t key[BS_CUDA_LT_KEY];
    memcpy(key, p->key, sizeof(key));
    uint64_t used = p->used;
    plan_clear(p);
    memcpy(p->key, key, sizeof(key));
    p->used = used;
}

int bs__cuda_lt_lookup(struct bs__cuda_lt_cache *cache, const int64_t key[BS_CUDA_LT_KEY],
                       bool *hit, bool *evicted)
{
    int empty = -1, lru = -1;
    for (int i = 0; i < BS_CUDA_LT_CACHE; i++) {
        struct bs__cuda_lt_plan *p = &cache->plan[i];
        if (p->used == 0) {
            if (empty < 0)
                empty = i;
            continue;
        }
        if (memcmp(p->key, key, sizeof(p->key)) == 0) {
            p->used = ++cache->clock;
            *hit = true;
            *evicted = false;
            return i;
        }
        if (lru < 0 || p->used < cache->plan[lru].used)
            lru = i;
    }
    int slot = empty >= 0 ? empty : lru;
    struct bs__cuda_lt_plan *p = &cache->plan[slot];
    *hit = false;
    *evicted = empty < 0;
    plan_clear(p);
    memcpy(p->key, key, sizeof(p->key));
    p->used = ++cache->clock;
    return slot;
}

struct bs__cuda_lt_cache *bs__cuda_lt_cache_get(const struct bs__cuda *c, struct bs__cuda_thread *t,
                                                struct bs_err *err)
{
    if (t->lt_cache != NULL)
        return t->lt_cache;
    if (bs__cuda_capturing(t)) { /* never the case after the engine's eager warm-up */
        bs__cuda_refuse_capture("linear", "the thread's first GEMM makes its cuBLASLt handle", err);
        return NULL;
    }
    /* without a handle (a bare backend, or cublasLtCreate failed) every
     * plan is a fallback: linear still runs, on cublasGemmEx */
    if (!c->bare && t->lt == NULL && cublasLtCreate(&t->lt) != CUBLAS_STATUS_SUCCESS)
        t->lt = NULL;
    t->lt_cache = (struct bs__cuda_lt_cache *)calloc(1, sizeof(*t->lt_cache));
    if (t->lt_cache == NULL)
        bs_err_set(err, BS_ENOMEM, "cuda linear: out of memory");
    return t->lt_cache;
}

void bs__cuda_lt_free(struct bs__cuda_thread *t)
{
    if (t->lt_cache != NULL) {
        for (int i = 0; i < BS_CUDA_LT_CACHE; i++)
            plan_clear(&t->lt_cache->plan[i]);
        free(t->lt_cache);
        t->lt_cache = NULL;
    }
    if (t->lt != NULL)
        cublasLtDestroy(t->lt);
    t->lt = NULL;
}

/* ---- one GEMM ------------------------------------------------------------ */

/* y = act?(x w^T + b) + beta y with every operand on the device:
 * w (ct, [n, k]), x (ct, rows of ldx), y (yt, rows of ldy), b (F32 [n] or
 * NULL; bd its copy in D's dtype or NULL). */
struct gemm_args {
    int64_t m, n, k, ldx, ldy;
    enum bs_dtype ct, yt;
    const void *w, *x;
    void *y;
    const float *b;
    const void *bd;
    float beta;
    int epi; /* EPI_*: EPI_GELU(_BIAS) only where the caller allows it */
};

/* The plan's descriptors and algorithm; false when cuBLASLt declines (the
 * plan then falls back), an error only for a failure to make one. */
static int plan_make(const struct bs__cuda *c, struct bs__cuda_thread *t,
                     struct bs__cuda_lt_plan *p, const struct gemm_args *g, const void *bias,
                     bool bias_d, bool *ok, struct bs_err *err)
{
    const char *op = "linear";
    int rc;
    *ok = false;
    cublasComputeType_t ct =
        g->ct == BS_TYPE_F32 && c->tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    cudaDataType_t at = cuda_type(g->ct), yt = cuda_type(g->yt);
    TRY_RC(rc, lt_check(cublasLtMatmulDescCreate(&p->desc, ct, CUDA_R_32F), op,
                        "cublasLtMatmulDescCreate", err));
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    cublasLtEpilogue_t epi = g->epi == EPI_BIAS        ? CUBLASLT_EPILOGUE_BIAS
                             : g->epi == EPI_GELU_BIAS ? CUBLASLT_EPILOGUE_GELU_BIAS
                             : g->epi == EPI_GELU      ? CUBLASLT_EPILOGUE_GELU
                                                       : CUBLASLT_EPILOGUE_DEFAULT;
    TRY_RC(rc, lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta,
                                                       sizeof(ta)),
                        op, "cublasLtMatmulDescSetAttribute", err));
    TRY_RC(rc, lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb,
                                                       sizeof(tb)),
                        op, "cublasLtMatmulDescSetAttribute", err));
    TRY_RC(rc, lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi,
                                                       sizeof(epi)),
                        op, "cublasLtMatmulDescSetAttribute", err));
    if (bias != NULL) {
        int32_t bt = bias_d ? (int32_t)yt : (int32_t)CUDA_R_32F;
        TRY_RC(rc, lt_check(cublasLtMatmulDescSetAttribute(
                                p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)),
                            op, "cublasLtMatmulDescSetAttribute", err));
        TRY_RC(rc, lt_check(cublasLtMatmulDescSetAttribute(
                                p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)),
                            op, "cublasLtMatmulDescSetAttribute", err));
    }
    TRY_RC(rc, lt_check(cublasLtMatrixLayoutCreate(&p->a, at, (uint64_t)g->k, (uint64_t)g->n, g->k),
                        op, "cublasLtMatrixLayoutCreate", err));
    TRY_RC(rc,
           lt_check(cublasLtMatrixLayoutCreate(&p->b, at, (uint64_t)g->k, (uint64_t)g->m, g->ldx),
                    op, "cublasLtMatrixLayoutCreate", err));
    TRY_RC(rc,
           lt_check(cublasLtMatrixLayoutCreate(&p->cd, yt, (uint64_t)g->n, (uint64_t)g->m, g->ldy),
                    op, "cublasLtMatrixLayoutCreate", err));
    cublasLtMatmulPreference_t pref;
    TRY_RC(rc, lt_check(cublasLtMatmulPreferenceCreate(&pref), op, "cublasLtMatmulPreferenceCreate",
                        err));
    uint64_t ws = BS_CUDA_BLAS_WS_BYTES;
    uint32_t al_a = (uint32_t)align_of(g->w), al_b = (uint32_t)align_of(g->x),
             al_c = (uint32_t)align_of(g->y);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                         sizeof(ws));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a,
                                         sizeof(al_a));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b,
                                         sizeof(al_b));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c,
                                         sizeof(al_c));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c,
                                         sizeof(al_c));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(t->lt, p->desc, p->a, p->b, p->cd, p->cd,
                                                      pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (s == CUBLAS_STATUS_SUCCESS && found > 0 && res.state == CUBLAS_STATUS_SUCCESS) {
        p->algo = res.algo;
        *ok = true;
    }
    return 0; /* NOT_SUPPORTED or no algorithm: declined, not an error */
}

/* The plan for g (made on a miss; a plan cuBLASLt declines is a fallback
 * plan); NULL with err set only when the thread's cache cannot be made. */
static struct bs__cuda_lt_plan *plan_get(const struct bs__cuda *c, struct bs__cuda_thread *t,
                                         const struct gemm_args *g, struct bs_err *err)
{
    struct bs__cuda_lt_cache *cache = bs__cuda_lt_cache_get(c, t, err);
    if (cache == NULL)
        return NULL;
    int64_t key[BS_CUDA_LT_KEY];
    key[K_M] = g->m, key[K_N] = g->n, key[K_K] = g->k, key[K_LDX] = g->ldx, key[K_LDY] = g->ldy;
    key[K_TYPES] = (int64_t)g->ct | (int64_t)g->yt << 8 | (int64_t)(c->tf32 ? 1 : 0) << 16;
    key[K_EPI] = (int64_t)g->epi | (int64_t)(g->beta != 0.0f) << 8;
    key[K_ALIGN] = align_of(g->w) | align_of(g->x) << 12 | align_of(g->y) << 24 |
                   (g->b ? align_of(g->b) : 0) << 36 | (g->bd ? align_of(g->bd) : 0) << 48;
    bool hit, evicted;
    struct bs__cuda_lt_plan *p = &cache->plan[bs__cuda_lt_lookup(cache, key, &hit, &evicted)];
    if (hit)
        return p;
    bool ok = false;
    int rc = 0;
    if (t->lt == NULL) { /* no handle (a bare test backend: the fallback fails cleanly) */
        p->fallback = true;
        return p;
    }
    rc = plan_make(c, t, p, g, g->b, false, &ok, err);
    if (rc == 0 && !ok && g->bd != NULL) { /* no F32 bias with this (narrow) D: D's dtype */
        plan_reset(p);
        rc = plan_make(c, t, p, g, g->bd, true, &ok, err);
        p->bias_d = ok;
    }
    if (rc != 0 || !ok) { /* keep the key: later calls go straight to the fallback */
        plan_reset(p);
        p->fallback = true;
        if (rc != 0) { /* a descriptor cuBLASLt could not make: this call falls back, and
                          the slot is free again (the next call tries anew) */
            p->used = 0;
            err->code = 0;
            err->msg[0] = '\0';
        }
    }
    return p;
}

/* The fallback: cublasGemmEx into F32 (y itself when F32, else an F32
 * accumulator in scratch acc, seeded with b + beta y and rounded once
 * into y), the bias by a kernel first. */
static int gemm_fallback(const struct bs__cuda *c, struct bs__cuda_thread *t,
                         const struct gemm_args *g, float *acc, struct bs_err *err)
{
    int rc;
    const float one = 1.0f;
    float beta = g->beta;
    float *out = (float *)g->y;
    int64_t ldo = g->ldy;
    if (g->yt != BS_TYPE_F32) {
        out = acc, ldo = g->n;
        if (g->yt == BS_TYPE_BF16)
            lin_seed_kernel<<<ew_grid(g->m, g->n), EW_THREADS, 0, t->stream>>>(
                acc, (const __nv_bfloat16 *)g->y, g->ldy, g->b, g->m, g->n, g->beta);
        else
            lin_seed_kernel<<<ew_grid(g->m, g->n), EW_THREADS, 0, t->stream>>>(
                acc, (const __half *)g->y, g->ldy, g->b, g->m, g->n, g->beta);
        TRY_RC(rc, bs__cuda_check_launch("linear", err));
        beta = 1.0f;
    } else if (g->b != NULL || (g->k == 0 && beta == 0.0f)) {
        TRY_RC(rc, bs__cuda_bias_rows(t, out, ldo, g->b, g->m, g->n, beta, err));
        beta = 1.0f;
    }
    if (g->k > 0) {
        cudaDataType_t ty = cuda_type(g->ct);
        cublasComputeType_t ct =
            g->ct == BS_TYPE_F32 && c->tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
        TRY_RC(rc,
               lt_check(cublasGemmEx(t->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)g->n, (int)g->m,
                                     (int)g->k, &one, g->w, ty, (int)g->k, g->x, ty, (int)g->ldx,
                                     &beta, out, CUDA_R_32F, (int)ldo, ct, CUBLAS_GEMM_DEFAULT),
                        "linear", "cublasGemmEx", err));
    }
    if (g->yt == BS_TYPE_F32)
        return 0;
    return bs__cuda_act_rows(t, g->y, g->yt, g->ldy, acc, BS_TYPE_F32, g->n, g->m, g->n,
                             BS_ACT_NONE, err); /* rounded once into y */
}

/* Runs g: its plan, or the fallback (marking the plan when cuBLASLt
 * refuses it at launch), which applies no GELU of g->epi: the caller runs
 * the act kernel when the plan is a fallback. acc: F32 scratch of m x n
 * for a narrow y's fallback. */
static int gemm_run(const struct bs__cuda *c, struct bs__cuda_thread *t, const struct gemm_args *g,
                    const struct bs__cuda_lt_plan *p, float *acc, struct bs_err *err)
{
    if (p->fallback) /* K = 0 too (a fallback plan); a plan with bias_d has g->bd (its key) */
        return gemm_fallback(c, t, g, acc, err);
    const float one = 1.0f;
    float beta = g->beta;
    if (g->b != NULL) {
        const void *bias = p->bias_d ? g->bd : (const void *)g->b;
        int rc = lt_check(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                         &bias, sizeof(bias)),
                          "linear", "cublasLtMatmulDescSetAttribute", err);
        if (rc != 0)
            return rc;
    }
    cublasStatus_t s =
        cublasLtMatmul(t->lt, p->desc, &one, g->w, p->a, g->x, p->b, &beta, g->y, p->cd, g->y,
                       p->cd, &p->algo, t->blas_ws, BS_CUDA_BLAS_WS_BYTES, t->stream);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE) {
        ((struct bs__cuda_lt_plan *)p)->fallback = true; /* declined at launch: remember */
        return gemm_fallback(c, t, g, acc, err);
    }
    return lt_check(s, "linear", "cublasLtMatmul", err);
}

/* ---- the ops -------------------------------------------------------------- */

/* The shared checks, then the int range of cuBLAS. */
static int check_linear(struct bs_tensor *y, const struct bs_tensor *x, const struct bs_tensor *w,
                        const struct bs_tensor *b, float beta, struct bs_err *err)
{
    int rc = bs_opcheck_linear(y, x, w, b, beta, err);
    if (rc != 0)
        return rc;
    if (w->type != BS_TYPE_F32) /* no pack_weight here: a BF16 w is another backend's */
        return bs_err_set(err, BS_EINVAL, "linear: w must be F32 on the cuda backend (got %s)",
                          bs_dtype_name(w->type));
    int64_t m = bs_tensor_nrows(x), k = bs_opcheck_ncols(x), n = w->ne[0];
    if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || bs_tensor_ld(x) > INT32_MAX ||
        bs_tensor_ld(y) > INT32_MAX)
        return bs_err_set(err, BS_ERANGE, "linear: dimensions exceed the cuBLAS integer range");
    return 0;
}

/* x converted to dense rows of the compute dtype ct at dst (x's dtype is
 * another). */
static int convert_x(struct bs__cuda_thread *t, void *dst, enum bs_dtype ct,
                     const struct bs_tensor *x, int64_t m, int64_t k, struct bs_err *err)
{
    int64_t ld = bs_tensor_ld(x);
    dim3 grid = ew_grid(m, k);
#define CONV(TO, TI)                                                                               \
    lin_convert_kernel<<<grid, EW_THREADS, 0, t->stream>>>((TO *)dst, (const TI *)x->data, m, k,   \
                                                           ld, t->overflow_dev, BS_OVF_LINEAR)
    if (ct == BS_TYPE_F32) {
        if (x->type == BS_TYPE_BF16)
            CONV(float, __nv_bfloat16);
        else
            CONV(float, __half);
    } else if (ct == BS_TYPE_BF16) {
        if (x->type == BS_TYPE_F32)
            CONV(__nv_bfloat16, float);
        else
            CONV(__nv_bfloat16, __half);
    } else {
        if (x->type == BS_TYPE_F32)
            CONV(__half, float);
        else
            CONV(__half, __nv_bfloat16);
    }
#undef CONV
    return bs__cuda_check_launch("linear", err);
}

/* The act (in place) or glu (from h, of y's dtype) after the GEMM: the
 * elementwise ops' own kernels (ops_cuda.cu). */
static int run_act(struct bs__cuda_thread *t, const struct bs_tensor *y, const void *h, int64_t ldh,
                   int64_t m, int64_t n, enum bs_act act, bool gated, struct bs_err *err)
{
    int64_t ldy = bs_tensor_ld(y);
    if (gated)
        return bs__cuda_glu_rows(t, y->data, y->type, ldy, h, y->type, ldh, m, n, act, err);
    return bs__cuda_act_rows(t, y->data, y->type, ldy, y->data, y->type, ldy, m, n, act, err);
}

/* linear (act BS_ACT_NONE, gated false, beta as given) and linear_act. */
static int linear_impl(struct bs__cuda *c, struct bs_tensor *y, const struct bs_tensor *x,
                       const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                       enum bs_act act, bool gated, struct bs_err *err)
{
    int rc;
    int64_t m = bs_tensor_nrows(x), k = bs_opcheck_ncols(x), nw = w->ne[0];
    int64_t n = gated ? nw / 2 : nw;
    if (m == 0 || nw == 0)
        return 0;
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, gated ? "linear_act" : "linear", err);
    if (t == NULL)
        return err->code;
    enum bs_dtype ct = c->dtype;
    struct gemm_args g;
    memset(&g, 0, sizeof(g));
    g.m = m, g.n = nw, g.k = k, g.ct = ct, g.beta = beta;
    g.b = b ? (const float *)b->data : NULL;
    /* the operands: x as it is when already in the compute dtype, else
     * converted; w's copy from weights_ready, else converted per call */
    bool conv_x = x->type != ct && k > 0;
    const void *wh = ct == BS_TYPE_F32 ? w->data : bs__cuda_shadow_of(c, w->data);
    bool conv_w = wh == NULL && k > 0;
    g.bd = b && ct != BS_TYPE_F32 && y->type == ct ? bs__cuda_shadow_of(c, b->data) : NULL;
    /* GEGLU: the GEMM goes to h [m, 2n] of y's dtype, then glu */
    g.yt = y->type;
    g.ldy = gated ? nw : bs_tensor_ld(y);
    g.ldx = conv_x ? k : bs_tensor_ld(x);
    /* the tanh GELU in the epilogue only in a narrow compute dtype: its
     * error there is below the operands' rounding (README) */
    bool fuse_gelu = !gated && act == BS_ACT_GELU_TANH && ct != BS_TYPE_F32;
    g.epi = fuse_gelu ? (b ? EPI_GELU_BIAS : EPI_GELU) : (b ? EPI_BIAS : EPI_NONE);
    /* scratch: converted x, converted w, h, the fallback's accumulator */
    size_t xb = conv_x ? align_up((size_t)(m * k) * dsize(ct)) : 0;
    size_t wb = conv_w ? align_up((size_t)(nw * k) * 2) : 0;
    size_t hb = gated ? align_up((size_t)(m * nw) * dsize(y->type)) : 0;
    size_t ab = y->type != BS_TYPE_F32 ? align_up((size_t)(m * nw) * 4) : 0;
    char *s = NULL;
    if (xb + wb + hb + ab > 0 && (s = (char *)bs__cuda_scratch(t, xb + wb + hb + ab, err)) == NULL)
        return bs_err_wrap(err, "linear");
    g.x = conv_x ? (const void *)s : x->data;
    g.w = conv_w ? (const void *)(s + xb) : wh;
    g.y = gated ? (void *)(s + xb + wb) : y->data;
    if (g.w == NULL) /* k == 0: nothing is read */
        g.w = w->data;
    if (conv_x)
        TRY_RC(rc, convert_x(t, s, ct, x, m, k, err));
    if (conv_w)
        TRY_RC(rc, bs__cuda_to_half(c, t, s + xb, (const float *)w->data, nw, k, k, BS_OVF_LINEAR,
                                    err));
    float *acc = ab ? (float *)(s + xb + wb + hb) : NULL;
    struct bs__cuda_lt_plan fb;
    const struct bs__cuda_lt_plan *p = &fb;
    if (k > 0) {
        if ((p = plan_get(c, t, &g, err)) == NULL)
            return err->code;
    } else {
        memset(&fb, 0, sizeof(fb));
        fb.fallback = true;
    }
    TRY_RC(rc, gemm_run(c, t, &g, p, acc, err));
    if (p->fallback) /* the GEMM ran without the epilogue's GELU (gemm_run may have just
                        found that): the act kernel does it */
        fuse_gelu = false;
    if (gated)
        return run_act(t, y, g.y, nw, m, n, act, true, err);
    if (act != BS_ACT_NONE && !fuse_gelu)
        return run_act(t, y, NULL, 0, m, n, act, false, err);
    return 0;
}

int bs__cuda_linear(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                    const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                    struct bs_err *err)
{
    int rc = check_linear(y, x, w, b, beta, err);
    if (rc != 0)
        return rc;
    return linear_impl((struct bs__cuda *)ctx, y, x, w, b, beta, BS_ACT_NONE, false, err);
}

int bs__cuda_linear_act(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                        const struct bs_tensor *w, const struct bs_tensor *b, enum bs_act act,
                        bool gated, struct bs_err *err)
{
    int rc;
    if ((unsigned)act >= BS_ACT_COUNT)
        return bs_err_set(err, BS_EINVAL, "linear_act: unknown activation %d", (int)act);
    if (!gated)
        return (rc = check_linear(y, x, w, b, 0.0f, err)) != 0
                   ? rc
                   : linear_impl((struct bs__cuda *)ctx, y, x, w, b, 0.0f, act, false, err);
    /* gated: the checks of linear into an [M, 2N] h of y's dtype */
    if (w->n_dims != 2 || w->ne[0] % 2 != 0)
        return bs_err_set(err, BS_EINVAL, "linear_act: gated w must be [2N, K] (got %lld rows)",
                          (long long)(w->n_dims == 2 ? w->ne[0] : -1));
    if ((rc = bs_opcheck_act_rows(y, "linear_act", "y", err)) != 0)
        return rc;
    if (bs_opcheck_ncols(y) != w->ne[0] / 2)
        return bs_err_set(err, BS_EINVAL, "linear_act: gated y must have %lld columns (got %lld)",
                          (long long)(w->ne[0] / 2), (long long)bs_opcheck_ncols(y));
    int64_t hne[2] = {bs_tensor_nrows(y), w->ne[0]};
    struct bs_tensor h = bs_tensor_make(y->type, 2, hne, y->data); /* shape only: not written */
    if ((rc = check_linear(&h, x, w, b, 0.0f, err)) != 0)
        return rc;
    return linear_impl((struct bs__cuda *)ctx, y, x, w, b, 0.0f, act, true, err);
}
