"""Divide a pre-norm transformer's residual stream by a power of two chosen from
calibration statistics, so the stream fits FP16."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.onnx_edit import const_array, is_quantized
from neodragon_npu.passes.base import Option, Pass, PassResult, PreconditionError, calibration_feeds

FP16_MAX = 65504.0
# Norms whose output does not change when their input and epsilon are scaled together:
# norm(x / S, eps / S^2) == norm(x, eps) for RMS and mean-centred norms alike.
SCALE_FREE_NORMS = ("RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization")
# Ops that are linear in their data input (input 0): a scale passes through them.
_LINEAR_IN_DATA = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


@dataclass
class Stream:
    """One residual stream: its values in order (each read by a scale-free norm), the
    norms reading them, the Adds that write them, and the value that starts it."""

    values: list[ir.Value] = field(default_factory=list)
    norms: list[ir.Node] = field(default_factory=list)
    start: ir.Value | None = None
    writers: list[ir.Value] = field(default_factory=list)  # each Add's non-stream operand
    plan: list[tuple[ir.Node, int]] = field(default_factory=list)  # the constants that take 1/S


def _norm_input(node: ir.Node) -> ir.Value | None:
    if node.op_type not in SCALE_FREE_NORMS or not node.inputs:
        return None
    axis = node.attributes.get_int("axis", -1)
    x = node.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    if rank is None or axis % rank != rank - 1:
        return None  # normalised over more than the channel axis: still scale-free, but not a stream read
    return x


def find_streams(model: ir.Model) -> list[Stream]:
    """The residual streams: chains of values, each read by a scale-free norm (over the last
    axis), where each value is the previous one plus a writer (``x + f(norm(x))``)."""
    graph = model.graph
    normed: dict[ir.Value, list[ir.Node]] = {}
    for node in graph:
        x = _norm_input(node)
        if x is not None:
            normed.setdefault(x, []).append(node)
    streams: dict[ir.Value, Stream] = {}  # keyed by their first value
    head_of: dict[ir.Value, ir.Value] = {}
    for node in graph:  # topological: a value's residual comes before it
        if node.op_type != "Add" or node.outputs[0] not in normed:
            continue
        a, b = node.inputs
        if (a in normed) == (b in normed):
            continue  # no residual operand, or two of them: not a stream step
        residual, writer = (a, b) if a in normed else (b, a)
        head = head_of.get(residual, residual)
        stream = streams.get(head)
        if stream is None:
            stream = streams[head] = Stream(values=[residual], norms=list(normed[residual]), start=residual)
        elif stream.values[-1] is not residual:
            continue  # a branch off the middle of a stream: not a chain
        stream.values.append(node.outputs[0])
        stream.norms += normed[node.outputs[0]]
        stream.writers.append(writer)
        head_of[node.outputs[0]] = head
    return list(streams.values())


class _Unscalable(Exception):
    pass


def _scale_plan(value: ir.Value, out: list[tuple[ir.Node, int]], top: bool = True) -> None:
    """Where a 1/S scale of ``value`` goes: the constant operands (node, input index) whose
    scaling scales ``value``, found through Gather (a table), MatMul/Gemm (the weight), Add
    (both sides), Mul by a constant and ops linear in their data. Every value below the top
    one must have no other reader, or the scale would leak into it."""
    node = value.producer()
    if node is None:
        raise _Unscalable(f"{value.name} is a graph input")
    for v in node.outputs:
        if v is not None and (v is not value or not top) and (len(v.uses()) > 1 or v.is_graph_output()):
            raise _Unscalable(f"{v.name} has other readers")
    op, ins = node.op_type, node.inputs

    def constant(i: int) -> bool:
        return i < len(ins) and ins[i] is not None and const_array(ins[i]) is not None

    if op == "Gather" and constant(0):
        out.append((node, 0))
    elif op in ("MatMul", "Gemm") and constant(1):
        out.append((node, 1))
        if op == "Gemm" and constant(2):
            out.append((node, 2))
    elif op == "MatMul" and constant(0):
        out.append((node, 0))
    elif op == "Add":
        for i in (0, 1):
            if constant(i):
                out.append((node, i))
            else:
                _scale_plan(ins[i], out, top=False)
    elif op == "Mul" and (constant(0) or constant(1)):
        out.append((node, 1 if constant(1) else 0))
    elif op in _LINEAR_IN_DATA:
        _scale_plan(ins[0], out, top=False)
    else:
        raise _Unscalable(f"{value.name} comes from {op} {node.name}")


def stream_statistics(model: ir.Model, streams: Sequence[Stream], feeds: Sequence[Mapping[str, np.ndarray]]) -> list[float]:
    """For each stream, the largest L2 norm of a row (over the last axis) any of its values
    takes on ``feeds``: what RMS and layer norms square and sum."""
    import onnxruntime as ort

    taps = [v for s in streams for v in s.values]
    graph = model.graph
    added = [v for v in dict.fromkeys(taps) if not v.is_graph_output()]
    graph.outputs.extend(added)
    try:
        ir.external_data.load_to_model(model)
        with tempfile.TemporaryDirectory(prefix="neodragon-rescale-") as tmp:
            path = onnx_io.save(model, Path(tmp) / "model.onnx")
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    finally:
        for _ in added:
            graph.outputs.pop()
    names = [v.name for v in taps]
    inputs = [i.name for i in session.get_inputs()]
    peaks = {name: 0.0 for name in names}
    for feed in feeds:
        values = session.run(names, {n: feed[n] for n in inputs})
        for name, value in zip(names, values):
            row = float(np.sqrt(np.max(np.sum(np.square(value.astype(np.float64)), axis=-1))))
            peaks[name] = max(peaks[name], row)
    return [max(peaks[v.name] for v in s.values) for s in streams]


def scale_for(peak_row_norm: float, headroom: float) -> int:
    """The smallest power of two S with ``(peak / S)^2 * headroom^2 <= FP16_MAX``: the squared
    row sums a norm computes then fit FP16 with ``headroom`` left for unseen inputs."""
    needed = peak_row_norm * headroom / math.sqrt(FP16_MAX)
    return 1 if needed <= 1.0 else 2 ** math.ceil(math.log2(needed))


class RescaleResidualStreamPass(Pass):
    """Divide each residual stream by a power of two S, exactly::

        before: x0 = E[ids];  x_{i+1} = x_i + W_i f(norm(x_i, eps));      y = norm(x_n, eps)
        after:  x0 = (E/S)[ids];  x_{i+1} = x_i + (W_i/S) f(norm(x_i, eps/S^2));
                y = norm(x_n, eps/S^2)                                    (y unchanged)

    T5-style encoders carry residual channels that grow block by block past FP16's range
    (neodragon-facts.md 4.4), and a norm squares them: RMSNorm's ``x^2`` overflows once
    |x| > 256. The HTP computes float graphs in FP16 without an FP32 upcast, so the stream
    itself must be small. Every reader of the stream is a scale-free norm (RMS or layer
    norm over the channel axis: ``norm(x/S, eps/S^2) == norm(x, eps)``), and every writer
    (the embedding table, the attention output and FFN down-projection weights and biases)
    is scaled where it is a constant, so no op is added. S is the smallest power of two
    that brings the largest row norm seen on ``calibration`` under sqrt(65504) / headroom;
    a power of two makes the scaling exact in floating point. A stream that already fits
    is left alone (so a second run changes nothing), and so is one that has a reader other
    than a norm or a writer whose scale cannot be folded into a constant (with a note).
    """

    IR = "onnx"
    NAME = "rescale_residual_stream"
    LOOKS_FOR = "residual stream (a chain of Adds, each value read by an RMS or layer norm)"
    OPTIONS = {
        "calibration": Option("path", "an .npz of calibration samples (one input set per sample)", exists=True),
        "headroom": Option("float", "how far past the calibration peak the stream must still fit FP16", min=1.0),
    }

    def __init__(self, *, calibration: Sequence[Mapping[str, np.ndarray]] | str | Path, headroom: float = 4.0) -> None:
        if headroom < 1.0:
            raise ValueError(f"rescale_residual_stream: headroom must be at least 1, got {headroom}")
        self.calibration = calibration
        self.headroom = headroom
        self.scales: list[int] = []  # the S chosen for each rescaled stream, for reports

    def requires(self, model: ir.Model) -> None:
        if is_quantized(model):
            raise PreconditionError("rescale_residual_stream: the model holds Q/DQ nodes; rescale the float graph")

    def call(self, model: ir.Model) -> PassResult:
        streams = [s for s in find_streams(model) if self._foldable(s)]
        self.scales = []
        if not streams:
            return PassResult(model, False)
        feeds = calibration_feeds(self.calibration, self.NAME)
        modified = False
        for stream, peak in zip(streams, stream_statistics(model, streams, feeds)):
            scale = scale_for(peak, self.headroom)
            label = f"stream from {stream.start.name} ({len(stream.writers)} writers)"
            if scale == 1:
                self.leave(label, f"its largest row norm {peak:.4g} fits FP16 with headroom {self.headroom:g}")
                continue
            self._rescale(model, stream, scale)
            self.scales.append(scale)
            self.leave(label, f"divided by S = {scale} (largest row norm {peak:.4g} on {len(feeds)} samples)")
            modified = True
        return PassResult(model, modified)

    def _foldable(self, stream: Stream) -> bool:
        """Every reader is a norm or the next step, and every writer (and the start) can
        take the scale in a constant."""
        label = f"stream from {stream.start.name}"
        steps = {v.producer() for v in stream.values[1:]}
        for value in stream.values:
            if value.is_graph_output():
                self.leave(label, f"{value.name} is a graph output: dividing it would change the output")
                return False
            other = [n for n, _ in value.uses() if n not in stream.norms and n not in steps]
            if other:
                self.leave(label, f"{value.name} is also read by {other[0].op_type} {other[0].name}, not only norms")
                return False
        stream.plan = []
        for value in [stream.start, *stream.writers]:
            try:
                _scale_plan(value, stream.plan)
            except _Unscalable as why:
                self.leave(label, f"the scale cannot be folded into a constant: {why}")
                return False
        return True

    @staticmethod
    def _rescale(model: ir.Model, stream: Stream, scale: int) -> None:
        graph = model.graph
        for node, i in stream.plan:
            value = node.inputs[i]
            array = const_array(value)
            # a power of two: the division is exact (no rounding) in any float type
            scaled = (array / np.asarray(scale, dtype=array.dtype)).astype(array.dtype)
            name, k = f"{value.name or node.name}_div{scale}", 1
            while name in graph.initializers:
                name, k = f"{value.name or node.name}_div{scale}_{k}", k + 1
            new = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(value.dtype),
                           const_value=ir.tensor(scaled, name=name))
            graph.register_initializer(new)
            node.replace_input_with(i, new)
            if not value.uses() and value.name in graph.initializers:
                del graph.initializers[value.name]
        for norm in stream.norms:
            eps = norm.attributes.get_float("epsilon", 1e-5)
            norm.attributes["epsilon"] = ir.AttrFloat32("epsilon", eps / float(scale) ** 2)
