"""Finding attention in an FX graph, whatever form the tracer left it in.

Two forms are recognised, by pattern (not by module class), so the passes that use this
apply to other DiT/MMDiT implementations too:

* ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias)`` (no dropout, not causal), or
  the ATen op torch.export leaves for it (diffusers' attention processors, traced)
* ``matmul(softmax([matmul(q, k^T) (* or /) scale] (+ bias), -1), v)``
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from neodragon_npu.graphs.fx import target_name


@dataclass
class AttentionMatch:
    kind: str  # "sdpa" or "explicit"
    q: fx.Node
    k: fx.Node
    v: fx.Node
    bias: fx.Node | None
    scale: float | None  # None: the default 1/sqrt(d)
    output: fx.Node
    nodes: list[fx.Node]  # everything the match replaces (output last)


def _arg(node: fx.Node, index: int, key: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _is_last_two_transpose(node) -> bool:
    if not isinstance(node, fx.Node) or target_name(node) != "transpose":
        return False
    rank = len(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else 4
    return sorted(d % rank for d in node.args[1:3]) == [rank - 2, rank - 1]


_SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)


def _match_sdpa(node: fx.Node) -> AttentionMatch | None:
    if node.op != "call_function" or node.target not in _SDPA:
        return None
    q, k, v = node.args[:3]
    bias = _arg(node, 3, "attn_mask")
    if _arg(node, 4, "dropout_p", 0.0) or _arg(node, 5, "is_causal", False):
        return None
    if node.kwargs.get("enable_gqa", False):
        return None
    return AttentionMatch("sdpa", q, k, v, bias, node.kwargs.get("scale"), node, [node])


def _single_use(node) -> bool:
    return isinstance(node, fx.Node) and len(node.users) == 1


def _match_explicit(node: fx.Node) -> AttentionMatch | None:
    """``node`` is the final matmul(softmax(...), v)."""
    if target_name(node) != "matmul" or len(node.args) != 2:
        return None
    probs, v = node.args
    if not _single_use(probs) or target_name(probs) != "softmax" or _arg(probs, 1, "dim") != -1:
        return None
    chain = [probs]
    x, bias = probs.args[0], None
    if _single_use(x) and x.target in (operator.add, torch.add):
        a, b = x.args[:2]
        scores_side = isinstance(a, fx.Node) and target_name(a) in ("matmul", "mul", "truediv")
        (scores, bias) = (a, b) if scores_side else (b, a)
        chain.insert(0, x)
        x = scores
    scale = 1.0
    if _single_use(x) and x.target in (operator.mul, operator.truediv):
        a, b = x.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, (int, float))):
            return None
        scale = float(b) if x.target is operator.mul else 1.0 / float(b)
        chain.insert(0, x)
        x = a
    if not (_single_use(x) and target_name(x) == "matmul"):
        return None
    q, kt = x.args[:2]
    if not (_single_use(kt) and _is_last_two_transpose(kt)):
        return None
    return AttentionMatch("explicit", q, kt.args[0], v, bias, scale, node, [kt, x, *chain, node])


def find_attention(gm: fx.GraphModule) -> list[AttentionMatch]:
    matches = []
    for node in gm.graph.nodes:
        match = _match_sdpa(node) or _match_explicit(node)
        if match is not None:
            matches.append(match)
    return matches


def passthrough_source(node: fx.Node) -> fx.Node:
    """Skip ops upward that commute with per-channel rewrites of Q/K: ``contiguous``,
    ``clone`` and multiplication or division by a Python number."""
    while isinstance(node, fx.Node):
        if node.op == "call_method" and target_name(node) in ("contiguous", "clone"):
            node = node.args[0]
        elif node.target in (operator.mul, operator.truediv) and isinstance(node.args[1], (int, float)):
            node = node.args[0]
        else:
            break
    return node
