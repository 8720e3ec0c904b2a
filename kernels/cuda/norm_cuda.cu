/* Layer norm and group norm on the GPU, with affine parameters and
 * scale/shift modulation; x and y each F32, BF16 or F16.
 *
 * Three layers per op (STYLE rule 5): the kernels (norm_kernels.cuh, shared
 * with the host emulation of tests/gpu_emu), a launcher per dtype pair on
 * the stream (launch_ln, launch_gn), and the entry (bs__cuda_layer_norm,
 * bs__cuda_group_norm) that checks shapes and dtypes with the CPU twin's
 * checks (engine/opcheck.h), fills the kernel arguments, takes the calling
 * thread's state and dispatches on the dtypes. */
#include "cuda_common.cuh"

#include "norm_kernels.cuh"

static const float *data_or_null(const struct bs_tensor *t)
{
    return t ? (const float *)t->data : NULL;
}

static int64_t ld_or_zero(const struct bs_tensor *t)
{
    return t ? bs_tensor_ld(t) : 0;
}

/* Calls F<TX, TY>::run(args...) for the tensors' dtypes (each F32, BF16 or
 * F16; the opchecks have refused the rest). */
template <template <typename, typename> class F, typename TX, typename... A>
static void on_ty(enum bs_dtype ty, A... args)
{
    switch (ty) {
    case BS_TYPE_BF16:
        F<TX, __nv_bfloat16>::run(args...);
        break;
    case BS_TYPE_F16:
        F<TX, __half>::run(args...);
        break;
    default:
        F<TX, float>::run(args...);
    }
}

template <template <typename, typename> class F, typename... A>
static void on_types(enum bs_dtype tx, enum bs_dtype ty, A... args)
{
    switch (tx) {
    case BS_TYPE_BF16:
        on_ty<F, __nv_bfloat16>(ty, args...);
        break;
    case BS_TYPE_F16:
        on_ty<F, __half>(ty, args...);
        break;
    default:
        on_ty<F, float>(ty, args...);
    }
}

/* ---- layer norm --------------------------------------------------------- */

template <typename TX, typename TY> struct launch_ln {
    static void run(const ln_args &a, cudaStream_t s)
    {
        ln_plan p = ln_plan_make(a.rows, a.d);
        if (p.wide)
            ln_wide_kernel<TX, TY><<<p.grid, p.block, 0, s>>>(a);
        else
            ln_kernel<TX, TY><<<p.grid, p.block, 0, s>>>(a);
    }
};

int bs__cuda_layer_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                        const struct bs_norm_params *p, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    const char *op = "layer_norm";
    int rc = bs_opcheck_layer_norm(y, x, p, err);
    if (rc != 0)
        return rc;
    int64_t rows = bs_tensor_nrows(x), d = bs_opcheck_ncols(x), rps = p->rows_per_sample;
    if (d == 0 || rows == 0)
        return 0;
    if (rows > INT32_MAX)
        return bs_err_set(err, BS_ERANGE, "%s: too many rows", op);
    int64_t ldx = bs_tensor_ld(x), ldy = bs_tensor_ld(y);
    struct ln_args a = {x->data,
                        y->data,
                        rows,
                        d,
                        ldx,
                        ldy,
                        rps < 1 ? 1 : rps,
                        p->eps,
                        data_or_null(p->gamma),
                        data_or_null(p->beta),
                        data_or_null(p->scale),
                        data_or_null(p->shift),
                        ld_or_zero(p->scale),
                        ld_or_zero(p->shift),
                        norm_vec_ok(x->data, ldx, bs_dtype_size(x->type)),
                        norm_vec_ok(y->data, ldy, bs_dtype_size(y->type))};
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, op, err);
    if (t == NULL)
        return err->code;
    on_types<launch_ln>(x->type, y->type, a, t->stream);
    return bs__cuda_check_launch(op, err);
}

/* ---- group norm --------------------------------------------------------- */

template <typename TX, typename TY> struct launch_gn {
    static void run(const gn_args &a, unsigned blocks, cudaStream_t s)
    {
        gn_stats_kernel<TX><<<blocks, NORM_THREADS, 0, s>>>(a);
        gn_norm_kernel<TX, TY><<<blocks, NORM_THREADS, 0, s>>>(a);
    }
};

int bs__cuda_group_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                        const struct bs_norm_params *p, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    const char *op = "group_norm";
    int rc = bs_opcheck_group_norm(y, x, p, err);
    if (rc != 0)
        return rc;
    int64_t bsz = x->ne[0], ch = x->ne[1];
    int64_t s = bsz > 0 && ch > 0 ? bs_tensor_nelements(x) / (bsz * ch) : 0;
    if (s == 0)
        return 0;
    int64_t n = ch / p->groups * s;
    if (n > (int64_t)UINT32_MAX - GN_CHUNK_MAX) /* gn_norm_kernel's 32-bit positions */
        return bs_err_set(err, BS_ERANGE, "%s: a group of %lld values (at most 2^32 - %d)", op,
                          (long long)n, GN_CHUNK_MAX + 1);
    struct gn_args a = {x->data,
                        y->data,
                        ch,
                        s,
                        p->groups,
                        n,
                        0,
                        0,
                        p->eps,
                        data_or_null(p->gamma),
                        data_or_null(p->beta),
                        data_or_null(p->scale),
                        data_or_null(p->shift),
                        ld_or_zero(p->scale),
                        ld_or_zero(p->shift),
                        NULL,
                        norm_vec_ok(x->data, n, bs_dtype_size(x->type)),
                        norm_vec_ok(y->data, n, bs_dtype_size(y->type))};
    gn_plan(&a, bsz, c->sms);
    if (bsz * p->groups * a.chunks > INT32_MAX)
        return bs_err_set(err, BS_ERANGE, "%s: too many groups", op);
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, op, err);
    if (t == NULL)
        return err->code;
    size_t blocks = (size_t)(bsz * p->groups * a.chunks);
    a.part = (double *)bs__cuda_scratch(t, blocks * 2 * sizeof(double), err);
    if (a.part == NULL)
        return bs_err_wrap(err, op);
    on_types<launch_gn>(x->type, y->type, a, (unsigned)blocks, t->stream);
    return bs__cuda_check_launch(op, err);
}
