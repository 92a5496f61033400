"""FP16 emission: every float tensor in FP16; the HTP simulator then computes in FP16."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from neodragon_npu.graphs import qnn
from neodragon_npu.graphs.targets import get_target
from neodragon_npu.passes.base import PreconditionError
from neodragon_npu.passes.onnx.convert_to_fp16 import ConvertToFP16Pass
from tests.helpers import onnx_model, run_onnx


def _mlp(scale=1.0):
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], (rng.standard_normal(64) * scale).astype(np.float32))
    c = helper.make_tensor("c", TensorProto.FLOAT, [], [3.0])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Mul", ["h", "c"], ["h2"], name="mul"),
        helper.make_node("Cast", ["h2"], ["h3"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Relu", ["h3"], ["y"], name="relu"),
    ]
    return onnx_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], [w, c])


def test_every_float_tensor_becomes_fp16_and_outputs_stay_close():
    model = _mlp()
    x = np.random.default_rng(1).standard_normal((1, 4, 8)).astype(np.float32)
    ref = run_onnx(model, {"x": x})[0]
    result = ConvertToFP16Pass()(model)
    assert result.modified
    graph = result.model.graph
    assert graph.inputs[0].dtype == graph.outputs[0].dtype == ir.DataType.FLOAT16
    assert all(v.dtype == ir.DataType.FLOAT16 for v in graph.initializers.values())
    assert next(n for n in graph if n.op_type == "Cast").attributes["to"].value == ir.DataType.FLOAT16
    out = run_onnx(result.model, {"x": x.astype(np.float16)})[0]
    assert out.dtype == np.float16 and np.abs(out.astype(np.float32) - ref).max() < 1e-2 * np.abs(ref).max()
    again = ConvertToFP16Pass()(result.model)
    assert not again.modified and again.notes  # nothing left to convert, and it says so


def test_a_quantized_graph_is_refused():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s"], ["y"])]
    model = onnx_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                       [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])])
    with pytest.raises(PreconditionError, match="Q/DQ"):
        ConvertToFP16Pass()(model)


def test_the_htp_simulator_computes_an_fp16_graph_in_fp16(tmp_path):
    """An intermediate of 5e5 is past FP16's 65,504: the FP32 graph gets it right in the
    simulator, the FP16 graph does not (what the device would do to both)."""
    nodes = [helper.make_node("Mul", ["x", "big"], ["h"], name="up"), helper.make_node("Div", ["h", "big"], ["y"], name="down")]
    model = onnx_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                       [helper.make_tensor("big", TensorProto.FLOAT, [], [1e4])])
    x = np.linspace(40, 60, 64, dtype=np.float32)[None]
    target = get_target("sm8750")
    outs = {}
    for name, m, feed in (("fp32", model, x), ("fp16", ConvertToFP16Pass()(_copy(model)).model, x.astype(np.float16))):
        path = tmp_path / f"{name}.onnx"
        onnx.save(ir.serde.serialize_model(m), str(path))
        ctx = qnn.compile_context_binary(path, tmp_path / f"{name}_ctx.onnx", target)
        outs[name] = qnn.run(qnn.htp_session(ctx.epcontext_model, target), {"x": feed})[0].astype(np.float32)
    np.testing.assert_allclose(outs["fp32"], x, rtol=1e-3)  # no overflow (the simulator rounds a little)
    assert np.abs(outs["fp16"] - x).max() > 1.0  # saturated on the way, not the input back


def _copy(model):
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))
