"""Every pass by name, for the CLI (``passes``, ``apply``) and pipeline files."""

from __future__ import annotations

import inspect
import json
import tomllib
from pathlib import Path
from typing import Any

from neodragon_npu.passes.base import Pass
from neodragon_npu.passes.fx.convert_rope_to_half_split import ConvertRopeToHalfSplitPass
from neodragon_npu.passes.fx.fold_attention_scale import FoldAttentionScalePass
from neodragon_npu.passes.fx.remove_blocks import RemoveBlocksPass
from neodragon_npu.passes.fx.remove_identity_modules import RemoveIdentityModulesPass
from neodragon_npu.passes.fx.specialize_shapes import SpecializeShapesPass
from neodragon_npu.passes.fx.split_adaln import SplitAdaLNPass
from neodragon_npu.passes.fx.split_attention import SplitAttentionPass
from neodragon_npu.passes.onnx.convert_mask_to_finite import ConvertMaskToFinitePass
from neodragon_npu.passes.onnx.fold_constants import FoldConstantsPass
from neodragon_npu.passes.onnx.fold_weight_quantization import FoldWeightQuantizationPass
from neodragon_npu.passes.onnx.fuse_rms_norm import FuseRMSNormPass
from neodragon_npu.passes.onnx.fuse_rotary_embedding import FuseRotaryEmbeddingPass
from neodragon_npu.passes.onnx.name_weights_by_content import NameWeightsByContentPass
from neodragon_npu.passes.onnx.quantize_w8a16 import QuantizeW8A16Pass
from neodragon_npu.passes.onnx.remove_unused_nodes import RemoveUnusedNodesPass
from neodragon_npu.passes.onnx.requantize_matmul_operand import RequantizeMatMulOperandPass
from neodragon_npu.passes.onnx.round_weights_gptq import RoundWeightsGPTQPass

PASSES: dict[str, type[Pass]] = {
    cls.pass_name(): cls
    for cls in (
        RemoveBlocksPass,
        RemoveIdentityModulesPass,
        SpecializeShapesPass,
        SplitAdaLNPass,
        ConvertRopeToHalfSplitPass,
        FoldAttentionScalePass,
        SplitAttentionPass,
        FoldConstantsPass,
        ConvertMaskToFinitePass,
        FuseRMSNormPass,
        FuseRotaryEmbeddingPass,
        RemoveUnusedNodesPass,
        NameWeightsByContentPass,
        RoundWeightsGPTQPass,
        QuantizeW8A16Pass,
        RequantizeMatMulOperandPass,
        FoldWeightQuantizationPass,
    )
}


def pass_options(cls: type[Pass]) -> dict[str, Any]:
    """Keyword options of a pass and their defaults (``inspect.Parameter.empty`` if required)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def create_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    if name not in PASSES:
        raise ValueError(f"unknown pass {name!r}; run `neodragon-npu passes` to list them")
    cls, options = PASSES[name], dict(options or {})
    allowed = pass_options(cls)
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"pass {name}: unknown options {sorted(unknown)}; options are {sorted(allowed) or 'none'}")
    required = {n for n, d in allowed.items() if d is inspect.Parameter.empty} - set(options)
    if required:
        raise ValueError(f"pass {name}: missing required options {sorted(required)}")
    return cls(**options)


def load_pipeline_file(path: str | Path) -> list[Pass]:
    """A pipeline file is TOML (``[[passes]] name = ..., options = {...}``) or the same as JSON."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such pipeline file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot parse pipeline file ({exc})") from None
    entries = data.get("passes") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list 'passes' of {{name, options}} entries")
    passes = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{path}: passes[{i}] has no 'name'")
        passes.append(create_pass(entry["name"], entry.get("options")))
    return passes
