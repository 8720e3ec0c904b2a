"""Shared pieces of the reliability (stress) tests: the server (through
tests/e2e/harness.py), model repositories, the process's RSS and open file
descriptors, ModelStatistics and /metrics, a raw HTTP/2 gRPC client (python3-h2)
for what grpcio cannot do (never read answers, send metadata grpcio refuses),
and a table of figures: every test prints what it measured, the number and its
bound, then fails if any bound is not met.

Everything talks to 127.0.0.1 only; every loop is bounded in count and time.
"""

import atexit
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))

import harness  # noqa: E402

import grpc  # noqa: E402  (before the stubs path: nothing may shadow it)

_STUBS = tempfile.mkdtemp(prefix="bs_stress_stubs_")
atexit.register(shutil.rmtree, _STUBS, True)
harness.generate_stubs(_STUBS)

import grpc_service_pb2 as pb  # noqa: E402
import grpc_service_pb2_grpc as pb_grpc  # noqa: E402,F401  (the tests use sc.pb_grpc)

MiB = 1 << 20
SERVICE = "/inference.GRPCInferenceService/"


def binary():
    if len(sys.argv) < 2:
        sys.exit("usage: %s BLOCKSERVE_BINARY" % sys.argv[0])
    return os.path.abspath(sys.argv[1])


def cli_binary():
    """blockserve-cli: $BS_CLI (CTest sets it), else beside blockserve in the build tree."""
    return os.environ.get("BS_CLI") or os.path.join(os.path.dirname(binary()), "client",
                                                    "blockserve-cli")


# -- model repositories ---------------------------------------------------------

def make_repo(models):
    """A temporary repository: models = {name: (source, serving dict or None)},
    source "example:NAME" (blockserve example: generated weights) or a golden
    case directory name."""
    root = tempfile.mkdtemp(prefix="bs_stress_repo_")
    for name, (source, serving) in models.items():
        dst = os.path.join(root, name)
        if source.startswith("example:"):
            subprocess.run([binary(), "example", source[len("example:"):], "--out", dst],
                           check=True, stdout=subprocess.DEVNULL, timeout=120)
        else:
            shutil.copytree(os.path.join(harness.GOLDEN, source), dst)
        if serving:
            with open(os.path.join(dst, "serving.json"), "w") as f:
                json.dump(serving, f)
    return root


def golden_inputs(case):
    return harness.st_load(os.path.join(harness.GOLDEN, case, "inputs.safetensors"))


def infer_request(model, inputs, rid="", params=None):
    """A ModelInferRequest from {name: (st dtype, array)}, raw contents."""
    req = pb.ModelInferRequest(model_name=model, id=rid)
    for name, (dt, arr) in inputs.items():
        req.inputs.add(name=name, datatype=harness.TRITON_DTYPE[dt], shape=list(arr.shape))
        req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    for k, v in (params or {}).items():
        req.parameters[k].int64_param = v
    return req


def vae_inputs(side, seed=0):
    """vae_mid_attention's input: hidden_states [1, 512, side, side] (side^2 * 2 KiB)."""
    x = np.random.RandomState(seed).standard_normal((1, 512, side, side)).astype("<f4")
    return {"hidden_states": ("F32", x)}


# -- the server ---------------------------------------------------------------

class Server(harness.Server):
    """harness.Server plus the process's figures."""

    @property
    def pid(self):
        return self.proc.pid

    def rss(self):
        """VmRSS in bytes (0 once the process is gone)."""
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def fds(self):
        try:
            return len(os.listdir("/proc/%d/fd" % self.pid))
        except OSError:
            return 0

    def alive(self):
        return self.proc.poll() is None

    def channel(self, **opts):
        o = [("grpc.max_send_message_length", 256 * MiB),
             ("grpc.max_receive_message_length", 256 * MiB)]
        o += list(opts.items())
        return grpc.insecure_channel(self.address, options=o)

    def metrics(self):
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port,
                                    timeout=10) as r:
            return parse_metrics(r.read().decode())


def start_server(args, repo=None):
    extra = ["--model-repository", repo] if repo else []
    return Server(binary(), extra + list(args))


class Sampler:
    """RSS and open fds of the server every `period` seconds on a thread
    (bounded by `limit` seconds), as (t, rss, fds) rows."""

    def __init__(self, server, period=0.25, limit=600):
        self.server, self.period, self.limit = server, period, limit
        self.rows = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()
        self._t.start()

    def _run(self):
        while not self._stop.is_set() and time.monotonic() - self.t0 < self.limit:
            self.rows.append((time.monotonic() - self.t0, self.server.rss(), self.server.fds()))
            self._stop.wait(self.period)

    def stop(self):
        self._stop.set()
        self._t.join()
        return self.rows

    def window(self, a, b, col=1):
        """Values of column col (1 rss, 2 fds) with a <= t < b."""
        return [r[col] for r in self.rows if a <= r[0] < b]


# -- statistics -------------------------------------------------------------------

SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """Prometheus text -> {(name, frozenset(labels.items())): value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if m:
            out[(m.group(1), frozenset(LABEL_RE.findall(m.group(2) or "")))] = float(m.group(3))
    return out


def metric(samples, name, **labels):
    """One series' value, None when absent."""
    return samples.get((name, frozenset(labels.items())))


def metric_sum(samples, name, **labels):
    """The sum over every series of name whose labels include labels, None when none."""
    vals = [v for (n, ls), v in samples.items()
            if n == name and set(labels.items()) <= set(ls)]
    return sum(vals) if vals else None


def model_stats(stub, model):
    r = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    return r.model_stats[0]


def rpc_code(e):
    return e.code().name if isinstance(e, grpc.RpcError) else type(e).__name__


# -- the table of figures ---------------------------------------------------------

class Figures:
    """Collects (what, value, bound, ok) rows; report() prints them and fails
    the test (exit 1) if any bound is not met."""

    def __init__(self, title):
        self.title = title
        self.rows = []
        self.notes = []

    def check(self, what, value, bound, ok):
        self.rows.append((what, _fmt(value), bound, bool(ok)))
        return ok

    def info(self, what, value):
        self.rows.append((what, _fmt(value), "", None))

    def note(self, text):
        self.notes.append(text)

    def report(self):
        w0 = max([len(r[0]) for r in self.rows] + [8])
        w1 = max([len(r[1]) for r in self.rows] + [6])
        w2 = max([len(r[2]) for r in self.rows] + [5])
        print("\n== %s ==" % self.title)
        print("%-*s  %*s  %-*s  %s" % (w0, "measured", w1, "value", w2, "bound", "result"))
        for what, value, bound, ok in self.rows:
            res = "" if ok is None else ("ok" if ok else "FAIL")
            print("%-*s  %*s  %-*s  %s" % (w0, what, w1, value, w2, bound, res))
        for n in self.notes:
            print("note: " + n)
        failed = [r[0] for r in self.rows if r[3] is False]
        sys.stdout.flush()
        if failed:
            print("FAILED: " + "; ".join(failed))
            sys.exit(1)
        print("PASSED")


def _fmt(v):
    if isinstance(v, float):
        return "%.3f" % v if abs(v) < 100 else "%.1f" % v
    return str(v)


def mib(b):
    return b / MiB


# -- raw HTTP/2 gRPC client -------------------------------------------------------

def grpc_frame(msg):
    """One length-prefixed gRPC message (uncompressed)."""
    return b"\0" + struct.pack(">I", len(msg)) + msg


class H2Call:
    """What one HTTP/2 stream of H2Client received."""

    def __init__(self):
        self.headers = []
        self.trailers = []
        self.data = bytearray()
        self.ended = False
        self.reset = None  # RST_STREAM error code

    def status(self):
        """(grpc-status int, grpc-message) from the trailers (or a
        trailers-only answer), None when none came."""
        for hs in (self.trailers, self.headers):
            d = {k: v for k, v in hs}
            if b"grpc-status" in d:
                return int(d[b"grpc-status"]), d.get(b"grpc-message", b"").decode("latin-1")
        return None

    def messages(self):
        """The complete gRPC messages received so far."""
        out, i, d = [], 0, bytes(self.data)
        while i + 5 <= len(d):
            n = struct.unpack(">I", d[i + 1:i + 5])[0]
            if i + 5 + n > len(d):
                break
            out.append(d[i + 5:i + 5 + n])
            i += 5 + n
        return out


class H2Client:
    """A minimal gRPC client on python3-h2 over a plain socket. It never
    acknowledges received data (no WINDOW_UPDATE) unless `read` is true, so a
    server can send it at most the initial windows (`window` per stream, 65535
    for the connection): a client that never reads its answers."""

    def __init__(self, port, window=65535, read=True, headers_validation=True):
        import h2.config
        import h2.connection
        import h2.settings
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                        validate_outbound_headers=headers_validation,
                                        normalize_outbound_headers=headers_validation)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                                         h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.conn.initiate_connection()
        self.read = read
        self.port = port
        self.calls = {}
        self.closed = False
        self.goaway = None
        self.received_bytes = 0
        self._flush()

    def _flush(self):
        out = self.conn.data_to_send()
        if out and not self.closed:
            try:
                self.sock.sendall(out)
            except OSError:
                self.closed = True

    def pump(self, timeout):
        """Read what the server sent within timeout seconds and handle it."""
        import h2.events
        if self.closed:
            time.sleep(timeout)
            return
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return
        try:
            data = self.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        import h2.exceptions
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            # h2 takes a GOAWAY as the end of the connection and refuses the
            # frames a server still sends after it: stop here
            self.closed = True
            return
        for ev in events:
            c = self.calls.get(getattr(ev, "stream_id", None))
            if isinstance(ev, h2.events.ResponseReceived) and c:
                c.headers = list(ev.headers)
            elif isinstance(ev, h2.events.TrailersReceived) and c:
                c.trailers = list(ev.headers)
            elif isinstance(ev, h2.events.DataReceived) and c:
                c.data += ev.data
                self.received_bytes += len(ev.data)
                if self.read:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and c:
                c.ended = True
            elif isinstance(ev, h2.events.StreamReset) and c:
                c.reset = ev.error_code
                c.ended = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev.error_code
        self._flush()

    def start(self, method, metadata=()):
        """Open a call: its stream id."""
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(b":method", b"POST"), (b":scheme", b"http"),
                (b":path", (SERVICE + method).encode()),
                (b":authority", b"127.0.0.1:%d" % self.port),
                (b"content-type", b"application/grpc"), (b"te", b"trailers")]
        hdrs += [(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v)
                 for k, v in metadata]
        self.conn.send_headers(sid, hdrs)
        self.calls[sid] = H2Call()
        self._flush()
        return sid

    def send(self, sid, payload, end=False, deadline=None):
        """Send payload on stream sid as flow control allows, pumping while
        the window is closed. Returns True when all of it went out, False when
        deadline (monotonic) passed first or the stream or connection ended."""
        import h2.exceptions
        view = memoryview(payload)
        while True:
            if self.closed or self.calls[sid].ended:
                return False
            try:
                win = self.conn.local_flow_control_window(sid)
            except h2.exceptions.StreamClosedError:
                return False
            n = min(win, self.conn.max_outbound_frame_size, len(view))
            if n > 0 or (len(view) == 0 and end):
                last = end and n == len(view)
                self.conn.send_data(sid, bytes(view[:n]), end_stream=last)
                view = view[n:]
                self._flush()
                if len(view) == 0:
                    return True
                self.pump(0)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.pump(0.02)

    def end(self, sid):
        self.conn.end_stream(sid)
        self._flush()

    def unary(self, method, msg, metadata=(), timeout=30):
        """A whole unary call: (H2Call) once it ended or timeout passed."""
        sid = self.start(method, metadata)
        self.send(sid, grpc_frame(msg), end=True, deadline=time.monotonic() + timeout)
        deadline = time.monotonic() + timeout
        c = self.calls[sid]
        while not c.ended and not self.closed and time.monotonic() < deadline:
            self.pump(0.05)
        return c

    def close(self):
        if not self.closed:
            try:
                self.conn.close_connection()
                self._flush()
            except Exception:
                pass
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def serve_and_run(fig, args, repo, run):
    """Start the server on repo with args, run(server, fig), stop it (SIGTERM,
    whose exit code must be 0), remove repo, and report the figures."""
    server = start_server(args, repo)
    try:
        run(server, fig)
    finally:
        code = server.stop()
        shutil.rmtree(repo, ignore_errors=True)
    fig.check("server exit code after SIGTERM", code, "== 0", code == 0)
    if code != 0:
        print(server.text()[-4000:])
    fig.report()
