/* Request inputs from the command line: tensors read from --input files,
 * random tensors of --shape, or random tensors for the model's required
 * inputs from its metadata. */
#ifndef BS_CLI_INPUTS_H
#define BS_CLI_INPUTS_H

#include "cli_args.h"

#define CLI_MAX_TENSORS 16

struct cli_inputs {
    struct bs_ctensor t[CLI_MAX_TENSORS];
    int n;
};

/* True when assembling a's inputs needs the server's metadata. */
bool cli_inputs_need_server(const struct cli *a);

/* Assemble a's inputs for a->model into in (c may be NULL when
 * cli_inputs_need_server is false). */
int cli_inputs_load(const struct cli *a, bs_client_t *c, struct cli_inputs *in,
                    struct bs_client_err *err);

/* Free the tensors of in. */
void cli_inputs_free(struct cli_inputs *in);

#endif
