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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
