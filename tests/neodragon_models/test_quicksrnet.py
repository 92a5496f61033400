"""QuickSRNet: the zoo's layout and parameter counts, upscaler-like synthetic weights,
checkpoint loading."""

import pytest
import torch
import torch.nn.functional as F

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.neodragon_models.quicksrnet import (
    QuickSRNet, build_quicksrnet, count_parameters, get_quicksrnet_config, synthetic_frames,
)
from neodragon_npu.neodragon_models.weights import CheckpointError

# a smooth upscale plus a little detail: this close to bilinear, and no closer than this
NEAR_BILINEAR_DB, NOT_BILINEAR_DB = 30.0, 60.0


class Opaque:
    """A pickled object: weights_only loading refuses it."""


def _psnr(a, b):
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("name, params", [("small", 22_860), ("medium", 50_604), ("large", 414_972)])
def test_parameter_counts_are_the_zoo_models(name, params):
    assert count_parameters(get_quicksrnet_config(name)) == params


@pytest.mark.parametrize("name", ["small", "medium", "large"])
def test_synthetic_weights_upscale_like_a_trained_network(name):
    """Fully convolutional: checked on small frames with the full-size weights."""
    model = build_quicksrnet(get_quicksrnet_config(name), seed=0)
    frames = synthetic_frames(2, 64, 96, seed=5)
    with torch.no_grad():
        out = model(frames)
    bilinear = F.interpolate(frames, scale_factor=2, mode="bilinear", align_corners=False)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # zero padding at the border
    assert out.shape == (2, 3, 128, 192)
    assert NEAR_BILINEAR_DB < _psnr(out[inner], bilinear[inner]) < NOT_BILINEAR_DB
    assert float(((out == 0) | (out == 1)).float().mean()) < 0.05  # not clipped noise


def test_frames_look_like_frames_not_noise():
    frames = synthetic_frames(3, 64, 96, seed=1)
    assert frames.min() >= 0 and frames.max() <= 1
    # neighbouring pixels are close (edges are rare), unlike white noise
    step = (frames[..., 1:] - frames[..., :-1]).abs().median()
    assert step < 0.05 and frames.std() > 0.1
    assert not torch.equal(frames, synthetic_frames(3, 64, 96, seed=2))


def test_zoo_checkpoint_files_load_and_bad_ones_are_named(tmp_path):
    config = get_quicksrnet_config("tiny-anchor")
    source = build_quicksrnet(config, seed=3)
    path = tmp_path / "quicksrnet_tiny_2x_checkpoint_float32.pth.tar"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = build_quicksrnet(config, checkpoint=path)
    frame = synthetic_frames(1, 16, 16, seed=0)
    assert torch.equal(loaded(frame), source(frame))

    state = source.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["conv_last.bias"]
    torch.save({"state_dict": state}, tmp_path / "bad.pth.tar")
    with pytest.raises(CheckpointError, match=r"missing keys: conv_last\.bias.*unexpected keys: extra\.weight"):
        build_quicksrnet(config, checkpoint=tmp_path / "bad.pth.tar")

    torch.save({"state_dict": Opaque()}, tmp_path / "object.pth.tar")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint of tensors"):
        build_quicksrnet(config, checkpoint=tmp_path / "object.pth.tar")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        build_quicksrnet(config, checkpoint=tmp_path / "missing.pth.tar")


def test_pixel_shuffle_exports_as_one_depth_to_space(tmp_path):
    model = QuickSRNet(get_quicksrnet_config("tiny"))
    export_onnx(model, [torch.zeros(1, 3, 16, 24)], tmp_path / "sr.onnx", input_names=["frame"], output_names=["y"])
    ops = [n.op_type for n in onnx_io.load(tmp_path / "sr.onnx").graph]
    assert ops.count("DepthToSpace") == 1 and not {"Reshape", "Transpose"} & set(ops)
