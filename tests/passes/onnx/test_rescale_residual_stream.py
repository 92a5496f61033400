import math

import numpy as np
import pytest
import torch
from torch import nn

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.passes.onnx.fold_constants import FoldConstantsPass
from neodragon_npu.passes.onnx.fuse_rms_norm import FuseRMSNormPass
from neodragon_npu.passes.onnx.rescale_residual_stream import FP16_MAX, RescaleResidualStreamPass, scale_for
from tests.helpers import check_onnx_pass, run_onnx

VOCAB, WIDTH, LENGTH = 50, 16, 6


class RMS(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, WIDTH))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Encoder(nn.Module):
    """Pre-norm blocks on a token + position embedding whose residual stream grows far past
    FP16's range; ``norm`` picks RMS (T5) or layer norm with biases (CLIP); ``leak`` makes a
    block read the stream without a norm."""

    def __init__(self, norm: str = "rms", leak: bool = False, gain: float = 3e4):
        super().__init__()
        torch.manual_seed(0)
        make = (lambda: RMS()) if norm == "rms" else (lambda: nn.LayerNorm(WIDTH, eps=1e-5))
        bias = norm != "rms"
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Parameter(torch.randn(LENGTH, WIDTH)) if bias else None
        self.norms = nn.ModuleList([make() for _ in range(4)])
        self.layers = nn.ModuleList([nn.Linear(WIDTH, WIDTH, bias=bias) for _ in range(3)])
        self.final = make()
        self.leak = leak
        with torch.no_grad():
            self.tokens.weight.mul_(gain)
            self.layers[-1].weight.mul_(gain * 10)

    def forward(self, ids):
        x = self.tokens(ids)
        if self.positions is not None:
            x = x + self.positions
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        if self.leak:
            x = x + torch.tanh(x)  # a reader that is not scale-free
        return self.final(x)


def _exported(tmp_path, **kwargs):
    model = Encoder(**kwargs).eval()
    export_onnx(model, [torch.zeros(1, LENGTH, dtype=torch.long)], tmp_path / "e.onnx", input_names=["ids"],
                output_names=["y"])
    onnx_model = onnx_io.load(tmp_path / "e.onnx")
    FoldConstantsPass()(onnx_model)
    FuseRMSNormPass()(onnx_model)
    return onnx_model


def _feeds(count, seed):
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, VOCAB, (1, LENGTH)).astype(np.int64)} for _ in range(count)]


def _stream_peaks(model, feeds):
    """The largest |value| any Add output (the stream) takes."""
    from neodragon_npu.passes.onnx.rescale_residual_stream import find_streams, stream_statistics

    streams = find_streams(model)
    return stream_statistics(model, streams, feeds)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_the_stream_is_divided_exactly_and_fits_fp16(tmp_path, norm):
    model = _exported(tmp_path, norm=norm)
    norms = [n for n in model.graph if n.op_type in ("RMSNormalization", "LayerNormalization")]
    eps_before = [n.attributes.get_float("epsilon", 1e-5) for n in norms]
    peak_before = _stream_peaks(model, _feeds(4, 1))[0]
    assert peak_before > 10 * math.sqrt(FP16_MAX)  # squares overflow FP16
    p = RescaleResidualStreamPass(calibration=_feeds(4, 1), headroom=2.0)
    check = check_onnx_pass(p, model, _feeds(1, 7)[0])  # an input not in the calibration
    assert check.modified
    (scale,) = p.scales
    assert scale & (scale - 1) == 0  # a power of two
    # the smallest such: half of it would not leave the headroom
    assert peak_before * 2.0 / scale <= math.sqrt(FP16_MAX) < peak_before * 2.0 / (scale / 2)
    out = run_onnx(check.model, _feeds(1, 7)[0])[0]
    assert check.max_abs_error <= 1e-5 * max(1.0, float(np.abs(out).max()))
    assert check.ops_after == check.ops_before  # folded into constants: no op added
    after = [n.attributes.get_float("epsilon", 1e-5) for n in check.model.graph
             if n.op_type in ("RMSNormalization", "LayerNormalization")]
    assert after == pytest.approx([e / scale ** 2 for e in eps_before], rel=1e-6)
    assert _stream_peaks(check.model, _feeds(4, 1))[0] == pytest.approx(peak_before / scale, rel=1e-6)


def test_a_second_run_and_a_stream_that_fits_change_nothing(tmp_path):
    model = _exported(tmp_path)
    assert RescaleResidualStreamPass(calibration=_feeds(3, 1))(model).modified
    again = RescaleResidualStreamPass(calibration=_feeds(3, 1))(model)
    assert not again.modified and "fits FP16" in again.notes[0]
    small = _exported(tmp_path, gain=1.0)
    result = RescaleResidualStreamPass(calibration=_feeds(3, 1))(small)
    assert not result.modified and "fits FP16" in result.notes[0]


def test_a_stream_read_by_something_other_than_a_norm_is_left_alone(tmp_path):
    model = _exported(tmp_path, leak=True)
    before = run_onnx(model, _feeds(1, 3)[0])[0]
    result = RescaleResidualStreamPass(calibration=_feeds(3, 1))(model)
    assert not result.modified
    assert any("not only norms" in n for n in result.notes)
    np.testing.assert_array_equal(run_onnx(result.model, _feeds(1, 3)[0])[0], before)


def test_a_graph_without_a_stream_says_what_it_looked_for():
    from tests.helpers import onnx_model
    from onnx import TensorProto, helper

    model = onnx_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    result = RescaleResidualStreamPass(calibration=[{"x": np.ones((1, 4), np.float32)}])(model)
    assert not result.modified and "residual stream" in result.notes[0]


def test_the_scale_is_the_smallest_power_of_two_that_fits():
    limit = math.sqrt(FP16_MAX)
    assert scale_for(limit / 4 * 0.99, headroom=4.0) == 1
    assert scale_for(limit / 4 * 1.01, headroom=4.0) == 2
    assert scale_for(limit * 1000, headroom=1.0) == 1024
    with pytest.raises(ValueError, match="headroom"):
        RescaleResidualStreamPass(calibration=[], headroom=0.5)
