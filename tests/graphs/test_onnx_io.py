import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from neodragon_npu.graphs import onnx_io
from tests.helpers import onnx_model, run_onnx


def _model(n=64):
    w = np.arange(n * n, dtype=np.float32).reshape(n, n) / (n * n)
    return onnx_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [onnx.numpy_helper.from_array(w, "w")],
    )


def test_round_trip_inline(tmp_path):
    path = onnx_io.save(_model(), tmp_path / "m.onnx")
    assert not onnx_io.data_path(path).exists()
    x = {"x": np.ones((1, 64), np.float32)}
    assert np.allclose(run_onnx(onnx_io.load(path), x)[0], run_onnx(_model(), x)[0])


def test_large_models_keep_weights_in_one_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "INLINE_LIMIT_BYTES", 1024)
    path = onnx_io.save(_model(), tmp_path / "m.onnx")
    assert onnx_io.data_path(path).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    x = {"x": np.ones((1, 64), np.float32)}
    assert np.allclose(run_onnx(onnx_io.load(path), x)[0], run_onnx(_model(), x)[0])
    # saving the loaded model elsewhere streams the weights into a new single data file
    copy = onnx_io.save(onnx_io.load(path), tmp_path / "copy.onnx")
    assert onnx_io.data_path(copy).stat().st_size == onnx_io.data_path(path).stat().st_size


def test_missing_truncated_and_corrupt_files_are_reported(tmp_path, monkeypatch):
    with pytest.raises(onnx_io.ModelFileError, match="no such ONNX file"):
        onnx_io.load(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(onnx_io.ModelFileError, match="not a readable ONNX model|empty"):
        onnx_io.load(bad)
    monkeypatch.setattr(onnx_io, "INLINE_LIMIT_BYTES", 1024)
    path = onnx_io.save(_model(), tmp_path / "m.onnx")
    data = onnx_io.data_path(path)
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(onnx_io.ModelFileError, match="truncated"):
        onnx_io.load(path)
    data.unlink()
    with pytest.raises(onnx_io.ModelFileError, match="is missing"):
        onnx_io.load(path)


def test_sha256_of_a_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert onnx_io.sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_io_signature_lists_activation_inputs_only():
    sig = onnx_io.io_signature(_model())
    assert sig == {
        "inputs": [{"name": "x", "shape": [1, 64], "dtype": "tensor(float)"}],
        "outputs": [{"name": "y", "shape": [1, 64], "dtype": "tensor(float)"}],
    }


@pytest.mark.parametrize("inline_limit", [1 << 30, 1024])
def test_file_interface_reads_what_a_full_load_gives(tmp_path, monkeypatch, inline_limit):
    monkeypatch.setattr(onnx_io, "INLINE_LIMIT_BYTES", inline_limit)  # weights inline, then in a data file
    w = onnx.numpy_helper.from_array(np.ones((64, 32), np.float32), "w")
    q = onnx.numpy_helper.from_array(np.ones((32, 16), np.int8), "q")
    b = onnx.numpy_helper.from_array(np.zeros(16, np.float16), "b")  # also listed as a graph input
    model = onnx_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["h", "qf"], ["y0"]), helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["y0", "bf"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT16, [16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 32])],
        [w, q, b],
    )
    path = onnx_io.save(model, tmp_path / "m.onnx")
    assert onnx_io.data_path(path).exists() == (inline_limit == 1024)
    signature, nbytes = onnx_io.file_interface(path)
    loaded = onnx_io.load(path)
    assert signature == onnx_io.io_signature(loaded) and nbytes == onnx_io.weight_bytes(loaded) == 64 * 32 * 4 + 32 * 16 + 16 * 2
    assert [x["name"] for x in signature["inputs"]] == ["x"] and [y["name"] for y in signature["outputs"]] == ["y", "h"]
