import torch
from torch import nn

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.fx.decompose_group_norm import DecomposeGroupNormPass
from tests.helpers import check_fx_pass


class Norms(nn.Module):
    """A GroupNorm module, the functional form (as a subclass's forward traces) and one
    without affine parameters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.GroupNorm(4, 16, eps=1e-6)
        self.w = nn.Parameter(torch.rand(16) + 0.5)
        self.b = nn.Parameter(torch.randn(16) * 0.1)
        with torch.no_grad():
            self.a.weight.uniform_(0.5, 1.5)
            self.a.bias.uniform_(-0.2, 0.2)
        self.plain = nn.GroupNorm(2, 16, affine=False)

    def forward(self, x):
        y = nn.functional.group_norm(torch.relu(self.a(x)), 8, self.w, self.b, 1e-5)
        return self.plain(y * 3 + 1)


def test_group_norms_become_reshape_free_ops_exactly():
    gm = fx_utils.trace(Norms(), [torch.zeros(2, 16, 6, 10)])
    x = torch.randn(2, 16, 6, 10) * 4 + 2
    check = check_fx_pass(DecomposeGroupNormPass(), gm, [x])
    assert check.modified and check.max_abs_error < 1e-4
    assert "GroupNorm" not in check.ops_after and "group_norm" not in check.ops_after
    assert check.ops_after["DecomposedGroupNorm"] == 3
    assert not {"reshape", "view"} & set(check.ops_after)
    again = DecomposeGroupNormPass()(gm)
    assert not again.modified and "nothing to do" in again.notes[0]


def test_a_group_norm_on_a_3d_tensor_is_left_alone():
    gm = fx_utils.trace(nn.GroupNorm(2, 8), [torch.zeros(1, 8, 5)])
    result = DecomposeGroupNormPass()(gm)
    assert not result.modified and "not on a 4-D tensor" in result.notes[0]
