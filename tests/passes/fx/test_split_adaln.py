import torch

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.fx.split_adaln import SplitAdaLNPass
from tests.helpers import check_fx_pass


class AdaLN(torch.nn.Module):
    def __init__(self, chunks=6, unsqueeze=True):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 8 * chunks)
        self.chunks, self.unsqueeze = chunks, unsqueeze

    def forward(self, x, c):
        e = self.linear(torch.nn.functional.silu(c))
        if self.unsqueeze:
            e = e.unsqueeze(1)
        parts = e.chunk(self.chunks, dim=-1)
        return x * (1 + parts[1]) + parts[0] + parts[2] * parts[3] + parts[4] - parts[5]


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(1, 4, 8, generator=gen), torch.randn(1, 8, generator=gen)]


def test_chunked_linear_becomes_one_linear_per_chunk():
    module = AdaLN()
    gm = fx_utils.trace(module, _inputs())
    check = check_fx_pass(SplitAdaLNPass(), gm, _inputs())
    assert check.modified and check.max_abs_error == 0
    assert (check.ops_before["Linear"], check.ops_after["Linear"]) == (1, 6)
    assert check.ops_after["chunk"] == 0
    assert torch.equal(gm.linear_chunk2.weight, module.linear.weight[16:24])
    assert not SplitAdaLNPass()(gm).modified


def test_split_with_sizes_and_without_unsqueeze():
    class Split(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 12)

        def forward(self, x, c):
            a, b = self.lin(c).split([4, 8], dim=-1)
            return a.sum(-1) + b.sum(-1) + x.sum()

    gm = fx_utils.trace(Split(), _inputs())
    check = check_fx_pass(SplitAdaLNPass(), gm, _inputs())
    assert check.modified and check.max_abs_error < 1e-6
    assert check.ops_after["Linear"] == 2


def test_linear_without_chunks_is_untouched():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, c):
            return x + self.lin(c).unsqueeze(1)

    gm = fx_utils.trace(Plain(), _inputs())
    code = gm.code
    check = check_fx_pass(SplitAdaLNPass(), gm, _inputs())
    assert not check.modified and gm.code == code
