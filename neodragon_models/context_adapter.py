"""The ContextAdapter (a "SkipMLP") mapping DT5 tokens to the denoiser width.

Layer i > 0 sees ``concat(input, previous)``; parameter names follow the released
``network_layers.{i}.{j}`` Sequential layout so the ``context_adapter`` folder loads.
"""

from __future__ import annotations

import torch
from torch import nn

from neodragon_npu.neodragon_models.configs import ContextAdapterConfig

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "linear": nn.Identity}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(
            f"unsupported ContextAdapter activation {name!r}; expected one of {sorted(_ACTIVATIONS)}"
        ) from None


class ContextAdapter(nn.Module):
    def __init__(self, config: ContextAdapterConfig) -> None:
        super().__init__()
        if len(config.layer_depths) != len(config.skips):
            raise ValueError("ContextAdapter: layer_depths and skips must have the same length")
        self.config = config
        act, identity = config.activation_fn, "linear"
        layers, in_features = [], config.input_dims
        for skip, depth in zip(config.skips, config.layer_depths):
            layers.append(
                nn.Sequential(
                    _activation(act if config.pre_activation else identity),
                    nn.Linear(in_features, depth, bias=config.use_biases),
                    _activation(identity if config.pre_activation else act),
                )
            )
            in_features = depth + config.input_dims if skip else depth
        layers.append(
            nn.Sequential(
                nn.Linear(in_features, config.output_dims, bias=config.use_biases),
                _activation(config.out_activation_fn),
            )
        )
        self.network_layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network_layers[0](x)
        for skip, layer in zip(self.config.skips, self.network_layers[1:]):
            y = layer(torch.cat([x, y], dim=-1) if skip else y)
        return y
