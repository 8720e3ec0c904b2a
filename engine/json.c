/* A strict RFC 8259 parser. Parsing is iterative: an explicit stack of open
 * containers (bounded by max_depth) replaces recursion, so hostile input can
 * neither blow the C stack nor allocate without bound beyond its own size.
 * Every node and unescaped string comes from a chunked arena owned by the
 * document, freed in one go. Error offsets are 0-based byte offsets.
 *
 * Strings are handed out NUL-terminated, so a NUL inside one would silently
 * cut it ("Block\u0000evil" read as "Block"): both a raw NUL byte and the
 * escape \u0000 are refused. */
#include "json.h"

#include <errno.h>
#include <math.h>
#include <stdalign.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JSON_DEFAULT_DEPTH 64
#define JSON_CHUNK_SIZE 8192
#define JSON_ALIGN alignof(max_align_t)

struct json_chunk {
    struct json_chunk *next;
    size_t used, cap;
    alignas(max_align_t) unsigned char mem[];
};

struct bs_json_doc {
    struct json_chunk *chunks; /* head is the chunk being filled */
    struct bs_json *root;
};

struct json_frame {
    struct bs_json *node; /* open array or object */
    struct bs_json *last; /* last child linked so far */
};

struct json_parser {
    const char *s;
    size_t len, pos;
    bs_json_doc_t *doc;
    struct json_frame *stack;
    int depth, cap, max_depth;
    const char *key; /* member name waiting for its value */
    struct bs_err *err;
};

/* ---- arena ---- */

static void *doc_alloc(bs_json_doc_t *doc, size_t size)
{
    size = (size + JSON_ALIGN - 1) & ~(JSON_ALIGN - 1);
    struct json_chunk *c = doc->chunks;
    if (c != NULL && c->cap - c->used >= size) {
        void *p = c->mem + c->used;
        c->used += size;
        return p;
    }
    size_t cap = size > JSON_CHUNK_SIZE / 4 ? size : JSON_CHUNK_SIZE;
    struct json_chunk *n = malloc(sizeof(*n) + cap);
    if (n == NULL)
        return NULL;
    n->used = size;
    n->cap = cap;
    if (cap == size && c != NULL) { /* a big block: keep filling the current chunk */
        n->next = c->next;
        c->next = n;
    } else {
        n->next = c;
        doc->chunks = n;
    }
    return n->mem;
}

void bs_json_doc_free(bs_json_doc_t *doc)
{
    if (doc == NULL)
        return;
    struct json_chunk *c = doc->chunks;
    while (c != NULL) {
        struct json_chunk *next = c->next;
        free(c);
        c = next;
    }
    free(doc);
}

const struct bs_json *bs_json_doc_root(const bs_json_doc_t *doc)
{
    return doc ? doc->root : NULL;
}

const struct bs_json *bs_json_get(const struct bs_json *obj, const char *key)
{
    if (obj == NULL || obj->type != BS_JSON_OBJECT)
        return NULL;
    for (const struct bs_json *m = obj->child; m != NULL; m = m->next) {
        if (strcmp(m->key, key) == 0)
            return m;
    }
    return NULL;
}

/* ---- errors ---- */

/* What sits at pos, for "found ..." in messages. */
static const char *json_found(const struct json_parser *p, char *buf, size_t size)
{
    if (p->pos >= p->len)
        return "end of input";
    unsigned char c = (unsigned char)p->s[p->pos];
    if (c >= 0x20 && c < 0x7f && c != '\'')
        snprintf(buf, size, "'%c'", c);
    else
        snprintf(buf, size, "byte 0x%02x", c);
    return buf;
}

static int json_expected(struct json_parser *p, const char *what)
{
    char buf[16];
    return bs_err_set(p->err, BS_EFORMAT, "byte %zu: expected %s, found %s", p->pos, what,
                      json_found(p, buf, sizeof(buf)));
}

static int json_fail(struct json_parser *p, size_t at, const char *what)
{
    return bs_err_set(p->err, BS_EFORMAT, "byte %zu: %s", at, what);
}

static int json_nomem(struct json_parser *p)
{
    return bs_err_set(p->err, BS_ENOMEM, "byte %zu: out of memory", p->pos);
}

/* ---- scanning ---- */

static void json_skip_ws(struct json_parser *p)
{
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            return;
        p->pos++;
    }
}

static int json_peek(const struct json_parser *p)
{
    return p->pos < p->len ? (unsigned char)p->s[p->pos] : -1;
}

static int hex4(const char *s)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0)
            return -1;
        v = v * 16 + d;
    }
    return v;
}

static size_t utf8_put(char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Length of the well-formed UTF-8 sequence at s[0..n) (no overlongs, no
 * surrogates, at most U+10FFFF), or 0 when it is not one. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t k = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3
                          : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (k == 0 || k > n)
        return 0;
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    }
    if ((c == 0xe0 && s[1] < 0xa0) || (c == 0xed && s[1] > 0x9f) || (c == 0xf0 && s[1] < 0x90) ||
        (c == 0xf4 && s[1] > 0x8f))
        return 0;
    return k;
}

/* Decode \uXXXX (and its low-surrogate partner) at p->pos, which points at the 'u'. */
static int json_unicode(struct json_parser *p, uint32_t *cp)
{
    size_t at = p->pos - 1;
    int hi = p->len - p->pos > 4 ? hex4(p->s + p->pos + 1) : -1;
    if (hi < 0)
        return json_fail(p, at, "expected 4 hex digits after \\u");
    p->pos += 5;
    if (hi >= 0xdc00 && hi <= 0xdfff)
        return json_fail(p, at, "lone low surrogate in \\u escape");
    if (hi < 0xd800 || hi > 0xdbff) {
        *cp = (uint32_t)hi;
        return 0;
    }
    int lo = p->len - p->pos > 5 && p->s[p->pos] == '\\' && p->s[p->pos + 1] == 'u'
                 ? hex4(p->s + p->pos + 2)
                 : -1;
    if (lo < 0xdc00 || lo > 0xdfff)
        return json_fail(p, at, "high surrogate not followed by a \\u low surrogate");
    p->pos += 6;
    *cp = 0x10000 + (((uint32_t)hi - 0xd800) << 10) + ((uint32_t)lo - 0xdc00);
    return 0;
}

/* One escape at p->pos (just past the backslash) appended to out. */
static int json_escape(struct json_parser *p, char *out, size_t *n)
{
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    if (p->pos >= p->len)
        return json_expected(p, "an escape character");
    char c = p->s[p->pos];
    const char *k = c != '\0' ? strchr(from, c) : NULL;
    if (k != NULL) {
        out[(*n)++] = to[k - from];
        p->pos++;
        return 0;
    }
    if (c != 'u') {
        p->pos--;
        return json_fail(p, p->pos, "invalid escape (expected one of \\\" \\\\ \\/ \\b \\f "
                                    "\\n \\r \\t \\uXXXX)");
    }
    size_t at = p->pos - 1;
    uint32_t cp = 0;
    int rc = json_unicode(p, &cp);
    if (rc != 0)
        return rc;
    if (cp == 0) /* strings are handed out NUL-terminated: a NUL inside would cut them */
        return json_fail(p, at, "\\u0000 is not allowed in JSON strings");
    *n += utf8_put(out + *n, cp);
    return 0;
}

/* Offset of the closing quote of the string whose body starts at pos, or len. */
static size_t json_string_end(const struct json_parser *p)
{
    size_t i = p->pos;
    while (i < p->len && p->s[i] != '"')
        i += p->s[i] == '\\' ? 2 : 1;
    return i < p->len ? i : p->len;
}

/* A string at p->pos (the opening quote); *out is NUL-terminated in the arena. */
static int json_string(struct json_parser *p, const char **out, size_t *out_len)
{
    size_t start = p->pos++;
    size_t end = json_string_end(p);
    if (end >= p->len)
        return json_fail(p, start, "unterminated string");
    char *buf = doc_alloc(p->doc, end - p->pos + 1); /* unescaping never grows */
    if (buf == NULL)
        return json_nomem(p);
    size_t n = 0;
    while (p->pos < end) {
        unsigned char c = (unsigned char)p->s[p->pos];
        if (c == '\\') {
            p->pos++;
            int rc = json_escape(p, buf, &n);
            if (rc != 0)
                return rc;
        } else if (c == 0) {
            return json_fail(p, p->pos, "NUL byte in string (not allowed in JSON strings)");
        } else if (c < 0x20) {
            return json_fail(p, p->pos, "control character in string (must be escaped)");
        } else {
            size_t k = utf8_len((const unsigned char *)p->s + p->pos, end - p->pos);
            if (k == 0)
                return json_fail(p, p->pos, "invalid UTF-8 in string");
            memcpy(buf + n, p->s + p->pos, k);
            n += k;
            p->pos += k;
        }
    }
    p->pos = end + 1;
    buf[n] = '\0';
    *out = buf;
    *out_len = n;
    return 0;
}

/* ---- numbers ---- */

static size_t json_digits(const struct json_parser *p, size_t i)
{
    while (i < p->len && p->s[i] >= '0' && p->s[i] <= '9')
        i++;
    return i;
}

/* Plain integer text [s, s+n) (optional '-', digits) to int64; false on overflow. */
static bool json_int64(const char *s, size_t n, int64_t *out)
{
    bool neg = s[0] == '-';
    uint64_t limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX, v = 0;
    for (size_t i = neg; i < n; i++) {
        uint64_t d = (uint64_t)(s[i] - '0');
        if (v > (limit - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = neg ? (v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v) : (int64_t)v;
    return true;
}

/* Check the number grammar at p->pos and find its end. */
static int json_number_end(struct json_parser *p, size_t *end, bool *plain)
{
    size_t i = p->pos + (p->s[p->pos] == '-');
    if (i >= p->len || p->s[i] < '0' || p->s[i] > '9') {
        p->pos = i;
        return json_expected(p, "a digit");
    }
    if (p->s[i] == '0' && i + 1 < p->len && p->s[i + 1] >= '0' && p->s[i + 1] <= '9')
        return json_fail(p, i, "leading zeros are not allowed in numbers");
    i = json_digits(p, i);
    *plain = true;
    if (i < p->len && p->s[i] == '.') {
        *plain = false;
        size_t j = json_digits(p, ++i);
        if (j == i) {
            p->pos = j;
            return json_expected(p, "a digit after '.'");
        }
        i = j;
    }
    if (i < p->len && (p->s[i] == 'e' || p->s[i] == 'E')) {
        *plain = false;
        i += 1 + (i + 1 < p->len && (p->s[i + 1] == '+' || p->s[i + 1] == '-'));
        size_t j = json_digits(p, i);
        if (j == i) {
            p->pos = j;
            return json_expected(p, "a digit in the exponent");
        }
        i = j;
    }
    *end = i;
    return 0;
}

static int json_number(struct json_parser *p, struct bs_json *v)
{
    bool plain = false;
    size_t start = p->pos, end = 0;
    int rc = json_number_end(p, &end, &plain);
    if (rc != 0)
        return rc;
    size_t n = end - start;
    char small[64], *buf = n < sizeof(small) ? small : malloc(n + 1);
    if (buf == NULL)
        return json_nomem(p);
    memcpy(buf, p->s + start, n);
    buf[n] = '\0';
    errno = 0;
    v->number = strtod(buf, NULL); /* the grammar above is a subset of strtod's, in the C locale */
    bool overflow = errno == ERANGE && isinf(v->number);
    v->is_integer = plain && json_int64(buf, n, &v->integer);
    if (buf != small)
        free(buf);
    if (overflow)
        return json_fail(p, start, "number out of range");
    p->pos = end;
    return 0;
}

/* ---- values and containers ---- */

static int json_literal(struct json_parser *p, struct bs_json *v)
{
    static const struct {
        const char *text;
        enum bs_json_type type;
        bool value;
    } lits[] = {
        {"true", BS_JSON_BOOL, true},
        {"false", BS_JSON_BOOL, false},
        {"null", BS_JSON_NULL, false},
    };
    for (size_t i = 0; i < BS_ARRAY_LEN(lits); i++) {
        size_t n = strlen(lits[i].text);
        if (p->len - p->pos >= n && memcmp(p->s + p->pos, lits[i].text, n) == 0) {
            v->type = lits[i].type;
            v->boolean = lits[i].value;
            p->pos += n;
            return 0;
        }
    }
    return json_expected(p, "a value");
}

/* Link v into the open container (or make it the root). */
static void json_link(struct json_parser *p, struct bs_json *v)
{
    if (p->depth == 0) {
        p->doc->root = v;
        return;
    }
    struct json_frame *f = &p->stack[p->depth - 1];
    v->key = p->key;
    p->key = NULL;
    if (f->last != NULL)
        f->last->next = v;
    else
        f->node->child = v;
    f->last = v;
    f->node->len++;
}

static int json_push(struct json_parser *p, struct bs_json *v)
{
    if (p->depth >= p->max_depth) {
        char msg[64];
        snprintf(msg, sizeof(msg), "nesting deeper than %d levels", p->max_depth);
        return json_fail(p, p->pos, msg);
    }
    if (p->depth == p->cap) {
        int cap = p->cap ? p->cap * 2 : 16;
        struct json_frame *s = realloc(p->stack, (size_t)cap * sizeof(*s));
        if (s == NULL)
            return json_nomem(p);
        p->stack = s;
        p->cap = cap;
    }
    p->stack[p->depth++] = (struct json_frame){.node = v};
    p->pos++;
    return 0;
}

/* A member name and its ':' at p->pos (whitespace already skipped). */
static int json_key(struct json_parser *p, const char *expected)
{
    size_t n;
    if (json_peek(p) != '"')
        return json_expected(p, expected);
    int rc = json_string(p, &p->key, &n);
    if (rc != 0)
        return rc;
    json_skip_ws(p);
    if (json_peek(p) != ':')
        return json_expected(p, "':'");
    p->pos++;
    return 0;
}

/* Parse one value at p->pos. Scalars are complete on return; a container is
 * pushed and *opened set. */
static int json_value(struct json_parser *p, bool *opened)
{
    json_skip_ws(p);
    struct bs_json *v = doc_alloc(p->doc, sizeof(*v));
    if (v == NULL)
        return json_nomem(p);
    memset(v, 0, sizeof(*v));
    json_link(p, v);
    *opened = false;
    int c = json_peek(p);
    switch (c) {
    case '{':
    case '[':
        v->type = c == '{' ? BS_JSON_OBJECT : BS_JSON_ARRAY;
        *opened = true;
        return json_push(p, v);
    case '"':
        v->type = BS_JSON_STRING;
        return json_string(p, &v->string, &v->len);
    case '-':
    case '0': case '1': case '2': case '3': case '4':
    case '5': case '6': case '7': case '8': case '9':
        v->type = BS_JSON_NUMBER;
        return json_number(p, v);
    default:
        return json_literal(p, v);
    }
}

/* After '{' or '[' was pushed: close it at once if empty (*closed), else read
 * the first key of an object. */
static int json_open(struct json_parser *p, bool *closed)
{
    struct bs_json *node = p->stack[p->depth - 1].node;
    bool obj = node->type == BS_JSON_OBJECT;
    json_skip_ws(p);
    *closed = json_peek(p) == (obj ? '}' : ']');
    if (*closed) {
        p->pos++;
        p->depth--;
        return 0;
    }
    return obj ? json_key(p, "'\"' or '}'") : 0;
}

/* After a complete value: consume ',' (and the next key) or close containers.
 * Sets *done when the root is complete. */
static int json_after_value(struct json_parser *p, bool *done)
{
    for (;;) {
        if (p->depth == 0) {
            *done = true;
            return 0;
        }
        bool obj = p->stack[p->depth - 1].node->type == BS_JSON_OBJECT;
        char close = obj ? '}' : ']';
        json_skip_ws(p);
        int c = json_peek(p);
        if (c == ',') {
            p->pos++;
            json_skip_ws(p);
            return obj ? json_key(p, "'\"'") : 0;
        }
        if (c != close)
            return json_expected(p, obj ? "',' or '}'" : "',' or ']'");
        p->pos++;
        p->depth--;
    }
}

static int json_run(struct json_parser *p)
{
    bool done = false;
    while (!done) {
        bool opened = false, closed = false;
        int rc = json_value(p, &opened);
        if (rc == 0 && opened)
            rc = json_open(p, &closed);
        if (rc != 0)
            return rc;
        if (opened && !closed)
            continue;
        if ((rc = json_after_value(p, &done)) != 0)
            return rc;
    }
    json_skip_ws(p);
    if (p->pos != p->len)
        return json_expected(p, "end of input after the value");
    return 0;
}

int bs_json_parse(bs_json_doc_t **doc, const char *text, size_t len, int max_depth,
                  struct bs_err *err)
{
    *doc = NULL;
    if (text == NULL && len != 0)
        return bs_err_set(err, BS_EINVAL, "no text to parse");
    struct json_parser p = {
        .s = text,
        .len = len,
        .max_depth = max_depth > 0 ? max_depth : JSON_DEFAULT_DEPTH,
        .err = err,
    };
    p.doc = calloc(1, sizeof(*p.doc));
    if (p.doc == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    int rc = json_run(&p);
    free(p.stack);
    if (rc != 0) {
        bs_json_doc_free(p.doc);
        return rc;
    }
    *doc = p.doc;
    return 0;
}
