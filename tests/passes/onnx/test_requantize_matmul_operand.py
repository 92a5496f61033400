import numpy as np
import onnx_ir as ir
import pytest
import torch

from neodragon_npu.graphs import onnx_io, qnn
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.targets import get_target
from neodragon_npu.graphs.verify import sqnr_db
from neodragon_npu.passes.onnx.quantize_w8a16 import QuantizeW8A16Pass
from neodragon_npu.passes.onnx.requantize_matmul_operand import RequantizeMatMulOperandPass
from tests.helpers import check_onnx_pass, clone_onnx


class PV(torch.nn.Module):
    def forward(self, s, v):
        return torch.softmax(s, -1) @ v


def _feeds(rng):
    return {"s": (rng.standard_normal((1, 1, 8, 16)) * 2).astype(np.float32),
            "v": (rng.standard_normal((1, 1, 16, 64)) * 2).astype(np.float32)}


@pytest.fixture(scope="module")
def unsigned_qdq(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pv")
    export_onnx(PV().eval(), [torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 16, 64)], folder / "f.onnx",
                input_names=["s", "v"], output_names=["y"])
    rng = np.random.default_rng(0)
    cal = [_feeds(rng) for _ in range(8)]
    qdq = QuantizeW8A16Pass(calibration=cal)(onnx_io.load(folder / "f.onnx")).model  # unsigned V
    return folder, qdq, _feeds(rng)


def test_v_gets_a_signed_int16_requantization_with_the_same_values(unsigned_qdq):
    _, qdq, feeds = unsigned_qdq
    check = check_onnx_pass(RequantizeMatMulOperandPass(), clone_onnx(qdq), feeds)
    assert check.modified and check.max_abs_error < 1e-3  # a finer grid over the same range
    assert check.ops_after["QuantizeLinear"] == check.ops_before["QuantizeLinear"] + 1
    matmul = next(n for n in check.model.graph if n.op_type == "MatMul" and n.inputs[1].producer().op_type == "DequantizeLinear"
                  and n.inputs[1].producer().inputs[2].dtype == ir.DataType.INT16)
    assert matmul is not None
    assert not RequantizeMatMulOperandPass()(check.model).modified


def test_the_htp_keeps_v_at_16_bit_only_when_signed(unsigned_qdq, tmp_path):
    folder, qdq, feeds = unsigned_qdq
    ref = qnn.cpu_session(folder / "f.onnx").run(None, feeds)[0]
    target = get_target("sm8750")
    results = {}
    for label, model in (("unsigned", qdq), ("signed", RequantizeMatMulOperandPass()(clone_onnx(qdq)).model)):
        onnx_io.save(model, tmp_path / f"{label}.onnx")
        ctx = qnn.compile_context_binary(tmp_path / f"{label}.onnx", tmp_path / f"{label}_ctx.onnx", target)
        results[label] = sqnr_db(ref, qnn.run(qnn.htp_session(ctx.epcontext_model, target), feeds)[0])
    # measured: unsigned V ~35 dB (the QNN EP made it 8 bit), signed int16 V ~70 dB
    assert results["signed"] > results["unsigned"] + 20 and results["signed"] > 60


def test_weights_and_float_matmuls_are_left_alone():
    import onnx
    from onnx import TensorProto, helper

    from tests.helpers import onnx_model

    model = onnx_model(
        [helper.make_node("MatMul", ["a", "w"], ["y"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w")],
    )
    assert not RequantizeMatMulOperandPass()(model).modified
