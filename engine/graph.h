/* Launch graphs for parts of a forward (backend.h, graph_*): the engine
 * side. A part (a transformer block, an attention block) whose ops depend only on shapes and
 * addresses runs as follows on a thread, per key:
 *   1st time: eagerly (a warm-up: the backend's scratch, plans and the
 *   arena reach their sizes);
 *   2nd time: its ops are recorded with their arguments while the backend
 *   captures them into a graph, which is then launched;
 *   later: the part's code runs again, but each op only has its arguments
 *   compared with the recording (get_rows' indices are stored for the
 *   graph to read) and nothing is queued; at its end the graph is launched.
 * Any difference, an op the backend cannot capture, or a failed capture
 * makes the part run again eagerly (nothing was queued), so a graph never
 * changes a result. BS_GRAPHS_EMULATE does the same with the engine
 * replaying its recording through the backend's ops in place of a graph,
 * on any backend. */
#ifndef BS_GRAPH_H
#define BS_GRAPH_H

#include <stddef.h>
#include <stdint.h>

struct bs__fwd; /* modules.h */

/* Runs part(f, arg) through a graph where f->be->graphs is not OFF (else
 * just calls it). key (at most BS_GRAPH_KEY_MAX bytes, compared as bytes:
 * zero any padding) names what the part's ops depend on besides their
 * arguments (which are checked anyway): the module, its input's address,
 * the batch shape. part may return BS_ECANCELED (a stop between its ops):
 * then nothing of it ran. */
#define BS_GRAPH_KEY_MAX 128
int bs__graph_run(struct bs__fwd *f, const void *key, size_t key_bytes,
                  int (*part)(struct bs__fwd *f, void *arg), void *arg);

/* Counters over the process, for tests and the benchmark. */
struct bs_graph_stats {
    uint64_t eager;    /* parts run without a graph (warm-ups, keys that broke) */
    uint64_t captured; /* graphs captured (or recordings made, emulating) */
    uint64_t launched; /* parts run by launching a graph made earlier */
    uint64_t reran;    /* captures or replays abandoned and run eagerly */
    uint64_t freed;    /* graphs released (evicted, stale epoch, mismatch) */
};
void bs_graph_stats(struct bs_graph_stats *s);

#endif
