"""Every model the toolkit builds, by name: the one table the CLI and the engine read."""

from __future__ import annotations

from neodragon_npu.neodragon_models.spec import ModelSpec
from neodragon_npu.neodragon_models.specs.causal_vae import VAE_DECODER_SPEC, VAE_ENCODER_SPEC
from neodragon_npu.neodragon_models.specs.clip import CLIP_G_SPEC, CLIP_L_SPEC
from neodragon_npu.neodragon_models.specs.denoiser import DENOISER
from neodragon_npu.neodragon_models.specs.dt5 import DT5_SPEC
from neodragon_npu.neodragon_models.specs.quicksrnet import QUICKSRNET
from neodragon_npu.neodragon_models.specs.ssd1b import UNET_SPEC, VAE_DECODER_SPEC as SDXL_VAE_DECODER_SPEC

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (DENOISER, QUICKSRNET, DT5_SPEC, CLIP_L_SPEC, CLIP_G_SPEC, VAE_ENCODER_SPEC, VAE_DECODER_SPEC,
                                                    UNET_SPEC, SDXL_VAE_DECODER_SPEC)}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; models: {', '.join(MODELS)}") from None
