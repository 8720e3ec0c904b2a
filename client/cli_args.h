/* blockserve-cli's command line: options shared by every subcommand (the
 * server address, TLS, token, deadlines, --json) and the subcommands' own. */
#ifndef BS_CLI_ARGS_H
#define BS_CLI_ARGS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "blockserve_client.h"

#define CLI_MAX_SPECS 16

enum cli_format { CLI_FORMAT_BIN, CLI_FORMAT_JSON };

struct cli {
    const char *cmd;   /* the subcommand */
    const char *model; /* the positional MODEL, when the subcommand takes one */
    struct bs_client_options co;
    const char *token_file;
    const char *inputs[CLI_MAX_SPECS]; /* --input [NAME=]FILE */
    int n_inputs;
    const char *shapes[CLI_MAX_SPECS]; /* --shape NAME=d1,d2,...[:DATATYPE] */
    int n_shapes;
    const char *output; /* infer --output */
    const char *out;    /* make-request --out */
    int format;         /* make-request --format: CLI_FORMAT_BIN or CLI_FORMAT_JSON */
    const char *id;     /* request id */
    int64_t count;      /* -n */
    double duration_s;  /* -z */
    int concurrency;    /* -c */
    double rps;         /* --rps */
    bool stream;        /* bench --stream */
    int threads;        /* bench --threads */
    int connections;    /* bench --connections */
    int window;         /* stream: requests in flight */
    bool json;          /* machine-readable output */
    int64_t seed;       /* random inputs (>= 0) */
    char token[1024];   /* read from --token-file */
};

/* Parse argv (argv[0] is the subcommand) into a, and read --token-file.
 * Returns 0, 1 when --help was given (the usage is printed on stdout), or -1
 * on a usage error (the problem is printed). */
int cli_parse(int argc, char **argv, struct cli *a);

/* Print the usage text: the commands and every option, from the tables. */
void cli_usage(FILE *out);

#endif
