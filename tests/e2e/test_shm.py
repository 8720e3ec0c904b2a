"""End-to-end tests of system shared memory (Triton's extension) over gRPC,
with POSIX shared memory objects made here (/dev/shm, mmap) as a Triton
client makes them:

- inputs read from shared memory give bit for bit the output of the same
  inputs in the message (FP32, FP16, BF16, INT64, BOOL; some inputs in
  shared memory and the rest in raw_input_contents, whose entries are then
  those of the other inputs only, as in Triton), and are left unchanged;
- an output written into shared memory: the answer carries its datatype,
  shape and shared_memory_* parameters, an empty raw_output_contents entry
  and no bytes; inputs and output together, at offsets in regions that
  start inside their object;
- ModelStreamInfer with shared memory; with stream_intermediate the blocks'
  outputs travel in the messages and only the final one goes to the region;
- every bad use answers its status (INVALID_ARGUMENT, NOT_FOUND,
  ALREADY_EXISTS, UNIMPLEMENTED for CUDA shared memory on the CPU) and
  touches nothing: the output region keeps its bytes, and no hold is left
  (once unregistered, the server no longer maps the object: /proc/PID/maps);
- a region unregistered while a request that uses it waits in the queue:
  gone from Status at once, the request completes correctly, and the
  mapping goes when it ends;
- many concurrent requests over distinct slices of one region;
- Status (all, one, unknown) and Unregister of one and of all.

    /usr/bin/python3 tests/e2e/test_shm.py BLOCKSERVE_BINARY
"""

import concurrent.futures
import itertools
import mmap
import os
import sys
import threading
import time
import unittest

import numpy as np

import harness
import test_server as common  # generates the stubs; its tests are not collected here

import grpc  # noqa: E402

pb = common.pb
pb_grpc = common.pb_grpc
BINARY = None
CODE = grpc.StatusCode

# Models, and the slow one whose requests wait in the queue (test_unregister_while_running).
CASES = ["btb_geglu_cross", "btb_input_f16", "btb_mask_bool", "btb_ada_norm_zero_dit",
         "btb_stack3", "btb_self_only"]
SLOW = "btb_self_only"
SLOW_DELAY_US = 1500000

_keys = itertools.count()


class Region:
    """A POSIX shared memory object of size bytes, mapped here."""

    def __init__(self, size):
        self.key = "/bs_e2e_shm_%d_%d" % (os.getpid(), next(_keys))
        self.path = "/dev/shm" + self.key
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size

    def write(self, off, data):
        self.mm[off:off + len(data)] = data

    def read(self, off, n):
        return bytes(self.mm[off:off + n])

    def close(self):
        self.mm.close()
        os.unlink(self.path)


def set_shm(params, region, byte_size, offset=None):
    params["shared_memory_region"].string_param = region
    params["shared_memory_byte_size"].int64_param = byte_size
    if offset is not None:
        params["shared_memory_offset"].int64_param = offset


def raw_bytes(arr):
    return np.ascontiguousarray(arr).tobytes()


def make_request(model, inputs, shm_inputs=None, out=None, rid="", dtypes=None):
    """A raw ModelInferRequest from {name: (st dtype, array)}; shm_inputs
    {name: (region, offset)} puts those inputs in shared memory (their bytes
    written by the caller) and out = (region, byte_size, offset) the output."""
    shm_inputs = shm_inputs or {}
    req = pb.ModelInferRequest(model_name=model, id=rid)
    for name, (dt, arr) in inputs.items():
        datatype = (dtypes or {}).get(name, harness.TRITON_DTYPE[dt])
        t = req.inputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        if name in shm_inputs:
            region, off = shm_inputs[name]
            set_shm(t.parameters, region, len(raw_bytes(arr)), off)
        else:
            req.raw_input_contents.append(raw_bytes(arr))
    if out is not None:
        o = req.outputs.add(name="output")
        set_shm(o.parameters, *out)
    return req


def place(region, inputs, names=None, base=0, align=64):
    """Write inputs (all, or names) into region from base, each at a multiple
    of align; returns {name: offset} and the end."""
    at = base
    offsets = {}
    for name, (dt, arr) in inputs.items():
        if names is not None and name not in names:
            continue
        data = raw_bytes(arr)
        region.write(at, data)
        offsets[name] = at
        at += (len(data) + align - 1) // align * align
    return offsets, at


def maps_key(pid, key):
    """Whether process pid maps the shared memory object key."""
    with open("/proc/%d/maps" % pid) as f:
        return any(line.rstrip("\n").endswith("/dev/shm" + key) for line in f)


BATCH_TOL = 1e-5  # a request batched with others against it alone, x max |output| (README)


def assert_close(test, got_bytes, want_bytes, what):
    """Outputs of requests that may have shared a batch: within BATCH_TOL."""
    got = np.frombuffer(got_bytes, dtype="<f4")
    want = np.frombuffer(want_bytes, dtype="<f4")
    test.assertEqual(got.shape, want.shape, what)
    err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
    test.assertLessEqual(err, BATCH_TOL, what)
    return err


def to_bf16(arr):
    """F32 -> BF16 bits (round to nearest even)."""
    u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class ShmTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        serving = {SLOW: {"max_batch_size": 4, "max_queue_delay_microseconds": SLOW_DELAY_US}}
        cls.repo = harness.make_repository(CASES, serving, broken=False)
        cls.server = harness.Server(BINARY, ["--model-repository", cls.repo])
        cls.channel = grpc.insecure_channel(cls.server.address, options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)
        cls.pid = cls.server.proc.pid
        cls.names = itertools.count()

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        harness.shutdown(cls.server, cls.repo)

    def setUp(self):
        self.regions = []

    def tearDown(self):
        self.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=""))
        for r in self.regions:
            r.close()

    # -- helpers ---------------------------------------------------------------
    def region(self, size):
        r = Region(size)
        self.regions.append(r)
        return r

    def register(self, region, offset=0, byte_size=None, name=None):
        name = name or "r%d" % next(self.names)
        self.stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name=name, key=region.key, offset=offset,
            byte_size=region.size - offset if byte_size is None else byte_size))
        return name

    def assertStatus(self, code, fn, *args, contains=None):
        with self.assertRaises(grpc.RpcError) as cm:
            fn(*args)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        if contains:
            self.assertIn(contains, cm.exception.details())
        return cm.exception.details()

    def status(self, name=""):
        return self.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name=name))

    def reference(self, model, inputs, dtypes=None):
        resp = self.stub.ModelInfer(make_request(model, inputs, dtypes=dtypes))
        return resp.raw_output_contents[0], list(resp.outputs[0].shape)

    # -- inputs and outputs ------------------------------------------------------
    def test_inputs_from_shm_bitwise(self):
        for case in ["btb_geglu_cross", "btb_input_f16", "btb_mask_bool", "btb_ada_norm_zero_dit"]:
            inputs = common.case_inputs(case)
            want, shape = self.reference(case, inputs)
            region = self.region(1 << 20)
            name = self.register(region)
            offsets, end = place(region, inputs)
            before = region.read(0, end)
            resp = self.stub.ModelInfer(make_request(
                case, inputs, {k: (name, o) for k, o in offsets.items()}, rid="all"))
            self.assertEqual(resp.id, "all")
            self.assertEqual(len(resp.raw_output_contents), 1)
            self.assertEqual(resp.raw_output_contents[0], want, case)
            self.assertEqual(list(resp.outputs[0].shape), shape)
            self.assertEqual(region.read(0, end), before, case + ": inputs left unchanged")
            # the first input in shared memory, the others in raw_input_contents
            first = list(inputs)[0]
            offsets, _ = place(region, inputs, names=[first], base=1 << 19)
            req = make_request(case, inputs, {first: (name, offsets[first])})
            self.assertEqual(len(req.raw_input_contents), len(inputs) - 1)
            self.assertEqual(self.stub.ModelInfer(req).raw_output_contents[0], want, case)
            print("%s: from shared memory, bit for bit (%d inputs)" % (case, len(inputs)))

    def test_bf16_inputs_from_shm(self):
        case = "btb_geglu_cross"
        inputs = {k: ("BF16", to_bf16(a).reshape(a.shape))
                  for k, (dt, a) in common.case_inputs(case).items()}
        dtypes = {k: "BF16" for k in inputs}
        want, _ = self.reference(case, inputs, dtypes)
        region = self.region(1 << 18)
        name = self.register(region)
        offsets, _ = place(region, inputs)
        resp = self.stub.ModelInfer(make_request(
            case, inputs, {k: (name, o) for k, o in offsets.items()}, dtypes=dtypes))
        self.assertEqual(resp.raw_output_contents[0], want)

    def test_output_to_shm(self):
        case = "btb_geglu_cross"
        inputs = common.case_inputs(case)
        want, shape = self.reference(case, inputs)
        region = self.region(len(want) + 4096)
        region.write(0, b"\xee" * region.size)
        name = self.register(region)
        resp = self.stub.ModelInfer(make_request(case, inputs, out=(name, len(want) + 100, 64)))
        out = resp.outputs[0]
        self.assertEqual(out.name, "output")
        self.assertEqual(out.datatype, "FP32")
        self.assertEqual(list(out.shape), shape)
        self.assertFalse(out.HasField("contents"))
        self.assertEqual(list(resp.raw_output_contents), [b""])  # Triton's empty entry
        self.assertEqual(out.parameters["shared_memory_region"].string_param, name)
        self.assertEqual(out.parameters["shared_memory_byte_size"].int64_param, len(want) + 100)
        self.assertEqual(out.parameters["shared_memory_offset"].int64_param, 64)
        self.assertEqual(region.read(64, len(want)), want)
        self.assertEqual(region.read(0, 64), b"\xee" * 64)
        self.assertEqual(region.read(64 + len(want), 100), b"\xee" * 100)  # only its bytes
        expected = common.case_expected(case)
        got = np.frombuffer(region.read(64, len(want)), dtype="<f4").reshape(shape)
        self.assertLessEqual(float(np.max(np.abs(got - expected))), common.TOL)

    def test_typed_inputs_output_to_shm(self):
        case = "btb_geglu_cross"
        inputs = common.case_inputs(case)
        want, _ = self.reference(case, inputs)
        region = self.region(len(want))
        name = self.register(region)
        req = common.infer_request(case, inputs, raw=False)
        set_shm(req.outputs.add(name="output").parameters, name, len(want))
        resp = self.stub.ModelInfer(req)
        self.assertEqual(len(resp.raw_output_contents), 0)
        self.assertEqual(len(resp.outputs[0].contents.fp32_contents), 0)
        self.assertEqual(region.read(0, len(want)), want)

    def test_both_at_offsets(self):
        """Region registered 4096 + 40 bytes into its object; inputs and output
        at offsets inside it."""
        case = "btb_ada_norm_zero_dit"
        inputs = common.case_inputs(case)
        want, shape = self.reference(case, inputs)
        obj = self.region(1 << 20)
        base = 4096 + 40
        name = self.register(obj, offset=base, byte_size=(1 << 19))
        offsets, end = place(obj, inputs, base=base + 24)  # offsets in the object
        rel = {k: (name, o - base) for k, o in offsets.items()}
        out_off = (end - base + 63) // 64 * 64
        resp = self.stub.ModelInfer(make_request(case, inputs, rel, out=(name, len(want), out_off)))
        self.assertEqual(list(resp.outputs[0].shape), shape)
        self.assertEqual(obj.read(base + out_off, len(want)), want)

    # -- streams ---------------------------------------------------------------------
    def test_stream(self):
        case = "btb_stack3"
        inputs = common.case_inputs(case)
        want, _ = self.reference(case, inputs)
        region = self.region(1 << 18)
        name = self.register(region)
        offsets, end = place(region, inputs)
        out_off = (end + 63) // 64 * 64
        shm_in = {k: (name, o) for k, o in offsets.items()}
        reqs = [make_request(case, inputs, shm_in, out=(name, len(want), out_off), rid="s%d" % i)
                for i in range(3)]
        resps = list(self.stub.ModelStreamInfer(iter(reqs)))
        self.assertEqual(len(resps), 3)
        for r in resps:
            self.assertEqual(r.error_message, "")
            self.assertEqual(list(r.infer_response.raw_output_contents), [b""])
        # the three may share a batch: each within the batching tolerance
        assert_close(self, region.read(out_off, len(want)), want, "stream")
        # stream_intermediate: the blocks' outputs in the messages, the final in shm
        region.write(out_off, b"\0" * len(want))
        req = make_request(case, inputs, shm_in, out=(name, len(want), out_off))
        req.parameters["stream_intermediate"].bool_param = True
        resps = list(self.stub.ModelStreamInfer(iter([req])))
        finals = [r.infer_response.parameters["triton_final_response"].bool_param for r in resps]
        self.assertEqual(finals, [False, False, True])
        for r in resps[:2]:
            self.assertEqual(len(r.infer_response.raw_output_contents[0]), len(want))
            self.assertNotEqual(r.infer_response.raw_output_contents[0], want)
        self.assertEqual(list(resps[2].infer_response.raw_output_contents), [b""])
        self.assertEqual(region.read(out_off, len(want)), want)
        # an error on a stream is that message's answer; the stream goes on
        bad = make_request(case, inputs, {k: ("nope", 0) for k in inputs})
        resps = list(self.stub.ModelStreamInfer(iter([bad, reqs[0]])))
        self.assertIn("shared memory region 'nope' is not registered", resps[0].error_message)
        self.assertEqual(resps[1].error_message, "")

    # -- bad use -----------------------------------------------------------------------
    def test_register_errors(self):
        region = self.region(8192)
        name = self.register(region, byte_size=100)
        R = pb.SystemSharedMemoryRegisterRequest
        reg = self.stub.SystemSharedMemoryRegister
        self.assertStatus(CODE.ALREADY_EXISTS, reg, R(name=name, key=region.key, byte_size=8),
                          contains="already registered")
        self.assertStatus(CODE.NOT_FOUND, reg, R(name="k", key="/bs_e2e_no_such_key", byte_size=8),
                          contains="cannot be opened")
        self.assertStatus(CODE.INVALID_ARGUMENT, reg, R(name="z", key=region.key, byte_size=0),
                          contains="byte_size is 0")
        self.assertStatus(CODE.INVALID_ARGUMENT, reg,
                          R(name="p", key=region.key, offset=8000, byte_size=193),
                          contains="past its end")
        self.assertStatus(CODE.INVALID_ARGUMENT, reg,
                          R(name="o", key=region.key, offset=(1 << 64) - 1, byte_size=2))
        self.assertStatus(CODE.INVALID_ARGUMENT, reg, R(name="", key=region.key, byte_size=8),
                          contains="region name is empty")
        self.assertStatus(CODE.INVALID_ARGUMENT, reg, R(name="l" * 200, key=region.key,
                                                        byte_size=8), contains="too long")
        self.assertStatus(CODE.INVALID_ARGUMENT, reg, R(name="n", key="a\0b", byte_size=8))
        # unregistering a name that is not registered is no error (Triton's answer)
        self.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="nope"))
        self.assertStatus(CODE.NOT_FOUND, self.status, "nope")
        self.assertEqual(list(self.status().regions), [name])

    def test_infer_errors(self):
        case = "btb_geglu_cross"
        inputs = common.case_inputs(case)
        want, _ = self.reference(case, inputs)
        region = self.region(1 << 16)
        name = self.register(region)
        offsets, end = place(region, inputs)
        shm_in = {k: (name, o) for k, o in offsets.items()}
        region.write(end, b"\xee" * (region.size - end))
        sentinel = region.read(0, region.size)
        hs = "hidden_states"
        nbytes = len(raw_bytes(inputs[hs][1]))

        def bad(code, req, contains):
            self.assertStatus(code, self.stub.ModelInfer, req, contains=contains)
            self.assertEqual(region.read(0, region.size), sentinel, "touched: " + contains)

        def req_with(fn, out=None):
            req = make_request(case, inputs, shm_in, out=out)
            fn(req)
            return req

        t0 = lambda req: req.inputs[0].parameters  # noqa: E731  (hidden_states)
        bad(CODE.NOT_FOUND, make_request(case, inputs, {hs: ("nope", 0)}),
            "input 'hidden_states': shared memory region 'nope' is not registered")
        bad(CODE.INVALID_ARGUMENT,
            req_with(lambda r: t0(r)["shared_memory_byte_size"].__setattr__("int64_param",
                                                                            nbytes - 4)),
            "shared_memory_byte_size is %d, expected %d" % (nbytes - 4, nbytes))
        bad(CODE.INVALID_ARGUMENT,
            req_with(lambda r: t0(r)["shared_memory_offset"].__setattr__("int64_param",
                                                                         region.size - 8)),
            "past the end of shared memory region")
        bad(CODE.INVALID_ARGUMENT,
            req_with(lambda r: t0(r)["shared_memory_offset"].__setattr__("int64_param", 2)),
            "not a multiple of 4 bytes")
        bad(CODE.INVALID_ARGUMENT,
            req_with(lambda r: t0(r)["shared_memory_region"].__setattr__("int64_param", 1)),
            "parameter 'shared_memory_region' must be a string_param")
        bad(CODE.INVALID_ARGUMENT,
            req_with(lambda r: t0(r)["shared_memory_byte_size"].__setattr__("string_param", "1")),
            "parameter 'shared_memory_byte_size' must be an int64_param")
        bad(CODE.INVALID_ARGUMENT,
            req_with(lambda r: t0(r)["shared_memory_offset"].__setattr__("int64_param", -8)),
            "parameter 'shared_memory_offset' is -8 (must be >= 0)")
        bad(CODE.INVALID_ARGUMENT, req_with(lambda r: t0(r).__delitem__("shared_memory_byte_size")),
            "'shared_memory_byte_size' must be given with 'shared_memory_region'")
        bad(CODE.INVALID_ARGUMENT,
            req_with(lambda r: r.raw_input_contents.append(raw_bytes(inputs[hs][1]))),
            "raw_input_contents has 1 entries for 0 inputs not in shared memory")
        bad(CODE.INVALID_ARGUMENT,
            req_with(lambda r: r.inputs[0].contents.fp32_contents.extend([1.0])),
            "contents must be empty for an input in shared memory")
        offset_only = make_request(case, inputs)
        offset_only.inputs[0].parameters["shared_memory_offset"].int64_param = 0
        bad(CODE.INVALID_ARGUMENT, offset_only, "'shared_memory_offset' needs 'shared_memory_region'")
        # outputs: too small (nothing written), past the region, unknown
        bad(CODE.INVALID_ARGUMENT, make_request(case, inputs, shm_in, out=(name, len(want) - 4, end)),
            "needs %d bytes" % len(want))
        bad(CODE.INVALID_ARGUMENT, make_request(case, inputs, shm_in, out=(name, len(want),
                                                                          region.size - 16)),
            "output 'output': shared_memory_offset")
        bad(CODE.NOT_FOUND, make_request(case, inputs, shm_in, out=("nope", len(want), 0)),
            "output 'output': shared memory region 'nope' is not registered")
        o = make_request(case, inputs, shm_in)
        o.outputs.add(name="output").parameters["shared_memory_region"].string_param = name
        bad(CODE.INVALID_ARGUMENT, o, "output 'output': parameter 'shared_memory_byte_size' must "
                                      "be given")
        # the server still serves, and no failure left a hold: once
        # unregistered, the server maps the object no more
        good = self.stub.ModelInfer(make_request(case, inputs, shm_in))
        self.assertEqual(good.raw_output_contents[0], want)
        self.assertTrue(maps_key(self.pid, region.key))
        self.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name))
        self.assertFalse(maps_key(self.pid, region.key))

    def test_cuda_shm_unimplemented(self):
        for fn, req in [(self.stub.CudaSharedMemoryRegister,
                         pb.CudaSharedMemoryRegisterRequest(name="c", raw_handle=b"x" * 64,
                                                            device_id=0, byte_size=64)),
                        (self.stub.CudaSharedMemoryStatus, pb.CudaSharedMemoryStatusRequest()),
                        (self.stub.CudaSharedMemoryUnregister,
                         pb.CudaSharedMemoryUnregisterRequest(name="c"))]:
            self.assertStatus(CODE.UNIMPLEMENTED, fn, req,
                              contains="CUDA shared memory needs the cuda backend; this server "
                                       "computes on cpu")

    # -- lifetimes and concurrency ---------------------------------------------------------
    def test_unregister_while_running(self):
        """A request on the slow model waits ~1.5 s in the queue; its regions
        are unregistered meanwhile."""
        inputs = common.sample(common.case_inputs(SLOW), 0)
        want, _ = self.reference(SLOW, inputs)
        rin, rout = self.region(1 << 16), self.region(len(want))
        nin, nout = self.register(rin), self.register(rout)
        offsets, _ = place(rin, inputs)
        req = make_request(SLOW, inputs, {k: (nin, o) for k, o in offsets.items()},
                           out=(nout, len(want), 0))
        t0 = time.time()
        fut = self.stub.ModelInfer.future(req)
        time.sleep(0.3)
        self.assertFalse(fut.done())
        for n in (nin, nout):
            self.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=n))
        self.assertEqual(len(self.status().regions), 0)
        self.assertTrue(maps_key(self.pid, rin.key))  # held by the request
        self.assertTrue(maps_key(self.pid, rout.key))
        # new requests cannot name them
        self.assertStatus(CODE.NOT_FOUND, self.stub.ModelInfer, req, contains="not registered")
        resp = fut.result(timeout=60)
        print("unregistered during a request of %.2f s: it completed" % (time.time() - t0))
        self.assertEqual(list(resp.raw_output_contents), [b""])
        self.assertEqual(rout.read(0, len(want)), want)
        deadline = time.time() + 5  # released right after the answer
        while time.time() < deadline and maps_key(self.pid, rin.key):
            time.sleep(0.02)
        self.assertFalse(maps_key(self.pid, rin.key))
        self.assertFalse(maps_key(self.pid, rout.key))

    def test_concurrent_slices(self):
        case = "btb_geglu_cross"
        base = common.case_inputs(case)
        n = 24
        rng = np.random.default_rng(5)
        variants = [{k: (dt, (a + rng.standard_normal(a.shape).astype(a.dtype) * 0.1)
                         if dt == "F32" else a) for k, (dt, a) in base.items()}
                    for _ in range(n)]
        wants = [self.reference(case, v)[0] for v in variants]
        slot = 1 << 16
        region = self.region(n * slot)
        name = self.register(region)
        reqs = []
        for i, v in enumerate(variants):
            offsets, end = place(region, v, base=i * slot)
            out_off = (end + 63) // 64 * 64
            self.assertLessEqual(out_off + len(wants[i]), (i + 1) * slot)
            reqs.append((make_request(case, v, {k: (name, o) for k, o in offsets.items()},
                                      out=(name, len(wants[i]), out_off)), out_off))
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda r: self.stub.ModelInfer(r[0]), reqs))
        worst = max(assert_close(self, region.read(out_off, len(wants[i])), wants[i],
                                 "slice %d" % i) for i, (_, out_off) in enumerate(reqs))
        print("%d concurrent requests over distinct slices of one region: each its own answer "
              "(worst %.2e x max |output|, tolerance %.0e)" % (n, worst, BATCH_TOL))

    def test_status_and_unregister_all(self):
        a, b = self.region(4096), self.region(8192)
        na = self.register(a, name="alpha")
        nb = self.register(b, offset=100, byte_size=5000, name="beta")
        self.register(b, name="gamma")
        st = self.status()
        self.assertEqual(sorted(st.regions), ["alpha", "beta", "gamma"])
        r = st.regions["beta"]
        self.assertEqual((r.name, r.key, r.offset, r.byte_size), ("beta", b.key, 100, 5000))
        self.assertEqual(list(self.status("alpha").regions), ["alpha"])
        self.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=na))
        self.assertEqual(sorted(self.status().regions), ["beta", "gamma"])
        self.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=""))
        self.assertEqual(len(self.status().regions), 0)
        self.assertFalse(maps_key(self.pid, b.key))
        # a name is free again once unregistered
        self.register(a, name=nb)
        self.assertEqual(self.status(nb).regions[nb].key, a.key)
        md = self.stub.ServerMetadata(pb.ServerMetadataRequest())
        self.assertIn("system_shared_memory", md.extensions)


if __name__ == "__main__":
    BINARY = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
