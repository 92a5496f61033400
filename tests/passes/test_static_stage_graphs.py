"""Proof that the optimized envelope graphs are exact for every (unit, stage) call.

Neodragon's geometry (40x64 latents, 7 frames, 128 text tokens: 408 / 648 / 1728 attention
tokens) with a narrow transformer: each stage graph goes through every denoiser FX pass,
the ONNX export and the ONNX passes, and for each of the 18 (unit, stage) calls its output
on the real tokens must equal the unpadded reference (the released clip-list forward:
Conv2d patches, 6-D RoPE, boolean mask) at fp32 precision.
"""

import numpy as np
import pytest
import torch

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.verify import verify_onnx
from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.configs import ContextAdapterConfig, DenoiserConfig, MMDiTConfig, PyramidGeometry
from neodragon_npu.neodragon_models.denoiser import build_denoiser
from neodragon_npu.neodragon_models.reference import reference_forward
from neodragon_npu.neodragon_models.sampling import synthetic_prompt
from neodragon_npu.passes.base import PassManager
from neodragon_npu.passes.pipelines import denoiser_fx, denoiser_onnx
from tests.helpers import run_onnx

NARROW = DenoiserConfig(
    name="neodragon-geometry-narrow",
    mmdit=MMDiTConfig(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        pooled_projection_dim=24,
        caption_projection_dim=32,
        joint_attention_dim=40,
        timestep_proj_dim=32,
    ),
    context_adapter=ContextAdapterConfig(input_dims=40, output_dims=32, layer_depths=(48,), skips=(True,)),
    geometry=PyramidGeometry(),
)
# Score tiles of at most 64 KB at 16 bit: forces chunking even at this width.
TILE_BUDGET = 64 * 1024


@pytest.fixture(scope="module")
def denoiser():
    return build_denoiser(NARROW, seed=0)


def _graph(denoiser, stage, tmp_path):
    geo = denoiser.config.geometry
    prompt = synthetic_prompt(denoiser, 5)
    unit = pyramid.envelope_unit(geo)
    clips = [torch.zeros(1, 16, c.num_frames, c.height, c.width) for c in pyramid.clip_layout(geo, unit, stage)]
    example = pyramid.stage_inputs(
        denoiser.config, denoiser.transformer.pos_embed.pos_embed, unit, stage, clips,
        prompt.embeds, prompt.mask, prompt.pooled,
    )
    example_list = [example[n] for n in pyramid.STAGE_INPUT_NAMES]
    gm = fx_utils.trace(denoiser.stage_module(stage), example_list)  # a copy: passes edit it
    segments = pyramid.attention_segments(geo, 2, stage)
    PassManager(denoiser_fx(tile_budget_bytes=TILE_BUDGET, mask_segments=segments))(gm)
    path = tmp_path / f"stage{stage}.onnx"
    export_onnx(gm, example_list, path, input_names=pyramid.STAGE_INPUT_NAMES, output_names=["out"])
    model = onnx_io.load(path)
    PassManager(denoiser_onnx())(model)
    verify_onnx(model, static_shapes=True, max_rank=4)
    return model, segments


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_envelope_graph_equals_the_unpadded_reference_for_every_unit(denoiser, stage, tmp_path):
    model, segments = _graph(denoiser, stage, tmp_path)
    geo = denoiser.config.geometry
    ops = {n.op_type for n in model.graph}
    assert not ops & {"Shape", "Gather", "ConstantOfShape", "Where", "Expand"}
    timestep = pyramid.PyramidSchedule.from_geometry(geo).timesteps[stage]
    table = denoiser.transformer.pos_embed.pos_embed
    for unit in geo.denoised_units:
        prompt = synthetic_prompt(denoiser, 100 + unit)  # a different text length each time
        gen = torch.Generator().manual_seed(unit)
        clips = [
            torch.randn(1, 16, c.num_frames, c.height, c.width, generator=gen)
            for c in pyramid.clip_layout(geo, unit, stage)
        ]
        ref = reference_forward(denoiser, clips, prompt.embeds, prompt.mask, prompt.pooled, timestep)
        feeds = pyramid.stage_inputs(
            denoiser.config, table, unit, stage, clips, prompt.embeds, prompt.mask, prompt.pooled
        )
        out = run_onnx(model, {k: v.numpy() for k, v in feeds.items()})[0]
        h, w = clips[-1].shape[-2:]
        got = pyramid.unpatchify(torch.from_numpy(out), 2, 16, 1, h, w)
        err = float((got - ref).abs().max())
        assert err < 1e-4 * max(1.0, float(ref.abs().max())), (unit, stage, err)


def test_stage2_segments_match_the_frame_layout():
    segments = pyramid.attention_segments(PyramidGeometry(), 2, 2)
    assert segments == [
        (0, 128, 1088, 0),  # text sees text and the first frame (at the latest at 448:1088)
        (128, 168, 168, 167),
        (168, 208, 208, 207),
        (208, 248, 248, 247),
        (248, 288, 288, 287),  # four stage-0 history frames
        (288, 448, 448, 447),  # the stage-1 history frame
        (448, 1088, 1088, 1087),  # the stage-2 history frame
        (1088, 1728, 1728, 1727),  # the frame being generated sees everything
    ]
