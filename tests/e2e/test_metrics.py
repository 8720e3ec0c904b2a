"""End-to-end tests of the Prometheus metrics endpoint (--metrics-port): exact
counter values after successful and failing requests, inferences versus
executions under batching, the batch-size histogram, the queue-size gauge,
the text format itself, and the HTTP surface (404, 405, --no-metrics, a busy
port).

    /usr/bin/python3 tests/e2e/test_metrics.py BLOCKSERVE_BINARY
"""

import concurrent.futures
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import unittest
import urllib.error
import urllib.request

import numpy as np

import harness
import test_server as common  # generates the stubs; its tests are not collected here

import grpc  # noqa: E402

pb = common.pb
pb_grpc = common.pb_grpc
BINARY = None
SLOW = 10000000  # a queue delay (us) no test waits for: batches leave when full

SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse_metrics(text):
    """Prometheus text format -> ({(name, frozenset(labels)): value}, {family: type}).
    Checks that every sample follows its family's # HELP and # TYPE lines."""
    samples, types, helps = {}, {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split(" ", 3)[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if name not in helps:
                raise AssertionError("# TYPE before # HELP for " + name)
            types[name] = kind
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            raise AssertionError("not a sample line: %r" % line)
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        if family not in types or family not in helps:
            raise AssertionError("sample without # HELP/# TYPE: %r" % line)
        parsed = LABEL_RE.findall(labels)
        if ",".join('%s="%s"' % kv for kv in parsed) != labels:
            raise AssertionError("bad labels: %r" % line)
        key = (name, frozenset(parsed))
        if key in samples:
            raise AssertionError("duplicate series: %r" % line)
        samples[key] = float(value)
    return samples, types


def get(port, path="/metrics", method="GET"):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


class MetricsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        serving = {
            # batches leave only when full: executions are exact
            "btb_self_only": {"max_batch_size": 4, "max_queue_delay_microseconds": SLOW,
                              "max_queue_size": 16},
            # one request may wait; the next is rejected
            "btb_geglu_cross": {"max_batch_size": 4, "max_queue_delay_microseconds": SLOW,
                                "max_queue_size": 1},
        }
        cls.repo = harness.make_repository(["btb_self_only", "btb_geglu_cross",
                                            "attnblock_4heads"], serving)
        cls.server = harness.Server(BINARY, ["--model-repository", cls.repo])
        cls.channel = grpc.insecure_channel(cls.server.address)
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        harness.shutdown(cls.server, cls.repo)

    def scrape(self):
        status, headers, body = get(self.server.metrics_port)
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/plain; version=0.0.4"))
        return parse_metrics(body)[0]

    def value(self, samples, name, model, **labels):
        key = (name, frozenset(dict(labels, model=model, version="1").items()))
        self.assertIn(key, samples, "%s %s" % (name, labels))
        return samples[key]

    def counts(self, model):
        """The per-model numbers the tests compare exactly."""
        s = self.scrape()
        out = {"success": self.value(s, "nv_inference_request_success", model),
               "inferences": self.value(s, "nv_inference_count", model),
               "executions": self.value(s, "nv_inference_exec_count", model),
               "pending": self.value(s, "nv_inference_pending_request_count", model)}
        for r in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
            out[r] = self.value(s, "nv_inference_request_failure", model, reason=r)
        for d in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
            out[d] = self.value(s, "nv_inference_%s_duration_us" % d, model)
        bounds = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, "+Inf"]
        out["buckets"] = [self.value(s, "blockserve_batch_size_bucket", model, le=str(b))
                          for b in bounds]
        out["hist_sum"] = self.value(s, "blockserve_batch_size_sum", model)
        out["hist_count"] = self.value(s, "blockserve_batch_size_count", model)
        return out

    def wait_for(self, model, key, want, timeout=20):
        deadline = time.time() + timeout
        while True:
            c = self.counts(model)
            if c[key] == want or time.time() > deadline:
                self.assertEqual(c[key], want, "%s %s" % (model, key))
                return c
            time.sleep(0.05)

    def assertHistogramConsistent(self, c):
        b = c["buckets"]
        self.assertEqual(b, sorted(b), "cumulative buckets")
        self.assertEqual(b[-1], c["hist_count"])
        self.assertEqual(c["hist_count"], c["executions"])
        self.assertEqual(c["hist_sum"], c["inferences"])

    # -- exact counts ------------------------------------------------------------
    def test_batching_counts_inferences_and_executions(self):
        model = "btb_self_only"
        inputs = common.case_inputs(model)
        one = common.sample(inputs, 0)
        self.assertEqual(self.counts(model)["success"], 0)
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            futs = [ex.submit(self.stub.ModelInfer, common.infer_request(model, one))
                    for _ in range(8)]
            for f in futs:
                self.assertEqual(list(f.result(timeout=60).outputs[0].shape), [1, 20, 32])
        c = self.counts(model)
        # eight requests of one sample, in two full batches of four
        self.assertEqual((c["success"], c["inferences"], c["executions"]), (8, 8, 2))
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(self.stub.ModelInfer, common.infer_request(model, inputs))
                    for _ in range(2)]
            for f in futs:
                self.assertEqual(list(f.result(timeout=60).outputs[0].shape), [2, 20, 32])
        c = self.counts(model)
        # two requests of two samples: one batch of four
        self.assertEqual((c["success"], c["inferences"], c["executions"]), (10, 12, 3))
        self.assertEqual(c["buckets"], [0, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
        self.assertHistogramConsistent(c)
        self.assertEqual([c[r] for r in ("REJECTED", "CANCELED", "BACKEND", "OTHER")],
                         [0, 0, 0, 0])
        self.assertEqual(c["pending"], 0)
        self.assertGreater(c["compute_infer"], 0)
        self.assertGreater(c["queue"], 0)
        parts = c["queue"] + c["compute_input"] + c["compute_infer"] + c["compute_output"]
        self.assertGreaterEqual(c["request"], parts)
        # agrees with the KServe statistics extension
        st = self.stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]
        self.assertEqual((st.inference_count, st.execution_count), (12, 3))

    def test_failures_by_reason_and_queue_gauge(self):
        model = "btb_geglu_cross"
        inputs = common.case_inputs(model)
        one = common.sample(inputs, 0)
        # a request waits in the queue (the batch never fills): the gauge shows it
        fut = self.stub.ModelInfer.future(common.infer_request(model, one))
        self.wait_for(model, "pending", 1)
        # the queue holds one: the next is rejected
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.ModelInfer(common.infer_request(model, one))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(self.counts(model)["REJECTED"], 1)
        # the client cancels the waiting one
        fut.cancel()
        c = self.wait_for(model, "CANCELED", 1)
        self.assertEqual(c["pending"], 0)
        # its deadline passes in the queue: rejected too (as Triton counts timeouts)
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.ModelInfer(common.infer_request(model, one, params={"timeout": 100000}))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        # invalid requests for this model: a wrong shape, truncated contents
        bad = dict(one, hidden_states=("F32", np.zeros((1, 20, 31), np.float32)))
        req = common.infer_request(model, one)
        req.raw_input_contents[0] = req.raw_input_contents[0][:-4]
        for r in (common.infer_request(model, bad), req):
            with self.assertRaises(grpc.RpcError) as cm:
                self.stub.ModelInfer(r)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        # requests for models that do not exist count nowhere
        with self.assertRaises(grpc.RpcError):
            self.stub.ModelInfer(common.infer_request("nope", one))
        c = self.counts(model)
        self.assertEqual([c[r] for r in ("REJECTED", "CANCELED", "BACKEND", "OTHER")],
                         [2, 1, 0, 2])
        self.assertEqual((c["success"], c["inferences"], c["executions"], c["pending"]),
                         (0, 0, 0, 0))
        self.assertEqual(c["buckets"], [0] * 12)
        self.assertEqual(c["request"], 0)
        self.assertNotIn('model="nope"', get(self.server.metrics_port)[2])

    def test_stream_counts(self):
        model = "attnblock_4heads"
        inputs = common.case_inputs(model)
        reqs = [common.infer_request(model, inputs, rid="s%d" % i) for i in range(3)]
        bad = {"hidden_states": ("F32", np.zeros((2, 32, 5), np.float32))}
        reqs.insert(1, common.infer_request(model, bad, rid="bad"))
        resps = list(self.stub.ModelStreamInfer(iter(reqs)))
        self.assertEqual(len(resps), 4)
        self.assertEqual(sum(1 for r in resps if r.error_message), 1)
        c = self.counts(model)
        self.assertEqual((c["success"], c["OTHER"], c["inferences"]), (3, 1, 6))
        self.assertTrue(1 <= c["executions"] <= 3)
        self.assertHistogramConsistent(c)
        self.assertEqual(c["pending"], 0)

    # -- the format and the HTTP surface ----------------------------------------------------
    def test_every_family_is_typed_and_documented(self):
        status, _, body = get(self.server.metrics_port)
        self.assertEqual(status, 200)
        samples, types = parse_metrics(body)
        want = {"nv_inference_request_success": "counter",
                "nv_inference_request_failure": "counter",
                "nv_inference_count": "counter", "nv_inference_exec_count": "counter",
                "nv_inference_pending_request_count": "gauge",
                "nv_inference_request_duration_us": "counter",
                "nv_inference_queue_duration_us": "counter",
                "nv_inference_compute_input_duration_us": "counter",
                "nv_inference_compute_infer_duration_us": "counter",
                "nv_inference_compute_output_duration_us": "counter",
                "blockserve_batch_size": "histogram",
                "blockserve_ragged_execution_count": "counter",
                "blockserve_stopped_execution_count": "counter",
                "blockserve_skipped_block_count": "counter"}
        for name, kind in want.items():
            self.assertEqual(types.get(name), kind, name)
        models = {dict(k[1]).get("model") for k in samples if dict(k[1]).get("model")}
        self.assertEqual(models, {"btb_self_only", "btb_geglu_cross", "attnblock_4heads"})
        if "compute: cpu backend" in self.server.text():
            self.assertNotIn("nv_gpu_memory", body)  # no device memory on the CPU
        else:
            total = [v for k, v in samples.items() if k[0] == "nv_gpu_memory_total_bytes"]
            used = [v for k, v in samples.items() if k[0] == "nv_gpu_memory_used_bytes"]
            self.assertTrue(total and len(total) == len(used))
            self.assertTrue(all(0 < u <= t for u, t in zip(used, total)))

    def test_other_paths_and_methods(self):
        port = self.server.metrics_port
        for path in ("/", "/metric", "/metrics/", "/metricsx", "/v2/health/ready"):
            self.assertEqual(get(port, path)[0], 404, path)
        self.assertEqual(get(port, method="POST")[0], 405)
        status, _, body = get(port, method="HEAD")
        self.assertEqual((status, body), (200, ""))


class MetricsFlagsTest(unittest.TestCase):
    def test_no_metrics(self):
        repo = harness.make_repository(["btb_self_only"], broken=False)
        try:
            for flags in (["--no-metrics"], ["--metrics-port", "0"]):
                server = harness.Server(BINARY, flags + ["--model-repository", repo])
                try:
                    self.assertIsNone(server.metrics_port)
                    self.assertNotIn("metrics on", server.text())
                finally:
                    self.assertEqual(server.stop(), 0)
        finally:
            shutil.rmtree(repo, ignore_errors=True)

    def test_busy_port_given_explicitly_is_an_error(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        repo = harness.make_repository(["btb_self_only"], broken=False)
        try:
            r = subprocess.run([BINARY, "serve", "--grpc-port", "0", "--grpc-address", "127.0.0.1",
                                "--model-repository", repo, "--metrics-port", str(port)],
                               capture_output=True, text=True, timeout=120)
        finally:
            sock.close()
            shutil.rmtree(repo, ignore_errors=True)
        self.assertEqual(r.returncode, 1, r.stderr)  # an orderly exit, not a crash
        self.assertIn("metrics: cannot listen on 127.0.0.1:%d" % port, r.stderr)

    def test_bad_address_is_an_error(self):
        repo = harness.make_repository(["btb_self_only"], broken=False)
        try:  # the default port, but an address given explicitly
            r = subprocess.run([BINARY, "serve", "--grpc-port", "0", "--metrics-address",
                                "localhost", "--model-repository", repo],
                               capture_output=True, text=True, timeout=120)
        finally:
            shutil.rmtree(repo, ignore_errors=True)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn('--metrics-address "localhost"', r.stderr)

    def test_busy_default_port_only_warns(self):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", 8002))
            sock.listen(1)
        except OSError:
            sock.close()
            self.skipTest("port 8002 is in use here")
        repo = harness.make_repository(["btb_self_only"], broken=False)
        try:  # no --metrics-port: the default, 8002, is taken
            proc = subprocess.Popen([BINARY, "serve", "--grpc-port", "0", "--grpc-address",
                                     "127.0.0.1", "--model-repository", repo],
                                    stderr=subprocess.PIPE, text=True)
            lines = []
            for line in proc.stderr:
                lines.append(line)
                if "serving 1 models" in line or "error" in line:
                    break
            proc.terminate()
            proc.communicate(timeout=60)
        finally:
            sock.close()
            shutil.rmtree(repo, ignore_errors=True)
        text = "".join(lines)
        self.assertIn("serving 1 models", text)
        self.assertIn("metrics: cannot listen on 127.0.0.1:8002", text)
        self.assertIn("serving without metrics", text)
        self.assertEqual(proc.returncode, 0)


if __name__ == "__main__":
    BINARY = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
