/* Internal to the model module: each diffusers class the engine serves is one
 * `struct bs_class` (in engine/classes/<class>.c) listed in one table
 * (engine/class.c). An entry holds all the class knows: its config.json
 * arguments, its inputs and their roles, how it binds weights, checks inputs,
 * runs and counts FLOPs. engine/model.c and engine/config.c ask the table; the
 * helpers below are what class files share. docs/adding-a-class.md walks
 * through adding one. */
#ifndef BS_CLASS_H
#define BS_CLASS_H

#include "config.h"
#include "model.h"
#include "modules.h"

/* Return a non-zero result of expr. */
#define BS_TRY(expr)                                                                               \
    do {                                                                                           \
        int rc_ = (expr);                                                                          \
        if (rc_ != 0)                                                                              \
            return rc_;                                                                            \
    } while (0)

#define BS_DTYPES_FLOAT  ((1u << BS_TYPE_F32) | (1u << BS_TYPE_F16) | (1u << BS_TYPE_BF16))
#define BS_DTYPES_MASK   (BS_DTYPES_FLOAT | (1u << BS_TYPE_BOOL))
#define BS_DTYPES_NUMBER (BS_DTYPES_FLOAT | (1u << BS_TYPE_I64))

/* An input a class can take; its slot is its index in bs_class.inputs. */
struct bs_class_input {
    const char *name;        /* the forward argument's name */
    enum bs_input_role role; /* masks may drop the query dim, conditioning may be a scalar */
    int n_dims;              /* the canonical rank */
    unsigned dtypes;         /* accepted dtypes as a bit set */
    enum bs_dtype dtype;     /* the preferred one, shown in metadata */
    /* Ragged batching: bit i set when dim i (> 0) is a sequence dim (tokens,
     * H x W) that may differ between the requests of one batch; their
     * product is a sample's tokens. Masks and conditioning follow their
     * role and leave it 0. */
    unsigned ragged_dims;
};

#define BS_RAGGED(i) (1u << (i))

/* What a model of one config takes and gives, filled by bs_class.describe
 * with bs_class_io_add and bs_class_io_output. */
struct bs_class_io {
    const struct bs_class *cls;
    struct bs_input_spec in[BS_MAX_INPUTS]; /* in the order the class added them */
    int slot[BS_MAX_INPUTS];                /* in[k] is cls->inputs[slot[k]] */
    int n_in;
    struct bs_input_spec out; /* "output", F32 */
};

/* A class. check, forward and flops get the inputs of one forward by slot,
 * in[slot] (NULL: not given), already checked against the input specs. */
struct bs_class {
    const char *name;                 /* diffusers' _class_name */
    const struct bs_config_opt *opts; /* config.json arguments, ended by {NULL} */
    /* Checks across arguments after parsing; NULL: none. */
    int (*validate)(const struct bs_model_config *c, struct bs_err *err);
    bool stackable; /* "blockserve.num_blocks" > 1 allowed */
    /* Every input the class can take; inputs[0] is the main input (required,
     * role BS_ROLE_BATCHED, dim 0 the batch). */
    const struct bs_class_input *inputs;
    int n_inputs;
    /* The inputs a model of config c takes (their order is the metadata's)
     * and its output. */
    void (*describe)(const struct bs_model_config *c, struct bs_class_io *io);
    /* Bytes of bound modules (the model's state) for config c. */
    size_t (*state_size)(const struct bs_model_config *c);
    /* Bind every parameter into state (see struct bs__loader); ld->prefix
     * holds the weights prefix with "{i}" as block 0. */
    void (*bind)(struct bs__loader *ld, void *state, const struct bs_model_config *c);
    /* Checks across inputs (batch agreement, mask shapes, value ranges);
     * NULL: none. Errors name the input. */
    int (*check)(const struct bs_model_config *c, const struct bs_tensor *const *in,
                 struct bs_err *err);
    /* Run on checked inputs into out (host F32 of the checked shape). */
    int (*forward)(const struct bs_model_config *c, const void *state, struct bs__fwd *f,
                   const struct bs_tensor *const *in, struct bs_tensor *out,
                   const struct bs_forward_opts *opts);
    /* Matmul FLOPs of one forward on these inputs. */
    double (*flops)(const struct bs_model_config *c, const void *state,
                    const struct bs_tensor *const *in);
    /* Block caching (model.h): forward honours f->cache, its blocks
     * BasicTransformerBlocks (bs__block_forward). */
    bool cacheable;
};

/* The classes (engine/classes/), listed in the table in engine/class.c. */
extern const struct bs_class bs_class_btb;
extern const struct bs_class bs_class_attention_block;
extern const struct bs_class bs_class_feed_forward;
extern const struct bs_class bs_class_gelu;
extern const struct bs_class bs_class_geglu;
extern const struct bs_class bs_class_approximate_gelu;
extern const struct bs_class bs_class_ada_layer_norm;
extern const struct bs_class bs_class_ada_group_norm;

/* Number of classes in the table and class i (NULL out of range). */
int bs_class_count(void);
const struct bs_class *bs_class_get(int i);

/* The class with diffusers name name, or NULL. */
const struct bs_class *bs_class_find(const char *name);

/* Does some class take an input called name? */
bool bs_class_knows_input(const char *name);

/* describe: add input slot of io->cls, with its fixed dims (-1: any size). */
void bs_class_io_add(struct bs_class_io *io, int slot, bool required, const int64_t *dims);

/* describe: the output's dims (-1: as the main input's), of the main input's
 * rank. */
void bs_class_io_output(struct bs_class_io *io, const int64_t *dims);

/* ---- helpers for class files (engine/class.c) --------------------------- */

/* "{i}" in pattern replaced by i, into dst (BS_PREFIX_MAX bytes). */
void bs__expand_prefix(char *dst, const char *pattern, int i);

/* t's dim 0 must be batch; messages name the main input "hidden_states". */
int bs__check_batch(const struct bs_tensor *t, int64_t batch, const char *name, struct bs_err *err);

/* A mask (NULL: none) for lq queries over lk keys: [B|1, lk], [B|1, 1, lk] or
 * [B|1, lq, lk]. */
int bs__check_mask(const struct bs_tensor *t, int64_t batch, int64_t lq, int64_t lk,
                   const char *name, struct bs_err *err);

/* Conditioning (NULL: none): one value or one per sample; integral values in
 * [0, limit) when limit > 0, finite otherwise. */
int bs__check_cond(const struct bs_tensor *t, int64_t batch, int64_t limit, const char *name,
                   struct bs_err *err);

/* Scratch [rows, cols] in backend memory holding src converted to F32. */
int bs__upload(struct bs__fwd *f, struct bs_tensor *dst, const struct bs_tensor *src, int64_t rows,
               int64_t cols);

/* The main input as rows of its last dim (sets f->batch, and f->lq: dim 1 of
 * a 3-D input, else 1; a ragged batch: its samples, longest and q_off). */
int bs__upload_rows(struct bs__fwd *f, struct bs_tensor *dst, const struct bs_tensor *src);

/* Encoder states (input slot) as rows in f->enc; sets f->lk (and k_off of a
 * ragged batch). */
int bs__upload_keys(struct bs__fwd *f, const struct bs_tensor *src, int slot);

/* A checked mask (input slot) as additive F32 [batch, mq, lk] in backend
 * memory (BOOL keep-masks become 0 / -10000; batch 1 broadcasts); in a
 * ragged batch flat, with its samples' offsets and form. */
int bs__upload_mask(struct bs__fwd *f, struct bs__mask *mask, const struct bs_tensor *m,
                    int slot);

/* Host conditioning rows from timestep ts and labels lab (either NULL): n = 1
 * when every given value is shared, else the batch; one allocation returned
 * in *storage (free it). With tproj, the sinusoidal projection of the
 * timesteps is uploaded too. */
int bs__make_cond(struct bs__fwd *f, const struct bs_tensor *ts, const struct bs_tensor *lab,
                  bool tproj, struct bs__cond *c, void **storage);

/* Copy x (backend memory) to the host output out. */
int bs__download(struct bs__fwd *f, struct bs_tensor *out, const struct bs_tensor *x);

/* A bound FeedForward, or a bare GELU/GEGLU/ApproximateGELU, on the rows of
 * host input x into out; and its matmul FLOPs. */
int bs__ff_run(struct bs__fwd *f, const struct bs__ff *ff, const struct bs_tensor *x,
               struct bs_tensor *out);
double bs__ff_flops(const struct bs__ff *ff, const struct bs_tensor *x);

#endif
