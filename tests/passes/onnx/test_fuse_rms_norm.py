import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.passes.onnx.fold_constants import FoldConstantsPass
from neodragon_npu.passes.onnx.fuse_rms_norm import FuseRMSNormPass
from tests.helpers import check_onnx_pass, onnx_model


class RMS(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.w


FEEDS = {"x": np.random.default_rng(0).standard_normal((1, 4, 2, 16)).astype(np.float32)}


def _exported(tmp_path):
    export_onnx(RMS(), [torch.zeros(1, 4, 2, 16)], tmp_path / "r.onnx", input_names=["x"], output_names=["y"])
    model = onnx_io.load(tmp_path / "r.onnx")
    FoldConstantsPass()(model)
    return model


def test_exported_rmsnorm_becomes_one_op(tmp_path):
    check = check_onnx_pass(FuseRMSNormPass(), _exported(tmp_path), FEEDS)
    assert check.modified and check.max_abs_error < 1e-5
    assert check.ops_after == {"RMSNormalization": 1}
    assert check.ops_before["Pow"] == 1 and check.ops_before["Mul"] == 2
    assert check.model.opset_imports[""] == 23
    node = next(iter(check.model.graph))
    assert abs(node.attributes["epsilon"].value - 1e-5) < 1e-12
    assert not FuseRMSNormPass()(check.model).modified


def test_a_mean_over_another_axis_is_not_rmsnorm():
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axis1"], ["m"], keepdims=1),
        helper.make_node("Add", ["m", "eps"], ["a"]),
        helper.make_node("Sqrt", ["a"], ["r"]),
        helper.make_node("Div", ["one", "r"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["n"]),
        helper.make_node("Mul", ["n", "w"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        onnx.numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        onnx.numpy_helper.from_array(np.ones(16, np.float32), "w"),
    ]
    model = onnx_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 16])],
        inits,
    )
    check = check_onnx_pass(FuseRMSNormPass(), model, FEEDS)
    assert not check.modified and check.ops_after == check.ops_before
    assert model.opset_imports[""] == 21
