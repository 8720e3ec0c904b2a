/* The CUDA backend: device memory, a stream, a cuBLAS handle and pinned
 * staging per host thread (cuda_common.cuh says who owns what), GEMMs in
 * linear_cuda.cu (cuBLASLt with fused epilogues, cublasGemmEx where it
 * declines), weight copies in the compute dtype made
 * once at load (weights_ready), and the kernels of ops_cuda.cu and
 * attn_cuda.cu. Built as a module (libbs_cuda.so) that engine/backend.c
 * loads with dlopen; bs_cuda_backend_module is its one exported symbol.
 *
 * Errors: every CUDA and cuBLAS call is checked; a failure returns
 * BS_EINTERNAL with the call and CUDA's message, so the batch that hit it
 * fails and the server goes on. Kernel faults surface at the next
 * synchronising call of the thread that queued them (copy_out), which
 * reports them the same way; so does an operand that overflowed the compute
 * dtype (overflow.cuh). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_common.cuh"
#include "overflow.cuh"
#include "xfer.h"

#define PINNED_BYTES  BS_CUDA_XFER_CHUNK /* each of copy_in / copy_out's two staging buffers */
#define BLAS_WS_BYTES BS_CUDA_BLAS_WS_BYTES
#define SCRATCH_ALIGN 256
#define UP_MIN_BYTES  (16u << 10) /* a slot of the upload ring at least: 680 ragged samples */

/* ---- errors ------------------------------------------------------------ */

int bs__cuda_check(cudaError_t e, const char *op, const char *what, struct bs_err *err)
{
    if (e == cudaSuccess)
        return 0;
    cudaGetLastError(); /* a non-sticky error must not fail the next launch check too */
    return bs_err_set(err, BS_EINTERNAL, "cuda %s: %s: %s (%s)", op, what, cudaGetErrorString(e),
                      cudaGetErrorName(e));
}

int bs__cuda_check_launch(const char *op, struct bs_err *err)
{
    return bs__cuda_check(cudaGetLastError(), op, "kernel launch", err);
}

int bs__cuda_refuse_capture(const char *what, const char *why, struct bs_err *err)
{
    return bs_err_set(err, BS_EUNSUPP, "cuda %s cannot run while a graph is being captured (%s)",
                      what, why);
}

static int blas_check(cublasStatus_t s, const char *op, const char *what, struct bs_err *err)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return 0;
    return bs_err_set(err, BS_EINTERNAL, "cuda %s: %s: %s (%s)", op, what, cublasGetStatusString(s),
                      cublasGetStatusName(s));
}

/* ---- per-thread state ---------------------------------------------------- */

/* The upload ring's memory and events (the stream has been drained). */
static void upload_free(struct bs__cuda_thread *t)
{
    for (int i = 0; i < BS_CUDA_UP_SLOTS; i++)
        if (t->up_done[i]) {
            cudaEventDestroy(t->up_done[i]);
            t->up_done[i] = NULL;
        }
    if (t->up_host)
        cudaFreeHost(t->up_host);
    if (t->up_dev)
        cudaFree(t->up_dev);
    t->up_host = t->up_dev = NULL;
    t->up_bytes = 0;
}

/* An event into *e (timing or not), left NULL on failure. */
static int event_make(cudaEvent_t *e, bool timing, const char *op, struct bs_err *err)
{
    int rc = bs__cuda_check(
        cudaEventCreateWithFlags(e, timing ? cudaEventDefault : cudaEventDisableTiming), op,
        "cudaEventCreate", err);
    if (rc != 0)
        *e = NULL;
    return rc;
}

/* The staging buffers' and the timer's events (the stream has been drained). */
static void events_free(struct bs__cuda_thread *t)
{
    cudaEvent_t *all[] = {&t->xfer_done[0], &t->xfer_done[1], &t->tm_start,
                          &t->tm_stop,      &t->tm_copy0,     &t->tm_copy1};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        if (*all[i]) {
            cudaEventDestroy(*all[i]);
            *all[i] = NULL;
        }
}

static void graphs_free(struct bs__cuda *c, struct bs__cuda_thread *t);

static void thread_free(struct bs__cuda *c, struct bs__cuda_thread *t)
{
    graphs_free(c, t); /* a capture in progress ended, every graph released */
    if (t->stream)
        cudaStreamSynchronize(t->stream);
    upload_free(t);
    events_free(t);
    bs__cuda_lt_free(t);
    if (t->blas)
        cublasDestroy(t->blas);
    if (t->blas_ws)
        cudaFree(t->blas_ws);
    if (t->scratch)
        cudaFree(t->scratch);
    if (t->pinned)
        cudaFreeHost(t->pinned);
    if (c->bare)
        free(t->overflow);
    else if (t->overflow)
        cudaFreeHost(t->overflow);
    if (t->stream)
        cudaStreamDestroy(t->stream);
    free(t);
}

/* A device allocation into *p, left NULL on failure. */
static int dev_alloc(void **p, size_t bytes, const char *op, struct bs_err *err)
{
    int rc = bs__cuda_check(cudaMalloc(p, bytes), op, "cudaMalloc", err);
    if (rc != 0)
        *p = NULL;
    return rc;
}

/* t's resources; on failure what was made stays in t for thread_free. */
static int thread_make(struct bs__cuda *c, struct bs__cuda_thread *t, const char *op,
                       struct bs_err *err)
{
    int rc;
    if (c->bare) { /* no device: a flag in plain memory, for the test hooks */
        t->overflow = t->overflow_dev = (int *)calloc(1, sizeof(int));
        return t->overflow ? 0 : bs_err_set(err, BS_ENOMEM, "cuda %s: out of memory", op);
    }
    if ((rc = bs__cuda_check(cudaStreamCreateWithFlags(&t->stream, cudaStreamNonBlocking), op,
                             "cudaStreamCreate", err)) != 0) {
        t->stream = NULL;
        return rc;
    }
    cublasStatus_t s = cublasCreate(&t->blas);
    if (s != CUBLAS_STATUS_SUCCESS) {
        t->blas = NULL;
        return blas_check(s, op, "cublasCreate", err);
    }
    TRY_RC(rc, blas_check(cublasSetStream(t->blas, t->stream), op, "cublasSetStream", err));
    TRY_RC(rc, dev_alloc(&t->blas_ws, BLAS_WS_BYTES, op, err));
    TRY_RC(rc, blas_check(cublasSetWorkspace(t->blas, t->blas_ws, BLAS_WS_BYTES), op,
                          "cublasSetWorkspace", err));
    if ((rc = bs__cuda_check(cudaMallocHost(&t->pinned, 2 * (size_t)PINNED_BYTES), op,
                             "cudaMallocHost", err)) != 0) {
        t->pinned = NULL;
        return rc;
    }
    t->pinned_bytes = PINNED_BYTES;
    TRY_RC(rc, event_make(&t->xfer_done[0], false, op, err));
    TRY_RC(rc, event_make(&t->xfer_done[1], false, op, err));
    if ((rc = bs__cuda_check(cudaHostAlloc((void **)&t->overflow, sizeof(int), cudaHostAllocMapped),
                             op, "cudaHostAlloc", err)) != 0) {
        t->overflow = NULL;
        return rc;
    }
    *t->overflow = 0;
    return bs__cuda_check(cudaHostGetDevicePointer((void **)&t->overflow_dev, t->overflow, 0), op,
                          "cudaHostGetDevicePointer", err);
}

struct bs__cuda_thread *bs__cuda_thread_get(struct bs__cuda *c, const char *op, struct bs_err *err)
{
    struct bs__cuda_thread *t = (struct bs__cuda_thread *)pthread_getspecific(c->key);
    if (t != NULL && t->cap != NULL)
        return t; /* capturing: the device was set at graph_begin; no call that the capture
                     might not allow */
    if (!c->bare && bs__cuda_check(cudaSetDevice(c->device), op, "cudaSetDevice", err))
        return NULL; /* the current device is per host thread */
    if (t != NULL)
        return t;
    t = (struct bs__cuda_thread *)calloc(1, sizeof(*t));
    if (t == NULL) {
        bs_err_set(err, BS_ENOMEM, "cuda %s: out of memory", op);
        return NULL;
    }
    t->c = c;
    int rc = thread_make(c, t, op, err);
    if (rc == 0 && pthread_setspecific(c->key, t) != 0)
        rc = bs_err_set(err, BS_ENOMEM, "cuda %s: pthread_setspecific failed", op);
    if (rc != 0) {
        thread_free(c, t);
        return NULL;
    }
    bs__cuda_lock l(c);
    t->next = c->threads;
    c->threads = t;
    c->n_threads++;
    return t;
}

/* The thread's overflow flag, taken after the thread waited for its stream
 * (rc: how the wait went) and cleared, so that it fails only this batch:
 * rc when the wait failed (the batch fails with that), else the overflow's
 * error (overflow.cuh) when the flag was set, else 0. */
static int take_overflow(const struct bs__cuda *c, struct bs__cuda_thread *t, int rc,
                         struct bs_err *err)
{
    int flags = *(volatile int *)t->overflow;
    *(volatile int *)t->overflow = 0;
    return rc != 0 ? rc : bs__cuda_overflow_error(flags, c->dtype, err);
}

/* ---- memory ------------------------------------------------------------ */

void *bs__cuda_scratch(struct bs__cuda_thread *t, size_t bytes, struct bs_err *err)
{
    bytes = (bytes + SCRATCH_ALIGN - 1) & ~(size_t)(SCRATCH_ALIGN - 1);
    if (bytes <= t->scratch_bytes)
        return t->scratch;
    if (bs__cuda_capturing(t)) {
        char why[128];
        snprintf(why, sizeof(why), "growing the thread's scratch from %zu to %zu bytes",
                 t->scratch_bytes, bytes);
        bs__cuda_refuse_capture("scratch", why, err);
        return NULL;
    }
    /* Queued kernels may still read the old buffer: drain the stream first. */
    if (bs__cuda_check(cudaStreamSynchronize(t->stream), "scratch", "cudaStreamSynchronize", err))
        return NULL;
    bs__cuda_epoch_bump(t->c); /* graphs captured with the old buffer must not run */
    cudaFree(t->scratch);
    t->scratch = NULL;
    t->scratch_bytes = 0;
    if (dev_alloc(&t->scratch, bytes, "scratch", err) != 0)
        return NULL;
    t->scratch_bytes = bytes;
    return t->scratch;
}

/* The upload ring with slots of at least bytes: the stream drained first
 * when there is one (its copies and kernels may use the old one). */
static int upload_grow(struct bs__cuda_thread *t, size_t bytes, const char *op, struct bs_err *err)
{
    int rc;
    size_t slot = UP_MIN_BYTES;
    while (slot < bytes)
        slot *= 2;
    if (t->up_host != NULL)
        TRY_RC(rc, bs__cuda_check(cudaStreamSynchronize(t->stream), op,
                                  "cudaStreamSynchronize (this or an earlier op failed)", err));
    bs__cuda_epoch_bump(t->c);
    upload_free(t);
    if ((rc = bs__cuda_check(cudaMallocHost(&t->up_host, slot * BS_CUDA_UP_SLOTS), op,
                             "cudaMallocHost", err)) != 0) {
        t->up_host = NULL;
        return rc;
    }
    if ((rc = dev_alloc(&t->up_dev, slot, op, err)) != 0) {
        upload_free(t);
        return rc;
    }
    for (int i = 0; i < BS_CUDA_UP_SLOTS; i++)
        if ((rc = bs__cuda_check(cudaEventCreateWithFlags(&t->up_done[i], cudaEventDisableTiming),
                                 op, "cudaEventCreate", err)) != 0) {
            t->up_done[i] = NULL;
            upload_free(t);
            return rc;
        }
    t->up_bytes = slot;
    t->up_next = 0;
    return 0;
}

void *bs__cuda_upload(struct bs__cuda_thread *t, int n, const void *const *srcs,
                      const size_t *sizes, const char *op, struct bs_err *err)
{
    size_t bytes = 0;
    if (bs__cuda_capturing(t)) {
        bs__cuda_refuse_capture(op,
                                "the upload ring copies host data that a graph would bake "
                                "in, and waits for its slots",
                                err);
        return NULL;
    }
    for (int i = 0; i < n; i++)
        bytes += sizes[i];
    if (bytes > t->up_bytes && upload_grow(t, bytes, op, err) != 0)
        return NULL;
    int slot = t->up_next;
    /* the copy from this slot BS_CUDA_UP_SLOTS uploads ago has run (at once
     * if it was never recorded) */
    if (bs__cuda_check(cudaEventSynchronize(t->up_done[slot]), op,
                       "cudaEventSynchronize (this or an earlier op failed)", err))
        return NULL;
    char *host = (char *)t->up_host + (size_t)slot * t->up_bytes;
    for (size_t i = 0, at = 0; i < (size_t)n; at += sizes[i++])
        memcpy(host + at, srcs[i], sizes[i]);
    if (bs__cuda_check(cudaMemcpyAsync(t->up_dev, host, bytes, cudaMemcpyHostToDevice, t->stream),
                       op, "cudaMemcpyAsync", err) ||
        bs__cuda_check(cudaEventRecord(t->up_done[slot], t->stream), op, "cudaEventRecord", err))
        return NULL;
    t->up_next = (slot + 1) % BS_CUDA_UP_SLOTS;
    return t->up_dev;
}

/* The calling thread's state when it is capturing a graph, else NULL
 * (made by no call: a thread without a state is not capturing). */
static struct bs__cuda_thread *capturing_thread(struct bs__cuda *c)
{
    struct bs__cuda_thread *t = (struct bs__cuda_thread *)pthread_getspecific(c->key);
    return t != NULL && t->cap != NULL ? t : NULL;
}

/* NULL on a thread that is capturing (cudaMalloc is not allowed there). */
static void *cuda_buf_alloc(void *ctx, size_t size)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    void *p = NULL;
    if (capturing_thread(c) != NULL)
        return NULL;
    cudaSetDevice(c->device);
    if (cudaMalloc(&p, size ? size : SCRATCH_ALIGN) != cudaSuccess) {
        cudaGetLastError(); /* clear the (non-sticky) allocation error */
        return NULL;
    }
    return p;
}

/* Removes the shadow of the buffer at base, if any; returns its copy. */
static void *shadow_forget(struct bs__cuda *c, const void *base)
{
    bs__cuda_lock l(c);
    for (int i = 0; i < c->n_shadows; i++) {
        if (c->shadows[i].base != (const char *)base)
            continue;
        void *half = c->shadows[i].half;
        c->shadows[i] = c->shadows[--c->n_shadows];
        return half;
    }
    return NULL;
}

static void buf_free_now(struct bs__cuda *c, void *ptr);

/* On a thread that is capturing, ptr waits in its cap_frees for graph_end;
 * else buf_free_now. */
static void cuda_buf_free(void *ctx, void *ptr)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    if (ptr == NULL)
        return;
    struct bs__cuda_thread *t = capturing_thread(c);
    if (t != NULL) { /* no wait or free while capturing: at graph_end (cap_frees_run) */
        if (t->n_cap_frees == t->cap_frees_max) {
            int m = t->cap_frees_max ? 2 * t->cap_frees_max : 8;
            void **p = (void **)realloc(t->cap_frees, (size_t)m * sizeof(void *));
            if (p == NULL)
                return; /* out of memory: the buffer leaks rather than break the capture */
            t->cap_frees = p;
            t->cap_frees_max = m;
        }
        t->cap_frees[t->n_cap_frees++] = ptr;
        return;
    }
    buf_free_now(c, ptr);
}

/* Any thread's queued work may use ptr (a batcher's arena passes from
 * worker to worker): wait for the whole device, then free it and its copy
 * (buf_free on a thread that is not capturing, or a capture's deferred
 * frees once it ended). */
static void buf_free_now(struct bs__cuda *c, void *ptr)
{
    /* A graph may hold the buffer's weights copy (which linear finds by
     * the buffer's address, not passed by the engine): the epoch moves
     * before it goes. Other buffers are passed to ops by address, which the
     * engine compares before every launch: their frees move nothing, or
     * the block caches that sequences take and give back would drop every
     * graph each time. (The device-wide wait below may break another
     * thread's capture in progress; the engine tries that key again after
     * a while: engine/graph.c, GRAPH_RETRY.) */
    void *half = shadow_forget(c, ptr);
    if (half != NULL)
        bs__cuda_epoch_bump(c);
    if (c->bare) /* a test backend: nothing on a device */
        return;
    cudaSetDevice(c->device);
    cudaDeviceSynchronize();
    if (half != NULL)
        cudaFree(half);
    cudaFree(ptr);
    cudaGetLastError(); /* an error here is reported by the next op that meets it */
}

/* Staging buffer b of t (two of pinned_bytes: xfer.h). */
static char *xfer_buf(struct bs__cuda_thread *t, int b)
{
    return (char *)t->pinned + (size_t)b * t->pinned_bytes;
}

/* One step of xfer.h's schedule for a copy between host and dev. */
static int xfer_step(struct bs__cuda_thread *t, const struct bs__xfer_step *s, char *dev,
                     char *host, bool out, const char *op, struct bs_err *err)
{
    char *b = xfer_buf(t, s->buf);
    int rc = 0;
    switch (s->op) {
    case BS_XFER_WAIT:
        return bs__cuda_check(cudaEventSynchronize(t->xfer_done[s->buf]), op,
                              "cudaEventSynchronize (this or an earlier op failed)", err);
    case BS_XFER_HOST:
        if (out)
            memcpy(host + s->off, b, s->len);
        else
            memcpy(b, host + s->off, s->len);
        return 0;
    case BS_XFER_DMA:
        TRY_RC(rc,
               bs__cuda_check(cudaMemcpyAsync(
                                  out ? b : dev + s->off, out ? dev + s->off : b, s->len,
                                  out ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, t->stream),
                              op, "cudaMemcpyAsync", err));
        return bs__cuda_check(cudaEventRecord(t->xfer_done[s->buf], t->stream), op,
                              "cudaEventRecord", err);
    case BS_XFER_DONE:
        break;
    }
    return 0;
}

/* A copy of size bytes through the two staging buffers, the host's memcpy
 * of one chunk overlapping the DMA of the next (copy_out) or previous
 * (copy_in) one; then the wait for the thread's stream, so that every op
 * it queued before has finished. While the thread's GPU timer runs, the
 * copy's span on the stream is added to it. On failure the stream is
 * drained (best effort), so no DMA still uses the staging on return. */
static int xfer_run(struct bs__cuda_thread *t, char *dev, char *host, size_t size, bool out,
                    const char *op, struct bs_err *err)
{
    bool timed = t->tm_on && size > 0;
    int rc =
        timed ? bs__cuda_check(cudaEventRecord(t->tm_copy0, t->stream), op, "cudaEventRecord", err)
              : 0;
    struct bs__xfer x;
    bs__xfer_init(&x, size, t->pinned_bytes, out);
    for (struct bs__xfer_step s = bs__xfer_next(&x); rc == 0 && s.op != BS_XFER_DONE;
         s = bs__xfer_next(&x))
        rc = xfer_step(t, &s, dev, host, out, op, err);
    if (rc == 0 && timed)
        rc = bs__cuda_check(cudaEventRecord(t->tm_copy1, t->stream), op, "cudaEventRecord", err);
    if (rc == 0)
        rc = bs__cuda_check(cudaStreamSynchronize(t->stream), op,
                            "cudaStreamSynchronize (this or an earlier op failed)", err);
    else {
        cudaStreamSynchronize(t->stream);
        cudaGetLastError();
    }
    float ms = 0;
    if (rc == 0 && timed &&
        (rc = bs__cuda_check(cudaEventElapsedTime(&ms, t->tm_copy0, t->tm_copy1), op,
                             "cudaEventElapsedTime", err)) == 0) {
        t->tm_copy_ms += ms;
        t->tm_copy_bytes += size;
        t->tm_copies++;
    }
    return rc;
}

/* Host to device through the thread's pinned staging (src may be freed on
 * return); waits for every op the thread queued, so an overflow flagged by
 * its earlier ops fails it too. */
static int cuda_copy_in(void *ctx, void *dst, const void *src, size_t size, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "copy_in", err);
    if (t == NULL)
        return err->code;
    if (bs__cuda_capturing(t))
        return bs__cuda_refuse_capture("copy_in", "it waits for the thread's stream", err);
    int rc = xfer_run(t, (char *)dst, (char *)(uintptr_t)src, size, false, "copy_in", err);
    return take_overflow(c, t, rc, err);
}

/* Device to host; waits for every op this thread queued, so their faults
 * and overflows (overflow.cuh) show here. size 0: only that wait. No lock:
 * the stream and the staging are the thread's own. */
static int cuda_copy_out(void *ctx, void *dst, const void *src, size_t size, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "copy_out", err);
    if (t == NULL)
        return err->code;
    if (bs__cuda_capturing(t))
        return bs__cuda_refuse_capture("copy_out", "it waits for the thread's stream", err);
    int rc = xfer_run(t, (char *)(uintptr_t)src, (char *)dst, size, true, "copy_out", err);
    return take_overflow(c, t, rc, err);
}

/* ---- weights in the compute dtype -------------------------------------- */

/* Records half as the copy of [base, base + bytes): a buffer registered
 * again (weights_ready twice) has its entry replaced, and *replaced is the
 * old copy for the caller to free (else NULL). */
static int shadow_register(struct bs__cuda *c, const void *base, size_t bytes, void *half,
                           void **replaced, struct bs_err *err)
{
    bs__cuda_lock l(c);
    *replaced = NULL;
    bs__cuda_epoch_bump(c); /* linear's w now comes from another copy */
    for (int i = 0; i < c->n_shadows; i++)
        if (c->shadows[i].base == (const char *)base) {
            *replaced = c->shadows[i].half;
            c->shadows[i] = {(const char *)base, bytes, half};
            return 0;
        }
    if (c->n_shadows == BS_CUDA_MAX_SHADOWS)
        return bs_err_set(err, BS_ERANGE, "cuda: more than %d models loaded", BS_CUDA_MAX_SHADOWS);
    c->shadows[c->n_shadows++] = {(const char *)base, bytes, half};
    return 0;
}

/* The model's weights converted once; called again for the same buffer, the
 * copy is made anew and replaces the old one (freed), so nothing leaks. A
 * weight beyond the dtype's range fails the load (overflow.cuh). */
static int cuda_weights_ready(void *ctx, void *buf, size_t size, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    if (c->dtype == BS_TYPE_F32 || size < sizeof(float))
        return 0;
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "weights_ready", err);
    if (t == NULL)
        return err->code;
    if (bs__cuda_capturing(t))
        return bs__cuda_refuse_capture("weights_ready",
                                       "it allocates the copy and waits for the stream", err);
    bs__cuda_epoch_bump(c); /* its allocation and wait may break another thread's capture */
    int64_t n = (int64_t)(size / sizeof(float));
    void *half = NULL, *old = NULL;
    if (cudaMalloc(&half, (size_t)n * 2) != cudaSuccess) {
        cudaGetLastError();
        return bs_err_set(err, BS_ENOMEM, "cuda: cannot allocate %zu bytes for %s weights",
                          (size_t)n * 2, bs_dtype_name(c->dtype));
    }
    int rc = bs__cuda_to_half(c, t, half, (const float *)buf, 1, n, n, BS_OVF_WEIGHTS, err);
    if (rc == 0)
        rc = bs__cuda_check(cudaStreamSynchronize(t->stream), "weights_ready",
                            "cudaStreamSynchronize", err);
    rc = take_overflow(c, t, rc, err);
    if (rc == 0)
        rc = shadow_register(c, buf, size, half, &old, err);
    if (rc != 0) {
        cudaFree(half);
        return rc;
    }
    if (old != NULL)
        cudaFree(old); /* this thread's stream is idle; others' linear read buf's copy only
                          while the model serves, and weights are not reloaded then */
    return 0;
}

const void *bs__cuda_shadow_of(struct bs__cuda *c, const void *w)
{
    const char *p = (const char *)w;
    bs__cuda_lock l(c);
    for (int i = 0; i < c->n_shadows; i++) {
        const struct bs__cuda_shadow *s = &c->shadows[i];
        if (p >= s->base && p < s->base + s->bytes && (p - s->base) % sizeof(float) == 0)
            return (const char *)s->half + (p - s->base) / 2;
    }
    return NULL;
}

/* ---- launch graphs (engine/backend.h: graph_*) --------------------------- */

/* A thread captures with cudaStreamBeginCapture on its own stream in
 * cudaStreamCaptureModeThreadLocal (other threads go on as before). What
 * would allocate, free or wait on that thread fails cleanly while it
 * captures (bs__cuda_refuse_capture: BS_EUNSUPP) and the capture goes on:
 * scratch growth, the upload ring, get_rows with host indices, copies,
 * weights_ready, the GPU timer, buf_alloc (NULL); buf_free waits for
 * graph_end. graph_end always ends the capture and clears CUDA's last
 * error, so nothing of a failed capture is reported by a later op.
 *
 * On a test backend (bare) the bookkeeping runs (begin, end without keep,
 * the argument checks) with host memory only; what needs the device
 * (graph_end's instantiation, graph_rows' copy and gather) fails with
 * BS_EINTERNAL, as every valid call does there. */

#define GRAPH_IDX_BYTES ((size_t)BS_CUDA_GRAPH_IDX * sizeof(int64_t))

static void graph_param_free(struct bs__cuda *c, int64_t *host, int64_t *dev)
{
    if (c->bare) {
        free(host);
        return;
    }
    if (host)
        cudaFreeHost(host);
    if (dev)
        cudaFree(dev);
}

/* g's CUDA objects and memory go (its launches waited for first); its
 * param memory becomes t's spare when t has none. g is unlinked already. */
static void graph_release(struct bs__cuda *c, struct bs__cuda_thread *t, struct bs_backend_graph *g)
{
    if (g->done != NULL) {
        if (g->launched)
            cudaEventSynchronize(g->done);
        cudaEventDestroy(g->done);
    }
    if (g->exec != NULL)
        cudaGraphExecDestroy(g->exec);
    if (t->spare_host == NULL) {
        t->spare_host = g->idx_host;
        t->spare_dev = g->idx_dev;
    } else
        graph_param_free(c, g->idx_host, g->idx_dev);
    if (!c->bare)
        cudaGetLastError(); /* a failed wait here is the launch's, reported by the next copy */
    free(g);
}

static void graph_unlink(struct bs__cuda_thread *t, struct bs_backend_graph *g)
{
    if (g->prev)
        g->prev->next = g->next;
    else
        t->graphs = g->next;
    if (g->next)
        g->next->prev = g->prev;
    g->next = g->prev = NULL;
}

/* A graph for t to capture into, with its param memory (t's spare, else
 * new: pinned host and device, or plain host memory on a bare backend). */
static struct bs_backend_graph *graph_new(struct bs__cuda *c, struct bs__cuda_thread *t,
                                          struct bs_err *err)
{
    struct bs_backend_graph *g = (struct bs_backend_graph *)calloc(1, sizeof(*g));
    if (g == NULL) {
        bs_err_set(err, BS_ENOMEM, "cuda graph_begin: out of memory");
        return NULL;
    }
    g->owner = t;
    if (t->spare_host != NULL) {
        g->idx_host = t->spare_host;
        g->idx_dev = t->spare_dev;
        t->spare_host = t->spare_dev = NULL;
        return g;
    }
    int rc = 0;
    if (c->bare) {
        g->idx_host = (int64_t *)calloc(1, GRAPH_IDX_BYTES);
        if (g->idx_host == NULL)
            rc = bs_err_set(err, BS_ENOMEM, "cuda graph_begin: out of memory");
    } else {
        void *h = NULL, *d = NULL;
        rc = bs__cuda_check(cudaMallocHost(&h, GRAPH_IDX_BYTES), "graph_begin", "cudaMallocHost",
                            err);
        g->idx_host = rc == 0 ? (int64_t *)h : NULL;
        if (rc == 0) {
            rc = dev_alloc(&d, GRAPH_IDX_BYTES, "graph_begin", err);
            g->idx_dev = (int64_t *)d;
        }
    }
    if (rc != 0) {
        graph_param_free(c, g->idx_host, g->idx_dev);
        free(g);
        return NULL;
    }
    return g;
}

/* buf_free's calls made while t captured, now that it does not. */
static void cap_frees_run(struct bs__cuda *c, struct bs__cuda_thread *t)
{
    for (int i = 0; i < t->n_cap_frees; i++)
        buf_free_now(c, t->cap_frees[i]);
    t->n_cap_frees = 0;
}

/* Ends t's capture, if any (the graph captured so far is discarded; on a
 * real device cudaStreamEndCapture, whose error, if any, is returned);
 * the pointers buf_free deferred are freed and the graphs freed during
 * the capture released. */
static cudaError_t capture_end(struct bs__cuda *c, struct bs__cuda_thread *t, cudaGraph_t *graph)
{
    cudaError_t e = cudaSuccess;
    *graph = NULL;
    struct bs_backend_graph *g = t->cap;
    if (g == NULL)
        return e;
    if (!c->bare) {
        e = cudaStreamEndCapture(t->stream, graph);
        cudaGetLastError(); /* an invalidated capture leaves its error here: clear it */
        if (e != cudaSuccess)
            *graph = NULL;
    }
    t->cap = NULL;
    cap_frees_run(c, t);
    for (struct bs_backend_graph *d = t->graphs, *next; d != NULL; d = next) {
        next = d->next;
        if (d->dead) {
            graph_unlink(t, d);
            graph_release(c, t, d);
        }
    }
    return e;
}

/* t's capture ended and every graph of t released (thread_free). */
static void graphs_free(struct bs__cuda *c, struct bs__cuda_thread *t)
{
    cudaGraph_t graph = NULL;
    struct bs_backend_graph *cap = t->cap;
    capture_end(c, t, &graph);
    if (graph != NULL)
        cudaGraphDestroy(graph);
    if (cap != NULL)
        graph_release(c, t, cap);
    while (t->graphs != NULL) {
        struct bs_backend_graph *g = t->graphs;
        graph_unlink(t, g);
        graph_release(c, t, g);
    }
    graph_param_free(c, t->spare_host, t->spare_dev);
    t->spare_host = t->spare_dev = NULL;
    free(t->cap_frees);
    t->cap_frees = NULL;
    t->cap_frees_max = 0;
}

static int cuda_graph_begin(void *ctx, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "graph_begin", err);
    if (t == NULL)
        return err->code;
    if (t->cap != NULL)
        return bs_err_set(err, BS_EINVAL,
                          "cuda graph_begin: this thread is already capturing a graph "
                          "(graph_end first)");
    struct bs_backend_graph *g = graph_new(c, t, err);
    if (g == NULL)
        return err->code;
    if (!c->bare) {
        int rc = bs__cuda_check(cudaStreamBeginCapture(t->stream, cudaStreamCaptureModeThreadLocal),
                                "graph_begin", "cudaStreamBeginCapture", err);
        if (rc != 0) {
            graph_release(c, t, g);
            return rc;
        }
    }
    t->cap = g;
    return 0;
}

static int cuda_graph_end(void *ctx, bool keep, struct bs_backend_graph **out, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    if (out != NULL)
        *out = NULL;
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "graph_end", err);
    if (t == NULL)
        return err->code;
    struct bs_backend_graph *g = t->cap;
    if (g == NULL)
        return bs_err_set(err, BS_EINVAL, "cuda graph_end: no graph_begin on this thread");
    cudaGraph_t graph = NULL;
    cudaError_t e = capture_end(c, t, &graph);
    int rc = 0;
    if (keep && out == NULL)
        rc = bs_err_set(err, BS_EINVAL, "cuda graph_end: keep without a place for the graph (g)");
    else if (keep && e != cudaSuccess)
        rc = bs_err_set(err, BS_EINTERNAL, "cuda graph_end: the capture broke: %s (%s)",
                        cudaGetErrorString(e), cudaGetErrorName(e));
    else if (keep && c->bare)
        rc = bs_err_set(err, BS_EINTERNAL,
                        "cuda graph_end: a test backend has no device to make the graph on");
    if (rc == 0 && keep) {
        rc = bs__cuda_check(cudaGraphInstantiate(&g->exec, graph, 0), "graph_end",
                            "cudaGraphInstantiate", err);
        if (rc != 0)
            g->exec = NULL;
        else if ((rc = event_make(&g->done, false, "graph_end", err)) != 0)
            g->done = NULL;
    }
    if (graph != NULL)
        cudaGraphDestroy(graph);
    if (rc != 0 || !keep) {
        graph_release(c, t, g);
        return rc;
    }
    g->next = t->graphs;
    if (t->graphs)
        t->graphs->prev = g;
    t->graphs = g;
    *out = g;
    return 0;
}

static int cuda_graph_rows(void *ctx, struct bs_tensor *y, const struct bs_tensor *table, int64_t n,
                           int64_t **idx, struct bs_err *err)
{
    static const int64_t zeros[BS_CUDA_GRAPH_IDX] = {0};
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    int rc;
    if (idx == NULL)
        return bs_err_set(err, BS_EINVAL, "cuda graph_rows: idx is NULL");
    *idx = NULL;
    if (n < 0 || n > BS_CUDA_GRAPH_IDX)
        return bs_err_set(err, n < 0 ? BS_EINVAL : BS_EUNSUPP,
                          "cuda graph_rows: %lld indices (a graph takes 0 to %d in all)",
                          (long long)n, BS_CUDA_GRAPH_IDX);
    if ((rc = bs_opcheck_get_rows(y, table, zeros, n, err)) != 0)
        return rc;
    if (y->type != BS_TYPE_F32 || table->type != BS_TYPE_F32)
        return bs_err_set(err, BS_EINVAL, "cuda graph_rows: table and y must be F32 (got %s, %s)",
                          bs_dtype_name(table->type), bs_dtype_name(y->type));
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "graph_rows", err);
    if (t == NULL)
        return err->code;
    struct bs_backend_graph *g = t->cap;
    if (g == NULL)
        return bs_err_set(err, BS_EINVAL,
                          "cuda graph_rows: outside a capture (graph_begin on this thread first)");
    if (n > BS_CUDA_GRAPH_IDX - g->idx_used)
        return bs_err_set(err, BS_EUNSUPP,
                          "cuda graph_rows: more than %d indices in one graph (%lld taken, %lld "
                          "more)",
                          BS_CUDA_GRAPH_IDX, (long long)g->idx_used, (long long)n);
    int64_t *h = g->idx_host + g->idx_used;
    memset(h, 0, (size_t)n * sizeof(int64_t)); /* in range until the engine writes them */
    int64_t d = bs_opcheck_ncols(table);
    if (n > 0 && d > 0) {
        if (c->bare)
            return bs_err_set(err, BS_EINTERNAL,
                              "cuda graph_rows: a test backend has no device to gather on");
        TRY_RC(rc, bs__cuda_gather_rows(t, (float *)y->data, bs_tensor_ld(y),
                                        (const float *)table->data, bs_tensor_ld(table),
                                        bs_tensor_nrows(table), h, g->idx_dev + g->idx_used, n, d,
                                        err));
    }
    g->idx_used += n;
    *idx = h;
    return 0;
}

/* The calling thread's state for an op on g (not NULL, the thread's own). */
static struct bs__cuda_thread *graph_owner(struct bs__cuda *c, struct bs_backend_graph *g,
                                           const char *op, struct bs_err *err)
{
    if (g == NULL) {
        bs_err_set(err, BS_EINVAL, "cuda %s: NULL graph", op);
        return NULL;
    }
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, op, err);
    if (t != NULL && g->owner != t) {
        bs_err_set(err, BS_EINVAL, "cuda %s: the graph belongs to another thread", op);
        return NULL;
    }
    return t;
}

static int cuda_graph_launch(void *ctx, struct bs_backend_graph *g, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    struct bs__cuda_thread *t = graph_owner(c, g, "graph_launch", err);
    int rc;
    if (t == NULL)
        return err->code;
    if (bs__cuda_capturing(t))
        return bs_err_set(err, BS_EINVAL,
                          "cuda graph_launch: this thread is capturing a graph (graph_end first)");
    if (g->dead)
        return bs_err_set(err, BS_EINVAL, "cuda graph_launch: the graph was freed");
    TRY_RC(rc, bs__cuda_check(cudaGraphLaunch(g->exec, t->stream), "graph_launch",
                              "cudaGraphLaunch", err));
    TRY_RC(rc, bs__cuda_check(cudaEventRecord(g->done, t->stream), "graph_launch",
                              "cudaEventRecord", err));
    g->launched = true;
    return 0;
}

static int cuda_graph_wait(void *ctx, struct bs_backend_graph *g, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    struct bs__cuda_thread *t = graph_owner(c, g, "graph_wait", err);
    if (t == NULL)
        return err->code;
    if (bs__cuda_capturing(t))
        return bs__cuda_refuse_capture("graph_wait", "it waits for the device", err);
    if (!g->launched)
        return 0;
    return bs__cuda_check(cudaEventSynchronize(g->done), "graph_wait",
                          "cudaEventSynchronize (this or an earlier op failed)", err);
}

/* Waits for g's launches and releases it; while the thread captures, at
 * graph_end. A graph of another thread is left to the backend's free. */
static void cuda_graph_free(void *ctx, struct bs_backend_graph *g)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    struct bs_err err;
    memset(&err, 0, sizeof(err));
    if (g == NULL)
        return;
    struct bs__cuda_thread *t = graph_owner(c, g, "graph_free", &err);
    if (t == NULL)
        return;
    if (bs__cuda_capturing(t)) {
        g->dead = true;
        return;
    }
    graph_unlink(t, g);
    graph_release(c, t, g);
}

static uint64_t cuda_graph_epoch(void *ctx)
{
    return __atomic_load_n(&((struct bs__cuda *)ctx)->epoch, __ATOMIC_ACQUIRE);
}

/* ---- the backend ------------------------------------------------------- */

/* Every thread's state goes (no op may run any more: the caller's
 * contract), then the weight copies. */
static void cuda_free(void *ctx)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    if (c == NULL)
        return;
    struct bs__cuda_thread *self = capturing_thread(c);
    if (self != NULL)
        graphs_free(c, self); /* a capture left open ends before the device-wide wait */
    if (!c->bare) {
        cudaSetDevice(c->device);
        cudaDeviceSynchronize();
    }
    while (c->threads != NULL) {
        struct bs__cuda_thread *t = c->threads;
        c->threads = t->next;
        thread_free(c, t);
    }
    for (int i = 0; i < c->n_shadows; i++)
        if (!c->bare)
            cudaFree(c->shadows[i].half);
    pthread_key_delete(c->key);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

/* Device memory for the metrics thread: cudaMemGetInfo needs no lock (it
 * only reads the driver's counters) but the current device is per thread. */
static int cuda_memory_info(void *ctx, struct bs_backend_memory *mem, struct bs_err *err)
{
    struct bs__cuda *c = (struct bs__cuda *)ctx;
    size_t free_b = 0, total_b = 0;
    cudaDeviceProp prop;
    int rc = bs__cuda_check(cudaSetDevice(c->device), "memory_info", "cudaSetDevice", err);
    if (rc == 0)
        rc = bs__cuda_check(cudaMemGetInfo(&free_b, &total_b), "memory_info", "cudaMemGetInfo", err);
    if (rc == 0)
        rc = bs__cuda_check(cudaGetDeviceProperties(&prop, c->device), "memory_info",
                            "cudaGetDeviceProperties", err);
    if (rc != 0)
        return rc;
    const unsigned char *u = (const unsigned char *)prop.uuid.bytes;
    snprintf(mem->device, sizeof(mem->device),
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0],
             u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
             u[14], u[15]);
    mem->used_bytes = (uint64_t)(total_b - free_b);
    mem->total_bytes = (uint64_t)total_b;
    return 0;
}

static void *cuda_get_proc_address(const char *name);

static struct bs_backend_i make_iface(void)
{
    struct bs_backend_i i;
    memset(&i, 0, sizeof(i));
    i.name = "cuda";
    i.host_memory = false;
    i.free = cuda_free;
    i.buf_alloc = cuda_buf_alloc;
    i.buf_free = cuda_buf_free;
    i.copy_in = cuda_copy_in;
    i.copy_out = cuda_copy_out;
    i.act_dtypes = (1u << BS_TYPE_BF16) | (1u << BS_TYPE_F16);
    i.linear = bs__cuda_linear;
    i.linear_act = bs__cuda_linear_act;
    i.layer_norm = bs__cuda_layer_norm;
    i.group_norm = bs__cuda_group_norm;
    i.act = bs__cuda_act;
    i.glu = bs__cuda_glu;
    i.attention = bs__cuda_attention;
    i.add = bs__cuda_add;
    i.transpose = bs__cuda_transpose;
    i.get_rows = bs__cuda_get_rows;
    i.weights_ready = cuda_weights_ready;
    i.memory_info = cuda_memory_info;
    i.get_proc_address = cuda_get_proc_address;
    i.graph_begin = cuda_graph_begin;
    i.graph_end = cuda_graph_end;
    i.graph_rows = cuda_graph_rows;
    i.graph_launch = cuda_graph_launch;
    i.graph_wait = cuda_graph_wait;
    i.graph_free = cuda_graph_free;
    i.graph_epoch = cuda_graph_epoch;
    return i;
}

static const struct bs_backend_i cuda_iface = make_iface();

static int parse_dtype(const char *s, enum bs_dtype *t, struct bs_err *err)
{
    if (s == NULL || strcmp(s, "bf16") == 0)
        *t = BS_TYPE_BF16;
    else if (strcmp(s, "fp16") == 0)
        *t = BS_TYPE_F16;
    else if (strcmp(s, "fp32") == 0)
        *t = BS_TYPE_F32;
    else
        return bs_err_set(err, BS_EINVAL, "unknown dtype \"%s\" (expected fp32, bf16 or fp16)", s);
    return 0;
}

/* A GPU we can run on: present, reachable through the driver, sm_80 or newer. */
static int pick_device(struct bs__cuda *c, struct bs_err *err)
{
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess)
        return bs_err_set(err, BS_EUNSUPP, "no usable CUDA GPU: cudaGetDeviceCount: %s (%s)",
                          cudaGetErrorString(e), cudaGetErrorName(e));
    if (count < 1)
        return bs_err_set(err, BS_EUNSUPP, "no usable CUDA GPU: no device found");
    struct cudaDeviceProp prop;
    if ((e = cudaGetDeviceProperties(&prop, 0)) != cudaSuccess)
        return bs_err_set(err, BS_EUNSUPP, "no usable CUDA GPU: cudaGetDeviceProperties: %s",
                          cudaGetErrorString(e));
    if (prop.major < 8)
        return bs_err_set(
            err, BS_EUNSUPP,
            "no usable CUDA GPU: %.100s is sm_%d%d; this backend needs sm_80 or newer", prop.name,
            prop.major, prop.minor);
    c->device = 0;
    c->sms = prop.multiProcessorCount;
    snprintf(c->desc, sizeof(c->desc), "cuda backend on %.100s (sm_%d%d, %.0f GiB), compute %s%s",
             prop.name, prop.major, prop.minor, (double)prop.totalGlobalMem / (1 << 30),
             c->dtype == BS_TYPE_F32    ? "fp32"
             : c->dtype == BS_TYPE_BF16 ? "bf16"
                                        : "fp16",
             c->dtype == BS_TYPE_F32 ? (c->tf32 ? " (TF32 GEMMs)" : " (no TF32)") : "");
    return bs__cuda_check(cudaSetDevice(0), "init", "cudaSetDevice", err);
}

/* The device, and the calling thread's state (the loop thread's, which
 * loads the models). */
static int init_ctx(struct bs__cuda *c, struct bs_err *err)
{
    int rc;
    TRY_RC(rc, pick_device(c, err));
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "init", err);
    if (t == NULL)
        return err->code;
    /* One round trip proves the device works before we promise to use it. */
    TRY_RC(rc, bs__cuda_check(cudaMemsetAsync(t->blas_ws, 0, 256, t->stream), "init",
                              "cudaMemsetAsync", err));
    return bs__cuda_check(cudaStreamSynchronize(t->stream), "init", "cudaStreamSynchronize", err);
}

/* A zeroed context with its lock and thread key; NULL when out of memory. */
static struct bs__cuda *ctx_alloc(void)
{
    struct bs__cuda *c = (struct bs__cuda *)calloc(1, sizeof(struct bs__cuda));
    if (c == NULL)
        return NULL;
    if (pthread_key_create(&c->key, NULL) != 0) {
        free(c);
        return NULL;
    }
    pthread_mutex_init(&c->lock, NULL);
    return c;
}

/* ---- entry points --------------------------------------------------------- */

static int cuda_module_init(struct bs_backend *be, const struct bs_backend_opts *o,
                            struct bs_err *err)
{
    int rc;
    memset(be, 0, sizeof(*be));
    struct bs__cuda *c = ctx_alloc();
    if (c == NULL)
        return bs_err_set(err, BS_ENOMEM, "cuda backend: out of memory");
    c->tf32 = o->tf32;
    if ((rc = parse_dtype(o->dtype, &c->dtype, err)) != 0 || (rc = init_ctx(c, err)) != 0) {
        cuda_free(c);
        return rc;
    }
    be->iface = &cuda_iface;
    be->ctx = c;
    return bs_err_set(err, 0, "%s", c->desc);
}

/* BS_PROC_ATTENTION_UNFUSED (bench/gpu_bench.c, tests/gpu): the unfused
 * attention baseline on a CUDA backend. */
static int cuda_attention_unfused(struct bs_backend *be, struct bs_tensor *o,
                                  const struct bs_tensor *q, const struct bs_tensor *k,
                                  const struct bs_tensor *v, const struct bs_attn_params *p,
                                  struct bs_err *err)
{
    if (be->iface != &cuda_iface)
        return bs_err_set(err, BS_EINVAL, "not a cuda backend");
    return bs__cuda_attention_unfused(be->ctx, o, q, k, v, p, err);
}

/* ---- BS_PROC_GPU_TIMER: CUDA events on the calling thread's stream ---- */

/* The calling thread's state for the timer, with its events made. */
static struct bs__cuda_thread *timer_thread(struct bs_backend *be, struct bs_err *err)
{
    if (be->iface != &cuda_iface) {
        bs_err_set(err, BS_EINVAL, "gpu_timer: not a cuda backend");
        return NULL;
    }
    struct bs__cuda *c = (struct bs__cuda *)be->ctx;
    if (c->bare) {
        bs_err_set(err, BS_EUNSUPP, "gpu_timer: a test backend has no device to time");
        return NULL;
    }
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "gpu_timer", err);
    if (t != NULL && bs__cuda_capturing(t)) {
        bs__cuda_refuse_capture("gpu_timer", "its events would be captured, and stop waits", err);
        return NULL;
    }
    if (t == NULL || t->tm_stop != NULL)
        return t;
    if (event_make(&t->tm_start, true, "gpu_timer", err) ||
        event_make(&t->tm_stop, true, "gpu_timer", err) ||
        event_make(&t->tm_copy0, true, "gpu_timer", err) ||
        event_make(&t->tm_copy1, true, "gpu_timer", err)) {
        cudaEvent_t *all[] = {&t->tm_start, &t->tm_stop, &t->tm_copy0, &t->tm_copy1};
        for (int i = 0; i < 4; i++) /* made again on the next start */
            if (*all[i]) {
                cudaEventDestroy(*all[i]);
                *all[i] = NULL;
            }
        return NULL;
    }
    return t;
}

static int gpu_timer_start(struct bs_backend *be, struct bs_err *err)
{
    struct bs__cuda_thread *t = timer_thread(be, err);
    if (t == NULL)
        return err->code;
    t->tm_on = false;
    t->tm_copy_ms = 0;
    t->tm_copy_bytes = 0;
    t->tm_copies = 0;
    int rc = bs__cuda_check(cudaEventRecord(t->tm_start, t->stream), "gpu_timer", "cudaEventRecord",
                            err);
    t->tm_on = rc == 0;
    return rc;
}

static int gpu_timer_stop(struct bs_backend *be, struct bs_gpu_time *out, struct bs_err *err)
{
    memset(out, 0, sizeof(*out));
    if (be->iface == &cuda_iface && ((struct bs__cuda *)be->ctx)->bare)
        return bs_err_set(err, BS_EINVAL, "gpu_timer: stop without start on this thread");
    struct bs__cuda_thread *t = timer_thread(be, err);
    if (t == NULL)
        return err->code;
    if (!t->tm_on)
        return bs_err_set(err, BS_EINVAL, "gpu_timer: stop without start on this thread");
    t->tm_on = false;
    float ms = 0;
    int rc;
    TRY_RC(rc, bs__cuda_check(cudaEventRecord(t->tm_stop, t->stream), "gpu_timer",
                              "cudaEventRecord", err));
    TRY_RC(rc, bs__cuda_check(cudaEventSynchronize(t->tm_stop), "gpu_timer",
                              "cudaEventSynchronize (this or an earlier op failed)", err));
    TRY_RC(rc, bs__cuda_check(cudaEventElapsedTime(&ms, t->tm_start, t->tm_stop), "gpu_timer",
                              "cudaEventElapsedTime", err));
    out->total_ms = ms;
    out->transfer_ms = t->tm_copy_ms;
    out->transfer_bytes = t->tm_copy_bytes;
    out->transfers = t->tm_copies;
    return 0;
}

static const struct bs_backend_gpu_timer *cuda_gpu_timer(void)
{
    static const struct bs_backend_gpu_timer timer = {gpu_timer_start, gpu_timer_stop};
    return &timer;
}

/* BS_PROC_TEST_BACKEND (tests/unit/test_cuda_host.c): a backend whose context
 * is bound to no device (bare: its thread states have no stream, cuBLAS
 * handle or staging), so that a machine without a GPU can check the ops'
 * argument checks against the CPU twins and see valid calls fail cleanly
 * with BS_EINTERNAL. Never use it with a GPU: the ops would launch on the
 * tensors' (host) pointers. No copy ops. */
static int cuda_test_backend(struct bs_backend *be, const char *dtype, struct bs_err *err)
{
    memset(be, 0, sizeof(*be));
    struct bs__cuda *c = ctx_alloc();
    if (c == NULL)
        return bs_err_set(err, BS_ENOMEM, "cuda backend: out of memory");
    c->bare = true;
    int rc = parse_dtype(dtype, &c->dtype, err);
    if (rc != 0) {
        cuda_free(c);
        return rc;
    }
    be->iface = &cuda_iface;
    be->ctx = c;
    return 0;
}

/* ---- BS_PROC_TEST_HOOKS: the host-side internals, for test_cuda_host.c ---- */

static struct bs__cuda *test_ctx(const struct bs_backend *be)
{
    return be->iface == &cuda_iface ? (struct bs__cuda *)be->ctx : NULL;
}

static const void *hook_thread_state(struct bs_backend *be, struct bs_err *err)
{
    struct bs__cuda *c = test_ctx(be);
    if (c == NULL) {
        bs_err_set(err, BS_EINVAL, "not a cuda backend");
        return NULL;
    }
    return bs__cuda_thread_get(c, "test", err);
}

static int hook_counts(const struct bs_backend *be, int *threads, int *shadows)
{
    struct bs__cuda *c = test_ctx(be);
    if (c == NULL)
        return BS_EINVAL;
    bs__cuda_lock l(c);
    *threads = c->n_threads;
    *shadows = c->n_shadows;
    return 0;
}

static int hook_shadow_register(struct bs_backend *be, const void *base, size_t bytes, void *half,
                                void **replaced, struct bs_err *err)
{
    struct bs__cuda *c = test_ctx(be);
    if (c == NULL)
        return bs_err_set(err, BS_EINVAL, "not a cuda backend");
    return shadow_register(c, base, bytes, half, replaced, err);
}

static int hook_overflow_take(struct bs_backend *be, int flags, struct bs_err *err)
{
    struct bs__cuda *c = test_ctx(be);
    if (c == NULL)
        return bs_err_set(err, BS_EINVAL, "not a cuda backend");
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "test", err);
    if (t == NULL)
        return err->code;
    *(volatile int *)t->overflow = flags;
    return take_overflow(c, t, 0, err);
}

static int hook_lt_cache_probe(struct bs_backend *be, const int64_t key[8], int *slot, bool *hit,
                               bool *evicted, struct bs_err *err)
{
    static_assert(BS_CUDA_LT_KEY == 8, "the hook's key has 8 values");
    struct bs__cuda *c = test_ctx(be);
    if (c == NULL)
        return bs_err_set(err, BS_EINVAL, "not a cuda backend");
    struct bs__cuda_thread *t = bs__cuda_thread_get(c, "test", err);
    if (t == NULL)
        return err->code;
    struct bs__cuda_lt_cache *cache = bs__cuda_lt_cache_get(c, t, err);
    if (cache == NULL)
        return err->code;
    *slot = bs__cuda_lt_lookup(cache, key, hit, evicted);
    return 0;
}

static const struct bs_backend_test_hooks *cuda_test_hooks(void)
{
    static const struct bs_backend_test_hooks hooks = {hook_thread_state, hook_counts,
                                                       hook_shadow_register, hook_overflow_take,
                                                       hook_lt_cache_probe};
    return &hooks;
}

/* The extra entry points by name (engine/backend.h: BS_PROC_*); the types
 * are checked here against the typedefs the callers use. */
static void *cuda_get_proc_address(const char *name)
{
    bs_proc_attention_unfused_fn unfused = cuda_attention_unfused;
    bs_proc_test_backend_fn test_backend = cuda_test_backend;
    bs_proc_test_hooks_fn test_hooks = cuda_test_hooks;
    bs_proc_gpu_timer_fn gpu_timer = cuda_gpu_timer;
    if (name == NULL)
        return NULL;
    if (strcmp(name, BS_PROC_ATTENTION_UNFUSED) == 0)
        return reinterpret_cast<void *>(unfused);
    if (strcmp(name, BS_PROC_TEST_BACKEND) == 0)
        return reinterpret_cast<void *>(test_backend);
    if (strcmp(name, BS_PROC_TEST_HOOKS) == 0)
        return reinterpret_cast<void *>(test_hooks);
    if (strcmp(name, BS_PROC_GPU_TIMER) == 0)
        return reinterpret_cast<void *>(gpu_timer);
    return NULL;
}

/* The module's one exported symbol (BS_CUDA_MODULE_ENTRY), which
 * engine/backend.c looks up after dlopen: the ABI it was built for, init and
 * the extra entry points. */
extern "C" __attribute__((visibility("default"))) const struct bs_backend_module *
bs_cuda_backend_module(void)
{
    static const struct bs_backend_module mod = {BS_BACKEND_ABI, "cuda", cuda_module_init,
                                                  cuda_get_proc_address};
    return &mod;
}
