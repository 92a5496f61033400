import torch

from kernels.attention import MASK_VALUE, attention_explicit, attention_sdpa


def _qkv(seed=0, s=12):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, s, 8, generator=gen) for _ in range(3)]


def test_explicit_equals_sdpa_with_a_finite_mask():
    q, k, v = _qkv()
    bias = torch.zeros(1, 1, 12, 12)
    bias[..., 7:] = MASK_VALUE
    assert torch.allclose(attention_explicit(q, k, v, bias), attention_sdpa(q, k, v, bias), atol=1e-5)


def test_finite_mask_hides_keys_like_minus_infinity():
    q, k, v = _qkv(1)
    hidden = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    hidden[..., 5:] = True
    ref = attention_sdpa(q, k, v, torch.zeros(1, 1, 12, 12).masked_fill(hidden, float("-inf")))
    out = attention_sdpa(q, k, v, torch.zeros(1, 1, 12, 12).masked_fill(hidden, MASK_VALUE))
    assert torch.allclose(out, ref, atol=1e-6)


def test_fully_masked_rows_stay_finite():
    q, k, v = _qkv(2)
    bias = torch.full((1, 1, 12, 12), MASK_VALUE)
    assert torch.isfinite(attention_explicit(q, k, v, bias)).all()
    # softmax over a row of -inf (what an exported graph computes) is NaN
    assert torch.isnan(attention_explicit(q, k, v, torch.full((1, 1, 12, 12), float("-inf")))).all()
