/* A loaded model: the configuration of a model directory and its weights in
 * backend memory, with a forward pass over named host tensors. A model is
 * immutable after loading, so several threads may run forwards on it at once,
 * each with its own scratch arena. */
#ifndef BS_MODEL_H
#define BS_MODEL_H

#include "arena.h"
#include "backend.h"
#include "config.h"
#include "tensor.h"

typedef struct bs_model bs_model_t;

/* The most inputs a model takes; also the most a request may carry. */
#define BS_MAX_INPUTS 8

/* What dim 0 of an input is, which is what batching requests relies on. */
enum bs_input_role {
    BS_ROLE_BATCHED, /* the batch (hidden_states, encoder_hidden_states, x, emb) */
    BS_ROLE_MASK,    /* an attention mask over keys: the batch, or 1 to broadcast over it;
                        rank 2 or 3 (the query dim may be left out) */
    BS_ROLE_COND,    /* per-sample conditioning (timestep, class_labels): one value shared
                        by the batch, or one value per sample */
};

/* A named tensor in host memory (a forward input). */
struct bs_named_tensor {
    const char *name;
    struct bs_tensor t;
};

/* What a model takes: an input's name, rank, dims (-1 where any size goes) and
 * the datatypes it accepts (bit i set: enum bs_dtype i accepted). */
struct bs_input_spec {
    const char *name;
    bool required;
    int n_dims;                /* the canonical rank */
    int min_dims;              /* lower ranks down to this one are accepted too */
    int64_t dims[BS_MAX_DIMS]; /* -1: variable */
    unsigned dtypes;           /* accepted dtypes as a bit set */
    enum bs_dtype dtype;       /* the preferred one, shown in metadata */
    enum bs_input_role role;
};

/* Called after each block of a stack with that block's output (host memory,
 * the output's shape and dtype); return non-zero to stop the forward. */
typedef int (*bs_block_cb)(void *arg, int block, int n_blocks, const struct bs_tensor *out);

struct bs_forward_opts {
    bs_block_cb on_block; /* optional */
    void *cb_arg;
    /* Optional: asked before each block of a stack and between the parts of
     * a block (attention, cross-attention, feed-forward); true stops the
     * forward, which then fails with BS_ECANCELED. */
    bool (*should_stop)(void *arg);
    void *stop_arg;
    int *blocks_run; /* optional out: blocks of the stack run to their end */
};

/* Load dir/config.json and its weights (dir/diffusion_pytorch_model.safetensors
 * unless the config names another file) onto backend be, which must outlive the
 * model. */
int bs_model_load(bs_model_t **model, const char *dir, struct bs_backend *be, struct bs_err *err);

/* How to load a model (bs_model_load_opts). */
struct bs_model_opts {
    bool has_dtype;      /* false: the backend's compute dtype (be->dtype) */
    enum bs_dtype dtype; /* BS_TYPE_F32 or BS_TYPE_BF16 on the CPU; a device backend
                            computes every model in its own dtype */
};

/* bs_model_load with options (o NULL: the defaults). */
int bs_model_load_opts(bs_model_t **model, const char *dir, struct bs_backend *be,
                       const struct bs_model_opts *o, struct bs_err *err);

/* Load from an already parsed config and an explicit weights path. */
int bs_model_load_config(bs_model_t **model, const struct bs_model_config *cfg,
                         const char *weights_path, struct bs_backend *be, struct bs_err *err);

/* Fills parameter key (shape ne) with generated F32 values. */
struct bs_weight_gen {
    void (*fn)(void *arg, const char *key, int n_dims, const int64_t *ne, float *dst);
    void *arg;
};

/* Load a model whose weights are generated rather than read (built-in
 * examples). */
int bs_model_load_generated(bs_model_t **model, const struct bs_model_config *cfg,
                            const struct bs_weight_gen *gen, struct bs_backend *be,
                            struct bs_err *err);

/* Call fn for every parameter a model of this config loads: its full
 * state_dict key and shape (the order of loading). BS_ENOMEM when the
 * modules' scratch cannot be allocated (fn was not called). */
int bs_model_params(const struct bs_model_config *cfg,
                    void (*fn)(void *arg, const char *key, int n_dims, const int64_t *ne),
                    void *arg);

/* Free the model and its weights; NULL is a no-op. */
void bs_model_free(bs_model_t *model);

/* The model's configuration. */
const struct bs_model_config *bs_model_config(const bs_model_t *model);

/* The model's inputs, in a fixed order. */
int bs_model_n_inputs(const bs_model_t *model);
const struct bs_input_spec *bs_model_input(const bs_model_t *model, int i);

/* The role of the model's input called name (BS_ROLE_BATCHED for a name the
 * model does not take). */
enum bs_input_role bs_model_input_role(const bs_model_t *model, const char *name);

/* The output's description: name "output", F32, dims with -1 where they
 * follow the inputs. */
struct bs_input_spec bs_model_output(const bs_model_t *model);

/* Bytes of weights held in backend memory (F32 and packed). */
size_t bs_model_weight_bytes(const bs_model_t *model);

/* The dtype the model's products compute in: BS_TYPE_F32, BF16 or F16. */
enum bs_dtype bs_model_dtype(const bs_model_t *model);

/* The dtype of the model's activations between ops (backend.h, act_f32):
 * its compute dtype where the backend takes it and --activations allows,
 * else BS_TYPE_F32. */
enum bs_dtype bs_model_act_dtype(const bs_model_t *model);

/* Matmul FLOPs of one forward on these inputs (for GFLOP/s reports). */
double bs_model_flops(const bs_model_t *model, const struct bs_named_tensor *in, int n_in);

/* ---- ragged batches ------------------------------------------------------
 * Requests whose inputs differ only in their sequence dims (tokens, context
 * tokens, H x W, with masks to match) run as one batch, their tokens packed
 * without padding: the projections, norms and activations run over every
 * token at once, attention over each sample's own tokens. */

/* Step-level block caching (FORA): a denoising sequence keeps, per block of
 * a BasicTransformerBlock model, the outputs of attn1, attn2 and ff (after
 * their output projections, before gates and residual adds). A refresh
 * runs the model exactly and stores them; a reuse skips those three
 * computations and takes the stored outputs, computing everything else
 * (norms, modulation, gates, residual adds) from its own inputs. */
typedef struct bs_block_cache bs_block_cache_t;

enum bs_cache_mode {
    BS_CACHE_OFF,     /* exact, nothing stored */
    BS_CACHE_REFRESH, /* exact, outputs stored */
    BS_CACHE_REUSE,   /* stored outputs used */
};

/* An empty cache for requests to model (sized by its first refresh). */
int bs_block_cache_new(bs_block_cache_t **cache, const bs_model_t *model, struct bs_err *err);

/* Release a cache (not while a forward uses it); NULL is a no-op. */
void bs_block_cache_free(bs_block_cache_t *cache);

/* Backend bytes the cache holds. */
size_t bs_block_cache_bytes(const bs_block_cache_t *cache);

/* Bytes a refresh of a request with `tokens` main-input tokens stores. */
size_t bs_block_cache_bytes_for(const bs_model_t *model, int64_t tokens);

/* Does the model's class support block caching? */
bool bs_model_cacheable(const bs_model_t *model);

/* One request of a ragged batch: inputs as for bs_model_forward, and what it
 * does with its block cache (cache NULL: mode must be BS_CACHE_OFF). */
struct bs_model_part {
    const struct bs_named_tensor *in;
    int n_in;
    bs_block_cache_t *cache;
    enum bs_cache_mode mode;
};

/* Tokens of a request's main input: its samples times the product of its
 * sequence dims (what a batch's token cap counts). */
int64_t bs_model_tokens(const bs_model_t *model, const struct bs_named_tensor *in, int n_in);

/* May two checked requests share a ragged batch? The same inputs, each of
 * one dtype and rank with equal fixed dims (sequence dims may differ);
 * masks of one form (a row per query, or one row per sample). */
bool bs_model_ragged_compatible(const bs_model_t *model, const struct bs_named_tensor *a, int n_a,
                                const struct bs_named_tensor *b, int n_b);

/* Run compatible requests as one ragged batch. out is a contiguous host
 * tensor (F32, BF16 or F16, as bs_model_forward) of the parts' output elements, the parts' outputs
 * (each of its checked shape) one after another; on_block hears such a tensor too. Each part's
 * output equals its bs_model_forward up to rounding (the same operations on the same rows). Parts
 * that reuse their caches come after all others; a reuse needs a cache refreshed for a request of
 * its shape. */
int bs_model_forward_parts(bs_model_t *model, struct bs_arena *arena,
                           const struct bs_model_part *parts, int n_parts, struct bs_tensor *out,
                           const struct bs_forward_opts *opts, struct bs_err *err);

/* Check inputs against the model (names, dtypes, shapes, value ranges) and give
 * the output shape as an F32 tensor with data NULL. Errors name the input. */
int bs_model_check(const bs_model_t *model, const struct bs_named_tensor *in, int n_in,
                   struct bs_tensor *out, struct bs_err *err);

/* Run the model: inputs as for bs_model_check; out is a host tensor of the
 * checked output shape, F32, or BF16 or F16: the F32 result rounded once to
 * nearest even (on the device where the backend takes that dtype, halving
 * the bytes copied back). Scratch comes from arena (reset on return). */
int bs_model_forward(bs_model_t *model, struct bs_arena *arena, const struct bs_named_tensor *in,
                     int n_in, struct bs_tensor *out, const struct bs_forward_opts *opts,
                     struct bs_err *err);

#endif
