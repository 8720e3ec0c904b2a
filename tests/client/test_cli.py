"""End-to-end tests of blockserve-cli against a real blockserve server on a
free port (a repository with the built-in vae_mid_attention and the golden
btb_geglu_cross), and of the client's token and TLS handling against small
Python gRPC servers (certificates made with openssl at test time).

    /usr/bin/python3 tests/client/test_cli.py BLOCKSERVE BLOCKSERVE_CLI
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
from concurrent import futures

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
import harness  # noqa: E402

import grpc  # noqa: E402

BLOCKSERVE = CLI = None
STUBS = tempfile.mkdtemp(prefix="bs_cli_stubs_")
harness.generate_stubs(STUBS)
import grpc_service_pb2 as pb  # noqa: E402
import health_pb2  # noqa: E402

TOL = 1e-4

# Under ASan, leaks inside the system's c-ares are suppressed (see lsan.supp).
ENV = dict(os.environ)
ENV["LSAN_OPTIONS"] = ":".join(filter(None, [os.environ.get("LSAN_OPTIONS"),
                                             "suppressions=" + os.path.join(HERE, "lsan.supp")]))


def st_save(path, tensors):
    """{name: numpy array} -> safetensors (F32, F16, I64, BOOL)."""
    names = {"float32": "F32", "float16": "F16", "int64": "I64", "bool": "BOOL"}
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        b = a.tobytes()
        header[name] = {"dtype": names[str(a.dtype)], "shape": list(a.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def forward(model_dir, inputs, tmp):
    """blockserve forward on {name: array}: the reference output."""
    st_save(os.path.join(tmp, "fwd_in.safetensors"), inputs)
    out = os.path.join(tmp, "fwd_out.safetensors")
    subprocess.run([BLOCKSERVE, "forward", model_dir, "--inputs",
                    os.path.join(tmp, "fwd_in.safetensors"), "--output", out, "--threads", "1"],
                   check=True, capture_output=True)
    return harness.st_load(out)["output"][1]


class CliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="bs_cli_")
        cls.repo = harness.make_repository(["btb_geglu_cross"], broken=True)
        subprocess.run([BLOCKSERVE, "example", "vae_mid_attention", "--out",
                        os.path.join(cls.repo, "vae_mid_attention")], check=True,
                       capture_output=True)
        cls.server = harness.Server(BLOCKSERVE, ["--model-repository", cls.repo])
        cls.url = cls.server.address

    @classmethod
    def tearDownClass(cls):
        harness.shutdown(cls.server, cls.repo, cls.tmp)

    def cli(self, *args, url=True, ok=True):
        cmd = [CLI, args[0]] + (["-u", self.url] if url else []) + list(args[1:])
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
        if ok and p.returncode != 0:
            self.fail("%s: exit %d\n%s%s" % (" ".join(cmd), p.returncode, p.stdout, p.stderr))
        return p

    def fails(self, *args, contains, url=True):
        p = self.cli(*args, url=url, ok=False)
        self.assertNotEqual(p.returncode, 0, p.stdout)
        self.assertIn(contains, p.stderr)
        return p

    def path(self, name):
        return os.path.join(self.tmp, name)

    # -- health, models, metadata -------------------------------------------

    def test_health(self):
        p = self.cli("health")
        self.assertIn("ready yes", p.stdout)
        self.assertIn("SERVING", p.stdout)
        self.cli("health", "vae_mid_attention")
        self.fails("health", "broken", contains="broken")

    def test_models(self):
        p = self.cli("models")
        lines = p.stdout.strip().split("\n")
        self.assertEqual(sorted(l.split()[0] for l in lines),
                         ["broken", "btb_geglu_cross", "vae_mid_attention"])
        broken = [l for l in lines if l.startswith("broken")][0]
        self.assertNotIn("READY", broken.split("\t")[2])
        js = json.loads(self.cli("models", "--json").stdout)
        self.assertEqual(len(js), 3)
        self.assertTrue([m for m in js if m["name"] == "broken"][0]["reason"])

    def test_metadata(self):
        p = self.cli("metadata", "btb_geglu_cross")
        self.assertIn("input hidden_states FP32 [-1, -1, 32]", p.stdout)
        self.assertIn("attention_mask FP32 [-1, -1, -1] (optional)", p.stdout)
        self.assertIn("output output FP32", p.stdout)
        js = json.loads(self.cli("metadata", "vae_mid_attention", "--json").stdout)
        self.assertEqual(js["inputs"][0]["name"], "hidden_states")
        self.assertEqual(js["inputs"][0]["shape"], [-1, 512, -1, -1])
        self.fails("metadata", "nosuch", contains="NOT_FOUND")

    # -- infer ------------------------------------------------------------------

    def test_infer_npy_matches_forward(self):
        rng = np.random.default_rng(3)
        x = rng.standard_normal((2, 512, 3, 5)).astype(np.float32)
        np.save(self.path("x.npy"), x)
        self.cli("infer", "vae_mid_attention", "--input", "hidden_states=" + self.path("x.npy"),
                 "--output", self.path("y.npy"))
        got = np.load(self.path("y.npy"))
        want = forward(os.path.join(self.repo, "vae_mid_attention"), {"hidden_states": x},
                       self.tmp)
        self.assertEqual(got.shape, want.shape)
        self.assertLessEqual(float(np.max(np.abs(got - want))), TOL)

    def test_infer_safetensors_matches_forward(self):
        case = os.path.join(harness.GOLDEN, "btb_geglu_cross")
        self.cli("infer", "btb_geglu_cross", "--input", os.path.join(case, "inputs.safetensors"),
                 "--output", self.path("y.safetensors"))
        got = harness.st_load(self.path("y.safetensors"))
        self.assertEqual(list(got), ["output"])
        self.assertEqual(got["output"][0], "F32")
        inputs = {k: v for k, (_, v) in harness.st_load(
            os.path.join(case, "inputs.safetensors")).items()}
        want = forward(os.path.join(self.repo, "btb_geglu_cross"), inputs, self.tmp)
        self.assertLessEqual(float(np.max(np.abs(got["output"][1] - want))), TOL)
        expected = harness.st_load(os.path.join(case, "expected.safetensors"))["output"][1]
        self.assertLessEqual(float(np.max(np.abs(got["output"][1] - expected))), TOL)

    def test_infer_mixed_files_and_f16(self):
        """One input from a named safetensors entry, one from .npy in FP16."""
        rng = np.random.default_rng(4)
        h = rng.standard_normal((1, 6, 32)).astype(np.float32)
        e = rng.standard_normal((1, 5, 24)).astype(np.float16)
        st_save(self.path("two.safetensors"), {"hidden_states": h, "other": h[:, :1]})
        np.save(self.path("e.npy"), e)
        self.cli("infer", "btb_geglu_cross",
                 "--input", "hidden_states=" + self.path("two.safetensors"),
                 "--input", "encoder_hidden_states=" + self.path("e.npy"),
                 "--output", self.path("y2.npy"))
        got = np.load(self.path("y2.npy"))
        want = forward(os.path.join(self.repo, "btb_geglu_cross"),
                       {"hidden_states": h, "encoder_hidden_states": e}, self.tmp)
        self.assertLessEqual(float(np.max(np.abs(got - want))), TOL)

    def test_infer_random_inputs_from_metadata(self):
        p = self.cli("infer", "btb_geglu_cross")
        self.assertIn("output output FP32 [1, 1, 32]", p.stdout)
        p = self.cli("infer", "vae_mid_attention", "--shape", "hidden_states=1,512,2,2")
        self.assertIn("output output FP32 [1, 512, 2, 2]", p.stdout)

    # -- stream, bench -------------------------------------------------------------

    def test_stream(self):
        p = self.cli("stream", "btb_geglu_cross", "-n", "12", "--window", "4")
        ids = sorted(int(m) for m in re.findall(r"^id (\d+) ok", p.stdout, re.M))
        self.assertEqual(ids, list(range(12)))
        self.assertIn("12 responses, 12 ok, 0 failed", p.stdout)
        p = self.fails("stream", "nosuch", "-n", "3", "--shape", "hidden_states=1,2,32:FP32",
                       contains="3 of 3 requests failed")
        self.assertEqual(len(re.findall(r"^id \d+ error: .*nosuch", p.stdout, re.M)), 3)

    def bench(self, *args):
        js = json.loads(self.cli("bench", "btb_geglu_cross", "--json", *args).stdout)
        self.assertEqual(sum(js["status_codes"].values()), js["count"])
        self.assertEqual(sum(b["count"] for b in js["histogram"]), js["count"])
        lat = js["latency_ms"]
        self.assertTrue(0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]
                        <= lat["max"], lat)
        self.assertLessEqual(lat["min"], lat["avg"])
        self.assertLessEqual(lat["avg"], lat["max"])
        return js

    def test_bench_count(self):
        js = self.bench("-c", "4", "-n", "200")
        self.assertEqual(js["count"], 200)
        self.assertEqual(js["status_codes"], {"OK": 200})
        self.assertGreater(js["rps"], 0)

    def test_bench_stream(self):
        js = self.bench("-c", "3", "-n", "30", "--stream")
        self.assertEqual(js["status_codes"], {"OK": 30})

    def test_bench_duration_and_rate(self):
        js = self.bench("-c", "2", "-z", "1s", "--rps", "40")
        self.assertGreaterEqual(js["count"], 30)
        self.assertLessEqual(js["count"], 41)
        self.assertEqual(js["status_codes"], {"OK": js["count"]})

    def test_bench_text_and_failures_counted(self):
        p = self.cli("bench", "btb_geglu_cross", "-c", "2", "-n", "20")
        for word in ("Requests/sec", "Response time histogram", "99 % in", "[OK]\t20 responses"):
            self.assertIn(word, p.stdout)
        p = self.cli("bench", "btb_geglu_cross", "-c", "2", "-n", "10", "--json",
                     "--shape", "hidden_states=1,2,31:FP32",
                     "--shape", "encoder_hidden_states=1,2,24:FP32", ok=False)
        self.assertEqual(p.returncode, 1)
        js = json.loads(p.stdout)
        self.assertEqual(js["status_codes"], {"INVALID_ARGUMENT": 10})
        self.assertIn("INVALID_ARGUMENT", js["first_error"])

    # -- make-request -------------------------------------------------------------

    def test_make_request_is_accepted(self):
        out = self.path("req.bin")
        self.cli("make-request", "vae_mid_attention", "--shape", "hidden_states=1,512,2,1:FP32",
                 "--out", out, url=False)  # offline: the datatype is given
        with open(out, "rb") as f:
            data = f.read()
        req = pb.ModelInferRequest.FromString(data)
        self.assertEqual(req.model_name, "vae_mid_attention")
        self.assertEqual(list(req.inputs[0].shape), [1, 512, 2, 1])
        with grpc.insecure_channel(self.url) as ch:
            call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                  request_serializer=None, response_deserializer=None)
            resp = pb.ModelInferResponse.FromString(call(data, timeout=30))
        self.assertEqual(list(resp.outputs[0].shape), [1, 512, 2, 1])
        x = np.frombuffer(req.raw_input_contents[0], "<f4").reshape(1, 512, 2, 1)
        want = forward(os.path.join(self.repo, "vae_mid_attention"), {"hidden_states": x},
                       self.tmp)
        got = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(want.shape)
        self.assertLessEqual(float(np.max(np.abs(got - want))), TOL)
        # metadata from the server when nothing is given
        self.cli("make-request", "btb_geglu_cross", "--out", self.path("req2.bin"))
        with open(self.path("req2.bin"), "rb") as f:
            req2 = pb.ModelInferRequest.FromString(f.read())
        self.assertEqual(sorted(i.name for i in req2.inputs),
                         ["encoder_hidden_states", "hidden_states"])

    # -- errors ---------------------------------------------------------------------

    def test_unreachable(self):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        for cmd in (["health"], ["models"], ["infer", "m"], ["bench", "m", "-n", "1"]):
            p = subprocess.run([CLI] + cmd + ["-u", "127.0.0.1:%d" % port, "--timeout", "3"],
                               capture_output=True, text=True, timeout=30, env=ENV)
            self.assertEqual(p.returncode, 1, cmd)
            self.assertIn("cannot connect to 127.0.0.1:%d" % port, p.stderr)

    def test_tls_against_plaintext_server(self):
        self.fails("health", "--tls", "--timeout", "3", contains="TLS handshake failed")

    def test_server_errors_shown(self):
        self.fails("infer", "nosuch", "--shape", "x=1:FP32", contains="NOT_FOUND")
        np.save(self.path("bad_shape.npy"), np.zeros((1, 7, 2, 2), np.float32))
        self.fails("infer", "vae_mid_attention", "--input",
                   "hidden_states=" + self.path("bad_shape.npy"), contains="INVALID_ARGUMENT")

    def test_bad_files(self):
        with open(self.path("junk.npy"), "wb") as f:
            f.write(b"this is not numpy")
        self.fails("infer", "vae_mid_attention", "--input",
                   "hidden_states=" + self.path("junk.npy"), contains="not a .npy file")
        np.save(self.path("fortran.npy"), np.asfortranarray(np.zeros((2, 512, 2, 2), np.float32)))
        self.fails("infer", "vae_mid_attention", "--input",
                   "hidden_states=" + self.path("fortran.npy"), contains="Fortran order")
        np.save(self.path("c128.npy"), np.zeros((2,), np.complex128))
        self.fails("infer", "vae_mid_attention", "--input",
                   "hidden_states=" + self.path("c128.npy"), contains="unsupported dtype '<c16'")
        self.fails("infer", "vae_mid_attention", "--input",
                   "hidden_states=" + self.path("missing.npy"), contains="No such file")
        self.fails("infer", "vae_mid_attention", "--input", self.path("x.txt"),
                   contains="give the input's name")
        self.fails("infer", "vae_mid_attention", "--output", self.path("out.txt"),
                   contains="expected a .npy or .safetensors")

    def test_usage_errors(self):
        p = self.cli("infer", ok=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("missing MODEL", p.stderr)
        p = self.cli("bench", "m", "-c", "zero", ok=False)
        self.assertEqual(p.returncode, 2)
        p = subprocess.run([CLI, "frobnicate"], capture_output=True, text=True, env=ENV)
        self.assertEqual(p.returncode, 2)
        self.assertIn("unknown command", p.stderr)


# -- token and TLS against Python gRPC servers ---------------------------------------

def index_server(creds=None, token=None):
    """A gRPC server answering RepositoryIndex (one model), ServerLive and
    ServerReady, and grpc.health.v1 Check; with token, every call but the
    health check needs "authorization: Bearer <token>", as blockserve does."""
    def authorized(context):
        md = dict(context.invocation_metadata())
        if token is not None and md.get("authorization") != "Bearer " + token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def index(request, context):
        authorized(context)
        r = pb.RepositoryIndexResponse()
        r.models.add(name="pymodel", version="1", state="READY")
        return r.SerializeToString()

    def live(request, context):
        authorized(context)
        return pb.ServerLiveResponse(live=True).SerializeToString()

    def ready(request, context):
        authorized(context)
        return pb.ServerReadyResponse(ready=True).SerializeToString()

    def check(request, context):
        return health_pb2.HealthCheckResponse(status=1).SerializeToString()

    def unary(fn):
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=None,
                                                   response_serializer=None)

    handlers = [
        grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
            "RepositoryIndex": unary(index), "ServerLive": unary(live),
            "ServerReady": unary(ready)}),
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": unary(check)})]
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=handlers)
    if creds is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, "127.0.0.1:%d" % port


def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=" + who,
                "-keyout", who + ".key", "-out", who + ".csr", cwd=d)
        openssl("x509", "-req", "-in", who + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", who + ".pem",
                cwd=d)
    # a second CA the server does not trust
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other",
            "-keyout", "other.key", "-out", "other.pem", cwd=d)


class TokenAndTlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = tempfile.mkdtemp(prefix="bs_cli_pki_")
        make_pki(cls.d)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.d, ignore_errors=True)

    def f(self, name):
        return os.path.join(self.d, name)

    def run_cli(self, url, *args):
        return subprocess.run([CLI, "models", "-u", url, "--timeout", "5"] + list(args),
                              capture_output=True, text=True, timeout=60, env=ENV)

    def test_bearer_token(self):
        server, url = index_server(token="s3cret")
        try:
            p = self.run_cli(url)
            self.assertEqual(p.returncode, 1)
            self.assertIn("UNAUTHENTICATED: missing or wrong bearer token", p.stderr)
            p = self.run_cli(url, "--token", "s3cret")
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertTrue(p.stdout.startswith("pymodel\t"))
            with open(self.f("token"), "w") as f:
                f.write("s3cret\n")
            p = self.run_cli(url, "--token-file", self.f("token"))
            self.assertEqual(p.returncode, 0, p.stderr)
            p = self.run_cli(url, "--token", "wrong")
            self.assertIn("UNAUTHENTICATED", p.stderr)
            # health without a token: grpc.health.v1 is open, ServerReady is not
            p = subprocess.run([CLI, "health", "-u", url], capture_output=True, text=True,
                               timeout=60, env=ENV)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("SERVING, ready yes (ServerReady needs a token)", p.stdout)
            p = subprocess.run([CLI, "health", "-u", url, "--token", "s3cret"],
                               capture_output=True, text=True, timeout=60, env=ENV)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("live yes, ready yes", p.stdout)
        finally:
            server.stop(None)

    def read(self, name):
        with open(self.f(name), "rb") as f:
            return f.read()

    def test_tls(self):
        creds = grpc.ssl_server_credentials([(self.read("server.key"), self.read("server.pem"))])
        server, url = index_server(creds)
        try:
            p = self.run_cli(url, "--tls-ca", self.f("ca.pem"))
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("pymodel", p.stdout)
            p = self.run_cli("grpcs://localhost:" + url.split(":")[1], "--tls-ca", self.f("ca.pem"))
            self.assertEqual(p.returncode, 0, p.stderr)
            p = self.run_cli(url, "--tls-ca", self.f("other.pem"))
            self.assertEqual(p.returncode, 1)
            self.assertIn("TLS handshake failed", p.stderr)
            p = self.run_cli(url)  # plaintext client, TLS server
            self.assertEqual(p.returncode, 1)
            self.assertIn("a TLS server?", p.stderr)
            p = self.run_cli(url, "--tls-ca", self.f("nope.pem"))
            self.assertIn("nope.pem", p.stderr)
            p = self.run_cli(url, "--tls-ca", self.f("ca.pem"), "--tls-cert", self.f("client.pem"))
            self.assertIn("needs both --tls-cert and --tls-key", p.stderr)
        finally:
            server.stop(None)

    def test_mtls(self):
        creds = grpc.ssl_server_credentials([(self.read("server.key"), self.read("server.pem"))],
                                            root_certificates=self.read("ca.pem"),
                                            require_client_auth=True)
        server, url = index_server(creds, token="t")
        try:
            p = self.run_cli(url, "--tls-ca", self.f("ca.pem"), "--token", "t")
            self.assertEqual(p.returncode, 1)  # no client certificate
            self.assertIn("TLS handshake failed", p.stderr)
            p = self.run_cli(url, "--tls-ca", self.f("ca.pem"), "--tls-cert", self.f("client.pem"),
                             "--tls-key", self.f("client.key"), "--token", "t")
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("pymodel", p.stdout)
        finally:
            server.stop(None)


class BlockserveTlsTest(unittest.TestCase):
    """blockserve-cli against blockserve itself with mutual TLS and a bearer
    token."""

    @classmethod
    def setUpClass(cls):
        cls.d = tempfile.mkdtemp(prefix="bs_cli_tls_")
        make_pki(cls.d)
        with open(os.path.join(cls.d, "token"), "w") as f:
            f.write("tok-42\n")
        subprocess.run([BLOCKSERVE, "example", "vae_mid_attention", "--out",
                        os.path.join(cls.d, "repo", "vae_mid_attention")], check=True,
                       capture_output=True)
        args = ["--model-repository", os.path.join(cls.d, "repo"),
                "--tls-cert", os.path.join(cls.d, "server.pem"),
                "--tls-key", os.path.join(cls.d, "server.key"),
                "--tls-client-ca", os.path.join(cls.d, "ca.pem"),
                "--auth-token-file", os.path.join(cls.d, "token"), "--no-metrics"]
        cls.server = harness.Server(BLOCKSERVE, args)

    @classmethod
    def tearDownClass(cls):
        harness.shutdown(cls.server, cls.d)

    def run_cli(self, *args, tls=True, token=True):
        cmd = [CLI, args[0], "-u", self.server.address, "--timeout", "5"] + list(args[1:])
        if tls:
            cmd += ["--tls-ca", os.path.join(self.d, "ca.pem"),
                    "--tls-cert", os.path.join(self.d, "client.pem"),
                    "--tls-key", os.path.join(self.d, "client.key")]
        if token:
            cmd += ["--token-file", os.path.join(self.d, "token")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)

    def test_calls(self):
        p = self.run_cli("health", "vae_mid_attention")
        self.assertEqual(p.returncode, 0, p.stderr)
        p = self.run_cli("health", token=False)  # what a container health check runs
        self.assertEqual(p.returncode, 0, p.stderr)
        p = self.run_cli("models")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertTrue(p.stdout.startswith("vae_mid_attention"))
        p = self.run_cli("infer", "vae_mid_attention", "--shape", "hidden_states=1,512,2,2")
        self.assertEqual(p.returncode, 0, p.stderr)
        p = self.run_cli("bench", "vae_mid_attention", "-c", "2", "-n", "20", "--json",
                         "--shape", "hidden_states=1,512,1,1")
        self.assertEqual(json.loads(p.stdout)["status_codes"], {"OK": 20})
        p = self.run_cli("stream", "vae_mid_attention", "-n", "3",
                         "--shape", "hidden_states=1,512,1,1")
        self.assertEqual(p.returncode, 0, p.stderr)

    def test_refusals(self):
        p = self.run_cli("models", token=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("UNAUTHENTICATED", p.stderr)
        p = self.run_cli("models", tls=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("a TLS server?", p.stderr)
        p = self.run_cli("models", "--tls-ca", os.path.join(self.d, "other.pem"), tls=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("TLS handshake failed", p.stderr)
        p = self.run_cli("models", "--tls-ca", os.path.join(self.d, "ca.pem"), tls=False)
        self.assertEqual(p.returncode, 1)  # no client certificate
        self.assertIn("TLS handshake failed", p.stderr)


if __name__ == "__main__":
    BLOCKSERVE, CLI = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    del sys.argv[1:3]
    unittest.main(verbosity=2)
