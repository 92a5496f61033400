"""The causal video VAE as two specs.

* ``vae-encoder``: one W8A16 graph, the first frame (an image) -> the posterior's moments,
  every causal Conv3d collapsed to a Conv2d. The host samples the posterior and scales it
  ((z - 0.1490) * 0.5430); the graph stops at the moments. Calibration and check inputs
  are image-like synthetic frames in [-1, 1].
* ``vae-decoder``: the streaming decoder's two graphs (:mod:`..streaming_decoder`), ``first``
  (latent frame 0 -> its one kept frame and the MemBlock state) and ``next`` (a latent
  frame and the state -> 8 frames and the state), W8A16. Samples are latent videos shaped
  like the denoiser's output (smooth, unit variance once scaled; unscaled by the host as
  the released decoder expects), decoded frame by frame by the float streaming decoder, so
  each call is calibrated on the state the previous call really hands on.
"""

from __future__ import annotations

import torch
from torch import nn

from neodragon_npu.neodragon_models.causal_vae import (
    CAUSAL_VAE_CONFIGS, FIRST_FRAME_SCALE, FIRST_FRAME_SHIFT, VIDEO_SCALE, VIDEO_SHIFT, CausalVideoVAE,
    build_causal_vae, count_parameters, get_causal_vae_config,
)
from neodragon_npu.neodragon_models.streaming_decoder import StreamingDecoder, state_names, state_shapes
from neodragon_npu.neodragon_models.quicksrnet import synthetic_frames
from neodragon_npu.neodragon_models.spec import (
    GraphSpec, LoadOptions, ModelSpec, SamplePlan, Samples, Tracing, fp32_weight_bytes, load_description,
    meta_shapes,
)
from neodragon_npu.neodragon_models.weights import check_shapes, checkpoint_shapes
from neodragon_npu.passes import pipelines
from neodragon_npu.passes.fx.collapse_singleton_time import CollapseSingletonTimePass
from neodragon_npu.passes.fx.decompose_group_norm import DecomposeGroupNormPass
from neodragon_npu.passes.fx.split_attention import SplitAttentionPass

CALIBRATION, CHECK = 16, 4  # images
# The encoder keeps every weight at 16 bit (16-bit activations as in any W8A16 graph). Its
# int8 noise is spread over every convolution, so no pattern chosen by hand closes it; and
# with the noisiest weights at 16 bit (``--high-precision none --auto-16bit 42``), the HTP
# simulator stayed under the 40 dB target, because the HTP computes each 16-bit op a little
# less exactly than aimet simulates it and that comes on top of the int8 rest's noise
# (docs/causal-vae.md). The encoder runs once per video and its weights are small.
ENCODER_16_BIT_WEIGHTS = ("*",)


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
    # GroupNorm stays one op, exported (by the dynamo exporter) as GroupNormalization, which
    # the QNN EP takes quantized; "decomposed-norms" writes it as per-channel means and 1x1
    # group averages instead, for a runtime without it (more op-output bytes). The legacy
    # exporter's Reshape -> InstanceNormalization -> Reshape is wrong in the W8A16 HTP graph
    # (docs/causal-vae.md).
    norms = [DecomposeGroupNormPass()] if pipeline == "decomposed-norms" else []
    return [
        *pipelines.cleanup_fx(),
        # one frame: every causal Conv3d is a Conv2d with its last tap, no 5-D tensor (facts 4.11)
        CollapseSingletonTimePass(),
        *norms,
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


def _describe(samples: str):
    return lambda model, o: load_description(o, params=count_parameters(model.config), samples=samples)


# Both specs load the one released folder (encoder and decoder together).
_VAE = dict(
    configs=lambda: tuple(CAUSAL_VAE_CONFIGS), default_config="tiny",
    load=lambda o: build_causal_vae(get_causal_vae_config(o.config), checkpoint=o.checkpoint, seed=o.seed),
    precision=lambda options: pipelines.W8A16(),
    checkpoint_help="the released causal_video_vae folder (config.json + safetensors)",
    weight_shapes=_weight_shapes,
)

VAE_ENCODER_SPEC = ModelSpec(
    name="vae-encoder",
    summary="causal video VAE encoder on the first frame (T=1, collapsed to 2-D): one graph, 16-bit weights "
            "and activations",
    graphs=_graphs, samples=_samples,
    describe=_describe("image-like synthetic frames in [-1, 1]"),
    weight_bytes=lambda model: fp32_weight_bytes(model.encoder) + fp32_weight_bytes(model.quant_conv),
    min_sqnr_db=40.0,
    reference_note="fp32 PyTorch causal 3-D encoder run on one frame",
    pipelines=("optimized", "decomposed-norms"),
    exporter="dynamo",
    **(_VAE | {"precision": lambda options: pipelines.W8A16(high_precision=ENCODER_16_BIT_WEIGHTS)}),
)


# --- the streaming decoder ---------------------------------------------------------------

DECODER_CALIBRATION_VIDEOS, DECODER_CHECK_VIDEOS = 3, 1


def synthetic_latents(videos: int, config, seed: int) -> torch.Tensor:
    """[videos, C, T, h, w] latents as the decoder receives them: smooth unit-variance fields
    (the denoiser's output statistics), then the host's unscaling (frame 0 with the
    first-frame constants, the others with the video constants)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = config.latent_size
    c, t = config.encoder_out_channels, config.latent_frames
    coarse = torch.randn(videos * t, c, max(1, h // 4), max(1, w // 4), generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    fields = smooth / smooth.std() * 0.8 + 0.6 * torch.randn(videos * t, c, h, w, generator=gen)
    z = fields.reshape(videos, t, c, h, w).transpose(1, 2)
    z[:, :, 0] = z[:, :, 0] / FIRST_FRAME_SCALE + FIRST_FRAME_SHIFT
    z[:, :, 1:] = z[:, :, 1:] / VIDEO_SCALE + VIDEO_SHIFT
    return z


def _decoder_outputs(vae: CausalVideoVAE) -> tuple[str, ...]:
    return ("frames", *[f"{n}_out" for n in state_names(vae)])


def _decoder_graph(variant: str, vae: CausalVideoVAE) -> GraphSpec:
    """``vae`` (on the meta device) gives the state's names; the example inputs come from
    the loaded model."""
    def example(model):
        h, w = model.config.latent_size
        inputs = {"latent": torch.zeros(1, model.config.encoder_out_channels, h, w)}
        if variant == "next":
            inputs |= {n: torch.zeros(s) for n, s in zip(state_names(model), state_shapes(model))}
        return inputs

    return GraphSpec(
        name=variant, module=lambda model: StreamingDecoder(model, variant), example_inputs=example,
        input_names=("latent", *(state_names(vae) if variant == "next" else ())),
        output_names=_decoder_outputs(vae),
        fx_passes=lambda model, target, pipeline: pipelines.cleanup_fx(),
        onnx_passes=lambda pipeline: pipelines.cleanup_onnx(),
        tracing=Tracing(method="export"),
    )


def _decoder_graphs(config: str) -> list[GraphSpec]:
    with torch.device("meta"):
        vae = CausalVideoVAE(get_causal_vae_config(config))
    return [_decoder_graph("first", vae), _decoder_graph("next", vae)]


def _decoder_samples(vae: CausalVideoVAE, graphs, plan: SamplePlan) -> Samples:
    """Per graph: each latent frame's feed with the state the float streaming decoder hands
    on; check feeds hold every output's fp32 reference."""
    names = state_names(vae)
    outputs = _decoder_outputs(vae)

    def feeds(videos: int, seed: int, references: bool) -> dict[str, list[dict]]:
        out = {"first": [], "next": []}
        first, step = StreamingDecoder(vae, "first"), StreamingDecoder(vae, "next")
        for z in synthetic_latents(videos, vae.config, seed):
            z = z[None]
            with torch.no_grad():
                result = first(z[:, :, 0])
            feed = {"latent": z[:, :, 0].numpy()}
            if references:
                feed |= {f"{o}_fp32": r.numpy() for o, r in zip(outputs, result)}
            out["first"].append(feed)
            state = result[1:]
            for t in range(1, z.shape[2]):
                feed = {"latent": z[:, :, t].numpy()} | {n: s.numpy() for n, s in zip(names, state)}
                with torch.no_grad():
                    result = step(z[:, :, t], *state)
                if references:
                    feed |= {f"{o}_fp32": r.numpy() for o, r in zip(outputs, result)}
                out["next"].append(feed)
                state = result[1:]
        return out

    calib = feeds(plan.calibration or DECODER_CALIBRATION_VIDEOS, 1000, False)
    check = feeds(plan.check or DECODER_CHECK_VIDEOS, plan.first_check_seed, True)
    labels = {"first": [f"video {i} frame 0" for i in range(len(check["first"]))],
              "next": [f"video {i // (vae.config.latent_frames - 1)} frame {1 + i % (vae.config.latent_frames - 1)}"
                       for i in range(len(check["next"]))]}
    wanted = {g.name for g in graphs}
    return Samples(calibration={k: v for k, v in calib.items() if k in wanted},
                   check={k: v for k, v in check.items() if k in wanted},
                   check_labels={k: v for k, v in labels.items() if k in wanted})


VAE_DECODER_SPEC = ModelSpec(
    name="vae-decoder",
    summary="causal video VAE's streaming decoder, one latent frame per call, state as graph I/O: W8A16",
    graphs=_decoder_graphs, samples=_decoder_samples,
    describe=_describe("synthetic latent videos, decoded frame by frame in fp32"),
    weight_bytes=lambda model: fp32_weight_bytes(model.decoder) + fp32_weight_bytes(model.post_quant_conv),
    min_sqnr_db=35.0,
    default_graph="next",
    reference_note="fp32 PyTorch streaming decoder (equal to the parallel decoder)",
    **_VAE,
)
