"""Overload at 3x capacity: measure the model's capacity (closed loop), then
offer three times that rate open loop (blockserve-cli bench --rps: calls start
at their scheduled times whatever the answers) against a small queue bound
(--max-queue-size 32). Admitted calls must wait at most about the queue's
drain time, rejections (RESOURCE_EXHAUSTED) must come at once, both outcomes
must be plentiful, and the server's RSS must stay flat.

    /usr/bin/python3 tests/stress/test_overload.py BLOCKSERVE_BINARY
"""

import json
import subprocess
import time

import stress_common as sc
from stress_common import MiB, mib

MODEL = "vae_mid_attention"
SHAPE = "hidden_states=1,512,16,16:FP32"  # 512 KiB in and out, ~6 ms per forward here
QUEUE = 32
CAPACITY_SECONDS = 4
CAPACITY_CONCURRENCY = 4
OVERLOAD_SECONDS = 15
OVERLOAD_FACTOR = 3
CLIENT_OVERHEAD_S = 0.05   # the bench client shares the 2 cores with the server
DRAIN_FACTOR = 3           # admitted p99 <= DRAIN_FACTOR x the queue's mean drain time (+ client)
REJECT_P99_S = 0.05


def bench(server, *args, timeout):
    cmd = [sc.cli_binary(), "bench", MODEL, "-u", server.address, "--shape", SHAPE,
           "--json"] + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not p.stdout.strip():
        raise RuntimeError("bench failed (%d): %s" % (p.returncode, p.stderr))
    return json.loads(p.stdout)


def main():
    fig = sc.Figures("overload at %dx capacity, --max-queue-size %d" % (OVERLOAD_FACTOR, QUEUE))
    repo = sc.make_repo({MODEL: ("example:" + MODEL, None)})
    sc.serve_and_run(fig, ["--max-queue-size", str(QUEUE)], repo, run)


def run(server, fig):
    bench(server, "-c", "2", "-n", "20", timeout=60)  # warm-up
    cap = bench(server, "-c", str(CAPACITY_CONCURRENCY), "-z", "%ds" % CAPACITY_SECONDS,
                timeout=60)
    capacity = cap["status_codes"].get("OK", 0) / max(cap["total_s"], 1e-9)
    fig.info("capacity, closed loop c=%d (calls/s)" % CAPACITY_CONCURRENCY, round(capacity, 1))
    fig.info("capacity run latency p50 / p99 (ms)",
             "%.1f / %.1f" % (cap["latency_ms"]["p50"], cap["latency_ms"]["p99"]))
    fig.check("capacity run: every call OK", cap["count"] - cap["status_codes"].get("OK", 0),
              "== 0 failed", cap["count"] == cap["status_codes"].get("OK", 0) and capacity > 0)
    if capacity <= 0:
        return
    rate = OVERLOAD_FACTOR * capacity

    sampler = sc.Sampler(server, period=0.25, limit=OVERLOAD_SECONDS + 60)
    t0 = time.monotonic() - sampler.t0
    ov = bench(server, "-c", "512", "-z", "%ds" % OVERLOAD_SECONDS, "--rps", "%.1f" % rate,
               timeout=OVERLOAD_SECONDS + 60)
    t1 = time.monotonic() - sampler.t0
    sampler.stop()

    codes = ov["status_codes"]
    by = ov.get("latency_ms_by_status", {})
    n = ov["count"]
    n_ok = codes.get("OK", 0)
    n_rej = codes.get("RESOURCE_EXHAUSTED", 0)
    others = {k: v for k, v in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
    goodput = n_ok / max(ov["total_s"], 1e-9)
    drain_s = QUEUE / max(goodput, 1e-9)
    ok_p99 = by.get("OK", {}).get("p99", 0) / 1e3
    rej_p99 = by.get("RESOURCE_EXHAUSTED", {}).get("p99", 0) / 1e3
    offered = n / OVERLOAD_SECONDS

    fig.info("offered rate (calls/s, 3 x capacity)", round(rate, 1))
    fig.check("achieved start rate (calls/s)", round(offered, 1), ">= 0.9 x offered (open loop)",
              offered >= 0.9 * rate)
    fig.info("call start lag behind schedule p99 / max (ms)",
             "%.1f / %.1f" % (ov.get("start_lag_ms", {}).get("p99", -1),
                              ov.get("start_lag_ms", {}).get("max", -1)))
    fig.info("calls: OK / RESOURCE_EXHAUSTED / other", "%d / %d / %d" % (n_ok, n_rej,
                                                                          sum(others.values())))
    fig.check("goodput under overload (OK/s)", round(goodput, 1),
              ">= 0.5 x capacity (%.1f)" % (0.5 * capacity), goodput >= 0.5 * capacity)
    fig.info("queue drain time Q / goodput (ms)", round(drain_s * 1e3, 1))
    # An admitted call waits behind up to QUEUE queued calls, the batch that
    # is running and the one it joins (each up to the default max batch of
    # 8), at a goodput that varies through the run: DRAIN_FACTOR x the mean
    # drain time bounds it with room for that; unbounded queueing would take
    # seconds. (2 x failed on 2 of 4 runs on a shared 2-core machine at 2.1-
    # 2.45 x with every other check passing.)
    fig.check("admitted (OK) latency p99 (ms)", round(ok_p99 * 1e3, 1),
              "<= %g x Q/goodput + %d ms client = %.1f" % (
                  DRAIN_FACTOR, CLIENT_OVERHEAD_S * 1e3,
                  (DRAIN_FACTOR * drain_s + CLIENT_OVERHEAD_S) * 1e3),
              0 < ok_p99 <= DRAIN_FACTOR * drain_s + CLIENT_OVERHEAD_S)
    fig.info("admitted (OK) latency p50 / max (ms)",
             "%.1f / %.1f" % (by.get("OK", {}).get("p50", 0), by.get("OK", {}).get("max", 0)))
    fig.check("rejected (RESOURCE_EXHAUSTED) latency p99 (ms)", round(rej_p99 * 1e3, 1),
              "<= %d" % (REJECT_P99_S * 1e3), 0 < rej_p99 <= REJECT_P99_S)
    fig.info("rejected latency p50 / max (ms)",
             "%.1f / %.1f" % (by.get("RESOURCE_EXHAUSTED", {}).get("p50", 0),
                              by.get("RESOURCE_EXHAUSTED", {}).get("max", 0)))
    fig.check("share of OK calls", round(n_ok / max(n, 1), 3), ">= 0.15", n_ok >= 0.15 * n)
    fig.check("share of RESOURCE_EXHAUSTED calls", round(n_rej / max(n, 1), 3), ">= 0.3",
              n_rej >= 0.3 * n)
    fig.check("calls with any other status", sum(others.values()), "== 0 %s" % (others or ""),
              not others)
    third = (t1 - t0) / 3
    first = sampler.window(t0, t0 + third)
    last = sampler.window(t1 - third, t1)
    growth = max(last) - max(first) if first and last else 0
    fig.info("RSS max first / last third (MiB)",
             "%.1f / %.1f" % (mib(max(first or [0])), mib(max(last or [0]))))
    # A full queue holds Q requests of 0.5 MiB (and their answers): the same in
    # both thirds; 24 MiB covers allocator and transport noise.
    fig.check("RSS growth last third vs first third (MiB)", round(mib(growth), 1), "<= 24",
              growth <= 24 * MiB)
    fig.check("server alive after the overload", server.alive(), "True", server.alive())


if __name__ == "__main__":
    main()
