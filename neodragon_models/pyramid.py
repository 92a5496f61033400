"""Host-side pyramid bookkeeping: everything that depends only on (unit, stage) and the prompt.

For each denoiser call (unit u >= 1, stage s) this module gives the clip layout (which past
frames are attended, at which resolution), token counts, temporal position ids, the
validity + block-causal attention mask, the position-embedding crops and the timestep.
Computing these on the host keeps ~800 nodes and the 226 MB sin-cos table out of the NPU
graph (shared/neodragon-facts.md section 4, item 6).

The static *envelope* graph of a stage is sized for the last unit (the longest history).
Shorter calls are padded at the front of the image tokens (the output is the trailing
tokens); padded tokens get their own mask group so real tokens never see them, and real
tokens keep their true position ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from neodragon_npu.kernels.attention import MASK_VALUE
from neodragon_npu.kernels.rope import rope_tables
from neodragon_npu.neodragon_models.configs import DenoiserConfig, PyramidGeometry


@dataclass(frozen=True)
class Clip:
    """A run of consecutive latent frames attended at one pyramid level."""

    level: int  # pyramid stage whose resolution the frames are at
    first_frame: int  # index of the first frame in the whole video (= its temporal id)
    num_frames: int
    height: int  # latent grid
    width: int

    def tokens(self, patch: int) -> int:
        return self.num_frames * (self.height // patch) * (self.width // patch)


def clip_layout(geometry: PyramidGeometry, unit: int, stage: int) -> list[Clip]:
    """Clips seen when denoising ``unit`` at ``stage``, oldest first; the last is the target.

    The newest past unit is at the current stage's resolution, each older unit one level
    lower, down to stage 0, where all remaining history sits (released
    ``_prepare_past_condition_latents``).
    """
    if unit not in geometry.denoised_units:
        raise ValueError(
            f"unit {unit} is not denoised; units are {geometry.denoised_units[0]}.."
            f"{geometry.denoised_units[-1]} (unit 0 is the first frame)"
        )
    fpu = geometry.frames_per_unit

    def at(level: int, first_unit: int, num_units: int) -> Clip:
        h, w = geometry.stage_latent_hw(level)
        return Clip(level, first_unit * fpu, num_units * fpu, h, w)

    history = [at(stage, unit - 1, 1)]  # newest past unit at the current resolution
    level, taken = stage, 1
    while taken < unit:
        level = max(level - 1, 0)
        if level == 0:
            break
        taken += 1
        history.append(at(level, unit - taken, 1))
    if level == 0 and taken < unit:
        history.append(at(0, 0, unit - taken))
    return list(reversed(history)) + [at(stage, unit, 1)]


def image_token_count(geometry: PyramidGeometry, patch: int, unit: int, stage: int) -> int:
    return sum(c.tokens(patch) for c in clip_layout(geometry, unit, stage))


def envelope_unit(geometry: PyramidGeometry) -> int:
    """The unit with the longest history, whose shape every stage graph is padded to."""
    return geometry.denoised_units[-1]


def envelope_image_tokens(geometry: PyramidGeometry, patch: int, stage: int) -> int:
    return max(image_token_count(geometry, patch, u, stage) for u in geometry.denoised_units)


def envelope_attention_tokens(geometry: PyramidGeometry, patch: int, stage: int) -> int:
    return geometry.text_len + envelope_image_tokens(geometry, patch, stage)


def output_token_count(geometry: PyramidGeometry, patch: int, stage: int) -> int:
    """Tokens of the frame being generated (the graph's output)."""
    h, w = geometry.stage_latent_hw(stage)
    return geometry.frames_per_unit * (h // patch) * (w // patch)


@dataclass(frozen=True)
class PyramidSchedule:
    """One-step-per-stage flow-matching schedule (released ``PyramidFlowMatchEulerDiscreteScheduler``)."""

    timesteps: tuple[float, ...]  # the single timestep of each stage
    orig_start_sigmas: tuple[float, ...]  # uncorrected start sigma of each stage
    gamma: float

    @classmethod
    def from_geometry(cls, geometry: PyramidGeometry) -> "PyramidSchedule":
        n, stages, gamma = geometry.num_train_timesteps, geometry.num_stages, geometry.gamma
        sigmas = [(n - i) / n for i in range(n)]  # timesteps n..1 divided by n
        bounds = [i / stages for i in range(stages + 1)]
        distance, orig_start = [], []
        for s in range(stages):
            start_idx = max(int(bounds[s] * n), 0)
            end_idx = min(int(bounds[s + 1] * n), n)
            start = sigmas[start_idx]
            end = sigmas[end_idx] if end_idx < n else 0.0
            orig_start.append(start)
            if s:
                ori = 1 - start
                corrected = ori / (math.sqrt(1 + 1 / gamma) * (1 - ori) + ori)
                start = 1 - corrected
            distance.append(start - end)
        total = sum(distance)
        timesteps = []
        for s in range(stages):
            ratio = 0.0 if s == 0 else sum(distance[:s]) / total
            timesteps.append(sigmas[int(ratio * n)] * n)
        return cls(tuple(timesteps), tuple(orig_start), gamma)


def timestep_projection(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep features [B, dim], (cos, sin) order (``flip_sin_to_cos``), shift 0."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def temporal_ids(clips: list[Clip], patch: int) -> torch.Tensor:
    """Frame index of every image token, in token order ``[N]``."""
    ids = [
        torch.arange(c.first_frame, c.first_frame + c.num_frames).repeat_interleave(
            (c.height // patch) * (c.width // patch)
        )
        for c in clips
    ]
    return torch.cat(ids).float()


def attention_allowed(
    text_valid: torch.Tensor,  # [B, L] bool
    image_times: torch.Tensor,  # [N] float
    pad_tokens: int = 0,
) -> torch.Tensor:
    """Boolean [B, 1, S, S] over the sequence [text ; pad ; image].

    Valid text and image tokens form one group, padded text another (they only see each
    other), and front padding a third; within a group a query sees keys of the same or an
    earlier frame (text is at frame 0).
    """
    batch, text_len = text_valid.shape
    group = torch.cat(
        [
            text_valid.long(),  # 1 valid text, 0 padded text
            torch.full((batch, pad_tokens), 2, dtype=torch.long),  # envelope padding
            torch.ones(batch, image_times.numel(), dtype=torch.long),
        ],
        dim=1,
    )  # [B, S]
    times = torch.cat([torch.zeros(text_len + pad_tokens), image_times])  # [S]
    same_group = group[:, :, None] == group[:, None, :]  # [B, S, S]
    causal = times[:, None] >= times[None, :]  # [S, S]
    return (same_group & causal)[:, None]


def attention_bias(allowed: torch.Tensor) -> torch.Tensor:
    """Finite additive mask: 0 where allowed, MASK_VALUE elsewhere."""
    return torch.where(allowed, 0.0, MASK_VALUE).float()


def cropped_pos_embed(table: torch.Tensor, max_size: int, clip: Clip, target: Clip, patch: int):
    """Sin-cos crop for ``clip``: the target grid's centre crop, bilinearly resized if smaller."""
    dim = table.shape[-1]
    th, tw = target.height // patch, target.width // patch
    h, w = clip.height // patch, clip.width // patch
    top, left = (max_size - th) // 2, (max_size - tw) // 2
    grid = table.reshape(1, max_size, max_size, dim)[:, top : top + th, left : left + tw]
    if (h, w) != (th, tw):
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(h, w), mode="bilinear")
        grid = grid.permute(0, 2, 3, 1)
    per_frame = grid.reshape(1, h * w, dim)
    return per_frame.repeat(1, clip.num_frames, 1)  # [1, T*h*w, D]


def patchify(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, T*(H/p)*(W/p), C*p*p], the patch in (c, kh, kw) order."""
    b, c, t, h, w = latent.shape
    x = latent.reshape(b, c, t, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 3, 5, 1, 4, 6)  # b t gh gw c kh kw
    return x.reshape(b, t * (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, t: int, h: int, w: int):
    """[B, T*gh*gw, p*p*C] (the output's (p1, p2, c) order) -> [B, C, T, H, W]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, t, h // patch, w // patch, patch, patch, channels)
    x = x.permute(0, 6, 1, 2, 4, 3, 5)  # b c t gh p1 gw p2
    return x.reshape(b, channels, t, h, w)


STAGE_INPUT_NAMES = (
    "latent_tokens",
    "pos_embed",
    "prompt_embeds",
    "pooled_projections",
    "timestep_proj",
    "rope_cos",
    "rope_sin",
    "attn_bias",
)


def stage_inputs(
    config: DenoiserConfig,
    pos_table: torch.Tensor,
    unit: int,
    stage: int,
    clips: list[torch.Tensor],
    prompt_embeds: torch.Tensor,
    prompt_mask: torch.Tensor,
    pooled: torch.Tensor,
    *,
    pad_to_envelope: bool = True,
) -> dict[str, torch.Tensor]:
    """Graph inputs of one denoiser call, named as in :data:`STAGE_INPUT_NAMES`.

    ``clips`` are latents ``[B, C, T, h, w]`` matching :func:`clip_layout` (oldest first,
    the noisy target last); ``prompt_embeds`` are DT5 tokens (the ContextAdapter runs in
    the graph).
    """
    mm, geometry = config.mmdit, config.geometry
    p = mm.patch_size
    layout = clip_layout(geometry, unit, stage)
    if len(clips) != len(layout):
        raise ValueError(f"unit {unit} stage {stage} takes {len(layout)} clips, got {len(clips)}")
    for clip, latent in zip(layout, clips):
        expected = (mm.in_channels, clip.num_frames, clip.height, clip.width)
        if tuple(latent.shape[1:]) != expected:
            raise ValueError(f"clip at level {clip.level}: expected [B, {expected}], got {list(latent.shape)}")
    batch = prompt_embeds.shape[0]
    tokens = torch.cat([patchify(x, p) for x in clips], dim=1)  # [B, N, C*p*p]
    pos = torch.cat(
        [cropped_pos_embed(pos_table, mm.pos_embed_max_size, c, layout[-1], p) for c in layout], 1
    )  # [1, N, D]
    image_times = temporal_ids(layout, p)  # [N]
    pad = envelope_image_tokens(geometry, p, stage) - tokens.shape[1] if pad_to_envelope else 0
    if pad:
        tokens = torch.cat([tokens.new_zeros(batch, pad, tokens.shape[2]), tokens], dim=1)
        pos = torch.cat([pos.new_zeros(1, pad, pos.shape[2]), pos], dim=1)
    seq_times = torch.cat([torch.zeros(geometry.text_len + pad), image_times])  # [S]
    cos, sin = rope_tables(seq_times, mm.attention_head_dim, mm.rope_theta)  # [1, 1, S, Dh/2]
    bias = attention_bias(attention_allowed(prompt_mask.bool(), image_times, pad))
    timestep = PyramidSchedule.from_geometry(geometry).timesteps[stage]
    tproj = timestep_projection(torch.full((batch,), timestep), mm.timestep_proj_dim)
    return {
        "latent_tokens": tokens.float(),
        "pos_embed": pos.float(),
        "prompt_embeds": prompt_embeds.float(),
        "pooled_projections": pooled.float(),
        "timestep_proj": tproj,
        "rope_cos": cos,
        "rope_sin": sin,
        "attn_bias": bias,
    }


def attention_segments(geometry: PyramidGeometry, patch: int, stage: int) -> list[tuple[int, int, int, int]]:
    """The mask's structure over a stage's envelope, valid for every unit it serves.

    Returns runs ``(q0, q1, key_end, bias_row)`` covering the sequence: for every unit and
    every real (not padded) query in ``q0:q1``, keys from ``key_end`` on are hidden, and the
    query's mask row equals row ``bias_row``'s on ``:key_end``. Padded queries are
    ignored: nothing real reads them. Text validity only hides text columns, the same way
    for every valid query, so all-valid text is used here and row 0 (always valid) stands
    for the text run. This is what lets attention splitting skip hidden keys and fold the
    bias into QK^T.
    """
    text_len = geometry.text_len
    seq = envelope_attention_tokens(geometry, patch, stage)
    row_ids, reals, ends = [], [], []
    for unit in geometry.denoised_units:
        times = temporal_ids(clip_layout(geometry, unit, stage), patch)
        pad = seq - text_len - times.numel()
        allowed = attention_allowed(torch.ones(1, text_len, dtype=torch.bool), times, pad)[0, 0]
        real = torch.ones(seq, dtype=torch.bool)
        real[text_len : text_len + pad] = False
        # rows are all False after their own last key, so equal rows <=> equal prefixes
        row_ids.append(torch.unique(allowed, dim=0, return_inverse=True)[1].tolist())
        last = seq - torch.flip(allowed, dims=[1]).int().argmax(dim=1)  # last visible key + 1
        ends.append(torch.where(real, last, torch.zeros_like(last)).tolist())
        reals.append(real.tolist())

    def fits(q0: int, q1: int, rep: int) -> bool:
        """Rows q0..q1 (inclusive) share one mask row in every unit, ``rep`` among them."""
        for ids, real in zip(row_ids, reals):
            live = [r for r in range(q0, q1 + 1) if real[r]]
            if live and (not real[rep] or any(ids[r] != ids[rep] for r in live)):
                return False
        return True

    segments, q0 = [], 0
    while q0 < seq:
        q1 = q0
        while q1 + 1 < seq and (q0 < text_len) == (q1 + 1 < text_len):
            if not fits(q0, q1 + 1, q0 if q0 < text_len else q1 + 1):
                break
            q1 += 1
        end = max(e[r] for e in ends for r in range(q0, q1 + 1))
        segments.append((q0, q1 + 1, end, q0 if q0 < text_len else q1))
        q0 = q1 + 1
    return segments
