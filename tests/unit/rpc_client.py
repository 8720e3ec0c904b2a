#!/usr/bin/python3
"""Client half of tests/unit/test_rpc.c.

Drives the transport's test server on 127.0.0.1:PORT with Debian's
python3-grpcio, speaking raw bytes (no generated stubs), and exits non-zero
at the first failed check. The test application in test_rpc.c answers:

  ModelInfer      echoes the request after a timer (30 s when it starts with
                  b"slow", else 5 ms)
  ModelReady      NOT_FOUND "model not found: <request>"
  ServerReady     b"serving:NAME" / b"notserving:NAME" sets health of NAME
  ServerMetadata  b"unary_cancels=N stream_cancels=M" (on_cancel counts)
  ModelConfig     b"deadline_ms=N md=VALUE" (deadline left, x-test metadata)
  RepositoryIndex checks misuse of the answer API, replies b"misuse-ok"
  ModelStreamInfer echoes every message, finishes OK on half-close; the
                  message b"shutdown" makes the server shut down.

Usage: rpc_client.py PORT
"""
import queue
import sys
import time

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

SVC = "/inference.GRPCInferenceService/"
HEALTH = "/grpc.health.v1.Health/"
SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3
BIG = 64 << 20


def check(cond, what):
    if not cond:
        raise AssertionError(what)


# ---- protobuf wire format, just enough for health and reflection ---------------------------


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_bytes(num, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(num << 3 | 2) + varint(len(data)) + data


def parse(buf):
    """[(field, value)]: value is an int (varint) or bytes (length-delimited)."""
    out, i = [], 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = read_varint(buf, i)
        elif wt == 2:
            n, i = read_varint(buf, i)
            v, i = buf[i:i + n], i + n
        else:
            raise AssertionError("unexpected wire type %d" % wt)
        out.append((num, v))
    return out


def read_varint(buf, i):
    shift = v = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


def first(fields, num, default=None):
    for n, v in fields:
        if n == num:
            return v
    return default


# ---- helpers -------------------------------------------------------------------------------


class Stream:
    """A bidirectional call fed from a queue, so sends and receives interleave."""

    def __init__(self, ch, path, timeout=20):
        self.q = queue.Queue()

        def gen():
            while True:
                m = self.q.get()
                if m is None:
                    return
                yield m

        self.call = ch.stream_stream(path)(gen(), timeout=timeout)

    def send(self, m):
        self.q.put(m)

    def recv(self):
        return next(self.call)

    def close(self):
        self.q.put(None)


def expect_error(fn, code, what):
    try:
        fn()
    except grpc.RpcError as e:
        check(e.code() == code, "%s: got %s (%s), want %s" % (what, e.code(), e.details(), code))
        return e
    raise AssertionError("%s: no error" % what)


def stats(ch):
    raw = ch.unary_unary(SVC + "ServerMetadata")(b"", timeout=5).decode()
    return {k: int(v) for k, v in (kv.split("=") for kv in raw.split())}


def wait_stats(ch, key, at_least, what):
    t0 = time.time()
    while time.time() - t0 < 5:
        if stats(ch)[key] >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError("%s: %s stayed below %d (%s)" % (what, key, at_least, stats(ch)))


# ---- the checks ----------------------------------------------------------------------------


def test_unary(ch):
    infer = ch.unary_unary(SVC + "ModelInfer")
    check(infer(b"hello", timeout=5) == b"hello", "echo")
    check(infer(b"", timeout=5) == b"", "empty echo")
    big = bytes(range(256)) * (5 * 4096 + 7)  # > 5 MiB: past gRPC's 4 MiB default
    check(infer(big, timeout=20) == big, "5 MiB echo")
    futures = [infer.future(b"msg%d" % i, timeout=10) for i in range(64)]
    check([f.result() for f in futures] == [b"msg%d" % i for i in range(64)], "64 concurrent")
    live = ch.unary_unary(SVC + "ServerLive")(b"", timeout=5)
    check(live == b"live len=0", "ServerLive: %r" % live)
    misuse = ch.unary_unary(SVC + "RepositoryIndex")(b"", timeout=5)
    check(misuse == b"misuse-ok", "misuse: %r" % misuse)


def test_errors(ch):
    e = expect_error(lambda: ch.unary_unary(SVC + "ModelReady")(b"resnet", timeout=5),
                     grpc.StatusCode.NOT_FOUND, "ModelReady")
    check(e.details() == "model not found: resnet", "details: %r" % e.details())
    for path in ("/x/y", SVC + "NoSuchMethod", "/grpc.health.v1.Health/Nope"):
        t0 = time.time()
        e = expect_error(lambda: ch.unary_unary(path)(b"abc", timeout=3),
                         grpc.StatusCode.UNIMPLEMENTED, path)
        check(time.time() - t0 < 1.0, "%s took %.2f s" % (path, time.time() - t0))
        check(e.details() == "unknown method " + path, "details: %r" % e.details())
    # A streaming call to an unknown method is answered the same way.
    s = Stream(ch, "/x/stream", timeout=3)
    s.send(b"a")
    expect_error(s.recv, grpc.StatusCode.UNIMPLEMENTED, "unknown stream")
    s.close()


def test_deadline_metadata(ch):
    cfg = ch.unary_unary(SVC + "ModelConfig")
    r = dict(kv.split("=") for kv in cfg(b"", timeout=5, metadata=(("x-test", "abc"),)).decode().split())
    ms = int(r["deadline_ms"])
    check(3000 < ms <= 5100 and r["md"] == "abc", "deadline/metadata: %r" % r)  # timeout rounds up
    r = dict(kv.split("=") for kv in cfg(b"").decode().split())
    check(r == {"deadline_ms": "inf", "md": "(none)"}, "no deadline: %r" % r)


def test_streams(ch):
    path = SVC + "ModelStreamInfer"
    s = Stream(ch, path)
    for i in range(20):  # interleaved: each answer before the next request
        s.send(b"m%d" % i)
        r = s.recv()
        check(r == b"m%d" % i, "interleaved %d: %r" % (i, r))
    s.close()
    check(list(s.call) == [], "nothing after half-close")
    check(s.call.code() == grpc.StatusCode.OK, "stream status %s" % s.call.code())

    msgs = [b"burst%d" % i * (i + 1) for i in range(20)]  # all sent, then half-close
    call = ch.stream_stream(path)(iter(msgs), timeout=20)
    check(list(call) == msgs, "burst stream")
    check(call.code() == grpc.StatusCode.OK, "burst status")

    # Answers flow while the client keeps its side open.
    s = Stream(ch, path)
    for i in range(5):
        s.send(b"open%d" % i)
    check([s.recv() for _ in range(5)] == [b"open%d" % i for i in range(5)], "before half-close")
    s.close()
    check(list(s.call) == [], "open stream end")

    many = [Stream(ch, path) for _ in range(8)]  # concurrent streams
    for k, st in enumerate(many):
        st.send(b"s%d" % k)
    for k, st in enumerate(many):
        check(st.recv() == b"s%d" % k, "concurrent stream %d" % k)
        st.close()
        check(list(st.call) == [], "concurrent stream %d end" % k)


def test_cancel(ch):
    infer = ch.unary_unary(SVC + "ModelInfer")
    base = stats(ch)
    f = infer.future(b"slow-cancel", timeout=20)
    time.sleep(0.3)
    check(f.cancel(), "cancel")
    wait_stats(ch, "unary_cancels", base["unary_cancels"] + 1, "unary on_cancel")
    check(infer(b"after-cancel", timeout=5) == b"after-cancel", "serving after cancel")

    f = infer.future(b"slow-deadline", timeout=0.3)  # the deadline cancels it
    expect_error(f.result, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")
    wait_stats(ch, "unary_cancels", base["unary_cancels"] + 2, "deadline on_cancel")

    s = Stream(ch, SVC + "ModelStreamInfer")
    s.send(b"x")
    check(s.recv() == b"x", "stream before cancel")
    s.call.cancel()
    wait_stats(ch, "stream_cancels", base["stream_cancels"] + 1, "stream on_cancel")
    check(infer(b"still", timeout=5) == b"still", "serving after stream cancel")


def health_req(name):
    return field_bytes(1, name) if name else b""


def health_status(raw):
    return first(parse(raw), 1, 0)


def test_health(ch):
    check_ = ch.unary_unary(HEALTH + "Check")
    ready = ch.unary_unary(SVC + "ServerReady")
    check(health_status(check_(health_req(""), timeout=5)) == SERVING, "whole server")
    ready(b"serving:svc", timeout=5)
    check(health_status(check_(health_req("svc"), timeout=5)) == SERVING, "svc serving")
    ready(b"notserving:svc", timeout=5)
    check(health_status(check_(health_req("svc"), timeout=5)) == NOT_SERVING, "svc not serving")
    expect_error(lambda: check_(health_req("nope"), timeout=5), grpc.StatusCode.NOT_FOUND, "unknown")
    expect_error(lambda: check_(b"\xff\xff", timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "bad")

    watch = ch.unary_stream(HEALTH + "Watch")(health_req("svc"), timeout=20)
    check(health_status(next(watch)) == NOT_SERVING, "watch first")
    ready(b"serving:svc", timeout=5)
    check(health_status(next(watch)) == SERVING, "watch change")
    ready(b"serving:svc", timeout=5)  # no change: nothing sent
    ready(b"notserving:svc", timeout=5)
    check(health_status(next(watch)) == NOT_SERVING, "watch second change")
    watch.cancel()

    watch = ch.unary_stream(HEALTH + "Watch")(health_req("zzz"), timeout=20)
    check(health_status(next(watch)) == SERVICE_UNKNOWN, "watch unknown")
    ready(b"serving:zzz", timeout=5)
    check(health_status(next(watch)) == SERVING, "watch unknown becomes serving")
    watch.cancel()


def add_files(pool, blobs):
    protos = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in blobs]
    added = set()
    while len(added) < len(protos):
        progress = False
        for p, b in zip(protos, blobs):
            if p.name not in added and all(d in added for d in p.dependency):
                pool.AddSerializedFile(b)
                added.add(p.name)
                progress = True
        check(progress, "dependencies missing among %s" % [p.name for p in protos])
    return [p.name for p in protos]


def reflect(ch, version):
    path = "/grpc.reflection.%s.ServerReflection/ServerReflectionInfo" % version
    reqs = [
        field_bytes(7, "*"),
        field_bytes(4, "inference.GRPCInferenceService.ModelInfer"),
        field_bytes(4, "inference.ModelInferRequest.InferInputTensor"),
        field_bytes(3, "grpc/health/v1/health.proto"),
        field_bytes(4, "no.such.Symbol"),
        field_bytes(3, "no/such/file.proto"),
        field_bytes(4, "inference.GRPCInferenceService"),
        field_bytes(4, "grpc.health.v1.HealthCheckResponse.ServingStatus"),
    ]
    s = Stream(ch, path)
    out = []
    for r in reqs:  # one answer per request, in order
        q = field_bytes(1, "localhost") + r
        s.send(q)
        resp = parse(s.recv())
        check(first(resp, 2) == q, "%s: original_request echoed" % version)
        check(first(resp, 1) == b"localhost", "%s: valid_host" % version)
        out.append(resp)
    s.close()
    check(list(s.call) == [] and s.call.code() == grpc.StatusCode.OK, "%s: end" % version)

    services = sorted(first(parse(sv), 1).decode()
                      for n, sv in parse(first(out[0], 6)) if n == 1)
    check(services == sorted(["inference.GRPCInferenceService", "grpc.health.v1.Health",
                              "grpc.reflection.v1.ServerReflection",
                              "grpc.reflection.v1alpha.ServerReflection"]),
          "%s: services %s" % (version, services))

    def files(resp):
        fdr = first(resp, 4)
        check(fdr is not None, "%s: no file_descriptor_response in %r" % (version, resp))
        return [v for n, v in parse(fdr) if n == 1]

    pool = descriptor_pool.DescriptorPool()
    names = add_files(pool, files(out[1]))
    check(names == ["grpc_service.proto", "model_config.proto"], "%s: files %s" % (version, names))
    m = pool.FindMethodByName("inference.GRPCInferenceService.ModelInfer")
    check(m.input_type.full_name == "inference.ModelInferRequest", "%s: method" % version)

    pool = descriptor_pool.DescriptorPool()
    names = add_files(pool, files(out[2]))
    check(names[0] == "grpc_service.proto", "%s: nested symbol file %s" % (version, names))
    t = pool.FindMessageTypeByName("inference.ModelInferRequest.InferInputTensor")
    check("shape" in t.fields_by_name, "%s: nested message" % version)

    pool = descriptor_pool.DescriptorPool()
    check(add_files(pool, files(out[3])) == ["grpc/health/v1/health.proto"], "%s: by name" % version)
    pool.FindServiceByName("grpc.health.v1.Health")

    for k in (4, 5):
        err = first(out[k], 7)
        check(err is not None, "%s: error_response for request %d" % (version, k))
        check(first(parse(err), 1) == 5, "%s: NOT_FOUND code" % version)
    check(len(files(out[6])) == 2, "%s: service symbol" % version)
    check(len(files(out[7])) == 1, "%s: nested enum symbol" % version)


def test_reflection(ch):
    reflect(ch, "v1")
    reflect(ch, "v1alpha")


def test_shutdown_with_open_stream(ch):
    s = Stream(ch, SVC + "ModelStreamInfer", timeout=20)
    s.send(b"before")
    check(s.recv() == b"before", "stream open")
    slow = ch.unary_unary(SVC + "ModelInfer").future(b"slow-at-shutdown", timeout=20)
    watch = ch.unary_stream(HEALTH + "Watch")(health_req(""), timeout=20)
    check(health_status(next(watch)) == SERVING, "watch before shutdown")
    time.sleep(0.2)
    s.send(b"shutdown")
    t0 = time.time()
    try:
        list(s.call)
        raise AssertionError("open stream ended without an error")
    except grpc.RpcError as e:
        check(e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE),
              "stream at shutdown: %s" % e.code())
    check(slow.exception(timeout=10) is not None, "slow call at shutdown")
    check(time.time() - t0 < 5, "shutdown took %.1f s" % (time.time() - t0))
    try:
        list(watch)
        raise AssertionError("watch ended without an error")
    except grpc.RpcError:
        pass
    s.close()


def main():
    port = int(sys.argv[1])
    opts = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]
    with grpc.insecure_channel("127.0.0.1:%d" % port, options=opts) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        for t in (test_unary, test_errors, test_deadline_metadata, test_streams, test_cancel,
                  test_health, test_reflection, test_shutdown_with_open_stream):
            t0 = time.time()
            t(ch)
            print("rpc_client: ok %s (%.2f s)" % (t.__name__, time.time() - t0), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # report and fail
        import traceback
        traceback.print_exc()
        print("rpc_client: FAILED: %s" % e, file=sys.stderr, flush=True)
        sys.exit(1)
