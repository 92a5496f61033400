import pytest
import torch

from kernels.rope import (
    HALF_SPLIT,
    INTERLEAVED,
    freqs_cis_6d,
    half_split_permutation,
    rope_half_split,
    rope_interleaved,
    rope_reference_6d,
    rope_tables,
)

HEAD_DIM = 16


def _x(seed=0, shape=(1, 3, 10, HEAD_DIM)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_interleaved_equals_the_released_6d_formulation():
    ids = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 5, 6], dtype=torch.float32)
    x = _x()  # [B, H, S, D]
    cos, sin = rope_tables(ids, HEAD_DIM, 10000.0, INTERLEAVED)
    ref = rope_reference_6d(x.transpose(1, 2), freqs_cis_6d(ids, HEAD_DIM, 10000.0)).transpose(1, 2)
    assert torch.allclose(rope_interleaved(x, cos, sin), ref, atol=1e-6)


def test_half_split_equals_interleaved_after_permuting_head_dims():
    ids = torch.arange(10, dtype=torch.float32)
    q, k = _x(1), _x(2)
    cos_i, sin_i = rope_tables(ids, HEAD_DIM, 10000.0, INTERLEAVED)
    cos_h, sin_h = rope_tables(ids, HEAD_DIM, 10000.0, HALF_SPLIT)
    perm = half_split_permutation(HEAD_DIM)
    qi, ki = rope_interleaved(q, cos_i, sin_i), rope_interleaved(k, cos_i, sin_i)
    qh, kh = rope_half_split(q[..., perm], cos_h, sin_h), rope_half_split(k[..., perm], cos_h, sin_h)
    assert torch.allclose(qh, qi[..., perm], atol=1e-6)
    # the attention scores, what the model consumes, are identical
    assert torch.allclose(qh @ kh.transpose(-1, -2), qi @ ki.transpose(-1, -2), atol=1e-5)


def test_position_zero_is_the_identity():
    cos, sin = rope_tables(torch.zeros(10), HEAD_DIM, 10000.0)
    x = _x(3)
    assert torch.equal(rope_interleaved(x, cos, sin), x)


def test_rotation_preserves_norms():
    cos, sin = rope_tables(torch.arange(10.0) * 3, HEAD_DIM, 10000.0)
    x = _x(4)
    assert torch.allclose(rope_interleaved(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_bad_layout_and_odd_head_dim_are_refused():
    with pytest.raises(ValueError, match="unknown RoPE layout"):
        rope_tables(torch.arange(3.0), 8, 10000.0, "spiral")
    with pytest.raises(ValueError, match="even head dimension"):
        rope_tables(torch.arange(3.0), 7, 10000.0)
