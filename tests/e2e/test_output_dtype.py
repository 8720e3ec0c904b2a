"""The output in the request's dtype: the request parameter output_datatype
("FP32", "BF16", "FP16") and a model's serving.json default, over gRPC and
HTTP/REST. Every BF16 and FP16 answer must equal the FP32 answer of the same
request rounded to nearest even, bit for bit (rounded here with numpy: BF16
by uint32 bit arithmetic, FP16 by numpy's float32 -> float16 cast):

- raw and typed FP32 inputs, and BF16 inputs;
- requests of mixed output dtypes sent concurrently to a batching model:
  each gets its own dtype, within the batching tolerance of its reference
  (requests of one output dtype share a batch, see README);
- stream_intermediate: each block's output in the asked dtype;
- a denoising sequence with block caching (refresh, then reuse steps);
- an output in system shared memory: the region takes the 16-bit bytes, the
  answer says BF16/FP16, a region sized for BF16 is too small for FP32;
- HTTP: FP16 as JSON numbers or binary data, BF16 always binary data;
- ModelMetadata/ModelConfig name the model's default output datatype;
- bad values: INVALID_ARGUMENT / 400 naming the accepted values.

    /usr/bin/python3 tests/e2e/test_output_dtype.py BLOCKSERVE_BINARY
"""

import concurrent.futures
import http.client
import json
import mmap
import os
import shutil
import sys
import unittest

import numpy as np

import harness
import test_server as common  # generates the stubs; its tests are not collected here

import grpc  # noqa: E402

pb = common.pb
pb_grpc = common.pb_grpc
BINARY = None
CODE = grpc.StatusCode
BATCH_TOL = 1e-5  # a request batched with others against it alone, x max |output| (README)

# Models: a batching one (FP32 by default), a stack (streaming, caching), and
# the same single block with output_datatype BF16 as its default.
SERVING = {"btb_geglu_cross": {"max_batch_size": 16, "max_queue_delay_microseconds": 200000},
           "btb_stack3": {"max_batch_size": 4}}
DEFAULT_BF16 = "self_bf16"


def bf16_bits(arr):
    """F32 -> BF16 bits, rounded to nearest even (NaN kept quiet)."""
    u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(arr, dtype=np.float32))
    bits[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return bits


def widen_bf16(bits):
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def rounded(f32, dtype):
    """The bits (uint16) or values (FP32) the server must answer in dtype."""
    if dtype == "BF16":
        return bf16_bits(f32)
    if dtype == "FP16":
        return f32.astype(np.float16).view(np.uint16)
    return f32


def raw_output(resp):
    """(datatype, array: uint16 bits for BF16/FP16, float32 for FP32)."""
    out = resp.outputs[0]
    shape = list(out.shape)
    if out.datatype == "FP32":
        return out.datatype, common.output_of(resp)
    return out.datatype, np.frombuffer(resp.raw_output_contents[0], dtype="<u2").reshape(shape)


def with_dtype(req, dtype):
    if dtype is not None:
        req.parameters["output_datatype"].string_param = dtype
    return req


def bf16_inputs(inputs):
    """The activations as BF16 bits (for a request) and as the F32 values they stand for."""
    as_bf16, as_f32 = {}, {}
    for name, (dt, arr) in inputs.items():
        if dt == "F32" and name in ("hidden_states", "encoder_hidden_states"):
            bits = bf16_bits(arr)
            as_bf16[name] = ("BF16", bits)
            as_f32[name] = ("F32", widen_bf16(bits).reshape(arr.shape))
        else:
            as_bf16[name] = as_f32[name] = (dt, arr)
    return as_bf16, as_f32


def request(model, inputs, dtype=None, raw=True, rid="", params=None):
    req = common.infer_request(model, {n: v for n, v in inputs.items() if v[0] != "BF16"},
                               raw=raw, rid=rid, params=params)
    for name, (dt, arr) in inputs.items():
        if dt == "BF16":
            req.inputs.add(name=name, datatype="BF16", shape=list(arr.shape))
            req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    return with_dtype(req, dtype)


class OutputDtypeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.repo = harness.make_repository(list(SERVING) + ["btb_self_only"], SERVING,
                                           broken=False)
        for name, dt in ((DEFAULT_BF16, "BF16"), ("bad_default", "FP64")):
            shutil.copytree(os.path.join(harness.GOLDEN, "btb_self_only"),
                            os.path.join(cls.repo, name))
            with open(os.path.join(cls.repo, name, "serving.json"), "w") as f:
                json.dump({"output_datatype": dt}, f)
        cls.server = harness.Server(BINARY, ["--model-repository", cls.repo,
                                             "--log-verbose", "1"])
        cls.channel = grpc.insecure_channel(cls.server.address)
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        harness.shutdown(cls.server, cls.repo)

    def status_of(self, fn, req):
        with self.assertRaises(grpc.RpcError) as cm:
            fn(req)
        return cm.exception.code(), cm.exception.details()

    def check_rounding(self, model, inputs, raw=True):
        ref = common.output_of(self.stub.ModelInfer(request(model, inputs, raw=raw)))
        for dtype in ("BF16", "FP16", "FP32"):
            dt, got = raw_output(self.stub.ModelInfer(request(model, inputs, dtype, raw=raw)))
            self.assertEqual(dt, dtype)
            np.testing.assert_array_equal(got, rounded(ref, dtype), err_msg=model + " " + dtype)
        return ref

    # ---- gRPC ------------------------------------------------------------

    def test_rounded_bit_for_bit(self):
        for model in ("btb_geglu_cross", "btb_self_only", "btb_stack3"):
            inputs = common.case_inputs(model)
            ref = self.check_rounding(model, inputs)
            # the narrow answers are not the FP32 bytes cut in half: BF16
            # rounds some values up (nearest even), FP16 holds other values
            bits = ref.view(np.uint32)
            self.assertTrue(np.any((bits & 0xFFFF) > 0x8000), model)
            print("%s: %d values, BF16 rounded up %d, FP16 max |err| %.3g" % (
                model, ref.size, int(np.sum((bits & 0xFFFF) > 0x8000)),
                float(np.max(np.abs(ref.astype(np.float16).astype(np.float32) - ref)))))

    def test_typed_inputs(self):
        # typed FP32 inputs answer FP32 typed, 16-bit outputs raw (no typed field)
        inputs = common.sample(common.case_inputs("btb_self_only"), 0)
        r = self.stub.ModelInfer(request("btb_self_only", inputs, raw=False))
        self.assertEqual(len(r.raw_output_contents), 0)
        r16 = self.stub.ModelInfer(request("btb_self_only", inputs, "FP16", raw=False))
        self.assertEqual(len(r16.raw_output_contents), 1)
        self.check_rounding("btb_self_only", inputs, raw=False)

    def test_bf16_inputs(self):
        as_bf16, as_f32 = bf16_inputs(common.case_inputs("btb_geglu_cross"))
        ref = common.output_of(self.stub.ModelInfer(request("btb_geglu_cross", as_f32)))
        for dtype in ("BF16", "FP16"):
            dt, got = raw_output(self.stub.ModelInfer(request("btb_geglu_cross", as_bf16, dtype)))
            self.assertEqual(dt, dtype)
            np.testing.assert_array_equal(got, rounded(ref, dtype), err_msg=dtype)

    def test_concurrent_mixed_dtypes(self):
        inputs = common.case_inputs("btb_geglu_cross")
        samples = [common.sample(inputs, i % 2) for i in range(12)]
        refs = [common.output_of(self.stub.ModelInfer(request("btb_geglu_cross", s)))
                for s in samples[:2]]
        dtypes = ["FP32", "BF16", "FP16", None]
        before = self.stub.ModelStatistics(pb.ModelStatisticsRequest(name="btb_geglu_cross"))
        with concurrent.futures.ThreadPoolExecutor(len(samples)) as ex:
            futs = [ex.submit(self.stub.ModelInfer,
                              request("btb_geglu_cross", s, dtypes[i % 4], rid=str(i)))
                    for i, s in enumerate(samples)]
            resps = [f.result() for f in futs]
        after = self.stub.ModelStatistics(pb.ModelStatisticsRequest(name="btb_geglu_cross"))
        execs = (after.model_stats[0].execution_count - before.model_stats[0].execution_count)
        # they batched (fewer executions than requests), but never across dtypes (at least 3)
        print("12 requests of 3 output dtypes: %d executions" % execs)
        self.assertGreaterEqual(execs, 3)
        self.assertLess(execs, 12)
        worst = 0.0
        for i, r in enumerate(resps):
            self.assertEqual(r.id, str(i))
            want = dtypes[i % 4] or "FP32"
            dt, got = raw_output(r)
            self.assertEqual(dt, want, i)
            ref = refs[i % 2]
            if want == "BF16":
                got = widen_bf16(got).reshape(ref.shape)
            elif want == "FP16":
                got = got.view(np.float16).astype(np.float32)
            # batched: within the batching tolerance of the request alone,
            # plus the narrow type's rounding (half an ulp: at most 2^-8, 2^-11 of the value)
            ulp = {"FP32": 0.0, "BF16": 2.0 ** -8, "FP16": 2.0 ** -11}[want]
            err = np.abs(got - ref)
            bound = BATCH_TOL * float(np.max(np.abs(ref))) + ulp * np.abs(ref) + 1e-7
            worst = max(worst, float(np.max(err / bound)))
            self.assertTrue(np.all(err <= bound), (i, want, float(np.max(err))))
        print("mixed dtypes: worst error %.2f of the bound" % worst)

    def test_stream_intermediate(self):
        inputs = common.case_inputs("btb_stack3")
        params = {"stream_intermediate": True}
        ref = [common.output_of(r.infer_response) for r in self.stub.ModelStreamInfer(
            iter([request("btb_stack3", inputs, params=params)]))]
        self.assertEqual(len(ref), 3)
        for dtype in ("BF16", "FP16"):
            resps = list(self.stub.ModelStreamInfer(
                iter([request("btb_stack3", inputs, dtype, params=params)])))
            self.assertEqual(len(resps), 3)
            for k, r in enumerate(resps):
                self.assertEqual(r.error_message, "")
                dt, got = raw_output(r.infer_response)
                self.assertEqual(dt, dtype)
                np.testing.assert_array_equal(got, rounded(ref[k], dtype), err_msg="block %d" % k)

    def test_sequence_block_cache(self):
        base = common.case_inputs("btb_stack3")
        outs = {}
        for sid, dtype in ((7001, None), (7002, "BF16"), (7003, "FP16")):
            outs[dtype] = []
            for k in range(4):
                inputs = dict(base)
                hs = base["hidden_states"][1]
                inputs["hidden_states"] = ("F32", (hs + 0.05 * k).astype(np.float32))
                req = request("btb_stack3", inputs, dtype)
                req.parameters["sequence_id"].uint64_param = sid
                req.parameters["block_cache_interval"].int64_param = 2
                if k == 0:
                    req.parameters["sequence_start"].bool_param = True
                if k == 3:
                    req.parameters["sequence_end"].bool_param = True
                r = self.stub.ModelInfer(req)
                self.assertEqual(r.parameters["block_cache"].string_param,
                                 "refresh" if k % 2 == 0 else "reuse")
                outs[dtype].append(raw_output(r))
        for dtype in ("BF16", "FP16"):
            for k in range(4):
                dt, got = outs[dtype][k]
                self.assertEqual(dt, dtype)
                np.testing.assert_array_equal(got, rounded(outs[None][k][1], dtype),
                                              err_msg="%s step %d" % (dtype, k))

    def test_model_default(self):
        inputs = common.sample(common.case_inputs("btb_self_only"), 1)
        ref = common.output_of(self.stub.ModelInfer(request("btb_self_only", inputs)))
        dt, got = raw_output(self.stub.ModelInfer(request(DEFAULT_BF16, inputs)))
        self.assertEqual(dt, "BF16")
        np.testing.assert_array_equal(got, rounded(ref, "BF16"))
        dt, got = raw_output(self.stub.ModelInfer(request(DEFAULT_BF16, inputs, "FP32")))
        self.assertEqual(dt, "FP32")
        np.testing.assert_array_equal(got, ref)
        # metadata and config name the default
        for model, want in ((DEFAULT_BF16, "BF16"), ("btb_self_only", "FP32")):
            md = self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
            self.assertEqual(md.outputs[0].datatype, want)
            cfg = self.stub.ModelConfig(pb.ModelConfigRequest(name=model)).config
            self.assertEqual(cfg.output[0].data_type, getattr(common.mc, "TYPE_" + want))
        # a bad default is a load failure with a reason
        idx = {m.name: m for m in self.stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        self.assertEqual(idx["bad_default"].state, "UNAVAILABLE")
        self.assertIn("output_datatype", idx["bad_default"].reason)
        self.assertIn("BF16", idx["bad_default"].reason)

    def test_bad_values(self):
        inputs = common.sample(common.case_inputs("btb_self_only"), 0)
        for bad in ("fp16", "FP64", "INT64", "", "BF16 "):
            code, msg = self.status_of(self.stub.ModelInfer, request("btb_self_only", inputs, bad))
            self.assertEqual(code, CODE.INVALID_ARGUMENT, bad)
            self.assertIn("output_datatype", msg)
            self.assertIn("FP32, BF16, FP16", msg)
        req = request("btb_self_only", inputs)
        req.parameters["output_datatype"].int64_param = 16
        code, msg = self.status_of(self.stub.ModelInfer, req)
        self.assertEqual(code, CODE.INVALID_ARGUMENT)
        self.assertIn("string_param", msg)
        # the server keeps serving
        self.check_rounding("btb_self_only", inputs)

    # ---- shared memory ---------------------------------------------------

    def test_shm_output(self):
        inputs = common.sample(common.case_inputs("btb_self_only"), 0)
        ref = common.output_of(self.stub.ModelInfer(request("btb_self_only", inputs)))
        n16 = ref.size * 2
        key = "/bs_e2e_odt_%d" % os.getpid()
        fd = os.open("/dev/shm" + key, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, 4 * ref.size + 64)
            mm = mmap.mmap(fd, 4 * ref.size + 64)
        finally:
            os.close(fd)
        try:
            self.stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="odt", key=key, offset=0, byte_size=4 * ref.size + 64))
            for dtype in ("BF16", "FP16"):
                mm[:] = b"\xff" * len(mm)
                req = request("btb_self_only", inputs, dtype)
                o = req.outputs.add(name="output")
                o.parameters["shared_memory_region"].string_param = "odt"
                o.parameters["shared_memory_byte_size"].int64_param = n16
                o.parameters["shared_memory_offset"].int64_param = 64
                r = self.stub.ModelInfer(req)
                self.assertEqual(r.outputs[0].datatype, dtype)
                self.assertEqual(r.raw_output_contents[0] if r.raw_output_contents else b"", b"")
                got = np.frombuffer(mm[64:64 + n16], dtype="<u2").reshape(ref.shape)
                np.testing.assert_array_equal(got, rounded(ref, dtype), err_msg=dtype)
                self.assertEqual(mm[64 + n16:64 + n16 + 4], b"\xff" * 4)  # nothing beyond
                # a region one element short, and FP32 into the BF16-sized region
                for short_dtype, size in ((dtype, n16 - 2), ("FP32", n16)):
                    req = request("btb_self_only", inputs, short_dtype)
                    o = req.outputs.add(name="output")
                    o.parameters["shared_memory_region"].string_param = "odt"
                    o.parameters["shared_memory_byte_size"].int64_param = size
                    code, msg = self.status_of(self.stub.ModelInfer, req)
                    self.assertEqual(code, CODE.INVALID_ARGUMENT)
                    self.assertIn("%s [" % short_dtype, msg)
        finally:
            self.stub.SystemSharedMemoryUnregister(
                pb.SystemSharedMemoryUnregisterRequest(name="odt"))
            mm.close()
            os.unlink("/dev/shm" + key)

    # ---- HTTP -------------------------------------------------------------

    def http(self, model, body, headers):
        c = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=60)
        try:
            c.request("POST", "/v2/models/%s/infer" % model, body, headers)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def http_infer(self, model, inputs, params=None, binary_out=None):
        """(status, JSON header, output bits/values or None, came as binary)."""
        ins = [{"name": n, "datatype": harness.TRITON_DTYPE[dt], "shape": list(a.shape),
                "data": a.ravel().tolist()} for n, (dt, a) in inputs.items()]
        req = {"inputs": ins}
        if params:
            req["parameters"] = params
        if binary_out is not None:
            req["outputs"] = [{"name": "output", "parameters": {"binary_data": binary_out}}]
        status, headers, body = self.http(model, json.dumps(req).encode(),
                                          {"Content-Type": "application/json"})
        hl = headers.get("inference-header-content-length")
        head = json.loads(body[:int(hl)] if hl else body)
        if status != 200:
            return status, head, None, False
        out = head["outputs"][0]
        dt = out["datatype"]
        if "data" in out:
            vals = np.array(out["data"], dtype=np.float64)
            arr = vals.astype(np.float16).view(np.uint16) if dt == "FP16" else \
                vals.astype(np.float32)
            # each JSON number reads back as the 16-bit value (printed as an F32)
            if dt == "FP16":
                np.testing.assert_array_equal(arr.view(np.float16).astype(np.float32),
                                              vals.astype(np.float32))
            return status, head, arr.reshape(out["shape"]), False
        n = out["parameters"]["binary_data_size"]
        raw = body[int(hl):int(hl) + n]
        arr = np.frombuffer(raw, dtype="<f4" if dt == "FP32" else "<u2")
        return status, head, arr.reshape(out["shape"]), True

    def test_http(self):
        inputs = common.sample(common.case_inputs("btb_geglu_cross"), 1)
        ref = common.output_of(self.stub.ModelInfer(request("btb_geglu_cross", inputs)))
        # FP16: JSON numbers by default, binary data when asked
        for binary in (None, True):
            st, head, got, was_bin = self.http_infer("btb_geglu_cross", inputs,
                                                     {"output_datatype": "FP16"}, binary)
            self.assertEqual(st, 200, head)
            self.assertEqual(head["outputs"][0]["datatype"], "FP16")
            self.assertEqual(was_bin, bool(binary))
            np.testing.assert_array_equal(got, rounded(ref, "FP16"))
        # BF16: binary data whether asked or not
        for binary in (None, False, True):
            st, head, got, was_bin = self.http_infer("btb_geglu_cross", inputs,
                                                     {"output_datatype": "BF16"}, binary)
            self.assertEqual(st, 200, head)
            self.assertEqual(head["outputs"][0]["datatype"], "BF16")
            self.assertTrue(was_bin)
            np.testing.assert_array_equal(got, rounded(ref, "BF16"))
        # FP32 as before; the model default over HTTP
        st, head, got, _ = self.http_infer("btb_geglu_cross", inputs)
        self.assertEqual(head["outputs"][0]["datatype"], "FP32")
        np.testing.assert_array_equal(got, ref)
        s1 = common.sample(common.case_inputs("btb_self_only"), 0)
        ref1 = common.output_of(self.stub.ModelInfer(request("btb_self_only", s1)))
        st, head, got, was_bin = self.http_infer(DEFAULT_BF16, s1)
        self.assertEqual((st, head["outputs"][0]["datatype"], was_bin), (200, "BF16", True))
        np.testing.assert_array_equal(got, rounded(ref1, "BF16"))
        # HTTP metadata names the default too
        c = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=60)
        c.request("GET", "/v2/models/" + DEFAULT_BF16)
        md = json.loads(c.getresponse().read())
        c.close()
        self.assertEqual(md["outputs"][0]["datatype"], "BF16")

    def test_http_bad_values(self):
        inputs = common.sample(common.case_inputs("btb_self_only"), 0)
        for bad in ("FP64", "bf16", 16, True):
            st, head, _, _ = self.http_infer("btb_self_only", inputs, {"output_datatype": bad})
            self.assertEqual(st, 400, bad)
            self.assertIn("output_datatype", head["error"])
            self.assertIn("FP32", head["error"])
        st, _, _, _ = self.http_infer("btb_self_only", inputs)
        self.assertEqual(st, 200)


if __name__ == "__main__":
    BINARY = sys.argv.pop(1)
    unittest.main(verbosity=2)
