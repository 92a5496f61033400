import torch

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.fx.specialize_shapes import SpecializeShapesPass
from tests.helpers import FP32_ATOL, check_fx_pass


class HeadSplit(torch.nn.Module):
    """x.view(x.shape[0], -1, heads, d // heads) as in the released attention code."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x)
        y = y.view(x.shape[0], -1, 2, y.size(-1) // 2).transpose(1, 2)
        return y[:, :, : x.shape[1] - 1] * x.dim()


class NoShapes(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def _x():
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))


def test_shape_queries_become_constants_and_outputs_stay_equal():
    gm = fx_utils.trace(HeadSplit(), [_x()])
    check = check_fx_pass(SpecializeShapesPass(), gm, [_x()])
    assert check.modified
    assert check.max_abs_error <= FP32_ATOL
    for op in ("getattr", "size", "dim", "floordiv", "sub"):
        assert check.ops_before[op] >= 1 and check.ops_after[op] == 0, op
    assert (check.ops_before["getitem"], check.ops_after["getitem"]) == (3, 1)  # the tensor slice stays
    assert "proj.view(2, -1, 2, 4)" in gm.code


def test_second_run_reports_no_change():
    gm = fx_utils.trace(HeadSplit(), [_x()])
    SpecializeShapesPass()(gm)
    code = gm.code
    assert not SpecializeShapesPass()(gm).modified
    assert gm.code == code


def test_graph_without_shape_queries_is_untouched():
    gm = fx_utils.trace(NoShapes(), [_x()])
    code = gm.code
    check = check_fx_pass(SpecializeShapesPass(), gm, [_x()])
    assert not check.modified and gm.code == code and check.max_abs_error == 0


def test_denoiser_stage_graph_loses_every_shape_query(tiny_denoiser, tiny_stage_inputs):
    inputs = list(tiny_stage_inputs[0].values())
    gm = fx_utils.trace(tiny_denoiser.stage_module(0), inputs)
    check = check_fx_pass(SpecializeShapesPass(), gm, inputs)
    assert check.modified and check.max_abs_error == 0
    assert check.ops_before["getattr"] > 0 and check.ops_after["getattr"] == 0
