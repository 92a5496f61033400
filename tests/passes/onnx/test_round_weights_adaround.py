"""Data-aware int8 rounding of Conv weights: GPTQ and AdaRound against round-to-nearest, on a
small super-resolution network, through aimet's W8A16 quantization."""

import numpy as np
import pytest
import torch

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.onnx_edit import const_array, weight_values
from neodragon_npu.graphs.quant import gptq
from neodragon_npu.graphs.verify import pooled_sqnr
from neodragon_npu.neodragon_models.quicksrnet import build_quicksrnet, get_quicksrnet_config, synthetic_frames
from neodragon_npu.passes.base import PassManager, PreconditionError
from neodragon_npu.passes.onnx.fold_weight_quantization import FoldWeightQuantizationPass
from neodragon_npu.passes.onnx.quantize_w8a16 import QuantizeW8A16Pass
from neodragon_npu.passes.onnx.round_weights_adaround import RoundWeightsAdaRoundPass
from neodragon_npu.passes.onnx.round_weights_gptq import RoundWeightsGPTQPass
from tests.helpers import clone_onnx, run_onnx

H, W = 32, 48
CONVS = ("cnn.0.weight", "cnn.2.weight", "conv_last.weight")


def _feeds(n, seed):
    return [{"frame": f[None]} for f in synthetic_frames(n, H, W, seed).numpy()]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sr") / "sr.onnx"
    model = build_quicksrnet(get_quicksrnet_config("tiny"), seed=0)
    export_onnx(model, [torch.zeros(1, 3, H, W)], path, input_names=["frame"], output_names=["y"])
    return path


def _quantized_sqnr(model, feeds) -> tuple[float, object]:
    """W8A16 (aimet) of ``model``, folded; its SQNR against the float model on ``feeds``."""
    reference = clone_onnx(model)
    qdq = PassManager([QuantizeW8A16Pass(calibration=_feeds(8, 0)), FoldWeightQuantizationPass()])(model).model
    pairs = [(run_onnx(reference, f)[0], run_onnx(qdq, f)[0]) for f in feeds]
    return pooled_sqnr(pairs), qdq


def _kept_exactly(rounded, qdq):
    """aimet kept the rounded weights: its int8 weights times their scales are them."""
    values = weight_values(qdq)
    for name in CONVS:
        np.testing.assert_allclose(values[name], const_array(rounded.graph.initializers[name]), rtol=0, atol=1e-7)


def test_gptq_and_adaround_beat_nearest_on_held_out_frames_and_aimet_keeps_them(float_model):
    held_out = _feeds(4, 2000)
    nearest, _ = _quantized_sqnr(onnx_io.load(float_model), held_out)

    gptq_model = onnx_io.load(float_model)
    result = RoundWeightsGPTQPass(calibration=_feeds(8, 0))(gptq_model)
    assert result.modified
    for name in CONVS:
        w = const_array(gptq_model.graph.initializers[name])
        assert gptq.on_grid(w.reshape(w.shape[0], -1).T), name
    after_gptq, qdq = _quantized_sqnr(clone_onnx(gptq_model), held_out)
    _kept_exactly(gptq_model, qdq)

    ada_model = onnx_io.load(float_model)
    result = RoundWeightsAdaRoundPass(calibration=_feeds(8, 0), iterations=300, crop=(16, 16))(ada_model)
    assert result.modified
    after_ada, qdq = _quantized_sqnr(clone_onnx(ada_model), held_out)
    _kept_exactly(ada_model, qdq)

    assert after_gptq > nearest + 1.0 and after_ada > nearest + 1.0, (nearest, after_gptq, after_ada)
    # a second run finds every weight on its grid and says so
    again = RoundWeightsAdaRoundPass(calibration=_feeds(8, 0), iterations=300, crop=(16, 16))(ada_model)
    assert not again.modified and any("on its int8 grid already" in n for n in again.notes)
    assert not RoundWeightsGPTQPass(calibration=_feeds(2, 0))(gptq_model).modified


def test_adaround_refuses_crops_of_a_graph_that_fixes_a_size(tmp_path):
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).reshape(1, -1)

    export_onnx(Flat(), [torch.zeros(1, 3, 8, 8)], tmp_path / "f.onnx", input_names=["frame"], output_names=["y"])
    feeds = [{"frame": np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)}]
    with pytest.raises(PreconditionError, match=r"cannot round on crops: .*Reshape"):
        RoundWeightsAdaRoundPass(calibration=feeds, iterations=10, crop=(4, 4))(onnx_io.load(tmp_path / "f.onnx"))
    with pytest.raises(ValueError, match="crop must be"):
        RoundWeightsAdaRoundPass(calibration=feeds, crop=(4,))
