/* protobuf-c messages as JSON, driven by their descriptors, for the HTTP
 * front end (the control plane's answers), and the growing text buffer it
 * writes into. Field names as in the .proto; 64-bit integers as JSON
 * numbers (as Triton's HTTP server writes them); enums by name; maps as
 * objects; bytes as base64; unset submessages and oneof members left out,
 * every other field written (defaults included). Pure: no I/O, no threads. */
#ifndef BS_PBJSON_H
#define BS_PBJSON_H

#include <stdbool.h>
#include <stddef.h>

#include <protobuf-c/protobuf-c.h>

/* A growing buffer; after a failed allocation `oom` is set and further
 * writes are dropped (check once at the end). Zero-initialise to start;
 * free data with free(). */
struct bs_jbuf {
    char *data;
    size_t len, cap;
    bool oom;
};

void bs_jbuf_put(struct bs_jbuf *b, const void *s, size_t n);
void bs_jbuf_puts(struct bs_jbuf *b, const char *s);
void bs_jbuf_printf(struct bs_jbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* s (n bytes) as a quoted JSON string: ", \ and control characters escaped. */
void bs_jbuf_str(struct bs_jbuf *b, const char *s, size_t n);
/* A float so that reading it back as a float gives the same bits (NaN and
 * infinities as NaN, Infinity, -Infinity, which JSON itself lacks). */
void bs_jbuf_float(struct bs_jbuf *b, float v);

/* Append m as a JSON object. */
void bs_pbjson_write(struct bs_jbuf *b, const ProtobufCMessage *m);

/* Append the value of m's field `name` alone (a repeated field as an array,
 * a map as an object, or with values_only a map's values as an array);
 * false when m has no such field. */
bool bs_pbjson_write_field(struct bs_jbuf *b, const ProtobufCMessage *m, const char *name,
                           bool values_only);

#endif
