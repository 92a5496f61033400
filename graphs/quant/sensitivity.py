"""Which weights to keep at 16 bit: each weight's int8 rounding noise at the graph's outputs.

An int8 per-channel weight adds noise to its layer's output, and a deep convolutional model
chains dozens of them: no one layer dominates, so one pattern picked by hand does not help
(docs/causal-vae.md). This measures, on the float graph and the calibration inputs, the
output noise of each weight rounded to its int8 grid alone (round to nearest, aimet's grid:
:func:`graphs.quant.gptq.round_to_nearest`), and keeps at 16 bit the fewest weights, largest
noise first, that bring the sum of the rest's noise under the target. Noise from independent
weights adds at the outputs, so the sum predicts the int8 graph; the joint run of every
remaining int8 weight checks it. GPTQ then rounds the int8 weights better than the nearest
rounding measured here, so the prediction is conservative.

The weights are made overridable graph inputs (an initializer that is also a graph input
keeps its value unless a feed replaces it), so one CPU session serves every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs import onnx_io, qnn
from neodragon_npu.graphs.onnx_edit import const_array
from neodragon_npu.graphs.quant.gptq import round_to_nearest, weight_sites


def _db(signal: float, noise: float) -> float:
    return math.inf if noise <= 0 else 10 * math.log10(signal / noise)


@dataclass
class WeightNoise:
    """Output noise energy of each int8 weight alone, per graph output, pooled over feeds."""

    outputs: list[str]
    signal: np.ndarray  # [outputs]: energy of the float outputs
    noise: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> [outputs]
    weight_bytes: dict[str, int] = field(default_factory=dict)  # fp32 bytes of each weight

    def predicted_db(self, int8: Iterable[str]) -> float:
        """The worst output's SQNR with the weights ``int8`` rounded (the sum of their noise)."""
        total = sum((self.noise[w] for w in int8), np.zeros(len(self.outputs)))
        return min(_db(s, n) for s, n in zip(self.signal, total))

    def choose_16_bit(self, target_db: float) -> list[str]:
        """The fewest weights to keep at 16 bit, largest noise first, so that the int8 rest
        is predicted to reach ``target_db`` on every output."""
        # each weight's share of the worst-off output's budget decides its rank
        share = {w: float(np.max(n / self.signal)) for w, n in self.noise.items()}
        int8 = sorted(self.noise, key=lambda w: share[w])
        kept: list[str] = []
        while int8 and self.predicted_db(int8) < target_db:
            kept.append(int8.pop())
        return kept


def measure_weight_noise(
    float_path: str | Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    skip: Sequence[str] = (),
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[WeightNoise, float]:
    """Each eligible weight's output noise when it alone is rounded to int8 (the others
    float), and the SQNR measured with all of them rounded at once (the check on the sum).
    ``skip``: patterns of weights already kept at 16 bit."""
    model = onnx_io.load(float_path)
    sites = weight_sites(model, skip)
    if not sites:
        raise ValueError(f"{Path(float_path).name}: no Conv, MatMul or Gemm weight to round to int8")
    floats = {s.weight: const_array(model.graph.initializers[s.weight]) for s in sites}
    rounded = {s.weight: s.from_kn(round_to_nearest(s.to_kn(w)), w.shape) for s in sites
               for w in [floats[s.weight]]}
    for s in sites:
        model.graph.inputs.append(model.graph.initializers[s.weight])
    outputs = [v.name for v in model.graph.outputs]
    path = Path(float_path).with_name(f".{Path(float_path).stem}_sensitivity.onnx")
    onnx_io.save(model, path)
    del model
    try:
        session = qnn.cpu_session(path)
        data_inputs = [i.name for i in session.get_inputs() if i.name not in floats]
        feeds = [{n: f[n] for n in data_inputs} for f in feeds]
        refs = [session.run(None, f) for f in feeds]
        result = WeightNoise(outputs, np.array([sum(float(np.sum(np.square(r[k], dtype=np.float64))) for r in refs)
                                                for k in range(len(outputs))]))

        def noise_with(weights: Mapping[str, np.ndarray]) -> np.ndarray:
            energy = np.zeros(len(outputs))
            for feed, ref in zip(feeds, refs):
                for k, (a, b) in enumerate(zip(ref, session.run(None, {**feed, **weights}))):
                    energy[k] += float(np.sum(np.square(a.astype(np.float64) - b)))
            return energy

        for i, s in enumerate(sites):
            if progress is not None:
                progress(i, len(sites), s.weight)
            result.noise[s.weight] = noise_with({s.weight: rounded[s.weight]})
            result.weight_bytes[s.weight] = floats[s.weight].nbytes
        joint = noise_with(rounded)
        joint_db = min(_db(a, b) for a, b in zip(result.signal, joint))
    finally:
        onnx_io.remove(path)
    return result, joint_db


def as_patterns(names: Iterable[str]) -> tuple[str, ...]:
    """Weight names as fnmatch patterns that match exactly those names."""
    return tuple("".join(f"[{c}]" if c in "*?[" else c for c in n) for n in names)
