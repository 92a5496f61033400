"""The float generation loop on the host, used to produce realistic stage inputs.

Calibration data must look like what the pipeline feeds each stage graph: real history
latents, upsampled-and-renoised targets, the stage's timestep (N(0,1) inputs were ~3x too
narrow on the real NPU; shared/neodragon-facts.md section 4, item 9). :func:`rollout` runs
the deployed mode (first frame given, one step per stage, no CFG) and hands every call's
graph inputs to a callback.

Text features are synthetic here (seeded), standing in for DT5 / CLIP outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.denoiser import Denoiser


@dataclass(frozen=True)
class Prompt:
    embeds: torch.Tensor  # [1, L, 4096] DT5 tokens
    mask: torch.Tensor  # [1, L] 1 = valid token
    pooled: torch.Tensor  # [1, 2048] CLIP-L ++ CLIP-G pooled


# Real text-encoder features share most of their structure across prompts (per-channel
# offsets and scales set by the encoder, not the prompt); synthetic prompts model that as a
# fixed "encoder signature" plus a smaller per-prompt part.
PROMPT_VARIATION = 0.5


def synthetic_prompt(denoiser: Denoiser, seed: int) -> Prompt:
    """Seeded stand-in for the text encoders: a random valid length and random features.

    Features are ``signature + PROMPT_VARIATION * noise(seed)`` where the signature is a
    fixed draw shared by all prompts of a model.
    """
    cfg = denoiser.config
    length = cfg.geometry.text_len
    shared = torch.Generator().manual_seed(0x5EED)
    signature_embeds = torch.randn(1, length, cfg.context_adapter.input_dims, generator=shared)
    signature_pooled = torch.randn(1, cfg.mmdit.pooled_projection_dim, generator=shared)
    gen = torch.Generator().manual_seed(seed)
    valid = int(torch.randint(max(1, length // 4), length + 1, (1,), generator=gen))
    mask = torch.zeros(1, length)
    mask[:, :valid] = 1
    embeds = signature_embeds + PROMPT_VARIATION * torch.randn(signature_embeds.shape, generator=gen)
    pooled = signature_pooled + PROMPT_VARIATION * torch.randn(signature_pooled.shape, generator=gen)
    return Prompt(embeds, mask, pooled)


def block_noise(gamma: float, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Noise correlated within 2x2 blocks: cov = (1+gamma) I - gamma 11^T (Pyramid Flow eq. 15)."""
    b, c, t, h, w = shape
    cov = torch.eye(4, dtype=torch.float64) * (1 + gamma) - torch.ones(4, 4, dtype=torch.float64) * gamma
    chol = torch.linalg.cholesky(cov).float()
    z = torch.randn(b * c * t * (h // 2) * (w // 2), 4, generator=gen) @ chol.T
    z = z.reshape(b, c, t, h // 2, w // 2, 2, 2).permute(0, 1, 2, 3, 5, 4, 6)
    return z.reshape(b, c, t, h, w)


def _resize_frames(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    b, c, t, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    frames = F.interpolate(frames, size=size, mode=mode)
    return frames.reshape(b, t, c, *size).permute(0, 2, 1, 3, 4)


def upsample_renoise(x: torch.Tensor, orig_sigma: float, gamma: float, gen: torch.Generator):
    """Between stages: nearest 2x, then alpha*x + beta*block_noise to undo the blockiness."""
    x = _resize_frames(x, (x.shape[-2] * 2, x.shape[-1] * 2), "nearest")
    alpha = 1 / (math.sqrt(1 + 1 / gamma) * (1 - orig_sigma) + orig_sigma)
    beta = alpha * (1 - orig_sigma) / math.sqrt(gamma)
    return alpha * x + beta * block_noise(gamma, tuple(x.shape), gen)


StageCallback = Callable[[int, int, dict[str, torch.Tensor], torch.Tensor], None]


@torch.no_grad()
def rollout(
    denoiser: Denoiser,
    prompt: Prompt,
    seed: int,
    *,
    on_call: StageCallback | None = None,
    before_call: Callable[[int, int, dict[str, torch.Tensor]], None] | None = None,
    max_unit: int | None = None,
    unpadded: bool = False,
) -> torch.Tensor:
    """Generate the units (up to ``max_unit``); returns the latent video ``[1, C, T, H, W]``.

    ``on_call(unit, stage, graph_inputs, output_tokens)`` sees every denoiser call with its
    envelope-padded graph inputs, exactly as the stage graph will receive them;
    ``before_call(unit, stage, graph_inputs)`` runs just before the call (for observers
    that hook into the model).

    ``unpadded`` runs each call on its real tokens instead of the envelope (the graph
    inputs handed on stay padded): the same outputs within fp32 rounding, since the
    envelope's padding is masked out, for fewer tokens -- at full size the sample calls of
    an all-stages build hold 11 % fewer tokens in stage 2, 21 % in stage 1 and 33 % in
    stage 0 (units 1-2, padded most, run most often).
    """
    cfg = denoiser.config
    geo, mm = cfg.geometry, cfg.mmdit
    gen = torch.Generator().manual_seed(seed)
    sched = pyramid.PyramidSchedule.from_geometry(geo)
    shape = (1, mm.in_channels, geo.num_latent_frames, geo.latent_height, geo.latent_width)
    first_frame = torch.randn(shape[:2] + (geo.frames_per_unit,) + shape[3:], generator=gen)
    noise = torch.randn(shape, generator=gen)
    for _ in range(geo.num_stages - 1):  # start from the lowest resolution, variance kept
        noise = _resize_frames(noise, (noise.shape[-2] // 2, noise.shape[-1] // 2), "bilinear") * 2.0
    stages = [denoiser.stage_module(s) for s in range(geo.num_stages)]
    pos_table = denoiser.transformer.pos_embed.pos_embed

    generated = [first_frame]
    fpu = geo.frames_per_unit
    for unit in geo.denoised_units:
        if max_unit is not None and unit > max_unit:
            break
        history = torch.cat(generated, dim=2)
        levels = [history]
        for s in range(geo.num_stages - 1, 0, -1):
            levels.insert(0, _resize_frames(history, geo.stage_latent_hw(s - 1), "bilinear"))
        x = noise[:, :, unit * fpu : (unit + 1) * fpu]
        for stage in range(geo.num_stages):
            if stage:
                x = upsample_renoise(x, 1 - sched.orig_start_sigmas[stage], sched.gamma, gen)
            layout = pyramid.clip_layout(geo, unit, stage)
            clips = [
                levels[c.level][:, :, c.first_frame : c.first_frame + c.num_frames]
                for c in layout[:-1]
            ] + [x]
            inputs = pyramid.stage_inputs(
                cfg, pos_table, unit, stage, clips, prompt.embeds, prompt.mask, prompt.pooled,
            )
            if before_call is not None:
                before_call(unit, stage, inputs)
            call = inputs
            if unpadded:
                call = pyramid.stage_inputs(cfg, pos_table, unit, stage, clips, prompt.embeds, prompt.mask,
                                            prompt.pooled, pad_to_envelope=False)
            out = stages[stage](**call)  # [1, n, p*p*C]
            if on_call is not None:
                on_call(unit, stage, inputs, out)
            h, w = x.shape[-2:]
            flow = pyramid.unpatchify(out, mm.patch_size, mm.in_channels, fpu, h, w)
            x = x - flow  # one Euler step from sigma 1 to sigma 0
        generated.append(x)
    return torch.cat(generated, dim=2)


@dataclass(frozen=True)
class StageSample:
    """One denoiser call: its envelope graph inputs and the fp32 PyTorch output."""

    prompt_seed: int
    unit: int
    stage: int
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor  # [1, n_out, p*p*C]


def collect_samples(
    denoiser: Denoiser,
    prompt_seeds: list[int],
    stages: tuple[int, ...] | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    units_per_prompt: dict[int, int] | None = None,
) -> dict[int, list[StageSample]]:
    """Samples of the given stages from rollouts, one per (prompt, unit).

    ``units_per_prompt`` stops a prompt's rollout after that many units (each unit makes
    one call per stage), so a full-size model only runs the calls that are needed. The
    calls run unpadded (see :func:`rollout`); the samples hold the envelope's inputs.
    """
    stages = tuple(range(denoiser.config.geometry.num_stages)) if stages is None else stages
    samples: dict[int, list[StageSample]] = {s: [] for s in stages}
    for i, seed in enumerate(prompt_seeds):

        def keep(unit: int, stage: int, inputs: dict, out: torch.Tensor, seed: int = seed) -> None:
            if stage in samples:
                samples[stage].append(StageSample(seed, unit, stage, inputs, out))

        limit = (units_per_prompt or {}).get(seed)
        max_unit = None if limit is None else denoiser.config.geometry.denoised_units[0] + limit - 1
        rollout(denoiser, synthetic_prompt(denoiser, seed), seed, on_call=keep, max_unit=max_unit, unpadded=True)
        if progress is not None:
            progress(i + 1, len(prompt_seeds))
    return samples


def example_stage_inputs(denoiser: Denoiser, stage: int, seed: int = 0):
    """Envelope-shaped inputs of ``stage`` from random latents (no model run): for tracing."""
    cfg = denoiser.config
    gen = torch.Generator().manual_seed(seed)
    unit = pyramid.envelope_unit(cfg.geometry)
    clips = [
        torch.randn(1, cfg.mmdit.in_channels, c.num_frames, c.height, c.width, generator=gen)
        for c in pyramid.clip_layout(cfg.geometry, unit, stage)
    ]
    prompt = synthetic_prompt(denoiser, seed)
    return pyramid.stage_inputs(
        cfg, denoiser.transformer.pos_embed.pos_embed, unit, stage, clips,
        prompt.embeds, prompt.mask, prompt.pooled,
    )
