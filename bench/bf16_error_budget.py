"""Where BF16 costs accuracy: the error of each rounding choice on the real
workloads, measured against an FP64 reference, to decide what a BF16 model
keeps in FP32 (README, "CPU BF16").

    /usr/bin/python3 bench/bf16_error_budget.py [--build build] [--threads 2]
                                                [--workloads a,b]

Every variant runs the reference modules of tests/reference (the diffusers
formulation) in FP64 on the same model directory (`blockserve example NAME`)
and rounds chosen values to BF16 (round to nearest even), so each row
isolates one choice:

  products        operands of every linear layer (input and weight) and of
                  the two attention products (q, k, v, probabilities) in
                  BF16; everything else exact. This is what blockserve's BF16
                  path rounds.
  products, cond  the same, but the conditioning linears (timestep embedder,
                  AdaLayerNorm / AdaLayerNormZero / AdaGroupNorm modulation)
                  exact: what keeping the timestep embeddings in FP32 buys.
  narrow acts     products, and the feed-forward's pre-activation (the
                  output of its first linear, GEGLU's both halves) stored as
                  BF16: with the operands of every product rounded anyway,
                  this is the only extra rounding of blockserve's narrow
                  activations (--activations compute, the cuda default:
                  norm outputs, q, k, v, attention outputs and feed-forward
                  hidden layers in BF16; the residual stream, modulation
                  rows and norm statistics in FP32).
  + norm out      products, and every norm's output stored as BF16
                  (AdaLayerNormZero's modulation rows too).
  + activations   products, and every module's output stored as BF16 (the
                  residual stream and every activation in BF16, as PyTorch's
                  BF16 modules store them).
  torch bf16      the modules after .to(torch.bfloat16) (PyTorch's own path).
  fp32            the modules in FP32 (for scale).

Error: max |out - ref| / max |ref| (the figure the CPU benchmark reports).
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import blocks  # noqa: E402
import st  # noqa: E402

WORKLOADS = ["sd15_mid_block", "dit_xl_block", "vae_mid_attention", "sd15_down0_block"]


def is_cond(name):
    """A conditioning linear: the timestep embedder's, or an adaptive norm's
    modulation ("linear" of a norm, or of AdaGroupNorm / AdaLayerNorm served
    alone)."""
    parts = name.split(".")
    return "timestep_embedder" in parts or (
        parts[-1] == "linear" and (len(parts) == 1 or parts[-2].startswith("norm")))


def bf16(x):
    return x.to(torch.bfloat16).to(x.dtype) if x.is_floating_point() else x


class Rounding:
    """Monkeypatches that round operands to BF16 while the modules run in FP64."""

    def __init__(self, model, keep_cond=False, norm_out=False, all_out=False, ff_pre=False):
        self.model, self.keep_cond, self.norm_out, self.all_out = model, keep_cond, norm_out, all_out
        self.ff_pre = ff_pre

    @contextlib.contextmanager
    def active(self):
        orig_linear = torch.nn.Linear.forward
        orig_baddbmm, orig_bmm = torch.baddbmm, torch.bmm
        keep = set()
        if self.keep_cond:
            keep = {m for name, m in self.model.named_modules()
                    if isinstance(m, torch.nn.Linear) and is_cond(name)}

        def linear(mod, x):
            if mod in keep:
                return orig_linear(mod, x)
            return F.linear(bf16(x), bf16(mod.weight), mod.bias)

        def baddbmm(bias, a, b, **kw):
            return orig_baddbmm(bias, bf16(a), bf16(b), **kw)

        def bmm(a, b):
            return orig_bmm(bf16(a), bf16(b))

        hooks = []
        if self.ff_pre:  # FeedForward.net[0].proj: the input of GELU / GEGLU / ApproximateGELU
            for name, m in self.model.named_modules():
                if isinstance(m, torch.nn.Linear) and name.endswith("net.0.proj"):
                    hooks.append(m.register_forward_hook(lambda mod, inp, out: bf16(out)))
        norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, blocks.AdaLayerNorm, blocks.AdaLayerNormZero,
                      blocks.AdaGroupNorm)
        for m in self.model.modules():
            if self.all_out or (self.norm_out and isinstance(m, norm_types)):
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out: tuple(bf16(o) for o in out) if isinstance(out, tuple) else bf16(out)))
        torch.nn.Linear.forward = linear
        torch.baddbmm, torch.bmm = baddbmm, bmm
        try:
            yield
        finally:
            torch.nn.Linear.forward = orig_linear
            torch.baddbmm, torch.bmm = orig_baddbmm, orig_bmm
            for h in hooks:
                h.remove()


def forward(model, cls, inputs, dtype):
    names = blocks.INPUT_NAMES[cls]
    args = {k: (v.to(dtype) if k in blocks.FLOAT_INPUTS else v) for k, v in inputs.items() if k in names}
    with torch.no_grad():
        if cls == "AdaLayerNorm":
            out = model(args["hidden_states"], args["timestep"])
        elif cls == "AdaGroupNorm":
            out = model(args["x"], args["emb"])
        elif cls != "BasicTransformerBlock":
            out = model(args["hidden_states"])
        else:
            out = model(**args)
    return out.to(torch.float64)


def rel(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


def budget(d):
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    cls = config["_class_name"]
    weights, _ = st.load(os.path.join(d, "diffusion_pytorch_model.safetensors"))
    inputs, _ = st.load(os.path.join(d, "inputs.safetensors"))
    model = blocks.build_model(config, weights).double()
    ref = forward(model, cls, inputs, torch.float64)
    row = {}
    for name, kw in [("products", {}), ("products, cond", {"keep_cond": True}),
                     ("narrow acts", {"ff_pre": True}), ("+ norm out", {"norm_out": True}),
                     ("+ activations", {"all_out": True})]:
        with Rounding(model, **kw).active():
            row[name] = rel(forward(model, cls, inputs, torch.float64), ref)
    del model  # .to() converts in place: each of the last two gets a fresh copy
    row["torch bf16"] = rel(forward(blocks.build_model(config, weights).to(torch.bfloat16), cls, inputs,
                                    torch.bfloat16), ref)
    row["fp32"] = rel(forward(blocks.build_model(config, weights), cls, inputs, torch.float32), ref)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(HERE, "..", "build"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = os.path.join(os.path.abspath(args.build), "bench-models")
    cols = ["products", "products, cond", "narrow acts", "+ norm out", "+ activations", "torch bf16",
            "fp32"]
    print(f"{'workload':<18} " + " ".join(f"{c:>15}" for c in cols))
    for name in [w for w in args.workloads.split(",") if w]:
        d = os.path.join(models, name)
        if not os.path.exists(os.path.join(d, "inputs.safetensors")):
            subprocess.run([os.path.join(args.build, "blockserve"), "example", name, "--out", d], check=True,
                           capture_output=True)
        row = budget(d)
        print(f"{name:<18} " + " ".join(f"{row[c]:15.2e}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
