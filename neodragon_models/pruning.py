"""MMDiT block removal at the module level, and block selection from importance scores.

Removing block k rewires its residual streams (its inputs flow to block k+1), so the
result is the standard architecture with fewer blocks and contiguous indices -- the
layout a distilled student checkpoint has, so it loads with ``--checkpoint``.

When the context-pre-only last block is removed, the new last block becomes context
pre-only: its text stream after attention (output projection, FFN) fed only the removed
block and is dropped, and its 6-chunk adaLN-Zero for text turns into the 2-chunk
continuous adaptive norm by keeping the (scale, shift) rows of the attention chunks --
exactly what that block computed for attention. The result equals the rewired model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from neodragon_npu.neodragon_models.denoiser import Denoiser
from neodragon_npu.neodragon_models.mmdit import PyramidMMDiT
from neodragon_npu.neodragon_models.weights import load_state_dict_strict

PREFIX = "transformer_blocks."


def check_removal(num_layers: int, remove: list[int]) -> list[int]:
    bad = [i for i in remove if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"cannot remove blocks {bad}: the model has blocks 0..{num_layers - 1}")
    remove = sorted(set(remove))
    if len(remove) >= num_layers:
        raise ValueError(f"removing {len(remove)} of {num_layers} blocks leaves none")
    return remove


def select_blocks(
    ranking: list[int], scores: dict[int, float], *, count: int | None = None, threshold: float | None = None
) -> list[int]:
    """The ``count`` least important blocks, or every block scoring below ``threshold``."""
    if (count is None) == (threshold is None):
        raise ValueError("select blocks by exactly one of count or threshold")
    if count is not None:
        if count < 0 or count >= len(ranking):
            raise ValueError(f"cannot remove {count} of {len(ranking)} blocks")
        return sorted(ranking[:count])
    return sorted(i for i in ranking if scores[i] < threshold)


def load_importance(path: str | Path) -> tuple[list[int], dict[int, float]]:
    """Ranking (least important first) and combined scores from an ``importance`` JSON."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        scores = {int(b["index"]): float(b["combined"]) for b in data["blocks"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not an importance file written by `neodragon-npu importance` ({exc})") from None
    return sorted(scores, key=lambda i: (scores[i], i)), scores


def _to_context_pre_only(state: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """A regular block's parameters as a context-pre-only block's (see module docstring)."""
    out = {}
    for key, value in state.items():
        if key.startswith(("attn.to_add_out.", "ff_context.", "norm2_context.")):
            continue
        if key.startswith("norm1_context.linear."):
            # adaLN-Zero chunks: shift_msa, scale_msa, gate_msa, ...; continuous: scale, shift
            value = torch.cat([value[dim : 2 * dim], value[:dim]], dim=0)
        out[key] = value
    return out


def prune_blocks(denoiser: Denoiser, remove: list[int]) -> tuple[Denoiser, dict[int, int]]:
    """A new Denoiser without the given blocks; returns it and the old -> new index map."""
    old = denoiser.transformer
    n = len(old.transformer_blocks)
    remove = check_removal(n, remove)
    keep = [i for i in range(n) if i not in remove]
    mapping = {old_i: new_i for new_i, old_i in enumerate(keep)}
    cfg = replace(denoiser.config.mmdit, num_layers=len(keep))

    state = {}
    for key, value in old.state_dict().items():
        if not key.startswith(PREFIX):
            state[key] = value
    for old_i, new_i in mapping.items():
        block_state = {
            k[len(f"{PREFIX}{old_i}.") :]: v
            for k, v in old.state_dict().items()
            if k.startswith(f"{PREFIX}{old_i}.")
        }
        if new_i == len(keep) - 1 and not old.transformer_blocks[old_i].context_pre_only:
            block_state = _to_context_pre_only(block_state, cfg.inner_dim)
        state.update({f"{PREFIX}{new_i}.{k}": v.clone() for k, v in block_state.items()})

    device = next(old.parameters()).device
    with torch.device("meta"):
        new = PyramidMMDiT(cfg, rope_layout=old.rope_layout, attention=old.transformer_blocks[0].attn.kernel)
    load_state_dict_strict(new, state, "pruned transformer")
    if device.type != "meta":
        new.requires_grad_(False)
    pruned = Denoiser(denoiser.config.replace(mmdit=cfg), new.eval(), denoiser.context_adapter)
    return pruned, mapping


def parse_removal(spec: str, num_layers: int, importance: str | Path | None = None) -> list[int]:
    """``"3,7,9"``, ``"count=6"`` or ``"threshold=0.05"`` (the last two need scores)."""
    spec = spec.strip()
    if spec.startswith(("count=", "threshold=")):
        if importance is None:
            raise ValueError(f"--remove-blocks {spec} needs --importance (a file from `neodragon-npu importance`)")
        ranking, scores = load_importance(importance)
        if len(ranking) != num_layers:
            raise ValueError(f"{importance} scores {len(ranking)} blocks, the model has {num_layers}")
        key, _, value = spec.partition("=")
        try:
            number = int(value) if key == "count" else float(value)
        except ValueError:
            raise ValueError(f"--remove-blocks {spec}: {value!r} is not a number") from None
        return select_blocks(ranking, scores, **{key: number})
    try:
        blocks = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--remove-blocks {spec!r}: expected indices like 3,7,9, count=N or threshold=T") from None
    try:
        return check_removal(num_layers, blocks)
    except ValueError as exc:
        raise ValueError(f"--remove-blocks {spec}: {exc}") from None
