"""Per-head, query-chunked, mask-aware attention."""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs.fx_attention import find_attention
from neodragon_npu.kernels.attention import attention_split, plan_chunks
from neodragon_npu.passes.base import Option, Pass, PassResult


class SplitAttentionPass(Pass):
    """Split attention per head and into query chunks whose score tiles fit on chip.

    The [heads, S, S] score tensor of stage 2 (143 MB at 16 bit) cannot stay on chip and is
    written and read several times (QK^T, + mask, softmax). Per head and per query chunk
    every tile fits ``tile_budget_bytes``, and with ``mask_segments`` (the block-causal
    mask's structure, from the host bookkeeping) a chunk only computes the keys its queries
    can see; where all rows of a chunk share one mask row the mask is folded into QK^T
    (an extra dimension of Q and K) instead of added to the scores::

        before: SDPA(q, k, v, bias)                       scores [B, H, S, S]
        after:  for h, for (q0, q1, ke, row):  softmax(q[h, q0:q1] k[h, :ke]^T + bias) v[h, :ke]
                                                          scores [B, 1, q1-q0, ke]

    Matches SDPA and explicit matmul/softmax attention. Without ``mask_segments`` every
    chunk sees all keys and adds its bias slice (exact for any mask).
    """

    IR = "fx"
    NAME = "split_attention"
    LOOKS_FOR = "attention (scaled_dot_product_attention, or softmax(QK^T)V)"
    OPTIONS = {
        "tile_budget_bytes": Option("int", "on-chip bytes one score tile may take", min=1024),
        "activation_bytes": Option("int", "bytes per activation value on the target", choices=(1, 2, 4)),
        "min_rows": Option("int", "fewest query rows per chunk", min=1),
        "align_rows": Option("int", "query rows per chunk a multiple of this (but each run's last)", min=1),
    }
    ENGINE_OPTIONS = ("mask_segments",)

    def __init__(
        self,
        *,
        tile_budget_bytes: int = 2 * 1024 * 1024,
        activation_bytes: int = 2,
        mask_segments: Sequence[Sequence[int]] | None = None,
        min_rows: int = 64,
        align_rows: int = 1,
    ) -> None:
        if tile_budget_bytes <= 0:
            raise ValueError("split_attention: tile_budget_bytes must be positive")
        self.tile_budget_bytes = tile_budget_bytes
        self.activation_bytes = activation_bytes
        self.mask_segments = [tuple(int(x) for x in s) for s in mask_segments] if mask_segments else None
        self.min_rows = min_rows
        self.align_rows = align_rows

    def _segments(self, seq: int, keys: int, has_bias: bool) -> list[tuple[int, int, int, int]] | None:
        if self.mask_segments is None:
            return None
        segs = self.mask_segments
        covers = segs[0][0] == 0 and segs[-1][1] == seq and all(a[1] == b[0] for a, b in zip(segs, segs[1:]))
        if not covers or any(s[2] > keys or s[2] <= 0 for s in segs) or keys != seq:
            return None  # a differently shaped attention (e.g. cross-attention): no mask info
        if not has_bias:
            return [(q0, q1, ke, -1) for q0, q1, ke, _ in segs]
        return list(segs)

    def call(self, gm: fx.GraphModule) -> PassResult:
        rewritten = 0
        for match in find_attention(gm):
            q_shape = match.q.meta["tensor_meta"].shape
            k_shape = match.k.meta["tensor_meta"].shape
            if len(q_shape) != 4:
                self.leave(match.output.name, f"Q has rank {len(q_shape)}, not [batch, heads, tokens, dim]")
                continue
            heads, seq, keys = q_shape[1], q_shape[2], k_shape[2]
            segments = self._segments(seq, keys, match.bias is not None)
            chunks = plan_chunks(
                seq,
                keys,
                tile_budget_bytes=self.tile_budget_bytes,
                bytes_per_element=self.activation_bytes,
                segments=segments,
                min_rows=self.min_rows,
                align_rows=self.align_rows,
            )
            if heads == 1 and len(chunks) == 1 and chunks[0][2] == keys:
                self.leave(match.output.name, "one head whose scores fit one tile: nothing to split")
                continue
            with gm.graph.inserting_before(match.output):
                new = gm.graph.call_function(
                    attention_split,
                    (match.q, match.k, match.v, match.bias),
                    {"chunks": chunks, "scale": match.scale},
                )
            # the same output as the attention it replaces: its shape annotation carries over
            # (re-propagating every shape would run the thousands of ops of the split
            # attentions on fake tensors)
            new.meta.update(match.output.meta)
            match.output.replace_all_uses_with(new)
            for node in reversed(match.nodes):
                if not node.users:
                    gm.graph.erase_node(node)
            rewritten += 1
        if rewritten:
            fx_utils.recompile(gm)
        return PassResult(gm, rewritten > 0)
