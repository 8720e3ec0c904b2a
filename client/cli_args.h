/* blockserve-cli's command line: options shared by every subcommand (the
 * server address, TLS, token, deadlines, --json) and the subcommands' own. */
#ifndef BS_CLI_ARGS_H
#define BS_CLI_ARGS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "blockserve_client.h"
#include "http_client.h"

#define CLI_MAX_SPECS 16

enum cli_format { CLI_FORMAT_BIN, CLI_FORMAT_JSON };

/* The server connection: gRPC, or HTTP/REST when http is set. */
struct cli_conn {
    bs_client_t *grpc;
    bs_http_t *http;
};

struct cli {
    const char *cmd;   /* the subcommand */
    const char *model; /* the positional MODEL, when the subcommand takes one */
    struct bs_client_options co;
    const char *token_file;
    const char *inputs[CLI_MAX_SPECS]; /* --input [NAME=]FILE */
    int n_inputs;
    const char *shapes[CLI_MAX_SPECS]; /* --shape NAME=d1,d2,...[:DATATYPE] */
    int n_shapes;
    const char *output;  /* infer --output */
    const char *out;     /* make-request --out */
    int format;          /* make-request --format: CLI_FORMAT_BIN or CLI_FORMAT_JSON */
    const char *id;      /* request id */
    const char *output_dtype;    /* --output-dtype fp32|bf16|fp16 as given; NULL: not given */
    const char *output_datatype; /* ... as the parameter output_datatype: "FP32", "BF16", "FP16" */
    int64_t count;       /* -n */
    double duration_s;   /* -z */
    int concurrency;     /* -c */
    double rps;          /* --rps */
    bool stream;         /* bench --stream */
    int threads;         /* bench --threads */
    int connections;     /* bench --connections */
    int window;          /* stream: requests in flight */
    bool json;           /* machine-readable output */
    int64_t seed;        /* random inputs (>= 0) */
    char token[1024];    /* read from --token-file */
    bool http;           /* --http (or an http:// / https:// URL): KServe v2 REST */
    bool http_json;      /* --http-json: tensors as JSON "data" arrays */
    int compress;        /* --compress: enum bs_http_encoding */
    bool shm;            /* infer, bench --shm: tensors through system shared memory */
    int64_t offset;      /* shm register --offset */
    const char *args[4]; /* shm: ACTION, then NAME KEY SIZE (those given) */
    int n_args;
};

/* Parse argv (argv[0] is the subcommand) into a, and read --token-file.
 * Returns 0, 1 when --help was given (the usage is printed on stdout), or -1
 * on a usage error (the problem is printed). */
int cli_parse(int argc, char **argv, struct cli *a);

/* Print the usage text: the commands and every option, from the tables. */
void cli_usage(FILE *out);

#endif
