"""Graph verification: structural invariants and numerical comparison.

``verify_onnx`` / ``verify_fx`` raise ``GraphInvariantError`` naming the first broken
invariant; ``sqnr_db`` and ``compare`` give the numbers every conversion is gated on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch.fx as fx


class GraphInvariantError(ValueError):
    pass


def verify_onnx(model: ir.Model, *, static_shapes: bool = False, max_rank: int | None = None) -> None:
    """Every input of every node is defined before use (graph inputs, initializers or an
    earlier node), names are unique, outputs are produced; optionally all shapes static
    and no tensor above ``max_rank`` (tiling rank-6 tensors made one NPU compile take a day)."""
    graph = model.graph
    defined = {v.name for v in graph.inputs} | set(graph.initializers)
    seen_nodes: set[str] = set()
    for node in graph:
        if node.name and node.name in seen_nodes:
            raise GraphInvariantError(f"duplicate node name {node.name!r}")
        seen_nodes.add(node.name)
        for value in node.inputs:
            if value is not None and value.name not in defined:
                raise GraphInvariantError(
                    f"node {node.name or node.op_type} reads {value.name!r} before it is produced "
                    "(graph not in topological order, or a dangling input)"
                )
        for value in node.outputs:
            if value.name in defined:
                raise GraphInvariantError(f"tensor {value.name!r} is produced twice")
            defined.add(value.name)
            if static_shapes and value.shape is not None and not value.shape.is_static():
                raise GraphInvariantError(f"{value.name!r} ({node.op_type}) has a dynamic shape {value.shape}")
            if max_rank is not None and value.shape is not None and len(value.shape) > max_rank:
                raise GraphInvariantError(
                    f"{value.name!r} ({node.op_type}) has rank {len(value.shape)} > {max_rank}"
                )
    for value in graph.outputs:
        if value.name not in defined:
            raise GraphInvariantError(f"graph output {value.name!r} is never produced")
    if static_shapes:
        for value in graph.inputs:
            if value.shape is None or not value.shape.is_static():
                raise GraphInvariantError(f"graph input {value.name!r} has no static shape")


def verify_fx(gm: fx.GraphModule) -> None:
    try:
        gm.graph.lint()
    except Exception as exc:
        raise GraphInvariantError(f"FX graph lint failed: {exc}") from exc


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(||ref||^2 / ||ref - test||^2); +inf when identical."""
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"shape mismatch: {reference.shape} vs {test.shape}")
    noise = float(np.sum((reference - test) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


@dataclass(frozen=True)
class Comparison:
    sqnr_db: float
    max_abs_error: float
    max_rel_error: float  # max |ref - test| / max |ref|

    def __str__(self) -> str:
        return f"SQNR {self.sqnr_db:.2f} dB, max abs err {self.max_abs_error:.3g}, max rel err {self.max_rel_error:.3g}"


def compare(reference: np.ndarray, test: np.ndarray) -> Comparison:
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    err = float(np.max(np.abs(reference - test))) if reference.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return Comparison(sqnr_db(reference, test), err, err / scale if scale else float("inf") if err else 0.0)


def pooled_sqnr(pairs) -> float:
    """SQNR over several (reference, test) pairs together: signal and noise energies summed
    over all of them, so a sample counts by its energy, not as one vote."""
    signal = noise = 0.0
    for ref, test in pairs:
        ref = np.asarray(ref, dtype=np.float64)
        if ref.shape != np.shape(test):
            raise ValueError(f"shape mismatch: {ref.shape} vs {np.shape(test)}")
        signal += float(np.sum(ref**2))
        noise += float(np.sum((ref - np.asarray(test, dtype=np.float64)) ** 2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))
