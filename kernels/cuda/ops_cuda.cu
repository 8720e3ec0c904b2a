/* The row-wise and elementwise ops on the GPU:
 * activations, gated units, gated residual adds, transpose,
 * row gathers (host indices; and device indices for launch graphs), bias rows and the F32 to
 * BF16/FP16 operand conversion.
 *
 * Three layers per op (STYLE rule 5): the __global__ kernel (ops_kernels.cuh,
 * shared with the host emulation of tests/gpu_emu), a launcher that takes
 * the stream (launch_*), and the entry (bs__cuda_*) that checks shapes and
 * dtypes with the CPU twin's checks (engine/opcheck.h), takes the calling
 * thread's state (its stream: cuda_common.cuh) and launches. */
#include "cuda_common.cuh"

#include "ops_kernels.cuh"

/* ---- conversion and bias ------------------------------------------------ */

int bs__cuda_to_half(const struct bs__cuda *c, struct bs__cuda_thread *t, void *dst,
                     const float *src, int64_t rows, int64_t cols, int64_t ld, int code,
                     struct bs_err *err)
{
    if (rows == 0 || cols == 0)
        return 0;
    if (c->dtype == BS_TYPE_BF16)
        to_half_kernel<<<ew_grid(rows, cols), EW_THREADS, 0, t->stream>>>(
            (__nv_bfloat16 *)dst, src, rows, cols, ld, t->overflow_dev, code);
    else
        to_half_kernel<<<ew_grid(rows, cols), EW_THREADS, 0, t->stream>>>(
            (__half *)dst, src, rows, cols, ld, t->overflow_dev, code);
    return bs__cuda_check_launch("to_half", err);
}

int bs__cuda_bias_rows(struct bs__cuda_thread *t, float *y, int64_t ldy, const float *b, int64_t m,
                       int64_t n, float beta, struct bs_err *err)
{
    bias_kernel<<<ew_grid(m, n), EW_THREADS, 0, t->stream>>>(y, ldy, b, m, n, beta);
    return bs__cuda_check_launch("linear bias", err);
}

/* ---- activations, gated units, residual adds ---------------------------- */

/* Activations are F32, BF16 or F16 (engine/backend.h): each launcher picks
 * the kernel instance of its tensors' dtypes (act_type, act_io.cuh). */

int bs__cuda_act(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                 struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    int rc = bs_opcheck_act(y, x, act, err);
    if (rc != 0)
        return rc;
    int64_t rows = bs_tensor_nrows(x), n = bs_opcheck_ncols(x);
    if (rows == 0 || n == 0)
        return 0;
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "act", err);
    if (t == NULL)
        return err->code;
    return bs__cuda_act_rows(t, y->data, y->type, bs_tensor_ld(y), x->data, x->type,
                             bs_tensor_ld(x), rows, n, act, err);
}

int bs__cuda_act_rows(struct bs__cuda_thread *t, void *y, enum bs_dtype ty, int64_t ldy,
                      const void *x, enum bs_dtype tx, int64_t ldx, int64_t rows, int64_t cols,
                      enum bs_act act, struct bs_err *err)
{
    act_type(ty, [&](auto *yt) {
        act_type(tx, [&](auto *xt) {
            using TY = ACT_T(yt);
            using TX = ACT_T(xt);
            act_kernel<TY, TX><<<ew_grid(rows, cols), EW_THREADS, 0, t->stream>>>(
                (TY *)y, ldy, (const TX *)x, ldx, rows, cols, (int)act);
        });
    });
    return bs__cuda_check_launch("act", err);
}

int bs__cuda_glu(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                 struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    int rc = bs_opcheck_glu(y, x, act, err);
    if (rc != 0)
        return rc;
    int64_t n = bs_opcheck_ncols(y), rows = bs_tensor_nrows(y);
    if (rows == 0 || n == 0)
        return 0;
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "glu", err);
    if (t == NULL)
        return err->code;
    return bs__cuda_glu_rows(t, y->data, y->type, bs_tensor_ld(y), x->data, x->type,
                             bs_tensor_ld(x), rows, n, act, err);
}

int bs__cuda_glu_rows(struct bs__cuda_thread *t, void *y, enum bs_dtype ty, int64_t ldy,
                      const void *x, enum bs_dtype tx, int64_t ldx, int64_t rows, int64_t n,
                      enum bs_act act, struct bs_err *err)
{
    act_type(ty, [&](auto *yt) {
        act_type(tx, [&](auto *xt) {
            using TY = ACT_T(yt);
            using TX = ACT_T(xt);
            glu_kernel<TY, TX><<<ew_grid(rows, n), EW_THREADS, 0, t->stream>>>(
                (TY *)y, ldy, (const TX *)x, ldx, rows, n, (int)act);
        });
    });
    return bs__cuda_check_launch("glu", err);
}

int bs__cuda_add(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                 const struct bs_tensor *gate, int64_t rows_per_sample, float alpha,
                 struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    int rc = bs_opcheck_add(y, x, gate, rows_per_sample, err);
    if (rc != 0)
        return rc;
    int64_t rows = bs_tensor_nrows(x), n = bs_opcheck_ncols(x);
    if (rows == 0 || n == 0)
        return 0;
    struct add_args a = {y->data,
                         x->data,
                         bs__cuda_f32_or_null(gate),
                         bs_tensor_ld(y),
                         bs_tensor_ld(x),
                         bs__cuda_ld_or_zero(gate),
                         rows,
                         n,
                         rows_per_sample < 1 ? 1 : rows_per_sample,
                         alpha};
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "add", err);
    if (t == NULL)
        return err->code;
    act_type(y->type, [&](auto *yt) {
        act_type(x->type, [&](auto *xt) {
            add_kernel<ACT_T(yt), ACT_T(xt)><<<ew_grid(rows, n), EW_THREADS, 0, t->stream>>>(a);
        });
    });
    return bs__cuda_check_launch("add", err);
}

/* ---- transpose ---------------------------------------------------------- */

int bs__cuda_transpose(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                       struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    int rc = bs_opcheck_transpose(y, x, err);
    if (rc != 0)
        return rc;
    int nd = x->n_dims;
    int64_t bsz = nd == 3 ? x->ne[0] : 1, r = x->ne[nd - 2], cols = x->ne[nd - 1];
    if (bsz == 0 || r == 0 || cols == 0)
        return 0;
    int64_t gx = bs__cdiv(cols, TR_TILE), gy = bs__cdiv(r, TR_TILE);
    if (gx > INT32_MAX || gy > 65535 || bsz > 65535)
        return bs_err_set(err, BS_ERANGE, "transpose: [%lld, %lld, %lld] exceeds the grid",
                          (long long)bsz, (long long)r, (long long)cols);
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "transpose", err);
    if (t == NULL)
        return err->code;
    dim3 grid((unsigned)gx, (unsigned)gy, (unsigned)bsz), block(TR_TILE, 8);
    act_type(x->type, [&](auto *xt) { /* y has x's type (bs_opcheck_transpose) */
                                      using T = ACT_T(xt);
                                      transpose_kernel<T><<<grid, block, 0, t->stream>>>(
                                          (T *)y->data, (const T *)x->data, r, cols);
    });
    return bs__cuda_check_launch("transpose", err);
}

/* ---- get_rows ----------------------------------------------------------- */

/* Indices are few (one per sample): one device-to-device copy per row. */
int bs__cuda_get_rows(void *ctx, struct bs_tensor *y, const struct bs_tensor *table,
                      const int64_t *idx, int64_t n, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    int rc;
    if ((rc = bs_opcheck_get_rows(y, table, idx, n, err)))
        return rc;
    int64_t d = bs_opcheck_ncols(table);
    int64_t ldt = bs_tensor_ld(table), ldy = bs_tensor_ld(y);
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "get_rows", err);
    if (t == NULL)
        return err->code;
    if (bs__cuda_capturing(t))
        return bs__cuda_refuse_capture("get_rows",
                                       "its host indices would be baked into the graph; "
                                       "graph_rows reads them on the device",
                                       err);
    for (int64_t i = 0; i < n && d > 0; i++)
        TRY_RC(rc, bs__cuda_check(cudaMemcpyAsync((float *)y->data + i * ldy,
                                                  (const float *)table->data + idx[i] * ldt,
                                                  (size_t)d * sizeof(float),
                                                  cudaMemcpyDeviceToDevice, t->stream),
                                  "get_rows", "cudaMemcpyAsync", err));
    return 0;
}

/* graph_rows (backend_cuda.cu) on the capturing thread's stream: the copy
 * of the indices from the graph's pinned slots and the gather are captured
 * as two nodes, so each launch reads the indices the engine wrote last. */
int bs__cuda_gather_rows(struct bs__cuda_thread *t, float *y, int64_t ldy, const float *table,
                         int64_t ldt, int64_t nrows, const int64_t *idx_host, int64_t *idx_dev,
                         int64_t n, int64_t d, struct bs_err *err)
{
    int rc;
    if (n == 0 || d == 0)
        return 0;
    TRY_RC(rc, bs__cuda_check(cudaMemcpyAsync(idx_dev, idx_host, (size_t)n * sizeof(int64_t),
                                              cudaMemcpyHostToDevice, t->stream),
                              "graph_rows", "cudaMemcpyAsync", err));
    gather_rows_kernel<<<ew_grid(n, d), EW_THREADS, 0, t->stream>>>(y, ldy, table, ldt, idx_dev, n,
                                                                    d, nrows);
    return bs__cuda_check_launch("graph_rows", err);
}
