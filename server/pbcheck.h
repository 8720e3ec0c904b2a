/* Checks on serialized protobuf messages before protobuf-c unpacks them.
 * protobuf-c hands `string` fields out as NUL-terminated C strings, so a
 * string with an embedded NUL byte would silently be cut at it ("model\0evil"
 * served as "model"); these checks refuse such messages instead. Pure
 * functions: no allocation, no I/O, any thread. */
#ifndef BS_PBCHECK_H
#define BS_PBCHECK_H

#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#include "common.h"

/* Nesting of known message fields beyond this depth is refused as malformed. */
#define BS_PB_MAX_DEPTH 32

/* Walk the wire format of data[0..len) as a desc message and make sure that
 * no `string` field, at any depth (repeated fields, nested messages and map
 * entries included), contains a NUL byte. `bytes` fields and unknown fields
 * are skipped unread. Returns 0, or BS_EINVAL with a message naming the
 * field's path (`field "inputs[1].datatype" contains a NUL byte ...`) or
 * saying the message is malformed (bad varint, length past the end,
 * unsupported wire type, nesting deeper than BS_PB_MAX_DEPTH). */
int bs_pb_check_strings(const ProtobufCMessageDescriptor *desc, const uint8_t *data, size_t len,
                        struct bs_err *err);

#endif
