"""Interleaved-pair RoPE -> half-split RoPE with Q/K weights permuted offline."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs.fx import target_name
from neodragon_npu.graphs.fx_attention import find_attention, passthrough_source
from neodragon_npu.graphs.fx_channels import Permute, apply_plan, plan_push_up
from neodragon_npu.kernels.rope import (
    half_split_permutation,
    interleaved_to_half_split,
    rope_full_tables,
    rope_half_split,
    rope_interleaved,
)
from neodragon_npu.passes.base import Pass, PassResult

# Ops a pair swap may be written with (stack/cat of strided slices, reshapes, negation).
_MOVEMENT = {
    "getitem", "view", "reshape", "cat", "stack", "flatten", "unflatten", "neg",
    "unsqueeze", "squeeze", "contiguous", "clone", "transpose", "permute",
}


def _is_op(node, *ops) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and (
        node.target in ops or target_name(node) in {getattr(o, "__name__", o) for o in ops}
    )


def _movement_subgraph(r: fx.Node, x: fx.Node) -> list[fx.Node] | None:
    """Nodes computing ``r`` from ``x`` by data movement only (x the sole tensor source)."""
    nodes, stack = [], [r]
    while stack:
        n = stack.pop()
        if n is x or n in nodes or fx_utils.STATIC_VALUE in n.meta:
            continue  # shape queries only read x's (static) shape
        if n.op not in ("call_function", "call_method") or target_name(n) not in _MOVEMENT | {"mul"}:
            return None
        if target_name(n) == "mul" and not any(a == -1 for a in n.args):  # only negation by -1
            return None
        nodes.append(n)
        stack.extend(n.all_input_nodes)
    return list(reversed(nodes))


def _depends_on(node, target: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        if n is target:
            return True
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _evaluate(nodes: list[fx.Node], x: fx.Node, probe: torch.Tensor) -> torch.Tensor:
    env = {x: probe}

    def load(a):
        if not isinstance(a, fx.Node):
            return a
        return env[a] if a in env else a.meta[fx_utils.STATIC_VALUE]

    for n in sorted(nodes, key=lambda n: list(n.graph.nodes).index(n)):
        args = fx.node.map_arg(n.args, load)
        kwargs = fx.node.map_arg(n.kwargs, load)
        if n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            env[n] = n.target(*args, **kwargs)
    return env[nodes[-1]]


def _is_pair_swap(nodes: list[fx.Node], x: fx.Node) -> bool:
    """Evaluate the movement subgraph on a probe: is r[2i] = -x[2i+1], r[2i+1] = x[2i]?"""
    meta = x.meta.get("tensor_meta")
    if meta is None or meta.shape[-1] % 2:
        return False
    probe = torch.arange(1, meta.shape.numel() + 1, dtype=torch.float32).reshape(meta.shape)
    try:
        out = _evaluate(nodes, x, probe)
    except Exception:  # not evaluable on its own: not a pattern we can prove
        return False
    expected = torch.stack([-probe[..., 1::2], probe[..., 0::2]], dim=-1).flatten(-2)
    return out.shape == expected.shape and torch.equal(out, expected)


@dataclass
class _Site:
    out: fx.Node  # the node computing the rotation
    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    full_tables: bool  # x*cos + R(x)*sin with [.., D] tables, else a rope_interleaved call


def find_interleaved_rope(node: fx.Node) -> _Site | None:
    """``node`` is an interleaved rotation: a ``rope_interleaved`` call (half tables), or
    ``x * cos + R(x) * sin`` with R the interleaved pair swap (full tables)."""
    if node.op == "call_function" and node.target is rope_interleaved:
        x, cos, sin = node.args[:3]
        return _Site(node, x, cos, sin, full_tables=False)
    if not _is_op(node, operator.add, torch.add) or len(node.args) < 2:
        return None
    m1, m2 = node.args[:2]
    if not (_is_op(m1, operator.mul, torch.mul) and _is_op(m2, operator.mul, torch.mul)):
        return None
    for ma, mb in ((m1, m2), (m2, m1)):
        for x, cos in (ma.args[:2], ma.args[1::-1]):
            for r, sin in (mb.args[:2], mb.args[1::-1]):
                if not all(isinstance(t, fx.Node) for t in (x, cos, r, sin)):
                    continue
                if _depends_on(cos, x) or _depends_on(sin, x):
                    continue
                nodes = _movement_subgraph(r, x)
                if nodes and _is_pair_swap(nodes, x):
                    return _Site(node, x, cos, sin, full_tables=True)
    return None


class ConvertRopeToHalfSplitPass(Pass):
    """Rewrite interleaved RoPE on Q and K as half-split RoPE, permuting Q/K weights offline.

    The interleaved pair swap (x0, x1) -> (-x1, x0) is an element interleave (29% of
    stage-0 time on device). Permuting each head's dims of Q and K to evens-then-odds turns
    it into a swap of contiguous halves; ``q . k`` is unchanged because both are permuted::

        before: q = RoPE_interleaved(norm(to_q(x)) [heads]);  k likewise;  QK^T
        after:  to_q rows, norm weights permuted per head;
                q = x*cos' + cat(-x_hi, x_lo)*sin'  with cos' = cos[evens ++ odds];  QK^T

    Sites are ``rope_interleaved`` calls (our kernels, host half tables) or the classic
    full-table form ``x*cos + R(x)*sin``, where R is recognised by evaluating it on a probe,
    so any spelling of the interleave (stack/flatten, strided slices + cat, rank-3 views)
    is found; full tables are reordered in-graph by two strided slices. Q and K
    of one attention are converted together or not at all; a site whose permutation cannot
    be pushed into parameters is left as it is.
    """

    IR = "fx"
    NAME = "convert_rope_to_half_split"
    LOOKS_FOR = "attention"

    def call(self, gm: fx.GraphModule) -> PassResult:
        converted = 0
        tables: dict[fx.Node, fx.Node] = {}
        for match in find_attention(gm):
            sites = [find_interleaved_rope(passthrough_source(n)) for n in (match.q, match.k)]
            where = match.output.name
            if any(s is None for s in sites):
                self.leave(where, "Q or K carries no interleaved RoPE")
                continue
            if any(len(s.out.users) != 1 for s in sites):
                self.leave(where, "the rotated Q or K has other readers")
                continue
            head_dim = sites[0].x.meta["tensor_meta"].shape[-1]
            perm = Permute(tuple(half_split_permutation(head_dim).tolist()))
            plans = [plan_push_up(gm, s.x, perm) for s in sites]
            if any(isinstance(p, str) for p in plans):
                self.leave(where, next(p for p in plans if isinstance(p, str)))
                continue
            if set(plans[0].nodes) & set(plans[1].nodes):
                self.leave(where, "Q and K share producers: one permutation would hit both twice")
                continue
            for plan in plans:
                apply_plan(gm, plan)
            for site in sites:
                self._rewrite(gm, site, tables)
            converted += 1
        if converted:
            gm.graph.eliminate_dead_code()
            fx_utils.recompile(gm)
            fx_utils.propagate_shapes(gm)
        return PassResult(gm, converted > 0)

    @staticmethod
    def _rewrite(gm: fx.GraphModule, site: _Site, tables: dict) -> None:
        graph = gm.graph
        if not site.full_tables:  # half tables have one angle per pair: no layout to change
            with graph.inserting_after(site.out):
                new = graph.call_function(rope_half_split, (site.x, site.cos, site.sin))
            site.out.replace_all_uses_with(new)
            return
        for table in (site.cos, site.sin):
            if table not in tables:
                with graph.inserting_after(table):
                    tables[table] = graph.call_function(interleaved_to_half_split, (table,))
        with graph.inserting_after(site.out):
            new = graph.call_function(rope_full_tables, (site.x, tables[site.cos], tables[site.sin]))
        site.out.replace_all_uses_with(new)
