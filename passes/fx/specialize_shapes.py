"""Fold shape queries of a statically traced FX graph into constants."""

from __future__ import annotations

import torch.fx as fx
from torch.fx.node import map_arg

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.base import Pass, PassResult, PostconditionError, PreconditionError


class SpecializeShapesPass(Pass):
    """Replace shape queries (x.shape, x.size(), x.dim() and arithmetic on them) by constants.

    ``x.view(x.shape[0], -1, h, d)`` traces to getattr -> getitem -> view; exported as is,
    that becomes Shape -> Gather -> Concat -> Reshape per call site, chains the NPU
    compiler cannot remove (shared/neodragon-facts.md section 4, item 5). At a fixed input
    shape every such value is known, so::

        before: %s = getattr(%x, "shape"); %b = getitem(%s, 0); %y = view(%x, %b, -1, 8)
        after:  %y = view(%x, 1, -1, 8)

    Needs placeholders annotated with their shapes (``graphs.fx.trace``).
    """

    IR = "fx"
    NAME = "specialize_shapes"
    LOOKS_FOR = "shape query (x.shape, x.size(), x.dim())"

    def requires(self, gm: fx.GraphModule) -> None:
        try:
            fx_utils.input_specs(gm)
        except ValueError as exc:
            raise PreconditionError(f"specialize_shapes: {exc}") from None

    def call(self, gm: fx.GraphModule) -> PassResult:
        fx_utils.propagate_shapes(gm)
        static = [
            n
            for n in gm.graph.nodes
            if n.op in ("call_function", "call_method") and fx_utils.STATIC_VALUE in n.meta
        ]
        folded = 0
        for node in static:
            value = node.meta[fx_utils.STATIC_VALUE]
            for user in list(node.users):
                swap = lambda a, node=node, value=value: value if a is node else a  # noqa: E731
                user.args = map_arg(user.args, swap)  # also reaches nodes inside slices
                user.kwargs = map_arg(user.kwargs, swap)
                folded += 1
        erased = fx_utils.erase_unused(gm, static)
        if not (folded or erased):
            return PassResult(gm, False)
        fx_utils.recompile(gm)
        fx_utils.propagate_shapes(gm)
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [
            n.name
            for n in gm.graph.nodes
            if n.op in ("call_function", "call_method") and fx_utils.STATIC_VALUE in n.meta
        ]
        if left:
            raise PostconditionError(f"specialize_shapes: shape queries left: {left[:5]}")
