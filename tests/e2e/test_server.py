"""End-to-end tests of blockserve serve over gRPC with Debian's python3-grpcio
and stubs generated from our proto/: every method, datatypes, raw and typed
contents, errors, streaming, batching, health, reflection, shutdown.

    /usr/bin/python3 tests/e2e/test_server.py BLOCKSERVE_BINARY
"""

import concurrent.futures
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

import numpy as np

import harness

import grpc  # noqa: E402  (before the stubs path: nothing may shadow it)

BINARY = None
STUBS = tempfile.mkdtemp(prefix="bs_stubs_")
harness.generate_stubs(STUBS)

import grpc_service_pb2 as pb  # noqa: E402
import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
import health_pb2  # noqa: E402
import model_config_pb2 as mc  # noqa: E402
import health_pb2_grpc  # noqa: E402
import reflection_v1_pb2 as refl_1  # noqa: E402
import reflection_v1_pb2_grpc as refl_1_grpc  # noqa: E402
import reflection_v1alpha_pb2 as refl_a  # noqa: E402
import reflection_v1alpha_pb2_grpc as refl_a_grpc  # noqa: E402

TOL = 1e-4
CASES = ["btb_geglu_cross", "btb_stack3", "btb_ada_norm_zero_dit", "attnblock_4heads",
         "ada_group_norm_swish", "btb_mask_bool", "btb_input_f16", "btb_self_only"]


def case_inputs(case):
    return harness.st_load(os.path.join(harness.GOLDEN, case, "inputs.safetensors"))


def case_expected(case):
    return harness.st_load(os.path.join(harness.GOLDEN, case, "expected.safetensors"))["output"][1]


def infer_request(model, inputs, raw=True, rid="", params=None, outputs=None):
    """A ModelInferRequest from {name: (st dtype, array)}."""
    req = pb.ModelInferRequest(model_name=model, id=rid)
    for name, (dt, arr) in inputs.items():
        t = req.inputs.add(name=name, datatype=harness.TRITON_DTYPE[dt], shape=list(arr.shape))
        if raw:
            req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
        elif dt == "F32":
            t.contents.fp32_contents.extend(arr.ravel().tolist())
        elif dt == "I64":
            t.contents.int64_contents.extend(arr.ravel().tolist())
        elif dt == "BOOL":
            t.contents.bool_contents.extend(bool(x) for x in arr.ravel())
        else:
            raise ValueError("typed contents for " + dt)
    for k, v in (params or {}).items():
        if isinstance(v, bool):
            req.parameters[k].bool_param = v
        else:
            req.parameters[k].int64_param = v
    for o in outputs or []:
        req.outputs.add(name=o)
    return req


def output_of(resp):
    out = resp.outputs[0]
    if resp.raw_output_contents:
        arr = np.frombuffer(resp.raw_output_contents[0], dtype="<f4")
    else:
        arr = np.array(out.contents.fp32_contents, dtype=np.float32)
    return arr.reshape(list(out.shape))


def sample(inputs, i):
    """Sample i of a batch of golden inputs (scalars stay scalars)."""
    out = {}
    for name, (dt, arr) in inputs.items():
        out[name] = (dt, arr[i:i + 1] if arr.ndim > 0 and arr.shape[0] > 1 else arr)
    return out


class ServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        serving = {"btb_geglu_cross": {"max_batch_size": 8, "max_queue_delay_microseconds": 20000},
                   "btb_self_only": {"max_batch_size": 4, "max_queue_delay_microseconds": 2000000,
                                     "max_queue_size": 2},
                   # Triton's priority levels (test_priority)
                   "attnblock_4heads": {
                       "priority_levels": 3, "default_priority_level": 2,
                       "default_queue_policy": {"default_timeout_microseconds": 30000000,
                                                "allow_timeout_override": True},
                       "priority_queue_policy": {
                           "1": {"timeout_action": "DELAY", "max_queue_size": 4},
                           "3": {"allow_timeout_override": False}}}}
        cls.repo = harness.make_repository(CASES, serving)
        # Entries that are no model directory: listed as unavailable, with reasons.
        os.symlink("loop", os.path.join(cls.repo, "loop"))
        os.symlink("/nonexistent/blockserve", os.path.join(cls.repo, "gone"))
        cls.server = harness.Server(BINARY, ["--model-repository", cls.repo,
                                             "--max-message-bytes", str(4 << 20),
                                             "--log-verbose", "1"])
        cls.channel = grpc.insecure_channel(cls.server.address, options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)])
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        harness.shutdown(cls.server, cls.repo)

    def assertStatus(self, code, fn, *args, contains=None, **kw):
        with self.assertRaises(grpc.RpcError) as cm:
            fn(*args, **kw)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        if contains:
            self.assertIn(contains, cm.exception.details())
        return cm.exception

    # -- server and model metadata ------------------------------------------
    def test_live_ready_metadata(self):
        self.assertTrue(self.stub.ServerLive(pb.ServerLiveRequest()).live)
        self.assertTrue(self.stub.ServerReady(pb.ServerReadyRequest()).ready)
        md = self.stub.ServerMetadata(pb.ServerMetadataRequest())
        self.assertEqual(md.name, "blockserve")
        self.assertIn("statistics", md.extensions)

    def test_model_ready_and_index(self):
        for case in CASES:
            self.assertTrue(self.stub.ModelReady(pb.ModelReadyRequest(name=case)).ready, case)
        self.assertFalse(self.stub.ModelReady(pb.ModelReadyRequest(name="broken")).ready)
        self.assertStatus(grpc.StatusCode.NOT_FOUND, self.stub.ModelReady,
                          pb.ModelReadyRequest(name="nope"), contains="nope")
        self.assertStatus(grpc.StatusCode.NOT_FOUND, self.stub.ModelReady,
                          pb.ModelReadyRequest(name=CASES[0], version="7"))
        idx = {m.name: m for m in self.stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        self.assertEqual(idx["broken"].state, "UNAVAILABLE")
        self.assertIn("num_attention_heads", idx["broken"].reason)
        # Reasons name files relative to the repository, not by the server's paths.
        self.assertTrue(idx["broken"].reason.startswith("broken/config.json: "),
                        idx["broken"].reason)
        self.assertEqual(idx["loop"].state, "UNAVAILABLE")
        self.assertIn("loop: cannot read: Too many levels of symbolic links", idx["loop"].reason)
        self.assertIn("gone: dangling symbolic link", idx["gone"].reason)
        for m in idx.values():
            self.assertNotIn(self.repo, m.reason)
        self.assertEqual(idx[CASES[0]].state, "READY")
        ready = self.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
        self.assertNotIn("broken", [m.name for m in ready])

    def test_model_metadata_and_config(self):
        md = self.stub.ModelMetadata(pb.ModelMetadataRequest(name="btb_geglu_cross"))
        ins = {t.name: t for t in md.inputs}
        self.assertEqual(list(ins["hidden_states"].shape), [-1, -1, 32])
        self.assertEqual(ins["hidden_states"].datatype, "FP32")
        self.assertEqual(list(ins["encoder_hidden_states"].shape), [-1, -1, 24])
        self.assertEqual(md.outputs[0].name, "output")
        self.assertEqual(list(md.versions), ["1"])
        md = self.stub.ModelMetadata(pb.ModelMetadataRequest(name="ada_group_norm_swish"))
        self.assertEqual(sorted(t.name for t in md.inputs), ["emb", "x"])
        md = self.stub.ModelMetadata(pb.ModelMetadataRequest(name="btb_ada_norm_zero_dit"))
        self.assertEqual({t.name: t.datatype for t in md.inputs}["timestep"], "INT64")
        cfg = self.stub.ModelConfig(pb.ModelConfigRequest(name="btb_geglu_cross")).config
        self.assertEqual(cfg.max_batch_size, 8)
        self.assertEqual(cfg.dynamic_batching.max_queue_delay_microseconds, 20000)
        self.assertEqual(cfg.input[0].name, "hidden_states")
        self.assertEqual(list(cfg.input[0].dims), [-1, 32])
        self.assertStatus(grpc.StatusCode.NOT_FOUND, self.stub.ModelConfig,
                          pb.ModelConfigRequest(name="nope"))
        self.assertStatus(grpc.StatusCode.UNAVAILABLE, self.stub.ModelMetadata,
                          pb.ModelMetadataRequest(name="broken"), contains="not ready")

    # -- inference ------------------------------------------------------------
    def check_case(self, case, raw=True):
        resp = self.stub.ModelInfer(infer_request(case, case_inputs(case), raw=raw, rid="r-" + case))
        self.assertEqual(resp.id, "r-" + case)
        self.assertEqual(resp.model_name, case)
        self.assertEqual(resp.outputs[0].datatype, "FP32")
        self.assertEqual(bool(resp.raw_output_contents), raw)
        got = output_of(resp)
        want = case_expected(case)
        self.assertEqual(got.shape, want.shape)
        self.assertLessEqual(float(np.max(np.abs(got - want))), TOL, case)

    def test_infer_every_case_raw(self):
        for case in CASES:
            with self.subTest(case=case):
                self.check_case(case, raw=True)

    def test_infer_typed_contents(self):
        for case in ["btb_geglu_cross", "btb_ada_norm_zero_dit", "btb_mask_bool",
                     "ada_group_norm_swish"]:
            with self.subTest(case=case):
                self.check_case(case, raw=False)

    def test_infer_bf16_input(self):
        inputs = case_inputs("btb_geglu_cross")
        import torch  # Debian's python3-torch converts to bfloat16
        bf = {}
        for name, (dt, arr) in inputs.items():
            t = torch.from_numpy(arr.copy()).to(torch.bfloat16)
            bf[name] = ("BF16", t.view(torch.int16).numpy().view(np.uint16))
        got = output_of(self.stub.ModelInfer(infer_request("btb_geglu_cross", bf)))
        self.assertLess(float(np.max(np.abs(got - case_expected("btb_geglu_cross")))), 0.1)

    def test_output_selection(self):
        inputs = case_inputs("btb_self_only")
        resp = self.stub.ModelInfer(infer_request("btb_self_only", inputs, outputs=["output"]))
        self.assertEqual(len(resp.outputs), 1)
        self.assertStatus(grpc.StatusCode.INVALID_ARGUMENT, self.stub.ModelInfer,
                          infer_request("btb_self_only", inputs, outputs=["nope"]), contains="nope")

    def test_infer_errors(self):
        inputs = case_inputs("btb_geglu_cross")
        bad = grpc.StatusCode.INVALID_ARGUMENT
        self.assertStatus(grpc.StatusCode.NOT_FOUND, self.stub.ModelInfer,
                          infer_request("nope", inputs), contains="nope")
        self.assertStatus(grpc.StatusCode.UNAVAILABLE, self.stub.ModelInfer,
                          infer_request("broken", inputs))
        self.assertStatus(bad, self.stub.ModelInfer, infer_request(
            "btb_geglu_cross", {"hidden_states": inputs["hidden_states"]}),
            contains="encoder_hidden_states")
        extra = dict(inputs, timestep=("I64", np.array([3], dtype=np.int64)))
        self.assertStatus(bad, self.stub.ModelInfer, infer_request("btb_geglu_cross", extra),
                          contains="timestep")
        wrong_shape = dict(inputs, hidden_states=("F32", np.zeros((2, 20, 31), np.float32)))
        self.assertStatus(bad, self.stub.ModelInfer, infer_request("btb_geglu_cross", wrong_shape),
                          contains="hidden_states")
        wrong_dtype = dict(inputs, hidden_states=("I64", np.zeros((2, 20, 32), np.int64)))
        self.assertStatus(bad, self.stub.ModelInfer, infer_request("btb_geglu_cross", wrong_dtype),
                          contains="hidden_states")
        req = infer_request("btb_geglu_cross", inputs)
        req.raw_input_contents[0] = req.raw_input_contents[0][:-4]
        self.assertStatus(bad, self.stub.ModelInfer, req, contains="hidden_states")
        req = infer_request("btb_geglu_cross", inputs)
        req.inputs[0].datatype = "FP64"
        self.assertStatus(bad, self.stub.ModelInfer, req, contains="FP64")
        # malformed protobuf bytes through a raw call
        raw_call = self.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        self.assertStatus(bad, raw_call, b"\xff\xff\xff\xff")
        # over the 4 MiB message limit this server runs with
        big = {"hidden_states": ("F32", np.zeros((2, 20000, 32), np.float32))}
        self.assertStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, self.stub.ModelInfer,
                          infer_request("btb_self_only", big))
        # and the server still serves
        self.check_case("btb_geglu_cross")

    def test_unknown_method_is_unimplemented(self):
        call = self.channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
        t0 = time.time()
        self.assertStatus(grpc.StatusCode.UNIMPLEMENTED, call, b"", timeout=5)
        self.assertLess(time.time() - t0, 2)

    # -- batching ---------------------------------------------------------------
    def test_concurrent_requests_batch_and_stay_separate(self):
        model = "btb_geglu_cross"
        base = case_inputs(model)
        rng = np.random.default_rng(7)
        reqs = []
        for i in range(16):
            inp = sample(base, i % 2)
            hs = inp["hidden_states"][1] + rng.standard_normal(inp["hidden_states"][1].shape).astype(np.float32)
            reqs.append(dict(inp, hidden_states=("F32", hs)))
        alone = [output_of(self.stub.ModelInfer(infer_request(model, r, rid=str(i))))
                 for i, r in enumerate(reqs)]
        before = self.stats(model)
        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            futs = [ex.submit(self.stub.ModelInfer, infer_request(model, r, rid=str(i)))
                    for i, r in enumerate(reqs)]
            resps = [f.result() for f in futs]
        after = self.stats(model)
        for i, resp in enumerate(resps):
            self.assertEqual(resp.id, str(i))
            self.assertLessEqual(float(np.max(np.abs(output_of(resp) - alone[i]))), 1e-5)
        requests = after.inference_stats.success.count - before.inference_stats.success.count
        executions = after.execution_count - before.execution_count
        self.assertEqual(requests, 16)
        self.assertLess(executions, requests, "no batching happened")
        self.assertTrue(any(b.batch_size > 1 for b in after.batch_stats))

    def test_ragged_batch_of_mixed_lengths(self):
        # Requests of different token and context lengths share packed
        # batches; each answer equals the request alone.
        model = "btb_geglu_cross"
        rng = np.random.default_rng(11)
        shapes = [(1, 1), (5, 7), (20, 7), (37, 12), (20, 3), (9, 1)] * 2
        reqs = [{"hidden_states": ("F32", rng.standard_normal((1, l, 32)).astype(np.float32)),
                 "encoder_hidden_states": ("F32", rng.standard_normal((1, lk, 24)).astype(np.float32))}
                for l, lk in shapes]
        alone = [output_of(self.stub.ModelInfer(infer_request(model, r))) for r in reqs]
        before = self.stats(model)
        with concurrent.futures.ThreadPoolExecutor(len(reqs)) as ex:
            futs = [ex.submit(self.stub.ModelInfer, infer_request(model, r)) for r in reqs]
            resps = [f.result() for f in futs]
        after = self.stats(model)
        for i, resp in enumerate(resps):
            got = output_of(resp)
            self.assertEqual(got.shape, (1, shapes[i][0], 32))
            self.assertLessEqual(float(np.max(np.abs(got - alone[i]))), 1e-5)
        executions = after.execution_count - before.execution_count
        self.assertLess(executions, len(reqs), "no ragged batching happened")
        self.assertTrue(any(b.batch_size > 1 for b in after.batch_stats))
        cfg = self.stub.ModelConfig(pb.ModelConfigRequest(name=model)).config
        ragged = {i.name: i.allow_ragged_batch for i in cfg.input}
        self.assertTrue(ragged["hidden_states"])
        self.assertTrue(ragged["encoder_hidden_states"])

    def stats(self, model):
        return self.stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]

    def test_statistics(self):
        self.check_case("attnblock_4heads")
        st = self.stats("attnblock_4heads")
        self.assertGreaterEqual(st.inference_count, 2)
        self.assertGreaterEqual(st.execution_count, 1)
        self.assertGreater(st.inference_stats.compute_infer.ns, 0)
        self.assertGreater(st.last_inference, 0)
        every = self.stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats
        self.assertEqual(len(every), len(CASES))

    def test_queue_full_and_deadline(self):
        # btb_self_only waits up to 2 s for a batch of 4 and queues at most 2.
        inputs = sample(case_inputs("btb_self_only"), 0)
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            futs = [ex.submit(self.stub.ModelInfer, infer_request("btb_self_only", inputs))
                    for _ in range(2)]
            time.sleep(0.3)
            self.assertStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, self.stub.ModelInfer,
                              infer_request("btb_self_only", inputs), contains="queue")
            for f in futs:
                f.result()
        t0 = time.time()
        self.assertStatus(grpc.StatusCode.DEADLINE_EXCEEDED, self.stub.ModelInfer,
                          infer_request("btb_self_only", inputs, params={"timeout": 100000}))
        self.assertLess(time.time() - t0, 1.5)
        # a client deadline too
        self.assertStatus(grpc.StatusCode.DEADLINE_EXCEEDED, self.stub.ModelInfer,
                          infer_request("btb_self_only", inputs), timeout=0.2)

    # -- priority levels --------------------------------------------------------
    def priority_counts(self, model):
        """blockserve_inference_requests_total by priority label."""
        url = "http://127.0.0.1:%d/metrics" % self.server.metrics_port
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        pat = r'^blockserve_inference_requests_total\{model="%s",version="1",priority="(\d+)"\} (\d+)$'
        return {int(m.group(1)): int(m.group(2))
                for m in re.finditer(pat % re.escape(model), text, re.M)}

    def test_priority(self):
        model = "attnblock_4heads"
        db = self.stub.ModelConfig(pb.ModelConfigRequest(name=model)).config.dynamic_batching
        self.assertEqual((db.priority_levels, db.default_priority_level), (3, 2))
        self.assertEqual(db.default_queue_policy.default_timeout_microseconds, 30000000)
        self.assertTrue(db.default_queue_policy.allow_timeout_override)
        self.assertEqual(db.default_queue_policy.max_queue_size, 256)  # --max-queue-size
        self.assertEqual(sorted(db.priority_queue_policy.keys()), [1, 3])
        one = db.priority_queue_policy[1]  # its entry over the default policy
        self.assertEqual(one.timeout_action, mc.ModelQueuePolicy.DELAY)
        self.assertEqual((one.max_queue_size, one.default_timeout_microseconds), (4, 30000000))
        self.assertFalse(db.priority_queue_policy[3].allow_timeout_override)
        # a model without levels reports none
        other = self.stub.ModelConfig(pb.ModelConfigRequest(name="btb_geglu_cross")).config
        self.assertEqual(other.dynamic_batching.priority_levels, 0)
        self.assertEqual(len(other.dynamic_batching.priority_queue_policy), 0)

        inputs = case_inputs(model)
        want = case_expected(model)
        before = self.priority_counts(model)
        self.assertEqual(sorted(before), [1, 2, 3])
        # uint64_param (Triton's type) and int64_param (what tritonclient sends);
        # 0 and numbers above the levels mean the default level, 2 (Triton)
        sent = []
        for kind, value, level in (("uint64", 1, 1), ("int64", 3, 3), ("int64", 0, 2),
                                   ("uint64", 99, 2), ("int64", 1, 1)):
            req = infer_request(model, inputs)
            setattr(req.parameters["priority"], kind + "_param", value)
            got = output_of(self.stub.ModelInfer(req))
            self.assertLessEqual(float(np.max(np.abs(got - want))), TOL)
            sent.append(level)
        after = self.priority_counts(model)
        for level in (1, 2, 3):
            self.assertEqual(after[level] - before[level], sent.count(level), level)
        # a negative priority or another type: INVALID_ARGUMENT
        self.assertStatus(grpc.StatusCode.INVALID_ARGUMENT, self.stub.ModelInfer,
                          infer_request(model, inputs, params={"priority": -1}),
                          contains="'priority'")
        req = infer_request(model, inputs)
        req.parameters["priority"].string_param = "1"
        self.assertStatus(grpc.StatusCode.INVALID_ARGUMENT, self.stub.ModelInfer, req,
                          contains="uint64_param")
        # models without levels count every request at level 0
        self.assertEqual(sorted(self.priority_counts("btb_geglu_cross")), [0])

    # -- streaming --------------------------------------------------------------
    def test_stream_interleaved_with_errors(self):
        reqs = []
        for i in range(12):
            case = CASES[i % 4]
            reqs.append(infer_request(case, case_inputs(case), rid="s%d" % i))
        reqs.insert(5, infer_request("nope", case_inputs(CASES[0]), rid="bad"))
        got = {}
        for r in self.stub.ModelStreamInfer(iter(reqs)):
            got[r.infer_response.id] = r
        self.assertEqual(len(got), 13)
        self.assertIn("nope", got["bad"].error_message)
        for i in range(12):
            r = got["s%d" % i]
            self.assertEqual(r.error_message, "")
            want = case_expected(CASES[i % 4])
            self.assertLessEqual(float(np.max(np.abs(output_of(r.infer_response) - want))), TOL)

    def test_stream_intermediate(self):
        req = infer_request("btb_stack3", case_inputs("btb_stack3"), rid="st",
                            params={"stream_intermediate": True})
        resps = list(self.stub.ModelStreamInfer(iter([req])))
        self.assertEqual(len(resps), 3)
        finals = [r.infer_response.parameters["triton_final_response"].bool_param for r in resps]
        self.assertEqual(finals, [False, False, True])
        last = output_of(resps[-1].infer_response)
        self.assertLessEqual(float(np.max(np.abs(last - case_expected("btb_stack3")))), TOL)
        first = output_of(resps[0].infer_response)
        self.assertGreater(float(np.max(np.abs(first - last))), 1e-3)
        # unary calls cannot stream
        self.assertStatus(grpc.StatusCode.INVALID_ARGUMENT, self.stub.ModelInfer, req)

    def test_cancelled_call_does_not_disturb(self):
        fut = self.stub.ModelInfer.future(infer_request("btb_self_only",
                                                        sample(case_inputs("btb_self_only"), 0)))
        time.sleep(0.1)
        fut.cancel()
        self.check_case("btb_geglu_cross")

    # -- health and reflection ----------------------------------------------------
    def test_health(self):
        h = health_pb2_grpc.HealthStub(self.channel)
        SERVING = health_pb2.HealthCheckResponse.SERVING
        self.assertEqual(h.Check(health_pb2.HealthCheckRequest(service="")).status, SERVING)
        self.assertEqual(h.Check(health_pb2.HealthCheckRequest(
            service="inference.GRPCInferenceService")).status, SERVING)
        self.assertStatus(grpc.StatusCode.NOT_FOUND, h.Check,
                          health_pb2.HealthCheckRequest(service="nope"))
        watch = h.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        self.assertEqual(next(watch).status, SERVING)
        watch.cancel()

    def test_reflection(self):
        for mod, grpc_mod in ((refl_a, refl_a_grpc), (refl_1, refl_1_grpc)):
            stub = grpc_mod.ServerReflectionStub(self.channel)
            reqs = [mod.ServerReflectionRequest(list_services=""),
                    mod.ServerReflectionRequest(
                        file_containing_symbol="inference.GRPCInferenceService.ModelInfer"),
                    mod.ServerReflectionRequest(file_containing_symbol="inference.Nope")]
            resps = list(stub.ServerReflectionInfo(iter(reqs)))
            names = [s.name for s in resps[0].list_services_response.service]
            self.assertIn("inference.GRPCInferenceService", names)
            self.assertIn("grpc.health.v1.Health", names)
            from google.protobuf import descriptor_pb2
            files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                     for b in resps[1].file_descriptor_response.file_descriptor_proto]
            self.assertIn("grpc_service.proto", [f.name for f in files])
            self.assertIn("model_config.proto", [f.name for f in files])
            self.assertEqual(resps[2].error_response.error_code, grpc.StatusCode.NOT_FOUND.value[0])
            # host is echoed in valid_host: a long one is refused, not doubled.
            reqs = [mod.ServerReflectionRequest(host="h" * 255, list_services=""),
                    mod.ServerReflectionRequest(host="h" * (1 << 20), list_services="")]
            resps = list(stub.ServerReflectionInfo(iter(reqs)))
            self.assertEqual(resps[0].valid_host, "h" * 255)
            self.assertEqual(resps[1].error_response.error_code,
                             grpc.StatusCode.INVALID_ARGUMENT.value[0])
            self.assertEqual(resps[1].error_response.error_message,
                             "host is longer than 255 bytes")
            self.assertEqual(resps[1].valid_host, "")
            self.assertLess(resps[1].ByteSize(), 100)


class ShutdownTest(unittest.TestCase):
    def test_sigterm_finishes_queued_work(self):
        repo = harness.make_repository(["btb_self_only"], {"btb_self_only": {
            "max_batch_size": 8, "max_queue_delay_microseconds": 500000}}, broken=False)
        server = harness.Server(BINARY, ["--model-repository", repo, "--grace-seconds", "20"])
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        inputs = sample(case_inputs("btb_self_only"), 0)
        futs = [stub.ModelInfer.future(infer_request("btb_self_only", inputs)) for _ in range(3)]
        time.sleep(0.2)
        server.proc.send_signal(15)
        for f in futs:
            self.assertEqual(len(f.result(timeout=30).outputs), 1)
        self.assertEqual(server.proc.wait(30), 0, server.text())
        channel.close()
        shutil.rmtree(repo, ignore_errors=True)


class BuiltinModelsTest(unittest.TestCase):
    def test_builtin_models_serve(self):
        server = harness.Server(BINARY, [])
        try:
            channel = grpc.insecure_channel(server.address)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            names = [m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models]
            for n in ["sd15_down0_block", "dit_xl_block", "dit_xl_trunk", "vae_mid_attention"]:
                self.assertIn(n, names)
                self.assertTrue(stub.ModelReady(pb.ModelReadyRequest(name=n)).ready)
            hs = np.random.default_rng(1).standard_normal((1, 512, 8, 8)).astype(np.float32)
            resp = stub.ModelInfer(infer_request("vae_mid_attention", {"hidden_states": ("F32", hs)}))
            self.assertEqual(list(resp.outputs[0].shape), [1, 512, 8, 8])
            self.assertTrue(np.all(np.isfinite(output_of(resp))))
            channel.close()
        finally:
            self.assertEqual(server.stop(), 0)


if __name__ == "__main__":
    BINARY = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
