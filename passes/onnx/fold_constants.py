"""Constant folding, including shape computations on static inputs."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.optimizer import _constant_folding

from passes.base import Pass, PassResult


class FoldConstantsPass(Pass):
    """Evaluate every node whose inputs are all constants (onnxscript's folder).

    With static input shapes this also folds Shape -> Gather -> Concat chains into constant
    shapes, and weight-only subgraphs (Transpose(W), Reshape(W)) into new initializers::

        before: Shape(x) -> Gather(0) -> Concat(., [-1, 8]) -> Reshape(x, .)
        after:  Reshape(x, const[1, -1, 8])

    ``output_size_limit`` bounds the size (elements) of a folded tensor, so large weights
    are only folded when the result replaces them.
    """

    IR = "onnx"

    def __init__(self, *, input_size_limit: int = 1 << 40, output_size_limit: int = 1 << 40) -> None:
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit

    def call(self, model: ir.Model) -> PassResult:
        folder = _constant_folding.FoldConstantsPass(
            shape_inference=True,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
        )
        result = folder(model)
        return PassResult(model, bool(result.modified))
