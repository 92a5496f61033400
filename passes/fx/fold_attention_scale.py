"""Fold the 1/sqrt(d) attention scale into the parameters that produce Q."""

from __future__ import annotations

import math
import operator

import torch.fx as fx

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs.fx_attention import find_attention
from neodragon_npu.graphs.fx_channels import Scale, apply_plan, plan_push_up
from neodragon_npu.passes.base import Pass, PassResult


class FoldAttentionScalePass(Pass):
    """Fold the softmax scale into Q's producing parameters; attention then runs at scale 1.

    softmax(s * q k^T) = softmax((s q) k^T). The scale is pushed up through every op that
    is linear in Q (RoPE, concat, transposes, views) into the last parameters on the way,
    typically the QK-RMSNorm weight (RMSNorm itself is scale-invariant, so folding into
    the projection before it would be undone)::

        before: q = rope(rms(x) * w);  SDPA(q, k, v)            (scale 1/sqrt(d) implied)
        after:  q = rope(rms(x) * (w / sqrt(d)));  SDPA(q, k, v, scale=1.0)

    This removes a multiply over a [heads, S, d] tensor per attention and keeps the scale
    out of the quantized graph. Handles SDPA, a scale applied to the scores, and a scale
    applied to Q before QK^T.
    """

    IR = "fx"
    NAME = "fold_attention_scale"
    LOOKS_FOR = "attention (scaled_dot_product_attention, or softmax(QK^T)V)"

    def call(self, gm: fx.GraphModule) -> PassResult:
        folded = 0
        for match in find_attention(gm):
            q = match.q
            pre_scale = None
            if q.target in (operator.mul, operator.truediv) and isinstance(q.args[1], (int, float)):
                pre_scale = q  # q = q0 * c before the matmul
                factor = float(q.args[1]) if q.target is operator.mul else 1.0 / float(q.args[1])
                source = q.args[0]
            elif match.kind == "sdpa" and match.scale != 1.0:
                factor = match.scale if match.scale is not None else 1.0 / math.sqrt(q.meta["tensor_meta"].shape[-1])
                source = q
            elif match.kind == "explicit" and match.scale != 1.0:
                factor, source = match.scale, q
            else:
                self.leave(match.output.name, "the attention has no scale to fold (scale 1)")
                continue
            if len(source.users) != 1 and pre_scale is None:
                self.leave(match.output.name, f"Q ({source.name}) has other readers, which the scale must not reach")
                continue
            plan = plan_push_up(gm, source, Scale(factor))
            if isinstance(plan, str):
                self.leave(match.output.name, plan)
                continue
            apply_plan(gm, plan)
            if pre_scale is not None:
                pre_scale.replace_all_uses_with(source)
            elif match.kind == "sdpa":
                match.output.kwargs = {**match.output.kwargs, "scale": 1.0}
            else:
                scores_mul = match.nodes[2]  # [kt, matmul, mul/div, ...]
                scores_mul.replace_all_uses_with(scores_mul.args[0])
            folded += 1
        if folded:
            gm.graph.eliminate_dead_code()
            fx_utils.recompile(gm)
            fx_utils.propagate_shapes(gm)
        return PassResult(gm, folded > 0)
