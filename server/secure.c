/* TLS file and token checks (see secure.h), with OpenSSL's libcrypto, the
 * library gRPC core itself uses on Debian. Single-threaded: start-up only. */
#include "secure.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#define SECURE_MAX_FILE (1 << 20)

/* The whole of a small text file, NUL-terminated. */
static int read_text(const char *flag, const char *path, char **out, size_t *len,
                     struct bs_err *err)
{
    FILE *f = fopen(path, "rb");
    *out = NULL;
    if (f == NULL)
        return bs_err_set(err, BS_EIO, "%s %s: cannot open: %s", flag, path, strerror(errno));
    char *buf = malloc(SECURE_MAX_FILE + 1);
    if (buf == NULL) {
        fclose(f);
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    }
    size_t n = fread(buf, 1, SECURE_MAX_FILE + 1, f);
    int bad = ferror(f);
    fclose(f);
    if (bad || n > SECURE_MAX_FILE) {
        free(buf);
        return bs_err_set(err, BS_EIO, "%s %s: %s", flag, path,
                          bad ? "cannot read" : "larger than 1 MiB");
    }
    buf[n] = '\0';
    if (memchr(buf, '\0', n) != NULL) {
        free(buf);
        return bs_err_set(err, BS_EFORMAT, "%s %s: not a text file", flag, path);
    }
    *out = buf;
    *len = n;
    return 0;
}

/* OpenSSL's last error, for messages. */
static const char *ssl_reason(void)
{
    unsigned long e = ERR_get_error();
    const char *r = e != 0 ? ERR_reason_error_string(e) : NULL;
    ERR_clear_error();
    return r != NULL ? r : "no PEM data found";
}

/* The first certificate of a PEM text, checked for its validity period. */
static int parse_cert(const char *flag, const char *path, const char *pem, X509 **out,
                      struct bs_err *err)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    X509 *x = bio != NULL ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    *out = NULL;
    if (x == NULL)
        return bs_err_set(err, BS_EFORMAT, "%s %s: not a PEM certificate (%s)", flag, path,
                          ssl_reason());
    if (X509_cmp_current_time(X509_get0_notAfter(x)) < 0 ||
        X509_cmp_current_time(X509_get0_notBefore(x)) > 0) {
        X509_free(x);
        return bs_err_set(err, BS_EINVAL, "%s %s: the certificate is expired or not yet valid",
                          flag, path);
    }
    *out = x;
    return 0;
}

/* The key parses and belongs to the certificate. */
static int check_key(const char *key_file, const char *pem, X509 *cert, const char *cert_file,
                     struct bs_err *err)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    EVP_PKEY *k = bio != NULL ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    if (k == NULL)
        return bs_err_set(err, BS_EFORMAT, "--tls-key %s: not an unencrypted PEM private key (%s)",
                          key_file, ssl_reason());
    int ok = X509_check_private_key(cert, k);
    EVP_PKEY_free(k);
    ERR_clear_error();
    if (ok != 1)
        return bs_err_set(err, BS_EINVAL,
                          "--tls-key %s does not match the certificate in "
                          "--tls-cert %s",
                          key_file, cert_file);
    return 0;
}

int bs_secure_load_tls(struct bs_secure *sec, const char *cert_file, const char *key_file,
                       const char *client_ca_file, struct bs_err *err)
{
    size_t len;
    X509 *cert = NULL, *ca = NULL;
    int rc;
    if (cert_file == NULL && key_file == NULL && client_ca_file == NULL)
        return 0;
    if (cert_file == NULL || key_file == NULL)
        return bs_err_set(err, BS_EINVAL, "TLS needs both --tls-cert and --tls-key%s",
                          client_ca_file ? " (--tls-client-ca adds client verification)" : "");
    if ((rc = read_text("--tls-cert", cert_file, &sec->cert_chain, &len, err)) != 0 ||
        (rc = read_text("--tls-key", key_file, &sec->key, &len, err)) != 0 ||
        (client_ca_file != NULL &&
         (rc = read_text("--tls-client-ca", client_ca_file, &sec->client_ca, &len, err)) != 0))
        return rc;
    if ((rc = parse_cert("--tls-cert", cert_file, sec->cert_chain, &cert, err)) != 0)
        return rc;
    rc = check_key(key_file, sec->key, cert, cert_file, err);
    X509_free(cert);
    if (rc == 0 && client_ca_file != NULL &&
        (rc = parse_cert("--tls-client-ca", client_ca_file, sec->client_ca, &ca, err)) == 0)
        X509_free(ca);
    return rc;
}

int bs_secure_load_token(struct bs_secure *sec, const char *token_file, struct bs_err *err)
{
    size_t n;
    int rc;
    if (token_file == NULL)
        return 0;
    if ((rc = read_text("--auth-token-file", token_file, &sec->token, &n, err)) != 0)
        return rc;
    while (n > 0 && (sec->token[n - 1] == ' ' || sec->token[n - 1] == '\t' ||
                     sec->token[n - 1] == '\n' || sec->token[n - 1] == '\r'))
        sec->token[--n] = '\0';
    if (n == 0)
        return bs_err_set(err, BS_EINVAL, "--auth-token-file %s: the token is empty", token_file);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)sec->token[i] < 0x20 || (unsigned char)sec->token[i] > 0x7e)
            return bs_err_set(err, BS_EINVAL,
                              "--auth-token-file %s: the token must be one line "
                              "of printable ASCII",
                              token_file);
    return 0;
}

static void wipe_free(char *s)
{
    if (s != NULL)
        explicit_bzero(s, strlen(s));
    free(s);
}

void bs_secure_free(struct bs_secure *sec)
{
    free(sec->cert_chain);
    wipe_free(sec->key);
    free(sec->client_ca);
    wipe_free(sec->token);
    memset(sec, 0, sizeof(*sec));
}
