import numpy as np
import torch

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.quant.layerwise import layer_errors
from neodragon_npu.passes.onnx.quantize_w8a16 import QuantizeW8A16Pass


def test_layer_errors_locate_quantization_error(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    export_onnx(module, [torch.zeros(1, 8)], tmp_path / "f.onnx", input_names=["x"], output_names=["y"])
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(8)]
    qdq = QuantizeW8A16Pass(calibration=feeds)(onnx_io.load(tmp_path / "f.onnx")).model
    onnx_io.save(qdq, tmp_path / "q.onnx")
    errors = layer_errors(tmp_path / "f.onnx", tmp_path / "q.onnx", feeds[:2])
    assert [e.op_type for e in errors][:2] == ["Gemm", "Relu"]
    assert all(20 < e.sqnr_db < 80 for e in errors)
    assert errors[-1].tensor == "y"
    # comparing a model with itself finds no error anywhere
    assert all(e.sqnr_db == float("inf") for e in layer_errors(tmp_path / "f.onnx", tmp_path / "f.onnx", feeds[:1]))
