"""What ghz, grpcurl and other standard tools are given, checked here since
the tools themselves are not installable on these machines:

- build/proto/blockserve.protoset parses as a FileDescriptorSet, is closed
  under imports and holds inference.GRPCInferenceService (every method, with
  ModelStreamInfer streaming both ways), grpc.health.v1.Health and reflection;
- build/client/sample_request.bin (ghz -B) is accepted by the server, sent as
  its exact bytes through a generic unary call;
- build/client/sample_request.json (ghz -D) and the README's inline -d JSON
  parse with protobuf's json_format into requests the server accepts.

    /usr/bin/python3 tests/client/test_tools.py BLOCKSERVE BUILD_DIR
"""

import base64
import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
import harness  # noqa: E402

import grpc  # noqa: E402
from google.protobuf import descriptor_pb2, json_format  # noqa: E402

BLOCKSERVE = BUILD = None
STUBS = tempfile.mkdtemp(prefix="bs_tools_stubs_")
harness.generate_stubs(STUBS)
import grpc_service_pb2 as pb  # noqa: E402

METHODS = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
           "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex",
           "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
           "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
           "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister"}


def readme_json_data():
    """The -d payload of the README's ghz recipe, built the way the README's
    shell builds it: 2048 zero bytes (1 x 512 x 1 x 1 FP32) in base64."""
    b64 = subprocess.run("head -c 2048 /dev/zero | base64 -w0", shell=True, check=True,
                         capture_output=True, text=True).stdout
    return ('{"model_name": "vae_mid_attention", "inputs": [{"name": "hidden_states", '
            '"datatype": "FP32", "shape": [1, 512, 1, 1]}], "raw_input_contents": ["%s"]}' % b64)


class ProtosetTest(unittest.TestCase):
    def test_protoset(self):
        fds = descriptor_pb2.FileDescriptorSet()
        with open(os.path.join(BUILD, "proto", "blockserve.protoset"), "rb") as f:
            fds.ParseFromString(f.read())
        files = {f.name: f for f in fds.file}
        for f in fds.file:  # closed under imports: ghz/grpcurl need nothing else
            for dep in f.dependency:
                self.assertIn(dep, files, "%s imports %s" % (f.name, dep))
        services = {}
        for f in fds.file:
            for s in f.service:
                services[(f.package + "." if f.package else "") + s.name] = s
        infer = services["inference.GRPCInferenceService"]
        self.assertEqual({m.name for m in infer.method}, METHODS)
        stream = [m for m in infer.method if m.name == "ModelStreamInfer"][0]
        self.assertTrue(stream.client_streaming and stream.server_streaming)
        self.assertEqual(stream.input_type, ".inference.ModelInferRequest")
        self.assertIn("grpc.health.v1.Health", services)
        self.assertIn("grpc.reflection.v1alpha.ServerReflection", services)
        self.assertIn("grpc.reflection.v1.ServerReflection", services)


class RequestFilesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.repo = tempfile.mkdtemp(prefix="bs_tools_repo_")
        subprocess.run([BLOCKSERVE, "example", "vae_mid_attention", "--out",
                        os.path.join(cls.repo, "vae_mid_attention")], check=True,
                       capture_output=True)
        cls.server = harness.Server(BLOCKSERVE, ["--model-repository", cls.repo])
        cls.channel = grpc.insecure_channel(cls.server.address)
        cls.raw_infer = cls.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                                request_serializer=None,
                                                response_deserializer=None)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        harness.shutdown(cls.server, cls.repo)

    def check_response(self, data, request):
        resp = pb.ModelInferResponse.FromString(data)
        self.assertEqual(resp.model_name, "vae_mid_attention")
        self.assertEqual(list(resp.outputs[0].shape), list(request.inputs[0].shape))
        out = np.frombuffer(resp.raw_output_contents[0], "<f4")
        self.assertEqual(out.size, int(np.prod(request.inputs[0].shape)))
        self.assertTrue(np.all(np.isfinite(out)))
        return out

    def test_binary_sample_is_accepted(self):
        with open(os.path.join(BUILD, "client", "sample_request.bin"), "rb") as f:
            data = f.read()
        req = pb.ModelInferRequest.FromString(data)
        self.assertEqual(list(req.inputs[0].shape), [1, 512, 1, 1])
        self.check_response(self.raw_infer(data, timeout=30), req)

    def test_json_sample_is_the_binary_one(self):
        with open(os.path.join(BUILD, "client", "sample_request.json")) as f:
            req = json_format.Parse(f.read(), pb.ModelInferRequest())
        with open(os.path.join(BUILD, "client", "sample_request.bin"), "rb") as f:
            self.assertEqual(req, pb.ModelInferRequest.FromString(f.read()))
        self.check_response(self.raw_infer(req.SerializeToString(), timeout=30), req)

    def test_readme_json_example_is_accepted(self):
        text = readme_json_data()
        json.loads(text)
        req = json_format.Parse(text, pb.ModelInferRequest())
        self.assertEqual(req.raw_input_contents[0], bytes(2048))
        out = self.check_response(self.raw_infer(req.SerializeToString(), timeout=30), req)
        # zero input: GroupNorm gives zeros, the attention adds its output bias
        self.assertEqual(out.shape, (512,))
        # and the README really contains this recipe
        with open(os.path.join(HERE, "..", "..", "README.md")) as f:
            readme = f.read()
        self.assertIn("head -c 2048 /dev/zero | base64 -w0", readme)
        self.assertIn('"shape": [1, 512, 1, 1]', readme)

    def test_base64_of_sample_matches(self):
        with open(os.path.join(BUILD, "client", "sample_request.json")) as f:
            js = json.load(f)
        raw = base64.b64decode(js["raw_input_contents"][0], validate=True)
        self.assertEqual(len(raw), 2048)


if __name__ == "__main__":
    BLOCKSERVE, BUILD = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    del sys.argv[1:3]
    unittest.main(verbosity=2)
