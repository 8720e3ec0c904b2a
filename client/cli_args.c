/* blockserve-cli option parsing. */
#include "cli_args.h"

#include <stdio.h>

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

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
        "  infer MODEL [inputs] [--output FILE.npy|FILE.safetensors]\n"
        "  stream MODEL [inputs] [-n COUNT] [--window W]\n"
        "                            COUNT requests over one ModelStreamInfer stream\n"
        "  bench MODEL -c CONCURRENCY (-n COUNT | -z DURATION) [--rps R] [--stream]\n"
        "        [inputs] [--threads T] [--connections K] [--json]\n"
        "  make-request MODEL [inputs] --out FILE [--format bin|json]\n"
        "                            a serialized ModelInferRequest (ghz -B), or ghz JSON (-D)\n"
        "\n"
        "inputs (default: random data for the model's required inputs, shaped from its\n"
        "metadata with variable dims set to 1):\n"
        "  --input NAME=FILE.npy     --input FILE.safetensors (every tensor, by name)\n"
        "  --input NAME=FILE.safetensors (that tensor, or the file's only one)\n"
        "  --shape NAME=d1,d2,...[:DATATYPE]   random data of that shape\n"
        "  --seed N                  seed of the random data (default 1)\n"
        "\n"
        "connection (every command):\n"
        "  -u, --url HOST:PORT       server (default localhost:8001; grpcs:// means TLS)\n"
        "  --timeout SECONDS         deadline for connecting (default 5) and per call\n"
        "                            (default 60, bench: 10)\n"
        "  --tls                     TLS with the system's root certificates\n"
        "  --tls-ca FILE             TLS, trusting the CA certificates in FILE (PEM)\n"
        "  --tls-cert FILE --tls-key FILE   client certificate for mutual TLS\n"
        "  --tls-server-name NAME    name expected in the server's certificate\n"
        "  --token TOKEN | --token-file FILE   send \"authorization: Bearer TOKEN\"\n"
        "  --json                    machine-readable output (metadata, models, bench)\n");
}

static int bad(const struct cli *a, const char *flag, const char *val, const char *want)
{
    fprintf(stderr, "blockserve-cli %s: %s: expected %s, got \"%s\"\n", a->cmd, flag, want, val);
    return -1;
}

static int parse_i64(const struct cli *a, const char *flag, const char *s, int64_t lo, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo)
        return bad(a, flag, s, "an integer");
    *out = v;
    return 0;
}

static int parse_int(const struct cli *a, const char *flag, const char *s, int lo, int *out)
{
    int64_t v;
    if (parse_i64(a, flag, s, lo, &v) != 0 || v > 1000000)
        return bad(a, flag, s, "a small integer");
    *out = (int)v;
    return 0;
}

/* "2.5", "10s", "500ms", "2m", "1h" as seconds. */
static int parse_seconds(const struct cli *a, const char *flag, const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    double unit = !strcmp(end, "") || !strcmp(end, "s") ? 1
                  : !strcmp(end, "ms")                  ? 1e-3
                  : !strcmp(end, "m")                   ? 60
                  : !strcmp(end, "h")                   ? 3600
                                                        : -1;
    if (errno || end == s || unit < 0 || !isfinite(v) || v <= 0)
        return bad(a, flag, s, "a positive duration (10, 10s, 500ms, 2m)");
    *out = v * unit;
    return 0;
}

static int parse_double(const struct cli *a, const char *flag, const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v <= 0)
        return bad(a, flag, s, "a positive number");
    *out = v;
    return 0;
}

static int add_spec(const struct cli *a, const char *flag, const char **list, int *n, const char *v)
{
    if (*n == CLI_MAX_SPECS) {
        fprintf(stderr, "blockserve-cli %s: at most %d %s options\n", a->cmd, CLI_MAX_SPECS, flag);
        return -1;
    }
    list[(*n)++] = v;
    return 0;
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

/* One "--flag value" pair; 1 when flag is not a valued option. */
static int parse_valued(struct cli *a, const char *f, const char *v)
{
    if (!strcmp(f, "-u") || !strcmp(f, "--url"))
        a->co.url = v;
    else if (!strcmp(f, "--timeout")) {
        if (parse_seconds(a, f, v, &a->co.call_timeout_s) != 0)
            return -1;
        a->co.connect_timeout_s = a->co.call_timeout_s;
    } else if (!strcmp(f, "--tls-ca"))
        a->co.tls_ca = v;
    else if (!strcmp(f, "--tls-cert"))
        a->co.tls_cert = v;
    else if (!strcmp(f, "--tls-key"))
        a->co.tls_key = v;
    else if (!strcmp(f, "--tls-server-name"))
        a->co.tls_server_name = v;
    else if (!strcmp(f, "--token"))
        a->co.token = v;
    else if (!strcmp(f, "--token-file"))
        a->token_file = v;
    else if (!strcmp(f, "--input"))
        return add_spec(a, f, a->inputs, &a->n_inputs, v);
    else if (!strcmp(f, "--shape"))
        return add_spec(a, f, a->shapes, &a->n_shapes, v);
    else if (!strcmp(f, "--output") || !strcmp(f, "-o"))
        a->output = v;
    else if (!strcmp(f, "--out"))
        a->out = v;
    else if (!strcmp(f, "--format")) {
        if (strcmp(v, "bin") != 0 && strcmp(v, "json") != 0)
            return bad(a, f, v, "bin or json");
        a->format = v;
    } else if (!strcmp(f, "--id"))
        a->id = v;
    else if (!strcmp(f, "-n") || !strcmp(f, "--count"))
        return parse_i64(a, f, v, 1, &a->count);
    else if (!strcmp(f, "-z") || !strcmp(f, "--duration"))
        return parse_seconds(a, f, v, &a->duration_s);
    else if (!strcmp(f, "-c") || !strcmp(f, "--concurrency"))
        return parse_int(a, f, v, 1, &a->concurrency);
    else if (!strcmp(f, "--rps"))
        return parse_double(a, f, v, &a->rps);
    else if (!strcmp(f, "--threads"))
        return parse_int(a, f, v, 1, &a->threads);
    else if (!strcmp(f, "--connections"))
        return parse_int(a, f, v, 1, &a->connections);
    else if (!strcmp(f, "--window"))
        return parse_int(a, f, v, 1, &a->window);
    else if (!strcmp(f, "--seed")) {
        int64_t s;
        if (parse_i64(a, f, v, 0, &s) != 0)
            return -1;
        a->seed = (uint64_t)s;
    } else
        return 1;
    return 0;
}

int cli_parse(int argc, char **argv, struct cli *a)
{
    memset(a, 0, sizeof(*a));
    a->cmd = argv[0];
    a->format = "bin";
    a->seed = 1;
    a->concurrency = 1;
    a->connections = 1;
    a->window = 1;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "--json"))
            a->json = true;
        else if (!strcmp(f, "--stream"))
            a->stream = true;
        else if (!strcmp(f, "--tls"))
            a->co.tls = true;
        else if (f[0] != '-' || f[1] == '\0') {
            if (a->model != NULL) {
                fprintf(stderr, "blockserve-cli %s: unexpected argument \"%s\"\n", a->cmd, f);
                return -1;
            }
            a->model = f;
        } else if (i + 1 >= argc) {
            fprintf(stderr, "blockserve-cli %s: %s needs a value (or is unknown)\n", a->cmd, f);
            return -1;
        } else {
            int rc = parse_valued(a, f, argv[++i]);
            if (rc == 1)
                fprintf(stderr, "blockserve-cli %s: unknown option \"%s\"\n", a->cmd, f);
            if (rc != 0)
                return -1;
        }
    }
    if (a->co.token && a->token_file) {
        fprintf(stderr, "blockserve-cli %s: give --token or --token-file, not both\n", a->cmd);
        return -1;
    }
    return a->token_file ? read_token_file(a) : 0;
}
