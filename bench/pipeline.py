"""Concurrent denoising pipelines against one server: step-level block caching
(block_cache_interval) against the exact run, on the same seeds.

    /usr/bin/python3 bench/pipeline.py [BINARY] [--pipelines trunk:256,stack:1024,trunk:256,stack:256]
        [--steps 20] [--intervals 1,2,3,4] [--stagger 5] [--scheduler ddim|euler]
        [--trunk dit_xl_trunk] [--stack-blocks 4] [--stack-dim 320] [--stack-heads 8]
        [--context-dim 768] [--context-len 77] [--dtype bf16] [--max-batch-size 8]
        [--queue-delay-us 100000,50000] [--block-cache-bytes 1073741824] [--threads N]
        [--alone all|first|none] [--tol 1e-3] [--seed 0] [--json PATH]
    /usr/bin/python3 bench/pipeline.py --self-test

BINARY (default build/blockserve) serves a temporary repository of two models:
"trunk", the built-in example --trunk (`blockserve example dit_xl_trunk`: the
DiT-XL/2 trunk, 28 ada_norm_zero blocks of dim 1152, conditioned on timestep
and class_labels), and "stack", --stack-blocks SD-1.5-like
BasicTransformerBlocks (dim 320, 8 heads, cross-attention to a 77 x 768
context, GEGLU, layer_norm: no timestep input; weights generated here with
numpy, seeded). Both compute in --dtype, with ragged batching,
preferred_batch_size the number of pipelines on the model (when more than
one), max_queue_delay_microseconds from --queue-delay-us (100 ms on the
trunk, whose step takes about a second here, 50 ms on the stack: room for
pipelines in step to meet in one batch despite the client's own work and a
busy machine), max_sequence_idle_microseconds 60 s, and the server's
--block-cache-bytes.

A pipeline is MODEL:TOKENS (a square number of tokens): latents [4, H, W]
(H = W = sqrt(TOKENS) x patch; patch 2 on the trunk as DiT/2, 1 on the stack),
a K = --steps step loop of a real scheduler calling the server once per step:
DDIM with eta 0 ("leading" timesteps; on the trunk DiT's linear betas 1e-4 to
0.02 over 1000 steps, final alpha 1; on the stack SD's scaled-linear betas
0.00085 to 0.012, steps_offset 1, final alpha alphas_cumprod[0]), or Euler
(diffusers' EulerDiscreteScheduler with epsilon prediction, linspace
timesteps, sent as FP32). The blocks take and give tokens of the model's
width, so a fixed random patch embedding P (plus DiT's 2-D sin-cos position
embedding on the trunk) turns the scaled latents into hidden_states, and
eps = sqrt(1 - alpha_bar_t) P+(output - position), P+ its pseudo-inverse:
the residual stream's copy of the input, so scaled, is the best guess of the
noise for unit-variance latents (E[noise | x_t] = sqrt(1 - alpha_bar_t) x_t),
and what the blocks added perturbs it (a fixed output scale per timestep,
as a trained model's preconditioning has). The latents keep unit scale from
the first step to the last, and each step's output feeds the next step's
input, so an error that caching makes propagates to the final latents as in
a real pipeline.

The first pipeline of each model starts at once; the j-th after it on the
same model starts when that first one sends its step j x --stagger (after its
end when that is past the last step), so pipelines at different timesteps
share batches, and with an odd --stagger refreshes and reuses meet in one
batch. Each --intervals N runs every pipeline concurrently, each as one
sequence (sequence_id, sequence_start on step 0, sequence_end on the last,
block_cache_interval N; N = 1 is the exact run); then --alone runs
pipelines one at a time with N = 1.

Per run: images per minute (pipelines over the run's wall time), per-step
p50 and p99 latency per model, mean batch size per model (ModelStatistics'
inference_count / execution_count deltas), reuse / refresh counts (the
responses' block_cache parameter), and each pipeline's final latents against
its exact run: max abs difference and relative L2 (||x - x_exact|| /
||x_exact||). Fails (exit 1) when a response has the wrong shape or is not
finite, when a response of a caching request does not say "refresh" for
step k mod N = 0 and "reuse" otherwise (or a request without caching says
either), or when a pipeline run alone ends more than --tol (relative L2)
from the same pipeline in the concurrent exact run.

Every run first checks the schedulers and the latent/token maps (--self-test:
only that, no server): given the true noise as eps, DDIM and Euler end on
the clean latents; the patch maps invert each other.
"""
import argparse
import concurrent.futures
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
sys.path.insert(0, HERE)
import harness  # noqa: E402

import grpc  # noqa: E402  (before the stubs path: nothing may shadow it)

import mixed_load  # noqa: E402  (safetensors writer, SD-like block weights, percentiles, Client)

MODELS = ("trunk", "stack")
CHANNELS = 4  # latent channels (SD's VAE, DiT's)
TRAIN_STEPS = 1000
SEQ_IDLE_US = 60_000_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("binary", nargs="?", default="build/blockserve")
    p.add_argument("--pipelines", default="trunk:256,stack:1024,trunk:256,stack:256",
                   help="MODEL:TOKENS per pipeline, MODEL trunk or stack")
    p.add_argument("--steps", type=int, default=20, help="denoising steps K")
    p.add_argument("--intervals", default="1,2,3,4", help="block_cache_interval per run (1: exact)")
    p.add_argument("--stagger", type=int, default=5,
                   help="a model's j-th pipeline starts at its first one's step j x this")
    p.add_argument("--scheduler", choices=("ddim", "euler"), default="ddim")
    p.add_argument("--trunk", default="dit_xl_trunk", help="built-in example served as the trunk")
    p.add_argument("--stack-blocks", type=int, default=4)
    p.add_argument("--stack-dim", type=int, default=320)
    p.add_argument("--stack-heads", type=int, default=8)
    p.add_argument("--context-dim", type=int, default=768)
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--queue-delay-us", default="100000,50000",
                   help="max_queue_delay_microseconds of the trunk, the stack")
    p.add_argument("--block-cache-bytes", type=int, default=1 << 30, help="server --block-cache-bytes")
    p.add_argument("--threads", type=int, default=0, help="server --threads (0: its default)")
    p.add_argument("--alone", choices=("all", "first", "none"), default="all",
                   help="pipelines also run alone (first: the first of each model)")
    p.add_argument("--tol", type=float, default=1e-3, help="alone against batched, relative L2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--self-test", action="store_true", help="check schedulers and maps; no server")
    a = p.parse_args(argv)
    a.binary = os.path.abspath(a.binary)
    try:
        a.specs = [(m, int(t)) for m, t in (item.split(":") for item in a.pipelines.split(","))]
        a.ns = [int(n) for n in a.intervals.split(",")]
        a.delay = dict(zip(MODELS, (int(d) for d in a.queue_delay_us.split(",", 1))))
    except ValueError:
        sys.exit("pipeline: --pipelines MODEL:TOKENS,...; --intervals N,...; --queue-delay-us TRUNK,STACK")
    if len(a.delay) != 2 or min(a.delay.values()) < 0:
        sys.exit("pipeline: --queue-delay-us TRUNK,STACK (microseconds >= 0)")
    for m, t in a.specs:
        if m not in MODELS or t < 1 or math.isqrt(t) ** 2 != t:
            sys.exit(f"pipeline: --pipelines: {m}:{t}: MODEL is trunk or stack, TOKENS a square")
    if 1 not in a.ns or min(a.ns) < 1 or len(set(a.ns)) != len(a.ns):
        sys.exit("pipeline: --intervals: distinct N >= 1, 1 (the exact run) among them")
    if a.steps < 1 or a.stagger < 0 or a.stack_dim % a.stack_heads:
        sys.exit("pipeline: --steps >= 1, --stagger >= 0, --stack-dim a multiple of --stack-heads")
    return a


# ---- schedulers -------------------------------------------------------------

def alphas_cumprod(kind):
    """DiT's linear betas or SD's scaled-linear ones, over TRAIN_STEPS."""
    if kind == "linear":
        betas = np.linspace(1e-4, 0.02, TRAIN_STEPS, dtype=np.float64)
    else:
        betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, TRAIN_STEPS, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


class DDIM:
    """DDIM, eta 0: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, with
    x0 = (x - sqrt(1 - a) eps) / sqrt(a); "leading" timesteps."""

    def __init__(self, kind, steps, offset, final_alpha_one):
        self.ac = alphas_cumprod(kind)
        self.ratio = TRAIN_STEPS // steps
        self.timesteps = [int(t) + offset for t in (np.arange(steps) * self.ratio)[::-1]]
        self.final = 1.0 if final_alpha_one else self.ac[0]
        self.init_sigma = 1.0
        self.float_t = False

    def scale_input(self, x, k):
        return x

    def alpha_bar(self, k):
        return self.ac[self.timesteps[k]]

    def step(self, x, eps, k):
        t = self.timesteps[k]
        a = self.ac[t]
        prev = t - self.ratio
        ap = self.ac[prev] if prev >= 0 else self.final
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps


class Euler:
    """Euler on sigma = sqrt((1 - a) / a) with epsilon prediction: the model
    sees x / sqrt(sigma^2 + 1), and x += (sigma_next - sigma) eps; linspace
    timesteps, sigmas interpolated, the last step to sigma 0."""

    def __init__(self, kind, steps, offset, final_alpha_one):
        ac = alphas_cumprod(kind)
        self.timesteps = [float(t) for t in np.linspace(0, TRAIN_STEPS - 1, steps)[::-1]]
        all_sigmas = np.sqrt((1 - ac) / ac)
        self.sigmas = list(np.interp(self.timesteps, np.arange(TRAIN_STEPS), all_sigmas)) + [0.0]
        self.init_sigma = math.sqrt(self.sigmas[0] ** 2 + 1)
        self.float_t = True

    def scale_input(self, x, k):
        return x / math.sqrt(self.sigmas[k] ** 2 + 1)

    def alpha_bar(self, k):
        return 1 / (self.sigmas[k] ** 2 + 1)

    def step(self, x, eps, k):
        return x + (self.sigmas[k + 1] - self.sigmas[k]) * eps


# The models' schedules: (betas, steps_offset, final alpha 1).
SCHEDULE = {"trunk": ("linear", 0, True), "stack": ("scaled_linear", 1, False)}


def make_scheduler(a, model):
    return (DDIM if a.scheduler == "ddim" else Euler)(*SCHEDULE[model][:1], a.steps, *SCHEDULE[model][1:])


# ---- latents <-> tokens -----------------------------------------------------

def sincos_2d(side, dim):
    """DiT's fixed 2-D sin-cos position embedding for a side x side grid: half
    the width for each axis, frequencies 1 / 10000^(i / (dim / 4))."""
    q = dim // 4
    omega = 1.0 / 10000 ** (np.arange(q, dtype=np.float64) / q)
    ys, xs = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        ang = np.outer(pos, omega)
        parts += [np.sin(ang), np.cos(ang)]
    emb = np.concatenate(parts, axis=1)
    return np.pad(emb, ((0, 0), (0, dim - emb.shape[1])))


class TokenMap:
    """Latents [C, H, W] <-> tokens [T, dim] for one model and size: patches
    of patch x patch, a fixed random embedding (and position embedding), and
    its pseudo-inverse to read eps back."""

    def __init__(self, dim, tokens, patch, pos, seed):
        self.side, self.patch = math.isqrt(tokens), patch
        self.shape = (CHANNELS, self.side * patch, self.side * patch)
        feat = patch * patch * CHANNELS
        rng = np.random.default_rng([seed, dim, feat])  # one per model: not per size
        self.w_in = rng.standard_normal((feat, dim)) / math.sqrt(feat)
        self.w_out = np.linalg.pinv(self.w_in)
        self.pos = sincos_2d(self.side, dim) if pos else 0.0

    def patchify(self, x):
        c, s, p = CHANNELS, self.side, self.patch
        return x.reshape(c, s, p, s, p).transpose(1, 3, 2, 4, 0).reshape(s * s, p * p * c)

    def unpatchify(self, t):
        c, s, p = CHANNELS, self.side, self.patch
        return t.reshape(s, s, p, p, c).transpose(4, 0, 2, 1, 3).reshape(c, s * p, s * p)

    def embed(self, x):
        """[1, T, dim] float32 hidden_states."""
        return (self.patchify(x) @ self.w_in + self.pos).astype(np.float32)[None]

    def read_eps(self, out, alpha_bar):
        """eps [C, H, W] from the output [1, T, dim]: sqrt(1 - alpha_bar) P(out - pos)."""
        return math.sqrt(1 - alpha_bar) * self.unpatchify((out[0].astype(np.float64) - self.pos) @ self.w_out)


def self_test():
    """The schedulers end on x0 when eps is the true noise; the maps invert."""
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((CHANNELS, 16, 16))
    worst = 0.0
    for cls in (DDIM, Euler):
        for model in MODELS:
            for steps in (1, 7, 20, 50):
                s = cls(SCHEDULE[model][0], steps, *SCHEDULE[model][1:])
                noise = rng.standard_normal(x0.shape)
                if cls is DDIM:
                    a0 = s.ac[s.timesteps[0]]
                    x = math.sqrt(a0) * x0 + math.sqrt(1 - a0) * noise
                else:
                    x = x0 + s.sigmas[0] * noise
                for k, t in enumerate(s.timesteps):
                    if cls is DDIM:
                        a = s.ac[t]
                        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
                    else:
                        eps = (x - x0) / s.sigmas[k]
                    s.scale_input(x, k)
                    x = s.step(x, eps, k)
                end = x0 if cls is Euler or s.final == 1.0 else \
                    math.sqrt(s.final) * x0 + math.sqrt(1 - s.final) * eps
                err = float(np.abs(x - end).max())
                worst = max(worst, err)
                if err > 1e-9:
                    sys.exit(f"pipeline: self-test: {cls.__name__} {model} {steps} steps: off by {err:.3g}")
    for dim, tokens, patch, pos in ((1152, 256, 2, True), (320, 64, 1, False)):
        m = TokenMap(dim, tokens, patch, pos, 0)
        x = rng.standard_normal(m.shape)
        if not np.array_equal(m.unpatchify(m.patchify(x)), x):
            sys.exit("pipeline: self-test: unpatchify(patchify(x)) != x")
        back = m.read_eps(m.embed(x), 0.0)
        err = float(np.abs(back - x).max())
        worst = max(worst, err)
        if err > 1e-5:  # float32 hidden_states
            sys.exit(f"pipeline: self-test: pinv readout off by {err:.3g}")
    print(f"pipeline: self-test passed (largest error {worst:.2e})")


# ---- the model repository ---------------------------------------------------

def stack_weights(a):
    """--stack-blocks SD-like blocks, each drawn as mixed_load's block."""
    ns = types.SimpleNamespace(dim=a.stack_dim, context_dim=a.context_dim)
    rng = np.random.default_rng(a.seed + 7)
    w = {}
    for i in range(a.stack_blocks):
        w.update({f"transformer_blocks.{i}.{k}": v for k, v in mixed_load.block_weights(ns, rng).items()})
    return w


def make_repository(a, root):
    """root/trunk (the built-in example) and root/stack (generated), with
    serving.json each."""
    trunk = os.path.join(root, "trunk")
    r = subprocess.run([a.binary, "example", a.trunk, "--out", trunk], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"pipeline: {a.binary} example {a.trunk}: {r.stderr.strip()}")
    with open(os.path.join(trunk, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("norm_type") != "ada_norm_zero":
        sys.exit(f"pipeline: --trunk {a.trunk}: not an ada_norm_zero (DiT) block")
    a.trunk_dim = cfg["dim"]
    stack = os.path.join(root, "stack")
    os.makedirs(stack)
    config = {"_class_name": "BasicTransformerBlock", "dim": a.stack_dim,
              "num_attention_heads": a.stack_heads, "attention_head_dim": a.stack_dim // a.stack_heads,
              "cross_attention_dim": a.context_dim, "activation_fn": "geglu", "norm_type": "layer_norm",
              "blockserve": {"num_blocks": a.stack_blocks}}
    with open(os.path.join(stack, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    mixed_load.st_save(os.path.join(stack, "diffusion_pytorch_model.safetensors"), stack_weights(a))
    for model, d in (("trunk", trunk), ("stack", stack)):
        n = sum(m == model for m, _ in a.specs)
        serving = {"dtype": a.dtype, "max_batch_size": a.max_batch_size,
                   "max_queue_delay_microseconds": a.delay[model], "ragged_batching": True,
                   "max_sequence_idle_microseconds": SEQ_IDLE_US}
        if 1 < n <= a.max_batch_size:
            serving["preferred_batch_size"] = [n]
        with open(os.path.join(d, "serving.json"), "w") as f:
            json.dump(serving, f)


# ---- one pipeline -----------------------------------------------------------

class Pipeline:
    """One image: its model, size, start, latent map, noise and conditioning."""

    def __init__(self, a, index, model, tokens):
        self.index, self.model, self.tokens = index, model, tokens
        rank = sum(m == model for m, _ in a.specs[:index])  # earlier pipelines on this model
        self.leader = next(i for i, (m, _) in enumerate(a.specs) if m == model)
        self.start_step = min(rank * a.stagger, a.steps)
        dim = a.trunk_dim if model == "trunk" else a.stack_dim
        self.map = TokenMap(dim, tokens, 2 if model == "trunk" else 1, model == "trunk", a.seed)
        rng = np.random.default_rng([a.seed, 100 + index])
        self.noise = rng.standard_normal(self.map.shape)
        self.cond = {}
        if model == "trunk":
            self.cond["class_labels"] = np.array([int(rng.integers(0, 1000))], dtype=np.int64)
        else:
            self.cond["encoder_hidden_states"] = rng.standard_normal(
                (1, a.context_len, a.context_dim)).astype(np.float32)

    def label(self):
        return f"{self.index}:{self.model}:{self.tokens}"


def add_param(r, key, kind, value):
    setattr(r.parameters[key], kind, value)


def make_request(pb, pipe, sched, x, k, n, seq_id, steps):
    r = pb.ModelInferRequest(model_name=pipe.model)
    t = sched.timesteps[k]
    ins = {"hidden_states": pipe.map.embed(sched.scale_input(x, k))}
    if pipe.model == "trunk":
        ins["timestep"] = np.array([t], dtype=np.float32 if sched.float_t else np.int64)
    ins.update(pipe.cond)
    for name, arr in ins.items():
        r.inputs.add(name=name, datatype="FP32" if arr.dtype == np.float32 else "INT64", shape=list(arr.shape))
        r.raw_input_contents.append(arr.tobytes())
    add_param(r, "sequence_id", "uint64_param", seq_id)
    if k == 0:
        add_param(r, "sequence_start", "bool_param", True)
    if k == steps - 1:
        add_param(r, "sequence_end", "bool_param", True)
    add_param(r, "block_cache_interval", "int64_param", n)
    return r.SerializeToString()


def expected_cache(n, k):
    """The block_cache parameter step k of a sequence with interval n answers."""
    return None if n == 1 else ("refresh" if k % n == 0 else "reuse")


def run_pipeline(cl, a, pipe, n, seq_id, gate, on_step):
    """The K-step loop of one pipeline; on_step(k) runs before step k is sent.
    Returns {latents, trajectory, latency, cache, errors}."""
    sched = make_scheduler(a, pipe.model)
    x = pipe.noise * sched.init_sigma
    res = {"latency": [], "cache": [], "trajectory": [], "errors": []}
    req = make_request(cl.pb, pipe, sched, x, 0, n, seq_id, a.steps)  # ready before the gate opens
    gate.wait()
    shape = [1, pipe.tokens, pipe.map.w_in.shape[1]]
    for k in range(a.steps):
        if k:
            req = make_request(cl.pb, pipe, sched, x, k, n, seq_id, a.steps)
        on_step(k)
        t0 = time.perf_counter()
        try:
            resp = cl.infer(req)
        except grpc.RpcError as e:
            res["errors"].append(f"pipeline {pipe.label()} N={n} step {k}: {e.code().name}: {e.details()}")
            break
        res["latency"].append(time.perf_counter() - t0)
        got = None
        if "block_cache" in resp.parameters:
            p = resp.parameters["block_cache"]
            kind = p.WhichOneof("parameter_choice")
            got = p.string_param if kind == "string_param" else f"{kind}: {getattr(p, kind) if kind else ''}"
        res["cache"].append(got)
        if got != expected_cache(n, k):
            res["errors"].append(f"pipeline {pipe.label()} N={n} step {k}: block_cache {got!r}, "
                                 f"expected {expected_cache(n, k)!r}")
        if len(resp.outputs) != 1 or list(resp.outputs[0].shape) != shape \
                or len(resp.raw_output_contents) != 1 or len(resp.raw_output_contents[0]) != 4 * math.prod(shape):
            res["errors"].append(f"pipeline {pipe.label()} N={n} step {k}: output shapes "
                                 f"{[list(o.shape) for o in resp.outputs]}, expected [{shape}] FP32 raw")
            break
        out = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(shape)
        if not np.isfinite(out).all():
            res["errors"].append(f"pipeline {pipe.label()} N={n} step {k}: output not finite")
            break
        x = sched.step(x, pipe.map.read_eps(out, sched.alpha_bar(k)), k)
        res["trajectory"].append(x)
    res["latents"] = x
    return res


# ---- runs -------------------------------------------------------------------

class Run:
    """One run: a set of pipelines at one interval, concurrent (staggered) or alone."""

    def __init__(self, name, n):
        self.name, self.n = name, n
        self.wall, self.results, self.stats = 0.0, {}, {m: [0, 0, {}] for m in MODELS}

    def add_stats(self, s0, s1):
        for m in MODELS:
            st = self.stats[m]
            st[0] += s1[m][0] - s0[m][0]
            st[1] += s1[m][1] - s0[m][1]
            for size, c in s1[m][2].items():
                if c - s0[m][2].get(size, 0):
                    st[2][size] = st[2].get(size, 0) + c - s0[m][2].get(size, 0)


def all_stats(cl):
    return {m: cl.stats(m) for m in MODELS}


def run_concurrent(cl, a, pipes, run, id_base):
    """Every pipeline of pipes at once; a pipeline waits for its model's first
    pipeline (its leader) to send step start_step."""
    gates = {p.index: threading.Event() for p in pipes}
    leads = {p.index: [q for q in pipes if q.leader == p.index and q is not p] for p in pipes}

    def one(p):
        def on_step(k):
            for q in leads[p.index]:
                if q.start_step == k:
                    gates[q.index].set()

        if p.leader == p.index or not any(q.index == p.leader for q in pipes):
            gates[p.index].set()  # a leader, or its leader is not in this run (alone)
        try:
            return run_pipeline(cl, a, p, run.n, id_base + p.index, gates[p.index], on_step)
        finally:
            for q in leads[p.index]:  # start_step K (after the end), or the leader stopped early
                gates[q.index].set()

    s0 = all_stats(cl)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(pipes)) as ex:
        results = list(ex.map(one, pipes))
    run.wall += time.perf_counter() - t0
    run.add_stats(s0, all_stats(cl))
    for p, r in zip(pipes, results):
        run.results[p.index] = r


def alone_set(a, pipes):
    if a.alone == "none":
        return []
    if a.alone == "all":
        return pipes
    return [next(p for p in pipes if p.model == m) for m in MODELS if any(p.model == m for p in pipes)]


def warm_up(cl, a, pipes):
    """One untimed exact call per (model, tokens) outside any sequence."""
    for model, tokens in sorted({(p.model, p.tokens) for p in pipes}):
        p = next(q for q in pipes if (q.model, q.tokens) == (model, tokens))
        sched = make_scheduler(a, model)
        r = cl.pb.ModelInferRequest.FromString(make_request(cl.pb, p, sched, p.noise, 0, 1, 1, a.steps))
        r.ClearField("parameters")
        cl.infer(r.SerializeToString())


def run_all(cl, a, pipes):
    runs, errors = [], []
    for j, n in enumerate(a.ns):
        run = Run(f"N={n}" + (" (exact)" if n == 1 else ""), n)
        run_concurrent(cl, a, pipes, run, 1000 * (j + 1))
        runs.append(run)
        print(f"  {run.name}: {len(pipes)} pipelines in {run.wall:.1f} s", flush=True)
    solo = alone_set(a, pipes)
    if solo:
        run = Run("alone, N=1", 1)
        for p in solo:
            run_concurrent(cl, a, [p], run, 1000 * (len(a.ns) + 1))
        runs.append(run)
        print(f"  {run.name}: {len(solo)} pipelines one at a time in {run.wall:.1f} s", flush=True)
    for run in runs:
        for r in run.results.values():
            errors += r["errors"]
    return runs, errors


# ---- report -----------------------------------------------------------------

def deviation(x, ref):
    d = x - ref
    return float(np.abs(d).max()), float(np.linalg.norm(d) / max(np.linalg.norm(ref), 1e-300))


def summarize(a, pipes, runs):
    """Rows of figures per run, and the alone-against-batched errors."""
    exact = next(r for r in runs if r.n == 1 and not r.name.startswith("alone"))
    rows, errors = [], []
    for run in runs:
        row = {"run": run.name, "interval": run.n, "seconds": run.wall, "pipelines": len(run.results),
               "images_per_min": 60 * len(run.results) / run.wall if run.wall else None, "models": {},
               "reuse": 0, "refresh": 0, "pipeline": {}}
        for m in MODELS:
            lat = sorted(t for i, r in run.results.items() if pipes[i].model == m for t in r["latency"])
            inf, ex, hist = run.stats[m]
            row["models"][m] = {"steps": len(lat), "p50_ms": mixed_load.percentile(lat, 0.5) if lat else None,
                                "p99_ms": mixed_load.percentile(lat, 0.99) if lat else None,
                                "mean_batch": inf / ex if ex else None, "executions": ex, "inferences": inf,
                                "batch_sizes": dict(sorted(hist.items()))}
        for i, r in sorted(run.results.items()):
            row["reuse"] += r["cache"].count("reuse")
            row["refresh"] += r["cache"].count("refresh")
            ref = exact.results[i]
            pr = {"model": pipes[i].model, "tokens": pipes[i].tokens, "start_step": pipes[i].start_step,
                  "cache": r["cache"], "latency_ms": [1e3 * t for t in r["latency"]],
                  "complete": len(r["trajectory"]) == a.steps}
            if pr["complete"] and len(ref["trajectory"]) == a.steps:
                pr["max_abs"], pr["rel_l2"] = deviation(r["latents"], ref["latents"])
                pr["rel_l2_per_step"] = [deviation(x, y)[1] for x, y in zip(r["trajectory"], ref["trajectory"])]
                pr["latents_rms"] = float(np.sqrt(np.mean(ref["latents"] ** 2)))
                if run.name.startswith("alone") and not pr["rel_l2"] <= a.tol:
                    errors.append(f"pipeline {pipes[i].label()}: alone differs from batched by relative L2 "
                                  f"{pr['rel_l2']:.3g} (max abs {pr['max_abs']:.3g}) > --tol {a.tol}")
            row["pipeline"][i] = pr
        devs = [p for p in row["pipeline"].values() if "rel_l2" in p]
        row["max_abs"] = max((p["max_abs"] for p in devs), default=None)
        row["rel_l2"] = max((p["rel_l2"] for p in devs), default=None)
        rows.append(row)
    return rows, errors


fmt = mixed_load.fmt


def tables(a, pipes, rows):
    used = [m for m in MODELS if any(p.model == m for p in pipes)]
    cols = ["run", "images/min"] + [f"{m} p50 / p99 ms" for m in used] + [f"{m} mean batch" for m in used] + \
        ["reuse / refresh", "max abs dev", "rel L2 dev"]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "--:|" * (len(cols) - 1)]
    for r in rows:
        lines.append("| " + " | ".join(
            [r["run"], fmt(r["images_per_min"], ".2f")] +
            [f"{fmt(r['models'][m]['p50_ms'], '.0f')} / {fmt(r['models'][m]['p99_ms'], '.0f')}" for m in used] +
            [fmt(r["models"][m]["mean_batch"], ".2f") for m in used] +
            [f"{r['reuse']} / {r['refresh']}", fmt(r["max_abs"], ".2e"), fmt(r["rel_l2"], ".2e")]) + " |")
    per = ["| pipeline | model | tokens | joins at step | " + " | ".join(r["run"] for r in rows) + " |",
           "|---|---|--:|--:|" + "--:|" * len(rows)]
    for p in pipes:
        cells = []
        for r in rows:
            d = r["pipeline"].get(p.index)
            cells.append("-" if d is None or "rel_l2" not in d else f"{d['rel_l2']:.2e} ({d['max_abs']:.1e})")
        per.append(f"| {p.index} | {p.model} | {p.tokens} | {p.start_step} | " + " | ".join(cells) + " |")
    return "\n".join(lines), "\n".join(per)


def machine():
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
        flags = "avx512_bf16" if "avx512_bf16" in info else "no avx512_bf16"
    except OSError:
        model = platform.processor() or "?"
    return f"{os.cpu_count()} CPUs ({model}, {flags})"


def describe(a, pipes):
    print(f"pipeline: {a.binary}; trunk {a.trunk} (dim {a.trunk_dim}), stack {a.stack_blocks} blocks of dim "
          f"{a.stack_dim} (context {a.context_len} x {a.context_dim}); {a.dtype}; {a.scheduler}, {a.steps} steps; "
          f"intervals {a.intervals}; max_batch_size {a.max_batch_size}, max_queue_delay "
          f"{a.delay['trunk']} / {a.delay['stack']} us; {machine()}; load average {os.getloadavg()[0]:.2f} (1 min)")
    print("  pipelines: " + ", ".join(f"{p.label()} from step {p.start_step}" for p in pipes), flush=True)


def report(a, pipes, rows, errors, elapsed, load0):
    main_t, per_t = tables(a, pipes, rows)
    print(main_t)
    print("\nfinal latents against the exact run (N=1, concurrent): relative L2 (max abs)\n")
    print(per_t)
    print(f"\nrun time {elapsed:.0f} s; load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
          f"(1 min); {machine()}")
    if a.json:
        args = {k: v for k, v in vars(a).items() if k not in ("specs",)}
        with open(a.json, "w") as f:
            json.dump({"args": args, "machine": machine(), "load_average_start": load0,
                       "pipelines": [{"index": p.index, "model": p.model, "tokens": p.tokens,
                                      "start_step": p.start_step, "latent_shape": list(p.map.shape)} for p in pipes],
                       "runs": rows, "errors": errors, "seconds": elapsed}, f, indent=1)
    for e in errors[:20]:
        print("pipeline: FAIL " + e, file=sys.stderr)


def not_ready(cl):
    idx = {m.name: m for m in cl.stub.RepositoryIndex(cl.pb.RepositoryIndexRequest()).models}
    return {m: (idx[m].reason if m in idx else "not in the repository index")
            for m in MODELS if m not in idx or idx[m].state != "READY"}


def main():
    a = parse_args()
    self_test()
    if a.self_test:
        return 0
    t_start, load0 = time.time(), os.getloadavg()[0]
    stubs = tempfile.mkdtemp(prefix="bs_stubs_")
    repo = tempfile.mkdtemp(prefix="bs_pipe_repo_")
    srv, bad = None, {}
    try:
        harness.generate_stubs(stubs)
        import grpc_service_pb2 as pb
        import grpc_service_pb2_grpc as pbg
        make_repository(a, repo)
        pipes = [Pipeline(a, i, m, t) for i, (m, t) in enumerate(a.specs)]
        args = ["--model-repository", repo, "--no-metrics", "--block-cache-bytes", str(a.block_cache_bytes)]
        try:
            srv = harness.Server(a.binary, args + (["--threads", str(a.threads)] if a.threads else []))
        except (RuntimeError, OSError) as e:
            sys.exit(f"pipeline: {a.binary}: {e}")
        cl = mixed_load.Client(srv.address, pb, pbg)
        describe(a, pipes)
        try:
            bad = not_ready(cl)
            if not bad:
                warm_up(cl, a, pipes)
                runs, errors = run_all(cl, a, pipes)
        finally:
            cl.ch.close()
    finally:
        code = srv.stop() if srv else None
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(stubs, ignore_errors=True)
    if bad:
        sys.exit("pipeline: models not ready: " + "; ".join(f"{m}: {r}" for m, r in bad.items()))
    if code != 0:
        errors.append(f"server exit code {code}\n{srv.text()}")
    rows, errs = summarize(a, pipes, runs)
    report(a, pipes, rows, errors + errs, time.time() - t_start, load0)
    return 1 if errors or errs else 0


if __name__ == "__main__":
    sys.exit(main())
