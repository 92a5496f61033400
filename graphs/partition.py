"""Memory-bounded sequential partitioning of an ONNX graph.

A partition is a contiguous run of nodes in one topological order, so the quotient graph
is a chain (acyclic by construction) and every node lands in exactly one partition.
Cuts are chosen by dynamic programming to minimise the activation bytes crossing them,
subject to a budget on the weights each partition holds (which bounds its compile size,
its context memory and the memory its quantization needs); the live-activation budget
does not depend on where the cuts go, so it is checked up front.

Stage graphs of one model share their weights; :func:`align_cuts` places the cuts of
another graph so that partition k holds exactly the same weights as in the reference.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx_ir as ir

from graphs.stats import ensure_shapes, onnx_tensor_graph

PARTITION_KEY = "neodragon.partition"


class PartitionBudgetError(ValueError):
    """No partitioning meets the budget; the message names the smallest budget that works."""


@dataclass
class Profile:
    """Per-position figures over the node order."""

    nodes: list[ir.Node]
    weights: list[set[str]]  # initializers each node reads
    weight_bytes: dict[str, int]
    crossing: np.ndarray  # [n+1] activation bytes produced before position p and read at/after p
    live: np.ndarray  # [n] bytes alive while node p runs


def _value_bytes(value: ir.Value, activation_bytes: int | None) -> int:
    if value.shape is None or not value.shape.is_static() or value.dtype is None:
        return 0
    n = int(np.prod([int(d) for d in value.shape])) if len(value.shape) else 1
    size = activation_bytes if activation_bytes and value.dtype.is_floating_point() else value.dtype.itemsize
    return int(n * size)


def prepare(model: ir.Model) -> ir.Model:
    """Constant nodes become initializers (so a constant read by two partitions is copied
    into both, never passed between them) and nodes are put in topological order."""
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, TopologicalSortPass

    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    TopologicalSortPass()(model)
    return model


def profile(model: ir.Model, *, activation_bytes: int | None = 2) -> Profile:
    """Per-node weights, crossing and live bytes (call :func:`prepare` first)."""
    ensure_shapes(model)
    graph = model.graph
    nodes = list(graph)
    inits = graph.initializers
    weight_bytes = {n: v.const_value.nbytes for n, v in inits.items() if v.const_value is not None}
    index = {node: i for i, node in enumerate(nodes)}
    weights, last_use = [], {}
    for i, node in enumerate(nodes):
        weights.append({v.name for v in node.inputs if v is not None and v.name in inits})
        for v in node.inputs:
            if v is not None and v.name not in inits and v.producer() is not None:
                last_use[v] = i
    n = len(nodes)
    for v in graph.outputs:
        last_use[v] = n
    # crossing[p]: produced before p, read at or after p (difference array over [prod+1, last])
    delta = np.zeros(n + 2, dtype=np.int64)
    for v, last in last_use.items():
        prod = index[v.producer()]
        size = _value_bytes(v, activation_bytes)
        delta[prod + 1] += size
        delta[last + 1] -= size
    crossing = np.cumsum(delta)[: n + 1]
    tg = onnx_tensor_graph(model, activation_bytes=activation_bytes)
    live = _live_profile(tg)
    return Profile(nodes, weights, weight_bytes, crossing, live)


def _live_profile(tg) -> np.ndarray:
    last_use: dict[str, int] = {}
    for i, node in enumerate(tg.nodes):
        for t in node.inputs:
            last_use[t] = i
    for t in tg.outputs:
        last_use[t] = len(tg.nodes)
    alive = {t: tg.sizes.get(t, 0) for t in tg.inputs}
    total = sum(alive.values())
    out = np.zeros(len(tg.nodes), dtype=np.int64)
    for i, node in enumerate(tg.nodes):
        for t in node.outputs:
            if t in tg.sizes:
                alive[t] = tg.sizes[t]
                total += tg.sizes[t]
        out[i] = total
        for t in set(node.inputs) | set(node.outputs):
            if t in alive and last_use.get(t, -1) <= i:
                total -= alive.pop(t)
    return out


def _segment_weights(prof: Profile, start: int, end: int) -> int:
    names = set().union(*prof.weights[start:end]) if end > start else set()
    return sum(prof.weight_bytes.get(n, 0) for n in names)


def plan_cuts(prof: Profile, *, max_weight_bytes: int, max_live_bytes: int | None = None) -> list[int]:
    """Start positions of partitions 1..K-1 minimising the crossing bytes (DP, O(n))."""
    n = len(prof.nodes)
    if max_live_bytes is not None and n and prof.live.max() > max_live_bytes:
        raise PartitionBudgetError(
            f"live activations reach {int(prof.live.max())} bytes at one node; no cut helps, "
            f"the smallest live-activation budget that works is {int(prof.live.max())} bytes"
        )
    # weight bytes per node counted at its first reader (exact sums are checked below)
    first_reader: dict[str, int] = {}
    for i, names in enumerate(prof.weights):
        for name in names:
            first_reader.setdefault(name, i)
    per_node = np.zeros(n, dtype=np.int64)
    for name, i in first_reader.items():
        per_node[i] += prof.weight_bytes.get(name, 0)
    heaviest = int(per_node.max()) if n else 0
    if heaviest > max_weight_bytes:
        raise PartitionBudgetError(
            f"one node alone reads {heaviest} bytes of weights; the smallest weight budget that "
            f"works is {heaviest} bytes (asked for {max_weight_bytes})"
        )
    prefix = np.concatenate([[0], np.cumsum(per_node)])
    # dp[p]: best cost of partitioning nodes [0, p) with a cut at p (p = n: the end)
    inf = np.iinfo(np.int64).max // 4
    dp = np.full(n + 1, inf, dtype=np.int64)
    back = np.full(n + 1, -1, dtype=np.int64)
    dp[0] = 0
    window: deque[int] = deque([0])  # candidate segment starts, increasing dp[j]
    lo = 0
    for p in range(1, n + 1):
        while prefix[p] - prefix[lo] > max_weight_bytes:
            lo += 1
        while window and window[0] < lo:
            window.popleft()
        if window:
            j = window[0]
            dp[p] = dp[j] + (prof.crossing[p] if p < n else 0)
            back[p] = j
        while window and dp[window[-1]] >= dp[p]:
            window.pop()
        window.append(p)
    cuts, p = [], n
    while p > 0:
        p = int(back[p])
        if p > 0:
            cuts.append(p)
    cuts.reverse()
    bounds = [0, *cuts, n]
    for a, b in zip(bounds, bounds[1:]):  # shared weights are counted in every partition
        if _segment_weights(prof, a, b) > max_weight_bytes:
            raise PartitionBudgetError(
                f"partition of nodes {a}..{b} needs {_segment_weights(prof, a, b)} bytes of weights "
                f"(shared constants counted twice); raise the weight budget"
            )
    return cuts


def partition_weights(prof: Profile, cuts: list[int]) -> list[set[str]]:
    bounds = [0, *cuts, len(prof.nodes)]
    return [set().union(*prof.weights[a:b]) if b > a else set() for a, b in zip(bounds, bounds[1:])]


def align_cuts(prof: Profile, reference: list[set[str]]) -> list[int]:
    """Cuts for another graph so that every weight of one reference partition sits in the
    same partition here (constants shared by several partitions may go anywhere); within
    the feasible range, the cheapest cut."""
    seen: dict[str, int] = {}
    for names in reference:
        for w in names:
            seen[w] = seen.get(w, 0) + 1
    owner = {w: k for k, names in enumerate(reference) for w in names if seen[w] == 1}
    n = len(prof.nodes)
    first = [n] * len(reference)  # first node reading a weight of partition k
    last = [-1] * len(reference)  # last node reading a weight of partition k
    for i, names in enumerate(prof.weights):
        for name in names:
            k = owner.get(name)
            if k is not None:
                first[k] = min(first[k], i)
                last[k] = max(last[k], i)
    cuts = []
    for k in range(1, len(reference)):
        lo, hi = last[k - 1] + 1, first[k]
        if lo > hi:
            raise PartitionBudgetError(
                f"partition {k - 1}'s weights are still read after partition {k}'s first weight: "
                "this graph orders its weights differently from the reference"
            )
        cuts.append(lo + int(np.argmin(prof.crossing[lo : hi + 1])))
    return cuts


def annotate(model: ir.Model, prof: Profile, cuts: list[int]) -> bool:
    """Record each node's partition in its metadata; True if anything changed."""
    bounds = [0, *cuts, len(prof.nodes)]
    changed = False
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        for node in prof.nodes[a:b]:
            if node.metadata_props.get(PARTITION_KEY) != str(k):
                node.metadata_props[PARTITION_KEY] = str(k)
                changed = True
    return changed


def partition_of(node: ir.Node) -> int | None:
    value = node.metadata_props.get(PARTITION_KEY)
    return int(value) if value is not None else None


def quotient_graph(model: ir.Model) -> nx.DiGraph:
    """Partitions as nodes, an edge k -> m when m reads a tensor k produced."""
    g = nx.DiGraph()
    for node in model.graph:
        k = partition_of(node)
        g.add_node(k)
        for v in node.inputs:
            prod = v.producer() if v is not None else None
            if prod is not None and partition_of(prod) != k:
                g.add_edge(partition_of(prod), k)
    return g


def split(model: ir.Model) -> list[ir.Model]:
    """One model per partition (annotated by :func:`annotate`), chained by tensor names."""
    graph = model.graph
    parts = sorted({partition_of(n) for n in graph})
    if None in parts:
        raise ValueError("some nodes have no partition: run the partition pass first")
    out = []
    for k in parts:
        members = [n for n in graph if partition_of(n) == k]
        member_set = set(members)
        inputs, outputs = [], []
        for node in members:
            for v in node.inputs:
                if v is None or v in inputs or v.name in graph.initializers:
                    continue
                if v.producer() is None or v.producer() not in member_set:
                    inputs.append(v)
            for v in node.outputs:
                if v.is_graph_output() or any(u not in member_set for u, _ in v.uses()):
                    outputs.append(v)
        sub = ir.convenience.extract(graph, inputs=inputs, outputs=outputs)
        sub.name = f"{graph.name or 'graph'}_part{k}"
        out.append(ir.Model(sub, ir_version=model.ir_version, producer_name="neodragon-npu"))
        out[-1].opset_imports.update(model.opset_imports)
    return out
