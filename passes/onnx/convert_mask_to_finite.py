"""Replace infinite / huge-negative mask constants by a finite mask value."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from neodragon_npu.kernels.attention import MASK_VALUE
from neodragon_npu.passes.base import Option, Pass, PassResult, PostconditionError

# Consumers that take weights, never masks: their constant inputs are not examined.
_WEIGHT_CONSUMERS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "LayerNormalization"}


def _needs_fix(array: np.ndarray, threshold: float) -> bool:
    return bool(np.isinf(array).any() or (array <= -threshold).any())


def _fixed(array: np.ndarray, threshold: float, value: float) -> np.ndarray:
    out = array.copy()
    out[np.isneginf(out) | (out <= -threshold)] = value
    out[np.isposinf(out)] = -value
    return out


class ConvertMaskToFinitePass(Pass):
    """Make additive-mask constants finite: -inf and values <= -threshold become ``mask_value``.

    SDPA lowering writes ``Where(mask, 0, -inf)`` and T5 uses ``finfo(float32).min``
    (-3.4e38); both overflow fixed point and FP16, and a fully masked row becomes
    ``softmax([-inf, ...]) = NaN``. A finite value masks the same (exp(-100) is 0 in fp32
    next to any visible score) and keeps fully masked rows finite::

        before: Where(mask, 0.0, -inf)        -> Add(scores, .) -> Softmax
        after:  Where(mask, 0.0, mask_value)  -> Add(scores, .) -> Softmax

    Looks at initializers, Constant and ConstantOfShape nodes of float type, skipping
    tensors read only as weights (MatMul/Gemm/Conv operands).
    """

    IR = "onnx"
    NAME = "convert_mask_to_finite"
    LOOKS_FOR = "mask constant at or below -threshold (-inf, finfo.min)"
    OPTIONS = {
        "mask_value": Option("float", "the finite value masked positions get", max=-1.0),
        "threshold": Option("float", "constants at or below -threshold count as masks", min=1.0),
    }

    def __init__(self, *, mask_value: float = MASK_VALUE, threshold: float = 1e4) -> None:
        if not np.isfinite(mask_value) or mask_value >= 0:
            raise ValueError(f"convert_mask_to_finite: mask_value must be finite and negative, got {mask_value}")
        self.mask_value = mask_value
        self.threshold = threshold

    def _candidates(self, model: ir.Model):
        """(label, getter, setter) for every float constant that could be a mask."""
        graph = model.graph
        for init in graph.initializers.values():
            tensor = init.const_value
            if tensor is None or not tensor.dtype.is_floating_point():
                continue
            if init.uses() and all(node.op_type in _WEIGHT_CONSUMERS for node, _ in init.uses()):
                continue
            yield (
                f"initializer {init.name}",
                lambda init=init: init.const_value.numpy(),
                lambda arr, init=init: setattr(init, "const_value", ir.Tensor(arr, name=init.name)),
            )
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.op_type not in ("Constant", "ConstantOfShape"):
                continue
            attr = node.attributes.get("value")
            if attr is None or attr.value is None or not attr.value.dtype.is_floating_point():
                continue
            yield (
                f"{node.op_type} node {node.name}",
                lambda attr=attr: attr.value.numpy(),
                lambda arr, node=node: node.attributes.__setitem__(
                    "value", ir.AttrTensor("value", ir.Tensor(arr))
                ),
            )

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for _label, get, put in list(self._candidates(model)):
            array = get()
            if _needs_fix(array, self.threshold):
                put(_fixed(array, self.threshold, self.mask_value))
                modified = True
        return PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        for label, get, _put in self._candidates(model):
            if _needs_fix(get(), self.threshold):
                raise PostconditionError(f"convert_mask_to_finite: {label} still holds an infinite mask value")
