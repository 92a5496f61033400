import numpy as np
import onnx
from onnx import TensorProto, helper

from neodragon_npu.passes.onnx.fold_constants import FoldConstantsPass
from tests.helpers import check_onnx_pass, onnx_model


def _shape_chain_model():
    """Reshape(x, Concat(Gather(Shape(x), 0), [-1, 2])) and a transposed weight."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Concat", ["b", "tail"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["r", "wt"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
        onnx.numpy_helper.from_array(np.array([-1, 4], np.int64), "tail"),
        onnx.numpy_helper.from_array(w, "w"),
    ]
    return onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        inits,
    )


FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 2, 4)).astype(np.float32)}


def test_shape_chains_and_weight_transposes_fold():
    check = check_onnx_pass(FoldConstantsPass(), _shape_chain_model(), FEEDS)
    assert check.modified and check.max_abs_error == 0
    for op in ("Shape", "Gather", "Concat", "Transpose"):
        assert check.ops_before[op] == 1 and check.ops_after[op] == 0, op
    assert not FoldConstantsPass()(check.model).modified


def test_nothing_to_fold():
    model = onnx_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 4])],
    )
    check = check_onnx_pass(FoldConstantsPass(), model, FEEDS)
    assert not check.modified and check.ops_after == check.ops_before
