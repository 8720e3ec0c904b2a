"""Shared pieces of the end-to-end tests: stubs generated from our proto/ at
run time, a model repository built from the golden cases, the server process,
and safetensors reading."""

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
GOLDEN = os.path.join(ROOT, "tests", "golden")
GRPC_PROTO = "/usr/share/grpc-proto"


def generate_stubs(out):
    """grpc_service/model_config stubs and grpc health/reflection stubs into
    out. The grpc protos are copied to top-level names (health.proto,
    reflection_v1.proto, reflection_v1alpha.proto) so that their Python
    modules do not shadow the grpc package; the wire names come from the
    proto packages and stay the same."""
    from grpc_tools import protoc

    src = os.path.join(out, "src")
    os.makedirs(src)
    copies = {"grpc/health/v1/health.proto": "health.proto",
              "grpc/reflection/v1/reflection.proto": "reflection_v1.proto",
              "grpc/reflection/v1alpha/reflection.proto": "reflection_v1alpha.proto"}
    for a, b in copies.items():
        shutil.copy(os.path.join(GRPC_PROTO, a), os.path.join(src, b))
    args = ["protoc", "-I" + os.path.join(ROOT, "proto"), "-I" + src,
            "--python_out=" + out, "--grpc_python_out=" + out,
            "grpc_service.proto", "model_config.proto"] + list(copies.values())
    if protoc.main(args) != 0:
        raise RuntimeError("grpc_tools.protoc failed")
    sys.path.append(out)


ST_DTYPES = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "BOOL": "|b1", "BF16": "<u2"}


def st_load(path):
    """safetensors -> {name: (dtype name, numpy array)}."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        arr = np.frombuffer(data[8 + n + b:8 + n + e], dtype=ST_DTYPES[meta["dtype"]])
        out[name] = (meta["dtype"], arr.reshape(meta["shape"]))
    return out


TRITON_DTYPE = {"F32": "FP32", "F16": "FP16", "BF16": "BF16", "I64": "INT64", "BOOL": "BOOL"}


def make_repository(cases, serving=None, broken=True):
    """A temporary model repository holding copies of golden cases (serving:
    {case: serving.json dict}) and, with broken, a model that cannot load."""
    root = tempfile.mkdtemp(prefix="bs_repo_")
    for case in cases:
        shutil.copytree(os.path.join(GOLDEN, case), os.path.join(root, case))
        if serving and case in serving:
            with open(os.path.join(root, case, "serving.json"), "w") as f:
                json.dump(serving[case], f)
    if broken:
        os.makedirs(os.path.join(root, "broken"))
        with open(os.path.join(root, "broken", "config.json"), "w") as f:
            f.write('{"_class_name": "BasicTransformerBlock", "dim": 32}')
    return root


def free_port():
    """A TCP port nothing listens on now (another process may still take it:
    Server retries)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """blockserve serve on a free port; stop() sends SIGTERM and returns the exit code.
    Metrics and HTTP/REST go to free ports too (metrics_port, http_port; None
    with --no-metrics, --http-port 0)."""

    def __init__(self, binary, args):
        for attempt in range(3):
            extra = []
            if "--metrics-port" not in args and "--no-metrics" not in args:
                extra = ["--metrics-port", str(free_port())]
            if "--http-port" not in args:
                extra += ["--http-port", str(free_port())]
            try:
                self._start(binary, extra + list(args))
                return
            except RuntimeError as e:
                busy = "metrics: cannot listen" in str(e) or "http: cannot listen" in str(e)
                if not extra or not busy or attempt == 2:
                    raise

    def _start(self, binary, args):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([binary, "serve", "--grpc-port", "0", "--grpc-address",
                                      "127.0.0.1"] + args, stdout=self.log, stderr=self.log)
        self.port = None
        deadline = time.time() + 120
        while time.time() < deadline and self.port is None:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.text())
            m = re.search(r"serving \d+ models on [0-9.]+:(\d+)", self.text())
            if m:
                self.port = int(m.group(1))
            else:
                time.sleep(0.05)
        if self.port is None:
            self.proc.kill()
            raise RuntimeError("server did not start: " + self.text())
        self.address = "127.0.0.1:%d" % self.port
        m = re.search(r"metrics on http://[0-9.]+:(\d+)/metrics", self.text())
        self.metrics_port = int(m.group(1)) if m else None
        m = re.search(r"HTTP on https?://[0-9.]+:(\d+)/v2", self.text())
        self.http_port = int(m.group(1)) if m else None

    def text(self):
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def shutdown(server, *dirs):
    """End a test class's server: stop it, remove dirs, and fail (with its log)
    unless it exited 0."""
    code = server.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    if code != 0:
        raise AssertionError("server exit code %r\n%s" % (code, server.text()))
