from neodragon_npu.graphs.quant.layerwise import layer_errors
from tests.helpers import small_mlp_qdq


def test_layer_errors_locate_quantization_error(tmp_path):
    _, feeds = small_mlp_qdq(tmp_path, 8, 8)
    errors = layer_errors(tmp_path / "f.onnx", tmp_path / "q.onnx", feeds[:2])
    assert [e.op_type for e in errors][:2] == ["Gemm", "Relu"]
    assert all(20 < e.sqnr_db < 80 for e in errors)
    assert errors[-1].tensor == "y"
    # comparing a model with itself finds no error anywhere
    assert all(e.sqnr_db == float("inf") for e in layer_errors(tmp_path / "f.onnx", tmp_path / "f.onnx", feeds[:1]))


def test_layer_errors_read_in_small_groups_match_one_group(tmp_path):
    """A budget of one tensor per run gives each tensor the same error as reading them all
    in one run, and the groups stay under the budget by their inferred sizes."""
    import onnx

    from neodragon_npu.graphs.quant.layerwise import _static_sizes, exposure_batches

    _, feeds = small_mlp_qdq(tmp_path, 8, 8)
    whole = layer_errors(tmp_path / "f.onnx", tmp_path / "q.onnx", feeds[:2])
    proto = onnx.load(str(tmp_path / "f.onnx"))
    names = [e.tensor for e in whole]
    sizes = _static_sizes(proto)
    assert set(names) <= set(sizes)
    budget = max(sizes[n] for n in names)
    groups = exposure_batches(proto, names, budget)
    assert [n for g in groups for n in g] == names and len(groups) > 1
    assert all(sum(sizes[n] for n in g) <= budget for g in groups)
    grouped = layer_errors(tmp_path / "f.onnx", tmp_path / "q.onnx", feeds[:2], max_bytes=budget)
    assert [(e.tensor, e.op_type) for e in grouped] == [(e.tensor, e.op_type) for e in whole]
    for a, b in zip(grouped, whole):
        assert abs(a.sqnr_db - b.sqnr_db) < 1e-9 and (a.ref_min, a.ref_max) == (b.ref_min, b.ref_max)
