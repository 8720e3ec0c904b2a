/* blockserve forward, bench and example: the engine from the command line,
 * without the server. Each returns the process exit status (2: a usage
 * error). */
#ifndef BS_TOOLS_H
#define BS_TOOLS_H

#include <stdio.h>

/* blockserve forward MODEL_DIR --inputs IN --output OUT [options]: one forward pass */
int bs_tools_forward(int argc, char **argv);

/* blockserve bench MODEL_DIR --inputs IN [options]: timed forward passes */
int bs_tools_bench(int argc, char **argv);

/* blockserve example [NAME --out DIR]: list or write a built-in example model */
int bs_tools_example(int argc, char **argv);

/* Print the commands' entries of blockserve --help (synopsis and summary). */
void bs_tools_usage(FILE *f);

#endif
