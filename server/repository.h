/* The model repository: every model the server knows, from the
 * --model-repository folders (one model folder per subfolder, served under
 * the folder's name) or, with no folder, the built-in models; and model
 * control (Triton's --model-control-mode): loading, reloading and unloading
 * models while the server runs.
 *
 * Versions: a model folder holding config.json is version 1; otherwise
 * its numbered subfolders (1/, 2/, ...) are its versions, each a model
 * directory, and serving.json at the model folder's top holds the serving
 * settings of every version and Triton's version_policy ({"latest":
 * {"num_versions": N}} (default N = 1), {"all": {}}, {"specific":
 * {"versions": [...]}}), which picks the versions served.
 *
 * An entry (struct bs_repo_model) is one version of one model. A model
 * that fails to load, or an entry that is not a readable directory, is
 * kept with its reason, which names files relative to the repository folder
 * ("foo/config.json: ..."). An unloaded model stays listed, model NULL,
 * with the reason "unloaded".
 *
 * Loads and unloads run one at a time, in the order they were asked for
 * (a second load of a model that is loading waits for the first, then
 * loads again). A load reads files and builds weights on a libuv worker;
 * the loop thread then swaps the new entries in: until then requests go to
 * the old ones, after it to the new. Replaced and unloaded entries leave
 * routing at once, finish the requests they hold (each request holds a
 * reference: bs_repository_ref), drain their batcher and are freed (the
 * model on a worker).
 *
 * Thread ownership: built and changed on the loop thread only; a load's
 * worker owns its own new entries until they are swapped in. */
#ifndef BS_REPOSITORY_H
#define BS_REPOSITORY_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "backend.h"
#include "batcher.h"
#include "model.h"

#define BS_MODEL_NAME_MAX 128

/* Triton's RepositoryIndex states. */
enum bs_repo_state {
    BS_REPO_READY,
    BS_REPO_UNAVAILABLE, /* failed to load, or unloaded */
    BS_REPO_LOADING,
    BS_REPO_UNLOADING,
};

struct bs_repo_model {
    char name[BS_MODEL_NAME_MAX];
    char path[1024]; /* the version's model directory, "" for a built-in */
    int64_t version; /* 1, 2, ... */
    char version_str[24];
    bool builtin;
    bs_model_t *model;     /* NULL when it failed to load or was unloaded */
    bs_batcher_t *batcher; /* NULL when model is */
    struct bs_serving_config serving;
    bs_metrics_model_t *metrics; /* its counters (NULL: none) */
    char reason[512];            /* why it is not ready */
    enum bs_repo_state state;
    bool unloaded; /* a model not loaded now (unloaded, or not yet loaded): no version */
    /* the repository's own */
    struct bs_repository *repo;
    int refs;     /* requests that hold it (loop thread) */
    bool retired; /* out of routing: draining, then freed */
    bool drained; /* its batcher has drained */
    void *unload; /* the unload waiting for it to be freed */
    struct bs_repo_model *next_retired;
};

typedef struct bs_repository bs_repository_t;

/* Triton's --model-control-mode. */
enum bs_repo_control {
    BS_REPO_CONTROL_NONE,     /* load everything at start; no load/unload */
    BS_REPO_CONTROL_POLL,     /* ... and follow the folders' changes */
    BS_REPO_CONTROL_EXPLICIT, /* load what --load-model names; load/unload on request */
};

/* Server-wide defaults a model's "serving" section may override. */
struct bs_repo_options {
    const char *const *dirs; /* --model-repository folders */
    int n_dirs;
    struct bs_serving_config defaults;
    bs_metrics_t *metrics; /* each loaded model registers here (NULL: none) */
    enum bs_repo_control control;
    const char *const *load_models; /* explicit: the models loaded at start ("*": all) */
    int n_load_models;
    int poll_secs; /* poll: rescan every poll_secs seconds (0: 15) */
};

/* Load every model the control mode loads at start (failures are recorded,
 * not fatal). Fails when a repository folder cannot be read at all, or a
 * model --load-model names does not exist. */
int bs_repository_init(bs_repository_t **repo, uv_loop_t *loop, struct bs_backend *be,
                       const struct bs_repo_options *opts, struct bs_err *err);

/* Number of entries, entry i, or the entry of name that requests without a
 * version go to (its highest ready version; without one, its highest
 * entry; NULL if unknown). Retired entries are not listed. */
int bs_repository_count(const bs_repository_t *repo);
struct bs_repo_model *bs_repository_get(bs_repository_t *repo, int i);
struct bs_repo_model *bs_repository_find(bs_repository_t *repo, const char *name);

/* The entry of name and version (a decimal number; "" or NULL: as
 * bs_repository_find), or NULL. */
struct bs_repo_model *bs_repository_find_version(bs_repository_t *repo, const char *name,
                                                 const char *version);

/* One row of the repository index (Triton's RepositoryIndex): the strings
 * live until the repository next changes. */
struct bs_repo_row {
    const char *name, *version, *state, *reason;
};

/* The index: every entry, the replaced and unloaded ones still draining
 * (UNLOADING) and a model loading for the first time (LOADING); returns
 * the number of rows, of which the first max are written. */
int bs_repository_index(bs_repository_t *repo, struct bs_repo_row *rows, int max);

/* A request holds rm (it may not be freed until released). */
void bs_repository_ref(bs_repository_t *repo, struct bs_repo_model *rm);
void bs_repository_unref(bs_repository_t *repo, struct bs_repo_model *rm);

/* Called with each entry's model just before it is freed (no request holds
 * it any longer): the core ends its sequences. */
void bs_repository_set_free_hook(bs_repository_t *repo,
                                 void (*fn)(void *arg, struct bs_repo_model *rm), void *arg);

/* How a load or unload ends (on the loop thread, never inside the call
 * that asked): rc 0, or a failure code and its message. */
typedef void (*bs_repo_done)(void *arg, int rc, const char *msg);

/* Load or reload model name from the repository folders (or the built-in
 * of that name). done follows once the new entries serve (rc 0), or, when
 * a version fails, with the reason; a failed version keeps its old entry
 * serving. Refused at once (BS_EUNSUPP, no done) unless model control is
 * explicit. */
int bs_repository_load(bs_repository_t *repo, const char *name, bs_repo_done done, void *arg,
                       struct bs_err *err);

/* Unload model name: it leaves routing now, and done follows once its
 * requests have been answered and its memory freed. Refused at once
 * (BS_EUNSUPP, BS_ENOTFOUND; no done) as bs_repository_load. */
int bs_repository_unload(bs_repository_t *repo, const char *name, bs_repo_done done, void *arg,
                         struct bs_err *err);

/* Stop polling and model control, drain every batcher, then call
 * done(arg). */
void bs_repository_drain(bs_repository_t *repo, void (*done)(void *arg), void *arg);

/* Free models and batchers (after drain); NULL is a no-op. */
void bs_repository_free(bs_repository_t *repo);

#endif
