"""The causal video VAE (``causal_video_vae``, ``AsymmetricCausalVideoVAE``), our own module.

Both halves of the released folder, with its module tree (so its state dict loads as it is):

* ``encoder``: the causal 3-D encoder. Every convolution is a ``CausalConv3d``: zeros padded
  in front in time (``kernel - 1`` frames), a symmetric spatial pad, then ``nn.Conv3d``
  without padding; group norms run per frame; the mid block's attention is diffusers'
  ``Attention`` (one 512-wide head, group norm, residual), run per frame. ``quant_conv``
  (1x1x1) gives the posterior's moments: mean and log-variance, 16 channels each.
* ``decoder``: the TAEHV-style decoder, ``decoder.blocks`` a Sequential of convolutions,
  MemBlocks (each reads its input at the previous frame), nearest upsamples and TGrows (one
  frame into two, by channel chunks), after ``post_quant_conv``. Decoding runs in parallel
  over frames and trims the first ``2**3 - 1`` output frames; the output is in [-1, 1],
  unclamped.

The forward functions here are the released ones, the references the compiler's graphs
are checked against: :meth:`CausalVideoVAE.encode_moments` (the 3-D encoder, any T) and
:meth:`CausalVideoVAE.decode_parallel`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The host's latent scaling (released generation_utils): the first frame's latent is
# (z - shift) * scale; decoding undoes it, with other constants for the later frames.
FIRST_FRAME_SHIFT, FIRST_FRAME_SCALE = 0.1490, 0.5430
VIDEO_SHIFT, VIDEO_SCALE = -0.2343, 0.3031  # decode: z / 0.3031 - 0.2343


@dataclass(frozen=True)
class CausalVAEConfig:
    """The released config.json's keys, and the frame size graphs are built at."""

    encoder_in_channels: int = 3
    encoder_out_channels: int = 16
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    encoder_spatial_down_sample: tuple[bool, ...] = (True, True, True, False)
    encoder_temporal_down_sample: tuple[bool, ...] = (True, True, True, False)
    encoder_norm_num_groups: int = 32
    decoder_num_features: tuple[int, ...] = (256, 128, 64, 64)
    decoder_time_upscale: tuple[bool, ...] = (True, True, True)
    decoder_space_upscale: tuple[bool, ...] = (True, True, True)
    height: int = 320  # the deployed frame size, not a config.json key
    width: int = 512
    latent_frames: int = 7  # a 49-frame video

    def __post_init__(self) -> None:
        blocks = len(self.encoder_block_out_channels)
        for name in ("encoder_layers_per_block", "encoder_spatial_down_sample", "encoder_temporal_down_sample"):
            if len(getattr(self, name)) != blocks:
                raise ValueError(f"causal VAE {name} has {len(getattr(self, name))} entries for {blocks} blocks")
        if any(c % self.encoder_norm_num_groups for c in self.encoder_block_out_channels):
            raise ValueError(f"causal VAE channels {self.encoder_block_out_channels} are not multiples of "
                             f"{self.encoder_norm_num_groups} groups")
        if len(self.decoder_num_features) != 4 or len(self.decoder_time_upscale) != 3:
            raise ValueError("the TAEHV decoder takes 4 feature widths and 3 upscale flags")
        factor = self.spatial_factor
        if self.height % factor or self.width % factor:
            raise ValueError(f"frame {self.height}x{self.width} is not a multiple of the encoder's {factor}x")

    @property
    def spatial_factor(self) -> int:
        return 2 ** sum(self.encoder_spatial_down_sample)

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.spatial_factor, self.width // self.spatial_factor

    @property
    def frames_to_trim(self) -> int:
        return 2 ** sum(self.decoder_time_upscale) - 1


CAUSAL_VAE_CONFIGS = {
    "neodragon": CausalVAEConfig(),
    "tiny": CausalVAEConfig(encoder_layers_per_block=(1, 1, 1, 1), encoder_block_out_channels=(8, 16, 16, 16),
                            encoder_norm_num_groups=4, decoder_num_features=(16, 8, 8, 8), height=32, width=48),
}
# the tiny system's (neodragon_models/system.py): 64x128 frames, 8x16 latents, 4 latent frames
# (25 video frames), what the tiny-system denoiser generates
CAUSAL_VAE_CONFIGS["tiny-system"] = dataclasses.replace(CAUSAL_VAE_CONFIGS["tiny"], height=64, width=128,
                                                        latent_frames=4)


def get_causal_vae_config(name: str) -> CausalVAEConfig:
    if name not in CAUSAL_VAE_CONFIGS:
        raise ValueError(f"unknown causal VAE config {name!r}; known configs: {', '.join(CAUSAL_VAE_CONFIGS)}")
    return CAUSAL_VAE_CONFIGS[name]


# --- encoder -----------------------------------------------------------------------------

class CausalConv3d(nn.Module):
    """Zeros in front in time, a symmetric spatial pad, then an unpadded Conv3d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: tuple[int, int, int] = (1, 1, 1), bias: bool = True) -> None:
        super().__init__()
        k = kernel_size
        self.time_causal_padding = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, k, stride=stride, padding=0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.time_causal_padding))


class CausalGroupNorm(nn.GroupNorm):
    """GroupNorm over each frame alone: [B, C, T, H, W] -> (B T) C H W -> back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        return super().forward(frames).reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class CausalResnetBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = CausalGroupNorm(groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = CausalGroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class CausalDownsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=(1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CausalTemporalDownsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DownEncoderBlockCausal3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, spatial: bool,
                 temporal: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([CausalResnetBlock3D(in_channels if i == 0 else out_channels, out_channels,
                                                          groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([CausalDownsample2x(out_channels)]) if spatial else None
        self.temporal_downsamplers = nn.ModuleList([CausalTemporalDownsample2x(out_channels)]) if temporal else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in (self.downsamplers or ()):
            x = down(x)
        for down in (self.temporal_downsamplers or ()):
            x = down(x)
        return x


class VAEAttention(nn.Module):
    """diffusers' ``Attention`` as the VAE mid block builds it (``_from_deprecated_attn_block``):
    group norm, one head as wide as the channels, output projection, residual; on a
    [N, C, H, W] map, over its H*W positions. (Its softmax upcast to fp32 is a no-op for an
    fp32 model.)"""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.scale = channels ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(n, c, h * w).transpose(1, 2)

        def one_head(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, h * w, 1, c).transpose(1, 2)

        q, k, v = one_head(self.to_q(tokens)), one_head(self.to_k(tokens)), one_head(self.to_v(tokens))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(n, h * w, c)
        out = self.to_out[1](self.to_out[0](out))
        return out.transpose(1, 2).reshape(n, c, h, w) + x


class CausalUNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([CausalResnetBlock3D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.attentions[0](frames).reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return self.resnets[1](x)


class CausalVaeEncoder(nn.Module):
    def __init__(self, config: CausalVAEConfig) -> None:
        super().__init__()
        channels, groups = config.encoder_block_out_channels, config.encoder_norm_num_groups
        self.conv_in = CausalConv3d(config.encoder_in_channels, channels[0])
        self.down_blocks = nn.ModuleList([
            DownEncoderBlockCausal3D(channels[max(0, i - 1)], c, config.encoder_layers_per_block[i], groups,
                                     config.encoder_spatial_down_sample[i], config.encoder_temporal_down_sample[i])
            for i, c in enumerate(channels)
        ])
        self.mid_block = CausalUNetMidBlock2D(channels[-1], groups)
        self.conv_norm_out = CausalGroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(channels[-1], 2 * config.encoder_out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(self.mid_block(x))))


# --- decoder -----------------------------------------------------------------------------

def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """``relu(conv(cat[x, past]) + x)``: ``past`` is this block's input at the previous frame."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.skip = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """One frame into ``stride`` frames: a 1x1 conv to ``stride * C`` channels, chunk s of
    which is frame s (a reshape of [N, stride*C, H, W] to [N*stride, C, H, W])."""

    def __init__(self, n: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class TAEHVDecoder(nn.Module):
    def __init__(self, config: CausalVAEConfig) -> None:
        super().__init__()
        n = config.decoder_num_features
        time, space = config.decoder_time_upscale, config.decoder_space_upscale
        layers: list[nn.Module] = [Clamp(), _conv(config.encoder_out_channels, n[0]), nn.ReLU()]
        for i in range(3):
            layers += [MemBlock(n[i]), MemBlock(n[i]), MemBlock(n[i]),
                       nn.Upsample(scale_factor=2 if space[i] else 1), TGrow(n[i], 2 if time[i] else 1),
                       _conv(n[i], n[i + 1], bias=False)]
        layers += [nn.ReLU(), _conv(n[3], config.encoder_in_channels)]
        self.blocks = nn.Sequential(*layers)
        self.frames_to_trim = config.frames_to_trim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[N, C, T, h, w] latents -> [N, 3, T', H, W] frames: every frame in parallel, each
        MemBlock reading its input shifted by one frame (zeros first), first frames trimmed."""
        n, c, t, h, w = z.shape
        x = z.transpose(1, 2).reshape(n * t, c, h, w)
        for block in self.blocks:
            if isinstance(block, MemBlock):
                frames = x.reshape(n, -1, *x.shape[1:])
                past = F.pad(frames, (0, 0, 0, 0, 0, 0, 1, 0))[:, :frames.shape[1]].reshape(x.shape)
                x = block(x, past)
            else:
                x = block(x)
        x = x.reshape(n, -1, *x.shape[1:])[:, self.frames_to_trim:]
        return x.transpose(1, 2)


class CausalVideoVAE(nn.Module):
    """``AsymmetricCausalVideoVAE``: ``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``."""

    def __init__(self, config: CausalVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = CausalVaeEncoder(config)
        self.decoder = TAEHVDecoder(config)
        latent = config.encoder_out_channels
        self.quant_conv = CausalConv3d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = CausalConv3d(latent, latent, 1)

    def encode_moments(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> the posterior's moments [B, 32, T', h, w] (mean, then
        log-variance; the host samples)."""
        return self.quant_conv(self.encoder(video))

    def decode_parallel(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 16, T, h, w] unscaled latents -> [B, 3, 8T - 7, H, W] frames in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))


def sample_latent(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The host's posterior sample: mean + exp(logvar / 2) * noise, logvar clamped to
    [-30, 20], as the released ``DiagonalGaussianDistribution``."""
    mean, logvar = moments.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise


def count_parameters(config: CausalVAEConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in CausalVideoVAE(config).parameters())


ARCHITECTURE_KEYS = ("encoder_block_out_channels", "encoder_layers_per_block", "decoder_num_features")


def causal_vae_config_from_json(raw: dict, source: str, base: CausalVAEConfig) -> CausalVAEConfig:
    """The released ``causal_video_vae/config.json``; the frame size stays ``base``'s."""
    from neodragon_npu.neodragon_models.weights import config_from_json

    if isinstance(raw, dict):  # the deployed size, not a config.json key, checked with the rest
        raw = raw | {"height": base.height, "width": base.width, "latent_frames": base.latent_frames}
    return config_from_json(CausalVAEConfig, raw, source, ARCHITECTURE_KEYS)


def causal_vae_config_to_json(config: CausalVAEConfig) -> dict:
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
           if k not in ("height", "width", "latent_frames")}
    return {"_class_name": "AsymmetricCausalVideoVAE", **out}


def build_causal_vae(config: CausalVAEConfig, *, checkpoint=None, seed: int = 0) -> CausalVideoVAE:
    """The VAE with seeded synthetic weights, or the released ``causal_video_vae`` folder."""
    from neodragon_npu.neodragon_models.weights import (
        load_state_dict_strict, read_config, read_state_dict, synthetic_init_,
    )

    if checkpoint is not None:
        config = causal_vae_config_from_json(read_config(checkpoint), str(checkpoint), config)
        with torch.device("meta"):
            model = CausalVideoVAE(config)
        load_state_dict_strict(model, read_state_dict(checkpoint), str(checkpoint))
    else:
        model = CausalVideoVAE(config)
        synthetic_init_(model, seed)
        _keep_decoder_stable_(model)
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def _keep_decoder_stable_(model: CausalVideoVAE) -> None:
    """Random weights make each MemBlock's residual grow (a ReLU stack with unit-variance
    convolutions); trained decoders keep activations O(1). Scaling each MemBlock's last
    convolution down keeps the synthetic decoder's range near the trained one's."""
    for block in model.decoder.blocks:
        if isinstance(block, MemBlock):
            block.conv[4].weight.mul_(1 / math.sqrt(2))
