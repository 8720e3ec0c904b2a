/* blockserve's version, written once: the server (--version, ServerMetadata),
 * blockserve-cli (--version) and the build (CMakeLists.txt reads it for
 * project(VERSION)) all take it from here. No code, no dependencies. */
#ifndef BS_VERSION_H
#define BS_VERSION_H

#define BS_VERSION "0.1.0"

#endif
