import torch

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.fx.remove_identity_modules import RemoveIdentityModulesPass
from tests.helpers import check_fx_pass


class WithDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.drop = torch.nn.Dropout(0.1)
        self.ident = torch.nn.Identity()

    def forward(self, x):
        return self.ident(self.drop(self.lin(x))) * 2


def _x():
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def test_dropout_and_identity_are_bypassed_in_eval():
    gm = fx_utils.trace(WithDropout().eval(), [_x()])
    check = check_fx_pass(RemoveIdentityModulesPass(), gm, [_x()])
    assert check.modified and check.max_abs_error == 0
    assert check.ops_before["Dropout"] == 1 and check.ops_after["Dropout"] == 0
    assert check.ops_before["Identity"] == 1 and check.ops_after["Identity"] == 0
    assert not hasattr(gm, "drop")
    assert not RemoveIdentityModulesPass()(gm).modified


def test_training_dropout_is_kept():
    model = WithDropout().train()
    gm = fx_utils.trace(model, [_x()])
    gm.train()
    result = RemoveIdentityModulesPass()(gm)
    assert result.modified  # the Identity goes
    assert fx_utils.op_counts(gm)["Dropout"] == 1  # live dropout stays


def test_graph_without_identities_is_untouched():
    gm = fx_utils.trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), [_x()])
    code = gm.code
    check = check_fx_pass(RemoveIdentityModulesPass(), gm, [_x()])
    assert not check.modified and gm.code == code
