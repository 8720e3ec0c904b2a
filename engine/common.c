#include "common.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

int bs_err_set(struct bs_err *err, int code, const char *fmt, ...)
{
    if (err == NULL)
        return code;
    va_list ap;
    va_start(ap, fmt);
    err->code = code;
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    return code;
}

int bs_err_wrap(struct bs_err *err, const char *fmt, ...)
{
    if (err == NULL)
        return BS_EINTERNAL;
    char prefix[256];
    char old[sizeof(err->msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof(old));
    int n = snprintf(err->msg, sizeof(err->msg), "%s: %s", prefix, old);
    if (n >= (int)sizeof(err->msg)) /* keep the cut message, marked as cut */
        memcpy(err->msg + sizeof(err->msg) - 4, "...", 4);
    return err->code;
}

struct status_row {
    int code;
    const char *name, *msg;
    int grpc, http;
    enum bs_reason reason;
};

static const struct status_row status_rows[] = {
#define BS_STATUS_ROW(name, value, msg, grpc, http, reason)                                        \
    {value, "BS_" #name, msg, grpc, http, BS_REASON_##reason},
    BS_STATUS_MAP(BS_STATUS_ROW)
#undef BS_STATUS_ROW
};

/* Codes unknown to the table are answered as internal errors. */
static const struct status_row status_unknown = {0,  "BS_E?", "unknown error",
                                                 13, 500,     BS_REASON_BACKEND};

static const struct status_row *status_row(int code)
{
    for (size_t i = 0; i < BS_ARRAY_LEN(status_rows); i++)
        if (status_rows[i].code == code)
            return &status_rows[i];
    return &status_unknown;
}

const char *bs_status_str(int code)
{
    return status_row(code)->msg;
}

const char *bs_status_name(int code)
{
    return status_row(code)->name;
}

int bs_status_grpc(int code)
{
    return status_row(code)->grpc;
}

int bs_status_http(int code)
{
    return status_row(code)->http;
}

enum bs_reason bs_status_reason(int code)
{
    return status_row(code)->reason;
}

const char *bs_show(char *buf, const char *s)
{
    size_t n = strnlen(s, BS_SHOW_MAX + 1);
    bool cut = n > BS_SHOW_MAX;
    if (cut) {
        n = BS_SHOW_MAX;
        while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80) /* s[n] continues a char */
            n--;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[i] = c < 0x20 || c == 0x7f ? '?' : (char)c;
    }
    memcpy(buf + n, cut ? "..." : "", cut ? 4 : 1);
    return buf;
}
