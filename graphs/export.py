"""PyTorch -> ONNX conversion (a conversion, not a pass).

The legacy TorchScript exporter is the default: it exported a full-width MMDiT block much
faster than the dynamo exporter (shared/stack.md), and on a graph whose shapes
were specialised beforehand (no shape queries left) both give the same static graph. Above
2 GB the legacy exporter would write one file per tensor: its initializers are taken from
it in memory instead (:func:`exported_model`).

The split attention (:func:`kernels.attention.attention_split`) is traced as one node per
attention and expanded in ONNX (:mod:`graphs.onnx_attention`): traced op by op, the
full-size stage-2 graph took twice as long to export.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.onnx_attention import expand_split_attention
from neodragon_npu.kernels.attention import traced_as_one_node

OPSET = 21
EXPORTERS = ("legacy", "dynamo")


@contextlib.contextmanager
def exported_model(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    workdir: str | Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    exporter: str = "legacy",
    opset: int = OPSET,
) -> Iterator[ir.Model]:
    """Export ``module`` at the static shapes of ``example_inputs`` and yield it as an
    onnx_ir model (split attention expanded). With the legacy exporter its weights are the
    module's own tensors (and the exporter's folded ones), never written: a caller that
    transforms the model further and saves only the result writes the weights once (6 GB per
    full-size stage graph). The dynamo exporter's weights are read lazily from its files in
    a temporary folder under ``workdir``, removed on exit. The exporter's constant folding
    stays on: left to the ONNX passes, the transposed weights were written strided, slower
    (docs/measurements.md)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        params: dict[str, torch.Tensor] = {}  # the legacy exporter's initializers, kept in memory
        common = dict(input_names=list(input_names), output_names=list(output_names), opset_version=opset)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "legacy":
                with traced_as_one_node(), _initializers_kept(params):
                    torch.onnx.export(module, tuple(example_inputs), str(raw), do_constant_folding=True, dynamo=False,
                                      **common)
            else:
                program = torch.onnx.export(module, tuple(example_inputs), dynamo=True, optimize=True, **common)
                program.save(str(raw), external_data=True)
        del module, example_inputs  # the caller may drop the PyTorch model while it holds the ONNX one
        gc.collect()
        model = ir.load(str(raw))
        _inputs_to_initializers(model, params)
        del params
        expand_split_attention(model)
        yield model


@contextlib.contextmanager
def _initializers_kept(into: dict[str, torch.Tensor]) -> Iterator[None]:
    """While the legacy exporter runs, its initializers (the module's parameters and what
    its constant folding computed, deduplicated) go into ``into`` instead of the ONNX file,
    where they stay graph inputs (:func:`_inputs_to_initializers` turns them back).

    Written out, a full-size stage graph's 6 GB went to one file per tensor, to be read
    back by every pass that looks at a weight and written again as partitions."""
    deduplicate = torch._C._jit_pass_onnx_deduplicate_initializers

    def keep(graph, params, training):
        into.update(deduplicate(graph, params, training))
        return {}

    torch._C._jit_pass_onnx_deduplicate_initializers = keep
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_deduplicate_initializers = deduplicate


def _inputs_to_initializers(model: ir.Model, params: dict[str, torch.Tensor]) -> None:
    """Graph inputs named in ``params`` become initializers holding those tensors' memory."""
    for value in list(model.graph.inputs):
        tensor = params.get(value.name)
        if tensor is None:
            continue
        model.graph.inputs.remove(value)
        value.const_value = TorchTensor(tensor.detach(), name=value.name)
        model.graph.register_initializer(value)


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    exporter: str = "legacy",
    opset: int = OPSET,
) -> Path:
    """Export ``module`` at the static shapes of ``example_inputs`` to ``path``."""
    path = Path(path)
    with exported_model(module, example_inputs, path.parent, input_names=input_names, output_names=output_names,
                        exporter=exporter, opset=opset) as model:
        onnx_io.save(model, path)  # inside the folder's lifetime: external tensors stream from it
    return path
