/* Built-in example models at real model shapes with deterministically
 * generated (not trained) weights, so the engine and the server can run with
 * no files at all. */
#ifndef BS_BUILTIN_H
#define BS_BUILTIN_H

#include "backend.h"
#include "common.h"
#include "model.h"

struct bs_builtin {
    const char *name;
    const char *summary;
    const char *config;   /* config.json text */
    int64_t batch;        /* example inputs: */
    int64_t tokens;       /* hidden_states tokens (BasicTransformerBlock) */
    int64_t enc_tokens;   /* encoder_hidden_states tokens, 0 for none */
    int64_t height, width; /* AttentionBlock spatial size */
};

/* Number of built-in models and model i. */
int bs_builtin_count(void);
const struct bs_builtin *bs_builtin_get(int i);

/* The built-in model called name, or NULL. */
const struct bs_builtin *bs_builtin_find(const char *name);

/* Write model directory dir (created if needed): config.json, generated
 * diffusion_pytorch_model.safetensors (F32; the same bytes on every run) and
 * inputs.safetensors holding example inputs. */
int bs_builtin_write(const struct bs_builtin *b, const char *dir, struct bs_err *err);

/* Load built-in model b onto be with its generated weights, in memory (the
 * same values bs_builtin_write puts in the file). */
int bs_builtin_load(const struct bs_builtin *b, struct bs_backend *be, bs_model_t **model,
                    struct bs_err *err);

#endif
