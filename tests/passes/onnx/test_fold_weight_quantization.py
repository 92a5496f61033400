import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from neodragon_npu.graphs.onnx_edit import weight_values
from neodragon_npu.passes.onnx.fold_weight_quantization import FoldWeightQuantizationPass
from tests.helpers import check_onnx_pass, clone_onnx, onnx_model, run_onnx


def _qdq_model(rng):
    """x -> MatMul(DQ(Q(W1))) per channel int8 -> MatMul(DQ(Q(W2))) per tensor int16, and a
    third weight that is quantized but also read directly (it must stay float)."""
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    s1 = (np.abs(w1).max(axis=0) / 127).astype(np.float32)
    # exact ties (k + 0.5 steps) and values past the range (saturation) in the first column
    w1[0, 0], w1[1, 0], w1[2, 0], w1[3, 0] = 2.5 * s1[0], -3.5 * s1[0], 200 * s1[0], -300 * s1[0]
    s1[0] = np.float32(s1[0])
    w2 = rng.standard_normal((8, 8)).astype(np.float32)
    s2 = np.array(np.abs(w2).max() / 32767, dtype=np.float32)
    w3 = rng.standard_normal((8, 8)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(s1, "s1"),
        numpy_helper.from_array(np.zeros(8, np.int8), "z1"),
        numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(s2, "s2"),
        numpy_helper.from_array(np.array(0, np.int16), "z2"),
        numpy_helper.from_array(w3, "w3"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["w1", "s1", "z1"], ["w1_q"], axis=1, name="q1"),
        helper.make_node("DequantizeLinear", ["w1_q", "s1", "z1"], ["w1_dq"], axis=1, name="dq1"),
        helper.make_node("MatMul", ["x", "w1_dq"], ["h"], name="mm1"),
        helper.make_node("QuantizeLinear", ["w2", "s2", "z2"], ["w2_q"], name="q2"),
        helper.make_node("DequantizeLinear", ["w2_q", "s2", "z2"], ["w2_dq"], name="dq2"),
        helper.make_node("MatMul", ["h", "w2_dq"], ["h2"], name="mm2"),
        helper.make_node("QuantizeLinear", ["w3", "s2", "z2"], ["w3_q"], name="q3"),
        helper.make_node("DequantizeLinear", ["w3_q", "s2", "z2"], ["w3_dq"], name="dq3"),
        helper.make_node("MatMul", ["h2", "w3_dq"], ["h3"], name="mm3"),
        helper.make_node("MatMul", ["h3", "w3"], ["y"], name="mm4"),
    ]
    return onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        inits,
    )


def _onnxruntime_quantized(model: ir.Model) -> dict[str, np.ndarray]:
    """What onnxruntime's QuantizeLinear gives for each quantized weight (graph outputs)."""
    proto = ir.serde.serialize_model(clone_onnx(model))
    del proto.graph.output[:]
    for name in ("w1_q", "w2_q", "w3_q"):
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    outs = run_onnx(ir.serde.deserialize_model(proto), {"x": np.zeros((4, 16), np.float32)})
    return dict(zip(("w1", "w2", "w3"), outs))


def test_weights_become_the_integers_quantize_linear_computes():
    rng = np.random.default_rng(0)
    model = _qdq_model(rng)
    expected = _onnxruntime_quantized(model)
    assert expected["w1"][0, 0] == 2 and expected["w1"][1, 0] == -4  # ties round to even
    assert expected["w1"][2, 0] == 127 and expected["w1"][3, 0] == -128  # saturated
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    check = check_onnx_pass(FoldWeightQuantizationPass(), model, feeds)
    assert check.modified and check.max_abs_error == 0.0  # the same integers: outputs do not move
    assert check.ops_after["QuantizeLinear"] == 1  # w3 is also read as float: left alone
    inits = check.model.graph.initializers
    assert inits["w1"].dtype == ir.DataType.INT8 and inits["w2"].dtype == ir.DataType.INT16
    np.testing.assert_array_equal(inits["w1"].const_value.numpy(), expected["w1"])
    np.testing.assert_array_equal(inits["w2"].const_value.numpy(), expected["w2"])
    assert inits["w3"].dtype == ir.DataType.FLOAT
    again = FoldWeightQuantizationPass()(check.model)
    assert not again.modified


def test_weight_values_reads_folded_and_float_weights_alike():
    rng = np.random.default_rng(1)
    model = _qdq_model(rng)
    before = weight_values(model)
    folded = FoldWeightQuantizationPass()(clone_onnx(model)).model
    after = weight_values(folded)
    assert set(after) == {"w1", "w2", "w3"}
    np.testing.assert_array_equal(after["w3"], before["w3"])  # still float
    q = _onnxruntime_quantized(model)["w1"].astype(np.float32)
    scale = folded.graph.initializers["s1"].const_value.numpy()
    np.testing.assert_array_equal(after["w1"], q * scale)
