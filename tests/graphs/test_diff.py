from onnx import TensorProto, helper

from neodragon_npu.graphs.diff import diff_onnx, format_diff
from tests.helpers import onnx_model


def _model(extra_relu: bool):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r1")]
    out = "y"
    if extra_relu:
        nodes.append(helper.make_node("Relu", ["y"], ["z"], name="r2"))
        out = "z"
    return onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 3])],
    )


def test_diff_reports_added_nodes_and_op_deltas():
    d = diff_onnx(_model(False), _model(True))
    assert d.op_counts == {"Relu": (1, 2)}
    assert d.added == [("r2", "Relu")] and d.removed == []
    text = format_diff(d)
    assert "+ Relu" in text and "Relu" in text and "(+1)" in text


def test_identical_graphs_have_no_structural_differences():
    d = diff_onnx(_model(True), _model(True))
    assert d.identical_structure
    assert "No structural differences." in format_diff(d)
