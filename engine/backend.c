#include "backend.h"

#include <string.h>

int bs_backend_init(struct bs_backend *be, const char *device, int n_threads, struct bs_err *err)
{
    memset(be, 0, sizeof(*be));
    if (device == NULL || strcmp(device, "auto") == 0 || strcmp(device, "cpu") == 0)
        return bs_backend_cpu_init(be, n_threads, err);
    if (strcmp(device, "cuda") == 0)
        return bs_err_set(err, BS_EUNSUPP, "--device cuda: this build has no CUDA backend "
                                           "(use --device cpu or auto)");
    return bs_err_set(err, BS_EINVAL, "unknown device \"%s\" (expected auto, cpu or cuda)", device);
}

int bs_backend_memory_info(const struct bs_backend *be, struct bs_backend_memory *mem,
                           struct bs_err *err)
{
    memset(mem, 0, sizeof(*mem));
    if (be == NULL || be->iface == NULL || be->iface->memory_info == NULL)
        return bs_err_set(err, BS_EUNSUPP, "the backend reports no device memory");
    return be->iface->memory_info(be->ctx, mem, err);
}

void bs_backend_free(struct bs_backend *be)
{
    if (be == NULL || be->iface == NULL)
        return;
    be->iface->free(be->ctx);
    memset(be, 0, sizeof(*be));
}
