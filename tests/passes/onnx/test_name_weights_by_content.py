import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from neodragon_npu.passes.onnx.name_weights_by_content import NameWeightsByContentPass, content_name
from tests.helpers import check_onnx_pass, onnx_model

W = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 100
FEEDS = {"x": np.ones((1, 64), np.float32)}


def _model(counter: int):
    return onnx_model(
        [helper.make_node("MatMul", ["x", f"onnx::MatMul_{counter}"], ["h"]), helper.make_node("Add", ["h", "lin.bias"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [onnx.numpy_helper.from_array(W, f"onnx::MatMul_{counter}"),
         onnx.numpy_helper.from_array(np.ones(32, np.float32) / 8, "lin.bias")],
    )


def test_the_same_weight_gets_the_same_name_in_two_graphs():
    a = check_onnx_pass(NameWeightsByContentPass(min_bytes=64), _model(6337), FEEDS)
    b = check_onnx_pass(NameWeightsByContentPass(min_bytes=64), _model(4821), FEEDS)
    assert a.modified and b.modified and a.max_abs_error == 0
    names = set(a.model.graph.initializers)
    assert names == set(b.model.graph.initializers)
    assert names == {content_name(ir.tensor(W)), "lin.bias"}  # the parameter's own name is kept
    assert not NameWeightsByContentPass(min_bytes=64)(a.model).modified


def test_small_tensors_are_left_alone():
    check = check_onnx_pass(NameWeightsByContentPass(min_bytes=1 << 20), _model(1), FEEDS)
    assert not check.modified and "onnx::MatMul_1" in check.model.graph.initializers
