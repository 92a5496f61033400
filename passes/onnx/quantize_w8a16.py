"""W8A16 post-training quantization with aimet-onnx."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from neodragon_npu.graphs.onnx_attention import split_attention_score_groups
from neodragon_npu.graphs.onnx_edit import is_quantized
from neodragon_npu.graphs.quant import aimet
from neodragon_npu.passes.base import Option, Pass, PassResult, PreconditionError, calibration_feeds


class QuantizeW8A16Pass(Pass):
    """Quantize to W8A16 QDQ: per-channel symmetric int8 weights, uint16 activations.

    aimet-onnx's QuantSim inserts a quantizer on every weight and activation, calibrates
    the activation ranges on ``calibration`` (a list of feeds or an .npz sample file: they
    must come from the real pipeline, not N(0, 1)), and the result is exported as a QDQ
    model (opset 21) that the QNN EP compiles::

        before: x -> MatMul(x, W) -> y
        after:  x -> Q/DQ(u16) -> MatMul(., DQ(Q_i8(W))) -> Q/DQ(u16) -> y

    ``range_margin`` widens every calibrated activation range (about zero) by that factor.
    Prompt-level tensors (the conditioning vector and the adaLN modulations derived from it)
    get one value per prompt, so a calibration set sees few independent values and unseen
    prompts land outside the calibrated range, where clipping costs far more than the
    margin (docs/measurements.md). An int16 grid has ~96 dB of range, so a 2x margin costs
    6 dB of resolution that the int8 weights never let us use anyway.

    The pass leaves weights as fp32 initializers behind a QuantizeLinear, as aimet exports
    them; the W8A16 pipeline (:func:`neodragon_npu.passes.pipelines.w8a16`) then keeps K
    and V at 16 bit (``requantize_matmul_operand``) and stores the weights as integers
    (``fold_weight_quantization``).

    Weights already on their int8 grid (``round_weights_gptq``, ``round_weights_adaround``)
    are kept exactly: aimet's min-max per-channel encoding finds the same grid.
    ``high_precision`` lists fnmatch patterns of node, weight or graph-input names (see
    :func:`graphs.onnx_edit.matches_any`) whose weights stay at 16 bit: the mixed-precision
    override the per-layer report points to. Graphs that share weights (the three stage
    graphs) are quantized as one merged model (:mod:`graphs.shared_weights`), so each weight
    gets one encoding.

    ``shared_attention_ranges``: the score tensors of one split attention (every head and
    query chunk, :func:`graphs.onnx_attention.split_attention_score_groups`) get one range,
    the union of their calibrated ranges, as the unsplit score tensor would. Calibrated
    piece by piece, a chunk's range comes from its own few rows and heads; a cross-attention
    chunk whose scores were all positive on the calibration prompts clipped a held-out
    prompt's negative scores to nearly zero (docs/first-frame.md).

    ``encodings_dir`` also receives the AIMET ``.encodings`` JSON (the format AI Hub and
    QAIRT tools read). A model that already holds Q/DQ nodes is left unchanged.

    With ``on_output``, ``on_output(i, outputs)`` gets the model's outputs for calibration
    feed i (output name -> array) as the calibration forward computed them: activations
    pass through unquantized while aimet observes them, the weights are quantized in the
    first forward and in those of ``quantized_weight_feeds`` (see :func:`_calibrate`).
    That is what aimet's calibration of a whole model would hand the layers after this
    graph, so a partitioned model can calibrate partition k + 1 on them without running
    partition k again. The pass drops its own references to feed i before the call, so a
    caller that drops its own frees the inputs as the outputs arrive (holding all of them
    at once costs gigabytes at full size).
    """

    IR = "onnx"
    IN_PLACE = False
    NAME = "quantize_w8a16"
    LOOKS_FOR = "float model to quantize"
    OPTIONS = {
        "calibration": Option("path", "an .npz of calibration samples (one input set per sample)", exists=True),
        "htp_arch": Option("int", "the target's HTP architecture (68, 69, 73, 75, 79, ...): picks aimet's HTP config", min=68),
        "quant_scheme": Option("str", "aimet's range calibration", choices=("min_max", "tf", "tf_enhanced", "percentile")),
        "encodings_dir": Option("path", "write the AIMET encodings file here", none_ok=True),
        "encodings_prefix": Option("str", "the encodings file's name"),
        "range_margin": Option("float", "activation ranges widened by this factor", min=1.0, max=16.0),
        "high_precision": Option("str list", "weight name patterns kept at 16 bit"),
        "shared_attention_ranges": Option("bool", "one score range per split attention"),
    }
    ENGINE_OPTIONS = ("on_output", "quantized_weight_feeds")

    def __init__(
        self,
        *,
        calibration: Sequence[Mapping[str, np.ndarray]] | str | Path,
        htp_arch: int = 79,
        quant_scheme: str = "min_max",
        encodings_dir: str | Path | None = None,
        encodings_prefix: str = "model",
        range_margin: float = 2.0,
        high_precision: Sequence[str] = (),
        shared_attention_ranges: bool = True,
        on_output: Callable[[int, dict[str, np.ndarray]], None] | None = None,
        quantized_weight_feeds: Sequence[int] = (),
    ) -> None:
        if range_margin < 1.0:
            raise ValueError(f"quantize_w8a16: range_margin must be >= 1, got {range_margin}")
        self.calibration = calibration
        self.range_margin = range_margin
        self.high_precision = list(high_precision)
        self.shared_attention_ranges = shared_attention_ranges
        self.htp_arch = htp_arch
        self.quant_scheme = quant_scheme
        self.encodings_dir = encodings_dir
        self.encodings_prefix = encodings_prefix
        self.on_output = on_output
        self.quantized_weight_feeds = tuple(quantized_weight_feeds)

    def _samples(self) -> list[dict[str, np.ndarray]]:
        return calibration_feeds(self.calibration, self.NAME)

    def requires(self, model: ir.Model) -> None:
        if is_quantized(model):
            return
        samples = self._samples()
        names = {v.name for v in model.graph.inputs if v.name not in model.graph.initializers}
        missing = names - set(samples[0])
        if missing:
            raise PreconditionError(f"quantize_w8a16: calibration samples lack inputs {sorted(missing)}")

    def call(self, model: ir.Model) -> PassResult:
        if is_quantized(model):
            self.leave("model", "it already holds Q/DQ nodes")
            return PassResult(model, False)
        samples = self._samples()
        ir.external_data.load_to_model(model)  # aimet takes a proto: weights in memory (< 2 GB)
        proto = ir.serde.serialize_model(model)
        with aimet.quiet():
            sim = aimet.quantsim(proto, htp_arch=self.htp_arch, quant_scheme=self.quant_scheme)
            aimet.keep_at_16_bit(sim, model, self.high_precision)
            input_names = [i.name for i in sim.session.get_inputs()]
            feeds = [{n: s[n] for n in input_names} for s in samples]
            del samples  # the feeds hold what calibration needs, and are dropped one by one
            handler = None
            if self.on_output is not None:
                rename = _own_output_names([o.name for o in sim.session.get_outputs()],
                                           [v.name for v in model.graph.outputs])

                def handler(i, out):
                    self.on_output(i, {rename[n]: v for n, v in out.items()})

            sim.compute_encodings(lambda session: _calibrate(sim, session, feeds, handler, self.quantized_weight_feeds))
            if self.shared_attention_ranges:
                share_activation_ranges(sim, split_attention_score_groups(model))
            if self.range_margin != 1.0:
                widen_activation_ranges(sim, self.range_margin)
            if self.encodings_dir is not None:
                Path(self.encodings_dir).mkdir(parents=True, exist_ok=True)
                sim.export(str(self.encodings_dir), self.encodings_prefix, export_model=False)
            qdq = sim.to_onnx_qdq()
        del sim, proto
        gc.collect()
        return PassResult(ir.serde.deserialize_model(qdq), True)

def _own_output_names(sim_names: list[str], names: list[str]) -> dict[str, str]:
    """aimet's names for the model outputs -> the model's own (a quantized output ``y``
    is the quantizer's output ``y_updated`` in the sim; the order is kept)."""
    if len(sim_names) != len(names) or any(a not in (b, b + "_updated") for a, b in zip(sim_names, names)):
        raise RuntimeError(f"quantize_w8a16: aimet's model outputs {sim_names} do not match the model's {names}")
    return dict(zip(sim_names, names))


def _calibrate(sim, session, feeds: list[dict[str, np.ndarray] | None], on_output=None,
               quantized_weight_feeds: Sequence[int] = ()) -> None:
    """aimet's calibration forwards, with its weight quantizers on for the first one and
    those of ``quantized_weight_feeds`` only.

    In calibration, aimet quantizes and dequantizes every weight on every forward, a large
    share of a full-width partition's calibration time. A weight
    quantizer's range comes from its weight alone, fixed in the first forward; the other
    forwards run on the float weights, which only the activation ranges see (and GPTQ has
    already put most weights on their int8 grid, where the two are the same). The feeds of
    ``quantized_weight_feeds`` keep the weights quantized, for a caller that hands their
    outputs on as the inputs a quantized model gives the layers after it (GPTQ's feeds).
    Each feed is dropped from ``feeds`` once run; with ``on_output``, ``on_output(i,
    outputs)`` then gets that forward's outputs (output name -> array).
    """
    from aimet_onnx.utils import disable_quantizers

    names = [o.name for o in session.get_outputs()]

    def forward(i):
        result = session.run(None, feeds[i])
        feeds[i] = None
        if on_output is not None:
            on_output(i, dict(zip(names, result)))

    quantized = [0] + sorted({i for i in quantized_weight_feeds if 0 < i < len(feeds)})
    for i in quantized:
        forward(i)
    params = {name for name in sim.param_names if name in sim.qc_quantize_op_dict}
    with disable_quantizers(sim, params):
        for i in range(1, len(feeds)):
            if i not in quantized:
                forward(i)


def share_activation_ranges(sim, groups: Sequence[Sequence[str]]) -> int:
    """Give the quantizers of each group of activations one range, the union of theirs;
    returns how many quantizers changed."""
    changed = 0
    for names in groups:
        quantizers = {id(q): q for q in (sim.qc_quantize_op_dict.get(n) for n in names)
                      if q is not None and q.enabled and q.get_encodings()}
        if len(quantizers) < 2:
            continue
        encodings = [q.get_encodings() for q in quantizers.values()]
        if any(len(e) != 1 for e in encodings):  # per-channel activations are not ours to merge
            continue
        lo, hi = min(e[0].min for e in encodings), max(e[0].max for e in encodings)
        for q, own in zip(quantizers.values(), encodings):
            q.load_encodings([_encoding(lo, hi, own[0].bw)])
            changed += 1
    return changed


def _encoding(lo: float, hi: float, bw: int):
    """aimet's asymmetric encoding of [lo, hi] at ``bw`` bits, zero on the grid. Like
    aimet's own, the range holds zero and is at least 0.01 wide: a tensor that was zero on
    every calibration sample would otherwise get a zero step."""
    from aimet_onnx.common import libpymo

    lo = min(0.0, lo)
    hi = max(0.0, hi, lo + 0.01)
    levels = 2**bw - 1
    out = libpymo.TfEncoding()
    out.bw = bw
    out.delta = (hi - lo) / levels
    out.offset = round(lo / out.delta)
    out.min = out.offset * out.delta
    out.max = out.min + out.delta * levels
    return out


def widen_activation_ranges(sim, margin: float) -> int:
    """Scale every calibrated activation range [lo, hi] to [lo*m, hi*m] (signs kept, zero
    stays exact), once per quantizer; quantizers with fixed ranges (softmax, sigmoid) are
    left alone."""
    widened = 0
    done: set[int] = set()
    for name in sim.activation_names:
        quantizer = sim.qc_quantize_op_dict.get(name)
        if quantizer is None or not quantizer.enabled or getattr(quantizer, "_encoding_min_max_fixed_vals", None):
            continue
        if id(quantizer) in done:  # tied quantizers (a Concat and its inputs) are one object
            continue
        done.add(id(quantizer))
        encodings = quantizer.get_encodings()
        if not encodings:
            continue
        new = []
        for enc in encodings:
            lo = enc.min * margin if enc.min < 0 else enc.min
            hi = enc.max * margin if enc.max > 0 else enc.max
            new.append(_encoding(lo, hi, enc.bw))
        quantizer.load_encodings(new)
        widened += 1
    return widened


