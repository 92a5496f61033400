"""Attention formulations.

All variants share one signature, ``f(q, k, v, bias) -> out`` with
``q: [B, H, Sq, D]``, ``k, v: [B, H, Sk, D]``, ``bias: [B or 1, 1, Sq, Sk]`` (additive,
finite, computed on the host) and ``out: [B, H, Sq, D]``.

* :func:`attention_sdpa` -- ``F.scaled_dot_product_attention``; the reference, and what a
  traced model usually contains.
* :func:`attention_explicit` -- the same maths spelled out as MatMul -> scale -> Add ->
  Softmax -> MatMul, with the 1/sqrt(d) scale applied to Q (the form the NPU graph gets).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Additive mask value for hidden keys. Finite on purpose: -inf (SDPA lowering) and
# finfo.min overflow fixed point and FP16 and turn fully masked rows into NaN; exp(-100) is
# already 0 in fp32 relative to any visible score, and a small magnitude keeps the int16
# encoding of (scores + bias) fine.
MASK_VALUE = -100.0


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Reference attention via SDPA (exact, any backend)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def attention_explicit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v with the scale folded into q."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # [B, H, Sq, Sk]
    probs = torch.softmax(scores + bias, dim=-1)  # [B, H, Sq, Sk]
    return torch.matmul(probs, v)  # [B, H, Sq, D]


ATTENTION_KERNELS = {"sdpa": attention_sdpa, "explicit": attention_explicit}
