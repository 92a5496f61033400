"""The first-frame host loop: text conditioning -> 4 LCM steps of the UNet -> the SDXL VAE
decoder, with the graphs as callables, so the same loop runs the float PyTorch modules and
the compiled binaries (``neodragon-npu first-frame``).

Everything between the graphs is numpy (:mod:`.ssd1b`): the embedding sinusoids, the LCM
step and its noise, the latent's unscaling. Noise comes from one seeded generator: the
initial latent first, then one draw per re-noised step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from neodragon_npu.neodragon_models import ssd1b

UnetFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]
DecodeFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class Conditioning:
    """SDXL's text inputs: CLIP-L and CLIP-G penultimate states side by side, and CLIP-G's
    pooled projection."""

    prompt_embeds: np.ndarray  # [1, T, D_L + D_G]
    pooled: np.ndarray  # [1, P]


@dataclass
class FirstFrameRun:
    unet_inputs: list[dict[str, np.ndarray]] = field(default_factory=list)  # one per step
    noise_preds: list[np.ndarray] = field(default_factory=list)
    latent: np.ndarray | None = None  # the denoised latent, before unscaling
    image: np.ndarray | None = None  # [1, 3, H, W] in [-1, 1] (unclamped)


@torch.no_grad()
def text_conditioning(clip_l, clip_g, ids_l: np.ndarray, ids_g: np.ndarray) -> Conditioning:
    """Float text encoders on one prompt's token ids ([1, T] each)."""
    _, hidden_l = clip_l(torch.from_numpy(ids_l))
    pooled_g, hidden_g = clip_g(torch.from_numpy(ids_g))
    return Conditioning(torch.cat([hidden_l, hidden_g], dim=-1).numpy(), pooled_g.numpy())


def run_first_frame(unet: UnetFn, decode: DecodeFn | None, conditioning: Conditioning, unet_config,
                    latent_size: tuple[int, int], scaling_factor: float, seed: int,
                    steps: tuple[int, ...] = ssd1b.LCM_TIMESTEPS) -> FirstFrameRun:
    """The LCM loop at one seed; ``decode`` None stops at the latent."""
    rng = np.random.default_rng(seed)
    h, w = latent_size
    latents = rng.standard_normal((1, 4, h, w)).astype(np.float32)  # init_noise_sigma 1
    ids = ssd1b.time_ids(8 * h, 8 * w)
    run = FirstFrameRun()
    for i, t in enumerate(steps):
        feed = {"sample": latents, "encoder_hidden_states": conditioning.prompt_embeds,
                "text_embeds": conditioning.pooled, **ssd1b.host_embedding_features(unet_config, t, ids)}
        eps = np.asarray(unet(feed), dtype=np.float32)
        run.unet_inputs.append(feed)
        run.noise_preds.append(eps)
        last = i == len(steps) - 1
        noise = None if last else rng.standard_normal(latents.shape).astype(np.float32)
        latents = ssd1b.lcm_step(eps, i, latents, noise, steps)
    run.latent = latents
    if decode is not None:
        run.image = np.asarray(decode(latents / scaling_factor), dtype=np.float32)
    return run


def torch_unet(module) -> UnetFn:
    graph = ssd1b.UNetGraph(module).eval()

    @torch.no_grad()
    def call(feed):
        return graph(*(torch.from_numpy(feed[n]) for n in UNET_INPUTS)).numpy()

    return call


def torch_decoder(vae) -> DecodeFn:
    graph = ssd1b.VAEDecoderGraph(vae).eval()

    @torch.no_grad()
    def call(latent):
        return graph(torch.from_numpy(latent)).numpy()

    return call


UNET_INPUTS = ("sample", "timestep_features", "encoder_hidden_states", "text_embeds", "time_ids_features")


def to_png_array(image: np.ndarray) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1] -> [H, W, 3] uint8, as SDXL's image processor rounds it."""
    x = np.clip(image[0] / 2 + 0.5, 0.0, 1.0)
    return (x.transpose(1, 2, 0) * 255).round().astype(np.uint8)
