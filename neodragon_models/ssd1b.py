"""SSD-1B, the first-frame generator: diffusers' ``UNet2DConditionModel`` with SSD-1B's
configuration and ``AutoencoderKL`` (the SDXL VAE), as the released
``SSD1B_FirstFrameGeneratorPipeline`` builds them (``ssd_1b_unet``, ``ssd_1b_vae``).

The models are diffusers' own classes, built from a config with seeded synthetic weights or
from the released folders. What becomes a graph:

* :class:`UNetGraph`: one LCM step of the UNet at a static latent size. The sinusoidal
  features of the timestep and of SDXL's six size conditions (``time_ids``) are host inputs
  (:func:`host_embedding_features`, numpy); their MLPs stay in the graph, so the host holds no
  weight and no sinusoid arithmetic is left in the graph.
* :class:`VAEDecoderGraph`: ``post_quant_conv`` and the decoder; the host divides the
  latent by ``scaling_factor`` first, as SDXL's pipeline does.

The LCM scheduler's step math stays on the host (:func:`lcm_step`, numpy): the released
pipeline's ``LCMScheduler(set_alpha_to_one=False, original_inference_steps=4,
steps_offset=1)`` at timesteps 999, 749, 499, 249, with no classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# the host's arithmetic lives with the rest of the host loop, in numpy (an app runs it)
from neodragon_npu.neodragon_models.host.numerics import (  # noqa: F401 (re-exported)
    LCM_TIMESTEPS, TRAIN_TIMESTEPS, alphas_cumprod, lcm_step, sinusoid, time_ids,
)

# The released first-frame size and its latent (8x smaller).
IMAGE_SIZE = (640, 1024)

# SSD-1B's UNet: SDXL's with fewer transformer blocks (34 against 70) and a mid block of
# one resnet (../shared/neodragon-submodules.md section 5).
_SSD1B_UNET = dict(
    sample_size=(80, 128), in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2D",
    block_out_channels=(320, 640, 1280), layers_per_block=2,
    transformer_layers_per_block=(1, 2, 4),
    reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), (1, 1, 1)),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
_TINY_UNET = dict(
    _SSD1B_UNET, sample_size=(16, 24), block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
    reverse_transformer_layers_per_block=((2, 2, 3), (1, 1, 1), (1, 1, 1)), attention_head_dim=(2, 4, 4),
    # the tiny CLIP-L and CLIP-G (32 + 40 wide, 40-wide projection: neodragon_models/clip.py)
    cross_attention_dim=72, addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 40,
    norm_num_groups=8,
)
UNET_CONFIGS: dict[str, dict[str, Any]] = {"neodragon": _SSD1B_UNET, "tiny": _TINY_UNET}

# The SDXL VAE (``ssd_1b_vae``); the tiny one keeps every block type at a few channels.
_SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=1024,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    scaling_factor=0.13025, force_upcast=True,
)
_TINY_VAE = dict(_SDXL_VAE, block_out_channels=(8, 16, 16, 16), norm_num_groups=4, sample_size=128)
VAE_CONFIGS: dict[str, dict[str, Any]] = {"neodragon": _SDXL_VAE, "tiny": _TINY_VAE}

@dataclass(frozen=True)
class FirstFrameShapes:
    latent: tuple[int, int]  # h, w
    tokens: int
    text_dim: int  # cross-attention width
    pooled_dim: int
    time_features: int  # the timestep's sinusoid width
    time_ids_features: int  # 6 x addition_time_embed_dim


def unet_shapes(unet, tokens: int) -> FirstFrameShapes:
    """The UNet graph's input shapes; ``tokens``: the text encoders' length (77 released)."""
    cfg = unet.config
    h, w = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return FirstFrameShapes((int(h), int(w)), tokens, cfg.cross_attention_dim, pooled, cfg.block_out_channels[0],
                            6 * cfg.addition_time_embed_dim)


def get_unet_config(name: str) -> dict[str, Any]:
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown SSD-1B UNet config {name!r}; known: {', '.join(UNET_CONFIGS)}")
    return dict(UNET_CONFIGS[name])


def get_vae_config(name: str) -> dict[str, Any]:
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown SDXL VAE config {name!r}; known: {', '.join(VAE_CONFIGS)}")
    return dict(VAE_CONFIGS[name])


def _from_config(cls, config: dict[str, Any], source: str):
    try:
        return cls.from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        from neodragon_npu.neodragon_models.weights import CheckpointError

        raise CheckpointError(f"{source}: not a {cls.__name__} config ({exc})") from None


# The keys of a released config.json that fix each architecture.
UNET_KEYS = ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim",
             "addition_embed_type")
VAE_KEYS = ("block_out_channels", "down_block_types", "up_block_types", "latent_channels")


def released_config(folder, class_name: str, required: tuple[str, ...]) -> dict[str, Any]:
    """A released folder's config.json, checked to be this model's before anything loads."""
    from neodragon_npu.neodragon_models.weights import CONFIG_NAME, CheckpointError, read_config

    raw = read_config(folder)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{folder}/{CONFIG_NAME}: expected a JSON object")
    named = raw.get("_class_name")
    if named is not None and named != class_name:
        raise CheckpointError(f"{folder}/{CONFIG_NAME} is a {named}, not a {class_name}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise CheckpointError(f"{folder}/{CONFIG_NAME} lacks {', '.join(missing)}: not a {class_name} config")
    return raw


def _build(cls, config: dict[str, Any], checkpoint, seed: int, class_name: str, required):
    from neodragon_npu.neodragon_models.weights import load_state_dict_strict, read_state_dict, synthetic_init_

    if checkpoint is not None:
        config = released_config(checkpoint, class_name, required)
        with torch.device("meta"):
            model = _from_config(cls, config, str(checkpoint))
        load_state_dict_strict(model, read_state_dict(checkpoint), str(checkpoint))
    else:
        model = _from_config(cls, config, class_name)
        synthetic_init_(model, seed)
    model.requires_grad_(False)
    return model.eval()


def build_unet(config: dict[str, Any], *, checkpoint=None, seed: int = 0):
    """diffusers' UNet2DConditionModel: seeded synthetic weights, or the released
    ``ssd_1b_unet`` folder (its config.json sets the architecture)."""
    from diffusers import UNet2DConditionModel

    return _build(UNet2DConditionModel, config, checkpoint, seed, "UNet2DConditionModel", UNET_KEYS)


def build_vae(config: dict[str, Any], *, checkpoint=None, seed: int = 0):
    """diffusers' AutoencoderKL (the SDXL VAE): seeded synthetic weights, or ``ssd_1b_vae``."""
    from diffusers import AutoencoderKL

    return _build(AutoencoderKL, config, checkpoint, seed, "AutoencoderKL", VAE_KEYS)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- host arithmetic (numpy: the app runs it without torch) ------------------------------

def host_embedding_features(unet_config, timestep: float, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The UNet graph's two small host inputs for one step: the timestep's sinusoid
    ([1, C0]) and the size conditions' sinusoids side by side ([1, 6 * addition_dim])."""
    cfg = unet_config
    t = sinusoid(np.array([timestep]), cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                 freq_shift=cfg.freq_shift)
    ids_features = sinusoid(ids.reshape(-1), cfg.addition_time_embed_dim, flip_sin_to_cos=True, freq_shift=0)
    return {"timestep_features": t, "time_ids_features": ids_features.reshape(1, -1)}


# --- the graphs -----------------------------------------------------------------------------

class UNetGraph(nn.Module):
    """One UNet call: latent, host embedding features, text conditioning -> noise estimate.
    The same blocks in the same order as ``UNet2DConditionModel.forward`` (no CFG, no
    ControlNet residuals)."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep_features, encoder_hidden_states, text_embeds, time_ids_features):
        u = self.unet
        emb = u.time_embedding(timestep_features.to(sample.dtype))
        emb = emb + u.add_embedding(torch.cat([text_embeds, time_ids_features], dim=-1).to(emb.dtype))
        h = u.conv_in(sample)
        skips = (h,)
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips += res
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                h = u.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h = u.mid_block(h, emb)
        for block in u.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res,
                          encoder_hidden_states=encoder_hidden_states)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)


class VAEDecoderGraph(nn.Module):
    """Latent (already divided by ``scaling_factor`` on the host) -> image in [-1, 1]."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decoder(self.vae.post_quant_conv(latent))
