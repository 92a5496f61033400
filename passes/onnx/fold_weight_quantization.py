"""Store quantized weights as integers: fold QuantizeLinear(float weight) into the initializer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs.onnx_edit import along_axis, const_array
from neodragon_npu.passes.base import Pass, PassResult

_INTEGER = {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16}


def quantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1) -> np.ndarray:
    """ONNX QuantizeLinear on an array: saturate(round_half_even(x / scale) + zero_point),
    per tensor (scalar scale) or per slice along ``axis``; computed in float32 like
    onnxruntime's kernel."""
    x = np.asarray(x, dtype=np.float32)
    zero_point = np.asarray(zero_point)
    scale = along_axis(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    zp = along_axis(zero_point, x.ndim, axis)
    info = np.iinfo(zero_point.dtype)
    q = np.rint(x / scale) + zp.astype(np.float32)
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


class FoldWeightQuantizationPass(Pass):
    """Replace ``QuantizeLinear(W float)`` by an integer initializer holding its result::

        before: W (fp32 initializer) -> QuantizeLinear(scale, zp) -> DequantizeLinear -> MatMul
        after:  W (int8/int16 initializer) ------------------------> DequantizeLinear -> MatMul

    aimet's QDQ export keeps every weight in fp32 behind a QuantizeLinear, so a QDQ
    partition is as large as the float one and every consumer (the QNN compiler, a CPU
    session) quantizes the weights again when it loads it. Folded, the file holds what
    the NPU stores: 8-bit weights take a quarter of the bytes. The integers are exactly
    those QuantizeLinear computes (round half to even, saturated), so outputs do not move,
    and they keep the weight's name (AIMET encodings and QNN weight sharing key on it). A
    float weight that something else reads too is left as it is.
    """

    IR = "onnx"
    NAME = "fold_weight_quantization"
    LOOKS_FOR = "QuantizeLinear of a weight initializer"

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        folded = 0
        for node in list(graph):
            if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
                continue
            weight, scale_value, zp_value = node.inputs[:3]
            if weight is None or not weight.is_initializer() or scale_value is None or zp_value is None:
                continue  # an activation's quantizer: not a weight
            attrs = {a.name: a.value for a in node.attributes.values()}
            if attrs.get("block_size", 0) or attrs.get("output_dtype", 0) or attrs.get("saturate", 1) != 1:
                self.leave(node.name, "blocked, typed or non-saturating QuantizeLinear: not reproduced here")
                continue
            w, scale, zp = const_array(weight), const_array(scale_value), const_array(zp_value)
            if w is None or scale is None or zp is None or zp_value.dtype not in _INTEGER:
                self.leave(node.name, "scale or zero point is not a constant integer encoding")
                continue
            if len(weight.uses()) != 1 or weight.is_graph_output():
                self.leave(node.name, f"the float weight {weight.name} is read elsewhere too: kept as it is")
                continue
            axis = int(attrs.get("axis", 1))
            axis = axis + w.ndim if axis < 0 else axis
            # the integers take the weight's name: encodings files and weight sharing
            # across graphs key on it
            q = quantize_linear(w, scale, zp, axis)
            weight.const_value = ir.tensor(q, name=weight.name)
            weight.dtype = zp_value.dtype
            node.outputs[0].replace_all_uses_with(weight, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            folded += 1
        return PassResult(model, folded > 0)
