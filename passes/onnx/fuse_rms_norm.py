"""x * rsqrt(mean(x^2) + eps) * w -> RMSNormalization (opset 23)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs.onnx_edit import const_array, const_scalar, producer, replace_with, require_opset
from neodragon_npu.passes.base import Pass, PassResult


def _rsqrt_input(value: ir.Value) -> ir.Value | None:
    """``value`` = 1/sqrt(v) as Div(1, Sqrt(v)) or Reciprocal(Sqrt(v)): return v."""
    node = producer(value, "Div", "Reciprocal")
    if node is None:
        return None
    if node.op_type == "Div":
        if const_scalar(node.inputs[0]) != 1.0:
            return None
        root = producer(node.inputs[1], "Sqrt")
    else:
        root = producer(node.inputs[0], "Sqrt")
    return root.inputs[0] if root is not None else None


def _match(final: ir.Node):
    """``final`` = Mul(Mul(x, rsqrt(ReduceMean(Pow(x, 2), -1) + eps)), w): (x, w, eps)."""
    if final.op_type != "Mul":
        return None
    for normed, weight in (final.inputs, final.inputs[::-1]):
        w = const_array(weight)
        inner = producer(normed, "Mul")
        if w is None or w.ndim != 1 or inner is None or len(normed.uses()) != 1:
            continue
        for x, factor in (inner.inputs, inner.inputs[::-1]):
            shape = x.shape
            if shape is None or not shape.is_static() or int(shape[-1]) != w.shape[0]:
                continue
            add = producer(_rsqrt_input(factor), "Add")
            if add is None:
                continue
            for mean_v, eps_v in (add.inputs, add.inputs[::-1]):
                mean, eps = producer(mean_v, "ReduceMean"), const_scalar(eps_v)
                if mean is None or eps is None or mean.attributes.get_int("keepdims", 1) != 1:
                    continue
                axes = const_array(mean.inputs[1]) if len(mean.inputs) > 1 else None
                if axes is None:
                    axes = np.array(mean.attributes.get_ints("axes", []))
                if axes.size != 1 or int(axes.reshape(())) % len(shape) != len(shape) - 1:
                    continue
                square = producer(mean.inputs[0], "Pow")
                if square is None or square.inputs[0] is not x or const_scalar(square.inputs[1]) != 2.0:
                    continue
                return x, weight, eps
    return None


def _why_not(mean: ir.Node, square: ir.Node) -> str:
    """Why the RMSNorm chain starting at ``mean = ReduceMean(Pow(x, 2))`` did not fuse."""
    if mean.attributes.get_int("keepdims", 1) != 1:
        return "ReduceMean drops its axis (keepdims=0)"
    readers = [u for u, _ in mean.outputs[0].uses()]
    add = next((u for u in readers if u.op_type == "Add"), None)
    if add is None or not any(const_scalar(v) is not None for v in add.inputs):
        return "mean(x^2) is not followed by + eps (a constant)"
    root = next((u for u, _ in add.outputs[0].uses() if u.op_type == "Sqrt"), None)
    if root is None:
        return "no Sqrt after mean(x^2) + eps"
    inverse = next((u for u, _ in root.outputs[0].uses() if u.op_type in ("Div", "Reciprocal")), None)
    if inverse is None or (inverse.op_type == "Div" and const_scalar(inverse.inputs[0]) != 1.0):
        return "no 1 / sqrt(...) after the Sqrt"
    x = square.inputs[0]
    mul = next((u for u, _ in inverse.outputs[0].uses() if u.op_type == "Mul" and x in u.inputs), None)
    if mul is None:
        return "1 / sqrt(mean(x^2) + eps) does not multiply x itself (a Cast in between?)"
    return "the normalised x is not multiplied by a 1-D constant weight of x's width, or has other readers"


class FuseRMSNormPass(Pass):
    """Fuse the RMSNorm op chain into one ONNX RMSNormalization node (raises opset to 23).

    Exported RMSNorm is Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul -> Mul: three
    full-size outputs per QK-norm (x^2, x*rsqrt, *w) where the HTP has one op::

        before: y = x * (1 / sqrt(mean(x^2, -1) + eps)) * w
        after:  y = RMSNormalization(x, w, axis=-1, epsilon=eps)

    On stage 2 that is two [24, 1728, 64]-sized writes less per Q/K norm.
    """

    IR = "onnx"
    NAME = "fuse_rms_norm"
    LOOKS_FOR = "RMSNorm chain x * rsqrt(mean(x^2) + eps) * w"

    def call(self, model: ir.Model) -> PassResult:
        fused = 0
        for node in list(model.graph):
            if node.graph is None:
                continue
            match = _match(node)
            if match is None:
                continue
            x, weight, eps = match
            require_opset(model, 23)
            new = ir.node(
                "RMSNormalization", [x, weight], {"axis": -1, "epsilon": eps}, name=f"{node.name}_rmsnorm"
            )
            new.outputs[0].shape, new.outputs[0].dtype = node.outputs[0].shape, node.outputs[0].dtype
            replace_with(node.outputs[0], new, node)
            fused += 1
        if fused:
            from onnx_ir.passes.common import RemoveUnusedNodesPass

            RemoveUnusedNodesPass()(model)
        for node in model.graph:
            square = producer(node.inputs[0], "Pow") if node.op_type == "ReduceMean" and node.inputs else None
            if square is not None and const_scalar(square.inputs[1]) == 2.0:
                self.leave(node.name, _why_not(node, square))
        return PassResult(model, fused > 0)
