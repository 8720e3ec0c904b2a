/* Internal to the model module: the diffusers modules as parameter structs
 * bound to weights, and their forward passes over backend ops. */
#ifndef BS_MODULES_H
#define BS_MODULES_H

#include "arena.h"
#include "backend.h"
#include "config.h"
#include "model.h"
#include "safetensors.h"

/* Places parameters in one backend buffer. bs__bind_* functions run twice: a
 * sizing pass (base NULL) that only counts, then a pass that converts each
 * weight to F32 into host staging and points tensors at the backend buffer. */
struct bs__loader {
    const bs_st_file_t *st;
    const char *file;           /* for messages */
    char prefix[BS_PREFIX_MAX]; /* key prefix of the module being bound */
    char *base;                 /* backend buffer, or NULL while sizing */
    float *host;                /* staging for base */
    size_t off;                 /* bytes placed so far */
    char **names;               /* full key of every parameter bound (fill pass) */
    int n_names, cap_names;
    struct bs_err *err;
    int rc; /* first error; later binds are skipped */
    /* Describe mode: when set, each parameter is reported (full key, shape)
     * instead of loaded. */
    void (*describe)(void *arg, const char *key, int n_dims, const int64_t *ne);
    void *describe_arg;
    /* Generate mode (st NULL): parameters are filled by this function. */
    void (*generate)(void *arg, const char *key, int n_dims, const int64_t *ne, float *dst);
    void *generate_arg;
    /* Packing (pack != BS_TYPE_F32 and be set): linear weights take no room
     * in the F32 buffer; each is converted into temporary staging and handed
     * to be's pack_weight, and its packed memory is listed in packed (the
     * model frees it with buf_free). */
    struct bs_backend *be;
    enum bs_dtype pack;
    void **packed;
    int n_packed, cap_packed;
    size_t packed_bytes; /* their size as plain [N, K] tensors of the packed dtype */
};

struct bs__linear {
    struct bs_tensor w; /* [out, in] */
    struct bs_tensor b; /* [out], data NULL when the layer has no bias */
};

struct bs__attn {
    struct bs__linear q, kv; /* kv: to_k and to_v stacked, [2 * inner, kv_dim] */
    struct bs__linear qkv;   /* q, k, v stacked, valid when kv_dim == query_dim */
    struct bs__linear out;   /* to_out.0 */
    int heads, head_dim;
    int64_t query_dim, kv_dim, inner;
    float scale;
};

/* nn.LayerNorm, or AdaLayerNorm when emb.data is set. */
struct bs__norm {
    struct bs_tensor gamma, beta; /* data NULL without elementwise affine */
    float eps;
    struct bs_tensor emb;  /* AdaLayerNorm: nn.Embedding [num_embeddings, dim] */
    struct bs__linear lin; /* AdaLayerNorm: [2 dim, dim] */
};

/* AdaLayerNormZero's conditioning: CombinedTimestepLabelEmbeddings + linear. */
struct bs__ada_zero {
    struct bs__linear t1, t2; /* timestep_embedder.linear_1/2 */
    struct bs_tensor table;   /* class_embedder.embedding_table [classes + 1, dim] */
    struct bs__linear lin;    /* [6 dim, dim] */
};

struct bs__ff {
    struct bs__linear proj, out;
    enum bs_ff_act act;
    int64_t inner;
    bool has_out; /* false for a bare GELU/GEGLU/ApproximateGELU module */
};

struct bs__block {
    const struct bs_btb_config *cfg;
    struct bs__norm norm1, norm2, norm3;
    struct bs__ada_zero az;
    struct bs__attn attn1, attn2;
    bool has_attn2;
    struct bs__ff ff;
};

struct bs__attention_block {
    const struct bs_attention_block_config *cfg;
    struct bs_tensor gn_gamma, gn_beta;
    struct bs__linear qkv, proj;
};

struct bs__ada_group_norm {
    const struct bs_ada_group_norm_config *cfg;
    struct bs__linear lin;
};

/* Conditioning shared by the blocks of one forward, on the host, already
 * checked: n rows (1 or B) of timesteps and labels. */
struct bs__cond {
    int64_t n;              /* rows: 1 (shared) or the batch */
    const float *t;         /* [n] timesteps as floats */
    const int64_t *t_idx;   /* [n] timesteps as indices (AdaLayerNorm) */
    const int64_t *labels;  /* [n] class labels (AdaLayerNormZero) */
    struct bs_tensor tproj; /* [n, 256] sinusoidal projection in backend memory */
};

/* A ragged batch as the engine packed it (bs_model_forward_parts): n
 * samples of different sequence lengths, each input's samples concatenated
 * without padding. Per input slot: off[slot] the row offsets of each
 * sample's tokens ([n + 1], inputs with ragged dims) and max[slot] the
 * longest; masks: m_off[slot] each sample's first element ([n]) and
 * m_per_query[slot] whether a sample's mask has a row per query. Packed
 * inputs are rows of their last dim, 2-D [elements / last dim, last dim]
 * (masks 1-D, conditioning [n] values); a sample's tokens are the product
 * of its ragged dims (L, or H x W of a [C, H, W] sample). */
struct bs__ragged {
    int64_t n;
    const int64_t *off[BS_MAX_INPUTS];
    int64_t max[BS_MAX_INPUTS];
    const int64_t *m_off[BS_MAX_INPUTS];
    bool m_per_query[BS_MAX_INPUTS];
};

/* An attention mask in backend memory: additive F32 [batch, mq, lk], or for
 * a ragged batch flat with each sample's offset (see bs_attn_params). */
struct bs__mask {
    struct bs_tensor t; /* data NULL: no mask */
    const int64_t *off; /* ragged: [batch] element offsets, else NULL */
    bool per_query;     /* ragged: one row per query */
};

/* A block cache (model.h): per block, n_slots regions of rows x dim F32
 * in backend memory. */
struct bs_block_cache {
    struct bs_backend *be;
    float *buf;
    size_t bytes;
    int64_t rows, dim;
    int n_blocks, n_slots; /* slots: attn1, ff, then attn2 when the blocks have it */
    bool valid;            /* holds a refresh's outputs */
};

enum { BS__SLOT_ATTN1, BS__SLOT_FF, BS__SLOT_ATTN2 };

/* Block caching in one forward: the first n_fresh samples (rows_fresh rows)
 * are computed, the rest reuse their caches; each part's rows and mode. */
struct bs__cache_part {
    struct bs_block_cache *cache; /* NULL: not cached */
    enum bs_cache_mode mode;
    int64_t row0, rows;
};

struct bs__caching {
    int64_t n_fresh, rows_fresh;
    const struct bs__cache_part *parts;
    int n_parts;
};

/* One forward's state: backend, scratch and shapes. */
struct bs__fwd {
    struct bs_backend *be;
    enum bs_dtype dtype; /* the model's compute dtype (attention products) */
    enum bs_dtype act;   /* activation dtype of bs__scratch_act: F32 or dtype */
    struct bs_arena *arena;
    struct bs_err *err;
    int64_t batch, lq, lk; /* lk: encoder tokens (0 without encoder states); ragged:
                              the longest */
    struct bs_tensor enc;  /* [batch * lk, enc_dim] or data NULL */
    struct bs__mask mask1; /* attn1 mask */
    struct bs__mask mask2; /* attn2 mask */
    const struct bs__cond *cond;
    /* Ragged batch (rg set): q_off and k_off are the row offsets [batch + 1]
     * of each sample's tokens and encoder tokens; NULL when uniform. */
    const struct bs__ragged *rg;
    const int64_t *q_off, *k_off;
    /* Asked between the parts of a block (NULL: never stop). */
    bool (*should_stop)(void *arg);
    void *stop_arg;
    const struct bs__caching *cache; /* block caching, or NULL */
    int block;                       /* the block running (its cache regions) */
};

/* Bind a linear layer "<name>.weight" [out, in] (+ "<name>.bias" [out]). */
void bs__bind_linear(struct bs__loader *ld, struct bs__linear *l, const char *name, int64_t out,
                     int64_t in, bool bias);
void bs__bind_block(struct bs__loader *ld, struct bs__block *b, const struct bs_btb_config *c);
void bs__bind_attention_block(struct bs__loader *ld, struct bs__attention_block *a,
                              const struct bs_attention_block_config *c);
/* Bind a FeedForward: proj is its first linear ("ff.net.0.proj"), out its
 * last ("ff.net.2"), or NULL for a bare GELU/GEGLU/ApproximateGELU. */
void bs__bind_ff(struct bs__loader *ld, struct bs__ff *ff, const char *proj, const char *out,
                 int64_t dim, int64_t inner, int64_t dim_out, enum bs_ff_act act);
void bs__bind_ada_norm(struct bs__loader *ld, struct bs__norm *n, const char *name, int64_t dim,
                       int64_t num_embeddings);
void bs__bind_ada_group_norm(struct bs__loader *ld, struct bs__ada_group_norm *a,
                             const struct bs_ada_group_norm_config *c);

/* Run one BasicTransformerBlock on x [batch * lq, dim] in place; through a
 * launch graph (engine/graph.h) where f->be->graphs is not off, the batch
 * uniform (rg NULL) and without block caching (cache NULL). */
int bs__block_forward(struct bs__fwd *f, const struct bs__block *b, struct bs_tensor *x);

/* AttentionBlock on x [B, C, S] (contiguous); result in *y (arena). Through
 * a launch graph like bs__block_forward where graphs are on (not for a
 * ragged batch, x then flat). */
int bs__attention_block_forward(struct bs__fwd *f, const struct bs__attention_block *a,
                                const struct bs_tensor *x, struct bs_tensor *y);

/* FeedForward on rows x: y = ff(x) + beta * y with y allocated by the caller;
 * a bare GELU/GEGLU/ApproximateGELU (!ff->has_out) sets *y to its result. */
int bs__ff_forward(struct bs__fwd *f, const struct bs__ff *ff, const struct bs_tensor *x,
                   struct bs_tensor *y, float beta);

/* AdaLayerNorm on rows x [batch * lq, dim]; result in *y (arena). */
int bs__ada_norm_forward(struct bs__fwd *f, const struct bs__norm *n, const struct bs_tensor *x,
                         struct bs_tensor *y);

/* AdaGroupNorm on x [B, C, S] with emb [B, E] (backend memory); result in *y. */
int bs__ada_group_norm_forward(struct bs__fwd *f, const struct bs__ada_group_norm *a,
                               const struct bs_tensor *x, const struct bs_tensor *emb,
                               struct bs_tensor *y);

/* A 2-D F32 scratch tensor [rows, cols] from the forward's arena. */
int bs__scratch(struct bs__fwd *f, struct bs_tensor *t, int64_t rows, int64_t cols);

/* The same of dtype type. */
int bs__scratch_type(struct bs__fwd *f, struct bs_tensor *t, enum bs_dtype type, int64_t rows,
                     int64_t cols);

/* The same in the forward's activation dtype (f->act): for the tensors that
 * feed a GEMM or attention and nothing else (norm outputs, q, k, v,
 * attention outputs, feed-forward hidden layers). The residual stream, the
 * blocks' inputs and outputs and the modulation rows stay F32. */
int bs__scratch_act(struct bs__fwd *f, struct bs_tensor *t, int64_t rows, int64_t cols);

#endif
