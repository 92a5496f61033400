"""QuickSRNet 2x: the super-resolution network that takes Neodragon's 320x512 frames to 640x1024.

Module and parameter names follow aimet-model-zoo's ``QuickSRNetBase`` (its released
checkpoints load by name)::

    cnn = [conv3x3(3 -> C), Hardtanh(0, 1), (conv3x3(C -> C), Hardtanh(0, 1)) x N]
    conv_last = conv3x3(C -> 3 * s^2)
    Large: x = anchor(input) + conv_last(cnn(input))   (anchor: 1x1 conv = nearest upsample in depth)
    y = PixelShuffle(s)(Hardtanh(0, 1)(x))

Input and output are RGB in [0, 1], NCHW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neodragon_npu.neodragon_models.weights import CheckpointError, load_state_dict_strict

SCALE = 2


@dataclass(frozen=True)
class QuickSRNetConfig:
    name: str
    channels: int
    intermediate_layers: int
    ito_connection: bool  # the input-to-output anchor (Large)
    height: int = 320  # input frame
    width: int = 512


QUICKSRNET_CONFIGS = {
    c.name: c
    for c in (
        QuickSRNetConfig("small", 32, 2, False),
        QuickSRNetConfig("medium", 32, 5, False),
        QuickSRNetConfig("large", 64, 11, True),
        # narrow and on small frames, for tests: the two layouts (with and without the anchor)
        QuickSRNetConfig("tiny", 16, 1, False, height=48, width=64),
        QuickSRNetConfig("tiny-anchor", 16, 2, True, height=48, width=64),
        # the tiny system's frames (neodragon_models/system.py)
        QuickSRNetConfig("tiny-system", 16, 1, False, height=64, width=128),
    )
}


def get_quicksrnet_config(name: str) -> QuickSRNetConfig:
    try:
        return QUICKSRNET_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown quicksrnet config {name!r}; known: {', '.join(QUICKSRNET_CONFIGS)}") from None


class AnchorOp(nn.Module):
    """A 1x1 convolution that repeats each input channel s^2 times: after PixelShuffle(s),
    a nearest-neighbour upsample of the input."""

    def __init__(self, scale: int, in_channels: int = 3) -> None:
        super().__init__()
        self.net = nn.Conv2d(in_channels, in_channels * scale**2, kernel_size=1)
        weight = torch.zeros(in_channels * scale**2, in_channels, 1, 1)
        for c in range(in_channels):
            weight[c * scale**2:(c + 1) * scale**2, c] = 1.0
        with torch.no_grad():
            self.net.weight.copy_(weight)
            self.net.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AddOp(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class QuickSRNet(nn.Module):
    def __init__(self, config: QuickSRNetConfig, scale: int = SCALE) -> None:
        super().__init__()
        self.config, self.scale = config, scale
        c = config.channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.Hardtanh(0.0, 1.0)]
        for _ in range(config.intermediate_layers):
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.Hardtanh(0.0, 1.0)]
        self.cnn = nn.Sequential(*layers)
        self.conv_last = nn.Conv2d(c, 3 * scale**2, 3, padding=1)
        if config.ito_connection:
            self.add_op = AddOp()
            self.anchor = AnchorOp(scale)
        self.clip_output = nn.Hardtanh(0.0, 1.0)
        self.depth_to_space = nn.PixelShuffle(scale)

    def forward(self, frame: torch.Tensor) -> torch.Tensor:  # [1, 3, H, W] -> [1, 3, sH, sW]
        x = self.conv_last(self.cnn(frame))
        if self.config.ito_connection:
            x = self.add_op(self.anchor(frame), x)
        return self.depth_to_space(self.clip_output(x))


def count_parameters(config: QuickSRNetConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in QuickSRNet(config).parameters())


# A 2x bilinear upsample (align_corners=False) as a 3x3 conv per output sub-pixel: sub-pixel
# (dy, dx) of output pixel (2i + dy, 2j + dx) mixes input rows i-1, i (dy = 0) or i, i+1
# (dy = 1) with weights 1/4, 3/4 (and 3/4, 1/4), columns alike.
_TAPS = {0: (0.25, 0.75, 0.0), 1: (0.0, 0.75, 0.25)}
# The detail weights of ``conv_last`` relative to PyTorch's default initialisation scale
# (1/sqrt(fan_in)): weights of a trained network's magnitude, adding a sharpening detail of
# a few percent of the signal.
DETAIL_GAIN = 2.0


@torch.no_grad()
def synthetic_init_(model: QuickSRNet, seed: int) -> None:
    """Seeded weights that behave like a trained 2x upscaler: the output is a bilinear
    upsample of the input plus a small detail term, not clipped noise.

    Channels 0-2 of every feature map carry the input frame itself (identity taps, as the
    zoo's own initialisation puts on every channel); the others are texture detectors:
    random filters with no response to flat regions, so they are active on edges and
    texture only, as a trained network's features are. ``conv_last`` turns the frame
    channels into the bilinear taps of each output sub-pixel (less the anchor's nearest
    upsample, for Large) and adds the texture channels with weights of a trained layer's
    magnitude."""
    gen = torch.Generator().manual_seed(seed)
    for conv in (m for m in model.cnn if isinstance(m, nn.Conv2d)):
        w = torch.randn(conv.weight.shape, generator=gen)
        w -= w.mean(dim=(2, 3), keepdim=True)
        conv.weight.copy_(w / math.sqrt(conv.in_channels * 9))
        conv.bias.zero_()
        conv.weight[:3] = 0.0
        for ch in range(3):
            conv.weight[ch, ch, 1, 1] = 1.0
    last, s = model.conv_last, model.scale
    detail = torch.randn(last.weight.shape, generator=gen) * DETAIL_GAIN / math.sqrt(max(1, (last.in_channels - 3) * 9))
    detail[:, :3] = 0.0
    last.weight.copy_(detail)
    last.bias.zero_()
    for ch in range(3):
        for dy in range(s):
            for dx in range(s):
                out = ch * s * s + dy * s + dx
                last.weight[out, ch] += torch.outer(torch.tensor(_TAPS[dy % 2]), torch.tensor(_TAPS[dx % 2]))
                if model.config.ito_connection:
                    last.weight[out, ch, 1, 1] -= 1.0  # the anchor adds the nearest sample


def build_quicksrnet(config: QuickSRNetConfig, *, checkpoint: str | Path | None = None, seed: int = 0) -> QuickSRNet:
    """Synthetic (seeded) weights, or aimet-model-zoo's released checkpoint file."""
    model = QuickSRNet(config)
    if checkpoint is None:
        synthetic_init_(model, seed)
    else:
        load_state_dict_strict(model, read_checkpoint(checkpoint), str(checkpoint))
    model.requires_grad_(False)
    return model.eval()


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a zoo ``.pth.tar`` (``{"state_dict": ...}`` or a bare state dict),
    read with ``weights_only=True``: tensors and containers only, never arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that is not plain tensors, or not a checkpoint at all
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint of tensors ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def synthetic_frames(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Frames that look like video frames, not noise: a smooth colour gradient, a few flat
    shapes with hard edges, fine texture and a little blur. ``[count, 3, H, W]`` in [0, 1]."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((count, 3, height, width), dtype=np.float32)
    for n in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height)
        img = rng.uniform(0.2, 0.6, (3, 1, 1)) + rng.uniform(0.1, 0.3, (3, 1, 1)) * ramp[None]
        for _ in range(rng.integers(3, 8)):
            colour = rng.uniform(0, 1, (3, 1, 1))
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            if rng.random() < 0.5:
                r = rng.uniform(0.05, 0.25) * min(height, width)
                mask = (ys - cy) ** 2 + (xs - cx) ** 2 < r * r
            else:
                hh, ww = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
                mask = (abs(ys - cy) < hh) & (abs(xs - cx) < ww)
            img = np.where(mask[None], colour, img)
        fy, fx = rng.uniform(0.2, 0.6, 2)
        stripes = 0.05 * np.sin(2 * np.pi * (fy * ys + fx * xs) / 4.0)
        img = img + stripes[None] + rng.normal(0, 0.02, img.shape)
        frames[n] = img
    blurred = F.avg_pool2d(torch.from_numpy(frames), 3, stride=1, padding=1, count_include_pad=False)
    return (0.5 * torch.from_numpy(frames) + 0.5 * blurred).clamp(0.0, 1.0)
