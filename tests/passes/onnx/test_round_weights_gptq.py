import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from neodragon_npu.graphs.quant import gptq

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.onnx_edit import const_array
from neodragon_npu.graphs.verify import sqnr_db
from neodragon_npu.passes.base import PreconditionError
from neodragon_npu.passes.onnx.quantize_w8a16 import QuantizeW8A16Pass
from neodragon_npu.passes.onnx.round_weights_gptq import RoundWeightsGPTQPass
from tests.helpers import check_onnx_pass, clone_onnx

K, N, TOKENS = 96, 64, 256


class Proj(torch.nn.Module):
    """A Linear fed by correlated inputs (a low-rank mix plus a shared offset), like the
    modulated, normalized hidden states of a DiT block; and a Gemm-style Linear on a vector."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(K, N)
        self.cond = torch.nn.Linear(K, N)

    def forward(self, x, c):
        return self.proj(x), self.cond(c)


def _feeds(n, seed):
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((16, K)).astype(np.float32)
    feeds = []
    for _ in range(n):
        z = rng.standard_normal((TOKENS, 16)).astype(np.float32)
        x = z @ mix + 0.1 * rng.standard_normal((TOKENS, K)).astype(np.float32) + 0.5
        feeds.append({"x": x[None], "c": rng.standard_normal((1, K)).astype(np.float32)})
    return feeds


@pytest.fixture(scope="module")
def float_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gptq") / "proj.onnx"
    export_onnx(Proj().eval(), [torch.zeros(1, TOKENS, K), torch.zeros(1, K)], path,
                input_names=["x", "c"], output_names=["y", "yc"])
    return path


def _weights(model):
    return {n.name: const_array(n.inputs[1]) for n in model.graph if n.op_type in ("MatMul", "Gemm")}


def test_gptq_beats_round_to_nearest_on_held_out_inputs_and_stays_on_the_grid(float_path):
    calib, held_out = _feeds(4, 0), _feeds(2, 1)
    model = onnx_io.load(float_path)
    before = _weights(model)
    check = check_onnx_pass(RoundWeightsGPTQPass(calibration=calib), model, held_out[0])
    assert check.modified
    after = _weights(check.model)
    name = next(n for n in after if "proj" in n and "cond" not in n)
    w0, w1 = before[name], after[name]
    w_kn0 = w0 if w0.shape == (K, N) else w0.T
    w_kn1 = w1 if w1.shape == (K, N) else w1.T
    assert gptq.on_grid(w_kn1) and not gptq.on_grid(w_kn0)
    np.testing.assert_allclose(gptq.channel_scales(w_kn1), gptq.channel_scales(w_kn0), rtol=1e-6)
    x = np.concatenate([f["x"][0] for f in held_out])
    ref = x @ w_kn0
    rtn = sqnr_db(ref, x @ gptq.round_to_nearest(w_kn0))
    data_aware = sqnr_db(ref, x @ w_kn1)
    assert data_aware > rtn + 3.0, (rtn, data_aware)
    # the conditioning Linear sees one row per call: too few to trust, left untouched
    cond = next(n for n in after if "cond" in n)
    np.testing.assert_array_equal(after[cond], before[cond])
    # second run: weights already on their grid
    assert not RoundWeightsGPTQPass(calibration=calib)(check.model).modified


def test_aimet_keeps_the_rounded_weights_bit_for_bit(float_path, tmp_path):
    calib = _feeds(4, 0)
    rounded = RoundWeightsGPTQPass(calibration=calib)(onnx_io.load(float_path)).model
    target = _weights(rounded)
    qdq = QuantizeW8A16Pass(calibration=calib)(clone_onnx(rounded)).model
    onnx_io.save(qdq, tmp_path / "q.onnx")
    # the dequantized weight each MatMul sees in the QDQ graph, evaluated by onnxruntime
    proto = onnx.load(str(tmp_path / "q.onnx"))
    dq_of = {}
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.name in target:
            dq_of[node.name] = node.input[1]
    assert dq_of
    del proto.graph.output[:]
    for name in dq_of.values():
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    values = sess.run(list(dq_of.values()), {i.name: calib[0][i.name] for i in sess.get_inputs()})
    for (node, _), value in zip(dq_of.items(), values):
        np.testing.assert_allclose(value, target[node], rtol=0, atol=1e-7)


def test_gptq_round_pins_the_scale_and_handles_dead_inputs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    x[:, 5] = 0.0  # an input channel that never fires
    out = gptq.gptq_round(w, x.T.astype(np.float64) @ x)
    assert gptq.on_grid(out)
    np.testing.assert_allclose(gptq.channel_scales(out), gptq.channel_scales(w), rtol=1e-6)
    np.testing.assert_array_equal(out[5], gptq.round_to_nearest(w)[5])
    with pytest.raises(ValueError, match="does not match"):
        gptq.gptq_round(w, np.eye(8))


def test_bad_arguments_and_quantized_models_are_refused(float_path):
    with pytest.raises(ValueError, match="exactly one"):
        RoundWeightsGPTQPass()
    calib = _feeds(2, 0)
    qdq = QuantizeW8A16Pass(calibration=calib)(onnx_io.load(float_path)).model
    with pytest.raises(PreconditionError, match="already holds Q/DQ"):
        RoundWeightsGPTQPass(calibration=calib)(qdq)


def test_hessians_follow_weights_not_tensor_names_across_graphs(tmp_path):
    """Separately exported graphs reuse tensor names for different layers; the Hessian of a
    weight must only see that weight's inputs."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import onnx_model

    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((8, 4)).astype(np.float32) for _ in range(2))

    def graph(weight_name, weight, path):
        model = onnx_model(
            [helper.make_node("MatMul", ["h", weight_name], ["y"], name="mm")],
            [helper.make_tensor_value_info("h", TensorProto.FLOAT, [16, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 4])],
            [numpy_helper.from_array(weight, weight_name)],
        )
        onnx_io.save(model, path)

    graph("w_a", w1, tmp_path / "a.onnx")
    graph("w_b", w2, tmp_path / "b.onnx")  # same tensor name "h", another weight
    xa, xb = rng.standard_normal((16, 8)).astype(np.float32), 5 * rng.standard_normal((16, 8)).astype(np.float32)
    hessians = gptq.HessianSet()
    hessians.accumulate(tmp_path / "a.onnx", [{"h": xa}])
    hessians.accumulate(tmp_path / "b.onnx", [{"h": xb}])
    np.testing.assert_allclose(hessians.hessians[hessians.inputs_of["w_a"]], xa.T @ xa, rtol=1e-5)
    np.testing.assert_allclose(hessians.hessians[hessians.inputs_of["w_b"]], xb.T @ xb, rtol=1e-5)
    # the same weight in a second graph adds its rows to the same Hessian
    graph("w_a", w1, tmp_path / "a2.onnx")
    hessians.accumulate(tmp_path / "a2.onnx", [{"h": xb}])
    np.testing.assert_allclose(hessians.hessians[hessians.inputs_of["w_a"]], xa.T @ xa + xb.T @ xb, rtol=1e-5)
    assert hessians.rows[hessians.inputs_of["w_a"]] == 32


def test_inputs_read_in_groups_under_the_byte_budget_give_the_same_statistics(tmp_path):
    """A chain of four Linears whose inputs are read at most 2 per run (by size) gives the
    Hessians, cross terms and float outputs of reading them all at once."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import onnx_model

    rng = np.random.default_rng(3)
    ws = [rng.standard_normal((8, 8)).astype(np.float32) / 3 for _ in range(4)]
    nodes, x = [], "h"
    for i in range(4):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"], name=f"tanh{i}"))
        x = f"t{i}"
    model = onnx_model(nodes, [helper.make_tensor_value_info("h", TensorProto.FLOAT, [16, 8])],
                       [helper.make_tensor_value_info("t3", TensorProto.FLOAT, [16, 8])],
                       [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    onnx_io.save(model, tmp_path / "chain.onnx")
    proto = onnx.load(str(tmp_path / "chain.onnx"), load_external_data=False)
    one_input = 16 * 8 * 4
    batches = gptq.exposure_batches(proto, ["h", "t0", "t1", "t2"], 2 * one_input)
    assert batches == [["h", "t0"], ["t1", "t2"]]  # graph order, two per run
    assert gptq.exposure_batches(proto, [], one_input) == [[]]

    feeds = [{"h": rng.standard_normal((16, 8)).astype(np.float32)} for _ in range(2)]
    distorted = [{"h": f["h"] + 0.05 * rng.standard_normal((16, 8)).astype(np.float32)} for f in feeds]
    results = []
    for budget in (2 * one_input, 1 << 30):
        hessians = gptq.HessianSet(max_exposed_bytes=budget)
        float_feeds = [dict(f) for f in feeds]
        assert hessians.accumulate(tmp_path / "chain.onnx", distorted, float_feeds=float_feeds) == 4
        results.append((hessians, float_feeds))
    (grouped, grouped_out), (whole, whole_out) = results
    assert set(grouped.hessians) == set(whole.hessians) == {"w0", "w1", "w2", "w3"}
    for key in whole.hessians:
        np.testing.assert_allclose(grouped.hessians[key], whole.hessians[key], rtol=1e-6)
        np.testing.assert_allclose(grouped.cross[key], whole.cross[key], rtol=1e-6, atol=1e-7)
        assert grouped.rows[key] == whole.rows[key] == 32
    # the float feeds come back holding the float model's output
    for f, out in zip(feeds, grouped_out):
        ref = f["h"]
        for w in ws:
            ref = np.tanh(ref @ w)
        np.testing.assert_allclose(out["t3"], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grouped.hessians["w2"], sum(
        np.tanh(np.tanh(d["h"] @ ws[0]) @ ws[1]).T @ np.tanh(np.tanh(d["h"] @ ws[0]) @ ws[1]) for d in distorted),
        rtol=1e-4)


def test_a_graph_with_every_weight_skipped_still_advances_the_float_feeds(tmp_path):
    """A partition whose Linears all stay at 16 bit gives no Hessian, but the float chain
    must still pass through it: the next partition reads its outputs."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import onnx_model

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    model = onnx_model(
        [helper.make_node("MatMul", ["h", "w_a"], ["y"], name="mm")],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [16, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 4])],
        [numpy_helper.from_array(w, "w_a")],
    )
    onnx_io.save(model, tmp_path / "a.onnx")
    x, x_float = rng.standard_normal((2, 16, 8)).astype(np.float32)
    hessians = gptq.HessianSet()
    float_feeds = [{"h": x_float}]
    assert hessians.accumulate(tmp_path / "a.onnx", [{"h": x}], skip=["mm"], float_feeds=float_feeds) == 0
    assert not hessians.hessians
    np.testing.assert_allclose(float_feeds[0]["y"], x_float @ w, rtol=1e-5, atol=1e-6)


def _distorted(feeds, seed):
    """The feeds as a quantized chain would deliver them: a systematic distortion (what the
    layers before leave behind) plus independent noise."""
    rng = np.random.default_rng(seed)
    mix = 0.03 * np.random.default_rng(7).standard_normal((K, K)).astype(np.float32)
    out = []
    for f in feeds:
        x = f["x"]
        out.append({"x": x + x @ mix + 0.01 * rng.standard_normal(x.shape).astype(np.float32), "c": f["c"]})
    return out


def test_float_target_absorbs_upstream_error_on_held_out_inputs(float_path):
    """Rounded towards the float layer's output (the float chain's inputs as the target),
    the weights undo part of the upstream distortion: better on held-out data than plain
    GPTQ on the distorted inputs, and the float feeds come back holding the outputs."""
    clean, held_clean = _feeds(4, 0), _feeds(2, 1)
    noisy, held_noisy = _distorted(clean, 2), _distorted(held_clean, 3)
    model = onnx_io.load(float_path)
    w_kn = _weights(model)["/proj/MatMul"]  # [K, N]
    bias = const_array(model.graph.initializers["proj.bias"])

    plain = gptq.HessianSet()
    plain.accumulate(float_path, noisy)
    targeted = gptq.HessianSet()
    float_feeds = [dict(f) for f in clean]
    targeted.accumulate(float_path, noisy, float_feeds=float_feeds)
    for f, c in zip(float_feeds, clean):  # the float model's outputs on the clean inputs
        np.testing.assert_allclose(f["y"][0], c["x"][0] @ w_kn + bias, rtol=0, atol=1e-4)
    x_key = "onnx::MatMul_10"  # the x input's key: the weight reading it
    h = plain.hessians[x_key]
    q_plain = gptq.gptq_round(w_kn, h)
    q_target = gptq.gptq_round(w_kn, targeted.hessians[x_key], cross=targeted.cross[x_key])
    assert gptq.on_grid(q_target)

    xs_noisy = np.concatenate([f["x"][0] for f in held_noisy])
    ref = np.concatenate([f["x"][0] for f in held_clean]) @ w_kn
    gain = sqnr_db(ref, xs_noisy @ q_target) - sqnr_db(ref, xs_noisy @ q_plain)
    assert gain > 10.0, gain

    # identical feeds: nothing to absorb, the correction vanishes
    same = gptq.HessianSet()
    same.accumulate(float_path, clean, float_feeds=[dict(f) for f in clean])
    assert np.abs(same.cross[x_key]).max() == 0.0
    np.testing.assert_array_equal(gptq.gptq_round(w_kn, same.hessians[x_key], cross=same.cross[x_key]),
                                  gptq.gptq_round(w_kn, same.hessians[x_key]))


def test_inverse_upper_cholesky_matches_the_factor_of_the_inverse():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 120))
    h = x.T @ x + 0.1 * np.eye(120)
    u = gptq.inverse_upper_cholesky(h)
    assert u.dtype == np.float32  # computed in float32, as GPTQ does
    np.testing.assert_array_equal(u, np.triu(u))
    inv = np.linalg.inv(h)
    u64 = u.astype(np.float64)
    np.testing.assert_allclose(u64.T @ u64, inv, rtol=0, atol=1e-5 * np.abs(inv).max())
    np.testing.assert_allclose(u64, np.linalg.cholesky(inv).T, rtol=0, atol=1e-5 * np.abs(u64).max())


def test_inverse_upper_cholesky_falls_back_to_float64():
    """A Hessian too ill-conditioned for a float32 Cholesky is factored in float64."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 60))  # rank 40 of 60
    h = x.T @ x + 1e-7 * np.eye(60)
    import torch

    assert int(torch.linalg.cholesky_ex(torch.from_numpy(h.astype(np.float32)))[1]) != 0
    u = gptq.inverse_upper_cholesky(h)
    assert np.isfinite(u).all()
    lower_flipped = np.linalg.cholesky(h[::-1, ::-1])
    expected = np.linalg.inv(lower_flipped[::-1, ::-1])
    np.testing.assert_allclose(u, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_default_damping_holds_up_when_the_hessian_has_fewer_rows_than_inputs():
    # the denoiser's Hessians get 0.5-3 x K rows, many repeated (padding and context
    # tokens): GPTQ's usual 1% damping then fits the calibration rows and loses on new ones
    rng = np.random.default_rng(0)
    k, n = 256, 64
    w = rng.standard_normal((k, n)).astype(np.float32)
    mix = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
    channel = np.abs(1 + 2 * rng.standard_normal(k)).astype(np.float32)

    def rows(m):
        return (rng.standard_normal((m, k)).astype(np.float32) @ mix + rng.standard_normal((m, k)).astype(np.float32)) * channel

    calib, held_out = rows(k // 2), rows(4096)
    h = calib.T @ calib
    ref = held_out @ w
    default = sqnr_db(ref, held_out @ gptq.gptq_round(w, h))
    one_percent = sqnr_db(ref, held_out @ gptq.gptq_round(w, h, damp=0.01))
    assert gptq.DEFAULT_DAMP == pytest.approx(0.1)
    assert default > one_percent + 1.0, (default, one_percent)
