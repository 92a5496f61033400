"""Model and pyramid-geometry configurations.

Three denoiser sizes are named:

* ``tiny``      -- a few narrow blocks on small latent grids; runs in milliseconds on a CPU
                   and is what the tests and the demo build use.
* ``neodragon`` -- the released, pruned denoiser: 18 MMDiT blocks, 1536 wide (1.518 B params).
* ``baseline``  -- the unpruned Pyramid-Flow-style teacher: 24 blocks (2.028 B params).

A :class:`DenoiserConfig` bundles the transformer, the ContextAdapter and the pyramid
geometry (latent grid, number of stages and units, text length), because the static stage
graphs depend on all three.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MMDiTConfig:
    """Hyper-parameters of the Pyramid MMDiT (names follow the released ``config.json``)."""

    num_layers: int = 18
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    in_channels: int = 16
    patch_size: int = 2
    pooled_projection_dim: int = 2048
    # Width of the text tokens entering the blocks (the ContextAdapter's output width).
    caption_projection_dim: int = 1536
    # Width of the DT5 tokens entering the ContextAdapter.
    joint_attention_dim: int = 4096
    pos_embed_max_size: int = 192
    # Sets the sin-cos table's base size (sample_size // patch_size), as in SD3.
    sample_size: int = 128
    timestep_proj_dim: int = 256
    ff_mult: int = 4
    rope_theta: float = 10000.0
    qk_norm_eps: float = 1e-5
    norm_eps: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_dim(self) -> int:
        """Values per image token before patch embedding (C * p * p)."""
        return self.in_channels * self.patch_size * self.patch_size


@dataclass(frozen=True)
class ContextAdapterConfig:
    """The SkipMLP that maps DT5 tokens (4096) to the denoiser width (1536)."""

    input_dims: int = 4096
    output_dims: int = 1536
    layer_depths: tuple[int, ...] = (4096, 4096, 4096, 4096)
    skips: tuple[bool, ...] = (True, True, True, True)
    use_biases: bool = True
    pre_activation: bool = False
    activation_fn: str = "gelu"
    out_activation_fn: str = "linear"


@dataclass(frozen=True)
class PyramidGeometry:
    """The generation geometry that fixes every static shape the NPU sees.

    Defaults are Neodragon's 320x512, 49-frame deployment: a 40x64 latent (VAE 8x spatial,
    8x temporal) with 7 latent frames, 3 spatial stages, one latent frame per unit, unit 0
    (the first frame) made by SSD-1B, units 1..6 made by the denoiser.
    """

    latent_height: int = 40
    latent_width: int = 64
    num_latent_frames: int = 7
    num_stages: int = 3
    frames_per_unit: int = 1
    text_len: int = 128
    num_train_timesteps: int = 1000
    gamma: float = 1.0 / 3.0

    @property
    def num_units(self) -> int:
        """Units including unit 0 (the first frame)."""
        return 1 + (self.num_latent_frames - 1) // self.frames_per_unit

    @property
    def denoised_units(self) -> tuple[int, ...]:
        return tuple(range(1, self.num_units))

    def stage_latent_hw(self, stage: int) -> tuple[int, int]:
        """Latent grid (H, W) at a pyramid stage (the last stage is the full latent)."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} is out of range 0..{self.num_stages - 1}")
        div = 2 ** (self.num_stages - 1 - stage)
        if self.latent_height % (div * 2) or self.latent_width % (div * 2):
            raise ValueError(
                f"latent {self.latent_height}x{self.latent_width} cannot be halved "
                f"{self.num_stages - 1} times and still patchify by 2"
            )
        return self.latent_height // div, self.latent_width // div


@dataclass(frozen=True)
class DenoiserConfig:
    name: str
    mmdit: MMDiTConfig = field(default_factory=MMDiTConfig)
    context_adapter: ContextAdapterConfig = field(default_factory=ContextAdapterConfig)
    geometry: PyramidGeometry = field(default_factory=PyramidGeometry)

    def replace(self, **changes: Any) -> "DenoiserConfig":
        return dataclasses.replace(self, **changes)


_TINY = DenoiserConfig(
    name="tiny",
    mmdit=MMDiTConfig(
        num_layers=3,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        pooled_projection_dim=24,
        caption_projection_dim=32,
        joint_attention_dim=40,
        pos_embed_max_size=24,
        sample_size=16,
        timestep_proj_dim=32,
    ),
    context_adapter=ContextAdapterConfig(
        input_dims=40, output_dims=32, layer_depths=(48, 48), skips=(True, True)
    ),
    geometry=PyramidGeometry(latent_height=8, latent_width=16, num_latent_frames=4, text_len=8),
)

# The tiny denoiser of the tiny *system* (``neodragon_models/system.py``): the same blocks,
# sized to read the tiny DT5 (64 wide, 16 tokens) and CLIP-L + CLIP-G pooled (24 + 40) and
# the tiny-system VAE's 16-channel 8x16 latents, so one bundle can chain every graph.
_TINY_SYSTEM = _TINY.replace(
    name="tiny-system",
    mmdit=dataclasses.replace(_TINY.mmdit, in_channels=16, pooled_projection_dim=64, joint_attention_dim=64),
    context_adapter=dataclasses.replace(_TINY.context_adapter, input_dims=64),
    geometry=dataclasses.replace(_TINY.geometry, text_len=16),
)

_NEODRAGON = DenoiserConfig(name="neodragon")

_BASELINE = DenoiserConfig(name="baseline", mmdit=MMDiTConfig(num_layers=24))

# Full width and the real geometry with two blocks: what the HTP simulator can run at each
# stage's real sequence length in minutes (the fidelity benchmark's model).
_TWO_BLOCK = DenoiserConfig(name="neodragon-2block", mmdit=MMDiTConfig(num_layers=2))

DENOISER_CONFIGS: dict[str, DenoiserConfig] = {
    c.name: c for c in (_TINY, _TINY_SYSTEM, _NEODRAGON, _BASELINE, _TWO_BLOCK)
}


def get_denoiser_config(name: str) -> DenoiserConfig:
    try:
        return DENOISER_CONFIGS[name]
    except KeyError:
        known = ", ".join(sorted(DENOISER_CONFIGS))
        raise ValueError(f"unknown denoiser config {name!r}; known configs: {known}") from None
