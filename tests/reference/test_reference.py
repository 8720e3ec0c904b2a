#!/usr/bin/python3
"""Self-tests of the reference semantics (independent re-derivations, float64).

    /usr/bin/python3 tests/reference/test_reference.py

These pin down what blocks.py means before the golden files are trusted:
attention against a naive per-head loop, the mask forms against each other,
per-sample vs shared conditioning, stacks and prefixed loads, the sinusoid
the safetensors round trip, and the block caching rule of block_cache.py
against the blocks' formulas written out by hand.
"""

import copy
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import block_cache  # noqa: E402
import blocks  # noqa: E402
import gen_golden  # noqa: E402
import st  # noqa: E402

torch.set_num_threads(1)
G = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def close(a, b, tol=1e-6):
    """Default tolerance 1e-6: the softmax runs in float32 even for float64 modules."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item()
    assert diff <= tol, diff


def naive_attention(attn, x, ctx, mask):
    """Per batch, per head, per query: softmax(q.k * scale + mask) @ v, then to_out."""
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    b, lq, _ = q.shape
    h = attn.heads
    d = q.shape[-1] // h
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            sl = slice(hi * d, (hi + 1) * d)
            s = q[bi, :, sl] @ k[bi, :, sl].T * d**-0.5
            if mask is not None:
                s = s + mask[bi]  # [Mq, Lk] broadcasts over queries
            out[bi, :, sl] = torch.softmax(s, -1) @ v[bi, :, sl]
    return attn.to_out[0](out)


def test_attention_and_masks():
    attn = blocks.Attention(query_dim=12, cross_attention_dim=10, heads=3, dim_head=5, bias=True).double().eval()
    gen_golden.init_weights(attn, G)
    x, ctx = randn(2, 6, 12), randn(2, 4, 10)
    close(attn(x, ctx), naive_attention(attn, x, ctx, None))
    add = randn(2, 1, 4)
    close(attn(x, ctx, add), naive_attention(attn, x, ctx, add))
    close(attn(x, ctx, add[:, 0]), attn(x, ctx, add))  # [B, Lk] == [B, 1, Lk]
    per_q = randn(2, 6, 4)
    close(attn(x, ctx, per_q), naive_attention(attn, x, ctx, per_q))
    keep = torch.rand(2, 6, 4, generator=G) > 0.4
    keep[..., 0] = True
    as_bias = torch.where(keep, torch.tensor(0.0, dtype=torch.float64), torch.tensor(-10000.0, dtype=torch.float64))
    close(attn(x, ctx, keep), attn(x, ctx, as_bias), tol=1e-6)  # bool becomes a float32 bias
    # A -10000 entry effectively removes that key.
    drop = torch.zeros(2, 1, 4, dtype=torch.float64)
    drop[:, :, 1] = -10000.0
    keep_idx = [0, 2, 3]
    sub = blocks.Attention(query_dim=12, cross_attention_dim=10, heads=3, dim_head=5, bias=True).double()
    sub.load_state_dict(attn.state_dict())
    close(attn(x, ctx, drop), sub(x, ctx[:, keep_idx]))


def test_activations():
    x = randn(3, 8)
    geglu = blocks.GEGLU(8, 5).double()
    h = geglu.proj(x)
    close(geglu(x), h[:, :5] * 0.5 * h[:, 5:] * (1 + torch.erf(h[:, 5:] / math.sqrt(2))))
    tanh = blocks.GELU(8, 5, approximate="tanh").double()
    y = tanh.proj(x)
    close(tanh(x), 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3))))
    approx = blocks.ApproximateGELU(8, 5).double()
    y = approx.proj(x)
    close(approx(x), y / (1 + torch.exp(-1.702 * y)))


def test_ada_layer_norm():
    norm = blocks.AdaLayerNorm(6, 10).double()
    gen_golden.init_weights(norm, G)
    x = randn(3, 4, 6)
    t = torch.tensor([1, 7, 3])
    per_sample = norm(x, t)
    for i in range(3):
        close(per_sample[i:i + 1], norm(x[i:i + 1], t[i]))  # scalar path == diffusers
    close(norm(x, torch.tensor(7.0)), norm(x, torch.tensor(7)))
    try:
        norm(x, torch.tensor(2.5))
        raise AssertionError("non-integral timestep accepted")
    except ValueError:
        pass
    # Explicit formula for one sample.
    e = norm.linear(F.silu(norm.emb.weight[7]))
    ln = F.layer_norm(x[1], (6,), eps=1e-5)
    close(per_sample[1], ln * (1 + e[:6]) + e[6:])


def test_timestep_embedding():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = blocks.get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    freq = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 127)
    arg = t.double()[:, None] * freq
    close(emb.double(), torch.cat([torch.cos(arg), torch.sin(arg)], -1), tol=1e-4)
    assert emb[0, 0] == 1.0 and emb[0, 128] == 0.0  # cos first after the flip


def test_ada_layer_norm_zero_broadcast():
    norm = blocks.AdaLayerNormZero(8, 5).double()
    gen_golden.init_weights(norm, G)
    x = randn(2, 3, 8)
    a = norm(x, torch.tensor(42), torch.tensor(5), hidden_dtype=torch.float64)
    b = norm(x, torch.tensor([42.0, 42.0]), torch.tensor([5, 5]), hidden_dtype=torch.float64)
    for u, v in zip(a, b):
        close(u, v)
    assert norm.emb.class_embedder.embedding_table.num_embeddings == 6  # null class row


def test_block_options():
    kw = dict(dim=16, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16)
    base = blocks.BasicTransformerBlock(**kw).double().eval()
    drop = blocks.BasicTransformerBlock(**kw, dropout=0.3, final_dropout=True).double().eval()
    up = blocks.BasicTransformerBlock(**kw, upcast_attention=True).double().eval()
    gen_golden.init_weights(base, G)
    drop.load_state_dict(base.state_dict())
    up.load_state_dict(base.state_dict())
    x = randn(2, 5, 16)
    close(drop(x), base(x))
    close(up(x), base(x))
    # attn2 without encoder states self-attends: same as passing x's norm2 as context.
    n2 = base.norm2(x + base.attn1(base.norm1(x)))
    h = x + base.attn1(base.norm1(x))
    h = h + base.attn2(n2, encoder_hidden_states=n2)
    close(base(x), h + base.ff(base.norm3(h)))
    assert "norm2.weight" in base.state_dict()
    none = blocks.BasicTransformerBlock(dim=16, num_attention_heads=2, attention_head_dim=8)
    assert none.attn2 is None and none.norm2 is None
    # num_embeds_ada_norm with norm_type layer_norm is a plain LayerNorm.
    plain = blocks.BasicTransformerBlock(dim=16, num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=7)
    assert isinstance(plain.norm1, torch.nn.LayerNorm)


def test_stack_and_prefix():
    cfg = gen_golden.btb_config(blockserve={"num_blocks": 3, "weights_prefix": "transformer_blocks.{i}."})
    weights = gen_golden.random_weights(cfg, G)
    weights["proj_out.weight"] = randn(3, 3).float()
    stack = blocks.build_model(cfg, weights)
    one = dict(cfg, blockserve={"num_blocks": 1, "weights_prefix": "transformer_blocks.1."})
    b1 = blocks.build_model(one, weights)
    assert torch.equal(b1.attn1.to_q.weight, weights["transformer_blocks.1.attn1.to_q.weight"])
    x, enc = torch.randn(2, 4, 32, generator=G), torch.randn(2, 3, 24, generator=G)
    h = x
    for blk in stack.blocks:
        h = blk(h, encoder_hidden_states=enc)
    close(stack(x, encoder_hidden_states=enc), h, tol=0)


def _cache_pair(**kw):
    """A random float64 block and a cached copy of it (CachedModel wraps in place)."""
    block = blocks.BasicTransformerBlock(dim=16, num_attention_heads=2, attention_head_dim=8, **kw).double().eval()
    gen_golden.init_weights(block, G)
    return block, block_cache.CachedModel(copy.deepcopy(block))


def test_block_cache_rule():
    """Refresh and off are the exact forward; a reuse adds the refresh's attn1,
    attn2 and ff outputs to its own input, gated by its own modulation."""
    x, x2, enc = randn(2, 5, 16), randn(2, 5, 16), randn(2, 3, 12)
    with torch.no_grad():
        # LayerNorm and AdaLayerNorm blocks: no gates, so out' = x' + (out - x)
        # whatever the new timestep (the norms only feed the skipped modules).
        for kw, t, t2 in ((dict(cross_attention_dim=12), None, None),
                          (dict(cross_attention_dim=12, norm_type="ada_norm", num_embeds_ada_norm=9),
                           torch.tensor([1, 8]), torch.tensor([4, 0]))):
            block, cached = _cache_pair(**kw)
            cond = {} if t is None else {"timestep": t}
            cond2 = {} if t2 is None else {"timestep": t2}
            try:
                cached.run("reuse", hidden_states=x, encoder_hidden_states=enc, **cond)
                raise AssertionError("reuse before a refresh accepted")
            except RuntimeError:
                pass
            out = block(x, encoder_hidden_states=enc, **cond)
            close(cached.run("off", hidden_states=x, encoder_hidden_states=enc, **cond), out, tol=0)
            close(cached.run("refresh", hidden_states=x, encoder_hidden_states=enc, **cond), out, tol=0)
            reuse = cached.run("reuse", hidden_states=x2, encoder_hidden_states=enc, **cond2)
            close(reuse, x2 + (out - x), tol=1e-12)
            assert (reuse - block(x2, encoder_hidden_states=enc, **cond2)).abs().max() > 1e-2
        # AdaLayerNormZero: out' = x' + gate_msa' A + gate_mlp' F with A, F from the refresh.
        block, cached = _cache_pair(norm_type="ada_norm_zero", num_embeds_ada_norm=5, attention_bias=True)
        t, c, t2 = torch.tensor([3.0, 700.0]), torch.tensor([1, 5]), torch.tensor([2.0, 650.5])
        n1, g_msa, shift_mlp, scale_mlp, _ = block.norm1(x, t, c, hidden_dtype=torch.float64)
        a = block.attn1(n1)
        h = x + g_msa[:, None] * a
        f = block.ff(block.norm3(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
        _, g_msa2, _, _, g_mlp2 = block.norm1(x2, t2, c, hidden_dtype=torch.float64)
        cached.run("refresh", hidden_states=x, timestep=t, class_labels=c)
        reuse = cached.run("reuse", hidden_states=x2, timestep=t2, class_labels=c)
        close(reuse, x2 + g_msa2[:, None] * a + g_mlp2[:, None] * f, tol=1e-12)
    # A stack: each block its own records; for LayerNorm blocks the sum telescopes.
    cfg = gen_golden.btb_config(blockserve={"num_blocks": 3, "weights_prefix": "transformer_blocks.{i}."})
    stack = blocks.build_model(cfg, gen_golden.random_weights(cfg, G)).double()
    cached = block_cache.CachedModel(copy.deepcopy(stack))
    x, x2, enc = randn(2, 4, 32), randn(2, 4, 32), randn(2, 3, 24)
    with torch.no_grad():
        out = stack(x, encoder_hidden_states=enc)
        close(cached.run("refresh", hidden_states=x, encoder_hidden_states=enc), out, tol=0)
        records = cached.records()
        assert len(records) == 3 and all(set(r) == {"attn1", "attn2", "ff"} for r in records.values())
        assert not torch.equal(records[0]["ff"], records[1]["ff"])
        close(cached.run("reuse", hidden_states=x2, encoder_hidden_states=enc), x2 + (out - x), tol=1e-12)
    assert block_cache.interval_modes(5, 2) == ["refresh", "reuse", "refresh", "reuse", "refresh"]


def test_safetensors_roundtrip():
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(5).half(), "c": torch.randn(4).bfloat16(),
               "d": torch.tensor(7), "e": torch.tensor([True, False, True]), "f": torch.tensor(2.5)}
    raw = st.dumps(tensors, {"format": "pt"})
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    back, meta = st.loads(raw)
    assert meta == {"format": "pt"}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


def main():
    tests = [(k, v) for k, v in globals().items() if k.startswith("test_")]
    for name, fn in tests:
        fn()
        print(f"ok   {name}")
    print(f"all {len(tests)} reference self-tests ok")


if __name__ == "__main__":
    main()
