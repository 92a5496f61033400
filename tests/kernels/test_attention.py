import torch

from neodragon_npu.kernels.attention import MASK_VALUE, attention_explicit, attention_sdpa


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


def test_split_kernel_equals_sdpa_and_plans_fit_the_budget():
    from neodragon_npu.kernels.attention import attention_split, plan_chunks

    q, k, v = _qkv(3, s=20)
    bias = torch.randn(1, 1, 20, 20)
    chunks = plan_chunks(20, 20, tile_budget_bytes=7 * 20 * 2)
    assert [c[1] - c[0] for c in chunks] == [6, 7, 7]
    assert all((q1 - q0) * ke * 2 <= 7 * 20 * 2 for q0, q1, ke, _ in chunks)
    ref = attention_sdpa(q, k, v, bias)
    assert torch.allclose(attention_split(q, k, v, bias, chunks=chunks), ref, atol=1e-5)


def test_aligned_chunks_hold_a_multiple_of_the_alignment_and_still_fit():
    from neodragon_npu.kernels.attention import attention_split, plan_chunks

    # 2560 queries x 2560 keys under 2 MB: seven blocks of 365-366 rows unaligned
    for seq, budget in ((2560, 2 << 20), (10240, 2 << 20), (77, 2 << 20), (1000, 300 * 1000 * 2)):
        chunks = plan_chunks(seq, seq, tile_budget_bytes=budget, align_rows=32)
        sizes = [q1 - q0 for q0, q1, _, _ in chunks]
        assert chunks[0][0] == 0 and chunks[-1][1] == seq and sum(sizes) == seq
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all(s % 32 == 0 for s in sizes[:-1]), sizes
        assert all(s * seq * 2 <= budget for s in sizes)
    assert [c[1] - c[0] for c in plan_chunks(2560, 2560, tile_budget_bytes=2 << 20, align_rows=32)] == [384] * 6 + [256]
    q, k, v = _qkv(2, s=40)
    chunks = plan_chunks(40, 40, tile_budget_bytes=20 * 40 * 2, align_rows=16)
    assert [c[1] - c[0] for c in chunks] == [16, 16, 8]
    assert torch.allclose(attention_split(q, k, v, None, chunks=chunks), attention_sdpa(q, k, v, None), atol=1e-5)


def test_folded_bias_row_equals_adding_it():
    from neodragon_npu.kernels.attention import attention_split

    q, k, v = _qkv(4, s=6)
    row = torch.tensor([0.0, 0.0, MASK_VALUE, 0.0, MASK_VALUE, 0.0])
    bias = row.expand(1, 1, 6, 6)
    out = attention_split(q, k, v, bias, chunks=((0, 6, 6, 2),))
    assert torch.allclose(out, attention_sdpa(q, k, v, bias), atol=1e-5)
