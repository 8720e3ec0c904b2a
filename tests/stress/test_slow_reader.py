"""A ModelStreamInfer client that keeps sending requests and never reads the
answers (a raw HTTP/2 client that never sends WINDOW_UPDATE: the server can
send it 64 KiB in all). The server must bound what it holds for that stream
(--max-stream-pending, default 16 messages; --max-stream-unsent-bytes,
default 64 MiB): its RSS plateaus, other clients are still served (unary calls
to the same model on another connection succeed), and once the slow client
goes away the memory is given back.

    /usr/bin/python3 tests/stress/test_slow_reader.py BLOCKSERVE_BINARY
"""

import threading
import time

import stress_common as sc
from stress_common import MiB, mib

MODEL = "vae_mid_attention"
SIDE = 32                 # hidden_states [1, 512, 32, 32]: 2 MiB in, 2 MiB out
PENDING = 16              # --max-stream-pending's default
SLOW_SECONDS = 18         # how long the slow client sends
SEND_RATE = 100           # slow-client messages per second at most (about twice the capacity here)
SAFETY = 1536 * MiB       # stop early (and fail) if the server grows by this much
OTHER_PERIOD = 0.3        # a unary call from the second client every this many seconds


def main():
    fig = sc.Figures("slow stream reader (ModelStreamInfer, answers never read)")
    # batch 1: the model's scratch is the same for every request, so what grows
    # is what the server holds for the stream
    repo = sc.make_repo({MODEL: ("example:" + MODEL, {"max_batch_size": 1})})
    sc.serve_and_run(fig, [], repo, run)


def run(server, fig):
    req = sc.infer_request(MODEL, sc.vae_inputs(SIDE)).SerializeToString()
    in_bytes = len(req)
    out_bytes = 512 * SIDE * SIDE * 4
    channel = server.channel()
    stub = sc.pb_grpc.GRPCInferenceServiceStub(channel)
    for _ in range(3):  # warm-up: the model's scratch and the transport exist
        stub.ModelInfer.future(sc.pb.ModelInferRequest.FromString(req), timeout=60).result()
    time.sleep(1.0)
    sampler = sc.Sampler(server, period=0.25, limit=120)
    time.sleep(1.0)
    baseline = max(sampler.window(0, 1.0)) if sampler.window(0, 1.0) else server.rss()

    # the second client: unary calls to the same model on its own connection
    other = {"ok": 0, "codes": {}, "lat": []}
    stop_other = threading.Event()

    def other_client():
        t_end = time.monotonic() + SLOW_SECONDS + 30
        while not stop_other.is_set() and time.monotonic() < t_end:
            t = time.monotonic()
            try:
                stub.ModelInfer(sc.pb.ModelInferRequest.FromString(req), timeout=20)
                other["ok"] += 1
                other["lat"].append(time.monotonic() - t)
            except Exception as e:  # grpc.RpcError: count by status
                c = sc.rpc_code(e)
                other["codes"][c] = other["codes"].get(c, 0) + 1
            stop_other.wait(OTHER_PERIOD)

    # the slow client: sends SEND_RATE messages/s for SLOW_SECONDS, never reads
    slow = sc.H2Client(server.port, window=65535, read=False)
    sid = slow.start("ModelStreamInfer")
    frame = sc.grpc_frame(req)
    t_slow0 = time.monotonic() - sampler.t0
    other_t = threading.Thread(target=other_client, daemon=True)
    other_t.start()
    sent, last_sent_at, stopped_early = 0, 0.0, False
    t0 = time.monotonic()
    t_end = t0 + SLOW_SECONDS
    while time.monotonic() < t_end:
        due = t0 + sent / SEND_RATE
        while time.monotonic() < min(due, t_end):
            slow.pump(min(0.02, max(0.0, due - time.monotonic())))
        if time.monotonic() >= t_end:
            break
        if slow.send(sid, frame, deadline=t_end):
            sent += 1
            last_sent_at = time.monotonic() - t0
        if server.rss() - baseline > SAFETY or not server.alive():
            stopped_early = True
            break
    t_slow1 = time.monotonic() - sampler.t0
    stop_other.set()
    other_t.join(30)
    received = slow.received_bytes

    # the slow client goes away; is the memory given back?
    slow.close()
    t_close = time.monotonic() - sampler.t0
    t_wait_end = time.monotonic() + 10
    after = server.rss()
    while time.monotonic() < t_wait_end and after - baseline > 48 * MiB:
        time.sleep(0.25)
        after = server.rss()
    time.sleep(0.5)
    after = min(after, server.rss())
    try:
        stub.ModelInfer(sc.pb.ModelInferRequest.FromString(req), timeout=30)
        served_after = True
    except Exception:
        served_after = False
    rows = sampler.stop()
    channel.close()

    during = [r[1] for r in rows if t_slow0 <= r[0] < t_slow1]
    third = (t_slow1 - t_slow0) / 3
    mid = sampler.window(t_slow0 + third, t_slow0 + 2 * third)
    last = sampler.window(t_slow0 + 2 * third, t_slow1)
    peak = max(during) if during else server.rss()
    # What the server may hold for the stream: PENDING requests in flight or
    # answered and unsent, each as received bytes plus the decoded tensor, and
    # as the answer's tensor plus its serialized message (two copies of each);
    # plus 64 MiB for the HTTP/2 windows, gRPC's buffers and allocator slack.
    bound = PENDING * 2 * (in_bytes + out_bytes) + 64 * MiB

    fig.info("request / answer size (MiB)", "%.2f / %.2f" % (mib(in_bytes), mib(out_bytes)))
    fig.info("slow client: messages sent in %d s (offered %d/s)" % (SLOW_SECONDS, SEND_RATE), sent)
    fig.info("slow client: last message went out at (s)", round(last_sent_at, 2))
    fig.info("slow client: answer bytes the server could send it", received)
    fig.info("RSS baseline (MiB)", round(mib(baseline), 1))
    fig.check("RSS peak over baseline while slow client sends (MiB)",
              round(mib(peak - baseline), 1), "<= %.0f (16 x 2 x (in+out) + 64)" % mib(bound),
              peak - baseline <= bound)
    growth = (max(last) - max(mid)) if mid and last else 0
    fig.check("RSS growth, last third vs middle third (MiB)", round(mib(growth), 1),
              "<= 32 (plateau)", growth <= 32 * MiB)
    fig.check("stopped early: server grew past the 1.5 GiB safety cap", stopped_early, "False",
              not stopped_early)
    lat = sorted(other["lat"])
    fig.check("other client: unary calls OK", other["ok"], ">= %d" % int(SLOW_SECONDS / 2),
              other["ok"] >= int(SLOW_SECONDS / 2))
    fig.check("other client: unary calls failed", sum(other["codes"].values()),
              "== 0 %s" % (other["codes"] or ""), not other["codes"])
    if lat:
        fig.info("other client: latency p50 / max (ms)",
                 "%.1f / %.1f" % (lat[len(lat) // 2] * 1e3, lat[-1] * 1e3))
    fig.check("RSS after the slow client closed, over baseline (MiB)",
              round(mib(after - baseline), 1), "<= 48 (memory given back)",
              after - baseline <= 48 * MiB)
    fig.check("unary call after the close", served_after, "True", served_after)
    fig.info("seconds from close to that RSS", round(time.monotonic() - sampler.t0 - t_close, 1))


if __name__ == "__main__":
    main()
