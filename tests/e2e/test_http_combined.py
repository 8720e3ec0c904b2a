"""End-to-end tests of the HTTP/REST front end together with system shared
memory and model control (each was tested alone in test_http.py,
test_shm.py and test_model_control.py):

- shared memory over HTTP: register / status / unregister (Triton's JSON:
  a list of {"name", "key", "offset", "byte_size"}), inference with inputs
  and output in shared memory (bit for bit gRPC's answer without shared
  memory; the answer carries the output's parameters and no bytes), every
  bad use with its HTTP status, unregister while an HTTP request holds the
  region, CUDA shared memory's not-implemented error;
- model control over HTTP in explicit mode: load / unload, the repository
  index, versions (ready, config, stats, infer at a version), an unloaded
  model's status, a reload under a steady stream of HTTP requests with no
  failed request;
- ServerMetadata's extensions over gRPC and GET /v2.

    /usr/bin/python3 tests/e2e/test_http_combined.py BLOCKSERVE_BINARY
"""

import json
import os
import shutil
import sys
import tempfile
import threading
import time
import unittest

import numpy as np

import harness
import test_server as common  # generates the stubs; its tests are not collected here
import test_http
import test_shm
import test_model_control as mc

import grpc  # noqa: E402

pb = common.pb
pb_grpc = common.pb_grpc
BINARY = None
SLOW = "btb_self_only"
CASES = ["btb_geglu_cross", "btb_input_f16", "btb_mask_bool", SLOW]


def shm_json_inputs(inputs, region, offsets):
    """HTTP inputs naming shared memory (no data) for {name: (dt, arr)}."""
    out = []
    for name, (dt, arr) in inputs.items():
        out.append({"name": name, "datatype": harness.TRITON_DTYPE[dt], "shape": list(arr.shape),
                    "parameters": {"shared_memory_region": region,
                                   "shared_memory_byte_size": len(test_shm.raw_bytes(arr)),
                                   "shared_memory_offset": offsets[name]}})
    return out


class HttpShmTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        serving = {SLOW: {"max_batch_size": 4, "max_queue_delay_microseconds": 1500000}}
        cls.repo = harness.make_repository(CASES, serving, broken=False)
        cls.server = harness.Server(BINARY, ["--model-repository", cls.repo])
        cls.channel = grpc.insecure_channel(cls.server.address)
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)
        cls.c = test_http.Client(cls.server.http_port)
        cls.pid = cls.server.proc.pid

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        cls.channel.close()
        harness.shutdown(cls.server, cls.repo)

    def setUp(self):
        self.regions = []

    def tearDown(self):
        self.c.request("POST", "/v2/systemsharedmemory/unregister")
        for r in self.regions:
            r.close()

    def region(self, size):
        r = test_shm.Region(size)
        self.regions.append(r)
        return r

    def register(self, name, region, offset=0, byte_size=None):
        body = json.dumps({"key": region.key, "offset": offset,
                           "byte_size": region.size - offset if byte_size is None else byte_size})
        st, h, b = self.c.request("POST", "/v2/systemsharedmemory/region/%s/register" % name,
                                  body.encode())
        return st, (json.loads(b) if b else None)

    def reference(self, model, inputs):
        resp = self.stub.ModelInfer(common.infer_request(model, inputs))
        return resp.raw_output_contents[0], list(resp.outputs[0].shape)

    def infer(self, model, inputs, shm_in=None, out=None, binary_output=False):
        """(status, JSON header, body) of an HTTP inference; shm_in = (region,
        offsets) puts every input in shared memory, out = (region, size, off)."""
        if shm_in is not None:
            ins, blob = shm_json_inputs(inputs, *shm_in), b""
        else:
            ins, blob = test_http.json_inputs(inputs)
        req = {"inputs": ins}
        if out is not None:
            req["outputs"] = [{"name": "output", "parameters": {
                "shared_memory_region": out[0], "shared_memory_byte_size": out[1],
                "shared_memory_offset": out[2]}}]
            if binary_output:
                req["outputs"][0]["parameters"]["binary_data"] = True
        st, h, body = self.c.request("POST", "/v2/models/%s/infer" % model,
                                     json.dumps(req).encode() + blob)
        hl = h.get("inference-header-content-length")
        head = json.loads(body[:int(hl)] if hl else body)
        return st, h, head, body

    def test_register_status_unregister(self):
        a, b = self.region(4096), self.region(8192)
        self.assertEqual(self.register("alpha", a), (200, None))
        self.assertEqual(self.register("beta", b, 100, 5000), (200, None))
        st, body = self.c.json("GET", "/v2/systemsharedmemory/status")
        self.assertEqual(st, 200)
        self.assertIsInstance(body, list)  # Triton: a list of regions
        self.assertEqual(sorted(body, key=lambda r: r["name"]), [
            {"name": "alpha", "key": a.key, "offset": 0, "byte_size": 4096},
            {"name": "beta", "key": b.key, "offset": 100, "byte_size": 5000}])
        st, body = self.c.json("GET", "/v2/systemsharedmemory/region/beta/status")
        self.assertEqual((st, body), (200, [{"name": "beta", "key": b.key, "offset": 100,
                                             "byte_size": 5000}]))
        # the same regions over gRPC
        g = self.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
        self.assertEqual(sorted(g.regions), ["alpha", "beta"])
        st, h, body = self.c.request("POST", "/v2/systemsharedmemory/region/alpha/unregister")
        self.assertEqual((st, body), (200, b""))
        st, body = self.c.json("GET", "/v2/systemsharedmemory/status")
        self.assertEqual([r["name"] for r in body], ["beta"])
        self.assertFalse(test_shm.maps_key(self.pid, a.key))
        st, h, body = self.c.request("POST", "/v2/systemsharedmemory/unregister")
        self.assertEqual(st, 200)
        st, body = self.c.json("GET", "/v2/systemsharedmemory/status")
        self.assertEqual((st, body), (200, []))
        self.assertFalse(test_shm.maps_key(self.pid, b.key))

    def test_infer_inputs_and_output_in_shm(self):
        for case in ["btb_geglu_cross", "btb_input_f16", "btb_mask_bool"]:
            inputs = common.case_inputs(case)
            want, shape = self.reference(case, inputs)
            region = self.region(1 << 20)
            st, _ = self.register("r_" + case, region)
            self.assertEqual(st, 200)
            offsets, end = test_shm.place(region, inputs)
            out_off = (end + 63) // 64 * 64
            region.write(out_off, b"\xee" * (len(want) + 64))
            for binary_output in (False, True):  # binary_data asked: still no bytes
                st, h, head, body = self.infer(case, inputs, ("r_" + case, offsets),
                                               ("r_" + case, len(want) + 64, out_off),
                                               binary_output)
                self.assertEqual(st, 200, body[:300])
                self.assertEqual(h["content-type"], "application/json")
                self.assertNotIn("inference-header-content-length", h)
                out = head["outputs"][0]
                self.assertEqual(out["name"], "output")
                self.assertEqual(out["datatype"], "FP32")
                self.assertEqual(out["shape"], shape)
                self.assertNotIn("data", out)
                self.assertEqual(out["parameters"], {
                    "shared_memory_region": "r_" + case, "shared_memory_offset": out_off,
                    "shared_memory_byte_size": len(want) + 64})
                self.assertEqual(region.read(out_off, len(want)), want, case)  # bit for bit
                self.assertEqual(region.read(out_off + len(want), 64), b"\xee" * 64)
                region.write(out_off, b"\xee" * len(want))
            # inputs in shared memory, output in the answer (JSON and binary)
            st, h, head, body = self.infer(case, inputs, ("r_" + case, offsets))
            self.assertEqual(st, 200, body[:300])
            got = np.array(head["outputs"][0]["data"], dtype=np.float32)
            self.assertEqual(got.tobytes(), want)
            # inputs in the message, output in shared memory
            st, h, head, body = self.infer(case, inputs, None, ("r_" + case, len(want), out_off))
            self.assertEqual(st, 200, body[:300])
            self.assertEqual(region.read(out_off, len(want)), want)

    def test_bad_use_over_http(self):
        case = "btb_geglu_cross"
        inputs = common.case_inputs(case)
        want, _ = self.reference(case, inputs)
        region = self.region(1 << 16)
        self.assertEqual(self.register("r0", region)[0], 200)
        offsets, end = test_shm.place(region, inputs)
        region.write(end, b"\xee" * (region.size - end))
        sentinel = region.read(0, region.size)

        def bad(want_status, fragment, st, body):
            self.assertEqual(st, want_status, body)
            self.assertIn(fragment, body["error"])
            self.assertEqual(region.read(0, region.size), sentinel, "touched: " + fragment)

        # registering: taken name 409, unknown key 404, past the end / size 0 400
        st, body = self.register("r0", region)
        bad(409, "already registered", st, body)
        st, body = self.c.json("POST", "/v2/systemsharedmemory/region/k/register",
                               b'{"key": "/bs_e2e_no_such_key", "offset": 0, "byte_size": 64}')
        bad(404, "cannot be opened", st, body)
        st, body = self.register("p", region, 8, region.size)
        bad(400, "past its end", st, body)
        st, body = self.register("z", region, 0, 0)
        bad(400, "byte_size is 0", st, body)
        st, body = self.c.json("POST", "/v2/systemsharedmemory/region/q/register",
                               b'{"key": 5, "offset": 0, "byte_size": 64}')
        self.assertEqual(st, 400, body)
        # status of an unknown region: 404 (NOT_FOUND)
        st, body = self.c.json("GET", "/v2/systemsharedmemory/region/nope/status")
        bad(404, "nope", st, body)
        # inference: unknown region 404, too small output region 400 (the
        # README's INVALID_ARGUMENT), sizes and offsets 400
        st, h, head, b = self.infer(case, inputs, ("nope", offsets))
        bad(404, "shared memory region 'nope' is not registered", st, head)
        st, h, head, b = self.infer(case, inputs, ("r0", offsets), ("r0", len(want) - 4, end))
        bad(400, "needs %d bytes" % len(want), st, head)
        st, h, head, b = self.infer(case, inputs, ("r0", offsets), ("r0", len(want),
                                                                   region.size - 16))
        bad(400, "output 'output': shared_memory_offset", st, head)
        st, h, head, b = self.infer(case, inputs, ("r0", offsets), ("nope", len(want), 0))
        bad(404, "output 'output': shared memory region 'nope' is not registered", st, head)
        odd = dict(offsets)
        odd["hidden_states"] += 2
        st, h, head, b = self.infer(case, inputs, ("r0", odd))
        bad(400, "not a multiple of 4 bytes", st, head)
        req = {"inputs": shm_json_inputs(inputs, "r0", offsets)}
        req["inputs"][0]["parameters"]["shared_memory_byte_size"] -= 4
        st, body = self.c.json("POST", "/v2/models/%s/infer" % case, json.dumps(req).encode())
        bad(400, "shared_memory_byte_size is", st, body)
        req = {"inputs": shm_json_inputs(inputs, "r0", offsets)}
        req["inputs"][0]["data"] = [0.0] * 4
        st, body = self.c.json("POST", "/v2/models/%s/infer" % case, json.dumps(req).encode())
        bad(400, "'data' must not be given for an input in shared memory", st, body)
        req["inputs"][0].pop("data")
        req["inputs"][0]["parameters"]["binary_data_size"] = 16
        st, body = self.c.json("POST", "/v2/models/%s/infer" % case,
                               json.dumps(req).encode() + b"\0" * 16,
                               {"Inference-Header-Content-Length": str(len(json.dumps(req)))})
        bad(400, "binary_data_size must not be given for an input in shared memory", st, body)
        req = {"inputs": shm_json_inputs(inputs, "r0", offsets)}
        req["inputs"][0]["parameters"]["shared_memory_region"] = 7
        st, body = self.c.json("POST", "/v2/models/%s/infer" % case, json.dumps(req).encode())
        bad(400, "shared_memory_region", st, body)
        # still serving, no hold left behind
        st, h, head, b = self.infer(case, inputs, ("r0", offsets))
        self.assertEqual(st, 200, b[:300])
        self.assertTrue(test_shm.maps_key(self.pid, region.key))
        st, h, b = self.c.request("POST", "/v2/systemsharedmemory/region/r0/unregister")
        self.assertEqual(st, 200)
        self.assertFalse(test_shm.maps_key(self.pid, region.key))
        # unregistering a name that is not registered succeeds (Triton)
        st, h, b = self.c.request("POST", "/v2/systemsharedmemory/region/nope/unregister")
        self.assertEqual(st, 200, b)

    def test_unregister_while_http_request_holds(self):
        inputs = common.sample(common.case_inputs(SLOW), 0)
        want, _ = self.reference(SLOW, inputs)
        rin, rout = self.region(1 << 16), self.region(len(want))
        self.assertEqual(self.register("hin", rin)[0], 200)
        self.assertEqual(self.register("hout", rout)[0], 200)
        offsets, _ = test_shm.place(rin, inputs)
        result = {}

        def run():
            c = test_http.Client(self.server.http_port)
            result["r"] = self.infer_with(c, SLOW, inputs, offsets)
            c.close()

        t = threading.Thread(target=run)
        t0 = time.time()
        t.start()
        time.sleep(0.4)  # the request waits ~1.5 s for its batch
        self.assertTrue(t.is_alive())
        for n in ("hin", "hout"):
            st, h, b = self.c.request("POST", "/v2/systemsharedmemory/region/%s/unregister" % n)
            self.assertEqual(st, 200, b)
        st, body = self.c.json("GET", "/v2/systemsharedmemory/status")
        self.assertEqual(body, [])
        self.assertTrue(test_shm.maps_key(self.pid, rin.key))  # held by the request
        self.assertTrue(test_shm.maps_key(self.pid, rout.key))
        st, h, head, b = self.infer(SLOW, inputs, ("hin", offsets))
        self.assertEqual(st, 404, head)  # new requests cannot name them
        t.join(60)
        st, head = result["r"]
        print("\n  unregistered during an HTTP request of %.2f s: it completed" % (time.time() - t0))
        self.assertEqual(st, 200, head)
        self.assertNotIn("data", head["outputs"][0])
        self.assertEqual(rout.read(0, len(want)), want)
        deadline = time.time() + 5
        while time.time() < deadline and (test_shm.maps_key(self.pid, rin.key)
                                          or test_shm.maps_key(self.pid, rout.key)):
            time.sleep(0.02)
        self.assertFalse(test_shm.maps_key(self.pid, rin.key))
        self.assertFalse(test_shm.maps_key(self.pid, rout.key))

    def infer_with(self, c, model, inputs, offsets):
        req = {"inputs": shm_json_inputs(inputs, "hin", offsets),
               "outputs": [{"name": "output", "parameters": {
                   "shared_memory_region": "hout", "shared_memory_byte_size": rsize(inputs)}}]}
        st, body = c.json("POST", "/v2/models/%s/infer" % model, json.dumps(req).encode())
        return st, body

    def test_cuda_shm_not_implemented(self):
        msg = "CUDA shared memory needs the cuda backend; this server computes on cpu"
        for method, path, body in [
                ("POST", "/v2/cudasharedmemory/region/c0/register",
                 b'{"raw_handle": {"b64": "AAECAw=="}, "device_id": 0, "byte_size": 64}'),
                ("GET", "/v2/cudasharedmemory/status", None),
                ("GET", "/v2/cudasharedmemory/region/c0/status", None),
                ("POST", "/v2/cudasharedmemory/region/c0/unregister", None),
                ("POST", "/v2/cudasharedmemory/unregister", None)]:
            st, b = self.c.json(method, path, body)
            self.assertEqual(st, 501, path)
            self.assertIn(msg, b["error"])

    def test_server_metadata_extensions(self):
        g = self.stub.ServerMetadata(pb.ServerMetadataRequest())
        ext = list(g.extensions)
        for name in ["binary_tensor_data", "system_shared_memory", "model_repository",
                     "model_configuration", "statistics", "parameters", "sequence",
                     "schedule_policy"]:
            self.assertIn(name, ext)
        self.assertNotIn("cuda_shared_memory", ext)  # not served on the CPU
        self.assertEqual(len(ext), len(set(ext)))
        st, meta = self.c.json("GET", "/v2")
        self.assertEqual((st, meta), (200, {"name": g.name, "version": g.version,
                                            "extensions": ext}))


def rsize(inputs):
    """The output bytes of btb_self_only: that of hidden_states."""
    return len(test_shm.raw_bytes(inputs["hidden_states"][1]))


class HttpControlTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        root = tempfile.mkdtemp(prefix="bs_http_ctl_")
        for name in ("gelu", "idle", "churn"):
            mc.copy_case(os.path.join(root, name))
        mc.versioned(root, "ver", [1, 2, 3], {"specific": {"versions": [1, 3]}})
        cls.root = root
        cls.server = harness.Server(BINARY, ["--model-repository", root,
                                             "--model-control-mode", "explicit",
                                             "--load-model", "gelu", "--load-model", "ver",
                                             "--load-model", "churn",
                                             "--max-queue-delay-us", "500"])
        cls.channel = grpc.insecure_channel(cls.server.address)
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)
        cls.c = test_http.Client(cls.server.http_port)

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        cls.channel.close()
        harness.shutdown(cls.server, cls.root)

    def index(self):
        st, idx = self.c.json("POST", "/v2/repository/index")
        self.assertEqual(st, 200)
        self.assertIsInstance(idx, list)
        return idx

    def row(self, name, version=None):
        rows = [m for m in self.index() if m["name"] == name
                and (version is None or m.get("version") == version)]
        self.assertEqual(len(rows), 1, rows)
        return rows[0]

    def infer(self, model, version=None, c=None):
        path = "/v2/models/%s%s/infer" % (model, "" if version is None else "/versions/" + version)
        body, h = test_http.infer_body(mc.INPUTS)
        st, hd, data = (c or self.c).request("POST", path, body, h)
        head, arr = test_http.decode_answer(st, hd, data)
        return st, head, arr

    def test_index_shape(self):
        idx = self.index()
        for m in idx:
            self.assertTrue(set(m) <= {"name", "version", "state", "reason"}, m)
            self.assertIn("name", m)
            self.assertIn("state", m)
        gelu = self.row("gelu")
        self.assertEqual((gelu["version"], gelu["state"], gelu.get("reason", "")),
                         ("1", "READY", ""))
        idle = self.row("idle")
        self.assertEqual((idle["state"], idle["reason"]), ("UNAVAILABLE", "unloaded"))
        self.assertEqual(sorted(m["version"] for m in idx if m["name"] == "ver"), ["1", "3"])
        g = self.stub.RepositoryIndex(pb.RepositoryIndexRequest())
        self.assertEqual(len(g.models), len(idx))
        st, ready = self.c.json("POST", "/v2/repository/index", b'{"ready": true}')
        self.assertNotIn("idle", [m["name"] for m in ready])

    def test_load_unload_over_http(self):
        st, b = self.c.json("POST", "/v2/models/idle/infer", test_http.infer_body(mc.INPUTS)[0])
        self.assertEqual(st, 404, b)  # NOT_FOUND: unloaded
        self.assertIn("unloaded", b["error"])
        st, h, b = self.c.request("GET", "/v2/models/idle/ready")
        self.assertIn(st, (400, 404))
        st, h, b = self.c.request("POST", "/v2/repository/models/idle/load")
        self.assertEqual((st, b), (200, b""))
        self.assertEqual(self.row("idle")["state"], "READY")
        st, h, b = self.c.request("GET", "/v2/models/idle/ready")
        self.assertEqual(st, 200)
        st, head, out = self.infer("idle")
        self.assertEqual(st, 200, head)
        self.assertEqual(out.shape, (2, 7, 24))
        st, h, b = self.c.request("POST", "/v2/repository/models/idle/unload", b"{}")
        self.assertEqual((st, b), (200, b""))
        row = self.row("idle")
        self.assertEqual((row["state"], row["reason"]), ("UNAVAILABLE", "unloaded"))
        st, head, out = self.infer("idle")
        self.assertEqual(st, 404, head)
        self.assertIn("not loaded: unloaded", head["error"])
        # errors: unknown model 404, bad name 400, refused parameters 400
        st, b = self.c.json("POST", "/v2/repository/models/nope/load")
        self.assertEqual(st, 404, b)
        self.assertIn('no model "nope"', b["error"])
        st, b = self.c.json("POST", "/v2/repository/models/nope/unload")
        self.assertEqual(st, 404, b)
        st, b = self.c.json("POST", "/v2/repository/models/idle/load",
                            b'{"parameters": {"config": "{}"}}')
        self.assertEqual(st, 400, b)
        self.assertIn('"config"', b["error"])
        st, b = self.c.json("POST", "/v2/repository/models/idle/load", b'{"parameters": 5}')
        self.assertEqual(st, 400, b)

    def test_versions_over_http(self):
        st, m = self.c.json("GET", "/v2/models/ver")
        self.assertEqual((st, m["versions"]), (200, ["1", "3"]))
        for v, want in (("1", 200), ("3", 200)):
            st, h, b = self.c.request("GET", "/v2/models/ver/versions/%s/ready" % v)
            self.assertEqual((st, b), (want, b""), v)
            st, cfg = self.c.json("GET", "/v2/models/ver/versions/%s/config" % v)
            self.assertEqual((st, cfg["name"]), (200, "ver"))
        st, b = self.c.json("GET", "/v2/models/ver/versions/2/ready")
        self.assertEqual(st, 404)
        st, b = self.c.json("GET", "/v2/models/ver/versions/2/config")
        self.assertEqual(st, 404)
        self.assertIn('has no version "2"', b["error"])
        st, h1, o1 = self.infer("ver", "1")
        self.assertEqual((st, h1["model_version"]), (200, "1"))
        st, h3, o3 = self.infer("ver", "3")
        self.assertEqual((st, h3["model_version"]), (200, "3"))
        st, hd, od = self.infer("ver")  # the highest ready version
        self.assertEqual(hd["model_version"], "3")
        np.testing.assert_array_equal(od, o3)
        self.assertGreater(float(np.max(np.abs(o3 - o1))), 0.1)  # weights x 3 against x 1
        g = self.stub.ModelInfer(common.infer_request("ver", mc.INPUTS))
        self.assertEqual(g.model_version, "3")  # gRPC too: the version that served it
        g1 = self.stub.ModelInfer(_versioned("ver", "1"))
        self.assertEqual(g1.model_version, "1")
        np.testing.assert_array_equal(common.output_of(g1), o1)
        st, h, o = self.infer("ver", "2")
        self.assertEqual(st, 404, h)
        self.assertIn('model "ver" has no version "2" (versions served: 1, 3)', h["error"])
        st, stats = self.c.json("GET", "/v2/models/ver/versions/1/stats")
        self.assertEqual(st, 200)
        self.assertEqual([s["version"] for s in stats["model_stats"]], ["1"])
        self.assertGreaterEqual(stats["model_stats"][0]["inference_count"], 2)
        st, stats = self.c.json("GET", "/v2/models/ver/stats")
        self.assertEqual(sorted(s["version"] for s in stats["model_stats"]), ["1", "3"])

    def test_reload_under_http_stream(self):
        expected = self.infer("churn")[2]
        results, lock, stop = [], threading.Lock(), threading.Event()

        def run():
            c = test_http.Client(self.server.http_port)
            while not stop.is_set():
                st, head, out = self.infer("churn", c=c)
                with lock:
                    results.append((st, head if st != 200 else None, out))
            c.close()

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        for _ in range(3):
            st, h, b = self.c.request("POST", "/v2/repository/models/churn/load")
            self.assertEqual(st, 200, b)
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(60)
        bad = [r for r in results if r[0] != 200]
        print("\n  3 reloads under 4 HTTP threads: %d answers, %d failed" % (len(results), len(bad)))
        self.assertEqual(bad, [])
        self.assertGreater(len(results), 20)
        for st, _, out in results:
            self.assertLess(float(np.max(np.abs(out - expected))), mc.TOL)


def _versioned(model, version):
    req = common.infer_request(model, mc.INPUTS)
    req.model_version = version
    return req


if __name__ == "__main__":
    BINARY = os.path.abspath(sys.argv.pop(1))
    mc.BINARY = test_http.BINARY = test_shm.BINARY = BINARY
    unittest.main(verbosity=2)
