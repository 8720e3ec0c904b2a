"""End-to-end tests of the KServe v2 HTTP/REST front end with real clients
(curl and Python's http.client): every endpoint, JSON and binary tensors
compared with gRPC's answers, gzip and deflate both ways, the errors, the
bearer token, TLS and mutual TLS, client disconnects, batching, shutdown.

    /usr/bin/python3 tests/e2e/test_http.py BLOCKSERVE_BINARY
"""

import concurrent.futures
import gzip
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import zlib

import numpy as np

import harness
import test_server as common  # generates the stubs; its tests are not collected here
import test_secure as secure  # the certificates

import grpc  # noqa: E402

pb = common.pb
pb_grpc = common.pb_grpc
BINARY = None
TOKEN = "http-t0ken/with+punct="
CASES = ["btb_geglu_cross", "btb_self_only", "btb_mask_bool", "btb_input_f16",
         "btb_ada_norm_zero_dit"]
JSON_TYPES = {"F32": "FP32", "F16": "FP16", "I64": "INT64", "BOOL": "BOOL"}


def json_inputs(inputs, nested=True, binary=()):
    """The v2 JSON inputs (and binary data) for {name: (st dtype, array)}."""
    out, blobs = [], []
    for name, (dt, arr) in inputs.items():
        t = {"name": name, "datatype": harness.TRITON_DTYPE[dt], "shape": list(arr.shape)}
        if name in binary:
            b = np.ascontiguousarray(arr).tobytes()
            t["parameters"] = {"binary_data_size": len(b)}
            blobs.append(b)
        else:
            vals = arr.astype(np.float64) if dt == "F16" else arr
            t["data"] = vals.tolist() if nested else vals.ravel().tolist()
        out.append(t)
    return out, b"".join(blobs)


def infer_body(inputs, nested=True, binary=(), rid=None, params=None, outputs=None):
    """(body bytes, headers) of an inference request."""
    ins, blob = json_inputs(inputs, nested, binary)
    req = {"inputs": ins}
    if rid is not None:
        req["id"] = rid
    if params:
        req["parameters"] = params
    if outputs is not None:
        req["outputs"] = outputs
    head = json.dumps(req).encode()
    if not blob:
        return head, {"Content-Type": "application/json"}
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


def decode_answer(status, headers, body):
    """(JSON header, output array or None) of an inference answer."""
    hl = headers.get("inference-header-content-length")
    head = json.loads(body[:int(hl)] if hl else body)
    if status != 200:
        return head, None
    out = head["outputs"][0]
    if "data" in out:
        arr = np.array(out["data"], dtype=np.float32)
    else:
        n = out["parameters"]["binary_data_size"]
        arr = np.frombuffer(body[int(hl):int(hl) + n], dtype="<f4")
    return head, arr.reshape(out["shape"])


class Client:
    def __init__(self, port, tls=None, token=None):
        self.port, self.tls, self.token = port, tls, token
        self.conn = self.connect()

    def close(self):
        self.conn.close()

    def connect(self):
        if self.tls is not None:
            return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.tls,
                                               timeout=60)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def request(self, method, path, body=None, headers=None):
        """(status, {lower-case header: value}, body bytes)."""
        h = dict(headers or {})
        if self.token is not None:
            h.setdefault("Authorization", "Bearer " + self.token)
        try:
            self.conn.request(method, path, body, h)
            r = self.conn.getresponse()
        except (ConnectionError, http.client.HTTPException):
            self.conn.close()
            self.conn = self.connect()
            self.conn.request(method, path, body, h)
            r = self.conn.getresponse()
        data = r.read()
        if r.getheader("Connection", "").lower() == "close":
            self.conn.close()
            self.conn = self.connect()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def json(self, method, path, body=None, headers=None):
        status, h, data = self.request(method, path, body, headers)
        return status, (json.loads(data) if data else None)

    def infer(self, model, inputs, **kw):
        headers = kw.pop("headers", {})
        body, h = infer_body(inputs, **kw)
        h.update(headers)
        status, hd, data = self.request("POST", "/v2/models/%s/infer" % model, body, h)
        return status, hd, data


class HttpTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        serving = {"btb_self_only": {"max_batch_size": 8,
                                     "max_queue_delay_microseconds": 300000}}
        cls.repo = harness.make_repository(CASES, serving)
        cls.limit = 4 << 20
        cls.server = harness.Server(BINARY, ["--model-repository", cls.repo,
                                             "--max-message-bytes", str(cls.limit),
                                             "--log-verbose", "1"])
        cls.port = cls.server.http_port
        cls.channel = grpc.insecure_channel(cls.server.address)
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)
        cls.c = Client(cls.port)

    @classmethod
    def tearDownClass(cls):
        cls.c.conn.close()
        cls.channel.close()
        harness.shutdown(cls.server, cls.repo)

    def grpc_output(self, model, inputs):
        return common.output_of(self.stub.ModelInfer(common.infer_request(model, inputs)))

    def stats(self, model):
        status, body = self.c.json("GET", "/v2/models/%s/stats" % model)
        self.assertEqual(status, 200)
        return body["model_stats"][0]

    # ---- endpoints -------------------------------------------------------------

    def test_health_and_metadata(self):
        for path in ["/v2/health/live", "/v2/health/ready", "/v2/models/btb_self_only/ready",
                     "/v2/models/btb_self_only/versions/1/ready"]:
            status, h, body = self.c.request("GET", path)
            self.assertEqual((status, body), (200, b""), path)
        status, meta = self.c.json("GET", "/v2")
        self.assertEqual(status, 200)
        g = self.stub.ServerMetadata(pb.ServerMetadataRequest())
        self.assertEqual(meta, {"name": g.name, "version": g.version,
                                "extensions": list(g.extensions)})
        for path in ["/v2/models/btb_mask_bool", "/v2/models/btb_mask_bool/versions/1"]:
            status, m = self.c.json("GET", path)
            self.assertEqual(status, 200)
            self.assertEqual(m["name"], "btb_mask_bool")
            self.assertEqual(m["versions"], ["1"])
            g = self.stub.ModelMetadata(pb.ModelMetadataRequest(name="btb_mask_bool"))
            tensors = lambda ts: [{"name": t.name, "datatype": t.datatype,  # noqa: E731
                                   "shape": list(t.shape)} for t in ts]
            self.assertEqual(m, {"name": g.name, "versions": list(g.versions),
                                 "platform": g.platform, "inputs": tensors(g.inputs),
                                 "outputs": tensors(g.outputs)})
            self.assertIn("attention_mask", [t["name"] for t in m["inputs"]])

    def test_config_and_stats(self):
        status, cfg = self.c.json("GET", "/v2/models/btb_self_only/config")
        self.assertEqual(status, 200)
        self.assertEqual(cfg["name"], "btb_self_only")  # the config itself, not {"config": ..}
        self.assertEqual(cfg["max_batch_size"], 8)
        self.assertEqual(cfg["input"][0]["data_type"], "TYPE_FP32")  # enums by name
        dyn = cfg["dynamic_batching"]
        self.assertEqual(dyn["max_queue_delay_microseconds"], 300000)  # uint64 as a number
        status, cfg1 = self.c.json("GET", "/v2/models/btb_self_only/versions/1/config")
        self.assertEqual((status, cfg1), (200, cfg))
        status, all_stats = self.c.json("GET", "/v2/models/stats")
        self.assertEqual(status, 200)
        self.assertEqual(sorted(s["name"] for s in all_stats["model_stats"]), sorted(CASES))
        st = self.stats("btb_geglu_cross")
        self.assertIsInstance(st["inference_count"], int)
        self.assertIn("success", st["inference_stats"])

    def test_repository(self):
        for body in [None, b"", b"{}", b'{"ready": true}', b'{"ready": false}']:
            status, idx = self.c.json("POST", "/v2/repository/index", body)
            self.assertEqual(status, 200, body)
            self.assertIsInstance(idx, list)
            names = {m["name"] for m in idx}
            self.assertTrue(set(CASES) <= names)
            if body == b'{"ready": true}':
                self.assertNotIn("broken", names)
                self.assertTrue(all(m["state"] == "READY" for m in idx))
            else:
                self.assertIn("broken", names)
        status, _ = self.c.json("POST", "/v2/repository/index", b'{"ready": 3}')
        self.assertEqual(status, 400)

    def same_as_grpc(self, status, body, call):
        """An HTTP answer against the gRPC method's: 200 when it succeeds, else
        the status table's HTTP status for its code, both with a message."""
        codes = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
                 grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.ALREADY_EXISTS: 409,
                 grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.INTERNAL: 500}
        try:
            call()
            self.assertEqual(status, 200)
        except grpc.RpcError as e:
            self.assertEqual(status, codes[e.code()], e.details())
            self.assertEqual(json.loads(body)["error"], e.details())

    def test_model_control_and_shared_memory(self):
        st, h, body = self.c.request("POST", "/v2/repository/models/btb_self_only/load")
        self.same_as_grpc(st, body, lambda: self.stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="btb_self_only")))
        st, h, body = self.c.request("POST", "/v2/repository/models/nope/unload",
                                     b'{"parameters": {"unload_dependents": false}}')
        self.same_as_grpc(st, body, lambda: self.stub.RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name="nope")))
        st, h, body = self.c.request("GET", "/v2/systemsharedmemory/status")
        self.same_as_grpc(st, body, lambda: self.stub.SystemSharedMemoryStatus(
            pb.SystemSharedMemoryStatusRequest()))
        if st == 200:
            self.assertIsInstance(json.loads(body), list)
        st, h, body = self.c.request("POST", "/v2/systemsharedmemory/region/r0/register",
                                     b'{"key": "/bs_no_such_key", "offset": 0, "byte_size": 64}')
        self.same_as_grpc(st, body, lambda: self.stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="r1", key="/bs_no_such_key", byte_size=64)))
        self.assertNotEqual(st, 200)
        st, h, body = self.c.request("POST", "/v2/systemsharedmemory/region/r0/unregister")
        self.same_as_grpc(st, body, lambda: self.stub.SystemSharedMemoryUnregister(
            pb.SystemSharedMemoryUnregisterRequest(name="r1")))
        st, h, body = self.c.request(
            "POST", "/v2/cudasharedmemory/region/c0/register",
            b'{"raw_handle": {"b64": "AAECAw=="}, "device_id": 0, "byte_size": 64}')
        self.same_as_grpc(st, body, lambda: self.stub.CudaSharedMemoryRegister(
            pb.CudaSharedMemoryRegisterRequest(name="c0", raw_handle=b"\0\1\2\3", byte_size=64)))
        st, h, body = self.c.request("GET", "/v2/cudasharedmemory/status")
        self.same_as_grpc(st, body, lambda: self.stub.CudaSharedMemoryStatus(
            pb.CudaSharedMemoryStatusRequest()))
        st, _ = self.c.json("POST", "/v2/systemsharedmemory/region/r0/register", b'{"nope": 1}')
        self.assertEqual(st, 400)

    def test_unknown_paths_and_methods(self):
        for method, path, want in [("GET", "/v2/nothing", 404), ("GET", "/v3", 404),
                                   ("GET", "/v2/models/btb_self_only/ready/x", 404),
                                   ("POST", "/v2/health/live", 405),
                                   ("GET", "/v2/models/btb_self_only/infer", 405),
                                   ("DELETE", "/v2", 405),
                                   ("GET", "/v2/repository/index", 405)]:
            status, h, body = self.c.request(method, path)
            self.assertEqual(status, want, path)
            self.assertIn("error", json.loads(body))
            if want == 405:
                self.assertIn(h["allow"], ("GET", "POST"))
        status, body = self.c.json("GET", "/v2/models/nope")
        self.assertEqual(status, 404)
        self.assertIn("nope", body["error"])
        status, h, body = self.c.request("GET", "/v2/models/nope/ready")
        self.assertEqual(status, 404)

    # ---- inference -------------------------------------------------------------

    def test_json_equals_grpc_every_datatype(self):
        for case in ["btb_geglu_cross", "btb_mask_bool", "btb_input_f16", "btb_ada_norm_zero_dit"]:
            inputs = common.case_inputs(case)
            want = self.grpc_output(case, inputs)
            for nested in (True, False):
                status, h, body = self.c.infer(case, inputs, nested=nested, rid="r-" + case)
                self.assertEqual(status, 200, body[:300])
                self.assertEqual(h["content-type"], "application/json")
                head, got = decode_answer(status, h, body)
                self.assertEqual(head["model_name"], case)
                self.assertEqual(head["model_version"], "1")
                self.assertEqual(head["id"], "r-" + case)
                self.assertEqual(head["outputs"][0]["datatype"], "FP32")
                self.assertEqual(got.shape, want.shape)
                # FP32 survives JSON bit for bit
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), case)

    def test_binary_and_mixed(self):
        case = "btb_mask_bool"
        inputs = common.case_inputs(case)
        want = self.grpc_output(case, inputs)
        names = list(inputs)
        for binary, params, outputs in [
                (names, {"binary_data_output": True}, None),
                (names[:1], None, [{"name": "output", "parameters": {"binary_data": True}}]),
                (names[1:3], {"binary_data_output": False}, [{"name": "output"}]),
                ((), {"binary_data_output": True}, None)]:
            status, h, body = self.c.infer(case, inputs, binary=binary, params=params,
                                           outputs=outputs)
            self.assertEqual(status, 200, body[:300])
            head, got = decode_answer(status, h, body)
            want_binary = bool((params or {}).get("binary_data_output")) or outputs is not None \
                and outputs[0].get("parameters", {}).get("binary_data", False)
            self.assertEqual("inference-header-content-length" in h, want_binary)
            if want_binary:
                self.assertEqual(h["content-type"], "application/octet-stream")
                self.assertEqual(head["outputs"][0]["parameters"]["binary_data_size"],
                                 want.nbytes)
                self.assertNotIn("data", head["outputs"][0])
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))

    def test_binary_split_errors(self):
        case = "btb_self_only"
        inputs = common.case_inputs(case)
        body, h = infer_body(inputs, binary=["hidden_states"])
        hl = int(h["Inference-Header-Content-Length"])
        for hval, data, fragment in [
                (str(len(body) + 1), body, "exceeds the body"),
                ("1" * 30, body, "Inference-Header-Content-Length"),
                ("-4", body, "Inference-Header-Content-Length"),
                ("abc", body, "Inference-Header-Content-Length"),
                (str(hl), body[:-1], "runs past the end"),
                (str(hl), body + b"xx", "after the last input"),
                (str(hl - 1), body, "")]:
            status, hd, resp = self.c.request("POST", "/v2/models/%s/infer" % case, data,
                                              {"Inference-Header-Content-Length": hval})
            self.assertEqual(status, 400, (hval, resp))
            self.assertIn(fragment, json.loads(resp)["error"])

    def test_bf16_only_as_binary(self):
        body = json.dumps({"inputs": [{"name": "hidden_states", "datatype": "BF16",
                                       "shape": [1], "data": [1.0]}]})
        status, b = self.c.json("POST", "/v2/models/btb_self_only/infer", body)
        self.assertEqual(status, 400)
        self.assertIn("binary", b["error"])

    def test_compression_both_ways(self):
        case = "btb_geglu_cross"
        inputs = common.case_inputs(case)
        want = self.grpc_output(case, inputs)
        plain, h = infer_body(inputs)
        for name, pack, unpack in [("gzip", gzip.compress, gzip.decompress),
                                   ("deflate", zlib.compress, zlib.decompress)]:
            hd = dict(h, **{"Content-Encoding": name, "Accept-Encoding": name})
            status, rh, body = self.c.request("POST", "/v2/models/%s/infer" % case, pack(plain),
                                              hd)
            self.assertEqual(status, 200, body[:200])
            self.assertEqual(rh["content-encoding"], name)
            head, got = decode_answer(status, rh, unpack(body))
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
            # compressed request, plain answer
            status, rh, body = self.c.request("POST", "/v2/models/%s/infer" % case, pack(plain),
                                              {"Content-Encoding": name})
            self.assertEqual(status, 200)
            self.assertNotIn("content-encoding", rh)
            # a control answer compressed
            status, rh, body = self.c.request("GET", "/v2", None, {"Accept-Encoding": name})
            self.assertEqual(json.loads(unpack(body))["name"], "blockserve")
        # q=0 refuses an encoding; the next acceptable one is used
        status, rh, body = self.c.request("GET", "/v2", None,
                                          {"Accept-Encoding": "gzip;q=0, deflate"})
        self.assertEqual(rh.get("content-encoding"), "deflate")
        status, rh, body = self.c.request("GET", "/v2", None, {"Accept-Encoding": "gzip; q=0"})
        self.assertNotIn("content-encoding", rh)
        self.assertEqual(json.loads(body)["name"], "blockserve")
        # not what it claims, an unknown encoding, a bomb
        status, rh, body = self.c.request("POST", "/v2/models/%s/infer" % case, plain,
                                          {"Content-Encoding": "gzip"})
        self.assertEqual(status, 400)
        self.assertIn("not valid gzip", json.loads(body)["error"])
        status, rh, body = self.c.request("POST", "/v2/models/%s/infer" % case, plain,
                                          {"Content-Encoding": "br"})
        self.assertEqual(status, 415)
        bomb = gzip.compress(b"0" * (64 << 20), 9)  # 64 MiB from ~64 KiB
        self.assertLess(len(bomb), self.limit)
        status, rh, body = self.c.request("POST", "/v2/models/%s/infer" % case, bomb,
                                          {"Content-Encoding": "gzip"})
        self.assertIn(status, (400, 413))
        self.assertIn("--max-message-bytes", json.loads(body)["error"])
        self.assert_serving()

    def assert_serving(self):
        inputs = common.case_inputs("btb_geglu_cross")
        c = Client(self.port)
        status, h, body = c.infer("btb_geglu_cross", inputs)
        c.close()
        self.assertEqual(status, 200)

    def test_errors(self):
        case = "btb_geglu_cross"
        inputs = common.case_inputs(case)
        good, h = infer_body(inputs)
        req = json.loads(good)
        # unknown model: 404 as the status table maps NOT_FOUND, counted like gRPC
        status, b = self.c.json("POST", "/v2/models/nope/infer", good)
        self.assertEqual(status, 404)
        self.assertIn("nope", b["error"])
        cases = []
        cases.append((b"{not json", 400, "malformed JSON"))
        cases.append((b"[1,2]", 400, "JSON object"))
        bad = json.loads(good)
        bad["inputs"][0]["shape"] = [2, 20, 31]
        cases.append((json.dumps(bad), 400, "data holds"))
        bad = json.loads(good)
        bad["inputs"][0]["datatype"] = "FP64"
        cases.append((json.dumps(bad), 400, "datatype 'FP64'"))
        bad = json.loads(good)
        bad["inputs"][0]["data"] = ["a"] * 1280
        cases.append((json.dumps(bad), 400, "string"))
        bad = json.loads(good)
        bad["inputs"][0]["shape"] = [2, 20, -32]
        cases.append((json.dumps(bad), 400, "dims must be >= 0"))
        bad = json.loads(good)
        del bad["inputs"]
        cases.append((json.dumps(bad), 400, "'inputs'"))
        bad = json.loads(good)
        bad["outputs"] = [{"name": "nope"}]
        cases.append((json.dumps(bad), 400, "unknown output"))
        bad = json.loads(good)
        bad["parameters"] = {"priority": -1}
        cases.append((json.dumps(bad), 400, "priority"))
        bad = json.loads(good)
        bad["inputs"][1]["name"] = bad["inputs"][0]["name"]
        cases.append((json.dumps(bad), 400, "name given twice"))
        bad = json.loads(good)
        del bad["inputs"][0]["data"]
        bad["inputs"][0]["parameters"] = {"shared_memory_region": "no_such_region",
                                          "shared_memory_byte_size": 5120}
        status, b = self.c.json("POST", "/v2/models/%s/infer" % case, json.dumps(bad))
        self.assertIn(status, (400, 404))  # not served yet, or an unknown region
        self.assertTrue("shared memory" in b["error"] or "no_such_region" in b["error"], b)
        before = self.stats(case)["inference_stats"]["fail"]["count"]
        for body, want, fragment in cases:
            status, b = self.c.json("POST", "/v2/models/%s/infer" % case, body)
            self.assertEqual(status, want, body[:200])
            self.assertIn(fragment, b["error"])
        after = self.stats(case)["inference_stats"]["fail"]["count"]
        self.assertGreaterEqual(after - before, len(cases) - 2)  # decoded far enough to name it
        # a body over the limit
        status, b = self.c.json("POST", "/v2/models/%s/infer" % case, b" " * (self.limit + 1))
        self.assertEqual(status, 413)
        self.assertIn("--max-message-bytes", b["error"])
        self.assert_serving()

    def test_parameters_and_id(self):
        case = "btb_geglu_cross"
        inputs = common.case_inputs(case)
        status, h, body = self.c.infer(case, inputs, rid="id-7",
                                       params={"priority": 1, "timeout": 60000000})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["id"], "id-7")
        status, h, body = self.c.infer(case, inputs, params={"timeout": "soon"})
        self.assertEqual(status, 400)
        self.assertIn("timeout", json.loads(body)["error"])

    def test_truncated_body_and_disconnects(self):
        case = "btb_self_only"
        inputs = common.case_inputs(case)
        body, h = infer_body(inputs)
        # the body stops short and the client goes away
        s = socket.create_connection(("127.0.0.1", self.port))
        s.sendall(("POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                   % (case, len(body))).encode() + body[:len(body) // 2])
        time.sleep(0.2)
        s.close()
        # a whole request, then the client goes away while it waits in the
        # queue (the model batches for 300 ms): the core request is cancelled
        before = self.stats(case)["inference_stats"]["fail"]["count"]
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", self.port))
            s.sendall(("POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                       "\r\n" % (case, len(body))).encode() + body)
            time.sleep(0.05)
            s.close()
        deadline = time.time() + 10
        while time.time() < deadline:
            after = self.stats(case)["inference_stats"]["fail"]["count"]
            if after - before >= 3:
                break
            time.sleep(0.1)
        self.assertEqual(after - before, 3)  # cancelled, counted as failures
        self.assertIn("cancel", self.server.text().lower())
        self.assert_serving()

    def test_concurrent_requests_batch(self):
        case = "btb_self_only"
        inputs = common.sample(common.case_inputs(case), 0)
        before = self.stats(case)
        n = 8

        def one(_):
            c = Client(self.port)
            try:
                return c.infer(case, inputs)[0]
            finally:
                c.close()

        with concurrent.futures.ThreadPoolExecutor(n) as ex:
            statuses = list(ex.map(one, range(n)))
        self.assertEqual(statuses, [200] * n)
        after = self.stats(case)
        runs = after["execution_count"] - before["execution_count"]
        done = after["inference_count"] - before["inference_count"]
        self.assertEqual(done, n)
        self.assertLess(runs, n)  # some batched together
        print("  %d concurrent HTTP requests ran in %d batches" % (n, runs))

    def test_curl(self):
        base = "http://127.0.0.1:%d" % self.port
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              base + "/v2/health/ready"], capture_output=True, text=True)
        self.assertEqual(out.stdout, "200")
        case = "btb_geglu_cross"
        inputs = common.case_inputs(case)
        body, h = infer_body(inputs)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            f.write(gzip.compress(body))
            f.flush()
            out = subprocess.run(["curl", "-s", "--compressed", "-H", "Content-Encoding: gzip",
                                  "--data-binary", "@" + f.name,
                                  base + "/v2/models/%s/infer" % case],
                                 capture_output=True, check=True)
        got = np.array(json.loads(out.stdout)["outputs"][0]["data"], dtype=np.float32)
        want = self.grpc_output(case, inputs)
        np.testing.assert_array_equal(got.view(np.uint32), want.ravel().view(np.uint32))
        out = subprocess.run(["curl", "-s", "-w", " %{http_code}", base + "/v2/models/nope/config"],
                             capture_output=True, text=True)
        self.assertTrue(out.stdout.endswith(" 404"), out.stdout)
        self.assertIn('"error"', out.stdout)


class HttpSecureTest(unittest.TestCase):
    """The bearer token and TLS (mutual) on the HTTP port."""

    @classmethod
    def setUpClass(cls):
        secure.CERTS = cls.certs = tempfile.mkdtemp(prefix="bs_http_certs_")
        secure.make_certs(cls.certs)
        cls.repo = harness.make_repository(["btb_self_only"], broken=False)
        cls.token_file = os.path.join(cls.certs, "token")
        with open(cls.token_file, "w") as f:
            f.write(TOKEN + "\n")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.repo, ignore_errors=True)
        shutil.rmtree(cls.certs, ignore_errors=True)

    def test_token(self):
        server = harness.Server(BINARY, ["--model-repository", self.repo,
                                         "--auth-token-file", self.token_file])
        try:
            c = Client(server.http_port)
            for path in ["/v2/health/live", "/v2/health/ready",
                         "/v2/models/btb_self_only/ready"]:
                self.assertEqual(c.request("GET", path)[0], 200, path)
            for headers in [{}, {"Authorization": "Bearer wrong"},
                            {"Authorization": "Basic " + TOKEN}]:
                status, h, body = c.request("GET", "/v2", None, headers)
                self.assertEqual(status, 401, headers)
                self.assertIn("error", json.loads(body))
                self.assertNotIn(TOKEN, body.decode())
            inputs = common.sample(common.case_inputs("btb_self_only"), 0)
            status, h, body = c.infer("btb_self_only", inputs)
            self.assertEqual(status, 401)
            ok = Client(server.http_port, token=TOKEN)
            self.assertEqual(ok.request("GET", "/v2")[0], 200)
            self.assertEqual(ok.infer("btb_self_only", inputs)[0], 200)
            lower = Client(server.http_port)
            status = lower.request("GET", "/v2", None, {"Authorization": "bearer " + TOKEN})[0]
            self.assertEqual(status, 200)
        finally:
            harness.shutdown(server)

    def test_tls_and_client_certificates(self):
        p = lambda n: os.path.join(self.certs, n)  # noqa: E731
        server = harness.Server(BINARY, ["--model-repository", self.repo,
                                         "--tls-cert", p("server.crt"), "--tls-key", p("server.key")])
        try:
            self.assertIn("HTTP on https://", server.text())
            ctx = ssl.create_default_context(cafile=p("ca.crt"))
            c = Client(server.http_port, tls=ctx)
            self.assertEqual(c.request("GET", "/v2/health/ready")[0], 200)
            inputs = common.sample(common.case_inputs("btb_self_only"), 0)
            self.assertEqual(c.infer("btb_self_only", inputs)[0], 200)
            plain = Client(server.http_port)
            with self.assertRaises((ConnectionError, http.client.HTTPException, OSError)):
                plain.conn.request("GET", "/v2/health/ready")
                plain.conn.getresponse()
        finally:
            harness.shutdown(server)
        server = harness.Server(BINARY, ["--model-repository", self.repo,
                                         "--tls-cert", p("server.crt"), "--tls-key", p("server.key"),
                                         "--tls-client-ca", p("ca.crt")])
        try:
            ctx = ssl.create_default_context(cafile=p("ca.crt"))
            ctx.load_cert_chain(p("client.crt"), p("client.key"))
            self.assertEqual(Client(server.http_port, tls=ctx).request("GET", "/v2")[0], 200)
            for cert in [None, "stranger"]:
                ctx = ssl.create_default_context(cafile=p("ca.crt"))
                if cert:
                    ctx.load_cert_chain(p(cert + ".crt"), p(cert + ".key"))
                try:
                    status = Client(server.http_port, tls=ctx).request("GET", "/v2")[0]
                except (ConnectionError, ssl.SSLError, OSError):
                    status = None  # refused in the handshake
                self.assertIn(status, (None, 403), cert)
        finally:
            harness.shutdown(server)


class HttpStartupTest(unittest.TestCase):
    """The port options: a busy default port only warns, an explicit one is an
    error, 0 turns HTTP off, a bad address is an error."""

    def run_server(self, args, until="serving 1 models"):
        repo = harness.make_repository(["btb_self_only"], broken=False)
        try:
            proc = subprocess.Popen([BINARY, "serve", "--grpc-port", "0", "--grpc-address",
                                     "127.0.0.1", "--metrics-port", "0", "--model-repository",
                                     repo] + args, stderr=subprocess.PIPE, text=True)
            lines = []
            for line in proc.stderr:
                lines.append(line)
                if until in line:
                    proc.terminate()
                    break
            lines.append(proc.communicate(timeout=60)[1])
        finally:
            shutil.rmtree(repo, ignore_errors=True)
        return proc.returncode, "".join(lines)

    def test_ports(self):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", 8000))
            sock.listen(1)
        except OSError:
            sock.close()
            sock = None  # taken already: the default is busy either way
        try:
            code, text = self.run_server([])
            self.assertEqual(code, 0, text)
            self.assertIn("http: cannot listen on 127.0.0.1:8000", text)
            self.assertIn("serving without HTTP", text)
            port = harness.free_port()
            busy = socket.socket()
            busy.bind(("127.0.0.1", port))
            busy.listen(1)
            code, text = self.run_server(["--http-port", str(port)])
            busy.close()
            self.assertEqual(code, 1, text)
            self.assertIn("http: cannot listen on 127.0.0.1:%d" % port, text)
        finally:
            if sock is not None:
                sock.close()
        code, text = self.run_server(["--http-port", "0"])
        self.assertEqual(code, 0, text)
        self.assertNotIn("HTTP on", text)
        code, text = self.run_server(["--http-address", "localhost"])
        self.assertEqual(code, 1, text)
        self.assertIn('--http-address "localhost"', text)


class HttpShutdownTest(unittest.TestCase):
    def test_in_flight_answered_at_shutdown(self):
        repo = harness.make_repository(["btb_self_only"], {"btb_self_only": {
            "max_batch_size": 8, "max_queue_delay_microseconds": 1500000}}, broken=False)
        server = harness.Server(BINARY, ["--model-repository", repo, "--grace-seconds", "10"])
        inputs = common.sample(common.case_inputs("btb_self_only"), 0)
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as ex:
                f = ex.submit(lambda: Client(server.http_port).infer("btb_self_only", inputs))
                time.sleep(0.5)  # queued, waiting for its batch
                server.proc.send_signal(15)
                status, h, body = f.result(30)
            self.assertEqual(status, 200, body[:200])  # finished within the grace period
            self.assertEqual(server.proc.wait(30), 0)
            self.assertIn("stopping the HTTP front end", server.text())
        finally:
            harness.shutdown(server, repo)


if __name__ == "__main__":
    BINARY = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
