/* The model repository (server/repository.c) on hostile folders: every entry
 * that cannot be read (symlink loops, dangling symlinks, plain files) is
 * listed as unavailable with its reason, models that fail to load are too,
 * and no reason carries the server's own path to the repository.
 *
 * Usage: test_repository GOLDEN_DIR (a good model is a symlink to one case) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "backend.h"
#include "repository.h"

#define GOOD_CASE "ada_group_norm_gelu"

static const char *golden;

struct fixture {
    char root[256];
    uv_loop_t loop;
    struct bs_backend be;
    bs_repository_t *repo;
};

static void write_text(const char *root, const char *rel, const char *text)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", root, rel);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

static void make_dir(const char *root, const char *rel)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", root, rel);
    assert_int_equal(mkdir(path, 0755), 0);
}

static void make_link(const char *root, const char *rel, const char *target)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", root, rel);
    assert_int_equal(symlink(target, path), 0);
}

static const char broken_config[] = "{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 32}";
static const char ff_config[] = "{\"_class_name\": \"FeedForward\", \"dim\": 4}";

/* The repository: one good model (a symlink to a golden case), models that
 * fail to load, and entries that are no model directory at all. */
static void populate(const char *root)
{
    char target[512];
    snprintf(target, sizeof(target), "%s/%s", golden, GOOD_CASE);
    make_link(root, "good", target);
    make_dir(root, "broken");
    write_text(root, "broken/config.json", broken_config);
    make_dir(root, "noweights");
    write_text(root, "noweights/config.json", ff_config);
    make_dir(root, "badserving");
    write_text(root, "badserving/config.json", ff_config);
    write_text(root, "badserving/serving.json", "{\"max_batch_size\": 0}");
    make_dir(root, "badjson");
    write_text(root, "badjson/config.json", "{\"_class_name\": \"FeedForward\\u0000x\"}");
    make_dir(root, "noconfig");
    make_link(root, "loop", "loop");
    make_link(root, "a", "b");
    make_link(root, "b", "a");
    make_link(root, "gone", "/nonexistent/blockserve/model");
    write_text(root, "README.md", "not a model\n");
    make_dir(root, ".hidden");
    make_dir(root, "bad name");
}

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));
    struct bs_err err = {0};
    if (fx == NULL)
        return -1;
    const char *tmp = getenv("TMPDIR");
    snprintf(fx->root, sizeof(fx->root), "%s/bs_repo_test.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(fx->root) == NULL || uv_loop_init(&fx->loop) != 0 ||
        bs_backend_cpu_init(&fx->be, 1, &err) != 0) {
        free(fx);
        return -1;
    }
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    bs_repository_free(fx->repo);
    uv_run(&fx->loop, UV_RUN_DEFAULT); /* batchers close their handles */
    uv_loop_close(&fx->loop);
    bs_backend_free(&fx->be);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", fx->root);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", fx->root);
    free(fx);
    return 0;
}

static const struct bs_repo_model *expect_model(bs_repository_t *repo, const char *name,
                                                const char *reason)
{
    const struct bs_repo_model *rm = bs_repository_find(repo, name);
    if (rm == NULL)
        fail_msg("%s: not listed", name);
    if (reason == NULL ? rm->model == NULL
                       : (rm->model != NULL || strstr(rm->reason, reason) == NULL))
        fail_msg("%s: reason \"%s\", want \"%s\"", name, rm->reason, reason ? reason : "(ready)");
    return rm;
}

static void test_hostile_entries(void **state)
{
    struct fixture *fx = *state;
    populate(fx->root);
    const char *dirs[] = {fx->root};
    struct bs_repo_options opts = {.dirs = dirs, .n_dirs = 1};
    opts.defaults.max_batch_size = 1;
    opts.defaults.max_queue_size = 16;
    struct bs_err err = {0};
    assert_int_equal(bs_repository_init(&fx->repo, &fx->loop, &fx->be, &opts, &err), 0);
    bs_repository_t *repo = fx->repo;

    expect_model(repo, "good", NULL);
    expect_model(repo, "broken", "broken/config.json: missing required key");
    expect_model(repo, "noweights",
                 "noweights/diffusion_pytorch_model.safetensors: cannot open: No such file");
    expect_model(repo, "badserving", "badserving/serving.json: serving.max_batch_size");
    expect_model(repo, "badjson", "badjson/config.json: byte 28: \\u0000 is not allowed");
    expect_model(repo, "noconfig", "noconfig/config.json: No such file or directory");
    expect_model(repo, "loop", "loop: cannot read: Too many levels of symbolic links");
    expect_model(repo, "a", "a: cannot read: Too many levels of symbolic links");
    expect_model(repo, "b", "b: cannot read: Too many levels of symbolic links");
    expect_model(repo, "gone", "gone: dangling symbolic link (its target does not exist)");
    assert_null(bs_repository_find(repo, "README.md")); /* a plain file is not a model */
    assert_null(bs_repository_find(repo, ".hidden"));
    assert_null(bs_repository_find(repo, "bad name"));
    assert_int_equal(bs_repository_count(repo), 10);

    /* No reason names the server's own folders. */
    for (int i = 0; i < bs_repository_count(repo); i++) {
        const struct bs_repo_model *rm = bs_repository_get(repo, i);
        if (strstr(rm->reason, fx->root) != NULL || strstr(rm->reason, golden) != NULL)
            fail_msg("%s: reason \"%s\" names a server path", rm->name, rm->reason);
    }
}

/* A relative repository path and one with a trailing slash are stripped too. */
static void test_relative_root(void **state)
{
    struct fixture *fx = *state;
    make_dir(fx->root, "repo");
    make_dir(fx->root, "repo/broken");
    write_text(fx->root, "repo/broken/config.json", broken_config);
    char cwd[512];
    assert_non_null(getcwd(cwd, sizeof(cwd)));
    assert_int_equal(chdir(fx->root), 0);
    const char *dirs[] = {"./repo/"};
    struct bs_repo_options opts = {.dirs = dirs, .n_dirs = 1};
    opts.defaults.max_batch_size = 1;
    opts.defaults.max_queue_size = 16;
    struct bs_err err = {0};
    int rc = bs_repository_init(&fx->repo, &fx->loop, &fx->be, &opts, &err);
    assert_int_equal(chdir(cwd), 0);
    assert_int_equal(rc, 0);
    const struct bs_repo_model *rm = expect_model(fx->repo, "broken", "broken/config.json: ");
    if (strncmp(rm->reason, "broken/config.json: ", 20) != 0)
        fail_msg("reason \"%s\"", rm->reason);
}

/* A model folder of version folders 1..n, each a link to the good case,
 * with serving.json holding policy (NULL: none). */
static void make_versioned(const char *root, const char *name, int n, const char *policy)
{
    char rel[256], target[512], text[512];
    snprintf(target, sizeof(target), "%s/%s", golden, GOOD_CASE);
    make_dir(root, name);
    for (int v = 1; v <= n; v++) {
        snprintf(rel, sizeof(rel), "%s/%d", name, v);
        make_link(root, rel, target);
    }
    if (policy != NULL) {
        snprintf(rel, sizeof(rel), "%s/serving.json", name);
        snprintf(text, sizeof(text), "{\"max_batch_size\": 2, \"version_policy\": %s}", policy);
        write_text(root, rel, text);
    }
}

/* The ready versions of name, "1,3" (into buf). */
static const char *ready_versions(bs_repository_t *repo, const char *name, char *buf, size_t cap)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int v = 1; v < 10; v++) {
        char vs[8];
        snprintf(vs, sizeof(vs), "%d", v);
        const struct bs_repo_model *rm = bs_repository_find_version(repo, name, vs);
        if (rm != NULL && rm->model != NULL)
            used += (size_t)snprintf(buf + used, cap - used, "%s%d", used ? "," : "", v);
    }
    return buf;
}

/* Version folders and Triton's version policies. */
static void test_versions(void **state)
{
    struct fixture *fx = *state;
    char buf[64], path[512];
    make_versioned(fx->root, "latest1", 3, NULL);
    make_versioned(fx->root, "latest2", 3, "{\"latest\": {\"num_versions\": 2}}");
    make_versioned(fx->root, "all", 2, "{\"all\": {}}");
    make_versioned(fx->root, "specific", 3, "{\"specific\": {\"versions\": [1, 3, 7]}}");
    make_versioned(fx->root, "badpolicy", 1, "{\"newest\": {}}");
    make_versioned(fx->root, "badlatest", 1, "{\"latest\": {\"num_versions\": 0}}");
    make_versioned(fx->root, "badspecific", 1, "{\"specific\": {\"versions\": [\"1\"]}}");
    make_versioned(fx->root, "noneserved", 2, "{\"specific\": {\"versions\": [5]}}");
    make_versioned(fx->root, "odd", 1, NULL);
    make_dir(fx->root, "odd/01"); /* not version folders */
    make_dir(fx->root, "odd/abc");
    make_versioned(fx->root, "brokenv", 0, NULL);
    make_dir(fx->root, "brokenv/4");
    write_text(fx->root, "brokenv/4/config.json", broken_config);
    const char *dirs[] = {fx->root};
    struct bs_repo_options opts = {.dirs = dirs, .n_dirs = 1};
    opts.defaults.max_batch_size = 1;
    opts.defaults.max_queue_size = 16;
    struct bs_err err = {0};
    assert_int_equal(bs_repository_init(&fx->repo, &fx->loop, &fx->be, &opts, &err), 0);
    bs_repository_t *repo = fx->repo;

    assert_string_equal(ready_versions(repo, "latest1", buf, sizeof(buf)), "3");
    assert_int_equal(bs_repository_find(repo, "latest1")->version, 3);
    assert_null(bs_repository_find_version(repo, "latest1", "1"));
    assert_null(bs_repository_find_version(repo, "latest1", "03")); /* not a version number */
    assert_string_equal(ready_versions(repo, "latest2", buf, sizeof(buf)), "2,3");
    assert_string_equal(ready_versions(repo, "all", buf, sizeof(buf)), "1,2");
    assert_string_equal(ready_versions(repo, "specific", buf, sizeof(buf)), "1,3");
    assert_string_equal(ready_versions(repo, "odd", buf, sizeof(buf)), "1");
    /* serving.json at the model folder's top serves every version */
    assert_int_equal(bs_repository_find(repo, "all")->serving.max_batch_size, 2);
    snprintf(path, sizeof(path), "%s/all/2", fx->root);
    assert_string_equal(bs_repository_find(repo, "all")->path, path);
    expect_model(repo, "badpolicy",
                 "badpolicy/serving.json: version_policy: unknown policy "
                 "\"newest\" (known: latest, all, specific)");
    expect_model(repo, "badlatest",
                 "badlatest/serving.json: version_policy.latest.num_versions: expected an "
                 "integer >= 1");
    expect_model(repo, "badspecific", "badspecific/serving.json: version_policy.specific.versions");
    expect_model(repo, "noneserved", "version_policy serves none of its version folders");
    const struct bs_repo_model *rm = expect_model(repo, "brokenv", "brokenv/4/config.json: ");
    assert_int_equal(rm->version, 4);

    /* the index: one row per version, by name and version */
    struct bs_repo_row rows[64];
    int n = bs_repository_index(repo, rows, 64);
    assert_int_equal(n, bs_repository_count(repo));
    for (int i = 1; i < n; i++)
        assert_true(strcmp(rows[i - 1].name, rows[i].name) <= 0);
    bool seen = false;
    for (int i = 0; i < n; i++)
        if (strcmp(rows[i].name, "specific") == 0 && strcmp(rows[i].version, "3") == 0) {
            assert_string_equal(rows[i].state, "READY");
            seen = true;
        }
    assert_true(seen);
}

/* What a load or unload answered. */
struct answer {
    int calls, rc;
    char msg[512];
};

static void on_answer(void *arg, int rc, const char *msg)
{
    struct answer *a = arg;
    a->calls++;
    a->rc = rc;
    snprintf(a->msg, sizeof(a->msg), "%s", msg ? msg : "");
}

static int freed;
static void on_freed(void *arg, struct bs_repo_model *rm)
{
    (void)arg;
    (void)rm;
    freed++;
}

/* none and poll refuse load and unload. */
static void test_control_refused(void **state)
{
    struct fixture *fx = *state;
    make_versioned(fx->root, "m", 1, NULL);
    const char *dirs[] = {fx->root};
    struct bs_repo_options opts = {.dirs = dirs, .n_dirs = 1, .control = BS_REPO_CONTROL_POLL};
    opts.defaults.max_batch_size = 1;
    opts.defaults.max_queue_size = 16;
    struct bs_err err = {0};
    struct answer a = {0};
    assert_int_equal(bs_repository_init(&fx->repo, &fx->loop, &fx->be, &opts, &err), 0);
    assert_int_equal(bs_repository_load(fx->repo, "m", on_answer, &a, &err), BS_EUNSUPP);
    assert_non_null(strstr(err.msg, "--model-control-mode poll"));
    assert_int_equal(bs_repository_unload(fx->repo, "m", on_answer, &a, &err), BS_EUNSUPP);
    bs_repository_free(fx->repo);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    opts.control = BS_REPO_CONTROL_NONE;
    assert_int_equal(bs_repository_init(&fx->repo, &fx->loop, &fx->be, &opts, &err), 0);
    assert_int_equal(bs_repository_load(fx->repo, "m", on_answer, &a, &err), BS_EUNSUPP);
    assert_non_null(strstr(err.msg, "model control is disabled (--model-control-mode none)"));
    assert_int_equal(a.calls, 0);
    /* explicit: --load-model must name a model */
    bs_repository_free(fx->repo);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    fx->repo = NULL;
    const char *load[] = {"nope"};
    opts.control = BS_REPO_CONTROL_EXPLICIT;
    opts.load_models = load;
    opts.n_load_models = 1;
    assert_int_equal(bs_repository_init(&fx->repo, &fx->loop, &fx->be, &opts, &err), BS_ENOTFOUND);
    assert_non_null(strstr(err.msg, "--load-model nope"));
}

/* Explicit control: the state machine of load, reload, failed reload and
 * unload, with references held by requests. */
static void test_explicit_control(void **state)
{
    struct fixture *fx = *state;
    char target[512];
    snprintf(target, sizeof(target), "%s/%s", golden, GOOD_CASE);
    make_link(fx->root, "good", target);
    make_link(fx->root, "other", target);
    make_versioned(fx->root, "flip", 1, NULL);
    const char *dirs[] = {fx->root}, *load[] = {"good", "flip"};
    struct bs_repo_options opts = {.dirs = dirs,
                                   .n_dirs = 1,
                                   .control = BS_REPO_CONTROL_EXPLICIT,
                                   .load_models = load,
                                   .n_load_models = 2};
    opts.defaults.max_batch_size = 1;
    opts.defaults.max_queue_size = 16;
    struct bs_err err = {0};
    struct answer a = {0}, b = {0};
    assert_int_equal(bs_repository_init(&fx->repo, &fx->loop, &fx->be, &opts, &err), 0);
    bs_repository_t *repo = fx->repo;
    freed = 0;
    bs_repository_set_free_hook(repo, on_freed, NULL);
    expect_model(repo, "good", NULL);
    const struct bs_repo_model *other = bs_repository_find(repo, "other");
    assert_non_null(other); /* listed, not loaded */
    assert_true(other->unloaded);
    assert_null(other->model);

    /* unknown model, bad name */
    assert_int_equal(bs_repository_load(repo, "nope", on_answer, &a, &err), 0);
    assert_int_equal(bs_repository_load(repo, "../etc", on_answer, &b, &err), BS_EINVAL);
    assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(a.rc, BS_ENOTFOUND);
    assert_non_null(strstr(a.msg, "no model \"nope\" in the model repository folders"));
    assert_null(bs_repository_find(repo, "nope"));

    /* load; two loads of one model run one after the other */
    memset(&a, 0, sizeof(a));
    assert_int_equal(bs_repository_load(repo, "other", on_answer, &a, &err), 0);
    assert_int_equal(bs_repository_load(repo, "other", on_answer, &b, &err), 0);
    assert_int_equal(a.calls, 0); /* never inside the call */
    assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(a.calls, 1);
    assert_int_equal(b.calls, 1);
    assert_int_equal(a.rc, 0);
    assert_int_equal(b.rc, 0);
    expect_model(repo, "other", NULL);
    assert_int_equal(freed, 1); /* the first load's entry, replaced by the second */

    /* reload while a request holds the old entry: it is freed only when released */
    struct bs_repo_model *old = bs_repository_find(repo, "good");
    bs_repository_ref(repo, old);
    memset(&a, 0, sizeof(a));
    freed = 0;
    assert_int_equal(bs_repository_load(repo, "good", on_answer, &a, &err), 0);
    assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(a.rc, 0);
    assert_ptr_not_equal(bs_repository_find(repo, "good"), old);
    assert_true(old->retired);
    assert_int_equal(freed, 0);
    bs_repository_unref(repo, old);
    assert_int_equal(freed, 1);
    assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);

    /* a failed reload keeps the old version serving, and says why */
    make_dir(fx->root, "flip/2");
    write_text(fx->root, "flip/2/config.json", broken_config);
    memset(&a, 0, sizeof(a));
    assert_int_equal(bs_repository_load(repo, "flip", on_answer, &a, &err), 0);
    assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(a.rc, BS_EINVAL);
    assert_non_null(strstr(a.msg, "failed to load model \"flip\": flip/2/config.json: "));
    assert_null(strstr(a.msg, fx->root));
    assert_int_equal(bs_repository_find(repo, "flip")->version, 1);
    assert_non_null(bs_repository_find(repo, "flip")->model);

    /* unload waits for the request that holds the entry */
    old = bs_repository_find(repo, "good");
    bs_repository_ref(repo, old);
    memset(&a, 0, sizeof(a));
    assert_int_equal(bs_repository_unload(repo, "good", on_answer, &a, &err), 0);
    for (int i = 0; i < 20; i++)
        uv_run(&fx->loop, UV_RUN_NOWAIT);
    assert_int_equal(a.calls, 0);
    assert_true(bs_repository_find(repo, "good")->unloaded); /* out of routing already */
    struct bs_repo_row rows[32];
    int n = bs_repository_index(repo, rows, 32);
    bool unloading = false;
    for (int i = 0; i < n; i++)
        unloading |= strcmp(rows[i].name, "good") == 0 && strcmp(rows[i].state, "UNLOADING") == 0;
    assert_true(unloading);
    bs_repository_unref(repo, old);
    assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(a.calls, 1);
    assert_int_equal(a.rc, 0);
    n = bs_repository_index(repo, rows, 32);
    for (int i = 0; i < n; i++)
        if (strcmp(rows[i].name, "good") == 0) {
            assert_string_equal(rows[i].state, "UNAVAILABLE");
            assert_string_equal(rows[i].reason, "unloaded");
        }
    memset(&a, 0, sizeof(a));
    assert_int_equal(bs_repository_unload(repo, "nope", on_answer, &a, &err), 0);
    assert_int_equal(uv_run(&fx->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(a.rc, BS_ENOTFOUND);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s GOLDEN_DIR\n", argv[0]);
        return 2;
    }
    golden = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_hostile_entries, setup, teardown),
        cmocka_unit_test_setup_teardown(test_relative_root, setup, teardown),
        cmocka_unit_test_setup_teardown(test_versions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_control_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_explicit_control, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
