"""Merging graphs that share weights into one model, and splitting them back."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from neodragon_npu.graphs import shared_weights
from neodragon_npu.graphs.onnx_edit import matches_any
from tests.helpers import clone_onnx, onnx_model, run_onnx

W = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)


def _stage(tokens: int, offset: float):
    """x[tokens, 8] @ W (shared, content-named) + c, where c has one name but stage values."""
    return onnx_model(
        [
            helper.make_node("MatMul", ["x", "w_8x8_0123456789abcdef"], ["h"], name="/proj/MatMul"),
            helper.make_node("Add", ["h", "c"], ["y"], name="/Add"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, 8])],
        [numpy_helper.from_array(W, "w_8x8_0123456789abcdef"),
         numpy_helper.from_array(np.full((8,), offset, np.float32), "c")],
    )


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture
def stages():
    return {"stage2": _stage(16, 1.0), "stage0": _stage(4, -2.0)}


def test_merged_model_stores_shared_weights_once_and_runs_every_graph(stages):
    feeds = {"stage2": {"x": np.ones((16, 8), np.float32)}, "stage0": {"x": np.full((4, 8), 3.0, np.float32)}}
    expected = {t: run_onnx(clone_onnx(m), feeds[t])[0] for t, m in stages.items()}
    merged = shared_weights.merge(stages)
    inits = merged.graph.initializers
    assert "w_8x8_0123456789abcdef" in inits  # shared: stored once, under its own name
    assert {"c", "stage0::c"} <= set(inits)  # same name, other contents: not shared
    assert len(inits) == 3
    assert [v.name for v in merged.graph.inputs] == ["stage2::x", "stage0::x"]
    assert all(n.name.startswith(("stage2::", "stage0::")) for n in merged.graph)
    merged_feed = shared_weights.merged_feeds(merged, {t: [f] for t, f in feeds.items()})
    assert len(merged_feed) == 1 and set(merged_feed[0]) == {"stage2::x", "stage0::x"}
    session = _session(ir.serde.serialize_model(merged))
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, merged_feed[0])))
    # each graph's outputs under its own names again
    for t in ("stage2", "stage0"):
        own = shared_weights.own_values(out, t)
        assert list(own) == ["y"] and np.array_equal(own["y"], expected[t])


def test_split_gives_back_each_graph_with_its_own_names(stages):
    feeds = {"stage2": {"x": np.arange(128, dtype=np.float32).reshape(16, 8)}, "stage0": {"x": np.ones((4, 8), np.float32)}}
    expected = {t: run_onnx(clone_onnx(m), feeds[t])[0] for t, m in stages.items()}
    proto = ir.serde.serialize_model(shared_weights.merge(stages))
    for t in ("stage2", "stage0"):
        part = shared_weights.split(proto, t)
        onnx.checker.check_model(part)
        assert [i.name for i in part.graph.input] == ["x"] and [o.name for o in part.graph.output] == ["y"]
        assert {n.name for n in part.graph.node} == {"/proj/MatMul", "/Add"}
        assert {i.name for i in part.graph.initializer} == {"w_8x8_0123456789abcdef", "c"}
        assert np.array_equal(_session(part).run(None, feeds[t])[0], expected[t])
    with pytest.raises(ValueError, match="no outputs tagged"):
        shared_weights.split(proto, "stage1")


def test_split_encodings_keeps_a_graphs_activations_and_its_weights(tmp_path):
    merged = tmp_path / "m.encodings"
    merged.write_text(json.dumps({
        "version": "1.0.0",
        "activation_encodings": [{"name": "stage2::h", "scale": [1.0]}, {"name": "stage0::h", "scale": [2.0]},
                                 {"name": "w__shared_scalar", "scale": [3.0]}],
        "param_encodings": [{"name": "w_a", "scale": [0.1]}, {"name": "w_b", "scale": [0.2]}],
    }))
    out = shared_weights.split_encodings(merged, "stage0", {"w_a", "w__shared_scalar"}, tmp_path / "s0.encodings")
    data = json.loads(out.read_text())
    assert data["activation_encodings"] == [{"name": "h", "scale": [2.0]}, {"name": "w__shared_scalar", "scale": [3.0]}]
    assert data["param_encodings"] == [{"name": "w_a", "scale": [0.1]}]
    assert data["version"] == "1.0.0"


def test_high_precision_patterns_match_names_without_their_graph_tag(stages):
    merged = shared_weights.merge(stages)
    proj = [n for n in merged.graph if n.op_type == "MatMul"]
    assert len(proj) == 2
    assert all(matches_any(n, ["/proj/*"]) for n in proj)
    assert all(matches_any(n, ["x"]) for n in proj)  # a graph input read directly
    assert not any(matches_any(n, ["/other/*"]) for n in proj)


def test_merged_feeds_repeat_the_graph_with_fewer_feeds(stages):
    merged = shared_weights.merge(stages)
    a, b, c = (np.full((16, 8), v, np.float32) for v in (1, 2, 3))
    z = np.zeros((4, 8), np.float32)
    feeds = shared_weights.merged_feeds(merged, {"stage2": [{"x": a}, {"x": b}, {"x": c}], "stage0": [{"x": z}]})
    assert [f["stage2::x"][0, 0] for f in feeds] == [1, 2, 3]
    assert all(f["stage0::x"] is z for f in feeds)
