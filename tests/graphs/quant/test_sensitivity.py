import fnmatch

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from neodragon_npu.graphs.quant.gptq import round_to_nearest
from neodragon_npu.graphs.quant.sensitivity import as_patterns, measure_weight_noise


def _two_layers(tmp_path):
    """x -> MatMul(W1) -> Relu -> MatMul(W2) -> y. W1 holds one outlier per output channel,
    on an input the feeds keep at zero: it stretches W1's int8 grid (rounding noise far
    larger than W2's) without adding signal."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.25, (16, 16)).astype(np.float32)
    w1[0] = 8.0  # one element per output column sets a grid 30x coarser than the rest needs
    w2 = rng.normal(0, 0.25, (16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    feeds = [{"x": rng.normal(0, 1, (4, 16)).astype(np.float32)} for _ in range(3)]
    for feed in feeds:
        feed["x"][:, 0] = 0
    return path, feeds, w1, w2


def _forward(x, w1, w2):
    return np.maximum(x @ w1, 0) @ w2


def test_each_weights_int8_noise_is_measured_at_the_output_and_the_noisiest_is_kept(tmp_path):
    path, feeds, w1, w2 = _two_layers(tmp_path)
    noise, joint_db = measure_weight_noise(path, feeds)
    q1, q2 = round_to_nearest(w1), round_to_nearest(w2)
    refs = [_forward(f["x"], w1, w2) for f in feeds]
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in refs)

    def energy(a, b):
        return sum(float(np.sum((r - _forward(f["x"], a, b)).astype(np.float64) ** 2)) for r, f in zip(refs, feeds))

    np.testing.assert_allclose(noise.signal, [signal], rtol=1e-5)
    np.testing.assert_allclose(noise.noise["w1"], [energy(q1, w2)], rtol=1e-3)
    np.testing.assert_allclose(noise.noise["w2"], [energy(w1, q2)], rtol=1e-3)
    assert abs(joint_db - 10 * np.log10(signal / energy(q1, q2))) < 0.01
    assert noise.noise["w1"][0] > 30 * noise.noise["w2"][0]  # the outlier's grid

    w2_alone = noise.predicted_db(["w2"])
    both = noise.predicted_db(["w1", "w2"])
    assert noise.choose_16_bit(both - 1) == []  # already there: nothing kept
    assert noise.choose_16_bit(w2_alone - 1) == ["w1"]  # the noisier one first, and it is enough
    assert noise.choose_16_bit(w2_alone + 1) == ["w1", "w2"]
    assert noise.weight_bytes == {"w1": w1.nbytes, "w2": w2.nbytes}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # its working copy is gone


def test_weights_already_at_16_bit_are_not_measured(tmp_path):
    path, feeds, _, _ = _two_layers(tmp_path)
    noise, _ = measure_weight_noise(path, feeds[:1], skip=["mm1"])
    assert list(noise.noise) == ["w2"]


def test_weight_names_become_patterns_that_match_only_themselves():
    names = ["a.weight", "b[0]*.weight", "c?"]
    patterns = as_patterns(names)
    for name, pattern in zip(names, patterns):
        assert [n for n in [*names, "a_weight", "b0x.weight", "cd"] if fnmatch.fnmatch(n, pattern)] == [name]
