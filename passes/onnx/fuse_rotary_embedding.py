"""Half-split rotation with half tables -> RotaryEmbedding (opset 23)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs.onnx_edit import const_array, producer, replace_with, require_opset
from neodragon_npu.passes.base import Pass, PassResult


def _half(value: ir.Value, x_holder: list, which: str) -> bool:
    """``value`` = Slice(x, 0:D/2) ("lo") or Slice(x, D/2:D) ("hi") on the last axis."""
    node = producer(value, "Slice")
    if node is None:
        return False
    x = node.inputs[0]
    if x.shape is None or not x.shape.is_static():
        return False
    rank, width = len(x.shape), int(x.shape[-1])
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 else np.array([rank - 1])
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.array([1])
    if any(a is None or a.size != 1 for a in (starts, ends, axes, steps)):
        return False
    if int(axes.reshape(())) % rank != rank - 1 or int(steps.reshape(())) != 1:
        return False
    start, end = int(starts.reshape(())), min(int(ends.reshape(())), width)
    expected = (0, width // 2) if which == "lo" else (width // 2, width)
    if (start, end) != expected:
        return False
    if x_holder and x_holder[0] is not x:
        return False
    x_holder[:1] = [x]
    return True


def _products(value: ir.Value, op: str):
    """``value`` = op(Mul(a, b), Mul(c, d)): the two operand pairs, else None."""
    node = producer(value, op)
    if node is None:
        return None
    pairs = []
    for side in node.inputs:
        mul = producer(side, "Mul")
        if mul is None:
            return None
        pairs.append(tuple(mul.inputs))
    return pairs


def _match(concat: ir.Node):
    """Concat(lo*c - hi*s, hi*c + lo*s, axis=-1) with lo/hi the halves of x: (x, c, s)."""
    if concat.op_type != "Concat" or len(concat.inputs) != 2:
        return None
    out_shape = concat.outputs[0].shape
    if out_shape is None or concat.attributes.get_int("axis") % len(out_shape) != len(out_shape) - 1:
        return None
    real, imag = _products(concat.inputs[0], "Sub"), _products(concat.inputs[1], "Add")
    if real is None or imag is None:
        return None
    x_holder: list = []
    (a, b), (c, d) = real  # lo*cos, hi*sin
    (e, f), (g, h) = imag  # hi*cos, lo*sin   (either operand order inside each Mul)
    for lo_cos in ((a, b), (b, a)):
        for hi_sin in ((c, d), (d, c)):
            lo, cos = lo_cos
            hi, sin = hi_sin
            if not (_half(lo, x_holder, "lo") and _half(hi, x_holder, "hi")):
                x_holder.clear()
                continue
            if {id(v) for v in (e, f)} == {id(hi), id(cos)} and {id(v) for v in (g, h)} == {id(lo), id(sin)}:
                return x_holder[0], cos, sin
            x_holder.clear()
    return None


class FuseRotaryEmbeddingPass(Pass):
    """Fuse a half-split rotation into one ONNX RotaryEmbedding node (raises opset to 23).

    The exported half-split rotation writes seven [B, H, S, D]-ish tensors (two slices, four
    products, a sub, an add, a concat); the HTP runs RotaryEmbedding as one op::

        before: cat(lo*cos - hi*sin, hi*cos + lo*sin)    lo, hi = x[.., :D/2], x[.., D/2:]
        after:  RotaryEmbedding(x, cos[1, S, D/2], sin[1, S, D/2])   (non-interleaved)

    Only fires when the tables are half tables [.., S, D/2] broadcast over batch 1 and
    heads, the exact contract of RotaryEmbedding's caches without position ids.
    """

    IR = "onnx"
    NAME = "fuse_rotary_embedding"
    LOOKS_FOR = "half-split rotary pattern cat(lo*cos - hi*sin, hi*cos + lo*sin)"

    def _explain(self, concat: ir.Node) -> None:
        """Say why a Concat of a Sub and an Add (the rotation's shape) did not fuse."""
        real, imag = _products(concat.inputs[0], "Sub"), _products(concat.inputs[1], "Add")
        if real is None or imag is None:
            return  # not a rotation candidate
        out_shape = concat.outputs[0].shape
        if out_shape is None or concat.attributes.get_int("axis") % len(out_shape) != len(out_shape) - 1:
            self.leave(concat.name, "concatenates Sub and Add products, but not on the last axis")
        else:
            self.leave(concat.name, "Sub and Add products, but not of the two halves of one tensor with the "
                                   "same cos and sin (lo*cos - hi*sin, hi*cos + lo*sin)")

    def call(self, model: ir.Model) -> PassResult:
        fused = 0
        reshaped: dict[int, ir.Value] = {}
        for node in list(model.graph):
            if node.graph is None:
                continue
            match = _match(node)
            if match is None:
                if node.op_type == "Concat" and len(node.inputs) == 2:
                    self._explain(node)
                continue
            x, cos, sin = match
            b, _, s, d = (int(v) for v in x.shape) if len(x.shape) == 4 else (0, 0, 0, 0)
            tables_ok = all(
                t.shape is not None and t.shape.is_static() and tuple(int(v) for v in t.shape) in
                ((1, 1, s, d // 2), (1, s, d // 2))
                for t in (cos, sin)
            )
            if b != 1 or not tables_ok:
                self.leave(node.name, "batch is not 1 or the cos/sin tables are not [1, (1,) S, D/2]")
                continue
            require_opset(model, 23)
            caches = []
            for table in (cos, sin):
                if id(table) not in reshaped:
                    shape = ir.Value(name=f"{table.name}_cache_shape", const_value=ir.tensor(np.array([1, s, d // 2], np.int64)))
                    model.graph.register_initializer(shape)
                    reshape = ir.node("Reshape", [table, shape], name=f"{table.name}_as_cache")
                    reshape.outputs[0].shape = ir.Shape([1, s, d // 2])
                    reshape.outputs[0].dtype = table.dtype
                    model.graph.insert_before(node, reshape)
                    reshaped[id(table)] = reshape.outputs[0]
                caches.append(reshaped[id(table)])
            new = ir.node("RotaryEmbedding", [x, *caches], {"interleaved": 0}, name=f"{node.name}_rope")
            new.outputs[0].shape, new.outputs[0].dtype = node.outputs[0].shape, node.outputs[0].dtype
            replace_with(node.outputs[0], new, node)
            fused += 1
        if fused:
            from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

            RemoveUnusedNodesPass()(model)
            TopologicalSortPass()(model)
        return PassResult(model, fused > 0)
