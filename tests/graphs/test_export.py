import numpy as np
import pytest
import torch

from graphs import onnx_io
from graphs.export import export_onnx, exported_model
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
