"""SIGTERM under load: unary callers keep ~32 calls in flight (a queue of
about 0.2 s of work) and streams keep 4 messages in flight each; then SIGTERM.
Every call admitted before the signal must get its real answer (OK, the right
output shape), every stream message sent before it its own response (an
answer or an error_message) before the stream ends, calls started after the
server began refusing UNAVAILABLE (never CANCELLED, except the calls gRPC core itself resets at the
instant the server stops its transport: see below), and the process must
exit 0 within the grace period.

"Before the signal" leaves out the last GUARD seconds before it: a call
handed to gRPC just then may not have reached the server yet (then it is not
admitted, and UNAVAILABLE is right for it too). Likewise a call sent after
the signal but before the server's signal handler ran (the server logs that
instant, "no new requests ... monotonic clock") reached a server still
accepting: OK or UNAVAILABLE are both right for it.

    /usr/bin/python3 tests/stress/test_sigterm.py BLOCKSERVE_BINARY
"""

import re
import shutil
import signal
import threading
import time

import stress_common as sc

import grpc

MODEL = "vae_mid_attention"
SIDE = 16
OUT_SHAPE = [1, 512, SIDE, SIDE]
UNARY_THREADS = 32
STREAMS = 3
STREAM_WINDOW = 4
LOAD_SECONDS = 4.0        # load before the signal
AFTER_SECONDS = 1.0       # new calls keep starting this long after it
GRACE = 10
GUARD = 0.1
MIN_INFLIGHT = 4          # Python's threads keep 9-16 of the 32 calls in flight here


def main():
    fig = sc.Figures("SIGTERM under load (grace %d s)" % GRACE)
    repo = sc.make_repo({MODEL: ("example:" + MODEL, None)})
    server = sc.start_server(["--grace-seconds", str(GRACE)], repo)
    try:
        run(server, fig)
    finally:
        server.stop(timeout=5)  # no-op when it has exited
        shutil.rmtree(repo, ignore_errors=True)
    fig.report()


def transport_stop_time(log):
    """The monotonic time the server logged when it stopped its transport."""
    m = re.search(r"stopping the gRPC transport \(monotonic clock ([0-9.]+) s\)", log)
    return float(m.group(1)) if m else None


def refuse_time(log):
    """The monotonic time the server logged when its signal handler ran and
    it began to refuse new requests (a request that reached it between the
    signal and then was admitted, and is answered)."""
    m = re.search(r"no new requests; finishing queued work \(grace \d+ s; monotonic clock "
                  r"([0-9.]+) s\)", log)
    return float(m.group(1)) if m else None


class Clock:
    def __init__(self):
        self.t_sig = None  # monotonic time of the signal

    def rel(self, t):
        """t relative to the signal (negative: before); None before it is sent."""
        return None if self.t_sig is None else t - self.t_sig


def run(server, fig):
    req = sc.infer_request(MODEL, sc.vae_inputs(SIDE))
    clock = Clock()
    end_at = [time.monotonic() + 3600]  # set once the signal is sent
    unary_rows = []   # (t_start, status name, shape ok)
    stream_rows = []  # per stream: dict
    lock = threading.Lock()
    details = {}      # status -> the first message seen with it
    channels = [server.channel() for _ in range(2)]
    stubs = [sc.pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
    for _ in range(3):
        stubs[0].ModelInfer(req, timeout=60)

    def unary_worker(i):
        stub = stubs[i % 2]
        while time.monotonic() < end_at[0]:
            t = time.monotonic()
            try:
                r = stub.ModelInfer(req, timeout=60)
                row = (t, "OK", list(r.outputs[0].shape) == OUT_SHAPE, time.monotonic())
            except grpc.RpcError as e:
                row = (t, e.code().name, False, time.monotonic())
                with lock:
                    details.setdefault(e.code().name, e.details())
            with lock:
                unary_rows.append(row)

    def stream_worker(i):
        stub = stubs[i % 2]
        rec = {"sent": [], "answers": 0, "errors": 0, "status": None, "ended_at": None,
               "ids": set()}
        stream_rows.append(rec)
        window = threading.Semaphore(STREAM_WINDOW)
        stop = threading.Event()

        def requests():
            n = 0
            while not stop.is_set() and time.monotonic() < end_at[0]:
                if not window.acquire(timeout=0.05):
                    continue
                r = sc.pb.ModelInferRequest()
                r.CopyFrom(req)
                r.id = "s%d-%d" % (i, n)
                rec["sent"].append(time.monotonic())
                n += 1
                yield r

        it = stub.ModelStreamInfer(requests(), timeout=60)
        try:
            for resp in it:
                if resp.error_message:
                    rec["errors"] += 1
                else:
                    ok = list(resp.infer_response.outputs[0].shape) == OUT_SHAPE
                    rec["answers"] += 1 if ok else 0
                    rec["errors"] += 0 if ok else 1
                    rec["ids"].add(resp.infer_response.id)
                window.release()
            rec["status"] = "OK"
        except grpc.RpcError as e:
            rec["status"] = e.code().name
        rec["ended_at"] = time.monotonic()
        stop.set()

    threads = [threading.Thread(target=unary_worker, args=(i,), daemon=True)
               for i in range(UNARY_THREADS)]
    threads += [threading.Thread(target=stream_worker, args=(i,), daemon=True)
                for i in range(STREAMS)]
    for t in threads:
        t.start()
    time.sleep(LOAD_SECONDS)
    clock.t_sig = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    end_at[0] = clock.t_sig + AFTER_SECONDS
    # a fresh connection after the signal: a new stream and a unary call
    late = []  # (status, end time)
    time.sleep(0.2)
    for _ in range(3):
        ch = server.channel()
        st = sc.pb_grpc.GRPCInferenceServiceStub(ch)
        try:
            st.ModelInfer(req, timeout=10)
            late.append(("OK", time.monotonic()))
        except grpc.RpcError as e:
            late.append((e.code().name, time.monotonic()))
        try:
            rs = list(st.ModelStreamInfer(iter([req]), timeout=10))
            late.append(("stream ended OK after %d answers, %d error messages %s" % (
                sum(1 for r in rs if not r.error_message),
                sum(1 for r in rs if r.error_message),
                [r.error_message for r in rs if r.error_message][:1]), time.monotonic()))
        except grpc.RpcError as e:
            late.append((e.code().name, time.monotonic()))
        ch.close()
        time.sleep(0.1)
    try:
        code = server.proc.wait(GRACE + 5)
    except Exception:
        code = None
    exit_after = time.monotonic() - clock.t_sig
    for t in threads:
        t.join(30)
    for c in channels:
        c.close()

    # A call sent between the signal and the server's handler reaching it
    # (logged) was admitted: it may be answered, like one sent just before.
    t_refuse = refuse_time(server.text())
    fig.check("refusal logged after the signal (s)",
              None if t_refuse is None else round(t_refuse - clock.t_sig, 3), ">= 0",
              t_refuse is not None and t_refuse >= clock.t_sig)
    t_refuse = t_refuse if t_refuse is not None and t_refuse >= clock.t_sig else clock.t_sig
    before = [r for r in unary_rows if r[0] < clock.t_sig - GUARD]
    grey = [r for r in unary_rows if clock.t_sig - GUARD <= r[0] < t_refuse]
    after = [r for r in unary_rows if r[0] >= t_refuse]
    fig.info("unary calls started before the signal (> %d ms)" % (GUARD * 1e3), len(before))
    inflight = [r for r in before if r[3] > clock.t_sig]
    fig.check("  of them in flight at the signal (answered after it)", len(inflight),
              ">= %d (the test means something)" % MIN_INFLIGHT, len(inflight) >= MIN_INFLIGHT)
    if inflight:
        fig.info("  last of them answered after the signal (s)",
                 round(max(r[3] for r in inflight) - clock.t_sig, 3))
    bad_before = [r for r in before if r[1] != "OK" or not r[2]]
    fig.check("  of them not OK with shape %s" % OUT_SHAPE, len(bad_before),
              "== 0 %s" % _codes(bad_before), not bad_before)
    bad_grey = [r for r in grey if not ((r[1] == "OK" and r[2]) or r[1] == "UNAVAILABLE")]
    fig.check("unary calls in the last %d ms before the signal or before the refusal: neither "
              "OK nor UNAVAILABLE" % (GUARD * 1e3), len(bad_grey), "== 0 of %d %s" % (len(grey), _codes(bad_grey)),
              not bad_grey)
    # gRPC core 1.51 resets (CANCELLED) the calls it receives after the
    # server's grpc_server_shutdown_and_notify and before its GOAWAY reaches
    # the client, without handing them to blockserve: no call that ended
    # before that instant (logged by the server) may be anything but
    # UNAVAILABLE, and none at all may be CANCELLED before it.
    t_stop = transport_stop_time(server.text())
    fig.check("transport stop logged after the signal (s)",
              None if t_stop is None else round(t_stop - clock.t_sig, 3), ">= 0",
              t_stop is not None and t_stop >= clock.t_sig)
    t_stop = t_stop if t_stop is not None else clock.t_sig
    not_unavail = [r for r in after if r[1] != "UNAVAILABLE" and r[3] < t_stop]
    fig.check("unary calls started after the refusal, ended before the transport stop: "
              "not UNAVAILABLE", len(not_unavail),
              "== 0 of %d %s" % (sum(1 for r in after if r[3] < t_stop), _codes(not_unavail)),
              not not_unavail and after)
    cancelled = [r for r in unary_rows if r[1] == "CANCELLED"]
    early = [r for r in cancelled if r[3] < t_stop]
    fig.check("unary calls answered CANCELLED before the transport stop", len(early), "== 0",
              not early)
    fig.info("unary calls reset by gRPC core at the transport stop (CANCELLED, of all after "
             "the signal)", "%d of %d" % (len(cancelled), len(after)))
    other = [r for r in after if r[1] not in ("UNAVAILABLE", "CANCELLED")]
    fig.check("unary calls started after the refusal: neither UNAVAILABLE nor reset", len(other),
              "== 0 %s" % _codes(other), not other)
    late_bad = [c for c, t_end in late
                if c != "UNAVAILABLE" and not (c == "CANCELLED" and t_end >= t_stop)]
    fig.check("fresh connections after the signal (unary, stream) not UNAVAILABLE",
              len(late_bad), "== 0 of %d %s" % (len(late), late_bad or ""), not late_bad)
    fig.info("stream messages sent in all", sum(len(s["sent"]) for s in stream_rows))
    for k, s in enumerate(stream_rows):
        sent_before = sum(1 for t in s["sent"] if t < clock.t_sig - GUARD)
        sent_total = len(s["sent"])
        got = s["answers"] + s["errors"]
        fig.check("stream %d: responses vs messages sent before the signal" % k,
                  "%d vs %d (of %d sent)" % (got, sent_before, sent_total),
                  "responses >= sent before", got >= sent_before)
        fig.check("stream %d: end status" % k, s["status"], "OK or UNAVAILABLE",
                  s["status"] in ("OK", "UNAVAILABLE"))
        fig.info("stream %d: answers / error messages" % k, "%d / %d" % (s["answers"],
                                                                          s["errors"]))
    for k, v in sorted(details.items()):
        fig.note("unary %s: %r" % (k, v))
    fig.check("exit code", code, "== 0", code == 0)
    fig.check("exit after the signal (s)", round(exit_after, 2), "<= grace %d + 2" % GRACE,
              code is not None and exit_after <= GRACE + 2)
    if code != 0:
        print(server.text()[-4000:])


def _codes(rows):
    d = {}
    for r in rows:
        k = r[1] if r[1] != "OK" else "OK(wrong shape)"
        d[k] = d.get(k, 0) + 1
    return d or ""


if __name__ == "__main__":
    main()
