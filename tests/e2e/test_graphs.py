"""Launch graphs end to end: two servers on one repository, one with
--graphs off and one with --graphs emulate (the engine records each block's
ops and replays the recording through the CPU backend, going through the
same warm-up, capture, compare and launch states as on the GPU). Checked,
bit for bit between the two servers unless said otherwise:

- a 3-block stack, an ada_norm block whose timesteps change per request and
  a DiT-style ada_norm_zero block with class labels, and an AttentionBlock:
  6 sequential requests with different inputs each answer the same bytes,
  and blockserve_graph_block_runs_total on the emulate server grows by
  blocks x 1 eager (warm-up), blocks x 1 captured and blocks x 4 launched
  (the requests after the capture), none rerun; the off server has no
  blockserve_graph metrics at all;
- a bad request (wrong shape) amid the stack's sequence: INVALID_ARGUMENT,
  and the counts and the following answers stay as above;
- streaming with stream_intermediate: every message the same bytes;
- 3 rounds of 8 concurrent requests to a batching model: each answer within
  the batching tolerance of the off server's answer to the request alone,
  and the emulate server answers sequential requests bit for bit afterwards.

Both servers run with UV_THREADPOOL_SIZE=1: a thread keeps its own graphs,
so with one compute thread every request of a model meets the same cache and
the counts above are exact.

    /usr/bin/python3 tests/e2e/test_graphs.py BLOCKSERVE_BINARY
"""

import concurrent.futures
import os
import queue
import shutil
import sys
import unittest

import numpy as np

import harness
import test_server as common  # generates the stubs; its tests are not collected here
from test_metrics import get as http_get, parse_metrics

import grpc  # noqa: E402

pb = common.pb
pb_grpc = common.pb_grpc
BINARY = None
CODE = grpc.StatusCode
BATCH_TOL = 1e-5  # a request batched with others against it alone, x max |output| (README)
N_REQ = 6
HOWS = ("eager", "captured", "launched", "reran")

# Models (each graph-counting test has its own, so the tests' order does not
# matter): golden case -> its blocks
SEQ_MODELS = {"btb_stack3": 3, "btb_ada_norm_per_sample_t": 1, "btb_ada_norm_zero_dit": 1,
              "attnblock_4heads": 1}
STREAM_MODEL = "stack3_stream"  # a copy of btb_stack3
BATCH_MODEL = "btb_geglu_cross"
SERVING = {BATCH_MODEL: {"max_batch_size": 16, "max_queue_delay_microseconds": 200000}}
EMULATE = "emulate"


def varied(case, k):
    """The golden inputs of case made different for request k: activations
    moved by seeded noise, timesteps and class labels changed (in range)."""
    out = {}
    rng = np.random.default_rng(1000 + k)
    for name, (dt, arr) in common.case_inputs(case).items():
        if k == 0:
            out[name] = (dt, arr)
        elif name == "timestep" and dt == "I64":  # ada_norm: embedding rows 0..19
            out[name] = (dt, ((arr + 3 * k) % 20).astype(np.int64))
        elif name == "timestep":  # ada_norm_zero: sinusoidal, any value
            out[name] = (dt, (arr + 37.5 * k).astype(np.float32))
        elif name == "class_labels":  # the golden labels, rolled
            out[name] = (dt, np.roll(arr, k).astype(np.int64))
        elif name.endswith("mask"):
            out[name] = (dt, arr)
        else:
            out[name] = (dt, (arr + 0.1 * rng.standard_normal(arr.shape)).astype(arr.dtype))
    return out


def raw(resp):
    return resp.raw_output_contents[0]


class GraphsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.repo = harness.make_repository(list(SEQ_MODELS) + [BATCH_MODEL], SERVING,
                                           broken=False)
        shutil.copytree(os.path.join(harness.GOLDEN, "btb_stack3"),
                        os.path.join(cls.repo, STREAM_MODEL))
        old = os.environ.get("UV_THREADPOOL_SIZE")
        os.environ["UV_THREADPOOL_SIZE"] = "1"
        cls.servers, cls.channels = [], []
        try:
            for graphs in ("off", EMULATE):
                s = harness.Server(BINARY, ["--model-repository", cls.repo,
                                            "--graphs", graphs])
                cls.servers.append(s)
                cls.channels.append(grpc.insecure_channel(s.address))
        finally:
            if old is None:
                del os.environ["UV_THREADPOOL_SIZE"]
            else:
                os.environ["UV_THREADPOOL_SIZE"] = old
        cls.off, cls.em = [pb_grpc.GRPCInferenceServiceStub(c) for c in cls.channels]

    @classmethod
    def tearDownClass(cls):
        for c in cls.channels:
            c.close()
        for s in cls.servers[1:]:
            harness.shutdown(s)
        harness.shutdown(cls.servers[0], cls.repo)

    def metrics_text(self, server):
        status, _, body = http_get(server.metrics_port)
        self.assertEqual(status, 200)
        return body

    def graph_counts(self):
        samples = parse_metrics(self.metrics_text(self.servers[1]))[0]
        counts = {}
        for how in HOWS:
            key = ("blockserve_graph_block_runs_total", frozenset([("how", how)]))
            self.assertTrue(key in samples, "the emulate server has no %s count" % how)
            counts[how] = samples[key]
        return counts

    def delta(self, before):
        after = self.graph_counts()
        return {how: after[how] - before[how] for how in HOWS}

    def both(self, model, inputs, params=None):
        """The two servers' answers (raw bytes) to one request, checked equal."""
        req = common.infer_request(model, inputs, params=params)
        a, b = raw(self.off.ModelInfer(req)), raw(self.em.ModelInfer(req))
        self.assertEqual(len(a), len(b))
        if a != b:
            x, y = np.frombuffer(a, "<f4"), np.frombuffer(b, "<f4")
            self.fail("%s: off and emulate differ at %d of %d values, max |diff| %g" % (
                model, int(np.sum(x != y)), x.size, float(np.max(np.abs(x - y)))))
        return a

    def check_sequence(self, model, blocks, bad_at=None):
        before = self.graph_counts()
        outs = []
        for k in range(N_REQ):
            if k == bad_at:
                inputs = dict(common.case_inputs(model))
                hs = inputs["hidden_states"][1]
                shape = hs.shape[:-1] + (hs.shape[-1] - 1,)
                inputs["hidden_states"] = ("F32", np.zeros(shape, np.float32))
                with self.assertRaises(grpc.RpcError) as cm:
                    self.em.ModelInfer(common.infer_request(model, inputs))
                self.assertEqual(cm.exception.code(), CODE.INVALID_ARGUMENT)
                self.assertIn("hidden_states", cm.exception.details())
            outs.append(self.both(model, varied(model, k)))
        # the first answer is the golden one; the inputs did make answers differ
        got = np.frombuffer(outs[0], "<f4").reshape(common.case_expected(model).shape)
        self.assertLessEqual(float(np.max(np.abs(got - common.case_expected(model)))),
                             common.TOL, model)
        self.assertEqual(len(set(outs)), N_REQ, model)
        d = self.delta(before)
        print("%s: %d requests, graph runs %s" % (model, N_REQ, d))
        self.assertEqual(d, {"eager": blocks, "captured": blocks,
                             "launched": blocks * (N_REQ - 2), "reran": 0}, model)

    # ---- tests ------------------------------------------------------------

    def test_off_has_no_graph_metrics(self):
        self.both("attnblock_4heads", common.case_inputs("attnblock_4heads"))
        body = self.metrics_text(self.servers[0])
        self.assertIn("nv_inference_count", body)
        self.assertNotIn("blockserve_graph", body)
        body = self.metrics_text(self.servers[1])
        self.assertIn("# TYPE blockserve_graph_block_runs_total counter", body)
        self.assertIn("blockserve_graphs_freed_total", body)

    def test_stack_sequence_with_bad_request(self):
        self.check_sequence("btb_stack3", SEQ_MODELS["btb_stack3"], bad_at=4)

    def test_ada_norm_per_sample_timesteps(self):
        self.check_sequence("btb_ada_norm_per_sample_t", 1)

    def test_ada_norm_zero_dit(self):
        self.check_sequence("btb_ada_norm_zero_dit", 1)

    def test_attention_block(self):
        self.check_sequence("attnblock_4heads", 1)

    def lockstep_stream(self, stub, reqs):
        """Each request of reqs sent on one stream once the previous one's final
        answer is in (so they do not batch): {id: [raw answers in order]}."""
        done = queue.Queue()

        def gen():
            for r in reqs:
                yield r
                done.get(timeout=60)

        by_id = {}
        for r in stub.ModelStreamInfer(gen()):
            self.assertEqual(r.error_message, "")
            by_id.setdefault(r.infer_response.id, []).append(raw(r.infer_response))
            if r.infer_response.parameters["triton_final_response"].bool_param:
                done.put(True)
        return by_id

    def test_stream_intermediate(self):
        params = {"stream_intermediate": True}
        reqs = [common.infer_request(STREAM_MODEL, varied("btb_stack3", k), rid="r%d" % k,
                                     params=params) for k in range(4)]
        before = self.graph_counts()
        got = [self.lockstep_stream(stub, reqs) for stub in (self.off, self.em)]
        d = self.delta(before)
        print("stream: graph runs %s" % d)
        self.assertEqual(sorted(got[0]), ["r0", "r1", "r2", "r3"])
        self.assertEqual(sorted(got[1]), ["r0", "r1", "r2", "r3"])
        for rid in sorted(got[0]):
            self.assertEqual(len(got[0][rid]), 3, rid)
            self.assertEqual(len(got[1][rid]), 3, rid)
            self.assertEqual(len(set(got[0][rid])), 3, rid)  # each block's own output
            for blk in range(3):
                self.assertEqual(got[0][rid][blk], got[1][rid][blk], "%s block %d" % (rid, blk))
        self.assertEqual(d, {"eager": 3, "captured": 3, "launched": 3 * (len(reqs) - 2),
                             "reran": 0})

    def test_concurrent_batches(self):
        base = common.case_inputs(BATCH_MODEL)
        stats = lambda: self.em.ModelStatistics(  # noqa: E731
            pb.ModelStatisticsRequest(name=BATCH_MODEL)).model_stats[0].execution_count
        worst = 0.0
        before = self.graph_counts()
        for rnd in range(3):
            samples = []
            for i in range(8):
                s = common.sample(varied(BATCH_MODEL, 1 + rnd * 8 + i), i % 2)
                samples.append(s)
            refs = [np.frombuffer(self.off.ModelInfer(common.infer_request(BATCH_MODEL, s))
                                  .raw_output_contents[0], "<f4") for s in samples]
            e0 = stats()
            with concurrent.futures.ThreadPoolExecutor(len(samples)) as ex:
                futs = [ex.submit(self.em.ModelInfer,
                                  common.infer_request(BATCH_MODEL, s, rid="%d" % i))
                        for i, s in enumerate(samples)]
                resps = [f.result() for f in futs]
            execs = stats() - e0
            self.assertLess(execs, len(samples), "round %d did not batch" % rnd)
            for i, r in enumerate(resps):
                self.assertEqual(r.id, str(i))
                got = np.frombuffer(raw(r), "<f4")
                err = np.abs(got - refs[i])
                bound = BATCH_TOL * float(np.max(np.abs(refs[i]))) + 1e-7
                worst = max(worst, float(np.max(err)) / bound)
                self.assertTrue(np.all(err <= bound), (rnd, i, float(np.max(err))))
            print("round %d: 8 requests in %d executions" % (rnd, execs))
        d = self.delta(before)
        print("concurrent: worst error %.2f of the bound, graph runs %s" % (worst, d))
        self.assertEqual(d["reran"], 0)
        # afterwards: sequential requests, bit for bit, through launched graphs
        before = self.graph_counts()
        for k in range(4):
            self.both(BATCH_MODEL, varied(BATCH_MODEL, 100 + k) if k else base)
        d = self.delta(before)
        print("after the batches: graph runs %s" % d)
        self.assertGreaterEqual(d["launched"], 2)
        self.assertEqual(d["reran"], 0)


if __name__ == "__main__":
    BINARY = sys.argv.pop(1)
    unittest.main(verbosity=2)
