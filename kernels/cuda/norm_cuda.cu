/* Layer norm and group norm on the GPU, with affine parameters and
 * scale/shift modulation; x and y each F32, BF16 or F16.
 *
 * Three layers per op (STYLE rule 5): the kernels (norm_kernels.cuh, shared
 * with the host emulation of tests/gpu_emu), and the entry
 * (bs__cuda_layer_norm, bs__cuda_group_norm) that checks shapes and dtypes
 * with the CPU twin's checks (engine/opcheck.h), fills the kernel
 * arguments, takes the calling thread's state and launches the instance of
 * the dtype pair on its stream (act_type, act_io.cuh, as the other ops). */
#include "cuda_common.cuh"

#include "norm_kernels.cuh"

/* ---- layer norm --------------------------------------------------------- */

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
                        bs__cuda_f32_or_null(p->gamma),
                        bs__cuda_f32_or_null(p->beta),
                        bs__cuda_f32_or_null(p->scale),
                        bs__cuda_f32_or_null(p->shift),
                        bs__cuda_ld_or_zero(p->scale),
                        bs__cuda_ld_or_zero(p->shift),
                        norm_vec_ok(x->data, ldx, bs_dtype_size(x->type)),
                        norm_vec_ok(y->data, ldy, bs_dtype_size(y->type))};
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, op, err);
    if (t == NULL)
        return err->code;
    ln_plan pl = ln_plan_make(a.rows, a.d);
    act_type(x->type, [&](auto *xt) {
        act_type(y->type, [&](auto *yt) {
            using TX = ACT_T(xt);
            using TY = ACT_T(yt);
            if (pl.wide)
                ln_wide_kernel<TX, TY><<<pl.grid, pl.block, 0, t->stream>>>(a);
            else
                ln_kernel<TX, TY><<<pl.grid, pl.block, 0, t->stream>>>(a);
        });
    });
    return bs__cuda_check_launch(op, err);
}

/* ---- group norm --------------------------------------------------------- */

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
                        bs__cuda_f32_or_null(p->gamma),
                        bs__cuda_f32_or_null(p->beta),
                        bs__cuda_f32_or_null(p->scale),
                        bs__cuda_f32_or_null(p->shift),
                        bs__cuda_ld_or_zero(p->scale),
                        bs__cuda_ld_or_zero(p->shift),
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
    act_type(x->type, [&](auto *xt) {
        act_type(y->type, [&](auto *yt) {
            using TX = ACT_T(xt);
            using TY = ACT_T(yt);
            gn_stats_kernel<TX><<<(unsigned)blocks, NORM_THREADS, 0, t->stream>>>(a);
            gn_norm_kernel<TX, TY><<<(unsigned)blocks, NORM_THREADS, 0, t->stream>>>(a);
        });
    });
    return bs__cuda_check_launch(op, err);
}
