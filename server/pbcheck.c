/* String checks on the protobuf wire format (see pbcheck.h).
 *
 * The walk reads each field's key and, for length-delimited fields, its
 * length; every length is compared with the bytes left before it is used, so
 * nothing is read past len and no pointer arithmetic overflows. Known string
 * fields are scanned with memchr, known message fields (map entries are
 * messages too) are walked recursively up to BS_PB_MAX_DEPTH, everything else
 * (bytes, packed scalars, unknown fields) is stepped over.
 *
 * The path of an offending field is only worked out on the error path: each
 * level of the recursion keeps a frame on the C stack (the field and where it
 * sits in its parent), and the index of a repeated field is found by counting
 * the earlier occurrences of its number in the parent. */
#include "pbcheck.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define PB_MAX_FIELD_NUMBER ((1u << 29) - 1)

enum {
    PB_WIRE_VARINT = 0,
    PB_WIRE_FIXED64 = 1,
    PB_WIRE_LEN = 2,
    PB_WIRE_FIXED32 = 5,
};

struct pb_reader {
    const uint8_t *p, *end;
};

struct pb_field {
    uint32_t num;
    unsigned wire_type;
    const uint8_t *at;      /* the field's key */
    const uint8_t *payload; /* PB_WIRE_LEN: the field's bytes */
    size_t len;
};

/* Where a field sits: one per level of nesting, innermost first. */
struct pb_frame {
    const struct pb_frame *up;             /* the frame of the enclosing message, or NULL */
    const ProtobufCFieldDescriptor *field; /* the field */
    const uint8_t *msg;                    /* start of the message holding it */
    const uint8_t *at;                     /* its key in that message */
};

struct pb_walk {
    const ProtobufCMessageDescriptor *top;
    const uint8_t *base; /* start of the whole message, for byte offsets */
    struct bs_err *err;
};

/* ---- wire format ----------------------------------------------------------------------------- */

static bool pb_varint(struct pb_reader *r, uint64_t *v)
{
    uint64_t x = 0;
    for (unsigned shift = 0; shift < 64; shift += 7) { /* at most 10 bytes */
        if (r->p == r->end)
            return false;
        uint8_t b = *r->p++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if ((b & 0x80) == 0) {
            *v = x;
            return true;
        }
    }
    return false;
}

/* 1: f holds the next field; 0: end of the message; -1: malformed. */
static int pb_next(struct pb_reader *r, struct pb_field *f)
{
    uint64_t key, n;
    if (r->p == r->end)
        return 0;
    f->at = r->p;
    if (!pb_varint(r, &key) || (key >> 3) == 0 || (key >> 3) > PB_MAX_FIELD_NUMBER)
        return -1;
    f->num = (uint32_t)(key >> 3);
    f->wire_type = (unsigned)(key & 7);
    f->payload = NULL;
    f->len = 0;
    switch (f->wire_type) {
    case PB_WIRE_VARINT:
        return pb_varint(r, &n) ? 1 : -1;
    case PB_WIRE_FIXED64:
        n = 8;
        break;
    case PB_WIRE_FIXED32:
        n = 4;
        break;
    case PB_WIRE_LEN:
        if (!pb_varint(r, &n))
            return -1;
        f->payload = r->p;
        break;
    default: /* groups (3, 4) and the undefined 6, 7: protobuf-c refuses them too */
        return -1;
    }
    if (n > (uint64_t)(r->end - r->p))
        return -1;
    f->len = (size_t)n;
    r->p += n;
    return 1;
}

/* ---- messages -------------------------------------------------------------------------------- */

/* How many fields numbered num come before at in the message starting at msg
 * (that part was read once already, so it is well formed). */
static size_t pb_index(const uint8_t *msg, const uint8_t *at, uint32_t num)
{
    struct pb_reader r = {msg, at};
    struct pb_field f;
    size_t k = 0;
    while (pb_next(&r, &f) > 0)
        k += f.num == num;
    return k;
}

/* "inputs[1].datatype" for the innermost frame leaf. */
static const char *pb_path(const struct pb_frame *leaf, char *buf, size_t size)
{
    const struct pb_frame *chain[BS_PB_MAX_DEPTH + 1];
    size_t n = 0, o = 0;
    for (const struct pb_frame *f = leaf; f != NULL && n < BS_ARRAY_LEN(chain); f = f->up)
        chain[n++] = f;
    buf[0] = '\0';
    while (n > 0 && o < size) {
        const struct pb_frame *f = chain[--n];
        int w = snprintf(buf + o, size - o, "%s%s", o > 0 ? "." : "", f->field->name);
        if (w > 0 && f->field->label == PROTOBUF_C_LABEL_REPEATED && (size_t)w < size - o)
            w += snprintf(buf + o + (size_t)w, size - o - (size_t)w, "[%zu]",
                          pb_index(f->msg, f->at, f->field->id));
        if (w < 0)
            break;
        o += (size_t)w;
    }
    return buf;
}

static int pb_malformed(const struct pb_walk *w, const uint8_t *at, const char *why)
{
    return bs_err_set(w->err, BS_EINVAL, "malformed %s: %s at byte %zu", w->top->short_name, why,
                      (size_t)(at - w->base));
}

static int pb_check_message(const struct pb_walk *w, const ProtobufCMessageDescriptor *desc,
                            const uint8_t *data, size_t len, const struct pb_frame *up, int depth)
{
    struct pb_reader r = {data, data + len};
    struct pb_field f = {0};
    int rc;
    while ((rc = pb_next(&r, &f)) > 0) {
        const ProtobufCFieldDescriptor *fd =
            f.wire_type == PB_WIRE_LEN ? protobuf_c_message_descriptor_get_field(desc, f.num)
                                       : NULL;
        if (fd == NULL)
            continue;
        struct pb_frame here = {up, fd, data, f.at};
        if (fd->type == PROTOBUF_C_TYPE_STRING && memchr(f.payload, 0, f.len) != NULL) {
            char path[256];
            return bs_err_set(w->err, BS_EINVAL,
                              "field \"%s\" contains a NUL byte (strings must not contain NUL)",
                              pb_path(&here, path, sizeof(path)));
        }
        if (fd->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        if (depth >= BS_PB_MAX_DEPTH)
            return pb_malformed(w, f.at, "messages nested too deeply");
        if ((rc = pb_check_message(w, fd->descriptor, f.payload, f.len, &here, depth + 1)) != 0)
            return rc;
    }
    return rc < 0 ? pb_malformed(w, f.at, "bad field") : 0;
}

int bs_pb_check_strings(const ProtobufCMessageDescriptor *desc, const uint8_t *data, size_t len,
                        struct bs_err *err)
{
    static const uint8_t nothing[1];
    if (data == NULL) {
        if (len != 0)
            return bs_err_set(err, BS_EINVAL, "malformed %s: no data", desc->short_name);
        data = nothing;
    }
    struct pb_walk w = {desc, data, err};
    return pb_check_message(&w, desc, data, len, NULL, 0);
}
