"""blockserve-cli against a real blockserve over every transport at once:
gRPC, HTTP with binary data, HTTP with JSON data, gzip-compressed HTTP and
shared memory (over gRPC and HTTP) give identical outputs (.npy, bit for
bit) for vae_mid_attention and sd15_down0_block, in FP16 and BF16 too
(--output-dtype: the FP32 output rounded to nearest even); bench over each transport;
load/unload in explicit mode over gRPC and HTTP; shm register/status/
unregister with an object made here; errors with their HTTP status.

    /usr/bin/python3 tests/client/test_cli_server_http.py BLOCKSERVE BLOCKSERVE_CLI
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
import harness  # noqa: E402

BLOCKSERVE = CLI = None
ENV = dict(os.environ)
ENV["LSAN_OPTIONS"] = ":".join(filter(None, [os.environ.get("LSAN_OPTIONS"),
                                             "suppressions=" + os.path.join(HERE, "lsan.supp")]))

SHAPES = {"vae_mid_attention": ["--shape", "hidden_states=1,512,2,3"],
          "sd15_down0_block": ["--shape", "hidden_states=1,12,320",
                               "--shape", "encoder_hidden_states=1,5,768"]}
# (label, transport options: None = gRPC address, else HTTP)
TRANSPORTS = [("grpc", []), ("grpc-shm", ["--shm"]), ("http", ["--http"]),
              ("http-json", ["--http-json"]), ("http-gzip", ["--http", "--compress", "gzip"]),
              ("http-deflate-json", ["--http-json", "--compress", "deflate"]),
              ("http-shm", ["--http", "--shm"])]


def is_http(opts):
    return any(o.startswith("--http") for o in opts)


class CliServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="bs_cli_srv_")
        cls.repo = harness.make_repository(["approximate_gelu"], broken=False)
        for m in SHAPES:
            subprocess.run([BLOCKSERVE, "example", m, "--out", os.path.join(cls.repo, m)],
                           check=True, capture_output=True)
        cls.server = harness.Server(BLOCKSERVE, ["--model-repository", cls.repo,
                                                 "--model-control-mode", "explicit",
                                                 "--load-model", "vae_mid_attention",
                                                 "--load-model", "sd15_down0_block"])
        cls.grpc_url = cls.server.address
        cls.http_url = "127.0.0.1:%d" % cls.server.http_port
        cls.before = set(glob.glob("/dev/shm/bs-cli-*"))

    @classmethod
    def tearDownClass(cls):
        harness.shutdown(cls.server, cls.repo, cls.tmp)

    def cli(self, *args, opts=(), ok=True):
        url = self.http_url if is_http(opts) else self.grpc_url
        cmd = [CLI] + list(args) + ["-u", url] + list(opts)  # shm's words before options
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
        if ok and p.returncode != 0:
            self.fail("%s: exit %d\n%s%s" % (" ".join(cmd), p.returncode, p.stdout, p.stderr))
        return p

    def path(self, name):
        return os.path.join(self.tmp, name)

    def test_infer_same_over_every_transport(self):
        for model, shape in SHAPES.items():
            outs = {}
            for label, opts in TRANSPORTS:
                out = self.path("%s_%s.npy" % (model, label))
                self.cli("infer", model, *shape, "--seed", "7", "--output", out, opts=opts)
                outs[label] = np.load(out)
            ref = outs["grpc"]
            self.assertEqual(ref.dtype, np.float32)
            self.assertEqual(ref.shape, {"vae_mid_attention": (1, 512, 2, 3),
                                         "sd15_down0_block": (1, 12, 320)}[model])
            self.assertTrue(np.all(np.isfinite(ref)))
            for label, arr in outs.items():  # bit for bit
                self.assertEqual(arr.shape, ref.shape, label)
                np.testing.assert_array_equal(arr.view(np.uint32), ref.view(np.uint32),
                                              "%s over %s" % (model, label))
            print("\n  %s: %d transports, bit for bit" % (model, len(outs)))
        self.assertEqual(set(glob.glob("/dev/shm/bs-cli-*")) - self.before, set())

    def test_output_dtype_every_transport(self):
        """--output-dtype fp16 (.npy: numpy's float16) and bf16 (.safetensors:
        BF16) equal the FP32 output rounded to nearest even, bit for bit,
        over every transport (BF16 comes back as binary data over HTTP JSON;
        in shared memory the region takes the 16-bit bytes)."""
        shape = SHAPES["sd15_down0_block"]
        ref_path = self.path("odt_ref.npy")
        self.cli("infer", "sd15_down0_block", *shape, "--seed", "9", "--output", ref_path)
        ref = np.load(ref_path)
        u = ref.view(np.uint32).astype(np.uint64)
        want_bf16 = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        want_fp16 = ref.astype(np.float16)
        for label, opts in TRANSPORTS:
            p16 = self.path("odt_%s.npy" % label)
            self.cli("infer", "sd15_down0_block", *shape, "--seed", "9", "--output-dtype", "fp16",
                     "--output", p16, opts=opts)
            got = np.load(p16)
            self.assertEqual(got.dtype, np.float16, label)
            np.testing.assert_array_equal(got.view(np.uint16), want_fp16.view(np.uint16), label)
            pb = self.path("odt_%s.safetensors" % label)
            p = self.cli("infer", "sd15_down0_block", *shape, "--seed", "9", "--output-dtype",
                         "bf16", "--output", pb, opts=opts)
            self.assertIn("BF16", p.stdout)
            dt, got = harness.st_load(pb)["output"]
            self.assertEqual(dt, "BF16", label)
            np.testing.assert_array_equal(got, want_bf16.reshape(got.shape), label)
        # bench and stream send it too
        p = self.cli("bench", "sd15_down0_block", *shape, "-c", "2", "-n", "6", "--json",
                     "--output-dtype", "bf16", opts=["--http-json"])
        self.assertEqual(json.loads(p.stdout)["status_codes"], {"OK": 6}, p.stdout)
        p = self.cli("stream", "sd15_down0_block", *shape, "-n", "2", "--output-dtype", "fp16")
        self.assertEqual(p.stdout.count("FP16"), 2, p.stdout)
        # BF16 has no NumPy dtype (as for inputs): .safetensors only; a bad name
        p = self.cli("infer", "sd15_down0_block", *shape, "--output-dtype", "bf16", "--output",
                     self.path("odt_bad.npy"), ok=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("BF16 has no NumPy dtype (use .safetensors)", p.stderr)
        p = self.cli("infer", "sd15_down0_block", "--output-dtype", "fp64", ok=False)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("--output-dtype 'fp64': expected fp32, bf16 or fp16", p.stderr)
        self.assertEqual(set(glob.glob("/dev/shm/bs-cli-*")) - self.before, set())

    def test_bench_every_transport(self):
        for label, opts in TRANSPORTS:
            p = self.cli("bench", "vae_mid_attention", *SHAPES["vae_mid_attention"], "-c", "2",
                         "-n", "12", "--json", opts=opts)
            js = json.loads(p.stdout)
            self.assertEqual(js["count"], 12, label)
            self.assertEqual(js["status_codes"], {"OK": 12}, label)
            self.assertGreater(js["rps"], 0)
            lat = js["latency_ms"]
            self.assertTrue(0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"], lat)
            self.assertEqual(sum(b["count"] for b in js["histogram"]), 12)
            want = "http-json" if "--http-json" in opts else "http" if is_http(opts) else "grpc"
            self.assertEqual(js.get("transport", "grpc"), want, label)
            self.assertEqual(bool(js.get("shm", False)), "--shm" in opts, label)
        self.assertEqual(set(glob.glob("/dev/shm/bs-cli-*")) - self.before, set())

    def state(self, name, opts=()):
        """(version, state, reason) of name's one row in the index."""
        js = json.loads(self.cli("models", "--json", opts=opts).stdout)
        rows = [(m["version"], m["state"], m["reason"]) for m in js if m["name"] == name]
        self.assertEqual(len(rows), 1, js)
        return rows[0]

    def test_load_unload(self):
        for opts in ([], ["--http"]):
            # never loaded: version "", once unloaded: "1"
            self.assertEqual(self.state("approximate_gelu", opts)[1:], ("UNAVAILABLE", "unloaded"))
            p = self.cli("infer", "approximate_gelu", "--shape", "input=2,7,16:FP32", opts=opts,
                         ok=False)
            self.assertEqual(p.returncode, 1, p.stderr)
            self.assertIn("HTTP 404" if opts else "NOT_FOUND", p.stderr)
            self.assertIn("unloaded", p.stderr)
            self.cli("load", "approximate_gelu", opts=opts)
            self.assertEqual(self.state("approximate_gelu", opts), ("1", "READY", ""))
            self.cli("health", "approximate_gelu", opts=opts)
            p = self.cli("infer", "approximate_gelu", opts=opts)
            self.assertIn("output output FP32", p.stdout)
            self.cli("unload", "approximate_gelu", opts=opts)
            self.assertEqual(self.state("approximate_gelu", opts), ("1", "UNAVAILABLE", "unloaded"))
            p = self.cli("load", "nope", opts=opts, ok=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("HTTP 404" if opts else "NOT_FOUND", p.stderr)
            self.assertIn("nope", p.stderr)

    def test_shm_commands(self):
        key = "/bs_cli_srv_%d" % os.getpid()
        fd = os.open("/dev/shm" + key, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, 8192)
        os.close(fd)
        try:
            for opts in ([], ["--http"]):
                self.cli("shm", "register", "ra", key, "4096", opts=opts)
                self.cli("shm", "register", "rb", key, "1000", "--offset", "128", opts=opts)
                p = self.cli("shm", "status", opts=opts)
                self.assertEqual(p.stdout.strip().split("\n"),
                                 ["ra\t%s\t0\t4096" % key, "rb\t%s\t128\t1000" % key])
                p = self.cli("shm", "status", "rb", opts=opts)
                self.assertEqual(p.stdout.strip(), "rb\t%s\t128\t1000" % key)
                # the other transport sees the same registry
                other = [] if opts else ["--http"]
                self.assertEqual(len(self.cli("shm", "status", opts=other).stdout.split("\n")), 3)
                p = self.cli("shm", "register", "ra", key, "16", opts=opts, ok=False)
                self.assertEqual(p.returncode, 1)
                self.assertIn("HTTP 409" if opts else "ALREADY_EXISTS", p.stderr)
                p = self.cli("shm", "register", "rc", "/bs_cli_no_such_key", "16", opts=opts,
                             ok=False)
                self.assertEqual(p.returncode, 1)
                self.assertIn("HTTP 404" if opts else "NOT_FOUND", p.stderr)
                p = self.cli("shm", "register", "rc", key, "9000", opts=opts, ok=False)
                self.assertIn("HTTP 400" if opts else "INVALID_ARGUMENT", p.stderr)
                p = self.cli("shm", "status", "nope", opts=opts, ok=False)
                self.assertIn("HTTP 404" if opts else "NOT_FOUND", p.stderr)
                self.cli("shm", "unregister", "ra", opts=opts)
                self.assertEqual(self.cli("shm", "status", opts=opts).stdout.strip(),
                                 "rb\t%s\t128\t1000" % key)
                self.cli("shm", "unregister", opts=opts)
                self.assertEqual(self.cli("shm", "status", opts=opts).stdout.strip(), "")
        finally:
            os.unlink("/dev/shm" + key)

    def test_errors(self):
        for opts, want in ([["--http"], "HTTP 404"], [["--http-json"], "HTTP 404"], [[], "NOT_FOUND"]):
            p = self.cli("infer", "nosuch", "--shape", "hidden_states=1,2,32:FP32", opts=opts,
                         ok=False)
            self.assertEqual(p.returncode, 1, p.stderr)
            self.assertIn(want, p.stderr)
            self.assertIn("nosuch", p.stderr)
        p = self.cli("infer", "vae_mid_attention", "--shape", "hidden_states=1,511,2,2:FP32",
                     opts=["--http"], ok=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("HTTP 400", p.stderr)
        p = self.cli("bench", "nosuch", "--shape", "hidden_states=1,2,32:FP32", "-c", "1", "-n",
                     "3", "--json", opts=["--http"], ok=False)
        self.assertEqual(p.returncode, 1)
        self.assertEqual(json.loads(p.stdout)["status_codes"], {"NOT_FOUND": 3})


if __name__ == "__main__":
    BLOCKSERVE = os.path.abspath(sys.argv.pop(1))
    CLI = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
