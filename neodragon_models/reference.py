"""The released clip-list forward, rebuilt independently of the host bookkeeping.

This is the *unpadded reference* the static envelope graphs are checked against. It
follows the released ``PyramidMMDiT.forward`` for one stage call: a Conv2d patch embedding
per clip, the sin-cos table cropped at the target grid and bilinearly resized for
lower-resolution history, temporal ids per frame, the 6-D RoPE rotation tensor, and a
boolean mask built from token groups and frame order, fed to SDPA. It shares only the
learned modules with the stage graphs, none of ``neodragon_models.pyramid``'s tables.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from neodragon_npu.kernels.rope import freqs_cis_6d, rope_reference_6d
from neodragon_npu.neodragon_models.denoiser import Denoiser


def _timestep_features(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timestep.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1)  # flip_sin_to_cos


def _patch_embed(denoiser: Denoiser, clip: torch.Tensor, target_hw: tuple[int, int]) -> torch.Tensor:
    """Conv2d per frame plus the pos-embed crop (resized when the clip is coarser)."""
    tr = denoiser.transformer
    cfg = denoiser.config.mmdit
    b, c, t, h, w = clip.shape
    frames = clip.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    x = tr.pos_embed.proj(frames).flatten(2).transpose(1, 2)  # [B*T, h*w/4, D]
    size = cfg.pos_embed_max_size
    th, tw = target_hw[0] // cfg.patch_size, target_hw[1] // cfg.patch_size
    top, left = (size - th) // 2, (size - tw) // 2
    table = tr.pos_embed.pos_embed.reshape(1, size, size, -1)[:, top : top + th, left : left + tw]
    gh, gw = h // cfg.patch_size, w // cfg.patch_size
    if (gh, gw) != (th, tw):
        table = F.interpolate(table.permute(0, 3, 1, 2), size=(gh, gw), mode="bilinear").permute(0, 2, 3, 1)
    x = x + table.reshape(1, gh * gw, -1)
    return x.reshape(b, t * gh * gw, -1)


@torch.no_grad()
def reference_forward(
    denoiser: Denoiser,
    clips: list[torch.Tensor],  # oldest first; the last is the noisy target [B, C, T, H, W]
    prompt_embeds: torch.Tensor,  # [B, L, 4096]
    prompt_mask: torch.Tensor,  # [B, L]
    pooled: torch.Tensor,  # [B, 2048]
    timestep: float,
) -> torch.Tensor:
    """Predicted flow for the target clip, ``[B, C, T, H, W]``, without any padding."""
    tr, cfg = denoiser.transformer, denoiser.config.mmdit
    batch = prompt_embeds.shape[0]
    context = denoiser.context_adapter(prompt_embeds)
    temb = tr.time_text_embed(
        _timestep_features(torch.full((batch,), timestep), cfg.timestep_proj_dim), pooled
    )
    target_hw = tuple(clips[-1].shape[-2:])
    hidden = torch.cat([_patch_embed(denoiser, c, target_hw) for c in clips], dim=1)

    # temporal ids: the frame index across the concatenated clips; text at 0
    frame_ids, start = [], 0
    for c in clips:
        t, gh, gw = c.shape[2], c.shape[3] // cfg.patch_size, c.shape[4] // cfg.patch_size
        frame_ids.append(torch.arange(start, start + t).repeat_interleave(gh * gw))
        start += t
    image_ids = torch.cat(frame_ids).float()
    seq_ids = torch.cat([torch.zeros(prompt_mask.shape[1]), image_ids])
    freqs = freqs_cis_6d(seq_ids, cfg.attention_head_dim, cfg.rope_theta)

    def rope(x: torch.Tensor) -> torch.Tensor:  # blocks hand over [B, H, S, Dh]
        return rope_reference_6d(x.transpose(1, 2), freqs).transpose(1, 2)

    # token groups (valid text and image = 1, padded text = 0) and frame order
    groups = torch.cat([prompt_mask.long(), torch.ones(batch, image_ids.numel(), dtype=torch.long)], 1)
    same = groups[:, :, None] == groups[:, None, :]
    causal = seq_ids[:, None] >= seq_ids[None, :]
    mask = (same & causal)[:, None]  # [B, 1, S, S] boolean

    for block in tr.transformer_blocks:
        context, hidden = block(hidden, context, temb, rope, mask)
    b, c, t, h, w = clips[-1].shape
    n_out = t * (h // cfg.patch_size) * (w // cfg.patch_size)
    out = tr.proj_out(tr.norm_out(hidden[:, -n_out:], temb))  # [B, n, p*p*C]
    p = cfg.patch_size
    out = out.reshape(b, t, h // p, w // p, p, p, c).permute(0, 6, 1, 2, 4, 3, 5)
    return out.reshape(b, c, t, h, w)
