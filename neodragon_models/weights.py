"""Seeded synthetic weights and released-checkpoint folders.

Released weights come as diffusers-style folders: ``config.json`` plus
``diffusion_pytorch_model.safetensors`` (or a sharded ``*.safetensors.index.json``).
Models are constructed on the meta device and then either filled with seeded synthetic
values or assigned the checkpoint's tensors (memory-mapped), so a 1.5 B-parameter model
is never initialised twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import nn

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, corrupt, or does not match the model."""


def synthetic_init_(model: nn.Module, seed: int, *, scales: dict[str, float] | None = None) -> None:
    """Fill every parameter with seeded values that give O(1) activations.

    Weights ~ N(0, 1/fan_in) (times ``scales[name]`` for parameters whose name ends with a
    key of ``scales``), biases ~ N(0, 0.02^2), 1-D norm weights ~ 1 + N(0, 0.1^2). Parameters
    are visited in name order, so the result depends only on the seed and the architecture.
    """
    gen = torch.Generator().manual_seed(seed)
    scales = scales or {}
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                values.mul_(0.02)
            elif param.dim() == 1:
                values.mul_(0.1).add_(1.0)
            else:
                fan_in = math.prod(param.shape[1:])
                values.mul_(1.0 / math.sqrt(fan_in))
            for suffix, scale in scales.items():
                if name.endswith(suffix):
                    values.mul_(scale)
            param.copy_(values)


def _weight_files(folder: Path) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index[0]}: not a valid safetensors index ({exc})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors file found")
    return files


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: missing {CONFIG_NAME}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _each_tensor(folder: str | Path, read: Callable[[Any, str], Any]) -> dict[str, Any]:
    """``read(file, key)`` for every tensor of a checkpoint folder's safetensors files; a
    missing or corrupt file is one clear error."""
    out: dict[str, Any] = {}
    for path in _weight_files(Path(folder)):
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the index but missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    out[key] = read(f, key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from None
    return out


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder as float32, memory-mapped where possible."""
    return _each_tensor(folder, lambda f, key: f.get_tensor(key).float())


def _summarise(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_shapes(expected: dict[str, tuple], got: dict[str, tuple], source: str) -> None:
    """Any key missing, unexpected or mis-shaped in ``got`` (name -> shape) is one clear error."""
    missing = expected.keys() - got.keys()
    unexpected = got.keys() - expected.keys()
    misshaped = [f"{k} {list(got[k])} != {list(expected[k])}"
                 for k in expected.keys() & got.keys() if tuple(got[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_summarise(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Assign ``state`` to a (meta or real) model; any key mismatch is one clear error."""
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                 {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict(state, strict=True, assign=True)


def checkpoint_shapes(folder: str | Path) -> dict[str, tuple]:
    """The name and shape of every tensor of a checkpoint folder, from the safetensors
    headers alone (no tensor is read): a mismatched or truncated folder is found before any
    work."""
    return _each_tensor(folder, lambda f, key: tuple(f.get_slice(key).get_shape()))


def config_from_json(cls, raw: Any, source: str, required: Iterable[str]):
    """A config dataclass from a released ``config.json``: the ``required`` keys (those that
    fix the architecture) must be there with values of the field's type; other fields take
    their defaults and keys the dataclass does not know are ignored (training options)."""
    import dataclasses

    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}/{CONFIG_NAME}: expected a JSON object, got {type(raw).__name__}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise CheckpointError(f"{source}/{CONFIG_NAME} lacks {', '.join(missing)}: not the config of this model")
    values = {}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in defaults:
            continue
        default = defaults[key]
        if isinstance(value, list) and isinstance(default, tuple):
            value = tuple(value)
        kind = type(default)
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise CheckpointError(f"{source}/{CONFIG_NAME}: {key} = {value!r} should be a {kind.__name__}")
        values[key] = value
    try:
        return cls(**values)
    except ValueError as exc:  # the dataclass's own checks (an unknown activation, a bad shape)
        raise CheckpointError(f"{source}/{CONFIG_NAME}: {exc}") from None


def save_checkpoint(model: nn.Module, folder: str | Path, config: dict[str, Any]) -> Path:
    """Write a diffusers-style folder (config.json + one safetensors file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder
