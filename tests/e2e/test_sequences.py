"""End-to-end tests of denoising sequences and step-level block caching
(Triton's sequence_id, sequence_start, sequence_end; our block_cache_interval)
over gRPC, unary and ModelStreamInfer:

- N = 1 (or no parameter) gives the exact output bit for bit;
- with N = 2 and 3 the response parameter block_cache follows k mod N;
- the golden sequences of tests/golden_cache (the PyTorch reference of the
  caching rule, tests/reference/block_cache.py) replayed through the server:
  refreshes equal the exact forward (1e-5 x max |output|), reuses the
  reference (1e-4 x max |output|) and differ from the exact forward;
- sequences at different phases batched together equal each replayed alone;
- sequence_end frees the cache (blockserve_block_cache_bytes returns), a
  small --block-cache-bytes evicts (the evicted sequence refreshes and says
  so), an idle sequence expires;
- every bad use is INVALID_ARGUMENT with a message naming it; string
  sequence ids; calls of one sequence sent while its previous call runs
  wait for it and run in order.

    /usr/bin/python3 tests/e2e/test_sequences.py BLOCKSERVE_BINARY
"""

import concurrent.futures
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

GOLDEN_CACHE = os.path.join(harness.ROOT, "tests", "golden_cache")
CACHE_CASES = sorted(e for e in os.listdir(GOLDEN_CACHE)
                     if os.path.isdir(os.path.join(GOLDEN_CACHE, e)))
REFRESH_TOL = 1e-5  # a refresh against the exact forward, x max |output|
REUSE_TOL = 1e-4    # a reuse against the reference (test_block_cache_ref's bound)
BATCH_TOL = 1e-5    # a call batched with others against the same call alone
LONG_IDLE = 60000000  # us: no sequence of the tests idles out by accident
SHORT_IDLE = 300000   # us: the model of test_idle_expiry


def rel_diff(a, b):
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def set_param(p, v):
    if isinstance(v, bool):
        p.bool_param = v
    elif isinstance(v, str):
        p.string_param = v
    elif isinstance(v, float):
        p.double_param = v
    elif isinstance(v, int) and v >= 0:
        p.uint64_param = v
    else:
        p.int64_param = v


def seq_request(model, inputs, seq_id=None, start=False, end=False, interval=None, rid="",
                **params):
    """A ModelInferRequest with sequence parameters (sequence_id a uint64_param
    for an int, a string_param for a str; block_cache_interval an int64_param)."""
    req = common.infer_request(model, inputs, rid=rid)
    if seq_id is not None:
        set_param(req.parameters["sequence_id"], seq_id)
    if start:
        req.parameters["sequence_start"].bool_param = True
    if end:
        req.parameters["sequence_end"].bool_param = True
    if interval is not None:
        if isinstance(interval, int):
            req.parameters["block_cache_interval"].int64_param = interval
        else:
            set_param(req.parameters["block_cache_interval"], interval)
    for k, v in params.items():
        set_param(req.parameters[k], v)
    return req


def mode_of(resp):
    """The answer's block_cache parameter ("refresh", "reuse"), or None."""
    if "block_cache" not in resp.parameters:
        return None
    return resp.parameters["block_cache"].string_param


def want_modes(n, steps, offset=0):
    return ["refresh" if (k + offset) % n == 0 else "reuse" for k in range(steps)]


def load_steps(case):
    """A golden_cache sequence: [(inputs, expected, exact)] per call, and the
    modes and interval its metadata gives."""
    path = os.path.join(GOLDEN_CACHE, case, "steps.safetensors")
    t = harness.st_load(path)
    with open(path, "rb") as f:  # the header's metadata
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))["__metadata__"]
    shared = {k: v for k, v in t.items() if not k.startswith("step")}
    calls = []
    for k in range(int(meta["steps"])):
        own = {n[len("step%d." % k):]: v for n, v in t.items() if n.startswith("step%d." % k)}
        inputs = dict(shared)
        inputs.update({n: v for n, v in own.items() if n not in ("expected", "exact")})
        calls.append((inputs, own["expected"][1], own["exact"][1]))
    return calls, meta["modes"].split(","), int(meta["interval"])


def perturbed(inputs, k, seed):
    """Call k's inputs of a test sequence: hidden_states moved by random noise
    (a constant shift would be invisible to the blocks' LayerNorms)."""
    rng = np.random.default_rng(seed * 1000 + k)
    dt, hs = inputs["hidden_states"]
    out = dict(inputs)
    out["hidden_states"] = (dt, (hs + 0.1 * rng.standard_normal(hs.shape)).astype(np.float32))
    return out


def add_model(root, case, name, serving):
    shutil.copytree(os.path.join(harness.GOLDEN, case), os.path.join(root, name))
    with open(os.path.join(root, name, "serving.json"), "w") as f:
        json.dump(serving, f)


class SeqTestBase(unittest.TestCase):
    def assertStatus(self, code, fn, *args, contains=(), **kw):
        with self.assertRaises(grpc.RpcError) as cm:
            fn(*args, **kw)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        for c in (contains if isinstance(contains, tuple) else (contains,)):
            self.assertIn(c, cm.exception.details())
        return cm.exception

    def scrape(self, model):
        """{metric name: value} of model's blockserve sequence series."""
        status, _, body = test_metrics.get(self.server.metrics_port)
        self.assertEqual(status, 200)
        samples = test_metrics.parse_metrics(body)[0]
        labels = frozenset({"model": model, "version": "1"}.items())
        return {name: v for (name, lab), v in samples.items() if lab == labels}

    def exact(self, model, inputs):
        return common.output_of(self.stub.ModelInfer(common.infer_request(model, inputs)))


class SequenceTest(SeqTestBase):
    @classmethod
    def setUpClass(cls):
        cls.repo = tempfile.mkdtemp(prefix="bs_repo_")
        long_idle = {"max_sequence_idle_microseconds": LONG_IDLE}
        for case in CACHE_CASES:
            add_model(cls.repo, case, case, long_idle)
        add_model(cls.repo, "attnblock_4heads", "attnblock_4heads", long_idle)
        # batches of concurrent sequences
        add_model(cls.repo, "btb_geglu_cross", "batched",
                  dict(long_idle, max_batch_size=8, max_queue_delay_microseconds=30000))
        # a call waits 300 ms in the queue: the next call of its sequence
        # arrives while it is not done
        add_model(cls.repo, "btb_self_only", "slow",
                  dict(long_idle, max_batch_size=8, max_queue_delay_microseconds=300000))
        add_model(cls.repo, "btb_gelu_cross", "idle",
                  {"max_sequence_idle_microseconds": SHORT_IDLE})
        cls.server = harness.Server(BINARY, ["--model-repository", cls.repo,
                                             "--max-queue-delay-us", "0"])
        cls.channel = grpc.insecure_channel(cls.server.address)
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        harness.shutdown(cls.server, cls.repo)

    # -- the rule ----------------------------------------------------------------
    def test_interval_one_and_none_are_exact(self):
        model = "btb_geglu_cross"
        calls, _, _ = load_steps(model)
        exact = [self.exact(model, c[0]) for c in calls]
        for k, (inputs, _, _) in enumerate(calls):  # N = 1 in a sequence
            resp = self.stub.ModelInfer(seq_request(model, inputs, 101, start=k == 0,
                                                    end=k == len(calls) - 1, interval=1))
            self.assertIsNone(mode_of(resp))
            self.assertTrue(np.array_equal(common.output_of(resp), exact[k]), k)
        for k, (inputs, _, _) in enumerate(calls):  # a sequence without the parameter
            resp = self.stub.ModelInfer(seq_request(model, inputs, 102, start=k == 0,
                                                    end=k == len(calls) - 1))
            self.assertIsNone(mode_of(resp))
            self.assertTrue(np.array_equal(common.output_of(resp), exact[k]), k)
        # N = 1 needs no sequence
        resp = self.stub.ModelInfer(seq_request(model, calls[0][0], interval=1))
        self.assertIsNone(mode_of(resp))
        self.assertTrue(np.array_equal(common.output_of(resp), exact[0]))

    def run_interval(self, model, base, n, steps, seq_id, stream):
        """A sequence of `steps` calls with interval n: (modes, outputs, exact outputs)."""
        inputs = [perturbed(base, k, seq_id) for k in range(steps)]
        reqs = [seq_request(model, inputs[k], seq_id, start=k == 0, end=k == steps - 1,
                            interval=n, rid="k%d" % k) for k in range(steps)]
        if stream:
            resps = []
            for r in self.stub.ModelStreamInfer(iter(reqs)):
                self.assertEqual(r.error_message, "")
                resps.append(r.infer_response)
            self.assertEqual([r.id for r in resps], ["k%d" % k for k in range(steps)])
        else:
            resps = [self.stub.ModelInfer(r) for r in reqs]
        return ([mode_of(r) for r in resps], [common.output_of(r) for r in resps],
                [self.exact(model, i) for i in inputs])

    def test_modes_follow_k_mod_n(self):
        model = "btb_stack3"
        base = harness.st_load(os.path.join(harness.GOLDEN, model, "inputs.safetensors"))
        seq_id = 200
        for stream in (False, True):
            for n in (2, 3):
                seq_id += 1
                with self.subTest(n=n, stream=stream):
                    modes, outs, exact = self.run_interval(model, base, n, 7, seq_id, stream)
                    self.assertEqual(modes, want_modes(n, 7))
                    for k, m in enumerate(modes):
                        d = rel_diff(outs[k], exact[k])
                        if m == "refresh":
                            self.assertLessEqual(d, REFRESH_TOL, k)
                        else:  # a reuse is not the exact forward
                            self.assertGreater(d, 1e-3, k)

    def replay(self, case, stream, seq_id):
        calls, modes, n = load_steps(case)
        reqs = [seq_request(case, inputs, seq_id, start=k == 0, end=k == len(calls) - 1,
                            interval=n, rid="%s/%d" % (case, k))
                for k, (inputs, _, _) in enumerate(calls)]
        if stream:  # every call sent at once: each waits for the one before
            resps = []
            for r in self.stub.ModelStreamInfer(iter(reqs)):
                self.assertEqual(r.error_message, "")
                resps.append(r.infer_response)
        else:
            resps = [self.stub.ModelInfer(r) for r in reqs]
        self.assertEqual([r.id for r in resps], [r.id for r in reqs])
        self.assertEqual([mode_of(r) for r in resps], modes)
        worst = {"refresh": 0.0, "reuse": 0.0}
        for k, (resp, (inputs, expected, exact)) in enumerate(zip(resps, calls)):
            got = common.output_of(resp)
            self.assertEqual(got.shape, expected.shape)
            if modes[k] == "refresh":
                d = rel_diff(got, self.exact(case, inputs))
                self.assertLessEqual(d, REFRESH_TOL, "%s call %d" % (case, k))
                self.assertLessEqual(rel_diff(got, exact), REUSE_TOL, "%s call %d" % (case, k))
            else:
                d = rel_diff(got, expected)
                self.assertLessEqual(d, REUSE_TOL, "%s call %d" % (case, k))
                self.assertGreater(rel_diff(got, exact), 1e-2, "%s call %d" % (case, k))
            worst[modes[k]] = max(worst[modes[k]], d)
        return worst

    def test_golden_sequences_replayed(self):
        seq_id = 300
        lines = []
        for stream in (False, True):
            for case in CACHE_CASES:
                seq_id += 1
                with self.subTest(case=case, stream=stream):
                    w = self.replay(case, stream, seq_id)
                    lines.append("  %-32s %-6s refresh %.1e (%.0f%% of %g), reuse %.1e "
                                 "(%.0f%% of %g)" % (case, "stream" if stream else "unary",
                                                     w["refresh"],
                                                     100 * w["refresh"] / REFRESH_TOL,
                                                     REFRESH_TOL, w["reuse"],
                                                     100 * w["reuse"] / REUSE_TOL, REUSE_TOL))
        print("\ngolden_cache replayed (max |diff| / max |output|):\n" + "\n".join(lines),
              file=sys.stderr)

    # -- batching -------------------------------------------------------------------
    def stats(self, model):
        return self.stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]

    def test_concurrent_sequences_batched(self):
        # Six sequences step together (a barrier before each call), with
        # intervals 2, 3 and 4 and different phases (calls made alone before
        # the first barrier): at most steps some refresh while others reuse,
        # in one batch. Each equals the same sequence replayed alone.
        model = "batched"
        base = common.sample(harness.st_load(os.path.join(harness.GOLDEN, "btb_geglu_cross",
                                                          "inputs.safetensors")), 0)
        plans = [(2, 0), (3, 1), (2, 1), (3, 2), (4, 0), (2, 3)]  # (interval, calls alone first)
        together_steps = 6

        def run(i, seq_id, barrier):
            n, first = plans[i]
            steps = first + together_steps
            outs, modes = [], []
            for k in range(steps):
                if barrier is not None and k >= first:
                    barrier.wait(timeout=60)
                resp = self.stub.ModelInfer(seq_request(model, perturbed(base, k, 40 + i), seq_id,
                                                        start=k == 0, end=k == steps - 1,
                                                        interval=n))
                outs.append(common.output_of(resp))
                modes.append(mode_of(resp))
            return outs, modes

        alone = [run(i, 500 + i, None) for i in range(len(plans))]
        before = self.stats(model)
        barrier = threading.Barrier(len(plans))
        with concurrent.futures.ThreadPoolExecutor(len(plans)) as ex:
            futs = [ex.submit(run, i, 600 + i, barrier) for i in range(len(plans))]
            together = [f.result(timeout=120) for f in futs]
        after = self.stats(model)
        worst = 0.0
        for i, (n, first) in enumerate(plans):
            steps = first + together_steps
            self.assertEqual(together[i][1], want_modes(n, steps), i)
            self.assertEqual(alone[i][1], want_modes(n, steps), i)
            for k in range(steps):
                d = rel_diff(together[i][0][k], alone[i][0][k])
                self.assertLessEqual(d, BATCH_TOL, (i, k))
                worst = max(worst, d)
        batched = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
        earlier = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
        multi = sum(c - earlier.get(s, 0) for s, c in batched.items() if s > 1)
        runs = after.execution_count - before.execution_count
        calls = sum(first + together_steps for _, first in plans)
        print("\n%d calls of %d sequences in %d executions, %d of them batches > 1; batched "
              "vs alone %.1e (%.0f%% of %g)" % (calls, len(plans), runs, multi, worst,
                                                100 * worst / BATCH_TOL, BATCH_TOL),
              file=sys.stderr)
        self.assertGreater(multi, 0, "no batch of more than one call happened")
        self.assertLess(runs, calls)

    # -- memory -------------------------------------------------------------------------
    def test_sequence_end_frees_memory(self):
        model = "btb_self_only"
        base = harness.st_load(os.path.join(harness.GOLDEN, model, "inputs.safetensors"))
        m0 = self.scrape(model)
        bytes0 = m0["blockserve_block_cache_bytes"]
        live0 = m0["blockserve_sequences"]
        # 1 block x (attn1, ff) x 2 x 20 tokens x 32 x 4 bytes
        size = 2 * 2 * 20 * 32 * 4
        for k in range(3):
            resp = self.stub.ModelInfer(seq_request(model, perturbed(base, k, 7), 700,
                                                    start=k == 0, interval=2))
            self.assertEqual(mode_of(resp), want_modes(2, 3)[k])
            m = self.scrape(model)
            self.assertEqual(m["blockserve_block_cache_bytes"], bytes0 + size)
            self.assertEqual(m["blockserve_sequences"], live0 + 1)
        resp = self.stub.ModelInfer(seq_request(model, perturbed(base, 3, 7), 700, end=True,
                                                interval=2))
        self.assertEqual(mode_of(resp), "reuse")
        m = self.scrape(model)  # already after the answer
        self.assertEqual(m["blockserve_block_cache_bytes"], bytes0)
        self.assertEqual(m["blockserve_sequences"], live0)
        self.assertEqual(m["blockserve_block_cache_refresh_count"],
                         m0["blockserve_block_cache_refresh_count"] + 2)
        self.assertEqual(m["blockserve_block_cache_hit_count"],
                         m0["blockserve_block_cache_hit_count"] + 2)
        self.assertStatus(grpc.StatusCode.INVALID_ARGUMENT, self.stub.ModelInfer,
                          seq_request(model, base, 700, interval=2),
                          contains=("sequence 700 is not known", "sequence_start"))

    def test_idle_expiry(self):
        model = "idle"
        base = harness.st_load(os.path.join(harness.GOLDEN, "btb_gelu_cross",
                                            "inputs.safetensors"))
        m0 = self.scrape(model)
        resp = self.stub.ModelInfer(seq_request(model, base, 800, start=True, interval=2))
        self.assertEqual(mode_of(resp), "refresh")
        resp = self.stub.ModelInfer(seq_request(model, perturbed(base, 1, 8), 800, interval=2))
        self.assertEqual(mode_of(resp), "reuse")
        self.assertGreater(self.scrape(model)["blockserve_block_cache_bytes"], 0)
        time.sleep(3 * SHORT_IDLE / 1e6)
        m = self.scrape(model)  # the timer ended it without any request
        self.assertEqual(m["blockserve_sequence_expired_count"],
                         m0["blockserve_sequence_expired_count"] + 1)
        self.assertEqual(m["blockserve_block_cache_bytes"], 0)
        self.assertEqual(m["blockserve_sequences"], 0)
        self.assertStatus(grpc.StatusCode.INVALID_ARGUMENT, self.stub.ModelInfer,
                          seq_request(model, base, 800, interval=2),
                          contains=("sequence 800 is not known",
                                    "max_sequence_idle_microseconds"))
        # a start begins it again
        resp = self.stub.ModelInfer(seq_request(model, base, 800, start=True, end=True,
                                                interval=2))
        self.assertEqual(mode_of(resp), "refresh")

    # -- bad use ---------------------------------------------------------------------
    def test_bad_use_is_a_clear_error(self):
        model = "btb_geglu_cross"
        base = harness.st_load(os.path.join(harness.GOLDEN, model, "inputs.safetensors"))
        bad = grpc.StatusCode.INVALID_ARGUMENT
        infer = self.stub.ModelInfer
        # sequence_id 0 with sequence flags, or alone
        self.assertStatus(bad, infer, seq_request(model, base, 0, start=True),
                          contains="needs a sequence_id")
        self.assertStatus(bad, infer, seq_request(model, base, 0, end=True),
                          contains="needs a sequence_id")
        self.assertStatus(bad, infer, seq_request(model, base, 0, interval=2),
                          contains="needs a sequence")
        self.assertStatus(bad, infer, seq_request(model, base, 0), contains="sequence_id 0")
        # block_cache_interval without any sequence
        self.assertStatus(bad, infer, seq_request(model, base, interval=2),
                          contains="needs a sequence")
        # an unknown sequence without sequence_start
        self.assertStatus(bad, infer, seq_request(model, base, 901, interval=2),
                          contains=("sequence 901 is not known", "sequence_start"))
        self.assertStatus(bad, infer, seq_request(model, base, 902),
                          contains="sequence 902 is not known")
        # block_cache_interval 0, negative, of a wrong type
        for v in (0, -1, -7, 1 << 31):
            self.assertStatus(bad, infer, seq_request(model, base, 903, start=True, interval=v),
                              contains="'block_cache_interval'")
        for v in ("2", True, 2.0):
            self.assertStatus(bad, infer,
                              seq_request(model, base, 903, start=True, block_cache_interval=v),
                              contains=("'block_cache_interval'", "int64_param"))
        # sequence_id of a wrong type; sequence flags that are no bools
        for v in (True, 1.5, -3, ""):
            self.assertStatus(bad, infer, seq_request(model, base, v, start=True, interval=2),
                              contains="'sequence_id'")
        req = seq_request(model, base, 904, interval=2)
        req.parameters["sequence_start"].int64_param = 1
        self.assertStatus(bad, infer, req, contains=("'sequence_start'", "bool_param"))
        req = seq_request(model, base, 904, start=True, interval=2)
        req.parameters["sequence_end"].string_param = "true"
        self.assertStatus(bad, infer, req, contains=("'sequence_end'", "bool_param"))
        # none of these started anything
        self.assertStatus(bad, infer, seq_request(model, base, 903, interval=2),
                          contains="sequence 903 is not known")
        self.assertStatus(bad, infer, seq_request(model, base, 904, interval=2),
                          contains="sequence 904 is not known")
        # a model without transformer blocks cannot cache (N = 1 is fine)
        ab = "attnblock_4heads"
        ab_in = common.case_inputs(ab)
        self.assertStatus(bad, infer, seq_request(ab, ab_in, 905, start=True, interval=2),
                          contains="no transformer blocks")
        resp = infer(seq_request(ab, ab_in, 905, start=True, end=True, interval=1))
        self.assertIsNone(mode_of(resp))
        self.assertTrue(np.array_equal(common.output_of(resp), self.exact(ab, ab_in)))

    def test_shape_change_within_a_caching_sequence(self):
        model = "btb_geglu_cross"
        base = harness.st_load(os.path.join(harness.GOLDEN, model, "inputs.safetensors"))
        bad = grpc.StatusCode.INVALID_ARGUMENT
        resp = self.stub.ModelInfer(seq_request(model, base, 910, start=True, interval=2))
        self.assertEqual(mode_of(resp), "refresh")
        hs = base["hidden_states"][1]  # [2, 20, 32]
        for shape in ((2, 21, 32), (1, 20, 32), (1, 40, 32), (4, 10, 32)):
            other = dict(base, hidden_states=("F32", np.resize(hs, shape).astype(np.float32)))
            if shape[0] != 2:
                other["encoder_hidden_states"] = (
                    "F32", np.resize(base["encoder_hidden_states"][1], (shape[0], 7, 24)))
            self.assertStatus(bad, self.stub.ModelInfer,
                              seq_request(model, other, 910, interval=2),
                              contains=("sequence 910", "must stay fixed"))
        # the sequence goes on: the refused calls were no calls of it
        resp = self.stub.ModelInfer(seq_request(model, perturbed(base, 1, 9), 910, interval=2))
        self.assertEqual(mode_of(resp), "reuse")
        # without caching the shape may change; sequence_start starts afresh
        small = common.sample(base, 0)
        resp = self.stub.ModelInfer(seq_request(model, small, 910, interval=1))
        self.assertTrue(np.array_equal(common.output_of(resp), self.exact(model, small)))
        resp = self.stub.ModelInfer(seq_request(model, small, 910, start=True, interval=2))
        self.assertEqual(mode_of(resp), "refresh")
        resp = self.stub.ModelInfer(seq_request(model, small, 910, end=True, interval=2))
        self.assertEqual(mode_of(resp), "reuse")

    # -- ids and order -----------------------------------------------------------------
    def test_string_sequence_ids(self):
        model = "btb_self_only"
        base = harness.st_load(os.path.join(harness.GOLDEN, model, "inputs.safetensors"))
        sid = "pipeline-7f3a/denoise"
        modes = [mode_of(self.stub.ModelInfer(seq_request(model, perturbed(base, k, 11), sid,
                                                          start=k == 0, end=k == 4, interval=2)))
                 for k in range(5)]
        self.assertEqual(modes, want_modes(2, 5))
        e = self.assertStatus(grpc.StatusCode.INVALID_ARGUMENT, self.stub.ModelInfer,
                              seq_request(model, base, sid, interval=2), contains="is not known")
        self.assertIn('"%s"' % sid, e.details())  # named as the client named it
        # another string is another sequence
        self.assertStatus(grpc.StatusCode.INVALID_ARGUMENT, self.stub.ModelInfer,
                          seq_request(model, base, sid + "x", interval=2),
                          contains="is not known")
        # a string of digits is that number
        modes = [mode_of(self.stub.ModelInfer(seq_request(model, base, v, start=k == 0,
                                                          end=k == 2, interval=3)))
                 for k, v in enumerate(["4242", 4242, "4242"])]
        self.assertEqual(modes, ["refresh", "reuse", "reuse"])
        # the same id on two models is two sequences
        other = "btb_stack3"
        o_in = harness.st_load(os.path.join(harness.GOLDEN, other, "inputs.safetensors"))
        self.assertEqual(mode_of(self.stub.ModelInfer(seq_request(model, base, sid, start=True,
                                                                  interval=2))), "refresh")
        self.assertEqual(mode_of(self.stub.ModelInfer(seq_request(other, o_in, sid, start=True,
                                                                  end=True, interval=2))),
                         "refresh")
        self.assertEqual(mode_of(self.stub.ModelInfer(seq_request(model, base, sid, end=True,
                                                                  interval=2))), "reuse")

    def test_calls_sent_while_one_runs_wait_in_order(self):
        # "slow" keeps each call 300 ms in its queue: call k+1 is sent while
        # call k has not finished, and must wait for it.
        model = "slow"
        base = harness.st_load(os.path.join(harness.GOLDEN, "btb_self_only",
                                            "inputs.safetensors"))
        steps, n = 4, 3
        inputs = [perturbed(base, k, 12) for k in range(steps)]
        reqs = [seq_request(model, inputs[k], 1000, start=k == 0, end=k == steps - 1, interval=n,
                            rid=str(k)) for k in range(steps)]
        futs = []
        for k, r in enumerate(reqs):
            if k > 0:  # sent in order, each while the one before has not ended
                time.sleep(0.05)
                self.assertFalse(futs[k - 1].done(), "call %d ended before the next was sent" %
                                 (k - 1))
            futs.append(self.stub.ModelInfer.future(r, timeout=60))
        resps = [f.result() for f in futs]
        self.assertEqual([r.id for r in resps], [str(k) for k in range(steps)])
        self.assertEqual([mode_of(r) for r in resps], want_modes(n, steps))
        # the same sequence replayed one call after another gives the same outputs
        alone = [self.stub.ModelInfer(seq_request(model, inputs[k], 1001, start=k == 0,
                                                  end=k == steps - 1, interval=n))
                 for k in range(steps)]
        for k in range(steps):
            self.assertTrue(np.array_equal(common.output_of(resps[k]),
                                           common.output_of(alone[k])), k)
        # on one stream: every call sent at once
        resps = list(self.stub.ModelStreamInfer(iter(reqs)))
        self.assertEqual([r.error_message for r in resps], [""] * steps)
        self.assertEqual([r.infer_response.id for r in resps], [str(k) for k in range(steps)])
        self.assertEqual([mode_of(r.infer_response) for r in resps], want_modes(n, steps))
        for k in range(steps):
            self.assertTrue(np.array_equal(common.output_of(resps[k].infer_response),
                                           common.output_of(alone[k])), k)


class EvictionTest(SeqTestBase):
    # room for two caches of btb_self_only at [1, 20, 32]: 1 block x (attn1,
    # ff) x 20 tokens x 32 x 4 bytes each
    CACHE = 2 * 20 * 32 * 4

    @classmethod
    def setUpClass(cls):
        cls.repo = tempfile.mkdtemp(prefix="bs_repo_")
        add_model(cls.repo, "btb_self_only", "m",
                  {"max_sequence_idle_microseconds": LONG_IDLE, "max_queue_delay_microseconds": 0})
        cls.server = harness.Server(BINARY, ["--model-repository", cls.repo,
                                             "--block-cache-bytes", str(2 * cls.CACHE)])
        cls.channel = grpc.insecure_channel(cls.server.address)
        cls.stub = pb_grpc.GRPCInferenceServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        harness.shutdown(cls.server, cls.repo)

    def call(self, seq_id, k, start=False, end=False, inputs=None):
        base = common.sample(harness.st_load(os.path.join(harness.GOLDEN, "btb_self_only",
                                                          "inputs.safetensors")), 0)
        inputs = inputs or perturbed(base, k, seq_id)
        resp = self.stub.ModelInfer(seq_request("m", inputs, seq_id, start=start, end=end,
                                                interval=2))
        return mode_of(resp), common.output_of(resp), self.exact("m", inputs)

    def test_lru_eviction(self):
        m0 = self.scrape("m")
        self.assertEqual(m0["blockserve_block_cache_bytes"], 0)
        self.assertEqual(self.call(1, 0, start=True)[0], "refresh")
        self.assertEqual(self.call(2, 0, start=True)[0], "refresh")
        self.assertEqual(self.call(1, 1)[0], "reuse")  # 1 is now the most recent
        self.assertEqual(self.scrape("m")["blockserve_block_cache_bytes"], 2 * self.CACHE)
        # a third sequence: 2, the least recently used, loses its cache
        self.assertEqual(self.call(3, 0, start=True)[0], "refresh")
        m = self.scrape("m")
        self.assertEqual(m["blockserve_block_cache_eviction_count"], 1)
        self.assertEqual(m["blockserve_block_cache_bytes"], 2 * self.CACHE)
        # 2's call 1 was due to reuse: it refreshes (exact), and says so;
        # making room for it evicts 1
        mode, out, exact = self.call(2, 1)
        self.assertEqual(mode, "refresh")
        self.assertLessEqual(rel_diff(out, exact), REFRESH_TOL)
        self.assertEqual(self.scrape("m")["blockserve_block_cache_eviction_count"], 2)
        self.assertEqual(self.call(3, 1)[0], "reuse")
        self.assertEqual(self.call(2, 2)[0], "refresh")
        self.assertEqual(self.call(2, 3)[0], "reuse")
        self.assertEqual(self.call(1, 2)[0], "refresh")  # due anyway
        # a cache larger than the whole budget: exact, nothing stored
        base = harness.st_load(os.path.join(harness.GOLDEN, "btb_self_only",
                                            "inputs.safetensors"))
        big = {"hidden_states": ("F32", np.resize(base["hidden_states"][1], (1, 60, 32)))}
        before = self.scrape("m")
        for k in range(3):
            mode, out, exact = self.call(4, k, start=k == 0, inputs=big)
            self.assertEqual(mode, "refresh")
            self.assertTrue(np.array_equal(out, exact), k)
        m = self.scrape("m")
        self.assertEqual(m["blockserve_block_cache_bytes"], before["blockserve_block_cache_bytes"])
        self.assertEqual(m["blockserve_block_cache_eviction_count"],
                         before["blockserve_block_cache_eviction_count"])
        self.assertEqual(m["blockserve_block_cache_hit_count"],
                         before["blockserve_block_cache_hit_count"])
        # ending every sequence gives everything back
        for s in (1, 2, 3, 4):
            self.call(s, 9, end=True)
        m = self.scrape("m")
        self.assertEqual((m["blockserve_block_cache_bytes"], m["blockserve_sequences"]), (0, 0))


if __name__ == "__main__":
    BINARY = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
