import pytest
import torch
import torch.nn.functional as F

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.kernels.rope import rope_tables
from neodragon_npu.passes.fx.convert_rope_to_half_split import ConvertRopeToHalfSplitPass
from tests.helpers import FP32_ATOL, check_fx_pass

HEADS, HEAD_DIM, SEQ, WIDTH = 2, 8, 6, 16


def _swap_stack(x):  # the GPT-J spelling: stack + flatten (rank 5)
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)


def _swap_rank3(x):  # our kernel's spelling
    b, h, s, d = x.shape
    pairs = x.reshape(b * h, s * d // 2, 2)
    return torch.cat([-pairs[..., 1:2], pairs[..., 0:1]], dim=-1).reshape(b, h, s, d)


class TinyAttention(torch.nn.Module):
    """Projection -> per-head RMSNorm -> RoPE -> SDPA, written like the released block."""

    def __init__(self, swap=_swap_stack, rope=True, k_from_input=False):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.qn = torch.nn.Parameter(torch.rand(HEAD_DIM) + 0.5)
        self.swap, self.rope, self.k_from_input = swap, rope, k_from_input

    def _heads(self, t):
        return t.view(t.shape[0], -1, HEADS, HEAD_DIM).transpose(1, 2)

    def forward(self, x, cos, sin):
        q = self._heads(self.q(x))
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * self.qn
        k = self._heads(x) if self.k_from_input else self._heads(self.k(x))
        v = self._heads(self.v(x))
        if self.rope:
            q = q * cos + self.swap(q) * sin
            k = k * cos + self.swap(k) * sin
        return F.scaled_dot_product_attention(q, k, v)


def _inputs():
    """Full-width interleaved tables, as other implementations build them."""
    x = torch.randn(1, SEQ, WIDTH, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_tables(torch.tensor([0, 0, 1, 1, 2, 3.0]), HEAD_DIM, 10000.0)
    return [x, cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)]


@pytest.mark.parametrize("swap", [_swap_stack, _swap_rank3])
def test_interleaved_rope_becomes_half_split_with_equal_outputs(swap):
    module = TinyAttention(swap)
    q_weight = module.q.weight.detach().clone()
    gm = fx_utils.trace(module, _inputs())
    check = check_fx_pass(ConvertRopeToHalfSplitPass(), gm, _inputs())
    assert check.modified and check.max_abs_error <= FP32_ATOL
    assert check.ops_after["rope_full_tables"] == 2
    assert check.ops_after["neg"] == 0 and check.ops_before["neg"] == 2
    # each head's rows of the Q projection are now evens-then-odds
    assert torch.equal(gm.q.weight[:HEAD_DIM], q_weight[[0, 2, 4, 6, 1, 3, 5, 7]])
    assert not ConvertRopeToHalfSplitPass()(gm).modified


def test_denoiser_stage_graph(tiny_denoiser, tiny_stage_inputs):
    from neodragon_npu.passes.fx.specialize_shapes import SpecializeShapesPass

    inputs = list(tiny_stage_inputs[2].values())
    gm = fx_utils.trace(tiny_denoiser.stage_module(2), inputs)
    SpecializeShapesPass()(gm)
    check = check_fx_pass(ConvertRopeToHalfSplitPass(), gm, inputs)
    assert check.modified and check.max_abs_error <= FP32_ATOL
    # our kernels are leaf calls: q and k of every block
    assert check.ops_before["rope_interleaved"] == 2 * 3 and check.ops_after["rope_interleaved"] == 0
    assert check.ops_after["rope_half_split"] == 2 * 3
    assert not ConvertRopeToHalfSplitPass()(gm).modified


def test_graph_without_interleaved_rope_is_untouched():
    gm = fx_utils.trace(TinyAttention(rope=False), _inputs())
    code = gm.code
    check = check_fx_pass(ConvertRopeToHalfSplitPass(), gm, _inputs())
    assert not check.modified and gm.code == code


def test_rope_whose_permutation_cannot_reach_parameters_is_left_alone():
    # K comes straight from the graph input: nothing to permute offline, so neither Q nor K
    module = TinyAttention(k_from_input=True)
    gm = fx_utils.trace(module, _inputs())
    check = check_fx_pass(ConvertRopeToHalfSplitPass(), gm, _inputs())
    assert not check.modified and check.max_abs_error == 0
    assert check.ops_after["neg"] == 2
