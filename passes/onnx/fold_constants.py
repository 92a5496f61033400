"""Constant folding, including shape computations on static inputs."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from onnxscript.optimizer import _constant_folding

from neodragon_npu.passes.base import Option, Pass, PassResult


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
    NAME = "fold_constants"
    LOOKS_FOR = "subgraph computed from constants alone"
    OPTIONS = {
        "input_size_limit": Option("int", "largest constant input (bytes) a folded node may read", min=0),
        "output_size_limit": Option("int", "largest constant (bytes) folding may create", min=0),
        "max_rounds": Option("int", "fold rounds at most (until nothing changes)", min=1, max=100),
    }

    def __init__(
        self, *, input_size_limit: int = 1 << 40, output_size_limit: int = 1 << 40, max_rounds: int = 4
    ) -> None:
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit
        self.max_rounds = max_rounds

    def call(self, model: ir.Model) -> PassResult:
        folder = _constant_folding.FoldConstantsPass(
            shape_inference=True,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
        )
        modified = False
        for _ in range(self.max_rounds):
            # Whole-graph inference first: the folder's per-node inference stops at the
            # first op it cannot type and leaves every Shape below it unfolded.
            ShapeInferencePass()(model)
            if not folder(model).modified:
                break
            modified = True
        return PassResult(model, modified)
