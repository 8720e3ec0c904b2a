/* A model directory's config.json: diffusers' "_class_name" and constructor
 * arguments by their diffusers names, plus blockserve's own optional
 * "blockserve" section (weights file, key prefix, block count).
 *
 * What each class accepts (its option rows, defaults and checks) lives with
 * the class (engine/class.h, engine/classes/); this module parses a file
 * against those rows. */
#ifndef BS_CONFIG_H
#define BS_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "common.h"

struct bs_class; /* one diffusers class: engine/class.h */

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
#define BS_CONFIG_DIM_MAX ((int64_t)1 << 20) /* far above any real width; keeps products in range */

/* Constructor arguments of each class. Optional integers use 0 for "None". */
struct bs_btb_config { /* BasicTransformerBlock */
    int64_t dim, num_attention_heads, attention_head_dim;
    int64_t cross_attention_dim; /* 0: None */
    enum bs_ff_act activation_fn;
    int64_t num_embeds_ada_norm; /* 0: None */
    bool attention_bias, only_cross_attention, upcast_attention, norm_elementwise_affine;
    enum bs_norm_type norm_type;
    double dropout;
    bool final_dropout;
};

struct bs_attention_block_config {
    int64_t channels, num_head_channels; /* num_head_channels 0: one head */
    int64_t norm_num_groups;
    double rescale_output_factor, eps;
};

struct bs_feed_forward_config {
    int64_t dim, dim_out; /* dim_out 0: None (same as dim) */
    double mult, dropout;
    enum bs_ff_act activation_fn;
    bool final_dropout;
};

struct bs_activation_config { /* GELU, GEGLU, ApproximateGELU */
    int64_t dim_in, dim_out;
    bool approximate_tanh; /* GELU's approximate="tanh" */
};

struct bs_ada_layer_norm_config {
    int64_t embedding_dim, num_embeddings;
};

struct bs_ada_group_norm_config {
    int64_t embedding_dim, out_dim, num_groups;
    enum bs_act act_fn; /* BS_ACT_NONE for None */
    double eps;
};

/* A parsed config.json: the class, its arguments (the union member named
 * after the class; the others are not set) and the "blockserve" section. */
struct bs_model_config {
    const struct bs_class *cls;
    union {
        struct bs_btb_config btb;
        struct bs_attention_block_config attention_block;
        struct bs_feed_forward_config feed_forward;
        struct bs_activation_config activation;
        struct bs_ada_layer_norm_config ada_layer_norm;
        struct bs_ada_group_norm_config ada_group_norm;
    };

    /* "blockserve" section */
    int num_blocks;                     /* >= 1; only stackable classes may stack */
    char weights_prefix[BS_PREFIX_MAX]; /* may hold "{i}" for the block index */
    char weights_file[BS_PREFIX_MAX];   /* relative to the model directory */
};

/* How a constructor argument's JSON value is read. */
enum bs_config_kind {
    BS_CONFIG_INT,         /* int64_t: an integer in [1, BS_CONFIG_DIM_MAX] */
    BS_CONFIG_INT_OR_NULL, /* int64_t: the same, or null (stored as 0) */
    BS_CONFIG_NUM,         /* double: a finite number */
    BS_CONFIG_BOOL,        /* bool */
    BS_CONFIG_FF_ACT,      /* enum bs_ff_act: "gelu" | "gelu-approximate" | "geglu" |
                              "geglu-approximate" */
    BS_CONFIG_NORM_TYPE,   /* enum bs_norm_type: "layer_norm" | "ada_norm" | "ada_norm_zero" */
    BS_CONFIG_APPROX,      /* bool: "none" | "tanh" */
    BS_CONFIG_ACT_FN,      /* enum bs_act: null | "swish" | "silu" | "mish" | "gelu" */
};

/* One constructor argument: its key, how it is read, where it is stored
 * (offsetof(struct bs_model_config, <class member>.<field>)), whether it must
 * be given, and its default otherwise (numbers, bools and enum values alike). */
struct bs_config_opt {
    const char *key;
    enum bs_config_kind kind;
    size_t off;
    bool required;
    double def;
};

/* Parse and validate config text (name is used in messages). */
int bs_config_parse(struct bs_model_config *cfg, const char *text, size_t len, const char *name,
                    struct bs_err *err);

/* Read and parse a config.json file. */
int bs_config_load(struct bs_model_config *cfg, const char *path, struct bs_err *err);

/* diffusers' class name for cls ("?" for NULL). */
const char *bs_config_class_name(const struct bs_class *cls);

/* FeedForward's inner width: int(dim * mult) (cfg of class FeedForward). */
int64_t bs_config_ff_inner(const struct bs_model_config *cfg);

#endif
