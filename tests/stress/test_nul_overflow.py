"""NUL bytes and integer overflow at the edges: ModelInfer with a model name,
model version or input datatype that holds a NUL ("vae_mid_attention\\0evil")
must be INVALID_ARGUMENT with a message that mentions NUL (never served as
the prefix before the NUL), a bearer token with a NUL after the right token
UNAUTHENTICATED, and `timeout` parameters of 2^63-1 and 9.2e15 microseconds
must simply work (no deadline), unary and on a stream. After each case the
server must still be alive and serving.

The requests are serialized protobuf bytes sent as they are (grpcio with no
serializer); the token with a NUL goes through the raw HTTP/2 client, since
grpcio refuses such metadata itself.

    /usr/bin/python3 tests/stress/test_nul_overflow.py BLOCKSERVE_BINARY
"""

import os
import shutil
import tempfile

import stress_common as sc

import grpc

MODEL = "vae_mid_attention"
TOKEN = "stress-token-0123456789"
OUT_SHAPE = [1, 512, 4, 4]


def main():
    fig = sc.Figures("NUL bytes and overflowing timeouts")
    repo = sc.make_repo({MODEL: ("example:" + MODEL, None)})
    tokdir = tempfile.mkdtemp(prefix="bs_stress_tok_")
    tokfile = os.path.join(tokdir, "token")
    with open(tokfile, "w") as f:
        f.write(TOKEN + "\n")
    server = sc.start_server(["--auth-token-file", tokfile], repo)
    try:
        run(server, fig)
    finally:
        code = server.stop()
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(tokdir, ignore_errors=True)
    fig.check("server exit code after SIGTERM", code, "== 0", code == 0)
    if code != 0:
        print(server.text()[-4000:])
    fig.report()


def run(server, fig):
    md = [("authorization", "Bearer " + TOKEN)]
    channel = server.channel()
    unary = channel.unary_unary(sc.SERVICE + "ModelInfer")          # bytes in, bytes out
    stream = channel.stream_stream(sc.SERVICE + "ModelStreamInfer")
    good = sc.infer_request(MODEL, sc.vae_inputs(4))

    def still_serving(case):
        try:
            r = sc.pb.ModelInferResponse.FromString(
                unary(good.SerializeToString(), metadata=md, timeout=30))
            ok = list(r.outputs[0].shape) == OUT_SHAPE
        except grpc.RpcError as e:
            ok = False
            fig.note("after %s: %s %s" % (case, e.code().name, e.details()))
        fig.check("  then a valid call OK (after %s)" % case, server.alive() and ok, "True",
                  server.alive() and ok)

    still_serving("control")

    def variant(what):
        r = sc.pb.ModelInferRequest()
        r.CopyFrom(good)
        if what == "model_name":
            r.model_name = MODEL + "\0evil"
        elif what == "model_version":
            r.model_version = "1\0junk"
        elif what == "datatype":
            r.inputs[0].datatype = "FP32\0junk"
        data = r.SerializeToString()
        assert b"\0evil" in data or b"\0junk" in data, "the NUL must be on the wire"
        return data

    for what in ("model_name", "model_version", "datatype"):
        data = variant(what)
        try:
            unary(data, metadata=md, timeout=30)
            got, msg = "OK", ""
        except grpc.RpcError as e:
            got, msg = e.code().name, e.details() or ""
        fig.check("unary %s with NUL: status" % what, got, "INVALID_ARGUMENT",
                  got == "INVALID_ARGUMENT")
        fig.check("  message mentions NUL", repr(msg[:60]), "contains 'NUL'",
                  "nul" in msg.lower())
        still_serving(what)
        # the same message on a stream: its own error_message
        try:
            rs = [sc.pb.ModelStreamInferResponse.FromString(x) for x in
                  stream(iter([data]), metadata=md, timeout=30)]
            end = "OK"
        except grpc.RpcError as e:
            rs, end = [], e.code().name
        emsg = rs[0].error_message if rs else ""
        fig.check("stream %s with NUL: error_message mentions NUL" % what,
                  "%s, %r" % (end, emsg[:50]), "one error_message with 'NUL'",
                  len(rs) == 1 and "nul" in emsg.lower())
        still_serving(what + " stream")

    # the bearer token with a NUL after the right token (raw HTTP/2: grpcio refuses it)
    for label, value in (("right token (control)", b"Bearer " + TOKEN.encode()),
                         ("token + NUL + junk", b"Bearer " + TOKEN.encode() + b"\0junk")):
        h2c = sc.H2Client(server.port, window=1 << 24, read=True, headers_validation=False)
        call = h2c.unary("ModelInfer", good.SerializeToString(),
                         metadata=[(b"authorization", value)], timeout=30)
        h2c.close()
        st = call.status()
        if st is not None:
            name = {c.value[0]: c.name for c in grpc.StatusCode}.get(st[0], str(st[0]))
        elif call.reset is not None:
            name = "RST_STREAM(%d)" % call.reset
        else:
            name = "no status"
        want = "OK" if "control" in label else "UNAUTHENTICATED"
        fig.check("raw HTTP/2 ModelInfer, %s" % label, name, want, name == want)
        still_serving(label)

    # huge timeouts: no deadline at all
    for t in (9223372036854775807, 9200000000000000):
        r = sc.infer_request(MODEL, sc.vae_inputs(4), params={"timeout": t})
        try:
            resp = sc.pb.ModelInferResponse.FromString(
                unary(r.SerializeToString(), metadata=md, timeout=30))
            got = "OK" if list(resp.outputs[0].shape) == OUT_SHAPE else "OK (wrong shape)"
        except grpc.RpcError as e:
            got = "%s %r" % (e.code().name, (e.details() or "")[:50])
        fig.check("unary timeout=%d" % t, got, "OK", got == "OK")
        try:
            rs = [sc.pb.ModelStreamInferResponse.FromString(x) for x in
                  stream(iter([r.SerializeToString()] * 2), metadata=md, timeout=30)]
            oks = sum(1 for x in rs if not x.error_message and
                      list(x.infer_response.outputs[0].shape) == OUT_SHAPE)
            errs = [x.error_message for x in rs if x.error_message]
            got = "%d answers %s" % (oks, errs[:1] or "")
        except grpc.RpcError as e:
            oks, got = 0, e.code().name
        fig.check("stream timeout=%d, 2 messages" % t, got, "2 answers", oks == 2)
        still_serving("timeout %d" % t)
    channel.close()


if __name__ == "__main__":
    main()
