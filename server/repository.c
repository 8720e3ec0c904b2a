/* The model repository (see repository.h).
 *
 * Every folder of a repository folder except hidden ones is a model, and so
 * is every entry that cannot be read (a symlink loop, a dangling symlink, no
 * permission): that one is listed as unavailable with the reason, like a
 * model whose files fail to load. Plain files (a README, the keys of a
 * Kubernetes ConfigMap mount) are not models: skipped, with a log line.
 * Reasons reach clients (RepositoryIndex, ModelReady errors), so they name
 * files relative to the repository folder ("foo/config.json: ..."), never
 * by the server's own paths.
 *
 * Model control: loads, unloads and polls are operations (struct op) run
 * one at a time from a queue, each started from the kick timer (so that no
 * done runs inside the call that asked). A load reads and builds on a
 * worker (load_files), then install swaps its entries in on the loop. A
 * poll scans the folders on a worker (each model folder's signature: the
 * names, sizes and mtimes of its files and its version folders' files) and
 * queues a load for each model new or changed and an unload for each gone.
 * A replaced or unloaded entry is retired: out of the list, its batcher
 * drained; once drained and released by its last request (refs), the free
 * hook runs (the core ends its sequences), its batcher is freed and its
 * model freed on a worker (free_after frees the entry).
 *
 * Thread ownership: the loop thread owns everything; a running op's
 * worker fills that op's results (got, rc, err, sig, seen) and nothing
 * else, reading only the repository's immutable settings (dirs, be,
 * defaults). */
#include "repository.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "builtin.h"
#include "json.h"
#include "log.h"

#define SERVING_MAX_BYTES (1 << 20)
#define MAX_VERSIONS      64 /* versions of one model served at once */
#define DEFAULT_POLL_SECS 15

enum op_kind { OP_LOAD, OP_UNLOAD, OP_POLL };

/* A model folder seen by a poll, or the signature a load saw. */
struct name_rec {
    char name[BS_MODEL_NAME_MAX];
    uint64_t sig;
};

struct op {
    bs_repository_t *r;
    enum op_kind kind;
    char name[BS_MODEL_NAME_MAX];
    bs_repo_done done; /* NULL: nobody waits (start, poll) */
    void *arg;
    struct op *next;
    uv_work_t work;
    /* a load (its worker): the new entries, or the whole model's failure */
    struct bs_repo_model *got[MAX_VERSIONS];
    int n_got;
    int rc;
    struct bs_err err;
    uint64_t sig;
    /* a poll (its worker): the model folders present */
    struct name_rec *seen;
    int n_seen;
    /* an unload: its retired entries not yet freed */
    int pending;
};

struct bs_repository {
    uv_loop_t *loop;
    struct bs_backend *be;
    bs_metrics_t *metrics; /* NULL: no metrics */
    char **dirs;
    int n_dirs;
    struct bs_serving_config defaults;
    enum bs_repo_control control;
    int poll_secs;
    struct bs_repo_model **models; /* the entries, in order of arrival */
    int n, cap;
    struct bs_repo_model *retired; /* draining or being freed */
    struct name_rec *names;        /* signatures of the model folders last loaded */
    int n_names, cap_names;
    struct op *ops, *ops_tail; /* queued; the head runs when running */
    bool running;
    bool poll_queued;
    uv_timer_t kick, poll;
    int open_handles;
    bool stopping;
    int draining; /* batchers, retired entries and the running op still draining */
    void (*drained)(void *arg);
    void *drained_arg;
    void (*free_hook)(void *arg, struct bs_repo_model *rm);
    void *free_hook_arg;
};

static void op_next(bs_repository_t *r);
static void one_drained(void *arg);

/* ---- files (on a worker, or at start) ----------------------------------------- */

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

/* Parse the JSON file path into *doc: 0, BS_ENOTFOUND (no file, err set),
 * or another failure naming the file. */
static int read_json(const char *path, bs_json_doc_t **doc, struct bs_err *err)
{
    size_t len;
    char *text = read_file(path, &len, err);
    if (text == NULL)
        return err->code;
    int rc = bs_json_parse(doc, text, len, 16, err);
    free(text);
    return rc != 0 ? bs_err_wrap(err, "%s", path) : 0;
}

/* config.json's "serving" object in dir, then serving.json in top (which
 * wins): top is dir for a model of one version, the model folder for a
 * version folder. */
static int load_serving(struct bs_repo_model *rm, const char *dir, const char *top,
                        struct bs_err *err)
{
    char path[1100];
    bs_json_doc_t *doc;
    snprintf(path, sizeof(path), "%s/config.json", dir);
    int rc = read_json(path, &doc, err);
    if (rc != 0)
        return rc;
    const struct bs_json *sec = bs_json_get(bs_json_doc_root(doc), "serving");
    if (sec != NULL && (rc = bs_serving_parse_json(&rm->serving, sec, err)) != 0)
        bs_err_wrap(err, "%s", path);
    bs_json_doc_free(doc);
    if (rc != 0)
        return rc;
    snprintf(path, sizeof(path), "%s/serving.json", top);
    if ((rc = read_json(path, &doc, err)) != 0)
        return rc == BS_ENOTFOUND ? 0 : rc;
    rc = bs_serving_parse_json(&rm->serving, bs_json_doc_root(doc), err);
    bs_json_doc_free(doc);
    return rc != 0 ? bs_err_wrap(err, "%s", path) : 0;
}

/* Triton's version_policy. */
struct policy {
    enum { POLICY_LATEST, POLICY_ALL, POLICY_SPECIFIC } kind;
    int64_t latest;          /* POLICY_LATEST: how many */
    int64_t v[MAX_VERSIONS]; /* POLICY_SPECIFIC */
    int n_v;
};

static int parse_policy(const struct bs_json *p, struct policy *pol, struct bs_err *err)
{
    const struct bs_json *m = p->child;
    pol->kind = POLICY_LATEST;
    pol->latest = 1;
    if (p->type != BS_JSON_OBJECT || p->len != 1)
        return bs_err_set(err, BS_EINVAL,
                          "version_policy: expected an object with one key: \"latest\", \"all\" "
                          "or \"specific\"");
    if (m->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EINVAL, "version_policy.%s: expected an object", m->key);
    if (strcmp(m->key, "all") == 0) {
        if (m->len != 0)
            return bs_err_set(err, BS_EINVAL, "version_policy.all: expected {}");
        pol->kind = POLICY_ALL;
        return 0;
    }
    if (strcmp(m->key, "latest") == 0) {
        const struct bs_json *n = bs_json_get(m, "num_versions");
        if (m->len != (n != NULL) || (n != NULL && (!n->is_integer || n->integer < 1)))
            return bs_err_set(err, BS_EINVAL,
                              "version_policy.latest.num_versions: expected an integer >= 1 "
                              "(the only key of \"latest\")");
        pol->latest = n != NULL ? n->integer : 1;
        return 0;
    }
    if (strcmp(m->key, "specific") == 0) {
        const struct bs_json *vs = bs_json_get(m, "versions");
        if (m->len != 1 || vs == NULL || vs->type != BS_JSON_ARRAY || vs->len == 0 ||
            vs->len > MAX_VERSIONS)
            return bs_err_set(err, BS_EINVAL,
                              "version_policy.specific.versions: expected a list of 1 to %d "
                              "version numbers",
                              MAX_VERSIONS);
        pol->kind = POLICY_SPECIFIC;
        for (const struct bs_json *v = vs->child; v != NULL; v = v->next) {
            if (!v->is_integer || v->integer < 1)
                return bs_err_set(err, BS_EINVAL,
                                  "version_policy.specific.versions: %s is not a version "
                                  "number (an integer >= 1)",
                                  v->type == BS_JSON_NUMBER ? "a number" : "an entry");
            pol->v[pol->n_v++] = v->integer;
        }
        return 0;
    }
    return bs_err_set(err, BS_EINVAL,
                      "version_policy: unknown policy \"%s\" (known: latest, all, specific)",
                      m->key);
}

/* serving.json's version_policy in the model folder dir (none: latest 1). */
static int read_policy(const char *dir, struct policy *pol, struct bs_err *err)
{
    char path[1100];
    bs_json_doc_t *doc;
    pol->kind = POLICY_LATEST;
    pol->latest = 1;
    pol->n_v = 0;
    snprintf(path, sizeof(path), "%s/serving.json", dir);
    int rc = read_json(path, &doc, err);
    if (rc != 0)
        return rc == BS_ENOTFOUND ? 0 : rc;
    const struct bs_json *p = bs_json_get(bs_json_doc_root(doc), "version_policy");
    if (p != NULL && (rc = parse_policy(p, pol, err)) != 0)
        bs_err_wrap(err, "%s", path);
    bs_json_doc_free(doc);
    return rc;
}

/* A version folder's name: decimal digits, no leading zero, >= 1. */
static int64_t version_of(const char *s)
{
    int64_t v = 0;
    if (*s < '1' || *s > '9' || strlen(s) > 15)
        return 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return 0;
        v = v * 10 + (*s - '0');
    }
    return v;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The version folders of dir (sorted, at most MAX_VERSIONS: the highest). */
static int list_versions(const char *dir, int64_t *v)
{
    int64_t all[1024];
    int n = 0;
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[1400];
    struct stat st;
    while (d != NULL && (e = readdir(d)) != NULL && n < (int)BS_ARRAY_LEN(all)) {
        int64_t x = version_of(e->d_name);
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        if (x > 0 && stat(path, &st) == 0 && S_ISDIR(st.st_mode))
            all[n++] = x;
    }
    if (d != NULL)
        closedir(d);
    qsort(all, (size_t)n, sizeof(all[0]), cmp_i64);
    int skip = n > MAX_VERSIONS ? n - MAX_VERSIONS : 0;
    memcpy(v, all + skip, (size_t)(n - skip) * sizeof(*v));
    return n - skip;
}

/* Keep the versions pol serves (v sorted; returns the new count). */
static int apply_policy(const struct policy *pol, int64_t *v, int n)
{
    int k = 0;
    if (pol->kind == POLICY_ALL)
        return n;
    if (pol->kind == POLICY_LATEST) {
        int keep = pol->latest < n ? (int)pol->latest : n;
        memmove(v, v + n - keep, (size_t)keep * sizeof(*v));
        return keep;
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < pol->n_v; j++)
            if (v[i] == pol->v[j]) {
                v[k++] = v[i];
                break;
            }
    return k;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

/* Hash of the names, sizes and mtimes in dir, one level of folders deep. */
static uint64_t dir_sig(const char *dir, int depth, uint64_t h)
{
    struct dirent **list;
    char path[1400];
    struct stat st;
    int n = scandir(dir, &list, NULL, alphasort);
    if (n < 0)
        return fnv(h, "?", 1);
    for (int i = 0; i < n; i++) {
        const char *name = list[i]->d_name;
        snprintf(path, sizeof(path), "%s/%s", dir, name);
        if (name[0] != '.' && stat(path, &st) == 0) {
            int64_t f[3] = {(int64_t)st.st_size, (int64_t)st.st_mtim.tv_sec,
                            (int64_t)st.st_mtim.tv_nsec};
            h = fnv(h, name, strlen(name) + 1);
            if (S_ISDIR(st.st_mode))
                h = depth > 0 ? dir_sig(path, depth - 1, h) : h;
            else
                h = fnv(h, f, sizeof(f));
        }
        free(list[i]);
    }
    free(list);
    return h;
}

static uint64_t folder_sig(const char *dir)
{
    return dir_sig(dir, 1, 1469598103934665603ull);
}

/* ---- loading a model (on a worker, or at start) -------------------------------- */

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
            return bs_err_set(err, BS_EIO, "%s: dangling symbolic link (its target does not exist)",
                              name);
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

static struct bs_repo_model *new_entry(bs_repository_t *r, const char *name, int64_t version)
{
    struct bs_repo_model *rm = calloc(1, sizeof(*rm));
    if (rm == NULL)
        return NULL;
    snprintf(rm->name, sizeof(rm->name), "%s", name);
    rm->version = version;
    if (version > 0)
        snprintf(rm->version_str, sizeof(rm->version_str), "%lld", (long long)version);
    rm->serving = r->defaults;
    rm->state = BS_REPO_UNAVAILABLE;
    rm->repo = r;
    return rm;
}

/* Load version v of the model in folder dir from vdir (serving.json in
 * top) into op->got; a failure is the entry's reason. */
static void load_version(bs_repository_t *r, struct op *op, const char *dir, const char *vdir,
                         const char *top, int64_t v)
{
    struct bs_err err = {0};
    struct bs_repo_model *rm = new_entry(r, op->name, v);
    if (rm == NULL)
        return;
    snprintf(rm->path, sizeof(rm->path), "%s", vdir);
    int rc = load_serving(rm, vdir, top, &err);
    if (rc == 0) {
        struct bs_model_opts mo = {.has_dtype = rm->serving.has_dtype, .dtype = rm->serving.dtype};
        rc = bs_model_load_opts(&rm->model, vdir, r->be, &mo, &err);
    }
    if (rc != 0) {
        msg_relative(err.msg, dir, op->name);
        snprintf(rm->reason, sizeof(rm->reason), "%s", err.msg);
        rm->model = NULL;
    }
    op->got[op->n_got++] = rm;
}

/* The model folder of name: the first repository folder that has an entry
 * of that name which is no plain file (as the start-up scan sees them). */
static bool find_folder(const bs_repository_t *r, const char *name, char *dir, size_t cap)
{
    struct stat st;
    for (int i = 0; i < r->n_dirs; i++)
        if ((size_t)snprintf(dir, cap, "%s/%s", r->dirs[i], name) < cap && lstat(dir, &st) == 0 &&
            !is_plain_file(r->dirs[i], name))
            return true;
    return false;
}

/* A load's work: every version its policy serves, into op->got, or the
 * whole model's failure in op->rc and op->err. */
static void load_files(bs_repository_t *r, struct op *op)
{
    char dir[1024], vdir[1100], path[1100];
    int64_t v[MAX_VERSIONS];
    struct policy pol;
    struct bs_err *err = &op->err;
    if (r->n_dirs == 0) {
        const struct bs_builtin *b = bs_builtin_find(op->name);
        struct bs_repo_model *rm = b ? new_entry(r, op->name, 1) : NULL;
        if (b == NULL)
            op->rc = bs_err_set(err, BS_ENOTFOUND, "no built-in model named \"%s\"", op->name);
        else if (rm == NULL)
            op->rc = bs_err_set(err, BS_ENOMEM, "out of memory");
        if (rm == NULL)
            return;
        rm->builtin = true;
        if (bs_builtin_load(b, r->be, &rm->model, err) != 0)
            snprintf(rm->reason, sizeof(rm->reason), "%s", err->msg);
        op->got[op->n_got++] = rm;
        return;
    }
    if (!find_folder(r, op->name, dir, sizeof(dir))) {
        op->rc = bs_err_set(err, BS_ENOTFOUND, "no model \"%s\" in the model repository folders",
                            op->name);
        return;
    }
    op->sig = folder_sig(dir);
    if ((op->rc = check_entry(dir, op->name, err)) != 0)
        return;
    snprintf(path, sizeof(path), "%s/config.json", dir);
    int n = access(path, F_OK) == 0 ? 0 : list_versions(dir, v);
    if (n == 0) { /* config.json at the top (or nothing to load): version 1 */
        load_version(r, op, dir, dir, dir, 1);
        return;
    }
    if ((op->rc = read_policy(dir, &pol, err)) != 0) {
        msg_relative(err->msg, dir, op->name);
        return;
    }
    if ((n = apply_policy(&pol, v, n)) == 0) {
        op->rc = bs_err_set(err, BS_EINVAL,
                            "%s/serving.json: version_policy serves none of its version folders",
                            op->name);
        return;
    }
    for (int i = 0; i < n; i++) {
        snprintf(vdir, sizeof(vdir), "%s/%lld", dir, (long long)v[i]);
        load_version(r, op, dir, vdir, dir, v[i]);
    }
}

/* On the loop: a loaded entry gets its counters and its batcher. */
static void finish_load(bs_repository_t *r, struct bs_repo_model *rm)
{
    struct bs_err err = {0};
    int rc = 0;
    if (rm->model != NULL && r->metrics != NULL)
        rm->metrics = bs_metrics_model_add(r->metrics, rm->name, rm->version_str,
                                           rm->serving.priority_levels);
    struct bs_batcher_deps deps = {.be = r->be, .metrics = rm->metrics};
    if (rm->model != NULL &&
        (rc = bs_batcher_init(&rm->batcher, r->loop, rm->model, &rm->serving, &deps, &err)) != 0) {
        snprintf(rm->reason, sizeof(rm->reason), "%s", err.msg);
        bs_model_free(rm->model);
        rm->model = NULL;
    }
    if (rm->model == NULL) {
        rm->state = BS_REPO_UNAVAILABLE;
        bs_log(BS_LOG_ERROR, NULL, "model %s failed to load (version %s): %s", rm->name,
               rm->version_str, rm->reason);
        return;
    }
    rm->state = BS_REPO_READY;
    bs_log(BS_LOG_INFO, NULL, "model %s ready (%s, %s, %.1f MB of weights%s, version %s)", rm->name,
           bs_config_class_name(bs_model_config(rm->model)->cls),
           bs_compute_dtype_name(bs_model_dtype(rm->model)),
           (double)bs_model_weight_bytes(rm->model) / 1048576.0, rm->builtin ? ", generated" : "",
           rm->version_str);
}

/* ---- the entries (loop thread) --------------------------------------------------- */

static int list_add(bs_repository_t *r, struct bs_repo_model *rm)
{
    if (r->n == r->cap) {
        int cap = r->cap ? 2 * r->cap : 8;
        struct bs_repo_model **m = realloc(r->models, (size_t)cap * sizeof(*m));
        if (m == NULL)
            return BS_ENOMEM;
        r->models = m;
        r->cap = cap;
    }
    r->models[r->n++] = rm;
    return 0;
}

static void list_remove(bs_repository_t *r, struct bs_repo_model *rm)
{
    for (int i = 0; i < r->n; i++)
        if (r->models[i] == rm) {
            memmove(&r->models[i], &r->models[i + 1], (size_t)(r->n - i - 1) * sizeof(rm));
            r->n--;
            return;
        }
}

static struct bs_repo_model *find_exact(bs_repository_t *r, const char *name, int64_t version)
{
    for (int i = 0; i < r->n; i++)
        if (r->models[i]->version == version && strcmp(r->models[i]->name, name) == 0)
            return r->models[i];
    return NULL;
}

static bool has_ready(bs_repository_t *r, const char *name)
{
    for (int i = 0; i < r->n; i++)
        if (r->models[i]->model != NULL && strcmp(r->models[i]->name, name) == 0)
            return true;
    return false;
}

/* Free an entry no request holds and no batcher runs for. */
static void entry_free(struct bs_repo_model *rm)
{
    bs_batcher_free(rm->batcher);
    bs_model_free(rm->model);
    free(rm);
}

static void op_done(bs_repository_t *r, struct op *op, int rc, const char *msg);

static void free_work(uv_work_t *w)
{
    struct bs_repo_model *rm = w->data;
    bs_model_free(rm->model);
    rm->model = NULL;
}

static void free_after(uv_work_t *w, int status)
{
    struct bs_repo_model *rm = w->data;
    bs_repository_t *r = rm->repo;
    struct op *unload = rm->unload;
    (void)status;
    bs_model_free(rm->model); /* cancelled: never ran */
    free(w);
    for (struct bs_repo_model **p = &r->retired; *p != NULL; p = &(*p)->next_retired)
        if (*p == rm) {
            *p = rm->next_retired;
            break;
        }
    bs_log(BS_LOG_INFO, NULL, "model %s version %s unloaded", rm->name, rm->version_str);
    free(rm);
    if (unload != NULL && --unload->pending == 0)
        op_done(r, unload, 0, NULL);
    if (r->stopping)
        one_drained(r);
}

/* A retired entry drained and released: its sequences end, its batcher
 * goes, its model is freed on a worker. */
static void maybe_free(bs_repository_t *r, struct bs_repo_model *rm)
{
    if (!rm->drained || rm->refs > 0 || rm->batcher == NULL)
        return;
    if (r->free_hook != NULL)
        r->free_hook(r->free_hook_arg, rm);
    bs_batcher_free(rm->batcher); /* drained: the model may go now */
    rm->batcher = NULL;
    uv_work_t *w = malloc(sizeof(*w));
    if (w != NULL) {
        w->data = rm;
        if (uv_queue_work(r->loop, w, free_work, free_after) == 0)
            return;
    }
    bs_model_free(rm->model);
    rm->model = NULL;
    if (w == NULL && (w = malloc(sizeof(*w))) == NULL) {
        bs_log(BS_LOG_ERROR, NULL, "model %s: out of memory while unloading", rm->name);
        return; /* leaked rather than freed under a callback */
    }
    w->data = rm;
    free_after(w, 0);
}

static void on_retired_drained(void *arg)
{
    struct bs_repo_model *rm = arg;
    rm->drained = true;
    maybe_free(rm->repo, rm);
}

/* Take rm out of the list; one that serves drains and is freed
 * (unload, if any, waits for it), others are freed now. */
static void retire(bs_repository_t *r, struct bs_repo_model *rm, struct op *unload)
{
    list_remove(r, rm);
    if (rm->batcher == NULL) {
        entry_free(rm);
        return;
    }
    rm->retired = true;
    rm->state = BS_REPO_UNLOADING;
    rm->unload = unload;
    if (unload != NULL)
        unload->pending++;
    if (r->stopping)
        r->draining++;
    rm->next_retired = r->retired;
    r->retired = rm;
    bs_batcher_drain(rm->batcher, on_retired_drained, rm);
}

void bs_repository_ref(bs_repository_t *r, struct bs_repo_model *rm)
{
    (void)r;
    rm->refs++;
}

void bs_repository_unref(bs_repository_t *r, struct bs_repo_model *rm)
{
    if (--rm->refs == 0 && rm->retired)
        maybe_free(r, rm);
}

void bs_repository_set_free_hook(bs_repository_t *r,
                                 void (*fn)(void *arg, struct bs_repo_model *rm), void *arg)
{
    r->free_hook = fn;
    r->free_hook_arg = arg;
}

/* A name's signature record (created when missing; NULL: out of memory). */
static struct name_rec *name_rec(bs_repository_t *r, const char *name, bool create)
{
    for (int i = 0; i < r->n_names; i++)
        if (strcmp(r->names[i].name, name) == 0)
            return &r->names[i];
    if (!create)
        return NULL;
    if (r->n_names == r->cap_names) {
        int cap = r->cap_names ? 2 * r->cap_names : 8;
        struct name_rec *p = realloc(r->names, (size_t)cap * sizeof(*p));
        if (p == NULL)
            return NULL;
        r->names = p;
        r->cap_names = cap;
    }
    struct name_rec *n = &r->names[r->n_names++];
    snprintf(n->name, sizeof(n->name), "%s", name);
    n->sig = 0;
    return n;
}

/* The marker of a model not loaded (version "" or the one unloaded). */
static void add_marker(bs_repository_t *r, const char *name, int64_t version)
{
    struct bs_repo_model *rm = new_entry(r, name, version);
    if (rm == NULL)
        return;
    rm->unloaded = true;
    snprintf(rm->reason, sizeof(rm->reason), "unloaded");
    if (list_add(r, rm) != 0)
        free(rm);
}

/* On the loop: swap a load's entries in, all or none. Returns 0, or the
 * failure (msg): when a version or the whole model fails while the model
 * serves, nothing changes (the old entries keep serving); when it does
 * not serve, the failures are listed with their reasons. */
static int install(bs_repository_t *r, struct op *op, char *msg, size_t cap)
{
    struct name_rec *nr = name_rec(r, op->name, true);
    int rc = op->rc;
    if (nr != NULL)
        nr->sig = op->sig;
    msg[0] = '\0';
    if (rc != 0) {
        snprintf(msg, cap, "%s", op->err.msg);
        if (has_ready(r, op->name) || op->err.code == BS_ENOTFOUND)
            return rc; /* the served versions stay; an unknown model is not listed */
        struct bs_repo_model *rm = new_entry(r, op->name, 1);
        if (rm == NULL)
            return rc;
        snprintf(rm->reason, sizeof(rm->reason), "%s", op->err.msg);
        bs_log(BS_LOG_ERROR, NULL, "model %s failed to load: %s", rm->name, rm->reason);
        op->got[0] = rm; /* listed in the place of the entries it had */
        op->n_got = 1;
    }
    for (int k = 0; k < op->n_got && op->rc == 0; k++) {
        finish_load(r, op->got[k]);
        if (op->got[k]->model == NULL) {
            size_t used = strlen(msg);
            snprintf(msg + used, cap - used, "%s%s", used ? "; " : "", op->got[k]->reason);
            rc = BS_EINVAL;
        }
    }
    if (rc != 0 && has_ready(r, op->name))
        return rc; /* op_free frees the new entries */
    /* versions no longer served, failed ones and the marker of an unloaded
     * model go; requests go to the new entries from now on */
    for (int i = r->n - 1; i >= 0; i--) {
        struct bs_repo_model *rm = r->models[i];
        if (strcmp(rm->name, op->name) == 0)
            retire(r, rm, NULL);
    }
    for (int k = 0; k < op->n_got; k++) {
        if (list_add(r, op->got[k]) != 0) {
            rc = bs_err_set(&op->err, BS_ENOMEM, "out of memory");
            snprintf(msg, cap, "out of memory");
            continue; /* op_free frees it */
        }
        op->got[k] = NULL;
    }
    return rc;
}

/* ---- operations (loop thread) ------------------------------------------------------ */

static void op_free(struct op *op)
{
    for (int k = 0; k < op->n_got; k++)
        if (op->got[k] != NULL)
            entry_free(op->got[k]);
    free(op->seen);
    free(op);
}

static void on_kick(uv_timer_t *t)
{
    op_next(t->data);
}

/* The running op (the head) is over: answer it and start the next. */
static void op_done(bs_repository_t *r, struct op *op, int rc, const char *msg)
{
    r->ops = op->next;
    if (r->ops == NULL)
        r->ops_tail = NULL;
    r->running = false;
    if (op->kind == OP_POLL)
        r->poll_queued = false;
    if (op->done != NULL)
        op->done(op->arg, rc, msg);
    op_free(op);
    if (r->stopping)
        one_drained(r);
    else if (r->ops != NULL)
        uv_timer_start(&r->kick, on_kick, 0, 0);
}

static int op_push(bs_repository_t *r, enum op_kind kind, const char *name, bs_repo_done done,
                   void *arg, struct bs_err *err)
{
    struct op *op = calloc(1, sizeof(*op));
    if (op == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    op->r = r;
    op->kind = kind;
    snprintf(op->name, sizeof(op->name), "%s", name ? name : "");
    op->done = done;
    op->arg = arg;
    if (r->ops_tail != NULL)
        r->ops_tail->next = op;
    else
        r->ops = op;
    r->ops_tail = op;
    if (!r->running)
        uv_timer_start(&r->kick, on_kick, 0, 0);
    return 0;
}

/* A poll's work: every model folder and its signature. */
static void poll_scan(bs_repository_t *r, struct op *op)
{
    int cap = 0;
    char path[1400];
    for (int d = 0; d < r->n_dirs; d++) {
        struct dirent **list;
        int n = scandir(r->dirs[d], &list, NULL, alphasort);
        for (int i = 0; i < n; i++) {
            const char *name = list[i]->d_name;
            bool dup = false;
            for (int k = 0; k < op->n_seen && !dup; k++)
                dup = strcmp(op->seen[k].name, name) == 0;
            if (name[0] != '.' && valid_name(name) && !dup && !is_plain_file(r->dirs[d], name)) {
                if (op->n_seen == cap) {
                    cap = cap ? 2 * cap : 16;
                    struct name_rec *p = realloc(op->seen, (size_t)cap * sizeof(*p));
                    if (p == NULL)
                        break;
                    op->seen = p;
                }
                snprintf(path, sizeof(path), "%s/%s", r->dirs[d], name);
                snprintf(op->seen[op->n_seen].name, BS_MODEL_NAME_MAX, "%.*s",
                         BS_MODEL_NAME_MAX - 1, name); /* valid_name: it fits */
                op->seen[op->n_seen++].sig = folder_sig(path);
            }
            free(list[i]);
        }
        if (n >= 0)
            free(list);
    }
}

/* A poll's result: load what is new or changed, unload what is gone. */
static void poll_apply(bs_repository_t *r, struct op *op)
{
    struct bs_err err = {0};
    for (int k = 0; k < op->n_seen; k++) {
        struct name_rec *nr = name_rec(r, op->seen[k].name, false);
        if (nr == NULL || nr->sig != op->seen[k].sig) {
            bs_log(BS_LOG_INFO, NULL, "repository poll: model %s %s", op->seen[k].name,
                   nr == NULL || nr->sig == 0 ? "added" : "changed");
            op_push(r, OP_LOAD, op->seen[k].name, NULL, NULL, &err);
        }
    }
    for (int i = 0; i < r->n_names; i++) {
        bool seen = false;
        for (int k = 0; k < op->n_seen && !seen; k++)
            seen = strcmp(op->seen[k].name, r->names[i].name) == 0;
        if (!seen && r->names[i].sig != 0) {
            bs_log(BS_LOG_INFO, NULL, "repository poll: model %s removed", r->names[i].name);
            r->names[i].sig = 0;
            op_push(r, OP_UNLOAD, r->names[i].name, NULL, NULL, &err);
        }
    }
}

static void op_work(uv_work_t *w)
{
    struct op *op = w->data;
    if (op->kind == OP_LOAD)
        load_files(op->r, op);
    else
        poll_scan(op->r, op);
}

static void op_after(uv_work_t *w, int status)
{
    struct op *op = w->data;
    bs_repository_t *r = op->r;
    char msg[1024], full[1200];
    (void)status;
    if (r->stopping) {
        op_done(r, op, BS_EUNSUPP, "the server is shutting down");
        return;
    }
    if (op->kind == OP_POLL) {
        poll_apply(r, op);
        op_done(r, op, 0, NULL);
        return;
    }
    int rc = install(r, op, msg, sizeof(msg));
    if (rc == 0) {
        op_done(r, op, 0, NULL);
        return;
    }
    snprintf(full, sizeof(full), "failed to load model \"%s\": %s", op->name, msg);
    bs_log(BS_LOG_ERROR, NULL, "%s", full);
    op_done(r, op, rc, full);
}

/* An unload: its entries leave the list (markers take their place) and
 * drain; done once the last is freed. */
static void unload_run(bs_repository_t *r, struct op *op)
{
    struct bs_repo_model *mine[MAX_VERSIONS * 2];
    int n = 0;
    bool known = false;
    for (int i = 0; i < r->n; i++) {
        struct bs_repo_model *rm = r->models[i];
        if (strcmp(rm->name, op->name) != 0)
            continue;
        known = true;
        if (!rm->unloaded && n < (int)BS_ARRAY_LEN(mine))
            mine[n++] = rm;
    }
    for (int i = 0; i < n; i++) {
        int64_t v = mine[i]->version;
        retire(r, mine[i], op);
        add_marker(r, op->name, v);
    }
    if (!known) {
        char msg[BS_MODEL_NAME_MAX + 32];
        snprintf(msg, sizeof(msg), "unknown model \"%s\"", op->name);
        op_done(r, op, BS_ENOTFOUND, msg);
    } else if (op->pending == 0)
        op_done(r, op, 0, NULL);
    else
        bs_log(BS_LOG_INFO, NULL, "model %s: unloading (%d versions draining)", op->name,
               op->pending);
}

static void op_next(bs_repository_t *r)
{
    struct op *op = r->ops;
    if (r->running || op == NULL || r->stopping)
        return;
    r->running = true;
    if (op->kind == OP_UNLOAD) {
        unload_run(r, op);
        return;
    }
    op->work.data = op;
    if (uv_queue_work(r->loop, &op->work, op_work, op_after) != 0)
        op_done(r, op, BS_EINTERNAL, "cannot start a worker thread");
}

static void on_poll(uv_timer_t *t)
{
    bs_repository_t *r = t->data;
    struct bs_err err = {0};
    if (!r->poll_queued && !r->stopping && op_push(r, OP_POLL, "", NULL, NULL, &err) == 0)
        r->poll_queued = true;
}

/* Load and unload are for explicit model control only. */
static int control_check(const bs_repository_t *r, const char *name, struct bs_err *err)
{
    if (r->control == BS_REPO_CONTROL_NONE)
        return bs_err_set(err, BS_EUNSUPP,
                          "explicit model load / unload is not allowed: model control is "
                          "disabled (--model-control-mode none)");
    if (r->control == BS_REPO_CONTROL_POLL)
        return bs_err_set(err, BS_EUNSUPP,
                          "explicit model load / unload is not allowed while the repository is "
                          "polled (--model-control-mode poll)");
    if (r->stopping)
        return bs_err_set(err, BS_EUNSUPP, "the server is shutting down");
    if (name == NULL || !valid_name(name))
        return bs_err_set(err, BS_EINVAL,
                          "not a valid model name (1 to %d letters, digits, '_', '-', '.'; not "
                          "starting with '.')",
                          BS_MODEL_NAME_MAX - 1);
    return 0;
}

int bs_repository_load(bs_repository_t *r, const char *name, bs_repo_done done, void *arg,
                       struct bs_err *err)
{
    int rc = control_check(r, name, err);
    return rc != 0 ? rc : op_push(r, OP_LOAD, name, done, arg, err);
}

int bs_repository_unload(bs_repository_t *r, const char *name, bs_repo_done done, void *arg,
                         struct bs_err *err)
{
    int rc = control_check(r, name, err);
    return rc != 0 ? rc : op_push(r, OP_UNLOAD, name, done, arg, err);
}

/* ---- start ------------------------------------------------------------------------ */

/* --load-model names name (or "*"). */
static bool selected(const struct bs_repo_options *o, const char *name)
{
    for (int i = 0; i < o->n_load_models; i++)
        if (strcmp(o->load_models[i], "*") == 0 || strcmp(o->load_models[i], name) == 0)
            return true;
    return false;
}

/* Load name now (at start: nothing is served yet), or list it unloaded
 * when explicit control leaves it out. */
static void load_now(bs_repository_t *r, const struct bs_repo_options *o, const char *name)
{
    char msg[1024];
    if (o->control == BS_REPO_CONTROL_EXPLICIT && !selected(o, name)) {
        add_marker(r, name, 0);
        return;
    }
    struct op *op = calloc(1, sizeof(*op));
    if (op == NULL) {
        bs_log(BS_LOG_ERROR, NULL, "skipping \"%s\": out of memory", name);
        return;
    }
    op->r = r;
    op->kind = OP_LOAD;
    snprintf(op->name, sizeof(op->name), "%s", name);
    load_files(r, op);
    install(r, op, msg, sizeof(msg));
    op_free(op);
}

static int load_dir(bs_repository_t *r, const struct bs_repo_options *o, const char *root,
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
        else if (!valid_name(name) || bs_repository_find(r, name) != NULL)
            bs_log(BS_LOG_WARN, NULL, "skipping \"%s\" in %s: %s", name, root,
                   valid_name(name) ? "a model of this name is already loaded"
                                    : "not a valid model name (letters, digits, '_', '-', '.')");
        else
            load_now(r, o, name);
        free(list[i]);
    }
    free(list);
    return 0;
}

static int init_dirs(bs_repository_t *r, const struct bs_repo_options *o, struct bs_err *err)
{
    r->dirs = calloc((size_t)o->n_dirs + 1, sizeof(*r->dirs));
    if (r->dirs == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    for (int i = 0; i < o->n_dirs; i++) {
        if ((r->dirs[i] = strdup(o->dirs[i])) == NULL)
            return bs_err_set(err, BS_ENOMEM, "out of memory");
        r->n_dirs++;
    }
    return 0;
}

int bs_repository_init(bs_repository_t **repo, uv_loop_t *loop, struct bs_backend *be,
                       const struct bs_repo_options *opts, struct bs_err *err)
{
    bs_repository_t *r = calloc(1, sizeof(*r));
    *repo = NULL;
    if (r == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    r->loop = loop;
    r->be = be;
    r->metrics = opts->metrics;
    r->defaults = opts->defaults;
    r->control = opts->control;
    r->poll_secs = opts->poll_secs > 0 ? opts->poll_secs : DEFAULT_POLL_SECS;
    uv_timer_init(loop, &r->kick); /* cannot fail */
    uv_timer_init(loop, &r->poll);
    r->kick.data = r->poll.data = r;
    r->open_handles = 2;
    int rc = init_dirs(r, opts, err);
    for (int i = 0; rc == 0 && i < opts->n_dirs; i++)
        rc = load_dir(r, opts, opts->dirs[i], err);
    for (int i = 0; rc == 0 && opts->n_dirs == 0 && i < bs_builtin_count(); i++)
        load_now(r, opts, bs_builtin_get(i)->name);
    for (int i = 0; rc == 0 && opts->control == BS_REPO_CONTROL_EXPLICIT && i < opts->n_load_models;
         i++) {
        const char *name = opts->load_models[i];
        if (strcmp(name, "*") != 0 && bs_repository_find(r, name) == NULL)
            rc = bs_err_set(err, BS_ENOTFOUND,
                            "--load-model %s: no such model in the model repository folders%s",
                            name, opts->n_dirs == 0 ? " (the built-in models)" : "");
    }
    if (rc != 0) {
        bs_repository_free(r);
        return rc;
    }
    if (r->control == BS_REPO_CONTROL_POLL) {
        uint64_t ms = (uint64_t)r->poll_secs * 1000;
        uv_timer_start(&r->poll, on_poll, ms, ms);
        uv_unref((uv_handle_t *)&r->poll); /* polling alone keeps no loop alive */
    }
    *repo = r;
    return 0;
}

/* ---- lookups -------------------------------------------------------------------- */

int bs_repository_count(const bs_repository_t *r)
{
    return r->n;
}

struct bs_repo_model *bs_repository_get(bs_repository_t *r, int i)
{
    return i >= 0 && i < r->n ? r->models[i] : NULL;
}

struct bs_repo_model *bs_repository_find(bs_repository_t *r, const char *name)
{
    struct bs_repo_model *best = NULL;
    for (int i = 0; i < r->n; i++) {
        struct bs_repo_model *rm = r->models[i];
        if (strcmp(rm->name, name) != 0)
            continue;
        bool better = best == NULL || (rm->model != NULL) > (best->model != NULL) ||
                      ((rm->model != NULL) == (best->model != NULL) && rm->version > best->version);
        if (better)
            best = rm;
    }
    return best;
}

struct bs_repo_model *bs_repository_find_version(bs_repository_t *r, const char *name,
                                                 const char *version)
{
    if (version == NULL || version[0] == '\0')
        return bs_repository_find(r, name);
    int64_t v = version_of(version);
    return v > 0 ? find_exact(r, name, v) : NULL;
}

static const char *state_name(const struct bs_repo_model *rm)
{
    static const char *const names[] = {"READY", "UNAVAILABLE", "LOADING", "UNLOADING"};
    return rm->unloaded ? "UNAVAILABLE" : names[rm->state];
}

/* Rows by name, then version (numerically; "" first). */
static int cmp_row(const void *a, const void *b)
{
    const struct bs_repo_row *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    size_t lx = strlen(x->version), ly = strlen(y->version);
    if (c != 0)
        return c;
    return lx != ly ? (lx < ly ? -1 : 1) : strcmp(x->version, y->version);
}

int bs_repository_index(bs_repository_t *r, struct bs_repo_row *rows, int max)
{
    int k = 0;
    for (int i = 0; i < r->n; i++) {
        const struct bs_repo_model *rm = r->models[i];
        bool draining = false;
        for (const struct bs_repo_model *d = r->retired; d != NULL && rm->unloaded;
             d = d->next_retired)
            draining |= d->version == rm->version && strcmp(d->name, rm->name) == 0;
        if (draining)
            continue; /* listed as UNLOADING below */
        if (k < max)
            rows[k] = (struct bs_repo_row){rm->name, rm->version_str, state_name(rm),
                                           rm->model != NULL ? "" : rm->reason};
        k++;
    }
    for (const struct bs_repo_model *rm = r->retired; rm != NULL; rm = rm->next_retired) {
        const struct bs_repo_model *now = find_exact(r, rm->name, rm->version);
        if (now != NULL && !now->unloaded)
            continue; /* replaced: the new entry is listed */
        if (k < max)
            rows[k] = (struct bs_repo_row){rm->name, rm->version_str, "UNLOADING", ""};
        k++;
    }
    if (r->running && r->ops->kind == OP_LOAD && bs_repository_find(r, r->ops->name) == NULL) {
        if (k < max)
            rows[k] = (struct bs_repo_row){r->ops->name, "", "LOADING", ""};
        k++;
    }
    if (rows != NULL)
        qsort(rows, (size_t)(k < max ? k : max), sizeof(*rows), cmp_row);
    return k;
}

/* ---- drain and free ------------------------------------------------------------------ */

static void one_drained(void *arg)
{
    bs_repository_t *r = arg;
    if (--r->draining == 0 && r->drained != NULL)
        r->drained(r->drained_arg);
}

void bs_repository_drain(bs_repository_t *r, void (*done)(void *arg), void *arg)
{
    r->stopping = true;
    uv_timer_stop(&r->poll);
    uv_timer_stop(&r->kick);
    r->drained = done;
    r->drained_arg = arg;
    r->draining = 1; /* held until every batcher has been asked */
    /* queued operations are answered now; the running one finishes */
    struct op *queued = r->running ? r->ops->next : r->ops;
    if (r->running) {
        r->ops->next = NULL;
        r->ops_tail = r->ops;
        r->draining++;
    } else {
        r->ops = r->ops_tail = NULL;
    }
    for (struct op *op = queued, *next; op != NULL; op = next) {
        next = op->next;
        if (op->done != NULL)
            op->done(op->arg, BS_EUNSUPP, "the server is shutting down");
        op_free(op);
    }
    for (const struct bs_repo_model *rm = r->retired; rm != NULL; rm = rm->next_retired)
        r->draining++; /* each is freed in free_after */
    for (int i = 0; i < r->n; i++) {
        if (r->models[i]->batcher != NULL) {
            r->draining++;
            bs_batcher_drain(r->models[i]->batcher, one_drained, r);
        }
    }
    one_drained(r);
}

static void on_handle_closed(uv_handle_t *h)
{
    bs_repository_t *r = h->data;
    if (--r->open_handles == 0)
        free(r);
}

void bs_repository_free(bs_repository_t *r)
{
    if (r == NULL)
        return;
    for (int i = 0; i < r->n; i++)
        entry_free(r->models[i]);
    for (struct bs_repo_model *rm = r->retired, *next; rm != NULL; rm = next) {
        next = rm->next_retired;
        entry_free(rm);
    }
    for (struct op *op = r->ops, *next; op != NULL; op = next) {
        next = op->next;
        op_free(op);
    }
    for (int i = 0; i < r->n_dirs; i++)
        free(r->dirs[i]);
    free(r->dirs);
    free(r->models);
    free(r->names);
    /* the struct goes with the timers' close callbacks */
    uv_close((uv_handle_t *)&r->kick, on_handle_closed);
    uv_close((uv_handle_t *)&r->poll, on_handle_closed);
}
