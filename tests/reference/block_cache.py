"""Step-level block caching (FORA, arXiv 2407.01425) on top of blocks.py.

The rule, written from the paper and blockserve's contract (engine/model.h,
"Step-level block caching"), not from the engine's code:

  Within one denoising sequence, a "refresh" call runs the model exactly, and
  each BasicTransformerBlock records what its attn1, attn2 and ff modules
  return: their outputs after the output projections (Attention.to_out,
  FeedForward.net.2), before AdaLayerNormZero's gate_msa / gate_mlp and
  before the residual adds. A "reuse" call does not run those three modules
  and takes the recorded outputs instead; everything else (norm1/2/3, the
  modulation from this call's timestep and class labels, the gates, the
  residual adds) is computed from this call's inputs. "off" is the exact
  model with nothing recorded. Every block of a stack has its own records.

Here the three modules of each block are wrapped (CachedModule), so the
blocks' own forward code, unchanged, applies the gates and residual adds to
whatever the wrappers return. Use:

    model = blocks.build_model(cfg, weights).double()
    cached = CachedModel(model)
    with torch.no_grad():
        y0 = cached.run("refresh", hidden_states=x0, timestep=t0, ...)
        y1 = cached.run("reuse", hidden_states=x1, timestep=t1, ...)

Computes in float64 when the model and its float inputs are float64 (the
softmax and the timestep sinusoid stay float32, as everywhere in blocks.py).
"""

import torch
from torch import nn

import blocks

MODES = ("off", "refresh", "reuse")

# The modules of a BasicTransformerBlock whose outputs are recorded.
CACHED_MODULES = ("attn1", "attn2", "ff")


class CachedModule(nn.Module):
    """A module whose output is recorded on refresh and replayed on reuse."""

    def __init__(self, inner, name):
        super().__init__()
        self.inner = inner
        self.name = name
        self.mode = "off"
        self.record = None

    def forward(self, hidden_states, *args, **kwargs):
        if self.mode == "reuse":
            if self.record is None:
                raise RuntimeError(f"{self.name}: reuse before any refresh")
            # The output has the block's width and the query's shape; a
            # request of another shape cannot reuse this record.
            want = hidden_states.shape[:-1]
            if self.record.shape[:-1] != want:
                raise ValueError(f"{self.name}: recorded {tuple(self.record.shape)}, "
                                 f"called with {tuple(hidden_states.shape)}")
            return self.record
        out = self.inner(hidden_states, *args, **kwargs)
        if self.mode == "refresh":
            self.record = out.detach().clone()
        return out


class CachedModel:
    """A BasicTransformerBlock or BlockStack whose blocks cache their attn1,
    attn2 and ff outputs across calls (one cache: this object's state).

    The model is modified in place (its three modules per block wrapped);
    build it, load its weights and convert its dtype before wrapping.
    """

    def __init__(self, model):
        if isinstance(model, blocks.BlockStack):
            self.blocks = list(model.blocks)
        elif isinstance(model, blocks.BasicTransformerBlock):
            self.blocks = [model]
        else:
            raise TypeError(f"block caching needs BasicTransformerBlocks, not {type(model).__name__}")
        self.model = model
        self.wrappers = []
        for i, block in enumerate(self.blocks):
            for name in CACHED_MODULES:
                inner = getattr(block, name)
                if inner is None:  # no attn2 without cross_attention_dim
                    continue
                wrapper = CachedModule(inner, f"block {i} {name}")
                setattr(block, name, wrapper)
                self.wrappers.append(wrapper)

    def set_mode(self, mode):
        if mode not in MODES:
            raise ValueError(f"unknown cache mode {mode!r}")
        for w in self.wrappers:
            w.mode = mode

    def records(self):
        """Block index -> {module name: recorded output} (None before a refresh)."""
        out = {}
        for i, block in enumerate(self.blocks):
            out[i] = {n: getattr(block, n).record for n in CACHED_MODULES if getattr(block, n) is not None}
        return out

    def run(self, mode, **inputs):
        """One call of the sequence: the model's forward on inputs in this mode."""
        self.set_mode(mode)
        try:
            return self.model(**inputs)
        finally:
            self.set_mode("off")


def interval_modes(n_calls, interval):
    """FORA's schedule: refresh every `interval` calls, starting with the first."""
    if interval < 1:
        raise ValueError("interval must be at least 1")
    return ["refresh" if k % interval == 0 else "reuse" for k in range(n_calls)]
