"""Per-tensor comparison of a float model and its quantized (QDQ) version, and reading
intermediate tensors out of a model in groups of bounded size.

Both models are run on the same feed with the intermediate tensors they share exposed as
outputs; the SQNR of each shows where quantization error enters and how it propagates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx

from neodragon_npu.graphs import qnn
from neodragon_npu.graphs.verify import sqnr_db


@dataclass(frozen=True)
class TensorError:
    tensor: str
    op_type: str
    node: str
    sqnr_db: float
    ref_min: float
    ref_max: float


# fp32 bytes of intermediate tensors read out of a model in one run. Exposed as outputs they
# cannot share memory with the rest of the graph's, and a partition at 640x1024 makes more
# than 20 GB of them in fp32: two of the SDXL VAE decoder's largest conv inputs fit.
MAX_EXPOSED_BYTES = 1500 << 20


def expose(model: onnx.ModelProto, names: list[str]) -> bytes:
    """``model`` serialized with ``names`` as its only outputs (``model`` is changed)."""
    del model.graph.output[:]
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model.SerializeToString()


def exposure_batches(proto: onnx.ModelProto, tensors: Iterable[str], max_bytes: int) -> list[list[str]]:
    """``tensors`` in the order the graph makes them, cut into groups of at most
    ``max_bytes`` (fp32, by shape inference; one tensor over the budget is a group of its
    own, one of unknown size counts as a sixteenth of it). Always at least one group,
    maybe empty."""
    wanted = set(tensors)
    made = [i.name for i in proto.graph.input] + [o for node in proto.graph.node for o in node.output]
    order = [name for name in made if name in wanted]
    order += sorted(wanted - set(order))
    size = _static_sizes(proto)
    batches: list[list[str]] = [[]]
    used = 0
    for name in order:
        nbytes = size.get(name) or max_bytes // 16
        if batches[-1] and used + nbytes > max_bytes:
            batches.append([])
            used = 0
        batches[-1].append(name)
        used += nbytes
    return batches


def _static_sizes(proto: onnx.ModelProto) -> dict[str, int]:
    """fp32 bytes of every tensor whose shape inference finds static. Large initializers
    (weights) go in as external references without data: inference needs their shapes only,
    and a model with its weights may be too large to serialize (or to copy cheaply)."""
    light = onnx.ModelProto(ir_version=proto.ir_version)
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    for field in ("node", "input", "output", "value_info"):
        getattr(light.graph, field).extend(getattr(proto.graph, field))
    for init in proto.graph.initializer:
        if init.ByteSize() <= (1 << 20):
            light.graph.initializer.append(init)
            continue
        shell = light.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
        shell.data_location = onnx.TensorProto.EXTERNAL
        shell.external_data.add(key="location", value="stripped")
    inferred = onnx.shape_inference.infer_shapes(light, data_prop=False)
    size = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        dims = tensor_type.shape.dim
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            size[info.name] = 4 * int(np.prod([d.dim_value for d in dims]))
    return size


def layer_errors(
    float_path: str | Path, qdq_path: str | Path, feeds: list[Mapping[str, np.ndarray]],
    max_bytes: int = MAX_EXPOSED_BYTES,
) -> list[TensorError]:
    """SQNR of every float-model tensor that the QDQ model also computes, in graph order.

    Errors are pooled over ``feeds`` (signal and noise energies summed). Models must be
    small enough to serialize (< 2 GB); run it per partition for large graphs. The tensors
    are read ``max_bytes`` (fp32) at a time, with a pair of sessions per group.
    """
    fm = onnx.load(str(float_path))
    qm = onnx.load(str(qdq_path))
    q_outputs = {o for n in qm.graph.node for o in n.output}
    tracked = [(n, o) for n in fm.graph.node if n.op_type != "Constant" for o in n.output if o in q_outputs]
    names = [o for _, o in tracked]
    index = {name: i for i, name in enumerate(names)}
    signal = np.zeros(len(names))
    noise = np.zeros(len(names))
    lo = np.full(len(names), np.inf)
    hi = np.full(len(names), -np.inf)
    for batch in exposure_batches(fm, names, max_bytes):
        if not batch:
            continue
        f_sess = qnn.cpu_session(expose(fm, batch))
        q_sess = qnn.cpu_session(expose(qm, batch))
        for feed in feeds:
            f_out = f_sess.run(None, {i.name: feed[i.name] for i in f_sess.get_inputs()})
            q_out = q_sess.run(None, {i.name: feed[i.name] for i in q_sess.get_inputs()})
            for name, a, b in zip(batch, f_out, q_out):
                i = index[name]
                a64 = np.asarray(a, dtype=np.float64)
                signal[i] += float(np.sum(a64**2))
                noise[i] += float(np.sum((a64 - b) ** 2))
                if a.size:
                    lo[i], hi[i] = min(lo[i], float(a.min())), max(hi[i], float(a.max()))
            del f_out, q_out
        del f_sess, q_sess
    out = []
    for i, (node, name) in enumerate(tracked):
        value = float("inf") if noise[i] == 0 else (10 * np.log10(signal[i] / noise[i]) if signal[i] else float("-inf"))
        out.append(TensorError(name, node.op_type, node.name, value, lo[i], hi[i]))
    return out
