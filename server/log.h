/* Structured logging to stderr: one line per event, as text or as JSON, with
 * a level and optional request id. Safe from any thread (one write per line). */
#ifndef BS_LOG_H
#define BS_LOG_H

#include <stdarg.h>

enum bs_log_level {
    BS_LOG_ERROR,
    BS_LOG_WARN,
    BS_LOG_INFO,
    BS_LOG_VERBOSE,
};

/* Configure: verbosity 0 logs errors, warnings and info; 1 adds verbose
 * per-request lines. json selects JSON lines. */
void bs_log_init(int verbosity, int json);

/* Log one event; request_id may be NULL. */
void bs_log(enum bs_log_level level, const char *request_id, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A library's message (libmicrohttpd's logger callback), as one line at
 * level, headed by prefix: trailing newlines dropped. */
void bs_log_lib(enum bs_log_level level, const char *prefix, const char *fmt, va_list ap);

#endif
