import pytest
import torch
import torch.nn.functional as F

from neodragon_npu.kernels.attention import MASK_VALUE
from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.configs import PyramidGeometry, get_denoiser_config

NEO = get_denoiser_config("neodragon").geometry

# shared/neodragon-facts.md section 2: image tokens per (unit, stage).
FACTS_IMAGE_TOKENS = {
    1: (80, 320, 1280),
    2: (120, 360, 1440),
    3: (160, 400, 1480),
    4: (200, 440, 1520),
    5: (240, 480, 1560),
    6: (280, 520, 1600),
}


@pytest.mark.parametrize("unit", range(1, 7))
@pytest.mark.parametrize("stage", range(3))
def test_token_counts_equal_the_published_table(unit, stage):
    assert pyramid.image_token_count(NEO, 2, unit, stage) == FACTS_IMAGE_TOKENS[unit][stage]


def test_envelopes_are_408_648_1728_attention_tokens():
    assert [pyramid.envelope_attention_tokens(NEO, 2, s) for s in range(3)] == [408, 648, 1728]
    assert [pyramid.output_token_count(NEO, 2, s) for s in range(3)] == [40, 160, 640]


def test_clip_layout_history_gets_coarser_with_age():
    layout = pyramid.clip_layout(NEO, 3, 2)
    assert [(c.level, c.first_frame, c.num_frames) for c in layout] == [(0, 0, 1), (1, 1, 1), (2, 2, 1), (2, 3, 1)]
    assert [(c.level, c.num_frames) for c in pyramid.clip_layout(NEO, 6, 0)] == [(0, 5), (0, 1), (0, 1)]


def test_unit_zero_and_bad_stage_are_refused():
    with pytest.raises(ValueError, match="unit 0 is not denoised"):
        pyramid.clip_layout(NEO, 0, 1)
    with pytest.raises(ValueError, match="stage 3 is out of range"):
        pyramid.clip_layout(NEO, 1, 3)


def test_one_step_schedule_gives_the_published_stage_timesteps():
    sched = pyramid.PyramidSchedule.from_geometry(NEO)
    assert sched.timesteps == (1000.0, 744.0, 386.0)


def test_mask_is_block_causal_and_isolates_padding():
    valid = torch.tensor([[True, True, False]])  # two real text tokens, one padded
    times = torch.tensor([0.0, 0.0, 1.0, 1.0])  # two frames of two tokens
    allowed = pyramid.attention_allowed(valid, times, pad_tokens=2)[0, 0]
    # sequence: t0 t1 tpad | p p | f0 f0 f1 f1
    text, pad_text, pads, f0, f1 = [0, 1], 2, [3, 4], [5, 6], [7, 8]
    assert allowed[f1][:, f0 + f1].all()  # later frame sees earlier and same frame
    assert not allowed[f0][:, f1].any()  # earlier frame does not see the future
    assert allowed[text][:, text + f0].all() and not allowed[text][:, f1].any()  # text is at frame 0
    assert not allowed[:, pad_text][text + f0 + f1].any()  # padded text is invisible
    assert not allowed[:, pads][text + f0 + f1].any()  # envelope padding is invisible
    assert allowed[pads][:, pads].all()  # padding rows are not fully masked
    bias = pyramid.attention_bias(allowed)
    assert set(bias.unique().tolist()) == {0.0, MASK_VALUE}


def test_patchify_then_linear_equals_the_patch_conv():
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 2, 6, 8, generator=gen)
    conv = torch.nn.Conv2d(4, 7, kernel_size=2, stride=2)
    frames = latent.permute(0, 2, 1, 3, 4).reshape(2, 4, 6, 8)
    ref = conv(frames).flatten(2).transpose(1, 2).reshape(1, 2 * 12, 7)
    out = F.linear(pyramid.patchify(latent, 2), conv.weight.flatten(1), conv.bias)
    assert torch.allclose(out, ref, atol=1e-6)


def test_unpatchify_inverts_the_output_token_order():
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(1, 3, 2, 4, 6, generator=gen)
    b, c, t, h, w = video.shape
    tokens = video.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 4, 6, 1).reshape(b, -1, 12)
    assert torch.equal(pyramid.unpatchify(tokens, 2, c, t, h, w), video)


def test_pos_embed_crop_is_centred_and_resized_for_history():
    table = torch.arange(10 * 10, dtype=torch.float32).reshape(1, 100, 1)
    target = pyramid.Clip(2, 1, 1, 8, 4)  # 4x2 tokens
    crop = pyramid.cropped_pos_embed(table, 10, target, target, 2)
    grid = table.reshape(10, 10)[3:7, 4:6]
    assert torch.equal(crop.flatten(), grid.flatten())
    small = pyramid.cropped_pos_embed(table, 10, pyramid.Clip(1, 0, 2, 4, 2), target, 2)
    assert small.shape == (1, 2 * 2, 1)  # two frames of a 2x1 grid


def test_geometry_rejects_grids_that_cannot_be_halved():
    with pytest.raises(ValueError, match="cannot be halved"):
        PyramidGeometry(latent_height=6, latent_width=8).stage_latent_hw(0)
