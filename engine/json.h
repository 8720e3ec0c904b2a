/* A small, strict JSON parser (RFC 8259) building a read-only tree. The whole
 * tree lives in one allocation list owned by the document. */
#ifndef BS_JSON_H
#define BS_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"

enum bs_json_type {
    BS_JSON_NULL,
    BS_JSON_BOOL,
    BS_JSON_NUMBER,
    BS_JSON_STRING,
    BS_JSON_ARRAY,
    BS_JSON_OBJECT,
};

struct bs_json {
    enum bs_json_type type;
    bool boolean;
    double number;        /* BS_JSON_NUMBER */
    bool is_integer;      /* number written without fraction or exponent and fits int64 */
    int64_t integer;      /* valid when is_integer */
    const char *string;   /* BS_JSON_STRING: NUL-terminated, unescaped UTF-8 (no NUL inside) */
    size_t len;           /* string length in bytes, or number of children */
    struct bs_json *child; /* first element (array) or member value (object) */
    struct bs_json *next;  /* next sibling */
    const char *key;       /* member name when the parent is an object */
};

typedef struct bs_json_doc bs_json_doc_t;

/* Parse len bytes of text; on success *doc owns the tree and root is
 * bs_json_doc_root(*doc). Errors name the byte offset. max_depth bounds
 * nesting (0: 64). Strings (and keys) holding a NUL, raw or as \u0000, are
 * refused. */
int bs_json_parse(bs_json_doc_t **doc, const char *text, size_t len, int max_depth,
                  struct bs_err *err);

/* The root value of a parsed document. */
const struct bs_json *bs_json_doc_root(const bs_json_doc_t *doc);

/* Free a document and every value in it; NULL is a no-op. */
void bs_json_doc_free(bs_json_doc_t *doc);

/* Member of an object by key (first match), or NULL when absent or obj is not an object. */
const struct bs_json *bs_json_get(const struct bs_json *obj, const char *key);

#endif
