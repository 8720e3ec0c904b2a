#!/usr/bin/python3
"""Generate the golden test cases for blockserve from the PyTorch reference.

    /usr/bin/python3 tests/reference/gen_golden.py [--out tests/golden]

Writes one directory per case:
    config.json                         diffusers-style config ("_class_name" +
                                        constructor args; stacks and prefixed
                                        loads add a "blockserve" object)
    diffusion_pytorch_model.safetensors weights (F32 unless the case says otherwise)
    inputs.safetensors                  forward inputs, named like the forward args
    expected.safetensors                one F32 tensor named "output"
and a README.md listing the cases.

Deterministic: every case draws from its own torch.Generator seeded from the
case name, with one CPU thread. Weights are random (not PyTorch's init) so
every parameter matters. The expected output is computed by reading the
files just written back and running blocks.build_model / blocks.run_model
on them, which is exactly what check_golden.py repeats.
"""

import argparse
import json
import os
import shutil
import sys
import zlib

import torch
from torch import nn

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blocks  # noqa: E402
import st  # noqa: E402

CASE_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "inputs.safetensors", "expected.safetensors")
METADATA = {"format": "pt"}

# --------------------------------------------------------------------------
# Random initialisation
# --------------------------------------------------------------------------


def init_weights(module, g):
    """Randomise every parameter: linears N(0, 1/fan_in), biases and norm
    betas 0.1*N(0,1), norm gammas 1 + 0.1*N(0,1), embedding tables N(0,1)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))


def random_weights(config, g, file_prefix=None, file_blocks=None):
    """Randomly initialised weights for a config, by (prefixed) diffusers name.

    file_prefix/file_blocks override the blocks stored in the file (e.g. a
    file with 3 blocks of which the config selects one).
    """
    cls = blocks.CLASSES[config["_class_name"]]
    kwargs = blocks.constructor_args(config)
    if file_prefix is None:
        prefixes = blocks.block_prefixes(config)
    else:
        prefixes = [file_prefix.replace("{i}", str(i)) for i in range(file_blocks)]
    weights = {}
    for prefix in prefixes:
        module = cls(**kwargs)
        init_weights(module, g)
        for k, v in module.state_dict().items():
            weights[prefix + k] = v.clone()
    return weights


def unrelated_weights(g, dim):
    """Keys of a surrounding model (DiT-like Transformer2DModel) that a block
    loader must ignore; the first part goes before the blocks, the second after."""
    before = {
        "pos_embed.proj.weight": torch.randn(dim, 4, 2, 2, generator=g),
        "pos_embed.proj.bias": torch.randn(dim, generator=g),
        "pos_embed.pos_embed": torch.randn(1, 16, dim, generator=g),
    }
    after = {
        "norm_out.linear_1.weight": torch.randn(2 * dim, dim, generator=g),
        "norm_out.linear_1.bias": torch.randn(2 * dim, generator=g),
        "proj_out.weight": torch.randn(16, dim, generator=g),
        "proj_out.bias": torch.randn(16, generator=g),
    }
    return before, after


# --------------------------------------------------------------------------
# Case definitions
# --------------------------------------------------------------------------

CASES = []  # (name, description, function(g) -> dict)


def case(name, description):
    def register(fn):
        CASES.append((name, description, fn))
        return fn

    return register


def randn(g, *shape):
    return torch.randn(*shape, generator=g)


def btb_config(**overrides):
    """A BasicTransformerBlock config with every constructor arg (the base case's values)."""
    cfg = {
        "_class_name": "BasicTransformerBlock",
        "dim": 32,
        "num_attention_heads": 4,
        "attention_head_dim": 8,
        "dropout": 0.0,
        "cross_attention_dim": 24,
        "activation_fn": "geglu",
        "num_embeds_ada_norm": None,
        "attention_bias": False,
        "only_cross_attention": False,
        "upcast_attention": False,
        "norm_elementwise_affine": True,
        "norm_type": "layer_norm",
        "final_dropout": False,
    }
    for k in overrides:
        assert k in cfg or k == "blockserve", k
    cfg.update(overrides)
    return cfg


def btb_inputs(g, cfg, batch=2, seq=20, enc_seq=7, encoder=True):
    """hidden_states [B, L, dim] and (with cross attention) encoder_hidden_states [B, Lk, cross_dim]."""
    inputs = {"hidden_states": randn(g, batch, seq, cfg["dim"])}
    if encoder and cfg["cross_attention_dim"] is not None:
        inputs["encoder_hidden_states"] = randn(g, batch, enc_seq, cfg["cross_attention_dim"])
    return inputs


def masked_bias(g, shape, frac=0.3, noise=0.0):
    """Additive float mask: -10000 at about frac of the entries (never a whole
    row: the last key of each row stays open), elsewhere noise*N(0,1)."""
    bias = noise * randn(g, *shape)
    drop = torch.rand(shape, generator=g) < frac
    drop[..., -1] = False
    return bias.masked_fill(drop, blocks.MASK_FALSE_VALUE)


def keep_mask(g, shape, frac=0.3):
    """BOOL keep-mask (True = attend), the first key of each row always kept."""
    keep = torch.rand(shape, generator=g) >= frac
    keep[..., 0] = True
    return keep


def simple(cfg, inputs, **opts):
    return dict(config=cfg, inputs=inputs, **opts)


# --- BasicTransformerBlock: the base case and each option -----------------


@case("btb_geglu_cross", "layer_norm, geglu, cross-attention (dim 32, 4x8 heads, cross dim 24, B=2, L=20, Lk=7)")
def _(g):
    cfg = btb_config()
    return simple(cfg, btb_inputs(g, cfg))


for _act in ("gelu", "gelu-approximate", "geglu-approximate"):

    @case(f"btb_{_act.replace('-', '_')}_cross", f"as btb_geglu_cross with activation_fn {_act}")
    def _(g, act=_act):
        cfg = btb_config(activation_fn=act)
        return simple(cfg, btb_inputs(g, cfg))


@case("btb_self_only", "no cross attention (cross_attention_dim null: no attn2, no norm2)")
def _(g):
    cfg = btb_config(cross_attention_dim=None)
    return simple(cfg, btb_inputs(g, cfg))


@case("btb_only_cross_attention", "only_cross_attention: attn1 also attends to encoder_hidden_states")
def _(g):
    cfg = btb_config(only_cross_attention=True)
    return simple(cfg, btb_inputs(g, cfg))


@case("btb_only_cross_attention_masks",
      "only_cross_attention with attention_mask [B,1,Lk] (attn1 is cross) and encoder_attention_mask [B,1,Lk]")
def _(g):
    cfg = btb_config(only_cross_attention=True)
    inputs = btb_inputs(g, cfg)
    inputs["attention_mask"] = masked_bias(g, (2, 1, 7), noise=0.5)
    inputs["encoder_attention_mask"] = masked_bias(g, (2, 1, 7))
    return simple(cfg, inputs)


@case("btb_attn2_self_fallback",
      "cross_attention_dim == dim (32) and no encoder_hidden_states: attn2 self-attends; "
      "encoder_attention_mask [B,1,L] applies to it")
def _(g):
    cfg = btb_config(cross_attention_dim=32)
    inputs = btb_inputs(g, cfg, encoder=False)
    inputs["encoder_attention_mask"] = masked_bias(g, (2, 1, 20))
    return simple(cfg, inputs)


@case("btb_attention_bias", "attention_bias: to_q/to_k/to_v have biases (attn1 and attn2)")
def _(g):
    cfg = btb_config(attention_bias=True)
    return simple(cfg, btb_inputs(g, cfg))


@case("btb_no_affine", "norm_elementwise_affine false: norm1/2/3 have no weights")
def _(g):
    cfg = btb_config(norm_elementwise_affine=False)
    return simple(cfg, btb_inputs(g, cfg))


@case("btb_upcast_attention", "upcast_attention true (a no-op in float32)")
def _(g):
    cfg = btb_config(upcast_attention=True)
    return simple(cfg, btb_inputs(g, cfg))


@case("btb_dropout_final", "dropout 0.1 and final_dropout (identity in eval mode)")
def _(g):
    cfg = btb_config(dropout=0.1, final_dropout=True)
    return simple(cfg, btb_inputs(g, cfg))


@case("btb_head_dim_24", "attention head dim != dim/heads: dim 32, 2 heads x 24 (inner dim 48)")
def _(g):
    cfg = btb_config(num_attention_heads=2, attention_head_dim=24)
    return simple(cfg, btb_inputs(g, cfg))


@case("btb_long_seq", "long sequences: B=1, L=150, Lk=77, 2 heads x 16, cross dim 48, with encoder_attention_mask")
def _(g):
    cfg = btb_config(num_attention_heads=2, attention_head_dim=16, cross_attention_dim=48)
    inputs = btb_inputs(g, cfg, batch=1, seq=150, enc_seq=77)
    inputs["encoder_attention_mask"] = masked_bias(g, (1, 1, 77))
    return simple(cfg, inputs)


# --- ada_norm ---------------------------------------------------------------


def ada_cfg(**overrides):
    return btb_config(norm_type="ada_norm", num_embeds_ada_norm=20, **overrides)


@case("btb_ada_norm_scalar_t", "ada_norm (norm1 and norm2 AdaLayerNorm), 0-d int64 timestep 7")
def _(g):
    cfg = ada_cfg()
    inputs = btb_inputs(g, cfg)
    inputs["timestep"] = torch.tensor(7, dtype=torch.int64)
    return simple(cfg, inputs)


@case("btb_ada_norm_per_sample_t", "ada_norm with per-sample int64 timesteps [0, 12, 19], B=3")
def _(g):
    cfg = ada_cfg()
    inputs = btb_inputs(g, cfg, batch=3)
    inputs["timestep"] = torch.tensor([0, 12, 19], dtype=torch.int64)
    return simple(cfg, inputs)


@case("btb_ada_norm_float_t", "ada_norm with a 0-d F32 timestep of integral value 3.0")
def _(g):
    cfg = ada_cfg()
    inputs = btb_inputs(g, cfg)
    inputs["timestep"] = torch.tensor(3.0, dtype=torch.float32)
    return simple(cfg, inputs)


# --- ada_norm_zero ------------------------------------------------------------


def dit_cfg(**overrides):
    base = dict(norm_type="ada_norm_zero", num_embeds_ada_norm=10, activation_fn="gelu-approximate",
                attention_bias=True, cross_attention_dim=None, norm_elementwise_affine=False)
    base.update(overrides)
    return btb_config(**base)


@case("btb_ada_norm_zero_dit",
      "DiT-like ada_norm_zero (10 classes, gelu-approximate, attention_bias, no cross, no affine), "
      "B=3, F32 timesteps [3, 500.5, 999], labels [1, 7, 10] (10 = null class)")
def _(g):
    cfg = dit_cfg()
    inputs = btb_inputs(g, cfg, batch=3)
    inputs["timestep"] = torch.tensor([3.0, 500.5, 999.0], dtype=torch.float32)
    inputs["class_labels"] = torch.tensor([1, 7, 10], dtype=torch.int64)
    return simple(cfg, inputs)


@case("btb_ada_norm_zero_scalar", "DiT-like ada_norm_zero with 0-d int64 timestep 250 and 0-d label 4, B=2")
def _(g):
    cfg = dit_cfg()
    inputs = btb_inputs(g, cfg)
    inputs["timestep"] = torch.tensor(250, dtype=torch.int64)
    inputs["class_labels"] = torch.tensor(4, dtype=torch.int64)
    return simple(cfg, inputs)


@case("btb_ada_norm_zero_cross",
      "ada_norm_zero with cross attention (norm2 a LayerNorm with affine), geglu, I64 timesteps [10, 900], labels [0, 9]")
def _(g):
    cfg = dit_cfg(cross_attention_dim=24, activation_fn="geglu", attention_bias=False, norm_elementwise_affine=True)
    inputs = btb_inputs(g, cfg)
    inputs["timestep"] = torch.tensor([10, 900], dtype=torch.int64)
    inputs["class_labels"] = torch.tensor([0, 9], dtype=torch.int64)
    return simple(cfg, inputs)


# --- masks ---------------------------------------------------------------------


@case("btb_mask_additive",
      "attention_mask [B,1,L] additive (noise + some -10000), encoder_attention_mask [B,1,Lk] (0 / -10000)")
def _(g):
    cfg = btb_config()
    inputs = btb_inputs(g, cfg)
    inputs["attention_mask"] = masked_bias(g, (2, 1, 20), noise=0.5)
    inputs["encoder_attention_mask"] = masked_bias(g, (2, 1, 7))
    return simple(cfg, inputs)


@case("btb_mask_2d", "masks in the [B,Lk] form: attention_mask [B,L], encoder_attention_mask [B,Lk]")
def _(g):
    cfg = btb_config()
    inputs = btb_inputs(g, cfg)
    inputs["attention_mask"] = masked_bias(g, (2, 20), noise=0.5)
    inputs["encoder_attention_mask"] = masked_bias(g, (2, 7), noise=0.5)
    return simple(cfg, inputs)


@case("btb_mask_3d", "per-query masks: attention_mask [B,L,L], encoder_attention_mask [B,L,Lk]")
def _(g):
    cfg = btb_config()
    inputs = btb_inputs(g, cfg)
    inputs["attention_mask"] = masked_bias(g, (2, 20, 20), noise=0.5)
    inputs["encoder_attention_mask"] = masked_bias(g, (2, 20, 7), noise=0.5)
    return simple(cfg, inputs)


@case("btb_mask_bool",
      "BOOL keep-masks (False -> -10000): attention_mask [B,1,L], encoder_attention_mask [B,Lk]")
def _(g):
    cfg = btb_config()
    inputs = btb_inputs(g, cfg)
    inputs["attention_mask"] = keep_mask(g, (2, 1, 20))
    inputs["encoder_attention_mask"] = keep_mask(g, (2, 7))
    return simple(cfg, inputs)


@case("btb_mask_bool_3d", "BOOL keep-masks per query: attention_mask [B,L,L], encoder_attention_mask [B,L,Lk]")
def _(g):
    cfg = btb_config()
    inputs = btb_inputs(g, cfg)
    inputs["attention_mask"] = keep_mask(g, (2, 20, 20))
    inputs["encoder_attention_mask"] = keep_mask(g, (2, 20, 7))
    return simple(cfg, inputs)


@case("btb_mask_f16", "F16 masks: attention_mask [B,1,L], encoder_attention_mask [B,1,Lk] (noise + -10000)")
def _(g):
    cfg = btb_config()
    inputs = btb_inputs(g, cfg)
    inputs["attention_mask"] = masked_bias(g, (2, 1, 20), noise=0.5).half()
    inputs["encoder_attention_mask"] = masked_bias(g, (2, 1, 7), noise=0.5).half()
    return simple(cfg, inputs)


# --- dtypes ----------------------------------------------------------------------


@case("btb_weights_f16", "all weights stored F16 (expected computed with the rounded weights)")
def _(g):
    cfg = btb_config()
    return simple(cfg, btb_inputs(g, cfg), weights_dtype=torch.float16)


@case("btb_weights_bf16", "all weights stored BF16 (expected computed with the rounded weights)")
def _(g):
    cfg = btb_config()
    return simple(cfg, btb_inputs(g, cfg), weights_dtype=torch.bfloat16)


@case("btb_input_f16", "hidden_states given as F16 (encoder_hidden_states F32); the reference uses the rounded input")
def _(g):
    cfg = btb_config()
    inputs = btb_inputs(g, cfg)
    inputs["hidden_states"] = inputs["hidden_states"].half()
    return simple(cfg, inputs)


# --- stacks and prefixed loads ---------------------------------------------------


@case("btb_stack3",
      "3 blocks (weights_prefix transformer_blocks.{i}.) in a file with unrelated keys, "
      "shared encoder_hidden_states and encoder_attention_mask")
def _(g):
    cfg = btb_config(blockserve={"num_blocks": 3, "weights_prefix": "transformer_blocks.{i}."})
    inputs = btb_inputs(g, cfg)
    inputs["encoder_attention_mask"] = masked_bias(g, (2, 1, 7))
    return simple(cfg, inputs, unrelated=True)


@case("btb_stack3_dit", "3 DiT-like ada_norm_zero blocks sharing per-sample timesteps and labels, unrelated keys")
def _(g):
    cfg = dit_cfg(blockserve={"num_blocks": 3, "weights_prefix": "transformer_blocks.{i}."})
    inputs = btb_inputs(g, cfg, batch=2, seq=16)
    inputs["timestep"] = torch.tensor([17.0, 640.0], dtype=torch.float32)
    inputs["class_labels"] = torch.tensor([3, 10], dtype=torch.int64)
    return simple(cfg, inputs, unrelated=True)


@case("btb_prefix_block1", "one block selected by weights_prefix transformer_blocks.1. from a file holding 3 blocks")
def _(g):
    cfg = btb_config(blockserve={"num_blocks": 1, "weights_prefix": "transformer_blocks.1."})
    return simple(cfg, btb_inputs(g, cfg), unrelated=True, file_prefix="transformer_blocks.{i}.", file_blocks=3)


# --- AttentionBlock ----------------------------------------------------------------


@case("attnblock_4heads", "AttentionBlock channels 32, num_head_channels 8 (4 heads), 8 groups, B=2, 5x5")
def _(g):
    cfg = {"_class_name": "AttentionBlock", "channels": 32, "num_head_channels": 8, "norm_num_groups": 8,
           "rescale_output_factor": 1.0, "eps": 1e-5}
    return simple(cfg, {"hidden_states": randn(g, 2, 32, 5, 5)})


@case("attnblock_1head_rescale",
      "AttentionBlock num_head_channels null (1 head), rescale_output_factor 2.0, eps 1e-6, B=2, 4x6")
def _(g):
    cfg = {"_class_name": "AttentionBlock", "channels": 32, "num_head_channels": None, "norm_num_groups": 8,
           "rescale_output_factor": 2.0, "eps": 1e-6}
    return simple(cfg, {"hidden_states": randn(g, 2, 32, 4, 6)})


# --- FeedForward and activations ------------------------------------------------------


@case("ff_geglu", "FeedForward dim 24, mult 2, dim_out 16, geglu; hidden_states [2, 9, 24]")
def _(g):
    cfg = {"_class_name": "FeedForward", "dim": 24, "dim_out": 16, "mult": 2, "dropout": 0.0,
           "activation_fn": "geglu", "final_dropout": False}
    return simple(cfg, {"hidden_states": randn(g, 2, 9, 24)})


@case("ff_gelu_approximate", "FeedForward dim 24, mult 4, dim_out null, gelu-approximate; hidden_states [2, 9, 24]")
def _(g):
    cfg = {"_class_name": "FeedForward", "dim": 24, "dim_out": None, "mult": 4, "dropout": 0.0,
           "activation_fn": "gelu-approximate", "final_dropout": False}
    return simple(cfg, {"hidden_states": randn(g, 2, 9, 24)})


@case("gelu_none", "GELU dim_in 16, dim_out 24, approximate none; hidden_states [2, 7, 16]")
def _(g):
    cfg = {"_class_name": "GELU", "dim_in": 16, "dim_out": 24, "approximate": "none"}
    return simple(cfg, {"hidden_states": randn(g, 2, 7, 16)})


@case("gelu_tanh", "GELU dim_in 16, dim_out 24, approximate tanh; hidden_states [2, 7, 16]")
def _(g):
    cfg = {"_class_name": "GELU", "dim_in": 16, "dim_out": 24, "approximate": "tanh"}
    return simple(cfg, {"hidden_states": randn(g, 2, 7, 16)})


@case("geglu", "GEGLU dim_in 16, dim_out 24 (proj 16 -> 48); hidden_states [2, 7, 16]")
def _(g):
    cfg = {"_class_name": "GEGLU", "dim_in": 16, "dim_out": 24}
    return simple(cfg, {"hidden_states": randn(g, 2, 7, 16)})


@case("approximate_gelu", "ApproximateGELU dim_in 16, dim_out 24; hidden_states [2, 7, 16]")
def _(g):
    cfg = {"_class_name": "ApproximateGELU", "dim_in": 16, "dim_out": 24}
    return simple(cfg, {"hidden_states": randn(g, 2, 7, 16)})


# --- norms ------------------------------------------------------------------------------


@case("ada_layer_norm_scalar_t", "AdaLayerNorm embedding_dim 16, num_embeddings 10; [2, 6, 16], 0-d I64 timestep 4")
def _(g):
    cfg = {"_class_name": "AdaLayerNorm", "embedding_dim": 16, "num_embeddings": 10}
    return simple(cfg, {"hidden_states": randn(g, 2, 6, 16), "timestep": torch.tensor(4, dtype=torch.int64)})


@case("ada_layer_norm_per_sample_t", "AdaLayerNorm embedding_dim 16, num_embeddings 10; [2, 6, 16], I64 timesteps [2, 9]")
def _(g):
    cfg = {"_class_name": "AdaLayerNorm", "embedding_dim": 16, "num_embeddings": 10}
    return simple(cfg, {"hidden_states": randn(g, 2, 6, 16), "timestep": torch.tensor([2, 9], dtype=torch.int64)})


for _act in ("swish", "mish", "gelu", "silu", None):

    @case(f"ada_group_norm_{_act or 'none'}",
          f"AdaGroupNorm embedding_dim 12, out_dim 16, 4 groups, act_fn {_act or 'null'}; x [2,16,3,5], emb [2,12]")
    def _(g, act=_act):
        cfg = {"_class_name": "AdaGroupNorm", "embedding_dim": 12, "out_dim": 16, "num_groups": 4, "act_fn": act,
               "eps": 1e-5}
        return simple(cfg, {"x": randn(g, 2, 16, 3, 5), "emb": randn(g, 2, 12)})


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def case_seed(name):
    """A stable per-case seed, so adding a case changes no other case."""
    return zlib.crc32(name.encode("utf-8"))


def make_case(name, fn):
    """Build one case: (config, weights dict, inputs dict), all as stored."""
    g = torch.Generator().manual_seed(case_seed(name))
    spec = fn(g)
    cfg = spec["config"]
    weights = random_weights(cfg, g, spec.get("file_prefix"), spec.get("file_blocks"))
    if spec.get("unrelated"):
        before, after = unrelated_weights(g, cfg["dim"])
        weights = {**before, **weights, **after}
    dtype = spec.get("weights_dtype", torch.float32)
    weights = {k: v.to(dtype) for k, v in weights.items()}
    return cfg, weights, spec["inputs"]


def evaluate_case_dir(path):
    """Read a case directory back and run the reference on it: the output tensor."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    weights, _ = st.load(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    inputs, _ = st.load(os.path.join(path, "inputs.safetensors"))
    model = blocks.build_model(cfg, weights)
    return blocks.run_model(model, cfg["_class_name"], inputs)


def write_case(out_dir, name, fn):
    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    cfg, weights, inputs = make_case(name, fn)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    st.save(os.path.join(path, "diffusion_pytorch_model.safetensors"), weights, METADATA)
    st.save(os.path.join(path, "inputs.safetensors"), inputs, METADATA)
    output = evaluate_case_dir(path)
    if not torch.isfinite(output).all():
        raise RuntimeError(f"{name}: non-finite output")
    st.save(os.path.join(path, "expected.safetensors"), {"output": output}, METADATA)
    return output


def describe_tensor(t):
    dtype = st._NAME_OF[t.dtype]
    return f"{dtype}{list(t.shape)}"


def write_readme(out_dir, summaries):
    lines = [
        "# Golden cases",
        "",
        "Generated by the PyTorch reference (tests/reference/blocks.py); do not edit by hand.",
        "Regenerate from the repository root with",
        "",
        "    /usr/bin/python3 tests/reference/gen_golden.py   # [--out DIR], default tests/golden",
        "",
        "and verify with `/usr/bin/python3 tests/reference/check_golden.py --rtol 4e-6` (bit for bit without --rtol on the machine that generated them).",
        "",
        "Each directory holds config.json (diffusers-style; stacks and prefixed loads add a",
        '"blockserve" object with num_blocks and weights_prefix, where "{i}" is the block index),',
        "diffusion_pytorch_model.safetensors, inputs.safetensors (named like the forward",
        "arguments) and expected.safetensors (one F32 tensor `output`). The engine must match",
        "`output` within a max abs error of 1e-4.",
        "",
        "| case | what it covers | inputs | output |",
        "|---|---|---|---|",
    ]
    for name, description, inputs, output in summaries:
        ins = ", ".join(f"{k} {describe_tensor(v)}" for k, v in inputs.items())
        lines.append(f"| {name} | {description} | {ins} | {describe_tensor(output)} |")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def remove_stale_cases(out_dir, names):
    """Delete case directories (holding exactly our files) that no longer exist in CASES."""
    for entry in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, entry)
        if entry in names or not os.path.isdir(path):
            continue
        if set(os.listdir(path)) <= set(CASE_FILES) and "config.json" in os.listdir(path):
            print(f"removing stale case {entry}")
            shutil.rmtree(path)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.normpath(os.path.join(here, "..", "golden"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=default_out, help="output directory (default tests/golden)")
    parser.add_argument("--only", nargs="*", help="generate only these cases (no README, no cleanup)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    names = [name for name, _, _ in CASES]
    assert len(set(names)) == len(names), "duplicate case names"

    summaries = []
    for name, description, fn in CASES:
        if args.only and name not in args.only:
            continue
        output = write_case(args.out, name, fn)
        inputs, _ = st.load(os.path.join(args.out, name, "inputs.safetensors"))
        summaries.append((name, description, inputs, output))
        print(f"{name:34s} output {describe_tensor(output):18s} max|y| {output.abs().max().item():.3f}")
    if not args.only:
        remove_stale_cases(args.out, set(names))
        write_readme(args.out, summaries)


if __name__ == "__main__":
    main()
