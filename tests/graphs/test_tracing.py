"""Tracing models we did not write: torch.export for any Python, leaf modules for the
symbolic tracer; and the HTP's limits refused before the QNN compiler runs."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs import onnx_io, qnn
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.targets import get_target
from neodragon_npu.passes import pipelines
from neodragon_npu.passes.base import PassManager
from tests.helpers import run_onnx


class Gate(torch.nn.Module):
    """Python control flow on a tensor's value: torch.fx's symbolic tracer cannot follow it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.linear(x).reshape(x.shape[0], -1, 4))


def test_leaf_modules_keep_control_flow_out_of_the_symbolic_tracer():
    x = torch.ones(2, 8)
    with pytest.raises(Exception):
        fx_utils.trace(Net(), [x])
    gm = fx_utils.trace(Net(), [x], leaf_modules=("Gate",))
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
    net = Net()
    net.load_state_dict(gm.state_dict())
    torch.testing.assert_close(gm(x), net(x))


def test_a_transformers_clip_encoder_traces_with_torch_export_and_exports_exactly(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=16, eos_token_id=2)
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(config).eval()
    ids = torch.randint(3, 60, (1, 16))
    with pytest.raises(Exception):
        fx_utils.trace(model, [ids])  # transformers' Python defeats the symbolic tracer
    gm = fx_utils.trace(model, [ids], method="export")
    PassManager(pipelines.cleanup_fx())(gm)
    with torch.no_grad():
        ref = model(ids).text_embeds.numpy()
    export_onnx(gm, [ids], tmp_path / "clip.onnx", input_names=["ids"], output_names=["text_embeds", "last_hidden"])
    onnx_model = onnx_io.load(tmp_path / "clip.onnx")
    PassManager(pipelines.cleanup_onnx())(onnx_model)
    out = run_onnx(onnx_model, {"ids": ids.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_a_rank_5_graph_is_refused_before_the_compiler_with_the_node_named(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y5"], name="to_5d"),
             helper.make_node("Relu", ["y5"], ["r"], name="relu5"),
             helper.make_node("Reshape", ["r", "back"], ["y"], name="to_2d")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor("shape", TensorProto.INT64, [5], [2, 2, 2, 2, 2]),
         helper.make_tensor("back", TensorProto.INT64, [2], [2, 16])])
    path = tmp_path / "r5.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    with pytest.raises(qnn.UnsupportedGraphError, match=r"to_5d \(Reshape\) makes 'y5' of rank 5"):
        qnn.compile_context_binary(path, tmp_path / "ctx.onnx", get_target("sm8750"))
    assert not (tmp_path / "ctx.onnx").exists()
