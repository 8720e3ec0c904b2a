/* Error codes and the error-message carrier shared by every engine module. */
#ifndef BS_COMMON_H
#define BS_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* Functions that can fail return 0 or one of these negative codes. */
enum bs_status {
    BS_OK = 0,
    BS_EINVAL = -1,    /* bad argument, shape, dtype or value from the caller */
    BS_ENOMEM = -2,    /* allocation failed */
    BS_EIO = -3,       /* file could not be opened, read or written */
    BS_EFORMAT = -4,   /* malformed file (safetensors, JSON) */
    BS_ENOTFOUND = -5, /* unknown model, missing key or input */
    BS_EUNSUPP = -6,   /* valid request this build or backend cannot run */
    BS_EINTERNAL = -7, /* backend failure (e.g. a CUDA error) */
    BS_ERANGE = -8,    /* size limit exceeded */
    BS_ETIMEDOUT = -9, /* a deadline passed */
    BS_ECANCELED = -10, /* the caller went away */
    BS_EBUSY = -11,     /* overloaded: a queue or in-flight bound is full; retry later */
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

/* A short constant name for a status code ("invalid argument", ...). */
const char *bs_status_str(int code);

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

#define BS_UNUSED(x) ((void)(x))
#define BS_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#endif
