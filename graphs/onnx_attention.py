"""Expanding ``neodragon::SplitAttention`` nodes into the per-head, query-chunked graph.

The TorchScript tracer records :func:`kernels.attention.attention_split` as one such node
when the export asks for it (:func:`kernels.attention.traced_as_one_node`); this module
writes the graph the kernel describes, node for node::

    SplitAttention(q, k, v, bias; chunks, scale)
      -> q * scale (if scale != 1); Split q, k, v per head; K^T per head
         per head and chunk (q0, q1, key_end, row):
           row >= 0:  softmax([q_c, FOLD_SCALE] @ [K^T[:, :key_end]; bias[row, :key_end] / FOLD_SCALE]) @ v[:key_end]
           row <  0:  softmax(q_c @ K^T[:, :key_end] (+ bias[q0:q1, :key_end])) @ v[:key_end]
      -> Concat over chunks, then over heads

Keys and values are sliced once per (head, key_end) and the folded bias row once per
(key_end, row), as the kernel does. Every new value gets its static shape and dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from neodragon_npu.kernels.attention import FOLD_SCALE, SPLIT_ATTENTION_DOMAIN, SPLIT_ATTENTION_OP


class _Writer:
    """Inserts nodes before ``anchor``, names them under ``prefix``, shares small constants."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str, constants: dict, dtype) -> None:
        self.graph, self.anchor, self.prefix = graph, anchor, prefix
        self.dtype = dtype  # of every tensor of the attention (q, k, v, bias, scores)
        self.constants = constants  # (dtype, shape, bytes) -> initializer, shared by the model
        self.count = 0

    def const(self, array: np.ndarray) -> ir.Value:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            # a generated name ("/..."): name_weights_by_content renames it after its contents,
            # so stage graphs holding the same constant share it
            tensor = ir.tensor(array)
            value = ir.Value(name=f"/SplitAttention/Constant_{len(self.constants)}", const_value=tensor)
            value.shape, value.dtype = ir.Shape(array.shape), tensor.dtype
            self.graph.register_initializer(value)
            self.constants[key] = value
        return self.constants[key]

    def ints(self, values) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs, shapes, attributes=None) -> list[ir.Value]:
        self.count += 1
        node = ir.node(op_type, list(inputs), attributes or {}, num_outputs=len(shapes),
                       name=f"{self.prefix}/{op_type}_{self.count}")
        self.graph.insert_before(self.anchor, node)
        for out, shape in zip(node.outputs, shapes):
            out.shape, out.dtype = ir.Shape(shape), self.dtype
            out.name = node.name + (f"_output_{out.index()}" if len(shapes) > 1 else "_output")
        return list(node.outputs)

    def one(self, op_type, inputs, shape, attributes=None) -> ir.Value:
        return self.op(op_type, inputs, [shape], attributes)[0]

    def slice(self, x: ir.Value, starts, ends, axes, shape) -> ir.Value:
        return self.one("Slice", [x, self.ints(starts), self.ints(ends), self.ints(axes)], shape)

    def split(self, x: ir.Value, axis: int, sizes: list[int], shape) -> list[ir.Value]:
        if len(sizes) == 1:
            return [x]
        shapes = []
        for size in sizes:
            s = list(shape)
            s[axis] = size
            shapes.append(s)
        return self.op("Split", [x, self.ints(sizes)], shapes, {"axis": axis})

    def concat(self, parts: list[ir.Value], axis: int, shape) -> ir.Value:
        if len(parts) == 1:
            return parts[0]
        return self.one("Concat", parts, shape, {"axis": axis})


def _shape(node: ir.Node, which: str, value: ir.Value) -> list[int]:
    """The static shape of input ``which`` (q, k, v, bias): the node's ``<which>_shape``
    attribute (the exporter keeps no intermediate shapes), else the value's own."""
    attr = node.attributes.get(f"{which}_shape")
    if attr is not None:
        return [int(d) for d in attr.as_ints()]
    if value.shape is None or not value.shape.is_static():
        raise ValueError(f"{node.name}: SplitAttention needs the static shape of its {which} input")
    return [int(d) for d in value.shape]


def _chunks(node: ir.Node) -> list[tuple[int, int, int, int]]:
    flat = list(node.attributes["chunks"].as_ints())
    if len(flat) % 4:
        raise ValueError(f"{node.name}: chunks must hold groups of four ints, got {len(flat)}")
    return [tuple(flat[i : i + 4]) for i in range(0, len(flat), 4)]


def _expand(graph: ir.Graph, node: ir.Node, constants: dict) -> None:
    q, k, v = node.inputs[:3]
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    chunks = _chunks(node)
    scale = node.attributes["scale"].as_float()
    b, heads, seq, d = _shape(node, "q", q)
    _, _, keys_len, _ = _shape(node, "k", k)
    dv = _shape(node, "v", v)[-1]
    if bias is not None:
        bb = _shape(node, "bias", bias)[0]
    if chunks[0][0] != 0 or chunks[-1][1] != seq or any(a[1] != c[0] for a, c in zip(chunks, chunks[1:])):
        raise ValueError(f"{node.name}: chunks {chunks} do not cover the {seq} queries in order")
    dtype = node.outputs[0].dtype or q.dtype or ir.DataType.FLOAT
    if dtype != ir.DataType.FLOAT:
        raise ValueError(f"{node.name}: SplitAttention is expanded for float32 graphs, got {dtype}")
    w = _Writer(graph, node, node.name or "SplitAttention", constants, dtype)

    if scale != 1.0:
        q = w.one("Mul", [q, w.const(np.array(scale, dtype=np.float32))], [b, heads, seq, d])
    folded: dict[tuple[int, int], ir.Value] = {}
    for _, _, key_end, row in chunks:
        if row >= 0 and (key_end, row) not in folded:
            if bias is None:
                raise ValueError(f"{node.name}: chunk folds bias row {row} but the node has no bias")
            sliced = w.slice(bias, [row, 0], [row + 1, key_end], [2, 3], [bb, 1, 1, key_end])
            folded[key_end, row] = w.one("Div", [sliced, w.const(np.array(FOLD_SCALE, np.float32))],
                                         [bb, 1, 1, key_end])
    one_head = [[b, 1, seq, d], [b, 1, keys_len, d], [b, 1, keys_len, dv]]
    q_heads = w.split(q, 1, [1] * heads, one_head[0])
    k_heads = w.split(k, 1, [1] * heads, one_head[1])
    v_heads = w.split(v, 1, [1] * heads, one_head[2])
    sizes = [q1 - q0 for q0, q1, _, _ in chunks]
    head_outs = []
    for qh, kh, vh in zip(q_heads, k_heads, v_heads):
        kt = w.one("Transpose", [kh], [b, 1, d, keys_len], {"perm": [0, 1, 3, 2]})
        keys: dict = {}
        values: dict = {}
        outs = []
        for q_c, (q0, q1, key_end, row) in zip(w.split(qh, 2, sizes, [b, 1, seq, d]), chunks):
            rows = q1 - q0
            if key_end not in keys:
                full = key_end == keys_len
                keys[key_end] = kt if full else w.slice(kt, [0], [key_end], [3], [b, 1, d, key_end])
                values[key_end] = vh if full else w.slice(vh, [0], [key_end], [2], [b, 1, key_end, dv])
            if row >= 0:
                if (key_end, row) not in keys:
                    keys[key_end, row] = w.concat([keys[key_end], folded[key_end, row]], 2, [b, 1, d + 1, key_end])
                ones = w.const(np.full((b, 1, rows, 1), FOLD_SCALE, dtype=np.float32))
                q_ext = w.concat([q_c, ones], 3, [b, 1, rows, d + 1])
                scores = w.one("MatMul", [q_ext, keys[key_end, row]], [b, 1, rows, key_end])
            else:
                scores = w.one("MatMul", [q_c, keys[key_end]], [b, 1, rows, key_end])
                if bias is not None:
                    bias_c = w.slice(bias, [q0, 0], [q1, key_end], [2, 3], [bb, 1, rows, key_end])
                    scores = w.one("Add", [scores, bias_c], [b, 1, rows, key_end])
            probs = w.one("Softmax", [scores], [b, 1, rows, key_end], {"axis": -1})
            outs.append(w.one("MatMul", [probs, values[key_end]], [b, 1, rows, dv]))
        head_outs.append(w.concat(outs, 2, [b, 1, seq, dv]))
    result = w.concat(head_outs, 1, [b, heads, seq, dv])
    old = node.outputs[0]
    name = old.name
    old.replace_all_uses_with(result, replace_graph_outputs=True)
    old.name = None
    result.name = name
    graph.remove(node, safe=True)


def expand_split_attention(model: ir.Model) -> int:
    """Replace every ``neodragon::SplitAttention`` node of ``model`` by its chunked graph and
    drop the custom domain from the opset imports. Returns the number of nodes expanded."""
    constants: dict = {}
    expanded = 0
    for node in list(model.graph):
        if node.domain == SPLIT_ATTENTION_DOMAIN and node.op_type == SPLIT_ATTENTION_OP:
            _expand(model.graph, node, constants)
            expanded += 1
    model.graph.opset_imports.pop(SPLIT_ATTENTION_DOMAIN, None)
    return expanded


_SCORE_ELEMENTWISE = ("Add", "Sub", "Mul", "Div")


def split_attention_score_groups(model: ir.Model) -> list[list[str]]:
    """The score tensors of each split attention in ``model``, one group per attention and
    kind: the Softmax inputs, and apart from them the QK^T outputs that a bias is added to
    before the Softmax. Groups of one tensor are left out.

    A split attention is recognised by its structure, whoever wrote it: Softmax -> MatMul
    (with V) -> Concat, the Concats of one attention chained (over chunks, then heads); the
    Softmaxes under one final Concat form one attention. Going up from a Softmax input, the
    elementwise ops a score passes through (the bias Add, a scale) lead to its QK^T MatMul.
    """
    groups: dict[tuple[int, str], list[str]] = {}
    for node in model.graph:
        if node.op_type != "Softmax" or node.inputs[0] is None:
            continue
        top = _final_concat(node)
        if top is None:
            continue
        scores = node.inputs[0]
        groups.setdefault((id(top), "softmax input"), []).append(scores.name)
        up = scores.producer()
        while up is not None and up.op_type in _SCORE_ELEMENTWISE:
            # the score side of the op: the bias is a constant, a graph input or a slice of one
            on_path = [v for v in up.inputs if v is not None and v.producer() is not None
                       and v.producer().op_type in (*_SCORE_ELEMENTWISE, "MatMul")]
            if len(on_path) != 1:
                break
            scores, up = on_path[0], on_path[0].producer()
            if up.op_type == "MatMul":
                groups.setdefault((id(top), "before bias"), []).append(scores.name)
                break
    return [names for names in groups.values() if len(names) > 1]


def _final_concat(softmax: ir.Node) -> ir.Node | None:
    """The last Concat of the chain Softmax -> MatMul -> Concat -> Concat ..., or None."""
    uses = softmax.outputs[0].uses()
    if len(uses) != 1 or uses[0][0].op_type != "MatMul":
        return None
    out = uses[0][0].outputs[0].uses()
    if len(out) != 1 or out[0][0].op_type != "Concat":
        return None
    concat = out[0][0]
    while True:
        after = concat.outputs[0].uses()
        if len(after) != 1 or after[0][0].op_type != "Concat":
            return concat
        concat = after[0][0]
