/* blockserve-cli's options: tables of rows (common/opts.h) that both parse
 * the command line and print the usage. */
#include "cli_args.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "opts.h"

#define AT(kind, field) BS_OPTS_AT(kind, struct cli, field)
#define COUNT(field)    BS_OPTS_COUNT(struct cli, field)

static const struct bs_opt input_rows[] = {
    {"--input", AT(LIST, inputs), .hi = CLI_MAX_SPECS, COUNT(n_inputs), .metavar = "[NAME=]FILE",
     .help = "tensors from a file (repeatable): NAME=FILE.npy;\n"
             "FILE.safetensors: every tensor, by its name;\n"
             "NAME=FILE.safetensors: that tensor, or the only one"},
    {"--shape", AT(LIST, shapes), .hi = CLI_MAX_SPECS, COUNT(n_shapes),
     .metavar = "NAME=d1,d2,...[:DATATYPE]", .help = "random data of that shape"},
    {"--seed", AT(INT64, seed), .lo = 0, .hi = INT64_MAX, .def = "1", .metavar = "N",
     .want = "an integer", .help = "seed of the random data"},
    BS_OPTS_NULL,
};

static const char *const encodings[] = {"none", "gzip", "deflate", NULL}; /* bs_http_encoding */

static const struct bs_opt connection_rows[] = {
    {"--url", AT(STR, co.url), .alias = "-u", .metavar = "HOST:PORT",
     .help = "server (default localhost:8001, HTTP: localhost:8000);\n"
             "grpcs:// means TLS, http:// and https:// HTTP"},
    {"--timeout", AT(SECONDS, co.call_timeout_s), .metavar = "SECONDS",
     .help = "deadline for connecting (default 5) and per call\n(default 60, bench: 10)"},
    {"--tls", AT(FLAG, co.tls), .help = "TLS with the system's root certificates"},
    {"--tls-ca", AT(STR, co.tls_ca), .metavar = "FILE",
     .help = "TLS, trusting the CA certificates in FILE (PEM)"},
    {"--tls-cert", AT(STR, co.tls_cert), .metavar = "FILE",
     .help = "client certificate for mutual TLS (with --tls-key)"},
    {"--tls-key", AT(STR, co.tls_key), .metavar = "FILE", .help = "its private key"},
    {"--tls-server-name", AT(STR, co.tls_server_name), .metavar = "NAME",
     .help = "name expected in the server's certificate"},
    {"--token", AT(STR, co.token), .metavar = "TOKEN",
     .help = "send \"authorization: Bearer TOKEN\""},
    {"--token-file", AT(STR, token_file), .metavar = "FILE",
     .help = "... with the token in FILE (its first line)"},
    {"--http", AT(FLAG, http),
     .help = "KServe v2 HTTP/REST instead of gRPC (also: an\nhttp:// or https:// URL; "
             "default localhost:8000)"},
    {"--http-json", AT(FLAG, http_json),
     .help = "HTTP with tensors as JSON \"data\" arrays instead of\nbinary data (implies --http)"},
    {"--compress", AT(ENUM, compress), .choices = encodings, .def = "none",
     .help = "HTTP: Content-Encoding of requests and\nAccept-Encoding of answers"},
    {"--json", AT(FLAG, json), .help = "machine-readable output (metadata, models, bench)"},
    {"--help", .kind = BS_OPT_HELP, .alias = "-h", .help = "this help"},
    BS_OPTS_NULL,
};

static const char *const formats[] = {"bin", "json", NULL}; /* enum cli_format */

static const struct bs_opt command_rows[] = {
    {"--output", AT(STR, output), .alias = "-o", .metavar = "FILE",
     .help = "infer: write the outputs to FILE.npy (one output)\n"
             "or FILE.safetensors (every output, by name)"},
    {"--out", AT(STR, out), .metavar = "FILE", .help = "make-request: the file to write"},
    {"--format", AT(ENUM, format), .choices = formats, .def = "bin",
     .help = "make-request: the request as binary protobuf\n(ghz -B) or JSON (ghz -D)"},
    {"--output-dtype", AT(STR, output_dtype), .metavar = "fp32|bf16|fp16",
     .help = "infer, stream, bench: the output's dtype (the\nparameter output_datatype; "
             "default: the model's)"},
    {"--id", AT(STR, id), .metavar = "ID", .help = "infer, bench, make-request: the request id"},
    {"--count", AT(INT64, count), .alias = "-n", .lo = 1, .hi = INT64_MAX, .metavar = "COUNT",
     .want = "an integer", .help = "stream, bench: requests to send (stream: default 1)"},
    {"--duration", AT(SECONDS, duration_s), .alias = "-z", .metavar = "DURATION",
     .help = "bench: send for DURATION (10, 10s, 500ms, 2m)"},
    {"--concurrency", AT(INT, concurrency), .alias = "-c", .lo = 1, .hi = 1000000, .def = "1",
     .metavar = "CONCURRENCY", .want = "a small integer", .help = "bench: calls in flight"},
    {"--rps", AT(DOUBLE, rps), .metavar = "R", .help = "bench: at most R call starts a second"},
    {"--stream", AT(FLAG, stream),
     .help = "bench: one ModelStreamInfer stream per caller,\none request in flight on each"},
    {"--threads", AT(INT, threads), .lo = 1, .hi = 1000000, .def = "1", .metavar = "T",
     .want = "a small integer", .help = "bench: client threads"},
    {"--connections", AT(INT, connections), .lo = 1, .hi = 1000000, .def = "1", .metavar = "K",
     .want = "a small integer", .help = "bench: HTTP/2 connections"},
    {"--shm", AT(FLAG, shm),
     .help = "infer, bench: inputs and outputs through a POSIX\nshared memory region "
             "the CLI makes and registers"},
    {"--offset", AT(INT64, offset), .lo = 0, .hi = INT64_MAX, .def = "0", .metavar = "O",
     .want = "a byte offset", .help = "shm register: where the region starts in KEY"},
    {"--window", AT(INT, window), .lo = 1, .hi = 1000000, .def = "1", .metavar = "W",
     .want = "a small integer", .help = "stream: requests in flight"},
    BS_OPTS_NULL,
};

static const struct bs_opt *const cli_tables[] = {input_rows, connection_rows, command_rows, NULL};
static const struct bs_opts_cmd cli_cmd = {cli_tables, "MODEL", offsetof(struct cli, model), false};

void cli_usage(FILE *out)
{
    fprintf(
        out,
        "usage: blockserve-cli COMMAND [MODEL] [options]\n"
        "\n"
        "commands:\n"
        "  health [MODEL]            exit 0 only when the server (and MODEL) is ready\n"
        "  models                    one line per model: name version state [reason]\n"
        "  metadata MODEL            inputs and outputs: name, datatype, shape\n"
        "  infer MODEL [inputs] [--output FILE.npy|FILE.safetensors] [--shm]\n"
        "  stream MODEL [inputs] [-n COUNT] [--window W]\n"
        "                            COUNT requests over one ModelStreamInfer stream\n"
        "  bench MODEL -c CONCURRENCY (-n COUNT | -z DURATION) [--rps R] [--stream]\n"
        "        [inputs] [--threads T] [--connections K] [--shm] [--json]\n"
        "  load MODEL                RepositoryModelLoad (HTTP: POST .../load)\n"
        "  unload MODEL              RepositoryModelUnload\n"
        "  shm register NAME KEY SIZE [--offset O]\n"
        "                            register system shared memory KEY as NAME\n"
        "  shm status [NAME]         one line per region: name key offset byte_size\n"
        "  shm unregister [NAME]     unregister NAME (none given: every region)\n"
        "  make-request MODEL [inputs] --out FILE [--format bin|json]\n"
        "                            a serialized ModelInferRequest (ghz -B), or ghz JSON (-D)\n"
        "  version                   blockserve-cli's version\n"
        "\n"
        "inputs (default: random data for the model's required inputs, shaped from its\n"
        "metadata with variable dims set to 1):\n");
    bs_opts_help(out, input_rows, 26);
    fprintf(out, "\nconnection (every command):\n");
    bs_opts_help(out, connection_rows, 26);
    fprintf(out, "\ncommand options:\n");
    bs_opts_help(out, command_rows, 26);
}

static int read_token_file(struct cli *a)
{
    FILE *f = fopen(a->token_file, "r");
    if (f == NULL) {
        fprintf(stderr, "blockserve-cli %s: --token-file %s: %s\n", a->cmd, a->token_file,
                strerror(errno));
        return -1;
    }
    size_t n = fread(a->token, 1, sizeof(a->token) - 1, f);
    fclose(f);
    a->token[n] = '\0';
    a->token[strcspn(a->token, "\r\n")] = '\0'; /* the first line */
    while (n > 0 && (a->token[n - 1] == ' ' || a->token[n - 1] == '\t' || !a->token[n - 1]))
        a->token[--n] = '\0';
    if (a->token[0] == '\0') {
        fprintf(stderr, "blockserve-cli %s: --token-file %s is empty\n", a->cmd, a->token_file);
        return -1;
    }
    a->co.token = a->token;
    return 0;
}

/* shm ACTION [NAME [KEY [SIZE]]]: the words before the first option. */
static int take_shm_args(int *argc, char ***argv, struct cli *a)
{
    while (*argc > 1 && (*argv)[1][0] != '-' && a->n_args < 4) {
        a->args[a->n_args++] = (*argv)[1];
        (*argv)[1] = (*argv)[0]; /* shift: argv[0] stays the subcommand */
        (*argv)++;
        (*argc)--;
    }
    if (a->n_args == 0) {
        fprintf(stderr, "blockserve-cli shm: give register, status or unregister\n");
        return -1;
    }
    return 0;
}

/* --output-dtype into the datatype name the server takes. */
static int output_datatype(struct cli *a)
{
    static const char *const names[][2] = {{"fp32", "FP32"}, {"bf16", "BF16"}, {"fp16", "FP16"}};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcasecmp(a->output_dtype, names[i][0]) == 0) {
            a->output_datatype = names[i][1];
            return 0;
        }
    fprintf(stderr, "blockserve-cli %s: --output-dtype '%s': expected fp32, bf16 or fp16\n", a->cmd,
            a->output_dtype);
    return -1;
}

int cli_parse(int argc, char **argv, struct cli *a)
{
    struct bs_opts_err e;
    memset(a, 0, sizeof(*a));
    a->cmd = argv[0];
    if (!strcmp(a->cmd, "shm") && take_shm_args(&argc, &argv, a) != 0)
        return -1;
    int rc = bs_opts_parse(&cli_cmd, a, argc, argv, &e);
    if (rc == BS_OPTS_HELP) {
        cli_usage(stdout);
        return 1;
    }
    if (rc != BS_OPTS_OK) {
        fprintf(stderr, "blockserve-cli %s: %s%s\n", a->cmd, e.msg,
                rc == BS_OPTS_ENOVALUE ? " (or is unknown)" : "");
        return -1;
    }
    a->co.connect_timeout_s = a->co.call_timeout_s; /* --timeout sets both */
    a->http = a->http || a->http_json || bs_http_url_is_http(a->co.url);
    if (a->compress != BS_HTTP_IDENTITY && !a->http) {
        fprintf(stderr, "blockserve-cli %s: --compress is for HTTP (add --http)\n", a->cmd);
        return -1;
    }
    if (a->co.token && a->token_file) {
        fprintf(stderr, "blockserve-cli %s: give --token or --token-file, not both\n", a->cmd);
        return -1;
    }
    if (a->output_dtype != NULL && output_datatype(a) != 0)
        return -1;
    return a->token_file ? read_token_file(a) : 0;
}
