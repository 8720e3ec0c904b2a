"""PyTorch reference for the blocks blockserve serves.

Written from the walkthrough of diffusers' attention.py (plus the pieces it
imports: attention_processor.Attention and embeddings.CombinedTimestepLabelEmbeddings),
without importing diffusers. Parameter names match diffusers' state dicts
exactly, so a diffusers checkpoint loads here and vice versa.

Where blockserve deliberately differs from or extends diffusers at that
version, the code says so in a comment starting with "blockserve:".
Summary of those decisions:
  * Masks are additive float biases added to the scaled scores before the
    softmax, normalised to [B, Mq, Lk] (Mq == 1 broadcasts over queries; every
    mask is shared by all heads). Accepted shapes: [B, 1, Lk], [B, Lk]
    (read as [B, 1, Lk]) and [B, Lq, Lk]. BOOL masks are keep-masks:
    True -> 0.0, False -> -10000.0. Softmax runs in float32.
  * timestep / class_labels may be 0-d (shared by the batch) or [B], int64 or
    float. AdaLayerNorm: per-sample timesteps modulate each sample with its own
    scale/shift (diffusers' torch.chunk(emb, 2) splits the batch for B > 1).
    AdaLayerNormZero: 0-d values are broadcast to [B].
  * Dropout is the identity (everything runs in eval mode).
  * A stack is N BasicTransformerBlocks applied in sequence with the same
    conditioning inputs.
Everything computes in float32; inputs in F16/BF16 are converted first.

The bottom of the file holds the loader used by the golden generator and
checker: config.json -> module, weights (with an optional per-block prefix),
inputs -> output.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# Bias that a False entry of a BOOL keep-mask becomes.
MASK_FALSE_VALUE = -10000.0


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------


def normalize_mask(mask, batch, q_len, k_len):
    """blockserve: turn any accepted mask into an additive float32 [B, Mq, Lk] bias.

    Diffusers at this version repeats a mask over heads and relies on
    baddbmm broadcasting, which only works for [B, 1, Lk]; the [B, Lk] form
    and BOOL keep-masks are blockserve extensions.
    """
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32)
        mask = bias.masked_fill(~mask, MASK_FALSE_VALUE)
    elif mask.is_floating_point():
        mask = mask.to(torch.float32)
    else:
        raise TypeError(f"mask dtype {mask.dtype} is neither bool nor floating point")
    if mask.dim() == 2:
        mask = mask[:, None, :]
    if mask.dim() != 3 or mask.shape[0] != batch or mask.shape[1] not in (1, q_len) or mask.shape[2] != k_len:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit B={batch}, Lq={q_len}, Lk={k_len}")
    return mask


# --------------------------------------------------------------------------
# Attention (diffusers' attention_processor.Attention with the default processor)
# --------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head scaled dot-product attention.

    Self-attention on hidden_states, or cross-attention when
    encoder_hidden_states is given (keys/values come from it, of width
    cross_attention_dim, which defaults to query_dim).
    """

    def __init__(self, query_dim, cross_attention_dim=None, heads=8, dim_head=64, dropout=0.0, bias=False,
                 upcast_attention=False):
        super().__init__()
        inner_dim = dim_head * heads
        cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.scale = dim_head**-0.5
        self.upcast_attention = upcast_attention
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim, inner_dim, bias=bias)
        # The output projection always has a bias; index 1 is the dropout.
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=True), nn.Dropout(dropout)])

    def head_to_batch_dim(self, t):
        """[B, L, h*d] -> [B*h, L, d]."""
        b, n, dim = t.shape
        h = self.heads
        return t.reshape(b, n, h, dim // h).permute(0, 2, 1, 3).reshape(b * h, n, dim // h)

    def batch_to_head_dim(self, t):
        """[B*h, L, d] -> [B, L, h*d]."""
        bh, n, dim = t.shape
        h = self.heads
        return t.reshape(bh // h, h, n, dim).permute(0, 2, 1, 3).reshape(bh // h, n, dim * h)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None):
        batch, q_len, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k_len = context.shape[1]

        query = self.head_to_batch_dim(self.to_q(hidden_states))
        key = self.head_to_batch_dim(self.to_k(context))
        value = self.head_to_batch_dim(self.to_v(context))
        if self.upcast_attention:
            # Diffusers upcasts q and k for fp16 models; a no-op in float32.
            query, key = query.float(), key.float()

        # scores = scale * q @ k^T + bias, as diffusers' baddbmm does. Without a
        # mask diffusers passes torch.empty with beta=0; torch 1.13's CPU
        # baddbmm then multiplies uninitialised memory by 0 and can return NaN,
        # so we always pass a real bias (zeros without a mask) with beta=1.
        if attention_mask is None:
            bias = torch.zeros(query.shape[0], q_len, k_len, dtype=query.dtype)
        else:
            bias = normalize_mask(attention_mask, batch, q_len, k_len).to(query.dtype)
            bias = bias.repeat_interleave(self.heads, dim=0)  # [B*h, Mq, Lk], same mask for all heads
        scores = torch.baddbmm(bias, query, key.transpose(-1, -2), beta=1, alpha=self.scale)
        probs = scores.float().softmax(dim=-1).to(value.dtype)

        out = self.batch_to_head_dim(torch.bmm(probs, value))
        out = self.to_out[0](out)
        return self.to_out[1](out)


# --------------------------------------------------------------------------
# Activations and FeedForward
# --------------------------------------------------------------------------


class GELU(nn.Module):
    """Linear projection followed by GELU (exact, or tanh approximation)."""

    def __init__(self, dim_in, dim_out, approximate="none"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, hidden_states):
        return F.gelu(self.proj(hidden_states), approximate=self.approximate)


class GEGLU(nn.Module):
    """Gated GELU: project to 2*dim_out, out = first_half * gelu(second_half)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states):
        hidden_states, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return hidden_states * F.gelu(gate)


class ApproximateGELU(nn.Module):
    """Linear projection followed by x * sigmoid(1.702 x)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.proj(x)
        return x * torch.sigmoid(1.702 * x)


class FeedForward(nn.Module):
    """act(proj in) -> dropout -> Linear(inner, dim_out) [-> dropout].

    Keys: net.0.proj.{weight,bias} (activation's projection), net.2.{weight,bias}.
    """

    def __init__(self, dim, dim_out=None, mult=4, dropout=0.0, activation_fn="geglu", final_dropout=False):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim_out if dim_out is not None else dim
        # Diffusers writes this as `if gelu ... if gelu-approximate/elif ...`
        # (a missing elif); the outcome is the same. An unknown name is an
        # UnboundLocalError there, a ValueError here.
        if activation_fn == "gelu":
            act_fn = GELU(dim, inner_dim)
        elif activation_fn == "gelu-approximate":
            act_fn = GELU(dim, inner_dim, approximate="tanh")
        elif activation_fn == "geglu":
            act_fn = GEGLU(dim, inner_dim)
        elif activation_fn == "geglu-approximate":
            act_fn = ApproximateGELU(dim, inner_dim)
        else:
            raise ValueError(f"unknown activation_fn {activation_fn!r}")
        self.net = nn.ModuleList([act_fn, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out)])
        if final_dropout:
            self.net.append(nn.Dropout(dropout))

    def forward(self, hidden_states):
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


# --------------------------------------------------------------------------
# Timestep / label embeddings (diffusers' embeddings.py)
# --------------------------------------------------------------------------


def get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0,
                           max_period=10000):
    """Sinusoidal embedding of a [N] tensor of timesteps, computed in float32.

    exponent_i = -ln(max_period) * i / (half - downscale_freq_shift), i < half;
    emb = t * exp(exponent); out = [sin, cos] or, flipped, [cos, sin].
    """
    assert timesteps.dim() == 1, "timesteps must be 1-d"
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half_dim, dtype=torch.float32)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = torch.exp(exponent)
    emb = timesteps[:, None].float() * emb[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection of timesteps."""

    def __init__(self, num_channels, flip_sin_to_cos, downscale_freq_shift):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps):
        return get_timestep_embedding(timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                      downscale_freq_shift=self.downscale_freq_shift)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels, time_embed_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample):
        return self.linear_2(self.act(self.linear_1(sample)))


class LabelEmbedding(nn.Module):
    """Class label table with one extra row (index num_classes) for the null
    class used by classifier-free guidance; label dropout is off in eval."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels):
        return self.embedding_table(labels)


class CombinedTimestepLabelEmbeddings(nn.Module):
    """conditioning = TimestepEmbedding(Timesteps(t)) + LabelEmbedding(label)."""

    def __init__(self, num_classes, embedding_dim, class_dropout_prob=0.1):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=1)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=embedding_dim)
        self.class_embedder = LabelEmbedding(num_classes, embedding_dim, class_dropout_prob)

    def forward(self, timestep, class_labels, hidden_dtype=None):
        timesteps_proj = self.time_proj(timestep)
        timesteps_emb = self.timestep_embedder(timesteps_proj.to(dtype=hidden_dtype))
        return timesteps_emb + self.class_embedder(class_labels)


# --------------------------------------------------------------------------
# Adaptive norms
# --------------------------------------------------------------------------


def _index_tensor(t, what):
    """An int64 index tensor from an int or integral float tensor."""
    if t.is_floating_point():
        if not torch.equal(t, torch.round(t)):
            raise ValueError(f"{what} must be integral, got {t.tolist()}")
        return t.to(torch.int64)
    return t.to(torch.int64)


def _broadcast_to_batch(t, batch, what):
    """blockserve: a 0-d value is shared by the batch; a 1-d one must have B entries."""
    if t.dim() == 0:
        return t.expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{what} shape {tuple(t.shape)} is neither [] nor [{batch}]")
    return t


class AdaLayerNorm(nn.Module):
    """LayerNorm (no affine, eps 1e-5) modulated by an embedding of the timestep index."""

    def __init__(self, embedding_dim, num_embeddings):
        super().__init__()
        self.emb = nn.Embedding(num_embeddings, embedding_dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, embedding_dim * 2)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False)

    def forward(self, x, timestep):
        timestep = _index_tensor(timestep, "AdaLayerNorm timestep")
        emb = self.linear(self.silu(self.emb(timestep)))
        if timestep.dim() == 0:
            # Diffusers' own path: emb is [2D], chunked into scale and shift.
            scale, shift = torch.chunk(emb, 2)
        else:
            # blockserve: per-sample timesteps [B]; emb is [B, 2D]. Diffusers
            # would chunk along the batch (dim 0), a bug we do not reproduce.
            _broadcast_to_batch(timestep, x.shape[0], "AdaLayerNorm timestep")
            dim = emb.shape[-1] // 2
            scale, shift = emb[:, None, :dim], emb[:, None, dim:]
        return self.norm(x) * (1 + scale) + shift


class AdaLayerNormZero(nn.Module):
    """DiT's adaLN-Zero: LayerNorm (no affine, eps 1e-6) modulated by a
    timestep + class embedding; also returns the gates and MLP modulation."""

    def __init__(self, embedding_dim, num_embeddings):
        super().__init__()
        self.emb = CombinedTimestepLabelEmbeddings(num_embeddings, embedding_dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim, bias=True)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, timestep, class_labels, hidden_dtype=None):
        batch = x.shape[0]
        # blockserve: 0-d timestep / label broadcast to [B]; timesteps are
        # floats for the sinusoid, labels int64 indices.
        timestep = _broadcast_to_batch(timestep, batch, "timestep").to(torch.float32)
        class_labels = _broadcast_to_batch(_index_tensor(class_labels, "class_labels"), batch, "class_labels")
        emb = self.linear(self.silu(self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)))
        # Note the order: shift before scale.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaGroupNorm(nn.Module):
    """GroupNorm (no affine) of x [B, C, ...] modulated by emb [B, E]:
    scale, shift = linear(act(emb)).chunk(2); x = gn(x) * (1 + scale) + shift."""

    def __init__(self, embedding_dim, out_dim, num_groups, act_fn=None, eps=1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        # An unknown act_fn silently means no activation, as in diffusers.
        self.act = None
        if act_fn == "swish":
            self.act = nn.SiLU()
        elif act_fn == "mish":
            self.act = nn.Mish()
        elif act_fn == "silu":
            self.act = nn.SiLU()
        elif act_fn == "gelu":
            self.act = nn.GELU()
        self.linear = nn.Linear(embedding_dim, out_dim * 2)

    def forward(self, x, emb):
        if self.act is not None:
            emb = self.act(emb)
        emb = self.linear(emb)
        emb = emb[:, :, None, None]
        scale, shift = emb.chunk(2, dim=1)
        x = F.group_norm(x, self.num_groups, eps=self.eps)
        return x * (1 + scale) + shift


# --------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------


class AttentionBlock(nn.Module):
    """Deprecated spatial self-attention: x [B, C, H, W] -> (x + attn(gn(x))) / rescale."""

    def __init__(self, channels, num_head_channels=None, norm_num_groups=32, rescale_output_factor=1.0, eps=1e-5):
        super().__init__()
        self.channels = channels
        self.num_heads = channels // num_head_channels if num_head_channels is not None else 1
        self.num_head_size = num_head_channels
        self.group_norm = nn.GroupNorm(num_channels=channels, num_groups=norm_num_groups, eps=eps, affine=True)
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.rescale_output_factor = rescale_output_factor
        self.proj_attn = nn.Linear(channels, channels, bias=True)

    def reshape_heads_to_batch_dim(self, t):
        b, n, dim = t.shape
        h = self.num_heads
        return t.reshape(b, n, h, dim // h).permute(0, 2, 1, 3).reshape(b * h, n, dim // h)

    def reshape_batch_dim_to_heads(self, t):
        bh, n, dim = t.shape
        h = self.num_heads
        return t.reshape(bh // h, h, n, dim).permute(0, 2, 1, 3).reshape(bh // h, n, dim * h)

    def forward(self, hidden_states):
        residual = hidden_states
        batch, channel, height, width = hidden_states.shape
        hidden_states = self.group_norm(hidden_states)
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)

        query = self.reshape_heads_to_batch_dim(self.query(hidden_states))
        key = self.reshape_heads_to_batch_dim(self.key(hidden_states))
        value = self.reshape_heads_to_batch_dim(self.value(hidden_states))
        scale = 1 / math.sqrt(self.channels / self.num_heads)

        # Zero bias with beta=1 instead of diffusers' torch.empty/beta=0: see Attention.forward.
        bias = torch.zeros(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype)
        scores = torch.baddbmm(bias, query, key.transpose(-1, -2), beta=1, alpha=scale)
        probs = torch.softmax(scores.float(), dim=-1).type(scores.dtype)
        hidden_states = self.reshape_batch_dim_to_heads(torch.bmm(probs, value))

        hidden_states = self.proj_attn(hidden_states)
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        return (hidden_states + residual) / self.rescale_output_factor


class BasicTransformerBlock(nn.Module):
    """norm1 -> attn1 (+res) -> [norm2 -> attn2 (+res)] -> norm3 -> ff (+res).

    attn1 is self-attention unless only_cross_attention; attn2 exists only
    with cross_attention_dim and falls back to self-attention when no
    encoder_hidden_states are given (which needs cross_attention_dim == dim).
    """

    def __init__(self, dim, num_attention_heads, attention_head_dim, dropout=0.0, cross_attention_dim=None,
                 activation_fn="geglu", num_embeds_ada_norm=None, attention_bias=False, only_cross_attention=False,
                 upcast_attention=False, norm_elementwise_affine=True, norm_type="layer_norm", final_dropout=False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        # As in diffusers: num_embeds_ada_norm with norm_type "layer_norm" is a plain LayerNorm.
        self.use_ada_layer_norm_zero = (num_embeds_ada_norm is not None) and norm_type == "ada_norm_zero"
        self.use_ada_layer_norm = (num_embeds_ada_norm is not None) and norm_type == "ada_norm"
        if norm_type in ("ada_norm", "ada_norm_zero") and num_embeds_ada_norm is None:
            raise ValueError(f"norm_type {norm_type} needs num_embeds_ada_norm")
        if norm_type not in ("layer_norm", "ada_norm", "ada_norm_zero"):
            raise ValueError(f"unknown norm_type {norm_type!r}")

        # 1. Self-attention (cross-attention with only_cross_attention).
        self.attn1 = Attention(query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim,
                               dropout=dropout, bias=attention_bias,
                               cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               upcast_attention=upcast_attention)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn, final_dropout=final_dropout)

        # 2. Cross-attention.
        if cross_attention_dim is not None:
            self.attn2 = Attention(query_dim=dim, cross_attention_dim=cross_attention_dim, heads=num_attention_heads,
                                   dim_head=attention_head_dim, dropout=dropout, bias=attention_bias,
                                   upcast_attention=upcast_attention)
        else:
            self.attn2 = None

        if self.use_ada_layer_norm:
            self.norm1 = AdaLayerNorm(dim, num_embeds_ada_norm)
        elif self.use_ada_layer_norm_zero:
            self.norm1 = AdaLayerNormZero(dim, num_embeds_ada_norm)
        else:
            self.norm1 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine)

        if cross_attention_dim is not None:
            # AdaLayerNormZero is only used for norm1; norm2 is then a LayerNorm.
            self.norm2 = (AdaLayerNorm(dim, num_embeds_ada_norm) if self.use_ada_layer_norm
                          else nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine))
        else:
            self.norm2 = None

        # 3. Feed-forward: always a plain LayerNorm.
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, class_labels=None):
        if self.use_ada_layer_norm:
            norm_hidden_states = self.norm1(hidden_states, timestep)
        elif self.use_ada_layer_norm_zero:
            norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
                hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
        else:
            norm_hidden_states = self.norm1(hidden_states)

        # 1. Self-attention; attention_mask always goes to attn1.
        attn_output = self.attn1(norm_hidden_states,
                                 encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                                 attention_mask=attention_mask)
        if self.use_ada_layer_norm_zero:
            attn_output = gate_msa.unsqueeze(1) * attn_output
        hidden_states = attn_output + hidden_states

        # 2. Cross-attention; encoder_attention_mask goes to attn2.
        if self.attn2 is not None:
            norm_hidden_states = (self.norm2(hidden_states, timestep) if self.use_ada_layer_norm
                                  else self.norm2(hidden_states))
            attn_output = self.attn2(norm_hidden_states, encoder_hidden_states=encoder_hidden_states,
                                     attention_mask=encoder_attention_mask)
            hidden_states = attn_output + hidden_states

        # 3. Feed-forward.
        norm_hidden_states = self.norm3(hidden_states)
        if self.use_ada_layer_norm_zero:
            norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff_output = self.ff(norm_hidden_states)
        if self.use_ada_layer_norm_zero:
            ff_output = gate_mlp.unsqueeze(1) * ff_output
        return ff_output + hidden_states


class BlockStack(nn.Module):
    """blockserve: N BasicTransformerBlocks in sequence sharing the conditioning inputs."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, hidden_states, **conditioning):
        for block in self.blocks:
            hidden_states = block(hidden_states, **conditioning)
        return hidden_states


# --------------------------------------------------------------------------
# Loading a golden case: config + weights + inputs -> output
# --------------------------------------------------------------------------

CLASSES = {
    cls.__name__: cls
    for cls in (BasicTransformerBlock, AttentionBlock, FeedForward, GELU, GEGLU, ApproximateGELU, AdaLayerNorm,
                AdaGroupNorm)
}

# Forward arguments (= input tensor names) per class; the first is required.
INPUT_NAMES = {
    "BasicTransformerBlock": ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                              "timestep", "class_labels"),
    "AttentionBlock": ("hidden_states",),
    "FeedForward": ("hidden_states",),
    "GELU": ("hidden_states",),
    "GEGLU": ("hidden_states",),
    "ApproximateGELU": ("hidden_states",),
    "AdaLayerNorm": ("hidden_states", "timestep"),
    "AdaGroupNorm": ("x", "emb"),
}

# Inputs that are activations: converted to float32 before the forward
# (masks are converted by normalize_mask, timesteps/labels keep their dtype).
FLOAT_INPUTS = ("hidden_states", "encoder_hidden_states", "x", "emb")


def constructor_args(config):
    """The constructor kwargs in a diffusers-style config (drop "_*" and "blockserve")."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "blockserve"}


def block_prefixes(config):
    """The weight-name prefix of each block: [""] unless config["blockserve"] says otherwise."""
    bs = config.get("blockserve", {})
    num_blocks = bs.get("num_blocks", 1)
    # As the engine: a stack without a prefix reads diffusers' transformer_blocks.{i}.
    prefix = bs.get("weights_prefix", "transformer_blocks.{i}." if num_blocks > 1 else "")
    return [prefix.replace("{i}", str(i)) for i in range(num_blocks)]


def build_model(config, weights):
    """Build the (eval-mode) module a config describes and load its weights.

    weights: dict name -> tensor of any float dtype (converted to float32).
    Each block takes exactly the keys under its prefix (strict: none missing,
    none extra under the prefix); keys under no block's prefix are ignored.
    """
    cls = CLASSES[config["_class_name"]]
    kwargs = constructor_args(config)
    prefixes = block_prefixes(config)
    if len(prefixes) > 1 and cls is not BasicTransformerBlock:
        raise ValueError("only BasicTransformerBlock can be stacked")
    modules = []
    for prefix in prefixes:
        module = cls(**kwargs)
        state = {k[len(prefix):]: v.to(torch.float32) for k, v in weights.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
        modules.append(module)
    model = modules[0] if len(modules) == 1 else BlockStack(modules)
    return model.eval()


def run_model(model, class_name, inputs):
    """Forward the named inputs (converted as the engine does) and return the float32 output."""
    names = INPUT_NAMES[class_name]
    unknown = set(inputs) - set(names)
    if unknown:
        raise ValueError(f"unexpected inputs for {class_name}: {sorted(unknown)}")
    if names[0] not in inputs:
        raise ValueError(f"{class_name} needs input {names[0]}")
    args = {k: (v.to(torch.float32) if k in FLOAT_INPUTS else v) for k, v in inputs.items()}
    with torch.no_grad():
        if class_name == "AdaLayerNorm":
            out = model(args["hidden_states"], args["timestep"])
        elif class_name == "AdaGroupNorm":
            out = model(args["x"], args["emb"])
        elif class_name != "BasicTransformerBlock":
            out = model(args["hidden_states"])  # single-input modules (ApproximateGELU calls it x)
        else:
            out = model(**args)
    return out.to(torch.float32).contiguous()
