"""Rotary position embedding (RoPE) variants.

Neodragon uses a 1-D temporal RoPE over the whole head (64 wide, theta 10000), with the
position id of a token equal to its frame index (text at 0). The released code rotates
*interleaved* pairs (GPT-J style: (x0, x1), (x2, x3), ...) through a 6-D
``[B, S, 1, D/2, 2, 2]`` rotation tensor. On the NPU both the 6-D tensor (tiling a rank-6
tensor made compile take a day) and the element interleave (29% of stage-0 time) are slow.

The host passes *half tables* ``cos, sin: [1, 1, S, D/2]`` (one angle per pair, computed
by :func:`rope_tables`); the variants share the signature ``f(x, cos, sin) -> x_rot`` on
``x: [B, H, S, D]``:

* :func:`rope_interleaved` -- the released rotation, with rank <= 4 tensors. The
  numerical reference.
* :func:`rope_half_split` -- rotates contiguous halves (NeoX style). Equal to the
  interleaved variant when the head dims of Q and K are permuted to
  ``[0, 2, 4, ..., 1, 3, 5, ...]`` (:func:`half_split_permutation`), which can be done
  offline on the projection rows because ``q . k`` is invariant under the same permutation
  of both. Its exported form is exactly ONNX ``RotaryEmbedding`` (opset 23).

Both are FX leaf functions: a traced graph holds one ``rope_*`` call per rotation, which
the RoPE passes match by target. :func:`rope_full_tables` is the classic full-width
formulation ``x * cos + rotate(x) * sin`` that other implementations trace to;
:func:`rope_reference_6d` reproduces the released 6-D formulation for tests.
"""

from __future__ import annotations

import torch
import torch.fx


def rope_frequencies(position_ids: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Angles ``[S, D/2]``: position_ids[s] * theta^(-2i/D), computed in float64."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    scale = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    omega = 1.0 / (theta**scale)  # [D/2]
    return position_ids.to(torch.float64)[:, None] * omega[None, :]  # [S, D/2]


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side half tables ``cos, sin: [1, 1, S, D/2]`` (float32)."""
    angles = rope_frequencies(position_ids, head_dim, theta)  # [S, D/2]
    return torch.cos(angles).float()[None, None], torch.sin(angles).float()[None, None]


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs: (x0, x1) -> (x0 c - x1 s, x0 s + x1 c).

    Written on a rank-3 view ``[B*H, S*D/2, 2]`` rather than the usual rank-5
    ``stack(..., dim=-1)``: the HTP simulator computed that rank-5 concat wrongly (2.6 dB
    against the CPU on the same QDQ graph). Use as the reference; prefer
    :func:`rope_half_split` on the NPU.
    """
    b, h, s, d = x.shape
    pairs = x.reshape(b * h, s * d // 2, 2)  # [B*H, S*D/2, 2]
    even, odd = pairs[..., 0:1], pairs[..., 1:2]  # [B*H, S*D/2, 1]
    c = cos.reshape(1, s * d // 2, 1)
    sn = sin.reshape(1, s * d // 2, 1)
    out = torch.cat([even * c - odd * sn, even * sn + odd * c], dim=-1)  # [B*H, S*D/2, 2]
    return out.reshape(b, h, s, d)


def rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Contiguous halves: (lo, hi) -> (lo c - hi s, hi c + lo s).

    Use on the NPU: two slices and one concat, all rank 4, and ONNX ``RotaryEmbedding``
    after fusion. Needs Q/K head dims permuted by :func:`half_split_permutation`.
    """
    half = x.shape[-1] // 2
    lo, hi = x[..., :half], x[..., half:]  # [B, H, S, D/2]
    return torch.cat([lo * cos - hi * sin, hi * cos + lo * sin], dim=-1)  # [B, H, S, D]


torch.fx.wrap("rope_interleaved")
torch.fx.wrap("rope_half_split")


def half_split_permutation(head_dim: int) -> torch.Tensor:
    """Index map taking an interleaved head layout to the half-split one: evens then odds."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


ROPE_KERNELS = {"interleaved": rope_interleaved, "half_split": rope_half_split}


def rope_full_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with full-width tables ``[.., S, D]`` whose layout
    matches a half-split ``x``; what the RoPE pass emits for the classic interleaved form."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def interleaved_to_half_split(table: torch.Tensor) -> torch.Tensor:
    """Reorder a full table's last dim from interleaved to half-split layout (evens, then
    odds) with two strided slices and a concat (no Gather); exact for any contents."""
    return torch.cat([table[..., 0::2], table[..., 1::2]], dim=-1)


def rope_reference_6d(x_bshd: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """The released formulation, for tests: ``x [B,S,H,D]``, ``freqs_cis [B,S,1,D/2,2,2]``."""
    x_ = x_bshd.float().reshape(*x_bshd.shape[:-1], -1, 1, 2)  # [B, S, H, D/2, 1, 2]
    out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]  # [B,S,H,D/2,2]
    return out.reshape(*x_bshd.shape).type_as(x_bshd)


def freqs_cis_6d(position_ids: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """The released 6-D rotation tensor ``[1, S, 1, D/2, 2, 2]`` for one sequence."""
    angles = rope_frequencies(position_ids, head_dim, theta)  # [S, D/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    stacked = torch.stack([cos, -sin, sin, cos], dim=-1)  # [S, D/2, 4]
    return stacked.view(1, -1, 1, head_dim // 2, 2, 2).float()
