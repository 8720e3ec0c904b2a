/* The blockserve command line: one function per subcommand, each returning
 * the process exit status. */
#ifndef BS_CLI_H
#define BS_CLI_H

/* blockserve forward MODEL_DIR --inputs IN --output OUT [--device D] [--threads N]
 *     [--dtype fp32|bf16|fp16] [--tf32] */
int bs_cli_forward(int argc, char **argv);

/* blockserve bench MODEL_DIR --inputs IN [--reps N] [--threads N] [--device D]
 *     [--dtype fp32|bf16|fp16] [--tf32] */
int bs_cli_bench(int argc, char **argv);

/* blockserve example [NAME --out DIR]: list or write a built-in example model */
int bs_cli_example(int argc, char **argv);

/* blockserve serve [options]: the gRPC inference server */
int bs_cli_serve(int argc, char **argv);

#endif
