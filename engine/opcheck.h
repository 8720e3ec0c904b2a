/* Argument checks of the backend ops (STYLE rule 5), shared by every backend
 * so that the CPU op and its GPU twin reject bad arguments with the same code
 * and message. Each check returns 0, or a negative BS_E* code (BS_EINVAL
 * unless said otherwise) with "op: ..." in err; none touches tensor data
 * beyond what it checks, so they run on the host for any backend. Contracts of
 * the ops themselves are in backend.h. Plain C, callable from C++ (nvcc). */
#ifndef BS_OPCHECK_H
#define BS_OPCHECK_H

#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "common.h"
#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Columns of t: its last dim, or 1 for a 0-d tensor. */
static inline int64_t bs_opcheck_ncols(const struct bs_tensor *t)
{
    return t->n_dims ? t->ne[t->n_dims - 1] : 1;
}

/* 0 when t is present, F32 and a rows tensor; names it "op: name" otherwise. */
int bs_opcheck_rows(const struct bs_tensor *t, const char *op, const char *name,
                    struct bs_err *err);

/* An activation dtype (backend.h): F32, BF16 or F16. */
bool bs_opcheck_is_act_dtype(enum bs_dtype t);

/* 0 when t is present, of an activation dtype and a rows tensor. */
int bs_opcheck_act_rows(const struct bs_tensor *t, const char *op, const char *name,
                        struct bs_err *err);

/* 0 when x and y are activation rows tensors with the same rows and columns
 * (their dtypes may differ). */
int bs_opcheck_same_rows(const struct bs_tensor *y, const struct bs_tensor *x, const char *op,
                         struct bs_err *err);

/* 0 when t is NULL (optional) or a contiguous F32 vector of n elements. */
int bs_opcheck_vec(const struct bs_tensor *t, int64_t n, const char *op, const char *name,
                   struct bs_err *err);

/* 0 when t is NULL (optional) or an F32 rows tensor of d columns with at least
 * samples rows (a [B, d] modulation). */
int bs_opcheck_mod(const struct bs_tensor *t, int64_t d, int64_t samples, const char *op,
                   const char *name, struct bs_err *err);

/* 0 when act is a known activation. */
int bs_opcheck_act_valid(enum bs_act act, const char *op, struct bs_err *err);

/* The arguments of linear: x, y rows, w contiguous F32 [N, K], shapes that
 * match, bias NULL or contiguous F32 [N], beta 0 or 1. */
int bs_opcheck_linear(const struct bs_tensor *y, const struct bs_tensor *x,
                      const struct bs_tensor *w, const struct bs_tensor *b, float beta,
                      struct bs_err *err);

/* The arguments of layer_norm: x, y of one shape and p's vectors and
 * modulations (with rows_per_sample >= 1 where there is a modulation). */
int bs_opcheck_layer_norm(const struct bs_tensor *y, const struct bs_tensor *x,
                          const struct bs_norm_params *p, struct bs_err *err);

/* The arguments of group_norm: x, y contiguous F32 [B, C, ...] of one size,
 * C divisible by p->groups, and p's vectors and modulations. */
int bs_opcheck_group_norm(const struct bs_tensor *y, const struct bs_tensor *x,
                          const struct bs_norm_params *p, struct bs_err *err);

/* The arguments of act: a known activation and x, y of one shape. */
int bs_opcheck_act(const struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                   struct bs_err *err);

/* The arguments of glu: a known activation, x [M, 2N] and y [M, N] rows. */
int bs_opcheck_glu(const struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                   struct bs_err *err);

/* The arguments of add: x, y of one shape and gate NULL or a modulation for
 * rows_per_sample >= 1. */
int bs_opcheck_add(const struct bs_tensor *y, const struct bs_tensor *x,
                   const struct bs_tensor *gate, int64_t rows_per_sample, struct bs_err *err);

/* The arguments of transpose: contiguous F32 x [B, R, C] (or [R, C]) and y
 * with the last two dims swapped. */
int bs_opcheck_transpose(const struct bs_tensor *y, const struct bs_tensor *x, struct bs_err *err);

/* The arguments of get_rows: table and y rows tensors, y [n, D] for a table
 * of D columns, and every idx[i] (host memory) a row of the table. */
int bs_opcheck_get_rows(const struct bs_tensor *y, const struct bs_tensor *table,
                        const int64_t *idx, int64_t n, struct bs_err *err);

/* The tensors of attention over a uniform batch: q, k, v, o rows tensors
 * with the row counts and heads x head_dim columns of p, and sane sizes in
 * p. A ragged batch (q_off set) fails here with a message, as do k_off,
 * m_off or mask_per_query without q_off: a backend that takes ragged
 * batches checks them with bs_opcheck_attention_ragged instead. */
int bs_opcheck_attention(const struct bs_tensor *o, const struct bs_tensor *q,
                         const struct bs_tensor *k, const struct bs_tensor *v,
                         const struct bs_attn_params *p, struct bs_err *err);

/* The mask of attention: p->mask NULL, or F32 [batch, 1 or lq, lk] with a
 * dense last dim and float-aligned strides. */
int bs_opcheck_attention_mask(const struct bs_attn_params *p, struct bs_err *err);

/* All the arguments of attention over a ragged batch (q_off set; see
 * struct bs_attn_params): the tensors and sizes as above; q_off and k_off
 * from 0 and never decreasing, each sample with 1 to lq queries and 0 to lk
 * keys, q and o of q_off[batch] rows, k and v of k_off[batch]; with a mask,
 * a contiguous F32 one, m_off given and each sample's part inside it. */
int bs_opcheck_attention_ragged(const struct bs_tensor *o, const struct bs_tensor *q,
                                const struct bs_tensor *k, const struct bs_tensor *v,
                                const struct bs_attn_params *p, struct bs_err *err);

#ifdef __cplusplus
}
#endif

#endif
