#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int log_verbosity;
static int log_json;

void bs_log_init(int verbosity, int json)
{
    log_verbosity = verbosity;
    log_json = json;
}

/* Append s to buf as the inside of a JSON string. */
static size_t json_escape(char *buf, size_t size, const char *s)
{
    size_t o = 0;
    for (; *s && o + 7 < size; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            buf[o++] = '\\';
            buf[o++] = (char)c;
        } else if (c < 0x20) {
            o += (size_t)snprintf(buf + o, size - o, "\\u%04x", c);
        } else {
            buf[o++] = (char)c;
        }
    }
    buf[o] = '\0';
    return o;
}

void bs_log(enum bs_log_level level, const char *request_id, const char *fmt, ...)
{
    static const char *const names[] = {"error", "warn", "info", "verbose"};
    char msg[1024], line[3072], ts[64];
    struct timeval tv;
    struct tm tm;
    va_list ap;
    if ((int)level > BS_LOG_INFO + log_verbosity)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + n, sizeof(ts) - n, ".%06ldZ", (long)tv.tv_usec);
    int len;
    if (log_json) {
        char esc_msg[2048], esc_id[512] = "";
        json_escape(esc_msg, sizeof(esc_msg), msg);
        if (request_id != NULL)
            json_escape(esc_id, sizeof(esc_id), request_id);
        len =
            snprintf(line, sizeof(line), "{\"ts\":\"%s\",\"level\":\"%s\"%s%s%s,\"msg\":\"%s\"}\n",
                     ts, names[level], request_id ? ",\"request_id\":\"" : "", esc_id,
                     request_id ? "\"" : "", esc_msg);
    } else {
        len = snprintf(line, sizeof(line), "%s %-7s %s%s%s%s\n", ts, names[level],
                       request_id ? "[" : "", request_id ? request_id : "", request_id ? "] " : "",
                       msg);
    }
    if (len > (int)sizeof(line) - 1)
        len = (int)sizeof(line) - 1;
    if (write(STDERR_FILENO, line, (size_t)len) < 0) {
        /* nothing sensible to do when stderr is gone */
    }
}

void bs_log_lib(enum bs_log_level level, const char *prefix, const char *fmt, va_list ap)
{
    char msg[512];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && msg[n - 1] == '\n')
        msg[--n] = '\0';
    bs_log(level, NULL, "%s: %s", prefix, msg);
}
