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
    BS_ERANGE = -8,    /* size limit exceeded (also: queue full) */
    BS_ETIMEDOUT = -9, /* a deadline passed */
    BS_ECANCELED = -10, /* the caller went away */
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

#define BS_UNUSED(x) ((void)(x))
#define BS_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#endif
