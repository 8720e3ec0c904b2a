/* diffusers' AdaGroupNorm: GroupNorm of x [B, C, H, W] modulated by a scale
 * and shift computed from emb [B, E] (optional activation, then a linear). */
#include "class.h"

#define F(field) offsetof(struct bs_model_config, ada_group_norm.field)

static const struct bs_config_opt agn_opts[] = {
    {"embedding_dim", BS_CONFIG_INT, F(embedding_dim), true, 0},
    {"out_dim", BS_CONFIG_INT, F(out_dim), true, 0},
    {"num_groups", BS_CONFIG_INT, F(num_groups), true, 0},
    {"act_fn", BS_CONFIG_ACT_FN, F(act_fn), false, BS_ACT_NONE},
    {"eps", BS_CONFIG_NUM, F(eps), false, 1e-5},
    {NULL, 0, 0, false, 0},
};

static int agn_validate(const struct bs_model_config *mc, struct bs_err *err)
{
    const struct bs_ada_group_norm_config *c = &mc->ada_group_norm;
    if (c->out_dim % c->num_groups != 0)
        return bs_err_set(err, BS_EINVAL, "out_dim %lld is not divisible by num_groups %lld",
                          (long long)c->out_dim, (long long)c->num_groups);
    if (c->eps <= 0)
        return bs_err_set(err, BS_EINVAL, "\"eps\" must be positive");
    return 0;
}

enum { X, EMB, N_INPUTS };

static const struct bs_class_input agn_inputs[N_INPUTS] = {
    [X] = {"x", BS_ROLE_BATCHED, 4, BS_DTYPES_FLOAT, BS_TYPE_F32, BS_RAGGED(2) | BS_RAGGED(3)},
    [EMB] = {"emb", BS_ROLE_BATCHED, 2, BS_DTYPES_FLOAT, BS_TYPE_F32, 0},
};

static void agn_describe(const struct bs_model_config *mc, struct bs_class_io *io)
{
    const struct bs_ada_group_norm_config *c = &mc->ada_group_norm;
    bs_class_io_add(io, X, true, (int64_t[]){-1, c->out_dim, -1, -1});
    bs_class_io_add(io, EMB, true, (int64_t[]){-1, c->embedding_dim});
    bs_class_io_output(io, (int64_t[]){-1, c->out_dim, -1, -1});
}

static size_t agn_state_size(const struct bs_model_config *c)
{
    (void)c;
    return sizeof(struct bs__ada_group_norm);
}

static void agn_bind(struct bs__loader *ld, void *state, const struct bs_model_config *c)
{
    bs__bind_ada_group_norm(ld, state, &c->ada_group_norm);
}

static int agn_check(const struct bs_model_config *c, const struct bs_tensor *const *in,
                     struct bs_err *err)
{
    (void)c;
    return bs__check_batch(in[EMB], in[X]->ne[0], "emb", err);
}

/* x [B, C, H, W] as [B, C, H * W]. */
static int agn_forward(const struct bs_model_config *c, const void *state, struct bs__fwd *f,
                       const struct bs_tensor *const *in, struct bs_tensor *out,
                       const struct bs_forward_opts *opts)
{
    const struct bs_tensor *x_in = in[X], *emb_in = in[EMB];
    struct bs_tensor x, emb, y;
    (void)c;
    (void)opts;
    BS_TRY(bs__upload_rows(f, &x, x_in));
    if (f->rg == NULL) /* packed samples stay flat (bs__ada_group_norm_forward) */
        x = bs_tensor_reshape(&x, 3,
                              (int64_t[]){x_in->ne[0], x_in->ne[1], x_in->ne[2] * x_in->ne[3]});
    BS_TRY(bs__upload(f, &emb, emb_in, emb_in->ne[0], emb_in->ne[1]));
    BS_TRY(bs__ada_group_norm_forward(f, state, &x, &emb, &y));
    return bs__download(f, out, &y);
}

/* As the engine counted it before the class table: 2 per row of x ([B, C, H]
 * rows of W); the modulation's linear (emb -> 2 out_dim) is not counted. */
static double agn_flops(const struct bs_model_config *c, const void *state,
                        const struct bs_tensor *const *in)
{
    const struct bs_tensor *x = in[X];
    (void)c;
    (void)state;
    return 2 * ((double)bs_tensor_nelements(x) / (double)x->ne[x->n_dims - 1]);
}

const struct bs_class bs_class_ada_group_norm = {
    .name = "AdaGroupNorm",
    .opts = agn_opts,
    .validate = agn_validate,
    .inputs = agn_inputs,
    .n_inputs = N_INPUTS,
    .describe = agn_describe,
    .state_size = agn_state_size,
    .bind = agn_bind,
    .check = agn_check,
    .forward = agn_forward,
    .flops = agn_flops,
};
