/* diffusers' FeedForward: a projection with its activation (GELU, GEGLU or
 * ApproximateGELU) to int(dim * mult), then a linear to dim_out. */
#include "class.h"

#define F(field) offsetof(struct bs_model_config, feed_forward.field)

static const struct bs_config_opt ff_opts[] = {
    {"dim", BS_CONFIG_INT, F(dim), true, 0},
    {"dim_out", BS_CONFIG_INT_OR_NULL, F(dim_out), false, 0},
    {"mult", BS_CONFIG_NUM, F(mult), false, 4.0},
    {"dropout", BS_CONFIG_NUM, F(dropout), false, 0.0},
    {"activation_fn", BS_CONFIG_FF_ACT, F(activation_fn), false, BS_FF_GEGLU},
    {"final_dropout", BS_CONFIG_BOOL, F(final_dropout), false, false},
    {NULL, 0, 0, false, 0},
};

static int ff_validate(const struct bs_model_config *mc, struct bs_err *err)
{
    const struct bs_feed_forward_config *c = &mc->feed_forward;
    /* Range-check the product in double first: converting a double beyond
     * int64's range (mult 1e300) is undefined. */
    double width = (double)c->dim * c->mult;
    int64_t inner = width >= 1 && width <= 16.0 * BS_CONFIG_DIM_MAX ? bs_config_ff_inner(mc) : 0;
    if (!(c->mult > 0) || inner < 1 || inner > 16 * BS_CONFIG_DIM_MAX)
        return bs_err_set(err, BS_EINVAL, "\"mult\": %g gives an inner width of %lld", c->mult,
                          (long long)inner);
    return 0;
}

enum { HIDDEN_STATES, N_INPUTS };

static const struct bs_class_input ff_inputs[N_INPUTS] = {
    [HIDDEN_STATES] = {"hidden_states", BS_ROLE_BATCHED, 3, BS_DTYPES_FLOAT, BS_TYPE_F32, BS_RAGGED(1)},
};

static int64_t ff_dim_out(const struct bs_feed_forward_config *c)
{
    return c->dim_out ? c->dim_out : c->dim;
}

static void ff_describe(const struct bs_model_config *mc, struct bs_class_io *io)
{
    const struct bs_feed_forward_config *c = &mc->feed_forward;
    bs_class_io_add(io, HIDDEN_STATES, true, (int64_t[]){-1, -1, c->dim});
    bs_class_io_output(io, (int64_t[]){-1, -1, ff_dim_out(c)});
}

static size_t ff_state_size(const struct bs_model_config *c)
{
    (void)c;
    return sizeof(struct bs__ff);
}

static void ff_bind(struct bs__loader *ld, void *state, const struct bs_model_config *mc)
{
    const struct bs_feed_forward_config *c = &mc->feed_forward;
    bs__bind_ff(ld, state, "net.0.proj", "net.2", c->dim, bs_config_ff_inner(mc), ff_dim_out(c),
                c->activation_fn);
}

static int ff_forward(const struct bs_model_config *c, const void *state, struct bs__fwd *f,
                      const struct bs_tensor *const *in, struct bs_tensor *out,
                      const struct bs_forward_opts *opts)
{
    (void)c;
    (void)opts;
    return bs__ff_run(f, state, in[HIDDEN_STATES], out);
}

static double ff_flops(const struct bs_model_config *c, const void *state,
                       const struct bs_tensor *const *in)
{
    (void)c;
    return bs__ff_flops(state, in[HIDDEN_STATES]);
}

const struct bs_class bs_class_feed_forward = {
    .name = "FeedForward",
    .opts = ff_opts,
    .validate = ff_validate,
    .inputs = ff_inputs,
    .n_inputs = N_INPUTS,
    .describe = ff_describe,
    .state_size = ff_state_size,
    .bind = ff_bind,
    .forward = ff_forward,
    .flops = ff_flops,
};
