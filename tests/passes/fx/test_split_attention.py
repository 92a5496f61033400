import math

import pytest
import torch
import torch.nn.functional as F

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.kernels.attention import MASK_VALUE, attention_split
from neodragon_npu.passes.fx.split_attention import SplitAttentionPass
from tests.helpers import FP32_ATOL, check_fx_pass

H, S, D = 3, 12, 8


class Sdpa(torch.nn.Module):
    def forward(self, q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class Explicit(torch.nn.Module):
    def forward(self, q, k, v, bias):
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D) + bias
        return torch.matmul(torch.softmax(scores, dim=-1), v)


# three "frames" of 4 tokens: a query sees its own frame and earlier ones
SEGMENTS = [(0, 4, 4, 3), (4, 8, 8, 7), (8, 12, 12, 11)]


def _block_causal_bias():
    frame = torch.arange(S) // 4
    return torch.where(frame[:, None] >= frame[None, :], 0.0, MASK_VALUE)[None, None]


def _inputs(bias=None):
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, H, S, D, generator=gen) for _ in range(3)]
    return qkv + [bias if bias is not None else torch.randn(1, 1, S, S, generator=gen)]


def _split_calls(gm):
    return [n for n in gm.graph.nodes if n.target is attention_split]


@pytest.mark.parametrize("module", [Sdpa(), Explicit()])
def test_any_mask_exact_per_head_and_chunked_to_the_budget(module):
    inputs = _inputs()
    gm = fx_utils.trace(module, inputs)
    budget = 6 * S * 2  # six rows of a 16-bit score tile
    check = check_fx_pass(SplitAttentionPass(tile_budget_bytes=budget), gm, inputs)
    assert check.modified and check.max_abs_error <= FP32_ATOL
    (call,) = _split_calls(gm)
    chunks = call.kwargs["chunks"]
    assert [(c[0], c[1]) for c in chunks] == [(0, 6), (6, 12)]
    assert all((q1 - q0) * ke * 2 <= budget for q0, q1, ke, _ in chunks)
    assert not SplitAttentionPass(tile_budget_bytes=budget)(gm).modified


def test_mask_aware_chunks_skip_hidden_keys_and_fold_the_bias():
    inputs = _inputs(_block_causal_bias())
    gm = fx_utils.trace(Sdpa(), inputs)
    check = check_fx_pass(SplitAttentionPass(mask_segments=SEGMENTS, min_rows=1), gm, inputs)
    assert check.modified and check.max_abs_error <= FP32_ATOL
    chunks = _split_calls(gm)[0].kwargs["chunks"]
    assert chunks == tuple(SEGMENTS)  # each frame sees only keys up to its end; bias folded
    computed = sum((q1 - q0) * ke for q0, q1, ke, _ in chunks)
    assert computed == 4 * 4 + 4 * 8 + 4 * 12  # 2/3 of the 12 x 12 scores


def test_short_segments_merge_and_add_their_bias():
    inputs = _inputs(_block_causal_bias())
    gm = fx_utils.trace(Sdpa(), inputs)
    check = check_fx_pass(SplitAttentionPass(mask_segments=SEGMENTS, min_rows=5), gm, inputs)
    assert check.modified and check.max_abs_error <= FP32_ATOL
    assert _split_calls(gm)[0].kwargs["chunks"] == ((0, 12, 12, -1),)


def test_single_small_head_is_left_alone():
    q = torch.randn(1, 1, 4, D)
    gm = fx_utils.trace(Sdpa(), [q, q, q, torch.zeros(1, 1, 4, 4)])
    check = check_fx_pass(SplitAttentionPass(), gm, [q, q, q, torch.zeros(1, 1, 4, 4)])
    assert not check.modified and check.ops_after == check.ops_before


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="must be positive"):
        SplitAttentionPass(tile_budget_bytes=0)


class AttendThenProject(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(D, 5)

    def forward(self, q, k, v, bias):
        return self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


def test_the_split_attention_keeps_the_shapes_a_full_propagation_gives():
    """The pass hands the replaced attention's annotation to the split one instead of
    propagating every shape again; a full propagation must agree on every node."""
    inputs = _inputs(_block_causal_bias())
    gm = fx_utils.trace(AttendThenProject(), inputs)
    assert SplitAttentionPass(tile_budget_bytes=6 * S * 2, mask_segments=SEGMENTS)(gm).modified
    carried = {n.name: n.meta["tensor_meta"] for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert _split_calls(gm)[0].name in carried
    fx_utils.propagate_shapes(gm)
    fresh = {n.name: n.meta["tensor_meta"] for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert carried.keys() == fresh.keys()
    for name, meta in fresh.items():
        assert (carried[name].shape, carried[name].dtype) == (meta.shape, meta.dtype), name
