"""Name large initializers after their contents, so graphs sharing weights share names."""

from __future__ import annotations

import hashlib
import re

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from neodragon_npu.passes.base import Option, Pass, PassResult

PREFIX = "w_"
# Names an exporter makes up (counters, output names); parameter names are kept as they are.
_GENERATED = re.compile(r"^(onnx::|val_|_val|/|w_)|_output_\d+$")


def content_name(tensor: ir.TensorProtocol) -> str:
    digest = hashlib.sha1(tensor.tobytes()).hexdigest()[:16]
    shape = "x".join(str(d) for d in tensor.shape)
    return f"{PREFIX}{shape}_{digest}"


class NameWeightsByContentPass(Pass):
    """Rename exporter-made initializer names to ``w_<shape>_<sha1 prefix>``.

    The exporter names a folded weight after a counter (``onnx::MatMul_6337``), and the
    counter differs between the three stage graphs of one model. Weight sharing (one copy
    in a QNN context), frozen weight encodings and partition alignment all match weights
    by name, so names must follow the contents::

        before: stage 2 reads onnx::MatMul_6337, stage 1 reads onnx::MatMul_4821 (same W^T)
        after:  both read w_1536x1536_9c0f5d1e2a7b4c33

    Every generated name is renamed, however small the tensor: a counter name such as
    ``/norm_2/Constant_output_0`` can exist in two stage graphs with different contents,
    and a frozen encoding matched by that name would then be wrong. Parameters that kept
    their module path (``...to_q.bias``) are left as they are. Identical tensors in one
    graph end up as one initializer. ``min_bytes`` skips tensors smaller than that.
    """

    IR = "onnx"
    NAME = "name_weights_by_content"
    LOOKS_FOR = "weight not yet named after its content"
    OPTIONS = {"min_bytes": Option("int", "rename only weights of at least this many bytes", min=0)}

    def __init__(self, *, min_bytes: int = 0) -> None:
        self.min_bytes = min_bytes

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        # A Constant node's output is a weight too (aimet quantizes a LayerNorm scale that
        # the exporter wrote as a Constant): make it an initializer so it is named as one.
        lifted = LiftConstantsToInitializersPass(size_limit=0)(model).modified
        renamed = 0
        seen: dict[str, ir.Value] = {}
        for name, value in list(graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or tensor.nbytes < self.min_bytes or value.is_graph_input():
                continue
            if not _GENERATED.search(name):  # a parameter's own name is the same in every graph
                continue
            new = content_name(tensor)
            if new == name:
                seen[new] = value
                continue
            if new in seen:  # same contents already registered: read that one
                value.replace_all_uses_with(seen[new])
                graph.initializers.pop(name)
            else:
                graph.initializers.pop(name)
                value.name = new
                graph.register_initializer(value)
                seen[new] = value
            renamed += 1
        return PassResult(model, lifted or renamed > 0)
