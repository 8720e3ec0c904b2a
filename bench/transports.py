"""The same inferences over four transports, in one run against one server:
gRPC (raw tensor bytes), HTTP with Triton's binary tensor extension, HTTP
with JSON tensors, and system shared memory (the inputs and the output in a
POSIX shared memory region, the message carrying only their names), for two
workloads: the DiT-XL/2 block (256 tokens x 1152) and the SD-1.5
down-block-0 block at 4,096 tokens (64 x 64 latents, 320 channels, context
77 x 768). The load comes from blockserve-cli bench (C, one thread), so the
client's own cost is the same small C code for every transport.

Per workload, concurrency (1 and 4; the server runs one request at a time,
--max-batch-size 1, so that compute per request is the same in every row)
and transport it prints requests/s, latency p50/p99 and the
server's mean compute time per request (ModelStatistics' compute_infer
over the run), so that latency minus compute is what the transport and
queueing cost. Rounds alternate the transports, so that machine noise
spreads over all of them; each line is the median of the rounds.

  /usr/bin/python3 bench/transports.py build/blockserve [--rounds R] [--quick]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
import harness  # noqa: E402

WORKLOADS = [
    # name, model, CLI shapes, requests per round and concurrency
    ("DiT-XL/2 block, 256 tokens", "dit_xl_block",
     ["hidden_states=1,256,1152:FP32", "timestep=1:INT64", "class_labels=1:INT64"], 24),
    ("SD-1.5 down-block-0, 4096 tokens", "sd15_down0_block",
     ["hidden_states=1,4096,320:FP32", "encoder_hidden_states=1,77,768:FP32"], 12),
]
TRANSPORTS = [
    ("gRPC", []),
    ("HTTP binary", ["--http"]),
    ("HTTP JSON", ["--http-json"]),
    ("shared memory (gRPC)", ["--shm"]),
    ("shared memory (HTTP)", ["--http", "--shm"]),
]
CONCURRENCY = (1, 4)  # 1: what one call costs; 4: throughput with a queue


def compute_ns(http_port, model):
    """(count, ns) of the model's compute_infer statistics, over HTTP."""
    with urllib.request.urlopen("http://127.0.0.1:%d/v2/models/%s/stats" % (http_port, model)) as r:
        st = json.load(r)["model_stats"][0]["inference_stats"]["compute_infer"]
    return int(st.get("count", 0)), int(st.get("ns", 0))


def run(cli, srv, http_port, model, shapes, n, c, extra):
    url = ("127.0.0.1:%d" % http_port) if ("--http" in extra or "--http-json" in extra) \
        else srv.address
    cmd = [cli, "bench", model, "-c", str(c), "-n", str(n), "--json", "-u", url,
           "--timeout", "600", "--seed", "1"] + extra
    for s in shapes:
        cmd += ["--shape", s]
    before = compute_ns(http_port, model)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit("bench failed: %s\n%s%s" % (" ".join(cmd), p.stdout, p.stderr))
    after = compute_ns(http_port, model)
    r = json.loads(p.stdout)
    batches = max(after[0] - before[0], 1)
    return {"rps": r["rps"], "p50": r["latency_ms"]["p50"], "p99": r["latency_ms"]["p99"],
            "compute_ms": (after[1] - before[1]) / 1e6 / batches}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default="build/blockserve")
    ap.add_argument("--cli", default=None, help="blockserve-cli (default: beside the binary)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="one round of two requests at 16 and 64 tokens (a smoke test)")
    a = ap.parse_args()
    binary = os.path.abspath(a.binary)
    cli = a.cli or os.path.join(os.path.dirname(binary), "client", "blockserve-cli")
    rounds = 1 if a.quick else a.rounds
    http_port = harness.free_port()
    srv = harness.Server(binary, ["--http-port", str(http_port), "--max-batch-size", "1"])
    try:
        print("loadavg before: %.1f" % os.getloadavg()[0])
        for (title, model, shapes, n), c in [(w, c) for w in WORKLOADS for c in CONCURRENCY]:
            if a.quick:  # a smoke test, also under the sanitizers: few small requests
                n = 2
                shapes = [x.replace("1,256,1152", "1,16,1152").replace("1,4096,320", "1,64,320")
                          for x in shapes]
            res = {t: [] for t, _ in TRANSPORTS}
            run(cli, srv, http_port, model, shapes, 2, 1, [])  # warm up
            for _ in range(rounds):
                for t, extra in TRANSPORTS:
                    res[t].append(run(cli, srv, http_port, model, shapes, n, c, extra))
            print("\n%s (%s), concurrency %d, %d requests x %d rounds (medians)" %
                  (title, model, c, n, rounds))
            print("| transport | req/s | p50 ms | p99 ms | compute ms/request | p50 - compute ms |")
            print("|---|---|---|---|---|---|")
            for t, _ in TRANSPORTS:
                med = {k: statistics.median(x[k] for x in res[t]) for k in res[t][0]}
                print("| %s | %.2f | %.1f | %.1f | %.1f | %.1f |" %
                      (t, med["rps"], med["p50"], med["p99"], med["compute_ms"],
                       med["p50"] - med["compute_ms"]))
        print("\nloadavg after: %.1f" % os.getloadavg()[0])
    finally:
        rc = srv.stop()
    if rc != 0:
        raise SystemExit("server exit status %d" % rc)


if __name__ == "__main__":
    main()
