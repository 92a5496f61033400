import pytest
import torch

from neodragon_npu.kernels.rope import (
    freqs_cis_6d,
    half_split_permutation,
    interleaved_to_half_split,
    rope_full_tables,
    rope_half_split,
    rope_interleaved,
    rope_reference_6d,
    rope_tables,
)

HEAD_DIM = 16
IDS = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 5, 6], dtype=torch.float32)


def _x(seed=0, shape=(1, 3, 10, HEAD_DIM)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_interleaved_equals_the_released_6d_formulation():
    x = _x()  # [B, H, S, D]
    cos, sin = rope_tables(IDS, HEAD_DIM, 10000.0)
    assert cos.shape == (1, 1, 10, HEAD_DIM // 2)
    ref = rope_reference_6d(x.transpose(1, 2), freqs_cis_6d(IDS, HEAD_DIM, 10000.0)).transpose(1, 2)
    assert torch.allclose(rope_interleaved(x, cos, sin), ref, atol=1e-6)


def test_half_split_equals_interleaved_after_permuting_head_dims():
    q, k = _x(1), _x(2)
    cos, sin = rope_tables(IDS, HEAD_DIM, 10000.0)
    perm = half_split_permutation(HEAD_DIM)
    qi, ki = rope_interleaved(q, cos, sin), rope_interleaved(k, cos, sin)
    qh, kh = rope_half_split(q[..., perm], cos, sin), rope_half_split(k[..., perm], cos, sin)
    assert torch.allclose(qh, qi[..., perm], atol=1e-6)
    # the attention scores, what the model consumes, are identical
    assert torch.allclose(qh @ kh.transpose(-1, -2), qi @ ki.transpose(-1, -2), atol=1e-5)


def test_full_table_form_with_reordered_tables_is_the_same_rotation():
    x = _x(5)
    cos, sin = rope_tables(IDS, HEAD_DIM, 10000.0)
    full_cos, full_sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)  # interleaved layout
    perm = half_split_permutation(HEAD_DIM)
    out = rope_full_tables(x[..., perm], interleaved_to_half_split(full_cos), interleaved_to_half_split(full_sin))
    assert torch.allclose(out, rope_interleaved(x, cos, sin)[..., perm], atol=1e-6)


def test_position_zero_is_the_identity_and_rotation_preserves_norms():
    cos, sin = rope_tables(torch.zeros(10), HEAD_DIM, 10000.0)
    x = _x(3)
    assert torch.equal(rope_interleaved(x, cos, sin), x)
    cos, sin = rope_tables(IDS * 3, HEAD_DIM, 10000.0)
    assert torch.allclose(rope_interleaved(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="even head dimension"):
        rope_tables(torch.arange(3.0), 7, 10000.0)
