"""Building the denoiser (transformer + ContextAdapter) and its static stage graphs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.configs import ContextAdapterConfig, DenoiserConfig, MMDiTConfig
from neodragon_npu.neodragon_models.context_adapter import ContextAdapter
from neodragon_npu.neodragon_models.mmdit import PyramidMMDiT
from neodragon_npu.neodragon_models.weights import (
    CheckpointError,
    check_shapes,
    checkpoint_shapes,
    config_from_json,
    load_state_dict_strict,
    read_config,
    read_state_dict,
    save_checkpoint,
    synthetic_init_,
)

TRANSFORMER_FOLDER = "diffusion_transformer_320p"
ADAPTER_FOLDER = "context_adapter"

# Released config.json values our implementation supports; anything else is refused.
_REQUIRED_MMDIT_OPTIONS = {
    "qk_norm": "rms_norm",
    "pos_embed_type": "sincos",
    "temp_pos_embed_type": "rope",
    "use_temporal_causal": True,
    "add_temp_pos_embed": True,
    "interp_condition_pos": True,
}


def mmdit_config_to_json(config: MMDiTConfig) -> dict:
    out = {"_class_name": "PyramidMMDiT"}
    out.update(dataclasses.asdict(config))
    out.update(_REQUIRED_MMDIT_OPTIONS)
    return out


# The keys of a released config.json that fix the architecture: a file without them (an
# empty one, another model's) is refused rather than read as the full-size defaults.
MMDIT_ARCHITECTURE_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size",
                           "pooled_projection_dim", "caption_projection_dim", "joint_attention_dim")
ADAPTER_ARCHITECTURE_KEYS = ("input_dims", "output_dims", "layer_depths", "skips")


def mmdit_config_from_json(raw: dict, source: str) -> MMDiTConfig:
    config = config_from_json(MMDiTConfig, raw, source, MMDIT_ARCHITECTURE_KEYS)
    for key, value in _REQUIRED_MMDIT_OPTIONS.items():
        if key in raw and raw[key] != value:
            raise CheckpointError(f"{source}: {key}={raw[key]!r} is not supported (need {value!r})")
    if config.caption_projection_dim != config.inner_dim:
        raise CheckpointError(
            f"{source}: caption_projection_dim {config.caption_projection_dim} != "
            f"heads*head_dim {config.inner_dim}"
        )
    return config


def adapter_config_to_json(config: ContextAdapterConfig) -> dict:
    out = {"_class_name": "ContextAdapter"}
    out.update({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()})
    return out


def adapter_config_from_json(raw: dict, source: str = "context_adapter") -> ContextAdapterConfig:
    config = config_from_json(ContextAdapterConfig, raw, source, ADAPTER_ARCHITECTURE_KEYS)
    if len(config.layer_depths) != len(config.skips):
        raise CheckpointError(f"{source}: {len(config.layer_depths)} layer_depths but {len(config.skips)} skips")
    return config


def with_checkpoint_config(config: DenoiserConfig, checkpoint: str | Path | None) -> DenoiserConfig:
    """``config`` with the architecture the released folders under ``checkpoint`` declare
    (the pyramid geometry is kept); ``config`` itself without a checkpoint."""
    if checkpoint is None:
        return config
    root = Path(checkpoint)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    t_dir, a_dir = root / TRANSFORMER_FOLDER, root / ADAPTER_FOLDER
    return config.replace(mmdit=mmdit_config_from_json(read_config(t_dir), str(t_dir)),
                          context_adapter=adapter_config_from_json(read_config(a_dir), str(a_dir)))


def denoiser_modules(config: DenoiserConfig, rope_layout: str = "interleaved", attention: str = "sdpa"):
    """The transformer and ContextAdapter of ``config`` on the meta device (no memory)."""
    with torch.device("meta"):
        return (PyramidMMDiT(config.mmdit, rope_layout=rope_layout, attention=attention),
                ContextAdapter(config.context_adapter))


def check_denoiser_checkpoint(config: DenoiserConfig, checkpoint: str | Path | None) -> DenoiserConfig:
    """Read what decides the model before any work: the folders' config.json files and their
    safetensors headers, against the modules they describe (no tensor is read). Returns the
    config the build will use."""
    config = with_checkpoint_config(config, checkpoint)
    if checkpoint is not None:
        transformer, adapter = denoiser_modules(config)
        root = Path(checkpoint)
        for module, folder in ((transformer, root / TRANSFORMER_FOLDER), (adapter, root / ADAPTER_FOLDER)):
            check_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()},
                         checkpoint_shapes(folder), str(folder))
    return config


@dataclass
class Denoiser:
    """The two PyTorch modules that go into every stage graph, plus the config they match."""

    config: DenoiserConfig
    transformer: PyramidMMDiT
    context_adapter: ContextAdapter

    def stage_module(self, stage: int) -> "DenoiserStage":
        return DenoiserStage(self, stage)


def build_denoiser(
    config: DenoiserConfig,
    *,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    rope_layout: str = "interleaved",
    attention: str = "sdpa",
) -> Denoiser:
    """Synthetic (seeded) weights, or the released folders under ``checkpoint``.

    ``checkpoint`` is the root holding ``diffusion_transformer_320p/`` and
    ``context_adapter/``; their config.json files override the architecture of ``config``
    (the pyramid geometry is kept).
    """
    states = None
    config = with_checkpoint_config(config, checkpoint)
    if checkpoint is not None:
        t_dir, a_dir = Path(checkpoint) / TRANSFORMER_FOLDER, Path(checkpoint) / ADAPTER_FOLDER
        states = (read_state_dict(t_dir), read_state_dict(a_dir), str(t_dir), str(a_dir))
    transformer, adapter = denoiser_modules(config, rope_layout, attention)
    if states is not None:
        t_state, a_state, t_src, a_src = states
        load_state_dict_strict(transformer, t_state, t_src)
        load_state_dict_strict(adapter, a_state, a_src)
    else:
        transformer.to_empty(device="cpu")
        adapter.to_empty(device="cpu")
        synthetic_init_(transformer, seed)
        synthetic_init_(adapter, seed + 1)
        transformer.pos_embed.reset_pos_embed()
        spread_adaln_ranges_(transformer, config, seed)
    transformer.requires_grad_(False)
    adapter.requires_grad_(False)
    return Denoiser(config, transformer.eval(), adapter.eval())


# Largest |value| of each adaLN-Zero chunk in the released model: roughly 1.7 to 18.4
# (shared/neodragon-facts.md 4.7). Order: shift_msa, scale_msa, gate_msa, shift_mlp,
# scale_mlp, gate_mlp. Synthetic weights reproduce the spread, since it is what makes one
# shared encoding for the six chunks fail.
ADALN_CHUNK_RANGES = (1.7, 18.4, 3.0, 2.4, 11.0, 5.2)


@torch.no_grad()
def spread_adaln_ranges_(transformer: PyramidMMDiT, config: DenoiserConfig, seed: int) -> None:
    """Rescale each adaLN-Zero chunk's rows so the chunk reaches ADALN_CHUNK_RANGES on the
    conditioning vectors of the pipeline (the stage timesteps x a few pooled prompts)."""
    from neodragon_npu.neodragon_models.pyramid import PyramidSchedule, timestep_projection

    mm = config.mmdit
    gen = torch.Generator().manual_seed(seed + 7)
    timesteps = torch.tensor(PyramidSchedule.from_geometry(config.geometry).timesteps).repeat(4)
    pooled = torch.randn(len(timesteps), mm.pooled_projection_dim, generator=gen)
    temb = transformer.time_text_embed(timestep_projection(timesteps, mm.timestep_proj_dim), pooled)
    dim = mm.inner_dim
    for block in transformer.transformer_blocks:
        for norm in (block.norm1, block.norm1_context):
            if norm.linear.out_features != 6 * dim:
                continue  # the context-pre-only block's 2-chunk norm
            emb = norm.linear(norm.silu(temb))  # [N, 6D]
            for c, target in enumerate(ADALN_CHUNK_RANGES):
                rows = slice(c * dim, (c + 1) * dim)
                peak = float(emb[:, rows].abs().max())
                if peak > 0:
                    norm.linear.weight[rows] *= target / peak
                    norm.linear.bias[rows] *= target / peak


def save_denoiser(denoiser: Denoiser, root: str | Path) -> Path:
    """Write the two released-style folders under ``root``."""
    root = Path(root)
    save_checkpoint(
        denoiser.transformer, root / TRANSFORMER_FOLDER, mmdit_config_to_json(denoiser.config.mmdit)
    )
    save_checkpoint(
        denoiser.context_adapter,
        root / ADAPTER_FOLDER,
        adapter_config_to_json(denoiser.config.context_adapter),
    )
    return root


def count_parameters(config: MMDiTConfig | ContextAdapterConfig) -> int:
    """Parameter count from shapes only (meta device: nothing is allocated)."""
    with torch.device("meta"):
        module = PyramidMMDiT(config) if isinstance(config, MMDiTConfig) else ContextAdapter(config)
    return sum(p.numel() for p in module.parameters())


class DenoiserStage(nn.Module):
    """One pyramid stage at its static envelope: ContextAdapter + transformer.

    Inputs are :data:`neodragon_models.pyramid.STAGE_INPUT_NAMES`; the output is the
    predicted flow of the frame being generated, ``[1, n_out, p*p*C]``.
    """

    def __init__(self, denoiser: Denoiser, stage: int) -> None:
        super().__init__()
        geometry, patch = denoiser.config.geometry, denoiser.config.mmdit.patch_size
        geometry.stage_latent_hw(stage)  # validates the stage
        self.stage = stage
        self.context_adapter = denoiser.context_adapter
        self.transformer = denoiser.transformer
        self.output_tokens = pyramid.output_token_count(geometry, patch, stage)

    def forward(
        self,
        latent_tokens: torch.Tensor,
        pos_embed: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep_proj: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        attn_bias: torch.Tensor,
    ) -> torch.Tensor:
        context = self.context_adapter(prompt_embeds)  # [1, L, D]
        return self.transformer(
            latent_tokens,
            pos_embed,
            context,
            pooled_projections,
            timestep_proj,
            rope_cos,
            rope_sin,
            attn_bias,
            output_tokens=self.output_tokens,
        )
