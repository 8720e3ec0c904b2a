/* blockserve-cli's system shared memory: a POSIX shared memory object the
 * CLI makes (shm_open, ftruncate, mmap) under a key of its own, registered
 * with the server for one command and removed afterwards, and the layout of
 * the requests' tensors in it (each in-flight slot its inputs, then room for
 * its outputs). */
#ifndef BS_CLI_SHM_H
#define BS_CLI_SHM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cli_args.h"
#include "cli_inputs.h"

#define CLI_SHM_MAX_OUTPUTS 8

struct cli_shm {
    char key[64];  /* "/bs-cli-PID-N", shm_open's name */
    char name[64]; /* "bs-cli-PID-N", the registered region */
    int fd;
    uint8_t *base;
    size_t size;
    bool registered;
    /* layout, the same for each slot: slot s starts at s * slot_size */
    size_t slot_size;
    size_t in_off[CLI_MAX_TENSORS];
    size_t out_off[CLI_SHM_MAX_OUTPUTS], out_size[CLI_SHM_MAX_OUTPUTS];
    const char *out_names[CLI_SHM_MAX_OUTPUTS];
    int n_out;
};

/* Bytes of output o of metadata m for these inputs: its dims, a variable
 * one (-1) taken from the same position of an input of the same rank (the
 * batch dim from the first input), else 1; a 16-bit float output (a model
 * whose default output_datatype is BF16 or FP16) gets the room of FP32,
 * which a request may ask for, so one layout fits any --output-dtype. */
size_t cli_shm_output_bytes(const Inference__ModelMetadataResponse__TensorMetadata *o,
                            const struct cli_inputs *in);

/* Lay out `slots` copies of in and m's outputs, create the object, write the
 * inputs into every slot and register it over conn. On failure nothing is
 * left behind (cli_shm_close is still safe). */
int cli_shm_open(struct cli_shm *s, const struct cli_conn *conn,
                 const Inference__ModelMetadataResponse *m, const struct cli_inputs *in, int slots,
                 struct bs_client_err *err);

/* The refs of slot's inputs (in->n) and outputs (s->n_out). */
void cli_shm_refs(const struct cli_shm *s, const struct cli_inputs *in, int slot,
                  struct bs_client_shm_ref *in_refs, struct bs_client_shm_ref *out_refs);

/* Unregister (when registered), unmap and shm_unlink; safe to call twice. */
void cli_shm_close(struct cli_shm *s, const struct cli_conn *conn);

#endif
