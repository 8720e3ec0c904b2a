/* The schedule of a host <-> device copy through two pinned staging buffers
 * (kernels/cuda/backend_cuda.cu: copy_in, copy_out), as a pure state machine
 * with no CUDA in it (internal to the backend, not API), so that tests/unit/test_cuda_host.c can
 * replay it against a model of the device. Plain C, included by C and CUDA sources.
 *
 * A copy of size bytes goes in chunks of at most chunk bytes; chunk i uses
 * staging buffer i % 2. Steps:
 *   BS_XFER_WAIT buf:   wait until the DMA last queued on buf has run (its
 *                       event); the first use of a buffer has none to wait for.
 *   BS_XFER_HOST i buf: memcpy chunk i between the caller's host memory and
 *                       buf (in: host -> buf; out: buf -> host).
 *   BS_XFER_DMA i buf:  queue the DMA of chunk i between buf and the device
 *                       (in: buf -> device; out: device -> buf) on the stream,
 *                       and record buf's event after it.
 *   BS_XFER_DONE:       nothing left (the caller then waits for the stream).
 * In (host to device): [WAIT b] HOST i, DMA i for each chunk, so the memcpy
 * of chunk i + 1 into one buffer runs while chunk i's DMA reads the other.
 * Out (device to host): DMA 0, DMA 1, then WAIT b, HOST i, DMA i + 2 for each
 * chunk, so chunk i + 1's DMA runs while the host copies chunk i out. A
 * buffer is never written by the host while a DMA that reads it may run, nor
 * read by the host before the DMA that fills it has run. */
#ifndef BS_CUDA_XFER_H
#define BS_CUDA_XFER_H

#include <stdbool.h>
#include <stddef.h>

/* Bytes of each of the two staging buffers (a thread's pinned staging is
 * twice this). */
#define BS_CUDA_XFER_CHUNK (4u << 20)

enum bs__xfer_op { BS_XFER_WAIT, BS_XFER_HOST, BS_XFER_DMA, BS_XFER_DONE };

struct bs__xfer_step {
    enum bs__xfer_op op;
    int buf;         /* staging buffer 0 or 1 */
    size_t off, len; /* HOST, DMA: the chunk's bytes [off, off + len) */
};

struct bs__xfer {
    size_t size, chunk, n; /* n chunks */
    bool out;
    size_t i;        /* the chunk being worked on */
    int phase;       /* where in chunk i's steps */
    size_t dma_next; /* out: the next chunk to queue a DMA for */
};

/* Chunks of a copy of size bytes through buffers of chunk bytes (0 for 0). */
static inline size_t bs__xfer_chunks(size_t size, size_t chunk)
{
    return chunk == 0 ? 0 : size / chunk + (size % chunk != 0);
}

static inline void bs__xfer_init(struct bs__xfer *x, size_t size, size_t chunk, bool out)
{
    x->size = size;
    x->chunk = chunk;
    x->n = bs__xfer_chunks(size, chunk);
    x->out = out;
    x->i = 0;
    x->phase = 0;
    x->dma_next = 0;
}

static inline struct bs__xfer_step bs__xfer_chunk_step(const struct bs__xfer *x,
                                                       enum bs__xfer_op op, size_t i)
{
    struct bs__xfer_step s;
    s.op = op;
    s.buf = (int)(i % 2);
    s.off = i * x->chunk;
    s.len = x->size - s.off < x->chunk ? x->size - s.off : x->chunk;
    return s;
}

/* The next step of x. */
static inline struct bs__xfer_step bs__xfer_next(struct bs__xfer *x)
{
    struct bs__xfer_step s = {BS_XFER_DONE, 0, 0, 0};
    if (x->out && x->dma_next < 2 && x->dma_next < x->n) /* prime both buffers */
        return bs__xfer_chunk_step(x, BS_XFER_DMA, x->dma_next++);
    while (x->i < x->n) {
        size_t i = x->i;
        switch (x->phase++) {
        case 0: /* in: a buffer's second and later chunks wait for its last DMA;
                   out: every chunk waits for its own DMA */
            if (x->out || i >= 2) {
                s = bs__xfer_chunk_step(x, BS_XFER_WAIT, i);
                s.off = s.len = 0;
                return s;
            }
            break;
        case 1:
            return bs__xfer_chunk_step(x, BS_XFER_HOST, i);
        case 2:
            if (!x->out)
                return bs__xfer_chunk_step(x, BS_XFER_DMA, i);
            if (x->dma_next < x->n) /* out: refill the buffer just emptied */
                return bs__xfer_chunk_step(x, BS_XFER_DMA, x->dma_next++);
            break;
        default:
            x->i++;
            x->phase = 0;
            break;
        }
    }
    return s;
}

#endif
