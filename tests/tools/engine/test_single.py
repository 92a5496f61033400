"""The whole denoiser build on the tiny config: PyTorch -> verified HTP binary."""

import json

import numpy as np
import pytest

from neodragon_npu.graphs import onnx_io, qnn
from neodragon_npu.tools.engine.artifacts import MANIFEST, OutputDirError
from neodragon_npu.graphs.feeds import load_samples
from neodragon_npu.graphs.targets import get_target
from neodragon_npu.graphs.verify import sqnr_db
from neodragon_npu.neodragon_models.specs import DENOISER
from neodragon_npu.tools.engine.build import build as build_denoiser_stage
from neodragon_npu.tools.engine.options import BuildOptions

MIN_SQNR_DB = DENOISER.min_sqnr_db


def DenoiserBuildOptions(*, stage=2, target="sm8750", remove_blocks=None, **kwargs):
    """A one-stage denoiser build's options."""
    options = {"remove_blocks": remove_blocks} if remove_blocks else {}
    return BuildOptions(model="denoiser", graphs=(str(stage),), targets=(target,), model_options=options, **kwargs)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("builds") / "stage2"
    result = build_denoiser_stage(DenoiserBuildOptions(config="tiny", stage=2), out)
    return out, result


def test_build_passes_its_simulator_check(build):
    out, result = build
    assert result.sqnr_db >= MIN_SQNR_DB
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["verification"]["passed"] and manifest["verification"]["samples"] == 6
    assert manifest["target"] == {"name": "sm8750", "soc_model": 69, "htp_arch": 79}


def test_build_directory_holds_every_artefact_with_checksums(build):
    out, _ = build
    manifest = json.loads((out / MANIFEST).read_text())
    names = {f["path"] for f in manifest["files"]}
    for expected in (
        "denoiser_stage2_float.onnx",
        "denoiser_stage2_w8a16.onnx",
        "denoiser_stage2_w8a16.encodings",
        "denoiser_stage2_sm8750_ctx.onnx",
        "denoiser_stage2_sm8750_ctx_qnn.bin",
        "calibration_inputs.npz",
        "check_samples.npz",
        "report.txt",
    ):
        assert expected in names, expected
    for entry in manifest["files"]:
        assert onnx_io.sha256(out / entry["path"]) == entry["sha256"]
        assert (out / entry["path"]).stat().st_size == entry["bytes"]
    graph = manifest["graphs"][0]
    assert [i["name"] for i in graph["inputs"]][:2] == ["latent_tokens", "pos_embed"]
    assert graph["outputs"][0]["shape"] == [1, 32, 16]
    assert "HTP simulator vs fp32" in (out / "report.txt").read_text()


def test_the_written_binary_reproduces_the_recorded_check(build):
    out, result = build
    target = get_target("sm8750")
    session = qnn.htp_session(out / "denoiser_stage2_sm8750_ctx.onnx", target)
    sample = load_samples(out / "check_samples.npz")[0]
    ref = sample.pop("noise_pred_fp32")
    assert sqnr_db(ref, qnn.run(session, sample)[0]) >= MIN_SQNR_DB


def test_no_verify_htp_checks_the_deployed_graph_on_the_cpu(build, tmp_path):
    out, result = build
    cpu_out = tmp_path / "stage2"
    # the same cache: every step up to the check is reused, and only the CPU check runs
    cpu = build_denoiser_stage(DenoiserBuildOptions(config="tiny", stage=2, verify_htp=False,
                                                    cache_dir=out.parent / "stage2.cache"), cpu_out)
    manifest = json.loads((cpu_out / MANIFEST).read_text())
    steps = [s["step"] for s in manifest["steps"]]
    assert not any("HTP simulator" in s for s in steps) and any("on the CPU" in s for s in steps)
    assert manifest["verification"]["device"].startswith("CPU (onnxruntime)")
    # recomputed here from the deployed QDQ graph on the CPU, sample by sample
    session = qnn.cpu_session(cpu_out / "denoiser_stage2_w8a16.onnx")
    samples = load_samples(cpu_out / "check_samples.npz")
    refs = [s.pop("noise_pred_fp32") for s in samples]
    worst = min(sqnr_db(r, qnn.run(session, s)[0]) for r, s in zip(refs, samples))
    assert manifest["verification"]["min_sample_sqnr_db"] == pytest.approx(worst, abs=0.01)
    # the CPU runs the same W8A16 graph the simulator ran: they agree within a few dB
    assert abs(cpu.sqnr_db - result.sqnr_db) < 3.0 and cpu.sqnr_db >= MIN_SQNR_DB
    assert "the deployed graph on the CPU vs fp32" in (cpu_out / "report.txt").read_text()


def test_failed_build_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        build_denoiser_stage(DenoiserBuildOptions(config="tiny", checkpoint=tmp_path / "missing"), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_foreign_output_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="holds no neodragon-npu output"):
        build_denoiser_stage(DenoiserBuildOptions(config="tiny"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_export_only_build_replaces_a_previous_build(build, tmp_path):
    out = tmp_path / "b"
    build_denoiser_stage(DenoiserBuildOptions(config="tiny", stage=0, until="export"), out)
    first = json.loads((out / MANIFEST).read_text())
    assert "verification" not in first and first["graphs"][0]["outputs"][0]["shape"] == [1, 2, 16]
    build_denoiser_stage(DenoiserBuildOptions(config="tiny", stage=1, until="export"), out)
    assert json.loads((out / MANIFEST).read_text())["stage"] == 1
    assert not (out / "denoiser_stage0_float.onnx").exists()


def test_bad_options_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown --until"):
        build_denoiser_stage(DenoiserBuildOptions(until="dance"), tmp_path / "x")
    with pytest.raises(ValueError, match="unknown target"):
        build_denoiser_stage(DenoiserBuildOptions(target="sm1"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_pruned_model_builds_to_a_verified_binary(tmp_path, caplog):
    out = tmp_path / "pruned"
    with caplog.at_level("INFO", logger="neodragon_npu"):
        result = build_denoiser_stage(DenoiserBuildOptions(config="tiny", stage=0, remove_blocks="1"), out)
    # the log and the report both say the model was pruned
    assert "removed 1 of the 3 MMDiT blocks before tracing: 1" in caplog.text
    assert "Model: 1 of 3 blocks removed before tracing (1)" in (out / "report.txt").read_text()
    assert result.sqnr_db >= MIN_SQNR_DB
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model"]["removed_blocks"] == [1]
    assert manifest["model"]["block_mapping"] == {"0": 0, "2": 1}
    assert json.loads((out / "block_mapping.json").read_text())["original_blocks"] == 3
