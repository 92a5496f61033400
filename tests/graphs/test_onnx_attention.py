"""The split attention traced as one node and expanded in ONNX equals the kernel."""

import contextlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from neodragon_npu.graphs import export as export_module
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.onnx_attention import expand_split_attention
from neodragon_npu.kernels.attention import MASK_VALUE, SPLIT_ATTENTION_DOMAIN, attention_split, traced_as_one_node


class _Attention(torch.nn.Module):
    """A projection, the split attention, a projection: the node sits inside a graph."""

    def __init__(self, chunks, scale, with_bias: bool = True):
        super().__init__()
        self.chunks, self.scale, self.with_bias = chunks, scale, with_bias
        self.proj = torch.nn.Linear(8, 8)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(8, 8, generator=gen) / 8**0.5)
            self.proj.bias.copy_(torch.randn(8, generator=gen) * 0.1)

    def forward(self, q, k, v, bias):
        out = attention_split(self.proj(q), k, v, bias if self.with_bias else None, chunks=self.chunks, scale=self.scale)
        return out * 2.0


def _block_causal_bias(seq: int, frame: int) -> torch.Tensor:
    """Queries of frame f see keys of frames <= f: each frame's rows share one bias row."""
    frame_of = torch.arange(seq) // frame
    hidden = frame_of[None, :] > frame_of[:, None]
    return torch.zeros(1, 1, seq, seq).masked_fill(hidden, MASK_VALUE)


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


CASES = {
    # folded bias rows with shorter keys, and a chunk that adds its bias
    "block_causal": (((0, 6, 6, 0), (6, 12, 12, 6), (12, 15, 18, -1), (15, 18, 18, 15)), None, True),
    "added_bias_scaled": (((0, 7, 18, -1), (7, 18, 18, -1)), 0.3, True),
    "no_bias_one_chunk": (((0, 18, 18, -1),), 1.0, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_expanded_graph_equals_the_kernel_and_the_op_by_op_export(tmp_path, monkeypatch, case):
    chunks, scale, with_bias = CASES[case]
    module = _Attention(chunks, scale, with_bias).eval()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 18, 8, generator=gen) for _ in range(3))
    bias = _block_causal_bias(18, 6)
    names = ["q", "k", "v", "bias"]
    with torch.no_grad():
        ref = module(q, k, v, bias).numpy()
    feeds = {n: t.numpy() for n, t in zip(names, (q, k, v, bias))}

    one_node = export_onnx(module, (q, k, v, bias), tmp_path / "one_node.onnx", input_names=names, output_names=["out"])
    proto = onnx.load(str(one_node))
    assert not [n for n in proto.graph.node if n.domain == SPLIT_ATTENTION_DOMAIN]
    assert SPLIT_ATTENTION_DOMAIN not in {o.domain for o in proto.opset_import}
    onnx.checker.check_model(proto, full_check=True)  # every new value's shape and type agree
    # its constants carry generated names, which the weight naming replaces by content names
    # (so the stage graphs of one model share them)
    from neodragon_npu.passes.onnx.name_weights_by_content import NameWeightsByContentPass

    named = NameWeightsByContentPass()(ir.load(str(one_node))).model
    assert all(n.startswith("w_") or n.startswith("proj.") for n in named.graph.initializers), \
        sorted(named.graph.initializers)
    np.testing.assert_allclose(_run(one_node, feeds), ref, rtol=1e-5, atol=1e-5)  # fp32 sums in another order

    # the same graph traced op by op (what the export did before) gives the same numbers
    monkeypatch.setattr(export_module, "traced_as_one_node", contextlib.nullcontext)
    op_by_op = export_onnx(module, (q, k, v, bias), tmp_path / "op_by_op.onnx", input_names=names, output_names=["out"])
    np.testing.assert_array_equal(_run(one_node, feeds), _run(op_by_op, feeds))
    softmaxes = [sum(n.op_type == "Softmax" for n in onnx.load(str(p)).graph.node) for p in (one_node, op_by_op)]
    assert softmaxes == [3 * len(chunks)] * 2  # per head and chunk


def test_eager_calls_compute_inside_the_context():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen) for _ in range(3))
    chunks = ((0, 3, 6, -1), (3, 6, 6, -1))
    with traced_as_one_node():
        inside = attention_split(q, k, v, None, chunks=chunks)
    assert torch.equal(inside, attention_split(q, k, v, None, chunks=chunks))
    assert inside.abs().sum() > 0


def test_chunks_that_miss_queries_are_refused():
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21, SPLIT_ATTENTION_DOMAIN: 1})
    q, k, v = (ir.Value(name=n, shape=ir.Shape([1, 2, 6, 4]), type=ir.TensorType(ir.DataType.FLOAT)) for n in "qkv")
    graph.inputs.extend([q, k, v])
    node = ir.node("SplitAttention", [q, k, v], {"chunks": [0, 3, 6, -1, 4, 6, 6, -1], "scale": 1.0},
                   domain=SPLIT_ATTENTION_DOMAIN, name="att")
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    with pytest.raises(ValueError, match="do not cover the 6 queries"):
        expand_split_attention(ir.Model(graph, ir_version=10))


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_score_tensors_of_a_split_attention_are_found_as_one_group(tmp_path, with_bias):
    """Heads x chunks Softmax inputs in one group; with a bias added to the scores, the QK^T
    outputs before it in a second."""
    from neodragon_npu.graphs import onnx_io
    from neodragon_npu.graphs.onnx_attention import split_attention_score_groups

    class Split(torch.nn.Module):
        def forward(self, q, k, v, bias):
            return attention_split(q, k, v, bias if with_bias else None, chunks=((0, 3, 6, -1), (3, 6, 6, -1)))

    q = torch.zeros(1, 2, 6, 4)
    path = tmp_path / "split.onnx"
    export_onnx(Split().eval(), [q, q, q, torch.zeros(1, 1, 6, 6)], path, input_names=["q", "k", "v", "bias"],
                output_names=["y"])
    model = onnx_io.load(path)
    groups = split_attention_score_groups(model)
    softmax_inputs = {n.inputs[0].name for n in model.graph if n.op_type == "Softmax"}
    assert len(softmax_inputs) == 4
    assert [set(g) for g in groups if set(g) == softmax_inputs] == [softmax_inputs]
    before_bias = [g for g in groups if set(g) != softmax_inputs]
    if with_bias:
        assert len(before_bias) == 1 and len(before_bias[0]) == 4
        assert all(_producer_op(model, n) == "MatMul" for n in before_bias[0])
    else:
        assert before_bias == []


def _producer_op(model, name):
    return next(n.op_type for n in model.graph for o in n.outputs if o.name == name)
