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
