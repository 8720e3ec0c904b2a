"""End-to-end tests of model control and versions over gRPC:

- explicit mode: --load-model, models left unloaded, RepositoryModelLoad /
  Unload, unknown models and bad names, Triton's load parameters;
- load, unload and reload under a steady stream of requests from several
  threads with no failed request (a request may fail only with NOT_FOUND,
  and only if it was sent after the unload and before the load back);
- a reload that changes the weights: answers switch from the old outputs
  to the new ones and never mix within one answer;
- a failed reload keeps the old model serving and says why;
- poll mode picks up a new model folder, a new version folder and a
  removed folder, and refuses explicit control;
- version folders and Triton's version policies (latest N, all,
  specific), per-version readiness, metadata, statistics and metrics;
- none mode refuses load and unload; built-in models unload and load back.

    /usr/bin/python3 tests/e2e/test_model_control.py BLOCKSERVE_BINARY
"""

import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import unittest

import numpy as np

import harness
import test_server as common  # generates the stubs; its tests are not collected here
import test_metrics  # parse_metrics, get

import grpc  # noqa: E402

pb = common.pb
pb_grpc = common.pb_grpc
BINARY = None
CASE = "approximate_gelu"  # [2, 7, 16] -> [2, 7, 24], one linear layer: fast
CASE2 = "gelu_tanh"
INPUTS = common.case_inputs(CASE)
TOL = 1e-4


def st_save(path, tensors):
    """{name: (st dtype, array)} -> safetensors file."""
    header, blobs, off = {}, [], 0
    for name, (dt, arr) in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    os.replace(path + ".tmp", path)


def scale_weights(model_dir, factor):
    """Multiply every F32 weight of model_dir by factor (in place, atomically)."""
    path = os.path.join(model_dir, "diffusion_pytorch_model.safetensors")
    t = harness.st_load(path)
    st_save(path, {k: (dt, a * np.float32(factor) if dt == "F32" else a)
                   for k, (dt, a) in t.items()})


def copy_case(dst, case=CASE):
    shutil.copytree(os.path.join(harness.GOLDEN, case), dst)


def versioned(root, name, versions, policy=None, case=CASE):
    """A model folder with version folders (version v's weights x v)."""
    d = os.path.join(root, name)
    os.makedirs(d)
    for v in versions:
        copy_case(os.path.join(d, str(v)), case)
        scale_weights(os.path.join(d, str(v)), v)
    if policy is not None:
        with open(os.path.join(d, "serving.json"), "w") as f:
            json.dump({"version_policy": policy}, f)
    return d


class Base(unittest.TestCase):
    server = None

    @classmethod
    def start(cls, args):
        cls.server = harness.Server(BINARY, args)
        cls.channel = grpc.insecure_channel(cls.server.address)
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        harness.shutdown(cls.server, *getattr(cls, "dirs", []))

    def infer(self, model, version="", stub=None):
        req = common.infer_request(model, INPUTS)
        req.model_version = version
        return common.output_of((stub or self.stub).ModelInfer(req, timeout=30))

    def status(self, fn, *args, **kw):
        """(status code, details) of a call expected to fail."""
        with self.assertRaises(grpc.RpcError) as cm:
            fn(*args, timeout=60, **kw)
        return cm.exception.code(), cm.exception.details()

    def load(self, name, **params):
        req = pb.RepositoryModelLoadRequest(model_name=name)
        for k, v in params.items():
            req.parameters[k].string_param = v
        return self.stub.RepositoryModelLoad(req, timeout=120)

    def unload(self, name):
        return self.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name),
                                               timeout=120)

    def index(self):
        idx = self.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        return {(m.name, m.version): (m.state, m.reason) for m in idx.models}

    def ready(self, name, version=""):
        return self.stub.ModelReady(pb.ModelReadyRequest(name=name, version=version),
                                    timeout=10).ready

    def wait_for(self, cond, what, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if cond():
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        self.fail("timed out waiting for " + what + "\n" + self.server.text()[-3000:])


class Stream:
    """Threads sending requests to model until stopped; each result is
    (sent, answered, status code or None, output or None)."""

    def __init__(self, address, model, threads=4):
        self.results, self.lock, self.stop_flag = [], threading.Lock(), False
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.req = common.infer_request(model, INPUTS)
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def run(self):
        while not self.stop_flag:
            sent = time.time()
            try:
                out = common.output_of(self.stub.ModelInfer(self.req, timeout=60))
                r = (sent, time.time(), None, out, "")
            except grpc.RpcError as e:
                r = (sent, time.time(), e.code(), None, e.details())
            with self.lock:
                self.results.append(r)

    def stop(self):
        self.stop_flag = True
        for t in self.threads:
            t.join()
        self.channel.close()
        return self.results


class ExplicitTest(Base):
    @classmethod
    def setUpClass(cls):
        root = tempfile.mkdtemp(prefix="bs_ctl_")
        for name in ("gelu", "churn", "flip", "other", "idle"):
            copy_case(os.path.join(root, name))
        os.makedirs(os.path.join(root, "broken"))
        with open(os.path.join(root, "broken", "config.json"), "w") as f:
            f.write('{"_class_name": "BasicTransformerBlock", "dim": 32}')
        cls.root, cls.dirs = root, [root]
        cls.start(["--model-repository", root, "--model-control-mode", "explicit",
                   "--load-model", "gelu", "--load-model", "churn", "--load-model", "flip",
                   "--max-queue-delay-us", "500"])

    def test_start_loads_what_load_model_names(self):
        idx = self.index()
        self.assertEqual(idx[("gelu", "1")], ("READY", ""))
        self.assertEqual(idx[("idle", "")], ("UNAVAILABLE", "unloaded"))  # no test loads it
        self.assertFalse(self.ready("idle"))
        code, msg = self.status(self.stub.ModelInfer, common.infer_request("idle", INPUTS))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND, msg)
        self.assertIn("unloaded", msg)

    def test_load_errors(self):
        code, msg = self.status(self.stub.RepositoryModelLoad,
                                pb.RepositoryModelLoadRequest(model_name="nope"))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND, msg)
        self.assertIn('no model "nope" in the model repository folders', msg)
        code, msg = self.status(self.stub.RepositoryModelLoad,
                                pb.RepositoryModelLoadRequest(model_name="../etc"))
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, msg)
        code, msg = self.status(self.stub.RepositoryModelUnload,
                                pb.RepositoryModelUnloadRequest(model_name="nope"))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND, msg)
        req = pb.RepositoryModelLoadRequest(model_name="other")
        req.parameters["config"].string_param = "{}"
        code, msg = self.status(self.stub.RepositoryModelLoad, req)
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, msg)
        self.assertIn('"config"', msg)
        req = pb.RepositoryModelLoadRequest(model_name="other")
        req.parameters["file:1/model.bin"].bytes_param = b"x"
        code, msg = self.status(self.stub.RepositoryModelLoad, req)
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, msg)
        self.assertIn('"file:', msg)
        # a model that cannot load: the index says why
        code, msg = self.status(self.stub.RepositoryModelLoad,
                                pb.RepositoryModelLoadRequest(model_name="broken"))
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, msg)
        self.assertIn("broken/config.json: ", msg)
        self.assertNotIn(self.root, msg)
        state, reason = self.index()[("broken", "1")]
        self.assertEqual(state, "UNAVAILABLE")
        self.assertIn("broken/config.json: ", reason)

    def test_load_unknown_parameter_ignored_then_unload(self):
        self.load("other", some_key="x")
        self.assertTrue(self.ready("other"))
        out = self.infer("other")
        self.assertEqual(out.shape, (2, 7, 24))
        self.unload("other")
        self.assertFalse(self.ready("other"))
        self.assertEqual(self.index()[("other", "1")], ("UNAVAILABLE", "unloaded"))

    def test_unload_and_load_under_stream(self):
        expected = self.infer("churn")
        stream = Stream(self.server.address, "churn")
        time.sleep(0.5)
        t_unload = time.time()
        self.unload("churn")
        t_unloaded = time.time()
        time.sleep(0.5)
        t_load = time.time()
        self.load("churn")
        t_loaded = time.time()
        time.sleep(0.5)
        results = stream.stop()
        ok = [r for r in results if r[2] is None]
        bad = [r for r in results if r[2] is not None]
        print("\n  unload/load under 4 threads: %d answers, %d NOT_FOUND while unloaded"
              % (len(ok), len(bad)))
        for sent, answered, code, _, msg in bad:
            self.assertEqual(code, grpc.StatusCode.NOT_FOUND, msg)
            # answered (not sent) after: a request sent just before the unload
            # may reach the server after it
            self.assertGreaterEqual(answered, t_unload, "failed before the unload was sent")
            self.assertLess(sent, t_loaded, "failed after the load back was acknowledged")
        for r in ok:
            self.assertLess(float(np.max(np.abs(r[3] - expected))), TOL)
        self.assertTrue(any(r[0] > t_loaded for r in ok), "no answer after the load back")
        self.assertTrue(any(r[1] < t_unload for r in ok), "no answer before the unload")
        # while unloaded, requests do fail (the stream ran through that time)
        self.assertTrue(any(t_unloaded < r[0] < t_load for r in bad), "unload had no effect")

    def test_reload_switches_weights(self):
        old = self.infer("gelu")
        stream = Stream(self.server.address, "gelu")
        time.sleep(0.5)
        scale_weights(os.path.join(self.root, "gelu"), 2.0)
        t_load = time.time()
        self.load("gelu")
        t_loaded = time.time()
        time.sleep(0.5)
        results = stream.stop()
        new = self.infer("gelu")
        self.assertGreater(float(np.max(np.abs(new - old))), 0.1)  # the weights changed
        n_old = n_new = 0
        for sent, answered, code, out, msg in results:
            self.assertIsNone(code, "a request failed during the reload: %s" % msg)
            is_old = float(np.max(np.abs(out - old))) < TOL
            is_new = float(np.max(np.abs(out - new))) < TOL
            self.assertTrue(is_old or is_new, "an answer mixes old and new weights")
            if is_new:
                self.assertGreaterEqual(answered, t_load)
                n_new += 1
            else:
                self.assertLess(sent, t_loaded, "old weights after the reload's answer")
                n_old += 1
        print("\n  reload under 4 threads: %d old answers, %d new, 0 failed" % (n_old, n_new))
        self.assertGreater(n_old, 0)
        self.assertGreater(n_new, 0)

    def test_failed_reload_keeps_old(self):
        before = self.infer("flip")
        cfg = os.path.join(self.root, "flip", "config.json")
        with open(cfg) as f:
            good = f.read()
        with open(cfg, "w") as f:
            f.write('{"_class_name": "ApproximateGELU", "dim_in": 16}')
        try:
            code, msg = self.status(self.stub.RepositoryModelLoad,
                                    pb.RepositoryModelLoadRequest(model_name="flip"))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, msg)
            self.assertIn('failed to load model "flip": flip/config.json: ', msg)
            self.assertNotIn(self.root, msg)
            self.assertTrue(self.ready("flip"))
            self.assertEqual(self.index()[("flip", "1")], ("READY", ""))
            np.testing.assert_array_equal(self.infer("flip"), before)
        finally:
            with open(cfg, "w") as f:
                f.write(good)
        self.load("flip")
        np.testing.assert_array_equal(self.infer("flip"), before)


class PollTest(Base):
    @classmethod
    def setUpClass(cls):
        root = tempfile.mkdtemp(prefix="bs_poll_")
        copy_case(os.path.join(root, "a"))
        cls.root, cls.dirs = root, [root]
        cls.start(["--model-repository", root, "--model-control-mode", "poll",
                   "--repository-poll-secs", "1"])

    def add(self, rel, build):
        """Build a folder beside the repository, then move it in at once."""
        tmp = tempfile.mkdtemp(prefix="bs_poll_new_")
        shutil.rmtree(tmp)
        build(tmp)
        os.rename(tmp, os.path.join(self.root, rel))

    def test_poll_follows_the_folders(self):
        code, msg = self.status(self.stub.RepositoryModelLoad,
                                pb.RepositoryModelLoadRequest(model_name="a"))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, msg)
        self.assertIn("--model-control-mode poll", msg)
        # a new model folder
        self.add("b", lambda d: copy_case(d, CASE2))
        self.wait_for(lambda: self.ready("b"), "the added model b")
        self.assertEqual(self.infer("b").shape, (2, 7, 24))
        # a versioned model, then a new version folder (latest 1: 2 replaces 1)
        self.add("v", lambda d: versioned(os.path.dirname(d), os.path.basename(d), [1]))
        self.wait_for(lambda: self.ready("v", "1"), "model v version 1")
        v1 = self.infer("v")
        self.add("v/2", lambda d: (copy_case(d), scale_weights(d, 2)))
        self.wait_for(lambda: self.ready("v", "2"), "model v version 2")
        md = self.stub.ModelMetadata(pb.ModelMetadataRequest(name="v"), timeout=10)
        self.assertEqual(list(md.versions), ["2"])
        self.assertGreater(float(np.max(np.abs(self.infer("v") - v1))), 0.1)
        code, msg = self.status(self.stub.ModelInfer, self.versioned_request("v", "1"))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND, msg)
        # a changed weights file reloads
        old_a = self.infer("a")
        scale_weights(os.path.join(self.root, "a"), 3)
        self.wait_for(lambda: float(np.max(np.abs(self.infer("a") - old_a))) > 0.1,
                      "the reload of a's changed weights")
        # a removed folder unloads
        shutil.rmtree(os.path.join(self.root, "b"))
        self.wait_for(lambda: not self.ready("b"), "the removed model b to unload")
        code, msg = self.status(self.stub.ModelInfer, common.infer_request("b", INPUTS))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND, msg)
        self.assertEqual(self.index()[("b", "1")], ("UNAVAILABLE", "unloaded"))

    def versioned_request(self, model, version):
        req = common.infer_request(model, INPUTS)
        req.model_version = version
        return req


class VersionTest(Base):
    @classmethod
    def setUpClass(cls):
        root = tempfile.mkdtemp(prefix="bs_versions_")
        versioned(root, "latest1", [1, 2])
        versioned(root, "latest2", [1, 2, 3], {"latest": {"num_versions": 2}})
        versioned(root, "all", [1, 2], {"all": {}})
        versioned(root, "specific", [1, 2, 3], {"specific": {"versions": [1, 3]}})
        versioned(root, "badpolicy", [1], {"latest": {"num_versions": "two"}})
        cls.root, cls.dirs = root, [root]
        cls.start(["--model-repository", root])  # none mode: the default

    def served(self, name):
        return list(self.stub.ModelMetadata(pb.ModelMetadataRequest(name=name),
                                            timeout=10).versions)

    def test_policies(self):
        self.assertEqual(self.served("latest1"), ["2"])
        self.assertEqual(self.served("latest2"), ["2", "3"])
        self.assertEqual(self.served("all"), ["1", "2"])
        self.assertEqual(self.served("specific"), ["1", "3"])
        idx = self.index()
        self.assertEqual(idx[("specific", "3")], ("READY", ""))
        self.assertNotIn(("specific", "2"), idx)
        state, reason = idx[("badpolicy", "1")]
        self.assertEqual(state, "UNAVAILABLE")
        self.assertIn("badpolicy/serving.json: version_policy.latest.num_versions", reason)

    def test_requests_by_version(self):
        base = self.infer("all", "1")
        np.testing.assert_allclose(self.infer("all", "2"), self.infer("all"), rtol=0, atol=0)
        self.assertGreater(float(np.max(np.abs(self.infer("all") - base))), 0.1)
        self.assertTrue(self.ready("specific", "1"))
        code, msg = self.status(self.stub.ModelReady, pb.ModelReadyRequest(name="specific",
                                                                            version="2"))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND, msg)
        req = common.infer_request("latest1", INPUTS)
        req.model_version = "1"
        code, msg = self.status(self.stub.ModelInfer, req)
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND, msg)
        self.assertIn('model "latest1" has no version "1" (versions served: 2)', msg)
        cfg = self.stub.ModelConfig(pb.ModelConfigRequest(name="all", version="1"), timeout=10)
        self.assertEqual(cfg.config.name, "all")

    def test_statistics_and_metrics_by_version(self):
        for _ in range(2):
            self.infer("latest2", "2")
        self.infer("latest2")
        st = self.stub.ModelStatistics(pb.ModelStatisticsRequest(name="latest2"), timeout=10)
        counts = {s.version: s.inference_count for s in st.model_stats}
        self.assertEqual(counts, {"2": 4, "3": 2})  # 2 samples a request
        st = self.stub.ModelStatistics(pb.ModelStatisticsRequest(name="latest2", version="3"),
                                       timeout=10)
        self.assertEqual([s.version for s in st.model_stats], ["3"])
        _, _, text = test_metrics.get(self.server.metrics_port)
        samples, _ = test_metrics.parse_metrics(text)
        key = ("nv_inference_request_success",
               frozenset({"model": "latest2", "version": "2"}.items()))
        self.assertEqual(samples[key], 2)

    def test_none_mode_refuses_control(self):
        for call, req in ((self.stub.RepositoryModelLoad,
                           pb.RepositoryModelLoadRequest(model_name="all")),
                          (self.stub.RepositoryModelUnload,
                           pb.RepositoryModelUnloadRequest(model_name="all"))):
            code, msg = self.status(call, req)
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, msg)
            self.assertIn("model control is disabled (--model-control-mode none)", msg)
        self.assertTrue(self.ready("all"))


class BuiltinTest(Base):
    @classmethod
    def setUpClass(cls):
        cls.start(["--model-control-mode", "explicit", "--load-model", "vae_mid_attention"])

    def test_unload_and_load_builtin(self):
        self.assertTrue(self.ready("vae_mid_attention"))
        self.assertFalse(self.ready("dit_xl_block"))
        self.unload("vae_mid_attention")
        self.assertFalse(self.ready("vae_mid_attention"))
        self.load("vae_mid_attention")
        self.assertTrue(self.ready("vae_mid_attention"))
        code, msg = self.status(self.stub.RepositoryModelLoad,
                                pb.RepositoryModelLoadRequest(model_name="no_such_builtin"))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND, msg)


if __name__ == "__main__":
    BINARY = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
