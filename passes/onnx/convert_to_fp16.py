"""Emit a float graph in FP16: what the HTP computes a float graph in."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs.onnx_edit import is_quantized
from neodragon_npu.passes.base import Pass, PassResult, PreconditionError

# Inputs whose type constraint is float32 only (the op has no float16 form for them).
_FLOAT32_ONLY = {("Resize", 2), ("Upsample", 1)}


def _fp16_tensor(tensor) -> ir.Tensor:
    return ir.tensor(np.asarray(tensor.numpy(), dtype=np.float32).astype(np.float16), name=tensor.name)


class ConvertToFP16Pass(Pass):
    """Every float32 tensor becomes float16: weights, graph inputs and outputs, activations,
    ``Cast(to=float)`` and float constants::

        before: x f32 -> MatMul(x, W f32) -> Add(., b f32) -> y f32
        after:  x f16 -> MatMul(x, W f16) -> Add(., b f16) -> y f16

    The HTP computes float graphs in FP16 with no FP32 upcast, but the x86 HTP simulator
    runs an FP32 graph in FP32 and would hide an overflow the device shows; only an FP16
    graph runs there as on the device (shared/stack.md). Inputs that ops take in float32
    only (``Resize`` scales) stay float32. A graph with no float32 tensor, or a quantized
    (QDQ) graph, is not touched.
    """

    IR = "onnx"
    NAME = "convert_to_fp16"
    LOOKS_FOR = "float32 tensor"

    def requires(self, model: ir.Model) -> None:
        if is_quantized(model):
            raise PreconditionError("convert_to_fp16: the model holds Q/DQ nodes; FP16 is for float graphs")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        keep32 = {
            node.inputs[i].name
            for node in graph
            for (op, i) in _FLOAT32_ONLY
            if node.op_type == op and len(node.inputs) > i and node.inputs[i] is not None
        }
        changed = 0
        for name, value in graph.initializers.items():
            if value.dtype == ir.DataType.FLOAT and name not in keep32 and value.const_value is not None:
                value.const_value = _fp16_tensor(value.const_value)
                value.dtype = ir.DataType.FLOAT16
                changed += 1
        for value in list(graph.inputs) + list(graph.outputs):
            if value.dtype == ir.DataType.FLOAT and value.name not in keep32:
                value.dtype = ir.DataType.FLOAT16
                changed += 1
        for node in graph:
            if node.op_type == "Cast":
                to = node.attributes.get("to")
                if to is not None and to.value == ir.DataType.FLOAT:
                    node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT16)
                    changed += 1
            elif node.op_type in ("Constant", "ConstantOfShape"):
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value.dtype == ir.DataType.FLOAT \
                        and node.outputs[0].name not in keep32:
                    node.attributes["value"] = ir.AttrTensor("value", _fp16_tensor(attr.value))
                    changed += 1
            for value in node.outputs:
                if value.dtype == ir.DataType.FLOAT and value.name not in keep32:
                    value.dtype = ir.DataType.FLOAT16
                    changed += 1
        return PassResult(model, changed > 0)
