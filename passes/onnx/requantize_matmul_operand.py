"""Keep K and V at 16 bit on the HTP: requantize a dynamic MatMul's second operand to int16."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs.onnx_edit import const_array, producer
from neodragon_npu.passes.base import Pass, PassResult

_UNSIGNED = {ir.DataType.UINT16, ir.DataType.UINT8}


def _dequantized_activation(value: ir.Value) -> ir.Node | None:
    """The DequantizeLinear producing ``value`` if it dequantizes an activation (not a weight)."""
    dq = producer(value, "DequantizeLinear")
    if dq is None:
        return None
    q = producer(dq.inputs[0], "QuantizeLinear")
    if q is None:
        return None
    source = q.inputs[0]
    if source.is_initializer() or source.const_value is not None or producer(source, "Constant") is not None:
        return None  # a weight quantized in the graph
    return dq


class RequantizeMatMulOperandPass(Pass):
    """Give the second operand of activation x activation MatMuls a symmetric int16 encoding.

    The QNN EP treats a MatMul's second input like a weight: an unsigned 16-bit dynamic
    operand (K^T in QK^T, V in PV) is converted to 8 bit before the HTP sees it; a signed
    symmetric int16 one is kept (docs/measurements.md). So each such operand gets a requantization to int16 right at the
    MatMul, covering the same range::

        before: ... -> Q(u16) -> DQ -> MatMul(a, .)
        after:  ... -> Q(u16) -> DQ -> Q(s16, zp 0) -> DQ -> MatMul(a, .)

    The producer keeps its unsigned encoding (a Linear with a signed output is not placed on
    the HTP). Operands that are already signed, and weights, are left alone.
    """

    IR = "onnx"
    NAME = "requantize_matmul_operand"
    LOOKS_FOR = "MatMul of two dequantized activations with an unsigned second operand"

    def call(self, model: ir.Model) -> PassResult:
        inserted = 0
        for node in list(model.graph):
            if node.op_type != "MatMul" or len(node.inputs) != 2:
                continue
            first, second = (_dequantized_activation(v) for v in node.inputs)
            if first is None or second is None:
                continue
            zero_point = second.inputs[2]
            if zero_point is None or zero_point.dtype not in _UNSIGNED:
                self.leave(node.name, "its second operand is signed already: the QNN EP keeps it at 16 bit")
                continue
            scale = const_array(second.inputs[1])
            zp = const_array(zero_point)
            if scale is None or zp is None or scale.size != 1:
                self.leave(node.name, "the second operand's encoding is not one constant scale and zero point")
                continue
            levels = 65535 if zero_point.dtype == ir.DataType.UINT16 else 255
            lo, hi = float(scale) * (0 - float(zp)), float(scale) * (levels - float(zp))
            sym_scale = max(abs(lo), abs(hi)) / 32767.0
            name = f"{node.name or 'matmul'}_operand1_s16"
            s_init = ir.Value(name=f"{name}_scale", const_value=ir.tensor(np.array(sym_scale, dtype=np.float32)))
            z_init = ir.Value(name=f"{name}_zero_point", const_value=ir.tensor(np.array(0, dtype=np.int16)))
            s_init.dtype, z_init.dtype = ir.DataType.FLOAT, ir.DataType.INT16
            s_init.shape = z_init.shape = ir.Shape([])
            model.graph.register_initializer(s_init)
            model.graph.register_initializer(z_init)
            q = ir.node("QuantizeLinear", [node.inputs[1], s_init, z_init], name=f"{name}_q")
            dq = ir.node("DequantizeLinear", [q.outputs[0], s_init, z_init], name=f"{name}_dq")
            q.outputs[0].name, dq.outputs[0].name = f"{name}_q_out", f"{name}_out"
            q.outputs[0].dtype = ir.DataType.INT16
            q.outputs[0].shape = dq.outputs[0].shape = node.inputs[1].shape
            dq.outputs[0].dtype = ir.DataType.FLOAT
            model.graph.insert_before(node, [q, dq])
            node.replace_input_with(1, dq.outputs[0])
            inserted += 1
        return PassResult(model, inserted > 0)
