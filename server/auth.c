/* Bearer-token authentication (see auth.h). The comparison takes the same
 * time whatever the bytes received (it depends on the expected length only),
 * and it compares lengths, so "Bearer <token>\0junk" is not the token. */
#include "auth.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define SCHEME_LEN 7 /* "Bearer " */

struct bs_auth {
    char *expected; /* "Bearer <token>" */
    size_t len;
};

int bs_auth_bearer_init(bs_auth_t **auth, const char *token, struct bs_err *err)
{
    *auth = NULL;
    if (token == NULL || token[0] == '\0')
        return bs_err_set(err, BS_EINVAL, "empty bearer token");
    bs_auth_t *a = calloc(1, sizeof(*a));
    if (a == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    a->len = SCHEME_LEN + strlen(token);
    a->expected = malloc(a->len + 1);
    if (a->expected == NULL) {
        free(a);
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    }
    snprintf(a->expected, a->len + 1, "Bearer %s", token);
    *auth = a;
    return 0;
}

bool bs_auth_check_value(const bs_auth_t *a, const char *got, size_t n, const char **why)
{
    if (got == NULL) {
        *why = "missing \"authorization: Bearer <token>\"";
        return false;
    }
    unsigned char diff = n != a->len;
    diff |= n < SCHEME_LEN || strncasecmp(got, a->expected, SCHEME_LEN) != 0;
    for (size_t i = SCHEME_LEN; i < a->len; i++)
        diff |= (unsigned char)(a->expected[i] ^ (i < n ? got[i] : 0));
    if (diff == 0)
        return true;
    *why = memchr(got, 0, n) != NULL ? "invalid bearer token (it contains a NUL byte)"
                                     : "invalid bearer token";
    return false;
}

static bool auth_check(void *arg, const bs_rpc_call_t *call, const char **why)
{
    const bs_auth_t *a = arg;
    size_t n = 0;
    const char *got = bs_rpc_call_metadata_bytes(call, "authorization", &n);
    if (got == NULL) {
        *why = "missing \"authorization: Bearer <token>\" metadata";
        return false;
    }
    return bs_auth_check_value(a, got, n, why);
}

struct bs_rpc_auth bs_auth_hook(bs_auth_t *auth)
{
    return (struct bs_rpc_auth){.check = auth_check, .arg = auth};
}

void bs_auth_free(bs_auth_t *auth)
{
    if (auth == NULL)
        return;
    explicit_bzero(auth->expected, auth->len);
    free(auth->expected);
    free(auth);
}
