"""Rotary position embedding (RoPE) variants.

Neodragon uses a 1-D temporal RoPE over the whole head (64 wide, theta 10000), with the
position id of a token equal to its frame index (text at 0). The released code rotates
*interleaved* pairs (GPT-J style: (x0, x1), (x2, x3), ...) through a 6-D
``[B, S, 1, D/2, 2, 2]`` rotation tensor. On the NPU both the 6-D tensor (tiling a rank-6
tensor made compile take a day) and the element interleave (29% of stage-0 time) are slow.

Variants, all with the signature ``f(x, cos, sin) -> x_rot`` on ``x: [B, H, S, D]`` and
tables ``cos, sin: [1, 1, S, D]`` (rank 4, computed on the host by :func:`rope_tables`):

* :func:`rope_interleaved` -- the released rotation, written with rank <= 4 tensors.
  Numerically the reference.
* :func:`rope_half_split` -- rotates contiguous halves (NeoX style). Equal to the interleaved
  variant when the head dimension of Q and K is permuted to ``[0, 2, 4, ..., 1, 3, 5, ...]``
  (see :func:`half_split_permutation`), which can be done offline on the projection rows
  because ``q . k`` is invariant under the same permutation of both.

:func:`rope_reference_6d` reproduces the released 6-D formulation exactly; it exists for
tests only.
"""

from __future__ import annotations

import torch

# Layout names of the host-side tables: which variant they are built for.
INTERLEAVED = "interleaved"
HALF_SPLIT = "half_split"
LAYOUTS = (INTERLEAVED, HALF_SPLIT)


def rope_frequencies(position_ids: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Angles ``[S, D/2]``: position_ids[s] * theta^(-2i/D), computed in float64."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    scale = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    omega = 1.0 / (theta**scale)  # [D/2]
    return position_ids.to(torch.float64)[:, None] * omega[None, :]  # [S, D/2]


def rope_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float, layout: str = INTERLEAVED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side cos/sin tables ``[1, 1, S, D]`` (float32) for the given variant's layout."""
    angles = rope_frequencies(position_ids, head_dim, theta)  # [S, D/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    if layout == INTERLEAVED:
        cos = cos.repeat_interleave(2, dim=-1)  # [S, D]: c0 c0 c1 c1 ...
        sin = sin.repeat_interleave(2, dim=-1)
    elif layout == HALF_SPLIT:
        cos = torch.cat([cos, cos], dim=-1)  # [S, D]: c0 c1 ... c0 c1 ...
        sin = torch.cat([sin, sin], dim=-1)
    else:
        raise ValueError(f"unknown RoPE layout {layout!r}; expected one of {LAYOUTS}")
    return cos.float()[None, None], sin.float()[None, None]


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation: (x0, x1) -> (x0 c - x1 s, x0 s + x1 c).

    The pair swap is written on a rank-3 view ``[B*H, S*D/2, 2]`` instead of the usual
    ``stack(..., dim=-1)`` on a rank-5 tensor: the HTP simulator computed that rank-5
    concat wrongly (2.6 dB against the CPU on the same QDQ graph). Use as the numerical
    reference and where the released op order matters; prefer :func:`rope_half_split` on
    the NPU.
    """
    b, h, s, d = x.shape
    pairs = x.reshape(b * h, s * d // 2, 2)  # [B*H, S*D/2, 2]
    rotated = torch.cat([-pairs[..., 1:2], pairs[..., 0:1]], dim=-1)  # [B*H, S*D/2, 2]
    return x * cos + rotated.reshape(b, h, s, d) * sin


def rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation: (x_lo, x_hi) -> (x_lo c - x_hi s, x_hi c + x_lo s).

    Use on the NPU: two contiguous slices and one concat instead of an element interleave,
    all tensors rank 4. Needs Q/K head dims permuted by :func:`half_split_permutation` and
    tables built with ``layout="half_split"``.
    """
    half = x.shape[-1] // 2
    x_lo = x[..., :half]  # [B, H, S, D/2]
    x_hi = x[..., half:]  # [B, H, S, D/2]
    rotated = torch.cat([-x_hi, x_lo], dim=-1)  # [B, H, S, D]
    return x * cos + rotated * sin


def half_split_permutation(head_dim: int) -> torch.Tensor:
    """Index map taking an interleaved head layout to the half-split one: evens then odds."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


ROPE_KERNELS = {INTERLEAVED: rope_interleaved, HALF_SPLIT: rope_half_split}


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


def interleaved_to_half_split(table: torch.Tensor) -> torch.Tensor:
    """Reorder a table's last dim from interleaved to half-split layout (evens, then odds).

    Written with two strided slices and a concat (no Gather), so a graph can convert host
    tables in place; it is exact for any table contents.
    """
    return torch.cat([table[..., 0::2], table[..., 1::2]], dim=-1)
