"""Mixed-traffic closed-loop load: ragged batching against equal-shape batching,
in one server, on the same request sequence.

    /usr/bin/python3 bench/mixed_load.py [BINARY] [--dim 320] [--heads 8] [--context-dim 768]
        [--lengths 64:5,256:3,1024:1] [--contexts 77:2,32:1,8:1] [--mask-share 0.25]
        [--concurrency 1,4,8,16] [--requests 1000] [--rounds 4] [--seconds S] [--warmup 16]
        [--max-batch-size 8] [--max-queue-delay-us 2000] [--max-batch-tokens 0]
        [--threads N] [--seed 0] [--spot 6] [--tol 1e-4] [--json PATH]

BINARY (default build/blockserve) serves a temporary repository holding two
copies of one BasicTransformerBlock with cross-attention and GEGLU (config.json
and safetensors weights generated here with numpy, seeded): mixed_ragged with
"ragged_batching": true and mixed_unragged with false, their serving settings
otherwise the same (max_batch_size, max_queue_delay_microseconds and, when
given, max_batch_tokens).

Each request is one sample: hidden_states [1, L, dim] with L drawn from
--lengths, encoder_hidden_states [1, Lk, context_dim] with Lk from --contexts
(LEN:WEIGHT, weight 1 when left out), and with probability --mask-share a BOOL
keep-mask encoder_attention_mask [1, Lk] dropping up to half of the context.
One sequence of --requests requests (fixed --seed, after --warmup untimed
ones) is sent to both models at each --concurrency by that many closed-loop
callers. A phase (mode, concurrency) runs in --rounds consecutive parts of the
sequence, the modes taking turns ABBA (ragged, unragged, unragged, ragged),
so that drift on a shared machine touches both alike. --seconds stops a phase
from issuing more after that time (each round gets its share; both modes then
answer prefixes of the same parts).

Per (mode, concurrency): requests/s, tokens/s (hidden tokens answered per
second), p50 and p99 latency, mean batch size (the deltas of ModelStatistics'
inference_count / execution_count over the phase) and hidden tokens per
execution, then a ragged/unragged line. Every response must have the shape
[1, L, dim] and finite values; --spot responses of the highest concurrency
(different shapes) from each mode are compared with the same request sent
alone to mixed_ragged afterwards (a batch of one): a max abs diff above --tol
fails the run. Any failure exits 1.

In a build whose batcher does not act on ragged_batching both modes batch
only equal shapes, and the ratios sit near 1.
"""
import argparse
import concurrent.futures
import itertools
import json
import os
import shutil
import struct
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
import harness  # noqa: E402

import grpc  # noqa: E402  (before the stubs path: nothing may shadow it)

MODES = ("ragged", "unragged")
MODEL = {"ragged": "mixed_ragged", "unragged": "mixed_unragged"}
VARIANTS = 4  # distinct tensors per shape: requests are built once per (shape, variant)
INFER = "/inference.GRPCInferenceService/ModelInfer"


def weighted(text, what):
    """'64:5,256:3,1024' -> ([64, 256, 1024], [5/9, 3/9, 1/9])."""
    vals, weights = [], []
    for item in text.split(","):
        v, _, w = item.partition(":")
        try:
            vals.append(int(v))
            weights.append(float(w) if w else 1.0)
        except ValueError:
            sys.exit(f"mixed_load: {what}: expected LEN[:WEIGHT],... (got {text!r})")
        if vals[-1] < 1 or weights[-1] <= 0:
            sys.exit(f"mixed_load: {what}: lengths >= 1 and weights > 0 (got {item!r})")
    return vals, [w / sum(weights) for w in weights]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("binary", nargs="?", default="build/blockserve")
    p.add_argument("--dim", type=int, default=320)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--context-dim", type=int, default=768)
    p.add_argument("--lengths", default="64:5,256:3,1024:1", help="hidden tokens L[:weight],...")
    p.add_argument("--contexts", default="77:2,32:1,8:1", help="context tokens Lk[:weight],...")
    p.add_argument("--mask-share", type=float, default=0.25, help="share with encoder_attention_mask")
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=1000, help="requests per phase")
    p.add_argument("--seconds", type=float, default=0, help="per phase: stop issuing after this (0: no limit)")
    p.add_argument("--rounds", type=int, default=4, help="parts per phase, run ABBA between the modes")
    p.add_argument("--warmup", type=int, default=16, help="untimed requests per model first")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--max-batch-tokens", type=int, default=0, help="0: not set")
    p.add_argument("--threads", type=int, default=0, help="server --threads (0: its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spot", type=int, default=6, help="responses checked against a batch of one")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--json", help="write every figure here")
    a = p.parse_args()
    a.binary = os.path.abspath(a.binary)
    a.lengths_w = weighted(a.lengths, "--lengths")
    a.contexts_w = weighted(a.contexts, "--contexts")
    a.conc = [int(c) for c in a.concurrency.split(",")]
    if a.dim % a.heads or a.requests < a.rounds or a.rounds < 1 or min(a.conc) < 1:
        sys.exit("mixed_load: --dim must be a multiple of --heads; --concurrency, --rounds >= 1; "
                 "--requests >= --rounds")
    return a


# ---- the model repository ---------------------------------------------------

def st_save(path, tensors):
    """{name: float32 array} -> a safetensors file (F32)."""
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def block_weights(a, rng):
    """diffusers' BasicTransformerBlock state_dict (layer_norm, GEGLU, cross-attention)."""
    d, dc, inner = a.dim, a.context_dim, 4 * a.dim
    lin = lambda o, i: (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)  # noqa: E731
    vec = lambda n, s=0.02, m=0.0: (m + s * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    w = {}
    for attn, kv in (("attn1", d), ("attn2", dc)):
        w[f"{attn}.to_q.weight"] = lin(d, d)
        w[f"{attn}.to_k.weight"] = lin(d, kv)
        w[f"{attn}.to_v.weight"] = lin(d, kv)
        w[f"{attn}.to_out.0.weight"] = lin(d, d)
        w[f"{attn}.to_out.0.bias"] = vec(d)
    w["ff.net.0.proj.weight"] = lin(2 * inner, d)
    w["ff.net.0.proj.bias"] = vec(2 * inner)
    w["ff.net.2.weight"] = lin(d, inner)
    w["ff.net.2.bias"] = vec(d)
    for n in ("norm1", "norm2", "norm3"):
        w[f"{n}.weight"] = vec(d, 0.1, 1.0)
        w[f"{n}.bias"] = vec(d)
    return w


def make_repository(a):
    """Two copies of one generated block; only serving.ragged_batching differs."""
    root = tempfile.mkdtemp(prefix="bs_mixed_repo_")
    config = {"_class_name": "BasicTransformerBlock", "dim": a.dim, "num_attention_heads": a.heads,
              "attention_head_dim": a.dim // a.heads, "dropout": 0.0,
              "cross_attention_dim": a.context_dim, "activation_fn": "geglu",
              "num_embeds_ada_norm": None, "attention_bias": False, "only_cross_attention": False,
              "upcast_attention": False, "norm_elementwise_affine": True, "norm_type": "layer_norm",
              "final_dropout": False}
    weights = block_weights(a, np.random.default_rng(a.seed + 1))
    for mode in MODES:
        d = os.path.join(root, MODEL[mode])
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        st_save(os.path.join(d, "diffusion_pytorch_model.safetensors"), weights)
        serving = {"max_batch_size": a.max_batch_size,
                   "max_queue_delay_microseconds": a.max_queue_delay_us,
                   "ragged_batching": mode == "ragged"}
        if a.max_batch_tokens:
            serving["max_batch_tokens"] = a.max_batch_tokens
        with open(os.path.join(d, "serving.json"), "w") as f:
            json.dump(serving, f)
    return root


# ---- requests ---------------------------------------------------------------

def make_sequence(a):
    """The request sequence both models get: (L, Lk, masked, variant) per request."""
    rng = np.random.default_rng(a.seed)
    (ls, lw), (cs, cw) = a.lengths_w, a.contexts_w
    n = a.requests + a.warmup
    return list(zip((int(x) for x in rng.choice(ls, n, p=lw)), (int(x) for x in rng.choice(cs, n, p=cw)),
                    (bool(x) for x in rng.random(n) < a.mask_share),
                    (int(x) for x in rng.integers(0, VARIANTS, n))))


def request_bytes(pb, a, model, key):
    """A serialized ModelInferRequest for key = (L, Lk, masked, variant); its
    tensors depend on the key and the seed only, not on the model."""
    L, lk, masked, v = key
    rng = np.random.default_rng([a.seed, L, lk, v])
    ins = {"hidden_states": rng.standard_normal((1, L, a.dim), dtype=np.float32),
           "encoder_hidden_states": rng.standard_normal((1, lk, a.context_dim), dtype=np.float32)}
    if masked:
        keep = np.zeros((1, lk), dtype=np.bool_)
        keep[0, :max(1, lk - int(rng.integers(0, lk // 2 + 1)))] = True
        ins["encoder_attention_mask"] = keep
    r = pb.ModelInferRequest(model_name=model)
    for name, arr in ins.items():
        r.inputs.add(name=name, datatype="BOOL" if arr.dtype == np.bool_ else "FP32", shape=list(arr.shape))
        r.raw_input_contents.append(arr.tobytes())
    return r.SerializeToString()


def check_response(resp, key, dim):
    """The output as [1, L, dim] float32, or an error message."""
    L = key[0]
    if len(resp.outputs) != 1 or list(resp.outputs[0].shape) != [1, L, dim] \
            or len(resp.raw_output_contents) != 1 or len(resp.raw_output_contents[0]) != 4 * L * dim:
        shape = [list(o.shape) for o in resp.outputs]
        return None, f"request {key}: output shapes {shape}, expected [[1, {L}, {dim}]] FP32 raw"
    out = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(1, L, dim)
    if not np.isfinite(out).all():
        return None, f"request {key}: output not finite"
    return out, None


# ---- load -------------------------------------------------------------------

class Client:
    def __init__(self, address, pb, pbg):
        opts = [("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20)]
        self.pb = pb
        self.ch = grpc.insecure_channel(address, options=opts)
        self.stub = pbg.GRPCInferenceServiceStub(self.ch)
        # requests go out pre-serialized, so the callers spend no CPU encoding them
        self.infer = self.ch.unary_unary(INFER, request_serializer=None,
                                         response_deserializer=pb.ModelInferResponse.FromString)

    def stats(self, model):
        """(inference_count, execution_count, {batch size: executions})."""
        s = self.stub.ModelStatistics(self.pb.ModelStatisticsRequest(name=model)).model_stats[0]
        return (s.inference_count, s.execution_count,
                {b.batch_size: b.compute_infer.count for b in s.batch_stats})

    def not_ready(self):
        """{model: reason} for our models that did not load."""
        idx = {m.name: m for m in self.stub.RepositoryIndex(self.pb.RepositoryIndexRequest()).models}
        return {m: (idx[m].reason if m in idx else "not in the repository index")
                for m in MODEL.values() if m not in idx or idx[m].state != "READY"}


def closed_loop(cl, reqs, seq, part, conc, seconds, dim, keep=()):
    """conc callers each send request seq[i], i the next index of part, when
    their last one is answered. Returns (wall s, latencies s, hidden tokens,
    {i: output} for i in keep, errors)."""
    counter, lat, kept, errors = itertools.count(), [], {}, []
    deadline = time.perf_counter() + seconds if seconds else None

    def caller():
        tokens = 0
        for k in counter:
            if k >= len(part) or errors or (deadline and time.perf_counter() > deadline):
                return tokens
            i = part[k]
            t = time.perf_counter()
            try:
                resp = cl.infer(reqs[seq[i]])
            except grpc.RpcError as e:
                errors.append(f"request {i} {seq[i]}: {e.code().name}: {e.details()}")
                return tokens
            lat.append(time.perf_counter() - t)
            out, err = check_response(resp, seq[i], dim)
            if err:
                errors.append(err)
            elif i in keep:
                kept[i] = out.copy()
            tokens += seq[i][0]
        return tokens

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(conc) as ex:
        tokens = sum(ex.map(lambda _: caller(), range(conc)))
    return time.perf_counter() - t0, lat, tokens, kept, errors


def percentile(sorted_lat, q):
    """Nearest-rank percentile (q in [0, 1]) in ms."""
    return 1e3 * sorted_lat[min(len(sorted_lat) - 1, max(0, int(np.ceil(q * len(sorted_lat))) - 1))]


class Phase:
    """One (mode, concurrency): its figures summed over its rounds."""

    def __init__(self, mode, conc):
        self.mode, self.conc = mode, conc
        self.wall, self.lat, self.tokens, self.n_inf, self.n_exec, self.hist = 0.0, [], 0, 0, 0, {}
        self.round_req_s = []  # each round's requests/s: how much the machine drifted

    def run(self, cl, a, reqs, seq, part, keep):
        """One round: the requests seq[part]. Returns ({i: output}, errors)."""
        model = MODEL[self.mode]
        s0 = cl.stats(model)
        wall, lat, tokens, kept, errors = closed_loop(cl, reqs, seq, part, self.conc,
                                                      a.seconds / a.rounds, a.dim, keep)
        s1 = cl.stats(model)
        self.wall += wall
        self.round_req_s.append(len(lat) / wall)
        self.lat += lat
        self.tokens += tokens
        self.n_inf += s1[0] - s0[0]
        self.n_exec += s1[1] - s0[1]
        for size, n in s1[2].items():
            if n - s0[2].get(size, 0):
                self.hist[size] = self.hist.get(size, 0) + n - s0[2].get(size, 0)
        return kept, errors

    def row(self):
        lat, n, ex = sorted(self.lat), len(self.lat), self.n_exec
        return {"mode": self.mode, "concurrency": self.conc, "requests": n, "seconds": self.wall,
                "req_s": n / self.wall, "tok_s": self.tokens / self.wall,
                "p50_ms": percentile(lat, 0.50) if n else None, "p99_ms": percentile(lat, 0.99) if n else None,
                "mean_batch": self.n_inf / ex if ex else None, "executions": ex,
                "tokens_per_execution": self.tokens / ex if ex else None,
                "batch_sizes": dict(sorted(self.hist.items())), "round_req_s": self.round_req_s}


def spot_indices(seq, n):
    """Up to n indices of seq with different (L, Lk, masked), spread over it."""
    seen, out = set(), []
    for i, key in enumerate(seq):
        if key[:3] not in seen and len(out) < n:
            seen.add(key[:3])
            out.append(i)
    return out


def spot_check(cl, a, seq, kept):
    """Each kept response against the same request alone to mixed_ragged."""
    rows, errors = [], []
    for i in sorted(set(kept["ragged"]) | set(kept["unragged"])):
        s0 = cl.stats(MODEL["ragged"])
        alone, err = check_response(cl.infer(request_bytes(cl.pb, a, MODEL["ragged"], seq[i])), seq[i], a.dim)
        s1 = cl.stats(MODEL["ragged"])
        if err or s1[0] - s0[0] != 1 or s1[1] - s0[1] != 1:
            errors.append(err or f"spot request {i}: not answered as one batch of one")
            continue
        row = {"index": i, "L": seq[i][0], "Lk": seq[i][1], "masked": seq[i][2]}
        for mode in MODES:
            if i in kept[mode]:
                row[mode] = float(np.abs(kept[mode][i] - alone).max())
                if not row[mode] <= a.tol:
                    errors.append(f"spot request {i} {seq[i]}: {mode} differs from alone by {row[mode]:.3g}")
        rows.append(row)
    return rows, errors


def run_all(cl, a, seq):
    """Warm-up, then per concurrency --rounds rounds over consecutive parts of
    the sequence, ABBA (ragged, unragged, unragged, ragged, ...)."""
    warm, timed = seq[:a.warmup], seq[a.warmup:]
    keep = set(spot_indices(timed, a.spot))
    kept, errors = {m: {} for m in MODES}, []
    reqs = {m: {key: request_bytes(cl.pb, a, MODEL[m], key) for key in set(seq)} for m in MODES}
    for mode in MODES:
        errors += closed_loop(cl, reqs[mode], warm, range(len(warm)), max(a.conc), 0, a.dim)[4]
    phases = {(m, c): Phase(m, c) for c in a.conc for m in MODES}
    bounds = [len(timed) * j // a.rounds for j in range(a.rounds + 1)]
    for k, conc in enumerate(a.conc):
        for j in range(a.rounds):
            for mode in MODES if (k * a.rounds + j) % 2 == 0 else MODES[::-1]:
                got, errs = phases[mode, conc].run(cl, a, reqs[mode], timed, range(bounds[j], bounds[j + 1]),
                                                   keep if conc == max(a.conc) else ())
                kept[mode].update(got)
                errors += errs
        for mode in MODES:
            p = phases[mode, conc]
            print(f"  {mode:>8} c={conc:<3} {len(p.lat)} requests in {p.wall:.1f} s", flush=True)
    spots, errs = spot_check(cl, a, timed, kept)
    return [phases[m, c].row() for c in a.conc for m in MODES], spots, errors + errs


# ---- report -----------------------------------------------------------------

def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def ratio(r, u, key):
    return r[key] / u[key] if r[key] and u[key] else None


def table(a, rows):
    cols = ["mode", "conc", "requests", "req/s", "tok/s", "p50 ms", "p99 ms", "mean batch", "tok/exec"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * 3 + "--:|" * (len(cols) - 3)]
    ratios = []
    for conc in a.conc:
        by = {r["mode"]: r for r in rows if r["concurrency"] == conc}
        for mode in MODES:
            r = by[mode]
            lines.append(f"| {mode} | {conc} | {r['requests']} | {r['req_s']:.1f} | {r['tok_s']:.0f} | "
                         f"{fmt(r['p50_ms'], '.1f')} | {fmt(r['p99_ms'], '.1f')} | "
                         f"{fmt(r['mean_batch'], '.2f')} | {fmt(r['tokens_per_execution'], '.0f')} |")
        q = {k: ratio(by["ragged"], by["unragged"], k)
             for k in ("req_s", "tok_s", "p50_ms", "p99_ms", "mean_batch", "tokens_per_execution")}
        ratios.append(dict(concurrency=conc, **q))
        lines.append(f"| ragged/unragged | {conc} | | " + " | ".join(
            fmt(q[k], ".2f") + ("x" if q[k] else "")
            for k in ("req_s", "tok_s", "p50_ms", "p99_ms", "mean_batch", "tokens_per_execution")) + " |")
    return "\n".join(lines), ratios


def describe(a, timed):
    print(f"mixed_load: {a.binary}; block dim {a.dim}, {a.heads} heads, context {a.context_dim}, GEGLU, FP32; "
          f"max_batch_size {a.max_batch_size}, max_queue_delay {a.max_queue_delay_us} us, "
          f"max_batch_tokens {a.max_batch_tokens or 'unset'}; load average {os.getloadavg()[0]:.2f} (1 min)")
    print(f"  {len(timed)} requests per phase in {a.rounds} rounds (seed {a.seed}): L " +
          ", ".join(f"{L} x{sum(k[0] == L for k in timed)}" for L in a.lengths_w[0]) + "; Lk " +
          ", ".join(f"{c} x{sum(k[1] == c for k in timed)}" for c in a.contexts_w[0]) +
          f"; {sum(k[2] for k in timed)} with encoder_attention_mask", flush=True)


def report(a, rows, spots, errors, elapsed):
    text, ratios = table(a, rows)
    print(text)
    print("spot checks (max |batched - alone|, request alone to mixed_ragged):")
    for s in spots:
        print(f"  request {s['index']}: L {s['L']}, Lk {s['Lk']}, mask {'yes' if s['masked'] else 'no'}: "
              + ", ".join(f"{m} {fmt(s.get(m), '.2e')}" for m in MODES))
    print(f"run time {elapsed:.0f} s; load average {os.getloadavg()[0]:.2f} (1 min)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if not k.endswith("_w")}, "phases": rows,
                       "ratios": ratios, "spot": spots, "errors": errors, "seconds": elapsed}, f, indent=1)
    for e in errors[:20]:
        print("mixed_load: FAIL " + e, file=sys.stderr)


def main():
    a = parse_args()
    t_start = time.time()
    stubs = tempfile.mkdtemp(prefix="bs_stubs_")
    harness.generate_stubs(stubs)
    import grpc_service_pb2 as pb
    import grpc_service_pb2_grpc as pbg
    repo = make_repository(a)
    args = ["--model-repository", repo, "--no-metrics"] + (["--threads", str(a.threads)] if a.threads else [])
    try:
        srv = harness.Server(a.binary, args)
    except (RuntimeError, OSError) as e:
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(stubs, ignore_errors=True)
        sys.exit(f"mixed_load: {a.binary}: {e}")
    cl = Client(srv.address, pb, pbg)
    seq = make_sequence(a)
    describe(a, seq[a.warmup:])
    try:
        bad = cl.not_ready()
        if not bad:
            rows, spots, errors = run_all(cl, a, seq)
    finally:
        cl.ch.close()
        code = srv.stop()
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(stubs, ignore_errors=True)
    if bad:
        sys.exit("mixed_load: models not ready: " + "; ".join(f"{m}: {r}" for m, r in bad.items()))
    if code != 0:
        errors.append(f"server exit code {code}\n{srv.text()}")
    report(a, rows, spots, errors, time.time() - t_start)
    return 1 if errors or not spots else 0


if __name__ == "__main__":
    sys.exit(main())
