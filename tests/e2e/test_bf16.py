"""A model served in BF16 on the CPU (`"dtype": "bf16"` in its serving
settings) next to FP32 models: it answers FP32 and BF16 requests within the
BF16 tolerance of the golden outputs, a BF16 request gives bit for bit what
the FP32 request of the same (bf16-representable) values gives (the wire's
BF16 goes straight into the engine's input staging), the FP32 models stay
exact, and a model asking for fp16 on the CPU fails to load with a reason.
A second server runs with BS_CPU_ISA=avx2 (the path of CPUs without
AVX512_BF16) and must say so in one log line and answer within the same
tolerance.

    /usr/bin/python3 tests/e2e/test_bf16.py BLOCKSERVE_BINARY
"""

import os
import sys
import tempfile
import unittest

import numpy as np

import harness

import grpc  # noqa: E402

STUBS = tempfile.mkdtemp(prefix="bs_stubs_")
harness.generate_stubs(STUBS)

import grpc_service_pb2 as pb  # noqa: E402
import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

BINARY = None
FP32_TOL = 1e-4
# Max abs error over max(1, max |expected|) of BF16 models on the golden
# cases; the golden tests (tests/CMakeLists.txt, golden_bf16_*) state how it
# was measured.
BF16_TOL = 2e-2
BF16_CASES = ["btb_geglu_cross", "btb_ada_norm_zero_dit", "attnblock_4heads", "btb_mask_bool"]
FP32_CASES = ["btb_self_only"]


def to_bf16(arr):
    """F32 array -> (uint16 BF16 bits rounded to nearest even, the F32 value
    those bits stand for)."""
    u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    return bits, back


# Inputs a pipeline sends in its activation dtype; timesteps stay FP32 (999
# is 1000 in BF16, which moves the sinusoidal embedding far more than BF16
# compute does).
ACTIVATIONS = {"hidden_states", "encoder_hidden_states", "x", "emb"}


def request(model, inputs, bf16=False):
    """A raw-contents request; with bf16, the activations travel as BF16."""
    req = pb.ModelInferRequest(model_name=model)
    for name, (dt, arr) in inputs.items():
        if dt == "F32" and bf16 and name in ACTIVATIONS:
            bits, _ = to_bf16(arr)
            req.inputs.add(name=name, datatype="BF16", shape=list(arr.shape))
            req.raw_input_contents.append(bits.tobytes())
            continue
        req.inputs.add(name=name, datatype=harness.TRITON_DTYPE[dt], shape=list(arr.shape))
        req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    return req


def output_of(resp):
    out = resp.outputs[0]
    assert out.datatype == "FP32", out.datatype
    return np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(list(out.shape))


def golden(case):
    d = os.path.join(harness.GOLDEN, case)
    return (harness.st_load(os.path.join(d, "inputs.safetensors")),
            harness.st_load(os.path.join(d, "expected.safetensors"))["output"][1])


def rel_err(got, want):
    want = want.astype(np.float64)
    return float(np.max(np.abs(got.astype(np.float64) - want)) / max(1.0, np.max(np.abs(want))))


class Bf16Server:
    def start(self, env=None):
        serving = {c: {"dtype": "bf16"} for c in BF16_CASES}
        serving["btb_stack3"] = {"dtype": "fp16"}
        self.repo = harness.make_repository(BF16_CASES + FP32_CASES + ["btb_stack3"], serving,
                                            broken=False)
        old = dict(os.environ)
        os.environ.update(env or {})
        try:
            self.server = harness.Server(BINARY, ["--model-repository", self.repo])
        finally:
            os.environ.clear()
            os.environ.update(old)
        self.channel = grpc.insecure_channel(self.server.address, options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def stop(self):
        self.channel.close()
        harness.shutdown(self.server, self.repo)


class ServedBf16Test(unittest.TestCase):
    env = {}

    @classmethod
    def setUpClass(cls):
        cls.s = Bf16Server()
        cls.s.start(cls.env)

    @classmethod
    def tearDownClass(cls):
        cls.s.stop()

    def test_fp32_and_bf16_requests(self):
        for case in BF16_CASES:
            inputs, want = golden(case)
            got32 = output_of(self.s.stub.ModelInfer(request(case, inputs)))
            err32 = rel_err(got32, want)
            self.assertLessEqual(err32, BF16_TOL, case)
            # A BF16 model is not an FP32 model: on these random weights its
            # error is well above FP32 rounding (else the model ran in FP32).
            self.assertGreater(err32, 1e-5, case)
            got16 = output_of(self.s.stub.ModelInfer(request(case, inputs, bf16=True)))
            self.assertLessEqual(rel_err(got16, want), BF16_TOL + 2 ** -8, case)
            # The same values sent as FP32 give the same answer bit for bit.
            rounded = {n: (dt, to_bf16(a)[1] if dt == "F32" and n in ACTIVATIONS else a)
                       for n, (dt, a) in inputs.items()}
            got_r = output_of(self.s.stub.ModelInfer(request(case, rounded)))
            np.testing.assert_array_equal(got16, got_r, err_msg=case)

    def test_fp32_model_stays_exact(self):
        for case in FP32_CASES:
            inputs, want = golden(case)
            got = output_of(self.s.stub.ModelInfer(request(case, inputs)))
            self.assertLessEqual(float(np.max(np.abs(got - want))), FP32_TOL, case)

    def test_fp16_model_refused(self):
        idx = {m.name: m for m in self.s.stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        self.assertEqual(idx["btb_stack3"].state, "UNAVAILABLE")
        self.assertIn("fp16", idx["btb_stack3"].reason)
        self.assertIn("fp32 or bf16", idx["btb_stack3"].reason)
        self.assertEqual(idx["btb_geglu_cross"].state, "READY")

    def test_log_says_dtype(self):
        text = self.s.server.text()
        self.assertRegex(text, r"model btb_geglu_cross ready \(BasicTransformerBlock, bf16, ")
        self.assertRegex(text, r"model btb_self_only ready \(BasicTransformerBlock, fp32, ")
        self.assertEqual(text.count("bf16 models:"), 1, text)


class ServedBf16Avx2Test(ServedBf16Test):
    """The same on the path of CPUs without AVX512_BF16."""
    env = {"BS_CPU_ISA": "avx2"}

    def test_log_says_dtype(self):
        super().test_log_says_dtype()
        self.assertIn("no AVX512_BF16", self.s.server.text())
        self.assertIn("avx2 path", self.s.server.text())


if __name__ == "__main__":
    BINARY = sys.argv.pop(1)
    unittest.main(verbosity=2)
