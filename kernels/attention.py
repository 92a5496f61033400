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

import contextlib
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


# With a folded bias row, the bias enters the scores as one extra dimension of Q and K:
# q' = [q, FOLD_SCALE], k' = [k, bias_row / FOLD_SCALE], so q'.k' = q.k + bias_row. The
# split of the magnitude keeps both extra entries near the range of q and k (|bias| <= 100).
FOLD_SCALE = 10.0


def attention_split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    chunks: tuple[tuple[int, int, int, int], ...],
    scale: float | None = None,
) -> torch.Tensor:
    """Per-head, query-chunked attention; each chunk computes only the keys it can see.

    ``chunks`` is ``((q0, q1, key_end, bias_row), ...)`` covering the queries in order:
    queries ``q0:q1`` attend to keys ``:key_end`` (the mask hides the rest from them), and
    when ``bias_row >= 0`` every row of the chunk has the bias of row ``bias_row``, which
    is then folded into QK^T instead of added to the scores (one score-sized write less).
    Use when the [H, S, S] score tensor does not fit on chip; equal to
    :func:`attention_sdpa` whenever the mask honours the chunks' contract.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if _trace_as_one_node and torch.jit.is_tracing():
        return _SplitAttentionNode.apply(q, k, v, bias, tuple(tuple(int(x) for x in c) for c in chunks), float(scale))
    if scale != 1.0:
        q = q * scale
    sizes = [q1 - q0 for q0, q1, _, _ in chunks]
    folded = {}
    for q0, q1, key_end, row in chunks:
        if row >= 0 and (key_end, row) not in folded:
            folded[key_end, row] = bias[:, :, row : row + 1, :key_end] / FOLD_SCALE  # [B,1,1,ke]
    heads = []
    for qh, kh, vh in zip(q.split(1, dim=1), k.split(1, dim=1), v.split(1, dim=1)):  # [B,1,S,D]
        kt = kh.transpose(-1, -2)  # [B, 1, D, Sk]
        keys, values, outs = {}, {}, []
        for q_c, (q0, q1, key_end, row) in zip(qh.split(sizes, dim=2), chunks):
            if key_end not in keys:
                keys[key_end], values[key_end] = kt[..., :key_end], vh[:, :, :key_end]
            if row >= 0:
                if (key_end, row) not in keys:
                    keys[key_end, row] = torch.cat([keys[key_end], folded[key_end, row]], dim=-2)
                ones = torch.full((*q_c.shape[:-1], 1), FOLD_SCALE, dtype=q_c.dtype)
                scores = torch.cat([q_c, ones], dim=-1) @ keys[key_end, row]  # [B,1,c,ke]
            else:
                scores = q_c @ keys[key_end]  # [B, 1, c, ke]
                if bias is not None:
                    scores = scores + bias[:, :, q0:q1, :key_end]
            outs.append(torch.softmax(scores, dim=-1) @ values[key_end])  # [B, 1, c, D]
        heads.append(torch.cat(outs, dim=2))
    return torch.cat(heads, dim=1)


# --- tracing attention_split as one node --------------------------------------------------
# Traced op by op, the split attention of the full-size stage-2 graph is tens of thousands of
# small ops: the TorchScript tracer runs each one at full size and the exporter then
# optimises them one by one (twice the export time; same graph, same outputs). Inside
# :func:`traced_as_one_node` the tracer records one ``neodragon::SplitAttention`` node per
# attention instead, and :func:`graphs.onnx_attention.expand_split_attention` writes the
# same chunked graph into the ONNX model afterwards.

SPLIT_ATTENTION_DOMAIN = "neodragon"
SPLIT_ATTENTION_OP = "SplitAttention"
_trace_as_one_node = False


@contextlib.contextmanager
def traced_as_one_node():
    """While active, a traced :func:`attention_split` becomes one ``neodragon::SplitAttention``
    node (attributes: ``chunks`` flattened, ``scale``, the inputs' static shapes) whose
    traced value is zeros of the output's shape: only the graph is wanted, not the values.
    Eager calls are unaffected."""
    global _trace_as_one_node
    previous, _trace_as_one_node = _trace_as_one_node, True
    try:
        yield
    finally:
        _trace_as_one_node = previous


class _SplitAttentionNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, chunks, scale):  # the arguments symbolic() receives
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))

    @staticmethod
    def symbolic(g, q, k, v, bias, chunks, scale):
        no_bias = bias is None or (hasattr(bias, "node") and bias.node().mustBeNone())
        inputs = [q, k, v] if no_bias else [q, k, v, bias]
        flat = [x for chunk in chunks for x in chunk]
        # the exported model keeps no intermediate shapes: the node carries its inputs' shapes
        shapes = {f"{n}_shape_i": list(t.type().sizes()) for n, t in zip(("q", "k", "v", "bias"), inputs)}
        out = g.op(f"{SPLIT_ATTENTION_DOMAIN}::{SPLIT_ATTENTION_OP}", *inputs, chunks_i=flat, scale_f=scale, **shapes)
        out.setType(q.type().with_sizes([*q.type().sizes()[:-1], v.type().sizes()[-1]]))
        return out


def plan_chunks(
    seq_len: int,
    key_len: int,
    *,
    tile_budget_bytes: int,
    bytes_per_element: int = 2,
    segments: list[tuple[int, int, int, int]] | None = None,
    min_rows: int = 64,
    align_rows: int = 1,
) -> tuple[tuple[int, int, int, int], ...]:
    """Query chunks for :func:`attention_split` whose score tiles fit the budget.

    ``segments`` (from the mask's structure, ``(q0, q1, key_end, bias_row)``) say which
    keys each run of queries can see and whether its bias is one row. Consecutive runs
    shorter than ``min_rows`` become one chunk (which adds its bias instead of folding it),
    so a stage-0 history of 40-token frames does not turn into dozens of tiny matmuls; runs
    whose tile is over budget are cut into equal row blocks; with ``align_rows`` every block
    but a run's last holds a multiple of that many rows (where the budget allows one).
    """
    segments = list(segments) if segments else [(0, seq_len, key_len, -1)]
    merged: list[list[int]] = []  # runs of short segments become one chunk adding its bias
    short_run = False
    for q0, q1, key_end, row in segments:
        short = q1 - q0 < min_rows
        if short and short_run:
            prev = merged[-1]
            prev[1], prev[2], prev[3] = q1, max(prev[2], key_end), -1
        else:
            merged.append([q0, q1, key_end, row])
        short_run = short
    chunks = []
    for q0, q1, key_end, row in merged:
        rows_fit = max(1, tile_budget_bytes // (key_end * bytes_per_element))
        pieces = -(-(q1 - q0) // rows_fit)
        if align_rows > 1 and rows_fit >= align_rows and pieces > 1:
            size = -(-(q1 - q0) // pieces)
            size = -(-size // align_rows) * align_rows
            if size > rows_fit:
                size = rows_fit // align_rows * align_rows
            bounds = [*range(q0, q1, size), q1]
        else:
            bounds = [q0 + (q1 - q0) * i // pieces for i in range(pieces + 1)]
        chunks += [(a, b, key_end, row) for a, b in zip(bounds[:-1], bounds[1:])]
    return tuple(chunks)

