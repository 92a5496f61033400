"""CLIP-L and CLIP-G text encoders with projection (``text_encoder``, ``text_encoder_2``),
our own module.

The released folders hold transformers' ``CLIPTextModelWithProjection``; the module tree here
keeps its names (``text_model.embeddings``, ``text_model.encoder.layers.N``,
``text_model.final_layer_norm``, ``text_projection``), so a released state dict loads as it
is. CLIP's semantics: token plus learned position embeddings, pre-norm layers with a causal
self-attention and a quick-GELU (CLIP-L) or erf-GELU (CLIP-G) MLP, a final layer norm, the
row of the end-of-text token pooled and projected. Neodragon's video pipeline takes the
projected pooled embedding of both; SSD-1B's first frame also takes the penultimate layer's
hidden states (``hidden_states[-2]``), so the module returns both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

ACTIVATIONS = ("quick_gelu", "gelu")
MASK_MIN = float(torch.finfo(torch.float32).min)
LEGACY_EOS_ID = 2  # configs with this eos_token_id pool at argmax(input_ids), as transformers does


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters, named as in transformers' ``CLIPTextConfig`` (config.json)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = LEGACY_EOS_ID
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {self.hidden_act!r}: expected one of {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP hidden_size {self.hidden_size} is not a multiple of "
                             f"{self.num_attention_heads} heads")

    @property
    def end_token(self) -> int:
        """The id of the end-of-text token (the largest id for legacy configs)."""
        return self.vocab_size - 1 if self.eos_token_id == LEGACY_EOS_ID else self.eos_token_id


TINY = dict(vocab_size=128, max_position_embeddings=16, bos_token_id=126, num_hidden_layers=3)
CLIP_CONFIGS = {
    "clip-l": {
        # SD3 / SDXL text_encoder: OpenAI CLIP ViT-L/14's text tower
        "neodragon": CLIPTextConfig(),
        "tiny": CLIPTextConfig(hidden_size=32, intermediate_size=64, projection_dim=24, num_attention_heads=4,
                               **TINY),
    },
    "clip-g": {
        # SD3 / SDXL text_encoder_2: OpenCLIP ViT-bigG/14's text tower
        "neodragon": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                                    num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu"),
        "tiny": CLIPTextConfig(hidden_size=40, intermediate_size=80, projection_dim=40, num_attention_heads=5,
                               hidden_act="gelu", **TINY),
    },
}


def get_clip_config(variant: str, name: str) -> CLIPTextConfig:
    configs = CLIP_CONFIGS[variant]
    if name not in configs:
        raise ValueError(f"unknown {variant} config {name!r}; known configs: {', '.join(configs)}")
    return configs[name]


def count_parameters(config: CLIPTextConfig) -> int:
    d, ff = config.hidden_size, config.intermediate_size
    layer = 4 * (d * d + d) + 2 * d * ff + ff + d + 4 * d
    return (config.vocab_size + config.max_position_embeddings) * d + config.num_hidden_layers * layer + 2 * d \
        + d * config.projection_dim


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.scale = (d // self.heads) ** -0.5
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x) * self.scale), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + mask, dim=-1)
        return self.out_proj(torch.matmul(weights, v).transpose(1, 2).reshape(b, length, d))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.quick = config.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else nn.functional.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def causal_mask(length: int) -> torch.Tensor:
    """[1, 1, L, L]: 0 where a query sees a key (key <= query), float32's minimum elsewhere
    (as transformers; a pass makes it finite)."""
    return torch.full((length, length), MASK_MIN).triu(1)[None, None]


def end_onehot(input_ids: np.ndarray, config: CLIPTextConfig) -> np.ndarray:
    """What the host feeds the graph for pooling: [B, L] float32, 1 at each row's end token
    (:func:`end_positions`' rule, from the tokenizer's ids)."""
    positions = end_positions(torch.from_numpy(np.asarray(input_ids)), config).numpy()
    out = np.zeros(np.shape(input_ids), dtype=np.float32)
    out[np.arange(len(positions)), positions] = 1.0
    return out


def end_positions(input_ids: torch.Tensor, config: CLIPTextConfig) -> torch.Tensor:
    """Where each row's end-of-text token is, as transformers pools: the largest id for
    legacy configs, else the first ``eos_token_id``. [B] int64."""
    if config.eos_token_id == LEGACY_EOS_ID:
        return input_ids.to(torch.int64).argmax(dim=-1)
    return (input_ids.to(torch.int64) == config.eos_token_id).int().argmax(dim=-1)


class CLIPTextModelWithProjection(nn.Module):
    """Token ids [B, L] -> (text_embeds [B, projection_dim], penultimate hidden states [B, L, D]).

    ``text_embeds`` is the final-normed hidden state of each row's end token, projected.
    The end position comes from the ids (transformers' rule) unless ``end_onehot`` [B, L]
    (float, 1 at the end position) is given: the host knows it from its tokenizer, and the
    pooling is then a MatMul, with no ArgMax or data-dependent Gather in the graph."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, end_onehot: torch.Tensor | None = None):
        tm = self.text_model
        x = tm.embeddings(input_ids)
        mask = causal_mask(input_ids.shape[-1]).to(x.dtype)
        layers = tm.encoder.layers
        penultimate = x
        for i, layer in enumerate(layers):
            x = layer(x, mask)
            if i == len(layers) - 2:
                penultimate = x
        last = tm.final_layer_norm(x)
        if end_onehot is None:
            pooled = last[torch.arange(last.shape[0]), end_positions(input_ids, self.config)]
        else:
            pooled = torch.matmul(end_onehot.to(last.dtype).unsqueeze(1), last).squeeze(1)
        return self.text_projection(pooled), penultimate


# The CLIPTextConfig keys that fix the architecture.
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "projection_dim")
# State-dict entries of some transformers versions that are not weights.
IGNORED_KEYS = ("text_model.embeddings.position_ids",)


def clip_config_from_json(raw: dict, source: str) -> CLIPTextConfig:
    """A released ``text_encoder(_2)/config.json`` (transformers' CLIPTextConfig)."""
    from neodragon_npu.neodragon_models.weights import config_from_json

    return config_from_json(CLIPTextConfig, raw, source, ARCHITECTURE_KEYS)


def clip_config_to_json(config: CLIPTextConfig) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
            **dataclasses.asdict(config)}


def _without_projection(raw: dict, state: dict, config: CLIPTextConfig) -> bool:
    return ("text_projection.weight" not in state and raw.get("architectures") == ["CLIPTextModel"]
            and config.projection_dim == config.hidden_size)


def _released_names(raw: dict, entries: dict, config: CLIPTextConfig, identity) -> dict:
    """A released folder's entries (tensors or shapes) under this module's names. transformers
    5 saves a CLIPTextModel's tower without the ``text_model.`` prefix; a plain CLIPTextModel
    (SSD-1B's ssd_1b_text_encoder) has no projection: its pooled output is the final-normed
    end token itself, and ``identity`` (an identity matrix, or its shape) stands in for it."""
    if not any(k.startswith("text_model.") for k in entries):
        entries = {k if k.startswith("text_projection.") else f"text_model.{k}": v for k, v in entries.items()}
    entries = {k: v for k, v in entries.items() if k not in IGNORED_KEYS}
    if _without_projection(raw, entries, config):
        entries["text_projection.weight"] = identity
    return entries


def released_shapes(folder) -> dict[str, tuple[int, ...]]:
    """The module's weight shapes for a released folder, checked against the folder's
    safetensors headers (no tensor is read): a mismatch is one :class:`CheckpointError`."""
    from neodragon_npu.neodragon_models.spec import meta_shapes
    from neodragon_npu.neodragon_models.weights import check_shapes, checkpoint_shapes, read_config

    raw = read_config(folder)
    config = clip_config_from_json(raw, str(folder))
    with torch.device("meta"):
        shapes = meta_shapes(CLIPTextModelWithProjection(config))
    found = _released_names(raw, checkpoint_shapes(folder), config, (config.hidden_size, config.hidden_size))
    check_shapes(shapes, found, str(folder))
    return shapes


def build_clip(config: CLIPTextConfig, *, checkpoint=None, seed: int = 0) -> CLIPTextModelWithProjection:
    """CLIP text encoder with seeded synthetic weights, or a released ``text_encoder`` /
    ``text_encoder_2`` folder (its config.json sets the architecture)."""
    from neodragon_npu.neodragon_models.weights import (
        load_state_dict_strict, read_config, read_state_dict, synthetic_init_,
    )

    if checkpoint is not None:
        raw = read_config(checkpoint)
        config = clip_config_from_json(raw, str(checkpoint))
        state = _released_names(raw, read_state_dict(checkpoint), config, torch.eye(config.hidden_size))
        with torch.device("meta"):
            model = CLIPTextModelWithProjection(config)
        load_state_dict_strict(model, state, str(checkpoint))
    else:
        model = CLIPTextModelWithProjection(config)
        synthetic_init_(model, seed)
    model.requires_grad_(False)
    return model.eval()
