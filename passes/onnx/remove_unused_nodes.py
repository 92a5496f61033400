"""Dead-code elimination for ONNX graphs."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass as _IrRemoveUnused

from neodragon_npu.passes.base import Pass, PassResult


class RemoveUnusedNodesPass(Pass):
    """Remove nodes and initializers that no graph output depends on.

    Other rewrites leave producers without consumers behind (e.g. the shape chain after
    folding, the text-query path of the context-pre-only last block); they would still be
    compiled and their weights stored.
    """

    IR = "onnx"
    NAME = "remove_unused_nodes"
    LOOKS_FOR = "unused node or initializer"

    def call(self, model: ir.Model) -> PassResult:
        before = (len(model.graph), len(model.graph.initializers))
        _IrRemoveUnused()(model)
        return PassResult(model, (len(model.graph), len(model.graph.initializers)) != before)
