import torch

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs.fx_channels import Permute, Scale, apply_plan, plan_push_up


class Chain(torch.nn.Module):
    """Linear -> head view -> RMSNorm(* w) -> transpose: the Q path of an MMDiT block."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)
        self.w = torch.nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        h = self.lin(x).view(1, -1, 2, 4)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        return h.transpose(1, 2)


def _run(t):
    x = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(1))
    gm = fx_utils.trace(Chain(), [x])
    before = gm(x)
    out = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    plan = plan_push_up(gm, out, t)
    assert not isinstance(plan, str), plan
    apply_plan(gm, plan)
    return before, gm(x)


def test_permutation_lands_in_linear_rows_and_norm_weight():
    before, after = _run(Permute((2, 0, 3, 1)))
    assert torch.allclose(after, before[..., [2, 0, 3, 1]], atol=1e-6)


def test_scale_lands_in_the_norm_weight_only():
    before, after = _run(Scale(0.25))
    assert torch.allclose(after, before * 0.25, atol=1e-6)


def test_ops_that_do_not_commute_give_a_reason():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x)

    gm = fx_utils.trace(Bad(), [torch.zeros(2, 4)])
    out = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    reason = plan_push_up(gm, out, Permute((1, 0, 3, 2)))
    assert isinstance(reason, str) and "relu" in reason
