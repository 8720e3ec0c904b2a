/* A fake gRPC transport for the service fuzz target: fake_rpc.c implements
 * the call-level functions of server/rpc.h that the service uses, and this
 * header is how the harness plays the client. The harness opens calls and
 * delivers what a client (or gRPC core) would; the fake records every answer
 * and checks the transport's contract, printing what broke and calling
 * abort() (so libFuzzer reports the input) when:
 * - a unary call is answered twice, failed with status OK, answered with bytes
 *   that are not its method's response message, or not answered at all by
 *   the time the service is idle (unless it was cancelled);
 * - bs_rpc_reply is used on a stream, or bs_rpc_stream_send/finish on a
 *   unary call; a stream is sent to after its finish, finished twice, or not
 *   finished once the client has half-closed it and the service is idle
 *   (unless it was cancelled); a stream message is not a
 *   ModelStreamInferResponse;
 * - references do not balance: an unref drops the transport's own reference,
 *   or a call object is still alive at the end. A call object is freed when
 *   its last reference goes, so any later use is an ASan report;
 * - bs_rpc_stream_set_busy is given a negative count or a unary call, or a
 *   stream goes away with requests still marked busy;
 * - a bs_rpc_* function is called off the thread that runs the harness.
 * As in server/rpc.c, the transport holds its own reference until the call
 * is closed (answered and delivered, or cancelled), one more across each
 * handler it calls, and on_cancel goes once to every cancelled call, even
 * one already answered. Calls are named by slot (creation order, from 0)
 * because their objects may be gone. */
#ifndef BS_FAKE_RPC_H
#define BS_FAKE_RPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rpc.h"
#include "service.h"

#define FAKE_RPC_MAX_CALLS 64

/* Start a new round (one fuzz input) delivering to h; the previous round
 * must have ended with fake_rpc_end. Set BS_FUZZ_TRACE=1 to log every event. */
void fake_rpc_begin(const struct bs_rpc_handlers *h);

/* A unary call of method m with request bytes d (deadline on uv_hrtime()'s
 * clock, INT64_MAX: none), handed to on_unary at once. Returns its slot, or
 * -1 when the round has no slot left (nothing happens then). */
int fake_rpc_unary(enum bs_service_method m, const uint8_t *d, size_t n, int64_t deadline);

/* A ModelStreamInfer call (on_stream_open at once); returns its slot or -1. */
int fake_rpc_stream_open(int64_t deadline);

/* The client sends one message on stream slot / half-closes it. Ignored when
 * the slot is not a live stream the client may still write to. */
void fake_rpc_stream_msg(int slot, const uint8_t *d, size_t n);
void fake_rpc_stream_end(int slot);

/* The client cancels call slot (ignored once it is closed). With
 * half_close_first, a stream first hears on_stream_end, as gRPC core
 * completes a pending read of a cancelled stream like a half-close. */
void fake_rpc_cancel(int slot, bool half_close_first);

/* A unary call of method m ended before its request arrived whole (cancelled
 * or not): on_lost, when the application has it; no call object exists. */
void fake_rpc_lost(enum bs_service_method m, bool cancelled);

/* What bs_rpc_unsent_full answers (false at the start of a round). */
void fake_rpc_set_unsent_full(bool full);
bool fake_rpc_unsent_full(void);

/* Transport progress: answered calls close (the transport drops its
 * reference), calls whose deadline has passed are cancelled. */
void fake_rpc_pump(void);

/* Check what must be answered once the service is idle: every unary call and
 * every half-closed stream that was not cancelled. */
void fake_rpc_check_answered(void);

/* The client goes away: cancel every call that is not answered yet. */
void fake_rpc_cancel_open(void);

/* End the round: close what is answered and check that no call object is
 * left (every reference the application took was given back). */
void fake_rpc_end(void);

#endif
