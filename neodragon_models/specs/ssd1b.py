"""SSD-1B's first-frame graphs as two specs, both W8A16 (diffusers' models, built from config).

* ``ssd1b-unet``: one static UNet call at the released latent size (80x128 for 640x1024),
  serving all 4 LCM steps. Inputs: the latent, the host's timestep and size-condition
  sinusoids, the text conditioning; output: the noise estimate. The self- and
  cross-attention are split under the target's score-tile budget. Calibration and check
  samples are the float LCM loop's own UNet inputs, step by step, on prompts the check does
  not share with calibration.
* ``ssd1b-vae-decoder``: the SDXL VAE decoder, latent (unscaled on the host) -> image. Its
  samples are the float loop's final latents.

Both export with the dynamo exporter, which keeps GroupNorm as one GroupNormalization (the
legacy exporter's InstanceNormalization form is wrong in the W8A16 HTP graph:
docs/causal-vae.md). The loop needs the text encoders: our CLIP-L and CLIP-G at the same
config (``neodragon_models/clip.py``), fed synthetic token ids (no tokenizer here).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from neodragon_npu.neodragon_models import ssd1b
from neodragon_npu.neodragon_models.clip import build_clip, get_clip_config, released_shapes
from neodragon_npu.neodragon_models.first_frame import (
    UNET_INPUTS, Conditioning, run_first_frame, text_conditioning, torch_decoder, torch_unet,
)
from neodragon_npu.neodragon_models.spec import (
    REFERENCE_SUFFIX, GraphSpec, LoadOptions, ModelSpec, SamplePlan, Samples, Tracing, fp32_weight_bytes,
    load_description, meta_shapes,
)
from neodragon_npu.neodragon_models.specs.clip import synthetic_token_ids
from neodragon_npu.passes import pipelines
from neodragon_npu.passes.fx.split_attention import SplitAttentionPass

logger = logging.getLogger("neodragon_npu")

CONFIGS = ("tiny", "neodragon")
# prompts whose 4 LCM steps calibrate the UNet (and whose final latents calibrate the decoder)
CALIBRATION_PROMPTS, CHECK_PROMPTS = 4, 2
CALIBRATION_SEED = 1000
UNET_FOLDER, VAE_FOLDER = "ssd_1b_unet", "ssd_1b_vae"
# read when the released folder holds them; otherwise the samples' text conditioning comes
# from synthetic encoders (the manifest's model description says which)
TEXT_FOLDERS = ("ssd_1b_text_encoder", "ssd_1b_text_encoder_2")


class FirstFrameModels:
    """What the float loop runs: the two text encoders, the UNet, and (for the decoder's
    build) the VAE. Each is built on first use, so a step that needs only the VAE (its
    trace and export) does not build a 1.3 B-parameter UNet."""

    def __init__(self, options: LoadOptions, with_vae: bool) -> None:
        self.options = options
        self.config = options.config
        self.with_vae = with_vae

    def _folder(self, name: str):
        return None if self.options.checkpoint is None else self.options.checkpoint / name

    @functools.cached_property
    def unet(self):
        return ssd1b.build_unet(ssd1b.get_unet_config(self.config), seed=self.options.seed,
                                checkpoint=self._folder(UNET_FOLDER))

    @functools.cached_property
    def vae(self):
        if not self.with_vae:
            return None
        return ssd1b.build_vae(ssd1b.get_vae_config(self.config), seed=self.options.seed + 1,
                               checkpoint=self._folder(VAE_FOLDER))

    def _text_encoder(self, variant: str, folder: str, seed: int):
        found = self._folder(folder)
        found = found if found is not None and found.is_dir() else None
        return build_clip(get_clip_config(variant, self.config), seed=self.options.seed + seed, checkpoint=found)

    @functools.cached_property
    def clip_l(self):
        return self._text_encoder("clip-l", TEXT_FOLDERS[0], 2)

    @functools.cached_property
    def clip_g(self):
        return self._text_encoder("clip-g", TEXT_FOLDERS[1], 3)

    @property
    def latent_size(self) -> tuple[int, int]:
        """From the UNet's config alone (the released folder's, or ours)."""
        folder = self._folder(UNET_FOLDER)
        config = (ssd1b.get_unet_config(self.config) if folder is None
                  else ssd1b.released_config(folder, "UNet2DConditionModel", ssd1b.UNET_KEYS))
        size = config.get("sample_size", 128)
        h, w = size if isinstance(size, (tuple, list)) else (size, size)
        return int(h), int(w)

    @property
    def tokens(self) -> int:
        return get_clip_config("clip-l", self.config).max_position_embeddings

    def conditioning(self, prompt_seed: int) -> Conditioning:
        ids_l = synthetic_token_ids(1, self.clip_l.config, prompt_seed)
        ids_g = synthetic_token_ids(1, self.clip_g.config, prompt_seed)
        return text_conditioning(self.clip_l, self.clip_g, ids_l, ids_g)

    def run(self, prompt_seed: int, decode: bool):
        return run_first_frame(torch_unet(self.unet), torch_decoder(self.vae) if decode else None,
                               self.conditioning(prompt_seed), self.unet.config, self.latent_size,
                               self.scaling_factor, seed=prompt_seed)

    @property
    def scaling_factor(self) -> float:
        if self.vae is not None:
            return float(self.vae.config.scaling_factor)
        return float(ssd1b.get_vae_config(self.config)["scaling_factor"])


def _text_source(o: LoadOptions) -> str:
    found = [f for f in TEXT_FOLDERS if o.checkpoint is not None and (o.checkpoint / f).is_dir()]
    return "released " + " and ".join(found) if found else "synthetic CLIP-L and CLIP-G (no released folder given)"


def _load(with_vae: bool):
    return lambda o: FirstFrameModels(o, with_vae)


def _prompt_seeds(plan: SamplePlan, per_prompt: int) -> tuple[list[int], list[int]]:
    # `verify` asks for no calibration (0) and for its check calls by prompt (check_groups)
    n_calib = CALIBRATION_PROMPTS if plan.calibration is None else -(-plan.calibration // per_prompt)
    if plan.check_groups is not None:
        n_check = plan.check_groups
    else:
        n_check = CHECK_PROMPTS if plan.check is None else -(-plan.check // per_prompt)
    return (list(range(CALIBRATION_SEED, CALIBRATION_SEED + n_calib)),
            list(range(plan.first_check_seed, plan.first_check_seed + n_check)))


# --- the UNet --------------------------------------------------------------------------------

SCORE_TILE_ROW_ALIGN = 32


def _fx(model, target, pipeline):
    return [
        *pipelines.cleanup_fx(),
        # self-attention over 2560 tokens (10 heads) and cross-attention over the 77 text
        # tokens, per head and in query chunks whose score tiles fit on chip. Chunks of
        # 32-aligned rows: with 365/366-row tiles the QNN HTP compiler fails to finalize the
        # 2560-token level (QNN_COMMON_ERROR_MEM_ALLOC), with 384/256 it compiles
        # (docs/first-frame.md)
        SplitAttentionPass(tile_budget_bytes=target.score_tile_bytes, align_rows=SCORE_TILE_ROW_ALIGN),
    ]


def _unet_example(model: FirstFrameModels) -> dict[str, torch.Tensor]:
    s = ssd1b.unet_shapes(model.unet, model.tokens)
    h, w = s.latent
    return {"sample": torch.zeros(1, 4, h, w), "timestep_features": torch.zeros(1, s.time_features),
            "encoder_hidden_states": torch.zeros(1, s.tokens, s.text_dim), "text_embeds": torch.zeros(1, s.pooled_dim),
            "time_ids_features": torch.zeros(1, s.time_ids_features)}


def _unet_graphs(config: str) -> list[GraphSpec]:
    return [GraphSpec(
        name="unet", module=lambda model: ssd1b.UNetGraph(model.unet), example_inputs=_unet_example,
        input_names=UNET_INPUTS, output_names=("noise_pred",),
        fx_passes=_fx, onnx_passes=lambda pipeline: pipelines.cleanup_onnx(),
        tracing=Tracing(method="export"),
    )]


def _unet_samples(model: FirstFrameModels, graphs, plan: SamplePlan) -> Samples:
    steps = len(ssd1b.LCM_TIMESTEPS)
    calib_seeds, check_seeds = _prompt_seeds(plan, steps)
    calib, check, labels = [], [], []
    for i, seed in enumerate(calib_seeds + check_seeds):
        logger.info("      prompt %d/%d: float LCM loop (%d UNet calls)", i + 1, len(calib_seeds) + len(check_seeds),
                    steps)
        run = model.run(seed, decode=False)
        if seed in calib_seeds:
            calib += run.unet_inputs
        else:
            for step, (feed, eps) in enumerate(zip(run.unet_inputs, run.noise_preds)):
                check.append({**feed, "noise_pred" + REFERENCE_SUFFIX: eps})
                labels.append(f"prompt {seed} step {step} (t={ssd1b.LCM_TIMESTEPS[step]})")
    n_calib, n_check = plan.calibration or len(calib), plan.check or len(check)
    return Samples(calibration={"unet": calib[:n_calib]}, check={"unet": check[:n_check]},
                   check_labels={"unet": labels[:n_check]})


def _unet_shapes(o: LoadOptions) -> dict[str, tuple[int, ...]]:
    from diffusers import UNet2DConditionModel

    from neodragon_npu.neodragon_models.weights import check_shapes, checkpoint_shapes

    config = ssd1b.get_unet_config(o.config)
    if o.checkpoint is not None:
        config = ssd1b.released_config(o.checkpoint / UNET_FOLDER, "UNet2DConditionModel", ssd1b.UNET_KEYS)
    with torch.device("meta"):
        shapes = meta_shapes(UNet2DConditionModel.from_config(config))
    if o.checkpoint is not None:
        check_shapes(shapes, checkpoint_shapes(o.checkpoint / UNET_FOLDER), str(o.checkpoint / UNET_FOLDER))
        # the text encoders the samples' loop reads when the folder holds them
        for name in TEXT_FOLDERS:
            if (o.checkpoint / name).is_dir():
                released_shapes(o.checkpoint / name)
    return shapes


UNET_SPEC = ModelSpec(
    name="ssd1b-unet",
    summary="SSD-1B UNet (diffusers), one LCM step at 640x1024: one W8A16 graph for all 4 steps",
    configs=lambda: CONFIGS, default_config="tiny",
    load=_load(with_vae=False), graphs=_unet_graphs, samples=_unet_samples,
    precision=lambda options: pipelines.W8A16(
        high_precision=pipelines.UNET_STREAM_WEIGHTS + pipelines.UNET_ATTENTION_WEIGHTS),
    describe=lambda model, o: load_description(o, params=ssd1b.count_parameters(model.unet),
                                               samples="the float LCM loop's UNet inputs, synthetic token ids",
                                               text_encoders=_text_source(o)),
    weight_bytes=lambda model: fp32_weight_bytes(model.unet),
    # the full-size graph is a partitioned (family) build: its gate is the target too
    min_sqnr_db=38.0, family_min_sqnr_db=38.0,
    checkpoint_help=f"the released folder holding {UNET_FOLDER}/ (config.json + safetensors)",
    reference_note="fp32 diffusers UNet2DConditionModel, one LCM step",
    weight_shapes=_unet_shapes,
    exporter="dynamo",
)


# --- the VAE decoder -----------------------------------------------------------------------

def _decoder_example(model: FirstFrameModels) -> dict[str, torch.Tensor]:
    h, w = model.latent_size
    return {"latent": torch.zeros(1, model.vae.config.latent_channels, h, w)}


def _decoder_graphs(config: str) -> list[GraphSpec]:
    return [GraphSpec(
        name="decoder", module=lambda model: ssd1b.VAEDecoderGraph(model.vae), example_inputs=_decoder_example,
        input_names=("latent",), output_names=("image",),
        # the mid block's attention over every latent position (10240 at 640x1024)
        fx_passes=_fx, onnx_passes=lambda pipeline: pipelines.cleanup_onnx(),
        tracing=Tracing(method="export"),
    )]


def _decoder_samples(model: FirstFrameModels, graphs, plan: SamplePlan) -> Samples:
    calib_seeds, check_seeds = _prompt_seeds(plan, 1)
    calib, check = [], []
    for i, seed in enumerate(calib_seeds + check_seeds):
        logger.info("      prompt %d/%d: float LCM loop and decode", i + 1, len(calib_seeds) + len(check_seeds))
        run = model.run(seed, decode=seed in check_seeds)
        latent = run.latent / model.scaling_factor
        if seed in calib_seeds:
            calib.append({"latent": latent})
        else:
            check.append({"latent": latent, "image" + REFERENCE_SUFFIX: run.image})
    return Samples(calibration={"decoder": calib}, check={"decoder": check},
                   check_labels={"decoder": [f"prompt {s}" for s in check_seeds]})


def _vae_shapes(o: LoadOptions) -> dict[str, tuple[int, ...]]:
    from diffusers import AutoencoderKL

    from neodragon_npu.neodragon_models.weights import check_shapes, checkpoint_shapes

    _unet_shapes(o)  # checked too: the loop that makes the decoder's samples runs the UNet
    config = ssd1b.get_vae_config(o.config)
    if o.checkpoint is not None:
        config = ssd1b.released_config(o.checkpoint / VAE_FOLDER, "AutoencoderKL", ssd1b.VAE_KEYS)
    with torch.device("meta"):
        vae = meta_shapes(AutoencoderKL.from_config(config), "vae.")
    if o.checkpoint is not None:
        check_shapes({k[4:]: v for k, v in vae.items()}, checkpoint_shapes(o.checkpoint / VAE_FOLDER),
                     str(o.checkpoint / VAE_FOLDER))
    return {k: v for k, v in vae.items() if k.startswith(("vae.decoder.", "vae.post_quant_conv."))}


VAE_DECODER_SPEC = ModelSpec(
    name="ssd1b-vae-decoder",
    summary="SDXL VAE decoder (diffusers AutoencoderKL) at 640x1024: one W8A16 graph",
    configs=lambda: CONFIGS, default_config="tiny",
    load=_load(with_vae=True), graphs=_decoder_graphs, samples=_decoder_samples,
    precision=lambda options: pipelines.W8A16(),
    describe=lambda model, o: load_description(o, params=ssd1b.count_parameters(model.vae.decoder)
                                               + ssd1b.count_parameters(model.vae.post_quant_conv),
                                               samples="the float LCM loop's final latents, synthetic token ids",
                                               text_encoders=_text_source(o)),
    weight_bytes=lambda model: fp32_weight_bytes(model.vae.decoder) + fp32_weight_bytes(model.vae.post_quant_conv),
    min_sqnr_db=35.0, family_min_sqnr_db=35.0,
    checkpoint_help=f"the released folder holding {UNET_FOLDER}/ and {VAE_FOLDER}/",
    reference_note="fp32 diffusers AutoencoderKL decoder",
    weight_shapes=_vae_shapes,
    exporter="dynamo",
)
