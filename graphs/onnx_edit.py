"""Small helpers for matching and rewriting onnx_ir graphs."""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs.shared_weights import untag


_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def is_quantized(model: ir.Model) -> bool:
    """True if the model holds Q/DQ nodes (a QDQ model)."""
    return any(node.op_type in _QDQ_OPS for node in model.graph)


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The node producing ``value`` if its op type is one of ``op_types`` (any if none)."""
    if value is None:
        return None
    node = value.producer()
    if node is None or (op_types and node.op_type not in op_types):
        return None
    return node


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def const_scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def replace_with(old_output: ir.Value, node: ir.Node, anchor: ir.Node) -> None:
    """Insert ``node`` before ``anchor`` and make every use of ``old_output`` read its first
    output, which takes over the old name (graph outputs keep their names)."""
    graph = anchor.graph
    graph.insert_before(anchor, node)
    new = node.outputs[0]
    name = old_output.name
    old_output.replace_all_uses_with(new, replace_graph_outputs=True)
    old_output.name = None
    new.name = name


def require_opset(model: ir.Model, version: int) -> bool:
    """Raise the default-domain opset to at least ``version``; True if it changed.

    Between opsets 21 and 23 the ops the denoiser uses only gained types (and opset 23
    added RMSNormalization and RotaryEmbedding), so the number can be raised as is.
    """
    current = model.opset_imports.get("", 1)
    if current >= version:
        return False
    model.opset_imports[""] = version
    model.graph.opset_imports[""] = version
    return True


NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def module_path(node: ir.Node) -> str | None:
    """The path of the torch module the node was exported from (``unet.mid_block.attentions.0
    .transformer_blocks.0.attn2.to_k``), read from the dynamo exporter's name-scope metadata;
    None without it. Needed because that exporter stores some weights (a Linear's, folded
    to its transpose) as constants named ``val_N``, so the weight name says nothing."""
    scopes = node.metadata_props.get(NAME_SCOPES)
    if not scopes:
        return None
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    # the last scope is the op's own name, the one before it the innermost module
    if not isinstance(names, list) or len(names) < 2 or not names[-2]:
        return None
    return str(names[-2])


def matches_any(node: ir.Node, patterns, weight_names=None) -> bool:
    """True if an fnmatch pattern matches one of the node's :func:`match_names`."""
    if not patterns:
        return False
    return any(fnmatch.fnmatch(n, p) for n in match_names(node, weight_names) for p in patterns)


def match_names(node: ir.Node, weight_names=None) -> list[str]:
    """What a 16-bit weight pattern is matched against: the node's name, the module it was
    exported from (:func:`module_path`), the name of a weight it reads (initializers, or the
    names in ``weight_names``), or a graph input it reads directly (``latent_tokens`` picks
    the patch embedding, whatever the exporter named it). In a merged model
    (:mod:`graphs.shared_weights`) names are matched without their graph tag."""
    names = [node.name or ""]
    module = module_path(node)
    if module:
        names.append(module)
    for value in node.inputs:
        if value is None:
            continue
        if value.is_initializer() or value.is_graph_input() or (weight_names is not None and value.name in weight_names):
            names.append(value.name)
    return [untag(n) for n in names]


def reads_weight(node: ir.Node) -> bool:
    """True if the node reads a constant tensor of rank 2 or more (a weight)."""
    for value in node.inputs:
        if value is not None and value.is_initializer() and value.const_value is not None \
                and len(value.const_value.shape) >= 2:
            return True
    return False


def unmatched_patterns(models: Iterable[ir.Model], patterns: Sequence[str]) -> list[str]:
    """The patterns of ``patterns`` that pick no weight-reading node (:func:`matches_any`,
    :func:`reads_weight`) in any of ``models``: a partitioned graph is checked whole, since
    a pattern may fairly miss some partitions."""
    left = list(dict.fromkeys(patterns))
    for model in models:
        if not left:
            break
        for node in model.graph:
            if reads_weight(node):
                names = match_names(node)
                left = [p for p in left if not any(fnmatch.fnmatch(n, p) for n in names)]
                if not left:
                    break
    return left


def along_axis(per_slice: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A Q/DQ scale or zero point ready to broadcast against an ``ndim``-D tensor: a 1-D
    (per-axis) one is laid along ``axis``, a scalar is returned as it is."""
    if per_slice.ndim != 1 or ndim == 0:
        return per_slice
    shape = [1] * ndim
    shape[axis] = -1
    return per_slice.reshape(shape)


def weight_values(model: ir.Model) -> dict[str, np.ndarray]:
    """Weights as the float values the graph computes with: integer initializers (a folded
    QDQ model) through the DequantizeLinear that reads them, float initializers of rank 2
    or more as stored."""
    values = {}
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or not node.inputs[0].is_initializer():
            continue
        q, scale = const_array(node.inputs[0]), const_array(node.inputs[1])
        zp = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        zp = np.zeros_like(scale) if zp is None else zp.astype(np.float32)
        axis = next((a.value for a in node.attributes.values() if a.name == "axis"), 1)
        axis = axis + q.ndim if axis < 0 else axis
        scale, zp = along_axis(scale, q.ndim, axis), along_axis(zp, q.ndim, axis)
        values[node.inputs[0].name] = ((q.astype(np.float32) - zp) * scale).astype(np.float32)
    for name, value in model.graph.initializers.items():
        if name not in values and value.const_value is not None and value.dtype == ir.DataType.FLOAT \
                and len(value.shape or ()) >= 2:
            values[name] = const_array(value)
    return values


# Ops whose constant operands can pin a spatial size: a graph holding one is not known to be
# fully convolutional.
_SHAPE_PINNING_OPS = {"Reshape", "Flatten", "Expand", "Tile", "ConstantOfShape", "Slice", "Gather", "MatMul",
                      "Gemm", "Resize", "Upsample", "Pad"}


def at_spatial_size(proto, height: int, width: int):
    """A copy of a fully convolutional ONNX model (``onnx.ModelProto``) whose 4-D inputs are
    ``[N, C, height, width]``, every other shape inferred anew: for work that depends only on
    local statistics (weight rounding) on crops instead of whole frames. Raises ValueError
    naming the first op that may pin a spatial size."""
    import onnx

    for node in proto.graph.node:
        if node.op_type in _SHAPE_PINNING_OPS:
            raise ValueError(f"{node.name or node.op_type} ({node.op_type}) may fix a spatial size: "
                             "the graph is not known to be fully convolutional")
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    inits = {t.name for t in copy.graph.initializer}
    for value in copy.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in inits and len(dims) == 4:
            dims[2].dim_value, dims[3].dim_value = height, width
    for value in copy.graph.output:
        value.type.tensor_type.ClearField("shape")
    del copy.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(copy, strict_mode=True)
