/* Error codes and the error-message carrier shared by every engine module. */
#ifndef BS_COMMON_H
#define BS_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* Why a request failed, as metrics report it (Triton's reason labels). */
enum bs_reason {
    BS_REASON_NONE = -1, /* not a failure */
    BS_REASON_REJECTED,  /* not admitted, or dropped unrun (queue full, deadline, shutdown) */
    BS_REASON_CANCELED,  /* the caller went away */
    BS_REASON_BACKEND,   /* the computation itself failed */
    BS_REASON_OTHER,     /* an invalid request */
};

/* The one table of status codes: X(name, value, message, gRPC status, HTTP
 * status, metrics reason). Functions that can fail return 0 or one of these
 * negative codes; every front end and the metrics translate a code through
 * this table only (bs_status_*). gRPC statuses are grpc/status.h's numbers;
 * HTTP statuses follow how Triton's HTTP front end answers (499: the client
 * closed the request, as nginx logs it). */
#define BS_STATUS_MAP(X)                                                                           \
    X(OK, 0, "ok", 0, 200, NONE)                                                                   \
    X(EINVAL, -1, "invalid argument", 3, 400, OTHER)                                               \
    X(ENOMEM, -2, "out of memory", 8, 500, BACKEND)                                                \
    X(EIO, -3, "i/o error", 13, 500, BACKEND)                                                      \
    X(EFORMAT, -4, "malformed file", 3, 400, OTHER)                                                \
    X(ENOTFOUND, -5, "not found", 5, 404, OTHER)                                                   \
    X(EUNSUPP, -6, "unsupported", 14, 503, REJECTED)                                               \
    X(EINTERNAL, -7, "internal error", 13, 500, BACKEND)                                           \
    X(ERANGE, -8, "limit exceeded", 8, 400, OTHER)                                                 \
    X(ETIMEDOUT, -9, "deadline exceeded", 4, 503, REJECTED)                                        \
    X(ECANCELED, -10, "cancelled", 1, 499, CANCELED)                                               \
    X(EBUSY, -11, "overloaded", 8, 429, REJECTED)                                                  \
    X(ENOTIMPL, -12, "not implemented", 12, 501, OTHER)                                            \
    X(EEXIST, -13, "already exists", 6, 409, OTHER)

/* BS_EINVAL: bad argument, shape, dtype or value from the caller; BS_ENOMEM:
 * allocation failed; BS_EIO: a file could not be opened, read or written;
 * BS_EFORMAT: malformed file (safetensors, JSON); BS_ENOTFOUND: unknown
 * model, missing key or input; BS_EUNSUPP: a valid request this build,
 * backend or state cannot serve (also: shutting down); BS_EINTERNAL: backend
 * failure (e.g. a CUDA error); BS_ERANGE: a size limit exceeded;
 * BS_ETIMEDOUT: a deadline passed; BS_ECANCELED: the caller went away;
 * BS_EBUSY: overloaded, a queue or in-flight bound is full (retry later);
 * BS_ENOTIMPL: a method this server or build does not offer (CUDA shared
 * memory without a GPU backend); BS_EEXIST: a name already taken (a shared
 * memory region registered twice). */
enum bs_status {
#define BS_STATUS_ENUM(name, value, msg, grpc, http, reason) BS_##name = value,
    BS_STATUS_MAP(BS_STATUS_ENUM)
#undef BS_STATUS_ENUM
};

/* An error message the caller can show; filled by the function that fails. */
struct bs_err {
    int code;
    char msg[512];
};

/* Record code and a printf-style message in err (err may be NULL); returns code. */
int bs_err_set(struct bs_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefix the message already in err with a printf-style context; returns err->code. */
int bs_err_wrap(struct bs_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A client-chosen name (a model, input or region name) for an error
 * message: copied into buf, which holds BS_SHOW_MAX + 4 bytes, cut at
 * BS_SHOW_MAX bytes on a UTF-8 character boundary with "..." appended,
 * control characters as '?'. Returns buf. */
#define BS_SHOW_MAX 64
const char *bs_show(char *buf, const char *s);

/* A short constant message for a status code ("invalid argument", ...). */
const char *bs_status_str(int code);

/* The code's name ("BS_EINVAL"; "BS_E?" for a value not in the table). */
const char *bs_status_name(int code);

/* The gRPC status (grpc/status.h numbering), HTTP status and metrics reason
 * a code is answered and counted with (unknown codes: INTERNAL, 500,
 * BACKEND). */
int bs_status_grpc(int code);
int bs_status_http(int code);
enum bs_reason bs_status_reason(int code);

/* Saturating arithmetic for deadlines and sizes that clients choose: a result
 * that would overflow is INT64_MAX ("never"), INT64_MIN the other way. */
static inline int64_t bs_add_sat(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r))
        return b > 0 ? INT64_MAX : INT64_MIN;
    return r;
}

static inline int64_t bs_mul_sat(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r))
        return (a < 0) != (b < 0) ? INT64_MIN : INT64_MAX;
    return r;
}

/* The deadline timeout_us microseconds after now_ns (ns), saturating at
 * INT64_MAX; timeout_us <= 0 means none (INT64_MAX). */
static inline int64_t bs_deadline_after_us(int64_t now_ns, int64_t timeout_us)
{
    return timeout_us <= 0 ? INT64_MAX : bs_add_sat(now_ns, bs_mul_sat(timeout_us, 1000));
}

#define BS_UNUSED(x)    ((void)(x))
#define BS_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#endif
