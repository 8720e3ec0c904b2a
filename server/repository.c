/* The model repository (see repository.h).
 *
 * Every folder of a repository folder except hidden ones is a model, and so
 * is every entry that cannot be read (a symlink loop, a dangling symlink, no
 * permission): that one is listed as unavailable with the reason, like a
 * model whose files fail to load. Plain files (a README, the keys of a
 * Kubernetes ConfigMap mount) are not models: skipped, with a log line. Reasons reach clients (RepositoryIndex, ModelReady
 * errors), so they name files relative to the repository folder
 * ("foo/config.json: ..."), never by the server's own paths. */
#include "repository.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "builtin.h"
#include "json.h"
#include "log.h"

#define SERVING_MAX_BYTES (1 << 20)

struct bs_repository {
    uv_loop_t *loop;
    struct bs_backend *be;
    bs_metrics_t *metrics; /* NULL: no metrics */
    struct bs_repo_model *models;
    int n, cap;
    int draining;           /* batchers still draining */
    void (*drained)(void *arg);
    void *drained_arg;
};

static char *read_file(const char *path, size_t *len, struct bs_err *err)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        bs_err_set(err, errno == ENOENT ? BS_ENOTFOUND : BS_EIO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(SERVING_MAX_BYTES + 1);
    size_t n = buf ? fread(buf, 1, SERVING_MAX_BYTES + 1, f) : 0;
    fclose(f);
    if (buf == NULL || n > SERVING_MAX_BYTES) {
        free(buf);
        bs_err_set(err, BS_ERANGE, "%s: too large", path);
        return NULL;
    }
    *len = n;
    return buf;
}

/* config.json's "serving" object, then serving.json beside it (which wins). */
static int load_serving(struct bs_repo_model *rm, struct bs_err *err)
{
    char path[1100];
    size_t len;
    bs_json_doc_t *doc;
    snprintf(path, sizeof(path), "%s/config.json", rm->path);
    char *text = read_file(path, &len, err);
    if (text == NULL)
        return err->code;
    int rc = bs_json_parse(&doc, text, len, 16, err);
    free(text);
    if (rc != 0)
        return bs_err_wrap(err, "%s", path);
    const struct bs_json *sec = bs_json_get(bs_json_doc_root(doc), "serving");
    if (sec != NULL && (rc = bs_serving_parse_json(&rm->serving, sec, err)) != 0)
        bs_err_wrap(err, "%s", path);
    bs_json_doc_free(doc);
    if (rc != 0)
        return rc;
    snprintf(path, sizeof(path), "%s/serving.json", rm->path);
    if ((text = read_file(path, &len, err)) == NULL)
        return err->code == BS_ENOTFOUND ? 0 : err->code;
    rc = bs_serving_parse(&rm->serving, text, len, err);
    free(text);
    return rc != 0 ? bs_err_wrap(err, "%s", path) : 0;
}

/* ---- models ---------------------------------------------------------------- */

static struct bs_repo_model *add_model(bs_repository_t *r, const char *name,
                                       const struct bs_serving_config *defaults)
{
    if (r->n == r->cap) {
        int cap = r->cap ? 2 * r->cap : 8;
        struct bs_repo_model *m = realloc(r->models, (size_t)cap * sizeof(*m));
        if (m == NULL)
            return NULL;
        r->models = m;
        r->cap = cap;
    }
    struct bs_repo_model *rm = &r->models[r->n++];
    memset(rm, 0, sizeof(*rm));
    snprintf(rm->name, sizeof(rm->name), "%s", name);
    rm->serving = *defaults;
    return rm;
}

/* A character that may be part of a path in a message. */
static bool path_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (unsigned char)c >= 0x80 || (c != '\0' && strchr("._-/~+@", c) != NULL);
}

/* Replace the model directory dir by name wherever it starts a path in msg
 * ("/models/foo/config.json: x" becomes "foo/config.json: x"). dir is
 * "<repository>/<name>", longer than name, so msg only shrinks. */
static void msg_relative(char *msg, const char *dir, const char *name)
{
    size_t dn = strlen(dir), nn = strlen(name);
    for (char *p = msg; (p = strstr(p, dir)) != NULL;) {
        if ((p > msg && path_char(p[-1])) || (p[dn] != '/' && p[dn] != '\0' && path_char(p[dn]))) {
            p++; /* inside a longer path: not ours */
            continue;
        }
        memcpy(p, name, nn);
        memmove(p + nn, p + dn, strlen(p + dn) + 1);
        p += nn;
    }
}

static void finish_load(bs_repository_t *r, struct bs_repo_model *rm, int rc, struct bs_err *err)
{
    if (rc == 0 && r->metrics != NULL)
        rm->metrics = bs_metrics_model_add(r->metrics, rm->name, "1", rm->serving.priority_levels);
    struct bs_batcher_deps deps = {.be = r->be, .metrics = rm->metrics};
    if (rc == 0)
        rc = bs_batcher_init(&rm->batcher, r->loop, rm->model, &rm->serving, &deps, err);
    if (rc != 0) {
        if (rm->path[0] != '\0')
            msg_relative(err->msg, rm->path, rm->name);
        snprintf(rm->reason, sizeof(rm->reason), "%s", err->msg);
        bs_model_free(rm->model);
        rm->model = NULL;
        bs_log(BS_LOG_ERROR, NULL, "model %s failed to load: %s", rm->name, rm->reason);
        return;
    }
    bs_log(BS_LOG_INFO, NULL, "model %s ready (%s, %s, %.1f MB of weights%s)", rm->name,
           bs_config_class_name(bs_model_config(rm->model)->cls),
           bs_compute_dtype_name(bs_model_dtype(rm->model)),
           (double)bs_model_weight_bytes(rm->model) / 1048576.0,
           rm->builtin ? ", generated" : "");
}

static bool valid_name(const char *s)
{
    if (*s == '\0' || *s == '.' || strlen(s) >= BS_MODEL_NAME_MAX)
        return false;
    for (; *s; s++)
        if (!(*s == '_' || *s == '-' || *s == '.' || (*s >= '0' && *s <= '9') ||
              (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z')))
            return false;
    return true;
}

/* The entry name at path must be a directory (symlinks followed). */
static int check_entry(const char *path, const char *name, struct bs_err *err)
{
    struct stat st, lst;
    if (stat(path, &st) != 0) {
        int e = errno;
        if (e == ENOENT && lstat(path, &lst) == 0 && S_ISLNK(lst.st_mode))
            return bs_err_set(err, BS_EIO,
                              "%s: dangling symbolic link (its target does not exist)", name);
        return bs_err_set(err, BS_EIO, "%s: cannot read: %s", name, strerror(e));
    }
    if (!S_ISDIR(st.st_mode))
        return bs_err_set(err, BS_EINVAL,
                          "%s: not a directory (a model is a folder holding config.json)", name);
    return 0;
}

/* A readable entry that is not a folder (symlinks followed): not a model. */
static bool is_plain_file(const char *root, const char *name)
{
    char path[4096];
    struct stat st;
    if ((size_t)snprintf(path, sizeof(path), "%s/%s", root, name) >= sizeof(path))
        return false;
    return stat(path, &st) == 0 && !S_ISDIR(st.st_mode);
}

/* Load the entry name of folder root as a model; failures are recorded. */
static void load_entry(bs_repository_t *r, const char *root, const char *name,
                       const struct bs_serving_config *defaults, struct bs_err *err)
{
    if (!valid_name(name) || bs_repository_find(r, name) != NULL) {
        bs_log(BS_LOG_WARN, NULL, "skipping \"%s\" in %s: %s", name, root,
               valid_name(name) ? "a model of this name is already loaded"
                                : "not a valid model name (letters, digits, '_', '-', '.')");
        return;
    }
    struct bs_repo_model *rm = add_model(r, name, defaults);
    if (rm == NULL) {
        bs_log(BS_LOG_ERROR, NULL, "skipping \"%s\" in %s: out of memory", name, root);
        return;
    }
    int rc = 0;
    if ((size_t)snprintf(rm->path, sizeof(rm->path), "%s/%s", root, name) >= sizeof(rm->path))
        rc = bs_err_set(err, BS_ERANGE, "%s: the path is too long", name);
    if (rc == 0)
        rc = check_entry(rm->path, name, err);
    if (rc == 0)
        rc = load_serving(rm, err);
    if (rc == 0) {
        struct bs_model_opts mo = {.has_dtype = rm->serving.has_dtype, .dtype = rm->serving.dtype};
        rc = bs_model_load_opts(&rm->model, rm->path, r->be, &mo, err);
    }
    finish_load(r, rm, rc, err);
}

static int load_dir(bs_repository_t *r, const char *root, const struct bs_serving_config *defaults,
                    struct bs_err *err)
{
    struct dirent **list;
    int n = scandir(root, &list, NULL, alphasort);
    if (n < 0)
        return bs_err_set(err, BS_EIO, "--model-repository %s: %s", root, strerror(errno));
    for (int i = 0; i < n; i++) {
        const char *name = list[i]->d_name;
        if (name[0] == '.') /* hidden entries, "." and ".." */
            ;
        else if (is_plain_file(root, name))
            bs_log(BS_LOG_INFO, NULL, "repository: \"%s\" is not a folder: not a model", name);
        else
            load_entry(r, root, name, defaults, err);
        free(list[i]);
    }
    free(list);
    return 0;
}

int bs_repository_init(bs_repository_t **repo, uv_loop_t *loop, struct bs_backend *be,
                       const struct bs_repo_options *opts, struct bs_err *err)
{
    bs_repository_t *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    r->loop = loop;
    r->be = be;
    r->metrics = opts->metrics;
    for (int i = 0; i < opts->n_dirs; i++) {
        if (load_dir(r, opts->dirs[i], &opts->defaults, err) != 0) {
            bs_repository_free(r);
            return err->code;
        }
    }
    for (int i = 0; opts->n_dirs == 0 && i < bs_builtin_count(); i++) {
        const struct bs_builtin *b = bs_builtin_get(i);
        struct bs_repo_model *rm = add_model(r, b->name, &opts->defaults);
        if (rm == NULL)
            break;
        rm->builtin = true;
        finish_load(r, rm, bs_builtin_load(b, be, &rm->model, err), err);
    }
    *repo = r;
    return 0;
}

int bs_repository_count(const bs_repository_t *r)
{
    return r->n;
}

struct bs_repo_model *bs_repository_get(bs_repository_t *r, int i)
{
    return i >= 0 && i < r->n ? &r->models[i] : NULL;
}

struct bs_repo_model *bs_repository_find(bs_repository_t *r, const char *name)
{
    for (int i = 0; i < r->n; i++)
        if (strcmp(r->models[i].name, name) == 0)
            return &r->models[i];
    return NULL;
}

static void one_drained(void *arg)
{
    bs_repository_t *r = arg;
    if (--r->draining == 0 && r->drained != NULL)
        r->drained(r->drained_arg);
}

void bs_repository_drain(bs_repository_t *r, void (*done)(void *arg), void *arg)
{
    r->drained = done;
    r->drained_arg = arg;
    r->draining = 1; /* held until every batcher has been asked */
    for (int i = 0; i < r->n; i++) {
        if (r->models[i].batcher != NULL) {
            r->draining++;
            bs_batcher_drain(r->models[i].batcher, one_drained, r);
        }
    }
    one_drained(r);
}

void bs_repository_free(bs_repository_t *r)
{
    if (r == NULL)
        return;
    for (int i = 0; i < r->n; i++) {
        bs_batcher_free(r->models[i].batcher);
        bs_model_free(r->models[i].model);
    }
    free(r->models);
    free(r);
}
