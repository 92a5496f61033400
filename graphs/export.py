"""PyTorch -> ONNX conversion (a conversion, not a pass).

The legacy TorchScript exporter is the default: on these machines it exported a full-width
MMDiT block in 6 s where the dynamo exporter was much slower, and on a graph whose shapes
were specialised beforehand (no shape queries left) both give the same static graph. Above
2 GB the legacy exporter writes one file per tensor; the result is re-saved with all
tensors in one external-data file.

The split attention (:func:`kernels.attention.attention_split`) is traced as one node per
attention and expanded in ONNX (:mod:`graphs.onnx_attention`): traced op by op, the
full-size stage-2 graph took 212 s to export with its ONNX passes instead of 96 s.
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

from graphs import onnx_io
from graphs.onnx_attention import expand_split_attention
from kernels.attention import traced_as_one_node

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
    onnx_ir model (split attention expanded). Its weights are read lazily from the
    exporter's files in a temporary folder under ``workdir``, removed on exit: a caller that
    transforms the model further and saves only the result writes the weights once instead
    of copying them into a file of their own first (6 GB per full-size stage graph)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        common = dict(input_names=list(input_names), output_names=list(output_names), opset_version=opset)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "legacy":
                with traced_as_one_node():
                    torch.onnx.export(module, tuple(example_inputs), str(raw), do_constant_folding=True, dynamo=False,
                                      **common)
            else:
                program = torch.onnx.export(module, tuple(example_inputs), dynamo=True, optimize=True, **common)
                program.save(str(raw), external_data=True)
        del module, example_inputs  # the caller may drop the PyTorch model while it holds the ONNX one
        gc.collect()
        model = ir.load(str(raw))
        expand_split_attention(model)
        yield model


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
