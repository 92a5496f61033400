import pytest
import torch

from neodragon_npu.graphs import fx as fx_utils


class Viewer(torch.nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], -1, 2).sum(-1) * x.dim()


def test_trace_records_shapes_and_static_values():
    gm = fx_utils.trace(Viewer(), [torch.zeros(3, 8)])
    metas = {n.name: n.meta for n in gm.graph.nodes}
    assert metas["x"]["tensor_meta"].shape == (3, 8)
    assert metas["getitem"][fx_utils.STATIC_VALUE] == 3
    assert metas["dim"][fx_utils.STATIC_VALUE] == 2
    assert fx_utils.op_counts(gm) == {"view": 1, "sum": 1, "mul": 1, "getattr": 1, "getitem": 1, "dim": 1}


def test_trace_checks_the_number_of_examples():
    with pytest.raises(ValueError, match="takes 1 inputs, 2 examples given"):
        fx_utils.trace(Viewer(), [torch.zeros(1), torch.zeros(1)])


def test_untraced_graphs_have_no_input_specs():
    gm = torch.fx.symbolic_trace(Viewer())
    with pytest.raises(ValueError, match="no recorded input shape"):
        fx_utils.input_specs(gm)
