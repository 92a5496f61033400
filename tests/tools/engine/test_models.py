"""The engine on models other than the denoiser: QuickSRNet W8A16 and FP16, checked in the
HTP simulator; the family build stopped after its export."""

import json

import numpy as np
import onnx
import pytest

from neodragon_npu.graphs.feeds import load_samples
from neodragon_npu.tools.cli import EXIT_ERROR, main
from neodragon_npu.tools.engine.artifacts import MANIFEST

# the tiny QuickSRNet, 1000 AdaRound steps, in the HTP simulator: this close to fp32 at least
TINY_SR_MIN_DB = 35.0


@pytest.fixture(scope="module")
def sr_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("sr") / "build"
    assert main(["-q", "build", "quicksrnet", "--config", "tiny", "--adaround-iterations", "1000",
                 "--min-sqnr-db", str(TINY_SR_MIN_DB), "-o", str(out)]) == 0
    return out, json.loads((out / MANIFEST).read_text())


def test_quicksrnet_builds_to_a_verified_binary_with_one_depth_to_space(sr_build):
    out, manifest = sr_build
    assert manifest["pipeline"] == "quicksrnet" and manifest["verification"]["passed"]
    assert manifest["verification"]["sqnr_db"] >= TINY_SR_MIN_DB
    assert manifest["quantization"]["weight_rounding"] == "adaround"
    graph = manifest["graphs"][0]
    assert graph["qnn_ops"]["DepthToSpace"] == 1  # PixelShuffle lowered as one op in the QNN graph
    assert graph["outputs"][0]["shape"] == [1, 3, 96, 128] and graph["inputs"][0]["shape"] == [1, 3, 48, 64]
    # calibration and check frames are different frames
    calib, check = load_samples(out / "calibration_inputs.npz"), load_samples(out / "check_samples.npz")
    assert not any(np.array_equal(a["frame"], b["frame"]) for a in calib for b in check)
    assert "upscaled_fp32" in check[0]


def test_quicksrnet_in_fp16_runs_in_fp16_in_the_simulator(tmp_path):
    out = tmp_path / "fp16"
    assert main(["-q", "build", "quicksrnet", "--config", "tiny", "--precision", "fp16", "-o", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["quantization"] == {"weights": "float16", "activations": "float16"}
    model = onnx.load(str(out / manifest["fp16_model"]))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert manifest["graphs"][0]["inputs"][0]["dtype"] == "tensor(float16)"
    assert manifest["fp16_range"]["largest_abs_activation"] < manifest["fp16_range"]["fp16_max"]
    assert manifest["verification"]["passed"] and "encodings" not in manifest


def test_w8a16_options_are_refused_for_fp16_and_family_options_for_one_graph(tmp_path, capsys):
    for argv, message in (
        (["--precision", "fp16", "--weight-rounding", "gptq"], "--weight-rounding applies to W8A16 builds"),
        (["--partition-budget", "1M"], "--partition-budget applies to a family build"),
        (["--adaround-iterations", "5", "--weight-rounding", "nearest"], "--adaround-iterations applies with"),
        (["--precision", "fp16", "--auto-16bit", "40"], "--auto-16bit applies to W8A16 builds"),
        (["--auto-16bit", "120"], "must lie between 0 and 96 dB"),
    ):
        assert main(["build", "quicksrnet", "--config", "tiny", "-o", str(tmp_path / "x"), *argv]) == EXIT_ERROR
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_family_build_can_stop_after_its_export(tmp_path):
    out = tmp_path / "export"
    assert main(["-q", "build", "denoiser", "--config", "tiny", "--all-stages", "--partition-budget", "220000",
                 "--until", "export", "-o", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    parts = manifest["partitions"]
    assert len(parts) >= 2 and all("weight_bytes_float" in p for p in parts)
    assert all(set(g) >= {"float_model", "inputs", "outputs"} and "qdq_model" not in g
               for p in parts for g in p["graphs"].values())
    assert not list(out.glob("*_w8a16.onnx")) and not list(out.glob("*/*_ctx.onnx"))
    assert main(["verify", str(out)]) == EXIT_ERROR  # nothing quantized to measure


def test_apply_explains_what_each_pass_left_alone(tmp_path, capsys):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[[passes]]\nname = "split_adaln"\n[[passes]]\nname = "fuse_rms_norm"\n')
    assert main(["apply", str(pipeline), "quicksrnet:tiny:x2", "-o", str(tmp_path / "a.onnx"), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do: no RMSNorm chain" in out
    assert "nothing to do: no Linear whose output is chunked" in out
