from pathlib import Path

import numpy as np
import pytest
import torch

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx, exported_model
from tests.helpers import run_onnx


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_exported_model_is_the_saved_export_and_leaves_no_files(tmp_path):
    module, x = _Mlp().eval(), torch.randn(2, 8)
    saved = onnx_io.load(export_onnx(module, [x], tmp_path / "saved" / "m.onnx", input_names=["x"], output_names=["y"]))
    expected = module(x).detach().numpy()
    with exported_model(module, [x], tmp_path / "work", input_names=["x"], output_names=["y"]) as model:
        assert [v.name for v in model.graph.inputs] == ["x"] and [v.name for v in model.graph.outputs] == ["y"]
        np.testing.assert_allclose(run_onnx(model, {"x": x.numpy()})[0], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(run_onnx(model, {"x": x.numpy()})[0], run_onnx(saved, {"x": x.numpy()})[0])
    assert list((tmp_path / "work").iterdir()) == []  # the exporter's folder is gone
    with pytest.raises(RuntimeError, match="stop"):
        with exported_model(module, [x], tmp_path / "work", input_names=["x"], output_names=["y"]):
            raise RuntimeError("stop")
    assert list((tmp_path / "work").iterdir()) == []
    with pytest.raises(ValueError, match="unknown exporter"):
        with exported_model(module, [x], tmp_path / "work", input_names=["x"], output_names=["y"], exporter="tvm"):
            pass


def test_legacy_export_keeps_the_weights_in_memory(tmp_path):
    deduplicate = torch._C._jit_pass_onnx_deduplicate_initializers
    module, x = _Mlp().eval(), torch.randn(2, 8)
    expected = module(x).detach().numpy()
    written = []
    real_export = torch.onnx.export

    def export(*args, **kwargs):  # what the exporter leaves in its folder
        result = real_export(*args, **kwargs)
        written.extend(p.name for p in Path(args[2]).parent.iterdir())
        return result

    torch.onnx.export = export
    try:
        with exported_model(module, [x], tmp_path, input_names=["x"], output_names=["y"]) as model:
            weights = {v.name: v.const_value for v in model.graph.initializers.values()}
            np.testing.assert_allclose(run_onnx(model, {"x": x.numpy()})[0], expected, rtol=1e-5, atol=1e-6)
            assert [v.name for v in model.graph.inputs] == ["x"]
    finally:
        torch.onnx.export = real_export
    assert written == ["model.onnx"]  # the graph alone: no weight files
    # the module's own tensors, not copies (Gemm takes the Linear weights as they are)
    params = {name: p.data_ptr() for name, p in module.named_parameters()}
    assert {n: w.numpy().__array_interface__["data"][0] for n, w in weights.items()} == params
    assert torch._C._jit_pass_onnx_deduplicate_initializers is deduplicate  # the exporter is left as it was
