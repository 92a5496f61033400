import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.feeds import save_samples
from neodragon_npu.graphs.verify import sqnr_db
from neodragon_npu.passes.base import PreconditionError
from neodragon_npu.graphs.onnx_edit import is_quantized
from neodragon_npu.passes.onnx.fold_weight_quantization import FoldWeightQuantizationPass
from neodragon_npu.graphs.quant.aimet import config_file as aimet_config_file
from neodragon_npu.passes.onnx.quantize_w8a16 import QuantizeW8A16Pass
from tests.helpers import run_onnx

# A W8A16 MLP block must stay this close to fp32 on held-out inputs.
MIN_SQNR_DB = 35.0


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(32, elementwise_affine=False)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x)), approximate="tanh"))


def _feeds(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 16, 32)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "block.onnx"
    export_onnx(Block().eval(), [torch.zeros(1, 16, 32)], path, input_names=["x"], output_names=["y"])
    return path


def test_w8a16_is_close_to_fp32_on_held_out_inputs(float_model, tmp_path):
    model = onnx_io.load(float_model)
    result = QuantizeW8A16Pass(calibration=_feeds(8, 0), encodings_dir=tmp_path, encodings_prefix="blk")(model)
    assert result.modified and is_quantized(result.model)
    # the pass itself leaves the weights in float behind a QuantizeLinear; the W8A16 pipeline folds them
    assert FoldWeightQuantizationPass()(result.model).modified
    ops = {n.op_type for n in result.model.graph}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the Linear weights are stored as int8 (folded), under the names the encodings use
    int8 = {n for n, v in result.model.graph.initializers.items() if v.dtype == ir.DataType.INT8 and v.shape.rank() == 2}
    assert len(int8) == 2
    for feed in _feeds(4, 1):
        ref = run_onnx(model, feed)[0]
        assert sqnr_db(ref, run_onnx(result.model, feed)[0]) >= MIN_SQNR_DB
    enc = json.loads((tmp_path / "blk.encodings").read_text())
    bitwidths = {e["bw"] for e in enc["activation_encodings"]}
    assert bitwidths == {16}
    linear_weights = [e for e in enc["param_encodings"] if "MatMul" in e["name"]]
    assert len(linear_weights) == 2 and {e["name"] for e in linear_weights} == int8
    assert all((e["bw"], e["enc_type"], e["is_sym"]) == (8, "PER_CHANNEL", True) for e in linear_weights)


def test_quantized_model_is_left_unchanged(float_model, tmp_path):
    samples = save_samples(tmp_path / "cal.npz", _feeds(4, 0))  # samples from a file work too
    once = QuantizeW8A16Pass(calibration=samples)(onnx_io.load(float_model)).model
    again = QuantizeW8A16Pass(calibration=samples)(once)
    assert not again.modified and again.model is once


def test_range_margin_widens_activation_ranges(float_model, tmp_path):
    def ranges(margin, folder):
        QuantizeW8A16Pass(
            calibration=_feeds(4, 0), range_margin=margin, encodings_dir=folder, encodings_prefix="m"
        )(onnx_io.load(float_model))
        enc = json.loads((folder / "m.encodings").read_text())
        return {e["name"]: e["scale"][0] for e in enc["activation_encodings"]}

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    narrow, wide = ranges(1.0, tmp_path / "a"), ranges(2.0, tmp_path / "b")
    ratios = [wide[k] / narrow[k] for k in narrow]
    assert max(ratios) == pytest.approx(2.0, rel=1e-3) and min(ratios) >= 1.0 - 1e-6


def test_calibration_must_cover_the_inputs(float_model):
    with pytest.raises(PreconditionError, match=r"lack inputs \['x'\]"):
        QuantizeW8A16Pass(calibration=[{"other": np.zeros(1, np.float32)}])(onnx_io.load(float_model))
    with pytest.raises(ValueError, match="range_margin must be >= 1"):
        QuantizeW8A16Pass(calibration=[], range_margin=0.5)


def test_config_file_matches_the_arch():
    assert aimet_config_file(79).endswith("htp_quantsim_config_v79_per_channel_linear.json")
    assert aimet_config_file(77).endswith("v75_per_channel_linear.json")


def _param_bits(folder, prefix):
    enc = json.loads((folder / f"{prefix}.encodings").read_text())
    return {e["name"]: e["bw"] for e in enc["param_encodings"] if "MatMul" in e["name"] or "weight" in e["name"]}


def test_high_precision_patterns_keep_matching_weights_at_16_bit(float_model, tmp_path):
    held_out = _feeds(4, 1)
    model = onnx_io.load(float_model)
    down = next(n for n in model.graph if n.name.startswith("/down/") and n.op_type == "MatMul").inputs[1].name
    results = {}
    for label, patterns in (("int8", ()), ("down16", ("/down/*",))):
        q = QuantizeW8A16Pass(calibration=_feeds(8, 0), encodings_dir=tmp_path, encodings_prefix=label,
                              high_precision=patterns)(onnx_io.load(float_model)).model
        refs = [run_onnx(model, f)[0] for f in held_out]
        results[label] = np.mean([sqnr_db(r, run_onnx(q, f)[0]) for r, f in zip(refs, held_out)])
        bits = _param_bits(tmp_path, label)
        assert bits[down] == (16 if patterns else 8)
        assert sorted(bits.values()) == ([8, 16] if patterns else [8, 8])
    assert results["down16"] > results["int8"] + 1.0, results


def test_a_graph_input_pattern_selects_the_layer_reading_it(tmp_path):
    path = tmp_path / "embed.onnx"
    torch.manual_seed(0)
    export_onnx(torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).eval(),
                [torch.zeros(1, 4, 32)], path, input_names=["tokens"], output_names=["y"])
    rng = np.random.default_rng(0)
    cal = [{"tokens": rng.standard_normal((1, 4, 32)).astype(np.float32)} for _ in range(4)]
    QuantizeW8A16Pass(calibration=cal, encodings_dir=tmp_path, encodings_prefix="e",
                      high_precision=["tokens"])(onnx_io.load(path))
    model = onnx_io.load(path)
    first = next(n for n in model.graph if n.op_type in ("MatMul", "Gemm") and n.inputs[0].name == "tokens").inputs[1].name
    bits = _param_bits(tmp_path, "e")
    assert bits.pop(first) == 16 and set(bits.values()) == {8}


def _range_gaps(ours: dict, theirs: dict) -> dict[str, float]:
    """Per encoding, the largest relative difference of its range ends [min, max]."""
    assert ours.keys() == theirs.keys()
    gaps = {}
    for name, enc in ours.items():
        other = theirs[name]
        assert enc["bw"] == other["bw"], name
        levels = 2 ** enc["bw"] - 1
        ends = [(o * s, (o + levels) * s) for o, s in zip(enc["offset"], enc["scale"])]
        other_ends = [(o * s, (o + levels) * s) for o, s in zip(other["offset"], other["scale"])]
        gaps[name] = max(abs(a - b) / max(abs(b), 1e-12) for e, f in zip(ends, other_ends) for a, b in zip(e, f))
    return gaps


def test_weight_quantizers_run_in_the_first_calibration_forward_only(float_model, tmp_path, monkeypatch):
    """Our calibration turns aimet's weight quantizers off after the first forward (a
    fifth of one partition's calibration time, measured once). On weights already on their int8 grid, what GPTQ
    hands over, the encodings are then aimet's own up to float rounding; on float weights
    the activation ranges differ, so the quantizers really were off."""
    from neodragon_npu.graphs.quant.gptq import round_to_nearest
    from neodragon_npu.passes.onnx import quantize_w8a16

    on_grid = onnx_io.load(float_model)
    for value in on_grid.graph.initializers.values():
        array = value.const_value.numpy()
        if array.ndim == 2:
            value.const_value = ir.tensor(round_to_nearest(array), name=value.name)
    grid_path = tmp_path / "on_grid.onnx"
    onnx_io.save(on_grid, grid_path)

    def encodings(path, prefix):
        QuantizeW8A16Pass(calibration=_feeds(8, 0), encodings_dir=tmp_path, encodings_prefix=prefix)(onnx_io.load(path))
        enc = json.loads((tmp_path / f"{prefix}.encodings").read_text())
        return ({e["name"]: e for e in enc["activation_encodings"]}, {e["name"]: e for e in enc["param_encodings"]})

    ours = {"grid": encodings(grid_path, "ours_grid"), "float": encodings(float_model, "ours_float")}
    monkeypatch.setattr(quantize_w8a16, "_calibrate", lambda sim, session, feeds, *rest: [session.run(None, f) for f in feeds])
    aimets = {"grid": encodings(grid_path, "aimet_grid"), "float": encodings(float_model, "aimet_float")}
    assert len(ours["grid"][1]) >= 2  # the weights got their encodings
    for kind in ("grid", "float"):  # weight encodings come from the weights alone
        assert ours[kind][1] == aimets[kind][1]
    assert max(_range_gaps(ours["grid"][0], aimets["grid"][0]).values()) < 1e-6
    assert max(_range_gaps(ours["float"][0], aimets["float"][0]).values()) > 1e-4, \
        "the weight quantizers stayed on in every calibration forward"


def test_calibration_outputs_are_the_float_forwards_with_the_first_on_quantized_weights(float_model):
    import gc
    import weakref

    model = onnx_io.load(float_model)
    feeds = _feeds(3, 0)
    calibration = [{"x": f["x"].copy()} for f in feeds]  # the arrays live in these dicts only
    alive = [weakref.ref(f["x"]) for f in calibration]
    outs, freed = {}, {}

    def on_output(i, out):
        outs[i] = out
        calibration[i].clear()  # the caller drops feed i: nothing else may hold it now
        gc.collect()
        freed[i] = alive[i]() is None

    qdq = QuantizeW8A16Pass(calibration=calibration, on_output=on_output)(model).model
    assert sorted(outs) == [0, 1, 2] and all(set(o) == {"y"} for o in outs.values())
    assert freed == {0: True, 1: True, 2: True}
    # activations pass through while aimet observes them: later forwards (float weights)
    # are the float model's outputs, the first one (weights quantized) is close to them
    for i in (1, 2):
        np.testing.assert_allclose(outs[i]["y"], run_onnx(model, feeds[i])[0], rtol=1e-5, atol=1e-5)
    ref, qdq_out = run_onnx(model, feeds[0])[0], run_onnx(qdq, feeds[0])[0]
    assert not np.allclose(outs[0]["y"], ref, rtol=0, atol=1e-6)  # the int8 weights show
    assert sqnr_db(ref, outs[0]["y"]) > sqnr_db(ref, qdq_out)  # but no activation rounding


def test_calibration_forwards_asked_for_keep_the_weights_quantized(float_model):
    """GPTQ's feeds are handed on as a quantized model would deliver them: their forwards run
    on aimet's int8 weights (the round-to-nearest grid), the others on the float weights."""
    from neodragon_npu.graphs.quant.gptq import round_to_nearest

    model = onnx_io.load(float_model)
    on_grid = onnx_io.load(float_model)
    for value in on_grid.graph.initializers.values():
        array = value.const_value.numpy()
        if array.ndim == 2:
            value.const_value = ir.tensor(round_to_nearest(array), name=value.name)
    feeds = _feeds(4, 1)
    outs = {}
    QuantizeW8A16Pass(calibration=[dict(f) for f in feeds], quantized_weight_feeds=(2, 3),
                      on_output=lambda i, out: outs.__setitem__(i, out["y"]))(model)
    assert sorted(outs) == [0, 1, 2, 3]
    for i in (0, 2, 3):
        np.testing.assert_allclose(outs[i], run_onnx(on_grid, feeds[i])[0], rtol=1e-5, atol=1e-5)
        assert not np.allclose(outs[i], run_onnx(model, feeds[i])[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(outs[1], run_onnx(model, feeds[1])[0], rtol=1e-5, atol=1e-5)


class SplitCrossAttention(torch.nn.Module):
    """One cross-attention in its split form: 2 heads, 3 query chunks, 8 text tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.out = (torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x, text):
        from neodragon_npu.kernels.attention import attention_split

        def heads(t):
            return t.view(1, -1, 2, 8).transpose(1, 2)

        out = attention_split(heads(self.q(x)), heads(self.k(text)), heads(self.v(text)), None,
                              chunks=((0, 4, 8, -1), (4, 8, 8, -1), (8, 12, 8, -1)))
        return self.out(out.transpose(1, 2).reshape(1, 12, 16))


def _attention_feeds(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 12, 16)).astype(np.float32),
             "text": rng.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(n)]


def _activation_ranges(folder, prefix):
    enc = json.loads((folder / f"{prefix}.encodings").read_text())
    return {e["name"]: (e["offset"][0] * e["scale"][0], (e["offset"][0] + 2 ** e["bw"] - 1) * e["scale"][0])
            for e in enc["activation_encodings"]}


def test_the_pieces_of_a_split_attention_share_one_score_range(tmp_path):
    """Each head and query chunk of a split attention calibrates its scores on its own rows;
    the unsplit score tensor has one range, the union of theirs, and so do the pieces."""
    from neodragon_npu.graphs.onnx_attention import split_attention_score_groups
    from neodragon_npu.graphs.quant.layerwise import expose

    path = tmp_path / "attn.onnx"
    export_onnx(SplitCrossAttention().eval(), [torch.zeros(1, 12, 16), torch.zeros(1, 8, 16)], path,
                input_names=["x", "text"], output_names=["y"])
    groups = split_attention_score_groups(onnx_io.load(path))
    assert len(groups) == 1 and len(groups[0]) == 6  # every head x chunk, the Softmax inputs
    scores = groups[0]
    proto = ir.serde.serialize_model(onnx_io.load(path))
    session = ort.InferenceSession(expose(proto, scores), providers=["CPUExecutionProvider"])
    calibration = _attention_feeds(4, 0)
    values = [session.run(None, feed) for feed in calibration]
    own = {n: (min(float(v[i].min()) for v in values), max(float(v[i].max()) for v in values))
           for i, n in enumerate(scores)}
    union = (min(lo for lo, _ in own.values()), max(hi for _, hi in own.values()))
    assert max(abs(lo - union[0]) + abs(hi - union[1]) for lo, hi in own.values()) > 0.1 * (union[1] - union[0])

    for shared, prefix in ((True, "shared"), (False, "own")):
        QuantizeW8A16Pass(calibration=calibration, range_margin=1.0, encodings_dir=tmp_path, encodings_prefix=prefix,
                          shared_attention_ranges=shared)(onnx_io.load(path))
        ranges = _activation_ranges(tmp_path, prefix)
        for name in scores:
            want = union if shared else own[name]
            # aimet's first calibration forward runs on the int8 weights: its ranges are not
            # exactly the float model's
            assert ranges[name] == pytest.approx(want, abs=0.01 * (union[1] - union[0])), (prefix, name)
        assert (len({ranges[n] for n in scores}) == 1) == shared


def test_an_encoding_of_an_all_zero_range_has_a_step_and_holds_zero():
    from neodragon_npu.passes.onnx.quantize_w8a16 import _encoding

    for lo, hi in ((0.0, 0.0), (3.0, 3.0), (-2.0, -2.0)):
        enc = _encoding(lo, hi, 16)
        assert enc.delta > 0 and enc.min <= 0.0 <= enc.max and enc.min <= lo and enc.max >= hi - enc.delta
        assert enc.offset == round(enc.min / enc.delta) and abs(enc.min / enc.delta - enc.offset) < 1e-6
    enc = _encoding(-1.0, 3.0, 16)  # an ordinary range is kept
    assert abs(enc.delta - 4.0 / 65535) < 1e-9 and abs(enc.max - enc.min - 4.0) < 1e-6
