"""Per-tensor comparison of a float model and its quantized (QDQ) version.

Both models are run on the same feed with every intermediate tensor they share exposed as
an output; the SQNR of each shows where quantization error enters and how it propagates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

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


def _expose(model: onnx.ModelProto, names: list[str]) -> bytes:
    del model.graph.output[:]
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model.SerializeToString()


def layer_errors(
    float_path: str | Path, qdq_path: str | Path, feeds: list[Mapping[str, np.ndarray]]
) -> list[TensorError]:
    """SQNR of every float-model tensor that the QDQ model also computes, in graph order.

    Errors are pooled over ``feeds`` (signal and noise energies summed). Models must be
    small enough to serialize (< 2 GB); run it per partition for large graphs.
    """
    fm = onnx.load(str(float_path))
    qm = onnx.load(str(qdq_path))
    q_outputs = {o for n in qm.graph.node for o in n.output}
    tracked = [(n, o) for n in fm.graph.node if n.op_type != "Constant" for o in n.output if o in q_outputs]
    names = [o for _, o in tracked]
    f_sess = qnn.cpu_session(_expose(fm, names))
    q_sess = qnn.cpu_session(_expose(qm, names))
    signal = np.zeros(len(names))
    noise = np.zeros(len(names))
    lo = np.full(len(names), np.inf)
    hi = np.full(len(names), -np.inf)
    for feed in feeds:
        f_in = {i.name: feed[i.name] for i in f_sess.get_inputs()}
        f_out = f_sess.run(None, f_in)
        q_out = q_sess.run(None, {i.name: feed[i.name] for i in q_sess.get_inputs()})
        for i, (a, b) in enumerate(zip(f_out, q_out)):
            a64 = np.asarray(a, dtype=np.float64)
            signal[i] += float(np.sum(a64**2))
            noise[i] += float(np.sum((a64 - b) ** 2))
            if a.size:
                lo[i], hi[i] = min(lo[i], float(a.min())), max(hi[i], float(a.max()))
    out = []
    for i, (node, name) in enumerate(tracked):
        value = float("inf") if noise[i] == 0 else (10 * np.log10(signal[i] / noise[i]) if signal[i] else float("-inf"))
        out.append(TensorError(name, node.op_type, node.name, value, lo[i], hi[i]))
    return out
