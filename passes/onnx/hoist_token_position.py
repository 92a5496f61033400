"""Move a pooling position computed from the token ids (ArgMax + Gather) to a host input."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs.onnx_edit import const_array, const_scalar, producer, replace_with
from neodragon_npu.passes.base import Option, Pass, PassResult

def _ids_input(value: ir.Value, graph: ir.Graph) -> ir.Value | None:
    """The graph input ``value`` is, through casts."""
    while value.producer() is not None and value.producer().op_type in ("Cast", "Identity"):
        value = value.producer().inputs[0]
    return value if value.producer() is None and value in graph.inputs else None


def _ids_rule(value: ir.Value, graph: ir.Graph) -> tuple[ir.Value, str] | None:
    """If ``value`` is the token ids (through casts), or the ids compared with a constant:
    (the ids input, the position rule the host follows, as text)."""
    ids = _ids_input(value, graph)
    if ids is not None:
        return ids, f"largest id of {ids.name}"
    while value.producer() is not None and value.producer().op_type in ("Cast", "Identity"):
        value = value.producer().inputs[0]
    node = producer(value, "Equal")
    if node is None:
        return None
    for x, c in (node.inputs, node.inputs[::-1]):
        token = const_scalar(c)
        ids = _ids_input(x, graph) if token is not None else None
        if ids is not None:
            return ids, f"first position where {ids.name} == {int(token)}"
    return None


def _flattened_rows(data: ir.Value) -> ir.Value | None:
    """``data`` = Flatten(x, axis=2) or Reshape(x, [B*L, D]) of x [B, L, D]: x."""
    node = producer(data, "Flatten", "Reshape")
    if node is None:
        return None
    x = node.inputs[0]
    if x.shape is None or len(x.shape) != 3 or not x.shape.is_static():
        return None
    b, length, d = (int(s) for s in x.shape)
    if node.op_type == "Flatten" and node.attributes.get_int("axis", 1) != 2:
        return None
    if node.op_type == "Reshape" and (const_array(node.inputs[1]) is None
                                      or [int(s) for s in const_array(node.inputs[1])] not in ([b * length, d],
                                                                                               [-1, d])):
        return None
    return x


class HoistTokenPositionPass(Pass):
    """Replace a row pooled at a position computed from the token ids by a MatMul with a
    one-hot host input::

        before: i = ArgMax(f(ids)) + [0, L, 2L, ...];  y = Gather(Flatten(x [B, L, D]), i)
        after:  y = Reshape(MatMul(Unsqueeze(onehot [B, L], 1), x))          (exact)

    CLIP pools its end-of-text token this way (transformers: ``argmax(input_ids)`` or the
    first ``eos_token_id``). ArgMax over integers and a data-dependent Gather are not what
    the HTP runs well, and the host already knows where its tokenizer put the end token:
    it feeds a one-hot row ``onehot[b, j] = 1`` at that position, and the pooling becomes
    one small MatMul (1 * x + 0 * ... is exact). ``f`` may be a comparison of the ids with a
    constant and casts; the rule the host must follow is in the pass's note.
    """

    IR = "onnx"
    NAME = "hoist_token_position"
    LOOKS_FOR = "ArgMax over token ids feeding a Gather of a [B, L, D] tensor's rows"
    OPTIONS = {"input_name": Option("str", "the name of the one-hot graph input the host feeds")}

    def __init__(self, *, input_name: str = "end_onehot") -> None:
        self.input_name = input_name

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        hoisted = 0
        for argmax in [n for n in graph if n.op_type == "ArgMax"]:
            found = self._match(argmax, graph)
            if isinstance(found, str):
                self.leave(argmax.name, found)
                continue
            gather, x, rule = found
            b, length, _ = (int(s) for s in x.shape)
            if any(v.name == self.input_name for v in graph.inputs):
                self.leave(argmax.name, f"a graph input is already named {self.input_name}")
                continue
            onehot = ir.Value(name=self.input_name, shape=ir.Shape([b, length]), type=ir.TensorType(x.dtype))
            graph.inputs.append(onehot)
            axes = ir.Value(name=f"{self.input_name}_axes", const_value=ir.tensor(np.array([1], np.int64)),
                            shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64))
            shape = ir.Value(name=f"{self.input_name}_pooled_shape",
                             const_value=ir.tensor(np.array([b, int(x.shape[2])], np.int64)),
                             shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64))
            graph.register_initializer(axes)
            graph.register_initializer(shape)
            row = ir.node("Unsqueeze", [onehot, axes], name=f"{gather.name}_onehot_row")
            pooled = ir.node("MatMul", [row.outputs[0], x], name=f"{gather.name}_onehot_matmul")
            flat = ir.node("Reshape", [pooled.outputs[0], shape], name=f"{gather.name}_onehot_rows")
            row.outputs[0].shape, row.outputs[0].dtype = ir.Shape([b, 1, length]), x.dtype
            pooled.outputs[0].shape, pooled.outputs[0].dtype = ir.Shape([b, 1, int(x.shape[2])]), x.dtype
            flat.outputs[0].shape, flat.outputs[0].dtype = gather.outputs[0].shape, gather.outputs[0].dtype
            graph.insert_before(gather, [row, pooled])
            replace_with(gather.outputs[0], flat, gather)
            self.leave(self.input_name, f"new host input [{b}, {length}]: 1 at the {rule} of each row")
            hoisted += 1
        if hoisted:
            from onnx_ir.passes.common import RemoveUnusedNodesPass

            RemoveUnusedNodesPass()(model)
        return PassResult(model, hoisted > 0)

    @staticmethod
    def _match(argmax: ir.Node, graph: ir.Graph):
        """(gather, x, rule) or why not."""
        rule = _ids_rule(argmax.inputs[0], graph)
        if rule is None:
            return "its input is not a function of a token-id graph input alone"
        ids, text = rule
        if argmax.attributes.get_int("keepdims", 1) != 0 or ids.shape is None or len(ids.shape) != 2:
            return "not an ArgMax over the last axis of [B, L] ids without keepdims"
        if argmax.attributes.get_int("axis", 0) % 2 != 1 or argmax.attributes.get_int("select_last_index", 0):
            return "not the first maximum over the sequence axis"
        users = argmax.outputs[0].uses()
        if len(users) != 1:
            return "its position has more than one reader"
        node = users[0][0]
        b, length = (int(s) for s in ids.shape)
        if node.op_type == "Add":  # + the row offsets [0, L, 2L, ...] into the flattened rows
            offsets = const_array(node.inputs[1] if node.inputs[0] is argmax.outputs[0] else node.inputs[0])
            if offsets is None or offsets.size != b or not np.array_equal(offsets.reshape(-1),
                                                                         np.arange(b) * length):
                return "the position is not offset by whole rows"
            if len(node.outputs[0].uses()) != 1:
                return "the row index has more than one reader"
            node = node.outputs[0].uses()[0][0]
        elif b != 1:
            return "no row offsets for a batch of more than one"
        if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
            return f"the position feeds {node.op_type}, not a Gather of rows"
        x = _flattened_rows(node.inputs[0])
        if x is None or int(x.shape[1]) != length:
            return "the gathered tensor is not a flattened [B, L, D] of the ids' length"
        return node, x, text
