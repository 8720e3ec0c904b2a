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

/* Assemble a's inputs for a->model into in (conn may be NULL when
 * cli_inputs_need_server is false). */
int cli_inputs_load(const struct cli *a, const struct cli_conn *conn, struct cli_inputs *in,
                    struct bs_client_err *err);

/* a->model's metadata over conn's transport (free with bs_client_msg_free). */
int cli_model_metadata(const struct cli *a, const struct cli_conn *conn,
                       Inference__ModelMetadataResponse **m, struct bs_client_err *err);

/* Free the tensors of in. */
void cli_inputs_free(struct cli_inputs *in);

#endif
