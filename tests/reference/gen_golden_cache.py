#!/usr/bin/python3
"""Golden sequences for step-level block caching (FORA), from block_cache.py.

    /usr/bin/python3 tests/reference/gen_golden_cache.py [--out tests/golden_cache]
    /usr/bin/python3 tests/reference/gen_golden_cache.py --check [--rtol R]

For each case below (a golden BasicTransformerBlock case, model and inputs
read from tests/golden/<case>), a short denoising sequence of STEPS calls:
call 0 takes the golden inputs; each later call moves hidden_states by
NOISE x N(0, 1) (seeded from the case name) from the call before and, where
the model takes a timestep, takes another one (AdaLayerNorm: index
(t - 3k) mod num_embeds_ada_norm; AdaLayerNormZero: t x (8 - k) / 8, floored
for integer timesteps); class labels, encoder_hidden_states and masks stay.
With interval INTERVAL the calls refresh, reuse, refresh, reuse.

Writes tests/golden_cache/<case>/steps.safetensors:
    <input>              an input every call shares (encoder_hidden_states,
                         class_labels, masks), as the golden case stores it
    step<k>.<input>      call k's own inputs (hidden_states F32, timestep in
                         the golden case's dtype)
    step<k>.expected     F32: call k's output under the caching rule
    step<k>.exact        F32: call k's output without caching
with metadata "modes" (the calls' modes, comma-separated), "steps",
"interval" and "case"; and a README.md listing the cases.

The reference runs in float64 (blocks.py's modules converted with .double();
its softmax and timestep sinusoid stay float32, as in diffusers), on the
inputs read back as stored. --check regenerates everything in memory and
compares with the committed files: inputs and metadata exactly, outputs bit
for bit, or within --rtol (max |diff| <= rtol x max |output|; CTest uses
4e-6 as check_golden.py does: the float32 softmax and the BLAS kernels may
round differently on another CPU). Exit status 0 when every case passes.
"""

import argparse
import json
import os
import shutil
import sys
import zlib

import torch

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import block_cache  # noqa: E402
import blocks  # noqa: E402
import st  # noqa: E402

STEPS = 4
INTERVAL = 2
NOISE = 0.1
FILE = "steps.safetensors"
METADATA = {"format": "pt"}

# A reuse must move the output by at least this much (max |diff| / max
# |exact|) away from the exact forward, or the sequence cannot tell a cache
# that is used from one that is ignored. The C test (test_block_cache_ref)
# checks the same with its own results.
MIN_REUSE_EFFECT = 1e-2

# (golden case, what it covers)
CASES = [
    ("btb_geglu_cross", "LayerNorm block with cross-attention (attn1, attn2, ff cached)"),
    ("btb_self_only", "LayerNorm block without attn2 (attn1 and ff cached)"),
    ("btb_only_cross_attention_masks", "only_cross_attention with attention_mask and encoder_attention_mask"),
    ("btb_ada_norm_per_sample_t", "AdaLayerNorm with per-sample int64 timesteps (norm1 and norm2 adaptive)"),
    ("btb_ada_norm_zero_dit", "AdaLayerNormZero (DiT): gates from each call's F32 timesteps and labels"),
    ("btb_ada_norm_zero_scalar", "AdaLayerNormZero with 0-d int64 timestep and label (broadcast)"),
    ("btb_ada_norm_zero_cross", "AdaLayerNormZero with cross-attention (norm2 a LayerNorm), int64 timesteps"),
    ("btb_stack3", "a stack of 3 LayerNorm blocks with encoder_attention_mask: a cache per block"),
    ("btb_stack3_dit", "a stack of 3 AdaLayerNormZero blocks: a cache per block, gates per call"),
]

# Inputs that change from call to call; the rest is shared.
PER_STEP = ("hidden_states", "timestep")


def golden_case_dir(golden_dir, name):
    return os.path.join(golden_dir, name)


def next_timestep(t0, k, cfg):
    """Call k's timestep, derived from call 0's (kept in t0's dtype and shape)."""
    if cfg["norm_type"] == "ada_norm":
        n = cfg["num_embeds_ada_norm"]
        idx = torch.remainder(t0.to(torch.int64) - 3 * k, n)
        return idx.to(t0.dtype)
    if t0.is_floating_point():
        return (t0.double() * (8 - k) / 8).to(t0.dtype)
    return torch.div(t0 * (8 - k), 8, rounding_mode="floor")


def make_steps(name, golden_dir):
    """(config, model weights, shared inputs, per-step inputs): as stored."""
    path = golden_case_dir(golden_dir, name)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    weights, _ = st.load(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    golden, _ = st.load(os.path.join(path, "inputs.safetensors"))
    g = torch.Generator().manual_seed(zlib.crc32(("golden_cache/" + name).encode("utf-8")))
    shared = {k: v for k, v in golden.items() if k not in PER_STEP}
    steps = [{k: v for k, v in golden.items() if k in PER_STEP}]
    for k in range(1, STEPS):
        prev = steps[-1]
        x = prev["hidden_states"].to(torch.float32)
        step = {"hidden_states": x + NOISE * torch.randn(x.shape, generator=g)}
        if "timestep" in prev:
            step["timestep"] = next_timestep(golden["timestep"], k, cfg)
        steps.append(step)
    return cfg, weights, shared, steps


def as_float64(inputs):
    """The forward's arguments: activations in float64, the rest as stored."""
    return {k: (v.double() if k in blocks.FLOAT_INPUTS else v) for k, v in inputs.items()}


def evaluate(cfg, weights, shared, steps, modes):
    """Each call's output under the caching rule and without caching (F32)."""
    model = blocks.build_model(cfg, weights).double()
    cached = block_cache.CachedModel(model)
    expected, exact = [], []
    with torch.no_grad():
        for step, mode in zip(steps, modes):
            args = as_float64({**shared, **step})
            exact.append(cached.run("off", **args).float().contiguous())
            expected.append(cached.run(mode, **args).float().contiguous())
    return expected, exact


def reuse_effect(expected, exact):
    """max |expected - exact| / max |exact|: how far a reuse moves the output."""
    return ((expected - exact).abs().max() / exact.abs().max()).item()


def build_case(name, golden_dir):
    """The tensors and metadata of one case's steps.safetensors, from the golden case."""
    cfg, weights, shared, steps = make_steps(name, golden_dir)
    # Read the inputs back as stored, as the engine will see them.
    stored, _ = st.loads(st.dumps({**shared, **{f"step{k}.{n}": v for k, s in enumerate(steps) for n, v in s.items()}}))
    shared = {n: stored[n] for n in shared}
    steps = [{n: stored[f"step{k}.{n}"] for n in s} for k, s in enumerate(steps)]
    modes = block_cache.interval_modes(STEPS, INTERVAL)
    expected, exact = evaluate(cfg, weights, shared, steps, modes)
    tensors = dict(shared)
    for k, step in enumerate(steps):
        for n, v in step.items():
            tensors[f"step{k}.{n}"] = v
        tensors[f"step{k}.expected"] = expected[k]
        tensors[f"step{k}.exact"] = exact[k]
    metadata = dict(METADATA, case=name, steps=str(STEPS), interval=str(INTERVAL), modes=",".join(modes))
    return tensors, metadata, modes


def sanity(name, tensors, modes):
    """Problems with a case's own numbers (an empty list when sound)."""
    problems = []
    for k, mode in enumerate(modes):
        want, exact = tensors[f"step{k}.expected"], tensors[f"step{k}.exact"]
        if not torch.isfinite(want).all() or not torch.isfinite(exact).all():
            problems.append(f"step {k}: non-finite output")
        elif mode == "refresh" and not torch.equal(want, exact):
            problems.append(f"step {k}: a refresh differs from the exact forward")
        elif mode == "reuse" and not reuse_effect(want, exact) >= MIN_REUSE_EFFECT:
            problems.append(f"step {k}: the reuse moves the output by only {reuse_effect(want, exact):g} "
                            f"(< {MIN_REUSE_EFFECT:g}) from the exact forward")
    return problems


def check_case(path, name, golden_dir, rtol):
    """Problems found in one committed case (an empty list when it passes)."""
    file = os.path.join(path, FILE)
    if not os.path.isfile(file):
        return [f"missing {FILE}"]
    have, meta = st.load(file)
    want, want_meta, modes = build_case(name, golden_dir)
    problems = sanity(name, have, modes) if set(have) == set(want) else []
    if meta != want_meta:
        problems.append(f"metadata {meta} != {want_meta}")
    if set(have) != set(want):
        problems.append(f"tensors {sorted(have)} != {sorted(want)}")
        return problems
    for n, w in want.items():
        h = have[n]
        if h.dtype != w.dtype or h.shape != w.shape:
            problems.append(f"{n}: {h.dtype}{list(h.shape)} != {w.dtype}{list(w.shape)}")
        elif not n.endswith((".expected", ".exact")):
            if not torch.equal(h, w):
                problems.append(f"{n}: input differs from the regenerated one")
        else:
            diff = (h - w).abs().max().item()
            scale = w.abs().max().item()
            if not diff <= rtol * scale or (rtol == 0.0 and not torch.equal(h, w)):
                problems.append(f"{n}: max abs diff {diff:g} (bound {rtol * scale:g} = {rtol:g} x max |output| "
                                f"{scale:g})")
    return problems


def describe(t):
    return f"{st._NAME_OF[t.dtype]}{list(t.shape)}"


def write_readme(out_dir, rows):
    lines = [
        "# Golden sequences for block caching",
        "",
        "Generated by tests/reference/gen_golden_cache.py from the golden cases in tests/golden",
        "and the caching rule in tests/reference/block_cache.py; do not edit by hand. Regenerate",
        "from the repository root with",
        "",
        "    /usr/bin/python3 tests/reference/gen_golden_cache.py   # [--out DIR], default tests/golden_cache",
        "",
        "and verify with `/usr/bin/python3 tests/reference/gen_golden_cache.py --check --rtol 4e-6`.",
        "",
        f"Each directory holds {FILE}: a sequence of {STEPS} calls of the golden case's model",
        f"(modes {', '.join(block_cache.interval_modes(STEPS, INTERVAL))}: interval {INTERVAL}).",
        "Call 0 takes the golden inputs; each later call adds "
        f"{NOISE} x N(0, 1) to hidden_states and, where",
        "the model takes one, changes the timestep (AdaLayerNorm: (t - 3k) mod num_embeds_ada_norm;",
        "AdaLayerNormZero: t x (8 - k) / 8, floored when int64). Inputs shared by all calls keep",
        "their names; `step<k>.<input>` are call k's own; `step<k>.expected` (F32) is call k's",
        "output under the caching rule and `step<k>.exact` (F32) its output without caching.",
        "Metadata: `modes` (comma-separated), `steps`, `interval`, `case`. tests/unit/test_block_cache_ref.c",
        "runs the engine through each sequence (tolerance 1e-4 x max |output|).",
        "",
        "| case | what it covers | shared inputs | per call | reuse moves the output by |",
        "|---|---|---|---|---|",
    ]
    for name, description, tensors, modes in rows:
        shared = ", ".join(f"{k} {describe(v)}" for k, v in tensors.items() if not k.startswith("step"))
        own = ", ".join(f"{k[6:]} {describe(v)}" for k, v in tensors.items()
                        if k.startswith("step0.") and not k.endswith((".expected", ".exact")))
        effect = ", ".join(f"{reuse_effect(tensors[f'step{k}.expected'], tensors[f'step{k}.exact']):.3f}"
                           for k, m in enumerate(modes) if m == "reuse")
        lines.append(f"| {name} | {description} | {shared or '-'} | {own} | {effect} |")
    lines.append("")
    lines.append("The last column is max |expected - exact| / max |exact| of each reuse call.")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "golden_cache")),
                        help="output directory (default tests/golden_cache)")
    parser.add_argument("--golden", default=os.path.normpath(os.path.join(here, "..", "golden")),
                        help="the golden cases the sequences start from (default tests/golden)")
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    parser.add_argument("--rtol", type=float, default=0.0,
                        help="with --check: max abs diff of outputs accepted, relative to max |output| "
                             "(default 0: bit for bit)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    names = [name for name, _ in CASES]

    if args.check:
        found = sorted(e for e in os.listdir(args.out) if os.path.isdir(os.path.join(args.out, e)))
        failures = 0
        for name in sorted(set(names) | set(found)):
            if name not in names:
                problems = ["not a case of gen_golden_cache.py (stale?)"]
            else:
                problems = check_case(os.path.join(args.out, name), name, args.golden, args.rtol)
            print(("FAIL " if problems else "ok   ") + name + "".join(f"\n     {p}" for p in problems))
            failures += bool(problems)
        total = len(set(names) | set(found))
        print(f"{failures} of {total} cases FAILED" if failures else f"all {total} cases ok")
        return 1 if failures else 0

    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, description in CASES:
        tensors, metadata, modes = build_case(name, args.golden)
        problems = sanity(name, tensors, modes)
        if problems:
            raise RuntimeError(f"{name}: " + "; ".join(problems))
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        st.save(os.path.join(args.out, name, FILE), tensors, metadata)
        rows.append((name, description, tensors, modes))
        worst = max(reuse_effect(tensors[f"step{k}.expected"], tensors[f"step{k}.exact"])
                    for k, m in enumerate(modes) if m == "reuse")
        print(f"{name:32s} reuse vs exact {worst:.4f} x max |output|")
    for entry in sorted(os.listdir(args.out)):
        path = os.path.join(args.out, entry)
        if entry not in names and os.path.isdir(path) and set(os.listdir(path)) <= {FILE}:
            print(f"removing stale case {entry}")
            shutil.rmtree(path)
    write_readme(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
