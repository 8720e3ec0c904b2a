/* blockserve serve: the gRPC inference server's command (serve.c). */
#ifndef BS_SERVE_H
#define BS_SERVE_H

/* blockserve [serve] [options]: parse the options (argv[0] is the command),
 * serve until SIGTERM/SIGINT and return the process exit status: 0 after an
 * orderly stop, 1 when start-up failed, 2 on a usage error. */
int bs_serve_main(int argc, char **argv);

#endif
