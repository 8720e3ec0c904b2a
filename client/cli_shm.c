/* The CLI's shared memory region (see cli_shm.h). */
#include "cli_shm.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SHM_ALIGN 64

static size_t align_up(size_t n)
{
    return (n + SHM_ALIGN - 1) / SHM_ALIGN * SHM_ALIGN;
}

size_t cli_shm_output_bytes(const Inference__ModelMetadataResponse__TensorMetadata *o,
                            const struct cli_inputs *in)
{
    size_t n = bs_ct_datatype_size(o->datatype);
    if (!strcmp(o->datatype, "FP16") || !strcmp(o->datatype, "BF16"))
        n = 4; /* a request may ask for FP32 (--output-dtype) */
    for (size_t k = 0; k < o->n_shape; k++) {
        int64_t d = o->shape[k];
        for (int i = 0; d < 0 && i < in->n; i++)
            if ((size_t)in->t[i].n_dims == o->n_shape)
                d = in->t[i].shape[k];
        if (d < 0 && k == 0 && in->n > 0 && in->t[0].n_dims > 0)
            d = in->t[0].shape[0]; /* the batch dim */
        n *= (size_t)(d < 0 ? 1 : d);
    }
    return n;
}

/* Interrupted (^C, SIGTERM): remove the object, then die of the signal as
 * before. One region at a time has the handler (the CLI makes one). */
static char signal_key[64];

static void on_signal(int sig)
{
    shm_unlink(signal_key); /* unlink(2) on /dev/shm: async-signal-safe in practice */
    signal(sig, SIG_DFL);
    raise(sig);
}

static void catch_signals(const char *key, bool on)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on ? on_signal : SIG_DFL;
    if (on)
        snprintf(signal_key, sizeof(signal_key), "%s", key);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

static int fail_errno(struct bs_client_err *err, const char *what, const char *key)
{
    err->code = BS_EIO;
    err->grpc_status = -1;
    snprintf(err->msg, sizeof(err->msg), "shared memory %s: %s: %s", key, what, strerror(errno));
    return BS_EIO;
}

static int layout(struct cli_shm *s, const Inference__ModelMetadataResponse *m,
                  const struct cli_inputs *in, struct bs_client_err *err)
{
    size_t off = 0;
    for (int i = 0; i < in->n; i++) {
        s->in_off[i] = off;
        off += align_up(in->t[i].nbytes);
    }
    if (m->n_outputs > CLI_SHM_MAX_OUTPUTS) {
        err->code = BS_EINVAL;
        snprintf(err->msg, sizeof(err->msg), "--shm: the model has %zu outputs (at most %d)",
                 m->n_outputs, CLI_SHM_MAX_OUTPUTS);
        return BS_EINVAL;
    }
    for (size_t k = 0; k < m->n_outputs; k++) {
        s->out_names[k] = m->outputs[k]->name;
        s->out_off[k] = off;
        s->out_size[k] = cli_shm_output_bytes(m->outputs[k], in);
        off += align_up(s->out_size[k]);
    }
    s->n_out = (int)m->n_outputs;
    s->slot_size = off ? off : SHM_ALIGN;
    return 0;
}

static int do_register(struct cli_shm *s, const struct cli_conn *conn, struct bs_client_err *err)
{
    int rc = conn->http ? bs_http_shm_register(conn->http, s->name, s->key, 0, s->size, err)
                        : bs_client_shm_register(conn->grpc, s->name, s->key, 0, s->size, err);
    s->registered = rc == 0;
    return rc;
}

int cli_shm_open(struct cli_shm *s, const struct cli_conn *conn,
                 const Inference__ModelMetadataResponse *m, const struct cli_inputs *in, int slots,
                 struct bs_client_err *err)
{
    static atomic_int serial;
    memset(s, 0, sizeof(*s));
    s->fd = -1;
    int k = atomic_fetch_add(&serial, 1);
    snprintf(s->key, sizeof(s->key), "/bs-cli-%ld-%d", (long)getpid(), k);
    snprintf(s->name, sizeof(s->name), "bs-cli-%ld-%d", (long)getpid(), k);
    int rc = layout(s, m, in, err);
    if (rc != 0)
        return rc;
    s->size = s->slot_size * (size_t)slots;
    s->fd = shm_open(s->key, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (s->fd < 0)
        return fail_errno(err, "shm_open", s->key);
    catch_signals(s->key, true);
    if (ftruncate(s->fd, (off_t)s->size) != 0)
        return fail_errno(err, "ftruncate", s->key);
    void *p = mmap(NULL, s->size, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
    if (p == MAP_FAILED)
        return fail_errno(err, "mmap", s->key);
    s->base = p;
    for (int slot = 0; slot < slots; slot++)
        for (int i = 0; i < in->n; i++)
            if (in->t[i].nbytes)
                memcpy(s->base + (size_t)slot * s->slot_size + s->in_off[i], in->t[i].data,
                       in->t[i].nbytes);
    return do_register(s, conn, err);
}

void cli_shm_refs(const struct cli_shm *s, const struct cli_inputs *in, int slot,
                  struct bs_client_shm_ref *in_refs, struct bs_client_shm_ref *out_refs)
{
    size_t base = (size_t)slot * s->slot_size;
    for (int i = 0; i < in->n; i++)
        in_refs[i] = (struct bs_client_shm_ref){s->name, base + s->in_off[i], in->t[i].nbytes};
    for (int k = 0; k < s->n_out; k++)
        out_refs[k] = (struct bs_client_shm_ref){s->name, base + s->out_off[k], s->out_size[k]};
}

void cli_shm_close(struct cli_shm *s, const struct cli_conn *conn)
{
    struct bs_client_err e = {0};
    if (s->registered) {
        if (conn->http)
            bs_http_shm_unregister(conn->http, s->name, &e);
        else
            bs_client_shm_unregister(conn->grpc, s->name, &e);
        s->registered = false;
    }
    if (s->base != NULL)
        munmap(s->base, s->size);
    s->base = NULL;
    if (s->fd >= 0) {
        close(s->fd);
        shm_unlink(s->key);
        catch_signals(s->key, false);
    }
    s->fd = -1;
}
