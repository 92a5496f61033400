import math

import numpy as np
import pytest
from onnx import TensorProto, helper

from neodragon_npu.graphs.verify import GraphInvariantError, compare, sqnr_db, verify_onnx
from tests.helpers import onnx_model


def test_sqnr_of_known_noise():
    ref = np.ones(1000)
    assert sqnr_db(ref, ref) == math.inf
    assert abs(sqnr_db(ref, ref * 1.01) - 40.0) < 1e-6  # noise power 1e-4 of the signal
    c = compare(ref, ref + 0.1)
    assert abs(c.max_abs_error - 0.1) < 1e-12 and abs(c.sqnr_db - 20.0) < 1e-6


def test_verify_onnx_rejects_dangling_inputs_and_dynamic_shapes():
    good = onnx_model(
        [helper.make_node("Relu", ["x"], ["y"], name="r")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    verify_onnx(good, static_shapes=True)
    dynamic = onnx_model(
        [helper.make_node("Relu", ["x"], ["y"], name="r")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    with pytest.raises(GraphInvariantError, match="has a dynamic shape"):
        verify_onnx(dynamic, static_shapes=True)


def test_verify_onnx_rejects_out_of_order_nodes():
    import onnx
    import onnx_ir as ir

    graph = helper.make_graph(
        [helper.make_node("Relu", ["y"], ["z"], name="second"), helper.make_node("Relu", ["x"], ["y"], name="first")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(GraphInvariantError, match="reads 'y' before it is produced"):
        verify_onnx(ir.serde.deserialize_model(proto))
