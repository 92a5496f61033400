"""Memory-bounded sequential partitioning of an ONNX graph.

A partition is a contiguous run of nodes in one topological order, so the quotient graph
is a chain (acyclic by construction) and every node lands in exactly one partition.
Cuts are chosen by dynamic programming to minimise the activation bytes crossing them,
subject to a budget on the weights each partition holds (which bounds its compile size and
its context memory) and, optionally, on the bytes its ops write per call (what its
calibration and check forwards work through; this budget alone did not bound a partition's
quantization memory: docs/first-frame.md). The live-activation budget does not depend on
where the cuts go, so it is checked up front.

Stage graphs of one model share their weights; :func:`align_parts` assigns the nodes of
another graph so that partition k holds exactly the same weights as in the reference.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs.stats import ensure_shapes, onnx_tensor_graph

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
    outputs: np.ndarray  # [n] bytes node p writes per call


def _value_bytes(value: ir.Value, activation_bytes: int | None) -> int:
    if value.shape is None or not value.shape.is_static() or value.dtype is None:
        return 0
    n = int(np.prod([int(d) for d in value.shape])) if len(value.shape) else 1
    size = activation_bytes if activation_bytes and value.dtype.is_floating_point() else value.dtype.itemsize
    return int(n * size)


def prepare(model: ir.Model) -> ir.Model:
    """Constant nodes become initializers (so a constant read by two partitions is copied
    into both, never passed between them) and nodes are put in an as-late-as-possible
    topological order: a node that only needs early values (an adaLN Linear of block k
    reads the conditioning vector) sits right before its first consumer, so a contiguous
    run of nodes holds whole blocks with their weights."""
    import heapq

    from onnx_ir.passes.common import LiftConstantsToInitializersPass, TopologicalSortPass

    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    TopologicalSortPass()(model)
    graph = model.graph
    nodes = list(graph)
    index = {n: i for i, n in enumerate(nodes)}
    consumers = {n: {u for v in n.outputs for u, _ in v.uses()} for n in nodes}
    pending = {n: len(c) for n, c in consumers.items()}
    heap = [(-index[n], index[n]) for n in nodes if pending[n] == 0]
    heapq.heapify(heap)
    reverse = []
    while heap:
        _, i = heapq.heappop(heap)
        node = nodes[i]
        reverse.append(node)
        for v in node.inputs:
            prod = v.producer() if v is not None else None
            if prod is not None and prod in pending:
                pending[prod] -= 1
                if pending[prod] == 0:
                    heapq.heappush(heap, (-index[prod], index[prod]))
    order = list(reversed(reverse))
    assert len(order) == len(nodes), "graph has a cycle"
    graph.remove(nodes, safe=False)
    graph.extend(order)
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
    outputs = np.array([sum(_value_bytes(v, activation_bytes) for v in node.outputs) for node in nodes],
                       dtype=np.int64).reshape(n)
    return Profile(nodes, weights, weight_bytes, crossing, live, outputs)


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


def _owned(prof: Profile) -> np.ndarray:
    """Per node: does it read a weight that belongs to one partition (>= OWNED_WEIGHT_BYTES)?"""
    return np.array([any(prof.weight_bytes.get(w, 0) >= OWNED_WEIGHT_BYTES for w in names)
                     for names in prof.weights], dtype=bool)


def _inseparable(prof: Profile, owned: np.ndarray) -> np.ndarray:
    """Per position p: must no cut fall right before node p? True where node p applies a
    small (unowned) constant to the output of node p - 1, which reads an owned weight: a
    bias Add after its MatMul. Graphs that follow this cut (:func:`align_parts`) keep such a
    node beside its producer, and aimet fuses MatMul and Add into one op: a cut between them
    in one graph only would give a shared weight consumers of different types."""
    blocked = np.zeros(len(prof.nodes) + 1, dtype=bool)
    for p in range(1, len(prof.nodes)):
        node, before = prof.nodes[p], prof.nodes[p - 1]
        if owned[p] or not owned[p - 1] or not prof.weights[p]:
            continue
        if any(v is not None and v.producer() is before for v in node.inputs):
            blocked[p] = True
    return blocked


def _largest_piece(per_node: np.ndarray, blocked: np.ndarray) -> int:
    """The largest sum over the smallest pieces a cut can leave: a node with the nodes no cut
    may separate from it."""
    unit = per_node.copy()
    for p in range(len(unit) - 1, 0, -1):
        if blocked[p]:
            unit[p - 1] += unit[p]
            unit[p] = 0
    return int(unit.max()) if len(unit) else 0


def plan_cuts(prof: Profile, *, max_weight_bytes: int, max_live_bytes: int | None = None,
              max_output_bytes: int | None = None) -> list[int]:
    """Start positions of partitions 1..K-1 minimising the crossing bytes (DP, O(n)).

    Each partition holds at most ``max_weight_bytes`` of owned weights and, with
    ``max_output_bytes``, its nodes write at most that many bytes per call.

    Every partition holds at least one owned weight (so a graph that follows the cuts has a
    node in each partition), and no cut separates a node from the bias that follows it (see
    :func:`_inseparable`)."""
    n = len(prof.nodes)
    if max_live_bytes is not None and n and prof.live.max() > max_live_bytes:
        raise PartitionBudgetError(
            f"live activations reach {int(prof.live.max())} bytes at one node; no cut helps, "
            f"the smallest live-activation budget that works is {int(prof.live.max())} bytes"
        )
    # owned weight bytes per node, a weight read by several nodes counted at each of them: a
    # segment's sum then bounds its exact (deduplicated) weight bytes from above, so every
    # segment the DP accepts fits. Small constants (scalars, axes, small biases) are copied
    # into each partition that reads them and are not counted.
    per_node = np.array([sum(b for b in (prof.weight_bytes.get(name, 0) for name in names) if b >= OWNED_WEIGHT_BYTES)
                         for names in prof.weights], dtype=np.int64).reshape(n)
    owned = _owned(prof)
    blocked = _inseparable(prof, owned)
    heaviest = _largest_piece(per_node, blocked)
    if heaviest > max_weight_bytes:
        raise PartitionBudgetError(
            f"one node alone reads {heaviest} bytes of weights; the smallest weight budget that "
            f"works is {heaviest} bytes (asked for {max_weight_bytes})"
        )
    widest = _largest_piece(prof.outputs, blocked)
    if max_output_bytes is not None and widest > max_output_bytes:
        raise PartitionBudgetError(
            f"one node alone writes {widest} bytes per call; the op-output budget must be at least "
            f"{widest} bytes (asked for {max_output_bytes})"
        )
    if not owned.any():  # no weight owns a partition: any cut is as good as another
        owned[:] = True
    prefix = np.concatenate([[0], np.cumsum(per_node)])
    out_prefix = np.concatenate([[0], np.cumsum(prof.outputs)])
    out_limit = max_output_bytes if max_output_bytes is not None else np.iinfo(np.int64).max
    # last_owned[p]: the last owned node before position p (-1: none); a segment [j, p)
    # holds an owned weight if j <= last_owned[p]
    last_owned = np.full(n + 1, -1, dtype=np.int64)
    for p in range(1, n + 1):
        last_owned[p] = p - 1 if owned[p - 1] else last_owned[p - 1]
    # dp[p]: best cost of partitioning nodes [0, p) with a cut at p (p = n: the end)
    inf = np.iinfo(np.int64).max // 4
    dp = np.full(n + 1, inf, dtype=np.int64)
    back = np.full(n + 1, -1, dtype=np.int64)
    dp[0] = 0
    window: deque[int] = deque()  # candidate segment starts, increasing dp[j]
    lo, added = 0, 0  # starts below lo exceed the budget; starts below added were offered
    for p in range(1, n + 1):
        while prefix[p] - prefix[lo] > max_weight_bytes or out_prefix[p] - out_prefix[lo] > out_limit:
            lo += 1
        hi = last_owned[p]  # starts after the last owned node leave a segment without one
        while added <= hi:
            if dp[added] < inf:
                while window and dp[window[-1]] >= dp[added]:
                    window.pop()
                window.append(added)
            added += 1
        while window and window[0] < lo:
            window.popleft()
        if window and (p == n or not blocked[p]):
            j = window[0]
            dp[p] = dp[j] + (prof.crossing[p] if p < n else 0)
            back[p] = j
    if dp[n] >= inf:
        raise PartitionBudgetError(
            f"no cut of this graph keeps every partition under {max_weight_bytes} bytes of weights"
            + (f" and {max_output_bytes} bytes of op-output" if max_output_bytes is not None else "")
            + " with at least one weight in each; give a larger budget"
        )
    cuts, p = [], n
    while p > 0:
        p = int(back[p])
        if p > 0:
            cuts.append(p)
    cuts.reverse()
    return cuts


def partition_weights(prof: Profile, cuts: list[int]) -> list[set[str]]:
    bounds = [0, *cuts, len(prof.nodes)]
    return [set().union(*prof.weights[a:b]) if b > a else set() for a, b in zip(bounds, bounds[1:])]


def cuts_to_parts(prof: Profile, cuts: list[int]) -> list[int]:
    """The partition of every node for contiguous cuts."""
    bounds = [0, *cuts, len(prof.nodes)]
    parts = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        parts += [k] * (b - a)
    return parts


# Initializers below this size (axes, scalars, small shapes) are copied into every partition
# that reads them instead of belonging to one.
OWNED_WEIGHT_BYTES = 4096


def align_parts(prof: Profile, reference: list[set[str]]) -> list[int]:
    """Partitions for another graph with the same weights: each node goes to the latest of
    the partitions owning its weights and of its producers' partitions, so every weight of
    reference partition k is read in partition k only and tensors only flow forward (the
    quotient graph stays a chain). Small constants and ones several partitions read are free.

    Nodes computed from the graph inputs alone then move on to the earliest partition
    reading them (:func:`_sink_input_only_nodes`): they are not handed across cuts."""
    seen: dict[str, int] = {}
    for names in reference:
        for w in names:
            seen[w] = seen.get(w, 0) + 1
    owner = {
        w: k
        for k, names in enumerate(reference)
        for w in names
        if seen[w] == 1 and prof.weight_bytes.get(w, 0) >= OWNED_WEIGHT_BYTES
    }
    part_of: dict[ir.Node, int] = {}
    parts = []
    for node, names in zip(prof.nodes, prof.weights):
        owners = {owner[w] for w in names if w in owner}
        producers = {part_of[v.producer()] for v in node.inputs if v is not None and v.producer() in part_of}
        k = max(owners | producers | {0})
        if owners and k != max(owners) or len(owners) > 1:
            raise PartitionBudgetError(
                f"node {node.name} reads weights of partitions {sorted(owners)} but needs inputs from "
                f"partition {k}: this graph does not split where the reference does"
            )
        part_of[node] = k
        parts.append(k)
    return _sink_input_only_nodes(prof, parts, set(owner))


def _sink_input_only_nodes(prof: Profile, parts: list[int], owned_weights: set[str]) -> list[int]:
    """Move every node computed from the graph inputs and constants alone to the earliest
    partition that reads its outputs (a partition reads graph inputs directly, so this
    never adds a crossing tensor); nodes producing graph outputs stay where they are.

    Such nodes (the attention-mask slices of every block, cut from the mask input) otherwise
    land in partition 0 and are handed through every cut to the block that reads them
    (hundreds of tensors per call at full size). The reference graph's contiguous cuts
    already keep such nodes next to their first reader (:func:`prepare`'s order)."""
    index = {node: i for i, node in enumerate(prof.nodes)}
    input_only = set()
    for i, node in enumerate(prof.nodes):
        if prof.weights[i] & owned_weights:
            continue
        if all(v is None or v.producer() is None or index.get(v.producer()) in input_only for v in node.inputs):
            input_only.add(i)
    parts = list(parts)
    for i in sorted(input_only, reverse=True):  # readers first
        node = prof.nodes[i]
        if any(v.is_graph_output() for v in node.outputs):
            continue
        readers = [parts[index[u]] for v in node.outputs for u, _ in v.uses() if u in index]
        if readers:
            parts[i] = max(parts[i], min(readers))
    return parts


def handed_over(parts: list[ir.Model]) -> tuple[int, int]:
    """Tensors a chain of partitions (from :func:`split`) hands from one partition to a
    later one, and their bytes per call at their own dtypes (graph inputs not counted)."""
    produced = {v.name for part in parts for v in part.graph.outputs}
    names: dict[str, int] = {}
    for part in parts[1:]:
        for v in part.graph.inputs:
            if v.name in produced:
                names[v.name] = _value_bytes(v, None)
    return len(names), sum(names.values())


def annotate(model: ir.Model, prof: Profile, parts: list[int]) -> bool:
    """Record each node's partition in its metadata; True if anything changed."""
    changed = False
    for node, k in zip(prof.nodes, parts):
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
        _order_initializers(sub)
        sub.name = f"{graph.name or 'graph'}_part{k}"
        out.append(ir.Model(sub, ir_version=model.ir_version, producer_name="neodragon-npu"))
        out[-1].opset_imports.update(model.opset_imports)
    return out


def _order_initializers(graph: ir.Graph) -> None:
    """Initializers in the order the nodes first read them. ``extract`` collects them in a
    set, so their order, and with it the bytes of the partition's data file, of its QDQ
    model and of its context binary, changed from run to run (same weights, same encodings)."""
    first_use: dict[str, int] = {}
    for node in graph:
        for value in node.inputs:
            if value is not None and value.name in graph.initializers:
                first_use.setdefault(value.name, len(first_use))
    names = sorted(graph.initializers, key=lambda name: (first_use.get(name, len(first_use)), name))
    graph.initializers.data = {name: graph.initializers.data[name] for name in names}
