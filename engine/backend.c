/* Backend selection: the CPU backend is linked in; the CUDA backend is a
 * module (libbs_cuda.so) loaded with dlopen on demand, so one binary runs
 * where the CUDA libraries are missing and falls back to the CPU there.
 *
 * Threads: module_lock guards the module handle; a loaded module stays loaded
 * for the life of the process (CUDA libraries do not unload cleanly). */
#include "backend.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static pthread_mutex_t module_lock = PTHREAD_MUTEX_INITIALIZER;
static const struct bs_backend_module *module;

/* Directory of the running executable into dir (no trailing slash). */
static int exe_dir(char *dir, size_t size)
{
    ssize_t n = readlink("/proc/self/exe", dir, size - 1);
    if (n <= 0)
        return -1;
    dir[n] = '\0';
    char *slash = strrchr(dir, '/');
    if (slash == NULL)
        return -1;
    *slash = '\0';
    return 0;
}

/* dlopen path; on failure append dlerror's reason to why. */
static void *try_open(const char *path, char *why, size_t size)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        size_t used = strlen(why);
        snprintf(why + used, size - used, "%s%s", used ? "; " : "", dlerror());
    }
    return h;
}

/* The module's description, loading it on first use: BS_CUDA_MODULE, then
 * the executable's directory, then ../lib/blockserve relative to it. */
static const struct bs_backend_module *load_module(struct bs_err *err)
{
    char why[1024] = "", dir[PATH_MAX], path[PATH_MAX + 64];
    void *h = NULL;
    bs_backend_module_fn fn = NULL;
    pthread_mutex_lock(&module_lock);
    const struct bs_backend_module *mod = module;
    if (mod != NULL)
        goto done;
    const char *env = getenv("BS_CUDA_MODULE");
    if (env != NULL && env[0] != '\0') {
        h = try_open(env, why, sizeof(why));
    } else if (exe_dir(dir, sizeof(dir)) == 0) {
        snprintf(path, sizeof(path), "%s/%s", dir, BS_CUDA_MODULE_FILE);
        if ((h = try_open(path, why, sizeof(why))) == NULL) {
            snprintf(path, sizeof(path), "%s/../lib/blockserve/%s", dir, BS_CUDA_MODULE_FILE);
            h = try_open(path, why, sizeof(why));
        }
    } else {
        snprintf(why, sizeof(why), "cannot read /proc/self/exe");
    }
    if (h == NULL) {
        bs_err_set(err, BS_EUNSUPP, "CUDA backend module not available (%s)", why);
        goto done;
    }
    *(void **)&fn = dlsym(h, BS_CUDA_MODULE_ENTRY);
    if (fn == NULL || (mod = fn()) == NULL) {
        bs_err_set(err, BS_EUNSUPP, "CUDA backend module has no %s", BS_CUDA_MODULE_ENTRY);
        dlclose(h);
        goto done;
    }
    module = mod;
done:
    pthread_mutex_unlock(&module_lock);
    return mod;
}

/* The loaded module when it was built for this engine's ABI, else NULL and a
 * message in err. abi is the one field every ABI keeps in place. */
static const struct bs_backend_module *usable_module(struct bs_err *err)
{
    const struct bs_backend_module *mod = load_module(err);
    if (mod != NULL && mod->abi != BS_BACKEND_ABI) {
        bs_err_set(err, BS_EUNSUPP, "CUDA module built for backend ABI %d, engine has %d", mod->abi,
                   BS_BACKEND_ABI);
        return NULL;
    }
    return mod;
}

int bs_compute_dtype_parse(const char *name, enum bs_dtype *dtype, struct bs_err *err)
{
    static const struct {
        const char *name;
        enum bs_dtype type;
    } names[] = {{"fp32", BS_TYPE_F32}, {"bf16", BS_TYPE_BF16}, {"fp16", BS_TYPE_F16}};
    for (size_t i = 0; name != NULL && i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(name, names[i].name) == 0) {
            *dtype = names[i].type;
            return 0;
        }
    return bs_err_set(err, BS_EINVAL, "unknown dtype \"%s\" (expected fp32, bf16 or fp16)",
                      name ? name : "(null)");
}

const char *bs_compute_dtype_name(enum bs_dtype dtype)
{
    return dtype == BS_TYPE_F32    ? "fp32"
           : dtype == BS_TYPE_BF16 ? "bf16"
           : dtype == BS_TYPE_F16  ? "fp16"
                                   : "?";
}

/* The CPU backend computing in dtype, with a note of what was chosen; why,
 * when set, says why the GPU was not used. */
static int cpu_init(struct bs_backend *be, const struct bs_backend_opts *o, enum bs_dtype dtype,
                    const char *why, struct bs_err *err)
{
    int rc;
    if ((rc = bs_backend_cpu_init_dtype(be, o->n_threads, dtype, err)) != 0)
        return rc;
    char note[sizeof(err->msg)];
    snprintf(note, sizeof(note), "%s", err->msg);
    if (why != NULL)
        return bs_err_set(err, 0, "cpu backend, %s%s%s (auto: GPU not used: %.300s)",
                          bs_compute_dtype_name(dtype), note[0] ? "; " : "", note, why);
    return bs_err_set(err, 0, "cpu backend, %s%s%s", bs_compute_dtype_name(dtype),
                      note[0] ? "; " : "", note);
}

static int cuda_init(struct bs_backend *be, const struct bs_backend_opts *o, enum bs_dtype dtype,
                     struct bs_err *err)
{
    const struct bs_backend_module *mod = usable_module(err);
    if (mod == NULL)
        return err->code;
    memset(be, 0, sizeof(*be));
    int rc = mod->init(be, o, err);
    if (rc != 0)
        memset(be, 0, sizeof(*be));
    else
        be->dtype = dtype;
    return rc;
}

int bs_backend_init_opts(struct bs_backend *be, const struct bs_backend_opts *o, struct bs_err *err)
{
    const char *device = o->device ? o->device : "auto";
    int rc;
    /* NULL dtype: each device's default (cpu fp32, cuda bf16) */
    enum bs_dtype dtype = BS_TYPE_COUNT, cpu_dtype, cuda_dtype;
    memset(be, 0, sizeof(*be));
    if (o->dtype != NULL && (rc = bs_compute_dtype_parse(o->dtype, &dtype, err)) != 0)
        return rc;
    const char *acts = o->activations ? o->activations : "auto";
    if (strcmp(acts, "auto") != 0 && strcmp(acts, "fp32") != 0 && strcmp(acts, "compute") != 0)
        return bs_err_set(err, BS_EINVAL,
                          "unknown activation dtype \"%s\" (expected auto, fp32 or compute)", acts);
    const char *graphs = o->graphs ? o->graphs : "auto";
    if (strcmp(graphs, "auto") != 0 && strcmp(graphs, "on") != 0 && strcmp(graphs, "off") != 0 &&
        strcmp(graphs, "emulate") != 0)
        return bs_err_set(err, BS_EINVAL,
                          "unknown graphs mode \"%s\" (expected auto, on, off or emulate)", graphs);
    cpu_dtype = dtype == BS_TYPE_COUNT ? BS_TYPE_F32 : dtype;
    cuda_dtype = dtype == BS_TYPE_COUNT ? BS_TYPE_BF16 : dtype;
    if (strcmp(device, "cpu") == 0) {
        rc = cpu_init(be, o, cpu_dtype, NULL, err);
    } else if (strcmp(device, "cuda") == 0) {
        if ((rc = cuda_init(be, o, cuda_dtype, err)) != 0)
            return bs_err_wrap(err, "--device cuda");
    } else if (strcmp(device, "auto") != 0) {
        return bs_err_set(err, BS_EINVAL, "unknown device \"%s\" (expected auto, cpu or cuda)",
                          device);
    } else if ((rc = cuda_init(be, o, cuda_dtype, err)) != 0) {
        char why[sizeof(err->msg)];
        snprintf(why, sizeof(why), "%s", err->msg);
        if ((rc = cpu_init(be, o, cpu_dtype, why, err)) != 0)
            return bs_err_wrap(err, "--device auto: GPU not used (%.200s)", why);
    }
    if (rc != 0)
        return rc;
    /* auto: narrow activations where the backend computes off the host */
    be->act_f32 = strcmp(acts, "fp32") == 0 || (strcmp(acts, "auto") == 0 && be->iface->host_memory);
    static atomic_uint_least64_t serials;
    be->serial = atomic_fetch_add(&serials, 1) + 1;
    bool has_graphs = be->iface->graph_begin != NULL;
    if (strcmp(graphs, "emulate") == 0) {
        be->graphs = BS_GRAPHS_EMULATE;
    } else if (strcmp(graphs, "off") == 0 || (strcmp(graphs, "auto") == 0 && !has_graphs)) {
        be->graphs = BS_GRAPHS_OFF;
    } else if (has_graphs) {
        be->graphs = BS_GRAPHS_ON;
    } else {
        const char *name = be->iface->name;
        bs_backend_free(be);
        return bs_err_set(err, BS_EUNSUPP,
                          "--graphs on: the %s backend has no launch graphs (off, or emulate to "
                          "check the graph logic without them)",
                          name);
    }
    return 0;
}

int bs_backend_init(struct bs_backend *be, const char *device, int n_threads, struct bs_err *err)
{
    struct bs_backend_opts o = {.device = device, .n_threads = n_threads};
    return bs_backend_init_opts(be, &o, err);
}

int bs_backend_memory_info(const struct bs_backend *be, struct bs_backend_memory *mem,
                           struct bs_err *err)
{
    memset(mem, 0, sizeof(*mem));
    if (be == NULL || be->iface == NULL || be->iface->memory_info == NULL)
        return bs_err_set(err, BS_EUNSUPP, "the backend reports no device memory");
    return be->iface->memory_info(be->ctx, mem, err);
}

void *bs_backend_get_proc_address(const struct bs_backend *be, const char *name)
{
    if (be == NULL || be->iface == NULL || be->iface->get_proc_address == NULL || name == NULL)
        return NULL;
    return be->iface->get_proc_address(name);
}

void *bs_backend_module_get_proc_address(const char *device, const char *name, struct bs_err *err)
{
    if (device == NULL || strcmp(device, "cuda") != 0) {
        bs_err_set(err, BS_EINVAL, "no backend module for device \"%s\" (only cuda has one)",
                   device ? device : "(null)");
        return NULL;
    }
    const struct bs_backend_module *mod = usable_module(err);
    if (mod == NULL)
        return NULL;
    void *fn = mod->get_proc_address && name ? mod->get_proc_address(name) : NULL;
    if (fn == NULL)
        bs_err_set(err, BS_ENOTFOUND, "the %s backend module has no entry point \"%s\"", mod->name,
                   name ? name : "(null)");
    return fn;
}

void bs_backend_free(struct bs_backend *be)
{
    if (be == NULL || be->iface == NULL)
        return;
    be->iface->free(be->ctx);
    memset(be, 0, sizeof(*be));
}
