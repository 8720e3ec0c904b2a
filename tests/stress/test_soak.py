"""Soak (~60 s) with cancellations and deadlines: unary and stream calls to
two models, some with 1 ms gRPC deadlines, some cancelled by the client just
after sending, some invalid (wrong shape, unknown input), some for an unknown
model; and, on a third model that gets no other traffic, calls that use only
the server-side `timeout` request parameter. At the end ModelStatistics and
/metrics must agree exactly per model, both must agree with what the clients
saw (exactly for the timeout-only model), and the server's RSS and open file
descriptors must be flat after warm-up.

    /usr/bin/python3 tests/stress/test_soak.py BLOCKSERVE_BINARY
    (BS_SOAK_SECONDS=N changes the 60 s, for trying things out)
"""

import os
import random
import threading
import time

import numpy as np

import stress_common as sc
from stress_common import MiB, mib

import grpc

SECONDS = float(os.environ.get("BS_SOAK_SECONDS", "60"))
A = "soak_a"  # btb_geglu_cross: small and fast, batched
B = "soak_b"  # vae_mid_attention on 8x8 (128 KiB in and out), a few ms
T = "soak_t"  # vae_mid_attention, batch 1: only `timeout`-parameter traffic
WORKERS_AB = 4
WORKERS_T = 2
RSS_MARGIN = 16 * MiB
FD_MARGIN = 4


class Tally:
    """What the clients saw, per model."""

    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}

    def add(self, model, key, n=1):
        with self.lock:
            d = self.c.setdefault(model, {})
            d[key] = d.get(key, 0) + n

    def get(self, model, key):
        return self.c.get(model, {}).get(key, 0)

    def keys(self, model):
        return dict(self.c.get(model, {}))


def inputs_for(model):
    if model == A:
        return sc.golden_inputs("btb_geglu_cross")
    return sc.vae_inputs(8, seed=1)


def bad_request(model, rng):
    """An invalid request: a wrong shape or an unknown input name."""
    ins = dict(inputs_for(model))
    if rng.random() < 0.5:
        dt, arr = ins["hidden_states"]
        ins["hidden_states"] = (dt, np.zeros(arr.shape[:-1] + (arr.shape[-1] + 3,), arr.dtype))
    else:
        ins["no_such_input"] = ins["hidden_states"]
    return sc.infer_request(model, ins)


def worker_ab(server, stop, tally, seed):
    """Mixed traffic to A and B until stop; every call's outcome into tally."""
    rng = random.Random(seed)
    channel = server.channel()
    stub = sc.pb_grpc.GRPCInferenceServiceStub(channel)
    good = {m: sc.infer_request(m, inputs_for(m)) for m in (A, B)}
    while not stop.is_set():
        m = A if rng.random() < 0.5 else B
        x = rng.random()
        if x < 0.30:      # plain unary
            unary(stub, tally, m, good[m], timeout=30, kind="plain")
        elif x < 0.45:    # 1 ms gRPC deadline
            unary(stub, tally, m, good[m], timeout=0.001, kind="deadline")
        elif x < 0.60:    # cancelled just after sending
            tally.add(m, "attempts")
            fut = stub.ModelInfer.future(good[m], timeout=30)
            time.sleep(rng.uniform(0, 0.003))
            if fut.cancel():
                tally.add(m, "gaveup")
            else:
                outcome(tally, m, fut, kind="cancel-late")
        elif x < 0.70:    # invalid
            unary(stub, tally, m, bad_request(m, rng), timeout=30, kind="invalid")
        elif x < 0.72:    # an unknown model: counted nowhere per model
            tally.add("_unrouted", "attempts")
            try:
                stub.ModelInfer(sc.pb.ModelInferRequest(model_name="no_such_model"), timeout=30)
                tally.add("_unrouted", "OK")
            except grpc.RpcError as e:
                tally.add("_unrouted", e.code().name)
        else:             # a stream of 1-6 messages, some invalid, sometimes cancelled
            stream(stub, tally, m, good[m], rng)
    channel.close()


def unary(stub, tally, m, req, timeout, kind):
    tally.add(m, "attempts")
    fut = stub.ModelInfer.future(req, timeout=timeout)
    outcome(tally, m, fut, kind)


def outcome(tally, m, fut, kind):
    try:
        fut.result()
        tally.add(m, "OK")
    except grpc.RpcError as e:
        code = e.code()
        if kind in ("deadline", "cancel-late") and code in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                                            grpc.StatusCode.CANCELLED):
            tally.add(m, "gaveup")  # the server may have answered it anyway
        else:
            tally.add(m, "server_error")
            tally.add(m, "code_" + code.name)


def stream(stub, tally, m, good, rng):
    n = rng.randint(1, 6)
    msgs = [bad_request(m, rng) if rng.random() < 0.2 else good for _ in range(n)]
    cancel_after = rng.randint(0, n - 1) if rng.random() < 0.3 else None
    tally.add(m, "attempts", n)
    tally.add(m, "streams")
    it = stub.ModelStreamInfer(iter(msgs), timeout=30)
    got = 0
    try:
        for r in it:
            got += 1
            if r.error_message:
                tally.add(m, "server_error")
                tally.add(m, "stream_error_message")
            else:
                tally.add(m, "OK")
            if cancel_after is not None and got > cancel_after:
                it.cancel()
                break
    except grpc.RpcError as e:
        if e.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            tally.add(m, "stream_status_" + e.code().name)
    if got < n:
        tally.add(m, "gaveup", n - got)  # sent, answer never read
    if cancel_after is not None:
        tally.add(m, "streams_cancelled")


def worker_t(server, stop, tally, seed):
    """Only the `timeout` parameter (no client deadline that can fire: 300 s, no
    cancel) to T: the clients see every outcome, so the counts must match exactly."""
    rng = random.Random(seed)
    channel = server.channel()
    stub = sc.pb_grpc.GRPCInferenceServiceStub(channel)
    ins = inputs_for(T)

    def req():
        t = rng.choice([1, 100, 1000, 10000, 10000000])
        return sc.infer_request(T, ins, params={"timeout": t})

    while not stop.is_set():
        if rng.random() < 0.6:
            tally.add(T, "attempts")
            try:
                stub.ModelInfer(req(), timeout=300)
                tally.add(T, "OK")
            except grpc.RpcError as e:
                tally.add(T, "server_error")
                tally.add(T, "code_" + e.code().name)
        else:
            n = rng.randint(1, 6)
            tally.add(T, "attempts", n)
            got = 0
            try:
                for r in stub.ModelStreamInfer(iter([req() for _ in range(n)]), timeout=300):
                    got += 1
                    if r.error_message:
                        tally.add(T, "server_error")
                        tally.add(T, "stream_error_message")
                    else:
                        tally.add(T, "OK")
            except grpc.RpcError as e:
                tally.add(T, "stream_status_" + e.code().name)
            if got != n:
                tally.add(T, "unanswered", n - got)
    channel.close()


def churn(server, stop, tally):
    """A fresh connection every ~2 s: one call, then closed."""
    while not stop.wait(2.0):
        ch = server.channel()
        try:
            sc.pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(sc.pb.ServerLiveRequest(),
                                                               timeout=10)
        except grpc.RpcError:
            tally.add("_churn", "failed")
        ch.close()


def settled_counts(server, stub, models):
    """ModelStatistics and /metrics once they stop moving (cancelled calls may
    still be finishing on the server), at most 15 s."""
    prev, t_end = None, time.monotonic() + 15
    while True:
        stats = {m: sc.model_stats(stub, m) for m in models}
        samples = server.metrics()
        stats2 = {m: sc.model_stats(stub, m) for m in models}
        key = [(s.inference_stats.success.count, s.inference_stats.fail.count) for s in
               stats.values()]
        key2 = [(s.inference_stats.success.count, s.inference_stats.fail.count) for s in
                stats2.values()]
        pending = sum(sc.metric(samples, "nv_inference_pending_request_count", model=m,
                                version="1") or 0 for m in models)
        if (key == key2 and key == prev and pending == 0) or time.monotonic() > t_end:
            return stats, samples
        prev = key
        time.sleep(0.5)


def main():
    fig = sc.Figures("soak %ds: cancellations, deadlines, invalid calls" % SECONDS)
    repo = sc.make_repo({
        A: ("btb_geglu_cross", {"max_batch_size": 4, "max_queue_delay_microseconds": 500}),
        B: ("example:vae_mid_attention", {"max_batch_size": 4,
                                          "max_queue_delay_microseconds": 500}),
        T: ("example:vae_mid_attention", {"max_batch_size": 1}),
    })
    sc.serve_and_run(fig, [], repo, run)


def run(server, fig):
    tally = Tally()
    stop = threading.Event()
    sampler = sc.Sampler(server, period=0.5, limit=SECONDS + 120)
    threads = [threading.Thread(target=worker_ab, args=(server, stop, tally, i), daemon=True)
               for i in range(WORKERS_AB)]
    threads += [threading.Thread(target=worker_t, args=(server, stop, tally, 100 + i),
                                 daemon=True) for i in range(WORKERS_T)]
    threads.append(threading.Thread(target=churn, args=(server, stop, tally), daemon=True))
    t0 = time.monotonic() - sampler.t0
    for t in threads:
        t.start()
    stop.wait(SECONDS)
    stop.set()
    t1 = time.monotonic() - sampler.t0
    for t in threads:
        t.join(120)
    hung = sum(t.is_alive() for t in threads)
    fig.check("client threads still running 120 s after the end", hung, "== 0", hung == 0)

    channel = server.channel()
    stub = sc.pb_grpc.GRPCInferenceServiceStub(channel)
    stats, samples = settled_counts(server, stub, [A, B, T])
    sampler.stop()

    for m in (A, B, T):
        st = stats[m]
        succ, fail = st.inference_stats.success.count, st.inference_stats.fail.count

        def mv(name, **lb):
            return sc.metric(samples, name, model=m, version="1", **lb)

        m_succ = mv("nv_inference_request_success")
        m_fail = sc.metric_sum(samples, "nv_inference_request_failure", model=m, version="1")
        reasons = {r: mv("nv_inference_request_failure", reason=r)
                   for r in ("REJECTED", "CANCELED", "BACKEND", "OTHER")}
        seen = tally.keys(m)
        fig.info("%s: client calls / OK / server errors / gave up" % m, "%d / %d / %d / %d" % (
            seen.get("attempts", 0), seen.get("OK", 0), seen.get("server_error", 0),
            seen.get("gaveup", 0)))
        fig.info("%s: server success / fail (%s)" % (m, " ".join(
            "%s=%d" % (r[:3], v or 0) for r, v in reasons.items())), "%d / %d" % (succ, fail))
        fig.check("%s: stats success == nv_inference_request_success" % m,
                  "%d vs %s" % (succ, m_succ), "equal", m_succ is not None and succ == m_succ)
        fig.check("%s: stats fail == sum nv_inference_request_failure" % m,
                  "%d vs %s" % (fail, m_fail), "equal", m_fail is not None and fail == m_fail)
        m_inf, m_exec = mv("nv_inference_count"), mv("nv_inference_exec_count")
        fig.check("%s: inference_count == nv_inference_count" % m,
                  "%d vs %s" % (st.inference_count, m_inf), "equal",
                  m_inf is not None and st.inference_count == m_inf)
        fig.check("%s: execution_count == nv_inference_exec_count" % m,
                  "%d vs %s" % (st.execution_count, m_exec), "equal",
                  m_exec is not None and st.execution_count == m_exec)
        ok, gave, errs = seen.get("OK", 0), seen.get("gaveup", 0), seen.get("server_error", 0)
        fig.check("%s: client OK + errors <= server success + fail <= client calls" % m,
                  "%d <= %d <= %d" % (ok + errs, succ + fail, seen.get("attempts", 0)),
                  "holds (each call counted once)",
                  ok + errs <= succ + fail <= seen.get("attempts", 0))
        if m == T:
            fig.check("%s (timeout param only): client OK == server success" % m,
                      "%d vs %d" % (ok, succ), "equal", ok == succ)
            fig.check("%s (timeout param only): client errors == server fail" % m,
                      "%d vs %d" % (errs, fail), "equal", errs == fail)
            extra = {k: v for k, v in seen.items() if k.startswith(("code_", "stream_"))}
            fig.info("%s: client error kinds" % m, extra)
            fig.check("%s: calls that timed out in the queue" % m, errs, "> 0 (timeout works)",
                      errs > 0)
            fig.check("%s: messages without an answer" % m, seen.get("unanswered", 0), "== 0",
                      seen.get("unanswered", 0) == 0)
        else:
            fig.check("%s: client OK <= server success <= OK + gave up" % m,
                      "%d <= %d <= %d" % (ok, succ, ok + gave), "holds",
                      ok <= succ <= ok + gave)
            fig.check("%s: client errors <= server fail <= errors + gave up" % m,
                      "%d <= %d <= %d" % (errs, fail, errs + gave), "holds",
                      errs <= fail <= errs + gave)
            bad = {k: v for k, v in seen.items() if k.startswith("code_") and
                   k not in ("code_INVALID_ARGUMENT",)}
            bad.update({k: v for k, v in seen.items() if k.startswith("stream_status_")})
            fig.check("%s: unexpected client-side statuses" % m, bad or 0, "none", not bad)
            fig.info("%s: streams (cancelled)" % m, "%d (%d)" % (seen.get("streams", 0),
                                                                 seen.get("streams_cancelled", 0)))
    unknown = tally.get("_unrouted", "attempts")
    unrouted = sc.metric_sum(samples, "blockserve_unrouted_request_failure_total")
    fig.check("unknown-model calls counted in blockserve_unrouted_request_failure_total",
              "%d vs %s" % (unknown, unrouted), "series >= calls",
              unrouted is not None and unrouted >= unknown)
    fig.check("churn connections that failed", tally.get("_churn", "failed"), "== 0",
              tally.get("_churn", "failed") == 0)

    q = (t1 - t0) / 4
    q2r, q4r = sampler.window(t0 + q, t0 + 2 * q), sampler.window(t0 + 3 * q, t1)
    q2f, q4f = sampler.window(t0 + q, t0 + 2 * q, 2), sampler.window(t0 + 3 * q, t1, 2)
    if q2r and q4r:
        growth = max(q4r) - max(q2r)
        fig.info("RSS max 2nd / 4th quarter (MiB)", "%.1f / %.1f" % (mib(max(q2r)),
                                                                   mib(max(q4r))))
        # in flight at once: ~6 workers x a few 128 KiB messages, a batch of 4 and its
        # answers, i.e. a few MiB; 16 MiB leaves room for allocator arenas
        fig.check("RSS growth 4th vs 2nd quarter (MiB)", round(mib(growth), 1),
                  "<= %d" % mib(RSS_MARGIN), growth <= RSS_MARGIN)
        fgrowth = max(q4f) - max(q2f)
        fig.info("open fds max 2nd / 4th quarter", "%d / %d" % (max(q2f), max(q4f)))
        # connections: one per worker channel, plus the churn thread's one
        # (sometimes two while the previous one closes)
        fig.check("open fd growth 4th vs 2nd quarter", fgrowth, "<= %d" % FD_MARGIN,
                  fgrowth <= FD_MARGIN)
    channel.close()
    fig.check("server alive at the end", server.alive(), "True", server.alive())


if __name__ == "__main__":
    main()
