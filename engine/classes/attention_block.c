/* diffusers' AttentionBlock (the VAE's spatial self-attention) on
 * hidden_states [B, C, H, W]. */
#include "class.h"

#define F(field) offsetof(struct bs_model_config, attention_block.field)

static const struct bs_config_opt ab_opts[] = {
    {"channels", BS_CONFIG_INT, F(channels), true, 0},
    {"num_head_channels", BS_CONFIG_INT_OR_NULL, F(num_head_channels), false, 0},
    {"norm_num_groups", BS_CONFIG_INT, F(norm_num_groups), false, 32},
    {"rescale_output_factor", BS_CONFIG_NUM, F(rescale_output_factor), false, 1.0},
    {"eps", BS_CONFIG_NUM, F(eps), false, 1e-5},
    {NULL, 0, 0, false, 0},
};

static int ab_validate(const struct bs_model_config *mc, struct bs_err *err)
{
    const struct bs_attention_block_config *c = &mc->attention_block;
    if (c->channels % c->norm_num_groups != 0)
        return bs_err_set(err, BS_EINVAL, "channels %lld is not divisible by norm_num_groups %lld",
                          (long long)c->channels, (long long)c->norm_num_groups);
    if (c->num_head_channels != 0 && c->channels % c->num_head_channels != 0)
        return bs_err_set(err, BS_EINVAL,
                          "channels %lld is not divisible by num_head_channels %lld",
                          (long long)c->channels, (long long)c->num_head_channels);
    if (c->rescale_output_factor == 0)
        return bs_err_set(err, BS_EINVAL, "\"rescale_output_factor\" must not be 0");
    if (c->eps <= 0)
        return bs_err_set(err, BS_EINVAL, "\"eps\" must be positive");
    return 0;
}

enum { HIDDEN_STATES, N_INPUTS };

static const struct bs_class_input ab_inputs[N_INPUTS] = {
    [HIDDEN_STATES] = {"hidden_states", BS_ROLE_BATCHED, 4, BS_DTYPES_FLOAT, BS_TYPE_F32,
                       BS_RAGGED(2) | BS_RAGGED(3)},
};

static void ab_describe(const struct bs_model_config *mc, struct bs_class_io *io)
{
    int64_t dims[4] = {-1, mc->attention_block.channels, -1, -1};
    bs_class_io_add(io, HIDDEN_STATES, true, dims);
    bs_class_io_output(io, dims);
}

static size_t ab_state_size(const struct bs_model_config *c)
{
    (void)c;
    return sizeof(struct bs__attention_block);
}

static void ab_bind(struct bs__loader *ld, void *state, const struct bs_model_config *c)
{
    bs__bind_attention_block(ld, state, &c->attention_block);
}

/* [B, C, H, W] as [B, C, H * W] through the block. */
static int ab_forward(const struct bs_model_config *c, const void *state, struct bs__fwd *f,
                      const struct bs_tensor *const *in, struct bs_tensor *out,
                      const struct bs_forward_opts *opts)
{
    const struct bs_tensor *hs = in[HIDDEN_STATES];
    struct bs_tensor x, y;
    (void)c;
    (void)opts;
    BS_TRY(bs__upload_rows(f, &x, hs));
    if (f->rg == NULL) /* packed samples stay flat (bs__attention_block_forward) */
        x = bs_tensor_reshape(&x, 3, (int64_t[]){hs->ne[0], hs->ne[1], hs->ne[2] * hs->ne[3]});
    BS_TRY(bs__attention_block_forward(f, state, &x, &y));
    return bs__download(f, out, &y);
}

/* q, k, v and the output projection, then scores and values. */
static double ab_flops(const struct bs_model_config *c, const void *state,
                       const struct bs_tensor *const *in)
{
    const struct bs_tensor *hs = in[HIDDEN_STATES];
    double b = (double)hs->ne[0];
    double ch = (double)c->attention_block.channels, s = (double)(hs->ne[2] * hs->ne[3]);
    (void)state;
    return 2 * b * s * ch * ch * 4 + 4 * b * s * s * ch;
}

const struct bs_class bs_class_attention_block = {
    .name = "AttentionBlock",
    .opts = ab_opts,
    .validate = ab_validate,
    .inputs = ab_inputs,
    .n_inputs = N_INPUTS,
    .describe = ab_describe,
    .state_size = ab_state_size,
    .bind = ab_bind,
    .forward = ab_forward,
    .flops = ab_flops,
};
