import numpy as np
import onnx
from onnx import TensorProto, helper

from neodragon_npu.passes.onnx.remove_unused_nodes import RemoveUnusedNodesPass
from tests.helpers import check_onnx_pass, onnx_model

FEEDS = {"x": np.arange(4, dtype=np.float32)}


def _model(dead: bool):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    inits = []
    if dead:
        nodes.append(helper.make_node("Add", ["x", "c"], ["unused"]))
        inits.append(onnx.numpy_helper.from_array(np.ones(4, np.float32), "c"))
    return onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        inits,
    )


def test_dead_nodes_and_their_initializers_go():
    check = check_onnx_pass(RemoveUnusedNodesPass(), _model(dead=True), FEEDS)
    assert check.modified and check.max_abs_error == 0
    assert check.ops_before["Add"] == 1 and check.ops_after["Add"] == 0
    assert "c" not in check.model.graph.initializers
    assert not RemoveUnusedNodesPass()(check.model).modified


def test_live_graph_is_untouched():
    check = check_onnx_pass(RemoveUnusedNodesPass(), _model(dead=False), FEEDS)
    assert not check.modified and check.ops_after == check.ops_before
