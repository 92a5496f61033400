import pytest

from neodragon_npu.graphs import onnx_io
from neodragon_npu.passes.registry import create_pass
from neodragon_npu.tools.engine.apply import apply_pipeline, parse_model_spec


def test_model_specs_are_parsed_and_checked():
    spec, config, graph = parse_model_spec("denoiser:tiny:2")
    assert (spec.name, config, graph.name) == ("denoiser", "tiny", "stage2")
    assert parse_model_spec("denoiser:tiny:stage0")[2].manifest_key == "0"
    assert parse_model_spec("quicksrnet:tiny:x2")[2].output_names == ("upscaled",)
    with pytest.raises(ValueError, match="neither an .onnx file"):
        parse_model_spec("vae:tiny")
    with pytest.raises(ValueError, match="unknown model 'vae'"):
        parse_model_spec("vae:tiny:0")
    with pytest.raises(ValueError, match="unknown denoiser config"):
        parse_model_spec("denoiser:giant:0")
    with pytest.raises(ValueError, match="has no graph '7'"):
        parse_model_spec("denoiser:tiny:7")


def test_apply_traces_runs_fx_then_onnx_passes(tmp_path):
    passes = [create_pass("specialize_shapes"), create_pass("fold_constants"), create_pass("remove_unused_nodes")]
    result = apply_pipeline(passes, "denoiser:tiny:0", tmp_path / "out.onnx", verify_each_pass=True, dump_dir=tmp_path / "d")
    assert [r.name for r in result.records] == ["specialize_shapes", "fold_constants", "remove_unused_nodes"]
    model = onnx_io.load(result.output)
    assert "Shape" not in {n.op_type for n in model.graph}
    assert (tmp_path / "d" / "fx" / "01_specialize_shapes.txt").is_file()
    assert (tmp_path / "d" / "onnx" / "02_remove_unused_nodes.txt").is_file()
    # the written model runs again through ONNX-only passes
    again = apply_pipeline([create_pass("fold_constants")], str(result.output), tmp_path / "again.onnx")
    assert not again.records[0].modified


def test_fx_passes_need_a_model_spec_and_must_come_first(tmp_path):
    with pytest.raises(ValueError, match="need a traced model"):
        apply_pipeline([create_pass("specialize_shapes")], str(tmp_path / "m.onnx"), tmp_path / "o.onnx")
    with pytest.raises(ValueError, match="come after an ONNX pass"):
        apply_pipeline(
            [create_pass("fold_constants"), create_pass("specialize_shapes")], "denoiser:tiny:0", tmp_path / "o.onnx"
        )
