/* The model repository: every model the server knows, loaded at start from
 * --model-repository folders (one model directory per subfolder, served
 * under the folder's name, version "1") or, with no folder, the built-in
 * models. A model that fails to load, or an entry that is not a readable
 * directory, is kept with its reason, which names files relative to the
 * repository folder ("foo/config.json: ...").
 *
 * Thread ownership: built and changed on the loop thread only. */
#ifndef BS_REPOSITORY_H
#define BS_REPOSITORY_H

#include <stdbool.h>

#include <uv.h>

#include "backend.h"
#include "batcher.h"
#include "model.h"

#define BS_MODEL_NAME_MAX 128

struct bs_repo_model {
    char name[BS_MODEL_NAME_MAX];
    char path[1024];                /* model directory, "" for a built-in */
    bool builtin;
    bs_model_t *model;              /* NULL when it failed to load */
    bs_batcher_t *batcher;          /* NULL when it failed to load */
    struct bs_serving_config serving;
    bs_metrics_model_t *metrics;    /* its counters (NULL: none) */
    char reason[512];               /* why it is not ready */
};

typedef struct bs_repository bs_repository_t;

/* Server-wide defaults a model's "serving" section may override. */
struct bs_repo_options {
    const char *const *dirs; /* --model-repository folders */
    int n_dirs;
    struct bs_serving_config defaults;
    bs_metrics_t *metrics; /* each loaded model registers here (NULL: none) */
};

/* Load every model (failures are recorded, not fatal). Fails only when a
 * repository folder cannot be read at all. */
int bs_repository_init(bs_repository_t **repo, uv_loop_t *loop, struct bs_backend *be,
                       const struct bs_repo_options *opts, struct bs_err *err);

/* Number of models, model i, or the model called name (NULL if unknown). */
int bs_repository_count(const bs_repository_t *repo);
struct bs_repo_model *bs_repository_get(bs_repository_t *repo, int i);
struct bs_repo_model *bs_repository_find(bs_repository_t *repo, const char *name);

/* Drain every batcher, then call done(arg). */
void bs_repository_drain(bs_repository_t *repo, void (*done)(void *arg), void *arg);

/* Free models and batchers (after drain); NULL is a no-op. */
void bs_repository_free(bs_repository_t *repo);

#endif
