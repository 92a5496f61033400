"""What changed between two ONNX graphs: ops, nodes, tensor shapes and bytes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir

from neodragon_npu.graphs.stats import GraphStats, format_bytes, onnx_stats


@dataclass
class GraphDiff:
    op_counts: dict[str, tuple[int, int]]  # op -> (count in a, count in b), changed ops only
    added: list[tuple[str, str]]  # (node name, op) only in b
    removed: list[tuple[str, str]]  # (node name, op) only in a
    reshaped: list[tuple[str, tuple, tuple]]  # tensor, shape in a, shape in b
    stats_a: GraphStats
    stats_b: GraphStats

    @property
    def identical_structure(self) -> bool:
        return not (self.op_counts or self.added or self.removed or self.reshaped)


def _shape(value: ir.Value) -> tuple | None:
    return tuple(value.shape) if value.shape is not None else None


def diff_onnx(a: ir.Model, b: ir.Model) -> GraphDiff:
    stats_a, stats_b = onnx_stats(a), onnx_stats(b)
    ops_a = Counter(n.op_type for n in a.graph)
    ops_b = Counter(n.op_type for n in b.graph)
    op_counts = {op: (ops_a[op], ops_b[op]) for op in sorted(ops_a | ops_b) if ops_a[op] != ops_b[op]}
    nodes_a = {n.name: n.op_type for n in a.graph}
    nodes_b = {n.name: n.op_type for n in b.graph}
    added = sorted((n, op) for n, op in nodes_b.items() if n not in nodes_a)
    removed = sorted((n, op) for n, op in nodes_a.items() if n not in nodes_b)
    values_a = {v.name: v for n in a.graph for v in n.outputs}
    values_a.update({v.name: v for v in a.graph.inputs})
    reshaped = []
    for value in [v for n in b.graph for v in n.outputs] + list(b.graph.inputs):
        other = values_a.get(value.name)
        if other is not None and _shape(other) != _shape(value):
            reshaped.append((value.name, _shape(other), _shape(value)))
    return GraphDiff(op_counts, added, removed, reshaped, stats_a, stats_b)


def format_diff(d: GraphDiff, limit: int = 20) -> str:
    def delta(x: float, y: float, fmt) -> str:
        sign = "+" if y >= x else "-"
        return f"{fmt(x):>12} -> {fmt(y):<12} ({sign}{fmt(abs(y - x))})"

    sa, sb = d.stats_a, d.stats_b
    lines = [
        "Totals:",
        f"  nodes                  {delta(sa.node_count, sb.node_count, str)}",
        f"  weights                {delta(sa.weight_bytes, sb.weight_bytes, format_bytes)}",
        f"  op-output bytes/call   {delta(sa.op_output_bytes, sb.op_output_bytes, format_bytes)}",
        f"  largest tensor         {delta(sa.largest_tensor[1], sb.largest_tensor[1], format_bytes)}",
        f"  peak live activations  {delta(sa.peak_live_bytes, sb.peak_live_bytes, format_bytes)}",
    ]
    if d.op_counts:
        lines.append("Op counts:")
        lines += [f"  {op:<24} {x:>6} -> {y:<6} ({y - x:+d})" for op, (x, y) in d.op_counts.items()]

    def listing(title: str, rows: list, fmt) -> None:
        if rows:
            lines.append(f"{title} ({len(rows)}):")
            lines.extend("  " + fmt(r) for r in rows[:limit])
            if len(rows) > limit:
                lines.append(f"  ... {len(rows) - limit} more")

    listing("Nodes added", d.added, lambda r: f"+ {r[1]:<20} {r[0]}")
    listing("Nodes removed", d.removed, lambda r: f"- {r[1]:<20} {r[0]}")
    listing("Shape changes", d.reshaped, lambda r: f"{r[0]}: {list(r[1] or [])} -> {list(r[2] or [])}")
    if d.identical_structure:
        lines.append("No structural differences.")
    return "\n".join(lines)
