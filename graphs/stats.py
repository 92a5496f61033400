"""Graph statistics: op counts, weight bytes, op-output bytes, largest tensor, peak liveness.

On the Hexagon NPU the denoiser is bandwidth-bound: stage latencies tracked the bytes ops
write, not MACs (shared/neodragon-facts.md section 4, item 12). So the figures that matter
for a rewrite are bytes: the total written by all ops per call, the largest single tensor
(what must be tiled) and the peak of live activations over a topological order (what must
fit in memory at once).

FX graphs and ONNX models are first reduced to a :class:`TensorGraph` (nodes with named
input/output tensors and a byte size per activation tensor), and one function computes the
statistics for both.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
import numpy as np
import onnx_ir as ir
import torch
import torch.fx as fx

from neodragon_npu.graphs import fx as fx_utils


@dataclass(frozen=True)
class NodeRecord:
    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class TensorGraph:
    nodes: list[NodeRecord]  # in a topological order
    sizes: dict[str, int]  # bytes of every activation tensor whose shape is known
    shapes: dict[str, tuple[int, ...]]
    inputs: list[str]  # activation inputs of the graph (no weights)
    outputs: list[str]
    weight_bytes: int


@dataclass
class GraphStats:
    node_count: int
    op_counts: Counter
    weight_bytes: int
    op_output_bytes: int  # sum over every op output (what the ops write per call)
    largest_tensor: tuple[str, int, tuple[int, ...]]  # name, bytes, shape
    peak_live_bytes: int  # max over the node order of the bytes alive at once
    peak_live_at: str  # node at which the peak occurs
    unknown_shapes: int  # op outputs whose size could not be determined
    extra: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict:
        name, nbytes, shape = self.largest_tensor
        return {
            "node_count": self.node_count,
            "op_counts": dict(sorted(self.op_counts.items())),
            "weight_bytes": self.weight_bytes,
            "op_output_bytes": self.op_output_bytes,
            "largest_tensor": {"name": name, "bytes": nbytes, "shape": list(shape)},
            "peak_live_bytes": self.peak_live_bytes,
            "peak_live_at": self.peak_live_at,
            "unknown_shapes": self.unknown_shapes,
            **self.extra,
        }


# Ops that only move data: on an NHWC NPU a Transpose or a Reshape across the channel axis
# is a relayout of its whole tensor, paid in bytes like any op (facts 4.10, 4.12).
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "permute", "transpose", "reshape", "view"})


def compute_stats(tg: TensorGraph) -> GraphStats:
    """Statistics of a TensorGraph; liveness over the given node order."""
    last_use: dict[str, int] = {}
    for i, node in enumerate(tg.nodes):
        for t in node.inputs:
            last_use[t] = i
    end = len(tg.nodes)
    for t in tg.outputs:
        last_use[t] = end  # graph outputs stay alive to the end

    live = {t: tg.sizes.get(t, 0) for t in tg.inputs}
    live_bytes = sum(live.values())
    peak, peak_at = live_bytes, "<inputs>"
    op_output_bytes, layout_bytes, unknown = 0, 0, 0
    for i, node in enumerate(tg.nodes):
        for t in node.outputs:
            if not t:
                continue
            if t not in tg.sizes:
                unknown += 1
                continue
            op_output_bytes += tg.sizes[t]
            if node.op in LAYOUT_OPS:
                layout_bytes += tg.sizes[t]
            live[t] = tg.sizes[t]
            live_bytes += tg.sizes[t]
        if live_bytes > peak:
            peak, peak_at = live_bytes, node.name
        # Free inputs whose last use was this node, and outputs nobody reads.
        for t in set(node.inputs) | set(node.outputs):
            if t in live and last_use.get(t, -1) <= i:
                live_bytes -= live.pop(t)

    if tg.sizes:
        name = max(tg.sizes, key=lambda t: tg.sizes[t])
        largest = (name, tg.sizes[name], tg.shapes.get(name, ()))
    else:
        largest = ("", 0, ())
    return GraphStats(
        node_count=len(tg.nodes),
        op_counts=Counter(n.op for n in tg.nodes),
        weight_bytes=tg.weight_bytes,
        op_output_bytes=op_output_bytes,
        largest_tensor=largest,
        peak_live_bytes=peak,
        peak_live_at=peak_at,
        unknown_shapes=unknown,
        extra={"layout_bytes": layout_bytes},
    )


def _activation_bytes(numel: int, itemsize: int, is_float: bool, activation_bytes: int | None) -> int:
    """Bytes of an activation; ``activation_bytes`` re-prices float tensors (e.g. 2 for A16)."""
    if activation_bytes is not None and is_float:
        return numel * activation_bytes
    return int(math.ceil(numel * itemsize))


def onnx_tensor_graph(model: ir.Model, *, activation_bytes: int | None = None) -> TensorGraph:
    """Reduce an onnx_ir model (shapes inferred) to a TensorGraph. Constants count as weights."""
    graph = model.graph
    weights = {name for name in graph.initializers}
    weight_total = sum(
        init.const_value.nbytes for init in graph.initializers.values() if init.const_value is not None
    )
    nodes, sizes, shapes = [], {}, {}

    def record(value: ir.Value) -> None:
        if value.shape is None or value.dtype is None or not value.shape.is_static():
            return
        dims = tuple(int(d) for d in value.shape)
        numel = int(np.prod(dims)) if dims else 1
        sizes[value.name] = _activation_bytes(
            numel, value.dtype.itemsize, value.dtype.is_floating_point(), activation_bytes
        )
        shapes[value.name] = dims

    for node in graph:
        if node.op_type == "Constant":
            weights.update(o.name for o in node.outputs)
            attr = node.attributes.get("value")
            if attr is not None and attr.value is not None:
                weight_total += attr.value.nbytes
            continue
        ins = tuple(v.name for v in node.inputs if v is not None and v.name not in weights)
        outs = tuple(v.name for v in node.outputs)
        for v in node.outputs:
            record(v)
        nodes.append(NodeRecord(node.name or f"{node.op_type}_{len(nodes)}", node.op_type, ins, outs))
    inputs = [v.name for v in graph.inputs if v.name not in weights]
    for v in graph.inputs:
        record(v)
    return TensorGraph(nodes, sizes, shapes, inputs, [v.name for v in graph.outputs], weight_total)


def fx_tensor_graph(gm: fx.GraphModule, *, activation_bytes: int | None = None) -> TensorGraph:
    """Reduce a shape-propagated GraphModule to a TensorGraph (get_attr/params are weights)."""
    nodes, sizes, shapes, inputs, outputs = [], {}, {}, [], []
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op == "get_attr" or meta is None and node.op != "output":
            continue
        if node.op == "output":
            outputs = [a.name for a in node.all_input_nodes]
            continue
        if hasattr(meta, "shape"):
            dims = tuple(meta.shape)
            numel = int(np.prod(dims)) if dims else 1
            itemsize = torch.empty((), dtype=meta.dtype).element_size()
            sizes[node.name] = _activation_bytes(numel, itemsize, meta.dtype.is_floating_point, activation_bytes)
            shapes[node.name] = dims
        else:  # tuple-valued (chunk, split): its getitem users carry the tensors
            sizes[node.name] = 0
        if node.op == "placeholder":
            inputs.append(node.name)
            continue
        ins = tuple(a.name for a in node.all_input_nodes if a.name in sizes)
        nodes.append(NodeRecord(node.name, fx_utils.op_key(node, gm), ins, (node.name,)))
    weight_total = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
    return TensorGraph(nodes, sizes, shapes, inputs, outputs, weight_total)


_SCORE_CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Where"}


def attention_score_tensors(model: ir.Model) -> set[str]:
    """Tensors on a QK^T -> (scale, mask) -> softmax path: each Softmax's input and output,
    and the elementwise chain from its input back to the producing MatMul."""
    names: set[str] = set()
    for node in model.graph:
        if node.op_type != "Softmax":
            continue
        names.update(v.name for v in node.outputs)
        value = node.inputs[0]
        while value is not None:
            names.add(value.name)
            producer = value.producer()
            if producer is None or producer.op_type == "MatMul" or producer.op_type not in _SCORE_CHAIN_OPS:
                break
            # follow the operand that is itself on the chain (the larger one)
            candidates = [v for v in producer.inputs if v is not None and v.shape is not None]
            value = max(candidates, key=lambda v: int(np.prod([int(d) for d in v.shape])) if v.shape.is_static() else 0, default=None)
    return names


def ensure_shapes(model: ir.Model) -> ir.Model:
    """Run ONNX shape inference when some node output has no shape (in place)."""
    if any(v.shape is None or not v.shape.is_static() for node in model.graph for v in node.outputs):
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass()(model)
    return model


def onnx_stats(model: ir.Model, *, activation_bytes: int | None = None) -> GraphStats:
    tg = onnx_tensor_graph(ensure_shapes(model), activation_bytes=activation_bytes)
    stats = compute_stats(tg)
    scores = [(tg.sizes[n], n) for n in attention_score_tensors(model) if n in tg.sizes]
    if scores:
        nbytes, name = max(scores)
        stats.extra["largest_score_tensor"] = {"name": name, "bytes": nbytes, "shape": list(tg.shapes[name])}
    return stats


def fx_stats(gm: fx.GraphModule, *, activation_bytes: int | None = None) -> GraphStats:
    stats = compute_stats(fx_tensor_graph(gm, activation_bytes=activation_bytes))
    stats.extra["macs"] = fx_macs(gm)
    return stats


def _shape_of(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def fx_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates of one call: convolutions (every output value times its input
    window), linear layers and matrix products (attention included). Elementwise ops,
    norms and pooling are not counted. Needs shapes (``graphs.fx.propagate_shapes``)."""
    import torch.nn.functional as F

    total = 0
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        out = _shape_of(node)
        if out is None:
            continue
        numel = math.prod(out)
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, torch.nn.modules.conv._ConvNd):
                total += numel * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            elif isinstance(m, torch.nn.Linear):
                total += numel * m.in_features
        elif node.op == "call_function" and (node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear)
                                             or str(node.target).split(".")[1:2] in (["convolution"], ["conv2d"],
                                                                                      ["linear"])):
            weight = _shape_of(node.args[1])
            if weight is not None:
                total += numel * math.prod(weight[1:])
        elif fx_utils.target_name(node).split(".")[0] in ("matmul", "bmm", "mm"):
            left = _shape_of(node.args[0])
            if left is not None:
                total += numel * left[-1]
        elif node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            q, k = _shape_of(node.args[0]), _shape_of(node.args[1])
            if q is not None and k is not None:
                total += 2 * math.prod(q[:-1]) * k[-2] * q[-1]  # QK^T and the weights times V
    return total


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def format_stats(stats: GraphStats, title: str = "", top_ops: int = 8) -> str:
    name, nbytes, shape = stats.largest_tensor
    ops = ", ".join(f"{op} {n}" for op, n in stats.op_counts.most_common(top_ops))
    lines = [
        title,
        f"  nodes                 {stats.node_count}",
        f"  ops                   {ops}",
        f"  weights               {format_bytes(stats.weight_bytes)}",
        f"  op-output bytes/call  {format_bytes(stats.op_output_bytes)}",
        f"  largest tensor        {format_bytes(nbytes)} {list(shape)} ({name})",
        f"  peak live activations {format_bytes(stats.peak_live_bytes)} (at {stats.peak_live_at})",
    ]
    if stats.extra.get("macs"):
        lines.append(f"  MACs/call             {stats.extra['macs'] / 1e9:.3f} G")
    layout = stats.extra.get("layout_bytes")
    if layout is not None and stats.op_output_bytes:
        lines.append(f"  Transpose/Reshape     {format_bytes(layout)}, "
                     f"{100 * layout / stats.op_output_bytes:.1f}% of op-output bytes")
    if stats.unknown_shapes:
        lines.append(f"  unknown shapes        {stats.unknown_shapes} op outputs")
    if "largest_score_tensor" in stats.extra:
        score = stats.extra["largest_score_tensor"]
        lines.append(f"  largest score tensor  {format_bytes(score['bytes'])} {score['shape']} ({score['name']})")
    return "\n".join(line for line in lines if line)

