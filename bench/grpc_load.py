"""Closed-loop load on a served golden model (btb_geglu_cross, one sample per
request): requests/s, p50/p99 latency and batching (executions per request)
at concurrency 1 and 16.  /usr/bin/python3 bench/grpc_load.py build/blockserve"""
import os, sys, time, tempfile, concurrent.futures, numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
import harness, grpc
stubs = tempfile.mkdtemp(); harness.generate_stubs(stubs)
import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pbg
BINARY = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else "build/blockserve"
repo = harness.make_repository(["btb_geglu_cross"], broken=False)
srv = harness.Server(BINARY, ["--model-repository", repo])
ch = grpc.insecure_channel(srv.address); stub = pbg.GRPCInferenceServiceStub(ch)
inp = harness.st_load(harness.GOLDEN + "/btb_geglu_cross/inputs.safetensors")
def req():
    r = pb.ModelInferRequest(model_name="btb_geglu_cross")
    for n, (dt, a) in inp.items():
        a = a[:1]
        r.inputs.add(name=n, datatype="FP32", shape=list(a.shape)); r.raw_input_contents.append(a.tobytes())
    return r
R = req(); N = 2000
for c in (1, 16):
    t0 = time.time(); lat = []
    def one(_):
        t = time.time(); stub.ModelInfer(R); return time.time() - t
    with concurrent.futures.ThreadPoolExecutor(c) as ex:
        lat = list(ex.map(one, range(N)))
    dt = time.time() - t0
    st = stub.ModelStatistics(pb.ModelStatisticsRequest(name="btb_geglu_cross")).model_stats[0]
    lat.sort()
    print(f"concurrency {c}: {N/dt:.0f} req/s, p50 {lat[N//2]*1e3:.2f} ms, p99 {lat[int(N*.99)]*1e3:.2f} ms, cumulative executions {st.execution_count} for {st.inference_stats.success.count} requests")
ch.close(); print("exit", srv.stop())
