"""End-to-end tests of the gRPC port's security: TLS and mutual TLS with
certificates made at test time by the openssl CLI, the bearer token
(--auth-token-file), start-up errors for bad files, and the limits an
untrusted client cannot exceed (message size, tensor elements, concurrent
streams, queue size).

    /usr/bin/python3 tests/e2e/test_secure.py BLOCKSERVE_BINARY
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

import numpy as np

import harness
import test_server as common  # generates the stubs; its tests are not collected here

import grpc  # noqa: E402

pb = common.pb
pb_grpc = common.pb_grpc
health_pb2 = common.health_pb2
health_pb2_grpc = common.health_pb2_grpc
refl_1 = common.refl_1
refl_1_grpc = common.refl_1_grpc
BINARY = None
TOKEN = "s3cr3t-t0ken.with-punctuation_~+/="
MODEL = "btb_self_only"
CERTS = None


def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True)


def make_certs(d):
    """Two CAs; a server certificate (SAN localhost, 127.0.0.1) and a client
    certificate from the first, a client certificate from the second."""
    def key(name):
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", name + ".key", cwd=d)

    def ca(name):
        key(name)
        openssl("req", "-x509", "-new", "-key", name + ".key", "-out", name + ".crt", "-days", "2",
                "-subj", "/CN=blockserve test " + name, cwd=d)

    def leaf(name, ca_name, ext):
        key(name)
        openssl("req", "-new", "-key", name + ".key", "-out", name + ".csr",
                "-subj", "/CN=" + name, cwd=d)
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write(ext)
        openssl("x509", "-req", "-in", name + ".csr", "-CA", ca_name + ".crt",
                "-CAkey", ca_name + ".key", "-CAcreateserial", "-out", name + ".crt",
                "-days", "2", "-extfile", name + ".ext", cwd=d)

    ca("ca")
    ca("other_ca")
    leaf("server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                         "extendedKeyUsage=serverAuth\n")
    leaf("client", "ca", "extendedKeyUsage=clientAuth\n")
    leaf("stranger", "other_ca", "extendedKeyUsage=clientAuth\n")


def path(name):
    return os.path.join(CERTS, name)


def read(name):
    with open(path(name), "rb") as f:
        return f.read()


def setUpModule():
    global CERTS
    CERTS = tempfile.mkdtemp(prefix="bs_certs_")
    make_certs(CERTS)


def tearDownModule():
    shutil.rmtree(CERTS, ignore_errors=True)


def request():
    return common.infer_request(MODEL, common.sample(common.case_inputs(MODEL), 0))


def tls_channel(address, client=None, ca="ca.crt", target=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(ca),
        private_key=read(client + ".key") if client else None,
        certificate_chain=read(client + ".crt") if client else None)
    options = [("grpc.ssl_target_name_override", target)] if target else []
    return grpc.secure_channel(address, creds, options=options)


class ServerCase(unittest.TestCase):
    ARGS = []

    @classmethod
    def setUpClass(cls):
        cls.repo = harness.make_repository([MODEL], broken=False)
        cls.server = harness.Server(BINARY, ["--model-repository", cls.repo] + cls.ARGS)

    @classmethod
    def tearDownClass(cls):
        harness.shutdown(cls.server, cls.repo)

    def assertStatus(self, code, fn, *args, **kw):
        with self.assertRaises(grpc.RpcError) as cm:
            fn(*args, **kw)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        return cm.exception

    def check_works(self, channel, metadata=None):
        """Inference, metadata, health and reflection all answer on channel."""
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        resp = stub.ModelInfer(request(), metadata=metadata, timeout=30)
        self.assertEqual(list(resp.outputs[0].shape), [1, 20, 32])
        md = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), metadata=metadata, timeout=30)
        self.assertEqual(md.name, MODEL)
        resps = list(stub.ModelStreamInfer(iter([request()]), metadata=metadata, timeout=30))
        self.assertEqual(resps[0].error_message, "")
        h = health_pb2_grpc.HealthStub(channel)
        self.assertEqual(h.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status,
                         health_pb2.HealthCheckResponse.SERVING)
        refl = refl_1_grpc.ServerReflectionStub(channel)
        r = list(refl.ServerReflectionInfo(iter([refl_1.ServerReflectionRequest(
            list_services="")]), metadata=metadata, timeout=30))
        names = [s.name for s in r[0].list_services_response.service]
        self.assertIn("inference.GRPCInferenceService", names)


class TlsTest(ServerCase):
    @classmethod
    def setUpClass(cls):
        cls.ARGS = ["--tls-cert", path("server.crt"), "--tls-key", path("server.key")]
        super().setUpClass()

    def test_secure_channel_works(self):
        self.assertIn("(TLS)", self.server.text())
        with tls_channel(self.server.address) as ch:  # the IP SAN
            self.check_works(ch)
        with tls_channel(self.server.address, target="localhost") as ch:  # the DNS SAN
            self.check_works(ch)

    def test_plaintext_client_fails(self):
        with grpc.insecure_channel(self.server.address) as ch:
            self.assertStatus(grpc.StatusCode.UNAVAILABLE,
                              pb_grpc.GRPCInferenceServiceStub(ch).ServerLive,
                              pb.ServerLiveRequest(), timeout=5)

    def test_untrusted_server_certificate_fails(self):
        with tls_channel(self.server.address, ca="other_ca.crt") as ch:
            self.assertStatus(grpc.StatusCode.UNAVAILABLE,
                              pb_grpc.GRPCInferenceServiceStub(ch).ServerLive,
                              pb.ServerLiveRequest(), timeout=5)


class MutualTlsAndTokenTest(ServerCase):
    @classmethod
    def setUpClass(cls):
        token_file = os.path.join(CERTS, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + " \n\n")
        cls.ARGS = ["--tls-cert", path("server.crt"), "--tls-key", path("server.key"),
                    "--tls-client-ca", path("ca.crt"), "--auth-token-file", token_file]
        super().setUpClass()

    def test_client_certificate_and_token_work(self):
        self.assertIn("(TLS, client certificates)", self.server.text())
        with tls_channel(self.server.address, client="client") as ch:
            self.check_works(ch, metadata=[("authorization", "Bearer " + TOKEN)])

    def test_without_client_certificate_fails(self):
        for client in (None, "stranger"):
            with tls_channel(self.server.address, client=client) as ch:
                h = health_pb2_grpc.HealthStub(ch)
                self.assertStatus(grpc.StatusCode.UNAVAILABLE, h.Check,
                                  health_pb2.HealthCheckRequest(service=""), timeout=5)

    def test_certificate_without_token_only_reaches_health(self):
        with tls_channel(self.server.address, client="client") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            self.assertStatus(grpc.StatusCode.UNAUTHENTICATED, stub.ModelInfer, request())
            h = health_pb2_grpc.HealthStub(ch)
            self.assertEqual(h.Check(health_pb2.HealthCheckRequest(service="")).status,
                             health_pb2.HealthCheckResponse.SERVING)


class TokenTest(ServerCase):
    @classmethod
    def setUpClass(cls):
        cls.token_dir = tempfile.mkdtemp(prefix="bs_token_")
        token_file = os.path.join(cls.token_dir, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        cls.ARGS = ["--auth-token-file", token_file, "--log-verbose", "1"]
        super().setUpClass()
        cls.channel = grpc.insecure_channel(cls.server.address)
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        super().tearDownClass()
        shutil.rmtree(cls.token_dir, ignore_errors=True)

    def every_call(self, metadata):
        """A unary inference, a stream, metadata, liveness, reflection and an
        unknown method, each with metadata."""
        s = self.stub
        yield lambda: s.ModelInfer(request(), metadata=metadata, timeout=30)
        yield lambda: list(s.ModelStreamInfer(iter([request()]), metadata=metadata, timeout=30))
        yield lambda: s.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), metadata=metadata,
                                      timeout=30)
        yield lambda: s.ServerLive(pb.ServerLiveRequest(), metadata=metadata, timeout=30)
        refl = refl_1_grpc.ServerReflectionStub(self.channel)
        yield lambda: list(refl.ServerReflectionInfo(iter([refl_1.ServerReflectionRequest(
            list_services="")]), metadata=metadata, timeout=30))
        unknown = self.channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
        yield lambda: unknown(b"", metadata=metadata, timeout=30)

    def test_missing_or_wrong_token_is_unauthenticated(self):
        for md in (None, [("authorization", "Bearer wrong")],
                   [("authorization", "Bearer " + TOKEN[:-1])],
                   [("authorization", "Bearer " + TOKEN + "x")],
                   [("authorization", TOKEN)], [("authorization", "Basic " + TOKEN)],
                   [("x-api-key", TOKEN)]):
            for i, call in enumerate(self.every_call(md)):
                with self.subTest(metadata=md, call=i):
                    err = self.assertStatus(grpc.StatusCode.UNAUTHENTICATED, call)
                    self.assertIn("token" if md else "authorization", err.details())
        # nothing reached the model
        st = self.stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), metadata=[
            ("authorization", "Bearer " + TOKEN)]).model_stats[0]
        self.assertEqual(st.inference_stats.success.count + st.inference_stats.fail.count, 0)

    def test_right_token_works(self):
        for scheme in ("Bearer ", "bearer "):
            calls = list(self.every_call([("authorization", scheme + TOKEN)]))
            results = [call() for call in calls[:5]]
            self.assertEqual(list(results[0].outputs[0].shape), [1, 20, 32])
            self.assertEqual(results[1][0].error_message, "")
            self.assertEqual(results[2].name, MODEL)
            self.assertTrue(results[3].live)
            # authenticated, then unknown
            self.assertStatus(grpc.StatusCode.UNIMPLEMENTED, calls[5])

    def test_health_needs_no_token(self):
        h = health_pb2_grpc.HealthStub(self.channel)
        SERVING = health_pb2.HealthCheckResponse.SERVING
        self.assertEqual(h.Check(health_pb2.HealthCheckRequest(service="")).status, SERVING)
        watch = h.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        self.assertEqual(next(watch).status, SERVING)
        watch.cancel()

    def test_token_never_logged(self):
        list(self.every_call([("authorization", "Bearer " + TOKEN)]))[0]()
        self.assertNotIn(TOKEN, self.server.text())


class StartupErrorsTest(unittest.TestCase):
    def start(self, *args):
        r = subprocess.run([BINARY, "serve", "--grpc-port", "0", "--grpc-address", "127.0.0.1",
                            "--no-metrics"] + list(args), capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(r.returncode, 1, r.stderr)  # an orderly exit, not a crash
        return r.stderr

    def test_bad_files_are_named(self):
        d = tempfile.mkdtemp(prefix="bs_bad_")
        try:
            garbage = os.path.join(d, "garbage.pem")
            with open(garbage, "w") as f:
                f.write("not a certificate\n")
            empty = os.path.join(d, "empty")
            with open(empty, "w") as f:
                f.write(" \n\t\n")
            missing = os.path.join(d, "missing.crt")
            cert, key = path("server.crt"), path("server.key")
            cases = [
                (["--tls-cert", missing, "--tls-key", key], ["--tls-cert", missing, "cannot open"]),
                (["--tls-cert", cert, "--tls-key", missing], ["--tls-key", missing]),
                (["--tls-cert", garbage, "--tls-key", key], ["not a PEM certificate"]),
                (["--tls-cert", cert, "--tls-key", garbage], ["not an unencrypted PEM private key"]),
                (["--tls-cert", cert, "--tls-key", path("client.key")], ["does not match"]),
                (["--tls-cert", cert], ["needs both --tls-cert and --tls-key"]),
                (["--tls-client-ca", path("ca.crt")], ["needs both"]),
                (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", garbage],
                 ["--tls-client-ca", "not a PEM certificate"]),
                (["--auth-token-file", empty], ["--auth-token-file", "empty"]),
                (["--auth-token-file", missing], ["--auth-token-file", "cannot open"]),
            ]
            for args, wants in cases:
                with self.subTest(args=args):
                    err = self.start(*args)
                    for w in wants:
                        self.assertIn(w, err)
        finally:
            shutil.rmtree(d, ignore_errors=True)


class LimitsTest(ServerCase):
    ARGS = ["--max-message-bytes", "65536", "--max-tensor-elements", "1000",
            "--max-concurrent-streams", "2", "--max-queue-size", "1",
            "--max-batch-size", "4", "--max-queue-delay-us", "10000000"]

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.channel = grpc.insecure_channel(cls.server.address, options=[
            ("grpc.max_send_message_length", 16 << 20)])
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        super().tearDownClass()

    def test_message_size(self):
        big = {"hidden_states": ("F32", np.zeros((1, 600, 32), np.float32))}  # 76800 bytes
        self.assertStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, self.stub.ModelInfer,
                          common.infer_request(MODEL, big))

    def test_tensor_elements(self):
        two = common.case_inputs(MODEL)  # 2 x 20 x 32 = 1280 elements, 5 KiB
        err = self.assertStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, self.stub.ModelInfer,
                                common.infer_request(MODEL, two))
        self.assertIn("1000 elements", err.details())

    def test_queue_size(self):
        fut = self.stub.ModelInfer.future(request())  # waits for a batch that never fills
        gauge = 'nv_inference_pending_request_count{model="%s",version="1"} 1' % MODEL
        url = "http://127.0.0.1:%d/metrics" % self.server.metrics_port
        deadline = time.time() + 20
        while gauge not in urllib.request.urlopen(url, timeout=10).read().decode():
            self.assertLess(time.time(), deadline, "the first request never queued")
            time.sleep(0.05)
        err = self.assertStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, self.stub.ModelInfer,
                                request(), timeout=30)
        self.assertIn("queue full", err.details())
        fut.cancel()

    def test_concurrent_streams(self):
        # Health/Watch streams stay open: two fill the connection's quota
        h = health_pb2_grpc.HealthStub(self.channel)
        watches = [h.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
                   for _ in range(2)]
        for w in watches:
            next(w)
        self.assertStatus(grpc.StatusCode.DEADLINE_EXCEEDED, self.stub.ServerLive,
                          pb.ServerLiveRequest(), timeout=1)
        watches[0].cancel()
        self.assertTrue(self.stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live)
        watches[1].cancel()


if __name__ == "__main__":
    BINARY = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
