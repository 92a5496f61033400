"""Shared test helpers: run a pass, count ops before/after, compare outputs numerically."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
import torch.fx as fx

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.base import Pass

FP32_ATOL = 1e-5


@dataclass
class PassCheck:
    modified: bool
    ops_before: Counter
    ops_after: Counter
    max_abs_error: float
    model: object


def run_onnx(model: ir.Model, feeds: dict[str, np.ndarray], *, optimize: bool = True) -> list[np.ndarray]:
    """``optimize=False``: onnxruntime runs the graph as written, no fusions (which differ in
    their last bits with where a graph is cut)."""
    ir.external_data.load_to_model(model)  # tests use small models: weights in memory
    proto = ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def check_onnx_pass(p: Pass, model: ir.Model, feeds: dict[str, np.ndarray]) -> PassCheck:
    """Run ``p``; outputs before vs after (max abs error), op counts, and the modified flag."""
    before = run_onnx(model, feeds)
    ops_before = Counter(n.op_type for n in model.graph)
    result = p(model)
    after = run_onnx(result.model, feeds)
    err = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(before, after))
    return PassCheck(result.modified, ops_before, Counter(n.op_type for n in result.model.graph), err, result.model)


def check_fx_pass(p: Pass, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> PassCheck:
    with torch.no_grad():
        before = gm(*inputs)
        ops_before = fx_utils.op_counts(gm)
        result = p(gm)
        after = result.model(*inputs)
    before = before if isinstance(before, (tuple, list)) else [before]
    after = after if isinstance(after, (tuple, list)) else [after]
    err = max(float((a - b).abs().max()) for a, b in zip(before, after))
    return PassCheck(result.modified, ops_before, fx_utils.op_counts(result.model), err, result.model)


def onnx_model(nodes, inputs, outputs, initializers=(), opset: int = 21) -> ir.Model:
    """Build a small ONNX model with onnx.helper and return it as onnx_ir."""
    graph = onnx.helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def clone_onnx(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(copy.deepcopy(ir.serde.serialize_model(model)))


def small_mlp_qdq(folder, width: int, calibration: int):
    """A seeded Linear-ReLU-Linear (width -> 2 width -> width / 2) exported to
    ``folder/f.onnx`` and quantized W8A16 to ``folder/q.onnx``; returns the module and the
    calibration feeds."""
    from pathlib import Path

    from neodragon_npu.graphs import onnx_io
    from neodragon_npu.graphs.export import export_onnx
    from neodragon_npu.passes.onnx.quantize_w8a16 import QuantizeW8A16Pass

    folder = Path(folder)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.ReLU(),
                                 torch.nn.Linear(2 * width, width // 2)).eval()
    export_onnx(module, [torch.zeros(1, width)], folder / "f.onnx", input_names=["x"], output_names=["y"])
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, width)).astype(np.float32)} for _ in range(calibration)]
    qdq = QuantizeW8A16Pass(calibration=feeds)(onnx_io.load(folder / "f.onnx")).model
    onnx_io.save(qdq, folder / "q.onnx")
    return module, feeds
