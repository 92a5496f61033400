"""Loading and saving ONNX models, with weights in one external-data file.

Every model file we write keeps its tensors in ``<name>.onnx.data`` next to it (or inline
when small), so any model, including a 6 GB full-size denoiser, is one .onnx plus at most
one .data file, and is written atomically: a crash leaves no half-written model behind.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import onnx
import onnx_ir as ir

# Models whose tensors total less than this are saved with inline weights (protobuf caps a
# model file at 2 GiB). Inline weights keep a model one file, which the step cache can
# hard-link: onnx and onnx_ir refuse external data with several links. A memory-bounded
# partition's weights stay below it.
INLINE_LIMIT_BYTES = 1 << 30


class ModelFileError(ValueError):
    """An ONNX file is missing, truncated or corrupt."""


def data_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".data")


def load(path: str | Path) -> ir.Model:
    """Load an ONNX model as onnx_ir (external tensors are read lazily, memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such ONNX file")
    try:
        model = ir.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ... on bad bytes
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not len(model.graph) and not model.graph.outputs:
        raise ModelFileError(f"{path}: the ONNX model is empty (truncated file?)")
    _check_external_data(model, path)
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    for init in model.graph.initializers.values():
        tensor = init.const_value
        if isinstance(tensor, ir.ExternalTensor):
            file = Path(tensor.base_dir) / tensor.location
            if not file.is_file():
                raise ModelFileError(f"{path}: external data file {file} is missing")
            if file.stat().st_size < tensor.offset + tensor.length:
                raise ModelFileError(
                    f"{path}: external data file {file} is truncated "
                    f"({file.stat().st_size} bytes, tensor {init.name} needs {tensor.offset + tensor.length})"
                )


def weight_bytes(model: ir.Model) -> int:
    return sum(
        init.const_value.nbytes for init in model.graph.initializers.values() if init.const_value is not None
    )


def _internalize_attribute_tensors(model: ir.Model) -> None:
    """Bring tensors held in node attributes (Constant values) into memory.

    Only initializers go to the one external-data file; an exporter may have put attribute
    tensors in files of their own, which would dangle once the model moves.
    """
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                node.attributes[name] = ir.AttrTensor(name, ir.Tensor(attr.value.numpy(), name=attr.value.name))


def save(model: ir.Model, path: str | Path) -> Path:
    """Write ``model`` to ``path`` (plus ``path.data`` for large models), atomically."""
    _internalize_attribute_tensors(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    external = weight_bytes(model) >= INLINE_LIMIT_BYTES
    tmp_data = data_path(tmp)
    try:
        if external:
            ir.save(model, str(tmp), external_data=tmp_data.name)
        else:
            for init in model.graph.initializers.values():  # small: bring tensors inline
                if isinstance(init.const_value, ir.ExternalTensor):
                    init.const_value = ir.Tensor(init.const_value.numpy(), name=init.name)
            ir.save(model, str(tmp))
        if external:
            # The model refers to its data file by name: rewrite it to the final name.
            proto = onnx.load(str(tmp), load_external_data=False)
            for tensor in proto.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_path(path).name
            onnx.save(proto, str(tmp))
            os.replace(tmp_data, data_path(path))
        elif data_path(path).exists():
            data_path(path).unlink()
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp_data):
            if leftover.exists():
                leftover.unlink()
    return path


def save_proto(proto: onnx.ModelProto, path: str | Path) -> Path:
    """Save an in-memory ``onnx.ModelProto`` with the same conventions as :func:`save`."""
    return save(ir.serde.deserialize_model(proto), path)


def io_signature(model: ir.Model) -> dict[str, list[dict]]:
    """Graph input/output names, shapes and dtypes (in the runtime's ``tensor(float)`` style)."""

    def describe(values) -> list[dict]:
        return [
            {
                "name": v.name,
                "shape": [int(d) if isinstance(d, int) else str(d) for d in v.shape] if v.shape else None,
                "dtype": f"tensor({v.dtype.name.lower()})",  # onnxruntime's spelling
            }
            for v in values
        ]

    inits = model.graph.initializers
    return {
        "inputs": describe(v for v in model.graph.inputs if v.name not in inits),
        "outputs": describe(model.graph.outputs),
    }


def file_interface(path: str | Path) -> tuple[dict[str, list[dict]], int]:
    """:func:`io_signature` and :func:`weight_bytes` of a saved model, read from its graph's
    inputs, outputs and initializer headers only: no node is deserialized and no weight
    read: a build's manifest lists hundreds of partitions."""
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    nbytes = sum(
        math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in graph.initializer
    )
    shell = onnx.helper.make_model(
        onnx.helper.make_graph([], graph.name, [v for v in graph.input if v.name not in inits], list(graph.output)),
        opset_imports=list(proto.opset_import), ir_version=proto.ir_version,
    )
    return io_signature(ir.serde.deserialize_model(shell)), nbytes


def is_external_data(path: str | Path) -> bool:
    """A file :func:`save` wrote as a model's external data (``<model>.onnx.data``)."""
    return Path(path).name.endswith(".onnx.data")


def model_files(path: str | Path) -> list[Path]:
    """The .onnx file and its external-data file if it has one."""
    path = Path(path)
    return [p for p in (path, data_path(path)) if p.exists()]


def remove(path: str | Path) -> None:
    """Delete a model written by :func:`save` (the .onnx and its external-data file)."""
    for file in model_files(path):
        file.unlink()


def sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
