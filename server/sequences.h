/* Denoising sequences (Triton's sequence parameters: sequence_id,
 * sequence_start, sequence_end) and their step-level block caches.
 *
 * A pipeline calls the same model once per denoising step. Within a
 * sequence, call k (from 0 at its start) with block_cache_interval N >= 2 is
 * a refresh when k mod N = 0 (the exact forward, the blocks' attn1, attn2
 * and ff outputs stored) and otherwise a reuse of the stored outputs
 * (engine/model.h, bs_block_cache). A sequence lives from its start to its
 * end, or until it has been idle longer than its model's max idle time.
 * Caches share one server-wide byte budget (and an optional per-model cap);
 * when a refresh needs room, the least recently used idle caches are
 * evicted, and an evicted sequence refreshes on its next call and says so.
 *
 * Thread ownership: the loop thread (the inference core) owns everything. */
#ifndef BS_SEQUENCES_H
#define BS_SEQUENCES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model.h"

typedef struct bs_seqs bs_seqs_t;
typedef struct bs_seq bs_seq_t;

/* Triton's default max_sequence_idle_microseconds. */
#define BS_SEQ_DEFAULT_IDLE_US 1000000

/* Room for a sequence's name in messages: a client's string id, cut to 64
 * bytes, "..." and quotes. */
#define BS_SEQ_NAME_BYTES 72

/* A request's sequence parameters. */
struct bs_seq_params {
    bool given;             /* any sequence parameter was present */
    uint64_t id;            /* sequence_id; 0: none (refused when given) */
    bool start, end;        /* sequence_start, sequence_end */
    int64_t cache_interval; /* block_cache_interval; 0: not given */
    /* How messages name the sequence when the client gave a string id (its
     * text, quoted, control characters as '?'); "": by its number. */
    char name[BS_SEQ_NAME_BYTES];
};

/* A model's sequence settings. */
struct bs_seq_model {
    int64_t max_idle_us; /* 0: BS_SEQ_DEFAULT_IDLE_US */
    size_t cache_bytes;  /* the model's cap on cached bytes; 0: the server's budget only */
};

/* What one call of a sequence does. */
struct bs_seq_call {
    enum bs_cache_mode mode;
    bs_block_cache_t *cache; /* NULL with BS_CACHE_OFF */
    int64_t index;           /* k: the sequence's calls before this one */
    bool evicted;            /* a refresh where a reuse was due: the cache had been evicted */
    bool cached;             /* the request asked for caching (N >= 2) */
};

/* Counters, per model or for the whole server. */
struct bs_seq_stats {
    uint64_t bytes;     /* cached now */
    uint64_t sequences; /* live now */
    uint64_t hits;      /* reuse calls */
    uint64_t refreshes; /* refresh calls */
    uint64_t evictions; /* caches evicted for room */
    uint64_t expired;   /* sequences ended by idling */
};

/* budget_bytes: cached bytes the server may hold (0: none may be cached). */
int bs_seqs_init(bs_seqs_t **seqs, size_t budget_bytes, struct bs_err *err);

/* Free every sequence and cache (at once); NULL is a no-op. No call may be
 * running. */
void bs_seqs_free(bs_seqs_t *seqs);

/* Who frees the caches that sequences drop from now on (evicted, ended,
 * expired, a failed refresh's): fn(arg, cache) takes each, which no
 * forward uses any longer, and must bs_block_cache_free it, on any thread
 * (a device backend's free may wait for the device, which the loop thread
 * must not). fn NULL: freed at once, on the caller's thread. */
void bs_seqs_set_release(bs_seqs_t *seqs, void (*fn)(void *arg, bs_block_cache_t *cache),
                         void *arg);

/* Begin a call of sequence p on model; main is the request's main input
 * (hidden_states), whose shape a caching sequence keeps (its tokens,
 * bs_model_tokens, size the cache). Returns:
 * - 0: the call may run now as *call says; *seq is its sequence (NULL for a
 *   request outside any sequence), to be finished with bs_seqs_finish;
 * - 1: the sequence has a call running: *seq is set and nothing changed;
 *   begin again once that call has finished (calls of a sequence run in
 *   order);
 * - a negative BS_E* code with a message naming the sequence: a sequence_id
 *   of 0, an unknown or expired sequence without sequence_start, a main
 *   input shape other than the sequence's while it caches, a bad interval,
 *   a model without blocks to cache; the call is no call of the sequence
 *   (its count of calls, k, stays). */
int bs_seqs_begin(bs_seqs_t *seqs, bs_model_t *model, const struct bs_seq_model *sm,
                  const struct bs_seq_params *p, const struct bs_named_tensor *main,
                  uint64_t now_ns, bs_seq_t **seq, struct bs_seq_call *call, struct bs_err *err);

/* The call begun on seq has ended (rc: its result); a sequence_end call
 * frees the sequence and its cache. */
void bs_seqs_finish(bs_seqs_t *seqs, bs_seq_t *seq, int rc, uint64_t now_ns);

/* End sequences idle past their model's max idle time; returns the time of
 * the next expiry (INT64_MAX: none). */
int64_t bs_seqs_expire(bs_seqs_t *seqs, uint64_t now_ns);

/* End every sequence of model (it is being unloaded; none may be running). */
void bs_seqs_drop_model(bs_seqs_t *seqs, const bs_model_t *model);

/* Counters of model's sequences (NULL: all). */
void bs_seqs_stats(const bs_seqs_t *seqs, const bs_model_t *model, struct bs_seq_stats *st);

#endif
