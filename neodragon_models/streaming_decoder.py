"""The TAEHV-style video decoder one latent frame at a time, its memory as explicit inputs
and outputs: what the host runs frame by frame behind the denoiser.

The released decoder runs every frame at once: it folds time into the batch, each MemBlock
reads its input shifted by one frame, and each TGrow reshapes channels into frames. On an
NHWC NPU those moves are transposes of the largest tensors (facts 4.10). Here each latent
frame is one call. The sub-frames a TGrow makes are separate tensors, each the output of its
own 1x1 convolution (chunk s of the TGrow weight). A MemBlock reads the previous sub-frame's
input, or for the first sub-frame its state from the previous call. Each call returns the
MemBlocks' inputs at its last sub-frame as the next call's state. The arithmetic is the
parallel decoder's, so the frames are equal (a test holds all 49 to fp32 tolerance).

Two variants, one graph each:

* ``first``: latent frame 0, no state in (the released decoder pads zeros): its MemBlocks
  take only the ``x`` half of their first convolution's weights. It outputs the one frame
  the reference keeps (the other ``2**3 - 1`` sub-frames are trimmed, and the export drops
  their last layers as dead code), and the state.
* ``next``: a later latent frame and the state in; the ``2**3`` frames and the state out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neodragon_npu.neodragon_models.causal_vae import CausalVideoVAE, MemBlock, TGrow

VARIANTS = ("first", "next")


def state_shapes(vae: CausalVideoVAE) -> list[tuple[int, ...]]:
    """The shape of each MemBlock's state (its input at one sub-frame), in block order."""
    cfg = vae.config
    h, w = cfg.latent_size
    shapes = []
    for block in vae.decoder.blocks:
        if isinstance(block, nn.Upsample):
            h, w = int(h * block.scale_factor), int(w * block.scale_factor)
        if isinstance(block, MemBlock):
            shapes.append((1, block.conv[0].in_channels // 2, h, w))
    return shapes


def state_names(vae: CausalVideoVAE) -> list[str]:
    return [f"memory_{i}" for i in range(len(state_shapes(vae)))]


class StreamingDecoder(nn.Module):
    """One latent frame [1, C, h, w] (unscaled, as ``decode_parallel`` takes it) and, for
    ``next``, the MemBlock states -> frames [F, 3, H, W] and the new states."""

    def __init__(self, vae: CausalVideoVAE, variant: str) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"streaming decoder variant {variant!r}: expected one of {', '.join(VARIANTS)}")
        self.first = variant == "first"
        self.blocks = vae.decoder.blocks
        self.trim = vae.config.frames_to_trim
        post = vae.post_quant_conv.conv  # a 1x1x1 Conv3d: a 1x1 Conv2d on one frame
        self.post_quant_conv = nn.Conv2d(post.in_channels, post.out_channels, 1)
        with torch.no_grad():
            self.post_quant_conv.weight.copy_(post.weight[:, :, 0])
            self.post_quant_conv.bias.copy_(post.bias)
        self.post_quant_conv.requires_grad_(False)

    @staticmethod
    def _memblock(block: MemBlock, x: torch.Tensor, past: torch.Tensor | None) -> torch.Tensor:
        if past is not None:
            return block(x, past)
        first = block.conv[0]  # past = 0: only the weights reading x contribute
        n = x.shape[1]
        h = F.conv2d(x, first.weight[:, :n], first.bias, padding=first.padding)
        for layer in list(block.conv)[1:]:
            h = layer(h)
        return block.act(h + block.skip(x))

    @staticmethod
    def _tgrow(block: TGrow, x: torch.Tensor) -> list[torch.Tensor]:
        c = x.shape[1]
        weight = block.conv.weight
        return [F.conv2d(x, weight[s * c:(s + 1) * c]) for s in range(block.stride)]

    def forward(self, latent: torch.Tensor, *states: torch.Tensor):
        frames = [self.post_quant_conv(latent)]  # the sub-frames, in time order
        states_in = iter(states)
        states_out = []
        for block in self.blocks:
            if isinstance(block, MemBlock):
                past = None if self.first else next(states_in)
                outs = []
                for x in frames:
                    outs.append(self._memblock(block, x, past))
                    past = x
                states_out.append(past)
                frames = outs
            elif isinstance(block, TGrow):
                frames = [y for x in frames for y in self._tgrow(block, x)]
            else:
                frames = [block(x) for x in frames]
        if self.first:
            frames = frames[self.trim:]
        return (torch.cat(frames, 0), *states_out)


def decode_streaming(vae: CausalVideoVAE, latents: torch.Tensor) -> torch.Tensor:
    """[1, C, T, h, w] -> [1, 3, 8T - 7, H, W] by calling the two variants frame by frame,
    the state handed on: what the host does with the compiled graphs."""
    first, step = StreamingDecoder(vae, "first"), StreamingDecoder(vae, "next")
    out, *state = first(latents[:, :, 0])
    frames = [out]
    for t in range(1, latents.shape[2]):
        out, *state = step(latents[:, :, t], *state)
        frames.append(out)
    return torch.cat(frames, 0).transpose(0, 1)[None]
