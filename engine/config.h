/* A model directory's config.json: diffusers' "_class_name" and constructor
 * arguments by their diffusers names, plus blockserve's own optional
 * "blockserve" section (weights file, key prefix, block count). */
#ifndef BS_CONFIG_H
#define BS_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "common.h"

enum bs_model_class {
    BS_CLASS_BASIC_TRANSFORMER_BLOCK,
    BS_CLASS_ATTENTION_BLOCK,
    BS_CLASS_FEED_FORWARD,
    BS_CLASS_GELU,
    BS_CLASS_GEGLU,
    BS_CLASS_APPROXIMATE_GELU,
    BS_CLASS_ADA_LAYER_NORM,
    BS_CLASS_ADA_GROUP_NORM,
    BS_CLASS_COUNT,
};

enum bs_norm_type {
    BS_NORM_LAYER_NORM,
    BS_NORM_ADA_NORM,
    BS_NORM_ADA_NORM_ZERO,
};

/* FeedForward's activation_fn. */
enum bs_ff_act {
    BS_FF_GELU,              /* "gelu": GELU(dim, inner) */
    BS_FF_GELU_APPROXIMATE,  /* "gelu-approximate": GELU(dim, inner, "tanh") */
    BS_FF_GEGLU,             /* "geglu": GEGLU(dim, inner) */
    BS_FF_GEGLU_APPROXIMATE, /* "geglu-approximate": ApproximateGELU(dim, inner) */
};

#define BS_PREFIX_MAX 256

/* Every field of every class; the ones a class does not use stay at their
 * defaults. Optional integers use 0 for "None". */
struct bs_model_config {
    enum bs_model_class cls;

    /* BasicTransformerBlock */
    int64_t dim, num_attention_heads, attention_head_dim;
    int64_t cross_attention_dim; /* 0: None */
    enum bs_ff_act activation_fn;
    int64_t num_embeds_ada_norm; /* 0: None */
    bool attention_bias, only_cross_attention, upcast_attention, norm_elementwise_affine;
    enum bs_norm_type norm_type;
    double dropout;
    bool final_dropout;

    /* FeedForward (dim, activation_fn, dropout, final_dropout shared above) */
    int64_t dim_out; /* 0: None (same as dim) */
    double mult;

    /* GELU, GEGLU, ApproximateGELU */
    int64_t dim_in; /* dim_out shared above */
    bool approximate_tanh;

    /* AttentionBlock */
    int64_t channels, num_head_channels; /* num_head_channels 0: one head */
    int64_t norm_num_groups;
    double rescale_output_factor;
    double eps; /* AttentionBlock, AdaGroupNorm */

    /* AdaLayerNorm (embedding_dim, num_embeddings), AdaGroupNorm (embedding_dim,
     * out_dim, num_groups, act_fn, eps) */
    int64_t embedding_dim, num_embeddings, out_dim, num_groups;
    enum bs_act act_fn; /* BS_ACT_NONE for None */

    /* "blockserve" section */
    int num_blocks;                     /* >= 1; only BasicTransformerBlock may stack */
    char weights_prefix[BS_PREFIX_MAX]; /* may hold "{i}" for the block index */
    char weights_file[BS_PREFIX_MAX];   /* relative to the model directory */
};

/* Parse and validate config text (name is used in messages). */
int bs_config_parse(struct bs_model_config *cfg, const char *text, size_t len, const char *name,
                    struct bs_err *err);

/* Read and parse a config.json file. */
int bs_config_load(struct bs_model_config *cfg, const char *path, struct bs_err *err);

/* diffusers' class name for cls. */
const char *bs_config_class_name(enum bs_model_class cls);

/* The FeedForward inner width: int(dim * mult). */
int64_t bs_config_ff_inner(const struct bs_model_config *cfg);

#endif
