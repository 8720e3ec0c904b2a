/* protobuf-c messages as JSON (pbjson.h). */
#include "pbjson.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the buffer ------------------------------------------------------------ */

static bool reserve(struct bs_jbuf *b, size_t n)
{
    if (b->oom)
        return false;
    if (b->cap - b->len > n)
        return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len <= n) {
        if (cap > SIZE_MAX / 2) {
            b->oom = true;
            return false;
        }
        cap *= 2;
    }
    char *d = realloc(b->data, cap);
    if (d == NULL) {
        b->oom = true;
        return false;
    }
    b->data = d;
    b->cap = cap;
    return true;
}

void bs_jbuf_put(struct bs_jbuf *b, const void *s, size_t n)
{
    if (!reserve(b, n))
        return;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void bs_jbuf_puts(struct bs_jbuf *b, const char *s)
{
    bs_jbuf_put(b, s, strlen(s));
}

void bs_jbuf_printf(struct bs_jbuf *b, const char *fmt, ...)
{
    char small[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof(small), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof(small)) {
        bs_jbuf_put(b, small, (size_t)n);
        return;
    }
    if (!reserve(b, (size_t)n + 1))
        return;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void bs_jbuf_str(struct bs_jbuf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    bs_jbuf_put(b, "\"", 1);
    size_t run = 0; /* bytes copied as they are, pending */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            run++;
            continue;
        }
        bs_jbuf_put(b, s + i - run, run);
        run = 0;
        char e[6] = {'\\', (char)c, 0};
        size_t en = 2;
        if (c == '\n')
            e[1] = 'n';
        else if (c == '\t')
            e[1] = 't';
        else if (c == '\r')
            e[1] = 'r';
        else if (c < 0x20) {
            memcpy(e, "\\u00", 4);
            e[4] = hex[c >> 4];
            e[5] = hex[c & 15];
            en = 6;
        }
        bs_jbuf_put(b, e, en);
    }
    bs_jbuf_put(b, s + n - run, run);
    bs_jbuf_put(b, "\"", 1);
}

void bs_jbuf_float(struct bs_jbuf *b, float v)
{
    if (isnan(v))
        bs_jbuf_puts(b, "NaN");
    else if (isinf(v))
        bs_jbuf_puts(b, v > 0 ? "Infinity" : "-Infinity");
    else
        bs_jbuf_printf(b, "%.9g", (double)v);
}

static void put_double(struct bs_jbuf *b, double v)
{
    if (isnan(v))
        bs_jbuf_puts(b, "NaN");
    else if (isinf(v))
        bs_jbuf_puts(b, v > 0 ? "Infinity" : "-Infinity");
    else
        bs_jbuf_printf(b, "%.17g", v);
}

static void put_base64(struct bs_jbuf *b, const uint8_t *d, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    bs_jbuf_put(b, "\"", 1);
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)d[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)d[i + 1] << 8;
        if (i + 2 < n)
            v |= d[i + 2];
        char o[4] = {tab[v >> 18], tab[(v >> 12) & 63], i + 1 < n ? tab[(v >> 6) & 63] : '=',
                     i + 2 < n ? tab[v & 63] : '='};
        bs_jbuf_put(b, o, 4);
    }
    bs_jbuf_put(b, "\"", 1);
}

/* ---- messages ---------------------------------------------------------------- */

static void write_message(struct bs_jbuf *b, const ProtobufCMessage *m);

/* The size of one element of a field of type t (repeated arrays). */
static size_t elem_size(ProtobufCType t)
{
    switch (t) {
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
    case PROTOBUF_C_TYPE_DOUBLE:
        return 8;
    case PROTOBUF_C_TYPE_STRING:
    case PROTOBUF_C_TYPE_MESSAGE:
        return sizeof(void *);
    case PROTOBUF_C_TYPE_BYTES:
        return sizeof(ProtobufCBinaryData);
    default: /* 32-bit ints, float, bool (protobuf_c_boolean), enum */
        return 4;
    }
}

/* One value of field f at p. */
static void write_value(struct bs_jbuf *b, const ProtobufCFieldDescriptor *f, const void *p)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        bs_jbuf_printf(b, "%" PRId32, *(const int32_t *)p);
        break;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        bs_jbuf_printf(b, "%" PRIu32, *(const uint32_t *)p);
        break;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        bs_jbuf_printf(b, "%" PRId64, *(const int64_t *)p);
        break;
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        bs_jbuf_printf(b, "%" PRIu64, *(const uint64_t *)p);
        break;
    case PROTOBUF_C_TYPE_FLOAT:
        bs_jbuf_float(b, *(const float *)p);
        break;
    case PROTOBUF_C_TYPE_DOUBLE:
        put_double(b, *(const double *)p);
        break;
    case PROTOBUF_C_TYPE_BOOL:
        bs_jbuf_puts(b, *(const protobuf_c_boolean *)p ? "true" : "false");
        break;
    case PROTOBUF_C_TYPE_ENUM: {
        int v = *(const int *)p;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(f->descriptor, v);
        if (ev != NULL)
            bs_jbuf_str(b, ev->name, strlen(ev->name));
        else
            bs_jbuf_printf(b, "%d", v);
        break;
    }
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(char *const *)p;
        bs_jbuf_str(b, s ? s : "", s ? strlen(s) : 0);
        break;
    }
    case PROTOBUF_C_TYPE_BYTES: {
        const ProtobufCBinaryData *d = p;
        put_base64(b, d->data, d->len);
        break;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *sub = *(ProtobufCMessage *const *)p;
        if (sub != NULL)
            write_message(b, sub);
        else
            bs_jbuf_puts(b, "{}");
        break;
    }
    }
}

/* A map's entry type: protobuf-c makes one message "...Entry" with key and value. */
static bool is_map(const ProtobufCFieldDescriptor *f)
{
    if (f->label != PROTOBUF_C_LABEL_REPEATED || f->type != PROTOBUF_C_TYPE_MESSAGE)
        return false;
    const ProtobufCMessageDescriptor *d = f->descriptor;
    size_t n = strlen(d->name);
    return d->n_fields == 2 && n > 5 && strcmp(d->name + n - 5, "Entry") == 0 &&
           strcmp(d->fields[0].name, "key") == 0 && strcmp(d->fields[1].name, "value") == 0;
}

static void write_map(struct bs_jbuf *b, const ProtobufCMessage *const *entries, size_t n,
                      bool values_only)
{
    bs_jbuf_puts(b, values_only ? "[" : "{");
    for (size_t i = 0; i < n; i++) {
        const ProtobufCMessage *e = entries[i];
        const ProtobufCFieldDescriptor *kf = &e->descriptor->fields[0];
        const ProtobufCFieldDescriptor *vf = &e->descriptor->fields[1];
        const char *base = (const char *)e;
        if (i > 0)
            bs_jbuf_puts(b, ",");
        if (!values_only) {
            if (kf->type == PROTOBUF_C_TYPE_STRING) {
                write_value(b, kf, base + kf->offset);
            } else { /* an integer key: quoted, as JSON keys are strings */
                bs_jbuf_puts(b, "\"");
                write_value(b, kf, base + kf->offset);
                bs_jbuf_puts(b, "\"");
            }
            bs_jbuf_puts(b, ":");
        }
        write_value(b, vf, base + vf->offset);
    }
    bs_jbuf_puts(b, values_only ? "]" : "}");
}

/* Whether field f of m is present: unset oneof members and submessages are not. */
static bool present(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f)
{
    const char *base = (const char *)m;
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
        return *(const uint32_t *)(base + f->quantifier_offset) == f->id;
    if (f->label == PROTOBUF_C_LABEL_REPEATED)
        return true;
    if (f->type == PROTOBUF_C_TYPE_MESSAGE)
        return *(void *const *)(base + f->offset) != NULL;
    if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset != 0 &&
        f->type != PROTOBUF_C_TYPE_STRING)
        return *(const protobuf_c_boolean *)(base + f->quantifier_offset) != 0;
    return true;
}

static void write_field(struct bs_jbuf *b, const ProtobufCMessage *m,
                        const ProtobufCFieldDescriptor *f, bool values_only)
{
    const char *base = (const char *)m;
    if (f->label != PROTOBUF_C_LABEL_REPEATED) {
        write_value(b, f, base + f->offset);
        return;
    }
    size_t n = *(const size_t *)(base + f->quantifier_offset);
    const char *arr = *(char *const *)(base + f->offset);
    if (is_map(f)) {
        write_map(b, (const ProtobufCMessage *const *)arr, n, values_only);
        return;
    }
    bs_jbuf_puts(b, "[");
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            bs_jbuf_puts(b, ",");
        write_value(b, f, arr + i * elem_size(f->type));
    }
    bs_jbuf_puts(b, "]");
}

static void write_message(struct bs_jbuf *b, const ProtobufCMessage *m)
{
    const ProtobufCMessageDescriptor *d = m->descriptor;
    bool first = true;
    bs_jbuf_puts(b, "{");
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (!present(m, f))
            continue;
        if (!first)
            bs_jbuf_puts(b, ",");
        first = false;
        bs_jbuf_str(b, f->name, strlen(f->name));
        bs_jbuf_puts(b, ":");
        write_field(b, m, f, false);
    }
    bs_jbuf_puts(b, "}");
}

void bs_pbjson_write(struct bs_jbuf *b, const ProtobufCMessage *m)
{
    write_message(b, m);
}

bool bs_pbjson_write_field(struct bs_jbuf *b, const ProtobufCMessage *m, const char *name,
                           bool values_only)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field_by_name(m->descriptor, name);
    if (f == NULL)
        return false;
    write_field(b, m, f, values_only);
    return true;
}
