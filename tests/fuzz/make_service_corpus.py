"""Write the seed corpus of the service fuzz target (tests/fuzz/fuzz_service.c):
small client programs in its input format, with ModelInferRequests built by
the protobuf runtime from stubs generated from proto/ at run time.

    /usr/bin/python3 tests/fuzz/make_service_corpus.py [OUT_DIR]

OUT_DIR defaults to tests/fuzz/corpus_service. The output is deterministic:
running it again rewrites the same bytes (the committed files are its output).
Needs protoc (protobuf-compiler) and python3-protobuf."""

import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))

# Operation codes and the unary method table of fuzz_service.c.
UNARY, OPEN, MSG, END, CANCEL, POLL, WAIT, PUMP, STOP, REPEAT, PARAM, SHUTDOWN, LOST, FULL = \
    range(14)
METHODS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
           "ModelInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex"]
# deadline bytes
NONE, PASSED, IN_1MS, IN_1S, FAR, NOW = range(6)
# PARAM keys and kinds
PARAM_KEYS = ["timeout", "stream_intermediate", "priority", "sequence_id", "sequence_start",
              "sequence_end", "block_cache_interval"]
INT64, BOOL, UINT64, STRING, INT64_NEAR_POW2 = range(5)


def load_stubs(tmp):
    subprocess.run(["protoc", "-I" + os.path.join(ROOT, "proto"), "--python_out=" + tmp,
                    "grpc_service.proto", "model_config.proto"], check=True)
    sys.path.insert(0, tmp)
    import grpc_service_pb2
    return grpc_service_pb2


def u16(n):
    assert n < 65536
    return struct.pack("<H", n)


def unary(method, msg=b"", deadline=NONE):
    if not isinstance(msg, bytes):
        msg = msg.SerializeToString(deterministic=True)
    return bytes([UNARY, METHODS.index(method), deadline]) + u16(len(msg)) + msg


def open_stream(deadline=NONE):
    return bytes([OPEN, deadline])


def send(stream, msg):
    if not isinstance(msg, bytes):
        msg = msg.SerializeToString(deterministic=True)
    return bytes([MSG, stream]) + u16(len(msg)) + msg


def end(stream):
    return bytes([END, stream])


def cancel(call, half_close_first=False):
    return bytes([CANCEL, call, 1 if half_close_first else 0])


def repeat(times):
    return bytes([REPEAT, times - 1])


def param(key, kind, value):
    """A parameter for the next UNARY or MSG (value: int, or 8 bytes for STRING;
    for INT64_NEAR_POW2 a pair (k, delta): 2^k + delta)."""
    if kind == STRING:
        raw = value.ljust(8, b"\0")[:8]
    elif kind == INT64_NEAR_POW2:
        raw = struct.pack("<Bb6x", value[0], value[1])
    else:
        raw = struct.pack("<Q", value & (2**64 - 1))
    return bytes([PARAM, PARAM_KEYS.index(key), kind]) + raw


def wait(n=1):
    return bytes([WAIT]) * n


def values(n, seed):
    """n deterministic floats in [-1, 1)."""
    return [((i * 37 + seed * 11) % 101) / 50.5 - 1.0 for i in range(n)]


class Requests:
    """ModelInferRequests for the fuzz models (small shapes)."""

    def __init__(self, pb):
        self.pb = pb

    def make(self, model, inputs, rid="", params=None, typed=False, outputs=()):
        """inputs: [(name, datatype, shape)]; FP32 values are deterministic,
        INT64 values small labels."""
        r = self.pb.ModelInferRequest(model_name=model, id=rid)
        for k, (name, dt, shape) in enumerate(inputs):
            t = r.inputs.add(name=name, datatype=dt, shape=shape)
            n = 1
            for d in shape:
                n *= d
            if dt == "FP32":
                v = values(n, k)
                if typed:
                    t.contents.fp32_contents.extend(v)
                else:
                    r.raw_input_contents.append(struct.pack("<%df" % n, *v))
            elif dt == "INT64":
                v = [i % 10 for i in range(n)]
                if typed:
                    t.contents.int64_contents.extend(v)
                else:
                    r.raw_input_contents.append(struct.pack("<%dq" % n, *v))
            else:
                raise ValueError(dt)
        for key, v in (params or {}).items():
            if isinstance(v, bool):
                r.parameters[key].bool_param = v
            elif isinstance(v, int):
                r.parameters[key].int64_param = v
            else:
                r.parameters[key].string_param = v
        for o in outputs:
            r.outputs.add(name=o)
        return r

    def btb(self, rid="", params=None, model="btb_geglu_cross", batch=1, seq=4):
        return self.make(model, [("hidden_states", "FP32", [batch, seq, 32]),
                                 ("encoder_hidden_states", "FP32", [batch, 3, 24])], rid, params)

    def stack(self, rid="", params=None, mask=False):
        ins = [("hidden_states", "FP32", [1, 4, 32]), ("encoder_hidden_states", "FP32", [1, 3, 24])]
        if mask:
            ins.append(("encoder_attention_mask", "FP32", [1, 1, 3]))
        return self.make("btb_stack3", ins, rid, params)

    def agn(self, rid="", typed=False, outputs=()):
        return self.make("ada_group_norm_silu", [("x", "FP32", [1, 16, 2, 2]),
                                                 ("emb", "FP32", [1, 12])], rid, typed=typed,
                         outputs=outputs)

    def dit(self, rid=""):
        return self.make("btb_ada_norm_zero_dit", [("hidden_states", "FP32", [1, 4, 32]),
                                                   ("timestep", "FP32", [1]),
                                                   ("class_labels", "INT64", [1])], rid)


def corpus(pb):
    q = Requests(pb)
    out = {}

    out["metadata"] = b"".join([
        unary("ServerLive"), unary("ServerReady"), unary("ServerMetadata"),
        unary("ModelReady", pb.ModelReadyRequest(name="btb_geglu_cross")),
        unary("ModelReady", pb.ModelReadyRequest(name="broken")),
        unary("ModelReady", pb.ModelReadyRequest(name="nope", version="1")),
        unary("ModelReady", b"\xff\xff"),
        unary("ModelMetadata", pb.ModelMetadataRequest(name="btb_geglu_cross")),
        unary("ModelMetadata", pb.ModelMetadataRequest(name="broken")),
        unary("ModelConfig", pb.ModelConfigRequest(name="ada_group_norm_silu")),
        unary("ModelConfig", pb.ModelConfigRequest(name="btb_stack3", version="2")),
        unary("ModelStatistics", pb.ModelStatisticsRequest()),
        unary("ModelStatistics", pb.ModelStatisticsRequest(name="btb_geglu_cross")),
        unary("RepositoryIndex", pb.RepositoryIndexRequest()),
        unary("RepositoryIndex", pb.RepositoryIndexRequest(ready=True)),
    ])
    out["infer_btb"] = unary("ModelInfer", q.btb("a")) + wait(3)
    # Two in one loop iteration: a batch of 2 (a preferred size).
    out["infer_agn_typed"] = (unary("ModelInfer", q.agn("typed", typed=True, outputs=["output"]))
                              + unary("ModelInfer", q.agn("raw")) + wait(2))
    out["infer_dit"] = (unary("ModelInfer", q.dit("d1")) + unary("ModelInfer", q.dit("d2"))
                        + bytes([POLL]) + wait(2))
    # In the message, and through a PARAM op (whose 8 value bytes mutate freely).
    out["infer_timeout_small"] = (unary("ModelInfer", q.btb("t1", {"timeout": 1}))
                                  + param("timeout", INT64, 1000000)
                                  + unary("ModelInfer", q.btb("t2")) + wait(2))
    # Timeouts whose deadline overflows int64 in uv_hrtime() + timeout * 1000.
    out["infer_timeout_int64max"] = unary("ModelInfer",
                                          q.btb("big", {"timeout": 9223372036854775807}))
    # 9.2e15 us: overflows only when uv_hrtime() (time since boot) > about 270 days.
    out["infer_timeout_9p2e15"] = unary("ModelInfer", q.btb("big", {"timeout": 9200000000000000}))
    # INT64_MAX / 1000: the product fits, the sum overflows.
    out["infer_timeout_edge"] = unary("ModelInfer", q.btb("edge", {"timeout": 9223372036854775}))
    out["infer_bad_params"] = b"".join([
        unary("ModelInfer", q.btb("i", {"stream_intermediate": True})),
        unary("ModelInfer", q.btb("b", {"timeout": True})),
        unary("ModelInfer", q.btb("n", {"timeout": -1})),
        unary("ModelInfer", q.btb("u", model="nope")),
        unary("ModelInfer", q.btb("broken", model="broken")),
        unary("ModelInfer", q.btb("big", batch=3)),
        unary("ModelInfer", b"\x0a\x03abc\xff"),
    ])
    # Queue size 2, batch 2: some get RESOURCE_EXHAUSTED.
    out["queue_full"] = unary("ModelInfer", q.btb("q")) + repeat(7) + bytes([POLL]) + wait(3)
    out["deadlines"] = b"".join([
        unary("ModelInfer", q.btb("past"), PASSED),
        unary("ModelInfer", q.btb("1ms"), IN_1MS),
        unary("ModelInfer", q.btb("far"), FAR),
        unary("ModelInfer", q.btb("now"), NOW),
        wait(3), bytes([PUMP]),
    ])
    # Cancel one queued, one running (dispatched by the poll), one answered.
    out["cancel_unary"] = b"".join([
        unary("ModelInfer", q.btb("c0")), cancel(0),
        unary("ModelInfer", q.agn("c1")), bytes([POLL]), cancel(1),
        unary("ServerLive"), cancel(2), wait(2),
    ])
    out["stream_intermediate"] = b"".join([
        open_stream(),
        send(0, q.stack("s1", {"stream_intermediate": True})),
        send(0, q.stack("s2", {"timeout": 5000}, mask=True)),
        send(0, b"\xff\x00"),
        send(0, q.btb("unknown", model="nope")),
        end(0), wait(4),
    ])
    out["stream_cancel"] = b"".join([
        open_stream(), send(0, q.btb("x1")), send(0, q.btb("x2")), cancel(0, True),
        open_stream(IN_1MS), send(1, q.stack("y1", {"stream_intermediate": True})),
        bytes([POLL]), cancel(1), open_stream(), send(2, q.agn("z")), wait(2),
    ])
    out["params"] = b"".join([
        param("priority", UINT64, 7), param("sequence_id", STRING, b"seq"),
        param("timeout", INT64_NEAR_POW2, (20, -1)),
        unary("ModelInfer", q.agn("p")),
        open_stream(), param("stream_intermediate", BOOL, 1), param("timeout", INT64, 200000),
        send(0, q.stack("si")), param("timeout", BOOL, 1), send(0, q.stack("bad")),
        end(0), wait(3),
    ])
    # bs_service_shutdown with a unary call and a stream in flight, then more calls.
    out["shutdown"] = b"".join([
        unary("ModelInfer", q.btb("u")), open_stream(), send(0, q.agn("s1")),
        send(0, q.stack("s2", {"stream_intermediate": True})), bytes([POLL]),
        bytes([SHUTDOWN]), unary("ModelInfer", q.btb("late")), send(0, q.agn("s3")),
        open_stream(), end(0), wait(3),
    ])
    # Calls the transport lost before their request arrived; a full send bound.
    out["lost_full"] = b"".join([
        bytes([LOST, METHODS.index("ModelInfer"), 1, LOST, METHODS.index("ModelInfer"), 0,
               LOST, METHODS.index("ServerLive"), 0, FULL]),
        unary("ModelInfer", q.btb("busy")), open_stream(), send(0, q.agn("busy")),
        bytes([FULL]), unary("ModelInfer", q.btb("ok")), send(0, q.agn("ok")), end(0), wait(2),
    ])
    # More inferences in flight than the server-wide bound (6), over every model.
    out["inflight"] = b"".join([
        unary("ModelInfer", q.btb("a")), unary("ModelInfer", q.btb("b")),
        unary("ModelInfer", q.stack("c")), unary("ModelInfer", q.stack("d")),
        unary("ModelInfer", q.agn("e")), unary("ModelInfer", q.dit("f")),
        unary("ModelInfer", q.dit("g")), unary("ModelInfer", q.agn("h")), wait(4),
    ])
    # An answer over the message limit (8192 bytes): hidden_states [1, 64, 32].
    out["big_response"] = (unary("ModelInfer", q.btb("big", seq=64)) + open_stream()
                           + send(0, q.btb("big", seq=64)) + end(0) + wait(3))
    # Denoising sequences: calls of one sequence in order (refresh, reuse, ...),
    # a shape change, unknown sequences, bad intervals and ids, a model
    # without blocks to cache.
    def seq(k, sid=5, start=False, end=False, n=2):
        return dict({"sequence_id": sid, "block_cache_interval": n},
                    **({"sequence_start": True} if start else {}),
                    **({"sequence_end": True} if end else {}))
    out["sequence_unary"] = b"".join([
        unary("ModelInfer", q.btb("s0", seq(0, start=True))), wait(2),
        unary("ModelInfer", q.btb("s1", seq(1))), wait(2),
        unary("ModelInfer", q.btb("shape", seq(2), seq=5)),
        unary("ModelInfer", q.btb("s2", seq(2))), wait(2),
        unary("ModelInfer", q.btb("s3", seq(3, end=True))), wait(2),
        unary("ModelInfer", q.btb("ended", seq(4))),
        unary("ModelInfer", q.btb("zero", {"sequence_id": 0, "sequence_start": True})),
        unary("ModelInfer", q.btb("n0", seq(0, sid=6, start=True, n=0))),
        unary("ModelInfer", q.btb("str", {"sequence_id": "pipe-1", "sequence_start": True,
                                          "block_cache_interval": 3})),
        unary("ModelInfer", q.agn("agn")),
        param("sequence_id", INT64, 8), param("sequence_start", BOOL, 1),
        param("block_cache_interval", INT64, 2), unary("ModelInfer", q.agn("agn_seq")),
        param("block_cache_interval", INT64_NEAR_POW2, (31, 0)), param("sequence_id", UINT64, 9),
        param("sequence_start", BOOL, 1), unary("ModelInfer", q.btb("n_big")),
        wait(3),
    ])
    # A whole sequence sent at once on a stream (each call waits for the one
    # before), beside another sequence (at most 6 in flight, the bound);
    # then a stream cancelled with calls still waiting.
    out["sequence_stream"] = b"".join([
        open_stream(),
        send(0, q.stack("a0", seq(0, sid=1, start=True, n=3))),
        send(0, q.btb("b0", seq(0, sid=2, start=True))),
        send(0, q.stack("a1", seq(1, sid=1, n=3))),
        send(0, q.btb("b1", seq(1, sid=2, end=True))),
        send(0, q.stack("a2", seq(2, sid=1, end=True, n=3))),
        end(0), wait(4),
        open_stream(),
        send(1, q.btb("c0", seq(0, sid=3, start=True))),
        send(1, q.btb("c1", seq(1, sid=3))),
        send(1, q.btb("c2", seq(2, sid=3))),
        bytes([POLL]), cancel(1, True), wait(4),
    ])
    # Two caches of btb_geglu_cross at [1, 16, 32] (6144 bytes) do not fit
    # together: each start evicts the other's, whose next call refreshes;
    # btb_stack3's idle time (2 ms) passes between two calls.
    out["sequence_evict_idle"] = b"".join([
        unary("ModelInfer", q.btb("e0", seq(0, sid=20, start=True), seq=16)), wait(3),
        unary("ModelInfer", q.btb("e1", seq(0, sid=21, start=True), seq=16)), wait(3),
        unary("ModelInfer", q.btb("r0", seq(1, sid=20), seq=16)), wait(3),
        unary("ModelInfer", q.btb("r1", seq(1, sid=21), seq=16)), wait(3),
        unary("ModelInfer", q.stack("i0", seq(0, sid=30, start=True))), wait(3),
        bytes([WAIT]) * 3, unary("ModelInfer", q.stack("i1", seq(1, sid=30))), wait(2),
    ])
    out["stop_accepting"] = b"".join([
        unary("ModelInfer", q.btb("before")), bytes([STOP]),
        unary("ModelInfer", q.btb("after")), unary("ServerReady"),
        unary("ModelReady", pb.ModelReadyRequest(name="btb_geglu_cross")),
        open_stream(), send(0, q.agn("s")), end(0), wait(2),
    ])
    return out


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus_service")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bs_corpus_") as tmp:
        pb = load_stubs(tmp)
        for name, data in sorted(corpus(pb).items()):
            with open(os.path.join(out_dir, name + ".bin"), "wb") as f:
                f.write(data)
            print("%s.bin: %d bytes" % (name, len(data)))


if __name__ == "__main__":
    main()
