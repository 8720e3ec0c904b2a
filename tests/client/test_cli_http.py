"""blockserve-cli over HTTP/REST, model control and system shared memory,
against stub servers written here: an HTTP server that answers Triton's
KServe v2 REST endpoints (binary tensor data, JSON data, gzip/deflate,
load/unload, system shared memory, {"error": ...} answers, a bearer token)
and a Python gRPC server for RepositoryModelLoad/Unload, the
SystemSharedMemory methods and ModelInfer with shared memory. Each test
checks the exact request the CLI sent (headers, JSON header, bytes) and
what it made of the answer. The stub model "double" answers output = 2 * x
in x's datatype and shape (BOOL: x unchanged).

    /usr/bin/python3 tests/client/test_cli_http.py BLOCKSERVE_CLI
"""

import glob
import gzip
import http.server
import json
import mmap
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib
from concurrent import futures

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
import harness  # noqa: E402

import grpc  # noqa: E402

CLI = None
STUBS = tempfile.mkdtemp(prefix="bs_cli_http_stubs_")
harness.generate_stubs(STUBS)
import grpc_service_pb2 as pb  # noqa: E402

ENV = dict(os.environ)
ENV["LSAN_OPTIONS"] = ":".join(filter(None, [os.environ.get("LSAN_OPTIONS"),
                                             "suppressions=" + os.path.join(HERE, "lsan.supp")]))

DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT8": np.int8,
          "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
          "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "BOOL": np.bool_}
META = {"name": "double", "versions": ["1"], "platform": "stub",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}]}


def double(a):
    return a.copy() if a.dtype == np.bool_ else (a * 2).astype(a.dtype)


class Regions:
    """Registered shared memory regions, mapped from /dev/shm like a server does."""

    def __init__(self):
        self.regions = {}
        self.lock = threading.Lock()

    def register(self, name, key, offset, size):
        with self.lock:
            if name in self.regions:
                return "shared memory region '%s' is already registered" % name
            path = "/dev/shm/" + key.lstrip("/")
            if not os.path.exists(path):
                return "cannot open shared memory key '%s'" % key
            with open(path, "r+b") as f:
                m = mmap.mmap(f.fileno(), 0)
            if offset + size > len(m):
                return "offset + byte_size past the object"
            self.regions[name] = (key, offset, size, m)
            return None

    def unregister(self, name):
        with self.lock:
            names = [name] if name else list(self.regions)
            for n in names:
                r = self.regions.pop(n, None)
                if r:
                    r[3].close()

    def status(self, name):
        with self.lock:
            return [{"name": n, "key": r[0], "offset": r[1], "byte_size": r[2]}
                    for n, r in sorted(self.regions.items()) if not name or n == name]

    def read(self, name, offset, size):
        key, base, total, m = self.regions[name]
        assert offset + size <= total, (offset, size, total)
        return bytes(m[base + offset: base + offset + size])

    def write(self, name, offset, data):
        key, base, total, m = self.regions[name]
        assert offset + len(data) <= total
        m[base + offset: base + offset + len(data)] = data


# -- the HTTP stub ----------------------------------------------------------------

class Stub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token=None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.token = token
        self.requests = []  # (method, path, headers, raw body, decoded body, client port)
        self.shm = Regions()
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]

    def infers(self):
        return [r for r in self.requests if r[1].endswith("/infer")]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b"", header_len=None, ctype="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        enc = self.headers.get("Accept-Encoding", "")
        self.send_response(status)
        if header_len is not None:
            self.send_header("Inference-Header-Content-Length", str(header_len))
        if "gzip" in enc and body:
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        elif "deflate" in enc and body:
            body = zlib.compress(body)
            self.send_header("Content-Encoding", "deflate")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def error(self, status, msg):
        self.answer(status, {"error": msg})

    def body(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        enc = self.headers.get("Content-Encoding")
        data = gzip.decompress(raw) if enc == "gzip" else zlib.decompress(raw) \
            if enc == "deflate" else raw
        with self.server.lock:
            self.server.requests.append((self.command, self.path, dict(self.headers), raw, data,
                                         self.client_address[1]))
        return data

    def authorized(self):
        if self.server.token is None or self.path.startswith("/v2/health"):
            return True
        if self.headers.get("Authorization") == "Bearer " + self.server.token:
            return True
        self.error(401, "missing or wrong bearer token")
        return False

    def do_GET(self):
        self.body()
        if not self.authorized():
            return
        p = self.path
        if p in ("/v2/health/live", "/v2/health/ready"):
            return self.answer(200)
        m = re.fullmatch(r"/v2/models/([^/]+)(/ready|/config)?", p)
        if m and m.group(1) != "double":
            return self.error(404, 'unknown model "%s"' % m.group(1))
        if m and m.group(2) == "/ready":
            return self.answer(200)
        if m and m.group(2) == "/config":
            return self.answer(200, {"name": "double", "input": [
                {"name": "x", "data_type": "TYPE_FP32", "dims": [4]},
                {"name": "mask", "data_type": "TYPE_BOOL", "dims": [4], "optional": True}]})
        if m:
            return self.answer(200, META)
        m = re.fullmatch(r"/v2/systemsharedmemory(?:/region/([^/]+))?/status", p)
        if m:
            return self.answer(200, self.server.shm.status(m.group(1)))
        self.error(404, "no route " + p)

    def do_POST(self):
        data = self.body()
        if not self.authorized():
            return
        p = self.path
        if p == "/v2/repository/index":
            return self.answer(200, [{"name": "double", "version": "1", "state": "READY",
                                      "reason": ""},
                                     {"name": "broken", "version": "", "state": "UNAVAILABLE",
                                      "reason": "bad config"}])
        m = re.fullmatch(r"/v2/repository/models/([^/]+)/(load|unload)", p)
        if m:
            if json.loads(data) != {}:
                return self.error(400, "expected {}")
            if m.group(1) == "bad":
                return self.error(400, "failed to load 'bad': no config.json")
            return self.answer(200)
        m = re.fullmatch(r"/v2/systemsharedmemory(?:/region/([^/]+))?/(register|unregister)", p)
        if m and m.group(2) == "register":
            q = json.loads(data)
            err = self.server.shm.register(m.group(1), q["key"], q.get("offset", 0),
                                           q["byte_size"])
            return self.error(400, err) if err else self.answer(200)
        if m:
            self.server.shm.unregister(m.group(1))
            return self.answer(200)
        m = re.fullmatch(r"/v2/models/([^/]+)/infer", p)
        if m and m.group(1) != "double":
            return self.error(404, 'unknown model "%s"' % m.group(1))
        if m:
            return self.infer(data)
        self.error(404, "no route " + p)

    def infer(self, data):
        hl = self.headers.get("Inference-Header-Content-Length")
        hl = int(hl) if hl is not None else len(data)
        req = json.loads(data[:hl])
        pos = hl
        outs = []
        for t in req["inputs"]:
            dt = DTYPES[t["datatype"]]
            par = t.get("parameters", {})
            if "shared_memory_region" in par:
                raw = self.server.shm.read(par["shared_memory_region"],
                                           par["shared_memory_offset"],
                                           par["shared_memory_byte_size"])
                a = np.frombuffer(raw, dtype=dt).reshape(t["shape"])
            elif "binary_data_size" in par:
                n = par["binary_data_size"]
                a = np.frombuffer(data[pos:pos + n], dtype=dt).reshape(t["shape"])
                pos += n
            else:
                a = np.array(t["data"], dtype=dt).reshape(t["shape"])
            outs.append((t["datatype"], double(a)))
        dtype, y = outs[0]
        want = {o["name"]: o.get("parameters", {}) for o in req.get("outputs", [])}
        par = want.get("output", {})
        binary = par.get("binary_data") or req.get("parameters", {}).get("binary_data_output")
        o = {"name": "output", "datatype": dtype, "shape": list(y.shape)}
        tail = b""
        if "shared_memory_region" in par:
            if par["shared_memory_byte_size"] < y.nbytes:
                return self.error(400, "output region too small")
            self.server.shm.write(par["shared_memory_region"], par["shared_memory_offset"],
                                  y.tobytes())
        elif binary:
            o["parameters"] = {"binary_data_size": y.nbytes}
            tail = y.tobytes()
        else:
            o["data"] = y.reshape(-1).tolist()
        head = json.dumps({"model_name": "double", "model_version": "1",
                           "outputs": [o]}).encode()
        if tail:
            return self.answer(200, head + tail, header_len=len(head),
                               ctype="application/octet-stream")
        self.answer(200, head)


# -- the gRPC stub -------------------------------------------------------------------

def grpc_stub(regions, log):
    """RepositoryModelLoad/Unload, SystemSharedMemory*, ModelMetadata and a
    ModelInfer that reads inputs from and writes outputs to shared memory."""
    def unary(fn, req_type):
        def call(raw, context):
            q = req_type.FromString(raw)
            log.append((fn.__name__, q))
            return fn(q, context).SerializeToString()
        return grpc.unary_unary_rpc_method_handler(call)

    def RepositoryModelLoad(q, context):
        if q.model_name == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "failed to load 'bad'")
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(q, context):
        return pb.RepositoryModelUnloadResponse()

    def SystemSharedMemoryRegister(q, context):
        err = regions.register(q.name, q.key, q.offset, q.byte_size)
        if err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        return pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryStatus(q, context):
        r = pb.SystemSharedMemoryStatusResponse()
        for s in regions.status(q.name):
            r.regions[s["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**s))
        return r

    def SystemSharedMemoryUnregister(q, context):
        regions.unregister(q.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    def ModelMetadata(q, context):
        r = pb.ModelMetadataResponse(name="double", versions=["1"], platform="stub")
        r.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
        r.outputs.add(name="output", datatype="FP32", shape=[-1, 4])
        return r

    def ModelInfer(q, context):
        t = q.inputs[0]
        p = t.parameters
        raw = regions.read(p["shared_memory_region"].string_param,
                           p["shared_memory_offset"].int64_param,
                           p["shared_memory_byte_size"].int64_param)
        y = double(np.frombuffer(raw, dtype=np.float32).reshape(list(t.shape)))
        op = q.outputs[0].parameters
        regions.write(op["shared_memory_region"].string_param,
                      op["shared_memory_offset"].int64_param, y.tobytes())
        r = pb.ModelInferResponse(model_name="double", model_version="1")
        r.outputs.add(name="output", datatype="FP32", shape=list(y.shape))
        return r

    fns = [RepositoryModelLoad, RepositoryModelUnload, SystemSharedMemoryRegister,
           SystemSharedMemoryStatus, SystemSharedMemoryUnregister, ModelMetadata, ModelInfer]
    handlers = {f.__name__: unary(f, getattr(pb, f.__name__ + "Request")) for f in fns}
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[
        grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, "127.0.0.1:%d" % port


# -- tests -----------------------------------------------------------------------------

def leftover_shm():
    return glob.glob("/dev/shm/bs-cli-*")


class CliHttp(unittest.TestCase):
    def setUp(self):
        self.stub = Stub()
        self.d = tempfile.mkdtemp(prefix="bs_cli_http_")
        self.shm_before = set(leftover_shm())

    def tearDown(self):
        self.stub.shutdown()
        self.stub.server_close()
        self.assertEqual(set(leftover_shm()) - self.shm_before, set(),
                         "the CLI left its shared memory object behind")

    def cli(self, *args, ok=True, url=None):
        p = subprocess.run([CLI] + list(args) + ["-u", url or self.stub.url, "--timeout", "10"],
                           capture_output=True, text=True, env=ENV, timeout=60)
        if ok:
            self.assertEqual(p.returncode, 0, p.stderr)
        return p

    def npy(self, name, a):
        path = os.path.join(self.d, name + ".npy")
        np.save(path, a)
        return path

    def test_infer_binary_exact_request(self):
        x = np.arange(8, dtype=np.float32).reshape(2, 4) - 3.5
        out = os.path.join(self.d, "out.npy")
        p = self.cli("infer", "double", "--input", "x=" + self.npy("x", x), "--output", out,
                     "--id", "r1")
        self.assertIn("output output FP32 [2, 4]", p.stdout)
        np.testing.assert_array_equal(np.load(out), 2 * x)
        method, path, headers, raw, body, _ = self.stub.infers()[0]
        self.assertEqual((method, path), ("POST", "/v2/models/double/infer"))
        hl = int(headers["Inference-Header-Content-Length"])
        self.assertEqual(json.loads(body[:hl]), {
            "id": "r1",
            "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                        "parameters": {"binary_data_size": 32}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}]})
        self.assertEqual(body[hl:], x.tobytes())
        self.assertNotIn("Content-Encoding", headers)

    def test_infer_json_every_datatype(self):
        for dt, npdt in DTYPES.items():
            x = (np.arange(8) % 5).astype(npdt).reshape(2, 4)
            out = os.path.join(self.d, "out_%s.npy" % dt)
            n = len(self.stub.infers())
            self.cli("infer", "double", "--http-json", "--input", "x=" + self.npy("x" + dt, x),
                     "--output", out)
            np.testing.assert_array_equal(np.load(out), double(x), dt)
            _, _, headers, _, body, _ = self.stub.infers()[n]
            self.assertNotIn("Inference-Header-Content-Length", headers)
            q = json.loads(body)
            self.assertEqual(q["inputs"][0]["datatype"], dt)
            self.assertEqual(q["inputs"][0]["data"], x.reshape(-1).tolist(), dt)
            self.assertEqual(q["outputs"], [{"name": "output"}])

    def test_json_refuses_bf16(self):
        p = self.cli("infer", "double", "--http-json", "--shape", "x=2,4:BF16", ok=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("BF16 has no JSON form", p.stderr)
        self.assertEqual(self.stub.infers(), [])

    def test_random_inputs_from_metadata(self):
        p = self.cli("infer", "double", "--http")  # x: [-1, 4] -> [1, 4]; mask is optional
        self.assertIn("output output FP32 [1, 4]", p.stdout)
        hl = int(self.stub.infers()[0][2]["Inference-Header-Content-Length"])
        q = json.loads(self.stub.infers()[0][4][:hl])
        self.assertEqual([t["name"] for t in q["inputs"]], ["x"])

    def test_compression(self):
        x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
        for enc, unpack in (("gzip", gzip.decompress), ("deflate", zlib.decompress)):
            out = os.path.join(self.d, enc + ".npy")
            n = len(self.stub.infers())
            self.cli("infer", "double", "--http", "--compress", enc, "--input",
                     "x=" + self.npy("x", x), "--output", out)
            np.testing.assert_array_equal(np.load(out), 2 * x)
            _, _, headers, raw, body, _ = self.stub.infers()[n]
            self.assertEqual(headers["Content-Encoding"], enc)
            self.assertIn(enc, headers["Accept-Encoding"])
            self.assertEqual(unpack(raw), body)
            self.assertLess(len(raw), len(body) + 32)
        p = self.cli("models", "--compress", "gzip", ok=False, url="127.0.0.1:1")
        self.assertEqual(p.returncode, 2)  # --compress without --http

    def test_errors(self):
        p = self.cli("infer", "nope", "--http", "--shape", "x=1,4:FP32", ok=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn('HTTP 404: unknown model "nope"', p.stderr)
        p = self.cli("metadata", "nope", "--http", ok=False)
        self.assertIn('HTTP 404: unknown model "nope"', p.stderr)
        p = self.cli("load", "bad", ok=False, url=self.stub.url + "/")
        self.assertEqual(p.returncode, 1)
        self.assertIn("HTTP 400: failed to load 'bad': no config.json", p.stderr)
        p = self.cli("infer", "double", "--shape", "x=1,4:FP32", ok=False,
                     url="http://127.0.0.1:1")
        self.assertEqual(p.returncode, 1)
        self.assertIn("cannot reach http://127.0.0.1:1", p.stderr)
        p = self.cli("stream", "double", "--shape", "x=1,4:FP32", ok=False)
        self.assertIn("not over HTTP", p.stderr)

    def test_health_models_metadata(self):
        p = self.cli("health", "double", "--http")
        self.assertIn("live yes, ready yes, model double ready yes", p.stdout)
        p = self.cli("models")
        self.assertEqual(p.stdout.splitlines(),
                         ["double\t1\tREADY", "broken\t-\tUNAVAILABLE\tbad config"])
        p = self.cli("metadata", "double", "--json")
        m = json.loads(p.stdout)
        self.assertEqual(m["inputs"][0], {"name": "x", "datatype": "FP32", "shape": [-1, 4],
                                          "optional": False})
        self.assertEqual(m["outputs"][0]["name"], "output")
        self.assertEqual(self.stub.requests[-2][1], "/v2/models/double")

    def test_load_unload(self):
        self.assertEqual(self.cli("load", "double").stdout, "double: loaded\n")
        self.assertEqual(self.cli("unload", "double").stdout, "double: unloaded\n")
        got = [(r[0], r[1], r[4]) for r in self.stub.requests]
        self.assertEqual(got, [("POST", "/v2/repository/models/double/load", b"{}"),
                               ("POST", "/v2/repository/models/double/unload", b"{}")])

    def test_shm_commands(self):
        fd = os.open("/dev/shm/bs-cli-test-%d" % os.getpid(), os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(fd, 4096)
        os.close(fd)
        key = "/bs-cli-test-%d" % os.getpid()
        try:
            self.cli("shm", "register", "r1", key, "1024", "--offset", "16")
            self.cli("shm", "register", "r2", key, "64")
            self.assertEqual(json.loads(self.stub.requests[0][4]),
                             {"key": key, "offset": 16, "byte_size": 1024})
            self.assertEqual(self.stub.requests[0][1], "/v2/systemsharedmemory/region/r1/register")
            p = self.cli("shm", "register", "r1", key, "64", ok=False)
            self.assertIn("HTTP 400: shared memory region 'r1' is already registered", p.stderr)
            p = self.cli("shm", "status")
            self.assertEqual(p.stdout, "r1\t%s\t16\t1024\nr2\t%s\t0\t64\n" % (key, key))
            self.assertEqual(self.cli("shm", "status", "r2").stdout, "r2\t%s\t0\t64\n" % key)
            self.cli("shm", "unregister", "r1")
            self.assertEqual(self.stub.requests[-1][1],
                             "/v2/systemsharedmemory/region/r1/unregister")
            self.cli("shm", "unregister")
            self.assertEqual(self.stub.requests[-1][1], "/v2/systemsharedmemory/unregister")
            self.assertEqual(self.cli("shm", "status").stdout, "")
            p = self.cli("shm", "register", "r1", key, ok=False)
            self.assertEqual(p.returncode, 2)
            p = self.cli("shm", "register", "r1", key, "-5", ok=False)
            self.assertEqual(p.returncode, 2)
        finally:
            os.unlink("/dev/shm/" + key[1:])

    def test_infer_shm(self):
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        out = os.path.join(self.d, "out.npy")
        self.cli("infer", "double", "--http", "--shm", "--input", "x=" + self.npy("x", x),
                 "--output", out)
        np.testing.assert_array_equal(np.load(out), 2 * x)
        paths = [r[1] for r in self.stub.requests]
        reg = [p for p in paths if p.endswith("/register")]
        self.assertEqual(len(reg), 1)
        name = reg[0].split("/")[4]
        self.assertTrue(name.startswith("bs-cli-"), name)
        self.assertEqual(paths[-1], "/v2/systemsharedmemory/region/%s/unregister" % name)
        body = self.stub.infers()[0][4]
        q = json.loads(body)  # no binary data: the header is the body
        self.assertEqual(q["inputs"][0]["parameters"], {
            "shared_memory_region": name, "shared_memory_byte_size": 32,
            "shared_memory_offset": 0})
        self.assertEqual(q["outputs"], [{"name": "output", "parameters": {
            "shared_memory_region": name, "shared_memory_byte_size": 32,
            "shared_memory_offset": 64}}])
        self.assertEqual(self.stub.shm.status(None), [])
        # an error still unregisters and unlinks
        p = self.cli("infer", "nope", "--http", "--shm", "--input", "x=" + self.npy("x", x),
                     ok=False)
        self.assertIn("HTTP 404", p.stderr)

    def test_bench(self):
        p = self.cli("bench", "double", "--http", "-c", "4", "-n", "40", "--json",
                     "--shape", "x=2,4:FP32")
        r = json.loads(p.stdout)
        self.assertEqual((r["status_codes"], r["transport"]), ({"OK": 40}, "http"))
        inf = self.stub.infers()
        self.assertEqual(len(inf), 40)
        self.assertLessEqual(len({i[5] for i in inf}), 4)  # keep-alive: at most 4 connections
        self.assertEqual({i[4] for i in inf}, {inf[0][4]})  # the same request every time
        p = self.cli("bench", "double", "--http-json", "-c", "2", "-n", "10", "--json",
                     "--shape", "x=2,4:FP32")
        self.assertEqual(json.loads(p.stdout)["status_codes"], {"OK": 10})
        self.assertIn(b'"data":[', self.stub.infers()[-1][4])
        p = self.cli("bench", "nope", "--http", "-c", "2", "-n", "6", "--json",
                     "--shape", "x=2,4:FP32", ok=False)
        self.assertEqual(p.returncode, 1)
        r = json.loads(p.stdout)
        self.assertEqual(r["status_codes"], {"NOT_FOUND": 6})
        self.assertIn('HTTP 404: unknown model "nope"', r["first_error"])
        # without metadata the outputs are asked for as a whole
        hl = int(self.stub.infers()[-1][2]["Inference-Header-Content-Length"])
        q = json.loads(self.stub.infers()[-1][4][:hl])
        self.assertEqual((q["parameters"], "outputs" in q), ({"binary_data_output": True}, False))

    def test_bench_shm(self):
        p = self.cli("bench", "double", "--http", "--shm", "-c", "3", "-n", "30", "--json",
                     "--shape", "x=2,4:FP32")
        self.assertEqual(json.loads(p.stdout)["status_codes"], {"OK": 30})
        offs = {json.loads(i[4])["inputs"][0]["parameters"]["shared_memory_offset"]
                for i in self.stub.infers()}
        self.assertEqual(len(offs), 3)  # each slot its own part of the region
        self.assertEqual(self.stub.shm.status(None), [])

    def test_shm_interrupted(self):
        p = subprocess.Popen([CLI, "bench", "double", "--http", "--shm", "-c", "2", "-z", "60",
                              "--shape", "x=2,4:FP32", "-u", self.stub.url],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        for _ in range(200):  # until it has registered its region and sends
            if len(self.stub.infers()) > 2:
                break
            time.sleep(0.05)
        self.assertGreater(len(set(leftover_shm()) - self.shm_before), 0)
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)
        self.assertEqual(p.returncode, -signal.SIGINT)
        # tearDown: the object is gone

    def test_token(self):
        stub = Stub(token="s3cret")
        try:
            p = self.cli("models", "--http", "--token", "s3cret", url=stub.url)
            self.assertIn("double", p.stdout)
            self.assertEqual(stub.requests[0][2]["Authorization"], "Bearer s3cret")
            p = self.cli("models", "--http", ok=False, url=stub.url)
            self.assertIn("HTTP 401: missing or wrong bearer token", p.stderr)
            self.cli("health", "--http", url=stub.url)  # health stays open
        finally:
            stub.shutdown()
            stub.server_close()

    def test_https(self):
        d = self.d
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", os.path.join(d, "key.pem"), "-out", os.path.join(d, "cert.pem")],
                       check=True, capture_output=True)
        stub = Stub()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"))
        stub.socket = ctx.wrap_socket(stub.socket, server_side=True)
        url = "https://127.0.0.1:%d" % stub.server_address[1]
        try:
            p = self.cli("models", "--tls-ca", os.path.join(d, "cert.pem"), url=url)
            self.assertIn("double", p.stdout)
            p = self.cli("models", ok=False, url=url)  # the system's roots do not know it
            self.assertEqual(p.returncode, 1)
            self.assertIn("cannot reach " + url, p.stderr)
        finally:
            stub.shutdown()
            stub.server_close()


class CliGrpcControl(unittest.TestCase):
    def setUp(self):
        self.regions = Regions()
        self.log = []
        self.server, self.url = grpc_stub(self.regions, self.log)

    def tearDown(self):
        self.server.stop(None)

    def cli(self, *args, ok=True):
        p = subprocess.run([CLI] + list(args) + ["-u", self.url, "--timeout", "10"],
                           capture_output=True, text=True, env=ENV, timeout=60)
        if ok:
            self.assertEqual(p.returncode, 0, p.stderr)
        return p

    def test_load_unload(self):
        self.assertEqual(self.cli("load", "m1").stdout, "m1: loaded\n")
        self.assertEqual(self.cli("unload", "m1").stdout, "m1: unloaded\n")
        self.assertEqual([(n, q.model_name) for n, q in self.log],
                         [("RepositoryModelLoad", "m1"), ("RepositoryModelUnload", "m1")])
        p = self.cli("load", "bad", ok=False)
        self.assertIn("INVALID_ARGUMENT: failed to load 'bad'", p.stderr)

    def test_shm(self):
        key = "/bs-cli-test-g%d" % os.getpid()
        fd = os.open("/dev/shm" + key, os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(fd, 4096)
        os.close(fd)
        try:
            self.cli("shm", "register", "g1", key, "128", "--offset", "64")
            q = self.log[-1][1]
            self.assertEqual((q.name, q.key, q.offset, q.byte_size), ("g1", key, 64, 128))
            self.assertEqual(self.cli("shm", "status").stdout, "g1\t%s\t64\t128\n" % key)
            p = self.cli("shm", "register", "g1", key, "128", ok=False)
            self.assertIn("already registered", p.stderr)
            self.cli("shm", "unregister")
            self.assertEqual(self.log[-1], ("SystemSharedMemoryUnregister",
                                            pb.SystemSharedMemoryUnregisterRequest()))
        finally:
            os.unlink("/dev/shm" + key)

    def test_infer_shm(self):
        before = set(leftover_shm())
        d = tempfile.mkdtemp()
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        np.save(os.path.join(d, "x.npy"), x)
        out = os.path.join(d, "o.npy")
        self.cli("infer", "double", "--shm", "--input", "x=" + os.path.join(d, "x.npy"),
                 "--output", out)
        np.testing.assert_array_equal(np.load(out), 2 * x)
        names = [n for n, _ in self.log]
        self.assertEqual(names, ["ModelMetadata", "SystemSharedMemoryRegister", "ModelInfer",
                                 "SystemSharedMemoryUnregister"])
        q = self.log[2][1]
        self.assertEqual(len(q.raw_input_contents), 0)
        self.assertEqual(q.inputs[0].parameters["shared_memory_byte_size"].int64_param, 48)
        self.assertEqual(q.outputs[0].parameters["shared_memory_offset"].int64_param, 64)
        self.assertEqual(q.outputs[0].parameters["shared_memory_byte_size"].int64_param, 48)
        self.assertEqual(self.regions.status(None), [])
        self.assertEqual(set(leftover_shm()) - before, set())
        p = self.cli("bench", "double", "--shm", "-c", "2", "-n", "8", "--json", "--input",
                     "x=" + os.path.join(d, "x.npy"))
        self.assertEqual(json.loads(p.stdout)["status_codes"], {"OK": 8})
        self.assertEqual(set(leftover_shm()) - before, set())


if __name__ == "__main__":
    CLI = os.path.abspath(sys.argv[1])
    del sys.argv[1:2]
    unittest.main(verbosity=2)
