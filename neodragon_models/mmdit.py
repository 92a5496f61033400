"""The Neodragon Pyramid MMDiT denoiser.

Module and parameter names follow the released code (``neodragon/pyramid_mmdit``) so that
the ``diffusion_transformer_320p`` safetensors load by name. The maths is the released
maths; the calling convention is not: instead of lists of clips at mixed resolutions, the
transformer takes *prepared tokens* and host-computed tables, because that is what a static
NPU graph can take:

* ``latent_tokens [B, N, C*p*p]`` -- clips patchified on the host (a pure layout change);
  the 2x2/stride-2 patch Conv2d becomes the equivalent Linear.
* ``pos_embed [1, N, D]`` -- the sin-cos crop (resized for history clips), host side.
* ``rope_cos, rope_sin [1, 1, S, Dh/2]`` -- temporal RoPE half tables, S = text + image.
* ``attn_bias [1, 1, S, S]`` -- the validity + block-causal mask as a finite additive bias.
* ``timestep_proj [B, 256]`` -- the sinusoidal timestep projection.

``neodragon_models.reference`` rebuilds the released clip-list forward on top of these
modules as an independent check of that bookkeeping.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neodragon_npu.kernels import rope as rope_kernels
from neodragon_npu.kernels.attention import ATTENTION_KERNELS
from neodragon_npu.neodragon_models.configs import MMDiTConfig

RopeFn = Callable[[torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dimension."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.eps) * self.weight


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: one Linear gives shift/scale/gate for attention and for the MLP."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim, bias=True)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        emb = self.linear(self.silu(emb))  # [B, 6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.unsqueeze(1).chunk(
            6, dim=2
        )  # each [B, 1, D]
        x = self.norm(x) * (1 + scale_msa) + shift_msa
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(nn.Module):
    """Two-chunk adaptive LayerNorm; the chunk order is (scale, shift) as released."""

    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(cond_dim, 2 * dim, bias=True)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.linear(self.silu(cond))  # [B, 2D]
        scale, shift = emb.unsqueeze(1).chunk(2, dim=2)  # each [B, 1, D]
        return self.norm(x) * (1 + scale) + shift


class GELU(nn.Module):
    """Linear followed by tanh-approximated GELU (diffusers' ``GELU`` with ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GELU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class JointAttention(nn.Module):
    """One attention over [text ; image] with separate projections per stream."""

    def __init__(self, config: MMDiTConfig, context_pre_only: bool, kernel: str) -> None:
        super().__init__()
        dim, dh = config.inner_dim, config.attention_head_dim
        self.heads = config.num_attention_heads
        self.context_pre_only = context_pre_only
        self.kernel = kernel
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.add_q_proj = nn.Linear(dim, dim)
        self.add_k_proj = nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dh, config.qk_norm_eps)
        self.norm_k = RMSNorm(dh, config.qk_norm_eps)
        self.norm_add_q = RMSNorm(dh, config.qk_norm_eps)
        self.norm_add_k = RMSNorm(dh, config.qk_norm_eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        if not context_pre_only:
            self.to_add_out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, D] -> [B, N, H, Dh], written with shape queries as in the released code.
        return x.view(x.shape[0], -1, self.heads, x.shape[-1] // self.heads)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, N, D] image
        encoder_hidden_states: torch.Tensor,  # [B, L, D] text
        rope: RopeFn,
        attn_mask: torch.Tensor,  # [1, 1, L+N, L+N]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        text_len = encoder_hidden_states.shape[1]
        q = self.norm_q(self._heads(self.to_q(hidden_states)))  # [B, N, H, Dh]
        k = self.norm_k(self._heads(self.to_k(hidden_states)))
        v = self._heads(self.to_v(hidden_states))
        cq = self.norm_add_q(self._heads(self.add_q_proj(encoder_hidden_states)))  # [B, L, H, Dh]
        ck = self.norm_add_k(self._heads(self.add_k_proj(encoder_hidden_states)))
        cv = self._heads(self.add_v_proj(encoder_hidden_states))

        q = torch.cat([cq, q], dim=1).transpose(1, 2)  # [B, H, S, Dh]
        k = torch.cat([ck, k], dim=1).transpose(1, 2)
        v = torch.cat([cv, v], dim=1).transpose(1, 2)
        q, k = rope(q), rope(k)
        out = ATTENTION_KERNELS[self.kernel](q, k, v, attn_mask)  # [B, H, S, Dh]
        out = out.transpose(1, 2).flatten(2, 3)  # [B, S, D]

        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = self.to_out[1](self.to_out[0](image_out))
        if self.context_pre_only:
            return image_out, None
        return image_out, self.to_add_out(text_out)


class JointTransformerBlock(nn.Module):
    def __init__(self, config: MMDiTConfig, context_pre_only: bool, kernel: str) -> None:
        super().__init__()
        dim = config.inner_dim
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(dim, config.norm_eps)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(dim, dim, config.norm_eps)
        else:
            self.norm1_context = AdaLayerNormZero(dim, config.norm_eps)
        self.attn = JointAttention(config, context_pre_only, kernel)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.ff = FeedForward(dim, config.ff_mult)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
            self.ff_context = FeedForward(dim, config.ff_mult)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rope: RopeFn,
        attn_mask: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        if self.context_pre_only:
            norm_c = self.norm1_context(encoder_hidden_states, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                encoder_hidden_states, temb
            )
        attn_out, context_attn_out = self.attn(norm_x, norm_c, rope, attn_mask)

        hidden_states = hidden_states + gate_msa * attn_out
        norm_x = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        hidden_states = hidden_states + gate_mlp * self.ff(norm_x)

        if self.context_pre_only:
            return None, hidden_states
        encoder_hidden_states = encoder_hidden_states + c_gate_msa * context_attn_out
        norm_c = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp) + c_shift_mlp
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp * self.ff_context(norm_c)
        return encoder_hidden_states, hidden_states


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TextProjection(nn.Module):
    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class CombinedTimestepConditionEmbeddings(nn.Module):
    """temb = MLP(sincos(t)) + MLP(pooled CLIP-L ++ CLIP-G); sincos(t) comes from the host."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(config.timestep_proj_dim, config.inner_dim)
        self.text_embedder = TextProjection(config.pooled_projection_dim, config.inner_dim)

    def forward(self, timestep_proj: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(timestep_proj) + self.text_embedder(pooled)


def sincos_2d_table(embed_dim: int, grid_size: int, base_size: int) -> np.ndarray:
    """SD3's 2-D sin-cos table [grid*grid, D] (h half then w half; sin then cos)."""
    coords = np.arange(grid_size, dtype=np.float32) / (grid_size / base_size)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w goes first, as released

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate(
        [one_axis(embed_dim // 2, grid_w), one_axis(embed_dim // 2, grid_h)], axis=1
    )


class PatchEmbed3D(nn.Module):
    """2x2 patch embedding and the persistent 2-D sin-cos table (``pos_embed.pos_embed``)."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        p, dim = config.patch_size, config.inner_dim
        self.patch_size = p
        self.pos_embed_max_size = config.pos_embed_max_size
        self.proj = nn.Conv2d(config.in_channels, dim, kernel_size=p, stride=p)
        size = config.pos_embed_max_size
        self.register_buffer("pos_embed", torch.empty(1, size * size, dim), persistent=True)
        self._base_size = config.sample_size // p

    def reset_pos_embed(self) -> None:
        table = sincos_2d_table(self.pos_embed.shape[-1], self.pos_embed_max_size, self._base_size)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(table).float()[None])

    def forward(self, latent_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, C*p*p] host-patchified tokens -> [B, N, D]; equals the stride-p Conv2d."""
        weight = self.proj.weight.flatten(1)  # [D, C*p*p] in (c, kh, kw) order
        return F.linear(latent_tokens, weight, self.proj.bias)


class PyramidMMDiT(nn.Module):
    """The joint transformer. ``rope_layout`` and ``attention`` choose kernel variants."""

    def __init__(
        self,
        config: MMDiTConfig,
        *,
        rope_layout: str = "interleaved",
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        if rope_layout not in rope_kernels.ROPE_KERNELS:
            raise ValueError(f"unknown RoPE layout {rope_layout!r}; expected {list(rope_kernels.ROPE_KERNELS)}")
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention {attention!r}; expected {list(ATTENTION_KERNELS)}")
        self.config = config
        self.rope_layout = rope_layout
        dim = config.inner_dim
        self.pos_embed = PatchEmbed3D(config)
        self.time_text_embed = CombinedTimestepConditionEmbeddings(config)
        self.transformer_blocks = nn.ModuleList(
            [
                JointTransformerBlock(config, i == config.num_layers - 1, attention)
                for i in range(config.num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim, config.norm_eps)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.in_channels)

    def forward(
        self,
        latent_tokens: torch.Tensor,  # [B, N, C*p*p]
        pos_embed: torch.Tensor,  # [1, N, D]
        encoder_hidden_states: torch.Tensor,  # [B, L, D] (after the ContextAdapter)
        pooled_projections: torch.Tensor,  # [B, 2048]
        timestep_proj: torch.Tensor,  # [B, 256]
        rope_cos: torch.Tensor,  # [1, 1, L+N, Dh/2]
        rope_sin: torch.Tensor,  # [1, 1, L+N, Dh/2]
        attn_bias: torch.Tensor,  # [1, 1, L+N, L+N]
        output_tokens: int | None = None,
    ) -> torch.Tensor:
        """Predicted flow for the last ``output_tokens`` image tokens: [B, n, p*p*C]."""
        # looked up on the module at call time, so tracing records one leaf call per rotation
        kernel = getattr(rope_kernels, f"rope_{self.rope_layout}")

        def rope(x: torch.Tensor) -> torch.Tensor:
            return kernel(x, rope_cos, rope_sin)

        temb = self.time_text_embed(timestep_proj, pooled_projections)  # [B, D]
        hidden_states = self.pos_embed(latent_tokens) + pos_embed  # [B, N, D]
        context = encoder_hidden_states
        for block in self.transformer_blocks:
            context, hidden_states = block(hidden_states, context, temb, rope, attn_bias)
        if output_tokens is not None:
            hidden_states = hidden_states[:, -output_tokens:]
        hidden_states = self.norm_out(hidden_states, temb)
        return self.proj_out(hidden_states)
