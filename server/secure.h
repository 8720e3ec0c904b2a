/* Start-up checks for the transport's security options: TLS certificate,
 * key and client CA files are read and validated (PEM parses, the key
 * matches the certificate, the certificate is within its validity period),
 * and the bearer token file is read. Errors name the flag and the file; the
 * token itself never appears in a message. Called once, before serving. */
#ifndef BS_SECURE_H
#define BS_SECURE_H

#include "common.h"

/* PEM texts for bs_rpc_options (NULL where not configured). */
struct bs_secure {
    char *cert_chain, *key, *client_ca;
    char *token;
};

/* Read and check --tls-cert/--tls-key (both or neither) and --tls-client-ca
 * (needs the other two) into sec; any argument may be NULL. */
int bs_secure_load_tls(struct bs_secure *sec, const char *cert_file, const char *key_file,
                       const char *client_ca_file, struct bs_err *err);

/* Read --auth-token-file: the content without trailing whitespace, which must
 * be non-empty printable ASCII (it travels in an HTTP/2 header). */
int bs_secure_load_token(struct bs_secure *sec, const char *token_file, struct bs_err *err);

/* Wipe the key and token and free everything; safe on a zeroed struct. */
void bs_secure_free(struct bs_secure *sec);

#endif
