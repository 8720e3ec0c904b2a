/* diffusers' AdaLayerNorm: LayerNorm of hidden_states modulated by a scale and
 * shift from an embedding of the timestep (one per sample, or one shared). */
#include <stdlib.h>

#include "class.h"

#define F(field) offsetof(struct bs_model_config, ada_layer_norm.field)

static const struct bs_config_opt aln_opts[] = {
    {"embedding_dim", BS_CONFIG_INT, F(embedding_dim), true, 0},
    {"num_embeddings", BS_CONFIG_INT, F(num_embeddings), true, 0},
    {NULL, 0, 0, false, 0},
};

enum { HIDDEN_STATES, TIMESTEP, N_INPUTS };

static const struct bs_class_input aln_inputs[N_INPUTS] = {
    [HIDDEN_STATES] = {"hidden_states", BS_ROLE_BATCHED, 3, BS_DTYPES_FLOAT, BS_TYPE_F32, BS_RAGGED(1)},
    [TIMESTEP] = {"timestep", BS_ROLE_COND, 1, BS_DTYPES_NUMBER, BS_TYPE_I64, 0},
};

static void aln_describe(const struct bs_model_config *mc, struct bs_class_io *io)
{
    int64_t d = mc->ada_layer_norm.embedding_dim;
    bs_class_io_add(io, HIDDEN_STATES, true, (int64_t[]){-1, -1, d});
    bs_class_io_add(io, TIMESTEP, true, (int64_t[]){-1});
    bs_class_io_output(io, (int64_t[]){-1, -1, d});
}

static size_t aln_state_size(const struct bs_model_config *c)
{
    (void)c;
    return sizeof(struct bs__norm);
}

static void aln_bind(struct bs__loader *ld, void *state, const struct bs_model_config *mc)
{
    const struct bs_ada_layer_norm_config *c = &mc->ada_layer_norm;
    bs__bind_ada_norm(ld, state, "", c->embedding_dim, c->num_embeddings);
}

/* Timesteps index the embedding table: integers in [0, num_embeddings). */
static int aln_check(const struct bs_model_config *mc, const struct bs_tensor *const *in,
                     struct bs_err *err)
{
    return bs__check_cond(in[TIMESTEP], in[HIDDEN_STATES]->ne[0], mc->ada_layer_norm.num_embeddings,
                          "timestep", err);
}

static int aln_forward(const struct bs_model_config *c, const void *state, struct bs__fwd *f,
                       const struct bs_tensor *const *in, struct bs_tensor *out,
                       const struct bs_forward_opts *opts)
{
    struct bs_tensor x, y;
    struct bs__cond cond;
    void *storage = NULL;
    (void)c;
    (void)opts;
    BS_TRY(bs__upload_rows(f, &x, in[HIDDEN_STATES]));
    BS_TRY(bs__make_cond(f, in[TIMESTEP], NULL, false, &cond, &storage));
    f->cond = &cond;
    int rc = bs__scratch(f, &y, bs_tensor_nrows(&x), x.ne[1]);
    if (rc == 0)
        rc = bs__ada_norm_forward(f, state, &x, &y);
    free(storage);
    BS_TRY(rc);
    return bs__download(f, out, &y);
}

/* As the engine counted it before the class table: 2 per row of
 * hidden_states; the modulation's linear (emb -> 2 dim) is not counted. */
static double aln_flops(const struct bs_model_config *c, const void *state,
                        const struct bs_tensor *const *in)
{
    const struct bs_tensor *hs = in[HIDDEN_STATES];
    (void)c;
    (void)state;
    return 2 * ((double)bs_tensor_nelements(hs) / (double)hs->ne[hs->n_dims - 1]);
}

const struct bs_class bs_class_ada_layer_norm = {
    .name = "AdaLayerNorm",
    .opts = aln_opts,
    .inputs = aln_inputs,
    .n_inputs = N_INPUTS,
    .describe = aln_describe,
    .state_size = aln_state_size,
    .bind = aln_bind,
    .check = aln_check,
    .forward = aln_forward,
    .flops = aln_flops,
};
