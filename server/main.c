/* blockserve: entry point and subcommand dispatch. */
#include <stdio.h>
#include <string.h>

#include "serve.h"
#include "tools.h"
#include "version.h"

static void usage(FILE *out)
{
    fprintf(out, "usage: blockserve COMMAND [ARGS]\n"
                 "\n"
                 "commands:\n"
                 "  serve [options]   (the default) the gRPC inference server; serve --help\n");
    bs_tools_usage(out);
    fprintf(out, "  version\n"
                 "\n"
                 "MODEL_DIR holds config.json (diffusers' _class_name and arguments) and\n"
                 "diffusion_pytorch_model.safetensors (diffusers' state_dict keys).\n");
}

int main(int argc, char **argv)
{
    if (argc < 2 || (argv[1][0] == '-' && strcmp(argv[1], "--help") && strcmp(argv[1], "-h") &&
                     strcmp(argv[1], "--version")))
        return bs_serve_main(argc, argv); /* plain "blockserve [options]" serves */
    const char *cmd = argv[1];
    if (strcmp(cmd, "serve") == 0)
        return bs_serve_main(argc - 1, argv + 1);
    if (strcmp(cmd, "forward") == 0)
        return bs_tools_forward(argc - 1, argv + 1);
    if (strcmp(cmd, "bench") == 0)
        return bs_tools_bench(argc - 1, argv + 1);
    if (strcmp(cmd, "example") == 0)
        return bs_tools_example(argc - 1, argv + 1);
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        printf("blockserve %s\n", BS_VERSION);
        return 0;
    }
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "blockserve: unknown command \"%s\"\n\n", cmd);
    usage(stderr);
    return 2;
}
