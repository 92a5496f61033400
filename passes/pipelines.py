"""Named pass pipelines, written out in order; each line says why the pass is there."""

from __future__ import annotations

from passes.base import Pass
from passes.fx.remove_identity_modules import RemoveIdentityModulesPass
from passes.fx.specialize_shapes import SpecializeShapesPass
from passes.onnx.convert_mask_to_finite import ConvertMaskToFinitePass
from passes.onnx.fold_constants import FoldConstantsPass
from passes.onnx.remove_unused_nodes import RemoveUnusedNodesPass


def denoiser_fx() -> list[Pass]:
    """FX passes for a denoiser stage graph traced at its static envelope."""
    return [
        # Dropout/Identity are no-ops at inference; removing them keeps later matches simple.
        RemoveIdentityModulesPass(),
        # x.view(x.shape[0], ...) must not reach ONNX as Shape/Gather chains (facts 4.5).
        SpecializeShapesPass(),
    ]


def denoiser_onnx() -> list[Pass]:
    """ONNX clean-up before quantization."""
    return [
        # Weight reshapes (patch-embed conv -> linear), SDPA's sqrt(scale) and any shape
        # arithmetic left by the exporter become constants.
        FoldConstantsPass(),
        # -inf / finfo.min masks overflow A16 and FP16 and NaN fully masked rows (facts 4.3).
        ConvertMaskToFinitePass(),
        # Folding leaves dead producers and unused initializers behind.
        RemoveUnusedNodesPass(),
    ]


PIPELINES = {"denoiser_fx": denoiser_fx, "denoiser_onnx": denoiser_onnx}
