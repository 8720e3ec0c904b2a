#include "common.h"

#include <stdarg.h>
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

const char *bs_status_str(int code)
{
    switch (code) {
    case BS_OK: return "ok";
    case BS_EINVAL: return "invalid argument";
    case BS_ENOMEM: return "out of memory";
    case BS_EIO: return "i/o error";
    case BS_EFORMAT: return "malformed file";
    case BS_ENOTFOUND: return "not found";
    case BS_EUNSUPP: return "unsupported";
    case BS_EINTERNAL: return "internal error";
    case BS_ERANGE: return "limit exceeded";
    case BS_ETIMEDOUT: return "deadline exceeded";
    case BS_ECANCELED: return "cancelled";
    case BS_EBUSY: return "overloaded";
    default: return "unknown error";
    }
}
