/* diffusers' activation modules on their own: GELU(dim_in, dim_out,
 * approximate), GEGLU(dim_in, dim_out) and ApproximateGELU(dim_in, dim_out),
 * each a projection "proj" with its activation. Three classes that differ only
 * in the activation, so they share this file. */
#include "class.h"

#define F(field) offsetof(struct bs_model_config, activation.field)

static const struct bs_config_opt gelu_opts[] = {
    {"dim_in", BS_CONFIG_INT, F(dim_in), true, 0},
    {"dim_out", BS_CONFIG_INT, F(dim_out), true, 0},
    {"approximate", BS_CONFIG_APPROX, F(approximate_tanh), false, false},
    {NULL, 0, 0, false, 0},
};

static const struct bs_config_opt proj_opts[] = {
    {"dim_in", BS_CONFIG_INT, F(dim_in), true, 0},
    {"dim_out", BS_CONFIG_INT, F(dim_out), true, 0},
    {NULL, 0, 0, false, 0},
};

enum { HIDDEN_STATES, N_INPUTS };

static const struct bs_class_input act_inputs[N_INPUTS] = {
    [HIDDEN_STATES] = {"hidden_states", BS_ROLE_BATCHED, 3, BS_DTYPES_FLOAT, BS_TYPE_F32, BS_RAGGED(1)},
};

static void act_describe(const struct bs_model_config *mc, struct bs_class_io *io)
{
    const struct bs_activation_config *c = &mc->activation;
    bs_class_io_add(io, HIDDEN_STATES, true, (int64_t[]){-1, -1, c->dim_in});
    bs_class_io_output(io, (int64_t[]){-1, -1, c->dim_out});
}

static size_t act_state_size(const struct bs_model_config *c)
{
    (void)c;
    return sizeof(struct bs__ff);
}

static void bind_proj(struct bs__loader *ld, void *state, const struct bs_model_config *mc,
                      enum bs_ff_act act)
{
    const struct bs_activation_config *c = &mc->activation;
    bs__bind_ff(ld, state, "proj", NULL, c->dim_in, c->dim_out, 0, act);
}

static void gelu_bind(struct bs__loader *ld, void *state, const struct bs_model_config *c)
{
    bind_proj(ld, state, c, c->activation.approximate_tanh ? BS_FF_GELU_APPROXIMATE : BS_FF_GELU);
}

static void geglu_bind(struct bs__loader *ld, void *state, const struct bs_model_config *c)
{
    bind_proj(ld, state, c, BS_FF_GEGLU);
}

static void approximate_gelu_bind(struct bs__loader *ld, void *state,
                                  const struct bs_model_config *c)
{
    bind_proj(ld, state, c, BS_FF_GEGLU_APPROXIMATE);
}

static int act_forward(const struct bs_model_config *c, const void *state, struct bs__fwd *f,
                       const struct bs_tensor *const *in, struct bs_tensor *out,
                       const struct bs_forward_opts *opts)
{
    (void)c;
    (void)opts;
    return bs__ff_run(f, state, in[HIDDEN_STATES], out);
}

static double act_flops(const struct bs_model_config *c, const void *state,
                        const struct bs_tensor *const *in)
{
    (void)c;
    return bs__ff_flops(state, in[HIDDEN_STATES]);
}

#define ACTIVATION_CLASS(name_, opts_, bind_)                                                      \
    {                                                                                              \
        .name = name_, .opts = opts_, .inputs = act_inputs, .n_inputs = N_INPUTS,                  \
        .describe = act_describe, .state_size = act_state_size, .bind = bind_,                     \
        .forward = act_forward, .flops = act_flops,                                                \
    }

const struct bs_class bs_class_gelu = ACTIVATION_CLASS("GELU", gelu_opts, gelu_bind);
const struct bs_class bs_class_geglu = ACTIVATION_CLASS("GEGLU", proj_opts, geglu_bind);
const struct bs_class bs_class_approximate_gelu =
    ACTIVATION_CLASS("ApproximateGELU", proj_opts, approximate_gelu_bind);
