"""The real onnxruntime-qnn HTP compiler and x86 simulator on a small QDQ graph."""

import numpy as np
import pytest
import torch

from graphs import onnx_io, qnn
from graphs.export import export_onnx
from graphs.targets import get_target
from graphs.verify import sqnr_db
from passes.onnx.quantize_w8a16 import QuantizeW8A16Pass

MIN_SQNR_DB = 35.0


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qnn")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    export_onnx(module, [torch.zeros(1, 16)], folder / "f.onnx", input_names=["x"], output_names=["y"])
    rng = np.random.default_rng(0)
    cal = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(16)]
    qdq = QuantizeW8A16Pass(calibration=cal)(onnx_io.load(folder / "f.onnx")).model
    onnx_io.save(qdq, folder / "q.onnx")
    return folder, module


@pytest.mark.parametrize("target_name", ["sm8750", "x-elite"])
def test_context_binary_round_trip_in_the_simulator(qdq_model, target_name):
    folder, module = qdq_model
    target = get_target(target_name)
    ctx = qnn.compile_context_binary(folder / "q.onnx", folder / f"{target_name}_ctx.onnx", target)
    assert ctx.binary.stat().st_size > 0 and ctx.epcontext_model.is_file()
    assert {n.op_type for n in onnx_io.load(ctx.epcontext_model).graph} == {"EPContext"}
    session = qnn.htp_session(ctx.epcontext_model, target)
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    out = qnn.run(session, {"x": x})[0]
    ref = module(torch.from_numpy(x)).detach().numpy()
    assert sqnr_db(ref, out) >= MIN_SQNR_DB
    sig = qnn.io_signature(session)
    assert sig["inputs"][0]["name"] == "x" and sig["outputs"][0]["shape"] == [1, 8]


def test_binaries_differ_between_archs(qdq_model):
    folder, _ = qdq_model
    a = qnn.compile_context_binary(folder / "q.onnx", folder / "a" / "v79_ctx.onnx", get_target("sm8750"))
    b = qnn.compile_context_binary(folder / "q.onnx", folder / "b" / "v73_ctx.onnx", get_target("x-elite"))
    assert a.binary.read_bytes() != b.binary.read_bytes()


def test_missing_feed_is_named(qdq_model):
    folder, _ = qdq_model
    session = qnn.cpu_session(folder / "q.onnx")
    with pytest.raises(ValueError, match=r"missing inputs: \['x'\]"):
        qnn.run(session, {})
