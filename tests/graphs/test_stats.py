import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs.stats import NodeRecord, TensorGraph, compute_stats, format_stats, fx_stats, onnx_stats
from tests.helpers import onnx_model


def test_liveness_over_a_hand_counted_graph():
    # x(100) -> a(200) -> b(50) ; a -> c(10) ; out = add(b, c) (5)
    nodes = [
        NodeRecord("n1", "Op", ("x",), ("a",)),
        NodeRecord("n2", "Op", ("a",), ("b",)),
        NodeRecord("n3", "Op", ("a",), ("c",)),
        NodeRecord("n4", "Add", ("b", "c"), ("out",)),
    ]
    sizes = {"x": 100, "a": 200, "b": 50, "c": 10, "out": 5}
    tg = TensorGraph(nodes, sizes, {k: (v,) for k, v in sizes.items()}, ["x"], ["out"], weight_bytes=7)
    stats = compute_stats(tg)
    assert stats.op_output_bytes == 265
    assert stats.largest_tensor == ("a", 200, (200,))
    # at n1: x + a = 300 (x dies after n1); at n2: a + b = 250; at n3: a + b + c = 260
    assert stats.peak_live_bytes == 300 and stats.peak_live_at == "n1"
    assert stats.weight_bytes == 7 and stats.op_counts["Op"] == 3


def test_onnx_stats_count_bytes_and_weights():
    w = np.ones((8, 16), dtype=np.float32)
    model = onnx_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Relu", ["y"], ["z"], name="r")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 16])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    stats = onnx_stats(model)
    assert stats.weight_bytes == w.nbytes
    assert stats.op_output_bytes == 2 * 4 * 16 * 4
    assert stats.peak_live_bytes == 2 * 4 * 16 * 4 and stats.peak_live_at == "r"  # y and z at the Relu
    a16 = onnx_stats(model, activation_bytes=2)
    assert a16.op_output_bytes == stats.op_output_bytes // 2
    assert "op-output bytes/call" in format_stats(stats, "t")


def test_fx_stats_on_a_traced_module():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 16)

        def forward(self, x):
            return torch.relu(self.lin(x))

    gm = fx_utils.trace(M(), [torch.zeros(4, 8)])
    stats = fx_stats(gm)
    assert stats.weight_bytes == (8 * 16 + 16) * 4
    assert stats.op_output_bytes == 2 * 4 * 16 * 4
    assert stats.op_counts == {"Linear": 1, "relu": 1}
