import collections

import pytest
import torch
from torch import nn

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.fx.collapse_singleton_time import CollapseSingletonTimePass
from neodragon_npu.passes.fx.specialize_shapes import SpecializeShapesPass
from tests.helpers import check_fx_pass


class CausalConv(nn.Module):
    """Zeros in front in time, then an unpadded Conv3d (any causal video model's conv)."""

    def __init__(self, cin, cout, k=3, stride=(1, 1, 1), front=None):
        super().__init__()
        back = 0 if front is None else k - 1 - front  # a centred conv with front = k // 2
        self.pads = (k // 2, k // 2, k // 2, k // 2, k - 1 if front is None else front, back)
        self.conv = nn.Conv3d(cin, cout, k, stride=stride)

    def forward(self, x):
        return self.conv(nn.functional.pad(x, self.pads))


class PerFrameNorm(nn.GroupNorm):
    def forward(self, x):
        b, c, t, h, w = x.shape
        y = super().forward(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class Video(nn.Module):
    """conv -> per-frame norm -> SiLU -> spatial and temporal stride-2 convs -> residual,
    run on one frame given as an image."""

    def __init__(self, front=None, leak=False):
        super().__init__()
        torch.manual_seed(0)
        self.a = CausalConv(3, 8, front=front)
        self.norm = PerFrameNorm(2, 8)
        self.space = CausalConv(8, 8, stride=(1, 2, 2))
        self.time = CausalConv(8, 8, stride=(2, 1, 1))
        self.out = CausalConv(8, 4, k=1)
        self.leak = leak

    def forward(self, image):
        x = self.a(image.unsqueeze(2))
        x = nn.functional.silu(self.norm(x))
        y = self.time(self.space(x))
        y = y + 0.5 * y
        if self.leak:
            y = y.mean(dim=2, keepdim=True)  # a reduction over time: not collapsed
        return self.out(y).squeeze(2)


def _traced(module):
    gm = fx_utils.trace(module, [torch.zeros(1, 3, 8, 12)])
    SpecializeShapesPass()(gm)
    return gm


def test_a_one_frame_video_graph_becomes_4d_exactly():
    gm = _traced(Video())
    x = torch.randn(1, 3, 8, 12)
    check = check_fx_pass(CollapseSingletonTimePass(), gm, [x])
    assert check.modified and check.max_abs_error < 1e-5
    assert check.ops_after["Conv2d"] == 4 and "Conv3d" not in check.ops_after
    assert not {"pad", "permute"} & set(check.ops_after)
    fx_utils.propagate_shapes(gm)
    assert all(len(n.meta["tensor_meta"].shape) <= 4 for n in gm.graph.nodes if "tensor_meta" in n.meta)
    # the last temporal tap, and the spatial stride and padding, of the Conv3d
    video = Video()
    conv = dict(gm.named_modules())["space_conv_2d"]
    assert torch.equal(conv.weight, video.space.conv.weight[:, :, 2]) and conv.stride == (2, 2)
    assert conv.padding == (1, 1)
    again = CollapseSingletonTimePass()(gm)
    assert not again.modified and "nothing to do" in again.notes[0]


def test_a_conv_whose_data_is_not_at_the_last_tap_uses_its_own_tap():
    gm = _traced(Video(front=1))  # one zero frame each side of a 3-tap conv: tap 1 sees the frame
    check = check_fx_pass(CollapseSingletonTimePass(), gm, [torch.randn(1, 3, 8, 12)])
    assert check.modified and check.max_abs_error < 1e-5


def test_a_graph_with_an_op_it_cannot_collapse_is_left_whole():
    gm = _traced(Video(leak=True))
    before = collections.Counter(fx_utils.op_counts(gm))
    result = CollapseSingletonTimePass()(gm)
    assert not result.modified
    assert any("mean" in note and "cannot collapse" in note for note in result.notes)
    assert collections.Counter(fx_utils.op_counts(gm)) == before


def test_the_causal_vae_encoder_collapses_to_conv2d_on_one_frame():
    """The released encoder's structure (tiny): every causal Conv3d, the temporal
    downsamplers, per-frame norms and the mid-block attention, against the 3-D forward."""
    from neodragon_npu.neodragon_models.causal_vae import build_causal_vae, get_causal_vae_config

    vae = build_causal_vae(get_causal_vae_config("tiny"), seed=1)

    class FirstFrame(nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, image):
            return self.vae.encode_moments(image.unsqueeze(2)).squeeze(2)

    image = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        reference = vae.encode_moments(image.unsqueeze(2))[:, :, 0]
    gm = fx_utils.trace(FirstFrame(), [torch.zeros(1, 3, 32, 48)])
    SpecializeShapesPass()(gm)
    result = CollapseSingletonTimePass()(gm)
    assert result.modified and "Conv3d" not in fx_utils.op_counts(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(image), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 2, 8, 12)])
def test_two_frames_are_not_a_singleton(shape):
    module = CausalConv(3, 4)
    gm = fx_utils.trace(module, [torch.zeros(shape)])
    assert not CollapseSingletonTimePass()(gm).modified
