/* diffusers' BasicTransformerBlock (attention.py at the seed's version), alone
 * or as a stack of blocks ("blockserve.num_blocks"). */
#include <stdlib.h>

#include "class.h"

#define F(field) offsetof(struct bs_model_config, btb.field)

static const struct bs_config_opt btb_opts[] = {
    {"dim", BS_CONFIG_INT, F(dim), true, 0},
    {"num_attention_heads", BS_CONFIG_INT, F(num_attention_heads), true, 0},
    {"attention_head_dim", BS_CONFIG_INT, F(attention_head_dim), true, 0},
    {"dropout", BS_CONFIG_NUM, F(dropout), false, 0.0},
    {"cross_attention_dim", BS_CONFIG_INT_OR_NULL, F(cross_attention_dim), false, 0},
    {"activation_fn", BS_CONFIG_FF_ACT, F(activation_fn), false, BS_FF_GEGLU},
    {"num_embeds_ada_norm", BS_CONFIG_INT_OR_NULL, F(num_embeds_ada_norm), false, 0},
    {"attention_bias", BS_CONFIG_BOOL, F(attention_bias), false, false},
    {"only_cross_attention", BS_CONFIG_BOOL, F(only_cross_attention), false, false},
    {"upcast_attention", BS_CONFIG_BOOL, F(upcast_attention), false, false},
    {"norm_elementwise_affine", BS_CONFIG_BOOL, F(norm_elementwise_affine), false, true},
    {"norm_type", BS_CONFIG_NORM_TYPE, F(norm_type), false, BS_NORM_LAYER_NORM},
    {"final_dropout", BS_CONFIG_BOOL, F(final_dropout), false, false},
    {NULL, 0, 0, false, 0},
};

static int btb_validate(const struct bs_model_config *mc, struct bs_err *err)
{
    const struct bs_btb_config *c = &mc->btb;
    if (c->norm_type != BS_NORM_LAYER_NORM && c->num_embeds_ada_norm == 0)
        return bs_err_set(err, BS_EINVAL,
                          "`norm_type` is set to %s, but `num_embeds_ada_norm` is not defined",
                          c->norm_type == BS_NORM_ADA_NORM ? "ada_norm" : "ada_norm_zero");
    if (c->dropout < 0 || c->dropout > 1)
        return bs_err_set(err, BS_EINVAL, "\"dropout\": %g is not in [0, 1]", c->dropout);
    return 0;
}

enum {
    HIDDEN_STATES,
    ENCODER_HIDDEN_STATES,
    ATTENTION_MASK,
    ENCODER_ATTENTION_MASK,
    TIMESTEP,
    CLASS_LABELS,
    N_INPUTS
};

static const struct bs_class_input btb_inputs[N_INPUTS] = {
    [HIDDEN_STATES] = {"hidden_states", BS_ROLE_BATCHED, 3, BS_DTYPES_FLOAT, BS_TYPE_F32,
                       BS_RAGGED(1)},
    [ENCODER_HIDDEN_STATES] = {"encoder_hidden_states", BS_ROLE_BATCHED, 3, BS_DTYPES_FLOAT,
                               BS_TYPE_F32, BS_RAGGED(1)},
    [ATTENTION_MASK] = {"attention_mask", BS_ROLE_MASK, 3, BS_DTYPES_MASK, BS_TYPE_F32, 0},
    [ENCODER_ATTENTION_MASK] = {"encoder_attention_mask", BS_ROLE_MASK, 3, BS_DTYPES_MASK,
                                BS_TYPE_F32, 0},
    [TIMESTEP] = {"timestep", BS_ROLE_COND, 1, BS_DTYPES_NUMBER, BS_TYPE_I64, 0},
    [CLASS_LABELS] = {"class_labels", BS_ROLE_COND, 1, BS_DTYPES_NUMBER, BS_TYPE_I64, 0},
};

/* encoder_hidden_states only where an attention uses them (required when
 * their width differs); masks of the attentions present; timestep with
 * ada_norm and ada_norm_zero, class_labels with ada_norm_zero. */
static void btb_describe(const struct bs_model_config *mc, struct bs_class_io *io)
{
    const struct bs_btb_config *c = &mc->btb;
    int64_t enc_dim = c->cross_attention_dim ? c->cross_attention_dim : c->dim;
    bool uses_enc = c->cross_attention_dim != 0 || c->only_cross_attention;
    bool needs_enc = uses_enc && enc_dim != c->dim;
    int64_t any3[3] = {-1, -1, -1}, any1[1] = {-1};
    bs_class_io_add(io, HIDDEN_STATES, true, (int64_t[]){-1, -1, c->dim});
    if (uses_enc)
        bs_class_io_add(io, ENCODER_HIDDEN_STATES, needs_enc, (int64_t[]){-1, -1, enc_dim});
    bs_class_io_add(io, ATTENTION_MASK, false, any3);
    if (c->cross_attention_dim)
        bs_class_io_add(io, ENCODER_ATTENTION_MASK, false, any3);
    if (c->norm_type != BS_NORM_LAYER_NORM)
        bs_class_io_add(io, TIMESTEP, true, any1);
    if (c->norm_type == BS_NORM_ADA_NORM_ZERO)
        bs_class_io_add(io, CLASS_LABELS, true, any1);
    bs_class_io_output(io, (int64_t[]){-1, -1, c->dim});
}

static size_t btb_state_size(const struct bs_model_config *c)
{
    return (size_t)c->num_blocks * sizeof(struct bs__block);
}

static void btb_bind(struct bs__loader *ld, void *state, const struct bs_model_config *c)
{
    struct bs__block *blocks = state;
    for (int i = 0; i < c->num_blocks && ld->rc == 0; i++) {
        bs__expand_prefix(ld->prefix, c->weights_prefix, i);
        bs__bind_block(ld, &blocks[i], &c->btb);
    }
}

static int btb_check(const struct bs_model_config *mc, const struct bs_tensor *const *in,
                     struct bs_err *err)
{
    const struct bs_btb_config *c = &mc->btb;
    const struct bs_tensor *hs = in[HIDDEN_STATES], *enc = in[ENCODER_HIDDEN_STATES];
    int64_t batch = hs->ne[0], lq = hs->ne[1], lk = enc ? enc->ne[1] : lq;
    if (enc != NULL)
        BS_TRY(bs__check_batch(enc, batch, "encoder_hidden_states", err));
    BS_TRY(bs__check_mask(in[ATTENTION_MASK], batch, lq, c->only_cross_attention ? lk : lq,
                          "attention_mask", err));
    BS_TRY(
        bs__check_mask(in[ENCODER_ATTENTION_MASK], batch, lq, lk, "encoder_attention_mask", err));
    int64_t t_limit = c->norm_type == BS_NORM_ADA_NORM ? c->num_embeds_ada_norm : 0;
    BS_TRY(bs__check_cond(in[TIMESTEP], batch, t_limit, "timestep", err));
    return bs__check_cond(in[CLASS_LABELS], batch, c->num_embeds_ada_norm + 1, "class_labels", err);
}

/* The blocks in turn on x in place; each block's output goes to on_block when
 * it is set (the last one is then already in out). */
static int btb_forward(const struct bs_model_config *mc, const void *state, struct bs__fwd *f,
                       const struct bs_tensor *const *in, struct bs_tensor *out,
                       const struct bs_forward_opts *opts)
{
    const struct bs_btb_config *c = &mc->btb;
    const struct bs__block *blocks = state;
    const struct bs_tensor *hs = in[HIDDEN_STATES], *enc = in[ENCODER_HIDDEN_STATES];
    struct bs_tensor x;
    struct bs__cond cond;
    void *storage = NULL;
    int rc;
    f->lk = 0;
    BS_TRY(bs__upload_rows(f, &x, hs));
    if (enc != NULL)
        BS_TRY(bs__upload_keys(f, enc, ENCODER_HIDDEN_STATES));
    if (in[ATTENTION_MASK] != NULL)
        BS_TRY(bs__upload_mask(f, &f->mask1, in[ATTENTION_MASK], ATTENTION_MASK));
    if (in[ENCODER_ATTENTION_MASK] != NULL)
        BS_TRY(bs__upload_mask(f, &f->mask2, in[ENCODER_ATTENTION_MASK], ENCODER_ATTENTION_MASK));
    rc = bs__make_cond(f, in[TIMESTEP], in[CLASS_LABELS], c->norm_type == BS_NORM_ADA_NORM_ZERO,
                       &cond, &storage);
    f->cond = &cond;
    for (int i = 0; rc == 0 && i < mc->num_blocks; i++) {
        if (f->should_stop != NULL && f->should_stop(f->stop_arg)) {
            rc = bs_err_set(f->err, BS_ECANCELED,
                            "stopped before block %d of %d: no request of the batch is waiting "
                            "for it", i + 1, mc->num_blocks);
            break;
        }
        f->block = i;
        rc = bs__block_forward(f, &blocks[i], &x);
        if (rc == 0 && opts != NULL && opts->blocks_run != NULL)
            *opts->blocks_run = i + 1;
        if (rc == 0 && opts != NULL && opts->on_block != NULL &&
            (rc = bs__download(f, out, &x)) == 0)
            rc = opts->on_block(opts->cb_arg, i, mc->num_blocks, out);
    }
    if (rc == 0 && (opts == NULL || opts->on_block == NULL))
        rc = bs__download(f, out, &x);
    free(storage);
    return rc;
}

/* Per block: attn1 (q, k/v over its sources, scores, values, out), attn2 the
 * same with cross_attention_dim, and the feed-forward (GEGLU's projection is
 * twice as wide). */
static double btb_flops(const struct bs_model_config *mc, const void *state,
                        const struct bs_tensor *const *in)
{
    const struct bs_btb_config *c = &mc->btb;
    const struct bs_tensor *hs = in[HIDDEN_STATES], *enc = in[ENCODER_HIDDEN_STATES];
    double rows = (double)bs_tensor_nelements(hs) / (double)hs->ne[hs->n_dims - 1];
    double b = (double)hs->ne[0];
    double d = (double)c->dim, inner = (double)(c->num_attention_heads * c->attention_head_dim);
    double lq = (double)hs->ne[1], lk = enc ? (double)enc->ne[1] : lq;
    double kvd = enc ? (double)enc->ne[2] : d;
    double l1 = c->only_cross_attention && enc ? lk : lq;
    double d1 = c->only_cross_attention && enc ? kvd : d;
    double ff_in = c->activation_fn == BS_FF_GEGLU ? 8 * d : 4 * d;
    double per = 2 * rows * d * inner + 2 * b * l1 * d1 * 2 * inner + 4 * b * lq * l1 * inner +
                 2 * rows * inner * d + 2 * rows * d * ff_in + 2 * rows * 4 * d * d;
    (void)state;
    if (c->cross_attention_dim)
        per += 2 * rows * d * inner + 2 * b * lk * kvd * 2 * inner + 4 * b * lq * lk * inner +
               2 * rows * inner * d;
    return per * mc->num_blocks;
}

const struct bs_class bs_class_btb = {
    .name = "BasicTransformerBlock",
    .opts = btb_opts,
    .validate = btb_validate,
    .stackable = true,
    .inputs = btb_inputs,
    .n_inputs = N_INPUTS,
    .describe = btb_describe,
    .state_size = btb_state_size,
    .bind = btb_bind,
    .check = btb_check,
    .forward = btb_forward,
    .flops = btb_flops,
    .cacheable = true,
};
