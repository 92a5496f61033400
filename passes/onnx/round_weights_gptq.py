"""Data-aware int8 weight rounding (GPTQ) ahead of W8A16 quantization."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.onnx_edit import is_quantized
from neodragon_npu.graphs.quant.gptq import DEFAULT_ROWS_PER_FEED, HessianSet, round_model_weights
from neodragon_npu.passes.base import Option, Pass, PassResult, PreconditionError, calibration_feeds


class RoundWeightsGPTQPass(Pass):
    """Move each MatMul/Gemm weight onto its int8 per-channel grid, choosing the integers
    with GPTQ so the layer's output error on calibration inputs is smallest::

        before: y = x @ W                      (W float; RTN would give Q_rtn(W))
        after:  y = x @ W_q,  W_q = s * q      (same per-channel s, q chosen by GPTQ)

    The model stays float: ``quantize_w8a16`` then finds weights already on its grid and
    keeps them exactly. Either ``calibration`` (feeds or an .npz sample file; the model is
    run on them) or ``hessians`` (a :class:`graphs.gptq.HessianSet` accumulated elsewhere,
    e.g. over the three stage graphs that share these weights) must be given. ``skip`` lists
    fnmatch patterns of node, weight or graph-input names left alone (the weights kept at
    16 bit; see :func:`graphs.onnx_edit.matches_any`).
    Weights already on their grid are not touched, so a second run reports no change.
    """

    IR = "onnx"
    NAME = "round_weights_gptq"
    LOOKS_FOR = "MatMul/Gemm/Conv weight off its int8 grid with enough calibration rows"
    OPTIONS = {
        "calibration": Option("path", "an .npz of calibration samples (one input set per sample)", exists=True,
                              none_ok=True),
        "skip": Option("str list", "weight name patterns left alone (kept at 16 bit)"),
        "rows_per_feed": Option("int", "activation rows per sample entering the Hessians", min=1),
    }
    ENGINE_OPTIONS = ("hessians",)

    def __init__(
        self,
        *,
        calibration: Sequence[Mapping[str, np.ndarray]] | str | Path | None = None,
        hessians: HessianSet | None = None,
        skip: Sequence[str] = (),
        rows_per_feed: int = DEFAULT_ROWS_PER_FEED,
    ) -> None:
        if (calibration is None) == (hessians is None):
            raise ValueError("round_weights_gptq: give exactly one of calibration or hessians")
        self.calibration = calibration
        self.hessians = hessians
        self.skip = list(skip)
        self.rows_per_feed = rows_per_feed

    def requires(self, model: ir.Model) -> None:
        if is_quantized(model):
            raise PreconditionError("round_weights_gptq: the model already holds Q/DQ nodes; round before quantizing")

    def call(self, model: ir.Model) -> PassResult:
        hessians = self.hessians
        if hessians is None:
            feeds = calibration_feeds(self.calibration, self.NAME)
            hessians = HessianSet(rows_per_feed=self.rows_per_feed)
            ir.external_data.load_to_model(model)  # weights in memory before the copy is saved
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                onnx_io.save(model, path)
                hessians.accumulate(path, feeds, self.skip)
        replaced = round_model_weights(model, hessians, self.skip)
        return PassResult(model, bool(replaced))
