"""Data-aware int8 weight rounding with aimet's AdaRound, ahead of W8A16 quantization."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import numpy_helper

from neodragon_npu.graphs.onnx_edit import at_spatial_size, const_array, is_quantized, matches_any
from neodragon_npu.graphs.quant import aimet
from neodragon_npu.graphs.quant.gptq import keep_scales, on_grid, snap_to_grid
from neodragon_npu.passes.base import Option, Pass, PassResult, PreconditionError, calibration_feeds

_ROUNDED_OPS = ("Conv", "MatMul", "Gemm")


def _as_kn(w: np.ndarray, op: str) -> np.ndarray:
    """A weight as [inputs, output channels]: the layout the int8 grid is checked in."""
    return w.reshape(w.shape[0], -1).T if op == "Conv" else w


def _from_kn(w_kn: np.ndarray, op: str, shape) -> np.ndarray:
    return np.ascontiguousarray(w_kn.T).reshape(shape) if op == "Conv" else w_kn


class RoundWeightsAdaRoundPass(Pass):
    """Move each Conv/MatMul/Gemm weight onto its int8 per-channel grid, with the up-or-down
    choice of every element learnt by aimet's AdaRound (Nagel et al. 2020) so that the
    layer's output on calibration inputs changes least::

        before: y = conv(x, W)                 (W float; nearest rounding would give Q_rtn(W))
        after:  y = conv(x, W_q), W_q = s * q  (same per-channel s, q chosen by AdaRound)

    aimet leaves the weights soft-rounded (for its own quantizer to round); the pass rounds
    them onto the grid as that quantizer would. The model stays float: ``quantize_w8a16``
    then finds the weights on its grid and keeps them exactly (each channel's scale-setting element is kept at its nearest value, so the
    grid does not move). ``iterations`` optimizer steps per layer.

    AdaRound runs every layer on whole calibration inputs at every step. For a fully
    convolutional graph, ``crop`` (height, width) runs it on a copy of the graph at that
    spatial size, on ``crops_per_sample`` random crops of each calibration input: a
    convolution's weights see local statistics only, and a 320x512 frame costs as much per
    step as a hundred 48x48 crops. ``skip`` lists fnmatch patterns of nodes whose weights stay
    at 16 bit (left alone). Weights already on their grid are not touched, so a second run
    reports no change.
    """

    IR = "onnx"
    NAME = "round_weights_adaround"
    LOOKS_FOR = "Conv/MatMul/Gemm weight off its int8 grid"
    OPTIONS = {
        "calibration": Option("path", "an .npz of calibration samples (one input set per sample)", exists=True),
        "iterations": Option("int", "optimizer steps per layer", min=1),
        "htp_arch": Option("int", "the target's HTP architecture (68, 69, 73, 75, 79, ...): picks aimet's HTP config", min=68),
        "skip": Option("str list", "weight name patterns left alone (kept at 16 bit)"),
        "crop": Option("int list", "AdaRound on (height, width) crops of the inputs", length=2, min=1, none_ok=True),
        "crops_per_sample": Option("int", "crops cut from each calibration sample", min=1),
        "seed": Option("int", "seed of the crop positions and the optimizer", min=0),
    }

    def __init__(
        self,
        *,
        calibration: Sequence[Mapping[str, np.ndarray]] | str | Path,
        iterations: int = 10000,
        htp_arch: int = 79,
        skip: Sequence[str] = (),
        crop: Sequence[int] | None = None,
        crops_per_sample: int = 4,
        seed: int = 0,
    ) -> None:
        if iterations < 1:
            raise ValueError(f"round_weights_adaround: iterations must be at least 1, got {iterations}")
        if crop is not None and (len(crop) != 2 or min(crop) < 1):
            raise ValueError(f"round_weights_adaround: crop must be (height, width), got {crop!r}")
        if crops_per_sample < 1:
            raise ValueError(f"round_weights_adaround: crops_per_sample must be at least 1, got {crops_per_sample}")
        self.calibration = calibration
        self.iterations = iterations
        self.htp_arch = htp_arch
        self.skip = list(skip)
        self.crop = tuple(crop) if crop is not None else None
        self.crops_per_sample = crops_per_sample
        self.seed = seed

    def requires(self, model: ir.Model) -> None:
        if is_quantized(model):
            raise PreconditionError("round_weights_adaround: the model already holds Q/DQ nodes; round before quantizing")

    def _sites(self, model: ir.Model) -> dict[str, ir.Node]:
        """Weight name -> the node reading it, for every weight AdaRound should round."""
        sites = {}
        for node in model.graph:
            if node.op_type not in _ROUNDED_OPS or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            if w is None or not w.is_initializer() or w.const_value is None or len(w.shape or ()) not in (2, 4):
                continue
            if matches_any(node, self.skip):
                self.skip_site(node, "kept at 16 bit")
                continue
            if node.op_type == "Gemm" and any(a.name == "transB" and a.value for a in node.attributes.values()):
                self.skip_site(node, "a transposed Gemm weight")
                continue
            if on_grid(_as_kn(const_array(w), node.op_type)):
                self.skip_site(node, "its weight is on its int8 grid already")
                continue
            sites[w.name] = node
        return sites

    def skip_site(self, node: ir.Node, reason: str) -> None:
        self.leave(node.name or node.op_type, reason)

    def _crops(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        h, w = self.crop
        out = []
        for feed in feeds:
            sizes = {v.shape[2:] for v in feed.values() if v.ndim == 4}
            if len(sizes) != 1:
                raise PreconditionError("round_weights_adaround: crops need the 4-D inputs to share one spatial size")
            (height, width), = sizes
            if h > height or w > width:
                raise PreconditionError(f"round_weights_adaround: crop {h}x{w} is larger than the inputs {height}x{width}")
            for _ in range(self.crops_per_sample):
                y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                out.append({k: np.ascontiguousarray(v[..., y:y + h, x:x + w]) if v.ndim == 4 else v
                            for k, v in feed.items()})
        return out

    def call(self, model: ir.Model) -> PassResult:
        sites = self._sites(model)
        if not sites:
            return PassResult(model, False)
        feeds = calibration_feeds(self.calibration, self.NAME)
        ir.external_data.load_to_model(model)
        proto = ir.serde.serialize_model(model)
        if self.crop is not None:
            try:
                proto = at_spatial_size(proto, *self.crop)
            except (ValueError, onnx.shape_inference.InferenceError) as exc:
                raise PreconditionError(f"round_weights_adaround: cannot round on crops: {exc}") from None
            feeds = self._crops(feeds)
        # AdaRound draws its batches from torch's and numpy's global generators: seeded here
        # (and put back afterwards), the same inputs give the same weights
        numpy_state = np.random.get_state()
        with aimet.quiet(), torch.random.fork_rng():
            from aimet_onnx import apply_adaround

            torch.manual_seed(self.seed)
            np.random.seed(self.seed)
            sim = aimet.quantsim(proto, htp_arch=self.htp_arch)
            inputs = [i.name for i in sim.session.get_inputs()]
            apply_adaround(sim, [{n: f[n] for n in inputs} for f in feeds], num_iterations=self.iterations,
                           nodes_to_include=[node.name for node in sites.values()])
            rounded = {t.name: numpy_helper.to_array(t) for t in sim.model.model.graph.initializer if t.name in sites}
        np.random.set_state(numpy_state)
        del sim, proto
        changed = 0
        for name, node in sites.items():
            value = model.graph.initializers[name]
            original = const_array(value)
            new = rounded.get(name)
            if new is None or np.array_equal(new, original):
                self.skip_site(node, "AdaRound left its weight as it was")
                continue
            # aimet leaves AdaRound's soft rounding in the weights, for its quantizer to round:
            # that rounding, on the grid it will use, is what the weights become
            original_kn = _as_kn(original, node.op_type)
            kn = keep_scales(original_kn, snap_to_grid(original_kn, _as_kn(new.astype(original.dtype), node.op_type)))
            value.const_value = ir.tensor(_from_kn(kn, node.op_type, original.shape), name=name)
            changed += 1
        return PassResult(model, changed > 0)
