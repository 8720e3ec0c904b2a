/* The serialized FileDescriptorSet of every .proto the server speaks
 * (grpc_service.proto, model_config.proto, grpc health and reflection), with
 * imports, generated at build time; server reflection serves from it. */
#ifndef BS_DESCRIPTORS_H
#define BS_DESCRIPTORS_H

#include <stddef.h>

extern const unsigned char bs_descriptor_set[];
extern const size_t bs_descriptor_set_len;

#endif
