import math

import torch
import torch.nn.functional as F

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.fx.fold_attention_scale import FoldAttentionScalePass
from tests.helpers import FP32_ATOL, check_fx_pass

D = 8


class Attn(torch.nn.Module):
    def __init__(self, form="sdpa"):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(D, D) for _ in range(3))
        self.norm_w = torch.nn.Parameter(torch.rand(D) + 0.5)
        self.form = form

    def forward(self, x, table):
        q = self.q(x).unsqueeze(1)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w
        q = q * table  # a host table, like RoPE's cos: linear in q
        k, v = self.k(x).unsqueeze(1), self.v(x).unsqueeze(1)
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v)
        if self.form == "scores":
            return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D), dim=-1) @ v
        return torch.softmax(torch.matmul(q * (1 / math.sqrt(D)), k.transpose(-1, -2)), dim=-1) @ v


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(1, 5, D, generator=gen), torch.rand(1, 1, 5, D, generator=gen) + 0.5]


def test_sdpa_scale_goes_into_the_norm_weight():
    module = Attn("sdpa")
    weight = module.norm_w.detach().clone()
    gm = fx_utils.trace(module, _inputs())
    check = check_fx_pass(FoldAttentionScalePass(), gm, _inputs())
    assert check.modified and check.max_abs_error <= FP32_ATOL
    assert torch.allclose(gm.norm_w, weight / math.sqrt(D))
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert sdpa.kwargs["scale"] == 1.0
    assert not FoldAttentionScalePass()(gm).modified


def test_explicit_scales_on_scores_or_on_q_are_folded():
    for form, op in (("scores", "truediv"), ("q", "mul")):
        gm = fx_utils.trace(Attn(form), _inputs())
        check = check_fx_pass(FoldAttentionScalePass(), gm, _inputs())
        assert check.modified and check.max_abs_error <= FP32_ATOL, form
        assert check.ops_after[op] == check.ops_before[op] - 1, form
        assert not FoldAttentionScalePass()(gm).modified


def test_attention_on_graph_inputs_has_nowhere_to_fold():
    class Raw(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    x = torch.randn(1, 1, 5, D)
    gm = fx_utils.trace(Raw(), [x, x, x])
    check = check_fx_pass(FoldAttentionScalePass(), gm, [x, x, x])
    assert not check.modified and check.max_abs_error == 0
