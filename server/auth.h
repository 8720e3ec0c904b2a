/* Bearer-token authentication for the gRPC transport: a hook (struct
 * bs_rpc_auth) that the transport runs before any handler sees a call of a
 * method that is not open. Loop thread only. */
#ifndef BS_AUTH_H
#define BS_AUTH_H

#include "rpc.h"

typedef struct bs_auth bs_auth_t;

/* Keep a copy of token; calls must then carry the metadata
 * "authorization: Bearer <token>" (scheme name case-insensitive, RFC 6750).
 * An empty token is refused (BS_EINVAL). */
int bs_auth_bearer_init(bs_auth_t **auth, const char *token, struct bs_err *err);

/* The hook to hand the transport (it refers to auth, which must outlive it). */
struct bs_rpc_auth bs_auth_hook(bs_auth_t *auth);

/* Whether got (n bytes, NULL: absent) is "Bearer <token>" (lengths
 * compared, constant time); *why says what is wrong otherwise. Reads only
 * what init wrote, so any thread may call it (the HTTP front end does). */
bool bs_auth_check_value(const bs_auth_t *auth, const char *got, size_t n, const char **why);

/* Wipe and free the token copy; NULL is a no-op. */
void bs_auth_free(bs_auth_t *auth);

#endif
