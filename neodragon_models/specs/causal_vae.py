"""The causal video VAE's first-frame encoder as a spec: one W8A16 graph, the first frame
(an image) -> the posterior's moments, with every causal Conv3d collapsed to a Conv2d.

The host samples the posterior and scales it ((z - 0.1490) * 0.5430); the graph stops at
the moments. Calibration and check inputs are image-like synthetic frames in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from neodragon_npu.neodragon_models.causal_vae import (
    CAUSAL_VAE_CONFIGS, CausalVideoVAE, build_causal_vae, count_parameters, get_causal_vae_config,
)
from neodragon_npu.neodragon_models.quicksrnet import synthetic_frames
from neodragon_npu.neodragon_models.spec import (
    GraphSpec, LoadOptions, ModelSpec, SamplePlan, Samples, fp32_weight_bytes, load_description, meta_shapes,
)
from neodragon_npu.neodragon_models.weights import check_shapes, checkpoint_shapes
from neodragon_npu.passes import pipelines
from neodragon_npu.passes.fx.collapse_singleton_time import CollapseSingletonTimePass
from neodragon_npu.passes.fx.decompose_group_norm import DecomposeGroupNormPass
from neodragon_npu.passes.fx.split_attention import SplitAttentionPass

CALIBRATION, CHECK = 16, 4  # images


class FirstFrameEncoder(nn.Module):
    """[1, 3, H, W] in [-1, 1] -> moments [1, 32, H/8, W/8]: the 3-D encoder on one frame."""

    def __init__(self, vae: CausalVideoVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode_moments(image.unsqueeze(2)).squeeze(2)


def images(count: int, config, seed: int) -> torch.Tensor:
    return synthetic_frames(count, config.height, config.width, seed) * 2 - 1


def _fx(model, target, pipeline):
    return [
        *pipelines.cleanup_fx(),
        # one frame: every causal Conv3d is a Conv2d with its last tap, no 5-D tensor (facts 4.11)
        CollapseSingletonTimePass(),
        # GroupNorm as per-channel means and 1x1 group averages: the exported
        # Reshape -> InstanceNormalization -> Reshape is wrong in the W8A16 HTP graph
        DecomposeGroupNormPass(),
        # the mid block's attention over every latent position, in tiles that fit on chip
        SplitAttentionPass(tile_budget_bytes=target.score_tile_bytes),
    ]


def _graphs(config: str) -> list[GraphSpec]:
    return [GraphSpec(
        name="first_frame", module=FirstFrameEncoder,
        example_inputs=lambda model: {"image": images(1, model.config, 0)},
        input_names=("image",), output_names=("moments",),
        fx_passes=_fx, onnx_passes=lambda pipeline: pipelines.cleanup_onnx(),
    )]


def _samples(model: CausalVideoVAE, graphs, plan: SamplePlan) -> Samples:
    calib = images(plan.calibration or CALIBRATION, model.config, 1000)
    check = images(plan.check or CHECK, model.config, plan.first_check_seed)
    encoder = FirstFrameEncoder(model)
    with torch.no_grad():
        refs = encoder(check).numpy()
    return Samples(
        calibration={"first_frame": [{"image": x[None].numpy()} for x in calib]},
        check={"first_frame": [{"image": x[None].numpy(), "moments_fp32": r[None]} for x, r in zip(check, refs)]},
        check_labels={"first_frame": [f"image {i}" for i in range(len(check))]},
    )


def _weight_shapes(opts: LoadOptions) -> dict[str, tuple[int, ...]]:
    config = get_causal_vae_config(opts.config)
    if opts.checkpoint is not None:
        from neodragon_npu.neodragon_models.causal_vae import causal_vae_config_from_json
        from neodragon_npu.neodragon_models.weights import read_config

        config = causal_vae_config_from_json(read_config(opts.checkpoint), str(opts.checkpoint), config)
    with torch.device("meta"):
        shapes = meta_shapes(CausalVideoVAE(config))
    if opts.checkpoint is not None:
        check_shapes(shapes, checkpoint_shapes(opts.checkpoint), str(opts.checkpoint))
    return shapes


VAE_ENCODER_SPEC = ModelSpec(
    name="vae-encoder",
    summary="causal video VAE encoder on the first frame (T=1, collapsed to 2-D): one W8A16 graph",
    configs=lambda: tuple(CAUSAL_VAE_CONFIGS), default_config="tiny",
    load=lambda o: build_causal_vae(get_causal_vae_config(o.config), checkpoint=o.checkpoint, seed=o.seed),
    graphs=_graphs, samples=_samples,
    precision=lambda options: pipelines.W8A16(),
    describe=lambda model, o: load_description(o, params=count_parameters(model.config),
                                               samples="image-like synthetic frames in [-1, 1]"),
    weight_bytes=lambda model: fp32_weight_bytes(model.encoder) + fp32_weight_bytes(model.quant_conv),
    min_sqnr_db=40.0,
    checkpoint_help="the released causal_video_vae folder (config.json + safetensors)",
    reference_note="fp32 PyTorch causal 3-D encoder run on one frame",
    weight_shapes=_weight_shapes,
)
